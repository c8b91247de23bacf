"""Image retrieval by cosine similarity of frozen features: top-k, mAP and recall@k, and a PNG grid.

Definitions (docs/features.md):
* similarity: cosine of the L2-normalised feature rows (float32 matmul, queries in chunks);
* ranking: by similarity, descending; ties keep gallery order (a stable sort);
* a query that is itself in the gallery (the same file) is left out of its own ranking;
* AP of a query: the mean, over its positives (gallery items with its label), of the precision at each
  positive's rank in the full ranking; mAP: the mean AP over the queries that have a label and ≥ 1 positive;
* recall@k: the fraction of those queries with at least one positive among their first k results (the usual
  image-retrieval "R@k").
Labels are strings; None is "unlabelled": such a query is not scored and such a gallery item is never a positive.
"""
import csv
import os
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["cosine_topk", "retrieval_metrics", "labels_from_folders", "labels_from_csv", "self_match_indices",
           "RetrievalResult", "retrieve", "save_retrieval_grid"]

_SIM_ELEMENTS = 1 << 24  # similarity entries per chunk (64 MiB of float32)


def _as_tensor(name: str, x, device=None) -> Tensor:
    t = torch.as_tensor(np.asarray(x) if not isinstance(x, Tensor) else x)
    if t.dim() != 2:
        raise ValueError(f"{name} must be (N, D) features, got shape {tuple(t.shape)}")
    if not t.is_floating_point():
        raise TypeError(f"{name} must be floating point, got {t.dtype}")
    if not torch.isfinite(t).all():
        raise ValueError(f"{name} holds NaN or infinite values")
    return t.to(device=device, dtype=torch.float32)


def _pair(queries, gallery, device) -> Tuple[Tensor, Tensor]:
    q = _as_tensor("queries", queries, device)
    g = _as_tensor("gallery", gallery, device)
    if q.shape[1] != g.shape[1]:
        raise ValueError(f"queries have {q.shape[1]} features per row, the gallery {g.shape[1]}")
    if g.shape[0] == 0:
        raise ValueError("the gallery is empty")
    return F.normalize(q, dim=1), F.normalize(g, dim=1)


def _chunk_rows(gallery_size: int, chunk_size: Optional[int]) -> int:
    return int(chunk_size) if chunk_size else max(1, _SIM_ELEMENTS // max(1, gallery_size))


def _exclusion(exclude, n: int, device) -> Optional[Tensor]:
    if exclude is None:
        return None
    e = torch.as_tensor(exclude, dtype=torch.int64, device=device).view(-1)
    if e.numel() != n:
        raise ValueError(f"exclude must hold one gallery index (or -1) per query: {e.numel()} for {n} queries")
    return e


def _mask_excluded(sims: Tensor, excl: Optional[Tensor]) -> Tensor:
    if excl is None:
        return sims
    rows = torch.nonzero(excl >= 0).view(-1)
    sims[rows, excl[rows]] = float("-inf")
    return sims


@torch.no_grad()
def cosine_topk(queries, gallery, k: int, exclude=None, chunk_size: Optional[int] = None, device=None
                ) -> Tuple[np.ndarray, np.ndarray]:
    """(scores (Q, k') float32, indices (Q, k') int64) of the k most cosine-similar gallery rows per query, best
    first, k' = min(k, G, or G − 1 when some query excludes itself). queries (Q, D), gallery (G, D): arrays or
    tensors. exclude (Q,): a gallery index to leave out per query (-1: none)."""
    if not isinstance(k, int) or k < 1:
        raise ValueError(f"k must be a positive integer, got {k!r}")
    q, g = _pair(queries, gallery, device)
    excl = _exclusion(exclude, q.shape[0], g.device)
    available = g.shape[0] - (1 if excl is not None and bool((excl >= 0).any()) else 0)
    k = min(k, available)
    if k < 1:
        raise ValueError("the gallery holds nothing but the queries themselves")
    scores, indices = [], []
    step = _chunk_rows(g.shape[0], chunk_size)
    for start in range(0, q.shape[0], step):
        sims = _mask_excluded(q[start:start + step] @ g.T, None if excl is None else excl[start:start + step])
        s, i = sims.topk(k, dim=1)
        scores.append(s.cpu())
        indices.append(i.cpu())
    if not scores:
        return np.zeros((0, k), np.float32), np.zeros((0, k), np.int64)
    return torch.cat(scores).numpy(), torch.cat(indices).numpy()


def _label_ids(query_labels: Sequence[Optional[str]], gallery_labels: Sequence[Optional[str]]
               ) -> Tuple[Tensor, Tensor]:
    names = {name: i for i, name in enumerate(sorted({x for x in list(query_labels) + list(gallery_labels)
                                                      if x is not None}))}
    q = torch.tensor([names[x] if x is not None else -1 for x in query_labels], dtype=torch.int64)
    g = torch.tensor([names[x] if x is not None else -2 for x in gallery_labels], dtype=torch.int64)
    return q, g


@torch.no_grad()
def retrieval_metrics(queries, gallery, query_labels: Sequence[Optional[str]],
                      gallery_labels: Sequence[Optional[str]], ks: Sequence[int] = (1, 5, 10), exclude=None,
                      chunk_size: Optional[int] = None, device=None) -> Dict[str, float]:
    """{"mAP", "recall@k" for each k, "scored_queries", "skipped_queries"} (definitions in the module docstring;
    mAP and recall in [0, 1]). queries (Q, D), gallery (G, D); one label per row; exclude as in cosine_topk."""
    q, g = _pair(queries, gallery, device)
    if len(query_labels) != q.shape[0] or len(gallery_labels) != g.shape[0]:
        raise ValueError(f"one label per row is needed: {len(query_labels)} query labels for {q.shape[0]} queries, "
                         f"{len(gallery_labels)} gallery labels for {g.shape[0]} gallery rows")
    ks = sorted({int(k) for k in ks})
    if not ks or ks[0] < 1:
        raise ValueError(f"ks must be positive integers, got {ks}")
    excl = _exclusion(exclude, q.shape[0], g.device)
    q_ids, g_ids = (t.to(g.device) for t in _label_ids(query_labels, gallery_labels))
    ap_sum, hits, scored = 0.0, {k: 0 for k in ks}, 0
    step = _chunk_rows(g.shape[0], chunk_size)
    for start in range(0, q.shape[0], step):
        ids = q_ids[start:start + step]
        positive = ids[:, None] == g_ids[None, :]  # (c, G)
        if excl is not None:
            e = excl[start:start + step]
            rows = torch.nonzero(e >= 0).view(-1)
            positive[rows, e[rows]] = False
        n_pos = positive.sum(1)
        keep = (ids >= 0) & (n_pos > 0)
        if not bool(keep.any()):
            continue
        sims = q[start:start + step][keep] @ g.T
        sims = _mask_excluded(sims, None if excl is None else excl[start:start + step][keep])
        order = torch.sort(sims, dim=1, descending=True, stable=True).indices
        ranked = torch.gather(positive[keep], 1, order).to(torch.float64)  # (c', G) 1 where a positive sits
        ranks = torch.arange(1, g.shape[0] + 1, device=g.device, dtype=torch.float64)
        precision_at_hits = ranked.cumsum(1) / ranks * ranked
        ap_sum += float((precision_at_hits.sum(1) / n_pos[keep].to(torch.float64)).sum())
        for k in ks:
            hits[k] += int((ranked[:, :k].sum(1) > 0).sum())
        scored += int(keep.sum())
    out: Dict[str, float] = {"mAP": ap_sum / scored if scored else float("nan")}
    for k in ks:
        out[f"recall@{k}"] = hits[k] / scored if scored else float("nan")
    out["scored_queries"] = scored
    out["skipped_queries"] = q.shape[0] - scored
    return out


def labels_from_folders(paths: Sequence[str], root: Optional[str] = None) -> List[Optional[str]]:
    """The name of each image's parent folder (None for an image directly in `root`, when root is given)."""
    labels = []
    root_abs = os.path.abspath(root) if root else None
    for p in paths:
        parent = os.path.dirname(os.path.abspath(p))
        labels.append(None if root_abs is not None and parent == root_abs else os.path.basename(parent) or None)
    return labels


def labels_from_csv(csv_path: str, paths: Sequence[str], root: Optional[str] = None) -> List[Optional[str]]:
    """Labels from a CSV of `path,label` rows (a header row `path,label` is allowed); a path is matched as given
    (absolute) or relative to `root`. Images the file does not name get None."""
    if not os.path.isfile(csv_path):
        raise FileNotFoundError(f"labels file {csv_path!r}: no such file")
    table: Dict[str, str] = {}
    with open(csv_path, newline="") as f:
        for n, row in enumerate(csv.reader(f), 1):
            if not row or not "".join(row).strip():
                continue
            if len(row) < 2:
                raise ValueError(f"labels file {csv_path!r} line {n}: expected 'path,label', got {row!r}")
            if n == 1 and [c.strip().lower() for c in row[:2]] == ["path", "label"]:
                continue
            name = row[0].strip()
            full = os.path.normpath(name if os.path.isabs(name) or root is None else os.path.join(root, name))
            table[os.path.abspath(full)] = row[1].strip()
    return [table.get(os.path.abspath(p)) for p in paths]


def self_match_indices(query_paths: Sequence[str], gallery_paths: Sequence[str]) -> Optional[np.ndarray]:
    """For each query the gallery index of the same file (by real path), -1 if none; None when no query is in the
    gallery."""
    where = {os.path.realpath(p): i for i, p in enumerate(gallery_paths)}
    idx = np.array([where.get(os.path.realpath(p), -1) for p in query_paths], dtype=np.int64)
    return idx if (idx >= 0).any() else None


@dataclass
class RetrievalResult:
    scores: np.ndarray  # (Q, k) cosine similarities, best first
    indices: np.ndarray  # (Q, k) gallery rows
    metrics: Optional[Dict[str, float]]  # None without labels
    exclude: Optional[np.ndarray]  # (Q,) gallery index left out per query, or None


def retrieve(queries, gallery, k: int = 10, query_labels: Optional[Sequence[Optional[str]]] = None,
             gallery_labels: Optional[Sequence[Optional[str]]] = None, ks: Sequence[int] = (1, 5, 10),
             query_paths: Optional[Sequence[str]] = None, gallery_paths: Optional[Sequence[str]] = None,
             device=None) -> RetrievalResult:
    """Top-k per query, and metrics when both label lists are given. With paths, a query found in the gallery
    (the same file) is left out of its own ranking."""
    exclude = self_match_indices(query_paths, gallery_paths) if query_paths is not None and \
        gallery_paths is not None else None
    scores, indices = cosine_topk(queries, gallery, k, exclude=exclude, device=device)
    metrics = None
    if query_labels is not None and gallery_labels is not None:
        metrics = retrieval_metrics(queries, gallery, query_labels, gallery_labels, ks, exclude=exclude,
                                    device=device)
    return RetrievalResult(scores, indices, metrics, exclude)


# ---- the picture ---------------------------------------------------------------------------------------------

_GREEN, _RED, _BLUE, _GREY = (40, 170, 60), (210, 40, 40), (40, 90, 200), (150, 150, 150)


def _tile(path: str, size: int):
    from PIL import Image, ImageDraw, ImageOps

    from ..data.imageio import open_rgb

    try:
        return ImageOps.fit(open_rgb(path), (size, size), Image.Resampling.BICUBIC)
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError):
        tile = Image.new("RGB", (size, size), (60, 60, 60))
        ImageDraw.Draw(tile).text((size // 2 - 3, size // 2 - 6), "?", fill=(230, 230, 230))
        return tile


def save_retrieval_grid(out_png: str, query_paths: Sequence[str], gallery_paths: Sequence[str],
                        indices: np.ndarray, scores: np.ndarray, query_labels: Optional[Sequence] = None,
                        gallery_labels: Optional[Sequence] = None, rows: Union[int, Sequence[int]] = 4,
                        k: int = 5, tile: int = 96) -> List[int]:
    """A PNG: one row per query (blue frame), then its top-k results, each framed green (same label) or red
    (other label) when labels are known, grey otherwise, with the similarity written under it. rows: how many
    queries (spread evenly over the query list) or their indices. Returns the query indices drawn."""
    from PIL import Image, ImageDraw

    Q = len(query_paths)
    if Q == 0:
        raise ValueError("no queries to draw")
    if indices.shape[0] != Q:
        raise ValueError(f"indices has {indices.shape[0]} rows for {Q} queries")
    if not isinstance(tile, int) or not 16 <= tile <= 1024:
        raise ValueError(f"tile must be an integer in [16, 1024], got {tile!r}")
    chosen = (sorted({int(round(x)) for x in np.linspace(0, Q - 1, min(int(rows), Q))}) if isinstance(rows, int)
              else [int(r) for r in rows])
    k = max(1, min(int(k), indices.shape[1]))
    border, caption, gap = 4, 14, 10
    cell_w, cell_h = tile + 2 * border, tile + 2 * border + caption
    canvas = Image.new("RGB", (cell_w * (k + 1) + gap + 4, cell_h * len(chosen) + 4), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    labelled = query_labels is not None and gallery_labels is not None
    for r, qi in enumerate(chosen):
        y = 2 + r * cell_h
        cells = [(query_paths[qi], _BLUE, "query")]
        for j in range(k):
            gi = int(indices[qi, j])
            if labelled and query_labels[qi] is not None:
                colour = _GREEN if gallery_labels[gi] == query_labels[qi] else _RED
            else:
                colour = _GREY
            cells.append((gallery_paths[gi], colour, f"{float(scores[qi, j]):.3f}"))
        for c, (path, colour, text) in enumerate(cells):
            x = 2 + c * cell_w + (gap if c else 0)
            draw.rectangle([x, y, x + cell_w - 1, y + tile + 2 * border - 1], fill=colour)
            canvas.paste(_tile(path, tile), (x + border, y + border))
            draw.text((x + border, y + tile + 2 * border), text, fill=(0, 0, 0))
    folder = os.path.dirname(os.path.abspath(out_png))
    os.makedirs(folder, exist_ok=True)
    canvas.save(out_png, format="PNG")
    return chosen
