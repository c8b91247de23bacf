"""What every op shares: argument checks with uniform messages, backend choice, and the plumbing that turns
tensors into the raw pointers, dtype codes, thread counts and streams the compiled entry points take."""
import math
import warnings

import torch

from .. import _config, _ext

CPU_DTYPES = (torch.float32, torch.float64)
CUDA_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
HALF_DTYPES = (torch.float16, torch.bfloat16)


class FallbackWarning(UserWarning):
    """An op ran its pure-PyTorch reference because the compiled kernel is unavailable."""


def arg_error(op: str, arg: str, what: str, kind=ValueError):
    """The message format shared with the C++ checks: dinokernels.<op>: argument '<arg>' <what>."""
    return kind(f"dinokernels.{op}: argument '{arg}' {what}")


def check_tensor(op: str, arg: str, t, ndim: int, shape_doc: str):
    if not isinstance(t, torch.Tensor):
        raise arg_error(op, arg, f"must be a torch.Tensor, got {type(t).__name__}", TypeError)
    if t.dim() != ndim:
        raise arg_error(op, arg, f"must be {ndim}-D {shape_doc}, got shape {tuple(t.shape)}")
    if t.device.type not in ("cpu", "cuda"):
        raise arg_error(op, arg, f"must be on a CPU or CUDA device, got {t.device}")
    if not t.is_floating_point():
        raise arg_error(op, arg, f"must have a floating-point dtype, got {t.dtype}", TypeError)


def check_kernel_dtype(op: str, arg: str, t: torch.Tensor):
    allowed = CPU_DTYPES if t.device.type == "cpu" else CUDA_DTYPES
    if t.dtype not in allowed:
        names = ", ".join(str(d).replace("torch.", "") for d in allowed)
        raise arg_error(op, arg, f"has dtype {str(t.dtype).replace('torch.', '')}, the {t.device.type} kernel "
                                 f"takes {names}", TypeError)


def check_contiguous(op: str, arg: str, t: torch.Tensor):
    if not t.is_contiguous():
        raise arg_error(op, arg, "must be contiguous (the public dinokernels.ops functions make it so)")


def check_positive_float(op: str, arg: str, value):
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise arg_error(op, arg, f"must be a positive finite number, got {value!r}")


def check_temperature(op: str, arg: str, value, dtype: torch.dtype, numerator: int = 1):
    """A positive finite temperature whose factor numerator/τ is finite in the arithmetic of `dtype`'s kernels
    (float32 for every dtype but float64): the kernels' domain, checked before dispatch so that every backend
    refuses the same temperatures (the C++ checks it again)."""
    check_positive_float(op, arg, value)
    compute = torch.float64 if dtype == torch.float64 else torch.float32
    if math.isinf(torch.tensor(numerator / value, dtype=compute).item()):
        raise arg_error(op, arg, f"is too small for {str(compute)[6:]} ({numerator}/{arg} overflows), got {value!r}")


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation dtype of the kernels: float64 for float64 input, float32 otherwise."""
    return torch.float64 if dtype == torch.float64 else torch.float32


_warned = set()

# Evaluated once while torch.compile traces, then treated as a constant: the probe is a call into _C.
_assume_constant = getattr(getattr(torch, "compiler", None), "assume_constant_result", lambda fn: fn)


@_assume_constant
def _gpu_unusable_reason(device_index: int) -> str:
    return _ext.gpu_unusable_reason(device_index)


def use_reference(op: str, device: torch.device) -> bool:
    """True when `op` must run its reference: backend 'reference', or 'auto' with no kernel for the device."""
    backend = _config.get_backend()
    if backend == "reference":
        return True
    try:
        _ext.kernel(op, device.type)
        if device.type == "cuda":
            index = device.index if device.index is not None else torch.cuda.current_device()
            reason = _gpu_unusable_reason(index)
            if reason:
                raise _ext.KernelUnavailableError(f"dinokernels.{op}: the CUDA kernels cannot run on "
                                                  f"cuda:{index}: {reason}")
        return False
    except _ext.KernelUnavailableError as exc:
        if backend == "kernel":
            raise
        key = (op, device.type)
        if key not in _warned:
            _warned.add(key)
            warnings.warn(f"{exc}; using the pure-PyTorch reference instead (set DINOKERNELS_BACKEND=kernel to "
                          f"make this an error)", FallbackWarning, stacklevel=3)
        return True


def dtype_code(dtype: torch.dtype) -> int:
    return _ext.module().dtype_codes[str(dtype).replace("torch.", "")]


def cpu_threads() -> int:
    """Kernels use as many threads as torch does, so torch.set_num_threads governs both."""
    return torch.get_num_threads()


def cuda_device_and_stream(t: torch.Tensor):
    index = t.device.index if t.device.index is not None else torch.cuda.current_device()
    return index, torch.cuda.current_stream(index).cuda_stream


def workspace(nbytes: int, device: torch.device) -> torch.Tensor:
    """Scratch for a kernel, from torch's allocator (so it shows in memory statistics); 64-byte aligned on CPU,
    512 on CUDA."""
    return torch.empty(max(int(nbytes), 1), dtype=torch.uint8, device=device)


def raise_if_nonfinite(op: str, arg: str, count: int):
    if count:
        raise arg_error(op, arg, f"contains {count} non-finite value(s) (NaN or inf)")


def nonfinite_count(t) -> int:
    """How many NaN/inf entries `t` holds (0 for None and non-float tensors)."""
    if not isinstance(t, torch.Tensor) or not t.is_floating_point() or not t.numel():
        return 0
    return int((~torch.isfinite(t.detach())).sum())


def checks_values(device: torch.device) -> bool:
    """Whether a reference path checks values now (level tables read back, finiteness): DINOKERNELS_CHECK_FINITE
    for the device, the same policy as the kernels' in-pass checks, and never while torch.compile traces (the
    checks read data back, which a full graph cannot; the kernels check inside their opaque custom ops)."""
    return _config.check_finite(device.type) and not torch.compiler.is_compiling()


def check_finite_inputs(op: str, tensors: dict):
    """The reference backend's stand-in for a kernel's in-pass NaN/inf check, run before the reference: the same
    error as the kernel's (raise_nonfinite_inputs without the overflow case). `tensors`: public name → tensor,
    in the order the kernel names them; None entries are skipped."""
    for name, t in tensors.items():
        raise_if_nonfinite(op, name, nonfinite_count(t))


def widened(tensors: dict):
    """For a reference whose result came out non-finite: `tensors` (name → tensor) with the float ones in float64
    when all are finite and one is narrower (the overflow was the compute dtype's, which the kernels avoid), so the
    reference can rerun exactly; else None (the data itself is non-finite, or already float64)."""
    floats = [t for t in tensors.values() if isinstance(t, torch.Tensor) and t.is_floating_point()]
    if all(t.dtype == torch.float64 for t in floats) or any(nonfinite_count(t) for t in floats):
        return None
    return {k: (t.double() if isinstance(t, torch.Tensor) and t.is_floating_point() else t)
            for k, t in tensors.items()}


def _cast_like(result, like):
    if isinstance(result, torch.Tensor):
        return result.to(like.dtype)
    return type(like)(_cast_like(r, l) for r, l in zip(result, like))


def run_reference(reference, inputs: dict, failed):
    """reference(**inputs); when failed(result) (a non-finite result the kernels would report) and every input is
    finite, the reference again in float64, cast back to the first result's dtypes: the reference's float32
    arithmetic overflows on extreme but finite input where the kernels' does not. The caller checks the result."""
    result = reference(**inputs)
    if failed(result):
        wide = widened(inputs)
        if wide is not None:
            result = _cast_like(reference(**wide), result)
    return result


def raise_nonfinite_inputs(op: str, tensors: dict, fallback: str):
    """A kernel reported a non-finite result: name the first input holding NaN/inf, or, when all inputs are
    finite (overflow), raise `fallback` against the first argument. Only runs on the error path."""
    check_finite_inputs(op, tensors)
    raise arg_error(op, next(iter(tensors)), fallback)
