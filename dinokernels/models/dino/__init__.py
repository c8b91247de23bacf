"""DINO v1 (SPEC §2): ViT backbones with the official parameter names, the projection head, the multi-crop wrapper
and loading of the official weights. timm is imported only when a `timm:<name>` backbone is asked for."""
from ...layers import DINOHead
from .checkpoint import WeightsMismatchError, extract_state_dict, load_official_weights, strip_prefixes
from .multicrop import MultiCropWrapper
from .vision_transformer import ARCHS, VisionTransformer, build_backbone, vit_base, vit_nano, vit_small, vit_tiny

__all__ = ["VisionTransformer", "vit_nano", "vit_tiny", "vit_small", "vit_base", "build_backbone", "ARCHS",
           "DINOHead", "MultiCropWrapper", "load_official_weights", "strip_prefixes", "extract_state_dict",
           "WeightsMismatchError"]
