"""Pure-PyTorch reference of matching_cost, written as DETR / Open-GroundingDino write their matcher cost
(dense focal terms, token-map matmul, cdist, GIoU), batched over padded targets."""
import math

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


def matching_cost_ref(pred_logits: Tensor, pred_boxes: Tensor, tgt_boxes: Tensor, positive_map: Tensor,
                      tgt_counts=None, cost_class: float = 1.0, cost_bbox: float = 5.0, cost_giou: float = 2.0,
                      alpha: float = 0.25, gamma: float = 2.0, pad_value: float = math.inf) -> Tensor:
    """Same contract as dinokernels.ops.matching_cost; computed in the promoted dtype of the inputs."""
    dtype = torch.promote_types(pred_logits.dtype, pred_boxes.dtype)
    B, Q, T = pred_logits.shape
    G = tgt_boxes.shape[1]
    prob = pred_logits.to(dtype).sigmoid()
    neg = (1 - alpha) * prob ** gamma * (-(1 - prob + 1e-8).log())
    pos = alpha * (1 - prob) ** gamma * (-(prob + 1e-8).log())
    m = positive_map.to(dtype)
    weights = safe_div(m, m.sum(-1, keepdim=True))  # (B, G, T): averaged over the target's tokens
    cls = (pos - neg) @ weights.transpose(-1, -2)  # (B, Q, G)
    l1 = torch.cdist(pred_boxes.to(dtype), tgt_boxes.to(dtype), p=1)
    giou = generalized_box_iou(box_cxcywh_to_xyxy(pred_boxes.to(dtype)), box_cxcywh_to_xyxy(tgt_boxes.to(dtype)))
    cost = cost_bbox * l1 + cost_class * cls - cost_giou * giou
    counts = counts_tensor(tgt_counts, B, G).to(cost.device)
    valid = torch.arange(G, device=cost.device)[None, None, :] < counts[:, None, None]
    return torch.where(valid, cost, torch.full_like(cost, pad_value)).detach()
