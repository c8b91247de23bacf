"""Pure-PyTorch reference for softmax_center: the teacher targets of DINO (SPEC §2.1) and DINOv2 (§3.2, §3.4)."""
from typing import Tuple, Union

import torch
from torch import Tensor


def softmax_center_ref(teacher_logits: Tensor, center: Tensor, teacher_temp: float,
                       return_sum: bool = False) -> Union[Tensor, Tuple[Tensor, Tensor]]:
    """teacher_logits (N, K), center with K elements → softmax((z − c)/τ_t) (N, K), float32 (float64 for
    float64 input); with return_sum also Σ_n z_n (K,), the raw-logit sum the center update needs."""
    compute = torch.float64 if teacher_logits.dtype == torch.float64 else torch.float32
    z = teacher_logits.detach().to(compute)
    probs = torch.softmax((z - center.detach().to(compute).reshape(1, -1)) / teacher_temp, dim=-1)
    if return_sum:
        return probs, z.sum(dim=0)
    return probs
