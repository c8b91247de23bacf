"""DINO v1 Vision Transformers (SPEC §2.2) with the parameter names of the released DINO checkpoints.

State-dict keys, order and shapes are the official ones (`cls_token`, `pos_embed`, `patch_embed.proj.*`,
`blocks.{i}.…`, `norm.*`), so the released backbone files load strictly. Output: norm(x)[:, 0], the CLS token.

Differences from the official code, all deliberate:
* `img_size` may be an int (the official constructor takes a one-element list; both are accepted).
* Blocks use fused scaled-dot-product attention unless the attention map is asked for (see layers/vit.py).
* There is no classification head argument: `head` is always nn.Identity and, as officially, forward does not
  apply it (DINO's backbones are built with num_classes=0).
* `vit_nano` (embed 128, depth 4, heads 4, patch 4) is ours: the size the CPU demo job trains.
* `build_backbone` is ours: one entry point for the named ViTs and, lazily, any timm model (`timm:<name>`).
"""
from functools import partial
from typing import List, Sequence, Tuple, Union

import torch
from torch import Tensor, nn

from ...layers import Block, PatchEmbed, init_vit_weights, resize_patch_pos_embed

__all__ = ["VisionTransformer", "vit_nano", "vit_tiny", "vit_small", "vit_base", "build_backbone", "ARCHS"]


class VisionTransformer(nn.Module):
    """ViT backbone returning the normed CLS token.

    forward(x (B, in_chans, H, W)) -> (B, embed_dim); H and W need not equal img_size (the position embedding is
    interpolated as officially: bicubic, scale factor (H/p + 0.1)/√N, (W/p + 0.1)/√N, dino issue #8).
    """

    def __init__(self, img_size: Union[int, Sequence[int]] = 224, patch_size: int = 16, in_chans: int = 3,
                 embed_dim: int = 768, depth: int = 12, num_heads: int = 12, mlp_ratio: float = 4.0,
                 qkv_bias: bool = True, drop_path_rate: float = 0.0, *, qk_scale=None, drop_rate: float = 0.0,
                 attn_drop_rate: float = 0.0, norm_layer=None):
        super().__init__()
        img_size = img_size if isinstance(img_size, int) else int(img_size[0])
        make_norm = norm_layer or partial(nn.LayerNorm, eps=1e-6)
        self.num_features = self.embed_dim = embed_dim
        self.num_heads = num_heads
        self.patch_embed = PatchEmbed(img_size=img_size, patch_size=patch_size, in_chans=in_chans,
                                      embed_dim=embed_dim)
        # Token 0 is the CLS token; the position embedding covers it and the img_size grid of patches.
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + self.patch_embed.num_patches, embed_dim))
        self.pos_drop = nn.Dropout(p=drop_rate)
        # Stochastic depth rises linearly over the blocks, from 0 to drop_path_rate (float32 steps, SPEC §2.2).
        block_drop_rates = torch.linspace(0, drop_path_rate, depth, device="cpu").tolist()
        self.blocks = nn.ModuleList(
            Block(dim=embed_dim, num_heads=num_heads, mlp_ratio=mlp_ratio, qkv_bias=qkv_bias, qk_scale=qk_scale,
                  drop=drop_rate, attn_drop=attn_drop_rate, drop_path=rate, norm_layer=make_norm)
            for rate in block_drop_rates)
        self.norm = make_norm(embed_dim)
        self.head = nn.Identity()
        self._init_parameters()

    def _init_parameters(self) -> None:
        """Truncated normal (std 0.02) for the position embedding, then the CLS token, then every Linear weight in
        module order with zero biases; LayerNorms get weight 1, bias 0. That order fixes the random draws."""
        for token_param in (self.pos_embed, self.cls_token):
            nn.init.trunc_normal_(token_param, std=0.02)
        init_vit_weights(self)

    def interpolate_pos_encoding(self, x: Tensor, h: int, w: int) -> Tensor:
        """Position embedding (1, 1 + N', C) for tokens x (B, 1 + N', C) of an h × w image (rows, then columns):
        the stored one when the patch count matches and the image is square, else the patch grid resampled
        bicubically with DINO's +0.1 scale-factor offset (SPEC §2.2)."""
        if x.shape[1] == self.pos_embed.shape[1] and h == w:
            return self.pos_embed
        p = self.patch_embed.patch_size
        patches = resize_patch_pos_embed(self.pos_embed[:, 1:], h // p, w // p, offset=0.1)
        return torch.cat((self.pos_embed[:, :1], patches), dim=1)

    def prepare_tokens(self, x: Tensor) -> Tensor:
        if x.dim() != 4:
            raise ValueError(f"dinokernels.VisionTransformer: expected images (B, C, H, W), got shape "
                             f"{tuple(x.shape)}")
        B, _, h, w = x.shape
        p = self.patch_embed.patch_size
        if h < p or w < p:
            raise ValueError(f"dinokernels.VisionTransformer: image {h}×{w} is smaller than one {p}×{p} patch")
        x = self.patch_embed(x)  # (B, N', C)
        x = torch.cat((self.cls_token.expand(B, -1, -1), x), dim=1)
        x = x + self.interpolate_pos_encoding(x, h, w)
        return self.pos_drop(x)

    def forward(self, x: Tensor) -> Tensor:
        tokens = self.prepare_tokens(x)
        for block in self.blocks:
            tokens = block(tokens)
        return self.norm(tokens)[:, 0]

    def get_last_selfattention(self, x: Tensor) -> Tensor:
        """Softmax attention of the last block, (B, num_heads, 1 + N', 1 + N'); row i is token i's query."""
        tokens = self.prepare_tokens(x)
        *leading, last = self.blocks
        for block in leading:
            tokens = block(tokens)
        return last(tokens, return_attention=True)

    def get_intermediate_layers(self, x: Tensor, n: int = 1) -> List[Tensor]:
        """Normed outputs (B, 1 + N', C) of the last n blocks, earliest first."""
        tokens = self.prepare_tokens(x)
        first_kept = len(self.blocks) - n
        normed = []
        for index, block in enumerate(self.blocks):
            tokens = block(tokens)
            if index >= first_kept:
                normed.append(self.norm(tokens))
        return normed


def vit_nano(patch_size: int = 4, **kwargs) -> VisionTransformer:
    """Ours (not in the official code): the demo size trained on the CPU — embed 128, depth 4, heads 4."""
    return VisionTransformer(patch_size=patch_size, embed_dim=128, depth=4, num_heads=4, mlp_ratio=4,
                             qkv_bias=True, **kwargs)


def vit_tiny(patch_size: int = 16, **kwargs) -> VisionTransformer:
    return VisionTransformer(patch_size=patch_size, embed_dim=192, depth=12, num_heads=3, mlp_ratio=4,
                             qkv_bias=True, **kwargs)


def vit_small(patch_size: int = 16, **kwargs) -> VisionTransformer:
    return VisionTransformer(patch_size=patch_size, embed_dim=384, depth=12, num_heads=6, mlp_ratio=4,
                             qkv_bias=True, **kwargs)


def vit_base(patch_size: int = 16, **kwargs) -> VisionTransformer:
    return VisionTransformer(patch_size=patch_size, embed_dim=768, depth=12, num_heads=12, mlp_ratio=4,
                             qkv_bias=True, **kwargs)


ARCHS = {"vit_nano": vit_nano, "vit_tiny": vit_tiny, "vit_small": vit_small, "vit_base": vit_base}


def build_backbone(arch: str, patch_size: int = 16, drop_path_rate: float = 0.0,
                   img_size: int = 224) -> Tuple[nn.Module, int]:
    """(backbone, embed_dim) for `arch`: one of ARCHS, or "timm:<name>" for any timm model.

    A timm backbone is timm.create_model(name, pretrained=False, num_classes=0) (plus drop_path_rate when it is
    non-zero); patch_size and img_size apply to the named ViTs only. timm is imported only here, only then.
    """
    if not isinstance(arch, str):
        raise TypeError(f"dinokernels.build_backbone: arch must be a string, got {type(arch).__name__}")
    if arch.startswith("timm:"):
        name = arch[len("timm:"):]
        if not name:
            raise ValueError("dinokernels.build_backbone: 'timm:' needs a model name, e.g. 'timm:resnet50'")
        try:
            import timm
        except ImportError as e:
            raise ImportError(f"dinokernels.build_backbone: arch {arch!r} needs the timm package, which is not "
                              f"installed; pip install timm") from e
        kwargs = {"pretrained": False, "num_classes": 0}
        if drop_path_rate:
            kwargs["drop_path_rate"] = drop_path_rate
        model = timm.create_model(name, **kwargs)
        return model, int(model.num_features)
    if arch not in ARCHS:
        choices = ", ".join(list(ARCHS) + ["timm:<name>"])
        raise ValueError(f"dinokernels.build_backbone: unknown arch {arch!r}; choose one of {choices}")
    model = ARCHS[arch](patch_size=patch_size, drop_path_rate=drop_path_rate, img_size=img_size)
    return model, model.embed_dim
