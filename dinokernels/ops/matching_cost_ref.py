"""Pure-PyTorch references of matching_cost: matching_cost_ref, written as DETR / Open-GroundingDino write
their matcher cost (dense focal terms, token-map matmul, cdist, GIoU) but batched over padded targets, and
matching_cost_official, Open-GroundingDino's HungarianMatcher cost verbatim (flattened batch, one matrix)."""
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


def matching_cost_official(pred_logits: Tensor, pred_boxes: Tensor, targets: List[Dict[str, Tensor]],
                           cost_class: float = 1.0, cost_bbox: float = 5.0, cost_giou: float = 2.0,
                           alpha: float = 0.25, gamma: float = 2.0, dtype: Optional[torch.dtype] = None) -> Tensor:
    """Open-GroundingDino's HungarianMatcher.forward cost as written there: flatten the batch, concatenate every
    image's targets ("boxes" (G_b, 4) cxcywh, "positive_map" (G_b, T' <= T), zero-padded to T), one
    [B·Q, ΣG_b] matrix. Returns C (B, Q, ΣG_b) on the predictions' device; image b's cost is its own column
    block, `C.split(sizes, -1)[b][b]` as the official code takes it. dtype: the arithmetic (default: the
    predictions', float32 for 16-bit ones, as matchers run in float32 and cdist has no CUDA bfloat16). A target
    with an all-zero map gives NaN, as there."""
    if dtype is None:
        dtype = pred_logits.dtype if pred_logits.dtype in (torch.float32, torch.float64) else torch.float32
    bs, num_queries, T = pred_logits.shape
    out_prob = pred_logits.flatten(0, 1).to(dtype).sigmoid()
    out_bbox = pred_boxes.flatten(0, 1).to(dtype)
    tgt_bbox = torch.cat([v["boxes"] for v in targets]).to(out_bbox)
    maps = torch.cat([torch.nn.functional.pad(v["positive_map"].to(out_prob), (0, T - v["positive_map"].shape[1]))
                      for v in targets])
    maps = maps / maps.sum(-1, keepdim=True)
    neg = (1 - alpha) * (out_prob ** gamma) * (-(1 - out_prob + 1e-8).log())
    pos = alpha * ((1 - out_prob) ** gamma) * (-(out_prob + 1e-8).log())
    c_class = pos @ maps.T - neg @ maps.T
    c_bbox = torch.cdist(out_bbox, tgt_bbox, p=1)
    c_giou = -generalized_box_iou(box_cxcywh_to_xyxy(out_bbox), box_cxcywh_to_xyxy(tgt_bbox))
    return (cost_bbox * c_bbox + cost_class * c_class + cost_giou * c_giou).view(bs, num_queries, -1)
