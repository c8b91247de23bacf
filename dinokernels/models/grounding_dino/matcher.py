"""Hungarian matcher of Grounding DINO training (SPEC §5.8, §6): DETR's interface, the Open-GroundingDino / HF
token-level focal class cost, and every decoder layer of a batch matched in one cost kernel and one batched
assignment solve (DETR-style code runs cost + scipy once per layer and image: 7 × B solves per step)."""
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

from ... import _config
from ...ops.linear_sum_assignment import linear_sum_assignment_padded
from ...ops.matching_cost import matching_cost

Indices = List[Tuple[Tensor, Tensor]]


def _all_finite(t: Tensor) -> bool:
    # A sum is ~30x cheaper than isfinite().all() on the CPU; only a non-finite sum (NaN/inf, or an overflow of
    # huge finite values) needs the exact test.
    return bool(torch.isfinite(t.sum())) or bool(torch.isfinite(t).all())


def _target_boxes(i: int, boxes) -> Tensor:
    """Target i's "boxes" as a (G, 4) float tensor, or a ValueError naming the target and what is wrong (a flat
    (4·G,) tensor is refused rather than reshaped: the layout it came in is unknown)."""
    b = torch.as_tensor(boxes)
    if b.numel() == 0 and b.dim() == 1:
        b = b.reshape(0, 4)  # an image without targets, as torch.tensor([]) or torch.zeros(0)
    if b.dim() != 2 or b.shape[1] != 4:
        raise ValueError(f"HungarianMatcher: target {i}'s 'boxes' must be (G, 4) (cx, cy, w, h), got shape "
                         f"{tuple(b.shape)}")
    if not b.is_floating_point():
        b = b.to(torch.float32)
    if b.numel():
        bad = ~torch.isfinite(b).all(-1) | (b[:, 2] < 0) | (b[:, 3] < 0)
        if bool(bad.any()):
            j = int(bad.nonzero()[0, 0])
            raise ValueError(f"HungarianMatcher: target {i}'s 'boxes' must be finite (cx, cy, w, h) with w, h >= 0; "
                             f"box {j} is {[float(v) for v in b[j]]}")
    return b


def _target_labels(i: int, key: str, labels, count: int, num_classes: int) -> Tensor:
    """Target i's class labels as int64 indices into the label map, or a ValueError naming the target: labels
    must be integers (1.7 is not truncated), one per box, in [0, num_classes) (−1 does not wrap around)."""
    lab = torch.as_tensor(labels)
    if lab.is_floating_point() or lab.is_complex() or lab.dtype == torch.bool:
        raise ValueError(f"HungarianMatcher: target {i}'s '{key}' must be integer class indices, got dtype "
                         f"{lab.dtype}")
    if lab.dim() != 1 or lab.shape[0] != count:
        raise ValueError(f"HungarianMatcher: target {i}'s '{key}' must be ({count},), one per box, got shape "
                         f"{tuple(lab.shape)}")
    lab = lab.long()
    if lab.numel():
        bad = (lab < 0) | (lab >= num_classes)
        if bool(bad.any()):
            j = int(bad.nonzero()[0, 0])
            raise ValueError(f"HungarianMatcher: target {i}'s '{key}' must be in [0, {num_classes}) (the label_map "
                             f"has {num_classes} classes); label {j} is {int(lab[j])}")
    return lab


class HungarianMatcher(nn.Module):
    """Optimal one-to-one matching of predictions to targets, per image.

    Cost (dinokernels.ops.matching_cost): cost_class · mean over the target's positive tokens of the focal
    (pos − neg) + cost_bbox · L1(cxcywh) − cost_giou · GIoU. Defaults 1 / 5 / 2 are Open-GroundingDino's and HF's
    (SPEC §5.8; mmdetection uses class 2.0 with a summed cost, DINO/Deformable-DETR's per-class focal cost 2.0).

    Targets: a list of B dicts with "boxes" (G, 4) cxcywh in [0, 1] and either "positive_map" (G, T') bool or
    nonnegative float (token weights of each target; T' ≤ T, zero-padded) or "labels" / "class_labels" (G,)
    indexing a `label_map` (num_classes, T') passed to forward (Open-GroundingDino's convention).

    Returns DETR's format: per image (query indices, target indices), int64 CPU tensors of length min(Q, G),
    query indices ascending. NaN in the cost raises ValueError (Open-GroundingDino maps it to 0, HF to the dtype
    max; a NaN prediction is a training bug worth seeing).
    """

    def __init__(self, cost_class: float = 1.0, cost_bbox: float = 5.0, cost_giou: float = 2.0,
                 focal_alpha: float = 0.25, focal_gamma: float = 2.0):
        super().__init__()
        if cost_class == 0 and cost_bbox == 0 and cost_giou == 0:
            raise ValueError("HungarianMatcher: all costs are 0")
        self.cost_class, self.cost_bbox, self.cost_giou = float(cost_class), float(cost_bbox), float(cost_giou)
        self.focal_alpha, self.focal_gamma = float(focal_alpha), float(focal_gamma)

    def extra_repr(self) -> str:
        return (f"cost_class={self.cost_class}, cost_bbox={self.cost_bbox}, cost_giou={self.cost_giou}, "
                f"focal_alpha={self.focal_alpha}, focal_gamma={self.focal_gamma}")

    @torch.no_grad()
    def forward(self, outputs: Dict[str, Tensor], targets: Sequence[Dict[str, Tensor]],
                label_map: Optional[Tensor] = None):
        """outputs {"pred_logits": (B, Q, T), "pred_boxes": (B, Q, 4)} → list of B (query idx, target idx).
        With a leading layer dimension, (L, B, Q, T) and (L, B, Q, 4), → list of L such lists, in one solve."""
        logits, boxes = outputs["pred_logits"], outputs["pred_boxes"]
        if logits.dim() == 4:
            return self._match(logits, boxes, targets, label_map)
        if logits.dim() != 3:
            raise ValueError(f"HungarianMatcher: pred_logits must be (B, Q, T) or (L, B, Q, T), got "
                             f"{tuple(logits.shape)}")
        return self._match(logits[None], boxes[None], targets, label_map)[0]

    @torch.no_grad()
    def match_layers(self, outputs_list: Sequence[Dict[str, Tensor]], targets: Sequence[Dict[str, Tensor]],
                     label_map: Optional[Tensor] = None) -> List[Indices]:
        """Every layer's outputs (decoder layers, encoder: same B, Q and T) → one list of indices per layer, from
        one matching_cost call and one batched assignment solve."""
        if len(outputs_list) == 0:
            return []
        logits = torch.stack([o["pred_logits"] for o in outputs_list])
        boxes = torch.stack([o["pred_boxes"] for o in outputs_list])
        return self._match(logits, boxes, targets, label_map)

    def pad_targets(self, targets: Sequence[Dict[str, Tensor]], num_tokens: int, device: torch.device,
                    label_map: Optional[Tensor] = None,
                    dtype: torch.dtype = torch.float32) -> Tuple[Tensor, Tensor, Tensor]:
        """targets → tgt_boxes (B, G, 4), positive_map (B, G, T) in `dtype` (float32, or float64 to match float64
        predictions), counts (B,) int64 CPU, with G = the largest target count (the rest zero padding)."""
        B = len(targets)
        maps, boxes = [], []
        if label_map is not None and (not isinstance(label_map, Tensor) or label_map.dim() != 2):
            raise ValueError(f"HungarianMatcher: label_map must be a (num_classes, T') tensor, got "
                             f"{tuple(label_map.shape) if isinstance(label_map, Tensor) else type(label_map).__name__}")
        for i, t in enumerate(targets):
            if not isinstance(t, dict) or "boxes" not in t:
                raise ValueError(f"HungarianMatcher: target {i} must be a dict with 'boxes' (G, 4) cxcywh")
            b = _target_boxes(i, t["boxes"])
            if "positive_map" in t:
                m = torch.as_tensor(t["positive_map"])
            else:
                key = "labels" if "labels" in t else "class_labels" if "class_labels" in t else None
                if key is None or label_map is None:
                    raise ValueError(f"HungarianMatcher: target {i} needs 'positive_map', or 'labels' with a "
                                     f"label_map passed to forward")
                m = label_map[_target_labels(i, key, t[key], b.shape[0], label_map.shape[0]).to(label_map.device)]
            if m.dim() != 2 or m.shape[0] != b.shape[0]:
                raise ValueError(f"HungarianMatcher: target {i}'s positive map must be (G={b.shape[0]}, T'), got "
                                 f"{tuple(m.shape)}")
            if m.shape[1] > num_tokens:
                raise ValueError(f"HungarianMatcher: target {i}'s positive map has {m.shape[1]} tokens, the "
                                 f"predictions {num_tokens}")
            boxes.append(b)
            maps.append(m)
        counts = torch.tensor([b.shape[0] for b in boxes], dtype=torch.int64)
        G = int(counts.max()) if B else 0
        tgt_boxes = torch.zeros(B, G, 4, device=device, dtype=dtype)
        positive_map = torch.zeros(B, G, num_tokens, device=device, dtype=dtype)
        for i, (b, m) in enumerate(zip(boxes, maps)):
            if b.shape[0]:
                tgt_boxes[i, :b.shape[0]] = b.to(device, dtype)
                positive_map[i, :b.shape[0], :m.shape[1]] = m.to(device, dtype)
        return tgt_boxes, positive_map, counts

    def _match(self, logits: Tensor, boxes: Tensor, targets, label_map) -> List[Indices]:
        L, B, Q, T = logits.shape
        if tuple(boxes.shape) != (L, B, Q, 4):
            raise ValueError(f"HungarianMatcher: pred_boxes must be {(L, B, Q, 4)}, got {tuple(boxes.shape)}")
        if len(targets) != B:
            raise ValueError(f"HungarianMatcher: {len(targets)} targets for a batch of {B}")
        if _config.check_finite():
            # Checked here so that every device and backend raises alike (the CPU cost kernel skips tokens no
            # target uses; a +inf box would otherwise surface as an "infeasible" assignment).
            for name, t in (("pred_logits", logits), ("pred_boxes", boxes)):
                if not _all_finite(t):
                    raise ValueError(f"HungarianMatcher: {name} contains NaN or inf")
        dtype = torch.float64 if logits.dtype == torch.float64 else torch.float32
        tgt_boxes, positive_map, counts = self.pad_targets(targets, T, logits.device, label_map, dtype)
        G = tgt_boxes.shape[1]
        counts_l = counts.repeat(L)
        cost = matching_cost(logits.reshape(L * B, Q, T), boxes.reshape(L * B, Q, 4),
                             tgt_boxes[None].expand(L, B, G, 4).reshape(L * B, G, 4),
                             positive_map[None].expand(L, B, G, T).reshape(L * B, G, T), counts_l,
                             cost_class=self.cost_class, cost_bbox=self.cost_bbox, cost_giou=self.cost_giou,
                             alpha=self.focal_alpha, gamma=self.focal_gamma)
        rows, cols, k = linear_sum_assignment_padded(cost, num_rows=Q, num_cols=counts_l)
        rows, cols, k = rows.cpu(), cols.cpu(), k.tolist()
        return [[(rows[l * B + b, :k[l * B + b]], cols[l * B + b, :k[l * B + b]]) for b in range(B)]
                for l in range(L)]
