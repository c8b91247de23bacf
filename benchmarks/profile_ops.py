"""Kernel-level profile of each op's kernel path on CUDA at the benchmark shapes (the `cases` of each
bench_<op>.py): GPU time per launched kernel (torch.profiler), launches per call, host synchronisations and
device-to-host copies per call (runtime API calls the profiler records, so syncs inside the C++ extension count
too), and whether one call can be captured in a CUDA graph.

    python benchmarks/profile_ops.py                       # every op, float32 and bfloat16
    python benchmarks/profile_ops.py --ops softmax_center --dtype float32
    python benchmarks/profile_ops.py --nvtx                # wrap one call per case in an NVTX range "dkprof"
                                                           # (for ncu --nvtx --nvtx-include dkprof/)

Each op runs in its own process, so that a failed graph capture cannot poison the next op's measurements.
"""
import argparse
import importlib
import json
import subprocess
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import shapes

# The GPU target shapes (issue 15): one per op.
OPS = {
    "dino_loss": shapes.DINO_LOSS_CUDA[:1],
    "ibot_patch_loss": shapes.IBOT_QUICK,
    "softmax_center": shapes.SOFTMAX_CENTER_QUICK,
    "sinkhorn_knopp": [{"N": 1024, "K": 65536}],
    "koleo": [{"B": 4096, "D": 384}],
    "ms_deform_attn": shapes.MSDA_QUICK,
}
# Runtime API calls that make the host wait for the device (a pageable device-to-host memcpy waits too).
_SYNC_CALLS = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize", "cudaMemcpy ",
               "cudaMemcpy", "cuMemcpyDtoH", "cudaStreamWaitEvent_host")
_CALLS = 5


def _case_label(params) -> str:
    return " ".join(f"{k}={v}" for k, v in params.items())


def _graph_capture(fn) -> str:
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up on a side stream, as graph capture requires
        fn()
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    try:
        with torch.cuda.graph(graph):
            fn()
        graph.replay()
        torch.cuda.synchronize()
        return "ok"
    except RuntimeError as exc:  # reported, not raised: this is a measurement
        torch.cuda.synchronize()
        return f"fails: {type(exc).__name__}: {' | '.join(str(exc).splitlines())[:600]}"


def profile_op(op: str, dtypes, nvtx: bool):
    bench = importlib.import_module(f"bench_{op}")
    import dinokernels

    dinokernels.set_backend("kernel")
    rows = []
    for params, fns in bench.cases("cuda", dtypes, OPS[op], False):
        fn = fns["kernel"]
        for _ in range(3):
            fn()
        torch.cuda.synchronize()
        if nvtx:
            torch.cuda.nvtx.range_push("dkprof")
            fn()
            torch.cuda.nvtx.range_pop()
            torch.cuda.synchronize()
            continue
        acts = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
        with torch.profiler.profile(activities=acts) as prof:
            for _ in range(_CALLS):
                fn()
            torch.cuda.synchronize()
        kernels, syncs, copies = [], 0, 0
        for ev in prof.key_averages():
            name = ev.key
            dev_us = getattr(ev, "device_time_total", None)
            if dev_us is None:
                dev_us = getattr(ev, "cuda_time_total", 0)
            if ev.device_type == torch.autograd.DeviceType.CUDA and dev_us > 0:
                kernels.append((name, ev.count / _CALLS, dev_us / _CALLS))
            elif name.startswith("cu"):
                if any(name.startswith(s.strip()) for s in _SYNC_CALLS) and "Async" not in name:
                    syncs += ev.count
                if "Memcpy" in name:
                    copies += ev.count
        # The final torch.cuda.synchronize() of the profiled block is ours, not the op's.
        syncs = max(0, syncs - 1)
        kernels.sort(key=lambda k: -k[2])
        rows.append({"op": op, "case": params, "gpu_us_per_call": sum(k[2] for k in kernels),
                     "kernels": [{"name": n[:110], "launches_per_call": c, "us_per_call": round(t, 2)}
                                 for n, c, t in kernels],
                     "host_syncs_per_call": syncs / _CALLS, "memcpy_calls_per_call": copies / _CALLS,
                     "cuda_graph": _graph_capture(fn)})
    return rows


def render(rows) -> str:
    out = []
    for r in rows:
        out.append(f"## {r['op']}  {_case_label(r['case'])}")
        out.append(f"GPU time per call {r['gpu_us_per_call']:.1f} us; host syncs per call {r['host_syncs_per_call']:.1f}; "
                   f"memcpy calls per call {r['memcpy_calls_per_call']:.1f}; CUDA graph capture: {r['cuda_graph']}")
        for k in r["kernels"]:
            out.append(f"  {k['us_per_call']:10.2f} us  x{k['launches_per_call']:.1f}  {k['name']}")
        out.append("")
    return "\n".join(out)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ops", nargs="+", default=list(OPS), choices=list(OPS))
    parser.add_argument("--dtype", nargs="+", default=["float32", "bfloat16"])
    parser.add_argument("--nvtx", action="store_true")
    parser.add_argument("--one", help=argparse.SUPPRESS)  # child process: profile this op, print JSON
    parser.add_argument("--jsonl", type=Path, default=None, help="also append the rows here")
    args = parser.parse_args(argv)
    dtypes = [getattr(torch, d) for d in args.dtype]
    if args.one:
        rows = profile_op(args.one, dtypes, args.nvtx)
        print("DKPROF " + json.dumps(rows))
        return 0
    print(f"# Kernel profile on {torch.cuda.get_device_name()} (torch {torch.__version__}, "
          f"{_CALLS} calls per case after 3 warm-ups)\n", flush=True)
    status = 0
    for op in args.ops:
        cmd = [sys.executable, "-P", __file__, "--one", op, "--dtype", *args.dtype] + (["--nvtx"] if args.nvtx else [])
        proc = subprocess.run(cmd, check=False, capture_output=True, text=True)
        lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("DKPROF ")]
        if proc.returncode != 0 or not lines:
            status = 1
            print(f"## {op}: failed (exit {proc.returncode})\n{proc.stderr[-2000:]}", flush=True)
            continue
        if args.nvtx:
            continue
        rows = json.loads(lines[-1][len("DKPROF "):])
        print(render(rows), flush=True)
        if args.jsonl:
            with open(args.jsonl, "a") as fh:
                fh.writelines(json.dumps(r) + "\n" for r in rows)
    return status


if __name__ == "__main__":
    sys.exit(main())
