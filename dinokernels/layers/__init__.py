"""nn.Modules built on dinokernels.ops: ViT blocks, heads, multi-scale deformable attention (DESIGN §2: models →
layers → ops)."""
from .dino_head import DINOHead, WeightNormLinear
from .ms_deform_attn import MSDeformAttn
from .vit import (Attention, Block, DropPath, LayerScale, Mlp, PatchEmbed, SwiGLUFFN, drop_path,
                  init_vit_weights, resize_patch_pos_embed, swiglu_hidden_features)

__all__ = ["Attention", "Block", "DropPath", "LayerScale", "Mlp", "PatchEmbed", "SwiGLUFFN", "drop_path",
           "swiglu_hidden_features", "resize_patch_pos_embed", "init_vit_weights", "DINOHead", "WeightNormLinear",
           "MSDeformAttn"]
