"""softmax_center (DINO teacher targets, with and without the center-update column sum) vs the pure-PyTorch
reference softmax_center_ref (softmax((z − c)/τ) and z.sum(0)), time and peak memory; on CUDA also under torch.compile.

    python benchmarks/bench_softmax_center.py [--quick] [--device cuda --dtype float32 bfloat16]
"""
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness  # noqa: E402
import shapes  # noqa: E402

import dinokernels  # noqa: E402
from dinokernels.ops import softmax_center, softmax_center_ref  # noqa: E402

TEACHER_TEMP = 0.04


def cases(device, dtypes, shape_list, compile_reference):
    for dtype in dtypes:
        for shape in shape_list:
            z = torch.randn(shape["N"], shape["K"], device=device, dtype=dtype)
            center = torch.randn(1, shape["K"], device=device) * 0.1
            for with_sum in (False, True):
                impls = {"kernel": lambda z=z, c=center, s=with_sum: softmax_center(z, c, TEACHER_TEMP, s),
                         "reference": lambda z=z, c=center, s=with_sum: softmax_center_ref(z, c, TEACHER_TEMP, s)}
                if compile_reference:
                    compiled = torch.compile(softmax_center_ref, dynamic=False)
                    impls["reference_compiled"] = lambda z=z, m=center, s=with_sum, c=compiled: c(z, m, TEACHER_TEMP, s)
                yield {**shape, "dtype": str(dtype).replace("torch.", ""), "sum": with_sum}, impls


def main(argv=None):
    args = harness.standard_parser(__doc__).parse_args(argv)
    dinokernels.set_backend("kernel")
    dtypes = [getattr(torch, d) for d in args.dtype]
    shape_list = shapes.SOFTMAX_CENTER_QUICK if args.quick else shapes.SOFTMAX_CENTER
    print(f"softmax_center on {harness.device_name(args.device)}", flush=True)
    records = harness.run("softmax_center", args.device,
                          cases(args.device, dtypes, shape_list, harness.compile_reference(args)),
                          rounds=args.rounds, min_run_time=args.min_run_time)
    return harness.finish("softmax_center", records, args)


if __name__ == "__main__":
    sys.exit(main())
