"""Architectures built on dinokernels.layers: DINO v1 (models.dino), DINOv2 (models.dinov2) and Grounding DINO
(models.grounding_dino)."""
from . import dino, dinov2, grounding_dino

__all__ = ["dino", "dinov2", "grounding_dino"]
