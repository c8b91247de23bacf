"""DINO's multi-crop wrapper (facebookresearch/dino utils.py MultiCropWrapper, SPEC §2.2).

One backbone forward per run of consecutive crops of equal resolution (the official wrapper splits the crop list
where the width changes), the outputs concatenated in crop order, then ONE head forward on all of them. State-dict
keys: backbone.*, head.*.

Differences from the official code, deliberate: runs are formed on (H, W), not the width alone, so two consecutive
crops of equal width and different height are not concatenated (which would fail); the outputs are concatenated once
(keeping the backbone's dtype) instead of onto an empty float32 tensor; backbone.fc / backbone.head are replaced by
nn.Identity only where the backbone has them (official: always set, which adds no keys either way).
"""
from typing import List, Sequence, Union

import torch
from torch import Tensor, nn

__all__ = ["MultiCropWrapper"]


class MultiCropWrapper(nn.Module):
    """forward(crops: list of (B_i, C, H_i, W_i) tensors, or one tensor) -> head(cat(backbone outputs)),
    (Σ B_i, out_dim), rows in crop order."""

    def __init__(self, backbone: nn.Module, head: nn.Module):
        super().__init__()
        for name in ("fc", "head"):
            if hasattr(backbone, name):
                setattr(backbone, name, nn.Identity())
        self.backbone = backbone
        self.head = head

    @staticmethod
    def resolution_runs(crops: Sequence[Tensor]) -> List[int]:
        """End indices of the runs of consecutive crops with equal (H, W), e.g. [2, 10] for 2 global + 8 local."""
        ends = []
        for i in range(1, len(crops) + 1):
            if i == len(crops) or tuple(crops[i].shape[-2:]) != tuple(crops[i - 1].shape[-2:]):
                ends.append(i)
        return ends

    def forward(self, x: Union[Tensor, Sequence[Tensor]]) -> Tensor:
        if isinstance(x, Tensor):
            x = [x]
        if len(x) == 0:
            raise ValueError("dinokernels.MultiCropWrapper: no crops given")
        start, outputs = 0, []
        for end in self.resolution_runs(x):
            out = self.backbone(torch.cat(list(x[start:end])))
            if isinstance(out, tuple):  # the official code accepts backbones that return tuples (XCiT)
                out = out[0]
            outputs.append(out)
            start = end
        return self.head(outputs[0] if len(outputs) == 1 else torch.cat(outputs))
