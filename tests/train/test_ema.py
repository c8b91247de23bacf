"""The EMA teacher update of SPEC §2.4: θ_t ← m·θ_t + (1 − m)·θ_s over the parameters, not the buffers."""
import copy

import pytest
import torch
from torch import nn

from dinokernels.train.ema import ema_update


def _pair():
    student = nn.Sequential(nn.Linear(4, 5), nn.LayerNorm(5), nn.Linear(5, 3))
    teacher = copy.deepcopy(student)
    for p in teacher.parameters():
        p.requires_grad = False
        p.data.normal_()
    return student, teacher


@pytest.mark.parametrize("m", [0.0, 0.5, 0.996, 1.0])
def test_ema_formula(m):
    student, teacher = _pair()
    # float32, each product rounded once and then the sum, the order DINO's update takes.
    expected = [m * pt.detach() + (1 - m) * ps.detach() for pt, ps in zip(teacher.parameters(), student.parameters())]
    ema_update(teacher, student, m)
    for got, exp in zip(teacher.parameters(), expected):
        assert torch.equal(got, exp)
    if m == 0.0:
        assert all(torch.equal(a, b) for a, b in zip(teacher.parameters(), student.parameters()))


def test_ema_parameters_not_buffers_and_ddp_unwrap():
    student = nn.Sequential(nn.Linear(3, 3), nn.BatchNorm1d(3))
    teacher = copy.deepcopy(student)
    student[1].running_mean.fill_(5.0)
    ema_update(teacher, student, 0.5)
    assert torch.equal(teacher[1].running_mean, torch.zeros(3))  # buffers untouched (as official)
    with pytest.raises(ValueError, match="momentum"):
        ema_update(teacher, student, 1.5)
    with pytest.raises(ValueError, match="parameter tensors"):
        ema_update(nn.Linear(3, 3), student, 0.5)
