"""Per-iteration schedules of DINO v1 (SPEC §2.4): learning rate, weight decay and teacher momentum."""
import numpy as np

__all__ = ["cosine_scheduler"]


def _count(name: str, value) -> int:
    """A non-negative whole number given as an int (or an integral float), else a ValueError naming `name`."""
    if isinstance(value, bool) or int(value) != value or value < 0:
        raise ValueError(f"cosine_scheduler: {name} must be a non-negative integer, got {value!r}")
    return int(value)


def cosine_scheduler(base_value: float, final_value: float, epochs: int, niter_per_ep: int, warmup_epochs: int = 0,
                     start_warmup_value: float = 0.0) -> np.ndarray:
    """One value per training iteration, float64 (epochs·niter_per_ep,) (SPEC §2.4).

    The first warmup_epochs·niter_per_ep values climb linearly from start_warmup_value to base_value, both ends
    included. Over the n iterations left, value_i = final + ½(base − final)(1 + cos(π·i/n)) for i = 0..n−1: it
    starts at base and stops one step short of final. DINO's schedule is evaluated with numpy over the whole array
    and so is this one, in the same order of operations, so the values agree to the last bit (a per-element
    math.cos can differ from np.cos there).
    """
    epochs = _count("epochs", epochs)
    niter_per_ep = _count("niter_per_ep", niter_per_ep)
    warmup_epochs = _count("warmup_epochs", warmup_epochs)
    if warmup_epochs > epochs:
        raise ValueError(f"cosine_scheduler: warmup_epochs ({warmup_epochs}) must not exceed epochs ({epochs})")
    n_total = epochs * niter_per_ep
    n_warmup = warmup_epochs * niter_per_ep
    n_cosine = n_total - n_warmup

    values = np.empty(n_total, dtype=np.float64)
    values[:n_warmup] = np.linspace(start_warmup_value, base_value, n_warmup)
    if n_cosine:
        # The phase is (π·i)/n, multiplied before dividing; the half range ½(base − final) is formed first.
        phase = np.pi * np.arange(n_cosine, dtype=np.float64) / n_cosine
        half_range = 0.5 * (base_value - final_value)
        values[n_warmup:] = final_value + half_range * (1.0 + np.cos(phase))
    return values
