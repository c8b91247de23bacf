"""Attention maps: the self-attention of the CLS token over the patches in the last block, one map per head, saved
as a PNG grid with Pillow (the picture of DINO's paper and of its visualize_attention.py)."""
import math
import os
from typing import Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..data.imageio import open_rgb, to_rgb

__all__ = ["cls_attention_maps", "colorize", "attention_grid", "visualize_attention"]

# Viridis at 9 stops (matplotlib's default colour map, the one DINO's figures use), linearly interpolated.
_VIRIDIS = np.array([[68, 1, 84], [71, 44, 122], [59, 81, 139], [44, 113, 142], [33, 144, 141], [39, 173, 129],
                     [92, 200, 99], [170, 220, 50], [253, 231, 37]], dtype=np.float64)


@torch.no_grad()
def cls_attention_maps(model: nn.Module, image: Tensor, upsample: bool = True) -> Tensor:
    """image (3, H, W) or (1, 3, H, W), normalised as the model expects → (heads, H', W') float32 on the CPU: the
    attention weights from the CLS token to each patch in the last block (per head; each map sums to ≤ 1 since the
    CLS token also attends to itself). H and W are cropped to multiples of the patch size first, as the official
    script does; with `upsample` the maps are repeated to pixel resolution (nearest), else one value per patch."""
    if image.dim() == 3:
        image = image.unsqueeze(0)
    if image.dim() != 4 or image.shape[0] != 1:
        raise ValueError(f"cls_attention_maps: image must be (3, H, W) or (1, 3, H, W), got {tuple(image.shape)}")
    patch = _patch_size(model)
    h, w = image.shape[-2] - image.shape[-2] % patch, image.shape[-1] - image.shape[-1] % patch
    if h == 0 or w == 0:
        raise ValueError(f"cls_attention_maps: image {tuple(image.shape[-2:])} is smaller than one {patch}×{patch} "
                         f"patch")
    image = image[..., :h, :w]
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        attn = model.get_last_selfattention(image.to(device))
    finally:
        model.train(was_training)
    heads = attn.shape[1]
    gh, gw = h // patch, w // patch
    n_patches = gh * gw
    # Tokens after CLS: the patches (a model with register tokens would put them before the patches; take the last
    # n_patches columns).
    maps = attn[0, :, 0, -n_patches:].reshape(heads, gh, gw).float()
    if upsample:
        maps = F.interpolate(maps.unsqueeze(0), scale_factor=patch, mode="nearest")[0]
    return maps.cpu()


def _patch_size(model: nn.Module) -> int:
    ps = getattr(getattr(model, "patch_embed", None), "patch_size", None)
    if ps is None:
        raise ValueError("cls_attention_maps: the model has no patch_embed.patch_size (a ViT backbone is needed)")
    return int(ps[0] if isinstance(ps, (tuple, list)) else ps)


def colorize(values: np.ndarray) -> np.ndarray:
    """(H, W) values → (H, W, 3) uint8 viridis, each map scaled by its own min/max (as plt.imsave does)."""
    v = np.asarray(values, dtype=np.float64)
    lo, hi = np.nanmin(v), np.nanmax(v)
    t = np.zeros_like(v) if not hi > lo else (v - lo) / (hi - lo)
    x = np.nan_to_num(t, nan=0.0) * (len(_VIRIDIS) - 1)
    i = np.clip(np.floor(x).astype(np.int64), 0, len(_VIRIDIS) - 2)
    f = (x - i)[..., None]
    rgb = _VIRIDIS[i] * (1 - f) + _VIRIDIS[i + 1] * f
    return np.clip(np.rint(rgb), 0, 255).astype(np.uint8)


def attention_grid(image_rgb: np.ndarray, maps: Union[Tensor, np.ndarray], tile: int = 160, cols: Optional[int] = None,
                   labels: bool = True, pad: int = 4):
    """A PIL image: the input image followed by one viridis tile per head, `tile` pixels per side (nearest
    resampling keeps the patch grid visible), `cols` tiles per row (default: all in one row up to 7, else a near
    square grid), each head labelled."""
    from PIL import Image, ImageDraw

    maps = maps.numpy() if isinstance(maps, Tensor) else np.asarray(maps)
    tiles = [Image.fromarray(np.asarray(image_rgb, dtype=np.uint8)).convert("RGB")]
    tiles += [Image.fromarray(colorize(m)) for m in maps]
    n = len(tiles)
    if cols is None:
        cols = n if n <= 7 else int(math.ceil(math.sqrt(n)))
    rows = int(math.ceil(n / cols))
    label_h = 14 if labels else 0
    canvas = Image.new("RGB", (cols * (tile + pad) + pad, rows * (tile + pad + label_h) + pad), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    for idx, t in enumerate(tiles):
        r, c = divmod(idx, cols)
        x, y = pad + c * (tile + pad), pad + r * (tile + pad + label_h)
        resample = Image.BICUBIC if idx == 0 else Image.NEAREST
        canvas.paste(t.resize((tile, tile), resample), (x, y + label_h))
        if labels:
            draw.text((x, y), "image" if idx == 0 else f"head {idx - 1}", fill=(0, 0, 0))
    return canvas


def visualize_attention(model: nn.Module, image, out_path: str, image_size: Union[int, Tuple[int, int]] = 480,
                        mean: Sequence[float] = (0.485, 0.456, 0.406), std: Sequence[float] = (0.229, 0.224, 0.225),
                        tile: int = 160) -> str:
    """Loads `image` (a path or a PIL image), resizes it to `image_size` (an int: a square, as the official
    script's default 480; or (H, W)), normalises it, computes the per-head CLS attention of the last block and
    saves the grid PNG to out_path. Returns out_path."""
    from PIL import Image

    if isinstance(image, (str, os.PathLike)):
        pil = open_rgb(image)
    else:
        pil = to_rgb(image)
    size = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
    pil = pil.resize((size[1], size[0]), Image.BICUBIC)
    rgb = np.asarray(pil, dtype=np.uint8)
    x = torch.from_numpy(rgb.astype(np.float32) / 255.0).permute(2, 0, 1)
    x = (x - torch.tensor(mean).view(3, 1, 1)) / torch.tensor(std).view(3, 1, 1)
    maps = cls_attention_maps(model, x)
    h, w = maps.shape[-2:]
    grid = attention_grid(rgb[:h, :w], maps, tile=tile)
    folder = os.path.dirname(os.path.abspath(out_path))
    os.makedirs(folder, exist_ok=True)
    grid.save(out_path, format="PNG")
    return out_path
