"""The generated coloured digits (the default job's data): deterministic, correctly labelled, split by source digit,
coloured as documented (a bright digit of random hue on a dark background of another hue), zoomed by a random crop;
the normalisation statistics; bad arguments."""
import colorsys

import numpy as np
import pytest
from PIL import Image
from sklearn.datasets import load_digits

from dinokernels.data import (COLOURED_MEAN, COLOURED_STD, ColouredDigitsDataset, EvalTransform, builtin_dataset,
                              builtin_stats)
from dinokernels.data import synthetic
from dinokernels.data.synthetic import coloured_digits_arrays


def test_deterministic_and_seed_dependent():
    a, ya, sa = coloured_digits_arrays("test")
    b, yb, sb = synthetic._cached_coloured.__wrapped__("test", 16, 1, 0, 0.2, 0.5, 0.35)  # regenerated, not cached
    assert a is not b and np.array_equal(a, b) and np.array_equal(ya, yb) and np.array_equal(sa, sb)
    c, _, sc = coloured_digits_arrays("test", seed=1)
    assert not np.array_equal(sa, sc) and not np.array_equal(a, c)
    assert not a.flags.writeable


def test_labels_split_and_per_digit():
    target = load_digits().target
    _, ytr, str_ = coloured_digits_arrays("train")
    _, yte, ste = coloured_digits_arrays("test")
    assert np.array_equal(ytr, target[str_]) and np.array_equal(yte, target[ste])
    assert not set(str_.tolist()) & set(ste.tolist()) and sorted(str_.tolist() + ste.tolist()) == list(range(1797))
    # the same split as the plain digits (DigitsDataset's stratified split for the seed)
    from dinokernels.data import DigitsDataset
    assert ste.tolist() == DigitsDataset(size=16, split="test").indices
    images, _, sources = coloured_digits_arrays("test", per_digit=2)
    assert np.array_equal(sources[0::2], ste) and np.array_equal(sources[1::2], ste)
    assert all(not np.array_equal(images[k], images[k + 1]) for k in range(0, 40, 2))


def _hue(rgb):
    return colorsys.rgb_to_hsv(*(np.asarray(rgb, np.float64) / 255.0))[0]


def test_colours_without_zoom_are_a_bright_digit_on_a_dark_background():
    images, labels, sources = coloured_digits_arrays("test", zoom=1.0)
    glyphs = load_digits().images / 16.0
    fg_hues, bg_hues = [], []
    for image, src in zip(images[:60], sources[:60]):
        glyph = np.asarray(Image.fromarray(glyphs[src].astype(np.float32), mode="F").resize((16, 16),
                                                                                           Image.Resampling.BICUBIC))
        ink, paper = image[glyph > 0.95], image[glyph < 0.02]
        assert len(ink) and len(paper)
        # ink: saturated and bright (max channel 255); bare background: saturated, value 0.35
        assert (ink.max(1) >= 240).all() and (ink.min(1) <= 6).all()  # ≥ 95 % ink
        assert (np.abs(paper.max(1) - 0.35 * 255) <= 6).all() and (paper.min(1) <= 6).all()  # ≤ 2 % ink
        fg_hues.append(_hue(ink[0]))
        bg_hues.append(_hue(paper[0]))
    # hues cover the circle, independently for digit and background
    for hues in (fg_hues, bg_hues):
        assert np.histogram(hues, bins=4, range=(0, 1))[0].min() >= 5
    assert abs(np.corrcoef(fg_hues, bg_hues)[0, 1]) < 0.5


def test_zoom_crops_and_enlarges():
    plain, _, _ = coloured_digits_arrays("test", zoom=1.0)
    zoomed, _, _ = coloured_digits_arrays("test", zoom=0.5)
    assert zoomed.shape == plain.shape == (359, 16, 16, 3)
    # same colours (the hues are drawn first), different framing for most images
    differ = [not np.array_equal(a, b) for a, b in zip(plain, zoomed)]
    assert np.mean(differ) > 0.8


def test_normalisation_statistics_match_the_default_train_split():
    images, _, _ = coloured_digits_arrays("train")
    x = images.reshape(-1, 3).astype(np.float64) / 255.0
    np.testing.assert_allclose(x.mean(0), COLOURED_MEAN, atol=1e-5)
    np.testing.assert_allclose(x.std(0), COLOURED_STD, atol=1e-5)


def test_dataset_items_and_by_name():
    ds = builtin_dataset("coloured-digits", "test", 16)
    assert isinstance(ds, ColouredDigitsDataset) and len(ds) == len(ds.sources) == 359
    img, label = ds[5]
    assert isinstance(img, Image.Image) and img.mode == "RGB" and img.size == (16, 16) and label == ds.targets[5]
    x, y = ColouredDigitsDataset(transform=EvalTransform(16, 16, COLOURED_MEAN, COLOURED_STD), split="test")[5]
    assert x.shape == (3, 16, 16) and y == label
    assert builtin_stats("coloured-digits") == (COLOURED_MEAN, COLOURED_STD)
    assert "359 images" in repr(ds) and "zoom=0.5" in repr(ds)


@pytest.mark.parametrize("kwargs, word", [(dict(split="val"), "split"), (dict(size=4), "size"),
                                          (dict(per_digit=0), "per_digit"), (dict(zoom=0.0), "zoom"),
                                          (dict(zoom=1.5), "zoom"), (dict(background_value=1.0), "background_value"),
                                          (dict(test_fraction=0.0), "test_fraction")])
def test_bad_arguments_are_named(kwargs, word):
    with pytest.raises(ValueError, match=word):
        coloured_digits_arrays(**kwargs)
