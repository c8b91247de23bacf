"""Multi-scale deformable attention: dinokernels' kernels vs the pure-PyTorch grid_sample reference ms_deform_attn_ref
(SPEC §4.2's grid_sample formulation), forward and forward+backward, time and peak memory. Shapes: the Grounding DINO
Swin-T encoder layer on an 800×1333 image (shapes.MSDA) with realistic locations (each query's pixel centre plus offsets
of about two pixels per level) and uniform random ones, and the decoder's 900 queries. On CUDA also the reference under
torch.compile and the achieved bandwidth (inputs read once, outputs written once) against the card's measured copy
bandwidth.

    python benchmarks/bench_ms_deform_attn.py                 # CPU, float32, every case
    python benchmarks/bench_ms_deform_attn.py --quick         # the issue's target: encoder, realistic locations
    python benchmarks/bench_ms_deform_attn.py --device cuda --dtype float32 float16 bfloat16 --quick
"""
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness  # noqa: E402
import shapes  # noqa: E402

import dinokernels  # noqa: E402
from dinokernels import _config  # noqa: E402
from dinokernels.ops import ms_deform_attn, ms_deform_attn_ref  # noqa: E402

M, D, P = 8, 32, 4
MAIN = {"case": "gdino_encoder", "locations": "realistic", "N": 1, "Lq": 22223, "dtype": "float32"}
TARGETS = [({**MAIN, "mode": "fwd"}, 5.0, 0.2, "CPU MSDA forward, GDINO Swin-T encoder 800x1333: >= 5x faster, "
                                               "<= 1/5 peak memory"),
           ({**MAIN, "mode": "fwd+bwd"}, 3.0, 0.2, "CPU MSDA forward+backward, same shape: >= 3x faster, <= 1/5 "
                                                   "peak memory")]


def make_case(shape, device, dtype, generator):
    hw = shapes.GDINO_LEVELS
    spatial = torch.tensor(hw, dtype=torch.int64)
    sizes = spatial[:, 0] * spatial[:, 1]
    starts = torch.cumsum(sizes, 0) - sizes
    s, n, lq, levels = int(sizes.sum()), shape["N"], shape["Lq"], len(hw)
    value = torch.randn(n, s, M, D, generator=generator)
    if shape["locations"] == "random":
        loc = torch.rand(n, lq, M, levels, P, 2, generator=generator)
    else:
        if shape["case"] == "gdino_encoder":  # queries are the pixels: reference = own pixel centre
            parts = []
            for h, w in hw:
                ys, xs = torch.meshgrid((torch.arange(h) + 0.5) / h, (torch.arange(w) + 0.5) / w, indexing="ij")
                parts.append(torch.stack([xs, ys], -1).reshape(-1, 2))
            ref = torch.cat(parts)[:lq]
        else:  # decoder: one box centre per query
            ref = torch.rand(lq, 2, generator=generator) * 0.8 + 0.1
        wh = torch.tensor([[w, h] for h, w in hw], dtype=torch.float32)
        loc = ref[None, :, None, None, None, :] + \
            torch.randn(n, lq, M, levels, P, 2, generator=generator) * 2 / wh[None, None, None, :, None, :]
    attn = torch.softmax(torch.randn(n, lq, M, levels * P, generator=generator), -1).reshape(n, lq, M, levels, P)
    # Level tables stay on the CPU (no device-to-host copy per call, for either implementation).
    return (value.to(device, dtype), spatial, starts, loc.to(device), attn.to(device))


def cases(device, dtypes, shape_list, compile_reference):
    generator = torch.Generator().manual_seed(0)
    for dtype in dtypes:
        for shape in shape_list:
            inputs = make_case(shape, device, dtype, generator)
            impls = {"kernel": ms_deform_attn, "reference": ms_deform_attn_ref}
            if compile_reference:
                impls["reference_compiled"] = torch.compile(ms_deform_attn_ref, dynamic=False)
            s = inputs[0].shape[1]
            value, spatial, starts, loc, attn = inputs
            grad = torch.randn(value.shape[0], loc.shape[1], M * D, device=device, dtype=dtype)
            for mode in ("fwd", "fwd+bwd"):
                fns = {}
                for name, f in impls.items():
                    # The kernel takes float32 locations and weights with 16-bit values; grid_sample needs them in
                    # the value's dtype, so the references get them cast once, outside the timing.
                    ldt = torch.float32 if name == "kernel" else dtype
                    v, x, a = value.clone(), loc.to(ldt), attn.to(ldt)
                    # Everything bound as a default: the generator moves on before timing runs.
                    if mode == "fwd":
                        fns[name] = lambda f=f, v=v, x=x, a=a, sp=spatial, st=starts: f(v, sp, st, x, a)
                    else:
                        v, x, a = (t.requires_grad_(True) for t in (v, x, a))
                        fns[name] = lambda f=f, v=v, x=x, a=a, sp=spatial, st=starts, g=grad: torch.autograd.grad(
                            f(v, sp, st, x, a), (v, x, a), g)
                params = {**shape, "S": s, "dtype": str(dtype).replace("torch.", ""), "mode": mode}
                yield params, fns


def add_bandwidth(records, device):
    """Achieved GB/s of the kernel: value, locations and weights read once and the output written once (forward);
    plus the upstream gradient read, value re-read and the three gradients written (backward)."""
    copy = harness.copy_bandwidth_gbps(device)
    levels = len(shapes.GDINO_LEVELS)
    for rec in records:
        if rec["impl"] != "kernel":
            continue
        elem = torch.tensor([], dtype=getattr(torch, rec["dtype"])).element_size()
        n, lq, s = rec["N"], rec["Lq"], rec["S"]
        value, out = n * s * M * D * elem, n * lq * M * D * elem
        loc, attn = n * lq * M * levels * P * 2 * 4, n * lq * M * levels * P * 4
        nbytes = value + loc + attn + out
        if rec["mode"] == "fwd+bwd":
            nbytes += out + value + loc + attn + n * s * M * D * 4 + value + loc + attn
        achieved = nbytes / (rec["median_ms"] * 1e-3) / 1e9
        rec["achieved_gbps"], rec["copy_gbps"], rec["bound_fraction"] = achieved, copy, achieved / copy
        rec["note"] = (f"bandwidth: compulsory bytes (inputs read once, outputs written once; backward adds the "
                       f"upstream gradient, a value re-read, a float32 grad_value buffer and its cast) / time, against "
                       f"a device-to-device copy at {copy:.0f} GB/s; finiteness checks off")
        print(f"{rec['case']} {rec['locations']} {rec['dtype']} {rec['mode']}: {achieved:.0f} GB/s = "
              f"{100 * achieved / copy:.0f}% of copy bandwidth")


def main(argv=None):
    args = harness.standard_parser(__doc__).parse_args(argv)
    dinokernels.set_backend("kernel")
    if args.device == "cuda":
        _config.set_check_finite(False)  # the check is a device sync; the CPU kernel's probe is free and stays on
    dtypes = [getattr(torch, d) for d in args.dtype]
    shape_list = shapes.MSDA_QUICK if args.quick else shapes.MSDA
    print(f"MSDA on {harness.device_name(args.device)}", flush=True)
    records = harness.run("ms_deform_attn", args.device,
                          cases(args.device, dtypes, shape_list, harness.compile_reference(args)),
                          rounds=args.rounds, min_run_time=args.min_run_time)
    if args.device == "cuda":
        add_bandwidth(records, args.device)
    return harness.finish("ms_deform_attn", records, args, TARGETS)


if __name__ == "__main__":
    sys.exit(main())
