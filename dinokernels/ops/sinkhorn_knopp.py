"""sinkhorn_knopp: DINOv2's Sinkhorn-Knopp teacher targets (SPEC §3.3) in a numerically safe log-domain form,
single-process or all-reduced across ranks. Registered op: dinokernels::sinkhorn_knopp (single process); the
distributed path calls the kernel's three stages with all-reduces between them."""
import torch
from torch import Tensor

from .. import _config, _ext
from . import _dispatch as D
from .sinkhorn_knopp_ref import (combine_prototype_stats, distributed_world, sinkhorn_knopp_plain,
                                 sinkhorn_knopp_ref)

__all__ = ["sinkhorn_knopp", "sinkhorn_knopp_ref", "sinkhorn_knopp_plain"]


def _check(op, teacher_logits, teacher_temp, n_iterations):
    D.check_tensor(op, "teacher_logits", teacher_logits, 2, "(N, K)")
    if teacher_logits.shape[1] < 1:
        raise D.arg_error(op, "teacher_logits", f"needs at least one column, got shape {tuple(teacher_logits.shape)}")
    D.check_temperature(op, "teacher_temp", teacher_temp, teacher_logits.dtype)
    if isinstance(n_iterations, bool) or not isinstance(n_iterations, int) or n_iterations < 1:
        raise D.arg_error(op, "n_iterations", f"must be an integer >= 1, got {n_iterations!r}")


@torch.library.custom_op("dinokernels::sinkhorn_knopp", mutates_args=())
def sinkhorn_knopp_op(teacher_logits: Tensor, teacher_temp: float, n_iterations: int) -> Tensor:
    """Single process: teacher_logits (N ≥ 1, K) contiguous → targets (N, K) in the accumulation dtype."""
    op = "sinkhorn_knopp"
    _check(op, teacher_logits, teacher_temp, n_iterations)
    D.check_kernel_dtype(op, "teacher_logits", teacher_logits)
    D.check_contiguous(op, "teacher_logits", teacher_logits)
    n, k = teacher_logits.shape
    if n == 0:
        raise D.arg_error(op, "teacher_logits", "has no rows: Sinkhorn-Knopp needs at least one sample")
    out = teacher_logits.new_empty((n, k), dtype=D.acc_dtype(teacher_logits.dtype))
    code = D.dtype_code(teacher_logits.dtype)
    if teacher_logits.device.type == "cpu":
        bad = _ext.kernel(op, "cpu")(teacher_logits.data_ptr(), code, n, k, float(teacher_temp), n_iterations,
                                     out.data_ptr(), D.cpu_threads())
        bad = bad if _config.check_finite() else 0
    else:
        device, stream = D.cuda_device_and_stream(teacher_logits)
        with torch.cuda.device(device):
            nbytes = _ext.module().sinkhorn_knopp_workspace_bytes_cuda(n, k)
            ws = D.workspace(nbytes, teacher_logits.device)
            flag = teacher_logits.new_zeros((), dtype=torch.int32)
            _ext.kernel(op, "cuda")(teacher_logits.data_ptr(), code, n, k, float(teacher_temp), n_iterations,
                                    out.data_ptr(), flag.data_ptr(), ws.data_ptr(), nbytes, device, stream)
        bad = int(flag.item()) if _config.check_finite("cuda") else 0  # the read-back syncs
    if bad:
        D.raise_nonfinite_inputs(op, {"teacher_logits": teacher_logits}, "gives non-finite scalings")
    return out


@sinkhorn_knopp_op.register_fake
def _(teacher_logits, teacher_temp, n_iterations):
    return teacher_logits.new_empty(teacher_logits.shape, dtype=D.acc_dtype(teacher_logits.dtype))


def _distributed(z: Tensor, teacher_temp: float, n_iterations: int, group) -> Tensor:
    """The kernel's stages with all-reduces between them (SPEC §3.3 communication: per iteration one MAX and
    one SUM of K values)."""
    op = "sinkhorn_knopp"
    n, k = z.shape
    acc = D.acc_dtype(z.dtype)
    code = D.dtype_code(z.dtype)
    device_type = z.device.type
    if device_type == "cpu":
        extra = (D.cpu_threads(),)
    else:
        device, stream = D.cuda_device_and_stream(z)
        extra = (device, stream)
    stats = _ext.kernel("sinkhorn_knopp_prototype_stats", device_type)
    sample = _ext.kernel("sinkhorn_knopp_sample_step", device_type)
    beta = z.new_zeros((n,), dtype=acc)
    local_max = z.new_empty((k,), dtype=acc)
    local_sum = z.new_empty((k,), dtype=acc)
    alpha = None
    for _ in range(n_iterations):
        stats(z.data_ptr(), code, n, k, float(teacher_temp), beta.data_ptr(), local_max.data_ptr(),
              local_sum.data_ptr(), *extra)
        alpha = combine_prototype_stats(local_max, local_sum, group).contiguous()
        sample(z.data_ptr(), code, n, k, float(teacher_temp), alpha.data_ptr(), beta.data_ptr(), *extra)
    if _config.check_finite(device_type) and not bool(torch.isfinite(alpha).all() & torch.isfinite(beta).all()):
        D.raise_nonfinite_inputs(op, {"teacher_logits": z}, "gives non-finite scalings (is the global batch empty?)")
    out = z.new_empty((n, k), dtype=acc)
    _ext.kernel("sinkhorn_knopp_output", device_type)(z.data_ptr(), code, n, k, float(teacher_temp),
                                                       alpha.data_ptr(), out.data_ptr(), *extra)
    return out


def sinkhorn_knopp(teacher_logits: Tensor, teacher_temp: float, n_iterations: int = 3,
                   process_group=None) -> Tensor:
    """DINOv2's Sinkhorn-Knopp centering of teacher logits (SPEC §3.3), numerically safe.

    teacher_logits (N, K) → targets (N, K), each row summing to 1; float32 (float64 for float64 input). Equal
    to the plain iterations (sinkhorn_knopp_plain) wherever those are finite, and finite for any finite logits
    (the plain exp(z/τ) overflows once z/τ > 88.7): the iterations run in the log domain.

    When torch.distributed is initialised (and the group has more than one rank), the per-prototype sums are
    all-reduced over `process_group` (default: the world) between iterations and the sample count is the
    global one; ranks may hold different N, including 0. Single-process use needs nothing. No gradient.
    CPU: float32/float64 kernels (16-bit input is upcast); CUDA: float32/float16/bfloat16.
    """
    op = "sinkhorn_knopp"
    _check(op, teacher_logits, teacher_temp, n_iterations)
    group = distributed_world(process_group)
    if group is None and teacher_logits.shape[0] == 0:  # across ranks one rank may hold none
        raise D.arg_error(op, "teacher_logits", "has no rows: Sinkhorn-Knopp needs at least one sample")
    if D.use_reference(op, teacher_logits.device):
        def reference(teacher_logits):
            return sinkhorn_knopp_ref(teacher_logits, teacher_temp, n_iterations, process_group)

        if not D.checks_values(teacher_logits.device):
            return reference(teacher_logits)
        # The kernels check their scalings; a non-finite scaling makes its row or column of the output so.
        inputs = {"teacher_logits": teacher_logits}
        out = D.run_reference(reference, inputs, lambda r: not bool(torch.isfinite(r).all()))
        if not bool(torch.isfinite(out).all()):
            D.raise_nonfinite_inputs(op, inputs, "gives non-finite scalings" + (
                "" if group is None else " (is the global batch empty?)"))
        return out
    z = teacher_logits.detach()
    if z.device.type == "cpu" and z.dtype in D.HALF_DTYPES:
        z = z.float()
    D.check_kernel_dtype(op, "teacher_logits", z)
    z = z.contiguous()
    if group is None:
        return sinkhorn_knopp_op(z, float(teacher_temp), int(n_iterations))
    return _distributed(z, float(teacher_temp), int(n_iterations), group)
