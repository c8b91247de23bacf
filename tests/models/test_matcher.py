"""HungarianMatcher (dinokernels.models.grounding_dino) against a DETR / Open-GroundingDino-style matcher that
builds the flattened float64 cost in PyTorch and runs scipy per image: same total cost per image; every layer
matched in one call equals layer-by-layer calls; target conventions, empty images, G > Q, bad inputs."""
import pytest
import torch
from scipy.optimize import linear_sum_assignment as scipy_lsa

from dinokernels.models.grounding_dino import HungarianMatcher
from dinokernels.ops import matching_cost_flat


def detr_style_matcher(outputs, targets, **weights):
    """A matcher built the flattened way (matching_cost_flat, SPEC §6.2 Open-GD row), in float64: per image
    its (n, m) block of the cost and scipy's assignment on it."""
    C = matching_cost_flat(outputs["pred_logits"], outputs["pred_boxes"], targets, dtype=torch.float64,
                             **weights)
    sizes = [len(v["boxes"]) for v in targets]
    blocks = [c[i].numpy() for i, c in enumerate(C.split(sizes, -1))]
    return blocks, [scipy_lsa(b) for b in blocks]


def make_batch(B, Q, T, sizes, dtype=torch.float64, tokens=None):
    outputs = {"pred_logits": torch.randn(B, Q, T, dtype=dtype) * 2,
               "pred_boxes": torch.cat([torch.rand(B, Q, 2), torch.rand(B, Q, 2) * 0.4 + 0.02], -1).to(dtype)}
    targets = []
    for g in sizes:
        t = tokens or T
        pm = torch.rand(g, t) < 0.15
        pm[torch.arange(g), torch.randint(0, t, (g,))] = True
        targets.append({"boxes": torch.cat([torch.rand(g, 2), torch.rand(g, 2) * 0.4 + 0.02], -1).to(dtype),
                        "positive_map": pm})
    return outputs, targets


def assert_same_totals(indices, blocks, scipy_indices):
    for (r, c), block, (sr, sc) in zip(indices, blocks, scipy_indices):
        assert r.dtype == c.dtype == torch.int64 and r.device.type == "cpu"
        assert len(r) == len(sr) and (r.diff() > 0).all() and len(set(c.tolist())) == len(c)
        ours, theirs = block[r.numpy(), c.numpy()].sum(), block[sr, sc].sum()
        assert abs(ours - theirs) <= 1e-9 * max(1.0, abs(theirs)), (ours, theirs)


@pytest.mark.parametrize("B,Q,T,sizes", [(4, 60, 32, [20, 0, 5, 60]), (1, 9, 5, [3]), (2, 5, 8, [7, 2]),
                                         (3, 900, 256, [20, 13, 1])])
def test_same_total_cost_as_detr_style_scipy_matcher(B, Q, T, sizes):
    outputs, targets = make_batch(B, Q, T, sizes)
    blocks, scipy_indices = detr_style_matcher(outputs, targets)
    indices = HungarianMatcher()(outputs, targets)
    assert len(indices) == B
    assert_same_totals(indices, blocks, scipy_indices)


def test_float32_predictions_and_custom_weights():
    outputs, targets = make_batch(2, 50, 16, [10, 4], dtype=torch.float32)
    kw = dict(cost_class=2.0, cost_bbox=5.0, cost_giou=2.0)
    blocks, scipy_indices = detr_style_matcher(outputs, targets, **kw)
    indices = HungarianMatcher(**kw)(outputs, targets)
    for (r, c), block, (sr, sc) in zip(indices, blocks, scipy_indices):
        ours, theirs = block[r.numpy(), c.numpy()].sum(), block[sr, sc].sum()
        assert abs(ours - theirs) <= 1e-4 * max(1.0, abs(theirs))  # float32 cost: near-ties may swap


def test_all_layers_in_one_call_equal_per_layer_calls():
    L, B, Q, T = 7, 3, 40, 24
    layers = [make_batch(B, Q, T, [0, 0, 0])[0] for _ in range(L)]
    _, targets = make_batch(B, Q, T, [6, 0, 11])
    matcher = HungarianMatcher()
    per_layer = [matcher(o, targets) for o in layers]
    stacked = matcher({"pred_logits": torch.stack([o["pred_logits"] for o in layers]),
                       "pred_boxes": torch.stack([o["pred_boxes"] for o in layers])}, targets)
    listed = matcher.match_layers(layers, targets)
    assert len(stacked) == len(listed) == L
    for a, b, c in zip(per_layer, stacked, listed):
        for (r1, c1), (r2, c2), (r3, c3) in zip(a, b, c):
            assert torch.equal(r1, r2) and torch.equal(c1, c2) and torch.equal(r1, r3) and torch.equal(c1, c3)
    for layer, idx in zip(layers, listed):
        blocks, scipy_indices = detr_style_matcher(layer, targets)
        assert_same_totals(idx, blocks, scipy_indices)
    assert matcher.match_layers([], targets) == []


def test_labels_with_label_map_and_short_maps():
    """Open-GroundingDino's convention (labels index a per-class token map) and maps with fewer tokens than T."""
    outputs, targets = make_batch(2, 30, 20, [4, 6], tokens=12)
    label_map = torch.rand(5, 12) < 0.3
    label_map[:, 0] = True
    by_label = []
    for t in targets:
        labels = torch.randint(0, 5, (len(t["boxes"]),))
        t["positive_map"] = label_map[labels]
        by_label.append({"boxes": t["boxes"], "labels": labels})
    matcher = HungarianMatcher()
    a = matcher(outputs, targets)
    b = matcher(outputs, by_label, label_map=label_map)
    for (r1, c1), (r2, c2) in zip(a, b):
        assert torch.equal(r1, r2) and torch.equal(c1, c2)
    blocks, scipy_indices = detr_style_matcher(outputs, targets)
    assert_same_totals(a, blocks, scipy_indices)


def test_no_targets_at_all():
    outputs, targets = make_batch(2, 10, 4, [0, 0])
    assert [(len(r), len(c)) for r, c in HungarianMatcher()(outputs, targets)] == [(0, 0), (0, 0)]


def test_bad_inputs():
    outputs, targets = make_batch(2, 10, 4, [1, 2])
    matcher = HungarianMatcher()
    with pytest.raises(ValueError, match="targets for a batch of 2"):
        matcher(outputs, targets[:1])
    with pytest.raises(ValueError, match="pred_logits"):
        matcher({"pred_logits": outputs["pred_logits"][0], "pred_boxes": outputs["pred_boxes"][0]}, targets)
    with pytest.raises(ValueError, match="positive_map"):
        matcher(outputs, [{"boxes": t["boxes"]} for t in targets])
    with pytest.raises(ValueError, match="tokens"):
        matcher(outputs, [{"boxes": t["boxes"], "positive_map": torch.ones(len(t["boxes"]), 9)} for t in targets])
    bad = dict(outputs)
    bad["pred_logits"] = bad["pred_logits"].clone()
    bad["pred_logits"][0, 0, :] = float("nan")
    with pytest.raises(ValueError, match="pred_logits contains NaN"):  # every device alike
        matcher(bad, targets)
    bad = dict(outputs)
    bad["pred_boxes"] = bad["pred_boxes"].clone()
    bad["pred_boxes"][1, 3, 2] = float("inf")
    with pytest.raises(ValueError, match="pred_boxes contains NaN or inf"):
        matcher(bad, targets)
    # float64 predictions are matched against float64 targets (not float32-rounded ones)
    tgt_boxes, positive_map, _ = matcher.pad_targets(targets, 4, torch.device("cpu"), dtype=torch.float64)
    assert tgt_boxes.dtype == positive_map.dtype == torch.float64
    assert torch.equal(tgt_boxes[1, :2], targets[1]["boxes"].double())
    with pytest.raises(ValueError, match="all costs are 0"):
        HungarianMatcher(0, 0, 0)


def test_bad_targets_name_the_target_and_argument():
    outputs, targets = make_batch(2, 10, 4, [1, 3])
    matcher = HungarianMatcher()
    label_map = torch.eye(5, 4)  # 5 classes over 4 tokens

    def with_second(**fields):
        second = {"boxes": targets[1]["boxes"], **fields}
        return [targets[0], second]

    labels = torch.tensor([0, 1, 2])
    # Correct labels work; each bad one is a ValueError naming target 1, the argument and the expectation.
    assert len(matcher(outputs, [dict(targets[0]), {"boxes": targets[1]["boxes"], "labels": labels}],
                       label_map=label_map)) == 2
    for bad, match in [(torch.tensor([0, -1, 2]), r"target 1's 'labels' must be in \[0, 5\).*label 1 is -1"),
                       (torch.tensor([0, 7, 2]), r"target 1's 'labels' must be in \[0, 5\).*label 1 is 7"),
                       (torch.tensor([0.0, 1.7, 2.0]), r"target 1's 'labels' must be integer"),
                       (torch.tensor([0, 1]), r"target 1's 'labels' must be \(3,\)")]:
        with pytest.raises(ValueError, match=match):
            matcher(outputs, [targets[0], {"boxes": targets[1]["boxes"], "labels": bad}], label_map=label_map)
    boxes = targets[1]["boxes"]
    nan_boxes = boxes.clone()
    nan_boxes[2, 1] = float("nan")
    for bad, match in [(nan_boxes, r"target 1's 'boxes' must be finite.*box 2"),
                       (torch.rand(3, 5), r"target 1's 'boxes' must be \(G, 4\).*\(3, 5\)"),
                       (boxes.reshape(-1), r"target 1's 'boxes' must be \(G, 4\).*\(12,\)"),
                       (boxes * torch.tensor([1.0, 1.0, -1.0, 1.0]), r"target 1's 'boxes'.*w, h >= 0.*box 0")]:
        with pytest.raises(ValueError, match=match):
            matcher(outputs, with_second(boxes=bad, positive_map=targets[1]["positive_map"]))
    with pytest.raises(ValueError, match="label_map must be a"):
        matcher(outputs, [{"boxes": t["boxes"], "labels": torch.zeros(len(t["boxes"]), dtype=torch.long)}
                          for t in targets], label_map=torch.ones(5))
    # An image without targets may come as an empty 1-D tensor.
    empty = [{"boxes": torch.zeros(0), "positive_map": torch.zeros(0, 4)}, targets[1]]
    assert [len(r) for r, _ in matcher(outputs, empty)] == [0, 3]


@pytest.mark.cuda
def test_cuda_matcher_same_totals_as_scipy():
    outputs, targets = make_batch(4, 900, 256, [20, 0, 7, 100], dtype=torch.float32)
    blocks, scipy_indices = detr_style_matcher(outputs, targets)
    cuda_outputs = {k: v.cuda() for k, v in outputs.items()}
    cuda_targets = [{k: v.cuda() for k, v in t.items()} for t in targets]
    layers = HungarianMatcher().match_layers([cuda_outputs, cuda_outputs], cuda_targets)
    for indices in layers:
        for (r, c), block, (sr, sc) in zip(indices, blocks, scipy_indices):
            assert r.device.type == "cpu" and len(r) == len(sr)
            ours, theirs = block[r.numpy(), c.numpy()].sum(), block[sr, sc].sum()
            assert abs(ours - theirs) <= 1e-4 * max(1.0, abs(theirs))
