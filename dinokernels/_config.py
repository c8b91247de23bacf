"""Run-time switches: which implementation the ops use, and whether CUDA ops check for non-finite input.

DINOKERNELS_BACKEND = auto | kernel | reference
  auto       compiled kernels; if they are missing for the tensor's device, the pure-PyTorch reference,
             with one warning per op and reason.
  kernel     compiled kernels or KernelUnavailableError.
  reference  always the pure-PyTorch reference (the executable specification).
DINOKERNELS_CHECK_FINITE = 1 | 0
  1 (default)  ops raise ValueError on NaN/inf input. On CUDA this reads one flag back from the GPU (a sync).
  0            no sync; a non-finite input still gives a NaN loss, never a finite one.
"""
import contextlib
import os

BACKENDS = ("auto", "kernel", "reference")


def _parse_backend(value: str, source: str) -> str:
    value = value.strip().lower()
    if value not in BACKENDS:
        raise ValueError(f"{source} must be one of {', '.join(BACKENDS)}; got {value!r}")
    return value


def _parse_flag(value: str, source: str) -> bool:
    value = value.strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"{source} must be 0 or 1; got {value!r}")


_backend = _parse_backend(os.environ.get("DINOKERNELS_BACKEND", "auto"), "DINOKERNELS_BACKEND")
_check_finite = _parse_flag(os.environ.get("DINOKERNELS_CHECK_FINITE", "1"), "DINOKERNELS_CHECK_FINITE")


def get_backend() -> str:
    return _backend


def set_backend(name: str) -> None:
    """Select 'auto', 'kernel' or 'reference' for every op (overrides DINOKERNELS_BACKEND)."""
    global _backend
    _backend = _parse_backend(name, "backend")


@contextlib.contextmanager
def use_backend(name: str):
    """``with use_backend("reference"): ...`` — temporarily select a backend."""
    global _backend
    previous = _backend
    set_backend(name)
    try:
        yield
    finally:
        _backend = previous


def check_finite() -> bool:
    return _check_finite


def set_check_finite(enabled: bool) -> None:
    global _check_finite
    _check_finite = bool(enabled)
