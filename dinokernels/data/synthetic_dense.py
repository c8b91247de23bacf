"""Synthetic data for the dense probes (segmentation and depth) of `dinokernels.eval.dense`.

* Segmentation: shapes (disc, square, triangle; classes 1, 2, 3) on a textured background (class 0). Each class
  has its own hue (jittered per shape), the background stays grey-ish, so the class of a patch is visible in its
  colour. Pixels on a shape's outline (within `ignore_border` pixels of the edge) are 255, the ignore index, as in
  PASCAL VOC's boundary band. Shapes may overlap; later shapes are drawn on top.
* Depth: a tilted plane (a floor or a wall: inverse depth is affine in the pixel coordinates, as for any plane
  seen through a pinhole camera) carrying a checkerboard fixed on the plane, and optionally a fronto-parallel box
  in front of it. Light is attenuated with distance (fog): colour = albedo·a + fog·(1 − a), a = exp(−depth/τ).
  Depth is in metres; points beyond `max_depth` and a few random holes are invalid (0).

Generation is deterministic: sample `i` uses ``numpy.random.default_rng((seed, task, i))``.
`write_dense_dataset` writes the folder layout the probes read (docs/dense_probes.md): ``images/NNNN.png`` and
``masks/NNNN.png`` (8-bit class indices) or ``depth/NNNN.png`` (16-bit millimetres, 0 = invalid).
"""
from __future__ import annotations

import os
from typing import Tuple

import numpy as np
from PIL import Image

__all__ = ["SEG_CLASS_NAMES", "segmentation_sample", "depth_sample", "write_dense_dataset"]

SEG_CLASS_NAMES = ("background", "disc", "square", "triangle")
_CLASS_RGB = {1: (215, 40, 40), 2: (40, 190, 60), 3: (45, 70, 220)}  # per-class hue; jittered per shape
_TASK_IDS = {"seg": 1, "depth": 2}
IGNORE_INDEX = 255


def _check_size(size) -> int:
    if isinstance(size, bool) or not isinstance(size, (int, np.integer)) or size < 16:
        raise ValueError(f"size must be an integer ≥ 16 pixels, got {size!r}")
    return int(size)


def _textured_background(rng: np.random.Generator, size: int) -> np.ndarray:
    """(size, size, 3) float in the grey band [70, 170]: a gradient plus stripes plus pixel noise."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64) / size
    angle = rng.uniform(0, np.pi)
    period = rng.uniform(0.08, 0.3)
    stripes = np.sin(2 * np.pi * (np.cos(angle) * xx + np.sin(angle) * yy) / period)
    base = 120 + 25 * (xx * rng.uniform(-1, 1) + yy * rng.uniform(-1, 1)) + 15 * stripes
    grey = base[..., None] + rng.normal(0, 6, (size, size, 1)) + rng.uniform(-8, 8, 3)
    return np.clip(grey, 70, 170)


def _shape_mask(kind: int, size: int, cx: float, cy: float, r: float, angle: float) -> np.ndarray:
    """Boolean (size, size) mask of a disc (1), square (2) or triangle (3) of circumradius r, rotated by angle."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64) + 0.5
    dx, dy = xx - cx, yy - cy
    if kind == 1:
        return dx * dx + dy * dy <= r * r
    # rotate into the shape's frame; a polygon is the intersection of half-planes through its edges
    c, s = np.cos(angle), np.sin(angle)
    u, v = c * dx + s * dy, -s * dx + c * dy
    sides = 4 if kind == 2 else 3
    apothem = r * np.cos(np.pi / sides)
    inside = np.ones((size, size), dtype=bool)
    for k in range(sides):
        t = 2 * np.pi * k / sides
        inside &= np.cos(t) * u + np.sin(t) * v <= apothem
    return inside


def _dilate(mask: np.ndarray, radius: int) -> np.ndarray:
    """Max over a (2r+1)² square; outside the image counts as False (no wrap-around)."""
    h, w = mask.shape
    padded = np.pad(mask, radius, constant_values=False)
    out = np.zeros_like(mask)
    for dy in range(2 * radius + 1):
        for dx in range(2 * radius + 1):
            out |= padded[dy:dy + h, dx:dx + w]
    return out


def segmentation_sample(index: int, size: int = 64, seed: int = 0, max_shapes: int = 3,
                        ignore_border: int = 1) -> Tuple[np.ndarray, np.ndarray]:
    """Image (size, size, 3) uint8 and mask (size, size) uint8 of sample `index`: class indices 0..3 (background,
    disc, square, triangle) and 255 on a band of `ignore_border` pixels around every shape's edge (0: none)."""
    size = _check_size(size)
    if max_shapes < 1 or ignore_border < 0:
        raise ValueError(f"max_shapes must be ≥ 1 and ignore_border ≥ 0, got {max_shapes} and {ignore_border}")
    rng = np.random.default_rng((seed, _TASK_IDS["seg"], index))
    image = _textured_background(rng, size)
    mask = np.zeros((size, size), dtype=np.uint8)
    edges = np.zeros((size, size), dtype=bool)
    for _ in range(int(rng.integers(1, max_shapes + 1))):
        kind = int(rng.integers(1, 4))
        r = rng.uniform(0.13, 0.28) * size
        cx, cy = rng.uniform(r * 0.6, size - r * 0.6, 2)
        inside = _shape_mask(kind, size, cx, cy, r, rng.uniform(0, 2 * np.pi))
        if not inside.any():
            continue
        colour = np.clip(np.array(_CLASS_RGB[kind]) + rng.uniform(-25, 25, 3), 0, 255)
        shade = 1 + 0.08 * rng.normal(size=(size, size, 1))  # a little texture on the shape too
        image[inside] = np.clip(colour * shade[inside], 0, 255)
        mask[inside] = kind
        if ignore_border:
            edges &= ~inside  # a shape drawn on top hides the older edges under it
            edges |= _dilate(inside, ignore_border) & ~_erode(inside, ignore_border)
    mask[edges] = IGNORE_INDEX
    return np.rint(image).astype(np.uint8), mask


def _erode(mask: np.ndarray, radius: int) -> np.ndarray:
    """Min over a (2r+1)² square; outside the image counts as True (shapes cut by the border keep no edge there)."""
    h, w = mask.shape
    padded = np.pad(mask, radius, constant_values=True)
    out = np.ones_like(mask)
    for dy in range(2 * radius + 1):
        for dx in range(2 * radius + 1):
            out &= padded[dy:dy + h, dx:dx + w]
    return out


def depth_sample(index: int, size: int = 64, seed: int = 0, max_depth: float = 10.0,
                 hole_fraction: float = 0.01) -> Tuple[np.ndarray, np.ndarray]:
    """Image (size, size, 3) uint8 and depth (size, size) float32 metres of sample `index` (0 = invalid: beyond
    `max_depth`, or one of the random holes covering about `hole_fraction` of the pixels)."""
    size = _check_size(size)
    if not (np.isfinite(max_depth) and max_depth > 1.0) or not 0 <= hole_fraction < 1:
        raise ValueError(f"max_depth must be > 1 m and hole_fraction in [0, 1), got {max_depth} and {hole_fraction}")
    rng = np.random.default_rng((seed, _TASK_IDS["depth"], index))
    focal = size  # pixels (a 53° field of view)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64) + 0.5
    u, v = (xx - size / 2) / focal, (yy - size / 2) / focal  # normalised image coordinates
    # A plane n·X = d0 seen from the origin: depth z = d0 / (n · (u, v, 1)), i.e. 1/z is affine in (u, v).
    tilt = rng.uniform(0.2, 1.2)  # how far the plane leans away (floor-like: far at the top)
    side = rng.uniform(-0.5, 0.5)
    normal = np.array([side, tilt, 1.0])
    d0 = rng.uniform(1.0, 4.0)
    inv = (normal[0] * u + normal[1] * v + normal[2]) / d0
    depth = np.where(inv > 1.0 / max_depth, 1.0 / np.maximum(inv, 1e-9), 0.0)
    # the plane's own coordinates carry a checkerboard (its texture shrinks with distance, as in a photograph)
    px, py = u * depth, v * depth
    cell = rng.uniform(0.25, 0.5)
    base = rng.uniform(70, 120)
    albedo_a, albedo_b = base + rng.uniform(15, 30, 3), base - rng.uniform(15, 30, 3)
    checker = ((np.floor(px / cell) + np.floor((py * 0.7 + depth) / cell)) % 2)[..., None]
    albedo = checker * albedo_a + (1 - checker) * albedo_b
    if rng.random() < 0.7:  # a box facing the camera, nearer than the plane behind it
        w, h = rng.uniform(0.2, 0.4, 2) * size
        x0, y0 = rng.uniform(0, size - w), rng.uniform(0, size - h)
        box = (xx >= x0) & (xx < x0 + w) & (yy >= y0) & (yy < y0 + h)
        plane_min = depth[box & (depth > 0)].min() if (box & (depth > 0)).any() else max_depth
        box_depth = rng.uniform(0.8, max(0.9, min(plane_min, max_depth) * 0.8))
        depth = np.where(box, box_depth, depth)
        stripes = (np.floor((xx - x0) / max(2.0, focal * 0.15 / box_depth)) % 2)[..., None]  # 15 cm stripes
        albedo = np.where(box[..., None], stripes * 130 + (1 - stripes) * 80 + rng.uniform(-15, 15, 3), albedo)
    fog_colour = np.array([200.0, 205.0, 215.0])
    tau = rng.uniform(2.0, 2.5)
    attenuation = np.exp(-np.where(depth > 0, depth, max_depth * 3) / tau)[..., None]
    image = albedo * attenuation + fog_colour * (1 - attenuation) + rng.normal(0, 3, (size, size, 3))
    if hole_fraction > 0:  # sensor holes: a few small invalid squares (the picture is intact there)
        for _ in range(max(1, int(hole_fraction * size * size / 9))):
            hy, hx = rng.integers(0, size - 3, 2)
            depth[hy:hy + 3, hx:hx + 3] = 0.0
    return np.clip(np.rint(image), 0, 255).astype(np.uint8), depth.astype(np.float32)


def write_dense_dataset(directory: str, task: str, n: int, size: int = 64, seed: int = 0) -> str:
    """Writes `n` samples of `task` ("seg" or "depth") to `directory` in the probes' folder layout: images/NNNN.png
    and masks/NNNN.png (8-bit class indices, 255 = ignore) or depth/NNNN.png (16-bit millimetres, 0 = invalid).
    Returns `directory`."""
    if task not in _TASK_IDS:
        raise ValueError(f"task must be 'seg' or 'depth', got {task!r}")
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
        raise ValueError(f"n must be a positive integer, got {n!r}")
    label_dir = "masks" if task == "seg" else "depth"
    os.makedirs(os.path.join(directory, "images"), exist_ok=True)
    os.makedirs(os.path.join(directory, label_dir), exist_ok=True)
    for i in range(int(n)):
        name = f"{i:04d}.png"
        if task == "seg":
            image, mask = segmentation_sample(i, size, seed)
            label = Image.fromarray(mask, mode="L")
        else:
            image, depth = depth_sample(i, size, seed)
            millimetres = np.clip(np.rint(depth.astype(np.float64) * 1000), 0, 65535).astype(np.uint16)
            label = Image.fromarray(millimetres)  # uint16 → mode "I;16"
        Image.fromarray(image, mode="RGB").save(os.path.join(directory, "images", name))
        label.save(os.path.join(directory, label_dir, name))
    return directory
