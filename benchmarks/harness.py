"""Shared benchmark harness: interleaved timing of implementations, peak memory, environment facts,
JSON-lines records and the RESULTS.md table.

Timing: CPU with torch.utils.benchmark (blocked_autorange), CUDA with events; implementations are measured in
alternating rounds so that a machine whose speed drifts (shared cloud cores do) biases none of them, and the
median over all rounds is reported with its interquartile range.

Peak memory: CUDA from the caching allocator's peak; CPU as the rise of the resident set's high-water mark
(/proc/self/clear_refs resets it) in a child process started with MALLOC_MMAP_THRESHOLD_=16384, so that glibc
serves every allocation over 16 KB by mmap, freed memory leaves the process and each call's peak is seen
afresh. It counts everything the call touches, the kernels' own scratch included. The child re-runs the same
benchmark script in a memory-only mode; timing stays in the parent, whose malloc is untouched (that setting
slows allocation-heavy code).
"""
import datetime
import gc
import json
import os
import platform
import statistics
import subprocess
import sys
from pathlib import Path

import torch
import torch.utils.benchmark as tbench

ROOT = Path(__file__).resolve().parent
DEFAULT_JSONL = ROOT / "results.jsonl"
RESULTS_MD = ROOT / "RESULTS.md"
SCRATCH_JSONL = ROOT / "out" / "results.jsonl"


# ---------------------------------------------------------------- environment

def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_name(device: str) -> str:
    if device == "cuda":
        return torch.cuda.get_device_name()
    return f"{cpu_name()}, {os.cpu_count()} cores, {torch.get_num_threads()} threads"


def git_sha() -> str:
    try:
        sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                             timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return (sha + ("-dirty" if dirty else "")) if sha else "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def environment(device: str) -> dict:
    import dinokernels

    env = {"device": device, "device_name": device_name(device), "torch": torch.__version__,
           "dinokernels": dinokernels.__version__, "git": git_sha(),
           "time": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")}
    if hasattr(os, "getloadavg"):  # other processes on a shared machine: ratios from one run stay comparable
        env["load_1min"] = round(os.getloadavg()[0], 2)
        env["cpu_count"] = os.cpu_count()
    return env


# ---------------------------------------------------------------- timing

def _cpu_samples(fn, min_run_time: float):
    # Timer defaults to one thread; measure with the threads torch (and so the kernels) would use.
    m = tbench.Timer(stmt="fn()", globals={"fn": fn}, num_threads=torch.get_num_threads()).blocked_autorange(
        min_run_time=min_run_time)
    return list(m.times)


def _cuda_samples(fn, min_run_time: float):
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    start.record()
    fn()
    end.record()
    torch.cuda.synchronize()
    once = max(start.elapsed_time(end) / 1e3, 1e-6)
    per_block = max(1, min(1000, int(0.02 / once)))  # ~20 ms per sample: launch gaps amortised
    samples = []
    budget = max(3, int(min_run_time / (once * per_block)))
    for _ in range(budget):
        start.record()
        for _ in range(per_block):
            fn()
        end.record()
        torch.cuda.synchronize()
        samples.append(start.elapsed_time(end) / 1e3 / per_block)
    return samples


def interleaved_times(fns: dict, device: str, rounds: int = 5, min_run_time: float = 0.1) -> dict:
    """{name: fn} → {name: (median s, interquartile range s)}, measured in alternating rounds."""
    for fn in fns.values():  # warm-up: lazy init, compilation, allocator caches
        fn()
        fn()
    samples = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            samples[name] += (_cuda_samples if device == "cuda" else _cpu_samples)(fn, min_run_time)
    out = {}
    for name, s in samples.items():
        q = statistics.quantiles(s, n=4) if len(s) >= 2 else [s[0]] * 3
        out[name] = (statistics.median(s), q[2] - q[0])
    return out


# ---------------------------------------------------------------- memory

MEMORY_PROBE_ENV = "DK_BENCH_MEMORY_PROBE"
_PROBE_MARKER = "DK_BENCH_MEMORY_JSON "


def _status_bytes(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key):
                return int(line.split()[1]) * 1024
    raise KeyError(key)


def peak_memory_bytes(fn, device: str):
    """Extra memory a call of fn needs at its peak, in bytes (None where it cannot be measured). On the CPU this
    is only meaningful in the memory-probe child (see the module docstring)."""
    if device == "cuda":
        fn()
        torch.cuda.synchronize()
        gc.collect()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base
    if not sys.platform.startswith("linux"):
        return None
    fn()
    gc.collect()
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset VmHWM to the current RSS
    except OSError:
        return None
    base = _status_bytes("VmRSS:")
    fn()
    return max(0, _status_bytes("VmHWM:") - base)


# ---------------------------------------------------------------- running and reporting

def _case_key(params) -> str:
    return json.dumps(params, sort_keys=True)


def _cpu_memory_from_child(script_argv):
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "16384", "GLIBC_TUNABLES": "glibc.malloc.mmap_threshold=16384",
           MEMORY_PROBE_ENV: "1"}
    result = subprocess.run([sys.executable, *script_argv], env=env, capture_output=True, text=True)
    for line in result.stdout.splitlines():
        if line.startswith(_PROBE_MARKER):
            return json.loads(line[len(_PROBE_MARKER):])
    print(f"warning: memory probe failed (exit {result.returncode}): {result.stderr[-2000:]}", file=sys.stderr)
    return {}


def run(bench: str, device: str, cases, rounds: int = 5, min_run_time: float = 0.1, reference: str = "reference",
        script_argv=None):
    """cases: iterable of (params dict, {impl: fn}). Returns records with median/IQR ms, peak MB and, for every
    impl other than `reference`, the time and memory ratio to it measured in the same run. On the CPU the
    memory is measured by re-running `script_argv` (default: this process's command line) in a child."""
    cases = list(cases)
    if os.environ.get(MEMORY_PROBE_ENV) == "1":  # we are the child: memory only, then leave
        out = {}
        for params, fns in cases:
            for impl, fn in fns.items():
                out[_case_key(params) + "|" + impl] = peak_memory_bytes(fn, device)
        print(_PROBE_MARKER + json.dumps(out), flush=True)
        sys.exit(0)
    env = environment(device)
    records = []
    for params, fns in cases:
        times = interleaved_times(fns, device, rounds, min_run_time)
        for impl, (median, iqr) in times.items():
            records.append({"bench": bench, **env, **params, "impl": impl, "median_ms": median * 1e3,
                            "iqr_ms": iqr * 1e3})
        print(format_row(params, times), flush=True)
    if device == "cuda":
        memory = {_case_key(params) + "|" + impl: peak_memory_bytes(fn, device)
                  for params, fns in cases for impl, fn in fns.items()}
    else:
        memory = _cpu_memory_from_child(script_argv if script_argv is not None else sys.argv)
    keys = list(cases[0][0]) if cases else []
    for rec in records:
        peak = memory.get(_case_key({k: rec[k] for k in keys}) + "|" + rec["impl"])
        rec["peak_mb"] = None if peak is None else peak / 1e6
    by_case = {}
    for rec in records:
        by_case.setdefault(tuple(rec[k] for k in keys), {})[rec["impl"]] = rec
    for group in by_case.values():
        ref = group.get(reference)
        for rec in group.values():
            if ref is not None and rec is not ref:
                rec["speedup_vs_" + reference] = ref["median_ms"] / rec["median_ms"]
                if ref.get("peak_mb") and rec.get("peak_mb") is not None:
                    rec["memory_vs_" + reference] = rec["peak_mb"] / ref["peak_mb"]
        compiled, kernel = group.get(COMPILED), group.get("kernel")
        if compiled is not None and kernel is not None:  # kernel vs the reference under torch.compile, same run
            kernel["speedup_vs_" + COMPILED] = compiled["median_ms"] / kernel["median_ms"]
    return records


def format_row(params, times) -> str:
    text = " ".join(f"{k}={v}" for k, v in params.items())
    return text + "  " + "  ".join(f"{name} {t * 1e3:.3f} ms" for name, (t, _) in times.items())


def print_table(records, key_fields, reference: str = "reference"):
    impls = list(dict.fromkeys(r["impl"] for r in records))
    header = key_fields + [f"{i} ms" for i in impls] + [f"{i} MB" for i in impls] + \
        [f"{i} speed-up" for i in impls if i != reference] + [f"{i} memory" for i in impls if i != reference]
    with_compiled = COMPILED in impls and "kernel" in impls
    if with_compiled:
        header.append("kernel vs compiled")
    rows = {}
    for r in records:
        rows.setdefault(tuple(r[k] for k in key_fields), {})[r["impl"]] = r
    lines = [" | ".join(header), " | ".join("---" for _ in header)]
    for key, group in rows.items():
        cells = [str(k) for k in key]
        cells += [f"{group[i]['median_ms']:.3f}" if i in group else "" for i in impls]
        cells += [_mb(group[i].get("peak_mb")) if i in group else "" for i in impls]
        cells += [f"{group[i].get('speedup_vs_' + reference, float('nan')):.2f}×" if i in group else ""
                  for i in impls if i != reference]
        cells += [_ratio(group[i].get("memory_vs_" + reference)) if i in group else ""
                  for i in impls if i != reference]
        if with_compiled:
            cells.append(_ratio(group.get("kernel", {}).get("speedup_vs_" + COMPILED)))
        lines.append(" | ".join(cells))
    return "\n".join("| " + line + " |" for line in lines)


def _mb(value):
    return "n/a" if value is None else f"{value:.2f}"


def _ratio(value):
    return "n/a" if value is None else f"{value:.2f}×"


def append_jsonl(records, path: Path):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        for rec in records:
            f.write(json.dumps(rec, sort_keys=True) + "\n")


COMPILED = "reference_compiled"  # the reference under torch.compile

TABLE_KEYS = {"koleo": ["B", "D", "dtype", "mode"],
              "dino_loss": ["variant", "S", "T", "B", "K", "dtype", "mode"],
              "ibot_patch_loss": ["n", "K", "dtype", "mode"],
              "softmax_center": ["N", "K", "dtype", "sum"],
              "sinkhorn_knopp": ["N", "K", "dtype", "iters"],
              "matcher": ["part", "L", "B", "Q", "G", "T", "map", "dtype"],
              "ms_deform_attn": ["case", "locations", "N", "Lq", "S", "dtype", "mode"],
              "grounding_dino": ["config", "H", "W", "batch", "dtype"],
              "grounding_dino_batch": ["config", "H", "W", "batch", "dtype"],
              "dinov2_train": ["model", "part", "B", "K", "dtype"],
              "dinov2_inference": ["model", "res", "batch", "dtype"],
              "curation": ["N", "D", "stage", "index", "nprobe", "recall", "recall_above_threshold", "found_planted",
                           "false_removed", "retrieved"]}
# The implementation the ratios compare against, where it is not "reference".
TABLE_REFERENCE = {"grounding_dino": "transformers", "grounding_dino_batch": "kernel",
                   "dinov2_inference": "transformers", "curation": "dinokernels.curation"}


# ---------------------------------------------------------------- command line shared by the bench_<op> scripts

def standard_parser(doc: str, default_dtypes=("float32",)):
    import argparse

    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--dtype", nargs="+", default=list(default_dtypes),
                        choices=["float32", "float64", "float16", "bfloat16"])
    parser.add_argument("--quick", action="store_true", help="only the issue's target shape")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--min-run-time", type=float, default=0.1, help="seconds per implementation per round")
    parser.add_argument("--record", action="store_true",
                        help="append to benchmarks/results.jsonl and rewrite benchmarks/RESULTS.md")
    parser.add_argument("--jsonl", type=Path, default=None, help="also append the records here")
    parser.add_argument("--compile", action="store_true",
                        help="also time the reference under torch.compile (always done with --device cuda)")
    parser.add_argument("--require-target", action="store_true",
                        help="exit with status 1 when a CPU target is measured and not met")
    return parser


def compile_reference(args) -> bool:
    """Whether a bench times the reference under torch.compile too (`reference_compiled`): on CUDA, or --compile."""
    return args.device == "cuda" or bool(getattr(args, "compile", False))


def check_targets(records, targets) -> bool:
    """targets: [(params that select the kernel record, min speed-up, max memory ratio or None, text[, baseline])]
    with baseline "reference" (default) or "reference_compiled" (measured only with --compile on the CPU).
    Prints a verdict per measured target; False when one is measured and missed."""
    ok_all = True
    for match, speedup, memory, text, *rest in targets:
        baseline = rest[0] if rest else "reference"
        for rec in records:
            if rec["impl"] != "kernel" or any(rec.get(k) != v for k, v in match.items()):
                continue
            if "speedup_vs_" + baseline not in rec:
                continue
            speed, mem = rec.get("speedup_vs_" + baseline, 0.0), rec.get("memory_vs_reference")
            if baseline != "reference":
                mem, memory = None, None
            ok = speed >= speedup and (memory is None or (mem is not None and mem <= memory))
            ok_all &= ok
            print(f"target ({text}): {speed:.2f}x, memory {_ratio(mem)} -> {'met' if ok else 'NOT met'}")
    return ok_all


def finish(bench: str, records, args, targets=()) -> int:
    """Prints the table, checks targets (CPU), appends the JSON lines and, with --record, RESULTS.md."""
    command = f"python benchmarks/bench_{bench}.py " + " ".join(sys.argv[1:])
    for rec in records:
        rec["command"] = command.strip()
    print()
    print(print_table(records, TABLE_KEYS[bench]))
    verdict = 0
    if args.device == "cpu" and targets:
        print()
        if not check_targets(records, targets) and args.require_target:
            verdict = 1
    append_jsonl(records, SCRATCH_JSONL)
    if args.jsonl:
        append_jsonl(records, args.jsonl)
    if args.record:
        append_jsonl(records, DEFAULT_JSONL)
        render_results_md()
        print(f"recorded in {DEFAULT_JSONL} and {RESULTS_MD}")
    return verdict


def copy_bandwidth_gbps(device: str = "cuda", nbytes: int = 1 << 30) -> float:
    """Achievable memory bandwidth of the device: a device-to-device copy of nbytes (read + write), GB/s."""
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    median, _ = interleaved_times({"copy": lambda: dst.copy_(src)}, device, rounds=3, min_run_time=0.05)["copy"]
    return 2 * nbytes / median / 1e9


MANUAL_MARKER = "<!-- recorded by hand below: kept by --render -->"


def render_results_md(jsonl: Path = DEFAULT_JSONL, out: Path = RESULTS_MD):
    """RESULTS.md: per benchmark and device, the latest run's table (from the JSON-lines log)."""
    records = [json.loads(line) for line in open(jsonl)] if jsonl.exists() else []
    latest = {}
    for rec in records:
        key = (rec["bench"], rec["device_name"])
        latest[key] = max(latest.get(key, ""), rec["time"])
    parts = ["# Benchmark results", "",
             "Generated by `python benchmarks/harness.py --render` from `benchmarks/results.jsonl`; each table is "
             "the latest run of one benchmark on one device. Times are medians over interleaved rounds; "
             "speed-up and memory are ratios to the pure-PyTorch reference measured in the same run (memory: "
             "kernel peak / reference peak, lower is better); 'kernel vs compiled' is the reference under "
             "torch.compile divided by the kernel, same run (CPU: with --compile). On a shared machine the absolute "
             "times move with the load noted under each table; the ratios, measured side by side, much less. "
             "Reproduce with the command under each table.", ""]
    for (bench, dev), time in sorted(latest.items()):
        rows = [r for r in records if r["bench"] == bench and r["device_name"] == dev and r["time"] == time]
        first = rows[0]
        load = (f", 1-min load {first['load_1min']} on {first.get('cpu_count')} CPUs at the start"
                if first.get("load_1min") is not None else "")
        parts += [f"## {bench} on {dev}", "",
                  f"{time}, torch {first['torch']}, dinokernels {first['dinokernels']} ({first['git']}){load}. "
                  f"`{first.get('command', '')}`", "",
                  print_table(rows, TABLE_KEYS.get(bench, ["mode"]), TABLE_REFERENCE.get(bench, "reference")), ""]
        notes = [r["note"] for r in rows if r.get("note")]
        for note in dict.fromkeys(notes):
            parts += [note, ""]
    # Runs whose records could not come back as JSON lines (a device machine returns a few files) are kept by
    # hand below MANUAL_MARKER; rendering keeps that part as it is.
    manual = ""
    if out.exists() and MANUAL_MARKER in out.read_text():
        manual = "\n" + out.read_text().split(MANUAL_MARKER, 1)[1].strip()
    out.write_text("\n".join(parts).rstrip() + "\n" + (f"\n{MANUAL_MARKER}{manual}\n" if manual else ""))


if __name__ == "__main__":
    if "--render" in sys.argv:
        render_results_md()
        print(f"wrote {RESULTS_MD}")
    else:
        print(__doc__)
