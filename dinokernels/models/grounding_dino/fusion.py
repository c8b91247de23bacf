"""Image-text fusion of the Grounding DINO encoder (SPEC §5.4 item 1): bidirectional cross-attention between the
flattened image tokens and the text tokens, with the official numerical safeguards, as a layer-scaled residual.

Parameter names follow the official checkpoint (`gamma_v`, `gamma_l`, `layer_norm_v`, `layer_norm_l`,
`attn.{v_proj, l_proj, values_v_proj, values_l_proj, out_v_proj, out_l_proj}`)."""
from typing import Optional, Tuple

import torch
from torch import Tensor, nn

from ...layers import DropPath

__all__ = ["BiMultiHeadAttention", "BiAttentionBlock"]

# The official clamp: keeps logits inside the float16 range after the max subtraction.
_LOGIT_CLAMP = 50000.0


class BiMultiHeadAttention(nn.Module):
    """Image→text and text→image attention sharing one logit matrix A = (v_proj(v)·s)·l_proj(l)ᵀ per head,
    s = head_dim^-1/2.

    forward(v (B, S, v_dim), l (B, T, l_dim), attention_mask_v (B, S) bool True = padding or None,
    attention_mask_l (B, T) bool True = padding or None) → (out_v (B, S, v_dim), out_l (B, T, l_dim)).

    A has its global maximum (over the whole batch, as the official code does) subtracted and is clamped to
    ±5e4; image queries softmax over the text (padded tokens −inf); text queries softmax over Aᵀ minus its row
    maximum, clamped, with padded image positions −inf.
    """

    def __init__(self, v_dim: int, l_dim: int, embed_dim: int, num_heads: int, dropout: float = 0.0):
        super().__init__()
        if embed_dim % num_heads:
            raise ValueError(f"embed_dim ({embed_dim}) must be divisible by num_heads ({num_heads})")
        self.embed_dim = embed_dim
        self.num_heads = num_heads
        self.head_dim = embed_dim // num_heads
        self.v_dim = v_dim
        self.l_dim = l_dim
        self.scale = self.head_dim ** -0.5
        self.dropout = dropout
        self.v_proj = nn.Linear(v_dim, embed_dim)
        self.l_proj = nn.Linear(l_dim, embed_dim)
        self.values_v_proj = nn.Linear(v_dim, embed_dim)
        self.values_l_proj = nn.Linear(l_dim, embed_dim)
        self.out_v_proj = nn.Linear(embed_dim, v_dim)
        self.out_l_proj = nn.Linear(embed_dim, l_dim)
        self._reset_parameters()

    def _reset_parameters(self):
        for lin in (self.v_proj, self.l_proj, self.values_v_proj, self.values_l_proj, self.out_v_proj,
                    self.out_l_proj):
            nn.init.xavier_uniform_(lin.weight)
            nn.init.zeros_(lin.bias)

    def _heads(self, x: Tensor) -> Tensor:
        b, n, _ = x.shape  # (B, N, E) → (B, H, N, E/H)
        return x.view(b, n, self.num_heads, self.head_dim).transpose(1, 2)

    def _merge(self, x: Tensor) -> Tensor:
        b, _, n, _ = x.shape  # (B, H, N, E/H) → (B, N, E)
        return x.transpose(1, 2).reshape(b, n, self.embed_dim)

    def forward(self, v: Tensor, l: Tensor, attention_mask_v: Optional[Tensor] = None,
                attention_mask_l: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
        # The image has S ≈ 17k tokens at 800×1333, the caption T ≲ 256, so the three image-side projections
        # (v_dim → embed_dim on every image token) are folded into the text side by associativity: no (B, S,
        # embed_dim) tensor is formed and the image side costs O(S·T·v_dim) instead of O(S·embed_dim·v_dim). The
        # function is the official one; only the rounding differs.
        b, s, _ = v.shape
        t = l.shape[1]
        h, e = self.num_heads, self.head_dim
        key = self._heads(self.l_proj(l)) * self.scale  # (B, H, T, e), the query's scale moved onto the key
        value_l = self._heads(self.values_l_proj(l))  # (B, H, T, e)

        # logits[b,h,s,t] = (W_q[h] v[b,s] + b_q[h]) · key[b,h,t]: key projected back to v_dim per head.
        w_q = self.v_proj.weight.view(h, e, self.v_dim)  # (H, e, Dv)
        key_in_v = (key @ w_q).reshape(b, h * t, self.v_dim)  # (B, H·T, Dv)
        key_bias = (key @ self.v_proj.bias.view(h, e, 1)).view(b, h, 1, t)  # (B, H, 1, T)
        logits = (v @ key_in_v.transpose(1, 2)).view(b, s, h, t).transpose(1, 2) + key_bias  # (B, H, S, T)

        logits = (logits - logits.max()).clamp(-_LOGIT_CLAMP, _LOGIT_CLAMP)
        logits_t = logits.transpose(-1, -2)  # (B, H, T, S)
        logits_t = (logits_t - logits_t.max(-1, keepdim=True)[0]).clamp(-_LOGIT_CLAMP, _LOGIT_CLAMP)
        if attention_mask_v is not None:
            logits_t = logits_t.masked_fill(attention_mask_v[:, None, None, :], float("-inf"))
        if attention_mask_l is not None:
            logits = logits.masked_fill(attention_mask_l[:, None, None, :], float("-inf"))
        probs_v = torch.softmax(logits, -1)  # (B, H, S, T)
        probs_l = torch.softmax(logits_t, -1)  # (B, H, T, S)
        if self.dropout and self.training:
            probs_v = nn.functional.dropout(probs_v, self.dropout, True)
            probs_l = nn.functional.dropout(probs_l, self.dropout, True)

        # out_v = out_v_proj(merge(probs_v @ value_l)): value_l taken through head h's slice of out_v_proj first.
        w_out_v = self.out_v_proj.weight.view(self.v_dim, h, e).permute(1, 2, 0)  # (H, e, Dv)
        value_l_out = (value_l @ w_out_v).reshape(b, h * t, self.v_dim)  # (B, H·T, Dv)
        out_v = probs_v.transpose(1, 2).reshape(b, s, h * t) @ value_l_out
        out_v = out_v + self.out_v_proj.bias.to(out_v.dtype)  # the matmul's dtype, as nn.Linear under autocast

        # probs_l @ values_v_proj(v) = (probs_l @ v) W_vv[h]ᵀ + (row sums of probs_l) b_vv[h] (1 without dropout).
        pooled_v = (probs_l.reshape(b, h * t, s) @ v).view(b, h, t, self.v_dim)  # (B, H, T, Dv)
        w_vv = self.values_v_proj.weight.view(h, e, self.v_dim)  # (H, e, Dv)
        attended_v = pooled_v @ w_vv.transpose(1, 2)  # (B, H, T, e)
        attended_v = attended_v + (probs_l.sum(-1, keepdim=True) * self.values_v_proj.bias.view(h, 1, e)).to(
            attended_v.dtype)
        out_l = self.out_l_proj(self._merge(attended_v))
        return out_v, out_l


class BiAttentionBlock(nn.Module):
    """Fusion layer: both streams are LayerNorm-ed and the normalised streams carry the residual
    (v ← LN(v) + DropPath(γ_v ⊙ Δv), l likewise), γ initialised to `init_values` (1e-4).

    forward(v (B, S, v_dim), l (B, T, l_dim), attention_mask_v (B, S) True = padding or None,
    attention_mask_l (B, T) True = padding or None) → (v, l) of the same shapes.
    """

    def __init__(self, v_dim: int, l_dim: int, embed_dim: int, num_heads: int, dropout: float = 0.0,
                 drop_path: float = 0.0, init_values: float = 1e-4):
        super().__init__()
        self.gamma_v = nn.Parameter(torch.full((v_dim,), float(init_values)))
        self.gamma_l = nn.Parameter(torch.full((l_dim,), float(init_values)))
        self.layer_norm_v = nn.LayerNorm(v_dim)
        self.layer_norm_l = nn.LayerNorm(l_dim)
        self.attn = BiMultiHeadAttention(v_dim, l_dim, embed_dim, num_heads, dropout)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, v: Tensor, l: Tensor, attention_mask_v: Optional[Tensor] = None,
                attention_mask_l: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
        v = self.layer_norm_v(v)
        l = self.layer_norm_l(l)
        delta_v, delta_l = self.attn(v, l, attention_mask_v, attention_mask_l)
        v = v + self.drop_path(self.gamma_v * delta_v)
        l = l + self.drop_path(self.gamma_l * delta_l)
        return v, l
