"""dino_loss and dino_loss_centered: DINO's cross-view soft cross-entropy (SPEC §2.1), fused.

Each student row is read once per pass against the summed targets of the teacher views it pairs with; the
backward recomputes the softmax from the saved per-row log-sum-exp, so no B×K log-softmax is ever stored.
dino_loss_centered also computes the teacher targets softmax((z_t − c)/τ_t) inside, never writing them.
Registered ops: dinokernels::soft_ce_forward / soft_ce_backward (ops/soft_ce.py).
"""
from typing import Tuple, Union

import torch
from torch import Tensor

from . import _dispatch as D
from . import soft_ce
from .dino_loss_ref import dino_loss_centered_ref, dino_loss_ref
from .softmax_center import check_center

__all__ = ["dino_loss", "dino_loss_centered", "dino_loss_ref", "dino_loss_centered_ref"]


def _check(op: str, student_logits, teacher, teacher_name: str, student_temp):
    D.check_tensor(op, "student_logits", student_logits, 3, "(S, B, K): all crops, global crops first")
    D.check_tensor(op, teacher_name, teacher, 3, "(T, B, K): the global crops")
    s, b, k = student_logits.shape
    t = teacher.shape[0]
    if teacher.shape[1:] != (b, k):
        raise D.arg_error(op, teacher_name, f"must have the student's batch and class sizes (T, {b}, {k}), got "
                                            f"shape {tuple(teacher.shape)}")
    if teacher.device != student_logits.device:
        raise D.arg_error(op, teacher_name, f"must be on {student_logits.device}, got {teacher.device}")
    if t < 1:
        raise D.arg_error(op, teacher_name, "needs at least one teacher view, got T=0")
    if s < t:
        raise D.arg_error(op, "student_logits", f"has S={s} views, fewer than the T={t} teacher views (the student "
                                                f"sees every crop the teacher sees)")
    if s < 2:
        raise D.arg_error(op, "student_logits", "needs at least 2 views: same-view pairs are skipped")
    if t > soft_ce.MAX_TEACHER_VIEWS:
        raise D.arg_error(op, teacher_name, f"has T={t} views, at most {soft_ce.MAX_TEACHER_VIEWS} are supported")
    if b < 1:
        raise D.arg_error(op, "student_logits", f"has an empty batch (B=0), shape {tuple(student_logits.shape)}")
    if k < 1:
        raise D.arg_error(op, "student_logits", f"needs at least one class, got shape {tuple(student_logits.shape)}")
    D.check_temperature(op, "student_temp", student_temp, student_logits.dtype)
    return s, t, b, k


def _scale(s: int, t: int, b: int) -> float:
    # Official DINO v1 normalisation: the mean over B, then over the (t, v ≠ t) pairs, of which there are
    # T·S − T when S ≥ T (SPEC §2.1: 2V − 2 for two global crops).
    return 1.0 / ((t * s - t) * b)


def dino_loss(student_logits: Tensor, teacher_probs: Tensor, student_temp: float = 0.1) -> Tensor:
    """DINO's cross-view loss from teacher targets.

    student_logits (S, B, K): every crop, global crops first; teacher_probs (T, B, K): targets of the T ≤ S
    global crops (softmax_center or sinkhorn_knopp output) → scalar
    (1/n_pairs) Σ_t Σ_{v≠t} mean_b −⟨p_tb, log_softmax(z_vb/τ_s)⟩, n_pairs = T·S − T, exactly as official
    DINO (and DINOv2's DINO term). Gradient flows to student_logits only (targets are detached). Arithmetic in
    float32 (float64 for float64 input); the loss is float32/float64, the gradient has the student's dtype.
    CPU: float32/float64 (16-bit input is upcast); CUDA: student float32/float16/bfloat16 with float32 or
    same-dtype targets. Raises ValueError for non-finite inputs (DINOKERNELS_CHECK_FINITE) and bad shapes.
    """
    op = "dino_loss"
    s, t, b, _ = _check(op, student_logits, teacher_probs, "teacher_probs", student_temp)
    if D.use_reference("soft_ce_forward", student_logits.device):
        def reference(student_logits, teacher_probs):
            return dino_loss_ref(student_logits, teacher_probs, student_temp)

        inputs = {"student_logits": student_logits, "teacher_probs": teacher_probs}
        if not D.checks_values(student_logits.device):
            return reference(**inputs)
        loss = D.run_reference(reference, inputs, lambda r: not bool(torch.isfinite(r)))
        soft_ce.check_loss(op, inputs, loss, student_temp)
        return loss
    loss, _ = soft_ce.run(op, ("student_logits", "teacher_probs", "center", "weights"), student_logits,
                          teacher_probs, None, None, True, float(student_temp), 1.0, _scale(s, t, b))
    return loss


def dino_loss_centered(student_logits: Tensor, teacher_logits: Tensor, center: Tensor, teacher_temp: float,
                       student_temp: float = 0.1,
                       return_sum: bool = False) -> Union[Tensor, Tuple[Tensor, Tensor]]:
    """DINO v1's loss fully fused: centering, sharpening and the cross-view cross-entropy in one kernel.

    student_logits (S, B, K); teacher_logits (T, B, K) raw teacher outputs of the global crops; center with K
    elements → the same loss as dino_loss(student_logits, softmax((teacher_logits − center)/teacher_temp)),
    without writing the teacher probabilities. With return_sum=True also Σ over the T·B teacher rows of the raw
    logits (K,), the sum of DINO's center update. Dtypes and errors as dino_loss.
    """
    op = "dino_loss_centered"
    s, t, b, k = _check(op, student_logits, teacher_logits, "teacher_logits", student_temp)
    check_center(op, center, k, student_logits)
    D.check_temperature(op, "teacher_temp", teacher_temp, student_logits.dtype, 2)
    if D.use_reference("soft_ce_forward", student_logits.device):
        def reference(student_logits, teacher_logits, center):
            return dino_loss_centered_ref(student_logits, teacher_logits, center, teacher_temp, student_temp,
                                          return_sum)

        inputs = {"student_logits": student_logits, "teacher_logits": teacher_logits, "center": center}
        if not D.checks_values(student_logits.device):
            return reference(**inputs)
        def failed(result):
            loss, teacher_sum = result if return_sum else (result, None)
            return not bool(torch.isfinite(loss)) or (teacher_sum is not None and
                                                      not bool(torch.isfinite(teacher_sum).all()))

        result = D.run_reference(reference, inputs, failed)
        loss, teacher_sum = result if return_sum else (result, None)
        soft_ce.check_loss(op, inputs, loss, student_temp, teacher_sum)
        return result
    loss, teacher_sum = soft_ce.run(op, ("student_logits", "teacher_logits", "center", "weights"), student_logits,
                                    teacher_logits, center, None, True, float(student_temp), float(teacher_temp),
                                    _scale(s, t, b), bool(return_sum))
    if return_sum:
        return loss, teacher_sum
    return loss
