"""Run-time switches: which implementation the ops use, and whether CUDA ops check for non-finite input.

DINOKERNELS_BACKEND = auto | kernel | reference
  auto       compiled kernels; if they are missing for the tensor's device, the pure-PyTorch reference,
             with one warning per op and reason.
  kernel     compiled kernels or KernelUnavailableError.
  reference  always the pure-PyTorch reference (the executable specification).
DINOKERNELS_CHECK_FINITE = auto | 1 | 0
  auto (default)  CPU ops raise ValueError on NaN/inf input (the check is cheap there); CUDA ops do not check, so
                  they never wait for the GPU: a non-finite input gives NaN targets and a NaN loss instead (never a
                  finite one), which the trainers stop on.
  1               ops raise on every device; on CUDA this reads one flag back from the GPU (a host sync per op).
  0               no op checks.
"""
import contextlib
import os
from typing import Optional

BACKENDS = ("auto", "kernel", "reference")


def _parse_backend(value: str, source: str) -> str:
    value = value.strip().lower()
    if value not in BACKENDS:
        raise ValueError(f"{source} must be one of {', '.join(BACKENDS)}; got {value!r}")
    return value


def _parse_flag(value: str, source: str) -> Optional[bool]:
    value = value.strip().lower()
    if value == "auto":
        return None
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"{source} must be auto, 0 or 1; got {value!r}")


_backend = _parse_backend(os.environ.get("DINOKERNELS_BACKEND", "auto"), "DINOKERNELS_BACKEND")
_check_finite = _parse_flag(os.environ.get("DINOKERNELS_CHECK_FINITE", "auto"), "DINOKERNELS_CHECK_FINITE")


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


def check_finite(device_type: str = "cpu") -> bool:
    """Whether ops on `device_type` ("cpu" or "cuda") raise on non-finite input (DINOKERNELS_CHECK_FINITE)."""
    return _check_finite if _check_finite is not None else device_type != "cuda"


def finite_check_setting() -> Optional[bool]:
    """The setting itself: True, False, or None for auto."""
    return _check_finite


def set_check_finite(enabled: Optional[bool]) -> None:
    """True: check on every device; False: nowhere; None: auto (CPU only, so CUDA ops never sync)."""
    global _check_finite
    _check_finite = None if enabled is None else bool(enabled)


@contextlib.contextmanager
def checking_finite(enabled: Optional[bool]):
    """``with checking_finite(True): ...`` — temporarily set the finiteness checks (see set_check_finite)."""
    global _check_finite
    previous = _check_finite
    set_check_finite(enabled)
    try:
        yield
    finally:
        _check_finite = previous
