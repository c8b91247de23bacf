"""Swin Transformer backbone of Grounding DINO (the detection variant: any input size, feature maps padded to
whole windows, outputs taken before each stage's patch merging, one LayerNorm per output level).

Parameter names and shapes are those of the official checkpoints under `backbone.0.` (SPEC §5.2, §5.9), so
`SwinTransformer().load_state_dict(...)` takes the official weights with the prefix stripped.
`swin_state_dict_to_transformers` / `swin_state_dict_from_transformers` map to and from transformers 5.x
`SwinBackbone` names (fused `attn.qkv` ↔ `attention.{q,k,v}_proj`).
"""
import math
import re
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from ...layers.vit import DropPath, Mlp

__all__ = ["SwinTransformer", "swin_t", "swin_b", "relative_position_index", "shifted_window_mask",
           "swin_state_dict_to_transformers", "swin_state_dict_from_transformers"]

# Logit added between tokens of different regions of a shifted window (the official value; not −inf).
_SHIFT_MASK_VALUE = -100.0


def relative_position_index(window_size: int) -> Tensor:
    """(N, N) int64 with N = window_size²: row of the (2w−1)² bias table for each (query, key) pair of a window,
    (Δrow + w − 1)·(2w − 1) + (Δcol + w − 1) with Δ = query − key."""
    w = window_size
    rows, cols = torch.meshgrid(torch.arange(w), torch.arange(w), indexing="ij")
    rows, cols = rows.flatten(), cols.flatten()
    d_row = rows[:, None] - rows[None, :] + (w - 1)
    d_col = cols[:, None] - cols[None, :] + (w - 1)
    return d_row * (2 * w - 1) + d_col


def window_partition(x: Tensor, window_size: int) -> Tensor:
    """x (B, H, W, C), H and W multiples of window_size → (B, nW, window_size², C), windows in row-major order."""
    b, h, w, c = x.shape
    ws = window_size
    x = x.view(b, h // ws, ws, w // ws, ws, c).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(b, (h // ws) * (w // ws), ws * ws, c)


def window_reverse(windows: Tensor, window_size: int, h: int, w: int) -> Tensor:
    """Inverse of `window_partition`: (B, nW, window_size², C) → (B, H, W, C)."""
    b, _, _, c = windows.shape
    ws = window_size
    x = windows.view(b, h // ws, w // ws, ws, ws, c).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(b, h, w, c)


def shifted_window_mask(h_pad: int, w_pad: int, window_size: int, shift: int, device=None,
                        dtype=torch.float32) -> Tensor:
    """Additive mask (nW, N, N) for attention in cyclically shifted windows of an (h_pad, w_pad) map: 0 between
    tokens that were neighbours before the roll, −100 between tokens the roll brought together from opposite
    edges. Along each axis the rolled map has three regions: [0, L − window), [L − window, L − shift), [L − shift, L)."""
    def regions(length):
        idx = torch.arange(length, device=device)
        return (idx >= length - window_size).long() + (idx >= length - shift).long()

    region = regions(h_pad)[:, None] * 3 + regions(w_pad)[None, :]          # (h_pad, w_pad)
    region = window_partition(region[None, :, :, None], window_size)[0, ..., 0]  # (nW, N)
    different = region[:, :, None] != region[:, None, :]
    return torch.zeros(different.shape, device=device, dtype=dtype).masked_fill_(different, _SHIFT_MASK_VALUE)


class WindowAttention(nn.Module):
    """Multi-head self-attention inside windows with a learned relative position bias (keys `qkv`, `proj`,
    `relative_position_bias_table` ((2w−1)², heads), buffer `relative_position_index` (w², w²))."""

    def __init__(self, dim: int, window_size: int, num_heads: int, qkv_bias: bool = True, attn_drop: float = 0.0,
                 proj_drop: float = 0.0):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"WindowAttention: dim {dim} is not divisible by num_heads {num_heads}")
        self.dim, self.window_size, self.num_heads = dim, window_size, num_heads
        self.relative_position_bias_table = nn.Parameter(torch.zeros((2 * window_size - 1) ** 2, num_heads))
        # Persistent: the official checkpoints hold it.
        self.register_buffer("relative_position_index", relative_position_index(window_size), persistent=True)
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.attn_drop = attn_drop
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)
        nn.init.trunc_normal_(self.relative_position_bias_table, std=0.02)

    def relative_position_bias(self) -> Tensor:
        """(heads, N, N)."""
        n = self.window_size ** 2
        bias = self.relative_position_bias_table[self.relative_position_index.reshape(-1)]
        return bias.view(n, n, self.num_heads).permute(2, 0, 1)

    def forward(self, x: Tensor, mask: Optional[Tensor] = None) -> Tensor:
        """x (B, nW, N, C); mask (nW, N, N) additive or None → (B, nW, N, C)."""
        b, nw, n, c = x.shape
        h = self.num_heads
        qkv = self.qkv(x).view(b * nw, n, 3, h, c // h).permute(2, 0, 3, 1, 4)  # 3 × (B·nW, heads, N, d)
        bias = self.relative_position_bias().to(x.dtype)[None]                     # (1, heads, N, N)
        if mask is not None:  # per-window shift mask, repeated over images
            bias = (bias + mask[:, None].to(x.dtype)).expand(b, nw, h, n, n).reshape(b * nw, h, n, n)
        # 4-D inputs keep SDPA's fused kernels available (a 5-D call took the slow path: ~3× slower on CPU).
        out = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2], attn_mask=bias,
                                             dropout_p=self.attn_drop if self.training else 0.0)
        out = out.transpose(1, 2).reshape(b, nw, n, c)
        return self.proj_drop(self.proj(out))

    def extra_repr(self) -> str:
        return f"dim={self.dim}, window_size={self.window_size}, num_heads={self.num_heads}"


class SwinTransformerBlock(nn.Module):
    """x + DropPath(W-MSA/SW-MSA(LN(x))), then x + DropPath(MLP(LN(x))) (keys `norm1`, `attn`, `norm2`, `mlp`)."""

    def __init__(self, dim: int, num_heads: int, window_size: int = 7, shift_size: int = 0, mlp_ratio: float = 4.0,
                 qkv_bias: bool = True, drop: float = 0.0, attn_drop: float = 0.0, drop_path: float = 0.0):
        super().__init__()
        if not 0 <= shift_size < window_size:
            raise ValueError(f"SwinTransformerBlock: shift_size must be in [0, {window_size}), got {shift_size}")
        self.window_size, self.shift_size = window_size, shift_size
        self.norm1 = nn.LayerNorm(dim, eps=1e-5)
        self.attn = WindowAttention(dim, window_size, num_heads, qkv_bias, attn_drop, drop)
        self.drop_path = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()
        self.norm2 = nn.LayerNorm(dim, eps=1e-5)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), act_layer=nn.GELU, drop=drop)

    def forward(self, x: Tensor, h: int, w: int, shift_mask: Optional[Tensor]) -> Tensor:
        """x (B, H·W, C); shift_mask (nW, N, N) for the padded map, used when this block shifts."""
        b, _, c = x.shape
        ws, s = self.window_size, self.shift_size
        y = self.norm1(x).view(b, h, w, c)
        # Pad after the norm (zeros), bottom/right, to whole windows.
        pad_b, pad_r = (-h) % ws, (-w) % ws
        if pad_b or pad_r:
            y = F.pad(y, (0, 0, 0, pad_r, 0, pad_b))
        hp, wp = h + pad_b, w + pad_r
        if s:
            y = torch.roll(y, shifts=(-s, -s), dims=(1, 2))
        y = self.attn(window_partition(y, ws), shift_mask if s else None)
        y = window_reverse(y, ws, hp, wp)
        if s:
            y = torch.roll(y, shifts=(s, s), dims=(1, 2))
        y = y[:, :h, :w].reshape(b, h * w, c)
        x = x + self.drop_path(y)
        return x + self.drop_path(self.mlp(self.norm2(x)))


class PatchMerging(nn.Module):
    """2×2 neighbourhood → LayerNorm(4C) → Linear(4C, 2C, no bias); odd sizes are zero-padded bottom/right."""

    def __init__(self, dim: int):
        super().__init__()
        self.dim = dim
        self.reduction = nn.Linear(4 * dim, 2 * dim, bias=False)
        self.norm = nn.LayerNorm(4 * dim, eps=1e-5)

    def forward(self, x: Tensor, h: int, w: int) -> Tensor:
        """x (B, H·W, C) → (B, ⌈H/2⌉·⌈W/2⌉, 2C)."""
        b, _, c = x.shape
        x = x.view(b, h, w, c)
        if h % 2 or w % 2:
            x = F.pad(x, (0, 0, 0, w % 2, 0, h % 2))
        # Official order of the four sub-grids: (even row, even col), (odd, even), (even, odd), (odd, odd).
        x = torch.cat([x[:, 0::2, 0::2], x[:, 1::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 1::2]], -1)
        return self.reduction(self.norm(x.view(b, -1, 4 * c)))


class BasicLayer(nn.Module):
    """One stage: `depth` blocks alternating plain and shifted windows, then optional patch merging (keys
    `blocks.{j}`, `downsample`)."""

    def __init__(self, dim: int, depth: int, num_heads: int, window_size: int, mlp_ratio: float, qkv_bias: bool,
                 drop: float, attn_drop: float, drop_path: Sequence[float], downsample: bool,
                 use_checkpoint: bool = False):
        super().__init__()
        self.window_size, self.shift_size = window_size, window_size // 2
        self.use_checkpoint = use_checkpoint
        self.blocks = nn.ModuleList([
            SwinTransformerBlock(dim, num_heads, window_size, 0 if j % 2 == 0 else window_size // 2, mlp_ratio,
                                 qkv_bias, drop, attn_drop, drop_path[j])
            for j in range(depth)])
        self.downsample = PatchMerging(dim) if downsample else None

    def forward(self, x: Tensor, h: int, w: int) -> Tuple[Tensor, Tensor, int, int]:
        """x (B, H·W, C) → (stage output (B, H·W, C), merged (B, H'·W', C'), H', W')."""
        ws = self.window_size
        mask = None
        if len(self.blocks) > 1 and self.shift_size:
            mask = shifted_window_mask(h + (-h) % ws, w + (-w) % ws, ws, self.shift_size, x.device, x.dtype)
        for blk in self.blocks:
            if self.use_checkpoint and self.training and torch.is_grad_enabled():
                x = checkpoint(blk, x, h, w, mask, use_reentrant=False)
            else:
                x = blk(x, h, w, mask)
        if self.downsample is None:
            return x, x, h, w
        return x, self.downsample(x, h, w), (h + 1) // 2, (w + 1) // 2


class PatchEmbed(nn.Module):
    """Image → non-overlapping patches: zero-pad bottom/right to whole patches, Conv2d(k = s = patch), LayerNorm
    (keys `proj`, `norm`)."""

    def __init__(self, patch_size: int = 4, in_chans: int = 3, embed_dim: int = 96, patch_norm: bool = True):
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)
        self.norm = nn.LayerNorm(embed_dim, eps=1e-5) if patch_norm else None

    def forward(self, x: Tensor) -> Tensor:
        """x (B, C_in, H, W) → (B, embed_dim, ⌈H/p⌉, ⌈W/p⌉)."""
        p = self.patch_size
        pad_b, pad_r = (-x.shape[2]) % p, (-x.shape[3]) % p
        if pad_b or pad_r:
            x = F.pad(x, (0, pad_r, 0, pad_b))
        x = self.proj(x)
        if self.norm is not None:
            x = self.norm(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        return x


class SwinTransformer(nn.Module):
    """Swin Transformer backbone for detection (Grounding DINO's `backbone.0`).

    forward(x (B, in_chans, H, W)) → list of (B, C_i, H_i, W_i) for i in out_indices, C_i = embed_dim·2^i,
    H_i = ⌈H / (patch·2^i)⌉ (each stage pads odd sizes), each after its own LayerNorm `norm{i}`.
    Stochastic depth rises linearly from 0 to drop_path_rate over all blocks. `pretrain_img_size` is kept for
    the official signature: with no absolute position embedding it does not affect the model.
    """

    def __init__(self, pretrain_img_size: int = 224, patch_size: int = 4, in_chans: int = 3, embed_dim: int = 96,
                 depths: Sequence[int] = (2, 2, 6, 2), num_heads: Sequence[int] = (3, 6, 12, 24),
                 window_size: int = 7, mlp_ratio: float = 4.0, qkv_bias: bool = True, drop_rate: float = 0.0,
                 attn_drop_rate: float = 0.0, drop_path_rate: float = 0.2, patch_norm: bool = True,
                 out_indices: Sequence[int] = (1, 2, 3), use_checkpoint: bool = False):
        super().__init__()
        depths, num_heads, out_indices = tuple(depths), tuple(num_heads), tuple(out_indices)
        if len(depths) != len(num_heads) or not depths:
            raise ValueError(f"SwinTransformer: depths {depths} and num_heads {num_heads} must be non-empty and of "
                             f"equal length")
        if any(d < 1 for d in depths) or any(h < 1 for h in num_heads):
            raise ValueError(f"SwinTransformer: depths {depths} and num_heads {num_heads} must be positive")
        if patch_size < 1 or window_size < 1 or embed_dim < 1:
            raise ValueError(f"SwinTransformer: patch_size {patch_size}, window_size {window_size} and embed_dim "
                             f"{embed_dim} must be positive")
        if not out_indices or any(not 0 <= i < len(depths) for i in out_indices) or \
                list(out_indices) != sorted(set(out_indices)):
            raise ValueError(f"SwinTransformer: out_indices {out_indices} must be increasing stage indices in "
                             f"[0, {len(depths)})")
        self.pretrain_img_size, self.patch_size, self.in_chans = pretrain_img_size, patch_size, in_chans
        self.embed_dim, self.depths, self.num_heads, self.window_size = embed_dim, depths, num_heads, window_size
        self.out_indices = out_indices
        self.num_features = [embed_dim * 2 ** i for i in range(len(depths))]
        self.patch_embed = PatchEmbed(patch_size, in_chans, embed_dim, patch_norm)
        self.pos_drop = nn.Dropout(drop_rate)
        n_blocks = sum(depths)  # linear 0 → drop_path_rate (plain Python: works under a meta default device)
        dpr = [drop_path_rate * j / (n_blocks - 1) if n_blocks > 1 else 0.0 for j in range(n_blocks)]
        self.layers = nn.ModuleList()
        for i, depth in enumerate(depths):
            start = sum(depths[:i])
            self.layers.append(BasicLayer(self.num_features[i], depth, num_heads[i], window_size, mlp_ratio,
                                          qkv_bias, drop_rate, attn_drop_rate, dpr[start:start + depth],
                                          downsample=i < len(depths) - 1, use_checkpoint=use_checkpoint))
        for i in out_indices:
            self.add_module(f"norm{i}", nn.LayerNorm(self.num_features[i], eps=1e-5))
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(m: nn.Module):
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)

    @property
    def out_channels(self) -> List[int]:
        return [self.num_features[i] for i in self.out_indices]

    @property
    def out_strides(self) -> List[int]:
        return [self.patch_size * 2 ** i for i in self.out_indices]

    def _check_input(self, x):
        if not isinstance(x, Tensor):
            raise TypeError(f"SwinTransformer: x must be a tensor (B, {self.in_chans}, H, W), got {type(x).__name__}")
        if x.dim() != 4 or x.shape[1] != self.in_chans:
            raise ValueError(f"SwinTransformer: x must be (B, {self.in_chans}, H, W), got {tuple(x.shape)}")
        if not x.is_floating_point():
            raise ValueError(f"SwinTransformer: x must be floating point, got {x.dtype}")
        if x.shape[0] == 0 or x.shape[2] == 0 or x.shape[3] == 0:
            raise ValueError(f"SwinTransformer: x must have a non-empty batch and H, W >= 1, got {tuple(x.shape)}")
        weight = self.patch_embed.proj.weight
        if x.device != weight.device or x.dtype != weight.dtype:
            raise ValueError(f"SwinTransformer: x is {x.dtype} on {x.device}, the model {weight.dtype} on "
                             f"{weight.device}")
        if not bool(torch.isfinite(x).all()):
            raise ValueError("SwinTransformer: x holds NaN or inf")

    def forward(self, x: Tensor) -> List[Tensor]:
        self._check_input(x)
        x = self.patch_embed(x)
        b, _, h, w = x.shape
        x = self.pos_drop(x.flatten(2).transpose(1, 2))  # (B, H·W, C)
        outs = []
        for i, layer in enumerate(self.layers):
            stage_out, x, h_next, w_next = layer(x, h, w)
            if i in self.out_indices:
                y = getattr(self, f"norm{i}")(stage_out)
                outs.append(y.view(b, h, w, -1).permute(0, 3, 1, 2).contiguous())
            h, w = h_next, w_next
        return outs


def swin_t(**kwargs) -> SwinTransformer:
    """Swin-T as in Grounding DINO `swin_T_224_1k`: embed 96, depths 2-2-6-2, heads 3-6-12-24, window 7."""
    cfg = dict(pretrain_img_size=224, embed_dim=96, depths=(2, 2, 6, 2), num_heads=(3, 6, 12, 24), window_size=7)
    cfg.update(kwargs)
    return SwinTransformer(**cfg)


def swin_b(**kwargs) -> SwinTransformer:
    """Swin-B as in Grounding DINO `swin_B_384_22k`: embed 128, depths 2-2-18-2, heads 4-8-16-32, window 12."""
    cfg = dict(pretrain_img_size=384, embed_dim=128, depths=(2, 2, 18, 2), num_heads=(4, 8, 16, 32),
               window_size=12)
    cfg.update(kwargs)
    return SwinTransformer(**cfg)


# ---------------------------------------------------------------------------------------------------------------
# transformers 5.x SwinBackbone key mapping. Ours (after `prefix`) ↔ theirs (after `hf_prefix`):
#   patch_embed.proj / .norm                 ↔ swin.embeddings.patch_embeddings.projection / swin.embeddings.norm
#   layers.i.blocks.j.norm1 / norm2          ↔ swin.encoder.layers.i.blocks.j.layernorm_before / layernorm_after
#   layers.i.blocks.j.attn.qkv (fused)       ↔ ....attention.{q,k,v}_proj (split in thirds, q first)
#   layers.i.blocks.j.attn.proj              ↔ ....attention.o_proj
#   layers.i.blocks.j.attn.relative_position_bias_table ↔ ....attention.relative_position_bias.relative_position_bias_table
#   layers.i.blocks.j.attn.relative_position_index      ↔ (not saved by transformers 5.x: dropped / rebuilt)
#   layers.i.blocks.j.mlp.fc1 / fc2, layers.i.downsample.* ↔ the same names under swin.encoder
#   norm{i}                                  ↔ hidden_states_norms.stage{i+1}
# ---------------------------------------------------------------------------------------------------------------

_BLOCK = r"layers\.(\d+)\.blocks\.(\d+)\."
_HF_BLOCK = r"swin\.encoder\.layers\.(\d+)\.blocks\.(\d+)\."
_OURS_TO_HF = [  # (our regex, their template); groups: layer, block
    (re.compile(r"^patch_embed\.proj\.(weight|bias)$"), "swin.embeddings.patch_embeddings.projection.{0}"),
    (re.compile(r"^patch_embed\.norm\.(weight|bias)$"), "swin.embeddings.norm.{0}"),
    (re.compile(r"^" + _BLOCK + r"norm1\.(weight|bias)$"), "swin.encoder.layers.{0}.blocks.{1}.layernorm_before.{2}"),
    (re.compile(r"^" + _BLOCK + r"norm2\.(weight|bias)$"), "swin.encoder.layers.{0}.blocks.{1}.layernorm_after.{2}"),
    (re.compile(r"^" + _BLOCK + r"attn\.proj\.(weight|bias)$"), "swin.encoder.layers.{0}.blocks.{1}.attention.o_proj.{2}"),
    (re.compile(r"^" + _BLOCK + r"attn\.relative_position_bias_table$"),
     "swin.encoder.layers.{0}.blocks.{1}.attention.relative_position_bias.relative_position_bias_table"),
    (re.compile(r"^" + _BLOCK + r"mlp\.(fc1|fc2)\.(weight|bias)$"), "swin.encoder.layers.{0}.blocks.{1}.mlp.{2}.{3}"),
    (re.compile(r"^layers\.(\d+)\.downsample\.(reduction\.weight|norm\.weight|norm\.bias)$"),
     "swin.encoder.layers.{0}.downsample.{1}"),
]
_QKV = re.compile(r"^" + _BLOCK + r"attn\.qkv\.(weight|bias)$")
_REL_INDEX = re.compile(r"^" + _BLOCK + r"attn\.relative_position_index$")
_NORM = re.compile(r"^norm(\d+)\.(weight|bias)$")

_HF_TO_OURS = [
    (re.compile(r"^swin\.embeddings\.patch_embeddings\.projection\.(weight|bias)$"), "patch_embed.proj.{0}"),
    (re.compile(r"^swin\.embeddings\.norm\.(weight|bias)$"), "patch_embed.norm.{0}"),
    (re.compile(r"^" + _HF_BLOCK + r"layernorm_before\.(weight|bias)$"), "layers.{0}.blocks.{1}.norm1.{2}"),
    (re.compile(r"^" + _HF_BLOCK + r"layernorm_after\.(weight|bias)$"), "layers.{0}.blocks.{1}.norm2.{2}"),
    (re.compile(r"^" + _HF_BLOCK + r"attention\.o_proj\.(weight|bias)$"), "layers.{0}.blocks.{1}.attn.proj.{2}"),
    (re.compile(r"^" + _HF_BLOCK + r"mlp\.(fc1|fc2)\.(weight|bias)$"), "layers.{0}.blocks.{1}.mlp.{2}.{3}"),
    (re.compile(r"^swin\.encoder\.layers\.(\d+)\.downsample\.(reduction\.weight|norm\.weight|norm\.bias)$"),
     "layers.{0}.downsample.{1}"),
]
_HF_QKV = re.compile(r"^" + _HF_BLOCK + r"attention\.(q|k|v)_proj\.(weight|bias)$")
_HF_TABLE = re.compile(r"^" + _HF_BLOCK + r"attention\.relative_position_bias\.relative_position_bias_table$")
_HF_REL_INDEX = re.compile(r"^" + _HF_BLOCK + r"attention\.relative_position_bias\.relative_position_index$")
_HF_NORM = re.compile(r"^hidden_states_norms\.stage(\d+)\.(weight|bias)$")
_HF_FINAL_NORM = re.compile(r"^swin\.layernorm\.(weight|bias)$")


def _strip(sd: Dict[str, Tensor], prefix: str, fn: str) -> Dict[str, Tensor]:
    if not isinstance(sd, dict):
        raise TypeError(f"{fn}: sd must be a dict of tensors, got {type(sd).__name__}")
    if not isinstance(prefix, str):
        raise TypeError(f"{fn}: prefix must be a string, got {type(prefix).__name__}")
    return {k[len(prefix):]: v for k, v in sd.items() if isinstance(k, str) and k.startswith(prefix)}


def swin_state_dict_to_transformers(sd: Dict[str, Tensor], prefix: str = "", hf_prefix: str = ""
                                    ) -> Dict[str, Tensor]:
    """Our Swin state dict → transformers 5.x `SwinBackbone` names.

    sd: plain dict; only keys starting with `prefix` (e.g. "backbone.0.") are converted, other keys are ignored.
    Returns a new dict of the converted keys, each prefixed with `hf_prefix` (e.g.
    "model.backbone.conv_encoder.model." inside a transformers GroundingDinoForObjectDetection). The fused qkv is
    split into q/k/v; `relative_position_index` is dropped (transformers rebuilds it; a non-standard one raises).
    transformers' unused final `swin.layernorm` is not produced. Unknown keys under `prefix` raise KeyError."""
    fn = "swin_state_dict_to_transformers"
    ours = _strip(sd, prefix, fn)
    if not ours:
        raise KeyError(f"{fn}: no key of sd starts with prefix {prefix!r}")
    out: Dict[str, Tensor] = {}
    for key, value in ours.items():
        m = _QKV.match(key)
        if m:
            layer, block, kind = m.groups()
            if value.shape[0] % 3:
                raise ValueError(f"{fn}: {prefix + key} has {value.shape[0]} rows, not a multiple of 3")
            for name, part in zip("qkv", value.chunk(3, dim=0)):
                out[f"{hf_prefix}swin.encoder.layers.{layer}.blocks.{block}.attention.{name}_proj.{kind}"] = \
                    part.clone()
            continue
        m = _REL_INDEX.match(key)
        if m:
            window = math.isqrt(value.shape[0]) if value.dim() == 2 else -1
            if window < 1 or not torch.equal(value.cpu().long(), relative_position_index(window)):
                raise ValueError(f"{fn}: {prefix + key} is not the standard relative position index of a window; "
                                 f"transformers rebuilds it and cannot hold another")
            continue
        m = _NORM.match(key)
        if m:
            out[f"{hf_prefix}hidden_states_norms.stage{int(m.group(1)) + 1}.{m.group(2)}"] = value
            continue
        for pattern, template in _OURS_TO_HF:
            m = pattern.match(key)
            if m:
                out[hf_prefix + template.format(*m.groups())] = value
                break
        else:
            raise KeyError(f"{fn}: no transformers name for {prefix + key}")
    return out


def swin_state_dict_from_transformers(sd: Dict[str, Tensor], hf_prefix: str = "", prefix: str = ""
                                      ) -> Dict[str, Tensor]:
    """transformers 5.x `SwinBackbone` state dict → our names (inverse of `swin_state_dict_to_transformers`).

    sd: plain dict; only keys starting with `hf_prefix` are converted, other keys are ignored. Returns the
    converted keys prefixed with `prefix` (e.g. "backbone.0."). q/k/v are fused into `attn.qkv` (all three must be
    present); `relative_position_index` is rebuilt from each bias table's size; the unused final `swin.layernorm`
    is dropped. Unknown keys under `hf_prefix` raise KeyError."""
    fn = "swin_state_dict_from_transformers"
    theirs = _strip(sd, hf_prefix, fn)
    if not theirs:
        raise KeyError(f"{fn}: no key of sd starts with hf_prefix {hf_prefix!r}")
    out: Dict[str, Tensor] = {}
    qkv_parts: Dict[Tuple[str, str, str], Dict[str, Tensor]] = {}
    for key, value in theirs.items():
        m = _HF_QKV.match(key)
        if m:
            layer, block, name, kind = m.groups()
            qkv_parts.setdefault((layer, block, kind), {})[name] = value
            continue
        m = _HF_TABLE.match(key)
        if m:
            layer, block = m.groups()
            side = math.isqrt(value.shape[0])
            if value.dim() != 2 or side * side != value.shape[0] or side % 2 == 0:
                raise ValueError(f"{fn}: {hf_prefix + key} has shape {tuple(value.shape)}, not ((2w−1)², heads)")
            out[f"{prefix}layers.{layer}.blocks.{block}.attn.relative_position_bias_table"] = value
            out[f"{prefix}layers.{layer}.blocks.{block}.attn.relative_position_index"] = \
                relative_position_index((side + 1) // 2).to(value.device)
            continue
        if _HF_REL_INDEX.match(key) or _HF_FINAL_NORM.match(key):
            continue
        m = _HF_NORM.match(key)
        if m:
            stage = int(m.group(1))
            if stage < 1:
                raise KeyError(f"{fn}: {hf_prefix + key}: the stem (stage0) has no norm in this backbone")
            out[f"{prefix}norm{stage - 1}.{m.group(2)}"] = value
            continue
        for pattern, template in _HF_TO_OURS:
            m = pattern.match(key)
            if m:
                out[prefix + template.format(*m.groups())] = value
                break
        else:
            raise KeyError(f"{fn}: no name in our Swin for {hf_prefix + key}")
    for (layer, block, kind), parts in qkv_parts.items():
        if set(parts) != {"q", "k", "v"}:
            missing = sorted(set("qkv") - set(parts))
            raise KeyError(f"{fn}: layers.{layer}.blocks.{block}.attention lacks {missing} projection {kind}")
        out[f"{prefix}layers.{layer}.blocks.{block}.attn.qkv.{kind}"] = torch.cat(
            [parts["q"], parts["k"], parts["v"]], dim=0)
    return out
