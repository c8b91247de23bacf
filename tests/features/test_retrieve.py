"""Retrieval: planted neighbours are found; mAP and recall@k equal a float64 brute force written here (and
scikit-learn's average precision when it is installed); labels from folders and CSV; the PNG grid."""
import os
import sys

import numpy as np
import pytest
import torch
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from feature_test_helpers import write_image_folder  # noqa: E402

from dinokernels.features.retrieve import (cosine_topk, labels_from_csv, labels_from_folders, retrieval_metrics,  # noqa: E402,E501
                                           retrieve, save_retrieval_grid, self_match_indices)


def brute_force(q, g, ql, gl, ks, exclude=None):
    """float64: cosine similarities, a full stable ranking per query, AP as the mean precision at the positives."""
    q = q.astype(np.float64) / np.linalg.norm(q, axis=1, keepdims=True)
    g = g.astype(np.float64) / np.linalg.norm(g, axis=1, keepdims=True)
    aps, rec = [], {k: [] for k in ks}
    for i in range(len(q)):
        candidates = [j for j in range(len(g)) if exclude is None or exclude[i] != j]
        sims = g[candidates] @ q[i]
        order = [candidates[j] for j in np.argsort(-sims, kind="stable")]
        rel = np.array([ql[i] is not None and gl[j] == ql[i] for j in order], dtype=np.float64)
        if rel.sum() == 0:
            continue
        prec = np.cumsum(rel) / np.arange(1, len(rel) + 1)
        aps.append(float((prec * rel).sum() / rel.sum()))
        for k in ks:
            rec[k].append(float(rel[:k].sum() > 0))
    return float(np.mean(aps)), {k: float(np.mean(v)) for k, v in rec.items()}, len(aps)


def test_planted_neighbours_are_the_top_results():
    rng = np.random.default_rng(0)
    gallery = rng.normal(size=(300, 32)).astype(np.float32)
    planted = rng.choice(300, size=20, replace=False)
    queries = gallery[planted] * 3.0 + rng.normal(scale=0.05, size=(20, 32)).astype(np.float32)  # scale-free
    scores, idx = cosine_topk(queries, gallery, k=3, chunk_size=7)  # chunks that do not divide Q
    np.testing.assert_array_equal(idx[:, 0], planted)
    assert scores.shape == (20, 3) and (scores[:, 0] > 0.99).all() and (np.diff(scores, axis=1) <= 0).all()
    # cosine top-k against float64 brute force
    qn = queries / np.linalg.norm(queries, axis=1, keepdims=True)
    gn = gallery / np.linalg.norm(gallery, axis=1, keepdims=True)
    sims = qn.astype(np.float64) @ gn.T.astype(np.float64)
    np.testing.assert_array_equal(idx, np.argsort(-sims, axis=1)[:, :3])
    np.testing.assert_allclose(scores, np.take_along_axis(sims, idx, 1), atol=1e-5)
    # excluding the planted item itself: the next best comes first
    s2, i2 = cosine_topk(queries, gallery, k=2, exclude=planted)
    np.testing.assert_array_equal(i2, idx[:, 1:3])


@pytest.mark.parametrize("seed", [0, 1])
def test_metrics_equal_the_brute_force(seed):
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(5, 16))
    gl = [f"c{int(c)}" for c in rng.integers(0, 5, size=120)]
    gl[7] = None  # unlabelled gallery item: never a positive
    g = np.stack([centres[int(x[1:]) if x else 0] for x in gl]) + rng.normal(scale=1.2, size=(120, 16))
    ql = [f"c{int(c)}" for c in rng.integers(0, 6, size=40)]  # c5 has no positive: skipped
    ql[3] = None
    q = np.stack([centres[min(int(x[1:]), 4)] if x else centres[0] for x in ql]) + rng.normal(scale=1.2,
                                                                                              size=(40, 16))
    ks = (1, 5, 10)
    got = retrieval_metrics(q.astype(np.float32), g.astype(np.float32), ql, gl, ks, chunk_size=6)
    m, rec, scored = brute_force(q, g, ql, gl, ks)
    assert got["scored_queries"] == scored and got["skipped_queries"] == 40 - scored
    assert got["mAP"] == pytest.approx(m, abs=1e-6)
    for k in ks:
        assert got[f"recall@{k}"] == pytest.approx(rec[k], abs=1e-12)
    sklearn = pytest.importorskip("sklearn.metrics")
    qn, gn = q / np.linalg.norm(q, axis=1, keepdims=True), g / np.linalg.norm(g, axis=1, keepdims=True)
    aps = [sklearn.average_precision_score([y == ql[i] for y in gl], gn @ qn[i])
           for i in range(40) if ql[i] is not None and any(y == ql[i] for y in gl)]
    assert got["mAP"] == pytest.approx(float(np.mean(aps)), abs=1e-6)


def test_query_set_as_gallery_leaves_each_query_out():
    rng = np.random.default_rng(3)
    x = rng.normal(size=(30, 8)).astype(np.float32)
    labels = [f"k{i % 3}" for i in range(30)]
    paths = [f"/data/img{i}.png" for i in range(30)]
    exclude = self_match_indices(paths, paths)
    np.testing.assert_array_equal(exclude, np.arange(30))
    got = retrieve(x, x, k=4, query_labels=labels, gallery_labels=labels, ks=(1, 3), query_paths=paths,
                   gallery_paths=paths)
    assert not (got.indices == np.arange(30)[:, None]).any()  # nobody finds itself
    m, rec, _ = brute_force(x, x, labels, labels, (1, 3), exclude=exclude)
    assert got.metrics["mAP"] == pytest.approx(m, abs=1e-6) and got.metrics["recall@3"] == pytest.approx(rec[3])
    assert self_match_indices(paths[:3], paths[3:]) is None


def test_perfect_and_worst_rankings():
    g = np.eye(4, dtype=np.float32)
    q = np.eye(4, dtype=np.float32)[:2]
    perfect = retrieval_metrics(q, g, ["a", "b"], ["a", "b", "c", "d"], ks=(1,))
    assert perfect["mAP"] == 1.0 and perfect["recall@1"] == 1.0
    worst = retrieval_metrics(q, g, ["d", "c"], ["a", "b", "c", "d"], ks=(1, 4))
    # the only positive comes after the exact match and the similarity-0 ties before it (gallery order): ranks 4, 3
    assert worst["recall@1"] == 0.0 and worst["recall@4"] == 1.0
    assert worst["mAP"] == pytest.approx(np.mean([1 / 4, 1 / 3]))


def test_bad_inputs():
    x = np.ones((3, 4), np.float32)
    with pytest.raises(ValueError, match="queries have 4 features per row, the gallery 5"):
        cosine_topk(x, np.ones((3, 5), np.float32), 1)
    with pytest.raises(ValueError, match="gallery is empty"):
        cosine_topk(x, np.zeros((0, 4), np.float32), 1)
    with pytest.raises(ValueError, match="NaN"):
        cosine_topk(np.full((1, 4), np.nan, np.float32), x, 1)
    with pytest.raises(ValueError, match="k must be"):
        cosine_topk(x, x, 0)
    with pytest.raises(ValueError, match="one label per row"):
        retrieval_metrics(x, x, ["a"], ["a", "b", "c"])
    with pytest.raises(ValueError, match=r"\(N, D\)"):
        cosine_topk(np.ones(4, np.float32), x, 1)
    with pytest.raises(TypeError, match="floating"):
        cosine_topk(torch.ones(2, 4, dtype=torch.int64), x, 1)


def test_labels_from_folders_and_csv(tmp_path):
    root = str(tmp_path / "imgs")
    paths = write_image_folder(root, classes=("cat", "dog"), per_class=2)
    Image.new("RGB", (8, 8)).save(os.path.join(root, "loose.png"))
    paths.append(os.path.join(root, "loose.png"))
    assert labels_from_folders(paths, root) == ["cat", "cat", "dog", "dog", None]
    csv_path = tmp_path / "labels.csv"
    csv_path.write_text(f"path,label\ncat/000.png,feline\n{paths[2]},canine\n\n")
    assert labels_from_csv(str(csv_path), paths, root) == ["feline", None, "canine", None, None]
    (tmp_path / "bad.csv").write_text("only-one-column\n")
    with pytest.raises(ValueError, match="line 1"):
        labels_from_csv(str(tmp_path / "bad.csv"), paths, root)
    with pytest.raises(FileNotFoundError, match="no such file"):
        labels_from_csv(str(tmp_path / "none.csv"), paths, root)


def test_grid_png_frames(tmp_path):
    root = str(tmp_path / "imgs")
    paths = write_image_folder(root, classes=("a", "b"), per_class=3)
    (tmp_path / "imgs" / "b" / "broken.png").write_bytes(b"xx")  # drawn as a placeholder tile
    paths.append(str(tmp_path / "imgs" / "b" / "broken.png"))
    labels = labels_from_folders(paths, root)
    idx = np.array([[1, 3, 6], [0, 4, 2]])
    scores = np.array([[0.9, 0.5, 0.1], [0.8, 0.4, 0.3]], np.float32)
    out = str(tmp_path / "grid" / "g.png")
    chosen = save_retrieval_grid(out, [paths[0], paths[3]], paths, idx, scores, [labels[0], labels[3]], labels,
                                 rows=2, k=3, tile=32)
    assert chosen == [0, 1]
    img = np.asarray(Image.open(out).convert("RGB"))
    border, caption, gap = 4, 14, 10
    cell_w, cell_h = 32 + 2 * border, 32 + 2 * border + caption
    assert img.shape == (cell_h * 2 + 4, cell_w * 4 + gap + 4, 3)

    def frame(row, col):  # the top-left pixel of a cell's frame
        return tuple(img[2 + row * cell_h, 2 + col * cell_w + (gap if col else 0)])
    assert frame(0, 0) == (40, 90, 200)  # query
    assert frame(0, 1) == (40, 170, 60) and frame(0, 2) == (210, 40, 40) and frame(0, 3) == (210, 40, 40)
    assert frame(1, 1) == (210, 40, 40) and frame(1, 2) == (40, 170, 60) and frame(1, 3) == (210, 40, 40)
    save_retrieval_grid(out, [paths[0]], paths, idx[:1], scores[:1], rows=1, k=2, tile=32)
    img = np.asarray(Image.open(out).convert("RGB"))
    assert tuple(img[2, 2 + cell_w + gap]) == (150, 150, 150)  # no labels: grey frames
