"""DINOv2 (SPEC §3): the backbone with the official names, its builders and hub names, and weight loading and
conversion (released files, block-chunked and training layouts, transformers both ways)."""
from .checkpoint import (LoadReport, canonical_backbone_state_dict, from_transformers, load_official_weights,
                         state_dict_from_transformers, state_dict_to_transformers, to_transformers)
from .vision_transformer import (HUB_MODELS, BlockChunk, DinoVisionTransformer, dinov2_vitb14, dinov2_vitb14_reg,
                                 dinov2_vitg14, dinov2_vitg14_reg, dinov2_vitl14, dinov2_vitl14_reg, dinov2_vits14,
                                 dinov2_vits14_reg, vit_base, vit_giant2, vit_large, vit_small)

__all__ = ["DinoVisionTransformer", "BlockChunk", "vit_small", "vit_base", "vit_large", "vit_giant2", "HUB_MODELS",
           "dinov2_vits14", "dinov2_vitb14", "dinov2_vitl14", "dinov2_vitg14", "dinov2_vits14_reg",
           "dinov2_vitb14_reg", "dinov2_vitl14_reg", "dinov2_vitg14_reg", "load_official_weights",
           "canonical_backbone_state_dict", "state_dict_to_transformers", "state_dict_from_transformers",
           "from_transformers", "to_transformers", "LoadReport"]
