"""DINOv2 Vision Transformer (SPEC §3.1): the official constructor arguments, parameter names and token order.

Tokens are [CLS, registers…, patches]. Masked patches are replaced by `mask_token` before the position embedding
is added; registers are inserted after it, so they carry none. The position embedding is resampled for other
image sizes (resize_patch_pos_embed): with `interpolate_offset` > 0 by the scale factor (n + offset)/M, with 0 to
the exact size; `interpolate_antialias` as the `_reg` hub models use it. Image sides must be multiples of the
patch size (the official model asserts it; transformers drops the remainder silently): anything else raises.
"""
from functools import partial
from typing import Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor, nn

from ...layers import Block, PatchEmbed, init_vit_weights, resize_patch_pos_embed

__all__ = ["DinoVisionTransformer", "BlockChunk", "vit_small", "vit_base", "vit_large", "vit_giant2", "HUB_MODELS",
           "dinov2_vits14", "dinov2_vitb14", "dinov2_vitl14", "dinov2_vitg14", "dinov2_vits14_reg",
           "dinov2_vitb14_reg", "dinov2_vitl14_reg", "dinov2_vitg14_reg"]

FFN_LAYERS = ("mlp", "swiglu", "swiglufused", "identity")


class BlockChunk(nn.ModuleList):
    """A run of blocks applied in order. With `block_chunks` > 0 the model holds its blocks as chunks, each padded
    in front with nn.Identity so that a block keeps its global index in the key (`blocks.{chunk}.{index}.*`)."""

    def forward(self, x: Tensor) -> Tensor:
        for block in self:
            x = block(x)
        return x


class DinoVisionTransformer(nn.Module):
    """DINOv2 backbone.

    forward_features(x (B, 3, H, W), masks (B, N) bool or None) → dict with x_norm_clstoken (B, D),
    x_norm_regtokens (B, R, D), x_norm_patchtokens (B, N, D), x_prenorm (B, 1 + R + N, D), masks; a list of
    image batches (crops of different sizes) gives a list of such dicts. forward(x) → the normed CLS (B, D)
    (`is_training=True`: the dict). H and W must be multiples of `patch_size`.
    """

    def __init__(self, img_size: int = 224, patch_size: int = 16, in_chans: int = 3, embed_dim: int = 768,
                 depth: int = 12, num_heads: int = 12, mlp_ratio: float = 4.0, qkv_bias: bool = True,
                 ffn_bias: bool = True, proj_bias: bool = True, drop_path_rate: float = 0.0,
                 drop_path_uniform: bool = False, init_values: Optional[float] = None,
                 embed_layer: Callable[..., nn.Module] = PatchEmbed, act_layer: Callable[[], nn.Module] = nn.GELU,
                 block_fn: Callable[..., nn.Module] = Block, ffn_layer: Union[str, Callable] = "mlp",
                 block_chunks: int = 1, num_register_tokens: int = 0, interpolate_antialias: bool = False,
                 interpolate_offset: float = 0.1):
        super().__init__()
        if isinstance(img_size, (tuple, list)):
            img_size = int(img_size[0])
        if isinstance(ffn_layer, str) and ffn_layer not in FFN_LAYERS:
            raise ValueError(f"DinoVisionTransformer: ffn_layer must be one of {FFN_LAYERS}, got {ffn_layer!r}")
        if num_register_tokens < 0 or block_chunks < 0 or depth < 1:
            raise ValueError(f"DinoVisionTransformer: depth ≥ 1, block_chunks ≥ 0 and num_register_tokens ≥ 0 are "
                             f"required, got {depth}, {block_chunks}, {num_register_tokens}")
        norm_layer = partial(nn.LayerNorm, eps=1e-6)
        self.num_features = self.embed_dim = embed_dim
        self.num_tokens = 1
        self.n_blocks = depth
        self.num_heads = num_heads
        self.patch_size = patch_size
        self.num_register_tokens = num_register_tokens
        self.interpolate_antialias = interpolate_antialias
        self.interpolate_offset = interpolate_offset

        self.patch_embed = embed_layer(img_size=img_size, patch_size=patch_size, in_chans=in_chans,
                                       embed_dim=embed_dim)
        num_patches = self.patch_embed.num_patches
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, num_patches + self.num_tokens, embed_dim))
        self.register_tokens = (nn.Parameter(torch.zeros(1, num_register_tokens, embed_dim))
                                if num_register_tokens else None)
        self.mask_token = nn.Parameter(torch.zeros(1, embed_dim))

        rates = ([drop_path_rate] * depth if drop_path_uniform
                 else torch.linspace(0, drop_path_rate, depth, device="cpu").tolist())
        blocks = [block_fn(dim=embed_dim, num_heads=num_heads, mlp_ratio=mlp_ratio, qkv_bias=qkv_bias,
                           proj_bias=proj_bias, ffn_bias=ffn_bias, drop_path=rates[i], norm_layer=norm_layer,
                           act_layer=act_layer, ffn_layer=ffn_layer, init_values=init_values, subset_drop_path=True)
                  for i in range(depth)]
        if block_chunks > 0:
            self.chunked_blocks = True
            size = depth // block_chunks
            self.blocks = nn.ModuleList([BlockChunk([nn.Identity()] * start + blocks[start:start + size])
                                         for start in range(0, depth, size)])
        else:
            self.chunked_blocks = False
            self.blocks = nn.ModuleList(blocks)
        self.norm = norm_layer(embed_dim)
        self.head = nn.Identity()
        self.init_weights()

    # ---- initialisation ----
    def init_weights(self) -> None:
        """trunc-normal(0.02) position embedding and linear weights, zero biases, N(0, 1e-6) CLS and register
        tokens, zero mask token, LayerScale at init_values, unit LayerNorms."""
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.normal_(self.cls_token, std=1e-6)
        if self.register_tokens is not None:
            nn.init.normal_(self.register_tokens, std=1e-6)
        nn.init.zeros_(self.mask_token)
        init_vit_weights(self)

    # ---- tokens ----
    def _block_list(self) -> List[nn.Module]:
        """The blocks in order, without chunk padding."""
        if not self.chunked_blocks:
            return list(self.blocks)
        return [b for chunk in self.blocks for b in chunk if not isinstance(b, nn.Identity)]

    def interpolate_pos_encoding(self, x: Tensor, h: int, w: int) -> Tensor:
        """Position embedding for tokens x (B, 1 + N', D) of an h × w image (rows, columns), in x's dtype."""
        stored = self.pos_embed.shape[1] - 1
        if x.shape[1] - 1 == stored and h == w:
            return self.pos_embed.to(x.dtype)
        p = self.patch_size
        patches = resize_patch_pos_embed(self.pos_embed[:, 1:], h // p, w // p, offset=self.interpolate_offset,
                                         antialias=self.interpolate_antialias)
        return torch.cat((self.pos_embed[:, :1], patches), dim=1).to(x.dtype)

    def prepare_tokens_with_masks(self, x: Tensor, masks: Optional[Tensor] = None) -> Tensor:
        if not isinstance(x, Tensor) or x.dim() != 4:
            raise ValueError(f"DinoVisionTransformer: expected images (B, C, H, W), got "
                             f"{tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__}")
        B, _, h, w = x.shape
        p = self.patch_size
        if h % p or w % p or h == 0 or w == 0:
            raise ValueError(f"DinoVisionTransformer: image size {h}×{w} is not a multiple of the patch size {p}; "
                             f"resize or crop to multiples of {p} (e.g. {max(p, h // p * p)}×{max(p, w // p * p)})")
        tokens = self.patch_embed(x)  # (B, N, D)
        if masks is not None:
            if masks.shape != tokens.shape[:2] or masks.dtype != torch.bool:
                raise ValueError(f"DinoVisionTransformer: masks must be bool (B, N) = {tuple(tokens.shape[:2])}, "
                                 f"got {masks.dtype} {tuple(masks.shape)}")
            tokens = torch.where(masks.unsqueeze(-1), self.mask_token.to(tokens.dtype).unsqueeze(0), tokens)
        tokens = torch.cat((self.cls_token.expand(B, -1, -1).to(tokens.dtype), tokens), dim=1)
        tokens = tokens + self.interpolate_pos_encoding(tokens, h, w)
        if self.register_tokens is not None:
            tokens = torch.cat((tokens[:, :1], self.register_tokens.expand(B, -1, -1).to(tokens.dtype),
                                tokens[:, 1:]), dim=1)
        return tokens

    def _outputs(self, x: Tensor, masks: Optional[Tensor]) -> Dict[str, Tensor]:
        normed = self.norm(x)
        r = self.num_register_tokens
        return {"x_norm_clstoken": normed[:, 0], "x_norm_regtokens": normed[:, 1:r + 1],
                "x_norm_patchtokens": normed[:, r + 1:], "x_prenorm": x, "masks": masks}

    # ---- forward ----
    def forward_features_list(self, x_list: Sequence[Tensor], masks_list: Sequence[Optional[Tensor]]):
        xs = [self.prepare_tokens_with_masks(x, m) for x, m in zip(x_list, masks_list)]
        for block in self.blocks:
            xs = [block(x) for x in xs]
        return [self._outputs(x, m) for x, m in zip(xs, masks_list)]

    def forward_features(self, x, masks: Optional[Tensor] = None):
        if isinstance(x, (list, tuple)):
            masks_list = [None] * len(x) if masks is None else masks
            if len(masks_list) != len(x):
                raise ValueError(f"DinoVisionTransformer: {len(x)} crops but {len(masks_list)} masks")
            return self.forward_features_list(x, masks_list)
        tokens = self.prepare_tokens_with_masks(x, masks)
        for block in self.blocks:
            tokens = block(tokens)
        return self._outputs(tokens, masks)

    def forward(self, *args, is_training: bool = False, **kwargs):
        out = self.forward_features(*args, **kwargs)
        if is_training:
            return out
        return self.head(out["x_norm_clstoken"])

    def get_intermediate_layers(self, x: Tensor, n: Union[int, Sequence[int]] = 1, reshape: bool = False,
                                return_class_token: bool = False, norm: bool = True) -> Tuple:
        """Outputs of the last n blocks (int) or of the blocks with the given indices: a tuple of patch tokens
        (B, N, D), or (B, D, H/p, W/p) with `reshape`; with `return_class_token`, tuples (patches, cls (B, D))."""
        blocks = self._block_list()
        wanted = range(len(blocks) - n, len(blocks)) if isinstance(n, int) else n
        wanted = set(int(i) for i in wanted)
        if not wanted or min(wanted) < 0 or max(wanted) >= len(blocks):
            raise ValueError(f"DinoVisionTransformer: block indices {sorted(wanted)} outside 0..{len(blocks) - 1}")
        tokens = self.prepare_tokens_with_masks(x)
        collected = []
        for i, block in enumerate(blocks):
            tokens = block(tokens)
            if i in wanted:
                collected.append(self.norm(tokens) if norm else tokens)
        r = self.num_register_tokens
        patches = [out[:, 1 + r:] for out in collected]
        if reshape:
            B, _, h, w = x.shape
            p = self.patch_size
            patches = [t.reshape(B, h // p, w // p, -1).permute(0, 3, 1, 2).contiguous() for t in patches]
        if return_class_token:
            return tuple(zip(patches, [out[:, 0] for out in collected]))
        return tuple(patches)

    def get_last_selfattention(self, x: Tensor) -> Tensor:
        """Softmax attention of the last block (B, heads, T, T) over all T = 1 + R + N tokens."""
        tokens = self.prepare_tokens_with_masks(x)
        blocks = self._block_list()
        for block in blocks[:-1]:
            tokens = block(tokens)
        return blocks[-1](tokens, return_attention=True)


def vit_small(patch_size: int = 16, num_register_tokens: int = 0, **kwargs) -> DinoVisionTransformer:
    return DinoVisionTransformer(patch_size=patch_size, embed_dim=384, depth=12, num_heads=6, mlp_ratio=4,
                                 num_register_tokens=num_register_tokens, **kwargs)


def vit_base(patch_size: int = 16, num_register_tokens: int = 0, **kwargs) -> DinoVisionTransformer:
    return DinoVisionTransformer(patch_size=patch_size, embed_dim=768, depth=12, num_heads=12, mlp_ratio=4,
                                 num_register_tokens=num_register_tokens, **kwargs)


def vit_large(patch_size: int = 16, num_register_tokens: int = 0, **kwargs) -> DinoVisionTransformer:
    return DinoVisionTransformer(patch_size=patch_size, embed_dim=1024, depth=24, num_heads=16, mlp_ratio=4,
                                 num_register_tokens=num_register_tokens, **kwargs)


def vit_giant2(patch_size: int = 16, num_register_tokens: int = 0, **kwargs) -> DinoVisionTransformer:
    """Head dim 64: 1536 / 24."""
    return DinoVisionTransformer(patch_size=patch_size, embed_dim=1536, depth=40, num_heads=24, mlp_ratio=4,
                                 num_register_tokens=num_register_tokens, **kwargs)


_ARCH = {"vit_small": vit_small, "vit_base": vit_base, "vit_large": vit_large, "vit_giant2": vit_giant2}


def _hub(arch: str, registers: bool, **kwargs) -> DinoVisionTransformer:
    """As the hub builds its backbones (SPEC §3.1, §3.11): img 518, patch 14, init_values 1.0, block_chunks 0;
    ViT-g with the fused SwiGLU; `_reg`: 4 registers, antialiased explicit-size interpolation."""
    settings = dict(img_size=518, patch_size=14, init_values=1.0, block_chunks=0,
                    ffn_layer="swiglufused" if arch == "vit_giant2" else "mlp",
                    num_register_tokens=4 if registers else 0,
                    interpolate_antialias=registers, interpolate_offset=0.0 if registers else 0.1)
    settings.update(kwargs)
    return _ARCH[arch](**settings)


def dinov2_vits14(**kwargs): return _hub("vit_small", False, **kwargs)
def dinov2_vitb14(**kwargs): return _hub("vit_base", False, **kwargs)
def dinov2_vitl14(**kwargs): return _hub("vit_large", False, **kwargs)
def dinov2_vitg14(**kwargs): return _hub("vit_giant2", False, **kwargs)
def dinov2_vits14_reg(**kwargs): return _hub("vit_small", True, **kwargs)
def dinov2_vitb14_reg(**kwargs): return _hub("vit_base", True, **kwargs)
def dinov2_vitl14_reg(**kwargs): return _hub("vit_large", True, **kwargs)
def dinov2_vitg14_reg(**kwargs): return _hub("vit_giant2", True, **kwargs)


HUB_MODELS = {f.__name__: f for f in (dinov2_vits14, dinov2_vitb14, dinov2_vitl14, dinov2_vitg14, dinov2_vits14_reg,
                                      dinov2_vitb14_reg, dinov2_vitl14_reg, dinov2_vitg14_reg)}
