"""Sinkhorn-Knopp teacher targets: dinokernels' log-domain kernel vs the plain iterations (sinkhorn_knopp_plain:
float32 exp, then 3 × prototype/sample normalisations, SPEC §3.3), time and peak memory; on CUDA also the plain
form under torch.compile.

    python benchmarks/bench_sinkhorn_knopp.py            # CPU, float32
    python benchmarks/bench_sinkhorn_knopp.py --quick    # the issue's CPU target: N=1024, K=65536
"""
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness  # noqa: E402
import shapes  # noqa: E402

import dinokernels  # noqa: E402
from dinokernels.ops import sinkhorn_knopp, sinkhorn_knopp_plain  # noqa: E402

TEACHER_TEMP = 0.07
TARGETS = [({"N": 1024, "K": 65536, "dtype": "float32", "iters": 3}, 2.0, None,
            "CPU sinkhorn_knopp N=1024 K=65536: >= 2x faster"),
           ({"N": 256, "K": 65536, "dtype": "float32", "iters": 3}, 3.0, None,
            "CPU sinkhorn_knopp N=256 K=65536: >= 3x the compiled reference (--compile)", "reference_compiled")]


def cases(device, dtypes, shape_list, compile_reference):
    for dtype in dtypes:
        for shape in shape_list:
            z = torch.randn(shape["N"], shape["K"], device=device, dtype=dtype)
            impls = {"kernel": lambda z=z: sinkhorn_knopp(z, TEACHER_TEMP),
                     "reference": lambda z=z: sinkhorn_knopp_plain(z, TEACHER_TEMP)}
            if compile_reference:
                compiled = torch.compile(sinkhorn_knopp_plain, dynamic=False)
                impls["reference_compiled"] = lambda z=z, c=compiled: c(z, TEACHER_TEMP)
            yield {**shape, "dtype": str(dtype).replace("torch.", ""), "iters": 3}, impls


def main(argv=None):
    args = harness.standard_parser(__doc__).parse_args(argv)
    dinokernels.set_backend("kernel")
    dtypes = [getattr(torch, d) for d in args.dtype]
    shape_list = shapes.SINKHORN_QUICK if args.quick else shapes.SINKHORN
    print(f"Sinkhorn-Knopp on {harness.device_name(args.device)}", flush=True)
    records = harness.run("sinkhorn_knopp", args.device,
                          cases(args.device, dtypes, shape_list, harness.compile_reference(args)),
                          rounds=args.rounds, min_run_time=args.min_run_time)
    return harness.finish("sinkhorn_knopp", records, args, TARGETS)


if __name__ == "__main__":
    sys.exit(main())
