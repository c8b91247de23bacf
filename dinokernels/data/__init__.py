"""Data for DINO: the multi-crop augmentation, the evaluation transform and the datasets (no torchvision), among
them the generated cluttered and coloured digits.

All augmentation randomness comes from torch's global RNG; ``torch.manual_seed`` makes it reproducible.
"""
from .transforms import IMAGENET_MEAN, IMAGENET_STD, DataAugmentationDINO, EvalTransform
from .datasets import DIGITS_MEAN, DIGITS_STD, DigitsDataset, ImageFolder, collate_multicrop
from .synthetic import (BUILTIN_DATASETS, CLUTTERED_MEAN, CLUTTERED_STD, COLOURED_MEAN, COLOURED_STD,
                        ClutteredDigitsDataset, ColouredDigitsDataset, builtin_dataset, builtin_stats)

__all__ = ["DataAugmentationDINO", "EvalTransform", "ImageFolder", "DigitsDataset", "collate_multicrop",
           "IMAGENET_MEAN", "IMAGENET_STD", "DIGITS_MEAN", "DIGITS_STD", "ClutteredDigitsDataset", "CLUTTERED_MEAN",
           "CLUTTERED_STD", "ColouredDigitsDataset", "COLOURED_MEAN", "COLOURED_STD", "BUILTIN_DATASETS",
           "builtin_dataset", "builtin_stats"]
