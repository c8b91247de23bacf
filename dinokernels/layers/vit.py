"""Vision Transformer pieces shared by the DINO v1 and DINOv2 backbones (SPEC §2.2, §3.1).

Parameter names are the official checkpoints' (`patch_embed.proj`, `attn.qkv` fused (3C, C), `attn.proj`,
`norm1`, `norm2`, `mlp.fc1`/`mlp.fc2` or `mlp.w12`/`mlp.w3`, `ls1.gamma`/`ls2.gamma`), so released state dicts
load unchanged. One `Block` serves both models: without `init_values` it has no LayerScale (v1), with it both
residual branches are scaled by a learned per-channel gamma (DINOv2).

Attention runs through F.scaled_dot_product_attention (fused; no (B, heads, N, N) tensor kept for autograd) unless
the attention map itself is asked for, which computes softmax(q·kᵀ·scale) explicitly; both agree to rounding.
"""
from typing import Callable, Optional, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["drop_path", "DropPath", "PatchEmbed", "Attention", "Mlp", "SwiGLUFFN", "LayerScale", "Block",
           "swiglu_hidden_features", "resize_patch_pos_embed", "init_vit_weights"]


def drop_path(x: Tensor, drop_prob: float = 0.0, training: bool = False) -> Tensor:
    """Stochastic depth: each sample's branch output is zeroed with probability `drop_prob` and the kept ones are
    scaled by 1/(1 − drop_prob), so the expectation is unchanged. Identity in eval mode or for drop_prob 0.

    A sample is kept when its uniform draw u satisfies u ≥ drop_prob (one draw per sample)."""
    if drop_prob == 0.0 or not training:
        return x
    keep_prob = 1.0 - drop_prob
    draws = torch.rand((x.shape[0],) + (1,) * (x.dim() - 1), dtype=x.dtype, device=x.device)
    return x.div(keep_prob) * (draws >= drop_prob).to(x.dtype)


class DropPath(nn.Module):
    """`drop_path` as a module (the branch of a residual block)."""

    def __init__(self, drop_prob: Optional[float] = None):
        super().__init__()
        self.drop_prob = drop_prob

    def forward(self, x: Tensor) -> Tensor:
        return drop_path(x, self.drop_prob or 0.0, self.training)

    def extra_repr(self) -> str:
        return f"drop_prob={self.drop_prob}"


class Mlp(nn.Module):
    """Two-layer perceptron: fc1 → activation → dropout → fc2 → dropout (keys `fc1.*`, `fc2.*`)."""

    def __init__(self, in_features: int, hidden_features: Optional[int] = None, out_features: Optional[int] = None,
                 act_layer: Callable[[], nn.Module] = nn.GELU, drop: float = 0.0, bias: bool = True):
        super().__init__()
        self.fc1 = nn.Linear(in_features, hidden_features or in_features, bias=bias)
        self.act = act_layer()
        self.fc2 = nn.Linear(hidden_features or in_features, out_features or in_features, bias=bias)
        self.drop = nn.Dropout(drop)

    def forward(self, x: Tensor) -> Tensor:
        return self.drop(self.fc2(self.drop(self.act(self.fc1(x)))))


def swiglu_hidden_features(hidden_features: int) -> int:
    """DINOv2's SwiGLU width for a nominal MLP width h: 2/3 of it, rounded up to a multiple of 8
    (SPEC §3.1: 4·1536 → 4096 for ViT-g)."""
    return (int(hidden_features * 2 / 3) + 7) // 8 * 8


class SwiGLUFFN(nn.Module):
    """SwiGLU feed-forward: w12 projects to 2·hidden, the halves (x₁, x₂) give silu(x₁)·x₂, w3 projects back.
    Keys `w12.*` (2·hidden, in), `w3.*` (out, hidden). `hidden_features` is the SwiGLU width itself (see
    swiglu_hidden_features for DINOv2's rule)."""

    def __init__(self, in_features: int, hidden_features: int, out_features: Optional[int] = None,
                 bias: bool = True):
        super().__init__()
        self.w12 = nn.Linear(in_features, 2 * hidden_features, bias=bias)
        self.w3 = nn.Linear(hidden_features, out_features or in_features, bias=bias)

    def forward(self, x: Tensor) -> Tensor:
        gate, value = self.w12(x).chunk(2, dim=-1)
        return self.w3(F.silu(gate) * value)


class LayerScale(nn.Module):
    """x·γ with a learned per-channel γ (key `gamma`, shape (dim,)), initialised to `init_values`."""

    def __init__(self, dim: int, init_values: float = 1e-5):
        super().__init__()
        self.init_values = float(init_values)
        self.gamma = nn.Parameter(torch.full((dim,), self.init_values))

    def forward(self, x: Tensor) -> Tensor:
        return x * self.gamma

    def reset_parameters(self) -> None:
        nn.init.constant_(self.gamma, self.init_values)


class Attention(nn.Module):
    """Multi-head self-attention with a fused qkv projection (keys `qkv.*` (3C, C), `proj.*` (C, C)).

    forward(x (B, N, C)) → (B, N, C); with return_attention=True → ((B, N, C), weights (B, heads, N, N)), the
    post-softmax, pre-dropout attention weights (row i: the attention of token i's query).
    """

    def __init__(self, dim: int, num_heads: int = 8, qkv_bias: bool = False, qk_scale: Optional[float] = None,
                 attn_drop: float = 0.0, proj_drop: float = 0.0, proj_bias: bool = True):
        super().__init__()
        if dim % num_heads != 0:
            raise ValueError(f"dinokernels.Attention: dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.scale = qk_scale or (dim // num_heads) ** -0.5
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(dim, dim, bias=proj_bias)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x: Tensor, return_attention: bool = False):
        B, N, C = x.shape
        # (B, N, 3C) → three (B, heads, N, C/heads)
        q, k, v = self.qkv(x).view(B, N, 3, self.num_heads, C // self.num_heads).permute(2, 0, 3, 1, 4).unbind(0)
        weights = None
        if return_attention:
            weights = torch.softmax((q @ k.transpose(-2, -1)) * self.scale, dim=-1)
            mixed = self.attn_drop(weights) @ v
        else:
            mixed = F.scaled_dot_product_attention(q, k, v, dropout_p=self.attn_drop.p if self.training else 0.0,
                                                   scale=self.scale)
        out = self.proj_drop(self.proj(mixed.transpose(1, 2).reshape(B, N, C)))
        return (out, weights) if return_attention else out


def _residual_on_subset(x: Tensor, branch: Callable[[Tensor], Tensor], drop_prob: float) -> Tensor:
    """DINOv2's stochastic depth for large rates: the branch runs on a random ⌊B(1 − p)⌋ of the samples only, and
    its output is added back scaled by B/kept (same expectation as per-sample drop path, less compute)."""
    batch = x.shape[0]
    kept = max(int(batch * (1 - drop_prob)), 1)
    chosen = torch.randperm(batch, device=x.device)[:kept]
    update = branch(x[chosen])
    return torch.index_add(x.flatten(1), 0, chosen, update.to(x.dtype).flatten(1),
                           alpha=batch / kept).view_as(x)


class Block(nn.Module):
    """Pre-norm transformer block: x + drop_path(ls1(attn(norm1(x)))), then x + drop_path(ls2(ffn(norm2(x)))).

    `init_values` None: no LayerScale (DINO v1; ls1/ls2 are identities without parameters). `ffn_layer`: "mlp"
    (Mlp, hidden = dim·mlp_ratio), "swiglu"/"swiglufused" (SwiGLUFFN with DINOv2's 2/3 width rule; both names
    build the same layer, as officially), "identity" (no feed-forward), or a callable building the module.
    `subset_drop_path`: DINOv2's training-time stochastic depth, which for rates above 0.1 runs each branch on a
    random subset of the batch (see _residual_on_subset); otherwise per-sample drop path.
    """

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, qkv_bias: bool = False,
                 qk_scale: Optional[float] = None, drop: float = 0.0, attn_drop: float = 0.0, drop_path: float = 0.0,
                 act_layer: Callable[[], nn.Module] = nn.GELU, norm_layer: Callable[[int], nn.Module] = nn.LayerNorm,
                 *, proj_bias: bool = True, ffn_bias: bool = True, init_values: Optional[float] = None,
                 ffn_layer: Union[str, Callable[..., nn.Module]] = "mlp", subset_drop_path: bool = False):
        super().__init__()
        self.norm1 = norm_layer(dim)
        self.attn = Attention(dim, num_heads=num_heads, qkv_bias=qkv_bias, qk_scale=qk_scale, attn_drop=attn_drop,
                              proj_drop=drop, proj_bias=proj_bias)
        self.ls1 = LayerScale(dim, init_values) if init_values else nn.Identity()
        self.norm2 = norm_layer(dim)
        hidden = int(dim * mlp_ratio)
        if ffn_layer == "mlp":
            self.mlp = Mlp(dim, hidden, act_layer=act_layer, drop=drop, bias=ffn_bias)
        elif ffn_layer in ("swiglu", "swiglufused"):
            self.mlp = SwiGLUFFN(dim, swiglu_hidden_features(hidden), bias=ffn_bias)
        elif ffn_layer == "identity":
            self.mlp = nn.Identity()
        elif callable(ffn_layer):
            self.mlp = ffn_layer(in_features=dim, hidden_features=hidden, act_layer=act_layer, drop=drop,
                                 bias=ffn_bias)
        else:
            raise ValueError(f"dinokernels.Block: ffn_layer must be 'mlp', 'swiglu', 'swiglufused', 'identity' or "
                             f"a callable, got {ffn_layer!r}")
        self.ls2 = LayerScale(dim, init_values) if init_values else nn.Identity()
        self.drop_path = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()
        self.drop_path_rate = float(drop_path)
        self.subset_drop_path = subset_drop_path

    def _attn_branch(self, x: Tensor) -> Tensor:
        return self.ls1(self.attn(self.norm1(x)))

    def _ffn_branch(self, x: Tensor) -> Tensor:
        return self.ls2(self.mlp(self.norm2(x)))

    def forward(self, x: Tensor, return_attention: bool = False) -> Tensor:
        if return_attention:
            return self.attn(self.norm1(x), return_attention=True)[1]
        if self.training and self.subset_drop_path and self.drop_path_rate > 0.1:
            x = _residual_on_subset(x, self._attn_branch, self.drop_path_rate)
            return _residual_on_subset(x, self._ffn_branch, self.drop_path_rate)
        x = x + self.drop_path(self._attn_branch(x))
        return x + self.drop_path(self._ffn_branch(x))


class PatchEmbed(nn.Module):
    """Image → patch tokens: Conv2d(in_chans, embed_dim, patch, stride patch), flattened to (B, N, embed_dim).

    `img_size` only sets `num_patches` (the size of the position embedding a model allocates); any input size works,
    and pixels past the last whole patch are ignored (models that require whole patches check before calling)."""

    def __init__(self, img_size: int = 224, patch_size: int = 16, in_chans: int = 3, embed_dim: int = 768):
        super().__init__()
        self.img_size = img_size
        self.patch_size = patch_size
        self.num_patches = (img_size // patch_size) ** 2
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)


def init_vit_weights(model: nn.Module) -> None:
    """The ViT weight init shared by DINO and DINOv2, in module order (which fixes the random draws):
    trunc-normal(0.02) Linear weights with zero biases, unit LayerNorms, LayerScale at its init value."""
    for module in model.modules():
        if isinstance(module, nn.Linear):
            nn.init.trunc_normal_(module.weight, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)
        elif isinstance(module, LayerScale):
            module.reset_parameters()


def resize_patch_pos_embed(patch_pos_embed: Tensor, rows: int, cols: int, offset: float = 0.1,
                           antialias: bool = False) -> Tensor:
    """Bicubic resampling of a square grid of patch position embeddings to rows × cols (SPEC §2.2, §3.1).

    patch_pos_embed (1, M², C) → (1, rows·cols, C), row-major. With `offset` > 0 the size is given as a scale
    factor ((rows + offset)/M, (cols + offset)/M), as the DINO and DINOv2 checkpoints were trained (the offset
    keeps the floored output size from falling one short through rounding); with offset 0 the size is explicit
    (DINOv2 `_reg` models, transformers). Interpolated in float32, returned in the input's dtype."""
    n, C = patch_pos_embed.shape[1], patch_pos_embed.shape[2]
    side = int(round(n ** 0.5))
    if side * side != n:
        raise ValueError(f"dinokernels: the position embedding holds {n} patch positions, not a square grid")
    grid = patch_pos_embed.reshape(1, side, side, C).permute(0, 3, 1, 2).float()  # (1, C, M, M)
    if offset:
        resized = F.interpolate(grid, scale_factor=((rows + offset) / side, (cols + offset) / side), mode="bicubic",
                                antialias=antialias)
    else:
        resized = F.interpolate(grid, size=(rows, cols), mode="bicubic", antialias=antialias)
    if tuple(resized.shape[-2:]) != (rows, cols):
        raise RuntimeError(f"dinokernels: position embedding resampled to {tuple(resized.shape[-2:])}, expected "
                           f"{(rows, cols)}")
    return resized.to(patch_pos_embed.dtype).permute(0, 2, 3, 1).reshape(1, rows * cols, C)
