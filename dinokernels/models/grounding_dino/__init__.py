"""Grounding DINO (SPEC §5): the model with official parameter names (GroundingDINO and its builders), its
transformer pieces, weight conversion, and the training matcher."""
from .matcher import HungarianMatcher
from .model import (DEFAULT_SPECIAL_TOKEN_IDS, GroundingDINO, grounding_dino_swinb_cogcoor, grounding_dino_swint_ogc,
                    grounding_dino_tiny)
from .position_encoding import PositionEmbeddingSineHW
from .transformer import ContrastiveEmbed, Transformer, inverse_sigmoid

__all__ = ["HungarianMatcher", "GroundingDINO", "grounding_dino_swint_ogc", "grounding_dino_swinb_cogcoor",
           "grounding_dino_tiny", "DEFAULT_SPECIAL_TOKEN_IDS", "PositionEmbeddingSineHW", "ContrastiveEmbed",
           "Transformer", "inverse_sigmoid"]
