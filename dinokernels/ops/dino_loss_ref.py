"""Pure-PyTorch references for the DINO cross-view loss (SPEC §2.1), computed the direct way: log_softmax of every
student view, then one B×K product per (teacher, student) pair with different views (the cost profile the fused
kernels are benchmarked against)."""
from typing import Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor

from .softmax_center_ref import softmax_center_ref


def _compute_dtype(t: Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def dino_loss_ref(student_logits: Tensor, teacher_probs: Tensor, student_temp: float = 0.1) -> Tensor:
    """student (S, B, K), teacher targets (T, B, K), S ≥ T → scalar
    (1/n_terms) Σ_t Σ_{v≠t} mean_b −⟨p_t,b, log_softmax(z_v,b/τ_s)⟩, n_terms = number of (t, v≠t) pairs."""
    compute = _compute_dtype(student_logits)
    log_q = F.log_softmax(student_logits.to(compute) / student_temp, dim=-1)  # (S, B, K)
    p = teacher_probs.detach().to(compute)  # (T, B, K)
    pairs = [(t, v) for t in range(p.shape[0]) for v in range(log_q.shape[0]) if v != t]
    pair_losses = [-(p[t] * log_q[v]).sum(dim=-1).mean() for t, v in pairs]
    return torch.stack(pair_losses).sum() / len(pairs)


def dino_loss_centered_ref(student_logits: Tensor, teacher_logits: Tensor, center: Tensor, teacher_temp: float,
                           student_temp: float = 0.1,
                           return_sum: bool = False) -> Union[Tensor, Tuple[Tensor, Tensor]]:
    """DINO v1's loss from raw teacher logits (T, B, K): targets softmax((z_t − c)/τ_t), then dino_loss_ref.
    With return_sum also the raw teacher-logit sum over all T·B rows (K,), for the center update."""
    t, b, k = teacher_logits.shape
    probs, logit_sum = softmax_center_ref(teacher_logits.reshape(t * b, k), center, teacher_temp, return_sum=True)
    loss = dino_loss_ref(student_logits, probs.reshape(t, b, k), student_temp)
    return (loss, logit_sum) if return_sum else loss
