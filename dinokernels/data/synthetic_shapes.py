"""Synthetic shapes: a small generated detection data set for Grounding DINO (training smoke runs, the COCO
evaluation path, tests), with captions in Open-GroundingDino's object-detection format.

Each image is an ``H × W`` RGB canvas with a textured background (gradient, stripes, checker or blobs, plus pixel
noise) and 1–4 solid shapes, each of a category named "<colour> <shape>" ("red circle", "blue star", ...).
Shapes never overlap (their boxes keep a 2-pixel gap), so every annotation box is the tight box of its shape's
drawn pixels. Backgrounds stay inside the channel band [60, 190] while every shape colour has a channel outside it,
so a shape's pixels are exactly the pixels of its colour.

Generation is deterministic: image ``i`` of a split uses ``numpy.random.default_rng`` seeded from
``(seed, split, i)`` (a SeedSequence); the caption (positives plus sampled negatives, shuffled) from
``(seed, split, i, epoch)``, so ``set_epoch`` re-draws negatives and order while images stay fixed.
"""
from __future__ import annotations

import json
import math
import os
from typing import Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from PIL import Image, ImageDraw

from ..models.grounding_dino.targets import build_caption

__all__ = ["SHAPE_COLORS", "SHAPE_KINDS", "SyntheticShapes", "shape_categories", "write_coco", "collate_detection"]

# Solid fill colours: each has a channel outside the background band [60, 190].
SHAPE_COLORS: Dict[str, Tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 170, 50),
    "blue": (30, 70, 225),
    "yellow": (240, 215, 30),
    "purple": (150, 40, 205),
}
SHAPE_KINDS = ("circle", "square", "triangle", "star", "cross")
BACKGROUND_BAND = (60, 190)
_SPLITS = {"train": 1, "val": 2, "test": 3}
_GAP = 2  # pixels between shapes' boxes


def shape_categories(colors: Optional[Sequence[str]] = None,
                     shapes: Optional[Sequence[str]] = None) -> List[Dict[str, object]]:
    """COCO categories [{"id": 1.., "name": "red circle", "supercategory": "circle", "color": ..., "shape": ...}]
    for every colour × shape (defaults: all five of each, 25 categories)."""
    colors = list(SHAPE_COLORS) if colors is None else list(colors)
    shapes = list(SHAPE_KINDS) if shapes is None else list(shapes)
    for c in colors:
        if c not in SHAPE_COLORS:
            raise ValueError(f"shape_categories: unknown colour {c!r}; known: {list(SHAPE_COLORS)}")
    for s in shapes:
        if s not in SHAPE_KINDS:
            raise ValueError(f"shape_categories: unknown shape {s!r}; known: {list(SHAPE_KINDS)}")
    if not colors or not shapes or len(set(colors)) != len(colors) or len(set(shapes)) != len(shapes):
        raise ValueError("shape_categories: colours and shapes must be non-empty lists without repeats")
    cats = []
    for c in colors:
        for s in shapes:
            cats.append({"id": len(cats) + 1, "name": f"{c} {s}", "supercategory": s, "color": c, "shape": s})
    return cats


def _size_hw(image_size) -> Tuple[int, int]:
    if isinstance(image_size, int) and not isinstance(image_size, bool):
        h = w = image_size
    elif isinstance(image_size, (tuple, list)) and len(image_size) == 2 and \
            all(isinstance(v, int) and not isinstance(v, bool) for v in image_size):
        h, w = image_size
    else:
        raise ValueError(f"SyntheticShapes: argument 'image_size' must be an int or (h, w), got {image_size!r}")
    if min(h, w) < 32:
        raise ValueError(f"SyntheticShapes: argument 'image_size' must be at least 32 pixels, got {image_size!r}")
    return int(h), int(w)


def _background(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """(h, w, 3) uint8 texture inside BACKGROUND_BAND."""
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    base = rng.uniform(95, 155, size=3).astype(np.float32)
    tint = rng.uniform(-1, 1, size=3).astype(np.float32)
    kind = int(rng.integers(4))
    if kind == 0:  # linear gradient
        a = rng.uniform(0, 2 * math.pi)
        tex = (math.cos(a) * (xx / w - 0.5) + math.sin(a) * (yy / h - 0.5)) * 2
    elif kind == 1:  # stripes
        a, period = rng.uniform(0, math.pi), rng.uniform(6, 20)
        tex = np.sin(2 * math.pi * (math.cos(a) * xx + math.sin(a) * yy) / period)
    elif kind == 2:  # checker
        cell = int(rng.integers(6, 18))
        tex = (((yy // cell) + (xx // cell)) % 2) * 2 - 1
    else:  # blobs: coarse noise, bilinearly upsampled
        coarse = rng.uniform(-1, 1, size=(int(rng.integers(3, 7)), int(rng.integers(3, 7)))).astype(np.float32)
        tex = np.asarray(Image.fromarray(coarse, mode="F").resize((w, h), Image.Resampling.BILINEAR))
    amplitude = rng.uniform(10, 25)
    img = base + amplitude * tex[..., None] * (0.6 + 0.4 * tint) + rng.normal(0, 4, size=(h, w, 3))
    return np.clip(np.rint(img), *BACKGROUND_BAND).astype(np.uint8)


def _shape_mask(kind: str, h: int, w: int, x0: int, y0: int, side: int, rng: np.random.Generator) -> np.ndarray:
    """Boolean (h, w) mask of a shape drawn inside the square [x0, x0 + side) × [y0, y0 + side)."""
    m = Image.new("L", (w, h), 0)
    d = ImageDraw.Draw(m)
    x1, y1 = x0 + side - 1, y0 + side - 1
    cx, cy, r = x0 + (side - 1) / 2, y0 + (side - 1) / 2, (side - 1) / 2
    if kind == "circle":
        d.ellipse([x0, y0, x1, y1], fill=255)
    elif kind == "square":
        d.rectangle([x0, y0, x1, y1], fill=255)
    elif kind == "triangle":
        d.polygon([(cx, y0), (x1, y1), (x0, y1)], fill=255)
    elif kind == "star":
        phase = rng.uniform(0, 2 * math.pi / 5)
        pts = []
        for k in range(10):
            rad = r if k % 2 == 0 else r * 0.45
            a = phase + k * math.pi / 5
            pts.append((cx + rad * math.sin(a), cy - rad * math.cos(a)))
        d.polygon(pts, fill=255)
    elif kind == "cross":
        t = max(2, int(round(side * 0.32)))
        a = x0 + (side - t) // 2
        b = y0 + (side - t) // 2
        d.rectangle([a, y0, a + t - 1, y1], fill=255)
        d.rectangle([x0, b, x1, b + t - 1], fill=255)
    else:
        raise ValueError(f"unknown shape {kind!r}")
    return np.asarray(m) > 0


class SyntheticShapes(torch.utils.data.Dataset):
    """Generated detection images with captions.

    Args:
        split: "train", "val" or "test" (independent seeds); num_images: length.
        image_size: int or (h, w), ≥ 32 (default 160). min_objects / max_objects: shapes per image (1, 4).
        min_scale / max_scale: shape side as a fraction of min(h, w) (0.15, 0.4).
        colors / shapes: subsets of SHAPE_COLORS / SHAPE_KINDS (the categories are their product).
        max_names: caption length cap in names (positives always kept, negatives fill up; Open-GD uses 50).
        seed: base seed. normalize: ImageNet mean/std (Grounding DINO's), else [0, 1].

    __getitem__(i) → (image (3, h, w) float32, target) with target keys "boxes" (G, 4) cxcywh normalised,
    "labels" (G,) int64 category index into `categories` (0-based; COCO id = index + 1), "caption" str,
    "positive_spans" list of G (begin, end) character spans (the box's category name in the caption),
    "category_spans" {name: span} of every name in the caption, "image_id" int (i + 1), "size" (2,) int64 (h, w).
    `sample(i)` gives the raw uint8 (h, w, 3) image and the COCO annotations; `coco()` the whole split as a COCO dict.
    """

    def __init__(self, split: str = "train", num_images: int = 64, image_size: Union[int, Tuple[int, int]] = 160,
                 seed: int = 0, min_objects: int = 1, max_objects: int = 4, min_scale: float = 0.15,
                 max_scale: float = 0.4, colors: Optional[Sequence[str]] = None,
                 shapes: Optional[Sequence[str]] = None, max_names: int = 8, normalize: bool = True):
        if split not in _SPLITS:
            raise ValueError(f"SyntheticShapes: argument 'split' must be one of {list(_SPLITS)}, got {split!r}")
        for name, v in (("num_images", num_images), ("seed", seed), ("min_objects", min_objects),
                        ("max_objects", max_objects), ("max_names", max_names)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise ValueError(f"SyntheticShapes: argument '{name}' must be a nonnegative int, got {v!r}")
        if not 1 <= min_objects <= max_objects:
            raise ValueError(f"SyntheticShapes: need 1 <= min_objects <= max_objects, got {min_objects}, {max_objects}")
        if not 0 < min_scale <= max_scale <= 0.9:
            raise ValueError(f"SyntheticShapes: need 0 < min_scale <= max_scale <= 0.9, got {min_scale}, {max_scale}")
        self.split, self.num_images, self.seed = split, num_images, seed
        self.height, self.width = _size_hw(image_size)
        if int(min_scale * min(self.height, self.width)) < 8:
            raise ValueError(f"SyntheticShapes: min_scale {min_scale} gives shapes under 8 pixels at "
                             f"{self.height}x{self.width}")
        self.min_objects, self.max_objects = min_objects, max_objects
        self.min_scale, self.max_scale = float(min_scale), float(max_scale)
        self.categories = shape_categories(colors, shapes)
        self.category_names = [c["name"] for c in self.categories]
        self.max_names = max_names
        self.normalize = normalize
        self.epoch = 0
        self.mean = torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1)
        self.std = torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1)

    def __len__(self) -> int:
        return self.num_images

    def set_epoch(self, epoch: int) -> None:
        """Captions (negatives, order) are re-drawn per epoch; images do not change."""
        self.epoch = int(epoch)

    def _index(self, i: int) -> int:
        if isinstance(i, bool) or not isinstance(i, (int, np.integer)):
            raise TypeError(f"SyntheticShapes: index must be an int, got {type(i).__name__}")
        i = int(i)
        if i < 0:
            i += self.num_images
        if not 0 <= i < self.num_images:
            raise IndexError(f"SyntheticShapes: index {i} out of range for {self.num_images} images")
        return i

    def sample(self, i: int) -> Tuple[np.ndarray, List[Dict[str, object]]]:
        """Image i as uint8 (h, w, 3) and its COCO annotations (bbox [x, y, w, h] in pixels, tight around the
        shape's pixels; area = the shape's pixel count; category_id 1-based)."""
        i = self._index(i)
        rng = np.random.default_rng(np.random.SeedSequence([self.seed, _SPLITS[self.split], i]))
        h, w = self.height, self.width
        img = _background(rng, h, w)
        n = int(rng.integers(self.min_objects, self.max_objects + 1))
        placed: List[Tuple[int, int, int, int]] = []
        anns = []
        lo, hi = self.min_scale * min(h, w), self.max_scale * min(h, w)
        for _ in range(n):
            cat = int(rng.integers(len(self.categories)))
            for _try in range(50):
                side = int(rng.integers(int(lo), int(hi) + 1))
                x0, y0 = int(rng.integers(0, w - side + 1)), int(rng.integers(0, h - side + 1))
                box = (x0, y0, x0 + side, y0 + side)
                if all(box[0] >= p[2] + _GAP or p[0] >= box[2] + _GAP or box[1] >= p[3] + _GAP or
                       p[1] >= box[3] + _GAP for p in placed):
                    break
            else:
                continue  # no free spot: fewer shapes
            mask = _shape_mask(self.categories[cat]["shape"], h, w, x0, y0, side, rng)
            placed.append(box)
            img[mask] = SHAPE_COLORS[self.categories[cat]["color"]]
            ys, xs = np.nonzero(mask)
            bx, by = int(xs.min()), int(ys.min())
            anns.append({"category_id": cat + 1, "bbox": [bx, by, int(xs.max()) + 1 - bx, int(ys.max()) + 1 - by],
                         "area": int(mask.sum()), "iscrowd": 0})
        return img, anns

    def caption(self, i: int, anns: Optional[List[Dict[str, object]]] = None) -> Tuple[str, Dict[str, Tuple[int, int]]]:
        """Image i's caption (present category names + negatives, shuffled, " . "-joined, trailing " .") and the
        span of every name in it."""
        i = self._index(i)
        if anns is None:
            anns = self.sample(i)[1]
        present = [self.category_names[int(a["category_id"]) - 1] for a in anns]
        negatives = [n for n in self.category_names if n not in set(present)]
        rng = np.random.default_rng(np.random.SeedSequence([self.seed, _SPLITS[self.split], i, 1 + self.epoch]))
        return build_caption(present, negatives, rng, max_names=self.max_names)

    def __getitem__(self, i: int):
        i = self._index(i)
        img, anns = self.sample(i)
        caption, spans = self.caption(i, anns)
        h, w = self.height, self.width
        boxes = torch.tensor([[(a["bbox"][0] + a["bbox"][2] / 2) / w, (a["bbox"][1] + a["bbox"][3] / 2) / h,
                               a["bbox"][2] / w, a["bbox"][3] / h] for a in anns], dtype=torch.float32).reshape(-1, 4)
        labels = torch.tensor([int(a["category_id"]) - 1 for a in anns], dtype=torch.int64)
        image = torch.from_numpy(img).permute(2, 0, 1).float().div_(255)
        if self.normalize:
            image = (image - self.mean) / self.std
        target = {"boxes": boxes, "labels": labels, "caption": caption,
                  "positive_spans": [spans[self.category_names[int(k)]] for k in labels],
                  "category_spans": spans, "image_id": i + 1, "size": torch.tensor([h, w], dtype=torch.int64)}
        return image, target

    def coco(self, file_names: Optional[Sequence[str]] = None) -> Dict[str, object]:
        """The split as a COCO instances dict (images with file_name, height, width and an extra "caption";
        annotations; categories)."""
        images, annotations = [], []
        for i in range(self.num_images):
            _, anns = self.sample(i)
            caption, _ = self.caption(i, anns)
            name = file_names[i] if file_names is not None else f"{i:06d}.png"
            images.append({"id": i + 1, "file_name": name, "height": self.height, "width": self.width,
                           "caption": caption})
            for a in anns:
                annotations.append({"id": len(annotations) + 1, "image_id": i + 1, **a})
        cats = [{"id": c["id"], "name": c["name"], "supercategory": c["supercategory"]} for c in self.categories]
        return {"info": {"description": f"dinokernels synthetic shapes, split {self.split}, seed {self.seed}"},
                "images": images, "annotations": annotations, "categories": cats}


def write_coco(directory: str, n_train: int = 64, n_val: int = 16, seed: int = 0,
               image_size: Union[int, Tuple[int, int]] = 160, **kwargs) -> Dict[str, str]:
    """Writes ``directory/{train,val}/NNNNNN.png`` and ``directory/annotations/instances_{train,val}.json``
    (COCO format). kwargs go to SyntheticShapes. Returns {"train_images", "train_annotations", "val_images",
    "val_annotations"} paths."""
    if not isinstance(directory, (str, os.PathLike)):
        raise TypeError(f"write_coco: argument 'directory' must be a path, got {type(directory).__name__}")
    directory = os.fspath(directory)
    paths: Dict[str, str] = {}
    os.makedirs(os.path.join(directory, "annotations"), exist_ok=True)
    for split, n in (("train", n_train), ("val", n_val)):
        ds = SyntheticShapes(split, num_images=n, image_size=image_size, seed=seed, **kwargs)
        img_dir = os.path.join(directory, split)
        os.makedirs(img_dir, exist_ok=True)
        for i in range(n):
            Image.fromarray(ds.sample(i)[0]).save(os.path.join(img_dir, f"{i:06d}.png"))
        ann_path = os.path.join(directory, "annotations", f"instances_{split}.json")
        with open(ann_path, "w") as f:
            json.dump(ds.coco(), f)
        paths[f"{split}_images"], paths[f"{split}_annotations"] = img_dir, ann_path
    return paths


def collate_detection(batch):
    """[(image (3, h, w), target)] of equal-size images → (images (B, 3, h, w), list of targets)."""
    images = [b[0] for b in batch]
    if any(im.shape != images[0].shape for im in images):
        raise ValueError(f"collate_detection: images differ in size: {sorted({tuple(im.shape) for im in images})}")
    return torch.stack(images), [b[1] for b in batch]
