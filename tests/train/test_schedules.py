"""cosine_scheduler against the per-iteration cosine schedule of SPEC §2.4, value for value."""
import math

import numpy as np
import pytest

from dinokernels.train.schedules import cosine_scheduler


def cosine_schedule_reference(base_value, final_value, epochs, niter_per_ep, warmup_epochs=0,
                              start_warmup_value=0.0):
    """float64 (epochs·niter_per_ep,), SPEC §2.4: a linear warm-up over warmup_epochs·niter_per_ep iterations from
    start_warmup_value to base_value, both ends included (np.linspace); then, over the n remaining iterations
    i = 0..n−1, final + ½(base − final)(1 + cos(π·i/n)), evaluated with numpy on the whole array (np.cos can
    differ from math.cos in the last bit, and DINO's schedule is numpy's)."""
    total = epochs * niter_per_ep
    n_warmup = warmup_epochs * niter_per_ep
    values = np.empty(total, dtype=np.float64)
    values[:n_warmup] = np.linspace(start_warmup_value, base_value, n_warmup)
    n = total - n_warmup
    i = np.arange(n)
    values[n_warmup:] = final_value + 0.5 * (base_value - final_value) * (1 + np.cos(np.pi * i / n))
    return values


@pytest.mark.parametrize("args", [
    (0.0005 * 64 * 8 / 256, 1e-6, 100, 2502, 10),  # the official lr schedule (ViT-S/16, 8 GPUs)
    (0.04, 0.4, 100, 2502, 0),  # weight decay
    (0.996, 1.0, 100, 2502, 0),  # teacher momentum
    (0.002, 1e-5, 12, 22, 2),
    (1.0, 0.0, 3, 1, 3),  # warm-up only
    (0.3, 0.1, 1, 7, 0),
])
def test_matches_reference(args):
    ours = cosine_scheduler(*args[:4], warmup_epochs=args[4])
    ref = cosine_schedule_reference(*args[:4], warmup_epochs=args[4])
    assert ours.dtype == np.float64 and ours.shape == ref.shape
    np.testing.assert_array_equal(ours, ref)


def test_formula_values():
    base, final, epochs, niter, warm = 0.01, 0.001, 5, 4, 2
    s = cosine_scheduler(base, final, epochs, niter, warmup_epochs=warm)
    w = warm * niter
    np.testing.assert_allclose(s[:w], np.linspace(0, base, w))
    assert s[w - 1] == base
    n = epochs * niter - w
    for i in range(n):
        assert math.isclose(s[w + i], final + 0.5 * (base - final) * (1 + math.cos(math.pi * i / n)), rel_tol=1e-12)
    assert math.isclose(s[w], base, rel_tol=1e-15) and s[-1] > final  # the cosine never quite reaches final (i < n)


def test_momentum_schedule_goes_to_one():
    m = cosine_scheduler(0.996, 1.0, 10, 10)
    assert m[0] == 0.996 and np.all(np.diff(m) >= 0) and 1 - m[-1] < 1e-6


def test_bad_arguments():
    with pytest.raises(ValueError, match="warmup_epochs"):
        cosine_scheduler(1, 0, 2, 3, warmup_epochs=3)
    with pytest.raises(ValueError, match="epochs"):
        cosine_scheduler(1, 0, -1, 3)
