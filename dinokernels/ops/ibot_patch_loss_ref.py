"""Pure-PyTorch reference for the iBOT patch loss (SPEC §3.4) on the masked tokens: weighted token cross-entropies."""
import torch
import torch.nn.functional as F
from torch import Tensor


def ibot_patch_loss_ref(student_patch_logits: Tensor, teacher_patch_probs: Tensor, weights: Tensor,
                        student_temp: float = 0.1) -> Tensor:
    """Masked tokens: student (n, K), teacher targets (n, K), per-token weights (n,) → scalar
    Σ_j w_j·(−⟨p_j, log_softmax(z_j/τ_s)⟩) (SPEC §3.4's L_ibot before its division by the number of images)."""
    compute = torch.float64 if student_patch_logits.dtype == torch.float64 else torch.float32
    log_probs = F.log_softmax(student_patch_logits.to(compute) / student_temp, dim=-1)
    per_token = torch.sum(-teacher_patch_probs.detach().to(compute) * log_probs, dim=-1)
    return torch.sum(per_token * weights.detach().to(compute))
