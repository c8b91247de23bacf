"""Grounding DINO Hungarian matching: dinokernels' HungarianMatcher (one matching_cost kernel + one batched
linear_sum_assignment for every layer and image) vs the DETR / Open-GroundingDino-style matcher (flattened
[L·B·Q, ΣG] PyTorch cost, .cpu(), scipy.optimize.linear_sum_assignment per layer and image), measured in the same
run. Parts: `matcher` (end to end), `lsa` (the batched solver vs a scipy loop on the same cost) and `cost`
(matching_cost vs the DETR-style PyTorch cost, both producing the per-image blocks).

Token maps (`map`): `spans` = each image's caption has 8 categories of 1–3 tokens at random places in T and each
target is one of them (the OD-caption layout; the CPU kernel only evaluates the tokens some target uses);
`dense` = every target is positive on half of the tokens (the kernel's worst case).

    python benchmarks/bench_matcher.py --quick          # the issue's CPU target: B=4, Q=900, G=20, T=256
    python benchmarks/bench_matcher.py --device cuda
"""
import sys
from pathlib import Path

import torch
from scipy.optimize import linear_sum_assignment as scipy_lsa

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness  # noqa: E402
import shapes  # noqa: E402

import dinokernels  # noqa: E402
from dinokernels.models.grounding_dino import HungarianMatcher  # noqa: E402
from dinokernels.ops import linear_sum_assignment, matching_cost, matching_cost_flat  # noqa: E402

TARGETS = [({"part": "matcher", "L": 1, "B": 4, "Q": 900, "G": 20, "T": 256, "map": "spans", "dtype": "float32"},
            3.0, None, "CPU matcher B=4 Q=900 G=20 T=256: >= 3x faster than DETR-style torch cost + scipy")]


def make_inputs(L, B, Q, G, T, kind, device, dtype):
    gen = torch.Generator().manual_seed(0)
    logits = (torch.randn(L, B, Q, T, generator=gen) * 2 - 2).to(device, dtype)
    boxes = torch.cat([torch.rand(L, B, Q, 2, generator=gen), torch.rand(L, B, Q, 2, generator=gen) * 0.4 + 0.02],
                      -1).to(device, dtype)
    targets = []
    for _ in range(B):
        if kind == "spans":
            categories = torch.zeros(8, T, dtype=torch.bool)
            for c in range(8):
                start = int(torch.randint(0, T - 3, (1,), generator=gen))
                categories[c, start:start + int(torch.randint(1, 4, (1,), generator=gen))] = True
            pm = categories[torch.randint(0, 8, (G,), generator=gen)]
        else:
            pm = torch.rand(G, T, generator=gen) < 0.5
        tb = torch.cat([torch.rand(G, 2, generator=gen), torch.rand(G, 2, generator=gen) * 0.4 + 0.02], -1)
        targets.append({"boxes": tb.to(device), "positive_map": pm.to(device)})
    return logits, boxes, targets


def detr_style_cost(logits, boxes, targets, dtype=None):
    """The flattened-batch cost (matching_cost_flat): (B, Q, ΣG) to the CPU, split into per-image blocks."""
    C = matching_cost_flat(logits, boxes, targets, dtype=dtype).cpu()
    sizes = [len(v["boxes"]) for v in targets]
    return [c[i] for i, c in enumerate(C.split(sizes, -1))]


def detr_style_matcher(logits, boxes, targets):
    """Per layer: the cost, then scipy per image; DETR's output format."""
    out = []
    for layer in range(logits.shape[0]):
        blocks = detr_style_cost(logits[layer], boxes[layer], targets)
        out.append([tuple(torch.as_tensor(x, dtype=torch.int64) for x in scipy_lsa(c)) for c in blocks])
    return out


def cases(device, dtypes, shape_list, kinds):
    matcher = HungarianMatcher()
    for dtype in dtypes:
        for shape in shape_list:
            for kind in kinds:
                L, B, Q, G, T = shape["L"], shape["B"], shape["Q"], shape["G"], shape["T"]
                logits, boxes, targets = make_inputs(L, B, Q, G, T, kind, device, dtype)
                base = {**shape, "map": kind, "dtype": str(dtype).replace("torch.", "")}
                outputs = {"pred_logits": logits, "pred_boxes": boxes}
                yield {"part": "matcher", **base}, {
                    "kernel": lambda o=outputs, t=targets: matcher(o, t),
                    "reference": lambda lg=logits, bx=boxes, t=targets: detr_style_matcher(lg, bx, t)}
                if L != 1:
                    continue
                tgt_boxes, pmap, counts = matcher.pad_targets(targets, T, logits.device)
                yield {"part": "cost", **base}, {
                    "kernel": lambda lg=logits[0], bx=boxes[0], tb=tgt_boxes, pm=pmap, c=counts:
                        matching_cost(lg, bx, tb, pm, c),
                    "reference": lambda lg=logits[0], bx=boxes[0], t=targets: detr_style_cost(lg, bx, t)}
                cost = matching_cost(logits[0], boxes[0], tgt_boxes, pmap, counts)
                cost_np = cost.cpu().numpy()
                yield {"part": "lsa", **base}, {
                    "kernel": lambda c=cost: linear_sum_assignment(c),
                    "reference": lambda c=cost_np: [scipy_lsa(x) for x in c]}


def check_agreement(device, dtype):
    """The timed implementations agree: same total cost per image on the benchmark's own inputs."""
    logits, boxes, targets = make_inputs(1, 4, 900, 20, 256, "spans", device, dtype)
    ours = HungarianMatcher()({"pred_logits": logits, "pred_boxes": boxes}, targets)[0]
    theirs = detr_style_matcher(logits, boxes, targets)[0]
    blocks = detr_style_cost(logits[0], boxes[0], targets, dtype=torch.float64)
    for (r, c), (sr, sc), block in zip(ours, theirs, blocks):
        a, b = float(block[r, c].sum()), float(block[sr, sc].sum())
        assert abs(a - b) <= 1e-3 * max(1.0, abs(b)), (a, b)


def main(argv=None):
    args = harness.standard_parser(__doc__).parse_args(argv)
    dinokernels.set_backend("kernel")
    dtypes = [getattr(torch, d) for d in args.dtype]
    shape_list = shapes.MATCHER_QUICK if args.quick else shapes.MATCHER
    kinds = ["spans"] if args.quick else ["spans", "dense"]
    print(f"Hungarian matcher on {harness.device_name(args.device)}", flush=True)
    check_agreement(args.device, dtypes[0])
    records = harness.run("matcher", args.device, cases(args.device, dtypes, shape_list, kinds),
                          rounds=args.rounds, min_run_time=args.min_run_time)
    return harness.finish("matcher", records, args, TARGETS)


if __name__ == "__main__":
    sys.exit(main())
