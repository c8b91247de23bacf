"""DINO's CLS-token loss as an nn.Module (SPEC §2.1, §2.4, §3.2, §3.3), backed by the fused kernels.

Mirrors facebookresearch/dino main_dino.py DINOLoss (constructor order, `center` buffer, per-epoch
`teacher_temp_schedule`, center updated after the loss) and adds DINOv2's pieces (dinov2/loss/dino_clstoken_loss.py):
`softmax_center_teacher`, `sinkhorn_knopp_teacher`, a public `update_center` and a per-call teacher temperature.

Differences from the official code, all deliberate:
* The loss, the teacher softmax and the teacher-logit sum for the center are one fused kernel
  (dinokernels.ops.dino_loss_centered); no (B, K) target or log-softmax is materialised per (teacher, student) pair.
* The center update is synchronous (DINOv2's is asynchronous: applied at the next softmax_center_teacher). The math
  is the same: after update_center(z) and before the next targets, c ← m·c + (1 − m)·Σ_{ranks, rows} z / (rows·W).
* The batch sum is taken in float32 (float64 for float64 logits); the official code sums in the logits' dtype,
  which overflows in float16 for large batches.
* The all-reduce runs only when torch.distributed is initialised (v1 calls dist.all_reduce unconditionally and so
  needs an initialised process group even on one GPU).
* The center buffer keeps its dtype (float32 unless the module is converted) instead of being promoted.
"""
import math
import operator
from typing import Optional, Tuple

import torch
from torch import Tensor, nn

from ..ops import dino_loss, dino_loss_centered, sinkhorn_knopp, softmax_center
from ..ops._dispatch import arg_error

__all__ = ["DINOLoss", "teacher_temp_schedule"]

CENTERINGS = ("centering", "sinkhorn_knopp")


# ---- helpers shared with ibot_patch_loss.py ----

_error = arg_error  # the ops' message format: dinokernels.<owner>: argument '<arg>' <what>


def _check_positive(owner: str, arg: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise _error(owner, arg, f"must be a positive finite number, got {value!r}")
    return float(value)


def _check_momentum(owner: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
        raise _error(owner, "center_momentum", f"must be a number in [0, 1], got {value!r}")
    return float(value)


def _check_int(owner: str, arg: str, value, minimum: int) -> int:
    if isinstance(value, bool):
        raise _error(owner, arg, f"must be an integer ≥ {minimum}, got {value!r}", TypeError)
    try:
        value = operator.index(value)
    except TypeError:
        raise _error(owner, arg, f"must be an integer ≥ {minimum}, got {value!r}", TypeError) from None
    if value < minimum:
        raise _error(owner, arg, f"must be an integer ≥ {minimum}, got {value}")
    return value


def _check_logits(owner: str, arg: str, t, ndim: int, shape_doc: str):
    if not isinstance(t, Tensor):
        raise _error(owner, arg, f"must be a torch.Tensor {shape_doc}, got {type(t).__name__}", TypeError)
    if t.dim() != ndim:
        raise _error(owner, arg, f"must be {ndim}-D {shape_doc}, got shape {tuple(t.shape)}")
    if not t.is_floating_point():
        raise _error(owner, arg, f"must have a floating-point dtype, got {t.dtype}", TypeError)


def _check_last_dim(owner: str, arg: str, t, k: int, k_name: str):
    """t is a floating-point tensor (…, K) with K == k."""
    if not isinstance(t, Tensor):
        raise _error(owner, arg, f"must be a torch.Tensor (…, K), got {type(t).__name__}", TypeError)
    if not t.is_floating_point():
        raise _error(owner, arg, f"must have a floating-point dtype, got {t.dtype}", TypeError)
    if t.dim() < 1 or t.shape[-1] != k:
        raise _error(owner, arg, f"must have last dimension {k_name} = {k}, got shape {tuple(t.shape)}")


def _distributed_world(process_group) -> Tuple[Optional[object], int]:
    """(group to all-reduce over or None, world size W); (None, 1) unless torch.distributed is initialised."""
    dist = torch.distributed
    if not (dist.is_available() and dist.is_initialized()):
        return None, 1
    world = dist.get_world_size(process_group) if process_group is not None else dist.get_world_size()
    return (process_group if process_group is not None else dist.group.WORLD), world


def _all_reduce_sum(t: Tensor, process_group) -> Tuple[Tensor, int]:
    """All-reduce SUM of t over process_group (default: WORLD) when distributed; returns (t, W)."""
    group, world = _distributed_world(process_group)
    if group is not None and world > 1:
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.SUM, group=group)
    return t, world


def _ema_center(center: Tensor, batch_center: Tensor, momentum: float) -> Tensor:
    """c·m + b·(1 − m) in c's dtype, as a new tensor (never in place: a loss that is still to be differentiated
    may hold the old center)."""
    batch_center = batch_center.to(device=center.device, dtype=center.dtype).reshape(center.shape)
    return center * momentum + batch_center * (1 - momentum)


def _sum_dtype(t: Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


# ---- schedule ----

def teacher_temp_schedule(warmup_teacher_temp: float, teacher_temp: float, warmup_teacher_temp_epochs: int,
                          nepochs: int) -> Tensor:
    """DINO v1's per-epoch teacher temperature τ_t (SPEC §2.4), float64 (nepochs,), bit for bit the official values:
    over the first warmup_teacher_temp_epochs epochs a straight line from warmup_teacher_temp to teacher_temp,
    both ends included (numpy's linspace: value i is warmup + i·step with step = (teacher − warmup)/(n − 1), the
    last one exactly teacher_temp), then teacher_temp for every remaining epoch."""
    n = _check_int("teacher_temp_schedule", "warmup_teacher_temp_epochs", warmup_teacher_temp_epochs, 0)
    nepochs = _check_int("teacher_temp_schedule", "nepochs", nepochs, n)
    start, stop = float(warmup_teacher_temp), float(teacher_temp)
    if n == 1:
        warm = torch.tensor([start], dtype=torch.float64)
    else:
        warm = torch.arange(n, dtype=torch.float64) * ((stop - start) / max(n - 1, 1)) + start
        if n > 1:
            warm[-1] = stop
    rest = torch.ones(nepochs - n, dtype=torch.float64) * stop
    return torch.cat((warm, rest))


# ---- module ----

class DINOLoss(nn.Module):
    """DINO cross-view CLS loss with teacher centering (v1, DINOv2 "centering") or Sinkhorn-Knopp targets
    (DINOv2 "sinkhorn_knopp").

    Args (official DINO v1 order, then DINOv2 extras):
        out_dim: K, prototypes (head output width).
        ncrops: V, crops per image the student sees (global + local), V ≥ max(n_global_crops, 2).
        warmup_teacher_temp, teacher_temp, warmup_teacher_temp_epochs, nepochs: the per-epoch τ_t schedule
            (`teacher_temp_schedule`, float64 (nepochs,)), as main_dino.py builds it.
        student_temp: τ_s. center_momentum: m of the center EMA.
        centering: "centering" (softmax((z_t − c)/τ_t), center updated after the loss) or "sinkhorn_knopp"
            (targets by `sinkhorn_knopp` over all ranks; the center is neither used nor updated).
        n_global_crops: teacher crops (2); the student's first n_global_crops crops are the same views.
        sinkhorn_iterations: Sinkhorn-Knopp iterations (3).
        process_group: group for the center all-reduce and Sinkhorn-Knopp (None: the default group). Nothing is
            reduced unless torch.distributed is initialised.

    Buffer: center (1, K), float32, zeros. Loss: (1/n_terms) Σ_{t} Σ_{v≠t} mean_b −⟨p_t,b, log_softmax(z_v,b/τ_s)⟩
    over teacher crops t < n_global_crops and student crops v < ncrops, n_terms = n_global·ncrops − n_global.
    """

    def __init__(self, out_dim: int, ncrops: int, warmup_teacher_temp: float = 0.04, teacher_temp: float = 0.04,
                 warmup_teacher_temp_epochs: int = 0, nepochs: int = 100, student_temp: float = 0.1,
                 center_momentum: float = 0.9, centering: str = "centering", n_global_crops: int = 2,
                 sinkhorn_iterations: int = 3, process_group=None):
        super().__init__()
        owner = "DINOLoss"
        self.out_dim = _check_int(owner, "out_dim", out_dim, 1)
        self.n_global_crops = _check_int(owner, "n_global_crops", n_global_crops, 1)
        self.ncrops = _check_int(owner, "ncrops", ncrops, 1)
        if self.ncrops < self.n_global_crops:
            raise _error(owner, "ncrops", f"({self.ncrops}) must be at least n_global_crops ({self.n_global_crops}): "
                                          f"the global crops are among the student's crops")
        if self.ncrops < 2:
            raise _error(owner, "ncrops", "must be at least 2: with one crop every (teacher, student) pair is the "
                                          "same view and there is no loss term")
        if centering not in CENTERINGS:
            raise _error(owner, "centering", f"must be one of {', '.join(CENTERINGS)}, got {centering!r}")
        self.centering = centering
        self.warmup_teacher_temp = _check_positive(owner, "warmup_teacher_temp", warmup_teacher_temp)
        self.teacher_temp = _check_positive(owner, "teacher_temp", teacher_temp)
        self.warmup_teacher_temp_epochs = _check_int(owner, "warmup_teacher_temp_epochs",
                                                     warmup_teacher_temp_epochs, 0)
        self.nepochs = _check_int(owner, "nepochs", nepochs, 1)
        if self.warmup_teacher_temp_epochs > self.nepochs:
            raise _error(owner, "warmup_teacher_temp_epochs", f"({self.warmup_teacher_temp_epochs}) must not exceed "
                                                              f"nepochs ({self.nepochs})")
        self.student_temp = _check_positive(owner, "student_temp", student_temp)
        self.center_momentum = _check_momentum(owner, center_momentum)
        self.sinkhorn_iterations = _check_int(owner, "sinkhorn_iterations", sinkhorn_iterations, 1)
        self.process_group = process_group
        self.register_buffer("center", torch.zeros(1, self.out_dim))
        # Not in the state dict, as in the official code. Kept as Python floats so that looking up an epoch is
        # no tensor read (no graph break under torch.compile).
        self.teacher_temp_schedule = teacher_temp_schedule(self.warmup_teacher_temp, self.teacher_temp,
                                                           self.warmup_teacher_temp_epochs, self.nepochs)

    @property
    def teacher_temp_schedule(self) -> Tensor:
        """τ_t per epoch, float64 (nepochs,): the linear warm-up then the constant τ_t (see teacher_temp_schedule).
        Assignable (any 1-D sequence of positive temperatures)."""
        return torch.tensor(self._teacher_temps, dtype=torch.float64)

    @teacher_temp_schedule.setter
    def teacher_temp_schedule(self, values) -> None:
        temps = torch.as_tensor(values, dtype=torch.float64)
        if temps.dim() != 1 or temps.numel() == 0 or not bool((temps > 0).all()) or not bool(temps.isfinite().all()):
            raise _error("DINOLoss", "teacher_temp_schedule", f"must be a non-empty 1-D sequence of positive "
                                                              f"temperatures, got {values!r}")
        self._teacher_temps = temps.tolist()

    def extra_repr(self) -> str:
        return (f"out_dim={self.out_dim}, ncrops={self.ncrops}, n_global_crops={self.n_global_crops}, "
                f"centering={self.centering!r}, student_temp={self.student_temp}, "
                f"center_momentum={self.center_momentum}, teacher_temp={self.warmup_teacher_temp}→"
                f"{self.teacher_temp} over {self.warmup_teacher_temp_epochs} of {self.nepochs} epochs")

    # ---- checks ----

    def _check_teacher(self, teacher_output, arg="teacher_output", n_global=None) -> int:
        owner = "DINOLoss"
        _check_logits(owner, arg, teacher_output, 2, "(n_global_crops·B, K)" if n_global else "(N, K)")
        if teacher_output.shape[1] != self.out_dim:
            raise _error(owner, arg, f"has {teacher_output.shape[1]} columns, expected out_dim = {self.out_dim}: "
                                     f"got shape {tuple(teacher_output.shape)}")
        rows = teacher_output.shape[0]
        if n_global is not None and (rows == 0 or rows % n_global):
            raise _error(owner, arg, f"has {rows} rows, which is not a positive multiple of n_global_crops = "
                                     f"{n_global} (rows are crop-major: [crop0 × B, crop1 × B])")
        return rows

    def _temperature(self, epoch, teacher_temp) -> float:
        if teacher_temp is not None:
            return _check_positive("DINOLoss", "teacher_temp", teacher_temp)
        epoch = _check_int("DINOLoss", "epoch", epoch, 0)
        n = len(self._teacher_temps)
        if epoch >= n:
            raise _error("DINOLoss", "epoch", f"= {epoch} is outside the teacher temperature schedule, which covers "
                                              f"epochs 0..{n - 1}; pass teacher_temp= to override the schedule")
        return self._teacher_temps[epoch]

    # ---- forward ----

    def forward(self, student_output: Tensor, teacher_output: Tensor, epoch: int = 0,
                teacher_temp: Optional[float] = None) -> Tensor:
        """student_output (ncrops·B, K) student logits, crop-major rows [crop0 × B, crop1 × B, …];
        teacher_output (n_global_crops·B, K) raw teacher logits of the global crops, crop-major; epoch indexes
        `teacher_temp_schedule`; teacher_temp, if given, is used instead (DINOv2's per-iteration schedule) and
        epoch is ignored → scalar loss (float32; float64 for float64 input), differentiable w.r.t.
        student_output only.

        "centering": targets softmax((z_t − c)/τ_t) with the current center, then the center is updated with this
        batch (all-reduced over ranks). "sinkhorn_knopp": targets from Sinkhorn-Knopp over all ranks' rows."""
        owner = "DINOLoss"
        _check_logits(owner, "student_output", student_output, 2, "(ncrops·B, K)")
        if student_output.shape[1] != self.out_dim:
            raise _error(owner, "student_output", f"has {student_output.shape[1]} columns, expected out_dim = "
                                                  f"{self.out_dim}: got shape {tuple(student_output.shape)}")
        s_rows = student_output.shape[0]
        if s_rows == 0 or s_rows % self.ncrops:
            raise _error(owner, "student_output", f"has {s_rows} rows, which is not a positive multiple of ncrops = "
                                                  f"{self.ncrops} (rows are crop-major: [crop0 × B, crop1 × B, …])")
        t_rows = self._check_teacher(teacher_output, n_global=self.n_global_crops)
        batch = s_rows // self.ncrops
        if t_rows // self.n_global_crops != batch:
            raise _error(owner, "teacher_output", f"holds {t_rows // self.n_global_crops} images per crop "
                                                  f"({t_rows} rows / {self.n_global_crops} global crops) but "
                                                  f"student_output holds {batch} ({s_rows} rows / {self.ncrops} "
                                                  f"crops)")
        temp = self._temperature(epoch, teacher_temp)
        k = self.out_dim
        student = student_output.reshape(self.ncrops, batch, k)
        teacher = teacher_output.detach()
        if self.centering == "sinkhorn_knopp":
            targets = sinkhorn_knopp(teacher, temp, self.sinkhorn_iterations, self.process_group)
            return dino_loss(student, targets.reshape(self.n_global_crops, batch, k), self.student_temp)
        loss, logits_sum = dino_loss_centered(student, teacher.reshape(self.n_global_crops, batch, k),
                                              self.center, temp, self.student_temp, return_sum=True)
        self._update_center_from_sum(logits_sum, t_rows)
        return loss

    # ---- teacher targets and center (DINOv2 API) ----

    @torch.no_grad()
    def softmax_center_teacher(self, teacher_output: Tensor, teacher_temp: float) -> Tensor:
        """teacher_output (…, K) raw logits → softmax((z − center)/teacher_temp), same shape, float32 (float64 for
        float64 input). Does not update the center (call update_center)."""
        _check_last_dim("DINOLoss", "teacher_output", teacher_output, self.out_dim, "out_dim")
        temp = _check_positive("DINOLoss", "teacher_temp", teacher_temp)
        probs = softmax_center(teacher_output.reshape(-1, self.out_dim), self.center, temp)
        return probs.reshape(teacher_output.shape)

    @torch.no_grad()
    def sinkhorn_knopp_teacher(self, teacher_output: Tensor, teacher_temp: float,
                               n_iterations: Optional[int] = None) -> Tensor:
        """teacher_output (N, K) raw logits of this rank (ranks may hold different N) → (N, K) Sinkhorn-Knopp
        targets over all ranks of process_group, rows summing to 1, float32 (float64 for float64 input).
        n_iterations defaults to sinkhorn_iterations."""
        self._check_teacher(teacher_output)
        temp = _check_positive("DINOLoss", "teacher_temp", teacher_temp)
        iters = self.sinkhorn_iterations if n_iterations is None else _check_int("DINOLoss", "n_iterations",
                                                                                 n_iterations, 1)
        return sinkhorn_knopp(teacher_output.detach(), temp, iters, self.process_group)

    @torch.no_grad()
    def update_center(self, teacher_output: Tensor) -> None:
        """teacher_output (N, K) raw (uncentred) teacher logits of this rank →
        center ← m·center + (1 − m)·allreduce_SUM(Σ_n z_n)/(N·W), W the world size of process_group (1 when not
        distributed). Synchronous; sums in float32 (float64 for float64 input)."""
        rows = self._check_teacher(teacher_output)
        if rows == 0:
            raise _error("DINOLoss", "teacher_output", "has no rows: the batch mean for the center is undefined")
        self._update_center_from_sum(teacher_output.detach().to(_sum_dtype(teacher_output)).sum(dim=0), rows)

    @torch.no_grad()
    def _update_center_from_sum(self, logits_sum: Tensor, rows: int) -> None:
        batch_sum = logits_sum.detach().reshape(1, -1).clone()
        batch_sum, world = _all_reduce_sum(batch_sum, self.process_group)
        self.center = _ema_center(self.center, batch_sum / (rows * world), self.center_momentum)
