"""KoLeo loss: dinokernels kernel vs the pure-PyTorch reference (and, on CUDA, the reference under
torch.compile), forward and forward+backward, time and peak memory.

    python benchmarks/bench_koleo.py                    # CPU, float32, all shapes
    python benchmarks/bench_koleo.py --quick            # B=1024, D=384 only
    python benchmarks/bench_koleo.py --device cuda --dtype float32 bfloat16 --record
"""
import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness  # noqa: E402
import shapes  # noqa: E402

import dinokernels  # noqa: E402
from dinokernels.ops import koleo_loss, koleo_loss_ref  # noqa: E402

# Issue target on the CPU: forward+backward at B=1024, D=384 at least 2x faster, peak memory no higher.
TARGET = {"B": 1024, "D": 384, "mode": "fwd+bwd", "speedup": 2.0, "memory": 1.0}


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
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--dtype", nargs="+", default=["float32"], choices=["float32", "float64", "float16",
                                                                          "bfloat16"])
    parser.add_argument("--quick", action="store_true", help="only the B=1024, D=384 shape")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--min-run-time", type=float, default=0.1, help="seconds per implementation per round")
    parser.add_argument("--record", action="store_true",
                        help="append to benchmarks/results.jsonl and rewrite benchmarks/RESULTS.md")
    parser.add_argument("--jsonl", type=Path, default=None, help="also append the records here")
    parser.add_argument("--require-target", action="store_true",
                        help="exit with status 1 when the CPU target is measured and not met")
    args = parser.parse_args(argv)

    dinokernels.set_backend("kernel")  # a missing kernel must fail the benchmark, not time the reference twice
    dtypes = [getattr(torch, d) for d in args.dtype]
    compiled = torch.compile(koleo_loss_ref, dynamic=True) if args.device == "cuda" else None
    shape_list = shapes.KOLEO_QUICK if args.quick else shapes.KOLEO
    print(f"KoLeo on {harness.device_name(args.device)}", flush=True)
    records = harness.run("koleo", args.device, cases(args.device, dtypes, shape_list, compiled),
                          rounds=args.rounds, min_run_time=args.min_run_time)
    command = "python benchmarks/bench_koleo.py " + " ".join(argv if argv is not None else sys.argv[1:])
    for rec in records:
        rec["command"] = command.strip()
    print()
    print(harness.print_table(records, harness.TABLE_KEYS["koleo"]))

    verdict = 0
    if args.device == "cpu":
        for rec in records:
            if (rec["impl"] == "kernel" and rec["B"] == TARGET["B"] and rec["D"] == TARGET["D"]
                    and rec["mode"] == TARGET["mode"] and rec["dtype"] == "float32"):
                speed, mem = rec["speedup_vs_reference"], rec.get("memory_vs_reference")
                ok = speed >= TARGET["speedup"] and mem is not None and mem <= TARGET["memory"]
                print(f"\ntarget (CPU fwd+bwd B=1024 D=384: >= 2x faster, peak memory <= reference): "
                      f"{speed:.2f}x, memory {harness._ratio(mem)} -> {'met' if ok else 'NOT met'}")
                verdict = 0 if ok or not args.require_target else 1
    harness.append_jsonl(records, harness.SCRATCH_JSONL)
    if args.jsonl:
        harness.append_jsonl(records, args.jsonl)
    if args.record:
        harness.append_jsonl(records, harness.DEFAULT_JSONL)
        harness.render_results_md()
        print(f"recorded in {harness.DEFAULT_JSONL} and {harness.RESULTS_MD}")
    return verdict


if __name__ == "__main__":
    sys.exit(main())
