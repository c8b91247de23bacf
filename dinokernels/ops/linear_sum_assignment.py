"""linear_sum_assignment: exact batched minimum-cost assignment with scipy.optimize.linear_sum_assignment's
contract per problem (csrc/linear_sum_assignment). Registered op: dinokernels::linear_sum_assignment."""
from typing import List, Tuple, Union

import torch
from torch import Tensor

from .. import _ext
from . import _dispatch as D
from .linear_sum_assignment_ref import linear_sum_assignment_ref

__all__ = ["linear_sum_assignment", "linear_sum_assignment_padded", "linear_sum_assignment_ref"]

_CUDA_LSA_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


@torch.library.custom_op("dinokernels::linear_sum_assignment", mutates_args=())
def linear_sum_assignment_op(cost: Tensor, num_rows: Tensor, num_cols: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
    """cost (B, N, M) contiguous, num_rows/num_cols (B,) int64 on cost's device, validated → rows (B, K),
    cols (B, K) int64 (K = min(N, M), −1 padded), status (B,) int32 (0 solved, 1 infeasible, 2 NaN/−inf)."""
    op = "linear_sum_assignment"
    B, N, M = cost.shape
    K = min(N, M)
    for name, t in (("cost", cost), ("num_rows", num_rows), ("num_cols", num_cols)):
        D.check_contiguous(op, name, t)
    if cost.device.type == "cuda" and B:  # the CUDA kernel trusts the sizes (the CPU one checks them itself)
        for name, t, limit in (("num_rows", num_rows, N), ("num_cols", num_cols, M)):
            if t.shape != (B,) or int(t.min()) < 0 or int(t.max()) > limit:
                raise D.arg_error(op, name, f"must be (B={B},) with entries in [0, {limit}], got {t.tolist()}")
    rows = cost.new_empty((B, K), dtype=torch.int64)
    cols = cost.new_empty((B, K), dtype=torch.int64)
    status = cost.new_zeros((B,), dtype=torch.int32)
    code = D.dtype_code(cost.dtype)
    if cost.device.type == "cpu":
        _ext.kernel(op, "cpu")(cost.data_ptr(), code, B, N, M, num_rows.data_ptr(), num_cols.data_ptr(),
                               rows.data_ptr(), cols.data_ptr(), status.data_ptr(), D.cpu_threads())
    else:
        device, stream = D.cuda_device_and_stream(cost)
        with torch.cuda.device(device):
            nbytes = _ext.module().linear_sum_assignment_workspace_bytes_cuda(B, N, M)
            ws = D.workspace(nbytes, cost.device)
            _ext.kernel(op, "cuda")(cost.data_ptr(), code, B, N, M, num_rows.data_ptr(), num_cols.data_ptr(),
                                    rows.data_ptr(), cols.data_ptr(), status.data_ptr(), ws.data_ptr(), nbytes,
                                    device, stream)
    return rows, cols, status


@linear_sum_assignment_op.register_fake
def _(cost, num_rows, num_cols):
    B, N, M = cost.shape
    K = min(N, M)
    return (cost.new_empty((B, K), dtype=torch.int64), cost.new_empty((B, K), dtype=torch.int64),
            cost.new_empty((B,), dtype=torch.int32))


def _sizes(op: str, arg: str, value, B: int, limit: int) -> Tensor:
    """num_rows / num_cols as a CPU int64 (B,) tensor, range-checked against limit (N or M)."""
    if value is None:
        return torch.full((B,), limit, dtype=torch.int64)
    if isinstance(value, bool):
        raise D.arg_error(op, arg, f"must be an int, a sequence of ints or an integer tensor, got {value!r}",
                          TypeError)
    if isinstance(value, int):
        t = torch.full((B,), value, dtype=torch.int64)
    else:
        if isinstance(value, torch.Tensor):
            if value.is_floating_point() or value.is_complex() or value.dtype == torch.bool:
                raise D.arg_error(op, arg, f"must hold integers, got {value.dtype}", TypeError)
            t = value.detach().to("cpu", torch.int64)
        else:
            try:
                t = torch.as_tensor(list(value))
            except (TypeError, ValueError, RuntimeError):
                t = None
            # Floats are refused, not truncated (2.7 rows is a bug upstream, not 2 rows).
            if t is None or (t.numel() and (t.is_floating_point() or t.is_complex() or t.dtype == torch.bool)):
                raise D.arg_error(op, arg, f"must be an int, a sequence of ints or an integer tensor, got "
                                           f"{value!r}", TypeError) from None
            t = t.to(torch.int64)
        if t.dim() != 1 or t.shape[0] != B:
            raise D.arg_error(op, arg, f"must have one entry per problem (B={B}), got shape {tuple(t.shape)}")
    if B and (int(t.min()) < 0 or int(t.max()) > limit):
        bad = int(((t < 0) | (t > limit)).nonzero()[0, 0])
        raise D.arg_error(op, arg, f"entry {bad} is {int(t[bad])}, must be in [0, {limit}]")
    return t.contiguous()


def _solve(cost: Tensor, num_rows, num_cols, maximize: bool):
    op = "linear_sum_assignment"
    if not isinstance(cost, torch.Tensor):
        raise D.arg_error(op, "cost", f"must be a torch.Tensor, got {type(cost).__name__}", TypeError)
    if cost.dim() not in (2, 3):
        raise D.arg_error(op, "cost", f"must be 2-D (N, M) or 3-D (B, N, M), got shape {tuple(cost.shape)}")
    if cost.device.type not in ("cpu", "cuda"):
        raise D.arg_error(op, "cost", f"must be on a CPU or CUDA device, got {cost.device}")
    if not (cost.is_floating_point() or cost.dtype in (torch.int32, torch.int64, torch.int16, torch.int8,
                                                        torch.uint8)):
        raise D.arg_error(op, "cost", f"must have a real dtype, got {cost.dtype}", TypeError)
    single = cost.dim() == 2
    c = cost.detach().unsqueeze(0) if single else cost.detach()
    B, N, M = c.shape
    rows_n = _sizes(op, "num_rows", num_rows, B, N)
    cols_n = _sizes(op, "num_cols", num_cols, B, M)
    if not c.is_floating_point():
        c = c.double()  # integer costs: exact in float64 up to 2^53
    elif c.device.type == "cpu" and c.dtype not in D.CPU_DTYPES:
        c = c.float()
    if maximize:
        c = -c
    device = c.device
    # Both backends return the same status codes, so the errors below are the same on each.
    solve = linear_sum_assignment_ref if D.use_reference(op, device) else linear_sum_assignment_op
    rows, cols, status = solve(c.contiguous(), rows_n.to(device), cols_n.to(device))
    status = status.cpu()
    if bool((status != 0).any()):
        b = int((status != 0).nonzero()[0, 0])
        where = "" if single else f" (problem {b})"
        if int(status[b]) == 2:
            raise D.arg_error(op, "cost", f"contains invalid numeric entries{where}: NaN, or "
                                          f"{'+inf with maximize=True' if maximize else '-inf'}")
        raise D.arg_error(op, "cost", f"is infeasible{where}: its +inf entries leave no complete assignment "
                                      f"(scipy: 'cost matrix is infeasible')")
    return rows, cols, torch.minimum(rows_n, cols_n), single


def linear_sum_assignment_padded(cost: Tensor, num_rows=None, num_cols=None,
                                 maximize: bool = False) -> Tuple[Tensor, Tensor, Tensor]:
    """As linear_sum_assignment, but returns padded tensors: rows (B, K), cols (B, K) int64 on cost's device with
    K = min(N, M), entries past counts[b] = min(num_rows[b], num_cols[b]) are −1; counts (B,) int64 on the CPU.
    A 2-D cost gives B = 1."""
    rows, cols, counts, _ = _solve(cost, num_rows, num_cols, maximize)
    return rows, cols, counts


def linear_sum_assignment(cost: Tensor, num_rows=None, num_cols=None,
                          maximize: bool = False) -> Union[Tuple[Tensor, Tensor], List[Tuple[Tensor, Tensor]]]:
    """Exact minimum-cost (or maximum with maximize=True) rectangular assignment, batched.

    cost (N, M) → (rows, cols) like scipy.optimize.linear_sum_assignment; cost (B, N, M) with optional per-problem
    sizes num_rows, num_cols (int, sequence or integer tensor (B,); problem b is cost[b, :num_rows[b],
    :num_cols[b]]) → list of B (rows, cols) pairs. rows ascending, min(n, m) pairs, int64 on cost's device.
    The total cost equals scipy's (ties may be broken differently; on the CPU the algorithm and tie-break are
    scipy's own, so continuous costs give scipy's assignment). +inf marks a forbidden pair; NaN and −inf (and a
    problem left without a complete assignment: "infeasible") raise ValueError naming the problem. CPU: float32,
    float64 (integer and 16-bit costs are converted), problems over OpenMP threads; CUDA: float32, float64,
    float16, bfloat16, all problems in one launch. Potentials in float64 on both. The reference backend (and the
    fallback without the compiled module) solves in pure PyTorch (linear_sum_assignment_ref): same totals, same
    errors. No gradient.
    """
    rows, cols, counts, single = _solve(cost, num_rows, num_cols, maximize)
    out = [(rows[b, :k], cols[b, :k]) for b, k in enumerate(counts.tolist())]
    return out[0] if single else out
