"""Pure-PyTorch references for multi-scale deformable attention (SPEC §4), written here from the math.

ms_deform_attn_ref: the grid_sample formulation of SPEC §4.2 (bilinear, zero padding, align_corners=False on the
grid 2·loc − 1, per level over the value seen as (N·M, D, H_l, W_l)). It materialises the sampled values of one
level, (N·M, D, Lq, P), at a time.

ms_deform_attn_gather_ref: SPEC §4.2's per-sample arithmetic written with gathers, including the rule that a
sample outside (−1, H) × (−1, W) in pixel units is skipped. It equals the grid_sample form everywhere except
exactly on that boundary, where the location gradient of grid_sample is non-zero and the skip rule's is zero.
Autograd gives every gradient; float64-friendly; for tests.
"""
import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["ms_deform_attn_ref", "ms_deform_attn_gather_ref"]


def _level_sizes(spatial_shapes: Tensor):
    return [(int(h), int(w)) for h, w in spatial_shapes.tolist()]


def ms_deform_attn_ref(value: Tensor, spatial_shapes: Tensor, level_start_index: Tensor,
                       sampling_locations: Tensor, attention_weights: Tensor) -> Tensor:
    """value (N, S, M, D), spatial_shapes (L, 2) (H, W), level_start_index (L,) (levels are read from it),
    sampling_locations (N, Lq, M, L, P, 2) normalised (x, y), attention_weights (N, Lq, M, L, P)
    → (N, Lq, M·D): out[n, q, m] = Σ_{l,p} a[n, q, m, l, p] · bilinear(value level l, head m, loc[n, q, m, l, p])."""
    n, _, m, d = value.shape
    _, lq, _, _, points, _ = sampling_locations.shape
    # Per head: (N·M, D, Lq) accumulated over levels.
    out = value.new_zeros(n * m, d, lq)
    starts = [int(x) for x in level_start_index.tolist()]
    for level, (h, w) in enumerate(_level_sizes(spatial_shapes)):
        rows = value[:, starts[level]:starts[level] + h * w]  # (N, H·W, M, D), row-major pixels
        image = rows.permute(0, 2, 3, 1).reshape(n * m, d, h, w)
        # grid_sample's grid is in [−1, 1], x first: (N·M, Lq, P, 2).
        grid = (2 * sampling_locations[:, :, :, level] - 1).permute(0, 2, 1, 3, 4).reshape(n * m, lq, points, 2)
        sampled = F.grid_sample(image, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
        weights = attention_weights[:, :, :, level].permute(0, 2, 1, 3).reshape(n * m, 1, lq, points)
        out = out + (sampled * weights).sum(dim=-1)  # (N·M, D, Lq)
    return out.reshape(n, m, d, lq).permute(0, 3, 1, 2).reshape(n, lq, m * d)


def ms_deform_attn_gather_ref(value: Tensor, spatial_shapes: Tensor, level_start_index: Tensor,
                              sampling_locations: Tensor, attention_weights: Tensor) -> Tensor:
    """Same contract as ms_deform_attn_ref; SPEC §4.2's per-sample arithmetic with its skip rule (see the module
    docstring)."""
    n, s, m, d = value.shape
    _, lq, _, levels, points, _ = sampling_locations.shape
    v = value.permute(0, 2, 1, 3)  # N, M, S, D
    out = value.new_zeros(n, lq, m, d)
    starts = [int(x) for x in level_start_index.tolist()]
    for lid, (h, w) in enumerate(_level_sizes(spatial_shapes)):
        x = sampling_locations[:, :, :, lid, :, 0] * w - 0.5  # N, Lq, M, P
        y = sampling_locations[:, :, :, lid, :, 1] * h - 0.5
        inside = (y > -1) & (x > -1) & (y < h) & (x < w)
        x = torch.where(inside, x, torch.zeros_like(x))  # keeps floor() and the gradient finite when skipped
        y = torch.where(inside, y, torch.zeros_like(y))
        x0, y0 = torch.floor(x).detach(), torch.floor(y).detach()
        lx, ly = x - x0, y - y0
        hx, hy = 1 - lx, 1 - ly
        sampled = value.new_zeros(n, lq, m, points, d)
        for dy, dx, weight in ((0, 0, hy * hx), (0, 1, hy * lx), (1, 0, ly * hx), (1, 1, ly * lx)):
            yy, xx = y0 + dy, x0 + dx
            valid = inside & (yy >= 0) & (yy <= h - 1) & (xx >= 0) & (xx <= w - 1)
            index = starts[lid] + (yy.clamp(0, h - 1) * w + xx.clamp(0, w - 1)).long()  # N, Lq, M, P
            index = index.permute(0, 2, 1, 3).reshape(n, m, lq * points, 1).expand(n, m, lq * points, d)
            corner = v.gather(2, index).reshape(n, m, lq, points, d).permute(0, 2, 1, 3, 4)  # N, Lq, M, P, D
            sampled = sampled + torch.where(valid, weight, torch.zeros_like(weight))[..., None] * corner
        out = out + (attention_weights[:, :, :, lid, :, None] * sampled).sum(-2)
    del s
    return out.reshape(n, lq, m * d)
