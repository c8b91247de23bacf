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
import torch.nn.functional as F
from torch import Tensor, nn

from ..ops import ms_deform_attn

__all__ = ["MSDeformAttn"]


def _is_power_of_2(n: int) -> bool:
    return n > 0 and (n & (n - 1)) == 0


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
            raise ValueError(f"d_model must be divisible by n_heads, but got {d_model} and {n_heads}")
        d_per_head = d_model // n_heads
        if not _is_power_of_2(d_per_head):
            # The official warning: the original CUDA kernel is most efficient with power-of-2 channels per head.
            warnings.warn("You'd better set d_model in MSDeformAttn to make the dimension of each attention head a "
                          "power of 2 which is more efficient in our CUDA implementation.")
        self.im2col_step = 64  # kept for attribute compatibility; unused
        self.d_model = d_model
        self.n_levels = n_levels
        self.n_heads = n_heads
        self.n_points = n_points
        self.sampling_offsets = nn.Linear(d_model, n_heads * n_levels * n_points * 2)
        self.attention_weights = nn.Linear(d_model, n_heads * n_levels * n_points)
        self.value_proj = nn.Linear(d_model, d_model)
        self.output_proj = nn.Linear(d_model, d_model)
        self._reset_parameters()

    def _reset_parameters(self):
        nn.init.constant_(self.sampling_offsets.weight.data, 0.0)
        thetas = torch.arange(self.n_heads, dtype=torch.float32) * (2.0 * math.pi / self.n_heads)
        grid_init = torch.stack([thetas.cos(), thetas.sin()], -1)
        grid_init = (grid_init / grid_init.abs().max(-1, keepdim=True)[0]).view(self.n_heads, 1, 1, 2).repeat(
            1, self.n_levels, self.n_points, 1)
        for i in range(self.n_points):
            grid_init[:, :, i, :] *= i + 1
        with torch.no_grad():
            self.sampling_offsets.bias.copy_(grid_init.view(-1))
        nn.init.constant_(self.attention_weights.weight.data, 0.0)
        nn.init.constant_(self.attention_weights.bias.data, 0.0)
        nn.init.xavier_uniform_(self.value_proj.weight.data)
        nn.init.constant_(self.value_proj.bias.data, 0.0)
        nn.init.xavier_uniform_(self.output_proj.weight.data)
        nn.init.constant_(self.output_proj.bias.data, 0.0)

    def sampling_locations(self, query: Tensor, reference_points: Tensor, input_spatial_shapes: Tensor) -> Tensor:
        """(N, Lq, M, L, P, 2) normalised sampling locations."""
        n, lq, _ = query.shape
        offsets = self.sampling_offsets(query).view(n, lq, self.n_heads, self.n_levels, self.n_points, 2)
        if reference_points.shape[-1] == 2:
            shapes = input_spatial_shapes.to(device=query.device)
            offset_normalizer = torch.stack([shapes[..., 1], shapes[..., 0]], -1).to(offsets.dtype)
            return reference_points[:, :, None, :, None, :] + \
                offsets / offset_normalizer[None, None, None, :, None, :]
        if reference_points.shape[-1] == 4:
            return reference_points[:, :, None, :, None, :2] + \
                offsets / self.n_points * reference_points[:, :, None, :, None, 2:] * 0.5
        raise ValueError(f"Last dim of reference_points must be 2 or 4, but get {reference_points.shape[-1]} "
                         f"instead.")

    def forward(self, query: Tensor, reference_points: Tensor, input_flatten: Tensor, input_spatial_shapes: Tensor,
                input_level_start_index: Tensor, input_padding_mask: Optional[Tensor] = None) -> Tensor:
        n, lq, _ = query.shape
        _, s, _ = input_flatten.shape
        value = self.value_proj(input_flatten)
        if input_padding_mask is not None:
            value = value.masked_fill(input_padding_mask[..., None], float(0))
        value = value.view(n, s, self.n_heads, self.d_model // self.n_heads)
        locations = self.sampling_locations(query, reference_points, input_spatial_shapes)
        weights = self.attention_weights(query).view(n, lq, self.n_heads, self.n_levels * self.n_points)
        weights = F.softmax(weights, -1).view(n, lq, self.n_heads, self.n_levels, self.n_points)
        output = ms_deform_attn(value, input_spatial_shapes, input_level_start_index, locations, weights)
        return self.output_proj(output)
