"""DINO loss: dinokernels' fused kernels vs the pure-PyTorch reference dino_loss_ref (the direct
form: one log-softmax per student view, one B×K product per pair), forward and forward+backward, time and peak memory.
Variants: `probs` (dino_loss on teacher targets) and `centered` (dino_loss_centered: teacher logits, center and
temperature fused in). On CUDA also the reference under torch.compile and the achieved fraction of the memory
bound (read the student logits once, write the gradient once) against the card's measured copy bandwidth.

    python benchmarks/bench_dino_loss.py                 # CPU, float32
    python benchmarks/bench_dino_loss.py --quick         # the issue's CPU target: S=10, T=2, B=32, K=65536
    python benchmarks/bench_dino_loss.py --quick --compile   # ... and the reference under torch.compile
    python benchmarks/bench_dino_loss.py --device cuda --dtype float32 bfloat16
"""
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness  # noqa: E402
import shapes  # noqa: E402

import dinokernels  # noqa: E402
from dinokernels.ops import dino_loss, dino_loss_centered, dino_loss_centered_ref, dino_loss_ref  # noqa: E402

TEACHER_TEMP = 0.04
TARGET_CASE = {"variant": "probs", "S": 10, "T": 2, "B": 32, "K": 65536, "mode": "fwd+bwd", "dtype": "float32"}
TARGETS = [(TARGET_CASE, 2.0, 0.5, "CPU dino_loss fwd+bwd S=10 T=2 B=32 K=65536: >= 2x faster, <= 1/2 peak memory"),
           (TARGET_CASE, 8.0, None, "CPU dino_loss fwd+bwd S=10 T=2 B=32 K=65536: >= 8x the compiled reference "
                                    "(--compile)", "reference_compiled")]


def cases(device, dtypes, shape_list, compile_reference):
    for dtype in dtypes:
        for shape in shape_list:
            s, t, b, k = shape["S"], shape["T"], shape["B"], shape["K"]
            student = torch.randn(s, b, k, device=device, dtype=dtype)
            teacher_logits = torch.randn(t, b, k, device=device, dtype=dtype)
            center = torch.randn(k, device=device) * 0.1
            probs = torch.softmax((teacher_logits.float() - center) / TEACHER_TEMP, dim=-1)
            # Inputs are bound as arguments, never looked up later: the generator moves on before timing runs.
            variants = {"probs": (dino_loss, dino_loss_ref, (probs,)),
                        "centered": (dino_loss_centered, dino_loss_centered_ref,
                                     (teacher_logits, center, TEACHER_TEMP))}
            for variant, (kernel_fn, ref_fn, extra) in variants.items():
                impls = {"kernel": lambda x, f=kernel_fn, e=extra: f(x, *e),
                         "reference": lambda x, f=ref_fn, e=extra: f(x, *e)}
                if compile_reference:
                    compiled = torch.compile(ref_fn, dynamic=False)
                    impls["reference_compiled"] = lambda x, c=compiled, e=extra: c(x, *e)
                for mode in ("fwd", "fwd+bwd"):
                    sg = student.clone().requires_grad_(mode == "fwd+bwd")
                    if mode == "fwd":
                        fns = {n: (lambda f=f, x=sg: f(x)) for n, f in impls.items()}
                    else:
                        fns = {n: (lambda f=f, x=sg: torch.autograd.grad(f(x), x)) for n, f in impls.items()}
                    params = {"variant": variant, **shape, "dtype": str(dtype).replace("torch.", ""), "mode": mode}
                    yield params, fns


def add_bandwidth(records, device):
    """Achieved GB/s of the kernel against the bound: student logits read once (+ targets once) and, with the
    backward, the gradient written once."""
    copy = harness.copy_bandwidth_gbps(device)
    for rec in records:
        if rec["impl"] != "kernel":
            continue
        elem = torch.tensor([], dtype=getattr(torch, rec["dtype"])).element_size()
        student_bytes = rec["S"] * rec["B"] * rec["K"] * elem
        teacher_bytes = rec["T"] * rec["B"] * rec["K"] * (4 if rec["variant"] == "probs" else elem)
        bound = student_bytes * (2 if rec["mode"] == "fwd+bwd" else 1) + teacher_bytes
        achieved = bound / (rec["median_ms"] * 1e-3) / 1e9
        rec["achieved_gbps"], rec["copy_gbps"], rec["bound_fraction"] = achieved, copy, achieved / copy
        rec["note"] = (f"bound fraction = (student read once + targets read once + gradient written once) / time, "
                       f"relative to a device-to-device copy at {copy:.0f} GB/s")
        print(f"{rec['variant']} S={rec['S']} B={rec['B']} K={rec['K']} {rec['dtype']} {rec['mode']}: "
              f"{achieved:.0f} GB/s = {100 * achieved / copy:.0f}% of copy bandwidth")


def main(argv=None):
    args = harness.standard_parser(__doc__).parse_args(argv)
    dinokernels.set_backend("kernel")
    dtypes = [getattr(torch, d) for d in args.dtype]
    if args.device == "cuda":
        shape_list = shapes.DINO_LOSS_CUDA[:1] if args.quick else shapes.DINO_LOSS_CUDA
    else:
        shape_list = shapes.DINO_LOSS_QUICK if args.quick else shapes.DINO_LOSS
    print(f"DINO loss on {harness.device_name(args.device)}", flush=True)
    records = harness.run("dino_loss", args.device,
                          cases(args.device, dtypes, shape_list, harness.compile_reference(args)),
                          rounds=args.rounds, min_run_time=args.min_run_time)
    if args.device == "cuda":
        add_bandwidth(records, args.device)
    return harness.finish("dino_loss", records, args, TARGETS)


if __name__ == "__main__":
    sys.exit(main())
