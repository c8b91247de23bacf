"""KoLeo loss: dinokernels kernel vs the pure-PyTorch reference (and, on CUDA, the reference under
torch.compile), forward and forward+backward, time and peak memory.

    python benchmarks/bench_koleo.py                    # CPU, float32, all shapes
    python benchmarks/bench_koleo.py --quick            # B=1024, D=384 only
    python benchmarks/bench_koleo.py --device cuda --dtype float32 bfloat16 --record
"""
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness  # noqa: E402
import shapes  # noqa: E402

import dinokernels  # noqa: E402
from dinokernels.ops import koleo_loss, koleo_loss_ref  # noqa: E402

# Issue target on the CPU: forward+backward at B=1024, D=384 at least 2x faster, peak memory no higher.
TARGETS = [({"B": 1024, "D": 384, "mode": "fwd+bwd", "dtype": "float32"}, 2.0, 1.0,
            "CPU fwd+bwd B=1024 D=384: >= 2x faster, peak memory <= reference")]


def cases(device, dtypes, shape_list, compiled):
    for dtype in dtypes:
        for shape in shape_list:
            x = torch.randn(shape["B"], shape["D"], device=device, dtype=dtype)
            xg = x.clone().requires_grad_(True)
            impls = {"kernel": koleo_loss, "reference": koleo_loss_ref}
            if compiled:
                impls["reference_compiled"] = compiled
            for mode in ("fwd", "fwd+bwd"):
                # Bind f, x and xg now: the generator moves on before the closures run.
                if mode == "fwd":
                    fns = {name: (lambda f=f, x=x: f(x)) for name, f in impls.items()}
                else:
                    fns = {name: (lambda f=f, xg=xg: torch.autograd.grad(f(xg), xg)) for name, f in impls.items()}
                yield {**shape, "dtype": str(dtype).replace("torch.", ""), "mode": mode}, fns


def main(argv=None):
    args = harness.standard_parser(__doc__).parse_args(argv)
    dinokernels.set_backend("kernel")  # a missing kernel must fail the benchmark, not time the reference twice
    dtypes = [getattr(torch, d) for d in args.dtype]
    compiled = torch.compile(koleo_loss_ref, dynamic=True) if harness.compile_reference(args) else None
    shape_list = shapes.KOLEO_QUICK if args.quick else shapes.KOLEO
    print(f"KoLeo on {harness.device_name(args.device)}", flush=True)
    records = harness.run("koleo", args.device, cases(args.device, dtypes, shape_list, compiled),
                          rounds=args.rounds, min_run_time=args.min_run_time)
    return harness.finish("koleo", records, args, TARGETS)


if __name__ == "__main__":
    sys.exit(main())
