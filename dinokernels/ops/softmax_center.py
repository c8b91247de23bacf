"""softmax_center: DINO's teacher targets softmax((z − c)/τ_t) fused in one pass, with the raw-logit column sum
for the center update. Registered op: dinokernels::softmax_center."""
from typing import Tuple, Union

import torch
from torch import Tensor

from .. import _config, _ext
from . import _dispatch as D
from .softmax_center_ref import softmax_center_ref

__all__ = ["softmax_center", "softmax_center_ref"]


def check_center(op: str, center, k: int, like: Tensor):
    if not isinstance(center, torch.Tensor):
        raise D.arg_error(op, "center", f"must be a torch.Tensor, got {type(center).__name__}", TypeError)
    if center.numel() != k or (center.dim() > 0 and center.shape[-1] != k):
        raise D.arg_error(op, "center", f"must hold K={k} values (shape (K,), (1, K) or (1, 1, K)), got shape "
                                        f"{tuple(center.shape)}")
    if center.device != like.device:
        raise D.arg_error(op, "center", f"must be on {like.device}, got {center.device}")
    if not center.is_floating_point():
        raise D.arg_error(op, "center", f"must have a floating-point dtype, got {center.dtype}", TypeError)


def nonfinite_rows(result, return_sum: bool) -> int:
    """The reference backend's form of the kernel's finiteness check, on softmax_center's result (probs (N, K), or
    (probs, column_sum (K,)) with return_sum): how many rows of probs are not finite (NaN, +inf, a row of −inf), or
    1 when only the column sum is (a −inf logit, when the center update is asked for)."""
    probs, column_sum = result if return_sum else (result, None)
    bad = int((~torch.isfinite(probs)).any(dim=-1).sum()) if probs.numel() else 0
    if column_sum is not None and not bool(torch.isfinite(column_sum).all()):
        bad = bad or 1
    return bad


def _check(op, teacher_logits, center, teacher_temp):
    D.check_tensor(op, "teacher_logits", teacher_logits, 2, "(N, K)")
    if teacher_logits.shape[1] < 1:
        raise D.arg_error(op, "teacher_logits", f"needs at least one column, got shape {tuple(teacher_logits.shape)}")
    check_center(op, center, teacher_logits.shape[1], teacher_logits)
    D.check_temperature(op, "teacher_temp", teacher_temp, teacher_logits.dtype, 2)


@torch.library.custom_op("dinokernels::softmax_center", mutates_args=())
def softmax_center_op(teacher_logits: Tensor, center: Tensor, teacher_temp: float,
                      return_sum: bool) -> Tuple[Tensor, Tensor]:
    """teacher_logits (N, K) contiguous, center (K,) contiguous (the kernel's dtype: z's on CPU, float32 on
    CUDA) → (probs (N, K), column sum (K,) or (0,) without return_sum) in the accumulation dtype."""
    op = "softmax_center"
    _check(op, teacher_logits, center, teacher_temp)
    D.check_kernel_dtype(op, "teacher_logits", teacher_logits)
    D.check_contiguous(op, "teacher_logits", teacher_logits)
    D.check_contiguous(op, "center", center)
    n, k = teacher_logits.shape
    acc = D.acc_dtype(teacher_logits.dtype)
    if center.dtype != (teacher_logits.dtype if teacher_logits.device.type == "cpu" else torch.float32):
        raise D.arg_error(op, "center", f"has dtype {center.dtype}, the kernel takes "
                                        f"{teacher_logits.dtype if teacher_logits.device.type == 'cpu' else 'float32'}",
                          TypeError)
    probs = teacher_logits.new_empty((n, k), dtype=acc)
    column_sum = teacher_logits.new_empty((k if return_sum else 0,), dtype=acc)
    code = D.dtype_code(teacher_logits.dtype)
    if teacher_logits.device.type == "cpu":
        nbytes = _ext.module().softmax_center_workspace_bytes_cpu(n, k, code, return_sum)
        ws = D.workspace(nbytes, teacher_logits.device)
        bad = _ext.kernel(op, "cpu")(teacher_logits.data_ptr(), center.data_ptr(), code, n, k, float(teacher_temp),
                                     probs.data_ptr(), column_sum.data_ptr() if return_sum else 0, ws.data_ptr(),
                                     nbytes, D.cpu_threads())
        bad = bad if _config.check_finite() else 0
    else:
        device, stream = D.cuda_device_and_stream(teacher_logits)
        with torch.cuda.device(device):
            flag = teacher_logits.new_empty((), dtype=torch.int32)  # zeroed by the kernel
            nbytes = _ext.module().softmax_center_workspace_bytes_cuda(n, k, return_sum)
            ws = D.workspace(nbytes, teacher_logits.device)
            _ext.kernel(op, "cuda")(teacher_logits.data_ptr(), center.data_ptr(), code, n, k, float(teacher_temp),
                                    probs.data_ptr(), column_sum.data_ptr() if return_sum else 0, flag.data_ptr(),
                                    ws.data_ptr(), nbytes, device, stream)
        bad = int(flag.item()) if _config.check_finite("cuda") and n > 0 else 0  # the read-back syncs
    check_sum = return_sum and _config.check_finite(teacher_logits.device.type)
    if check_sum and not bool(torch.isfinite(column_sum).all()):
        bad = bad or 1  # a −inf logit leaves its row finite but not the center update
    if bad:
        D.raise_nonfinite_inputs(op, {"teacher_logits": teacher_logits, "center": center},
                                 f"gives {bad} row(s) of non-finite statistics")
    return probs, column_sum


@softmax_center_op.register_fake
def _(teacher_logits, center, teacher_temp, return_sum):
    n, k = teacher_logits.shape
    acc = D.acc_dtype(teacher_logits.dtype)
    return teacher_logits.new_empty((n, k), dtype=acc), teacher_logits.new_empty((k if return_sum else 0,),
                                                                                 dtype=acc)


def kernel_center(center: Tensor, like: Tensor) -> Tensor:
    """center as the kernels take it: (K,) contiguous, like's dtype on CPU and float32 on CUDA."""
    dtype = like.dtype if like.device.type == "cpu" else torch.float32
    return center.detach().reshape(-1).to(dtype).contiguous()


def softmax_center(teacher_logits: Tensor, center: Tensor, teacher_temp: float,
                   return_sum: bool = False) -> Union[Tensor, Tuple[Tensor, Tensor]]:
    """Teacher targets of DINO/iBOT: softmax((z − c)/τ_t) per row, centering and sharpening fused in one pass.

    teacher_logits (N, K), center with K elements ((K,), (1, K) or (1, 1, K)), teacher_temp > 0 → probs (N, K),
    float32 (float64 for float64 input). With return_sum=True also Σ_n teacher_logits[n] (K,), the raw-logit
    sum of DINO's center update, from the same pass on the CPU. No gradient (targets are detached, as
    officially). CPU: float32/float64 kernels (16-bit input is upcast); CUDA: float32/float16/bfloat16.
    Raises ValueError on NaN/+inf input (see DINOKERNELS_CHECK_FINITE).
    """
    op = "softmax_center"
    _check(op, teacher_logits, center, teacher_temp)
    if D.use_reference(op, teacher_logits.device):
        def reference(teacher_logits, center):
            return softmax_center_ref(teacher_logits, center, teacher_temp, return_sum)

        inputs = {"teacher_logits": teacher_logits, "center": center}
        if not D.checks_values(teacher_logits.device):
            return reference(**inputs)
        result = D.run_reference(reference, inputs, lambda r: nonfinite_rows(r, return_sum) > 0)
        bad = nonfinite_rows(result, return_sum)
        if bad:
            D.raise_nonfinite_inputs(op, inputs, f"gives {bad} row(s) of non-finite statistics")
        return result
    z = teacher_logits.detach()
    if z.device.type == "cpu" and z.dtype in D.HALF_DTYPES:
        z = z.float()
    D.check_kernel_dtype(op, "teacher_logits", z)
    probs, column_sum = softmax_center_op(z.contiguous(), kernel_center(center, z), float(teacher_temp),
                                          bool(return_sum))
    return (probs, column_sum) if return_sum else probs
