"""Pure-PyTorch reference of linear_sum_assignment: the shortest-augmenting-path Hungarian method with row and
column potentials, written here from the math. Rows are inserted one at a time; each insertion grows a
Dijkstra-like tree over the columns on reduced costs c[i, j] − u[i] − v[j] ≥ 0 until it reaches a free column,
then flips the path. O(n²·m) per problem (n ≤ m after transposing), one vectorised step per tree column.

The fallback when the compiled module is missing (and DINOKERNELS_BACKEND=reference): same outputs as the
registered op dinokernels::linear_sum_assignment, including the status codes, so validation and errors are shared.
"""
import math
from typing import Optional, Tuple

import torch
from torch import Tensor

__all__ = ["linear_sum_assignment_ref"]

SOLVED, INFEASIBLE, INVALID = 0, 1, 2  # the kernels' status codes


def _assign(cost: Tensor) -> Optional[Tensor]:
    """cost (n, m) float64 on the CPU, n ≤ m, no NaN or −inf (+inf: forbidden) → the column of each row (n,), or
    None when the +inf entries leave no complete assignment."""
    n, m = cost.shape
    padded = torch.zeros(n + 1, m + 1, dtype=torch.float64)  # index 0: the virtual column / row of the tree root
    padded[1:, 1:] = cost
    u = torch.zeros(n + 1, dtype=torch.float64)
    v = torch.zeros(m + 1, dtype=torch.float64)
    owner = torch.zeros(m + 1, dtype=torch.int64)  # owner[j]: the row (1-based) holding column j, 0 if free
    for row in range(1, n + 1):
        owner[0] = row
        previous = torch.zeros(m + 1, dtype=torch.int64)  # the tree column before j on the path to j
        dist = torch.full((m + 1,), math.inf, dtype=torch.float64)  # shortest reduced-cost distance to j
        in_tree = torch.zeros(m + 1, dtype=torch.bool)
        column = 0
        while True:
            in_tree[column] = True
            i = int(owner[column])
            reduced = padded[i] - u[i] - v
            shorter = ~in_tree & (reduced < dist)
            dist = torch.where(shorter, reduced, dist)
            previous = torch.where(shorter, torch.full_like(previous, column), previous)
            candidates = torch.where(in_tree, torch.full_like(dist, math.inf), dist)
            nearest = int(torch.argmin(candidates))
            delta = float(candidates[nearest])
            if delta == math.inf:
                return None
            # Shift the potentials so the tree's edges stay tight and `nearest` joins it at reduced cost 0.
            u.index_add_(0, owner[in_tree], torch.full((int(in_tree.sum()),), delta, dtype=torch.float64))
            v[in_tree] -= delta
            dist[~in_tree] -= delta
            column = nearest
            if int(owner[column]) == 0:
                break
        while column:  # flip the path back to the root
            before = int(previous[column])
            owner[column] = owner[before]
            column = before
    assignment = torch.empty(n, dtype=torch.int64)
    held = owner[1:] > 0
    assignment[owner[1:][held] - 1] = torch.arange(m)[held]
    return assignment


def _solve_one(cost: Tensor) -> Tuple[Tensor, Tensor, int]:
    """cost (n, m) → rows ascending (k,), cols (k,), status, k = min(n, m)."""
    empty = torch.empty(0, dtype=torch.int64)
    if not cost.numel():
        return empty, empty, SOLVED
    if bool(torch.isnan(cost).any()) or bool((cost == -math.inf).any()):
        return empty, empty, INVALID
    transposed = cost.shape[0] > cost.shape[1]
    assignment = _assign(cost.T if transposed else cost)
    if assignment is None:
        return empty, empty, INFEASIBLE
    if not transposed:
        return torch.arange(cost.shape[0]), assignment, SOLVED
    order = torch.argsort(assignment)  # column index of the transposed problem is the row here
    return assignment[order], order, SOLVED


def linear_sum_assignment_ref(cost: Tensor, num_rows: Tensor, num_cols: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
    """cost (B, N, M), num_rows / num_cols (B,) int64 (validated) → rows (B, K), cols (B, K) int64 (K = min(N, M),
    −1 padded), status (B,) int32 (0 solved, 1 infeasible, 2 NaN/−inf), on cost's device: the registered op's
    contract. Minimises; the caller negates for maximize."""
    B, N, M = cost.shape
    K = min(N, M)
    rows = torch.full((B, K), -1, dtype=torch.int64)
    cols = torch.full((B, K), -1, dtype=torch.int64)
    status = torch.zeros(B, dtype=torch.int32)
    host = cost.detach().to("cpu", torch.float64)
    for b in range(B):
        n, m = int(num_rows[b]), int(num_cols[b])
        r, c, status[b] = _solve_one(host[b, :n, :m])
        rows[b, :r.numel()] = r
        cols[b, :c.numel()] = c
    return rows.to(cost.device), cols.to(cost.device), status.to(cost.device)
