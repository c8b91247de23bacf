"""Folders of images with per-pixel labels for the dense probes (docs/dense_probes.md):

    DIR/images/<stem>.png|.jpg|.jpeg
    DIR/masks/<stem>.png             segmentation: one class index per pixel (8-bit grey or palette PNG), 255 = ignore
    DIR/depth/<stem>.png | .npy      depth: 16-bit PNG in millimetres (0 = invalid) or a float .npy in metres
                                     (0, negative and non-finite values = invalid)

An image without a label, a label without an image and a stem present twice are skipped and counted (never fatal);
a missing folder is a clear error. Unreadable files are found when read (`read_mask`, `read_depth` raise a
`DenseFileError` naming the file) and the caller counts them as skipped.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import List, Tuple

import numpy as np
from PIL import Image

from .imageio import open_rgb

__all__ = ["IMAGE_EXTENSIONS", "LABEL_FOLDERS", "DenseFileError", "DensePair", "DenseFolder", "find_dense_pairs",
           "read_mask", "read_depth", "read_image"]

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg")
LABEL_FOLDERS = {"seg": "masks", "depth": "depth"}
_LABEL_EXTENSIONS = {"seg": (".png",), "depth": (".png", ".npy")}


class DenseFileError(ValueError):
    """A file of a dense data set that cannot be used (unreadable, wrong format); the message names the file."""


@dataclass
class DensePair:
    stem: str
    image: str
    label: str


@dataclass
class DenseFolder:
    """The usable (image, label) pairs of a folder, sorted by stem, and the skipped files with their reasons."""
    directory: str
    task: str
    pairs: List[DensePair]
    skipped: List[Tuple[str, str]] = field(default_factory=list)  # (path, reason)


def _files_by_stem(folder: str, extensions) -> Tuple[dict, List[Tuple[str, str]]]:
    found, skipped = {}, []
    for name in sorted(os.listdir(folder)):
        path = os.path.join(folder, name)
        stem, ext = os.path.splitext(name)
        if name.startswith(".") or not os.path.isfile(path) or ext.lower() not in extensions:
            continue
        if stem in found:
            skipped.append((path, f"another file with the stem {stem!r} ({os.path.basename(found[stem])})"))
            continue
        found[stem] = path
    return found, skipped


def find_dense_pairs(directory: str, task: str, arg_name: str = "directory") -> DenseFolder:
    """Pairs DIR/images/<stem>.* with DIR/masks/<stem>.png (task "seg") or DIR/depth/<stem>.png|.npy (task
    "depth"). Raises ValueError (naming `arg_name`) when a folder is missing; unpaired files are skipped and
    listed in `skipped`."""
    if task not in LABEL_FOLDERS:
        raise ValueError(f"task must be 'seg' or 'depth', got {task!r}")
    if not os.path.isdir(directory):
        raise ValueError(f"{arg_name} {directory!r} is not a folder")
    image_dir = os.path.join(directory, "images")
    label_dir = os.path.join(directory, LABEL_FOLDERS[task])
    for folder, what in ((image_dir, "images"), (label_dir, "labels")):
        if not os.path.isdir(folder):
            raise ValueError(f"{arg_name} {directory!r} has no {os.path.basename(folder)}/ folder ({what}; "
                             f"expected layout: images/<stem>.png|jpg and {LABEL_FOLDERS[task]}/<stem>."
                             f"{'png' if task == 'seg' else 'png|npy'})")
    images, skipped = _files_by_stem(image_dir, IMAGE_EXTENSIONS)
    labels, skipped_labels = _files_by_stem(label_dir, _LABEL_EXTENSIONS[task])
    skipped += skipped_labels
    pairs = []
    for stem, path in images.items():
        if stem in labels:
            pairs.append(DensePair(stem, path, labels[stem]))
        else:
            skipped.append((path, f"no {LABEL_FOLDERS[task]}/{stem}.* label"))
    skipped += [(path, f"no images/{stem}.* image") for stem, path in labels.items() if stem not in images]
    return DenseFolder(directory, task, pairs, skipped)


def read_image(path: str) -> Image.Image:
    """The image as 8-bit RGB; DenseFileError when it cannot be decoded."""
    try:
        return open_rgb(path)
    except Exception as e:  # PIL raises many types for broken files
        raise DenseFileError(f"cannot read image {path!r}: {' '.join(str(e).split()) or type(e).__name__}") from e


def read_mask(path: str) -> np.ndarray:
    """(H, W) uint8 class indices of a mask PNG (grey or palette; 255 = ignore). Colour (RGB) masks and values
    above 255 raise DenseFileError: a mask holds indices, not colours."""
    try:
        with Image.open(path) as img:
            img.load()
            mode = img.mode
            array = np.array(img)  # a writable copy
    except Exception as e:
        raise DenseFileError(f"cannot read mask {path!r}: {' '.join(str(e).split()) or type(e).__name__}") from e
    if array.ndim != 2:
        raise DenseFileError(f"mask {path!r} has mode {mode} ({array.ndim} dimensions): a mask must be a single-"
                             f"channel PNG of class indices (grey 'L' or palette 'P'), not colours")
    if array.dtype != np.uint8:
        if array.dtype == bool:
            return array.astype(np.uint8)
        if array.size and (array.min() < 0 or array.max() > 255):
            raise DenseFileError(f"mask {path!r} holds values outside 0..255 (class indices are 0..254, 255 = "
                                 f"ignore)")
        array = array.astype(np.uint8)
    return array


def read_depth(path: str) -> np.ndarray:
    """(H, W) float32 depth in metres, 0 where invalid: a 16-bit PNG in millimetres (0 = invalid), or a 2-D float
    .npy in metres (non-finite and negative values become 0). DenseFileError for other formats."""
    try:
        if path.lower().endswith(".npy"):
            array = np.load(path, allow_pickle=False)
            mode = None
        else:
            with Image.open(path) as img:
                img.load()
                mode = img.mode
                array = np.array(img)
    except Exception as e:
        raise DenseFileError(f"cannot read depth {path!r}: {' '.join(str(e).split()) or type(e).__name__}") from e
    if array.ndim != 2:
        raise DenseFileError(f"depth {path!r} has shape {array.shape}: expected a single-channel (H, W) map")
    if mode is None:
        if not np.issubdtype(array.dtype, np.floating):
            raise DenseFileError(f"depth {path!r} is a {array.dtype} array: a .npy depth map must be float metres")
        depth = array.astype(np.float32)
        depth[~np.isfinite(depth) | (depth < 0)] = 0.0
        return depth
    if not (mode.startswith("I;16") or mode == "I"):
        raise DenseFileError(f"depth {path!r} has mode {mode}: a depth PNG must be 16-bit grey in millimetres")
    if array.size and array.min() < 0:
        raise DenseFileError(f"depth {path!r} holds negative values")
    return (array.astype(np.float64) / 1000.0).astype(np.float32)
