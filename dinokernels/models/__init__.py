"""Architectures built on dinokernels.layers: DINO v1 (models.dino)."""
from . import dino

__all__ = ["dino"]
