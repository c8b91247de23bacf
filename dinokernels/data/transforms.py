"""DINO's multi-crop augmentation and the k-NN evaluation transform, with Pillow and torch only (no torchvision).

Every operation reproduces the torchvision / official-DINO operation it stands for (SPEC §2.3):

* ``RandomResizedCrop``: torchvision's box sampler (10 attempts, then a centre-crop fallback), then
  ``PIL.Image.crop`` + ``resize(BICUBIC)``, exactly what torchvision's PIL path does.
* horizontal flip, ``ColorJitter`` (a random order of brightness / contrast / saturation / hue, with
  ``ImageEnhance.Brightness``, ``ImageEnhance.Contrast``, ``ImageEnhance.Color`` and a hue rotation in HSV
  space with uint8 wrap-around), ``RandomGrayscale`` (``convert("L")``, three equal channels),
* DINO's own ``GaussianBlur`` (``PIL.ImageFilter.GaussianBlur`` with radius ~ U(0.1, 2.0)) and ``Solarization``
  (``PIL.ImageOps.solarize``, threshold 128),
* ``ToTensor`` (uint8 → float32 / 255, CHW) and ``Normalize``.

Randomness: **every** random draw comes from torch's global RNG (``torch.rand`` / ``torch.randperm`` /
``torch.randint``), in torchvision's order for the torchvision steps.  Python's ``random`` module is never
used (the official code draws blur and solarisation from it; here they come from torch too), so
``torch.manual_seed`` alone makes an augmentation reproducible, and DataLoader workers, which torch seeds with
``base_seed + worker_id``, get distinct but reproducible streams.

Every random *decision* (apply an operation or not) goes through :meth:`DataAugmentationDINO._coin`, which
reports it to ``decision_hook`` when one is set, so the per-crop probabilities can be measured without
patching internals.
"""
from __future__ import annotations

import math
from typing import Callable, List, Optional, Sequence, Tuple

import numpy as np
import torch
from PIL import Image, ImageEnhance, ImageFilter, ImageOps

from .imageio import to_rgb

__all__ = ["IMAGENET_MEAN", "IMAGENET_STD", "DataAugmentationDINO", "EvalTransform", "sample_crop_box",
           "resized_crop", "hflip", "color_jitter", "grayscale", "gaussian_blur", "solarize", "to_tensor",
           "normalize", "adjust_hue"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

_BICUBIC = Image.Resampling.BICUBIC


# ----------------------------------------------------------------------------------------------------------
# Functional operations (deterministic given their parameters)
# ----------------------------------------------------------------------------------------------------------

def _rgb(img) -> Image.Image:
    if not isinstance(img, Image.Image):
        raise TypeError(f"expected a PIL.Image.Image, got {type(img).__name__}")
    return to_rgb(img)


_CROP_ATTEMPTS = 10  # candidate boxes drawn before falling back to a centred crop (SPEC §2.3)


def _candidate_crop_size(image_area: int, scale: Sequence[float], log_ratio: Sequence[float]) -> Tuple[int, int]:
    """One random (crop_height, crop_width): the area is image_area · U(scale) and log(w/h) is U(log_ratio), one
    float32 torch draw each, area first; w and h round √(area·r) and √(area/r) to the nearest integer."""
    crop_area = image_area * torch.empty(1).uniform_(scale[0], scale[1]).item()
    aspect = math.exp(torch.empty(1).uniform_(log_ratio[0], log_ratio[1]).item())
    return int(round(math.sqrt(crop_area / aspect))), int(round(math.sqrt(crop_area * aspect)))


def _centred_fallback_box(width: int, height: int, ratio: Sequence[float]) -> Tuple[int, int, int, int]:
    """The largest centred box whose aspect ratio w/h is the image's clamped into ``ratio``."""
    narrowest, widest = min(ratio), max(ratio)
    image_aspect = width / height
    crop_w, crop_h = width, height
    if image_aspect < narrowest:  # too tall: keep the width
        crop_h = int(round(width / narrowest))
    elif image_aspect > widest:  # too wide: keep the height
        crop_w = int(round(height * widest))
    return (height - crop_h) // 2, (width - crop_w) // 2, crop_h, crop_w


def sample_crop_box(width: int, height: int, scale: Sequence[float] = (0.08, 1.0),
                    ratio: Sequence[float] = (3.0 / 4.0, 4.0 / 3.0)) -> Tuple[int, int, int, int]:
    """The random box of torchvision's ``RandomResizedCrop`` (SPEC §2.3): ``(top, left, crop_height, crop_width)``.

    Up to 10 candidates draw an area fraction ~ U(scale) and a log-uniform aspect ratio w/h in ``ratio``; the
    first that fits inside the image is placed uniformly (top drawn before left). If none fits, the largest
    centred crop with the aspect ratio clamped to ``ratio``. Draws come from torch's global RNG, in torchvision's
    order, so a seed gives torchvision's boxes.
    """
    if width <= 0 or height <= 0:
        raise ValueError(f"image size must be positive, got {width}x{height}")
    if scale[0] > scale[1] or ratio[0] > ratio[1]:
        raise ValueError(f"scale and ratio must be (min, max), got scale={tuple(scale)} ratio={tuple(ratio)}")
    # The log bounds are float32, as the uniform draw between them.
    log_ratio = torch.tensor(ratio).log().tolist()
    for _ in range(_CROP_ATTEMPTS):
        crop_h, crop_w = _candidate_crop_size(width * height, scale, log_ratio)
        if 0 < crop_w <= width and 0 < crop_h <= height:
            top = int(torch.randint(0, height - crop_h + 1, size=(1,)).item())
            left = int(torch.randint(0, width - crop_w + 1, size=(1,)).item())
            return top, left, crop_h, crop_w
    return _centred_fallback_box(width, height, ratio)


def resized_crop(img: Image.Image, top: int, left: int, height: int, width: int, size: int) -> Image.Image:
    """Crop the box, then resize it to ``size × size`` with bicubic interpolation (torchvision's PIL path)."""
    return img.crop((left, top, left + width, top + height)).resize((size, size), _BICUBIC)


def hflip(img: Image.Image) -> Image.Image:
    return img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)


def adjust_hue(img: Image.Image, hue_factor: float) -> Image.Image:
    """torchvision's PIL ``adjust_hue``: rotate the HSV hue channel by ``int(hue_factor·255)`` with uint8
    wrap-around. Images without colour (L, 1, I, F) are returned unchanged."""
    if not -0.5 <= hue_factor <= 0.5:
        raise ValueError(f"hue_factor ({hue_factor}) is not in [-0.5, 0.5]")
    if img.mode in {"L", "1", "I", "F"}:
        return img
    mode = img.mode
    h, s, v = img.convert("HSV").split()
    shift = int(hue_factor * 255)  # truncation toward zero, as np.int8(hue_factor * 255)
    np_h = ((np.array(h, dtype=np.int16) + shift) % 256).astype(np.uint8)
    return Image.merge("HSV", (Image.fromarray(np_h), s, v)).convert(mode)


def color_jitter(img: Image.Image, order: Sequence[int], brightness: float, contrast: float, saturation: float,
                 hue: float) -> Image.Image:
    """Apply torchvision's four colour adjustments with the given factors, in ``order`` (0 brightness,
    1 contrast, 2 saturation, 3 hue)."""
    for k in order:
        k = int(k)
        if k == 0:
            img = ImageEnhance.Brightness(img).enhance(brightness)
        elif k == 1:
            img = ImageEnhance.Contrast(img).enhance(contrast)
        elif k == 2:
            img = ImageEnhance.Color(img).enhance(saturation)
        elif k == 3:
            img = adjust_hue(img, hue)
        else:
            raise ValueError(f"colour-jitter order entries must be 0..3, got {k}")
    return img


def grayscale(img: Image.Image) -> Image.Image:
    """torchvision's ``rgb_to_grayscale(num_output_channels=3)``: ITU-R 601-2 luma, copied to three channels."""
    return img.convert("L").convert("RGB")


def gaussian_blur(img: Image.Image, radius: float) -> Image.Image:
    return img.filter(ImageFilter.GaussianBlur(radius=radius))


def solarize(img: Image.Image, threshold: int = 128) -> Image.Image:
    """Invert every pixel value >= ``threshold`` (``PIL.ImageOps.solarize``)."""
    return ImageOps.solarize(img, threshold)


def to_tensor(img: Image.Image) -> torch.Tensor:
    """torchvision's ``ToTensor`` for an RGB image: (3, H, W) float32 in [0, 1]."""
    arr = np.array(_rgb(img), dtype=np.uint8)  # a writable copy, (H, W, 3)
    return torch.from_numpy(arr).permute(2, 0, 1).contiguous().to(torch.float32).div(255)


def normalize(t: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    mean_t = torch.as_tensor(mean, dtype=t.dtype).view(-1, 1, 1)
    std_t = torch.as_tensor(std, dtype=t.dtype).view(-1, 1, 1)
    if (std_t == 0).any():
        raise ValueError(f"std must be non-zero, got {tuple(std)}")
    return t.sub(mean_t).div(std_t)


def _check_range(name: str, r: Sequence[float], low: float, high: float) -> Tuple[float, float]:
    r = tuple(float(x) for x in r)
    if len(r) != 2 or not (low <= r[0] <= r[1] <= high):
        raise ValueError(f"{name} must be (min, max) with {low} <= min <= max <= {high}, got {r}")
    return r


def _check_stats(name: str, v: Sequence[float]) -> Tuple[float, float, float]:
    v = tuple(float(x) for x in v)
    if len(v) != 3:
        raise ValueError(f"{name} must have 3 entries (R, G, B), got {v}")
    return v


# ----------------------------------------------------------------------------------------------------------
# DINO multi-crop augmentation
# ----------------------------------------------------------------------------------------------------------

class DataAugmentationDINO:
    """DINO's multi-crop augmentation (official ``DataAugmentationDINO``, SPEC §2.3).

    ``aug(img)`` returns ``2 + local_crops_number`` normalised float32 tensors: two global crops of shape
    ``(3, global_size, global_size)``, then the local crops ``(3, local_size, local_size)``.

    Per crop: RandomResizedCrop (bicubic, ratio (3/4, 4/3)) → horizontal flip (``flip_p``) → ColorJitter
    (strengths ``jitter``, official (0.4, 0.4, 0.2, 0.1)) with probability ``color_jitter_p`` → grayscale
    (``grayscale_p``) → Gaussian blur (``blur_p[kind]``, radius ~ U(``blur_radius``)) → solarisation
    (``solarize_p[kind]``, threshold 128) → ToTensor → Normalize, where ``kind`` is 0 for global crop 1, 1 for
    global crop 2 and 2 for the local crops.

    The probabilities are plain attributes, read at every call, so they can be inspected or changed.
    ``decision_hook``, when set, is called as ``hook(crop_index, name, p, applied)`` for every random
    decision (names: ``"flip"``, ``"color_jitter"``, ``"grayscale"``, ``"blur"``, ``"solarize"``).

    All randomness comes from torch's global RNG (see the module docstring); seed it with ``torch.manual_seed``.

    ``blur_radius`` and ``solarize_threshold`` (keyword-only) default to the official values; small images
    (e.g. 32-pixel digits) may want a smaller blur radius.
    """

    DECISIONS = ("flip", "color_jitter", "grayscale", "blur", "solarize")

    def __init__(self, global_crops_scale=(0.4, 1.0), local_crops_scale=(0.05, 0.4), local_crops_number=8,
                 global_size=224, local_size=96, mean=IMAGENET_MEAN, std=IMAGENET_STD, *,
                 blur_radius=(0.1, 2.0), solarize_threshold=128):
        self.global_crops_scale = _check_range("global_crops_scale", global_crops_scale, 0.0, 1.0)
        self.local_crops_scale = _check_range("local_crops_scale", local_crops_scale, 0.0, 1.0)
        if self.global_crops_scale[1] <= 0 or self.local_crops_scale[1] <= 0:
            raise ValueError("crop scales must allow a positive area")
        if int(local_crops_number) != local_crops_number or local_crops_number < 0:
            raise ValueError(f"local_crops_number must be a non-negative integer, got {local_crops_number}")
        self.local_crops_number = int(local_crops_number)
        for name, s in (("global_size", global_size), ("local_size", local_size)):
            if int(s) != s or s < 1:
                raise ValueError(f"{name} must be a positive integer, got {s}")
        self.global_size = int(global_size)
        self.local_size = int(local_size)
        self.mean = _check_stats("mean", mean)
        self.std = _check_stats("std", std)
        if min(self.std) <= 0:
            raise ValueError(f"std must be positive, got {self.std}")
        self.ratio = (3.0 / 4.0, 4.0 / 3.0)
        # ColorJitter(brightness, contrast, saturation, hue) and the factor ranges torchvision derives from it.
        self.jitter = (0.4, 0.4, 0.2, 0.1)
        self.blur_radius = _check_range("blur_radius", blur_radius, 0.0, math.inf)
        self.solarize_threshold = int(solarize_threshold)
        # Per-crop probabilities (SPEC §2.3). Tuples are indexed (global 1, global 2, local).
        self.flip_p = 0.5
        self.color_jitter_p = 0.8
        self.grayscale_p = 0.2
        self.blur_p = (1.0, 0.1, 0.5)
        self.solarize_p = (0.0, 0.2, 0.0)
        self.decision_hook: Optional[Callable[[int, str, float, bool], None]] = None

    @property
    def num_crops(self) -> int:
        return 2 + self.local_crops_number

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(global {self.global_size}px scale={self.global_crops_scale} ×2, "
                f"local {self.local_size}px scale={self.local_crops_scale} ×{self.local_crops_number}, "
                f"flip_p={self.flip_p}, color_jitter_p={self.color_jitter_p}, grayscale_p={self.grayscale_p}, "
                f"blur_p={self.blur_p}, blur_radius={self.blur_radius}, solarize_p={self.solarize_p}, "
                f"mean={self.mean}, std={self.std})")

    # Every random decision goes through here: one torch.rand draw, reported to decision_hook.
    def _coin(self, crop_index: int, name: str, p: float) -> bool:
        applied = bool(torch.rand(1).item() < p)
        if self.decision_hook is not None:
            self.decision_hook(crop_index, name, float(p), applied)
        return applied

    def _crop(self, img: Image.Image, crop_index: int) -> torch.Tensor:
        if crop_index < 2:
            size, scale, kind = self.global_size, self.global_crops_scale, crop_index
        else:
            size, scale, kind = self.local_size, self.local_crops_scale, 2
        top, left, h, w = sample_crop_box(img.width, img.height, scale, self.ratio)
        out = resized_crop(img, top, left, h, w, size)
        if self._coin(crop_index, "flip", self.flip_p):
            out = hflip(out)
        if self._coin(crop_index, "color_jitter", self.color_jitter_p):
            out = self._color_jitter(out)
        if self._coin(crop_index, "grayscale", self.grayscale_p):
            out = grayscale(out)
        if self._coin(crop_index, "blur", self.blur_p[kind]):
            r0, r1 = self.blur_radius
            out = gaussian_blur(out, r0 + (r1 - r0) * torch.rand(1).item())
        if self._coin(crop_index, "solarize", self.solarize_p[kind]):
            out = solarize(out, self.solarize_threshold)
        return normalize(to_tensor(out), self.mean, self.std)

    def _color_jitter(self, img: Image.Image) -> Image.Image:
        # torchvision ColorJitter.get_params: randperm(4), then one uniform draw per factor.
        b, c, s, h = self.jitter
        order = torch.randperm(4).tolist()
        fb = torch.empty(1).uniform_(max(0.0, 1 - b), 1 + b).item()
        fc = torch.empty(1).uniform_(max(0.0, 1 - c), 1 + c).item()
        fs = torch.empty(1).uniform_(max(0.0, 1 - s), 1 + s).item()
        fh = torch.empty(1).uniform_(-h, h).item()
        return color_jitter(img, order, fb, fc, fs, fh)

    def __call__(self, img: Image.Image) -> List[torch.Tensor]:
        img = _rgb(img)
        return [self._crop(img, k) for k in range(self.num_crops)]


# ----------------------------------------------------------------------------------------------------------
# Evaluation transform
# ----------------------------------------------------------------------------------------------------------

class EvalTransform:
    """The official k-NN / linear evaluation transform: resize the shorter side to ``resize`` (bicubic, the
    longer side scaled and truncated as torchvision's ``Resize(int)``), centre-crop ``crop × crop`` (zero
    padding if the image is smaller, as torchvision's ``CenterCrop``), ToTensor, Normalize.
    Returns a float32 tensor ``(3, crop, crop)``. Deterministic.
    """

    def __init__(self, resize=256, crop=224, mean=IMAGENET_MEAN, std=IMAGENET_STD):
        for name, s in (("resize", resize), ("crop", crop)):
            if int(s) != s or s < 1:
                raise ValueError(f"{name} must be a positive integer, got {s}")
        self.resize = int(resize)
        self.crop = int(crop)
        self.mean = _check_stats("mean", mean)
        self.std = _check_stats("std", std)
        if min(self.std) <= 0:
            raise ValueError(f"std must be positive, got {self.std}")

    def __repr__(self) -> str:
        return f"{type(self).__name__}(resize={self.resize}, crop={self.crop}, mean={self.mean}, std={self.std})"

    def _resize_shorter(self, img: Image.Image) -> Image.Image:
        w, h = img.size
        # The shorter side (the width on a tie) becomes `resize`; the other keeps the aspect ratio, truncated.
        if w <= h:
            new_w, new_h = self.resize, int(self.resize * h / w)
        else:
            new_w, new_h = int(self.resize * w / h), self.resize
        if (new_w, new_h) == (w, h):
            return img
        return img.resize((new_w, new_h), _BICUBIC)

    def _center_crop(self, img: Image.Image) -> Image.Image:
        w, h = img.size
        c = self.crop
        if c > w or c > h:  # torchvision pads with zeros first
            pad_l, pad_t = max(c - w, 0) // 2, max(c - h, 0) // 2
            canvas = Image.new(img.mode, (max(w, c), max(h, c)))
            canvas.paste(img, (pad_l, pad_t))
            img, (w, h) = canvas, canvas.size
        top = int(round((h - c) / 2.0))
        left = int(round((w - c) / 2.0))
        return img.crop((left, top, left + c, top + c))

    def __call__(self, img: Image.Image) -> torch.Tensor:
        img = self._center_crop(self._resize_shorter(_rgb(img)))
        return normalize(to_tensor(img), self.mean, self.std)
