"""DINOv2 end to end: one pretraining step with dinokernels' loss kernels against the same step on the pure-PyTorch
reference ops (`DINOKERNELS_BACKEND=reference`), and backbone inference against transformers' Dinov2Model at the
same weights.

Training (bench `dinov2_train`): ViT-S/14 student and EMA teacher (hub settings, LayerScale 1.0, drop path 0.1),
DINO head with K prototypes shared with iBOT (DINOv2's ViT-S recipe), B images per step, 2 global crops 224² and 8
local crops 98², iBOT block masks from collate_ibot. Parts timed for each backend:
  step   teacher forward + targets, student forward, DINO + iBOT + KoLeo, backward, gradient clipping (3.0), AdamW
         step and the teacher EMA update: everything of a training iteration but data loading;
  loss   the loss part alone on given logits: centered-softmax teacher targets (DINO and iBOT, centers updated),
         the DINO cross-view loss, iBOT on the masked tokens, KoLeo on both global crops' CLS, and the gradient of
         the total with respect to the student's logits and CLS tokens.
Inference (bench `dinov2_inference`): ViT-S/14 and ViT-B/14 at 224² batch 8 and 518² batch 1, eval mode, no grad,
float32, ours (DinoVisionTransformer.forward_features) vs transformers' Dinov2Model (models.dinov2.to_transformers);
time per image = batch time / batch. Random weights (nothing downloaded); identical weights for both.

Times are medians over rounds that alternate the implementations (one call each per round, after one warm-up
call each); peak memory is one call's rise of the resident set in a child process (harness.py). The load average
is recorded with every run: the machine is shared.

    python benchmarks/bench_dinov2.py --quick                     # B=2, K=65536, ViT-S 224² only, 2 rounds
    python benchmarks/bench_dinov2.py --record                    # B=8, K=65536, all inference cases
    python benchmarks/bench_dinov2.py --part train --batch 16 --K 65536 --rounds 3
    python benchmarks/bench_dinov2.py --device cuda --batch 32 --record
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

TRAIN, INFER = "dinov2_train", "dinov2_inference"
TRAIN_KEYS = ["model", "part", "B", "K", "dtype"]
INFER_KEYS = ["model", "res", "batch", "dtype"]
GLOBAL, LOCAL, N_LOCAL, PATCH = 224, 98, 8, 14
TEACHER_TEMP, MOMENTUM, CLIP = 0.07, 0.992, 3.0
INFER_CASES = [("vits14", 224, 8), ("vits14", 518, 1), ("vitb14", 224, 8), ("vitb14", 518, 1)]
QUICK_INFER_CASES = [("vits14", 224, 8)]


def _sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


# ---------------------------------------------------------------- training step

def build_method(K: int, device: str):
    from dinokernels.models.dinov2 import dinov2_vits14
    from dinokernels.train.dinov2_method import DINOv2Method

    torch.manual_seed(0)
    backbone = dinov2_vits14(img_size=GLOBAL, drop_path_rate=0.1)
    method = DINOv2Method(backbone, backbone.embed_dim, out_dim=K, n_local_crops=N_LOCAL).to(device).train()
    optimizer = torch.optim.AdamW(method.student.parameters(), lr=1e-4, weight_decay=0.04)
    return method, optimizer


def make_batch(B: int, device: str):
    from dinokernels.data.masking import collate_ibot

    g = torch.Generator().manual_seed(0)
    global_crops = [torch.randn(B, 3, GLOBAL, GLOBAL, generator=g) for _ in range(2)]
    local_crops = [torch.randn(B, 3, LOCAL, LOCAL, generator=g) for _ in range(N_LOCAL)]
    batch = collate_ibot(global_crops, local_crops, PATCH, generator=g)
    return {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}


def train_step(method, optimizer, batch, backend):
    def fn():
        with _config.use_backend(backend):
            optimizer.zero_grad(set_to_none=True)
            loss, _ = method(batch, TEACHER_TEMP)
            loss.backward()
            method.clip_gradients(CLIP)
            optimizer.step()
            method.update_teacher(MOMENTUM)
    return fn


def loss_inputs(method, batch, device, K):
    """Logits as a step produces them (teacher DINO/iBOT logits, student DINO/iBOT logits, student global CLS),
    drawn at the step's shapes and scales."""
    B = batch["collated_global_crops"].shape[0] // 2
    n_masked = int(batch["mask_indices_list"].shape[0])
    D = method.student["backbone"].embed_dim
    g = torch.Generator().manual_seed(1)
    return {"t_dino": torch.randn(2 * B, K, generator=g).to(device) * 3,
            "t_ibot": torch.randn(n_masked, K, generator=g).to(device) * 3,
            "s_dino": torch.randn((2 + N_LOCAL) * B, K, generator=g).to(device) * 3,
            "s_ibot": torch.randn(n_masked, K, generator=g).to(device) * 3,
            "g_cls": torch.randn(2 * B, D, generator=g).to(device)}


def loss_part(method, batch, inputs, backend):
    """The method's loss terms on given logits (same weights and normalisers as DINOv2Method.forward)."""
    from dinokernels.ops import dino_loss
    from dinokernels.train.dinov2_method import dino_term_normaliser

    masks, weights = batch["collated_masks"], batch["masks_weight"]
    B = masks.shape[0] // 2
    S = 2 + N_LOCAL
    n_total = dino_term_normaliser(N_LOCAL)
    s_dino = inputs["s_dino"].clone().requires_grad_(True)
    s_ibot = inputs["s_ibot"].clone().requires_grad_(True)
    g_cls = inputs["g_cls"].clone().requires_grad_(True)

    def fn():
        with _config.use_backend(backend):
            with torch.no_grad():
                dino_t = method.dino_loss.softmax_center_teacher(inputs["t_dino"], TEACHER_TEMP)
                method.dino_loss.update_center(inputs["t_dino"])
                ibot_t = method.ibot_loss.softmax_center_teacher(inputs["t_ibot"], TEACHER_TEMP)
                method.ibot_loss.update_center(inputs["t_ibot"])
            dino = dino_loss(s_dino.reshape(S, B, -1), dino_t.reshape(2, B, -1), method.student_temp) \
                * ((2 * S - 2) / n_total)
            koleo = sum(method.koleo_loss(g_cls[i * B:(i + 1) * B]) for i in range(2))
            ibot = method.ibot_loss.forward_masked(s_ibot, ibot_t, masks, masks_weight=weights)
            total = method.weights["dino"] * dino + method.weights["koleo"] * koleo + method.weights["ibot"] * ibot
            return torch.autograd.grad(total, (s_dino, s_ibot, g_cls))
    return fn


def train_cases(args, device):
    for B in args.batch:
        method, optimizer = build_method(args.K, device)
        batch = make_batch(B, device)
        inputs = loss_inputs(method, batch, device, args.K)
        base = {"model": "vits14", "B": B, "K": args.K, "dtype": "float32"}
        yield ({**base, "part": "step"}, {"kernel": train_step(method, optimizer, batch, "kernel"),
                                         "reference": train_step(method, optimizer, batch, "reference")})
        yield ({**base, "part": "loss"}, {"kernel": loss_part(method, batch, inputs, "kernel"),
                                         "reference": loss_part(method, batch, inputs, "reference")})


# ---------------------------------------------------------------- inference

def infer_cases(args, device):
    from dinokernels.models.dinov2 import dinov2_vitb14, dinov2_vits14, to_transformers

    builders = {"vits14": dinov2_vits14, "vitb14": dinov2_vitb14}
    cache = {}
    for name, res, b in (QUICK_INFER_CASES if args.quick else INFER_CASES):
        if name not in cache:
            cache.clear()  # one pair of models alive at a time
            torch.manual_seed(0)
            ours = builders[name]().eval().to(device)
            cache[name] = (ours, to_transformers(ours).eval().to(device))
        ours, hf = cache[name]
        images = torch.randn(b, 3, res, res, generator=torch.Generator().manual_seed(2)).to(device)

        def run_ours(m=ours, x=images):
            with torch.no_grad():
                return m.forward_features(x)

        def run_hf(m=hf, x=images):
            with torch.no_grad():
                return m(pixel_values=x)

        yield {"model": name, "res": res, "batch": b, "dtype": "float32"}, {"ours": run_ours, "transformers": run_hf}


# ---------------------------------------------------------------- measuring

def time_interleaved(fns, device, rounds):
    """One warm-up call each, then `rounds` rounds of one call each in alternating order → {name: [seconds]}."""
    for fn in fns.values():
        fn()
    samples = {name: [] for name in fns}
    for r in range(rounds):
        order = list(fns.items()) if r % 2 == 0 else list(fns.items())[::-1]  # neither always goes first
        for name, fn in order:
            _sync(device)
            start = time.perf_counter()
            fn()
            _sync(device)
            samples[name].append(time.perf_counter() - start)
    return samples


def measure(bench, keys, reference, cases, args, per, argv):
    """Records of one bench: median/IQR ms (divided by params[per] when given), peak MB, ratios to `reference`."""
    env = harness.environment(args.device)
    records = []
    for params, fns in cases:
        load = os.getloadavg()[0]
        samples = time_interleaved(fns, args.device, args.rounds)
        div = params[per] if per else 1
        for impl, s in samples.items():
            q = statistics.quantiles(s, n=4) if len(s) >= 2 else [s[0]] * 3
            records.append({"bench": bench, **env, **params, "impl": impl,
                            "median_ms": statistics.median(s) / div * 1e3,
                            "iqr_ms": (q[2] - q[0]) / div * 1e3, "rounds": len(s),
                            "load_1min": [load, os.getloadavg()[0]]})
        print(" ".join(f"{k}={v}" for k, v in params.items()) + "  " +
              "  ".join(f"{impl} {statistics.median(s) / div * 1e3:.1f} ms" for impl, s in samples.items())
              + (" per image" if per else "") + f"  (load {load:.1f})", flush=True)
    return records


def attach(records, memory, keys, reference):
    for rec in records:
        peak = memory.get(bench_key(rec["bench"], {k: rec[k] for k in keys}) + "|" + rec["impl"])
        rec["peak_mb"] = None if peak is None else peak / 1e6
    groups = {}
    for rec in records:
        groups.setdefault(tuple(rec[k] for k in keys), {})[rec["impl"]] = rec
    for group in groups.values():
        ref = group.get(reference)
        for rec in group.values():
            if ref is None or rec is ref:
                continue
            rec["speedup_vs_" + reference] = ref["median_ms"] / rec["median_ms"]
            if ref.get("peak_mb") and rec.get("peak_mb") is not None:
                rec["memory_vs_" + reference] = rec["peak_mb"] / ref["peak_mb"]


def bench_key(bench, params):
    return bench + "|" + harness._case_key(params)


def main(argv=None):
    parser = harness.standard_parser(__doc__)
    parser.add_argument("--part", nargs="+", default=["train", "infer"], choices=["train", "infer"])
    parser.add_argument("--batch", type=int, nargs="+", default=None,
                        help="images per training step (default 8; --quick 2)")
    parser.add_argument("--K", type=int, default=65536, help="DINO/iBOT head prototypes (DINOv2's: 65536)")
    parser.set_defaults(rounds=None)
    args = parser.parse_args(argv)
    argv = sys.argv[1:] if argv is None else list(argv)
    if args.batch is None:
        args.batch = [2] if args.quick else [8]
    if args.rounds is None:
        args.rounds = 2 if args.quick else 4
    if args.dtype != ["float32"]:
        parser.error("only float32 is measured (the issue's setting)")
    device = args.device
    if device == "cuda":
        _config.set_check_finite(False)  # the finiteness flag is a device sync per op
    probe = os.environ.get(harness.MEMORY_PROBE_ENV) == "1"
    plans = []
    if "train" in args.part:
        plans.append((TRAIN, TRAIN_KEYS, "reference", lambda: train_cases(args, device), None))
    if "infer" in args.part:
        plans.append((INFER, INFER_KEYS, "transformers", lambda: infer_cases(args, device), "batch"))

    if probe:  # child of the CPU memory measurement: peaks only, one case alive at a time
        out = {}
        for bench, keys, _, make, _ in plans:
            for params, fns in make():
                for impl, fn in fns.items():
                    out[bench_key(bench, params) + "|" + impl] = harness.peak_memory_bytes(fn, device)
        print(harness._PROBE_MARKER + json.dumps(out), flush=True)
        return 0

    print(f"DINOv2 on {harness.device_name(device)}; load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} "
          f"cores", flush=True)
    load_start = os.getloadavg()[0]
    all_records = []
    for bench, keys, reference, make, per in plans:
        all_records += measure(bench, keys, reference, make(), args, per, argv)
    if device == "cuda":
        memory = {bench_key(bench, p) + "|" + impl: harness.peak_memory_bytes(fn, device)
                  for bench, _, _, make, _ in plans for p, fns in make() for impl, fn in fns.items()}
    else:
        memory = harness._cpu_memory_from_child([str(Path(__file__).resolve()), *argv])
    load_end = os.getloadavg()[0]
    command = ("python benchmarks/bench_dinov2.py " + " ".join(argv)).strip()
    import transformers
    for bench, keys, reference, _, _ in plans:
        recs = [r for r in all_records if r["bench"] == bench]
        attach(recs, memory, keys, reference)
        loads = [x for r in recs for x in r["load_1min"]]
        note = (f"Load average (1 min) {min(loads):.1f}–{max(loads):.1f} during timing ({load_start:.1f} at the start, "
                f"{load_end:.1f} at the end) on {os.cpu_count()} cores shared with other jobs; {args.rounds} "
                f"interleaved rounds after one warm-up call each. ")
        if bench == TRAIN:
            note += (f"Step = teacher forward and targets, student forward (2 global 224² + {N_LOCAL} local 98² crops "
                     f"per image), DINO + iBOT + KoLeo, backward, clipping, AdamW and teacher EMA; loss = the loss "
                     f"terms alone on given logits, with their backward. ViT-S/14, DINO head shared with iBOT, "
                     f"K = {args.K}; speed-up and memory ratios are kernels (`kernel`) / reference ops.")
        else:
            note += (f"Times and memory per batch are ms per image (batch time / batch) and one batch's peak; ours = "
                     f"DinoVisionTransformer.forward_features, transformers {transformers.__version__} Dinov2Model at "
                     f"the same weights (to_transformers), eval, no grad, float32; ratios are to transformers.")
        for r in recs:
            r["command"] = command
            r["note"] = note
        print()
        print(harness.print_table(recs, keys, reference=reference))
        print(note)
    harness.append_jsonl(all_records, harness.SCRATCH_JSONL)
    if args.jsonl:
        harness.append_jsonl(all_records, args.jsonl)
    if args.record:
        harness.append_jsonl(all_records, harness.DEFAULT_JSONL)
        harness.render_results_md()
        print(f"recorded in {harness.DEFAULT_JSONL} and {harness.RESULTS_MD}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
