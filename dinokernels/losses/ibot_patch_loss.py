"""DINOv2's iBOT masked-patch loss as an nn.Module (SPEC §3.4), backed by the fused kernels.

Mirrors dinov2/loss/ibot_patch_loss.py iBOTPatchLoss: `center` buffer (1, 1, K), softmax_center_teacher,
sinkhorn_knopp_teacher, forward_masked (and the dense forward), update_center. Differences, all deliberate:
* The cross-entropy and its weighting are one kernel (dinokernels.ops.ibot_patch_loss).
* The center update is synchronous (official: all-reduce with async_op, applied at the next
  softmax_center_teacher). Same math: c ← m·c + (1 − m)·(Σ_ranks mean of the rank's tokens)/W, a mean of per-rank
  means.
* sinkhorn_knopp_teacher works without torch.distributed (the official one all-reduces the masked count
  unconditionally and fails single-process, SPEC §3.3); its n_masked_patches_tensor is keyword-only and unused: it
  only sets a uniform scale that the final column normalisation cancels.
"""
from typing import Optional

import torch
from torch import Tensor, nn

from ..ops import ibot_patch_loss, sinkhorn_knopp, softmax_center
from .dino_loss import (_all_reduce_sum, _check_int, _check_last_dim, _check_logits, _check_momentum,
                        _check_positive, _ema_center, _error, _sum_dtype)

__all__ = ["iBOTPatchLoss"]

OWNER = "iBOTPatchLoss"


def _compute_dtype(t: Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


class iBOTPatchLoss(nn.Module):
    """iBOT loss on masked patch tokens: (1/n_images) Σ_{masked j} w_j·(−⟨t_j, log_softmax(s_j/τ_s)⟩), with
    w_j = 1/max(number of masked patches of j's image, 1) by default.

    Args:
        patch_out_dim: K, prototypes of the patch head.
        student_temp: τ_s. center_momentum: m of the center EMA.
        process_group: group for the center all-reduce and Sinkhorn-Knopp (None: the default group). Nothing is
            reduced unless torch.distributed is initialised.

    Buffer: center (1, 1, K), float32, zeros.
    """

    def __init__(self, patch_out_dim: int, student_temp: float = 0.1, center_momentum: float = 0.9,
                 process_group=None):
        super().__init__()
        self.patch_out_dim = _check_int(OWNER, "patch_out_dim", patch_out_dim, 1)
        self.student_temp = _check_positive(OWNER, "student_temp", student_temp)
        self.center_momentum = _check_momentum(OWNER, center_momentum)
        self.process_group = process_group
        self.register_buffer("center", torch.zeros(1, 1, self.patch_out_dim))

    def extra_repr(self) -> str:
        return (f"patch_out_dim={self.patch_out_dim}, student_temp={self.student_temp}, "
                f"center_momentum={self.center_momentum}")

    # ---- teacher targets ----

    @torch.no_grad()
    def softmax_center_teacher(self, teacher_patch_tokens: Tensor, teacher_temp: float) -> Tensor:
        """teacher_patch_tokens (n, K) or (…, K) raw teacher logits → softmax((z − center)/teacher_temp), same
        shape, float32 (float64 for float64 input). Does not update the center (call update_center)."""
        _check_last_dim(OWNER, "teacher_patch_tokens", teacher_patch_tokens, self.patch_out_dim, "patch_out_dim")
        temp = _check_positive(OWNER, "teacher_temp", teacher_temp)
        probs = softmax_center(teacher_patch_tokens.reshape(-1, self.patch_out_dim), self.center, temp)
        return probs.reshape(teacher_patch_tokens.shape)

    @torch.no_grad()
    def sinkhorn_knopp_teacher(self, teacher_output: Tensor, teacher_temp: float, n_iterations: int = 3, *,
                               n_masked_patches_tensor: Optional[Tensor] = None) -> Tensor:
        """teacher_output (n, K) raw logits of this rank's masked tokens (ranks may hold different n) → (n, K)
        Sinkhorn-Knopp targets over all ranks of process_group, rows summing to 1, float32 (float64 for float64
        input). Works single-process. n_masked_patches_tensor is accepted for drop-in use and ignored (in the
        official code it is a uniform scale that cancels)."""
        del n_masked_patches_tensor
        _check_logits(OWNER, "teacher_output", teacher_output, 2, "(n, K)")
        if teacher_output.shape[1] != self.patch_out_dim:
            raise _error(OWNER, "teacher_output", f"must have patch_out_dim = {self.patch_out_dim} columns, got "
                                                  f"shape {tuple(teacher_output.shape)}")
        temp = _check_positive(OWNER, "teacher_temp", teacher_temp)
        if isinstance(n_iterations, Tensor):
            raise _error(OWNER, "n_iterations", "must be a Python int (the official third positional argument, "
                                                "n_masked_patches_tensor, is keyword-only here)", TypeError)
        iters = _check_int(OWNER, "n_iterations", n_iterations, 1)
        return sinkhorn_knopp(teacher_output.detach(), temp, iters, self.process_group)

    # ---- loss ----

    def forward_masked(self, student_patch_tokens_masked: Tensor, teacher_patch_tokens_masked: Tensor,
                       student_masks_flat: Tensor, n_masked_patches: Optional[int] = None,
                       masks_weight: Optional[Tensor] = None) -> Tensor:
        """student_patch_tokens_masked (n, K) student logits of the masked tokens; teacher_patch_tokens_masked
        (n, K) teacher targets (softmax_center_teacher or sinkhorn_knopp_teacher output); student_masks_flat
        (n_images, n_patches) bool; n_masked_patches: use only the first n_masked_patches rows (int or 1-element
        tensor); masks_weight (rows used,) per-token weights, default 1/max(masked count of the token's image, 1)
        in mask order → scalar −Σ_j w_j⟨t_j, log_softmax(s_j/τ_s)⟩ / n_images (float32; float64 for float64
        input), differentiable w.r.t. the student tokens only."""
        s, t, masks = student_patch_tokens_masked, teacher_patch_tokens_masked, student_masks_flat
        _check_logits(OWNER, "student_patch_tokens_masked", s, 2, "(n, K)")
        _check_logits(OWNER, "teacher_patch_tokens_masked", t, 2, "(n, K)")
        if s.shape[1] != self.patch_out_dim:
            raise _error(OWNER, "student_patch_tokens_masked", f"must have patch_out_dim = {self.patch_out_dim} "
                                                               f"columns, got shape {tuple(s.shape)}")
        if t.shape != s.shape:
            raise _error(OWNER, "teacher_patch_tokens_masked", f"must have the student's shape {tuple(s.shape)}, "
                                                               f"got {tuple(t.shape)}")
        if not isinstance(masks, Tensor) or masks.dim() != 2:
            raise _error(OWNER, "student_masks_flat", "must be a 2-D (n_images, n_patches) tensor, got "
                                                      + (f"shape {tuple(masks.shape)}" if isinstance(masks, Tensor)
                                                         else type(masks).__name__))
        n_images = masks.shape[0]
        if n_images == 0:
            raise _error(OWNER, "student_masks_flat", "has no images (the loss is divided by the image count)")
        rows = s.shape[0]
        if n_masked_patches is not None:
            if isinstance(n_masked_patches, Tensor):
                if n_masked_patches.numel() != 1:
                    raise _error(OWNER, "n_masked_patches", f"must hold one value, got shape "
                                                            f"{tuple(n_masked_patches.shape)}")
                n_masked_patches = int(n_masked_patches.item())
            n_masked_patches = _check_int(OWNER, "n_masked_patches", n_masked_patches, 0)
            if n_masked_patches > rows:
                raise _error(OWNER, "n_masked_patches", f"= {n_masked_patches} exceeds the {rows} token rows given")
            rows = n_masked_patches
            s, t = s[:rows], t[:rows]
        compute = _compute_dtype(s)
        if masks_weight is None:
            if masks.dtype != torch.bool:
                raise _error(OWNER, "student_masks_flat", f"must be a bool mask (True = masked) to derive the "
                                                          f"default weights, got {masks.dtype}", TypeError)
            counts = masks.sum(-1).to(device=s.device, dtype=compute).clamp(min=1.0)
            weights = (1 / counts).unsqueeze(-1).expand_as(masks)[masks.to(s.device)]
            if weights.shape[0] != rows:
                raise _error(OWNER, "student_masks_flat", f"marks {weights.shape[0]} masked patches but {rows} token "
                                                          f"rows are used (pass n_masked_patches or masks_weight)")
        else:
            if not isinstance(masks_weight, Tensor) or masks_weight.dim() != 1 or masks_weight.shape[0] != rows:
                raise _error(OWNER, "masks_weight", f"must be a 1-D tensor with one weight per used token row "
                                                    f"({rows}), got "
                                                    + (f"shape {tuple(masks_weight.shape)}"
                                                       if isinstance(masks_weight, Tensor)
                                                       else type(masks_weight).__name__))
            weights = masks_weight
        weights = weights.detach().to(device=s.device, dtype=compute)
        return ibot_patch_loss(s, t, weights, self.student_temp) / n_images

    def forward(self, student_patch_tokens: Tensor, teacher_patch_tokens: Tensor,
                student_masks_flat: Tensor) -> Tensor:
        """The official dense variant: student_patch_tokens (B, N, K) logits and teacher_patch_tokens (B, N, K)
        targets for every patch, student_masks_flat (B, N) bool → scalar
        −mean_b Σ_{masked j of b} ⟨t_j, log_softmax(s_j/τ_s)⟩ / max(n_masked_b, 1). Only masked tokens are read."""
        _check_logits(OWNER, "student_patch_tokens", student_patch_tokens, 3, "(B, N, K)")
        _check_logits(OWNER, "teacher_patch_tokens", teacher_patch_tokens, 3, "(B, N, K)")
        if teacher_patch_tokens.shape != student_patch_tokens.shape:
            raise _error(OWNER, "teacher_patch_tokens", f"must have the student's shape "
                                                        f"{tuple(student_patch_tokens.shape)}, got "
                                                        f"{tuple(teacher_patch_tokens.shape)}")
        masks = student_masks_flat
        if not isinstance(masks, Tensor) or masks.dtype != torch.bool or \
                tuple(masks.shape) != tuple(student_patch_tokens.shape[:2]):
            raise _error(OWNER, "student_masks_flat", f"must be a bool tensor of shape "
                                                      f"{tuple(student_patch_tokens.shape[:2])}, got "
                                                      + (f"{masks.dtype} {tuple(masks.shape)}"
                                                         if isinstance(masks, Tensor) else type(masks).__name__))
        return self.forward_masked(student_patch_tokens[masks], teacher_patch_tokens[masks], masks)

    # ---- center ----

    @torch.no_grad()
    def update_center(self, teacher_patch_tokens: Tensor) -> None:
        """teacher_patch_tokens (n, K) raw (uncentred) teacher logits of this rank's masked tokens, or (b, n, K)
        as the official trainer passes them (then the mean over tokens of each leading entry, averaged over b) →
        center ← m·center + (1 − m)·allreduce_SUM(mean)/W. Synchronous; float32 sums (float64 for float64)."""
        t = teacher_patch_tokens
        _check_last_dim(OWNER, "teacher_patch_tokens", t, self.patch_out_dim, "patch_out_dim")
        if t.dim() not in (2, 3):
            raise _error(OWNER, "teacher_patch_tokens", f"must be (n, K) or (b, n, K), got shape {tuple(t.shape)}")
        if t.numel() == 0:
            raise _error(OWNER, "teacher_patch_tokens", f"has no tokens (shape {tuple(t.shape)}): the mean for the "
                                                        f"center is undefined")
        t = t.detach().to(_sum_dtype(t))
        mean = t.mean(dim=0) if t.dim() == 2 else t.mean(dim=1).mean(dim=0)
        total, world = _all_reduce_sum(mean.reshape(1, 1, -1).clone(), self.process_group)
        self.center = _ema_center(self.center, total / world, self.center_momentum)
