"""The teacher: an exponential moving average of the student's parameters (SPEC §2.4)."""
from typing import Iterable

import torch
from torch import nn

__all__ = ["ema_update", "unwrap"]


def unwrap(model: nn.Module) -> nn.Module:
    """The module inside a DistributedDataParallel (or any wrapper with `.module`), else the model itself."""
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


@torch.no_grad()
def ema_update(teacher: nn.Module, student: nn.Module, momentum: float) -> None:
    """θ_t ← m·θ_t + (1 − m)·θ_s over the parameters (not the buffers) of the two modules, paired in
    `parameters()` order, exactly as facebookresearch/dino main_dino.py: param_k.mul_(m).add_((1 - m) * param_q).
    The student may be wrapped in DistributedDataParallel."""
    t_params = list(teacher.parameters())
    s_params = list(unwrap(student).parameters())
    if len(t_params) != len(s_params):
        raise ValueError(f"ema_update: teacher has {len(t_params)} parameter tensors, student {len(s_params)}")
    m = float(momentum)
    if not 0.0 <= m <= 1.0:
        raise ValueError(f"ema_update: momentum must be in [0, 1], got {momentum!r}")
    _ema(t_params, s_params, m)


def _ema(t_params: Iterable[torch.Tensor], s_params: Iterable[torch.Tensor], m: float) -> None:
    for p_t, p_s in zip(t_params, s_params):
        if p_t.shape != p_s.shape:
            raise ValueError(f"ema_update: parameter shapes differ: teacher {tuple(p_t.shape)}, "
                             f"student {tuple(p_s.shape)}")
        p_t.mul_(m).add_((1 - m) * p_s.detach())
