"""GroundingDINOCriterion against an independent float64 reference written here from the formulas (SPEC §5.8,
§6.1, §6.2): the optimal matching found by enumerating every assignment, token focal loss, L1 and 1 − GIoU by
hand; aux and encoder layers, weights, one matcher call, −inf padded tokens, empty targets, gradients, num_boxes
across ranks, bad inputs."""
import itertools
import math

import pytest
import torch

from dinokernels.models.grounding_dino.criterion import (LOSS_WEIGHTS, GroundingDINOCriterion, SetCriterion,
                                                         paired_generalized_iou, sigmoid_focal_loss)
from dinokernels.models.grounding_dino.matcher import HungarianMatcher

ALPHA, GAMMA = 0.25, 2.0


# ----------------------------------------------------------------------------- float64 reference (pure Python)

def sig(z):
    return 1.0 / (1.0 + math.exp(-z))


def giou_ref(a, b):
    ax0, ay0, ax1, ay1 = a[0] - a[2] / 2, a[1] - a[3] / 2, a[0] + a[2] / 2, a[1] + a[3] / 2
    bx0, by0, bx1, by1 = b[0] - b[2] / 2, b[1] - b[3] / 2, b[0] + b[2] / 2, b[1] + b[3] / 2
    inter = max(0.0, min(ax1, bx1) - max(ax0, bx0)) * max(0.0, min(ay1, by1) - max(ay0, by0))
    union = (ax1 - ax0) * (ay1 - ay0) + (bx1 - bx0) * (by1 - by0) - inter
    hull = (max(ax1, bx1) - min(ax0, bx0)) * (max(ay1, by1) - min(ay0, by0))
    return inter / union - (hull - union) / hull


def match_cost_ref(z_row, box, tgt_box, tgt_map, valid):
    """Open-GD cost: 1·mean over the GT's tokens of (pos − neg) + 5·L1 − 2·GIoU."""
    cls, n = 0.0, 0.0
    for t, (z, m) in enumerate(zip(z_row, tgt_map)):
        if not valid[t] or m == 0:
            continue
        p = sig(z)
        pos = ALPHA * (1 - p) ** GAMMA * -math.log(p + 1e-8)
        neg = (1 - ALPHA) * p ** GAMMA * -math.log(1 - p + 1e-8)
        cls += (pos - neg) * m
        n += m
    cls = cls / n if n else 0.0
    l1 = sum(abs(x - y) for x, y in zip(box, tgt_box))
    return cls + 5 * l1 - 2 * giou_ref(box, tgt_box)


def brute_force_match(logits, boxes, tgt_boxes, tgt_maps, valid):
    """Every injective assignment of the G targets to Q queries; the cheapest (query -> target) dict."""
    Q, G = len(logits), len(tgt_boxes)
    if G == 0:
        return {}
    cost = [[match_cost_ref(logits[q], boxes[q], tgt_boxes[g], tgt_maps[g], valid) for g in range(G)]
            for q in range(Q)]
    best, best_cost = None, math.inf
    for perm in itertools.permutations(range(Q), G):
        c = sum(cost[perm[g]][g] for g in range(G))
        if c < best_cost:
            best, best_cost = perm, c
    return {best[g]: g for g in range(G)}


def focal_ref(z, t):
    p = sig(z)
    ce = -(t * math.log(p) + (1 - t) * math.log(1 - p))
    p_t = p * t + (1 - p) * (1 - t)
    return (ALPHA * t + (1 - ALPHA) * (1 - t)) * ce * (1 - p_t) ** GAMMA


def layer_losses_ref(logits, boxes, targets, valid_mask, num_boxes):
    """logits (B, Q, T), boxes (B, Q, 4) as nested lists; targets as lists; → (ce, l1, giou)."""
    ce = l1 = gl = 0.0
    for b in range(len(logits)):
        tb, tm = targets[b]
        match = brute_force_match(logits[b], boxes[b], tb, tm, valid_mask[b])
        for q in range(len(logits[b])):
            row = tm[match[q]] if q in match else [0.0] * len(logits[b][q])
            for t, z in enumerate(logits[b][q]):
                if valid_mask[b][t]:
                    ce += focal_ref(z, row[t])
            if q in match:
                l1 += sum(abs(x - y) for x, y in zip(boxes[b][q], tb[match[q]]))
                gl += 1 - giou_ref(boxes[b][q], tb[match[q]])
    return ce / num_boxes, l1 / num_boxes, gl / num_boxes


# ----------------------------------------------------------------------------- helpers

def random_case(B=2, Q=3, T=6, sizes=(2, 1), lengths=(6, 4), layers=3, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    mask = torch.zeros(B, T, dtype=torch.bool)
    for b, n in enumerate(lengths):
        mask[b, :n] = True

    def layer():
        z = torch.randn(B, Q, T, generator=g, dtype=dtype) * 2
        z = z.masked_fill(~mask[:, None, :], float("-inf"))
        bx = torch.cat([torch.rand(B, Q, 2, generator=g) * 0.6 + 0.2, torch.rand(B, Q, 2, generator=g) * 0.3 + 0.05],
                       -1).to(dtype)
        return {"pred_logits": z.requires_grad_(), "pred_boxes": bx.requires_grad_()}

    outs = [layer() for _ in range(layers)]
    outputs = dict(outs[0])
    if layers >= 2:
        outputs["aux_outputs"] = outs[1:-1] if layers >= 3 else []
        outputs["interm_outputs"] = outs[-1]
    targets = []
    for b, G in enumerate(sizes):
        boxes = torch.cat([torch.rand(G, 2, generator=g) * 0.6 + 0.2, torch.rand(G, 2, generator=g) * 0.3 + 0.05], -1)
        pm = torch.zeros(G, T)
        for k in range(G):
            start = int(torch.randint(0, lengths[b], (1,), generator=g))
            pm[k, start:start + 2] = 1.0
            pm[k, lengths[b]:] = 0
        targets.append({"boxes": boxes.to(dtype), "positive_map": pm.to(dtype)})
    return outputs, targets, mask


def reference(outputs, targets, mask, weights="open-gd", interm_coef=1.0):
    valid = mask.tolist()
    tg = [(t["boxes"].tolist(), t["positive_map"].tolist()) for t in targets]
    num_boxes = max(1.0, float(sum(len(t["boxes"]) for t in targets)))
    layers = [("", outputs)] + [(f"_{i}", a) for i, a in enumerate(outputs.get("aux_outputs", []))]
    if "interm_outputs" in outputs:
        layers.append(("_interm", outputs["interm_outputs"]))
    out, total = {}, 0.0
    w = LOSS_WEIGHTS[weights]
    for suffix, o in layers:
        ce, l1, gl = layer_losses_ref(o["pred_logits"].tolist(), o["pred_boxes"].tolist(), tg, valid, num_boxes)
        coef = interm_coef if suffix == "_interm" else 1.0
        out.update({"loss_ce" + suffix: ce, "loss_bbox" + suffix: l1, "loss_giou" + suffix: gl})
        total += coef * (w["loss_ce"] * ce + w["loss_bbox"] * l1 + w["loss_giou"] * gl)
    out["loss"] = total
    return out


def assert_matches_reference(got, ref, rtol=1e-10):
    assert set(got) == set(ref)
    for k in ref:
        assert math.isclose(got[k].item(), ref[k], rel_tol=rtol, abs_tol=1e-12), (k, got[k].item(), ref[k])


# ----------------------------------------------------------------------------- tests

@pytest.mark.parametrize("seed", range(4))
def test_against_float64_reference(seed):
    outputs, targets, mask = random_case(seed=seed)
    got = GroundingDINOCriterion()(outputs, targets, mask)
    assert_matches_reference(got, reference(outputs, targets, mask))


def test_more_queries_and_targets_against_reference():
    outputs, targets, mask = random_case(B=3, Q=5, T=7, sizes=(3, 0, 2), lengths=(7, 5, 3), layers=2, seed=11)
    got = GroundingDINOCriterion()(outputs, targets, mask)
    assert set(k for k in got if k.endswith("_interm")) == {"loss_ce_interm", "loss_bbox_interm", "loss_giou_interm"}
    assert_matches_reference(got, reference(outputs, targets, mask))


def test_mmdet_weights_and_interm_coef():
    outputs, targets, mask = random_case(seed=5)
    got = GroundingDINOCriterion(weights="mmdet", interm_loss_coef=0.5)(outputs, targets, mask)
    assert_matches_reference(got, reference(outputs, targets, mask, weights="mmdet", interm_coef=0.5))
    assert LOSS_WEIGHTS["mmdet"]["loss_ce"] == 1.0 and LOSS_WEIGHTS["open-gd"]["loss_ce"] == 2.0


def test_weight_dict_keys_and_overrides():
    c = GroundingDINOCriterion(weight_dict={"loss_giou": 3.0}, interm_loss_coef=0.5)
    wd = c.weight_dict(num_aux=2)
    assert wd == {"loss_ce": 2.0, "loss_bbox": 5.0, "loss_giou": 3.0, "loss_ce_0": 2.0, "loss_bbox_0": 5.0,
                  "loss_giou_0": 3.0, "loss_ce_1": 2.0, "loss_bbox_1": 5.0, "loss_giou_1": 3.0,
                  "loss_ce_interm": 1.0, "loss_bbox_interm": 2.5, "loss_giou_interm": 1.5}
    assert SetCriterion is GroundingDINOCriterion


def test_aux_and_interm_can_be_switched_off():
    outputs, targets, mask = random_case(seed=3)
    got = GroundingDINOCriterion(aux_loss=False, interm_loss_coef=0)(outputs, targets, mask)
    assert set(got) == {"loss_ce", "loss_bbox", "loss_giou", "loss"}
    ref = reference({k: outputs[k] for k in ("pred_logits", "pred_boxes")}, targets, mask)
    assert_matches_reference(got, ref)


def test_all_layers_matched_in_one_matcher_call(monkeypatch):
    outputs, targets, mask = random_case(seed=1, layers=4)
    calls = []
    original = HungarianMatcher.match_layers

    def spy(self, outputs_list, tg, label_map=None):
        calls.append(len(outputs_list))
        return original(self, outputs_list, tg, label_map)

    monkeypatch.setattr(HungarianMatcher, "match_layers", spy)
    GroundingDINOCriterion()(outputs, targets, mask)
    assert calls == [4]  # final + 2 aux + encoder


def test_matching_equals_per_layer_matcher():
    outputs, targets, mask = random_case(seed=2, layers=3)
    c = GroundingDINOCriterion()
    layers = [outputs, *outputs["aux_outputs"], outputs["interm_outputs"]]
    mt = [{"boxes": t["boxes"], "positive_map": t["positive_map"]} for t in targets]
    stacked = c._match([("", o["pred_logits"], o["pred_boxes"]) for o in layers], mt, mask)
    for o, idx in zip(layers, stacked):
        z = o["pred_logits"].detach().masked_fill(~mask[:, None, :], 0.0)
        single = HungarianMatcher()({"pred_logits": z, "pred_boxes": o["pred_boxes"].detach()}, mt)
        for (r1, c1), (r2, c2) in zip(idx, single):
            assert torch.equal(r1, r2) and torch.equal(c1, c2)


def test_padded_tokens_neg_inf_give_finite_loss_and_gradient():
    outputs, targets, mask = random_case(seed=4, layers=1, lengths=(3, 2))
    got = GroundingDINOCriterion()(outputs, targets, mask)
    assert all(torch.isfinite(v) for v in got.values())
    got["loss"].backward()
    g = outputs["pred_logits"].grad
    assert torch.isfinite(g).all()
    assert (g[~mask[:, None, :].expand_as(g)] == 0).all()  # no gradient into padded tokens
    # The value does not depend on what sits in the padded columns.
    z2 = outputs["pred_logits"].detach().masked_fill(~mask[:, None, :], 7.0)
    got2 = GroundingDINOCriterion()({"pred_logits": z2, "pred_boxes": outputs["pred_boxes"]}, targets, mask)
    assert got2["loss"].item() == pytest.approx(got["loss"].item(), rel=1e-12)


def test_text_mask_inferred_from_neg_inf_logits_or_outputs():
    outputs, targets, mask = random_case(seed=6)
    explicit = GroundingDINOCriterion()(outputs, targets, mask)
    inferred = GroundingDINOCriterion()(outputs, targets)
    in_outputs = GroundingDINOCriterion()({**outputs, "text_mask": mask}, targets)
    for k in explicit:
        assert inferred[k].item() == explicit[k].item() == in_outputs[k].item()


def test_empty_targets():
    outputs, targets, mask = random_case(seed=7, sizes=(0, 2), layers=2)
    got = GroundingDINOCriterion()(outputs, targets, mask)
    assert_matches_reference(got, reference(outputs, targets, mask))
    # No target anywhere: box losses are zero but attached, the focal loss pushes every valid token to 0.
    outputs, targets, mask = random_case(seed=8, sizes=(0, 0), layers=2)
    got = GroundingDINOCriterion()(outputs, targets, mask)
    assert got["loss_bbox"].item() == 0 and got["loss_giou"].item() == 0
    assert_matches_reference(got, reference(outputs, targets, mask))
    got["loss"].backward()
    assert torch.isfinite(outputs["pred_logits"].grad).all()
    assert outputs["pred_boxes"].grad is not None and (outputs["pred_boxes"].grad == 0).all()


def test_gradcheck_fixed_matching():
    outputs, targets, mask = random_case(seed=9, layers=1, lengths=(6, 6), T=6)
    c = GroundingDINOCriterion()
    z0 = outputs["pred_logits"].detach().clone().requires_grad_()
    b0 = outputs["pred_boxes"].detach().clone().requires_grad_()

    def f(z, b):
        r = c({"pred_logits": z, "pred_boxes": b}, targets, mask)
        return r["loss_ce"], r["loss_bbox"], r["loss_giou"]

    assert torch.autograd.gradcheck(f, (z0, b0), eps=1e-7, atol=1e-6)


def test_float32_and_half_logits():
    outputs, targets, mask = random_case(seed=10, dtype=torch.float32)
    ref = reference(outputs, targets, mask)
    got = GroundingDINOCriterion()(outputs, targets, mask)
    for k in ref:
        assert got[k].item() == pytest.approx(ref[k], rel=1e-5, abs=1e-6)
    half = {k: v for k, v in outputs.items()}
    half["pred_logits"] = outputs["pred_logits"].detach().bfloat16()
    got = GroundingDINOCriterion(aux_loss=False, interm_loss_coef=0)(half, targets, mask)
    assert got["loss"].dtype == torch.float32 and torch.isfinite(got["loss"])


def test_num_boxes_averaged_over_ranks(monkeypatch):
    outputs, targets, mask = random_case(seed=12, layers=1)
    single = GroundingDINOCriterion()(outputs, targets, mask)
    # Two ranks, the other holding 5 boxes: num_boxes = (3 + 5) / 2 = 4 instead of 3.
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.distributed, "get_world_size", lambda *a, **k: 2)
    monkeypatch.setattr(torch.distributed, "all_reduce", lambda t, *a, **k: t.add_(5))
    multi = GroundingDINOCriterion()(outputs, targets, mask)
    for k in ("loss_ce", "loss_bbox", "loss_giou"):
        assert multi[k].item() == pytest.approx(single[k].item() * 3 / 4, rel=1e-12)


def test_num_boxes_clamped_to_one(monkeypatch):
    outputs, targets, mask = random_case(seed=13, sizes=(1, 0), layers=1)
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.distributed, "get_world_size", lambda *a, **k: 4)
    monkeypatch.setattr(torch.distributed, "all_reduce", lambda t, *a, **k: t)  # 1 box over 4 ranks: 0.25 -> 1
    got = GroundingDINOCriterion()(outputs, targets, mask)
    assert_matches_reference(got, reference(outputs, targets, mask))


def test_focal_and_paired_giou_helpers():
    z = torch.tensor([-3.0, 0.0, 2.5], dtype=torch.float64)
    t = torch.tensor([0.0, 1.0, 1.0], dtype=torch.float64)
    got = sigmoid_focal_loss(z, t, ALPHA, GAMMA)
    for i in range(3):
        assert float(got[i]) == pytest.approx(focal_ref(float(z[i]), float(t[i])), rel=1e-12)
    a = torch.tensor([[0.5, 0.5, 0.2, 0.4], [0.2, 0.2, 0.1, 0.1]], dtype=torch.float64)
    b = torch.tensor([[0.55, 0.45, 0.3, 0.2], [0.8, 0.8, 0.1, 0.1]], dtype=torch.float64)
    from dinokernels.ops.boxes import box_cxcywh_to_xyxy
    g = paired_generalized_iou(box_cxcywh_to_xyxy(a), box_cxcywh_to_xyxy(b))
    for i in range(2):
        assert float(g[i]) == pytest.approx(giou_ref(a[i].tolist(), b[i].tolist()), rel=1e-12)


def _bad(targets, mask, outputs, match):
    with pytest.raises((ValueError, TypeError), match=match):
        GroundingDINOCriterion()(outputs, targets, mask)


def test_bad_targets_raise():
    outputs, targets, mask = random_case(seed=14, layers=1)
    T = mask.shape[1]

    def with_(i, **kw):
        tg = [dict(t) for t in targets]
        tg[i].update(kw)
        return tg

    _bad(targets[:1], mask, outputs, "targets.*1 entries for a batch of 2")
    _bad(with_(0, boxes=targets[0]["boxes"][:, :3]), mask, outputs, r"targets\[0\]\['boxes'\] must be \(G, 4\)")
    nan = targets[0]["boxes"].clone()
    nan[0, 1] = float("nan")
    _bad(with_(0, boxes=nan), mask, outputs, r"targets\[0\]\['boxes'\] contains NaN")
    out = targets[0]["boxes"].clone()
    out[0, 0] = 1.5
    _bad(with_(0, boxes=out), mask, outputs, r"targets\[0\]\['boxes'\] must be normalised")
    flat = targets[1]["boxes"].clone()
    flat[0, 3] = 0.0
    _bad(with_(1, boxes=flat), mask, outputs, r"targets\[1\]\['boxes'\]\[0\].*w or h <= 0")
    _bad(with_(0, positive_map=torch.zeros(2, T + 1, dtype=torch.float64)), mask, outputs, "width 7.*T=6")
    _bad(with_(0, positive_map=torch.zeros(3, T, dtype=torch.float64)), mask, outputs, r"must be \(G=2, T=6\)")
    pm = targets[1]["positive_map"].clone()
    pm[0, 5] = 1.0  # image 1 has 4 valid tokens
    _bad(with_(1, positive_map=pm), mask, outputs, "marks tokens that the text mask says are invalid")
    pm = targets[0]["positive_map"].clone()
    pm[0, 0] = float("nan")
    _bad(with_(0, positive_map=pm), mask, outputs, "nonnegative and finite")
    _bad([{"boxes": targets[0]["boxes"]}, targets[1]], mask, outputs, "'positive_map'")
    _bad(with_(0, boxes=targets[0]["boxes"].long()), mask, outputs, "floating-point")


def test_bad_outputs_and_arguments_raise():
    outputs, targets, mask = random_case(seed=15, layers=3)
    _bad(targets, mask, {"pred_logits": outputs["pred_logits"]}, "pred_boxes")
    _bad(targets, mask, {**outputs, "pred_boxes": outputs["pred_boxes"][..., :3]}, r"outputs\['pred_boxes'\]")
    bad_aux = [dict(outputs["aux_outputs"][0], pred_logits=outputs["pred_logits"][..., :5])]
    _bad(targets, mask, {**outputs, "aux_outputs": bad_aux}, r"aux_outputs'\]\[0\]\['pred_logits'\]")
    _bad(targets, mask[:, :5], outputs, "text_mask")
    _bad(targets, mask.long(), outputs, "text_mask")
    with pytest.raises(ValueError, match="weights"):
        GroundingDINOCriterion(weights="detr")
    with pytest.raises(ValueError, match="weight_dict"):
        GroundingDINOCriterion(weight_dict={"loss_class": 1.0})
    with pytest.raises(ValueError, match="focal_gamma"):
        GroundingDINOCriterion(focal_gamma=-1)
    with pytest.raises(TypeError, match="matcher"):
        GroundingDINOCriterion(matcher=lambda *a: None)


def test_training_step_tiny_model_on_synthetic_shapes():
    """End to end: SyntheticShapes → tiny GroundingDINO → positive maps from the tokenizer's offsets →
    criterion → backward; post_process on the same outputs."""
    text = pytest.importorskip("dinokernels.models.grounding_dino.text")
    from dinokernels.data.synthetic_shapes import SyntheticShapes, collate_detection
    from dinokernels.models.grounding_dino.model import grounding_dino_tiny
    from dinokernels.models.grounding_dino.postprocess import post_process
    from dinokernels.models.grounding_dino.targets import targets_with_positive_maps

    ds = SyntheticShapes(num_images=2, image_size=64, seed=0, colors=["red", "blue"], shapes=["circle", "square"],
                         max_names=4)
    words = sorted({w for n in ds.category_names for w in n.split()})
    tok = text.build_tokenizer(text.tiny_vocab(words))
    torch.manual_seed(0)
    model = grounding_dino_tiny(tok)
    images, targets = collate_detection([ds[0], ds[1]])
    captions = [t["caption"] for t in targets]
    outputs = model(images, captions)
    T = outputs["pred_logits"].shape[-1]
    enc = tok(captions, padding="longest", return_offsets_mapping=True, return_tensors="pt")
    assert torch.equal(outputs["input_ids"].cpu(), enc["input_ids"])  # the captions go through unchanged
    crit_targets = targets_with_positive_maps(targets, enc["offset_mapping"], max_text_len=T)
    losses = GroundingDINOCriterion()(outputs, crit_targets)
    num_aux = len(outputs["aux_outputs"])
    assert set(losses) == set(GroundingDINOCriterion().weight_dict(num_aux)) | {"loss"}
    assert all(torch.isfinite(v) for v in losses.values())
    losses["loss"].backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
    results = post_process(outputs, [(64, 64), (64, 64)], tok, box_threshold=0.0, text_threshold=0.0)
    Q = outputs["pred_logits"].shape[1]
    assert [len(r["phrases"]) for r in results] == [Q, Q]
