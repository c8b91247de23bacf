"""Per-iteration schedules of DINO v1 (SPEC §2.4): learning rate, weight decay and teacher momentum."""
import numpy as np

__all__ = ["cosine_scheduler"]


def cosine_scheduler(base_value: float, final_value: float, epochs: int, niter_per_ep: int, warmup_epochs: int = 0,
                     start_warmup_value: float = 0.0) -> np.ndarray:
    """facebookresearch/dino utils.cosine_scheduler, value for value: float64 (epochs·niter_per_ep,).

    A linear warm-up np.linspace(start_warmup_value, base_value, warmup_epochs·niter_per_ep) (its last value is
    base_value), then final + ½(base − final)(1 + cos(π·i/n)) for i in 0..n−1 over the n remaining iterations.
    """
    for name, value in (("epochs", epochs), ("niter_per_ep", niter_per_ep), ("warmup_epochs", warmup_epochs)):
        if isinstance(value, bool) or int(value) != value or value < 0:
            raise ValueError(f"cosine_scheduler: {name} must be a non-negative integer, got {value!r}")
    epochs, niter_per_ep, warmup_epochs = int(epochs), int(niter_per_ep), int(warmup_epochs)
    if warmup_epochs > epochs:
        raise ValueError(f"cosine_scheduler: warmup_epochs ({warmup_epochs}) must not exceed epochs ({epochs})")
    warmup_schedule = np.array([])
    warmup_iters = warmup_epochs * niter_per_ep
    if warmup_epochs > 0:
        warmup_schedule = np.linspace(start_warmup_value, base_value, warmup_iters)
    iters = np.arange(epochs * niter_per_ep - warmup_iters)
    # The official code evaluates this expression with numpy on the whole array; so does this (math.cos per element
    # can differ from np.cos in the last bit).
    schedule = final_value + 0.5 * (base_value - final_value) * (1 + np.cos(np.pi * iters / max(len(iters), 1)))
    schedule = np.concatenate((warmup_schedule, schedule))
    assert len(schedule) == epochs * niter_per_ep
    return schedule

