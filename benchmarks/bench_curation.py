"""Curation at scale on synthetic embeddings: deduplication and retrieval (dinokernels.curation) at 10k, 100k and
1,000,000 × 384, time, peak resident memory and the approximate index's recall.

Data (float32, unit rows): N·(1 − dup) distinct rows around N/100 cluster centres (cosine between members of a
cluster ≈ 0.5, so clusters are realistic for k-means and IVF, yet no two distinct rows are near copies), then
N·dup planted near copies of random distinct rows (cosine ≈ 0.98 to their original), appended after them (so the
original is the row kept). Curated set: N/1000 rows (at least 10) near random distinct rows (cosine ≈ 0.9).

Stages, each timed once in a child process (so one stage's memory is not another's):
  dedup       duplicate_components at threshold 0.9, k = 16: index (exact up to 20,000 rows, else IVF-Flat with
              4·√N lists, nprobe 16), k-NN self-search, recall measured on 1,000 queries against exact search,
              connected components; planted copies found and distinct rows wrongly removed are counted.
  nearest     retrieve_nearest, 4 per curated row, on the deduplicated pool (exact: N/1000 queries make at most
              10^9 query × pool pairs, under the 2·10^9 above which an index is trained).
  clusters    retrieve_by_clusters: spherical k-means with N/1000 clusters (trained on ≤ 256 rows per cluster,
              k-means++ seeding), every pool row assigned, the 4 nearest of its cluster per curated row.
Peak memory is the process's resident high-water mark during the stage (data included: N·384·4 bytes).

    nice python benchmarks/bench_curation.py                     # 10k, 100k, 1M (1M: ~10+ min on 2 cores)
    python benchmarks/bench_curation.py --sizes 10000 --record   # append to results.jsonl, rewrite RESULTS.md
"""
import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness  # noqa: E402

BENCH = "curation"
TABLE_KEYS = ["N", "D", "stage", "index", "nprobe", "recall", "recall_above_threshold", "found_planted",
              "false_removed", "retrieved"]
DIM = 384
DUP_FRACTION = 0.05
THRESHOLD = 0.9
STAGES = ("dedup", "nearest", "clusters")
_MARKER = "DK_CURATION_JSON "
NOTE = ("Synthetic clustered embeddings with 5% planted near copies (cos ≈ 0.98), threshold 0.9, k = 16; one timed "
        "run per stage in its own process; MB = peak resident set of that process (the embeddings included); "
        "recall = k-recall@k of the IVF index vs exact search on 1,000 queries, recall_above_threshold = share of the "
        "exact above-threshold pairs the index found.")



def synthetic(n: int, dim: int = DIM, seed: int = 0):
    """(x (n, dim) float32 unit rows, planted copy rows (sorted), curated (n/100, dim)) as in the docstring."""
    rng = np.random.default_rng(seed)
    n_dup = int(n * DUP_FRACTION)
    n_base = n - n_dup
    centres = rng.standard_normal((max(1, n // 100), dim), dtype=np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    x = np.empty((n, dim), np.float32)
    chunk = 65536
    for s in range(0, n_base, chunk):
        e = min(n_base, s + chunk)
        noise = rng.standard_normal((e - s, dim), dtype=np.float32)
        noise /= np.linalg.norm(noise, axis=1, keepdims=True)
        x[s:e] = centres[rng.integers(0, centres.shape[0], e - s)] + noise  # cos to centre ≈ 0.7
    originals = rng.integers(0, n_base, n_dup)
    for s in range(0, n_dup, chunk):
        e = min(n_dup, s + chunk)
        noise = rng.standard_normal((e - s, dim), dtype=np.float32)
        noise /= np.linalg.norm(noise, axis=1, keepdims=True)
        x[n_base + s:n_base + e] = x[originals[s:e]] / np.linalg.norm(x[originals[s:e]], axis=1, keepdims=True) \
            + 0.2 * noise
    for s in range(0, n, chunk):
        x[s:s + chunk] /= np.linalg.norm(x[s:s + chunk], axis=1, keepdims=True)
    n_cur = max(10, n // 1000)
    noise = rng.standard_normal((n_cur, dim), dtype=np.float32)
    noise /= np.linalg.norm(noise, axis=1, keepdims=True)
    base = x[rng.integers(0, n_base, n_cur)]
    curated = base + 0.5 * noise
    curated /= np.linalg.norm(curated, axis=1, keepdims=True)
    return x, np.arange(n_base, n), curated


def _peak_reset():
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def _peak_mb():
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024 * 1.048576  # kB → MB (10^6 bytes)
    return None


def run_stage(n: int, stage: str, threads: int) -> dict:
    """One stage on fresh data (child process): its time, peak RSS and what it found."""
    from dinokernels.curation.dedup import duplicate_components
    from dinokernels.curation.select import retrieve_by_clusters, retrieve_nearest

    x, copies, curated = synthetic(n)
    out = {"N": n, "D": DIM, "stage": stage}
    if stage != "dedup":  # retrieval runs on the deduplicated pool: the planted copies left out
        candidates = np.ones(n, bool)
        candidates[copies] = False
    _peak_reset()
    t0 = time.perf_counter()
    if stage == "dedup":
        result = duplicate_components(x, THRESHOLD, k=16, threads=threads)
        seconds = time.perf_counter() - t0
        removed = np.flatnonzero(~result.kept)
        info = result.info
        out.update(index=info.get("index"), recall=info.get("recall"),
                   recall_above_threshold=info.get("recall_above_threshold"),
                   found_planted=round(float(np.isin(copies, removed).mean()), 6),
                   false_removed=int((~np.isin(removed, copies)).sum()), nprobe=info.get("nprobe"))
    elif stage == "nearest":
        sel = retrieve_nearest(x, curated, 4, candidates, threads=threads)
        seconds = time.perf_counter() - t0
        info = sel.info["search"]
        out.update(index=info.get("index"), recall=info.get("recall"), retrieved=int(sel.selected.sum()),
                   nprobe=info.get("nprobe"))
    else:
        k = max(2, n // 1000)
        sel = retrieve_by_clusters(x, curated, k, 4, candidates, threads=threads)
        seconds = time.perf_counter() - t0
        out.update(index=f"k-means {k}", retrieved=int(sel.selected.sum()),
                   curated_clusters=sel.info["curated_clusters"])
    out["seconds"] = seconds
    out["peak_mb"] = _peak_mb()
    out["data_mb"] = x.nbytes / 1e6
    return out


def _child(n: int, stage: str, threads: int) -> dict:
    cmd = [sys.executable, __file__, "--child", str(n), stage, "--threads", str(threads)]
    done = subprocess.run(cmd, capture_output=True, text=True)
    for line in done.stdout.splitlines():
        if line.startswith(_MARKER):
            return json.loads(line[len(_MARKER):])
    raise RuntimeError(f"stage {stage} at N={n} failed (exit {done.returncode}): {done.stderr[-2000:]}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    parser.add_argument("--stages", nargs="+", choices=STAGES, default=list(STAGES))
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="faiss / torch threads")
    parser.add_argument("--record", action="store_true",
                        help="append to benchmarks/results.jsonl and rewrite benchmarks/RESULTS.md")
    parser.add_argument("--child", nargs=2, metavar=("N", "STAGE"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    if args.child:
        import torch

        torch.set_num_threads(args.threads)
        print(_MARKER + json.dumps(run_stage(int(args.child[0]), args.child[1], args.threads)), flush=True)
        return 0
    import torch

    torch.set_num_threads(args.threads)
    env = harness.environment("cpu")
    env["device_name"] = harness.device_name("cpu").rsplit(",", 1)[0] + f", {args.threads} threads"
    print(f"curation on {env['device_name']}, 1-min load {env.get('load_1min')}", flush=True)
    command = "python benchmarks/bench_curation.py " + " ".join(sys.argv[1:])
    records = []
    for n in args.sizes:
        for stage in args.stages:
            r = _child(n, stage, args.threads)
            rec = {"bench": BENCH, **env, **{k: v for k, v in r.items() if k not in ("seconds",)},
                   "impl": "dinokernels.curation", "median_ms": r["seconds"] * 1e3, "iqr_ms": None,
                   "load_1min_end": round(os.getloadavg()[0], 2), "command": command.strip(), "note": NOTE}
            for key in TABLE_KEYS:
                rec.setdefault(key, None)
            for key in ("recall", "recall_above_threshold"):
                if rec.get(key) is not None:
                    rec[key] = round(rec[key], 4)
            records.append(rec)
            harness.append_jsonl([rec], harness.SCRATCH_JSONL)  # kept even if a later size is interrupted
            extra = ", ".join(f"{k} {r[k]}" for k in ("index", "recall", "recall_above_threshold", "found_planted",
                                                      "false_removed", "retrieved") if r.get(k) is not None)
            print(f"N={n:>9,} {stage:<8} {r['seconds']:9.2f} s  peak RSS {r['peak_mb']:9.1f} MB "
                  f"(data {r['data_mb']:.0f} MB)  {extra}", flush=True)
    if args.record:
        harness.append_jsonl(records, harness.DEFAULT_JSONL)
        harness.render_results_md()
        print(f"recorded in {harness.DEFAULT_JSONL} and {harness.RESULTS_MD}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
