"""DINO's projection head (SPEC §2.2): the official DINOHead's architecture, parameter names and initialisation.

MLP (Linear/[BN]/GELU, keys mlp.0, mlp.2, mlp.4 without BN) → L2 normalisation → weight-normalised
Linear(bottleneck, out_dim, bias=False) whose parameters are `last_layer.weight_g` (out_dim, 1) and
`last_layer.weight_v` (out_dim, bottleneck), the names torch.nn.utils.weight_norm gives them and the names in the
official checkpoints.

Difference from the official code, deliberate: the weight norm is a small module of its own (WeightNormLinear) with
the same two parameters and the same arithmetic (W = g·v/‖v‖ per output row), instead of the deprecated forward-
pre-hook torch.nn.utils.weight_norm. It copies with copy.deepcopy (the hook's cached `weight` tensor does not, once a
forward has run), needs no deprecation warning silenced, and also loads state dicts written with the newer
parametrization names (`last_layer.parametrizations.weight.original0/1`).
"""
import math
from typing import List

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["DINOHead", "WeightNormLinear"]

_PARAMETRIZED = {"parametrizations.weight.original0": "weight_g", "parametrizations.weight.original1": "weight_v"}


class WeightNormLinear(nn.Module):
    """Linear map without bias, weight = weight_g · weight_v / ‖weight_v‖ (norm of each output row).

    Parameters `weight_g` (out_features, 1) and `weight_v` (out_features, in_features), in that order, initialised as
    torch.nn.utils.weight_norm(nn.Linear(in_features, out_features, bias=False)) initialises them: v is the default
    nn.Linear weight and g its row norms. Like the official code, no epsilon: an all-zero row of v gives NaN.
    """

    def __init__(self, in_features: int, out_features: int):
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        v = torch.empty(out_features, in_features)
        nn.init.kaiming_uniform_(v, a=math.sqrt(5))  # nn.Linear's default weight init
        self.weight_g = nn.Parameter(torch.linalg.vector_norm(v, dim=1, keepdim=True))
        self.weight_v = nn.Parameter(v)

    @property
    def weight(self) -> Tensor:
        v = self.weight_v
        return v * (self.weight_g / torch.linalg.vector_norm(v, dim=1, keepdim=True))

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.weight)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        for new, old in _PARAMETRIZED.items():
            if prefix + new in state_dict and prefix + old not in state_dict:
                state_dict[prefix + old] = state_dict.pop(prefix + new)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias=False"


class DINOHead(nn.Module):
    """forward(x (B, in_dim)) -> logits (B, out_dim).

    Linear(in, hidden) [BN] GELU, (nlayers − 2) × (Linear(hidden, hidden) [BN] GELU), Linear(hidden, bottleneck)
    (nlayers == 1: a single Linear(in, bottleneck)); trunc-normal(0.02) weights, zero biases; then
    F.normalize(p=2, dim=-1, eps=1e-12) and the weight-normalised last layer with g filled with 1. With
    norm_last_layer (the default) g is frozen (requires_grad False), so the logits are cosines, |z| ≤ 1.
    """

    def __init__(self, in_dim: int, out_dim: int, use_bn: bool = False, norm_last_layer: bool = True,
                 nlayers: int = 3, hidden_dim: int = 2048, bottleneck_dim: int = 256):
        super().__init__()
        n_linear = max(nlayers, 1)  # nlayers < 1 behaves as 1, as in the official head
        widths = [in_dim] + [hidden_dim] * (n_linear - 1) + [bottleneck_dim]
        if n_linear == 1:
            self.mlp = nn.Linear(in_dim, bottleneck_dim)
        else:
            # Every Linear but the last is followed by [BatchNorm1d] GELU; the Sequential indices are the state-dict
            # keys (mlp.0, mlp.2, mlp.4 without BN).
            modules: List[nn.Module] = []
            for k in range(n_linear):
                modules.append(nn.Linear(widths[k], widths[k + 1]))
                if k < n_linear - 1:
                    modules.extend([nn.BatchNorm1d(widths[k + 1]), nn.GELU()] if use_bn else [nn.GELU()])
            self.mlp = nn.Sequential(*modules)
        # Re-initialise after all the Linears are built (the random draws then come in the official order).
        for module in self.mlp.modules():
            if isinstance(module, nn.Linear):
                nn.init.trunc_normal_(module.weight, std=0.02)
                nn.init.zeros_(module.bias)
        self.last_layer = WeightNormLinear(bottleneck_dim, out_dim)
        with torch.no_grad():
            self.last_layer.weight_g.fill_(1.0)
        # norm_last_layer: g stays 1, so the last layer's rows are unit vectors and the logits cosines.
        self.last_layer.weight_g.requires_grad_(not norm_last_layer)

    def forward(self, x: Tensor) -> Tensor:
        return self.last_layer(F.normalize(self.mlp(x), p=2, dim=-1))
