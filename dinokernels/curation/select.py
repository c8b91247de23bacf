"""Retrieval of pool images close to a curated set (SPEC §3.12 step 3), on embeddings.

Two ways, as in the paper: for a large curated set, the N nearest pool images of every curated image
(`retrieve_nearest`, N = 4 in the paper); for a small one, k-means on the pool and, for each curated image, M pool
images from the cluster it falls in (`retrieve_by_clusters`; here the M of that cluster nearest to the curated
image, or the whole cluster). Only candidate rows (the pool after deduplication) can be retrieved.
"""
from dataclasses import dataclass, field
from typing import Any, Dict, Optional

import numpy as np

from .search import assign_clusters, kmeans, knn_search, normalize_rows

__all__ = ["Selection", "retrieve_nearest", "retrieve_by_clusters"]


@dataclass
class Selection:
    """Per pool row (N rows): selected (N,) bool; similarity (N,) float32: cosine to the curated image that
    retrieved it (the best one; NaN when not selected); query (N,) int64: that curated row (−1); cluster (N,)
    int64: k-means cluster of every pool row (−1 without clustering); info."""
    selected: np.ndarray
    similarity: np.ndarray
    query: np.ndarray
    cluster: np.ndarray
    info: Dict[str, Any] = field(default_factory=dict)


def _prepare(pool, curated, candidates):
    p = normalize_rows(pool, "pool")
    q = normalize_rows(curated, "curated")
    if q.shape[0] and q.shape[1] != p.shape[1]:
        raise ValueError(f"curated has dimension {q.shape[1]} but the pool has {p.shape[1]}")
    cand = np.ones(p.shape[0], bool) if candidates is None else np.asarray(candidates, bool)
    if cand.shape != (p.shape[0],):
        raise ValueError(f"candidates must have shape ({p.shape[0]},), got {cand.shape}")
    return p, q, cand


def _record(selection: Selection, rows: np.ndarray, sims: np.ndarray, query: int) -> None:
    better = ~selection.selected[rows] | (sims > selection.similarity[rows])
    rows, sims = rows[better], sims[better]
    selection.selected[rows] = True
    selection.similarity[rows] = sims
    selection.query[rows] = query


def _empty(n: int) -> Selection:
    return Selection(np.zeros(n, bool), np.full(n, np.nan, np.float32), np.full(n, -1, np.int64),
                     np.full(n, -1, np.int64))


def retrieve_nearest(pool, curated, per_image: int = 4, candidates: Optional[np.ndarray] = None,
                     **search_kwargs) -> Selection:
    """The `per_image` nearest candidate pool rows (cosine) of every curated row; pool (N, D), curated (C, D),
    candidates (N,) bool. search_kwargs go to knn_search (approximate above its exact_max rows; the recall is in
    info["search"])."""
    if not isinstance(per_image, (int, np.integer)) or isinstance(per_image, bool) or per_image < 1:
        raise ValueError(f"per_image must be a positive integer, got {per_image!r}")
    p, q, cand = _prepare(pool, curated, candidates)
    selection = _empty(p.shape[0])
    rows = np.flatnonzero(cand)
    selection.info = {"mode": "nearest", "per_image": int(per_image), "candidates": int(rows.size)}
    if rows.size == 0 or q.shape[0] == 0:
        return selection
    k = int(min(per_image, rows.size))
    found = knn_search(q, p[rows], k, **search_kwargs)
    ok = found.indices >= 0
    pool_rows = rows[found.indices[ok]]
    sims = found.similarities[ok]
    queries = np.nonzero(ok)[0]
    # Per pool row the best similarity, ties to the first curated row: sort by (row, -similarity, query).
    order = np.lexsort((queries, -sims, pool_rows))
    first = np.ones(order.size, bool)
    first[1:] = pool_rows[order][1:] != pool_rows[order][:-1]
    best = order[first]
    selection.selected[pool_rows[best]] = True
    selection.similarity[pool_rows[best]] = sims[best]
    selection.query[pool_rows[best]] = queries[best]
    selection.info["search"] = found.info
    return selection


def retrieve_by_clusters(pool, curated, clusters: int, per_image: Optional[int] = None,
                         candidates: Optional[np.ndarray] = None, *, niter: int = 20, seed: int = 0,
                         backend: str = "auto", threads: Optional[int] = None) -> Selection:
    """k-means with `clusters` clusters on the candidate pool rows; each curated row falls in its nearest
    cluster and retrieves the `per_image` candidate rows of that cluster nearest to it (all of them when None).
    Every pool row (candidates or not) gets its cluster in Selection.cluster."""
    if per_image is not None and (not isinstance(per_image, (int, np.integer)) or isinstance(per_image, bool)
                                  or per_image < 1):
        raise ValueError(f"per_image must be a positive integer or None, got {per_image!r}")
    p, q, cand = _prepare(pool, curated, candidates)
    selection = _empty(p.shape[0])
    rows = np.flatnonzero(cand)
    if not isinstance(clusters, (int, np.integer)) or isinstance(clusters, bool) or clusters < 1:
        raise ValueError(f"clusters must be a positive integer, got {clusters!r}")
    if clusters > rows.size:
        raise ValueError(f"clusters={clusters} exceeds the {rows.size} pool images left after deduplication")
    centroids, cand_assign, km_info = kmeans(p[rows], int(clusters), niter=niter, seed=seed, backend=backend,
                                             threads=threads)
    selection.cluster[rows] = cand_assign
    others = np.flatnonzero(~cand)
    if others.size:
        selection.cluster[others] = assign_clusters(p[others], centroids, backend=backend)
    selection.info = {"mode": "clusters", "clusters": int(clusters), "per_image": per_image,
                      "candidates": int(rows.size), "kmeans": km_info}
    if q.shape[0] == 0:
        selection.info["curated_clusters"] = 0
        return selection
    query_cluster = assign_clusters(q, centroids, backend=backend)
    members = {c: rows[cand_assign == c] for c in np.unique(query_cluster)}
    for i, c in enumerate(query_cluster):
        m = members[c]
        if m.size == 0:
            continue
        sims = p[m] @ q[i]
        if per_image is not None and per_image < m.size:
            top = np.argsort(-sims, kind="stable")[:per_image]
            m, sims = m[top], sims[top]
        _record(selection, m, sims.astype(np.float32), i)
    selection.info["curated_clusters"] = int(len(members))
    selection.info["query_cluster"] = query_cluster
    return selection
