"""k-NN search and k-means: faiss and the torch fallback against a brute-force numpy oracle and each other, the
approximate index's recall, backend selection (DINOKERNELS_CURATION_BACKEND, faiss missing), bad inputs."""
import numpy as np
import pytest

from dinokernels.curation import search
from dinokernels.curation.search import (assign_clusters, available_backend, exact_knn, kmeans, knn_search,
                                         normalize_rows)

HAVE_FAISS = search._faiss() is not None
BACKENDS = ["torch"] + (["faiss"] if HAVE_FAISS else [])
needs_faiss = pytest.mark.skipif(not HAVE_FAISS, reason="faiss not installed (pip install faiss-cpu)")


def _oracle(q, db, k, exclude_self=False):
    sims = q.astype(np.float64) @ db.astype(np.float64).T
    if exclude_self:
        np.fill_diagonal(sims, -np.inf)
    order = np.argsort(-sims, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(sims, order, 1), order


def _rows(rng, n, d=48):
    return normalize_rows(rng.standard_normal((n, d)))


def _clustered(rng, n, d=32, centres=20, spread=0.35):
    c = rng.standard_normal((centres, d))
    return normalize_rows(c[rng.integers(0, centres, n)] + spread * rng.standard_normal((n, d)))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("k", [1, 5])
def test_exact_search_matches_oracle(backend, k):
    rng = np.random.default_rng(1 + k)
    db, q = _rows(rng, 700), _rows(rng, 90)
    sims, idx = exact_knn(q, db, k, backend=backend)
    ref_sims, ref_idx = _oracle(q, db, k)
    np.testing.assert_array_equal(idx, ref_idx)
    np.testing.assert_allclose(sims, ref_sims, atol=1e-5)
    assert sims.dtype == np.float32 and idx.dtype == np.int64


@pytest.mark.parametrize("backend", BACKENDS)
def test_self_search_leaves_out_each_row(backend):
    rng = np.random.default_rng(3)
    x = _rows(rng, 400)
    result = knn_search(x, x, 6, exclude_self=True, backend=backend)
    ref_sims, ref_idx = _oracle(x, x, 6, exclude_self=True)
    assert not (result.indices == np.arange(400)[:, None]).any()
    np.testing.assert_array_equal(result.indices, ref_idx)
    np.testing.assert_allclose(result.similarities, ref_sims, atol=1e-5)
    assert result.info["backend"] == backend and result.info["recall"] is None  # exact: no recall to measure


@needs_faiss
def test_faiss_and_fallback_agree():
    rng = np.random.default_rng(4)
    x = _rows(rng, 1500, 64)
    a = knn_search(x, x, 8, exclude_self=True, backend="faiss")
    b = knn_search(x, x, 8, exclude_self=True, backend="torch")
    np.testing.assert_array_equal(a.indices, b.indices)
    np.testing.assert_allclose(a.similarities, b.similarities, atol=1e-5)
    np.testing.assert_array_equal(assign_clusters(x, x[:37], backend="faiss"),
                                  assign_clusters(x, x[:37], backend="torch"))


@needs_faiss
def test_ivf_index_used_above_exact_max_with_recall_reported():
    rng = np.random.default_rng(5)
    x = _clustered(rng, 4000)
    result = knn_search(x, x, 10, exclude_self=True, exact_max=1000, nprobe=8, threshold=0.8, backend="faiss")
    info = result.info
    assert info["index"].startswith("IVF") and info["nprobe"] == 8 and info["nlist"] >= 16
    ref_sims, ref_idx = _oracle(x, x, 10, exclude_self=True)
    true_recall = np.mean([np.isin(r, a).mean() for r, a in zip(ref_idx, result.indices)])
    # the reported recall (a sample of 1000 queries) estimates the recall over all queries
    assert abs(info["recall"] - true_recall) < 0.05
    assert 0.5 < info["recall"] <= 1.0
    assert info["recall_queries"] == 1000
    assert info["recall_above_threshold"] is not None and info["pairs_above_threshold"] > 0
    # more probed lists: recall can only go up, and probing every list is exact
    full = knn_search(x, x, 10, exclude_self=True, exact_max=1000, nprobe=10**6, backend="faiss")
    assert full.info["nprobe"] == full.info["nlist"] and full.info["recall"] == pytest.approx(1.0)


@needs_faiss
def test_ivf_pq_index():
    rng = np.random.default_rng(6)
    x = _clustered(rng, 3000)
    result = knn_search(x, x, 5, exclude_self=True, exact_max=1000, pq_bytes=8, backend="faiss")
    assert "PQ8" in result.info["index"] and 0.0 < result.info["recall"] <= 1.0
    with pytest.raises(ValueError, match="pq_bytes"):
        knn_search(x, x, 5, exact_max=1000, pq_bytes=7, backend="faiss")


def test_backend_selection(monkeypatch):
    monkeypatch.setenv(search.BACKEND_ENV, "torch")
    assert available_backend() == "torch"
    rng = np.random.default_rng(7)
    x = _rows(rng, 50)
    assert knn_search(x, x, 2).info["backend"] == "torch"
    monkeypatch.setenv(search.BACKEND_ENV, "nonsense")
    with pytest.raises(ValueError, match=search.BACKEND_ENV):
        available_backend()
    monkeypatch.delenv(search.BACKEND_ENV)
    monkeypatch.setattr(search, "_faiss", lambda: None)  # as without faiss installed
    assert available_backend() == "torch"
    with pytest.raises(ImportError, match="faiss-cpu"):
        available_backend("faiss")
    assert knn_search(x, x, 2, exact_max=10).info["index"] == "exact (torch)"  # no IVF without faiss


@pytest.mark.parametrize("backend", BACKENDS)
def test_kmeans_finds_separated_clusters(backend):
    rng = np.random.default_rng(8)
    centres = normalize_rows(rng.standard_normal((6, 24)))
    labels = np.repeat(np.arange(6), 60)
    x = normalize_rows(centres[labels] + 0.05 * rng.standard_normal((360, 24)))
    cent, assignment, info = kmeans(x, 6, backend=backend, seed=1)
    assert cent.shape == (6, 24) and assignment.shape == (360,) and info["backend"] == backend
    np.testing.assert_allclose(np.linalg.norm(cent, axis=1), 1.0, atol=1e-4)  # spherical
    # every true cluster maps to one k-means cluster, and different ones to different ones
    mapping = {t: set(assignment[labels == t].tolist()) for t in range(6)}
    assert all(len(m) == 1 for m in mapping.values())
    assert len({next(iter(m)) for m in mapping.values()}) == 6
    np.testing.assert_array_equal(assignment, _oracle(x, cent, 1)[1][:, 0])


@pytest.mark.parametrize("backend", BACKENDS)
def test_bad_inputs_name_the_argument(backend):
    rng = np.random.default_rng(9)
    x = _rows(rng, 20)
    with pytest.raises(ValueError, match="k=21 exceeds"):
        knn_search(x, x, 21, backend=backend)
    with pytest.raises(ValueError, match="k must be a positive integer"):
        knn_search(x, x, 0, backend=backend)
    bad = x.copy()
    bad[3, 2] = np.nan
    with pytest.raises(ValueError, match="queries holds NaN"):
        knn_search(bad, x, 2, backend=backend)
    with pytest.raises(ValueError, match="database must be a 2-D array"):
        knn_search(x, x[0], 2, backend=backend)
    with pytest.raises(ValueError, match="dimension"):
        knn_search(x, x[:, :10], 2, backend=backend)
    with pytest.raises(ValueError, match="exclude_self"):
        knn_search(x[:5], x, 2, exclude_self=True, backend=backend)
    with pytest.raises(ValueError, match="clusters exceed"):
        kmeans(x, 21, backend=backend)
    with pytest.raises(ValueError, match="must hold floats"):
        knn_search(np.zeros((3, 4), np.int64), x[:, :4], 1, backend=backend)
    empty = knn_search(np.zeros((0, x.shape[1]), np.float32), x, 3, backend=backend)
    assert empty.indices.shape == (0, 3)
