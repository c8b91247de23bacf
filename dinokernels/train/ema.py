"""The teacher: an exponential moving average of the student's parameters (SPEC §2.4)."""
import torch
from torch import nn

__all__ = ["ema_update", "unwrap"]


def unwrap(model: nn.Module) -> nn.Module:
    """The module inside a DistributedDataParallel (or any wrapper with `.module`), else the model itself."""
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


@torch.no_grad()
def ema_update(teacher: nn.Module, student: nn.Module, momentum: float) -> None:
    """θ_t ← m·θ_t + (1 − m)·θ_s, in place, for each teacher parameter θ_t and the student parameter θ_s at the
    same position in `parameters()` order (SPEC §2.4: parameters only, buffers keep their own values). The student
    may be wrapped in DistributedDataParallel."""
    teacher_params = list(teacher.parameters())
    student_params = list(unwrap(student).parameters())
    if len(teacher_params) != len(student_params):
        raise ValueError(f"ema_update: teacher has {len(teacher_params)} parameter tensors, "
                         f"student {len(student_params)}")
    m = float(momentum)
    if not 0.0 <= m <= 1.0:
        raise ValueError(f"ema_update: momentum must be in [0, 1], got {momentum!r}")
    for teacher_param, student_param in zip(teacher_params, student_params):
        if teacher_param.shape != student_param.shape:
            raise ValueError(f"ema_update: parameter shapes differ: teacher {tuple(teacher_param.shape)}, "
                             f"student {tuple(student_param.shape)}")
    student_share = 1.0 - m
    for teacher_param, student_param in zip(teacher_params, student_params):
        # Scale the teacher first, then add the already-weighted student: one rounding per product, as DINO.
        teacher_param.mul_(m).add_(student_param.detach() * student_share)
