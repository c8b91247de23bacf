"""Training and evaluation data for the trainer: the built-in digits or an image folder, with augmentations that are
seeded per (seed, epoch, image) so that a run's crops do not depend on the number of data-loading workers, on the
number of processes, or on where a resumed run restarted."""
import contextlib
import os
import random
from typing import Optional, Tuple

import numpy as np
import torch
from torch.utils.data import Dataset

__all__ = ["SeededTransform", "build_pretrain_dataset", "build_eval_datasets", "normalization", "seeded_rngs"]

_MASK63 = (1 << 63) - 1


def _mix(*values: int) -> int:
    """A 63-bit seed from integers (splitmix64-style mixing; stable across processes, unlike hash())."""
    x = 0x9E3779B97F4A7C15
    for v in values:
        x = (x ^ (int(v) & 0xFFFFFFFFFFFFFFFF)) * 0xBF58476D1CE4E5B9 & 0xFFFFFFFFFFFFFFFF
        x ^= x >> 31
        x = x * 0x94D049BB133111EB & 0xFFFFFFFFFFFFFFFF
        x ^= x >> 29
    return x & _MASK63


@contextlib.contextmanager
def seeded_rngs(seed: int):
    """Seeds Python's `random`, numpy's global RNG and torch's CPU generator with `seed` for the block and
    restores their previous states afterwards (the transforms may draw from any of the three)."""
    py_state = random.getstate()
    np_state = np.random.get_state()
    torch_state = torch.get_rng_state()
    random.seed(seed)
    np.random.seed(seed % (1 << 32))
    torch.default_generator.manual_seed(seed)
    try:
        yield
    finally:
        random.setstate(py_state)
        np.random.set_state(np_state)
        torch.set_rng_state(torch_state)


class SeededTransform(Dataset):
    """dataset[i] = (transform(image_i), label_i), with the transform's random draws seeded by (seed, epoch, i).
    `dataset` must return (PIL image, label) (its own transform None). Call set_epoch before each epoch (the
    DataLoader's workers are created per epoch, so they receive it)."""

    def __init__(self, dataset: Dataset, transform, seed: int = 0):
        self.dataset = dataset
        self.transform = transform
        self.seed = int(seed)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int):
        image, label = self.dataset[index]
        with seeded_rngs(_mix(self.seed, self.epoch, index)):
            return self.transform(image), label


class _Subset(Dataset):
    def __init__(self, dataset: Dataset, n: int):
        self.dataset = dataset
        self.n = min(int(n), len(dataset))
        targets = getattr(dataset, "targets", None)
        if targets is not None:
            self.targets = list(targets)[:self.n]

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, index: int):
        if not 0 <= index < self.n:
            raise IndexError(index)
        return self.dataset[index]


def normalization(config) -> Tuple[Tuple[float, ...], Tuple[float, ...]]:
    """(mean, std): the built-in data set's statistics without --data, ImageNet's for an image folder."""
    from ..data import IMAGENET_MEAN, IMAGENET_STD, builtin_stats

    if config.data is None:
        mean, std = builtin_stats(getattr(config, "builtin_data", "digits"))
        return tuple(mean), tuple(std)
    return tuple(IMAGENET_MEAN), tuple(IMAGENET_STD)


def build_pretrain_dataset(config, log=None) -> Tuple[Dataset, str]:
    """The unlabeled training images as (PIL image, label) pairs, and a description. Built-in: the digits train
    split; else the image folder `config.data` (recursive; unreadable files skipped and counted)."""
    from ..data import ImageFolder, builtin_dataset

    if config.data is None:
        name = getattr(config, "builtin_data", "digits")
        dataset = builtin_dataset(name, "train", config.digits_size)
        desc = f"built-in {name} (from scikit-learn's digits), train split, {len(dataset)} images at " \
               f"{config.digits_size}px"
    else:
        if not os.path.isdir(config.data):
            raise FileNotFoundError(f"--data {config.data!r} is not a folder")
        dataset = ImageFolder(config.data, transform=None)
        skipped = _verify(dataset)
        desc = f"image folder {config.data}: {len(dataset)} images" + (f" ({skipped} unreadable, skipped)"
                                                                       if skipped else "")
    if config.subset is not None:
        dataset = _Subset(dataset, config.subset)
        desc += f", first {len(dataset)} used"
    if len(dataset) == 0:
        raise ValueError(f"no training images found ({desc})")
    return dataset, desc


def _verify(dataset) -> int:
    verify = getattr(dataset, "verify", None)
    if callable(verify):
        verify()
    skipped = getattr(dataset, "skipped", 0)
    return len(skipped) if isinstance(skipped, (list, tuple, set, dict)) else int(skipped or 0)


def build_eval_datasets(config, eval_data: Optional[str] = None):
    """(train, test, description) labelled datasets for k-NN / linear probe, with the evaluation transform (resize,
    centre crop, normalise), or None when there is nothing labelled to evaluate on.

    Built-in data (digits or cluttered digits): the train and test splits at the training resolution. An image folder `eval_data` (or
    config.eval_data): its train/ and val/ (or test/) sub-folders, resized to 256 and centre-cropped to 224 as DINO's
    eval_knn.py (config.eval_resize / eval_crop override)."""
    from ..data import EvalTransform, ImageFolder, builtin_dataset

    mean, std = normalization(config)
    eval_data = eval_data if eval_data is not None else getattr(config, "eval_data", None)
    if eval_data is None and config.data is None:
        name = getattr(config, "builtin_data", "digits")
        size = config.eval_crop or config.global_size
        tf = EvalTransform(config.eval_resize or size, size, mean, std)
        train = builtin_dataset(name, "train", config.digits_size, transform=tf)
        test = builtin_dataset(name, "test", config.digits_size, transform=tf)
        return train, test, f"{name}: {len(train)} train / {len(test)} test images at {size}px"
    if eval_data is None:
        return None
    from ..data import IMAGENET_MEAN, IMAGENET_STD

    train_dir = os.path.join(eval_data, "train")
    test_dir = next((os.path.join(eval_data, d) for d in ("val", "test")
                     if os.path.isdir(os.path.join(eval_data, d))), None)
    if not os.path.isdir(train_dir) or test_dir is None:
        raise FileNotFoundError(f"evaluation data {eval_data!r} needs train/ and val/ (or test/) sub-folders, one "
                                f"folder per class inside each")
    tf = EvalTransform(config.eval_resize or 256, config.eval_crop or 224, IMAGENET_MEAN, IMAGENET_STD)
    train, test = ImageFolder(train_dir, transform=tf), ImageFolder(test_dir, transform=tf)
    for ds in (train, test):
        _verify(ds)
    return train, test, f"{eval_data}: {len(train)} train / {len(test)} {os.path.basename(test_dir)} images"
