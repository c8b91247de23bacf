"""Copy deduplication on embeddings (SPEC §3.12 steps 1-2): a k-NN graph whose edges join pairs with cosine
similarity above a threshold, its connected components, one image kept per component; and removal of pool
images that copy an evaluation image.

The threshold. The paper's 0.6 is for SSCD, a descriptor trained for copy detection; DINO features of a copy and
of its original are much closer than that for some checkpoints and not for others, and distinct photos can exceed
0.6. So the threshold is calibrated per run (`calibrate_threshold`) from two samples measured with the features in
use:

* copy similarities: each of a sample of pool images against synthetic copies of itself made at run time (resized,
  re-encoded as JPEG, cropped, colour-jittered, all combined) — how similar a copy is;
* distinct similarities: each sampled image's most similar *other* pool image below the similarity of its own
  hardest synthetic copy (a neighbour at least as close as the image's own copies is taken for a copy, so real
  duplicates already in the pool do not pollute this sample) — how similar the nearest different image is.

The threshold is the midpoint between the 5th percentile of copy similarities and the 95th percentile of distinct
similarities: robust to a few odd images on either side, and in the middle of the gap when there is one. When the
two overlap the result says so (`separated` False) and the summary warns: such features cannot tell copies from
distinct images at this copy strength, and `--threshold` is the user's call.
"""
from dataclasses import dataclass, field
from typing import Any, Dict, Optional, Sequence

import numpy as np

from .search import knn_search, normalize_rows

__all__ = ["DedupResult", "Calibration", "duplicate_components", "eval_copies", "calibrate_threshold",
           "COPY_QUANTILE", "DISTINCT_QUANTILE"]

COPY_QUANTILE = 0.05  # low end of the copy similarities
DISTINCT_QUANTILE = 0.95  # high end of the distinct-neighbour similarities


@dataclass
class DedupResult:
    """Per row i of the pool (N rows):

    component (N,) int64: component id, numbered by the position of each component's first row (0, 1, ...);
    representative (N,) int64: the row kept for i's component (i itself when kept);
    kept (N,) bool: i is its component's representative;
    similarity (N,) float32: cosine of i to its representative (1 for kept rows);
    edges: pairs joined (similarity above the threshold); info: the search's info."""
    component: np.ndarray
    representative: np.ndarray
    kept: np.ndarray
    similarity: np.ndarray
    edges: int
    info: Dict[str, Any] = field(default_factory=dict)

    @property
    def sizes(self) -> np.ndarray:
        """(components,) rows per component."""
        return np.bincount(self.component)


def _components(n: int, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
    # scipy comes with scikit-learn, a dependency of the package.
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    graph = coo_matrix((np.ones(rows.size, np.int8), (rows, cols)), shape=(n, n)).tocsr()
    _, labels = connected_components(graph, directed=False)
    # Renumber by first occurrence, so ids do not depend on scipy's traversal order.
    _, first = np.unique(labels, return_index=True)
    order = np.argsort(first)
    renumber = np.empty_like(order)
    renumber[order] = np.arange(order.size)
    return renumber[labels].astype(np.int64)


def duplicate_components(x, threshold: float, k: int = 16, *, priority: Optional[np.ndarray] = None,
                         eligible: Optional[np.ndarray] = None, **search_kwargs) -> DedupResult:
    """Deduplicates the rows of x (N, D) (L2-normalised here): each row is joined to those of its k nearest
    neighbours with cosine > threshold; in every connected component one row is kept — the eligible row with the
    smallest priority (default: the row index, so the caller's order decides; ties by index). eligible (N,) bool:
    rows that may be kept (default all); a component without one keeps none. search_kwargs go to knn_search
    (backend, exact_max, nlist, nprobe, pq_bytes, threads, seed); info["recall_above_threshold"] measures how
    many above-threshold pairs an approximate index found."""
    if not np.isfinite(threshold) or not -1.0 <= threshold <= 1.0:
        raise ValueError(f"threshold must be a cosine in [-1, 1], got {threshold!r}")
    x = normalize_rows(x, "x")
    n = x.shape[0]
    priority = np.arange(n) if priority is None else np.asarray(priority)
    eligible = np.ones(n, bool) if eligible is None else np.asarray(eligible, bool)
    if priority.shape != (n,) or eligible.shape != (n,):
        raise ValueError(f"priority and eligible must have shape ({n},), got {priority.shape} and {eligible.shape}")
    if n <= 1:
        return DedupResult(np.zeros(n, np.int64), np.arange(n), eligible.copy(), np.ones(n, np.float32), 0,
                           {"rows": n})
    k = int(min(k, n - 1))
    result = knn_search(x, x, k, exclude_self=True, threshold=threshold, **search_kwargs)
    strong = (result.similarities > threshold) & (result.indices >= 0)
    rows = np.repeat(np.arange(n), k)[strong.ravel()]
    cols = result.indices.ravel()[strong.ravel()]
    component = _components(n, rows, cols)
    # Representative: smallest (not eligible, priority, index) in each component.
    order = np.lexsort((np.arange(n), priority, ~eligible, component))
    first_of = np.ones(n, bool)
    first_of[1:] = component[order][1:] != component[order][:-1]
    rep_of_component = order[first_of]  # components are 0..C-1 in order
    representative = rep_of_component[component]
    kept = (representative == np.arange(n)) & eligible
    similarity = np.einsum("ij,ij->i", x, x[representative]).astype(np.float32)
    similarity[kept] = 1.0
    low, high = np.minimum(rows, cols), np.maximum(rows, cols)
    pairs = np.unique(low * n + high).size  # i→j and j→i are one pair
    return DedupResult(component, representative, kept, similarity, int(pairs), result.info)


def eval_copies(pool, eval_set, threshold: float, **search_kwargs):
    """Pool rows that copy an evaluation image: pool (N, D), eval_set (E, D) → (is_copy (N,) bool, nearest eval
    row (N,) int64, its cosine (N,) float32); is_copy where that cosine > threshold."""
    p = normalize_rows(pool, "pool")
    e = normalize_rows(eval_set, "eval_set")
    if e.shape[0] == 0 or p.shape[0] == 0:
        return np.zeros(p.shape[0], bool), np.full(p.shape[0], -1, np.int64), np.full(p.shape[0], -np.inf, np.float32)
    if e.shape[1] != p.shape[1]:
        raise ValueError(f"eval_set has dimension {e.shape[1]} but the pool has {p.shape[1]}")
    result = knn_search(p, e, 1, **search_kwargs)
    sim, idx = result.similarities[:, 0], result.indices[:, 0]
    return (sim > threshold) & (idx >= 0), idx, sim


@dataclass
class Calibration:
    """threshold; copy_low / distinct_high: the quantiles it is the midpoint of; separated: copy_low >
    distinct_high; the raw samples (copy_similarities per synthetic copy, distinct_similarities per sampled
    image) and the copy kinds' median similarities."""
    threshold: float
    copy_low: float
    distinct_high: float
    separated: bool
    copy_similarities: np.ndarray
    distinct_similarities: np.ndarray
    by_kind: Dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> Dict[str, Any]:
        return {"threshold": round(self.threshold, 6), "copy_low": round(self.copy_low, 6),
                "distinct_high": round(self.distinct_high, 6), "separated": self.separated,
                "copies": int(self.copy_similarities.size), "sampled_images": int(self.distinct_similarities.size),
                "copy_median_by_kind": {k: round(v, 6) for k, v in self.by_kind.items()},
                "rule": f"midpoint of the {COPY_QUANTILE:.0%} quantile of copy similarities and the "
                        f"{DISTINCT_QUANTILE:.0%} quantile of nearest-distinct similarities"}


def calibrate_threshold(pool, sample_rows: Sequence[int], copies, copy_owner: Sequence[int],
                        copy_kind: Optional[Sequence[str]] = None, k: int = 16, **search_kwargs) -> Calibration:
    """Duplicate threshold for these features (module docstring).

    pool (N, D): the pool's embeddings (the space the threshold applies to); sample_rows (S,): pool rows that
    were copied; copies (C, D): embeddings of their synthetic copies; copy_owner (C,): for each copy, its
    position in sample_rows; copy_kind (C,): names of the copy transforms, for the per-kind medians."""
    p = normalize_rows(pool, "pool")
    c = normalize_rows(copies, "copies")
    sample_rows = np.asarray(sample_rows, np.int64)
    copy_owner = np.asarray(copy_owner, np.int64)
    if p.shape[0] < 2:
        raise ValueError(f"calibration needs a pool of at least 2 images, got {p.shape[0]}")
    if sample_rows.size == 0 or c.shape[0] == 0:
        raise ValueError("calibration needs at least one sampled image with a synthetic copy")
    if c.shape[1] != p.shape[1]:
        raise ValueError(f"copies have dimension {c.shape[1]} but the pool has {p.shape[1]}")
    if copy_owner.shape != (c.shape[0],) or copy_owner.min() < 0 or copy_owner.max() >= sample_rows.size:
        raise ValueError("copy_owner must give, for every copy, a position in sample_rows")
    if sample_rows.min() < 0 or sample_rows.max() >= p.shape[0]:
        raise ValueError(f"sample_rows must index the pool's {p.shape[0]} rows")
    originals = p[sample_rows]
    copy_sims = np.einsum("ij,ij->i", c, originals[copy_owner]).astype(np.float32)
    hardest = np.full(sample_rows.size, np.inf, np.float32)
    np.minimum.at(hardest, copy_owner, copy_sims)
    has_copy = np.isfinite(hardest)
    k = int(min(k, p.shape[0] - 1))
    # Neighbours of the sampled rows among all pool rows; the row itself is dropped below.
    found = knn_search(originals, p, k + 1, **search_kwargs)
    distinct = []
    for s in np.flatnonzero(has_copy):
        sims, idxs = found.similarities[s], found.indices[s]
        other = (idxs != sample_rows[s]) & (idxs >= 0) & (sims < hardest[s])
        if other.any():
            distinct.append(float(sims[other].max()))
    distinct_sims = np.asarray(distinct, np.float32)
    copy_low = float(np.quantile(copy_sims, COPY_QUANTILE))
    if distinct_sims.size:
        distinct_high = float(np.quantile(distinct_sims, DISTINCT_QUANTILE))
    else:  # every neighbour looked like a copy: nothing to separate from, stay just below the copies
        distinct_high = copy_low
    threshold = 0.5 * (copy_low + distinct_high)
    by_kind: Dict[str, float] = {}
    if copy_kind is not None:
        kinds = np.asarray(list(copy_kind))
        for kind in dict.fromkeys(kinds.tolist()):
            by_kind[kind] = float(np.median(copy_sims[kinds == kind]))
    return Calibration(float(threshold), copy_low, distinct_high, copy_low > distinct_high, copy_sims,
                       distinct_sims, by_kind)
