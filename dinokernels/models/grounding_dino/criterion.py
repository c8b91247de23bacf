"""Grounding DINO training criterion (SPEC §5.8; the official repo has no training code, Open-GroundingDino's
lineage is the default): Hungarian matching of every decoder layer and the encoder proposals in one matcher call,
then per layer a token-level sigmoid focal loss against the matched targets' token maps and L1 + (1 − GIoU) on the
matched boxes, each divided by the number of target boxes (averaged over ranks, clamped ≥ 1)."""
from __future__ import annotations

import math
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ...ops.boxes import box_cxcywh_to_xyxy, safe_div
from .matcher import HungarianMatcher

__all__ = ["GroundingDINOCriterion", "SetCriterion", "LOSS_WEIGHTS", "sigmoid_focal_loss", "paired_generalized_iou"]

# Loss weights of the two training lineages (SPEC §5.8 table). Both use L1 5 / GIoU 2; the class weight differs.
LOSS_WEIGHTS = {
    "open-gd": {"loss_ce": 2.0, "loss_bbox": 5.0, "loss_giou": 2.0},
    "mmdet": {"loss_ce": 1.0, "loss_bbox": 5.0, "loss_giou": 2.0},
}


def sigmoid_focal_loss(logits: Tensor, targets: Tensor, alpha: float = 0.25, gamma: float = 2.0) -> Tensor:
    """Elementwise sigmoid focal loss (RetinaNet): logits, targets (same shape, targets in [0, 1]) →
    α_t·(1 − p_t)^γ·BCE(logits, targets) with p_t = p·t + (1 − p)(1 − t), α_t = α·t + (1 − α)(1 − t)
    (α < 0 disables the α weighting)."""
    p = torch.sigmoid(logits)
    ce = F.binary_cross_entropy_with_logits(logits, targets, reduction="none")
    p_t = p * targets + (1 - p) * (1 - targets)
    loss = ce * (1 - p_t) ** gamma
    if alpha >= 0:
        loss = (alpha * targets + (1 - alpha) * (1 - targets)) * loss
    return loss


def paired_generalized_iou(boxes1: Tensor, boxes2: Tensor) -> Tensor:
    """GIoU of matched pairs: boxes1, boxes2 (N, 4) xyxy → (N,). The formula of dinokernels.ops.generalized_box_iou
    (SPEC §6.1, no eps, 0/0 := 0) on the diagonal only, differentiable."""
    area1 = (boxes1[:, 2] - boxes1[:, 0]) * (boxes1[:, 3] - boxes1[:, 1])
    area2 = (boxes2[:, 2] - boxes2[:, 0]) * (boxes2[:, 3] - boxes2[:, 1])
    wh = (torch.minimum(boxes1[:, 2:], boxes2[:, 2:]) - torch.maximum(boxes1[:, :2], boxes2[:, :2])).clamp(min=0)
    inter = wh[:, 0] * wh[:, 1]
    union = area1 + area2 - inter
    hull_wh = (torch.maximum(boxes1[:, 2:], boxes2[:, 2:]) - torch.minimum(boxes1[:, :2], boxes2[:, :2])).clamp(min=0)
    hull = hull_wh[:, 0] * hull_wh[:, 1]
    return safe_div(inter, union) - safe_div(hull - union, hull)


class GroundingDINOCriterion(nn.Module):
    """Set criterion of Grounding DINO training.

    Args:
        matcher: a HungarianMatcher (default: HungarianMatcher(), Open-GroundingDino's cost 1 / 5 / 2 with the
            class cost averaged over the target's tokens).
        weights: "open-gd" (loss_ce 2.0, loss_bbox 5.0, loss_giou 2.0) or "mmdet" (loss_ce 1.0); the loss weights
            only (mmdetection's summed match cost is not what HungarianMatcher computes).
        weight_dict: overrides of the base weights (keys loss_ce, loss_bbox, loss_giou).
        focal_alpha, focal_gamma: 0.25, 2.0.
        aux_loss: add the losses of outputs["aux_outputs"] (earlier decoder layers), suffix "_{i}".
        interm_loss_coef: weight factor of the encoder proposals' losses (outputs["interm_outputs"], suffix
            "_interm"); 1.0 as Open-GroundingDino, 0 to skip them.

    forward(outputs, targets, text_mask=None) → dict of the unweighted losses ("loss_ce", "loss_bbox",
    "loss_giou", then "_0".."_{L−2}" per aux layer and "_interm") and "loss", their weighted sum.

        outputs: "pred_logits" (B, Q, T) with −inf (or anything) at invalid tokens, "pred_boxes" (B, Q, 4) cxcywh;
            optional "aux_outputs" (list of such dicts), "interm_outputs" (such a dict), "text_mask" (B, T).
        targets: B dicts with "boxes" (G, 4) cxcywh in [0, 1] with w, h > 0 and "positive_map" (G, T) 0/1 (or
            nonnegative weights) over the same T token columns, zero at invalid tokens. G = 0 is allowed.
        text_mask: (B, T) bool, True = valid token (the model's text token mask); default outputs["text_mask"],
            else the tokens whose logits are not −inf for every query of the final layer.

    Focal loss: summed over valid tokens of all queries (a matched query's target row is its GT's map, others
    zero), divided by num_boxes = total G over the batch, averaged over ranks when torch.distributed is
    initialised (all-reduce), clamped ≥ 1.
    """

    def __init__(self, matcher: Optional[HungarianMatcher] = None, weights: str = "open-gd",
                 weight_dict: Optional[Dict[str, float]] = None, focal_alpha: float = 0.25, focal_gamma: float = 2.0,
                 aux_loss: bool = True, interm_loss_coef: float = 1.0):
        super().__init__()
        if weights not in LOSS_WEIGHTS:
            raise ValueError(f"GroundingDINOCriterion: argument 'weights' must be one of {sorted(LOSS_WEIGHTS)}, "
                             f"got {weights!r}")
        base = dict(LOSS_WEIGHTS[weights])
        for k, v in (weight_dict or {}).items():
            if k not in base:
                raise ValueError(f"GroundingDINOCriterion: argument 'weight_dict' has unknown key {k!r}; expected "
                                 f"some of {sorted(base)}")
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                raise ValueError(f"GroundingDINOCriterion: argument 'weight_dict'[{k!r}] must be a finite number, "
                                 f"got {v!r}")
            base[k] = float(v)
        for name, v in (("focal_gamma", focal_gamma), ("interm_loss_coef", interm_loss_coef)):
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not (math.isfinite(v) and v >= 0):
                raise ValueError(f"GroundingDINOCriterion: argument '{name}' must be a nonnegative finite number, "
                                 f"got {v!r}")
        if isinstance(focal_alpha, bool) or not isinstance(focal_alpha, (int, float)) or not focal_alpha <= 1:
            raise ValueError(f"GroundingDINOCriterion: argument 'focal_alpha' must be <= 1 (negative disables it), "
                             f"got {focal_alpha!r}")
        if matcher is not None and not isinstance(matcher, HungarianMatcher):
            raise TypeError(f"GroundingDINOCriterion: argument 'matcher' must be a HungarianMatcher, got "
                            f"{type(matcher).__name__}")
        self.matcher = matcher if matcher is not None else HungarianMatcher()
        self.weights = weights
        self.base_weights = base
        self.focal_alpha, self.focal_gamma = float(focal_alpha), float(focal_gamma)
        self.aux_loss = bool(aux_loss)
        self.interm_loss_coef = float(interm_loss_coef)

    def extra_repr(self) -> str:
        return (f"weights={self.weights!r}, base_weights={self.base_weights}, focal_alpha={self.focal_alpha}, "
                f"focal_gamma={self.focal_gamma}, aux_loss={self.aux_loss}, interm_loss_coef={self.interm_loss_coef}")

    def weight_dict(self, num_aux: int = 0, interm: bool = True) -> Dict[str, float]:
        """The full weight of every loss key: base, "_{i}" for i < num_aux, "_interm" (× interm_loss_coef)."""
        out = dict(self.base_weights)
        for i in range(num_aux):
            out.update({f"{k}_{i}": v for k, v in self.base_weights.items()})
        if interm and self.interm_loss_coef > 0:
            out.update({f"{k}_interm": v * self.interm_loss_coef for k, v in self.base_weights.items()})
        return out

    # ------------------------------------------------------------------ checks

    def _check_layer(self, name: str, out, B: int, T: int) -> Tuple[Tensor, Tensor]:
        if not isinstance(out, dict) or "pred_logits" not in out or "pred_boxes" not in out:
            raise ValueError(f"GroundingDINOCriterion: {name} must be a dict with 'pred_logits' and 'pred_boxes'")
        logits, boxes = out["pred_logits"], out["pred_boxes"]
        for arg, t in (("pred_logits", logits), ("pred_boxes", boxes)):
            if not isinstance(t, Tensor) or not t.is_floating_point():
                raise TypeError(f"GroundingDINOCriterion: {name}['{arg}'] must be a floating-point tensor, got "
                                f"{getattr(t, 'dtype', type(t).__name__)}")
        if logits.dim() != 3 or logits.shape[0] != B or logits.shape[2] != T:
            raise ValueError(f"GroundingDINOCriterion: {name}['pred_logits'] must be (B={B}, Q, T={T}), got "
                             f"{tuple(logits.shape)}")
        if tuple(boxes.shape) != (B, logits.shape[1], 4):
            raise ValueError(f"GroundingDINOCriterion: {name}['pred_boxes'] must be {(B, logits.shape[1], 4)} "
                             f"cxcywh, got {tuple(boxes.shape)}")
        if boxes.device != logits.device:
            raise ValueError(f"GroundingDINOCriterion: {name}['pred_boxes'] is on {boxes.device}, pred_logits on "
                             f"{logits.device}")
        return logits, boxes

    def _check_targets(self, targets, B: int, T: int, text_mask: Tensor, device, dtype) -> List[Tuple[Tensor, Tensor]]:
        if not isinstance(targets, Sequence) or isinstance(targets, (str, bytes, dict)):
            raise TypeError(f"GroundingDINOCriterion: argument 'targets' must be a list of B dicts, got "
                            f"{type(targets).__name__}")
        if len(targets) != B:
            raise ValueError(f"GroundingDINOCriterion: argument 'targets' has {len(targets)} entries for a batch of "
                             f"{B}")
        out = []
        for i, t in enumerate(targets):
            where = f"targets[{i}]"
            if not isinstance(t, dict) or "boxes" not in t or "positive_map" not in t:
                raise ValueError(f"GroundingDINOCriterion: {where} must be a dict with 'boxes' (G, 4) and "
                                 f"'positive_map' (G, T)")
            boxes, pmap = t["boxes"], t["positive_map"]
            if not isinstance(boxes, Tensor) or not boxes.is_floating_point():
                raise TypeError(f"GroundingDINOCriterion: {where}['boxes'] must be a floating-point tensor, got "
                                f"{getattr(boxes, 'dtype', type(boxes).__name__)}")
            if boxes.dim() != 2 or boxes.shape[1] != 4:
                raise ValueError(f"GroundingDINOCriterion: {where}['boxes'] must be (G, 4) cxcywh, got "
                                 f"{tuple(boxes.shape)}")
            G = boxes.shape[0]
            if not isinstance(pmap, Tensor) or not (pmap.is_floating_point() or pmap.dtype == torch.bool):
                raise TypeError(f"GroundingDINOCriterion: {where}['positive_map'] must be a float or bool tensor, got "
                                f"{getattr(pmap, 'dtype', type(pmap).__name__)}")
            if pmap.dim() != 2 or pmap.shape[0] != G:
                raise ValueError(f"GroundingDINOCriterion: {where}['positive_map'] must be (G={G}, T={T}), got "
                                 f"{tuple(pmap.shape)}")
            if pmap.shape[1] != T:
                raise ValueError(f"GroundingDINOCriterion: {where}['positive_map'] has width {pmap.shape[1]}, the "
                                 f"predictions have T={T} token columns (build maps with max_text_len={T})")
            b = boxes.detach()
            if G and not bool(torch.isfinite(b).all()):
                raise ValueError(f"GroundingDINOCriterion: {where}['boxes'] contains NaN or inf")
            if G and not bool(((b >= 0) & (b <= 1)).all()):
                raise ValueError(f"GroundingDINOCriterion: {where}['boxes'] must be normalised cxcywh in [0, 1], got "
                                 f"values in [{float(b.min())}, {float(b.max())}]")
            if G and not bool((b[:, 2:] > 0).all()):
                k = int((b[:, 2:] <= 0).any(-1).nonzero()[0, 0])
                raise ValueError(f"GroundingDINOCriterion: {where}['boxes'][{k}] = {b[k].tolist()} has w or h <= 0")
            m = pmap.detach().to(device=device, dtype=dtype)
            if G and not bool((torch.isfinite(m) & (m >= 0)).all()):
                raise ValueError(f"GroundingDINOCriterion: {where}['positive_map'] must be nonnegative and finite")
            if G and bool((m[:, ~text_mask[i]] != 0).any()):
                raise ValueError(f"GroundingDINOCriterion: {where}['positive_map'] marks tokens that the text mask "
                                 f"says are invalid (past the caption)")
            out.append((b.to(device=device, dtype=dtype), m))
        return out

    # ------------------------------------------------------------------ losses

    def _num_boxes(self, targets, device) -> float:
        num = torch.tensor([float(sum(int(t["boxes"].shape[0]) for t in targets))], device=device,
                           dtype=torch.float64 if device.type == "cpu" else torch.float32)
        world = 1
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(num)
            world = torch.distributed.get_world_size()
        return max(float(num.item()) / world, 1.0)

    def _layer_losses(self, logits: Tensor, boxes: Tensor, text_mask: Tensor, tgt, indices, num_boxes: float,
                      ) -> Dict[str, Tensor]:
        B, Q, T = logits.shape
        dtype = logits.dtype if logits.dtype in (torch.float32, torch.float64) else torch.float32
        z = logits.to(dtype)
        boxes = boxes.to(dtype)
        valid = text_mask[:, None, :].expand(B, Q, T)
        # Invalid tokens (−inf logits) are replaced before the loss, so neither the value nor the gradient sees them.
        z = torch.where(valid, z, torch.zeros((), dtype=dtype, device=z.device))
        target_tokens = torch.zeros(B, Q, T, dtype=dtype, device=z.device)
        src_boxes, tgt_boxes = [], []
        for b, (qi, gi) in enumerate(indices):
            if len(qi):
                qi_d, gi_d = qi.to(z.device), gi.to(z.device)
                target_tokens[b, qi_d] = tgt[b][1][gi_d].to(dtype)
                src_boxes.append(boxes[b, qi_d])
                tgt_boxes.append(tgt[b][0][gi_d].to(dtype))
        focal = sigmoid_focal_loss(z, target_tokens, self.focal_alpha, self.focal_gamma)
        loss_ce = (focal * valid).sum() / num_boxes
        if src_boxes:
            src, dst = torch.cat(src_boxes), torch.cat(tgt_boxes)
            loss_bbox = (src - dst).abs().sum() / num_boxes
            giou = paired_generalized_iou(box_cxcywh_to_xyxy(src), box_cxcywh_to_xyxy(dst))
            loss_giou = (1 - giou).sum() / num_boxes
        else:
            # No matched pair in the batch: zero, still connected to the graph (unused-parameter safe under DDP).
            loss_bbox = boxes.sum() * 0
            loss_giou = boxes.sum() * 0
        return {"loss_ce": loss_ce, "loss_bbox": loss_bbox, "loss_giou": loss_giou}

    def forward(self, outputs: Dict, targets: Sequence[Dict[str, Tensor]],
                text_mask: Optional[Tensor] = None) -> Dict[str, Tensor]:
        if not isinstance(outputs, dict):
            raise TypeError(f"GroundingDINOCriterion: argument 'outputs' must be a dict, got {type(outputs).__name__}")
        if "pred_logits" not in outputs or not isinstance(outputs["pred_logits"], Tensor) or \
                outputs["pred_logits"].dim() != 3:
            raise ValueError("GroundingDINOCriterion: outputs['pred_logits'] must be a (B, Q, T) tensor")
        B, _, T = outputs["pred_logits"].shape
        final = self._check_layer("outputs", outputs, B, T)
        device = final[0].device
        if text_mask is None:
            text_mask = outputs.get("text_mask")
        if text_mask is None:
            text_mask = ~torch.isneginf(final[0].detach()).all(dim=1)
        if not isinstance(text_mask, Tensor) or text_mask.dtype != torch.bool or tuple(text_mask.shape) != (B, T):
            raise ValueError(f"GroundingDINOCriterion: argument 'text_mask' must be a (B={B}, T={T}) bool tensor "
                             f"(True = valid token), got {getattr(text_mask, 'shape', type(text_mask).__name__)} "
                             f"{getattr(text_mask, 'dtype', '')}")
        text_mask = text_mask.to(device)

        layers: List[Tuple[str, Tensor, Tensor]] = [("", *final)]
        if self.aux_loss:
            aux = outputs.get("aux_outputs") or []
            if not isinstance(aux, Sequence):
                raise TypeError("GroundingDINOCriterion: outputs['aux_outputs'] must be a list of dicts")
            for i, a in enumerate(aux):
                layers.append((f"_{i}", *self._check_layer(f"outputs['aux_outputs'][{i}]", a, B, T)))
        if self.interm_loss_coef > 0 and outputs.get("interm_outputs") is not None:
            layers.append(("_interm", *self._check_layer("outputs['interm_outputs']", outputs["interm_outputs"],
                                                         B, T)))
        for suffix, logits, boxes in layers:
            if logits.device != device:
                raise ValueError(f"GroundingDINOCriterion: layer '{suffix or 'final'}' is on {logits.device}, the "
                                 f"final layer on {device}")

        dtype = torch.float64 if final[0].dtype == torch.float64 else torch.float32
        tgt = self._check_targets(targets, B, T, text_mask, device, dtype)
        matcher_targets = [{"boxes": b, "positive_map": m} for b, m in tgt]
        indices = self._match(layers, matcher_targets, text_mask)
        num_boxes = self._num_boxes(targets, device)

        weights = self.weight_dict(num_aux=len(layers), interm=True)
        losses: Dict[str, Tensor] = {}
        for (suffix, logits, boxes), idx in zip(layers, indices):
            for k, v in self._layer_losses(logits, boxes, text_mask, tgt, idx, num_boxes).items():
                losses[k + suffix] = v
        losses["loss"] = sum(weights[k] * v for k, v in losses.items())
        return losses

    def _match(self, layers, targets, text_mask: Tensor) -> List:
        """Indices per layer. Layers of equal query count go through one matcher call (one cost kernel, one
        batched assignment solve); invalid-token logits are zeroed first (the matcher rejects −inf; the maps are
        zero there, so the cost does not change)."""
        groups: Dict[int, List[int]] = {}
        for j, (_, logits, _) in enumerate(layers):
            groups.setdefault(logits.shape[1], []).append(j)
        indices: List = [None] * len(layers)
        for members in groups.values():
            stack = []
            for j in members:
                logits, boxes = layers[j][1].detach(), layers[j][2].detach()
                logits = torch.where(text_mask[:, None, :], logits, torch.zeros((), dtype=logits.dtype,
                                                                                device=logits.device))
                stack.append({"pred_logits": logits, "pred_boxes": boxes})
            for j, idx in zip(members, self.matcher.match_layers(stack, targets)):
                indices[j] = idx
        return indices


SetCriterion = GroundingDINOCriterion
