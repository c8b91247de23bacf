"""Sine position embeddings of Grounding DINO (SPEC §5.2, §5.3, §5.6): the image one (per-axis temperature,
normalised by the valid extent), the text one (integer phrase positions), and the box one of the decoder queries.
None has parameters."""
import math

import torch
from torch import Tensor, nn

__all__ = ["PositionEmbeddingSineHW", "sine_embed", "text_position_embedding", "box_position_embedding"]


def _check_feats(num_pos_feats: int):
    if num_pos_feats <= 0 or num_pos_feats % 2:
        raise ValueError(f"num_pos_feats must be a positive even number (sin/cos pairs), got {num_pos_feats}")


def sine_embed(coord: Tensor, num_pos_feats: int, temperature: float) -> Tensor:
    """coord (...,) already scaled (e.g. × 2π) → (..., num_pos_feats): channel 2i is sin(coord / t^(2i/F)) and
    channel 2i+1 cos(coord / t^(2i/F)), with F = num_pos_feats. Computed in float32 at least."""
    _check_feats(num_pos_feats)
    dtype = torch.promote_types(coord.dtype, torch.float32) if coord.is_floating_point() else torch.float32
    half = torch.arange(num_pos_feats // 2, dtype=dtype, device=coord.device)
    inv_freq = float(temperature) ** (-2.0 * half / num_pos_feats)  # (F/2,), one frequency per sin/cos pair
    angles = coord.to(dtype)[..., None] * inv_freq  # (..., F/2)
    return torch.stack((angles.sin(), angles.cos()), -1).flatten(-2)


class PositionEmbeddingSineHW(nn.Module):
    """Image sine embedding with separate temperatures for y and x (official: 20 and 20).

    forward(mask (B, H, W) bool, True = padding) → (B, 2·num_pos_feats, H, W), channels (y, x) concatenated.
    With `normalize`, the running count of valid pixels along an axis is divided by (count at the last row/column
    + 1e-6) and multiplied by `scale` (2π), so the valid extent spans (0, 2π] whatever the padding.
    """

    def __init__(self, num_pos_feats: int = 128, temperature_h: float = 20.0, temperature_w: float = 20.0,
                 normalize: bool = True, scale: float = 2 * math.pi, eps: float = 1e-6):
        super().__init__()
        _check_feats(num_pos_feats)
        self.num_pos_feats = num_pos_feats
        self.temperature_h = temperature_h
        self.temperature_w = temperature_w
        self.normalize = normalize
        self.scale = scale
        self.eps = eps

    def forward(self, mask: Tensor) -> Tensor:
        if not isinstance(mask, Tensor) or mask.dim() != 3 or mask.dtype != torch.bool:
            got = f"{tuple(mask.shape)} {mask.dtype}" if isinstance(mask, Tensor) else type(mask).__name__
            raise ValueError(f"PositionEmbeddingSineHW: mask must be a (B, H, W) bool tensor (True = padding), "
                             f"got {got}")
        valid = (~mask).to(torch.float32)
        y = valid.cumsum(1)
        x = valid.cumsum(2)
        if self.normalize:
            y = y / (y[:, -1:, :] + self.eps) * self.scale
            x = x / (x[:, :, -1:] + self.eps) * self.scale
        pos_y = sine_embed(y, self.num_pos_feats, self.temperature_h)
        pos_x = sine_embed(x, self.num_pos_feats, self.temperature_w)
        return torch.cat((pos_y, pos_x), -1).permute(0, 3, 1, 2)

    def extra_repr(self) -> str:
        return (f"num_pos_feats={self.num_pos_feats}, temperature_h={self.temperature_h}, "
                f"temperature_w={self.temperature_w}, normalize={self.normalize}")


def text_position_embedding(position_ids: Tensor, dim: int = 256, temperature: float = 10000.0) -> Tensor:
    """position_ids (B, T) integer phrase positions → (B, T, dim): sin/cos of 2π·p / temperature^(2i/dim)
    (SPEC §5.3, the text enhancer's query/key embedding)."""
    return sine_embed(position_ids.to(torch.float32) * (2 * math.pi), dim, temperature)


def box_position_embedding(boxes: Tensor, num_pos_feats: int = 128, temperature: float = 10000.0) -> Tensor:
    """boxes (..., 2) (x, y) or (..., 4) (cx, cy, w, h) in [0, 1] → (..., k·num_pos_feats), each coordinate
    × 2π embedded separately and concatenated in the order (y, x[, w, h]) (SPEC §5.6, DAB-DETR's layout)."""
    if boxes.shape[-1] not in (2, 4):
        raise ValueError(f"box_position_embedding: boxes must end in 2 (x, y) or 4 (cx, cy, w, h) coordinates, got "
                         f"shape {tuple(boxes.shape)}")
    scaled = boxes * (2 * math.pi)
    order = [1, 0] + list(range(2, boxes.shape[-1]))
    return torch.cat([sine_embed(scaled[..., i], num_pos_feats, temperature) for i in order], -1)
