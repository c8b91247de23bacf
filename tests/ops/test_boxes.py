"""box_iou and generalized_box_iou against SPEC §6.1's formulas evaluated pair by pair in float64 (no eps),
batched broadcasting, degenerate boxes (finite, with the documented 0/0 := 0), gradients, bad inputs."""
import pytest
import torch

from dinokernels.ops import box_cxcywh_to_xyxy, box_iou, generalized_box_iou


def torchvision_pair(a, b):
    """IoU and GIoU (SPEC §6.1, torchvision's variant: no eps) for one pair of xyxy boxes, in float64 Python
    scalars, with 0/0 := 0 where that variant would give NaN."""
    a, b = [float(v) for v in a], [float(v) for v in b]
    area_a = (a[2] - a[0]) * (a[3] - a[1])
    area_b = (b[2] - b[0]) * (b[3] - b[1])
    iw = max(min(a[2], b[2]) - max(a[0], b[0]), 0.0)
    ih = max(min(a[3], b[3]) - max(a[1], b[1]), 0.0)
    inter = iw * ih
    union = area_a + area_b - inter
    iou = inter / union if union != 0 else 0.0
    cw = max(max(a[2], b[2]) - min(a[0], b[0]), 0.0)
    ch = max(max(a[3], b[3]) - min(a[1], b[1]), 0.0)
    hull = cw * ch
    return iou, iou - ((hull - union) / hull if hull != 0 else 0.0)


def reference(boxes1, boxes2):
    """(N, 4) × (M, 4) → (iou, giou) (N, M) float64 by the pairwise formula."""
    n, m = boxes1.shape[0], boxes2.shape[0]
    iou = torch.zeros(n, m, dtype=torch.float64)
    giou = torch.zeros(n, m, dtype=torch.float64)
    for i in range(n):
        for j in range(m):
            iou[i, j], giou[i, j] = torchvision_pair(boxes1[i], boxes2[j])
    return iou, giou


def random_xyxy(*shape, dtype=torch.float64):
    xy = torch.rand(*shape, 2, dtype=dtype)
    wh = torch.rand(*shape, 2, dtype=dtype) * 0.5
    return torch.cat([xy, xy + wh], dim=-1)


def degenerate_boxes():
    return torch.tensor([
        [0.2, 0.2, 0.2, 0.2],  # a point
        [0.2, 0.2, 0.2, 0.2],  # the same point
        [0.1, 0.3, 0.6, 0.3],  # a horizontal segment
        [0.4, 0.1, 0.4, 0.9],  # a vertical segment crossing it
        [0.0, 0.0, 1.0, 1.0],  # a proper box containing them
        [0.3, 0.3, 0.5, 0.5],
        [0.7, 0.7, 0.7, 0.8],
    ], dtype=torch.float64)


@pytest.mark.parametrize("n,m", [(1, 1), (7, 3), (13, 20)])
def test_matches_torchvision_formula(n, m):
    b1, b2 = random_xyxy(n), random_xyxy(m)
    iou, giou = reference(b1, b2)
    torch.testing.assert_close(box_iou(b1, b2), iou, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(generalized_box_iou(b1, b2), giou, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(box_iou(b1.float(), b2.float()), iou.float(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(generalized_box_iou(b1.float(), b2.float()), giou.float(), rtol=1e-5, atol=1e-6)


def test_batched_broadcast():
    b1 = random_xyxy(2, 1, 5)
    b2 = random_xyxy(3, 4)
    iou, giou = box_iou(b1, b2), generalized_box_iou(b1, b2)
    assert iou.shape == giou.shape == (2, 3, 5, 4)
    for i in range(2):
        for j in range(3):
            r_iou, r_giou = reference(b1[i, 0], b2[j])
            torch.testing.assert_close(iou[i, j], r_iou, rtol=1e-12, atol=1e-12)
            torch.testing.assert_close(giou[i, j], r_giou, rtol=1e-12, atol=1e-12)


def test_degenerate_boxes_are_finite_and_defined():
    b = degenerate_boxes()
    iou, giou = box_iou(b, b), generalized_box_iou(b, b)
    assert torch.isfinite(iou).all() and torch.isfinite(giou).all()
    r_iou, r_giou = reference(b, b)
    torch.testing.assert_close(iou, r_iou, rtol=0, atol=1e-15)
    torch.testing.assert_close(giou, r_giou, rtol=0, atol=1e-15)
    assert iou[0, 1] == 0 and giou[0, 1] == 0  # identical points: 0/0 := 0 in both terms
    assert iou[2, 3] == 0 and giou[2, 3] == -1  # crossing segments: zero union, non-empty hull → −(C − 0)/C
    assert iou[0, 4] == 0 and giou[0, 4] == 0  # a point inside a box: the hull is the box, C = union
    torch.testing.assert_close(giou[5, 5], torch.tensor(1.0, dtype=torch.float64))
    assert (giou >= -1).all() and (giou <= 1).all()


def test_gradcheck_and_finite_gradients_on_degenerate_boxes():
    b1 = random_xyxy(4).requires_grad_()
    b2 = random_xyxy(3).requires_grad_()
    assert torch.autograd.gradcheck(box_iou, (b1, b2))
    assert torch.autograd.gradcheck(generalized_box_iou, (b1, b2))
    d = degenerate_boxes().requires_grad_()
    (box_iou(d, d).sum() + generalized_box_iou(d, d).sum()).backward()
    assert torch.isfinite(d.grad).all()


def test_cxcywh_to_xyxy():
    b = torch.tensor([[0.5, 0.5, 0.2, 0.4]], dtype=torch.float64)
    torch.testing.assert_close(box_cxcywh_to_xyxy(b), torch.tensor([[0.4, 0.3, 0.6, 0.7]], dtype=torch.float64))


def test_empty():
    assert box_iou(torch.zeros(0, 4), random_xyxy(3)).shape == (0, 3)
    assert generalized_box_iou(torch.rand(2, 0, 4), random_xyxy(2, 3)).shape == (2, 0, 3)


@pytest.mark.parametrize("fn", [box_iou, generalized_box_iou])
def test_bad_inputs(fn):
    with pytest.raises(ValueError, match="boxes1"):
        fn(torch.rand(3, 5), torch.rand(3, 4))
    with pytest.raises(ValueError, match="boxes2"):
        fn(torch.rand(3, 4), torch.rand(4))
    with pytest.raises(TypeError, match="boxes1"):
        fn(torch.ones(3, 4, dtype=torch.int64), torch.rand(3, 4))
    with pytest.raises(ValueError, match="broadcast"):
        fn(torch.rand(2, 3, 4), torch.rand(3, 3, 4))


@pytest.mark.parametrize("fn", [box_iou, generalized_box_iou])
def test_inverted_and_non_finite_boxes_are_rejected_by_name(fn):
    good = random_xyxy(3)
    inverted = good.clone()
    inverted[1] = torch.tensor([0.6, 0.2, 0.4, 0.5], dtype=torch.float64)  # x1 < x0: GIoU used to be 1.0
    with pytest.raises(ValueError, match=r"'boxes1'.*box 1 is inverted.*0\.6, 0\.2, 0\.4, 0\.5"):
        fn(inverted, good)
    with pytest.raises(ValueError, match=r"'boxes2'.*box 1 is inverted"):
        fn(good, inverted)
    upside_down = good.clone()
    upside_down[2, 3] = upside_down[2, 1] - 0.1
    with pytest.raises(ValueError, match=r"'boxes2'.*box 2 is inverted"):
        fn(good, upside_down)
    batched = random_xyxy(2, 3)
    batched[1, 2, 2] = batched[1, 2, 0] - 1
    with pytest.raises(ValueError, match=r"'boxes1'.*box \(1, 2\) is inverted"):
        fn(batched, good)
    for bad in (float("nan"), float("inf")):
        b = good.clone()
        b[0, 0] = bad
        with pytest.raises(ValueError, match=r"'boxes1'.*box 0 is non-finite"):
            fn(b, good)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("magnitude", [1e18, 1e30, 1e38])  # coordinates up to 1.5 × magnitude < float32 max
def test_huge_finite_boxes_stay_finite_and_scale_invariant(dtype, magnitude):
    b1, b2 = random_xyxy(4), random_xyxy(5)
    expected_iou, expected_giou = reference(b1, b2)
    s1, s2 = (b1 * magnitude).to(dtype), (b2 * magnitude).to(dtype)
    iou, giou = box_iou(s1, s2), generalized_box_iou(s1, s2)
    assert iou.dtype == giou.dtype == dtype
    assert torch.isfinite(iou).all() and torch.isfinite(giou).all()
    tol = 1e-5 if dtype == torch.float32 else 1e-10
    # The rounding of the scaled coordinates to `dtype` is the only error left.
    r_iou, r_giou = reference(s1.double() / magnitude, s2.double() / magnitude)
    torch.testing.assert_close(iou.double(), r_iou, rtol=tol, atol=tol)
    torch.testing.assert_close(giou.double(), r_giou, rtol=tol, atol=tol)
    torch.testing.assert_close(r_giou, expected_giou, rtol=1e-4, atol=1e-4)
