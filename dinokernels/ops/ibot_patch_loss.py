"""ibot_patch_loss: DINOv2's iBOT masked-patch cross-entropy (SPEC §3.4) on the soft cross-entropy kernel
(ops/soft_ce.py), one student row against one target row, with per-token weights."""
import torch
from torch import Tensor

from . import _dispatch as D
from . import soft_ce
from .ibot_patch_loss_ref import ibot_patch_loss_ref

__all__ = ["ibot_patch_loss", "ibot_patch_loss_ref"]


def ibot_patch_loss(student_patch_logits: Tensor, teacher_patch_probs: Tensor, weights: Tensor,
                    student_temp: float = 0.1) -> Tensor:
    """Weighted soft cross-entropy of the masked patch tokens.

    student_patch_logits (n, K), teacher_patch_probs (n, K) targets, weights (n,) → scalar
    Σ_j w_j·(−⟨p_j, log_softmax(z_j/τ_s)⟩). DINOv2 passes w_j = 1/max(masked tokens of j's image, 1) and divides
    the result by the number of images (dinokernels.losses.iBOTPatchLoss does both). n = 0 gives 0. Gradient
    to student_patch_logits only; dtypes and errors as dino_loss.
    """
    op = "ibot_patch_loss"
    D.check_tensor(op, "student_patch_logits", student_patch_logits, 2, "(n, K): masked tokens")
    D.check_tensor(op, "teacher_patch_probs", teacher_patch_probs, 2, "(n, K): masked-token targets")
    if not isinstance(weights, torch.Tensor):
        raise D.arg_error(op, "weights", f"must be a torch.Tensor, got {type(weights).__name__}", TypeError)
    n, k = student_patch_logits.shape
    if teacher_patch_probs.shape != (n, k):
        raise D.arg_error(op, "teacher_patch_probs", f"must match the student's shape ({n}, {k}), got "
                                                     f"{tuple(teacher_patch_probs.shape)}")
    if weights.shape != (n,):
        raise D.arg_error(op, "weights", f"must have shape ({n},), one weight per token, got {tuple(weights.shape)}")
    for name, t in (("teacher_patch_probs", teacher_patch_probs), ("weights", weights)):
        if t.device != student_patch_logits.device:
            raise D.arg_error(op, name, f"must be on {student_patch_logits.device}, got {t.device}")
    if not weights.is_floating_point():
        raise D.arg_error(op, "weights", f"must have a floating-point dtype, got {weights.dtype}", TypeError)
    if k < 1:
        raise D.arg_error(op, "student_patch_logits", f"needs at least one class, got shape ({n}, {k})")
    D.check_temperature(op, "student_temp", student_temp, student_patch_logits.dtype)
    if n == 0:  # no masked token: zero loss, zero-size gradient
        zero = student_patch_logits.sum() * 0
        return zero.to(torch.float64 if student_patch_logits.dtype == torch.float64 else torch.float32)
    if D.use_reference("soft_ce_forward", student_patch_logits.device):
        def reference(student_patch_logits, teacher_patch_probs, weights):
            return ibot_patch_loss_ref(student_patch_logits, teacher_patch_probs, weights, student_temp)

        inputs = {"student_patch_logits": student_patch_logits, "teacher_patch_probs": teacher_patch_probs,
                  "weights": weights}
        if not D.checks_values(student_patch_logits.device):
            return reference(**inputs)
        loss = D.run_reference(reference, inputs, lambda r: not bool(torch.isfinite(r)))
        soft_ce.check_loss(op, inputs, loss, student_temp)
        return loss
    loss, _ = soft_ce.run(op, ("student_patch_logits", "teacher_patch_probs", "center", "weights"),
                          student_patch_logits[None], teacher_patch_probs[None], None, weights, False,
                          float(student_temp), 1.0, 1.0)
    return loss
