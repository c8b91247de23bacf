"""Pure-PyTorch reference for sinkhorn_knopp (SPEC §3.3) in the log domain.

The plain iterations (SPEC §3.3; sinkhorn_knopp_plain below) work on exp(z/τ) directly and overflow once
z/τ > 88.7. Every plain step is a row or column normalisation, so the result is
P_bk = exp(a_bk + α_k + β_b) with a = z/τ and per-prototype / per-sample log-scalings:

    α_k ← −LSE_b(a_bk + β_b)   (sum over all samples of all ranks)
    β_b ← −LSE_k(a_bk + α_k)

starting from β = 0. The plain form's global normalisation and its /K, /B_g factors are uniform scalings that the
next normalisation cancels, so this equals the plain result wherever that is finite, and it is finite for
any finite logits. Across ranks, LSE_b is formed from per-rank (max, Σexp) pairs: an all-reduce MAX of the
maxima, then an all-reduce SUM of the rescaled sums.
"""
from typing import Optional

import torch
from torch import Tensor


def distributed_world(process_group=None) -> Optional[object]:
    """The process group to all-reduce over, or None for single-process use (torch.distributed absent,
    uninitialised, or a world of one)."""
    dist = torch.distributed
    if not (dist.is_available() and dist.is_initialized()):
        return None
    group = process_group if process_group is not None else dist.group.WORLD
    return group if dist.get_world_size(group) > 1 else None


def combine_prototype_stats(local_max: Tensor, local_sumexp: Tensor, group) -> Tensor:
    """Per-rank (max, Σexp(· − max)) over samples → global −LSE per prototype (K,) = α."""
    dist = torch.distributed
    global_max = local_max.clone()
    if group is not None:
        dist.all_reduce(global_max, op=dist.ReduceOp.MAX, group=group)
    # A rank with no samples has max −inf and sum 0: its rescaled sum is 0 (exp(−inf) = 0), never NaN.
    scale = torch.where(torch.isinf(local_max) & (local_max < 0), torch.zeros_like(local_max),
                        torch.exp(local_max - global_max))
    total = local_sumexp * scale
    if group is not None:
        dist.all_reduce(total, group=group)
    return -(global_max + torch.log(total))


def sinkhorn_knopp_ref(teacher_logits: Tensor, teacher_temp: float, n_iterations: int = 3,
                       process_group=None) -> Tensor:
    """teacher_logits (N, K) → (N, K) targets, each row summing to 1; float32 (float64 for float64 input)."""
    compute = torch.float64 if teacher_logits.dtype == torch.float64 else torch.float32
    a = teacher_logits.detach().to(compute) / teacher_temp
    group = distributed_world(process_group)
    beta = torch.zeros(a.shape[0], 1, dtype=compute, device=a.device)
    alpha = None
    for _ in range(n_iterations):
        shifted = a + beta
        if shifted.shape[0] > 0:
            local_max = shifted.max(dim=0).values
            local_sum = torch.exp(shifted - local_max).sum(dim=0)
        else:
            local_max = torch.full((a.shape[1],), float("-inf"), dtype=compute, device=a.device)
            local_sum = torch.zeros(a.shape[1], dtype=compute, device=a.device)
        alpha = combine_prototype_stats(local_max, local_sum, group)
        beta = -torch.logsumexp(a + alpha, dim=1, keepdim=True)
    return torch.exp(a + alpha + beta)


def sinkhorn_knopp_plain(teacher_logits: Tensor, teacher_temp: float, n_iterations: int = 3,
                         process_group=None) -> Tensor:
    """teacher_logits (N, K) → (N, K): SPEC §3.3 step by step on P = exp(z/τ) itself, with no max subtraction, so
    it overflows (inf, then NaN) once z/τ > 88.72 in float32 (≈ 709.78 in float64), as the published teacher does.
    Written here from the math to pin that behaviour and to benchmark the plain form; not used by the ops.
    Arithmetic in float32 (float64 for float64 input). Across ranks the grand total and the per-prototype sums
    are all-reduced, the per-sample sums are local, and B_g is the total row count."""
    dist = torch.distributed
    group = distributed_world(process_group)
    compute = torch.float64 if teacher_logits.dtype == torch.float64 else torch.float32
    plan = torch.exp(teacher_logits.detach().to(compute) / teacher_temp)  # (N, K): samples × prototypes
    n_prototypes = plan.shape[1]
    n_samples = torch.tensor(float(plan.shape[0]), dtype=compute, device=plan.device)
    grand_total = plan.sum()
    if group is not None:
        dist.all_reduce(n_samples, group=group)
        dist.all_reduce(grand_total, group=group)
    plan = plan / grand_total
    for _ in range(n_iterations):
        # Each prototype gets mass 1/K over all samples of all ranks ...
        per_prototype = plan.sum(dim=0, keepdim=True)  # (1, K)
        if group is not None:
            dist.all_reduce(per_prototype, group=group)
        plan = plan / (per_prototype * n_prototypes)
        # ... then each sample mass 1/B_g.
        plan = plan / (plan.sum(dim=1, keepdim=True) * n_samples)
    return plan * n_samples
