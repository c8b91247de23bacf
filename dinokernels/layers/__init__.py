"""nn.Modules built on dinokernels.ops: ViT blocks, heads, multi-scale deformable attention (DESIGN §2: models →
layers → ops)."""
from .dino_head import DINOHead, WeightNormLinear
from .ms_deform_attn import MSDeformAttn
from .vit import Attention, Block, DropPath, Mlp, PatchEmbed, drop_path

__all__ = ["Attention", "Block", "DropPath", "Mlp", "PatchEmbed", "drop_path", "DINOHead", "WeightNormLinear",
           "MSDeformAttn"]
