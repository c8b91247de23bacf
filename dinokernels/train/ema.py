"""The teacher: an exponential moving average of the student's parameters (SPEC §2.4)."""
import torch
from torch import nn

__all__ = ["ema_update", "unwrap", "local_shards"]


def unwrap(model: nn.Module) -> nn.Module:
    """The module inside a DistributedDataParallel (or any wrapper with `.module`), else the model itself."""
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


@torch.no_grad()
def ema_update(teacher: nn.Module, student: nn.Module, momentum: float) -> None:
    """θ_t ← m·θ_t + (1 − m)·θ_s, in place, for each teacher parameter θ_t and the student parameter θ_s at the
    same position in `parameters()` order (SPEC §2.4: parameters only, buffers keep their own values). The student
    may be wrapped in DistributedDataParallel; under FSDP both are sharded and each rank updates its shards."""
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
    teacher_locals, student_locals = local_shards(teacher_params, student_params, "ema_update")
    student_share = 1.0 - m
    for teacher_param, student_param in zip(teacher_locals, student_locals):
        # Scale the teacher first, then add the already-weighted student: one rounding per product, as DINO.
        teacher_param.mul_(m).add_(student_param.detach() * student_share)


def local_shards(teacher_params, student_params, what: str):
    """The tensors an EMA updates in place: the parameters themselves, or under FSDP this rank's shards of them
    (teacher and student sharded alike, so the EMA of the shards is the shard of the EMA, with no communication).
    A teacher sharded differently from its student is an error."""
    from .distributed import is_sharded, local_part

    teacher_locals, student_locals = [], []
    for i, (t, s) in enumerate(zip(teacher_params, student_params)):
        if is_sharded(t) != is_sharded(s) or (is_sharded(t) and (t.placements != s.placements or
                                                                 local_part(t).shape != local_part(s).shape)):
            raise ValueError(f"{what}: teacher and student parameter {i} are not sharded alike (shard both with "
                             f"the same FSDP layout, or neither)")
        teacher_locals.append(local_part(t))
        student_locals.append(local_part(s))
    return teacher_locals, student_locals
