"""KoLeo regulariser and the nearest-neighbour search under it, as torch.library custom ops.

Public: koleo_loss, nearest_neighbors. Registered ops: dinokernels::koleo_forward (→ loss and what the backward
needs), dinokernels::koleo_backward, dinokernels::nearest_neighbors.
"""
from typing import Optional, Tuple

import torch
from torch import Tensor

from .. import _config, _ext
from . import _dispatch as D
from .koleo_ref import koleo_loss_ref, nearest_neighbors_ref

__all__ = ["koleo_loss", "nearest_neighbors", "koleo_loss_ref", "nearest_neighbors_ref"]

CUDA_MAX_DIM = 8192  # the CUDA backward keeps one row's gradient in shared memory (csrc kMaxBackwardDim)


def _check_koleo(op: str, x, eps):
    D.check_tensor(op, "x", x, 2, "(B, D)")
    if x.shape[0] < 2:
        raise D.arg_error(op, "x", f"needs at least 2 rows (KoLeo is undefined for a single sample), got shape "
                                   f"{tuple(x.shape)}")
    if x.shape[1] < 1:
        raise D.arg_error(op, "x", f"needs at least one column, got shape {tuple(x.shape)}")
    D.check_positive_float(op, "eps", eps)


def _check_cuda_backward_dim(op, x):
    if x.device.type == "cuda" and x.shape[1] > CUDA_MAX_DIM:
        raise D.arg_error(op, "x", f"has {x.shape[1]} columns; the CUDA backward supports at most {CUDA_MAX_DIM} "
                                   f"(forward without gradient has no limit)")


def _check_kernel_input(op, x, eps):
    """What the registered ops need beyond koleo_loss's checks: a kernel dtype and contiguity."""
    _check_koleo(op, x, eps)
    D.check_kernel_dtype(op, "x", x)
    D.check_contiguous(op, "x", x)
    return x.shape[0], x.shape[1], D.acc_dtype(x.dtype)


# ---- forward ----

@torch.library.custom_op("dinokernels::koleo_forward", mutates_args=())
def koleo_forward(x: Tensor, eps: float) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """x (B, D) contiguous → (loss (), nn_index (B,) int64, norms (B,), dists (B,)) in the accumulation dtype."""
    op = "koleo_forward"
    n, dim, acc = _check_kernel_input(op, x, eps)
    loss = x.new_empty((), dtype=acc)
    nn_index = x.new_empty((n,), dtype=torch.int64)
    norms = x.new_empty((n,), dtype=acc)
    dists = x.new_empty((n,), dtype=acc)
    code = D.dtype_code(x.dtype)
    if x.device.type == "cpu":
        nbytes = _ext.module().koleo_workspace_bytes_cpu(n, dim, code)
        ws = D.workspace(nbytes, x.device)
        bad = _ext.kernel(op, "cpu")(x.data_ptr(), code, n, dim, eps, loss.data_ptr(), nn_index.data_ptr(),
                                     norms.data_ptr(), dists.data_ptr(), ws.data_ptr(), nbytes, D.cpu_threads())
        bad = bad if _config.check_finite() else 0
    else:
        device, stream = D.cuda_device_and_stream(x)
        with torch.cuda.device(device):
            nbytes = _ext.module().koleo_forward_workspace_bytes_cuda(n, dim, device)
            ws = D.workspace(nbytes, x.device)
            flag = x.new_empty((), dtype=torch.int32)
            _ext.kernel(op, "cuda")(x.data_ptr(), code, n, dim, eps, loss.data_ptr(), nn_index.data_ptr(),
                                    norms.data_ptr(), dists.data_ptr(), flag.data_ptr(), ws.data_ptr(), nbytes,
                                    device, stream)
        bad = int(flag.item()) if _config.check_finite("cuda") else 0  # the read-back syncs
    D.raise_if_nonfinite("koleo_loss", "x", bad)
    return loss, nn_index, norms, dists


@koleo_forward.register_fake
def _(x, eps):
    acc = D.acc_dtype(x.dtype)
    n = x.shape[0]
    return (x.new_empty((), dtype=acc), x.new_empty((n,), dtype=torch.int64), x.new_empty((n,), dtype=acc),
            x.new_empty((n,), dtype=acc))


# ---- backward ----

@torch.library.custom_op("dinokernels::koleo_backward", mutates_args=())
def koleo_backward(grad_loss: Tensor, x: Tensor, nn_index: Tensor, norms: Tensor, dists: Tensor,
                   eps: float) -> Tensor:
    """grad_loss () and koleo_forward's saved outputs → grad_x (B, D) in x's dtype."""
    op = "koleo_backward"
    n, dim, acc = _check_kernel_input(op, x, eps)
    _check_cuda_backward_dim(op, x)
    if grad_loss.numel() != 1:
        raise D.arg_error(op, "grad_loss", f"must hold one value (the loss is a scalar), got shape "
                                           f"{tuple(grad_loss.shape)}")
    for name, t, dtype in (("nn_index", nn_index, torch.int64), ("norms", norms, acc), ("dists", dists, acc)):
        if t.shape != (n,) or t.dtype != dtype or t.device != x.device or not t.is_contiguous():
            raise D.arg_error(op, name, f"must be a contiguous ({n},) {dtype} tensor on {x.device}, got "
                                        f"{tuple(t.shape)} {t.dtype} on {t.device}")
    grad_loss = grad_loss.to(device=x.device, dtype=acc).reshape(()).contiguous()
    grad_x = torch.empty_like(x)
    code = D.dtype_code(x.dtype)
    if x.device.type == "cpu":
        _ext.kernel(op, "cpu")(grad_loss.data_ptr(), x.data_ptr(), code, n, dim, eps, nn_index.data_ptr(),
                               norms.data_ptr(), dists.data_ptr(), grad_x.data_ptr(), D.cpu_threads())
    else:
        device, stream = D.cuda_device_and_stream(x)
        with torch.cuda.device(device):
            _ext.kernel(op, "cuda")(grad_loss.data_ptr(), x.data_ptr(), code, n, dim, eps, nn_index.data_ptr(),
                                    norms.data_ptr(), dists.data_ptr(), grad_x.data_ptr(), device, stream)
    return grad_x


@koleo_backward.register_fake
def _(grad_loss, x, nn_index, norms, dists, eps):
    return torch.empty_like(x)


def _koleo_setup_context(ctx, inputs, output):
    x, eps = inputs
    _, nn_index, norms, dists = output
    ctx.mark_non_differentiable(nn_index, norms, dists)
    ctx.save_for_backward(x, nn_index, norms, dists)
    ctx.eps = eps


def _koleo_backward_rule(ctx, grad_loss, _grad_index, _grad_norms, _grad_dists):
    x, nn_index, norms, dists = ctx.saved_tensors
    return koleo_backward(grad_loss, x, nn_index, norms, dists, ctx.eps), None


koleo_forward.register_autograd(_koleo_backward_rule, setup_context=_koleo_setup_context)


def koleo_loss(x: Tensor, eps: float = 1e-8) -> Tensor:
    """DINOv2's KoLeo regulariser (SPEC §3.5).

    x (B, D), B ≥ 2 → scalar loss = −mean_i log(‖x̂_i − x̂_nn(i) + 1e-8‖ + eps), where x̂ = x / max(‖x‖, eps)
    row-wise and nn(i) = argmax_{j≠i} x̂_i·x̂_j (ties: smallest j). Arithmetic in float32 (float64 for float64
    input); the loss is float32 (float64); the gradient has x's dtype. CPU: float32/float64 kernels (16-bit
    input is upcast); CUDA: float32/float16/bfloat16. Raises ValueError on NaN/inf input (see
    DINOKERNELS_CHECK_FINITE) and on B < 2. Duplicate rows give a finite loss and finite gradients.
    """
    _check_koleo("koleo_loss", x, eps)
    if D.use_reference("koleo_forward", x.device):
        if D.checks_values(x.device):  # what the kernels check in their pass, with the same error
            D.check_finite_inputs("koleo_loss", {"x": x})
        return koleo_loss_ref(x, eps)
    if x.device.type == "cpu" and x.dtype in D.HALF_DTYPES:
        x = x.float()
    D.check_kernel_dtype("koleo_loss", "x", x)
    if x.requires_grad:
        _check_cuda_backward_dim("koleo_loss", x)  # fail now, not inside backward()
    loss, _, _, _ = koleo_forward(x.contiguous(), float(eps))
    return loss


# ---- nearest neighbours ----

def _check_nn(op, x, y, exclude_self):
    D.check_tensor(op, "x", x, 2, "(N, D)")
    if y is not None:
        D.check_tensor(op, "y", y, 2, "(M, D)")
        if y.shape[1] != x.shape[1]:
            raise D.arg_error(op, "y", f"must have x's {x.shape[1]} columns, got shape {tuple(y.shape)}")
        if y.dtype != x.dtype or y.device != x.device:
            raise D.arg_error(op, "y", f"must match x's dtype and device ({x.dtype}, {x.device}), got "
                                       f"{y.dtype}, {y.device}", TypeError)
    m = (x if y is None else y).shape[0]
    if x.shape[1] < 1:
        raise D.arg_error(op, "x", f"needs at least one column, got shape {tuple(x.shape)}")
    if m < 1:
        raise D.arg_error(op, "y" if y is not None else "x", "needs at least one candidate row, got 0")
    if exclude_self and m < 2:
        raise D.arg_error(op, "y" if y is not None else "x",
                          f"needs at least 2 candidate rows when exclude_self=True, got {m}")


def check_similarities(x: Tensor, y: Optional[Tensor], sim: Tensor):
    """Every backend, on finite input: a similarity (N,) beyond the accumulation dtype's range is an overflow of
    x·y (its exact value is not representable), blamed on the larger of x and y."""
    if sim.numel() and not bool(torch.isfinite(sim).all()):
        size = {name: float(t.detach().abs().max()) for name, t in (("x", x), ("y", y)) if t is not None}
        blame = max(size, key=size.get)
        raise D.arg_error("nearest_neighbors", blame, f"gives non-finite similarities (x·y overflows "
                                                      f"{str(sim.dtype)[6:]}: entries up to {size[blame]:.3g})")


@torch.library.custom_op("dinokernels::nearest_neighbors", mutates_args=())
def nearest_neighbors_op(x: Tensor, y: Optional[Tensor], exclude_self: bool) -> Tuple[Tensor, Tensor]:
    """x (N, D), y (M, D) or None → (similarity (N,), index (N,) int64). Contiguous inputs."""
    op = "nearest_neighbors"
    _check_nn(op, x, y, exclude_self)
    D.check_kernel_dtype(op, "x", x)
    D.check_contiguous(op, "x", x)
    if y is not None:
        D.check_contiguous(op, "y", y)
    cand = x if y is None else y
    n, dim = x.shape
    m = cand.shape[0]
    sim = x.new_empty((n,), dtype=D.acc_dtype(x.dtype))
    index = x.new_empty((n,), dtype=torch.int64)
    if n == 0:
        return sim, index
    code = D.dtype_code(x.dtype)
    if x.device.type == "cpu":
        nbytes = _ext.module().koleo_workspace_bytes_cpu(m, dim, code)
        ws = D.workspace(nbytes, x.device)
        bad = _ext.kernel(op, "cpu")(x.data_ptr(), cand.data_ptr(), code, n, m, dim, exclude_self, sim.data_ptr(),
                                     index.data_ptr(), ws.data_ptr(), nbytes, D.cpu_threads())
        bad = bad if _config.check_finite() else 0
    else:
        device, stream = D.cuda_device_and_stream(x)
        with torch.cuda.device(device):
            nbytes = _ext.module().nearest_neighbors_workspace_bytes_cuda(n, m, dim, device)
            ws = D.workspace(nbytes, x.device)
            flag = x.new_empty((), dtype=torch.int32)
            _ext.kernel(op, "cuda")(x.data_ptr(), cand.data_ptr(), code, n, m, dim, exclude_self, sim.data_ptr(),
                                    index.data_ptr(), flag.data_ptr(), ws.data_ptr(), nbytes, device, stream)
        bad = int(flag.item()) if _config.check_finite("cuda") else 0  # the read-back syncs
    D.raise_if_nonfinite(op, "x" if y is None else "x' or 'y", bad)
    if _config.check_finite(x.device.type):
        check_similarities(x, y, sim)
    return sim, index


@nearest_neighbors_op.register_fake
def _(x, y, exclude_self):
    n = x.shape[0]
    return x.new_empty((n,), dtype=D.acc_dtype(x.dtype)), x.new_empty((n,), dtype=torch.int64)


def _nn_setup_context(ctx, inputs, output):
    x, y, _ = inputs
    _, index = output
    ctx.mark_non_differentiable(index)
    ctx.save_for_backward(x, y, index)
    ctx.y_is_x = y is None


def _nn_backward_rule(ctx, grad_sim, _grad_index):
    # sim_i = x_i · y_index(i): a gather and an index_add, nothing worth a kernel.
    x, y, index = ctx.saved_tensors
    cand = x if ctx.y_is_x else y
    g = grad_sim.to(D.acc_dtype(x.dtype))[:, None]
    grad_x = (g * cand.to(g.dtype)[index]).to(x.dtype)
    grad_cand = torch.zeros(cand.shape, dtype=g.dtype, device=cand.device).index_add_(0, index, g * x.to(g.dtype))
    if ctx.y_is_x:
        return grad_x + grad_cand.to(x.dtype), None, None
    return grad_x, grad_cand.to(y.dtype), None


nearest_neighbors_op.register_autograd(_nn_backward_rule, setup_context=_nn_setup_context)


def nearest_neighbors(x: Tensor, y: Optional[Tensor] = None,
                      exclude_self: Optional[bool] = None) -> Tuple[Tensor, Tensor]:
    """Nearest neighbour by inner product, without forming the N×M similarity matrix.

    x (N, D) queries, y (M, D) candidates or None to search x against itself → (similarity (N,), index (N,)
    int64): similarity_i = max_j x_i·y_j, index_i its argmax (ties: smallest j). exclude_self (default: y is
    None) skips j == i. Similarities are float64 for float64 input, else float32, and carry a gradient to x and
    y. Dtypes as koleo_loss. Raises ValueError on NaN/inf input.
    """
    if exclude_self is None:
        exclude_self = y is None
    _check_nn("nearest_neighbors", x, y, exclude_self)
    if D.use_reference("nearest_neighbors", x.device):
        if not D.checks_values(x.device):
            return nearest_neighbors_ref(x, y, exclude_self)
        # the kernels' in-pass check counts x and y together
        D.raise_if_nonfinite("nearest_neighbors", "x" if y is None else "x' or 'y",
                             D.nonfinite_count(x) + D.nonfinite_count(y))
        sim, index = nearest_neighbors_ref(x, y, exclude_self)
        check_similarities(x, y, sim)
        return sim, index
    if x.device.type == "cpu" and x.dtype in D.HALF_DTYPES:
        x = x.float()
        y = None if y is None else y.float()
    D.check_kernel_dtype("nearest_neighbors", "x", x)
    return nearest_neighbors_op(x.contiguous(), None if y is None else y.contiguous(), bool(exclude_self))
