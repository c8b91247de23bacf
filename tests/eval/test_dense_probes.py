"""Dense probes (dinokernels.eval.dense): metrics against float64 formulas written here, the folder reader's skips
and errors, the synthetic generator, and that each linear probe learns on synthetic data with a tiny random-weight
backbone (beating the trivial predictor by a wide margin, while the same head on shuffled labels does not)."""
import math
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from dinokernels.data.dense_folder import DenseFileError, find_dense_pairs, read_depth, read_mask
from dinokernels.data.synthetic_dense import depth_sample, segmentation_sample, write_dense_dataset
from dinokernels.eval import dense
from dinokernels.features import FeatureModel
from dinokernels.models.dinov2 import DinoVisionTransformer


# ---- metrics vs float64 formulas ------------------------------------------------------------------------------

def _miou_reference(pred, target, num_classes, ignore):
    """Per-class IoU over all pixels, written as plain loops in float64; None for a class absent from both."""
    keep = target != ignore
    ious = []
    for c in range(num_classes):
        inter = np.sum((pred == c) & (target == c) & keep)
        union = np.sum(((pred == c) | (target == c)) & keep)
        ious.append(None if union == 0 else inter / union)
    present = [v for v in ious if v is not None]
    return ious, float(np.mean(present)), np.sum((pred == target) & keep) / np.sum(keep)


def test_segmentation_metrics_match_float64_formula_with_ignore_and_absent_classes():
    rng = np.random.default_rng(0)
    C = 6
    target = rng.integers(0, 4, (3, 17, 23))          # classes 4 and 5 never in the labels
    pred = rng.integers(0, 5, (3, 17, 23))            # class 4 predicted (an FP-only class: IoU 0), 5 never
    target[rng.random(target.shape) < 0.2] = 255      # ignored pixels
    pred[target == 255] = 4                           # predictions on ignored pixels must not count
    conf = dense.segmentation_confusion(torch.from_numpy(pred), torch.from_numpy(target), C)
    got = dense.segmentation_metrics(conf)
    ious, miou, acc = _miou_reference(pred, target, C, 255)
    assert got["per_class_iou"][5] is None and ious[5] is None
    assert got["per_class_iou"][4] is not None and ious[4] is not None
    for a, b in zip(got["per_class_iou"], ious):
        assert (a is None) == (b is None) and (a is None or math.isclose(a, b, rel_tol=0, abs_tol=1e-12))
    assert math.isclose(got["miou"], miou, abs_tol=1e-12) and math.isclose(got["pixel_accuracy"], acc, abs_tol=1e-12)
    assert got["present_classes"] == 5
    # the data-set mIoU sums the confusion over images (not a mean of per-image mIoUs)
    per_image = sum(dense.segmentation_confusion(torch.from_numpy(pred[i]), torch.from_numpy(target[i]), C)
                    for i in range(3))
    assert torch.equal(per_image, conf)


def test_segmentation_metrics_edge_cases_and_bad_inputs():
    metrics = dense.segmentation_metrics
    perfect = metrics(dense.segmentation_confusion(torch.tensor([0, 1, 1]), torch.tensor([0, 1, 1]), 3))
    assert perfect["miou"] == 1.0 and perfect["per_class_iou"] == [1.0, 1.0, None]
    all_ignored = metrics(dense.segmentation_confusion(torch.tensor([0, 1]), torch.tensor([255, 255]), 2))
    assert math.isnan(all_ignored["miou"]) and all_ignored["present_classes"] == 0
    with pytest.raises(ValueError, match="label value 3 outside"):
        dense.segmentation_confusion(torch.tensor([0, 1]), torch.tensor([0, 3]), 3)
    with pytest.raises(ValueError, match="differ"):
        dense.segmentation_confusion(torch.zeros(2, 3, dtype=torch.long), torch.zeros(3, 2, dtype=torch.long), 3)
    with pytest.raises(ValueError, match="integer"):
        dense.segmentation_confusion(torch.zeros(3), torch.zeros(3, dtype=torch.long), 3)


def test_depth_metrics_match_float64_formula_with_invalid_pixels():
    rng = np.random.default_rng(1)
    gt = rng.uniform(0.5, 8.0, (2, 13, 11))
    gt[0, :3] = 0.0          # invalid: zero
    gt[1, 5, 5] = np.nan     # invalid: not finite
    pred = gt * rng.uniform(0.7, 1.4, gt.shape)
    pred[np.isnan(pred) | (pred == 0)] = 3.0
    per_image = [dense.depth_image_metrics(torch.from_numpy(pred[i]).float(), torch.from_numpy(gt[i]).float())
                 for i in range(2)]
    ref = []
    for i in range(2):
        valid = np.isfinite(gt[i]) & (gt[i] > 0)
        p, g = pred[i][valid].astype(np.float32).astype(np.float64), gt[i][valid].astype(np.float32).astype(np.float64)
        ref.append({"rmse": np.sqrt(np.mean((p - g) ** 2)), "abs_rel": np.mean(np.abs(p - g) / g),
                    "delta1": np.mean(np.maximum(p / g, g / p) < 1.25), "valid_pixels": int(valid.sum())})
    for got, want in zip(per_image, ref):
        assert got["valid_pixels"] == want["valid_pixels"]
        for k in ("rmse", "abs_rel", "delta1"):
            assert math.isclose(got[k], want[k], rel_tol=1e-12, abs_tol=1e-12), k
    empty = dense.depth_image_metrics(torch.ones(4, 4), torch.zeros(4, 4))
    assert empty is None
    summary = dense.depth_metrics(per_image + [empty])
    assert summary["images"] == 2 and summary["images_without_valid_depth"] == 1
    assert math.isclose(summary["rmse"], (ref[0]["rmse"] + ref[1]["rmse"]) / 2, rel_tol=1e-12)
    with pytest.raises(ValueError, match="finite and positive"):
        dense.depth_image_metrics(torch.zeros(4, 4), torch.ones(4, 4))


def test_silog_loss_matches_formula():
    torch.manual_seed(0)
    gt = torch.rand(2, 9, 7, dtype=torch.float64) * 5 + 0.5
    gt[0, 0] = 0.0
    log_pred = torch.log(gt.clamp_min(0.1)) + 0.3 * torch.randn_like(gt)
    valid = gt > 0
    g = (log_pred[valid] - torch.log(gt[valid])).numpy()
    for lam in (0.0, 0.85):
        want = math.sqrt(np.mean(g ** 2) - lam * np.mean(g) ** 2)
        assert math.isclose(float(dense.silog_loss(log_pred, gt, lam, eps=0.0)), want, rel_tol=1e-12)
    # λ = 1 would ignore a global scale error; λ = 0.85 still sees it
    shifted = torch.log(gt.clamp_min(0.1)) + 0.5
    assert float(dense.silog_loss(shifted, gt, 0.85)) > 0.15


def test_linear_head_commutes_with_bilinear_upsampling():
    """The paper upsamples tokens before its linear depth layer; applying the layer first gives the same map."""
    torch.manual_seed(0)
    head = dense.LinearDenseHead(16, 3)
    torch.nn.init.normal_(head.linear.bias)
    tokens = torch.randn(2, 5, 4, 16)
    first = F.interpolate(head(tokens), size=(20, 16), mode="bilinear", align_corners=False)
    up = F.interpolate(tokens.permute(0, 3, 1, 2), size=(20, 16), mode="bilinear", align_corners=False)
    second = head(up.permute(0, 2, 3, 1))
    torch.testing.assert_close(first, second, rtol=1e-5, atol=1e-5)


# ---- folders, files, generator, pictures ----------------------------------------------------------------------

def _save(path, array, mode=None):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(array, mode=mode).save(path) if mode else Image.fromarray(array).save(path)


def test_folder_pairs_skips_and_reader_errors(tmp_path):
    root = tmp_path / "d"
    rgb = np.zeros((8, 8, 3), np.uint8)
    for stem in ("a", "b", "c"):
        _save(str(root / "images" / f"{stem}.png"), rgb)
    _save(str(root / "images" / "a.jpg"), rgb)                      # duplicate stem
    _save(str(root / "masks" / "a.png"), np.ones((8, 8), np.uint8))
    _save(str(root / "masks" / "b.png"), np.zeros((8, 8, 3), np.uint8))  # colour mask: unusable
    _save(str(root / "masks" / "z.png"), np.ones((8, 8), np.uint8))  # no image
    (root / "images" / "notes.txt").write_text("not an image")
    folder = find_dense_pairs(str(root), "seg")
    assert [p.stem for p in folder.pairs] == ["a", "b"]
    reasons = " | ".join(r for _, r in folder.skipped)
    assert "another file with the stem 'a'" in reasons and "no masks/c.* label" in reasons
    assert "no images/z.* image" in reasons and len(folder.skipped) == 3
    assert read_mask(folder.pairs[0].label).tolist() == np.ones((8, 8)).tolist()
    with pytest.raises(DenseFileError, match="single-channel"):
        read_mask(folder.pairs[1].label)
    with pytest.raises(ValueError, match="has no depth/ folder"):
        find_dense_pairs(str(root), "depth", "--train")
    with pytest.raises(ValueError, match="--val .* is not a folder"):
        find_dense_pairs(str(tmp_path / "missing"), "seg", "--val")


def test_depth_files_png_millimetres_and_npy_metres(tmp_path):
    mm = np.array([[0, 1000], [2500, 65535]], np.uint16)
    _save(str(tmp_path / "d.png"), mm)
    assert np.array_equal(read_depth(str(tmp_path / "d.png")), np.float32([[0.0, 1.0], [2.5, 65.535]]))
    np.save(tmp_path / "d.npy", np.array([[1.5, np.nan], [-1.0, np.inf]]))
    assert read_depth(str(tmp_path / "d.npy")).tolist() == [[1.5, 0.0], [0.0, 0.0]]
    _save(str(tmp_path / "eight.png"), np.full((2, 2), 7, np.uint8))
    with pytest.raises(DenseFileError, match="16-bit"):
        read_depth(str(tmp_path / "eight.png"))
    np.save(tmp_path / "ints.npy", np.ones((2, 2), np.int64))
    with pytest.raises(DenseFileError, match="float metres"):
        read_depth(str(tmp_path / "ints.npy"))
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nbroken")
    with pytest.raises(DenseFileError, match="cannot read depth"):
        read_depth(str(tmp_path / "broken.png"))


def test_synthetic_generator_is_deterministic_and_labels_are_consistent(tmp_path):
    a, m = segmentation_sample(3, 48, seed=5)
    b, m2 = segmentation_sample(3, 48, seed=5)
    assert np.array_equal(a, b) and np.array_equal(m, m2)
    assert not np.array_equal(a, segmentation_sample(4, 48, seed=5)[0])
    assert set(np.unique(m)) <= {0, 1, 2, 3, 255} and (m > 0).any() and (m == 255).any()
    image, depth = depth_sample(2, 48, seed=5)
    assert image.shape == (48, 48, 3) and depth.dtype == np.float32
    assert (depth == 0).any() and (depth > 0).mean() > 0.8 and depth.max() <= 10.0
    write_dense_dataset(str(tmp_path / "d"), "depth", 2, 32, seed=1)
    folder = find_dense_pairs(str(tmp_path / "d"), "depth")
    back = read_depth(folder.pairs[1].label)
    assert np.allclose(back, depth_sample(1, 32, seed=1)[1], atol=5e-4)  # millimetre rounding


def test_pictures_palette_reads_back_and_depth_invalid_is_black():
    classes = np.array([[0, 1], [7, 255]], np.uint8)
    img = dense.colorize_segmentation(classes)
    assert img.mode == "P" and np.array_equal(np.asarray(img), classes)
    rgb = np.asarray(img.convert("RGB"))
    assert rgb[0, 0].tolist() == [0, 0, 0] and rgb[1, 1].tolist() == [255, 255, 255]
    assert len({tuple(c) for c in dense.segmentation_palette()[:20].tolist()}) == 20
    pic = np.asarray(dense.colorize_depth(np.array([[0.0, 1.0], [4.0, np.nan]])))
    assert pic[0, 0].tolist() == [0, 0, 0] and pic[1, 1].tolist() == [0, 0, 0]
    assert pic[0, 1].tolist() != pic[1, 0].tolist()


# ---- the probes learn -----------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_model():
    torch.manual_seed(0)
    backbone = DinoVisionTransformer(img_size=64, patch_size=8, embed_dim=128, depth=2, num_heads=2, init_values=1.0)
    return FeatureModel(backbone, "dinov2", 8, 128, default_image_size=64)


def _splits(model, root, task):
    write_dense_dataset(str(root / "train"), task, 96, 64, seed=0)
    write_dense_dataset(str(root / "val"), task, 32, 64, seed=1)
    train = dense.extract_dense_split(model, find_dense_pairs(str(root / "train"), task), 64)
    val = dense.extract_dense_split(model, find_dense_pairs(str(root / "val"), task), 64)
    assert train.patch.shape == (96, 8, 8, 128) and train.cls.shape == (96, 128) and train.labels.shape == (96, 64, 64)
    return train, val


def _seg_miou(head, val, num_classes):
    conf = sum(dense.segmentation_confusion(dense.predict_segmentation(head, val, i, (64, 64)), val.labels[i].long(),
                                            num_classes) for i in range(len(val.stems)))
    return dense.segmentation_metrics(conf)["miou"]


def test_segmentation_probe_learns_and_shuffled_labels_do_not(tiny_model, tmp_path):
    train, val = _splits(tiny_model, tmp_path, "seg")
    head = dense.train_segmentation_head(train, 4, epochs=30, lr=3e-3)
    miou = _seg_miou(head, val, 4)
    majority = dense.training_baseline("seg", train)
    assert majority == 0.0  # background
    base = dense.segmentation_metrics(dense.segmentation_confusion(
        torch.zeros_like(val.labels, dtype=torch.long), val.labels.long(), 4))["miou"]
    assert base < 0.3
    assert miou > 0.75 and miou > base + 0.45, (miou, base)
    # control: the same training with masks shuffled across images only learns a spatial prior
    shuffled = train.labels[torch.randperm(96, generator=torch.Generator().manual_seed(0))]
    control = dense.DenseFeatures(train.patch, train.cls, shuffled, train.stems, train.images, train.label_paths)
    assert _seg_miou(dense.train_segmentation_head(control, 4, epochs=30, lr=3e-3), val, 4) < 0.5


def test_depth_probe_learns_and_beats_the_mean(tiny_model, tmp_path):
    train, val = _splits(tiny_model, tmp_path, "depth")
    head = dense.train_depth_head(train, epochs=30, lr=3e-3)
    mean_depth = dense.training_baseline("depth", train)
    ours = dense.depth_metrics([dense.depth_image_metrics(dense.predict_depth(head, val, i, (64, 64)), val.labels[i])
                                for i in range(32)])
    base = dense.depth_metrics([dense.depth_image_metrics(torch.full((64, 64), mean_depth), val.labels[i])
                                for i in range(32)])
    assert ours["rmse"] < 0.75 * base["rmse"], (ours, base)
    assert ours["delta1"] > base["delta1"] + 0.15, (ours, base)
    assert ours["images"] == 32 and ours["images_without_valid_depth"] == 0


def test_extraction_skips_unreadable_files_and_rejects_bad_sizes(tiny_model, tmp_path):
    write_dense_dataset(str(tmp_path / "d"), "seg", 3, 32, seed=0)
    (tmp_path / "d" / "images" / "0001.png").write_bytes(b"not a png")
    folder = find_dense_pairs(str(tmp_path / "d"), "seg")
    split = dense.extract_dense_split(tiny_model, folder, 32)
    assert split.stems == ["0000", "0002"] and "cannot read image" in split.skipped[0][1]
    with pytest.raises(ValueError, match="not a multiple of the model's patch size 8"):
        dense.extract_dense_split(tiny_model, folder, 30)
    for name in ("0000.png", "0002.png"):
        (tmp_path / "d" / "masks" / name).write_bytes(b"")
    with pytest.raises(ValueError, match="no usable image/label pairs"):
        dense.extract_dense_split(tiny_model, find_dense_pairs(str(tmp_path / "d"), "seg"), 32)


def test_head_save_load_round_trip_and_mismatch(tmp_path):
    head = dense.LinearDenseHead(8, 3)
    torch.nn.init.normal_(head.linear.weight)
    path = str(tmp_path / "head.pth")
    dense.save_head(path, head, "seg", {"embed_dim": 8, "patch_size": 4, "image_size": 32, "num_classes": 3})
    back, info = dense.load_head(path, "seg", 8, 4)
    assert torch.equal(back.linear.weight, head.linear.weight) and info["num_classes"] == 3
    with pytest.raises(ValueError, match="is a seg head, not depth"):
        dense.load_head(path, "depth", 8, 4)
    with pytest.raises(ValueError, match="width 8 and patch 4"):
        dense.load_head(path, "seg", 16, 4)
    (tmp_path / "junk.pth").write_bytes(b"junk")
    with pytest.raises(ValueError, match="cannot be read"):
        dense.load_head(str(tmp_path / "junk.pth"), "seg", 8, 4)
