"""Deduplication, threshold calibration and retrieval on embedding arrays (both search backends): planted near
copies are found and nothing else is removed; the kept image is deterministic; eval copies; retrieval returns the
planted neighbours."""
import numpy as np
import pytest

from dinokernels.curation import search
from dinokernels.curation.dedup import calibrate_threshold, duplicate_components, eval_copies
from dinokernels.curation.search import normalize_rows
from dinokernels.curation.select import retrieve_by_clusters, retrieve_nearest

BACKENDS = ["torch"] + (["faiss"] if search._faiss() is not None else [])


def _pool_with_copies(rng, n=300, d=64, groups=((0, 3), (5, 2), (17, 1), (250, 4)), noise=0.04):
    """n distinct unit rows, then noisy copies: for (row, count), `count` copies of that row. Returns (x, copy
    rows → original row)."""
    base = normalize_rows(rng.standard_normal((n, d)))
    rows, owner = [base], {}
    for original, count in groups:
        for _ in range(count):
            owner[n + len(owner)] = original
            rows.append(normalize_rows(base[original] + noise * rng.standard_normal((1, d))))
    return np.concatenate(rows), owner


@pytest.mark.parametrize("backend", BACKENDS)
def test_planted_copies_removed_and_nothing_else(backend):
    rng = np.random.default_rng(11)
    x, owner = _pool_with_copies(rng)
    result = duplicate_components(x, 0.9, k=8, backend=backend)
    removed = set(np.flatnonzero(~result.kept).tolist())
    assert removed == set(owner)  # the originals come first, so they are kept
    for copy, original in owner.items():
        assert result.representative[copy] == original
        assert result.component[copy] == result.component[original]
        assert result.similarity[copy] == pytest.approx(float(x[copy] @ x[original]), abs=1e-5)
    assert result.sizes.max() == 5 and (result.sizes > 1).sum() == 4
    assert result.edges >= len(owner)
    # component ids are numbered by first row: 0, 1, 2, ... in row order
    first_seen = list(dict.fromkeys(result.component.tolist()))
    assert first_seen == list(range(len(first_seen)))


@pytest.mark.parametrize("backend", BACKENDS)
def test_priority_and_eligible_choose_the_kept_row(backend):
    rng = np.random.default_rng(12)
    x, owner = _pool_with_copies(rng, groups=((0, 3),))
    copies = sorted(owner)
    priority = np.arange(x.shape[0])
    priority[copies[1]] = -1  # this copy wins
    result = duplicate_components(x, 0.9, priority=priority, backend=backend)
    assert result.kept[copies[1]] and not result.kept[0]
    eligible = np.ones(x.shape[0], bool)
    eligible[[0] + copies] = False  # no member may be kept: the whole group goes
    result = duplicate_components(x, 0.9, eligible=eligible, backend=backend)
    assert not result.kept[[0] + copies].any() and result.kept.sum() == x.shape[0] - 4


def test_chains_join_one_component():
    # a - b - c with cos(a, c) below the threshold: one component all the same (single linkage, as the paper)
    a = np.array([1.0, 0.0])
    rot = lambda t: np.array([np.cos(t), np.sin(t)])  # noqa: E731
    x = np.stack([a, rot(0.4), rot(0.8), rot(2.0)])
    result = duplicate_components(x, float(np.cos(0.45)), k=3, backend="torch")
    assert result.component.tolist() == [0, 0, 0, 1]
    assert result.kept.tolist() == [True, False, False, True]
    assert result.similarity[2] == pytest.approx(np.cos(0.8), abs=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_eval_copies(backend):
    rng = np.random.default_rng(13)
    pool = normalize_rows(rng.standard_normal((200, 32)))
    evals = np.concatenate([normalize_rows(pool[[7, 42]] + 0.03 * rng.standard_normal((2, 32))),
                            normalize_rows(rng.standard_normal((5, 32)))])
    is_copy, row, sim = eval_copies(pool, evals, 0.9, backend=backend)
    assert np.flatnonzero(is_copy).tolist() == [7, 42]
    assert row[7] == 0 and row[42] == 1 and sim[7] > 0.9
    none, _, _ = eval_copies(pool, np.zeros((0, 32), np.float32), 0.9, backend=backend)
    assert not none.any()


def test_calibration_lands_between_copies_and_distinct_images():
    rng = np.random.default_rng(14)
    x, owner = _pool_with_copies(rng, n=400, noise=0.02)  # real duplicates in the pool too
    sample = np.arange(0, 400, 5)
    copies, copy_owner = [], []
    for pos, row in enumerate(sample):
        for scale in (0.1, 0.2, 0.3):  # synthetic copies of increasing strength
            copies.append(normalize_rows(x[row] + scale * rng.standard_normal((1, 64)) / 8))
            copy_owner.append(pos)
    cal = calibrate_threshold(x, sample, np.concatenate(copies), copy_owner, ["a", "b", "c"] * len(sample))
    distinct = x[:400] @ x[:400].T
    np.fill_diagonal(distinct, -1)
    assert cal.separated and cal.copy_low > cal.threshold > cal.distinct_high
    assert cal.threshold > distinct.max()  # no two distinct rows are above it
    assert cal.copy_similarities.min() > cal.distinct_high
    assert set(cal.by_kind) == {"a", "b", "c"} and cal.by_kind["a"] > cal.by_kind["c"]
    # and it removes exactly the planted copies
    result = duplicate_components(x, cal.threshold)
    assert set(np.flatnonzero(~result.kept).tolist()) == set(owner)
    d = cal.to_dict()
    assert d["threshold"] == pytest.approx(cal.threshold, abs=1e-6) and d["copies"] == 3 * len(sample)


def test_calibration_reports_overlap():
    rng = np.random.default_rng(15)
    x = normalize_rows(rng.standard_normal((100, 8)))  # in 8 dimensions random rows are close to each other
    sample = np.arange(20)
    copies = normalize_rows(x[sample] + 1.5 * rng.standard_normal((20, 8)))  # copies no closer than strangers
    cal = calibrate_threshold(x, sample, copies, np.arange(20))
    assert not cal.separated


def test_bad_inputs():
    x = normalize_rows(np.random.default_rng(16).standard_normal((10, 4)))
    with pytest.raises(ValueError, match="threshold"):
        duplicate_components(x, 1.5)
    with pytest.raises(ValueError, match="priority and eligible"):
        duplicate_components(x, 0.9, priority=np.arange(3))
    with pytest.raises(ValueError, match="copy_owner"):
        calibrate_threshold(x, [0, 1], x[:2], [0, 5])
    with pytest.raises(ValueError, match="per_image"):
        retrieve_nearest(x, x[:2], 0)
    with pytest.raises(ValueError, match="clusters=11 exceeds"):
        retrieve_by_clusters(x, x[:2], 11)
    assert duplicate_components(x[:1], 0.9).kept.tolist() == [True]


@pytest.mark.parametrize("backend", BACKENDS)
def test_retrieve_nearest_returns_planted_neighbours(backend):
    rng = np.random.default_rng(17)
    pool = normalize_rows(rng.standard_normal((500, 48)))
    planted = {0: [10, 11], 1: [300, 301]}  # curated row → pool rows close to it
    curated = normalize_rows(rng.standard_normal((2, 48)))
    for q, rows in planted.items():
        pool[rows] = normalize_rows(curated[q] + 0.1 * rng.standard_normal((len(rows), 48)))
    candidates = np.ones(500, bool)
    candidates[11] = False  # removed by deduplication: never retrieved
    sel = retrieve_nearest(pool, curated, 2, candidates, backend=backend)
    got = set(np.flatnonzero(sel.selected).tolist())
    assert {10, 300, 301} <= got and 11 not in got and len(got) == 4
    assert sel.query[10] == 0 and sel.query[300] == 1
    assert sel.similarity[10] == pytest.approx(float(pool[10] @ curated[0]), abs=1e-5)
    assert np.isnan(sel.similarity[~sel.selected]).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_retrieve_by_clusters(backend):
    rng = np.random.default_rng(18)
    centres = normalize_rows(rng.standard_normal((5, 16)))
    labels = np.repeat(np.arange(5), 40)
    pool = normalize_rows(centres[labels] + 0.05 * rng.standard_normal((200, 16)))
    curated = normalize_rows(centres[[1, 3]] + 0.05 * rng.standard_normal((2, 16)))
    sel = retrieve_by_clusters(pool, curated, 5, backend=backend, seed=2)
    assert np.flatnonzero(sel.selected).tolist() == np.flatnonzero(np.isin(labels, [1, 3])).tolist()
    assert (sel.cluster >= 0).all() and sel.info["curated_clusters"] == 2
    few = retrieve_by_clusters(pool, curated, 5, per_image=3, backend=backend, seed=2)
    assert few.selected.sum() == 6
    for q in (0, 1):  # the 3 nearest of its cluster
        got = np.flatnonzero(few.selected & (few.query == q))
        members = np.flatnonzero(sel.cluster == sel.cluster[got[0]])
        best = members[np.argsort(-(pool[members] @ curated[q]))[:3]]
        assert sorted(got.tolist()) == sorted(best.tolist())
