"""Data sets generated from scikit-learn's digits, on which raw pixels fail: cluttered digits (below) and coloured
digits (`coloured_digits_arrays`: each digit in random colours and zoomed, what `dinokernels pretrain` trains on by
default).

Cluttered digits: the invariances DINO would have to learn from multi-crop.

Each sample is a ``size × size`` RGB canvas with **one** scikit-learn digit (the label) drawn at a random position,
scale and colour over clutter: a random background colour with a smooth gradient, random line strokes and a few
small fragments of other digits, plus pixel noise. The labelled digit is drawn last (never occluded) and is the
largest glyph on the canvas.

The split is by **source digit**: train and test canvases are drawn from the two sides of DigitsDataset's seeded
stratified split of the 1797 scikit-learn images (fragments too), so every test digit is an instance never seen in
training. Generation is deterministic: sample ``i`` of a split uses its own ``numpy.random.RandomState`` seeded from
``(seed, split, i)`` through ``numpy.random.SeedSequence`` (both streams are frozen across numpy versions).
"""
from __future__ import annotations

import colorsys
import functools
from typing import Callable, List, Optional, Tuple

import numpy as np
import torch
from PIL import Image

__all__ = ["ClutteredDigitsDataset", "cluttered_digits_arrays", "CLUTTERED_MEAN", "CLUTTERED_STD",
           "ColouredDigitsDataset", "coloured_digits_arrays", "COLOURED_MEAN", "COLOURED_STD", "BUILTIN_DATASETS",
           "builtin_dataset", "builtin_stats"]

# Per-channel mean / std, in [0, 1], of the default train split (size 24, seed 0, 2 canvases per digit).
# tests/data/test_synthetic.py recomputes them.
CLUTTERED_MEAN = (0.35749138, 0.37969509, 0.35109284)
CLUTTERED_STD = (0.18641021, 0.20081001, 0.18020315)

_SPLITS = {"train": 1, "test": 2}
DARK = 0.6


def _glyphs() -> Tuple[np.ndarray, np.ndarray]:
    """scikit-learn's digits as float32 coverage maps in [0, 1] (N, 8, 8), and labels (N,) int64."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    return (digits.images / 16.0).astype(np.float32), digits.target.astype(np.int64)


def _resize_glyph(glyph: np.ndarray, height: int, width: int) -> np.ndarray:
    """An 8×8 coverage map resized (bicubic, float) to (height, width), clipped to [0, 1]."""
    img = Image.fromarray(glyph, mode="F").resize((width, height), Image.Resampling.BICUBIC)
    return np.clip(np.asarray(img, dtype=np.float32), 0.0, 1.0)


def _luminance(rgb: np.ndarray) -> float:
    return float(rgb @ np.array([0.299, 0.587, 0.114], dtype=np.float32))


def _paint(canvas: np.ndarray, alpha: np.ndarray, top: int, left: int, color: np.ndarray) -> None:
    """Alpha-blends `color` (3,) into canvas (S, S, 3) with coverage `alpha` (h, w) at (top, left), clipped to the
    canvas."""
    size = canvas.shape[0]
    h, w = alpha.shape
    t0, l0 = max(top, 0), max(left, 0)
    t1, l1 = min(top + h, size), min(left + w, size)
    if t1 <= t0 or l1 <= l0:
        return
    a = alpha[t0 - top:t1 - top, l0 - left:l1 - left, None]
    region = canvas[t0:t1, l0:l1]
    region *= 1.0 - a
    region += a * color


@functools.lru_cache(maxsize=4)
def _grid(size: int) -> np.ndarray:
    """(2, size, size) float32 pixel row and column indices (read-only, shared)."""
    grid = np.mgrid[0:size, 0:size].astype(np.float32)
    grid.setflags(write=False)
    return grid


def _stroke(size: int, rng: np.random.RandomState, width: float) -> np.ndarray:
    """Coverage map (size, size) of a straight segment between two random points, anti-aliased."""
    p0, p1 = rng.uniform(-0.1 * size, 1.1 * size, size=(2, 2))
    yy, xx = _grid(size) + 0.5
    d = p1 - p0
    t = np.clip(((xx - p0[0]) * d[0] + (yy - p0[1]) * d[1]) / max(float(d @ d), 1e-6), 0.0, 1.0)
    dist = np.hypot(xx - (p0[0] + t * d[0]), yy - (p0[1] + t * d[1]))
    return np.clip(width / 2 + 0.5 - dist, 0.0, 1.0)


def _random_color(rng: np.random.RandomState) -> np.ndarray:
    return rng.uniform(0.0, 1.0, size=3).astype(np.float32)


def _brighter_color(rng: np.random.RandomState, background: np.ndarray, min_gap: float) -> np.ndarray:
    """A random colour at least `min_gap` brighter (luminance) than `background`, so the digit is always visible and
    always lighter than what is under it; a few draws, then a light tint."""
    lum_bg = _luminance(background)
    for _ in range(20):
        color = _random_color(rng)
        if _luminance(color) - lum_bg >= min_gap:
            return color
    return _random_color(rng) * 0.25 + 0.75


def _canvas(rng: np.random.RandomState, size: int, glyph: np.ndarray, others: np.ndarray,
            scale: Tuple[float, float], n_strokes: Tuple[int, int], n_fragments: Tuple[int, int],
            noise: float) -> np.ndarray:
    """One (size, size, 3) float32 canvas in [0, 1]: background, clutter, then the labelled glyph."""
    bg0, bg1 = _random_color(rng) * DARK, _random_color(rng) * DARK  # dark backgrounds, light digits
    # A smooth gradient between two colours, in a random direction, mixed mostly towards bg0.
    angle = rng.uniform(0, 2 * np.pi)
    yy, xx = _grid(size) / max(size - 1, 1)
    ramp = (np.cos(angle) * (xx - 0.5) + np.sin(angle) * (yy - 0.5)) * rng.uniform(0.2, 0.6) + 0.5
    canvas = (bg0 * (1 - ramp[..., None] * 0.5) + bg1 * (ramp[..., None] * 0.5)).astype(np.float32)
    for _ in range(rng.randint(n_strokes[0], n_strokes[1] + 1)):
        _paint(canvas, _stroke(size, rng, rng.uniform(0.8, 2.0)), 0, 0, _random_color(rng) * 0.8 + 0.1)
    # Fragments: a random half of another digit, smaller than the labelled one.
    for _ in range(rng.randint(n_fragments[0], n_fragments[1] + 1)):
        other = others[rng.randint(len(others))]
        side = max(2, int(round(size * rng.uniform(0.25, 0.4))))
        frag = _resize_glyph(other, side, side)
        half = rng.randint(4)
        if half == 0:
            frag = frag[: side // 2]
        elif half == 1:
            frag = frag[side // 2:]
        elif half == 2:
            frag = frag[:, : side // 2]
        else:
            frag = frag[:, side // 2:]
        _paint(canvas, frag, rng.randint(-2, size - 1), rng.randint(-2, size - 1), _random_color(rng))
    side_h = int(round(size * rng.uniform(*scale)))
    side_w = int(round(side_h * rng.uniform(0.8, 1.1)))
    side_w = min(max(side_w, 4), size)
    digit = _resize_glyph(glyph, side_h, side_w)
    top, left = rng.randint(0, size - side_h + 1), rng.randint(0, size - side_w + 1)
    # The digit's colour contrasts with the local background under it.
    local_bg = canvas[top:top + side_h, left:left + side_w].reshape(-1, 3).mean(0)
    _paint(canvas, digit, top, left, _brighter_color(rng, local_bg, 0.3))
    canvas += rng.normal(0.0, noise, size=canvas.shape).astype(np.float32)
    return np.clip(canvas, 0.0, 1.0)


def _check_split_arguments(split: str, size: int, per_digit: int, test_fraction: float) -> None:
    """The arguments every generated digit set takes, checked with one message each."""
    if split not in _SPLITS:
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    if int(size) != size or size < 8:
        raise ValueError(f"size must be an integer ≥ 8, got {size!r}")
    if int(per_digit) != per_digit or per_digit < 1:
        raise ValueError(f"per_digit must be a positive integer, got {per_digit!r}")
    if not 0.0 < float(test_fraction) < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction!r}")


@functools.lru_cache(maxsize=8)
def _cached_arrays(split: str, size: int, per_digit: int, seed: int, test_fraction: float,
                   scale: Tuple[float, float], n_strokes: Tuple[int, int], n_fragments: Tuple[int, int],
                   noise: float) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    from .datasets import _stratified_split

    glyphs, labels = _glyphs()
    train_idx, test_idx = _stratified_split(labels, test_fraction, seed)
    sources = train_idx if split == "train" else test_idx
    pool = glyphs[sources]  # fragments come from the same side of the split
    images = np.empty((len(sources) * per_digit, size, size, 3), dtype=np.uint8)
    source_of = np.repeat(sources, per_digit)
    for i, src in enumerate(source_of):
        rng = np.random.RandomState(np.random.SeedSequence([seed, _SPLITS[split], i]).generate_state(1)[0])
        canvas = _canvas(rng, size, glyphs[src], pool, scale, n_strokes, n_fragments, noise)
        images[i] = np.rint(canvas * 255.0).astype(np.uint8)
    images.setflags(write=False)
    return images, labels[source_of], source_of


def cluttered_digits_arrays(split: str = "train", size: int = 24, per_digit: int = 2, seed: int = 0,
                            test_fraction: float = 0.2, scale: Tuple[float, float] = (0.5, 0.8),
                            n_strokes: Tuple[int, int] = (1, 3), n_fragments: Tuple[int, int] = (1, 2),
                            noise: float = 0.03) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The cluttered-digits canvases of one split: ``(images (N, size, size, 3) uint8, labels (N,) int64,
    sources (N,) int64)`` with ``N = per_digit × (number of source digits in the split)``; ``sources`` are the
    indices of the labelled digits in scikit-learn's 1797 images. ``scale``: the digit's height as a fraction of
    the canvas side; ``n_strokes`` / ``n_fragments``: inclusive ranges of clutter items; ``noise``: the standard
    deviation of the Gaussian pixel noise. Results are cached (read-only arrays)."""
    _check_split_arguments(split, size, per_digit, test_fraction)
    scale = tuple(float(v) for v in scale)
    if len(scale) != 2 or not 0.0 < scale[0] <= scale[1] <= 1.0:
        raise ValueError(f"scale must be two numbers 0 < lo ≤ hi ≤ 1, got {scale!r}")
    ranges = {}
    for name, r in (("n_strokes", n_strokes), ("n_fragments", n_fragments)):
        r = tuple(int(v) for v in r)
        if len(r) != 2 or not 0 <= r[0] <= r[1]:
            raise ValueError(f"{name} must be two integers 0 ≤ lo ≤ hi, got {r!r}")
        ranges[name] = r
    if not 0.0 <= float(noise) < 1.0:
        raise ValueError(f"noise must be in [0, 1), got {noise!r}")
    return _cached_arrays(split, int(size), int(per_digit), int(seed), float(test_fraction), scale,
                          ranges["n_strokes"], ranges["n_fragments"], float(noise))


class _GeneratedDigits(torch.utils.data.Dataset):
    """What the generated digit sets share: images (N, S, S, 3) uint8 served as RGB PIL images, with their labels
    and the scikit-learn index of each image's digit."""

    def _set_arrays(self, transform, size, split, per_digit, seed, arrays) -> None:
        self.transform = transform
        self.size = int(size)
        self.split = split
        self.per_digit = int(per_digit)
        self.seed = int(seed)
        self.images, labels, sources = arrays
        self.targets: List[int] = labels.tolist()
        self.sources: List[int] = sources.tolist()
        self.classes = [str(d) for d in range(10)]

    def __len__(self) -> int:
        return len(self.targets)

    def image(self, index: int) -> Image.Image:
        return Image.fromarray(self.images[index], mode="RGB")

    def __getitem__(self, index: int):
        img = self.image(index)
        return (self.transform(img) if self.transform is not None else img), self.targets[index]

    def _repr_extra(self) -> str:
        return ""

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(split={self.split!r}, {len(self)} images, size={self.size}, "
                f"per_digit={self.per_digit}{self._repr_extra()})")


class ClutteredDigitsDataset(_GeneratedDigits):
    """The cluttered digits (see the module docstring) as RGB PIL images of ``size × size``.

    ``split``: ``"train"`` or ``"test"`` (disjoint source digits, DigitsDataset's stratified split for ``seed``).
    ``__getitem__`` returns ``(transform(img) or img, label)`` with labels 0..9; ``targets`` lists the labels,
    ``sources`` the scikit-learn index of each canvas's labelled digit. Normalisation statistics for the default
    settings are ``CLUTTERED_MEAN`` / ``CLUTTERED_STD``.
    """

    def __init__(self, transform: Optional[Callable] = None, size: int = 24, split: str = "train",
                 per_digit: int = 2, seed: int = 0, test_fraction: float = 0.2):
        self._set_arrays(transform, size, split, per_digit, seed,
                         cluttered_digits_arrays(split, size, per_digit, seed, test_fraction))


# ----------------------------------------------------------------------------------------------------------
# Coloured digits: the default job's data (issue 11)
# ----------------------------------------------------------------------------------------------------------

# Per-channel mean / std, in [0, 1], of the default train split (size 16, seed 0, 1 image per digit, zoom 0.5).
# tests/data/test_coloured_digits.py recomputes them.
COLOURED_MEAN = (0.29139986, 0.29606623, 0.28885249)
COLOURED_STD = (0.27416573, 0.27181939, 0.27493229)


def _hsv(hue: float, value: float) -> np.ndarray:
    return np.array(colorsys.hsv_to_rgb(hue, 1.0, value), dtype=np.float32)


def _coloured_digit(rng: np.random.RandomState, size: int, glyph: np.ndarray, zoom: float,
                    background_value: float) -> np.ndarray:
    """One image (size, size, 3) uint8: the glyph in a saturated colour of random hue over a dark saturated
    background of another random hue, then a random square crop of `zoom`–100 % of the area resized back to
    `size` (bicubic), so the digit is also shifted and enlarged, partly cut off at strong zooms."""
    coverage = _resize_glyph(glyph, size, size)[..., None]
    foreground, background = _hsv(rng.uniform(), 1.0), _hsv(rng.uniform(), background_value)
    image = np.rint((coverage * foreground + (1.0 - coverage) * background) * 255.0).astype(np.uint8)
    if zoom < 1.0:
        side = int(round(size * float(np.sqrt(rng.uniform(zoom, 1.0)))))
        top, left = rng.randint(size - side + 1), rng.randint(size - side + 1)
        crop = Image.fromarray(image, mode="RGB").crop((left, top, left + side, top + side))
        image = np.asarray(crop.resize((size, size), Image.Resampling.BICUBIC), dtype=np.uint8)
    return image


@functools.lru_cache(maxsize=8)
def _cached_coloured(split: str, size: int, per_digit: int, seed: int, test_fraction: float, zoom: float,
                     background_value: float) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    from .datasets import _stratified_split

    glyphs, labels = _glyphs()
    train_idx, test_idx = _stratified_split(labels, test_fraction, seed)
    source_of = np.repeat(train_idx if split == "train" else test_idx, per_digit)
    images = np.empty((len(source_of), size, size, 3), dtype=np.uint8)
    for i, src in enumerate(source_of):
        # a stream of its own per image (not the cluttered set's: the split code is offset by 10)
        rng = np.random.RandomState(np.random.SeedSequence([seed, 10 + _SPLITS[split], i]).generate_state(1)[0])
        images[i] = _coloured_digit(rng, size, glyphs[src], zoom, background_value)
    images.setflags(write=False)
    return images, labels[source_of], source_of


def coloured_digits_arrays(split: str = "train", size: int = 16, per_digit: int = 1, seed: int = 0,
                           test_fraction: float = 0.2, zoom: float = 0.5, background_value: float = 0.35
                           ) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The coloured digits of one split: ``(images (N, size, size, 3) uint8, labels (N,) int64, sources (N,)
    int64)``, ``N = per_digit × (source digits in the split)``. Each image is a scikit-learn digit in a bright
    colour of random hue on a background of another random hue and brightness ``background_value``, zoomed by a
    random square crop of ``zoom``–100 % of the area. Deterministic for (split, size, per_digit, seed, zoom, ...);
    results are cached (read-only arrays)."""
    _check_split_arguments(split, size, per_digit, test_fraction)
    if not 0.0 < float(zoom) <= 1.0:
        raise ValueError(f"zoom must be in (0, 1] (the smallest crop area kept), got {zoom!r}")
    if not 0.0 <= float(background_value) < 1.0:
        raise ValueError(f"background_value must be in [0, 1), got {background_value!r}")
    return _cached_coloured(split, int(size), int(per_digit), int(seed), float(test_fraction), float(zoom),
                            float(background_value))


class ColouredDigitsDataset(_GeneratedDigits):
    """The coloured digits (see `coloured_digits_arrays`) as RGB PIL images of ``size × size``: what
    `dinokernels pretrain` trains on by default. Raw pixels and a random network are misled by the colours and the
    zoom; DINO, with views whose hue is turned at random, learns to ignore them.

    ``split``: ``"train"`` or ``"test"`` (disjoint source digits, DigitsDataset's stratified split for ``seed``).
    ``__getitem__`` returns ``(transform(img) or img, label)``; ``targets`` lists the labels, ``sources`` the
    scikit-learn index of each image's digit. Normalisation statistics: ``COLOURED_MEAN`` / ``COLOURED_STD``.
    """

    def __init__(self, transform: Optional[Callable] = None, size: int = 16, split: str = "train",
                 per_digit: int = 1, seed: int = 0, test_fraction: float = 0.2, zoom: float = 0.5):
        self.zoom = float(zoom)
        self._set_arrays(transform, size, split, per_digit, seed,
                         coloured_digits_arrays(split, size, per_digit, seed, test_fraction, zoom))

    def _repr_extra(self) -> str:
        return f", zoom={self.zoom}"


# ----------------------------------------------------------------------------------------------------------
# The built-in data sets by name (what `dinokernels pretrain` trains on without --data)
# ----------------------------------------------------------------------------------------------------------

BUILTIN_DATASETS = ("digits", "cluttered-digits", "coloured-digits")


def builtin_dataset(name: str, split: str, size: int, transform: Optional[Callable] = None,
                    seed: int = 0) -> torch.utils.data.Dataset:
    """The built-in labelled data set `name` ("digits", "cluttered-digits" or "coloured-digits"), split "train"
    or "test", images of `size` pixels."""
    from .datasets import DigitsDataset

    if name == "digits":
        return DigitsDataset(transform=transform, size=size, split=split, seed=seed)
    if name == "cluttered-digits":
        return ClutteredDigitsDataset(transform=transform, size=size, split=split, seed=seed)
    if name == "coloured-digits":
        return ColouredDigitsDataset(transform=transform, size=size, split=split, seed=seed)
    raise ValueError(f"built-in data set must be one of {', '.join(BUILTIN_DATASETS)}, got {name!r}")


def builtin_stats(name: str) -> Tuple[Tuple[float, float, float], Tuple[float, float, float]]:
    """(mean, std) per channel used to normalise the built-in data set `name`."""
    from .datasets import DIGITS_MEAN, DIGITS_STD

    if name == "digits":
        return DIGITS_MEAN, DIGITS_STD
    if name == "cluttered-digits":
        return CLUTTERED_MEAN, CLUTTERED_STD
    if name == "coloured-digits":
        return COLOURED_MEAN, COLOURED_STD
    raise ValueError(f"built-in data set must be one of {', '.join(BUILTIN_DATASETS)}, got {name!r}")
