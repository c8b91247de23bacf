"""The generated cluttered digits (dinokernels.data.synthetic): deterministic, correctly labelled, in range, balanced,
split by source digit; the built-in data sets by name."""
import numpy as np
import pytest
import torch
from PIL import Image

from dinokernels.data import (BUILTIN_DATASETS, CLUTTERED_MEAN, CLUTTERED_STD, DIGITS_MEAN, DIGITS_STD,
                              ClutteredDigitsDataset, DigitsDataset, EvalTransform, builtin_dataset, builtin_stats)
from dinokernels.data import synthetic
from dinokernels.data.synthetic import cluttered_digits_arrays

SMALL = dict(size=16, per_digit=1)  # the cheapest setting for the structural checks


def test_deterministic_and_seed_dependent():
    a, ya, sa = cluttered_digits_arrays("test", **SMALL)
    # regenerate (the uncached function), not a cached copy
    b, yb, sb = synthetic._cached_arrays.__wrapped__("test", 16, 1, 0, 0.2, (0.5, 0.8), (1, 3), (1, 2), 0.03)
    assert a is not b and np.array_equal(a, b) and np.array_equal(ya, yb) and np.array_equal(sa, sb)
    c, _, sc = cluttered_digits_arrays("test", seed=1, **SMALL)
    assert not np.array_equal(sa, sc)  # another seed: another split of the source digits
    assert not np.array_equal(a, c)


def test_labels_are_the_source_digits_labels():
    from sklearn.datasets import load_digits

    target = load_digits().target
    for split in ("train", "test"):
        _, labels, sources = cluttered_digits_arrays(split, **SMALL)
        assert labels.dtype == np.int64 and np.array_equal(labels, target[sources])


def test_images_in_range_and_not_degenerate():
    images, labels, _ = cluttered_digits_arrays("test", **SMALL)
    assert images.dtype == np.uint8 and images.shape == (len(labels), 16, 16, 3)
    assert not images.flags.writeable  # cached arrays are shared: read-only
    per_image_std = images.reshape(len(images), -1).std(1)
    assert per_image_std.min() > 5  # every canvas has content (digit, clutter), none is flat
    # colours vary across canvases (the nuisance raw pixels suffer from)
    assert images.reshape(len(images), -1, 3).mean(1).std(0).min() > 10


def test_the_labelled_digit_is_drawn():
    # Without clutter and noise, the brightest-minus-background map of a canvas correlates with its own glyph
    # (placed where it is drawn) far more than with another class's glyph: the digit really is the label.
    images, labels, sources = cluttered_digits_arrays("test", size=16, per_digit=1, n_strokes=(0, 0),
                                                      n_fragments=(0, 0), noise=0.0)
    lum = images.astype(np.float32) @ np.array([0.299, 0.587, 0.114], np.float32)
    from sklearn.datasets import load_digits

    glyphs = load_digits().images / 16.0
    idx = np.arange(0, len(labels), 7)
    own, other = [], []
    for i in idx:
        own.append(_best_match(lum[i], glyphs[sources[i]]))
        j = sources[(np.flatnonzero(labels != labels[i]))[0]]
        other.append(_best_match(lum[i], glyphs[j]))
    assert np.mean(own) > np.mean(other) + 0.1, (np.mean(own), np.mean(other))


def _best_match(image, glyph):
    """Max over positions and sizes of the correlation between `image` and the resized glyph."""
    best = -1.0
    size = image.shape[0]
    for side in range(int(size * 0.5), int(size * 0.8) + 1):
        g = np.asarray(Image.fromarray(glyph.astype(np.float32), mode="F").resize((side, side),
                                                                                  Image.Resampling.BICUBIC))
        g = (g - g.mean()) / (g.std() + 1e-6)
        for top in range(size - side + 1):
            for left in range(size - side + 1):
                patch = image[top:top + side, left:left + side]
                p = (patch - patch.mean()) / (patch.std() + 1e-6)
                best = max(best, float((p * g).mean()))
    return best


def test_classes_balanced_and_split_by_source_digit():
    _, ytr, str_ = cluttered_digits_arrays("train", **SMALL)
    _, yte, ste = cluttered_digits_arrays("test", **SMALL)
    assert not set(str_.tolist()) & set(ste.tolist())  # no test digit instance is seen in training
    assert sorted(str_.tolist() + ste.tolist()) == list(range(1797))
    for labels in (ytr, yte):
        counts = np.bincount(labels, minlength=10)
        assert counts.min() > 0 and counts.max() / counts.min() < 1.1, counts
    assert 0.19 < len(yte) / 1797 < 0.21
    # per_digit canvases per source digit, each one different
    images, _, sources = cluttered_digits_arrays("test", size=16, per_digit=2)
    assert np.array_equal(sources[0::2], sources[1::2]) and np.array_equal(sources[0::2], ste)
    assert all(not np.array_equal(images[k], images[k + 1]) for k in range(0, 40, 2))


def test_normalisation_statistics_match_the_default_train_split():
    images, _, _ = cluttered_digits_arrays("train")
    x = images.reshape(-1, 3).astype(np.float64) / 255.0
    np.testing.assert_allclose(x.mean(0), CLUTTERED_MEAN, atol=1e-5)
    np.testing.assert_allclose(x.std(0), CLUTTERED_STD, atol=1e-5)


def test_dataset_items_and_transform():
    ds = ClutteredDigitsDataset(split="test", size=16, per_digit=1)
    img, label = ds[3]
    assert isinstance(img, Image.Image) and img.mode == "RGB" and img.size == (16, 16)
    assert label == ds.targets[3] and 0 <= label <= 9 and len(ds) == len(ds.sources) == 359
    tf = EvalTransform(16, 16, CLUTTERED_MEAN, CLUTTERED_STD)
    x, y = ClutteredDigitsDataset(transform=tf, split="test", size=16, per_digit=1)[3]
    assert x.shape == (3, 16, 16) and x.dtype == torch.float32 and y == label
    assert "359 images" in repr(ds)


@pytest.mark.parametrize("kwargs, word", [(dict(split="val"), "split"), (dict(size=4), "size"),
                                          (dict(per_digit=0), "per_digit"), (dict(scale=(0.9, 0.5)), "scale"),
                                          (dict(n_strokes=(2, 1)), "n_strokes"), (dict(noise=-1.0), "noise"),
                                          (dict(test_fraction=1.0), "test_fraction")])
def test_bad_arguments_are_named(kwargs, word):
    with pytest.raises(ValueError, match=word):
        cluttered_digits_arrays(**kwargs)


def test_builtin_datasets_by_name():
    assert BUILTIN_DATASETS == ("digits", "cluttered-digits", "coloured-digits")
    assert isinstance(builtin_dataset("digits", "test", 16), DigitsDataset)
    ds = builtin_dataset("cluttered-digits", "test", 16)
    assert isinstance(ds, ClutteredDigitsDataset) and ds.size == 16
    assert builtin_stats("digits") == (DIGITS_MEAN, DIGITS_STD)
    assert builtin_stats("cluttered-digits") == (CLUTTERED_MEAN, CLUTTERED_STD)
    for call in (lambda: builtin_dataset("mnist", "train", 16), lambda: builtin_stats("mnist")):
        with pytest.raises(ValueError, match="built-in data set"):
            call()
