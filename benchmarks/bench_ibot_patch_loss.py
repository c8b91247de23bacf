"""iBOT patch loss on the masked tokens: dinokernels' fused kernel vs the pure-PyTorch reference ibot_patch_loss_ref
(log-softmax, product, weighted sum), forward and forward+backward, time and peak memory; on CUDA also under
torch.compile.

    python benchmarks/bench_ibot_patch_loss.py [--quick] [--device cuda --dtype float32 bfloat16]
"""
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness  # noqa: E402
import shapes  # noqa: E402

import dinokernels  # noqa: E402
from dinokernels.ops import ibot_patch_loss, ibot_patch_loss_ref  # noqa: E402


def cases(device, dtypes, shape_list, compile_reference):
    for dtype in dtypes:
        for shape in shape_list:
            n, k = shape["n"], shape["K"]
            student = torch.randn(n, k, device=device, dtype=dtype)
            targets = torch.softmax(torch.randn(n, k, device=device) / 0.07, dim=-1)
            weights = torch.rand(n, device=device)
            impls = {"kernel": ibot_patch_loss, "reference": ibot_patch_loss_ref}
            if compile_reference:
                impls["reference_compiled"] = torch.compile(ibot_patch_loss_ref, dynamic=False)
            for mode in ("fwd", "fwd+bwd"):
                x = student.clone().requires_grad_(mode == "fwd+bwd")
                # Bind every input now: the generator moves on before the closures run.
                if mode == "fwd":
                    fns = {name: (lambda f=f, x=x, p=targets, w=weights: f(x, p, w)) for name, f in impls.items()}
                else:
                    fns = {name: (lambda f=f, x=x, p=targets, w=weights: torch.autograd.grad(f(x, p, w), x))
                           for name, f in impls.items()}
                yield {**shape, "dtype": str(dtype).replace("torch.", ""), "mode": mode}, fns


def main(argv=None):
    args = harness.standard_parser(__doc__).parse_args(argv)
    dinokernels.set_backend("kernel")
    dtypes = [getattr(torch, d) for d in args.dtype]
    shape_list = shapes.IBOT_QUICK if args.quick else shapes.IBOT
    print(f"iBOT patch loss on {harness.device_name(args.device)}", flush=True)
    records = harness.run("ibot_patch_loss", args.device,
                          cases(args.device, dtypes, shape_list, harness.compile_reference(args)),
                          rounds=args.rounds, min_run_time=args.min_run_time)
    return harness.finish("ibot_patch_loss", records, args)


if __name__ == "__main__":
    sys.exit(main())
