"""Multi-scale deformable attention module, as Deformable-DETR models/ops/modules/ms_deform_attn.py MSDeformAttn
(and Grounding DINO's copy) with batch-first tensors, on dinokernels.ops.ms_deform_attn (SPEC §4.3).

Same parameter names, shapes and `_reset_parameters` initialisation as the official module (sampling_offsets,
attention_weights, value_proj, output_proj), so official state dicts load strictly. Differences, deliberate:
no `im2col_step` divisibility constraint (the kernels take any batch); no data-dependent assert that Σ H·W equals
the input length (the op checks it, and an assert would break torch.compile's graph); the sampling-offset bias is
filled in place instead of being replaced by a new Parameter (same values, same name).
"""
import math
import warnings
from typing import Optional

import torch
from torch import Tensor, nn

from ..ops import ms_deform_attn

__all__ = ["MSDeformAttn"]


def _head_dim_is_power_of_two(head_dim: int) -> bool:
    return head_dim > 0 and head_dim & (head_dim - 1) == 0


def initial_offset_bias(n_heads: int, n_levels: int, n_points: int) -> Tensor:
    """The sampling-offset bias at initialisation (SPEC §4.3), (M·L·P·2,) float32 laid out as (M, L, P, 2).

    Head m starts looking along θ_m = 2πm/M, with the direction rescaled so its larger |component| is 1 (the
    points then sit on the square ring rather than the circle); point i lies i + 1 steps out; every level the
    same. Kept in float32 throughout (θ_m = m·float32(2π/M)) so the last bits equal the published init's.
    """
    angle_step = 2.0 * math.pi / n_heads
    angles = angle_step * torch.arange(n_heads, dtype=torch.float32)  # (M,)
    unit_dirs = torch.stack((angles.cos(), angles.sin()), dim=-1)  # (M, 2)
    ring_dirs = unit_dirs / unit_dirs.abs().amax(dim=-1, keepdim=True)
    steps = torch.arange(1, n_points + 1, dtype=torch.float32)  # (P,)
    per_point = ring_dirs.unsqueeze(1) * steps.unsqueeze(-1)  # (M, P, 2)
    return per_point.unsqueeze(1).expand(n_heads, n_levels, n_points, 2).flatten()


class MSDeformAttn(nn.Module):
    """MSDeformAttn(d_model=256, n_levels=4, n_heads=8, n_points=4).

    forward(query (N, Lq, C), reference_points (N, Lq, L, 2) normalised (x, y) points or (N, Lq, L, 4) boxes
    (cx, cy, w, h), input_flatten (N, S, C), input_spatial_shapes (L, 2) (H, W), input_level_start_index (L,),
    input_padding_mask (N, S) bool, True = padding, or None) → (N, Lq, C).

    Sampling locations: points → ref + offset / (W_l, H_l); boxes → ref_xy + offset / n_points · ref_wh · 0.5.
    Attention weights: softmax over the L·P samples of each head. Padded positions are zeroed in the projected value.
    """

    def __init__(self, d_model: int = 256, n_levels: int = 4, n_heads: int = 8, n_points: int = 4):
        super().__init__()
        if d_model % n_heads != 0:
            raise ValueError(f"MSDeformAttn: d_model ({d_model}) is not divisible by n_heads ({n_heads})")
        head_dim = d_model // n_heads
        if not _head_dim_is_power_of_two(head_dim):
            # SPEC §4.3: the original module warns here too; only its CUDA kernel cared, ours run with any width.
            warnings.warn(f"MSDeformAttn: each head has d_model / n_heads = {head_dim} channels, not a power of 2; "
                          "the original Deformable-DETR CUDA kernel was tuned for power of 2 widths (ours are not)")
        self.im2col_step = 64  # kept for attribute compatibility; unused
        self.d_model = d_model
        self.n_levels = n_levels
        self.n_heads = n_heads
        self.n_points = n_points
        samples = n_heads * n_levels * n_points
        self.sampling_offsets = nn.Linear(d_model, samples * 2)
        self.attention_weights = nn.Linear(d_model, samples)
        self.value_proj = nn.Linear(d_model, d_model)
        self.output_proj = nn.Linear(d_model, d_model)
        self._reset_parameters()

    @torch.no_grad()
    def _reset_parameters(self):
        """SPEC §4.3's initialisation; the name is the one callers (e.g. encoder layers) re-initialise through."""
        # Queries start by attending uniformly at fixed offsets: no dependence on the query content yet.
        self.sampling_offsets.weight.zero_()
        self.sampling_offsets.bias.copy_(initial_offset_bias(self.n_heads, self.n_levels, self.n_points))
        self.attention_weights.weight.zero_()
        self.attention_weights.bias.zero_()
        # value_proj before output_proj: the order the random draws are taken in, as in the original.
        for projection in (self.value_proj, self.output_proj):
            nn.init.xavier_uniform_(projection.weight)
            projection.bias.zero_()

    def sampling_locations(self, query: Tensor, reference_points: Tensor, input_spatial_shapes: Tensor) -> Tensor:
        """query (N, Lq, C), reference_points (N, Lq, L, 2 | 4), input_spatial_shapes (L, 2) (H, W)
        → (N, Lq, M, L, P, 2) normalised sampling locations (SPEC §4.3)."""
        batch, n_queries, _ = query.shape
        offsets = self.sampling_offsets(query).view(batch, n_queries, self.n_heads, self.n_levels, self.n_points, 2)
        ref_dim = reference_points.shape[-1]
        # Broadcast the per-level references over heads (dim 2) and points (dim 4).
        ref = reference_points[:, :, None, :, None, :]
        if ref_dim == 2:
            # Offsets are in pixels of level l: divide by that level's (W, H) to get normalised units.
            level_wh = input_spatial_shapes.to(device=query.device).flip(-1).to(offsets.dtype)  # (L, 2)
            return ref + offsets / level_wh[:, None, :]
        if ref_dim == 4:
            # Offsets are in units of half the box, divided among the points.
            box_centre, box_size = ref[..., :2], ref[..., 2:]
            return box_centre + offsets / self.n_points * box_size * 0.5
        raise ValueError(f"MSDeformAttn: reference_points must be 2 or 4 wide in its last dimension (points or "
                         f"boxes), got shape {tuple(reference_points.shape)}")

    def forward(self, query: Tensor, reference_points: Tensor, input_flatten: Tensor, input_spatial_shapes: Tensor,
                input_level_start_index: Tensor, input_padding_mask: Optional[Tensor] = None) -> Tensor:
        batch, n_queries, _ = query.shape
        n_keys = input_flatten.shape[1]
        value = self.value_proj(input_flatten)
        if input_padding_mask is not None:
            value = value.masked_fill(input_padding_mask.unsqueeze(-1), 0.0)
        value = value.view(batch, n_keys, self.n_heads, self.d_model // self.n_heads)
        locations = self.sampling_locations(query, reference_points, input_spatial_shapes)
        # One softmax over all L·P samples of a head, then split back into levels and points.
        logits = self.attention_weights(query).view(batch, n_queries, self.n_heads, self.n_levels * self.n_points)
        weights = logits.softmax(-1).view(batch, n_queries, self.n_heads, self.n_levels, self.n_points)
        return self.output_proj(ms_deform_attn(value, input_spatial_shapes, input_level_start_index, locations,
                                               weights))
