"""k-NN search and k-means on L2-normalised embeddings, through faiss when it is installed.

Similarity is the inner product, i.e. cosine for unit rows (`normalize_rows`). Index choice:

* at most `exact_max` database rows (default 20,000): exact search (`faiss.IndexFlatIP`);
* more: an inverted-file index (`IndexIVFFlat`, or `IndexIVFPQ` with `pq_bytes`) with `nlist` ≈ 4·√N lists,
  trained on a sample, searched with `nprobe` lists; the recall of its neighbours against exact search is
  measured on a sample of queries and returned with the result (`SearchResult.info["recall"]`).

faiss GPU indexes are used when faiss reports GPUs (`faiss.get_num_gpus() > 0`, a faiss-gpu build).

Fallback without faiss (or with DINOKERNELS_CURATION_BACKEND=torch, or backend="torch"): exact search with
chunked matrix products and top-k in torch (k = 1 goes through the package's `nearest_neighbors` kernel, which
never forms the similarity matrix), and spherical k-means (k-means++ seeding, Lloyd iterations) assigning through
the same kernel. The fallback is exact, so its cost is O(queries × database): fine for tens of thousands of
images, not for millions.
"""
import math
import os
from dataclasses import dataclass, field
from typing import Any, Dict, Optional, Tuple

import numpy as np

__all__ = ["BACKEND_ENV", "EXACT_MAX", "SearchResult", "available_backend", "normalize_rows", "knn_search",
           "exact_knn", "measure_recall", "kmeans", "assign_clusters"]

BACKEND_ENV = "DINOKERNELS_CURATION_BACKEND"  # "faiss", "torch" or "auto" (default)
EXACT_MAX = 20_000  # database rows up to which search is exact (a flat index)
KMEANS_PP_MAX = 4096  # k-means++ seeding up to this many clusters
_CHUNK_BYTES = 128 << 20  # similarity block of the torch fallback


def _faiss():
    try:
        import faiss  # noqa: F401
    except ImportError:
        return None
    return faiss


def available_backend(backend: str = "auto") -> str:
    """"faiss" or "torch": `backend`, or for "auto" the environment variable DINOKERNELS_CURATION_BACKEND, else
    faiss when it imports. Asking for faiss without it raises ImportError with the install hint."""
    if backend == "auto":
        backend = os.environ.get(BACKEND_ENV, "auto").strip().lower() or "auto"
    if backend not in ("auto", "faiss", "torch"):
        raise ValueError(f"backend must be 'auto', 'faiss' or 'torch' (also via {BACKEND_ENV}), got {backend!r}")
    if backend == "auto":
        return "faiss" if _faiss() is not None else "torch"
    if backend == "faiss" and _faiss() is None:
        raise ImportError("faiss is not installed: pip install faiss-cpu (or dinokernels[curation]), or use the "
                          "torch fallback (backend='torch')")
    return backend


def _as_matrix(x, name: str) -> np.ndarray:
    a = np.asarray(x)
    if a.ndim != 2:
        raise ValueError(f"{name} must be a 2-D array (rows, dim), got shape {a.shape}")
    if not np.issubdtype(a.dtype, np.floating):
        raise ValueError(f"{name} must hold floats, got {a.dtype}")
    a = np.ascontiguousarray(a, dtype=np.float32)
    if a.size and not np.isfinite(a).all():
        raise ValueError(f"{name} holds NaN or infinite values")
    return a


def normalize_rows(x, name: str = "x") -> np.ndarray:
    """x (N, D) → float32 rows of unit L2 norm (zero rows stay zero)."""
    a = _as_matrix(x, name)
    norms = np.linalg.norm(a, axis=1, keepdims=True)
    return a / np.maximum(norms, 1e-12)


@dataclass
class SearchResult:
    """similarities (Q, k) float32, indices (Q, k) int64 (−1 with similarity −inf where fewer than k were found),
    info: backend, index, nlist, nprobe, recall (None for exact search)."""
    similarities: np.ndarray
    indices: np.ndarray
    info: Dict[str, Any] = field(default_factory=dict)


# ---- exact search -------------------------------------------------------------------------------------------

def _torch_knn(queries: np.ndarray, database: np.ndarray, k: int) -> Tuple[np.ndarray, np.ndarray]:
    import torch

    from ..ops import nearest_neighbors

    q, db = torch.from_numpy(queries), torch.from_numpy(database)
    if k == 1:  # the package's kernel: no Q×M matrix
        with torch.no_grad():
            sim, idx = nearest_neighbors(q, db, exclude_self=False)
        return sim.numpy()[:, None].astype(np.float32), idx.numpy()[:, None].astype(np.int64)
    chunk = max(1, _CHUNK_BYTES // (4 * max(1, db.shape[0])))
    sims = np.empty((q.shape[0], k), np.float32)
    idxs = np.empty((q.shape[0], k), np.int64)
    with torch.no_grad():
        for start in range(0, q.shape[0], chunk):
            block = q[start:start + chunk] @ db.T
            top = torch.topk(block, k, dim=1)  # sorted, largest first
            sims[start:start + chunk] = top.values.numpy()
            idxs[start:start + chunk] = top.indices.numpy()
    return sims, idxs


def exact_knn(queries, database, k: int, backend: str = "auto") -> Tuple[np.ndarray, np.ndarray]:
    """Exact top-k by inner product: queries (Q, D), database (M, D) → (similarities (Q, k), indices (Q, k)),
    best first. k ≤ M."""
    q, db = _as_matrix(queries, "queries"), _as_matrix(database, "database")
    _check_k(k, db.shape[0])
    if available_backend(backend) == "faiss":
        faiss = _faiss()
        index = faiss.IndexFlatIP(db.shape[1])
        index.add(db)
        sims, idxs = index.search(q, k)
        return sims.astype(np.float32), idxs.astype(np.int64)
    return _torch_knn(q, db, k)


def _check_k(k: int, rows: int) -> None:
    if not isinstance(k, (int, np.integer)) or isinstance(k, bool) or k < 1:
        raise ValueError(f"k must be a positive integer, got {k!r}")
    if k > rows:
        raise ValueError(f"k={k} exceeds the database size {rows}")


# ---- approximate search -------------------------------------------------------------------------------------

def default_nlist(rows: int) -> int:
    """Inverted lists for `rows` vectors: 4·√N, at least 16, at most rows // 39 (faiss wants ≥ 39 training
    points per list)."""
    return int(max(1, min(max(16, 4 * math.isqrt(rows)), rows // 39)))


def _maybe_gpu(faiss, index, info: Dict[str, Any]):
    if faiss.get_num_gpus() > 0 and hasattr(faiss, "index_cpu_to_all_gpus"):
        try:
            gpu = faiss.index_cpu_to_all_gpus(index)
            info["gpus"] = faiss.get_num_gpus()
            return gpu
        except RuntimeError as e:  # e.g. a PQ code size the GPU kernels do not support
            info["gpu_error"] = " ".join(str(e).split())[:200]
    return index


def _build_faiss_index(database: np.ndarray, nlist: int, pq_bytes: Optional[int], seed: int,
                       info: Dict[str, Any]):
    faiss = _faiss()
    dim = database.shape[1]
    quantizer = faiss.IndexFlatIP(dim)
    if pq_bytes:
        if dim % pq_bytes:
            raise ValueError(f"pq_bytes={pq_bytes} must divide the embedding dimension {dim}")
        index = faiss.IndexIVFPQ(quantizer, dim, nlist, pq_bytes, 8, faiss.METRIC_INNER_PRODUCT)
        info["index"] = f"IVF{nlist},PQ{pq_bytes}"
    else:
        index = faiss.IndexIVFFlat(quantizer, dim, nlist, faiss.METRIC_INNER_PRODUCT)
        info["index"] = f"IVF{nlist},Flat"
    index.cp.seed = seed
    index.cp.niter = 10
    train_rows = min(database.shape[0], 64 * nlist)  # faiss samples at most 256 per list anyway
    rng = np.random.default_rng(seed)
    sample = database[np.sort(rng.choice(database.shape[0], train_rows, replace=False))]
    index.train(sample)
    index.add(database)
    return index


def knn_search(queries, database, k: int, *, exclude_self: bool = False, backend: str = "auto",
               exact_max: int = EXACT_MAX, nlist: Optional[int] = None, nprobe: Optional[int] = None,
               pq_bytes: Optional[int] = None, recall_sample: int = 1000, threshold: Optional[float] = None,
               seed: int = 0, threads: Optional[int] = None) -> SearchResult:
    """Top-k database rows by inner product for every query.

    queries (Q, D), database (M, D) float (unit rows for cosine). exclude_self: the queries are the database
    (Q == M, same order) and each row's own index is left out of its neighbours. Exact up to `exact_max`
    database rows; above, IVF (PQ with `pq_bytes` bytes per vector) with `nlist` lists (default
    `default_nlist`) and `nprobe` probed lists (default max(16, nlist // 64)), and the recall of the returned
    neighbours against exact search measured on `recall_sample` queries (info["recall"]: k-recall@k, and with
    `threshold` also the fraction of exact neighbours above it that were found, info["recall_above_threshold"]).
    """
    q, db = _as_matrix(queries, "queries"), _as_matrix(database, "database")
    if q.shape[1] != db.shape[1]:
        raise ValueError(f"queries have dimension {q.shape[1]} but the database has {db.shape[1]}")
    if exclude_self and q.shape[0] != db.shape[0]:
        raise ValueError(f"exclude_self needs queries == database, got {q.shape[0]} and {db.shape[0]} rows")
    want = k + 1 if exclude_self else k
    _check_k(want, db.shape[0])
    which = available_backend(backend)
    info: Dict[str, Any] = {"backend": which, "rows": int(db.shape[0]), "queries": int(q.shape[0]), "k": k,
                            "recall": None}
    if q.shape[0] == 0:
        return SearchResult(np.empty((0, k), np.float32), np.empty((0, k), np.int64), info)
    approximate = which == "faiss" and db.shape[0] > exact_max
    if which == "faiss":
        faiss = _faiss()
        if threads:
            faiss.omp_set_num_threads(int(threads))
        if approximate:
            nlist = int(nlist or default_nlist(db.shape[0]))
            nprobe = int(min(nlist, nprobe or max(16, nlist // 64)))
            index = _build_faiss_index(db, nlist, pq_bytes, seed, info)
            index.nprobe = nprobe
            info.update(nlist=nlist, nprobe=nprobe)
        else:
            index = faiss.IndexFlatIP(db.shape[1])
            index.add(db)
            info["index"] = "FlatIP"
        index = _maybe_gpu(faiss, index, info)
        if approximate and "gpus" in info:
            try:
                faiss.GpuParameterSpace().set_index_parameter(index, "nprobe", nprobe)
            except (AttributeError, RuntimeError):  # the copy keeps the CPU index's nprobe
                pass
        sims, idxs = index.search(q, want)
        sims, idxs = sims.astype(np.float32), idxs.astype(np.int64)
    else:
        info["index"] = "exact (torch)"
        sims, idxs = _torch_knn(q, db, want)
    sims[idxs < 0] = -np.inf
    if exclude_self:
        sims, idxs = _drop_self(sims, idxs, k)
    if approximate and recall_sample > 0:
        rng = np.random.default_rng(seed + 1)
        pick = np.sort(rng.choice(q.shape[0], min(recall_sample, q.shape[0]), replace=False))
        ex_sims, ex_idx = exact_knn(q[pick], db, want, backend=which)
        if exclude_self:
            ex_sims, ex_idx = _drop_self(ex_sims, ex_idx, k, rows=pick)
        info.update(measure_recall(idxs[pick], ex_idx, ex_sims, threshold))
        info["recall_queries"] = int(pick.size)
    return SearchResult(sims, idxs, info)


def _drop_self(sims: np.ndarray, idxs: np.ndarray, k: int, rows: Optional[np.ndarray] = None):
    """From (Q, k+1) results, each row's own index removed (or the last entry where it was not found)."""
    own = (np.arange(idxs.shape[0]) if rows is None else rows)[:, None]
    is_self = idxs == own
    missing = ~is_self.any(axis=1)
    is_self[missing, -1] = True
    # Exactly one entry dropped per row (the first self hit).
    first = np.argmax(is_self, axis=1)
    keep = np.ones_like(is_self)
    keep[np.arange(idxs.shape[0]), first] = False
    return sims[keep].reshape(-1, k), idxs[keep].reshape(-1, k)


def measure_recall(approx_idx: np.ndarray, exact_idx: np.ndarray, exact_sims: np.ndarray,
                   threshold: Optional[float] = None) -> Dict[str, Any]:
    """{"recall": fraction of the exact top-k found in the approximate top-k (k-recall@k), "recall_at_1": the
    exact nearest neighbour found first, and with `threshold` "recall_above_threshold": fraction of the exact
    neighbours with similarity ≥ threshold that were found (None when there were none)}."""
    found = np.array([np.isin(e[e >= 0], a).sum() for a, e in zip(approx_idx, exact_idx)])
    total = (exact_idx >= 0).sum()
    out: Dict[str, Any] = {"recall": float(found.sum() / max(1, total)),
                           "recall_at_1": float(np.mean(approx_idx[:, 0] == exact_idx[:, 0]))}
    if threshold is not None:
        hits = above = 0
        for a, e, s in zip(approx_idx, exact_idx, exact_sims):
            strong = e[(s >= threshold) & (e >= 0)]
            above += strong.size
            hits += np.isin(strong, a).sum()
        out["recall_above_threshold"] = None if above == 0 else float(hits / above)
        out["pairs_above_threshold"] = int(above)
    return out


# ---- k-means ------------------------------------------------------------------------------------------------

def kmeans(x, k: int, *, niter: int = 20, seed: int = 0, backend: str = "auto", max_points_per_centroid: int = 256,
           threads: Optional[int] = None) -> Tuple[np.ndarray, np.ndarray, Dict[str, Any]]:
    """Spherical k-means (unit centroids, inner-product assignment) of x (N, D) → (centroids (k, D),
    assignment (N,) int64, info). Trained on at most max_points_per_centroid · k rows (a seeded sample), then
    every row is assigned. faiss.Kmeans, or Lloyd iterations in torch without faiss; both seeded by k-means++ up
to KMEANS_PP_MAX clusters."""
    a = _as_matrix(x, "x")
    if not isinstance(k, (int, np.integer)) or isinstance(k, bool) or k < 1:
        raise ValueError(f"k (clusters) must be a positive integer, got {k!r}")
    if k > a.shape[0]:
        raise ValueError(f"k={k} clusters exceed the {a.shape[0]} points")
    which = available_backend(backend)
    rng = np.random.default_rng(seed)
    rows = min(a.shape[0], max_points_per_centroid * k)
    sample = a if rows == a.shape[0] else a[np.sort(rng.choice(a.shape[0], rows, replace=False))]
    if which == "faiss":
        faiss = _faiss()
        if threads:
            faiss.omp_set_num_threads(int(threads))
        km = faiss.Kmeans(a.shape[1], int(k), niter=int(niter), seed=int(seed), spherical=True,
                          max_points_per_centroid=int(max_points_per_centroid), min_points_per_centroid=1,
                          gpu=faiss.get_num_gpus() > 0,
                          verbose=False)
        # k-means++ seeding (faiss seeds at random, which leaves separated clusters merged and split); skipped
        # for very many clusters, where its O(sample · k) passes cost more than the training.
        init = _kmeans_pp(sample, int(k), rng) if k <= KMEANS_PP_MAX else None
        km.train(sample, init_centroids=init)
        centroids = np.ascontiguousarray(km.centroids, dtype=np.float32)
    else:
        centroids = _torch_kmeans(sample, int(k), int(niter), rng)
    assignment = assign_clusters(a, centroids, backend=which)
    return centroids, assignment, {"backend": which, "k": int(k), "trained_on": int(rows), "niter": int(niter)}


def _kmeans_pp(x: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
    """k-means++ seeding on the sphere: each next centre drawn with probability ∝ 1 − (best cosine so far)."""
    import torch

    xt = torch.from_numpy(x)
    chosen = [int(rng.integers(x.shape[0]))]
    best = (xt @ xt[chosen[0]]).numpy().astype(np.float64)
    for _ in range(1, k):
        weight = np.clip(1.0 - best, 0.0, None)
        total = weight.sum()
        nxt = int(rng.choice(x.shape[0], p=weight / total)) if total > 0 else int(rng.integers(x.shape[0]))
        chosen.append(nxt)
        best = np.maximum(best, (xt @ xt[nxt]).numpy())
    return x[chosen].copy()


def _torch_kmeans(x: np.ndarray, k: int, niter: int, rng: np.random.Generator) -> np.ndarray:
    centroids = _kmeans_pp(x, k, rng)
    for _ in range(niter):
        assignment = assign_clusters(x, centroids, backend="torch")
        sums = np.zeros_like(centroids, dtype=np.float64)
        np.add.at(sums, assignment, x)
        counts = np.bincount(assignment, minlength=k)
        empty = np.flatnonzero(counts == 0)
        if empty.size:  # re-seed empty clusters with random points
            sums[empty] = x[rng.choice(x.shape[0], empty.size, replace=False)]
        centroids = normalize_rows(sums.astype(np.float32))
    return centroids


def assign_clusters(x, centroids, backend: str = "auto") -> np.ndarray:
    """x (N, D), centroids (k, D) → index of the centroid with the largest inner product, (N,) int64."""
    a, c = _as_matrix(x, "x"), _as_matrix(centroids, "centroids")
    if a.shape[0] == 0:
        return np.empty((0,), np.int64)
    return exact_knn(a, c, 1, backend=backend)[1][:, 0]
