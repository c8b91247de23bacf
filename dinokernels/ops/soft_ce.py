"""The registered custom ops under dino_loss, dino_loss_centered and ibot_patch_loss: the soft-target
cross-entropy of csrc/soft_ce (derivation in csrc/soft_ce/soft_ce.h and SPEC §2.1).

dinokernels::soft_ce_forward → (loss, student_stats, target_sum, teacher_stats, teacher_sum, grad_student);
dinokernels::soft_ce_backward → grad_student. On the CPU, when the student needs a gradient, the forward writes
it too (with grad_loss = 1), from the same pass and the same exponentials; the backward then only scales it by
grad_loss. Otherwise (CUDA, or a second backward through a retained graph) the backward recomputes softmax rows
from the saved per-row statistics (max and log-sum, kept apart for accuracy).
"""
from typing import Optional, Tuple

import torch
from torch import Tensor

from .. import _config, _ext
from . import _dispatch as D

MAX_TEACHER_VIEWS = 32  # CPU: pointers on the stack (64); CUDA: teacher exps of a chunk in shared memory (44)


def _teacher_logits(center: Optional[Tensor]) -> bool:
    return center is not None


def _check_inputs(op: str, student: Tensor, teacher: Tensor, center: Optional[Tensor], weights: Optional[Tensor]):
    """Kernel-level checks (the public functions have already named user errors more precisely)."""
    D.check_kernel_dtype(op, "student_logits", student)
    for name, t in (("student_logits", student), ("teacher", teacher), ("center", center), ("weights", weights)):
        if t is not None:
            D.check_contiguous(op, name, t)
            if t.device != student.device:
                raise D.arg_error(op, name, f"must be on {student.device}, got {t.device}")
    s, b, k = student.shape
    if teacher.dim() != 3 or teacher.shape[1:] != (b, k) or not 1 <= teacher.shape[0] <= MAX_TEACHER_VIEWS:
        raise D.arg_error(op, "teacher", f"must be (T, {b}, {k}) with 1 <= T <= {MAX_TEACHER_VIEWS}, got "
                                         f"{tuple(teacher.shape)}")
    if student.device.type == "cpu":
        wanted = {"teacher": student.dtype, "center": student.dtype, "weights": student.dtype}
    else:
        wanted = {"teacher": (torch.float32, student.dtype), "center": torch.float32, "weights": torch.float32}
    for name, t in (("teacher", teacher), ("center", center), ("weights", weights)):
        allowed = wanted[name] if isinstance(wanted[name], tuple) else (wanted[name],)
        if t is not None and t.dtype not in allowed:
            raise D.arg_error(op, name, f"has dtype {t.dtype}, the kernel takes {' or '.join(map(str, allowed))}",
                              TypeError)
    if center is not None and center.shape != (k,):
        raise D.arg_error(op, "center", f"must have shape ({k},), got {tuple(center.shape)}")
    if weights is not None and weights.shape != (b,):
        raise D.arg_error(op, "weights", f"must have shape ({b},), got {tuple(weights.shape)}")
    return s, teacher.shape[0], b, k


def _absmax(t: Optional[Tensor]) -> float:
    return float(t.detach().abs().max()) if t is not None and t.numel() else 0.0


def check_loss(public_op: str, inputs: dict, loss: Tensor, student_temp: float, teacher_sum: Optional[Tensor] = None):
    """The finiteness check of every backend, on the result: a non-finite loss (or teacher logit sum (K,)) names
    the first of `inputs` holding NaN/inf. `inputs`: public name → tensor in the order student, teacher, then
    'center' (teacher logits) or 'weights' when given. With finite inputs it is an overflow, blamed on the largest
    of the factors each term multiplies: |z|/τ_s of the student, the targets (unless they are softmaxed logits) and
    the weights. Only runs on the error path."""
    if bool(torch.isfinite(loss)) and (teacher_sum is None or bool(torch.isfinite(teacher_sum).all())):
        return
    D.check_finite_inputs(public_op, inputs)
    names = list(inputs)
    if not bool(torch.isfinite(loss)):
        student, teacher, logits = names[0], names[1], "center" in inputs
        factors = {student: _absmax(inputs[student]) / student_temp,
                   teacher: 0.0 if logits else _absmax(inputs[teacher]), "weights": _absmax(inputs.get("weights"))}
        blame = max(factors, key=factors.get)
        raise D.arg_error(public_op, blame, "gives a non-finite loss (overflow: is student_temp tiny?)" if
                          blame == student else f"gives a non-finite loss (overflow: entries up to "
                                                f"{factors[blame]:.3g})")
    raise D.arg_error(public_op, names[1], "gives a non-finite column sum for the center update (overflow)")


def _ptr(t: Optional[Tensor]) -> int:
    return 0 if t is None else t.data_ptr()


@torch.library.custom_op("dinokernels::soft_ce_forward", mutates_args=())
def soft_ce_forward(student: Tensor, teacher: Tensor, center: Optional[Tensor], weights: Optional[Tensor],
                    skip_same_view: bool, student_temp: float, teacher_temp: float, scale: float,
                    return_teacher_sum: bool, arg_names: str,
                    with_grad: bool = False) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """student (S, B, K), teacher (T, B, K) targets (or logits when center (K,) is given), weights (B,) or
    None → (loss (), student_stats (2, S, B), target_sum (S, B), teacher_stats (2, T, B) or (0,), teacher logit
    column sum (K,) or (0,), grad_student), all but the last in the accumulation dtype. grad_student is
    ∂loss/∂student (S, B, K) in the student's dtype when with_grad on the CPU, else (0,). arg_names =
    "op,student,teacher,center,weights": the public names, for the error raised when the loss is not finite
    (DINOKERNELS_CHECK_FINITE)."""
    op = "soft_ce_forward"
    s, t, b, k = _check_inputs(op, student, teacher, center, weights)
    logits = _teacher_logits(center)
    acc = D.acc_dtype(student.dtype)
    loss = student.new_empty((), dtype=acc)
    student_stats = student.new_empty((2, s, b), dtype=acc)
    target_sum = student.new_empty((s, b), dtype=acc)
    teacher_stats = student.new_empty((2, t, b) if logits else (0,), dtype=acc)
    teacher_sum = student.new_empty((k,) if return_teacher_sum else (0,), dtype=acc)
    fused = bool(with_grad) and student.device.type == "cpu"
    grad_student = student.new_empty((s, b, k) if fused else (0,))
    code = D.dtype_code(student.dtype)
    common = (_ptr(student), _ptr(teacher), _ptr(center), _ptr(weights))
    sizes = (s, t, b, k, bool(skip_same_view), logits, float(student_temp), float(teacher_temp), float(scale))
    outs = (loss.data_ptr(), student_stats.data_ptr(), target_sum.data_ptr(), _ptr(teacher_stats) if logits else 0)
    if student.device.type == "cpu":
        if fused:
            _ext.kernel("soft_ce_forward_backward", "cpu")(*common, code, *sizes, *outs, grad_student.data_ptr(),
                                                           D.cpu_threads())
        else:
            nbytes = _ext.module().soft_ce_workspace_bytes_cpu(s, t, b, k, code)
            ws = D.workspace(nbytes, student.device)
            _ext.kernel(op, "cpu")(*common, code, *sizes, *outs, ws.data_ptr(), nbytes, D.cpu_threads())
        if return_teacher_sum:
            _ext.kernel("softmax_center_column_sum", "cpu")(teacher.data_ptr(), code, t * b, k,
                                                            teacher_sum.data_ptr(), D.cpu_threads())
    else:
        device, stream = D.cuda_device_and_stream(student)
        with torch.cuda.device(device):
            nbytes = _ext.module().soft_ce_workspace_bytes_cuda(s, t, b, k, logits)
            ws = D.workspace(nbytes, student.device)
            _ext.kernel(op, "cuda")(*common, code, D.dtype_code(teacher.dtype), *sizes, *outs, ws.data_ptr(),
                                    nbytes, device, stream)
            if return_teacher_sum:
                _ext.kernel("softmax_center_column_sum", "cuda")(teacher.data_ptr(), D.dtype_code(teacher.dtype),
                                                                 t * b, k, teacher_sum.data_ptr(), device, stream)
    if _config.check_finite(student.device.type):  # inside the op: torch.compile sees no data-dependent branch
        public_op, *names = arg_names.split(",")
        inputs = {name: t for name, t in zip(names, (student, teacher, center, weights)) if t is not None}
        check_loss(public_op, inputs, loss, student_temp, teacher_sum if return_teacher_sum else None)
    return loss, student_stats, target_sum, teacher_stats, teacher_sum, grad_student


@soft_ce_forward.register_fake
def _(student, teacher, center, weights, skip_same_view, student_temp, teacher_temp, scale, return_teacher_sum,
      arg_names, with_grad=False):
    s, b, k = student.shape
    acc = D.acc_dtype(student.dtype)
    t = teacher.shape[0]
    fused = bool(with_grad) and student.device.type == "cpu"
    return (student.new_empty((), dtype=acc), student.new_empty((2, s, b), dtype=acc),
            student.new_empty((s, b), dtype=acc),
            student.new_empty((2, t, b) if center is not None else (0,), dtype=acc),
            student.new_empty((k,) if return_teacher_sum else (0,), dtype=acc),
            student.new_empty((s, b, k) if fused else (0,)))


@torch.library.custom_op("dinokernels::soft_ce_backward", mutates_args=())
def soft_ce_backward(grad_loss: Tensor, student: Tensor, teacher: Tensor, center: Optional[Tensor],
                     weights: Optional[Tensor], skip_same_view: bool, student_temp: float, teacher_temp: float,
                     scale: float, student_stats: Tensor, target_sum: Tensor, teacher_stats: Tensor) -> Tensor:
    """grad_loss () and soft_ce_forward's statistics → grad_student (S, B, K) in the student's dtype."""
    op = "soft_ce_backward"
    s, t, b, k = _check_inputs(op, student, teacher, center, weights)
    logits = _teacher_logits(center)
    acc = D.acc_dtype(student.dtype)
    for name, tensor, shape in (("student_stats", student_stats, (2, s, b)), ("target_sum", target_sum, (s, b)),
                                ("teacher_stats", teacher_stats, (2, t, b) if logits else None)):
        if shape is not None and (tensor.shape != shape or tensor.dtype != acc or not tensor.is_contiguous()
                                  or tensor.device != student.device):
            raise D.arg_error(op, name, f"must be a contiguous {shape} {acc} tensor on {student.device}, got "
                                        f"{tuple(tensor.shape)} {tensor.dtype} on {tensor.device}")
    if grad_loss.numel() != 1:
        raise D.arg_error(op, "grad_loss", f"must hold one value (the loss is a scalar), got shape "
                                           f"{tuple(grad_loss.shape)}")
    grad_loss = grad_loss.to(device=student.device, dtype=acc).reshape(()).contiguous()
    grad_student = torch.empty_like(student)
    code = D.dtype_code(student.dtype)
    common = (grad_loss.data_ptr(), _ptr(student), _ptr(teacher), _ptr(center), _ptr(weights))
    sizes = (s, t, b, k, bool(skip_same_view), logits, float(student_temp), float(teacher_temp), float(scale))
    stats = (student_stats.data_ptr(), target_sum.data_ptr(), _ptr(teacher_stats) if logits else 0)
    if student.device.type == "cpu":
        _ext.kernel(op, "cpu")(*common, code, *sizes, *stats, grad_student.data_ptr(), D.cpu_threads())
    else:
        device, stream = D.cuda_device_and_stream(student)
        with torch.cuda.device(device):
            _ext.kernel(op, "cuda")(*common, code, D.dtype_code(teacher.dtype), *sizes, *stats,
                                    grad_student.data_ptr(), device, stream)
    return grad_student


@soft_ce_backward.register_fake
def _(grad_loss, student, teacher, center, weights, skip_same_view, student_temp, teacher_temp, scale, student_stats,
      target_sum, teacher_stats):
    return torch.empty_like(student)


def _setup_context(ctx, inputs, output):
    student, teacher, center, weights, skip_same_view, student_temp, teacher_temp, scale = inputs[:8]
    _, student_stats, target_sum, teacher_stats, _, grad_student = output
    ctx.mark_non_differentiable(*output[1:])
    ctx.save_for_backward(student, teacher, center, weights, student_stats, target_sum, teacher_stats, grad_student)
    ctx.args = (bool(skip_same_view), float(student_temp), float(teacher_temp), float(scale))
    ctx.arg_names = inputs[9]
    ctx.forward_grad_taken = False


def _eager(*tensors) -> bool:
    # Plain tensors outside any tracing (torch.compile traces with fake or functional tensors).
    return not torch.compiler.is_compiling() and all(type(t) is torch.Tensor for t in tensors)


def _backward(ctx, grad_loss, *_unused):
    student, teacher, center, weights, student_stats, target_sum, teacher_stats, grad_student = ctx.saved_tensors
    skip_same_view, student_temp, teacher_temp, scale = ctx.args
    nones = (None,) * 10
    if grad_student.numel() and not _eager(grad_loss, grad_student):
        return (grad_student * grad_loss.reshape(()).to(grad_student.dtype), *nones)
    if grad_student.numel() and grad_loss.numel() == 1:
        # Eager: hand out the forward's gradient, scaled in place (a CPU scalar, so the check costs nothing). It is
        # handed out once: a second backward through a retained graph reruns the same kernel (same bits).
        if ctx.forward_grad_taken:
            grad_student = soft_ce_forward(student, teacher, center, weights, skip_same_view, student_temp,
                                           teacher_temp, scale, False, ctx.arg_names, True)[5]
        ctx.forward_grad_taken = True
        if bool(grad_loss != 1):
            grad_student.mul_(grad_loss.reshape(()).to(grad_student.dtype))
        return (grad_student, *nones)
    grad = soft_ce_backward(grad_loss, student, teacher, center, weights, skip_same_view, student_temp,
                            teacher_temp, scale, student_stats, target_sum, teacher_stats)
    return (grad, *nones)


soft_ce_forward.register_autograd(_backward, setup_context=_setup_context)


def run(op: str, arg_names: Tuple[str, str, str, str], student: Tensor, teacher: Tensor, center: Optional[Tensor],
        weights: Optional[Tensor], skip_same_view: bool, student_temp: float, teacher_temp: float, scale: float,
        return_teacher_sum: bool = False) -> Tuple[Tensor, Tensor]:
    """Casts to the kernel's dtypes and runs soft_ce_forward; arg_names are the public names of (student,
    teacher, center, weights) for error messages. → (loss, teacher logit column sum or an empty tensor)."""
    cpu = student.device.type == "cpu"
    if cpu and student.dtype in D.HALF_DTYPES:
        student = student.float()
    D.check_kernel_dtype(op, arg_names[0], student)
    side = student.dtype if cpu else torch.float32
    teacher = teacher.detach()
    if cpu or teacher.dtype not in (torch.float32, student.dtype):
        teacher = teacher.to(side)
    center = None if center is None else center.detach().reshape(-1).to(side).contiguous()
    weights = None if weights is None else weights.detach().to(side).contiguous()
    with_grad = student.requires_grad and torch.is_grad_enabled()
    loss, _, _, _, teacher_sum, _ = soft_ce_forward(student.contiguous(), teacher.contiguous(), center, weights,
                                                    skip_same_view, student_temp, teacher_temp, scale,
                                                    return_teacher_sum, ",".join((op, *arg_names)), with_grad)
    return loss, teacher_sum
