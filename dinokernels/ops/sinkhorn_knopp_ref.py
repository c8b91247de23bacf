"""Pure-PyTorch reference for sinkhorn_knopp (SPEC §3.3) in the log domain.

The official iterations (dinov2/loss/dino_clstoken_loss.py) work on exp(z/τ) directly and overflow once
z/τ > 88.7. Every official step is a row or column normalisation, so the result is
P_bk = exp(a_bk + α_k + β_b) with a = z/τ and per-prototype / per-sample log-scalings:

    α_k ← −LSE_b(a_bk + β_b)   (sum over all samples of all ranks)
    β_b ← −LSE_k(a_bk + α_k)

starting from β = 0. The official global normalisation and the /K, /B_g factors are uniform scalings that the
next normalisation cancels, so this equals the official result wherever that is finite, and it is finite for
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


def sinkhorn_knopp_official(teacher_logits: Tensor, teacher_temp: float, n_iterations: int = 3,
                            process_group=None) -> Tensor:
    """The official iterations verbatim (dinov2 SinkhornKnopp teacher, CLS version; float32, overflows for
    z/τ > 88.7): kept for tests and benchmarks, not used by the ops."""
    dist = torch.distributed
    group = distributed_world(process_group)
    compute = torch.float64 if teacher_logits.dtype == torch.float64 else torch.float32
    q = torch.exp(teacher_logits.detach().to(compute) / teacher_temp).t()  # (K, N)
    n_samples = torch.tensor(float(q.shape[1]), dtype=compute, device=q.device)
    if group is not None:
        dist.all_reduce(n_samples, group=group)
    k = q.shape[0]
    total = torch.sum(q)
    if group is not None:
        dist.all_reduce(total, group=group)
    q = q / total
    for _ in range(n_iterations):
        rows = torch.sum(q, dim=1, keepdim=True)
        if group is not None:
            dist.all_reduce(rows, group=group)
        q = q / rows / k
        q = q / torch.sum(q, dim=0, keepdim=True) / n_samples
    return (q * n_samples).t()
