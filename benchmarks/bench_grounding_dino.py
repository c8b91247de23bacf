"""End-to-end Grounding DINO inference: dinokernels' GroundingDINO (compiled kernels) vs transformers'
GroundingDinoForObjectDetection with the same configuration and weights (converted by
models.grounding_dino.convert.to_transformers), and vs our model with every op on the pure-PyTorch reference
(`DINOKERNELS_BACKEND=reference`). Swin-T configuration (SPEC §5.1) with a bert-base-sized BertConfig, random weights,
nothing downloaded; one caption of 4 phrases (the same token ids for all); images already resized and normalised
(preprocessing is not timed for anyone). Each timed call is the forward pass plus post_process (the official
thresholds; the same function on every implementation's logits).

Reported: time per image (the batch's time / batch), peak memory of one batch's forward (the harness's child-process
resident-set method on the CPU), ratios to transformers measured in the same run, and the per-stage split of our
model (forward hooks: backbone, BERT, image-text fusion, text enhancer + deformable encoder, query selection,
decoder, post-processing).

    python benchmarks/bench_grounding_dino.py --quick            # 400x667, batch 1, float32 (a few minutes on 2 cores)
    python benchmarks/bench_grounding_dino.py --record           # 800x1333, batch 1 and 4 (long on a 2-core CPU)
    python benchmarks/bench_grounding_dino.py --quick --batch-scaling   # our model, batch 1 vs 4, time only
    python benchmarks/bench_grounding_dino.py --device cuda --dtype float32 bfloat16 --record
"""
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness  # noqa: E402

from dinokernels import _config  # noqa: E402

BENCH = "grounding_dino"
CAPTION_WORDS = ["cat", "dog", "person", "traffic", "light", "car"]
CAPTION = "cat . dog . person . traffic light ."
FULL = (800, 1333)
QUICK = (400, 667)
TARGETS_TEXT = ("targets (issue 12, CPU batch 1): >= 2x faster per image than transformers, peak memory <= 0.6x of "
                "transformers'; batch 4 no slower per image than batch 1")


def build_models(device):
    """(ours, transformers', tokenizer) with equal weights; ours with transformers' inverse-sigmoid eps so that both
    compute the same function."""
    from transformers import BertConfig

    from dinokernels.models.grounding_dino import grounding_dino_swint_ogc
    from dinokernels.models.grounding_dino.convert import to_transformers
    from dinokernels.models.grounding_dino.text import build_tokenizer, tiny_vocab

    torch.manual_seed(0)
    tokenizer = build_tokenizer(tiny_vocab(CAPTION_WORDS))
    ours = grounding_dino_swint_ogc(text_encoder=BertConfig(), tokenizer=tokenizer, inverse_sigmoid_eps=1e-5).eval()
    hf = to_transformers(ours).eval()
    return ours.to(device), hf.to(device), tokenizer


class StageTimer:
    """Wall time per named stage from forward pre/post hooks (synchronising CUDA at each boundary). Totals are
    accumulated into `self.totals[label][stage]` for the label set by `self.label`."""

    def __init__(self, model, device):
        self.device = device
        self.label = None
        self.totals = {}
        self._start = {}
        enc, dec = model.transformer.encoder, model.transformer.decoder
        groups = {"backbone": [model.backbone[0]], "input_proj+pos": [*model.input_proj, model.position_embedding],
                  "bert": [model.bert, model.feat_map], "fusion": list(enc.fusion_layers),
                  "text_enhancer": list(enc.text_layers), "deformable_encoder": list(enc.layers),
                  "encoder_all": [enc], "decoder": [dec], "transformer_all": [model.transformer], "model": [model]}
        for stage, modules in groups.items():
            for m in modules:
                m.register_forward_pre_hook(self._pre(stage, m))
                m.register_forward_hook(self._post(stage, m))

    def _sync(self):
        if self.device == "cuda":
            torch.cuda.synchronize()

    def _pre(self, stage, module):
        def hook(mod, args):
            if self.label is not None:
                self._sync()
                self._start[id(module)] = time.perf_counter()
        return hook

    def _post(self, stage, module):
        def hook(mod, args, out):
            if self.label is not None and id(module) in self._start:
                self._sync()
                spent = time.perf_counter() - self._start.pop(id(module))
                stages = self.totals.setdefault(self.label, {})
                stages[stage] = stages.get(stage, 0.0) + spent
        return hook

    def add(self, stage, seconds):
        if self.label is not None:
            stages = self.totals.setdefault(self.label, {})
            stages[stage] = stages.get(stage, 0.0) + seconds


def split_text(stages: dict, calls: int, batch: int) -> str:
    """The stage split as ms per image, with query selection (+ flattening) = transformer − encoder − decoder and
    heads = model − (image features, BERT, transformer)."""
    per = {k: v / calls / batch * 1e3 for k, v in stages.items()}
    query = per.get("transformer_all", 0) - per.get("encoder_all", 0) - per.get("decoder", 0)
    heads = per.get("model", 0) - per.get("backbone", 0) - per.get("input_proj+pos", 0) - per.get("bert", 0) \
        - per.get("transformer_all", 0)
    total = per.get("model", 0) + per.get("postprocess", 0)
    parts = [("backbone", per.get("backbone", 0)), ("input proj + pos", per.get("input_proj+pos", 0)),
             ("BERT", per.get("bert", 0)), ("fusion", per.get("fusion", 0)),
             ("encoder (text enhancer)", per.get("text_enhancer", 0)),
             ("encoder (deformable)", per.get("deformable_encoder", 0)), ("query selection", query),
             ("decoder", per.get("decoder", 0)), ("heads", heads), ("post-processing", per.get("postprocess", 0))]
    return ", ".join(f"{name} {ms:.0f} ms ({100 * ms / total:.0f}%)" for name, ms in parts) + f"; total {total:.0f} ms"


def make_cases(args, device, ours, hf, tokenizer, timer):
    from dinokernels.models.grounding_dino.postprocess import post_process
    from dinokernels.models.grounding_dino.text import tokenize_captions

    h, w = QUICK if args.quick else FULL
    batches = args.batch or ([1] if args.quick else [1, 4])
    generator = torch.Generator().manual_seed(0)
    for dtype_name in args.dtype:
        autocast = None if dtype_name == "float32" else getattr(torch, dtype_name)
        for b in batches:
            images = torch.randn(b, 3, h, w, generator=generator).to(device)
            tok = tokenize_captions(tokenizer, [CAPTION] * b)
            ids, attn, types = (tok[k].to(device) for k in ("input_ids", "attention_mask", "token_type_ids"))
            sizes = torch.tensor([[h, w]] * b, dtype=torch.float32)

            # Every per-case tensor is bound as a default argument: the cases are all built before any runs, so a
            # closure over the loop variables would see the last case's batch.
            def autocast_ctx(autocast=autocast):
                return torch.autocast(device, dtype=autocast, enabled=autocast is not None)

            def run_ours(backend, label, images=images, ids=ids, attn=attn, types=types, sizes=sizes,
                         autocast=autocast):
                def fn():
                    timer.label = label
                    with torch.no_grad(), autocast_ctx(autocast), _config.use_backend(backend):
                        out = ours(images, input_ids=ids, attention_mask=attn, token_type_ids=types)
                        start = time.perf_counter()
                        res = post_process({k: out[k].float() for k in ("pred_logits", "pred_boxes")}, sizes,
                                           tokenizer, input_ids=ids)
                        timer.add("postprocess", time.perf_counter() - start)
                    timer.label = None
                    return res
                return fn

            def run_hf(images=images, ids=ids, attn=attn, types=types, sizes=sizes, autocast=autocast, b=b):
                with torch.no_grad(), autocast_ctx(autocast):
                    out = hf(pixel_values=images, input_ids=ids, attention_mask=attn, token_type_ids=types,
                             pixel_mask=torch.ones((b, h, w), dtype=torch.long, device=device))
                    return post_process({"pred_logits": out.logits.float(), "pred_boxes": out.pred_boxes.float()},
                                        sizes, tokenizer, input_ids=ids)

            params = {"config": "swint", "H": h, "W": w, "batch": b, "dtype": dtype_name}
            key = f"{dtype_name}|{b}"
            fns = {"transformers": run_hf, "kernel": run_ours("kernel", f"kernel|{key}"),
                   "reference": run_ours("reference", f"reference|{key}")}
            yield params, {k: v for k, v in fns.items() if k in args.impl}


def _sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def time_interleaved(fns, device, rounds, after_warmup=None):
    """One warm-up call each, then `rounds` rounds of one call each in alternating order → {name: [seconds]}."""
    for fn in fns.values():
        fn()
    if after_warmup is not None:
        after_warmup()
    samples = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            _sync(device)
            start = time.perf_counter()
            fn()
            _sync(device)
            samples[name].append(time.perf_counter() - start)
    return samples


def main(argv=None):
    parser = harness.standard_parser(__doc__)
    parser.add_argument("--batch", type=int, nargs="+", help="batch sizes (default 1 4; with --quick 1)")
    parser.add_argument("--batch-scaling", action="store_true",
                        help="its own table (grounding_dino_batch): our model (kernel backend), batch 1 and 4, time "
                             "only; for the target 'batch 4 no slower per image than batch 1'")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's). On a busy shared machine "
                        "1 thread avoids every small op waiting for a second thread to be scheduled")
    parser.add_argument("--no-memory", dest="memory", action="store_false",
                        help="time only (skip the peak-memory child, which calls every case twice more)")
    parser.add_argument("--impl", nargs="+", default=["transformers", "kernel", "reference"],
                        choices=["transformers", "kernel", "reference"])
    parser.set_defaults(rounds=2)
    args = parser.parse_args(argv)
    device = args.device
    if args.threads:
        torch.set_num_threads(args.threads)
    bench = BENCH
    if args.batch_scaling:
        bench, args.batch, args.impl, args.memory = BENCH + "_batch", args.batch or [1, 4], ["kernel"], False
    probe = os.environ.get(harness.MEMORY_PROBE_ENV) == "1"
    ours, hf, tokenizer = build_models(device)
    timer = StageTimer(ours, device)
    cases = list(make_cases(args, device, ours, hf, tokenizer, timer))

    if probe:  # child of the CPU memory measurement: peaks only
        out = {}
        for params, fns in cases:
            for impl, fn in fns.items():
                out[harness._case_key(params) + "|" + impl] = harness.peak_memory_bytes(fn, device)
        print(harness._PROBE_MARKER + json.dumps(out), flush=True)
        return 0

    load_before = os.getloadavg()
    print(f"Grounding DINO end to end on {harness.device_name(device)}; load average {load_before[0]:.1f}",
          flush=True)
    env = harness.environment(device)
    records = []
    # Every case (batch sizes too) in one interleaved loop, so that the batch-4 vs batch-1 comparison is not skewed
    # by the machine's speed drifting between them. The stage split counts the timed rounds only (the warm-up call
    # pays one-time set-up costs).
    everything = {(i, impl): fn for i, (_, fns) in enumerate(cases) for impl, fn in fns.items()}
    all_samples = time_interleaved(everything, device, args.rounds, after_warmup=lambda: [
        timer.totals.pop(f"{impl}|{params['dtype']}|{params['batch']}", None)
        for params, fns in cases for impl in fns])
    for i, (params, fns) in enumerate(cases):
        samples = {impl: all_samples[(i, impl)] for impl in fns}
        b = params["batch"]
        for impl, s in samples.items():
            q = statistics.quantiles(s, n=4) if len(s) >= 2 else [s[0]] * 3
            records.append({"bench": bench, **env, **params, "impl": impl,
                            "median_ms": statistics.median(s) / b * 1e3, "iqr_ms": (q[2] - q[0]) / b * 1e3})
        print(" ".join(f"{k}={v}" for k, v in params.items()) + "  " +
              "  ".join(f"{impl} {statistics.median(s) / b:.2f} s/image" for impl, s in samples.items()), flush=True)
    if not args.memory:
        memory = {}
    elif device == "cuda":
        memory = {harness._case_key(p) + "|" + impl: harness.peak_memory_bytes(fn, device)
                  for p, fns in cases for impl, fn in fns.items()}
    else:
        memory = harness._cpu_memory_from_child([str(Path(__file__).resolve()), *(argv if argv is not None
                                                                                  else sys.argv[1:])])
    load_after = os.getloadavg()
    keys = ["config", "H", "W", "batch", "dtype"]
    for rec in records:
        peak = memory.get(harness._case_key({k: rec[k] for k in keys}) + "|" + rec["impl"])
        rec["peak_mb"] = None if peak is None else peak / 1e6
    groups = {}
    for rec in records:
        groups.setdefault(tuple(rec[k] for k in keys), {})[rec["impl"]] = rec
    for group in groups.values():
        ref = group.get("transformers")
        for rec in group.values():
            if ref is None or rec is ref:
                continue
            rec["speedup_vs_transformers"] = ref["median_ms"] / rec["median_ms"]
            if ref.get("peak_mb") and rec.get("peak_mb") is not None:
                rec["memory_vs_transformers"] = rec["peak_mb"] / ref["peak_mb"]
    calls = args.rounds
    for rec in records:
        if rec["impl"] in ("kernel", "reference"):
            stages = timer.totals.get(f"{rec['impl']}|{rec['dtype']}|{rec['batch']}")
            if stages:
                rec["stages_ms_per_image"] = {k: v / calls / rec["batch"] * 1e3 for k, v in stages.items()}
                rec["note"] = (f"Stage split, ours ({rec['impl']} backend), {rec['H']}x{rec['W']} batch "
                               f"{rec['batch']} {rec['dtype']}, per image: "
                               + split_text(stages, calls, rec["batch"]))
    machine = (f"Load average (1 min) {load_before[0]:.1f} at the start and {load_after[0]:.1f} at the end of "
               f"timing on {os.cpu_count()} cores (a shared machine: other engineers' jobs ran meanwhile). "
               f"Times per image = batch time / batch; memory = one batch's forward. Models: Swin-T + bert-base-sized "
               f"BERT, random weights, transformers {_transformers_version()}. " + TARGETS_TEXT + ".")
    if records:  # once per run, on its first record (a run without transformers still says how loaded it was)
        first = records[0]
        first["note"] = machine if not first.get("note") else machine + " " + first["note"]
    command = ("python benchmarks/bench_grounding_dino.py " + " ".join(
        argv if argv is not None else sys.argv[1:])).strip()
    for rec in records:
        rec["command"] = command
    print()
    print(harness.print_table(records, keys, reference="transformers"))
    for rec in records:
        if rec.get("note"):
            print(rec["note"])
    verdict = report_targets(records)
    if args.batch_scaling:
        by = {(r["dtype"], r["batch"]): r for r in records}
        for (dtype, batch), rec in by.items():
            one = by.get((dtype, 1))
            if batch != 1 and one is not None:
                rec["note"] = (f"batch {batch} vs batch 1 ({dtype}, {rec['H']}x{rec['W']}): "
                               f"{rec['median_ms'] / one['median_ms']:.2f}x the time per image")
                print(rec["note"])
    harness.append_jsonl(records, harness.SCRATCH_JSONL)
    if args.jsonl:
        harness.append_jsonl(records, args.jsonl)
    if args.record:
        harness.append_jsonl(records, harness.DEFAULT_JSONL)
        harness.render_results_md()
        print(f"recorded in {harness.DEFAULT_JSONL} and {harness.RESULTS_MD}")
    return 1 if (args.require_target and not verdict) else 0


def _transformers_version():
    import transformers
    return transformers.__version__


def report_targets(records) -> bool:
    ok_all = True
    by = {(r["impl"], r["dtype"], r["batch"]): r for r in records}
    for (impl, dtype, batch), rec in by.items():
        if impl != "kernel" or batch != 1:
            continue
        speed, mem = rec.get("speedup_vs_transformers"), rec.get("memory_vs_transformers")
        if speed is not None:
            ok = speed >= 2.0 and mem is not None and mem <= 0.6
            ok_all &= ok
            print(f"target batch 1 {dtype}: {speed:.2f}x faster, memory {mem if mem is None else round(mem, 2)}x "
                  f"-> {'met' if ok else 'NOT met'}")
        four = by.get(("kernel", dtype, 4))
        if four is not None:
            ok = four["median_ms"] <= rec["median_ms"]
            ok_all &= ok
            print(f"target batch 4 vs 1 {dtype}: {four['median_ms']:.0f} vs {rec['median_ms']:.0f} ms per image -> "
                  f"{'met' if ok else 'NOT met'}")
    return ok_all


if __name__ == "__main__":
    sys.exit(main())
