"""DINO multi-crop augmentation and evaluation transform (dinokernels.data.transforms), SPEC §2.3 / §2.5.

Random draws come from torch's global RNG, which conftest seeds per test from a per-run base seed, so the
statistical checks see fresh draws every run; their bounds are 5 binomial sigmas (false alarm ~1e-6 each).
"""
import math
import pickle
import random
from collections import Counter

import numpy as np
import pytest
import torch
from PIL import Image

from dinokernels.data import IMAGENET_MEAN, IMAGENET_STD, DataAugmentationDINO, EvalTransform
from dinokernels.data import transforms as T

ZERO_MEAN, UNIT_STD = (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)


def _rand_image(w, h, seed=0, mode="RGB"):
    rng = np.random.default_rng(seed)
    img = Image.fromarray(rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8))
    return img if mode == "RGB" else img.convert(mode)


def _as_uint8(t):
    """(3, H, W) tensor in [0, 1] (ToTensor output with mean 0, std 1) -> (H, W, 3) uint8."""
    return (t.permute(1, 2, 0) * 255).round().to(torch.uint8).numpy()


def _within(count, n, p, sigmas=5.0):
    if p in (0.0, 1.0):
        return count == n * p
    return abs(count / n - p) <= sigmas * math.sqrt(p * (1 - p) / n)


# ------------------------------------------------------------------ crop counts, sizes, dtype, input modes

@pytest.mark.parametrize("n_local", [0, 3])
@pytest.mark.parametrize("mode", ["RGB", "L", "RGBA", "P"])
def test_crop_counts_and_sizes(n_local, mode):
    aug = DataAugmentationDINO(local_crops_number=n_local, global_size=24, local_size=12)
    crops = aug(_rand_image(50, 37, mode=mode))
    assert isinstance(crops, list) and len(crops) == 2 + n_local == aug.num_crops
    assert [tuple(c.shape) for c in crops] == [(3, 24, 24)] * 2 + [(3, 12, 12)] * n_local
    assert all(c.dtype == torch.float32 and torch.isfinite(c).all() for c in crops)


def test_default_configuration_is_the_official_one():
    aug = DataAugmentationDINO()
    assert aug.global_crops_scale == (0.4, 1.0) and aug.local_crops_scale == (0.05, 0.4)
    assert (aug.local_crops_number, aug.global_size, aug.local_size) == (8, 224, 96)
    assert aug.mean == IMAGENET_MEAN == (0.485, 0.456, 0.406) and aug.std == IMAGENET_STD == (0.229, 0.224, 0.225)
    assert aug.ratio == pytest.approx((3 / 4, 4 / 3)) and aug.jitter == (0.4, 0.4, 0.2, 0.1)
    assert (aug.flip_p, aug.color_jitter_p, aug.grayscale_p) == (0.5, 0.8, 0.2)
    assert aug.blur_p == (1.0, 0.1, 0.5) and aug.solarize_p == (0.0, 0.2, 0.0)
    assert aug.blur_radius == (0.1, 2.0) and aug.solarize_threshold == 128
    crops = aug(_rand_image(120, 90))
    assert [tuple(c.shape) for c in crops] == [(3, 224, 224)] * 2 + [(3, 96, 96)] * 8


def test_rejects_non_images_and_bad_arguments():
    aug = DataAugmentationDINO(global_size=8, local_size=8, local_crops_number=1)
    with pytest.raises(TypeError, match="PIL"):
        aug(torch.zeros(3, 8, 8))
    with pytest.raises(ValueError, match="global_crops_scale"):
        DataAugmentationDINO(global_crops_scale=(0.9, 0.4))
    with pytest.raises(ValueError, match="local_crops_number"):
        DataAugmentationDINO(local_crops_number=-1)
    with pytest.raises(ValueError, match="std"):
        DataAugmentationDINO(std=(0.2, 0.0, 0.2))


def test_picklable_for_dataloader_workers():
    aug = DataAugmentationDINO(global_size=16, local_size=8, local_crops_number=2)
    clone = pickle.loads(pickle.dumps(aug))
    img = _rand_image(20, 20)
    torch.manual_seed(3)
    a = aug(img)
    torch.manual_seed(3)
    b = clone(img)
    assert all(torch.equal(x, y) for x, y in zip(a, b))


# ------------------------------------------------------------------ determinism

def test_torch_seed_alone_makes_it_reproducible():
    aug = DataAugmentationDINO(global_size=16, local_size=8, local_crops_number=4)
    img = _rand_image(40, 30)
    torch.manual_seed(1234)
    random.seed(1)
    a = aug(img)
    torch.manual_seed(1234)
    random.seed(2)  # Python's RNG plays no part
    b = aug(img)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    torch.manual_seed(1235)
    c = aug(img)
    assert not all(torch.equal(x, y) for x, y in zip(a, c))
    # The crops within one call differ from each other (independent draws per crop).
    assert not torch.equal(a[2], a[3])


# ------------------------------------------------------------------ per-crop probabilities

def test_decision_probabilities_per_crop():
    """Every crop takes the five decisions once, in pipeline order; their frequencies match SPEC §2.3."""
    n_local, n = 2, 1500
    aug = DataAugmentationDINO(global_size=8, local_size=8, local_crops_number=n_local)
    log = []
    aug.decision_hook = lambda crop, name, p, applied: log.append((crop, name, p, applied))
    img = _rand_image(12, 12)
    for _ in range(n):
        aug(img)
    per_call = 5 * (2 + n_local)
    assert len(log) == n * per_call
    order = [(c, name) for c in range(2 + n_local) for name in DataAugmentationDINO.DECISIONS]
    assert [(c, name) for c, name, _, _ in log[:per_call]] == order

    expected = {"flip": (0.5, 0.5, 0.5), "color_jitter": (0.8, 0.8, 0.8), "grayscale": (0.2, 0.2, 0.2),
                "blur": (1.0, 0.1, 0.5), "solarize": (0.0, 0.2, 0.0)}
    applied, total = Counter(), Counter()
    for crop, name, p, a in log:
        kind = min(crop, 2)
        assert p == expected[name][kind]
        total[kind, name] += 1
        applied[kind, name] += a
    for name, ps in expected.items():
        for kind, p in enumerate(ps):
            k, m = applied[kind, name], total[kind, name]
            assert m == n * (1 if kind < 2 else n_local)
            assert _within(k, m, p), f"{name} on crop kind {kind}: {k}/{m} applied, expected p={p}"


def _plain_aug(**overrides):
    """Full-image crops at the image's own size (so the crop+resize is the identity), every random op off."""
    aug = DataAugmentationDINO(global_crops_scale=(1.0, 1.0), local_crops_scale=(1.0, 1.0), local_crops_number=2,
                               global_size=16, local_size=16, mean=ZERO_MEAN, std=UNIT_STD)
    aug.flip_p = aug.color_jitter_p = aug.grayscale_p = 0.0
    aug.blur_p = aug.solarize_p = (0.0, 0.0, 0.0)
    for k, v in overrides.items():
        setattr(aug, k, v)
    return aug


def test_all_ops_off_gives_the_image_itself():
    img = _rand_image(16, 16, seed=5)
    for crop in _plain_aug()(img):
        np.testing.assert_array_equal(_as_uint8(crop), np.asarray(img))


def test_decisions_drive_the_output():
    """With flip, grayscale and solarisation live, each output equals the functional ops applied exactly as
    the recorded decisions say (so the probabilities measured above are those of the real operations)."""
    aug = _plain_aug(flip_p=0.5, grayscale_p=0.5, solarize_p=(0.5, 0.5, 0.5))
    img = _rand_image(16, 16, seed=6)
    seen = Counter()
    for _ in range(40):
        decisions = {}
        aug.decision_hook = lambda crop, name, p, a: decisions.__setitem__((crop, name), a)
        crops = aug(img)
        for c, crop in enumerate(crops):
            ref = img
            if decisions[c, "flip"]:
                ref = T.hflip(ref)
            if decisions[c, "grayscale"]:
                ref = T.grayscale(ref)
            if decisions[c, "solarize"]:
                ref = T.solarize(ref, 128)
            np.testing.assert_array_equal(_as_uint8(crop), np.asarray(ref))
            seen.update(name for name in ("flip", "grayscale", "solarize") if decisions[c, name])
    assert all(seen[name] > 0 for name in ("flip", "grayscale", "solarize"))


def test_solarize_only_on_the_second_global_crop():
    aug = _plain_aug()  # official solarize_p = (0, 0.2, 0): restore it
    aug.solarize_p = DataAugmentationDINO().solarize_p
    img = _rand_image(16, 16, seed=7)
    sol = np.asarray(T.solarize(img))
    n, hits = 600, Counter()
    for _ in range(n):
        for c, crop in enumerate(aug(img)):
            out = _as_uint8(crop)
            if np.array_equal(out, sol):
                hits[c] += 1
            else:
                np.testing.assert_array_equal(out, np.asarray(img))
    assert hits[0] == 0 and hits[2] == 0 and hits[3] == 0
    assert _within(hits[1], n, 0.2), hits


def test_blur_and_jitter_apply_when_decided():
    board = Image.fromarray(np.kron(np.indices((4, 4)).sum(0) % 2, np.ones((4, 4))).astype(np.uint8) * 255)
    board = board.convert("RGB")
    for p, changed in ((0.0, False), (1.0, True)):
        aug = _plain_aug(blur_p=(p, p, p), blur_radius=(1.0, 2.0))
        for crop in aug(board):
            assert (not np.array_equal(_as_uint8(crop), np.asarray(board))) == changed
    img = _rand_image(16, 16, seed=8)
    aug = _plain_aug(color_jitter_p=1.0)
    changed = sum(not np.array_equal(_as_uint8(c), np.asarray(img)) for _ in range(10) for c in aug(img))
    assert changed >= 38  # all 40 unless every factor lands within rounding of 1


# ------------------------------------------------------------------ RandomResizedCrop box sampler

def test_crop_box_within_bounds_and_distribution():
    W, H, scale, ratio = 4000, 3000, (0.05, 0.4), (3 / 4, 4 / 3)
    areas, log_ratios = [], []
    for _ in range(3000):
        top, left, h, w = T.sample_crop_box(W, H, scale, ratio)
        assert 0 <= top and top + h <= H and 0 <= left and left + w <= W and h > 0 and w > 0
        a = h * w / (W * H)
        assert scale[0] * 0.995 <= a <= scale[1] * 1.005
        assert ratio[0] * 0.99 <= w / h <= ratio[1] * 1.01
        areas.append(a)
        log_ratios.append(math.log(w / h))
    # Small crops always fit: the area is U(scale), the aspect ratio log-uniform (mean log 0, not ~0.028
    # as a uniform ratio would give).
    n = len(areas)
    assert abs(np.mean(areas) - 0.225) < 5 * (0.35 / math.sqrt(12)) / math.sqrt(n)
    assert abs(np.mean(log_ratios)) < 5 * (math.log(16 / 9) / math.sqrt(12)) / math.sqrt(n)
    assert np.std(log_ratios) == pytest.approx(math.log(16 / 9) / math.sqrt(12), rel=0.1)


def test_crop_box_uses_torchvision_draw_order():
    """SPEC §2.3, the draws of torchvision's box sampler in order: the area fraction (one float32 U(scale) draw),
    log(w/h) (one float32 U draw between the float32 logs of the ratio bounds), then the top row and the left
    column (one randint each over the positions where the box fits); w = round(√(A·r)), h = round(√(A/r))."""
    width, height, scale = 1000, 800, (0.05, 0.4)
    log_bounds = [float(b) for b in torch.tensor((3 / 4, 4 / 3), dtype=torch.float32).log()]
    torch.manual_seed(11)
    box = T.sample_crop_box(width, height, scale, (3 / 4, 4 / 3))
    torch.manual_seed(11)
    draws = [float(torch.empty(1).uniform_(lo, hi)) for lo, hi in (scale, log_bounds)]
    crop_area, aspect = width * height * draws[0], math.exp(draws[1])
    crop_w, crop_h = round(math.sqrt(crop_area * aspect)), round(math.sqrt(crop_area / aspect))
    assert crop_w <= width and crop_h <= height  # the first candidate fits, so it is placed
    top, left = (int(torch.randint(0, free + 1, (1,))) for free in (height - crop_h, width - crop_w))
    assert box == (top, left, crop_h, crop_w)


@pytest.mark.parametrize("W,H,expected", [
    (100, 10, (0, 43, 10, 13)),   # too wide: height kept, width = round(10 * 4/3), centred
    (10, 100, (43, 0, 13, 10)),   # too tall: width kept, height = round(10 / (3/4))
    (30, 30, (0, 0, 30, 30)),     # aspect within range: the whole image
])
def test_crop_box_fallback_is_a_centre_crop(W, H, expected):
    # scale (1, 1) never fits unless the drawn ratio equals the image's, so all 10 attempts fail.
    for _ in range(20):
        assert T.sample_crop_box(W, H, (1.0, 1.0), (3 / 4, 4 / 3)) == expected


def test_resized_crop_matches_pil_crop_then_bicubic_resize():
    img = _rand_image(40, 30, seed=9)
    out = T.resized_crop(img, 3, 5, 20, 25, 16)
    ref = img.crop((5, 3, 30, 23)).resize((16, 16), Image.Resampling.BICUBIC)
    assert out.size == (16, 16)
    np.testing.assert_array_equal(np.asarray(out), np.asarray(ref))


# ------------------------------------------------------------------ individual operations

def test_hflip_mirrors_columns():
    img = _rand_image(7, 5, seed=14)
    np.testing.assert_array_equal(np.asarray(T.hflip(img)), np.asarray(img)[:, ::-1])


def test_color_jitter_draws_like_torchvision():
    """randperm(4) for the order, then brightness, contrast, saturation in [0.6, 1.4], [0.6, 1.4], [0.8, 1.2]
    and hue in [-0.1, 0.1], all from torch's RNG."""
    aug = DataAugmentationDINO()
    img = _rand_image(16, 16, seed=15)
    for seed in range(5):
        torch.manual_seed(seed)
        out = aug._color_jitter(img)
        torch.manual_seed(seed)
        order = torch.randperm(4).tolist()
        fb, fc = (torch.empty(1).uniform_(0.6, 1.4).item() for _ in range(2))
        fs = torch.empty(1).uniform_(0.8, 1.2).item()
        fh = torch.empty(1).uniform_(-0.1, 0.1).item()
        np.testing.assert_array_equal(np.asarray(out), np.asarray(T.color_jitter(img, order, fb, fc, fs, fh)))


def test_solarize_inverts_values_at_or_above_threshold():
    v = np.arange(256, dtype=np.uint8)
    img = Image.fromarray(np.stack([v, v[::-1], np.roll(v, 7)], axis=-1)[None].repeat(2, 0))
    src = np.asarray(img).astype(np.int32)
    out = np.asarray(T.solarize(img, 128)).astype(np.int32)
    np.testing.assert_array_equal(out, np.where(src >= 128, 255 - src, src))


def test_grayscale_gives_equal_channels_with_luma():
    img = _rand_image(16, 16, seed=10)
    out = np.asarray(T.grayscale(img)).astype(np.float64)
    assert out.shape == (16, 16, 3)
    np.testing.assert_array_equal(out[..., 0], out[..., 1])
    np.testing.assert_array_equal(out[..., 0], out[..., 2])
    src = np.asarray(img).astype(np.float64)
    luma = src @ np.array([0.299, 0.587, 0.114])
    assert np.abs(out[..., 0] - luma).max() <= 1.0
    # ... and inside the augmentation, after normalisation is undone.
    aug = _plain_aug(grayscale_p=1.0)
    for crop in aug(img):
        assert torch.equal(crop[0], crop[1]) and torch.equal(crop[0], crop[2])


def test_hue_rotation():
    red = Image.new("RGB", (2, 2), (255, 0, 0))
    g = np.asarray(T.adjust_hue(red, 1 / 3))[0, 0].astype(int)
    assert g[1] > 200 and g[0] < 60 and g[2] < 60          # red turned green
    b = np.asarray(T.adjust_hue(red, -1 / 3))[0, 0].astype(int)
    assert b[2] > 200 and b[0] < 60 and b[1] < 60          # wrap-around the other way: blue
    grey = Image.new("L", (2, 2), 77)
    assert T.adjust_hue(grey, 0.3) is grey
    with pytest.raises(ValueError):
        T.adjust_hue(red, 0.6)


def test_color_jitter_order_matters_and_identity_factors():
    img = _rand_image(16, 16, seed=12)
    same = T.color_jitter(img, [0, 1, 2], 1.0, 1.0, 1.0, 0.0)
    np.testing.assert_array_equal(np.asarray(same), np.asarray(img))
    a = np.asarray(T.color_jitter(img, [0, 1], 1.4, 0.6, 1.0, 0.0))
    b = np.asarray(T.color_jitter(img, [1, 0], 1.4, 0.6, 1.0, 0.0))
    assert not np.array_equal(a, b)


def test_to_tensor_and_normalisation_values():
    img = Image.new("RGB", (5, 4), (0, 128, 255))
    t = T.to_tensor(img)
    assert t.shape == (3, 4, 5) and t.dtype == torch.float32
    torch.testing.assert_close(t[:, 0, 0], torch.tensor([0.0, 128 / 255, 1.0]))
    aug = DataAugmentationDINO(global_crops_scale=(1.0, 1.0), local_crops_scale=(1.0, 1.0), local_crops_number=1,
                               global_size=6, local_size=6)
    aug.color_jitter_p = aug.grayscale_p = 0.0
    aug.blur_p = aug.solarize_p = (0.0, 0.0, 0.0)
    expected = (torch.tensor([0.0, 128 / 255, 1.0]) - torch.tensor(IMAGENET_MEAN)) / torch.tensor(IMAGENET_STD)
    for crop in aug(Image.new("RGB", (6, 6), (0, 128, 255))):
        torch.testing.assert_close(crop, expected.view(3, 1, 1).expand(3, 6, 6))


# ------------------------------------------------------------------ evaluation transform

def test_eval_transform_resizes_shorter_side_and_centre_crops():
    tf = EvalTransform()
    assert (tf.resize, tf.crop, tf.mean, tf.std) == (256, 224, IMAGENET_MEAN, IMAGENET_STD)
    out = tf(_rand_image(300, 200, mode="L"))
    assert out.shape == (3, 224, 224) and out.dtype == torch.float32
    # Shorter side already at `resize`: no resampling, a pure centre crop (left = round((40 - 30) / 2) = 5).
    img = _rand_image(40, 30, seed=13)
    out = EvalTransform(resize=30, crop=30, mean=ZERO_MEAN, std=UNIT_STD)(img)
    np.testing.assert_array_equal(_as_uint8(out), np.asarray(img)[:, 5:35])
    # Tall image, crop smaller than both sides: top = round((40 - 20) / 2) = 10, left = round(5 / 2) = 2.
    tall = _rand_image(25, 40, seed=16)
    out = EvalTransform(resize=25, crop=20, mean=ZERO_MEAN, std=UNIT_STD)(tall)
    np.testing.assert_array_equal(_as_uint8(out), np.asarray(tall)[10:30, 2:22])
    # Resize 30 -> 15 on the short side: the long side is int(15 * 41 / 30) = int(20.5) = 20.
    img = _rand_image(41, 30, seed=13)
    out = EvalTransform(resize=15, crop=15, mean=ZERO_MEAN, std=UNIT_STD)(img)
    ref = img.resize((20, 15), Image.Resampling.BICUBIC).crop((2, 0, 17, 15))
    np.testing.assert_array_equal(_as_uint8(out), np.asarray(ref))


def test_eval_transform_pads_small_images_and_normalises():
    img = Image.new("RGB", (4, 4), (255, 255, 255))
    out = EvalTransform(resize=4, crop=8, mean=ZERO_MEAN, std=UNIT_STD)(img)
    assert out.shape == (3, 8, 8)
    assert out[:, 2:6, 2:6].eq(1).all() and out.sum() == 3 * 16  # zero padding around the image
    out = EvalTransform(resize=4, crop=4)(img)
    expected = (1 - torch.tensor(IMAGENET_MEAN)) / torch.tensor(IMAGENET_STD)
    torch.testing.assert_close(out, expected.view(3, 1, 1).expand(3, 4, 4))
