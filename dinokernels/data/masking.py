"""iBOT block masking and the DINOv2 collate (SPEC §3.6).

`BlockMaskGenerator(rows, cols)(n)` marks about n cells of a rows × cols patch grid by adding random rectangles
(BEiT-style blocks): each rectangle has an area drawn uniformly in [min_num_patches, budget] (budget = what is
still missing, capped at max_num_patches) and a log-uniform aspect ratio in [min_aspect, 1/min_aspect]; it must fit
strictly inside the grid and add between 1 and `budget` new cells, else it is redrawn (10 tries). Generation stops
when n cells are marked or a round of tries adds nothing, so the count can fall short of n, never exceed it.

`collate_ibot(...)` masks ⌊2B·mask_probability⌋ of the 2B global crops, crop i of them asking for ⌊N·U(lo_i, hi_i)⌋
cells with (lo_i, hi_i) consecutive bounds of linspace(min_ratio, max_ratio, n_masked + 1); the others get empty
masks, and the crops' masks are shuffled. It returns the flat indices of masked tokens, each token's weight
1/(masked count of its image) and `upperbound` = Σ⌊N·hi_i⌋ (a static size for buffers).
"""
import math
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor

__all__ = ["BlockMaskGenerator", "collate_ibot", "ibot_masks"]


class BlockMaskGenerator:
    """Rectangular block masks on a rows × cols grid (see the module docstring). Randomness comes from the
    torch.Generator passed to each call (or torch's global one), so masks are reproducible."""

    def __init__(self, rows: int, cols: Optional[int] = None, min_num_patches: int = 4,
                 max_num_patches: Optional[float] = None, min_aspect: float = 0.3,
                 max_aspect: Optional[float] = None):
        cols = rows if cols is None else cols
        if rows < 1 or cols < 1:
            raise ValueError(f"BlockMaskGenerator: the grid must be at least 1×1, got {rows}×{cols}")
        if not 0 < min_aspect:
            raise ValueError(f"BlockMaskGenerator: min_aspect must be > 0, got {min_aspect}")
        self.rows, self.cols = int(rows), int(cols)
        self.min_num_patches = min_num_patches
        self.max_num_patches = rows * cols if max_num_patches is None else max_num_patches
        max_aspect = max_aspect or 1.0 / min_aspect
        self.log_aspect = (math.log(min_aspect), math.log(max_aspect))

    @property
    def num_patches(self) -> int:
        return self.rows * self.cols

    def _uniform(self, lo: float, hi: float, g: Optional[torch.Generator]) -> float:
        return lo + (hi - lo) * float(torch.rand((), generator=g, dtype=torch.float64))

    def _add_block(self, mask: Tensor, budget: float, g: Optional[torch.Generator]) -> int:
        """Tries up to 10 rectangles; marks the first that adds 1…budget new cells. Returns the cells added."""
        for _ in range(10):
            area = self._uniform(self.min_num_patches, budget, g)
            aspect = math.exp(self._uniform(*self.log_aspect, g))
            h = int(round(math.sqrt(area * aspect)))
            w = int(round(math.sqrt(area / aspect)))
            if not (w < self.cols and h < self.rows):
                continue
            top = int(torch.randint(0, self.rows - h + 1, (), generator=g))
            left = int(torch.randint(0, self.cols - w + 1, (), generator=g))
            window = mask[top:top + h, left:left + w]
            new = h * w - int(window.sum())
            if 0 < new <= budget:
                window.fill_(True)
                return new
        return 0

    def __call__(self, num_masking_patches: int = 0, generator: Optional[torch.Generator] = None) -> Tensor:
        """(rows, cols) bool mask with at most `num_masking_patches` cells set."""
        mask = torch.zeros(self.rows, self.cols, dtype=torch.bool)
        count = 0
        while count < num_masking_patches:
            added = self._add_block(mask, min(num_masking_patches - count, self.max_num_patches), generator)
            if added == 0:
                break
            count += added
        return mask


def ibot_masks(n_images: int, rows: int, cols: int, mask_probability: float = 0.5,
               mask_ratio: Tuple[float, float] = (0.1, 0.5), generator: Optional[torch.Generator] = None
               ) -> Tuple[Tensor, int]:
    """(masks (n_images, rows·cols) bool, upperbound) for the global crops of a batch, as the DINOv2 collate
    draws them (see the module docstring)."""
    if not 0 <= mask_probability <= 1:
        raise ValueError(f"ibot_masks: mask_probability must be in [0, 1], got {mask_probability}")
    lo, hi = mask_ratio
    if not 0 <= lo <= hi <= 1:
        raise ValueError(f"ibot_masks: mask_ratio must satisfy 0 ≤ min ≤ max ≤ 1, got {mask_ratio}")
    n_patches = rows * cols
    generator_fn = BlockMaskGenerator(rows, cols, max_num_patches=0.5 * n_patches)
    n_masked = int(n_images * mask_probability)
    bounds = torch.linspace(lo, hi, n_masked + 1, dtype=torch.float64).tolist()
    masks: List[Tensor] = []
    upperbound = 0
    for i in range(n_masked):
        ratio = bounds[i] + (bounds[i + 1] - bounds[i]) * float(torch.rand((), generator=generator,
                                                                            dtype=torch.float64))
        masks.append(generator_fn(int(n_patches * ratio), generator).flatten())
        upperbound += int(n_patches * bounds[i + 1])
    masks += [torch.zeros(n_patches, dtype=torch.bool)] * (n_images - n_masked)
    order = torch.randperm(n_images, generator=generator).tolist()
    return torch.stack([masks[i] for i in order]) if masks else torch.zeros(0, n_patches, dtype=torch.bool), \
        upperbound


def collate_ibot(global_crops: Sequence[Tensor], local_crops: Sequence[Tensor], patch_size: int,
                 mask_probability: float = 0.5, mask_ratio: Tuple[float, float] = (0.1, 0.5),
                 dtype: Optional[torch.dtype] = None, generator: Optional[torch.Generator] = None
                 ) -> Dict[str, Tensor]:
    """DINOv2's batch: global_crops, a list of 2 tensors (B, 3, H, W) (crop-major: all first crops, then all
    second crops), local_crops a list of (B, 3, h, w) → dict with collated_global_crops (2B, 3, H, W),
    collated_local_crops (n_local·B, 3, h, w) or an empty tensor, collated_masks (2B, N) bool, mask_indices_list
    (n_masked,) flat indices into the (2B·N) tokens, masks_weight (n_masked,) = 1/n_i of each token's image,
    n_masked_patches (1,), upperbound (int). `dtype` casts the crops (DINOv2 casts them to float16)."""
    if len(global_crops) == 0:
        raise ValueError("collate_ibot: no global crops")
    crops = torch.cat(list(global_crops))
    H, W = crops.shape[-2:]
    if H % patch_size or W % patch_size:
        raise ValueError(f"collate_ibot: global crops of {H}×{W} are not multiples of the patch size {patch_size}")
    masks, upperbound = ibot_masks(crops.shape[0], H // patch_size, W // patch_size, mask_probability, mask_ratio,
                                   generator)
    indices = masks.flatten().nonzero().flatten()
    per_image = masks.sum(-1).clamp(min=1).to(torch.float32)
    weights = (1.0 / per_image)[:, None].expand_as(masks)[masks]
    local = torch.cat(list(local_crops)) if len(local_crops) else crops.new_zeros((0,) + tuple(crops.shape[1:]))
    if dtype is not None:
        crops, local = crops.to(dtype), local.to(dtype)
    return {"collated_global_crops": crops, "collated_local_crops": local, "collated_masks": masks,
            "mask_indices_list": indices, "masks_weight": weights,
            "n_masked_patches": torch.tensor([indices.shape[0]], dtype=torch.int64), "upperbound": upperbound}
