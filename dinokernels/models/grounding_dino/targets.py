"""Grounding DINO training and evaluation targets from captions (SPEC §5.7, §5.8).

- `build_caption`: an Open-GroundingDino object-detection caption, positives plus random negatives (at most
  `max_names` names in all), shuffled, " . "-joined with a trailing " .", and the character span of every name.
- `name_spans`: the character span of the first occurrence of each name in a given caption.
- `positive_map_from_spans`: character spans → (G, max_text_len) 0/1 token maps from the tokenizer's offsets.
- `normalize_positive_map`: the COCO-evaluation form, each row divided by (its sum + 1e-6).
- `targets_with_positive_maps`: data-set targets with "positive_spans" → criterion targets with "positive_map".
"""
from __future__ import annotations

import random
import re
from typing import Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from torch import Tensor

__all__ = ["build_caption", "name_spans", "positive_map_from_spans", "normalize_positive_map",
           "targets_with_positive_maps"]

Span = Tuple[int, int]
RNG = Union[random.Random, np.random.Generator, int, None]


def _as_rng(rng: RNG, fn: str):
    if rng is None or (isinstance(rng, int) and not isinstance(rng, bool)):
        return random.Random(rng)
    if isinstance(rng, (random.Random, np.random.Generator)):
        return rng
    raise TypeError(f"{fn}: argument 'rng' must be a random.Random, a numpy Generator, an int seed or None, got "
                    f"{type(rng).__name__}")


def _randint(rng, high: int) -> int:
    """Uniform integer in [0, high]."""
    if isinstance(rng, np.random.Generator):
        return int(rng.integers(0, high + 1))
    return rng.randint(0, high)


def _check_names(fn: str, arg: str, names) -> List[str]:
    if isinstance(names, str) or not isinstance(names, Sequence):
        raise TypeError(f"{fn}: argument '{arg}' must be a sequence of strings, got {type(names).__name__}")
    out = []
    for i, n in enumerate(names):
        if not isinstance(n, str):
            raise TypeError(f"{fn}: argument '{arg}'[{i}] must be a string, got {type(n).__name__}")
        if not n.strip():
            raise ValueError(f"{fn}: argument '{arg}'[{i}] is empty")
        if "." in n:
            # "." is the phrase delimiter of the caption (and of the sub-sentence mask).
            raise ValueError(f"{fn}: argument '{arg}'[{i}] = {n!r} contains '.', the caption's delimiter")
        out.append(n)
    return out


def build_caption(positive_names: Sequence[str], negative_names: Sequence[str], rng: RNG = None,
                  max_names: int = 50) -> Tuple[str, Dict[str, Span]]:
    """Open-GroundingDino's detection caption: every positive name, plus min(#negatives, max_names − #positives)
    negatives sampled without replacement, shuffled, joined by " . " with a trailing " ." (SPEC §5.8).

    positive_names: the categories present in the image (duplicates are merged, all are kept even beyond
    max_names); negative_names: candidates for absent categories (names also in positive_names are ignored).
    rng: random.Random, numpy Generator, int seed or None (fresh). Returns (caption, spans) with spans[name] =
    (begin, end) character span of the name in the caption (end exclusive), for every name in the caption.
    """
    fn = "build_caption"
    pos = list(dict.fromkeys(_check_names(fn, "positive_names", positive_names)))
    neg = [n for n in dict.fromkeys(_check_names(fn, "negative_names", negative_names)) if n not in set(pos)]
    if isinstance(max_names, bool) or not isinstance(max_names, int) or max_names < 0:
        raise ValueError(f"{fn}: argument 'max_names' must be a nonnegative int, got {max_names!r}")
    if not pos and not neg:
        raise ValueError(f"{fn}: no names: positive_names and negative_names are both empty")
    rng = _as_rng(rng, fn)
    num_neg = max(0, min(len(neg), max_names - len(pos)))
    names = pos + _sample(rng, neg, num_neg)
    # Fisher-Yates from the back, as Open-GroundingDino shuffles.
    for i in range(len(names) - 1, 0, -1):
        j = _randint(rng, i)
        names[i], names[j] = names[j], names[i]
    spans: Dict[str, Span] = {}
    pieces, at = [], 0
    for k, name in enumerate(names):
        if k:
            pieces.append(" . ")
            at += 3
        spans[name] = (at, at + len(name))
        pieces.append(name)
        at += len(name)
    caption = "".join(pieces) + " ."
    return caption, spans


def _sample(rng, items: List[str], k: int) -> List[str]:
    if k == 0:
        return []
    if isinstance(rng, np.random.Generator):
        return [items[i] for i in rng.choice(len(items), size=k, replace=False)]
    return rng.sample(items, k)


def name_spans(caption: str, names: Sequence[str]) -> List[Optional[Span]]:
    """Character span (begin, end) of the first whole-word occurrence of each name in caption (case-insensitive,
    as the BERT tokenizer lower-cases), or None where the name does not occur."""
    fn = "name_spans"
    if not isinstance(caption, str):
        raise TypeError(f"{fn}: argument 'caption' must be a string, got {type(caption).__name__}")
    out: List[Optional[Span]] = []
    for i, name in enumerate(names):
        if not isinstance(name, str) or not name.strip():
            raise ValueError(f"{fn}: argument 'names'[{i}] must be a non-empty string, got {name!r}")
        m = re.search(r"(?<!\w)" + re.escape(name) + r"(?!\w)", caption, flags=re.IGNORECASE)
        out.append((m.start(), m.end()) if m else None)
    return out


def _offsets_tensor(fn: str, offsets) -> Tensor:
    t = torch.as_tensor(offsets)
    if t.dim() != 2 or t.shape[1] != 2:
        raise ValueError(f"{fn}: argument 'offsets' must be (T, 2) character spans of the tokens, got shape "
                         f"{tuple(t.shape)}")
    if t.is_floating_point() or t.is_complex() or t.dtype == torch.bool:
        raise TypeError(f"{fn}: argument 'offsets' must hold integers, got {t.dtype}")
    t = t.to(torch.int64)
    if t.numel() and bool(((t < 0) | (t[:, 1:] < t[:, :1])).any()):
        raise ValueError(f"{fn}: argument 'offsets' must hold spans 0 <= begin <= end")
    return t


def positive_map_from_spans(offsets, spans: Sequence, max_text_len: int = 256) -> Tensor:
    """Token maps of targets: offsets (T, 2) character spans of the caption's tokens (the tokenizer's
    offset_mapping; special and padding tokens have empty spans (0, 0)), spans: per target a (begin, end)
    character span or a list of them (end exclusive; None or [] = not in the caption) → (G, max_text_len)
    float32 0/1 map, 1 on every token whose characters overlap a span of the target (SPEC §5.8).

    Tokens at index ≥ max_text_len (truncated away) are dropped, so a name cut off by truncation gets fewer or
    no tokens (an all-zero row). The official code maps each span's first and last character to tokens
    (char_to_token, retrying ±2 characters); for spans that start and end inside words both give the same tokens.
    """
    fn = "positive_map_from_spans"
    if isinstance(max_text_len, bool) or not isinstance(max_text_len, int) or max_text_len < 1:
        raise ValueError(f"{fn}: argument 'max_text_len' must be a positive int, got {max_text_len!r}")
    off = _offsets_tensor(fn, offsets)[:max_text_len]
    if isinstance(spans, (str, bytes)) or not isinstance(spans, Sequence):
        raise TypeError(f"{fn}: argument 'spans' must be a sequence (one entry per target), got "
                        f"{type(spans).__name__}")
    G = len(spans)
    out = torch.zeros(G, max_text_len, dtype=torch.float32)
    begin, end = off[:, 0], off[:, 1]
    nonempty = end > begin
    for g, s in enumerate(spans):
        for b, e in _target_spans(fn, g, s):
            hit = nonempty & (begin < e) & (end > b)
            out[g, :off.shape[0]][hit] = 1.0
    return out


def _target_spans(fn: str, g: int, s) -> List[Span]:
    if s is None:
        return []
    if isinstance(s, Tensor):
        s = s.tolist()
    if isinstance(s, Sequence) and len(s) == 2 and all(isinstance(v, int) and not isinstance(v, bool) for v in s):
        s = [s]
    if not isinstance(s, Sequence):
        raise TypeError(f"{fn}: argument 'spans'[{g}] must be (begin, end), a list of them or None, got {s!r}")
    out = []
    for p in s:
        if not (isinstance(p, Sequence) and len(p) == 2 and
                all(isinstance(v, int) and not isinstance(v, bool) for v in p)):
            raise TypeError(f"{fn}: argument 'spans'[{g}] must be (begin, end), a list of them or None, got {s!r}")
        if not 0 <= p[0] < p[1]:
            raise ValueError(f"{fn}: argument 'spans'[{g}] has span {tuple(p)}; need 0 <= begin < end")
        out.append((int(p[0]), int(p[1])))
    return out


def normalize_positive_map(positive_map: Tensor) -> Tensor:
    """(G, T) token maps → each row divided by (its sum + 1e-6), as the COCO evaluation of the official repo
    (demo/test_ap_on_coco.py) builds them (an all-zero row stays zero)."""
    fn = "normalize_positive_map"
    if not isinstance(positive_map, Tensor) or positive_map.dim() != 2:
        raise ValueError(f"{fn}: argument 'positive_map' must be a (G, T) tensor, got "
                         f"{getattr(positive_map, 'shape', type(positive_map).__name__)}")
    m = positive_map.float() if not positive_map.is_floating_point() else positive_map
    if m.numel() and not bool(((m >= 0) & torch.isfinite(m)).all()):
        raise ValueError(f"{fn}: argument 'positive_map' must be nonnegative and finite")
    return m / (m.sum(-1, keepdim=True) + 1e-6)


def targets_with_positive_maps(targets: Sequence[Dict], offset_mapping, max_text_len: int = 256,
                               device=None) -> List[Dict]:
    """Adds "positive_map" (G, max_text_len) float32 to each target from its "positive_spans" (G character spans
    in the caption, e.g. from SyntheticShapes) and the tokenizer's offsets of that caption.

    offset_mapping: per image a (T_i, 2) list/tensor, or one (B, T, 2) tensor (padding rows (0, 0)); the captions
    must be tokenised exactly as given (the official preprocessing leaves " ."-terminated lower-case captions
    unchanged). Returns shallow copies (boxes moved to `device` when given); the inputs are not modified."""
    fn = "targets_with_positive_maps"
    if isinstance(targets, dict) or not isinstance(targets, Sequence):
        raise TypeError(f"{fn}: argument 'targets' must be a list of dicts, got {type(targets).__name__}")
    if isinstance(offset_mapping, Tensor):
        if offset_mapping.dim() != 3:
            raise ValueError(f"{fn}: argument 'offset_mapping' must be (B, T, 2) or a list of (T_i, 2), got shape "
                             f"{tuple(offset_mapping.shape)}")
        offset_mapping = list(offset_mapping)
    if len(offset_mapping) != len(targets):
        raise ValueError(f"{fn}: {len(offset_mapping)} offset mappings for {len(targets)} targets")
    out = []
    for i, (t, off) in enumerate(zip(targets, offset_mapping)):
        if not isinstance(t, dict) or "positive_spans" not in t or "boxes" not in t:
            raise ValueError(f"{fn}: targets[{i}] must be a dict with 'boxes' and 'positive_spans'")
        spans = t["positive_spans"]
        if len(spans) != len(t["boxes"]):
            raise ValueError(f"{fn}: targets[{i}] has {len(t['boxes'])} boxes but {len(spans)} positive_spans")
        new = dict(t)
        new["positive_map"] = positive_map_from_spans(off, spans, max_text_len)
        if device is not None:
            new["boxes"] = t["boxes"].to(device)
            new["positive_map"] = new["positive_map"].to(device)
        out.append(new)
    return out
