"""Architectures built on dinokernels.layers: DINO v1 (models.dino), Grounding DINO pieces (models.grounding_dino)."""
from . import dino, grounding_dino

__all__ = ["dino", "grounding_dino"]
