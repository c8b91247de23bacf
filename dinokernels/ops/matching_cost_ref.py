"""Pure-PyTorch references of matching_cost (SPEC §6.2, Open-GD / HF row), written here from the formulas:
matching_cost_ref, batched over padded targets (B, Q, G), and matching_cost_flat, the flattened-batch form
(every image's predictions against every image's targets, one (B·Q, ΣG) matrix) that per-image matchers
build and then slice."""
import math
from typing import Dict, List, Optional

import torch
from torch import Tensor

from .boxes import box_cxcywh_to_xyxy, generalized_box_iou, safe_div


def counts_tensor(tgt_counts, B: int, G: int) -> Tensor:
    """tgt_counts as a CPU int64 (B,) tensor (None: every target valid)."""
    if tgt_counts is None:
        return torch.full((B,), G, dtype=torch.int64)
    counts = torch.as_tensor(tgt_counts).detach()
    if counts.numel() and (counts.is_floating_point() or counts.is_complex() or counts.dtype == torch.bool):
        raise TypeError(f"dinokernels.matching_cost: argument 'tgt_counts' must hold integers, got {tgt_counts!r}")
    return counts.to("cpu", torch.int64).reshape(-1)


def focal_class_terms(prob: Tensor, alpha: float, gamma: float) -> Tensor:
    """prob (..., T) = σ(logit) → pos − neg (..., T), SPEC §6.2: pos = α(1−p)^γ·(−log(p + 1e-8)) is the cost of
    calling the token positive, neg = (1−α)p^γ·(−log(1 − p + 1e-8)) that of calling it negative."""
    cost_if_positive = alpha * torch.pow(1 - prob, gamma) * -torch.log(prob + 1e-8)
    cost_if_negative = (1 - alpha) * torch.pow(prob, gamma) * -torch.log(1 - prob + 1e-8)
    return cost_if_positive - cost_if_negative


def matching_cost_ref(pred_logits: Tensor, pred_boxes: Tensor, tgt_boxes: Tensor, positive_map: Tensor,
                      tgt_counts=None, cost_class: float = 1.0, cost_bbox: float = 5.0, cost_giou: float = 2.0,
                      alpha: float = 0.25, gamma: float = 2.0, pad_value: float = math.inf) -> Tensor:
    """Same contract as dinokernels.ops.matching_cost; computed in the promoted dtype of the inputs."""
    dtype = torch.promote_types(pred_logits.dtype, pred_boxes.dtype)
    B, Q, T = pred_logits.shape
    G = tgt_boxes.shape[1]
    token_cost = focal_class_terms(torch.sigmoid(pred_logits.to(dtype)), alpha, gamma)  # (B, Q, T)
    m = positive_map.to(dtype)
    weights = safe_div(m, m.sum(-1, keepdim=True))  # (B, G, T): averaged over the target's tokens
    cls = torch.einsum("bqt,bgt->bqg", token_cost, weights)
    l1 = torch.cdist(pred_boxes.to(dtype), tgt_boxes.to(dtype), p=1)
    giou = generalized_box_iou(box_cxcywh_to_xyxy(pred_boxes.to(dtype)), box_cxcywh_to_xyxy(tgt_boxes.to(dtype)))
    cost = cost_bbox * l1 + cost_class * cls - cost_giou * giou
    counts = counts_tensor(tgt_counts, B, G).to(cost.device)
    valid = torch.arange(G, device=cost.device)[None, None, :] < counts[:, None, None]
    return torch.where(valid, cost, torch.full_like(cost, pad_value)).detach()


def matching_cost_flat(pred_logits: Tensor, pred_boxes: Tensor, targets: List[Dict[str, Tensor]],
                       cost_class: float = 1.0, cost_bbox: float = 5.0, cost_giou: float = 2.0,
                       alpha: float = 0.25, gamma: float = 2.0, dtype: Optional[torch.dtype] = None) -> Tensor:
    """The flattened-batch cost of SPEC §6.2 (Open-GD / HF row): pred_logits (B, Q, T), pred_boxes (B, Q, 4)
    cxcywh, targets a list of B dicts with "boxes" (G_b, 4) cxcywh and "positive_map" (G_b, T' ≤ T; tokens past
    T' count as 0). All B·Q predictions are costed against all ΣG_b targets at once; returns C (B, Q, ΣG_b) on
    the predictions' device, where image b's own cost is the column block `C.split(sizes, -1)[b][b]` (the other
    blocks are the wasted work of this form). Class cost: token costs averaged over the target's map, so an
    all-zero map gives 0/0 = NaN. dtype: the arithmetic (default: the predictions', float32 for 16-bit ones)."""
    if dtype is None:
        dtype = pred_logits.dtype if pred_logits.dtype in (torch.float32, torch.float64) else torch.float32
    B, Q, T = pred_logits.shape
    device = pred_logits.device
    sizes = [int(t["boxes"].shape[0]) for t in targets]
    tgt_boxes = torch.cat([t["boxes"].reshape(-1, 4) for t in targets]).to(device, dtype)  # (ΣG, 4)
    token_maps = torch.zeros(sum(sizes), T, dtype=dtype, device=device)  # (ΣG, T), zero past each map's width
    row = 0
    for t in targets:
        m = t["positive_map"].to(device, dtype)
        token_maps[row:row + m.shape[0], :m.shape[1]] = m
        row += m.shape[0]
    token_maps = token_maps / token_maps.sum(dim=1, keepdim=True)
    preds = pred_boxes.reshape(B * Q, 4).to(dtype)
    token_cost = focal_class_terms(torch.sigmoid(pred_logits.reshape(B * Q, T).to(dtype)), alpha, gamma)
    l1 = torch.cdist(preds, tgt_boxes, p=1)  # (B·Q, ΣG)
    giou = generalized_box_iou(box_cxcywh_to_xyxy(preds), box_cxcywh_to_xyxy(tgt_boxes))
    cost = cost_bbox * l1 + cost_class * (token_cost @ token_maps.T) - cost_giou * giou
    return cost.reshape(B, Q, -1)
