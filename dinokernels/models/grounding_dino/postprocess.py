"""Grounding DINO post-processing (SPEC §5.7): thresholded detections with phrases (the official `predict`,
batched), class assignment for `predict_with_classes`, and the COCO-evaluation scorer (top-k over query × class).

No NMS, as the official code. Boxes come out xyxy in pixels of the given (h, w) sizes, not clipped."""
from __future__ import annotations

import bisect
import math
from typing import Dict, List, Optional, Sequence

import torch
from torch import Tensor

from ...ops.boxes import box_cxcywh_to_xyxy

__all__ = ["post_process", "extract_phrase", "classes_to_caption", "assign_classes", "coco_style_scores",
           "to_coco_detections"]

# Token columns from this index on never contribute to a phrase (the official right_idx default).
PHRASE_RIGHT_LIMIT = 255


def _check_outputs(fn: str, outputs) -> tuple:
    if not isinstance(outputs, dict) or "pred_logits" not in outputs or "pred_boxes" not in outputs:
        raise ValueError(f"{fn}: argument 'outputs' must be a dict with 'pred_logits' (B, Q, T) and 'pred_boxes' "
                         f"(B, Q, 4)")
    logits, boxes = outputs["pred_logits"], outputs["pred_boxes"]
    if not isinstance(logits, Tensor) or logits.dim() != 3 or not logits.is_floating_point():
        raise ValueError(f"{fn}: outputs['pred_logits'] must be a floating-point (B, Q, T) tensor, got "
                         f"{getattr(logits, 'shape', type(logits).__name__)}")
    B, Q, _ = logits.shape
    if not isinstance(boxes, Tensor) or tuple(boxes.shape) != (B, Q, 4) or not boxes.is_floating_point():
        raise ValueError(f"{fn}: outputs['pred_boxes'] must be a floating-point {(B, Q, 4)} cxcywh tensor, got "
                         f"{getattr(boxes, 'shape', type(boxes).__name__)}")
    if torch.isnan(logits).any() or not torch.isfinite(boxes).all():
        raise ValueError(f"{fn}: outputs contain NaN logits or non-finite boxes")
    return logits.detach(), boxes.detach()


def _scale(fn: str, target_sizes, B: int, device) -> Optional[Tensor]:
    """(B, 2) (h, w) → (B, 4) multipliers [w, h, w, h] (None stays None)."""
    if target_sizes is None:
        return None
    sizes = torch.as_tensor(target_sizes)
    if sizes.dim() != 2 or tuple(sizes.shape) != (B, 2):
        raise ValueError(f"{fn}: argument 'target_sizes' must be (B={B}, 2) as (h, w), got {tuple(sizes.shape)}")
    sizes = sizes.to(device=device, dtype=torch.float32 if not sizes.dtype == torch.float64 else torch.float64)
    if not bool((torch.isfinite(sizes) & (sizes > 0)).all()):
        raise ValueError(f"{fn}: argument 'target_sizes' must hold positive finite (h, w), got {sizes.tolist()}")
    h, w = sizes.unbind(-1)
    return torch.stack([w, h, w, h], dim=-1)


def _input_id_rows(fn: str, input_ids, B: int) -> List[List[int]]:
    if isinstance(input_ids, Tensor):
        if input_ids.dim() == 1:
            input_ids = input_ids[None]
        if input_ids.dim() != 2 or input_ids.is_floating_point():
            raise ValueError(f"{fn}: argument 'input_ids' must be an integer (B, L) tensor, got "
                             f"{tuple(input_ids.shape)} {input_ids.dtype}")
        rows = input_ids.tolist()
    else:
        rows = [list(r) for r in input_ids]
    if len(rows) != B:
        raise ValueError(f"{fn}: argument 'input_ids' has {len(rows)} rows for a batch of {B}")
    return rows


def _delimiter_ids(tokenizer) -> List[int]:
    """[CLS], [SEP] and "." ids resolved through the tokenizer (101, 102, 1012 in BERT's vocab, which the
    official code hard-codes)."""
    ids = [getattr(tokenizer, "cls_token_id", None), getattr(tokenizer, "sep_token_id", None)]
    dot = tokenizer.convert_tokens_to_ids(".")
    if dot is not None and dot != getattr(tokenizer, "unk_token_id", None):
        ids.append(dot)
    return [int(i) for i in ids if i is not None]


def extract_phrase(probs: Tensor, input_ids: Sequence[int], tokenizer, text_threshold: float = 0.25,
                   remove_combined: bool = False, delimiter_ids: Optional[Sequence[int]] = None) -> str:
    """One query's phrase: probs (T,) token probabilities, input_ids (L,) the caption's ids → the decoded tokens with
    p > text_threshold, excluding column 0 and columns ≥ 255 (without remove_combined), "." removed.

    remove_combined: keep only the tokens strictly between the delimiters ([CLS], [SEP], ".") around the argmax
    token (one phrase instead of the concatenation of all tokens above the threshold from different phrases); an
    argmax at or before the first delimiter gives "" (as the official bisect lookup does)."""
    on = probs > text_threshold
    left, right = 0, PHRASE_RIGHT_LIMIT
    if remove_combined:
        special = set(delimiter_ids if delimiter_ids is not None else _delimiter_ids(tokenizer))
        delims = [i for i, t in enumerate(input_ids) if t in special]
        top = int(probs.argmax())
        k = bisect.bisect_left(delims, top)
        if k == 0:
            return ""
        left = delims[k - 1]
        right = delims[k] if k < len(delims) else len(input_ids)
    # Columns past the caption's ids have no token (their logits are −inf in the model's output anyway).
    cols = [i for i in on.nonzero().flatten().tolist() if left < i < right and i < len(input_ids)]
    return tokenizer.decode([int(input_ids[i]) for i in cols]).replace(".", "")


def post_process(outputs: Dict[str, Tensor], target_sizes, tokenizer, input_ids=None, box_threshold: float = 0.35,
                 text_threshold: float = 0.25, remove_combined: bool = False) -> List[Dict[str, object]]:
    """Detections with phrases, per image (the official `predict` + `annotate` box scaling, batched).

    outputs: "pred_logits" (B, Q, T) (−inf past each caption), "pred_boxes" (B, Q, 4) cxcywh in [0, 1];
    target_sizes: (B, 2) (h, w) in pixels; tokenizer: has decode (and, for remove_combined, cls/sep ids and
    convert_tokens_to_ids); input_ids: (B, L) ids of the captions the logits belong to (tensor or lists; default
    outputs["input_ids"], which the model returns).

    A query is kept iff max_t sigmoid(logit) > box_threshold (special-token columns included); its score is that
    max. Returns B dicts in query order (no NMS, no sorting): "boxes" (N, 4) xyxy pixels, "scores" (N,),
    "phrases" list of N strings (see extract_phrase), "query_indices" (N,) int64.
    """
    fn = "post_process"
    logits, boxes = _check_outputs(fn, outputs)
    B = logits.shape[0]
    for name, v in (("box_threshold", box_threshold), ("text_threshold", text_threshold)):
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            raise ValueError(f"{fn}: argument '{name}' must be a finite number, got {v!r}")
    scale = _scale(fn, target_sizes, B, boxes.device)
    if scale is None:
        raise ValueError(f"{fn}: argument 'target_sizes' is required ((B, 2) as (h, w))")
    if input_ids is None:
        input_ids = outputs.get("input_ids")
        if input_ids is None:
            raise ValueError(f"{fn}: argument 'input_ids' is required (or outputs['input_ids'])")
    rows = _input_id_rows(fn, input_ids, B)
    delims = _delimiter_ids(tokenizer) if remove_combined else None
    probs = logits.float().sigmoid()
    scores, _ = probs.max(dim=-1)  # (B, Q)
    results = []
    for b in range(B):
        keep = (scores[b] > box_threshold).nonzero().flatten()
        xyxy = box_cxcywh_to_xyxy(boxes[b, keep].to(scale.dtype)) * scale[b]
        phrases = [extract_phrase(probs[b, q], rows[b], tokenizer, text_threshold, remove_combined, delims)
                   for q in keep.tolist()]
        results.append({"boxes": xyxy, "scores": scores[b, keep], "phrases": phrases,
                        "query_indices": keep.cpu()})
    return results


def classes_to_caption(classes: Sequence[str]) -> str:
    """predict_with_classes' caption: the classes joined by ". ", in the official caption preprocessing's form
    (lower-cased, stripped, "." appended): ["Cat", "dog"] → "cat. dog."."""
    if isinstance(classes, str) or not isinstance(classes, Sequence) or len(classes) == 0:
        raise ValueError(f"classes_to_caption: argument 'classes' must be a non-empty list of strings, got "
                         f"{classes!r}")
    for i, c in enumerate(classes):
        if not isinstance(c, str) or not c.strip():
            raise ValueError(f"classes_to_caption: argument 'classes'[{i}] must be a non-empty string, got {c!r}")
    caption = ". ".join(classes).lower().strip()
    return caption if caption.endswith(".") else caption + "."


def assign_classes(phrases: Sequence[str], classes: Sequence[str]) -> List[Optional[int]]:
    """Class index of every phrase: the first class (in `classes` order) that is a substring of the phrase, or
    None (the official phrases2classes). Compared lower-cased, since the decoded phrases are lower-case (the
    official compares as given, so a class "Cat" never matches)."""
    if isinstance(classes, str) or not isinstance(classes, Sequence):
        raise ValueError(f"assign_classes: argument 'classes' must be a list of strings, got {classes!r}")
    if isinstance(phrases, str) or not isinstance(phrases, Sequence):
        raise ValueError(f"assign_classes: argument 'phrases' must be a list of strings, got {phrases!r}")
    lowered = [c.lower() for c in classes]
    out: List[Optional[int]] = []
    for p in phrases:
        p = p.lower()
        out.append(next((k for k, c in enumerate(lowered) if c and c in p), None))
    return out


def coco_style_scores(outputs: Dict[str, Tensor], positive_maps_normalised: Tensor, top_k: int = 300,
                      target_sizes=None) -> List[Dict[str, Tensor]]:
    """COCO-evaluation detections (official demo/test_ap_on_coco.py): per-class probability =
    sigmoid(logits) · mapᵀ with the (sum + 1e-6)-normalised maps, then the top_k (query, class) pairs per image.

    outputs: "pred_logits" (B, Q, T), "pred_boxes" (B, Q, 4) cxcywh; positive_maps_normalised: (C, T) shared by the
    batch or (B, C, T); target_sizes: optional (B, 2) (h, w) to return pixel boxes. Returns B dicts with "scores"
    (k,) descending, "labels" (k,) class indices in [0, C), "boxes" (k, 4) xyxy (normalised, or pixels), with
    k = min(top_k, Q·C).
    """
    fn = "coco_style_scores"
    logits, boxes = _check_outputs(fn, outputs)
    B, Q, T = logits.shape
    maps = positive_maps_normalised
    if not isinstance(maps, Tensor) or maps.dim() not in (2, 3) or maps.shape[-1] != T or \
            (maps.dim() == 3 and maps.shape[0] != B):
        raise ValueError(f"{fn}: argument 'positive_maps_normalised' must be (C, T={T}) or (B={B}, C, T={T}), got "
                         f"{getattr(maps, 'shape', type(maps).__name__)}")
    if maps.numel() and not bool((torch.isfinite(maps) & (maps >= 0)).all()):
        raise ValueError(f"{fn}: argument 'positive_maps_normalised' must be nonnegative and finite")
    if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1:
        raise ValueError(f"{fn}: argument 'top_k' must be a positive int, got {top_k!r}")
    dtype = torch.float64 if logits.dtype == torch.float64 else torch.float32
    probs = logits.to(dtype).sigmoid()
    maps = maps.to(device=probs.device, dtype=dtype)
    per_class = probs @ maps.transpose(-1, -2)  # (B, Q, C)
    C = per_class.shape[-1]
    scale = _scale(fn, target_sizes, B, boxes.device)
    xyxy = box_cxcywh_to_xyxy(boxes.to(dtype))
    k = min(top_k, Q * C)
    results = []
    for b in range(B):
        scores, flat = per_class[b].reshape(-1).topk(k)  # k = 0 (no class) gives empty results
        queries = torch.div(flat, C, rounding_mode="floor")
        bx = xyxy[b, queries]
        if scale is not None:
            bx = bx * scale[b].to(dtype)
        results.append({"scores": scores, "labels": flat % C, "boxes": bx})
    return results


def to_coco_detections(results: Sequence[Dict[str, Tensor]], image_ids: Sequence[int],
                       category_ids: Optional[Sequence[int]] = None) -> List[Dict[str, object]]:
    """coco_style_scores results (pixel boxes: pass target_sizes) → the COCO results list that pycocotools'
    COCO.loadRes takes: {"image_id", "category_id", "bbox" [x, y, w, h], "score"} per detection. category_ids maps
    the class index to the COCO id (default: index + 1)."""
    fn = "to_coco_detections"
    if len(results) != len(image_ids):
        raise ValueError(f"{fn}: {len(results)} results for {len(image_ids)} image_ids")
    dets: List[Dict[str, object]] = []
    for r, image_id in zip(results, image_ids):
        if not all(k in r for k in ("scores", "labels", "boxes")):
            raise ValueError(f"{fn}: each result needs 'scores', 'labels' and 'boxes' (coco_style_scores' output)")
        for score, label, (x0, y0, x1, y1) in zip(r["scores"].tolist(), r["labels"].tolist(), r["boxes"].tolist()):
            if category_ids is not None and not 0 <= label < len(category_ids):
                raise ValueError(f"{fn}: label {label} has no entry in category_ids ({len(category_ids)})")
            dets.append({"image_id": int(image_id),
                         "category_id": int(category_ids[label]) if category_ids is not None else label + 1,
                         "bbox": [x0, y0, x1 - x0, y1 - y0], "score": float(score)})
    return dets
