"""Datasets for DINO pretraining and evaluation: a recursive image folder and scikit-learn's digits images.

Both return ``(sample, label)`` with ``sample = transform(img)`` when a transform is given, else the RGB PIL
image, so they plug into ``torch.utils.data.DataLoader`` (with :func:`collate_multicrop` for the multi-crop
augmentation).
"""
from __future__ import annotations

import os
from typing import Callable, List, Optional, Sequence, Tuple

import numpy as np
import torch
from PIL import Image

from .imageio import to_rgb

__all__ = ["ImageFolder", "DigitsDataset", "collate_multicrop", "DIGITS_MEAN", "DIGITS_STD",
           "ROOT_CLASS"]

# Per-channel mean / std, in [0, 1], of the 1797 digits images upscaled to 32×32 (DigitsDataset defaults).
# The three channels are equal because the images are grey. tests/data/test_datasets.py recomputes them.
DIGITS_MEAN = (0.30923218, 0.30923218, 0.30923218)
DIGITS_STD = (0.34879037, 0.34879037, 0.34879037)

# Class name given to images that sit directly in an ImageFolder's root.
ROOT_CLASS = "."


# ----------------------------------------------------------------------------------------------------------
# ImageFolder
# ----------------------------------------------------------------------------------------------------------

def _open_rgb(path: str, full: bool = True) -> Image.Image:
    """Open and decode an image as RGB (any exception means unreadable)."""
    with open(path, "rb") as f:
        img = Image.open(f)
        if not full:
            img.verify()
            return img
        img.load()  # the full decode, while the file is open
        return to_rgb(img)  # 16-bit grey is scaled to 8 bits, not clipped to white


class ImageFolder(torch.utils.data.Dataset):
    """Every image under ``root``, found recursively (file names matched case-insensitively against
    ``extensions``; hidden files and folders, whose names start with ".", are ignored; symlinked folders are
    followed once).

    Labels: if images sit in sub-folders, the label is the index of the image's **first-level** sub-folder in
    the sorted list ``classes`` (so ``root/cat/a/b.jpg`` is a "cat"); images directly in ``root`` form the class
    ``"."``, listed first. If every image sits directly in ``root``, ``classes == ["."]`` and every label is 0.

    Unreadable files are not fatal. ``__getitem__`` opens lazily: when a file fails to open or decode it is
    counted (``skipped``, ``skipped_paths``), remembered, and the next readable sample (index i+1, i+2, …,
    wrapping) is returned instead; a ``RuntimeError`` is raised only if no file at all can be read.
    ``verify()`` checks every file up front and drops the bad ones. Note that with DataLoader workers the
    lazy counters live in the worker processes; call ``verify()`` in the main process for exact numbers.

    A missing ``root`` raises ``FileNotFoundError``; a folder with no matching image raises ``ValueError``.
    """

    def __init__(self, root, transform: Optional[Callable] = None,
                 extensions: Sequence[str] = (".jpg", ".jpeg", ".png", ".webp")):
        self.root = os.fspath(root)
        self.transform = transform
        if isinstance(extensions, str):
            extensions = (extensions,)
        self.extensions = tuple(e.lower() if e.startswith(".") else "." + e.lower() for e in extensions)
        if not self.extensions:
            raise ValueError("extensions must not be empty")
        if not os.path.exists(self.root):
            raise FileNotFoundError(f"image folder {self.root!r} does not exist")
        if not os.path.isdir(self.root):
            raise NotADirectoryError(f"image folder {self.root!r} is not a directory")
        files = self._find_files()
        if not files:
            raise ValueError(f"no image files with extensions {self.extensions} found under {self.root!r}")
        top = sorted({rel.split(os.sep, 1)[0] for rel in files if os.sep in rel})
        self.classes: List[str] = ([ROOT_CLASS] if any(os.sep not in rel for rel in files) else []) + top
        self.class_to_idx = {c: i for i, c in enumerate(self.classes)}
        self.samples: List[Tuple[str, int]] = [
            (os.path.join(self.root, rel),
             self.class_to_idx[rel.split(os.sep, 1)[0] if os.sep in rel else ROOT_CLASS]) for rel in files]
        self.skipped = 0
        self.skipped_paths: List[str] = []
        self._bad: set = set()

    def _find_files(self) -> List[str]:
        found = []
        seen_dirs = set()
        for dirpath, dirnames, filenames in os.walk(self.root, followlinks=True):
            real = os.path.realpath(dirpath)
            if real in seen_dirs:  # a symlink loop or a second link to the same folder
                dirnames[:] = []
                continue
            seen_dirs.add(real)
            dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
            for name in sorted(filenames):
                if not name.startswith(".") and name.lower().endswith(self.extensions):
                    found.append(os.path.relpath(os.path.join(dirpath, name), self.root))
        return sorted(found)

    @property
    def targets(self) -> List[int]:
        return [label for _, label in self.samples]

    def __len__(self) -> int:
        return len(self.samples)

    def _mark_bad(self, index: int) -> None:
        if index not in self._bad:
            self._bad.add(index)
            self.skipped += 1
            self.skipped_paths.append(self.samples[index][0])

    def load(self, index: int) -> Tuple[Image.Image, int]:
        """The RGB image and label at ``index``, or the next readable one (see the class docstring)."""
        n = len(self.samples)
        if not -n <= index < n:
            raise IndexError(f"index {index} out of range for {n} images")
        index %= n
        for k in range(n):
            i = (index + k) % n
            if i in self._bad:
                continue
            path, label = self.samples[i]
            try:
                return _open_rgb(path), label
            except Exception:  # noqa: BLE001 - any failure to open or decode means "unreadable"
                self._mark_bad(i)
        raise RuntimeError(f"none of the {n} image files under {self.root!r} could be read "
                           f"(e.g. {self.skipped_paths[:3]})")

    def __getitem__(self, index: int):
        img, label = self.load(index)
        return (self.transform(img) if self.transform is not None else img), label

    def verify(self, full: bool = False) -> int:
        """Open every file and drop the unreadable ones from ``samples`` (they are added to ``skipped`` /
        ``skipped_paths``). ``full=False`` checks headers and, for PNG, the chunk checksums (fast,
        ``PIL.Image.verify``); ``full=True`` decodes every image (catches truncated JPEG data too). Returns the
        number of files dropped by this call; raises ``RuntimeError`` if no readable file remains."""
        keep, dropped = [], 0
        for i, (path, label) in enumerate(self.samples):
            ok = i not in self._bad
            if ok:
                try:
                    _open_rgb(path, full=full)
                except Exception:  # noqa: BLE001
                    ok = False
            if ok:
                keep.append((path, label))
            else:
                dropped += 1
                if i not in self._bad:
                    self.skipped += 1
                    self.skipped_paths.append(path)
        self.samples = keep
        self._bad = set()
        if not keep:
            raise RuntimeError(f"none of the {dropped} image files under {self.root!r} could be read "
                               f"(e.g. {self.skipped_paths[:3]})")
        return dropped

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(root={self.root!r}, {len(self)} images, {len(self.classes)} classes, "
                f"skipped={self.skipped})")


# ----------------------------------------------------------------------------------------------------------
# Digits
# ----------------------------------------------------------------------------------------------------------

def digits_arrays(size: int = 32) -> Tuple[np.ndarray, np.ndarray]:
    """scikit-learn's 1797 digits (8×8, values 0..16) as uint8 grey images upscaled to ``size × size``.

    Values map to 0..255 by ``round(v·255/16)``; the upscaling is PIL bicubic. Returns ``(images (N, size,
    size) uint8, labels (N,) int64)``.
    """
    from sklearn.datasets import load_digits  # imported lazily: scikit-learn is slow to import

    if int(size) != size or size < 1:
        raise ValueError(f"size must be a positive integer, got {size}")
    size = int(size)
    digits = load_digits()
    raw = np.clip(np.rint(digits.images * (255.0 / 16.0)), 0, 255).astype(np.uint8)
    if size == 8:
        images = raw
    else:
        images = np.stack([np.asarray(Image.fromarray(a).resize((size, size), Image.Resampling.BICUBIC))
                           for a in raw])
    return images, digits.target.astype(np.int64)


def _stratified_split(labels: np.ndarray, test_fraction: float, seed: int) -> Tuple[np.ndarray, np.ndarray]:
    """Per class: a seeded permutation (numpy's RandomState, whose stream is frozen), the first
    round(n_c·test_fraction) go to test. Returns sorted (train_idx, test_idx)."""
    rng = np.random.RandomState(seed)
    train, test = [], []
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        idx = idx[rng.permutation(len(idx))]
        n_test = int(round(len(idx) * test_fraction))
        test.append(idx[:n_test])
        train.append(idx[n_test:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(test))


class DigitsDataset(torch.utils.data.Dataset):
    """scikit-learn's digits images (ship with scikit-learn: no download) as RGB PIL images of ``size × size``.

    ``split``: ``"all"`` (1797 images), or ``"train"`` / ``"test"`` from a stratified split (per class,
    ``round(n_c · test_fraction)`` images go to test) that depends only on ``seed``; train and test are
    disjoint and together cover all images. ``__getitem__`` returns ``(transform(img) or img, label)`` with
    labels 0..9; ``targets`` lists the labels, ``indices`` the positions in the full set.
    Normalisation statistics for the default size are ``DIGITS_MEAN`` / ``DIGITS_STD``.
    """

    def __init__(self, transform: Optional[Callable] = None, size: int = 32, split: str = "all",
                 test_fraction: float = 0.2, seed: int = 0):
        if split not in ("all", "train", "test"):
            raise ValueError(f"split must be 'all', 'train' or 'test', got {split!r}")
        if not 0.0 < float(test_fraction) < 1.0:
            raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
        self.transform = transform
        self.size = int(size)
        self.split = split
        self.test_fraction = float(test_fraction)
        self.seed = int(seed)
        images, labels = digits_arrays(self.size)
        if split == "all":
            idx = np.arange(len(labels))
        else:
            train_idx, test_idx = _stratified_split(labels, self.test_fraction, self.seed)
            idx = train_idx if split == "train" else test_idx
        self.indices: List[int] = idx.tolist()
        self.images = images[idx]  # (N, size, size) uint8 grey
        self.targets: List[int] = labels[idx].tolist()
        self.classes = [str(d) for d in range(10)]

    def __len__(self) -> int:
        return len(self.targets)

    def image(self, index: int) -> Image.Image:
        return Image.fromarray(self.images[index]).convert("RGB")

    def __getitem__(self, index: int):
        img = self.image(index)
        return (self.transform(img) if self.transform is not None else img), self.targets[index]

    def __repr__(self) -> str:
        return f"{type(self).__name__}(split={self.split!r}, {len(self)} images, size={self.size})"


# ----------------------------------------------------------------------------------------------------------
# Collation
# ----------------------------------------------------------------------------------------------------------

def collate_multicrop(batch: Sequence[Tuple[Sequence[torch.Tensor], int]]
                      ) -> Tuple[List[torch.Tensor], torch.Tensor]:
    """``[(crops, label), …]`` (crops: one list of tensors per sample, as from DataAugmentationDINO) →
    ``([crop 0 of every sample stacked (B, 3, G, G), crop 1 …, local crops (B, 3, L, L) …], labels (B,)
    int64)``."""
    if len(batch) == 0:
        raise ValueError("collate_multicrop got an empty batch")
    n = len(batch[0][0])
    for crops, _ in batch:
        if len(crops) != n:
            raise ValueError(f"every sample must have the same number of crops, got {len(crops)} and {n}")
    crops = [torch.stack([sample[0][k] for sample in batch]) for k in range(n)]
    labels = torch.as_tensor([int(label) for _, label in batch], dtype=torch.int64)
    return crops, labels
