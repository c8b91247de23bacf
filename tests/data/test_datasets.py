"""ImageFolder, DigitsDataset and collate_multicrop (dinokernels.data.datasets)."""
import io
import os

import numpy as np
import pytest
import torch
from PIL import Image, features

from dinokernels.data import (DIGITS_MEAN, DIGITS_STD, DataAugmentationDINO, DigitsDataset, EvalTransform,
                              ImageFolder, collate_multicrop)

HAS_WEBP = features.check("webp")


def _write(path, fmt, size=(10, 8), color=(200, 30, 60)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color).save(path, fmt)
    return path


def _truncated_jpeg(path):
    rng = np.random.default_rng(0)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(buf, "JPEG")
    path.write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    return path


@pytest.fixture
def tree(tmp_path):
    root = tmp_path / "imgs"
    _write(root / "cat" / "a.jpg", "JPEG", size=(12, 9))
    _write(root / "cat" / "deep" / "er" / "b.png", "PNG")
    _write(root / "dog" / "c.PNG", "PNG", size=(7, 5))          # extension matched case-insensitively
    if HAS_WEBP:
        _write(root / "dog" / "d.webp", "WEBP")
    (root / "dog" / "notes.txt").write_text("not an image")
    _write(root / ".cache" / "hidden.png", "PNG")               # hidden folders are ignored
    _write(root / "dog" / ".hidden.png", "PNG")                 # ... and hidden files
    (root / "empty").mkdir()                                    # no images: not a class
    return root


# ------------------------------------------------------------------ ImageFolder

def test_image_folder_recursive_discovery_and_labels(tree):
    ds = ImageFolder(tree)
    rel = sorted(os.path.relpath(p, tree) for p, _ in ds.samples)
    expected = ["cat/a.jpg", "cat/deep/er/b.png", "dog/c.PNG"] + (["dog/d.webp"] if HAS_WEBP else [])
    assert rel == sorted(os.path.normpath(e) for e in expected)
    assert ds.classes == ["cat", "dog"] and len(ds) == len(expected)
    by_name = {os.path.basename(p): label for p, label in ds.samples}
    assert by_name["a.jpg"] == by_name["b.png"] == 0 and by_name["c.PNG"] == 1
    assert ds.targets == [label for _, label in ds.samples]
    for i in range(len(ds)):
        img, label = ds[i]
        assert isinstance(img, Image.Image) and img.mode == "RGB" and label == ds.samples[i][1]
    assert ds.skipped == 0 and ds.skipped_paths == []


@pytest.mark.skipif(not HAS_WEBP, reason="this Pillow build has no WebP support")
def test_image_folder_reads_webp(tree):
    ds = ImageFolder(tree)
    i = next(k for k, (p, _) in enumerate(ds.samples) if p.endswith(".webp"))
    img, label = ds[i]
    assert img.size == (10, 8) and label == 1 and ds.skipped == 0


def test_image_folder_transform_and_extensions(tree):
    ds = ImageFolder(tree, transform=EvalTransform(resize=6, crop=4), extensions=(".png",))
    assert sorted(os.path.basename(p) for p, _ in ds.samples) == ["b.png", "c.PNG"]
    x, label = ds[0]
    assert isinstance(x, torch.Tensor) and x.shape == (3, 4, 4)


def test_image_folder_flat_and_mixed_layouts(tmp_path):
    flat = tmp_path / "flat"
    for k in range(3):
        _write(flat / f"{k}.png", "PNG")
    ds = ImageFolder(flat)
    assert ds.classes == ["."] and ds.targets == [0, 0, 0]
    _write(flat / "sub" / "x.jpg", "JPEG")
    ds = ImageFolder(flat)  # images directly in root form class "." (first), sub-folders follow
    assert ds.classes == [".", "sub"]
    assert sorted(ds.targets) == [0, 0, 0, 1]


def test_image_folder_skips_and_counts_unreadable_files(tmp_path):
    root = tmp_path / "data"
    _write(root / "a" / "0.png", "PNG", color=(1, 2, 3))
    (root / "a" / "1.jpg").write_bytes(b"definitely not a jpeg")
    _truncated_jpeg(root / "a" / "2.jpg")
    _write(root / "a" / "3.png", "PNG", color=(4, 5, 6))
    ds = ImageFolder(root, transform=EvalTransform(resize=4, crop=4))
    assert len(ds) == 4 and ds.skipped == 0                       # lazily checked
    x, label = ds[1]                                               # 1.jpg and 2.jpg are bad: 3.png comes back
    ref, _ = ImageFolder(root, transform=EvalTransform(resize=4, crop=4))[3]
    assert torch.equal(x, ref) and label == 0
    assert ds.skipped == 2 and sorted(map(os.path.basename, ds.skipped_paths)) == ["1.jpg", "2.jpg"]
    for i in range(len(ds)):                                       # never raises, never double counts
        ds[i]
    assert ds.skipped == 2 and len(ds.skipped_paths) == 2


def test_image_folder_verify_drops_bad_files(tmp_path):
    root = tmp_path / "data"
    _write(root / "0.png", "PNG")
    (root / "1.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    _truncated_jpeg(root / "2.jpg")
    _write(root / "3.jpg", "JPEG")
    ds = ImageFolder(root)
    assert ds.verify() == 1 and len(ds) == 3 and ds.skipped == 1   # the header check misses truncated JPEG data
    assert ds.verify(full=True) == 1 and len(ds) == 2 and ds.skipped == 2
    assert sorted(map(os.path.basename, ds.skipped_paths)) == ["1.png", "2.jpg"]
    assert sorted(os.path.basename(p) for p, _ in ds.samples) == ["0.png", "3.jpg"]
    assert all(isinstance(ds[i][0], Image.Image) for i in range(len(ds)))
    assert ds.verify(full=True) == 0 and ds.skipped == 2


def test_image_folder_all_unreadable_raises(tmp_path):
    root = tmp_path / "bad"
    root.mkdir()
    for k in range(3):
        (root / f"{k}.jpg").write_bytes(b"junk")
    ds = ImageFolder(root)
    with pytest.raises(RuntimeError, match="could be read"):
        ds[0]
    assert ds.skipped == 3
    with pytest.raises(RuntimeError, match="could be read"):
        ImageFolder(root).verify()


def test_image_folder_missing_or_empty_root(tmp_path):
    missing = tmp_path / "nope"
    with pytest.raises(FileNotFoundError, match="nope"):
        ImageFolder(missing)
    empty = tmp_path / "empty"
    (empty / "sub").mkdir(parents=True)
    (empty / "sub" / "readme.txt").write_text("x")
    with pytest.raises(ValueError, match="empty"):
        ImageFolder(empty)


# ------------------------------------------------------------------ DigitsDataset

@pytest.fixture(scope="module")
def digits():
    return DigitsDataset()


def test_digits_all(digits):
    assert len(digits) == 1797 and len(digits.targets) == 1797
    assert sorted(set(digits.targets)) == list(range(10))
    img, label = digits[5]
    assert isinstance(img, Image.Image) and img.mode == "RGB" and img.size == (32, 32)
    assert label == digits.targets[5] and isinstance(label, int)
    arr = np.asarray(img)
    assert np.array_equal(arr[..., 0], arr[..., 1]) and arr.max() > 200 and arr.min() < 30


def test_digits_match_scikit_learn():
    from sklearn.datasets import load_digits

    ref = load_digits()
    ds = DigitsDataset(size=8)
    assert ds.targets == ref.target.tolist()
    for i in (0, 100, 1796):
        got = np.asarray(ds[i][0])[..., 0].astype(np.float64)
        np.testing.assert_allclose(got, ref.images[i] * 255 / 16, atol=0.5)


def test_digits_split(digits):
    train, test = DigitsDataset(split="train"), DigitsDataset(split="test")
    assert set(train.indices).isdisjoint(test.indices)
    assert sorted(train.indices + test.indices) == list(range(1797))
    assert 340 <= len(test) <= 380
    all_counts = np.bincount(digits.targets, minlength=10)
    test_counts = np.bincount(test.targets, minlength=10)
    np.testing.assert_array_equal(test_counts, np.round(all_counts * 0.2).astype(int))   # stratified
    i = 7
    assert test.targets[i] == digits.targets[test.indices[i]]
    assert np.array_equal(np.asarray(test[i][0]), np.asarray(digits[test.indices[i]][0]))
    assert DigitsDataset(split="test").indices == test.indices                         # deterministic
    assert DigitsDataset(split="test", seed=1).indices != test.indices
    assert len(DigitsDataset(split="test", test_fraction=0.5)) > 850
    with pytest.raises(ValueError, match="split"):
        DigitsDataset(split="val")
    with pytest.raises(ValueError, match="test_fraction"):
        DigitsDataset(test_fraction=1.0)


def test_digits_statistics_constants(digits):
    x = digits.images.astype(np.float64) / 255.0
    assert digits.images.shape == (1797, 32, 32)
    np.testing.assert_allclose(DIGITS_MEAN, [x.mean()] * 3, rtol=0, atol=1e-7)
    np.testing.assert_allclose(DIGITS_STD, [x.std()] * 3, rtol=0, atol=1e-7)
    feats = torch.stack([EvalTransform(32, 32, DIGITS_MEAN, DIGITS_STD)(digits[i][0]) for i in range(0, 1797, 7)])
    assert abs(feats.mean().item()) < 0.05 and abs(feats.std().item() - 1) < 0.05


def test_digits_size_and_transform():
    ds = DigitsDataset(transform=EvalTransform(16, 16), size=16)
    x, label = ds[0]
    assert x.shape == (3, 16, 16) and label == 0


# ------------------------------------------------------------------ collation and DataLoader

def test_collate_multicrop_shapes():
    aug = DataAugmentationDINO(global_size=16, local_size=8, local_crops_number=3)
    img = Image.new("RGB", (20, 20), (10, 20, 30))
    batch = [(aug(img), k) for k in range(5)]
    crops, labels = collate_multicrop(batch)
    assert [tuple(c.shape) for c in crops] == [(5, 3, 16, 16)] * 2 + [(5, 3, 8, 8)] * 3
    assert torch.equal(crops[3][2], batch[2][0][3])
    assert labels.dtype == torch.int64 and labels.tolist() == [0, 1, 2, 3, 4]
    with pytest.raises(ValueError, match="same number of crops"):
        collate_multicrop([(batch[0][0], 0), (batch[1][0][:2], 1)])


@pytest.mark.parametrize("workers", [0, 2])
def test_dataloader_pipeline_is_reproducible(workers):
    aug = DataAugmentationDINO(global_size=16, local_size=8, local_crops_number=2, mean=DIGITS_MEAN, std=DIGITS_STD)
    ds = torch.utils.data.Subset(DigitsDataset(transform=aug, size=16), range(16))

    def first_batch(seed):
        torch.manual_seed(seed)
        loader = torch.utils.data.DataLoader(ds, batch_size=8, shuffle=True, num_workers=workers,
                                             collate_fn=collate_multicrop)
        return next(iter(loader))

    (a, la), (b, lb) = first_batch(0), first_batch(0)
    assert [tuple(c.shape) for c in a] == [(8, 3, 16, 16)] * 2 + [(8, 3, 8, 8)] * 2
    assert torch.equal(la, lb) and all(torch.equal(x, y) for x, y in zip(a, b))
    c, _ = first_batch(1)
    assert not all(torch.equal(x, y) for x, y in zip(a, c))
