"""box_iou and generalized_box_iou: torchvision's formulas, batched over leading dimensions, finite on zero-area
boxes and on any finite coordinates. Plain PyTorch (autograd for free): the pairwise matrix is a handful of
elementwise ops, and the fused use inside the matcher is dinokernels.ops.matching_cost.

Inverted boxes (x1 < x0 or y1 < y0) and non-finite coordinates are rejected with the argument and the first bad
box named (DETR asserts x1 >= x0 for the same reason: an inverted box has a negative "area" and gives nonsense
such as GIoU 1 against anything)."""
import math
from typing import Tuple

import torch
from torch import Tensor

from . import _dispatch as D

__all__ = ["box_iou", "generalized_box_iou", "box_cxcywh_to_xyxy"]


def _check(op: str, boxes1, boxes2):
    for name, b in (("boxes1", boxes1), ("boxes2", boxes2)):
        if not isinstance(b, torch.Tensor):
            raise D.arg_error(op, name, f"must be a torch.Tensor, got {type(b).__name__}", TypeError)
        if b.dim() < 2 or b.shape[-1] != 4:
            raise D.arg_error(op, name, f"must have shape (..., N, 4) (xyxy), got {tuple(b.shape)}")
        if not b.is_floating_point():
            raise D.arg_error(op, name, f"must have a floating-point dtype, got {b.dtype}", TypeError)
    if boxes1.device != boxes2.device:
        raise D.arg_error(op, "boxes2", f"must be on {boxes1.device}, got {boxes2.device}")
    try:
        torch.broadcast_shapes(boxes1.shape[:-2], boxes2.shape[:-2])
    except RuntimeError:
        raise D.arg_error(op, "boxes2", f"leading dimensions {tuple(boxes2.shape[:-2])} do not broadcast with "
                                        f"boxes1's {tuple(boxes1.shape[:-2])}") from None
    for name, b in (("boxes1", boxes1), ("boxes2", boxes2)):
        flat = b.detach().reshape(-1, 4)
        bad = ~torch.isfinite(flat).all(-1) | (flat[:, 2] < flat[:, 0]) | (flat[:, 3] < flat[:, 1])
        if bool(bad.any()):
            i = int(bad.nonzero()[0, 0])
            index = tuple(int(v) for v in torch.unravel_index(torch.tensor(i), b.shape[:-1])) if b.dim() > 2 else i
            box = [float(v) for v in flat[i]]
            what = "inverted (x1 < x0 or y1 < y0)" if bool(torch.isfinite(flat[i]).all()) else "non-finite"
            raise D.arg_error(op, name, f"must hold boxes (x0, y0, x1, y1) with x1 >= x0 and y1 >= y0, all finite; "
                                        f"box {index} is {what}: {box}")


def safe_div(num: Tensor, den: Tensor) -> Tensor:
    """num / den with x/0 := 0 (in particular 0/0 := 0), with a finite gradient (den is replaced by 1 where it is
    0 before dividing, so no inf/NaN reaches autograd)."""
    zero = den == 0
    return torch.where(zero, torch.zeros_like(num), num / torch.where(zero, torch.ones_like(den), den))


def _pairwise(boxes1: Tensor, boxes2: Tensor) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """(inter, union, a, b) with a = boxes1 as (..., N, 1, 4), b = boxes2 as (..., 1, M, 4), in float64.

    Areas are products of two coordinates: float32 coordinates near 1e30 overflow in float32 (inf − inf = NaN),
    so the arithmetic is float64, and coordinates beyond 2^64 are first divided by a common power of two (exact;
    IoU and GIoU are scale-invariant)."""
    a = boxes1.to(torch.float64)
    b = boxes2.to(torch.float64)
    with torch.no_grad():
        big = max(float(a.abs().max()) if a.numel() else 0.0, float(b.abs().max()) if b.numel() else 0.0)
    if big > 2.0 ** 64:
        scale = 2.0 ** -math.frexp(big)[1]
        a, b = a * scale, b * scale
    a = a.unsqueeze(-2)  # (..., N, 1, 4)
    b = b.unsqueeze(-3)  # (..., 1, M, 4)
    area_a = (a[..., 2] - a[..., 0]) * (a[..., 3] - a[..., 1])
    area_b = (b[..., 2] - b[..., 0]) * (b[..., 3] - b[..., 1])
    lt = torch.maximum(a[..., :2], b[..., :2])
    rb = torch.minimum(a[..., 2:], b[..., 2:])
    wh = (rb - lt).clamp(min=0)
    inter = wh[..., 0] * wh[..., 1]
    union = area_a + area_b - inter
    return inter, union, a, b


def box_iou(boxes1: Tensor, boxes2: Tensor) -> Tensor:
    """IoU of every pair: boxes1 (..., N, 4), boxes2 (..., M, 4), xyxy, leading dims broadcast → (..., N, M).

    torchvision.ops.box_iou's formula (inter / (area1 + area2 − inter)), except that a zero union (both boxes of
    zero area) gives IoU 0 instead of NaN. Inverted or non-finite boxes raise ValueError; differentiable.
    """
    _check("box_iou", boxes1, boxes2)
    inter, union, _, _ = _pairwise(boxes1, boxes2)
    return safe_div(inter, union).to(torch.promote_types(boxes1.dtype, boxes2.dtype))


def generalized_box_iou(boxes1: Tensor, boxes2: Tensor) -> Tensor:
    """GIoU of every pair: boxes1 (..., N, 4), boxes2 (..., M, 4), xyxy, leading dims broadcast → (..., N, M).

    torchvision.ops.generalized_box_iou's formula, IoU − (C − union) / C with C the enclosing box's area, no eps
    (DETR's and torchvision's; Grounding DINO's copy adds 1e-6). Degenerate boxes stay finite: x/0 := 0 in both
    divisions, so two identical zero-area boxes give 0, and a zero-area box inside a proper box gives
    −(C − union)/C. Differentiable (the zero-denominator branches have zero gradient).
    """
    _check("generalized_box_iou", boxes1, boxes2)
    inter, union, a, b = _pairwise(boxes1, boxes2)
    iou = safe_div(inter, union)
    lt = torch.minimum(a[..., :2], b[..., :2])
    rb = torch.maximum(a[..., 2:], b[..., 2:])
    wh = (rb - lt).clamp(min=0)
    hull = wh[..., 0] * wh[..., 1]
    return (iou - safe_div(hull - union, hull)).to(torch.promote_types(boxes1.dtype, boxes2.dtype))


def box_cxcywh_to_xyxy(boxes: Tensor) -> Tensor:
    """(..., 4) (cx, cy, w, h) → (x0, y0, x1, y1) = (c − s/2, c + s/2), as torchvision's box_convert."""
    cx, cy, w, h = boxes.unbind(-1)
    return torch.stack([cx - 0.5 * w, cy - 0.5 * h, cx + 0.5 * w, cy + 0.5 * h], dim=-1)
