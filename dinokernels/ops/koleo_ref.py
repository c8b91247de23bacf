"""Pure-PyTorch references for the KoLeo ops: the executable specification (SPEC §3.5), autograd for free.

The row itself is excluded from its neighbour search with −inf (SPEC's statement sets the diagonal to −1, which
differs only when every other similarity is ≤ −1: antipodal rows, in rounding).
"""
from typing import Optional, Tuple

import torch

from ._dispatch import HALF_DTYPES


def koleo_loss_ref(x: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """x (B, D) → scalar: -mean_i log(‖x̂_i − x̂_nn(i) + 1e-8‖ + eps), x̂ = x / max(‖x‖, eps)."""
    if x.dtype in HALF_DTYPES:
        x = x.float()  # rows are normalised in float32
    unit = x / torch.linalg.vector_norm(x, dim=-1, keepdim=True).clamp_min(eps)
    with torch.no_grad():
        sims = unit @ unit.T
        sims.fill_diagonal_(float("-inf"))
        nn_index = sims.argmax(dim=1)  # first maximal index on ties
    # The 1e-8 is added to the difference (SPEC's eps register) and does not follow eps.
    dists = torch.linalg.vector_norm(unit - unit[nn_index] + 1e-8, dim=-1)
    return -torch.log(dists + eps).mean()


def nearest_neighbors_ref(x: torch.Tensor, y: Optional[torch.Tensor] = None,
                          exclude_self: Optional[bool] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """x (N, D), y (M, D) or None (= x) → (similarity (N,), index (N,) int64): per row of x, the largest inner
    product with a row of y and its index (ties: smallest index), skipping j == i when exclude_self (default:
    y is None). Similarities are float64 for float64 input, float32 otherwise."""
    if exclude_self is None:
        exclude_self = y is None
    if y is None:
        y = x
    compute = torch.float64 if x.dtype == torch.float64 else torch.float32
    sims = x.to(compute) @ y.to(compute).T
    if exclude_self:
        sims = sims.clone()
        k = min(sims.shape)
        sims[torch.arange(k), torch.arange(k)] = float("-inf")
    index = sims.argmax(dim=1)
    return sims.gather(1, index[:, None])[:, 0], index
