"""Multi-scale deformable attention (Deformable-DETR / Grounding DINO, SPEC §4) on dinokernels' CPU and CUDA
kernels. Registered ops: dinokernels::ms_deform_attn_forward and dinokernels::ms_deform_attn_backward (the
backward is its own op, so torch.compile and opcheck see both).

The level table (spatial_shapes, level_start_index) is read on the host inside the ops: from a CUDA tensor that
costs one small device-to-host copy per call (pass CPU tensors to avoid it). The public function checks only
metadata, so it traces under torch.compile(fullgraph=True); the values are checked inside the ops and again in C++.

Non-finite input (DINOKERNELS_CHECK_FINITE=1, the default): the CPU forward notices NaN/inf in the locations, the
weights or the output while it runs (no extra pass); on CUDA one fused isfinite reduction is read back (a sync). A
NaN/inf value pixel that no sample reaches does not raise.
"""
from typing import Tuple

import torch
from torch import Tensor

from .. import _config, _ext
from . import _dispatch as D
from .ms_deform_attn_ref import ms_deform_attn_gather_ref, ms_deform_attn_ref

__all__ = ["ms_deform_attn", "ms_deform_attn_ref", "ms_deform_attn_gather_ref", "MAX_LEVELS", "MAX_POINTS"]

MAX_LEVELS = 8
MAX_POINTS = 16
MAX_SIDE = 1 << 23  # largest H or W of a level (csrc kMaxSide): float32 x·W − 0.5 is exact up to there
_OP = "ms_deform_attn"


def _sizes(value: Tensor, sampling_locations: Tensor):
    n, s, m, d = value.shape
    lq, levels, points = sampling_locations.shape[1], sampling_locations.shape[3], sampling_locations.shape[4]
    return n, s, m, d, lq, levels, points


def _check_level_values(shapes: Tensor, starts: Tensor):
    """The level table's values, shapes (L, 2) and starts (L,) int64 on the CPU: the one check of every backend
    (the kernel path runs it inside the ops, where the table is read anyway; the reference before it runs)."""
    if (shapes < 1).any():
        raise D.arg_error(_OP, "spatial_shapes", f"must hold positive (H, W) per level, got {shapes.tolist()}")
    for level, (h, w) in enumerate(shapes.tolist()):
        if h > MAX_SIDE or w > MAX_SIDE:  # the C++ check's message, so that both layers agree
            raise D.arg_error(_OP, "spatial_shapes", f"level {level} has (H, W) = ({h}, {w}); each must be in "
                                                     f"[1, 2^23] (float32 sampling coordinates lose the half-pixel "
                                                     f"offset beyond)")
    expected = torch.cumsum(shapes[:, 0] * shapes[:, 1], 0) - shapes[:, 0] * shapes[:, 1]
    if not torch.equal(starts, expected):
        raise D.arg_error(_OP, "level_start_index", f"must be the exclusive prefix sum of H·W over spatial_shapes "
                                                    f"({expected.tolist()}), got {starts.tolist()}")


def _host_levels(spatial_shapes: Tensor, level_start_index: Tensor):
    """The level table as contiguous int64 CPU tensors (the kernels read it on the host), values checked."""
    shapes = spatial_shapes.detach().to("cpu", torch.int64).contiguous()
    starts = level_start_index.detach().to("cpu", torch.int64).contiguous()
    _check_level_values(shapes, starts)
    return shapes, starts


def _check_total(shapes: Tensor, s: int):
    total = int((shapes[:, 0] * shapes[:, 1]).sum())
    if total != s:
        raise D.arg_error(_OP, "value", f"has S={s} rows, but spatial_shapes {shapes.tolist()} hold Σ H·W = {total}")


def _raise_nonfinite(inputs: dict):
    """Every backend's error for a non-finite output: the first input holding NaN/inf, else an overflow of
    Σ a·bilinear(value), blamed on the larger of max |value| and max |attention_weights| (bilinear weights are ≤ 1).
    Only runs on the error path."""
    D.check_finite_inputs(_OP, inputs)
    size = {name: float(inputs[name].detach().abs().max()) if inputs[name].numel() else 0.0
            for name in ("value", "attention_weights")}
    blame = max(size, key=size.get)
    raise D.arg_error(_OP, blame, f"gives a non-finite output (overflow in the output dtype: entries up to "
                                  f"{size[blame]:.3g})")


def _location_dtype(value: Tensor, sampling_locations: Tensor) -> torch.dtype:
    # CPU: one dtype everywhere. CUDA: locations and weights in float32, or in value's dtype.
    if value.device.type == "cpu" or sampling_locations.dtype == value.dtype:
        return value.dtype
    return torch.float32


def _check_kernel_inputs(op, value, spatial_shapes, level_start_index, sampling_locations, attention_weights):
    D.check_kernel_dtype(op, "value", value)
    loc_dtype = _location_dtype(value, sampling_locations)
    for name, t in (("value", value), ("sampling_locations", sampling_locations),
                    ("attention_weights", attention_weights)):
        D.check_contiguous(op, name, t)
        if t.device != value.device:
            raise D.arg_error(op, name, f"must be on {value.device}, got {t.device}")
    for name, t in (("sampling_locations", sampling_locations), ("attention_weights", attention_weights)):
        if t.dtype != loc_dtype:
            raise D.arg_error(op, name, f"has dtype {t.dtype}, the kernel takes {loc_dtype} here", TypeError)
    n, s, m, d, lq, levels, points = _sizes(value, sampling_locations)
    if sampling_locations.shape != (n, lq, m, levels, points, 2):
        raise D.arg_error(op, "sampling_locations", f"must be (N, Lq, M, L, P, 2), got "
                                                    f"{tuple(sampling_locations.shape)}")
    if attention_weights.shape != (n, lq, m, levels, points):
        raise D.arg_error(op, "attention_weights", f"must be {(n, lq, m, levels, points)}, got "
                                                   f"{tuple(attention_weights.shape)}")
    if tuple(spatial_shapes.shape) != (levels, 2) or tuple(level_start_index.shape) != (levels,):
        raise D.arg_error(op, "spatial_shapes", f"must be ({levels}, 2) with level_start_index ({levels},), got "
                                                f"{tuple(spatial_shapes.shape)} and {tuple(level_start_index.shape)}")
    return n, s, m, d, lq, levels, points


@torch.library.custom_op("dinokernels::ms_deform_attn_forward", mutates_args=())
def ms_deform_attn_forward(value: Tensor, spatial_shapes: Tensor, level_start_index: Tensor,
                           sampling_locations: Tensor, attention_weights: Tensor) -> Tensor:
    """value (N, S, M, D), spatial_shapes (L, 2), level_start_index (L,), sampling_locations (N, Lq, M, L, P, 2),
    attention_weights (N, Lq, M, L, P), all contiguous → output (N, Lq, M·D) in value's dtype."""
    op = "ms_deform_attn_forward"
    n, s, m, d, lq, levels, points = _check_kernel_inputs(op, value, spatial_shapes, level_start_index,
                                                          sampling_locations, attention_weights)
    shapes, starts = _host_levels(spatial_shapes, level_start_index)
    _check_total(shapes, s)
    output = value.new_empty((n, lq, m * d))
    if n * lq == 0:
        return output
    sizes = (n, s, m, d, lq, levels, points)
    ptrs = (value.data_ptr(), shapes.data_ptr(), starts.data_ptr(), sampling_locations.data_ptr(),
            attention_weights.data_ptr())
    if value.device.type == "cpu":
        bad = _ext.kernel(op, "cpu")(*ptrs, D.dtype_code(value.dtype), *sizes, output.data_ptr(), D.cpu_threads())
    else:
        device, stream = D.cuda_device_and_stream(value)
        with torch.cuda.device(device):
            _ext.kernel(op, "cuda")(*ptrs, D.dtype_code(value.dtype), D.dtype_code(sampling_locations.dtype),
                                    *sizes, output.data_ptr(), device, stream)
        # One fused reduction and one read-back (a sync), only when finiteness checks are on.
        bad = _config.check_finite("cuda") and not bool(torch.isfinite(output).all() &
                                                   torch.isfinite(sampling_locations).all() &
                                                   torch.isfinite(attention_weights).all())
    if bad and _config.check_finite(value.device.type):
        _raise_nonfinite({"value": value, "sampling_locations": sampling_locations,
                          "attention_weights": attention_weights})
    return output


@ms_deform_attn_forward.register_fake
def _(value, spatial_shapes, level_start_index, sampling_locations, attention_weights):
    n, _, m, d = value.shape
    return value.new_empty((n, sampling_locations.shape[1], m * d))


@torch.library.custom_op("dinokernels::ms_deform_attn_backward", mutates_args=())
def ms_deform_attn_backward(grad_output: Tensor, value: Tensor, spatial_shapes: Tensor, level_start_index: Tensor,
                            sampling_locations: Tensor, attention_weights: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
    """grad_output (N, Lq, M·D) and the forward's inputs → (grad_value, grad_sampling_locations,
    grad_attention_weights), each shaped and typed like its input."""
    op = "ms_deform_attn_backward"
    n, s, m, d, lq, levels, points = _check_kernel_inputs(op, value, spatial_shapes, level_start_index,
                                                          sampling_locations, attention_weights)
    if grad_output.shape != (n, lq, m * d):
        raise D.arg_error(op, "grad_output", f"must be {(n, lq, m * d)}, got {tuple(grad_output.shape)}")
    shapes, starts = _host_levels(spatial_shapes, level_start_index)
    _check_total(shapes, s)
    grad_output = grad_output.to(device=value.device, dtype=value.dtype).contiguous()
    grad_loc = torch.empty_like(sampling_locations)
    grad_attn = torch.empty_like(attention_weights)
    sizes = (n, s, m, d, lq, levels, points)
    ptrs = (grad_output.data_ptr(), value.data_ptr(), shapes.data_ptr(), starts.data_ptr(),
            sampling_locations.data_ptr(), attention_weights.data_ptr())
    if n * lq == 0:
        return torch.zeros_like(value), grad_loc, grad_attn
    if value.device.type == "cpu":
        grad_value = torch.empty_like(value)
        code, threads = D.dtype_code(value.dtype), D.cpu_threads()
        nbytes = _ext.module().ms_deform_attn_backward_workspace_bytes_cpu(n, s, m, d, lq, levels, points, code,
                                                                             threads)
        ws = D.workspace(nbytes, value.device)
        _ext.kernel(op, "cpu")(*ptrs, code, *sizes, grad_value.data_ptr(), grad_loc.data_ptr(),
                               grad_attn.data_ptr(), ws.data_ptr(), nbytes, threads)
        return grad_value, grad_loc, grad_attn
    device, stream = D.cuda_device_and_stream(value)
    with torch.cuda.device(device):
        # float32 accumulation buffer for the atomics, cast afterwards (16-bit atomics would round every add).
        grad_value32 = torch.zeros(value.shape, dtype=torch.float32, device=value.device)
        _ext.kernel(op, "cuda")(*ptrs, D.dtype_code(value.dtype), D.dtype_code(sampling_locations.dtype), *sizes,
                                grad_value32.data_ptr(), grad_loc.data_ptr(), grad_attn.data_ptr(), device, stream)
    grad_value = grad_value32 if value.dtype == torch.float32 else grad_value32.to(value.dtype)
    return grad_value, grad_loc, grad_attn


@ms_deform_attn_backward.register_fake
def _(grad_output, value, spatial_shapes, level_start_index, sampling_locations, attention_weights):
    return torch.empty_like(value), torch.empty_like(sampling_locations), torch.empty_like(attention_weights)


def _setup_context(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _backward(ctx, grad_output):
    value, spatial_shapes, level_start_index, sampling_locations, attention_weights = ctx.saved_tensors
    grad_value, grad_loc, grad_attn = ms_deform_attn_backward(grad_output, value, spatial_shapes, level_start_index,
                                                              sampling_locations, attention_weights)
    return grad_value, None, None, grad_loc, grad_attn


ms_deform_attn_forward.register_autograd(_backward, setup_context=_setup_context)


def _check_public(value, spatial_shapes, level_start_index, sampling_locations, attention_weights):
    op = _OP
    D.check_tensor(op, "value", value, 4, "(N, S, M, D)")
    D.check_tensor(op, "sampling_locations", sampling_locations, 6, "(N, Lq, M, L, P, 2) normalised (x, y)")
    D.check_tensor(op, "attention_weights", attention_weights, 5, "(N, Lq, M, L, P)")
    for name, t, ndim, doc in (("spatial_shapes", spatial_shapes, 2, "(L, 2) of (H, W)"),
                               ("level_start_index", level_start_index, 1, "(L,)")):
        if not isinstance(t, torch.Tensor):
            raise D.arg_error(op, name, f"must be a torch.Tensor, got {type(t).__name__}", TypeError)
        if t.dim() != ndim:
            raise D.arg_error(op, name, f"must be {ndim}-D {doc}, got shape {tuple(t.shape)}")
        if t.is_floating_point() or t.is_complex() or t.dtype == torch.bool:
            raise D.arg_error(op, name, f"must have an integer dtype (int64), got {t.dtype}", TypeError)
        if t.device.type != "cpu" and t.device != value.device:
            raise D.arg_error(op, name, f"must be on the CPU or on {value.device}, got {t.device}")
    n, s, m, d = value.shape
    levels = spatial_shapes.shape[0]
    if spatial_shapes.shape[1] != 2:
        raise D.arg_error(op, "spatial_shapes", f"must be (L, 2) of (H, W), got shape {tuple(spatial_shapes.shape)}")
    if level_start_index.shape[0] != levels:
        raise D.arg_error(op, "level_start_index", f"must have L={levels} entries like spatial_shapes, got shape "
                                                   f"{tuple(level_start_index.shape)}")
    if not 1 <= levels <= MAX_LEVELS:
        raise D.arg_error(op, "spatial_shapes", f"must have 1 to {MAX_LEVELS} levels, got L={levels}")
    for name, t in (("sampling_locations", sampling_locations), ("attention_weights", attention_weights)):
        if t.device != value.device:
            raise D.arg_error(op, name, f"must be on {value.device} like value, got {t.device}")
    if m < 1 or d < 1 or s < 1:
        raise D.arg_error(op, "value", f"needs S, M, D >= 1, got shape {tuple(value.shape)}")
    lq, points = sampling_locations.shape[1], sampling_locations.shape[4]
    if tuple(sampling_locations.shape) != (n, lq, m, levels, points, 2):
        raise D.arg_error(op, "sampling_locations", f"must be (N, Lq, M, L, P, 2) = ({n}, Lq, {m}, {levels}, P, 2) "
                                                    f"for value {tuple(value.shape)} and L={levels} levels, got "
                                                    f"{tuple(sampling_locations.shape)}")
    if not 1 <= points <= MAX_POINTS:
        raise D.arg_error(op, "sampling_locations", f"must have 1 to {MAX_POINTS} points per level, got P={points}")
    if tuple(attention_weights.shape) != (n, lq, m, levels, points):
        raise D.arg_error(op, "attention_weights", f"must be (N, Lq, M, L, P) = {(n, lq, m, levels, points)}, got "
                                                   f"{tuple(attention_weights.shape)}")


def _reference(value, spatial_shapes, level_start_index, sampling_locations, attention_weights):
    """The reference backend with the kernel path's value checks: the level table always (the reference reads it
    anyway), NaN/inf in locations and weights before, and a non-finite output after (DINOKERNELS_CHECK_FINITE),
    with the kernels' errors. 16-bit CPU input is computed in float32, as the CPU kernel does."""
    inputs = {"value": value, "sampling_locations": sampling_locations, "attention_weights": attention_weights}
    if not torch.compiler.is_compiling():
        shapes = spatial_shapes.detach().to("cpu", torch.int64)
        _check_level_values(shapes, level_start_index.detach().to("cpu", torch.int64))
        _check_total(shapes, value.shape[1])
    checked = D.checks_values(value.device)
    if checked and (D.nonfinite_count(sampling_locations) or D.nonfinite_count(attention_weights)):
        D.check_finite_inputs(_OP, inputs)  # names the first input holding NaN/inf, value included, as the kernels

    def reference(value, sampling_locations, attention_weights):
        if value.device.type == "cpu" and value.dtype in D.HALF_DTYPES:
            value = value.float()
        # grid_sample needs the grid in the value's dtype
        return ms_deform_attn_ref(value, spatial_shapes, level_start_index, sampling_locations.to(value.dtype),
                                  attention_weights.to(value.dtype))

    if not checked:
        return reference(**inputs).to(value.dtype)
    out = D.run_reference(reference, inputs, lambda r: not bool(torch.isfinite(r).all()))
    if not bool(torch.isfinite(out).all()):
        _raise_nonfinite(inputs)
    return out.to(value.dtype)


def ms_deform_attn(value: Tensor, spatial_shapes: Tensor, level_start_index: Tensor, sampling_locations: Tensor,
                   attention_weights: Tensor) -> Tensor:
    """Multi-scale deformable attention, Deformable-DETR layout.

    value (N, S, M, D) with S = Σ_l H_l·W_l (levels concatenated, row-major inside a level);
    spatial_shapes (L, 2) integer (H_l, W_l); level_start_index (L,) integer, the exclusive prefix sum of H_l·W_l;
    sampling_locations (N, Lq, M, L, P, 2) normalised (x, y), (0, 0) the top-left image corner;
    attention_weights (N, Lq, M, L, P) (normally softmaxed over L·P)
    → (N, Lq, M·D): Σ_{l,p} a·bilinear(value, x·W_l − 0.5, y·H_l − 0.5) with zero padding
    (grid_sample bilinear, align_corners=False, padding zeros), exactly as the official CUDA kernel (a sample with
    x·W − 0.5 or y·H − 0.5 outside (−1, W) / (−1, H) is skipped).

    Differentiable in value, sampling_locations and attention_weights. L ≤ 8, P ≤ 16, any N, Lq ≥ 0, D ≥ 1.
    CPU: float32/float64 (16-bit input is computed in float32 and cast back); CUDA: value float32/float16/bfloat16,
    locations and weights float32 or value's dtype (others are cast to float32), float32 arithmetic throughout.
    The output has value's dtype. Raises ValueError/TypeError naming the argument for bad shapes, dtypes, devices
    or level tables, and (DINOKERNELS_CHECK_FINITE) for non-finite inputs.
    """
    _check_public(value, spatial_shapes, level_start_index, sampling_locations, attention_weights)
    if D.use_reference("ms_deform_attn_forward", value.device):
        return _reference(value, spatial_shapes, level_start_index, sampling_locations, attention_weights)
    out_dtype = value.dtype
    if value.device.type == "cpu":
        if value.dtype not in D.CPU_DTYPES:
            value = value.float()
        sampling_locations = sampling_locations.to(value.dtype)
        attention_weights = attention_weights.to(value.dtype)
    else:
        D.check_kernel_dtype(_OP, "value", value)
        loc_dtype = value.dtype if (sampling_locations.dtype == value.dtype
                                    and attention_weights.dtype == value.dtype) else torch.float32
        sampling_locations = sampling_locations.to(loc_dtype)
        attention_weights = attention_weights.to(loc_dtype)
    out = ms_deform_attn_forward(value.contiguous(), spatial_shapes, level_start_index,
                                 sampling_locations.contiguous(), attention_weights.contiguous())
    return out.to(out_dtype)
