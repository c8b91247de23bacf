"""DINO v1's optimiser pieces (SPEC §2.4): two parameter groups (weight decay on the first only), gradient clipping
per parameter tensor, dropping the head's last-layer gradients in the first epochs, and LARS."""
from typing import Dict, List

import torch
from torch import nn

__all__ = ["get_params_groups", "clip_gradients", "cancel_gradients_last_layer", "build_optimizer", "LARS"]


def get_params_groups(model: nn.Module) -> List[Dict]:
    """The trainable parameters of `model` in named_parameters order, split as [{'params': decayed},
    {'params': exempt, 'weight_decay': 0.0}]. Exempt: biases and every 1-D tensor (norm scales, ...). Frozen
    parameters (requires_grad False, e.g. the weight-norm scale of a normalised last layer) are in neither. The
    trainer sets group 0's weight decay from its schedule every iteration."""
    by_exemption: Dict[bool, List[nn.Parameter]] = {False: [], True: []}
    for name, param in model.named_parameters():
        if param.requires_grad:
            by_exemption[param.dim() == 1 or name.endswith(".bias")].append(param)
    return [{"params": by_exemption[False]}, {"params": by_exemption[True], "weight_decay": 0.0}]


@torch.no_grad()
def clip_gradients(model: nn.Module, clip: float) -> List[float]:
    """Per-parameter-tensor clipping: each gradient g is scaled by clip/(‖g‖₂ + 1e-6) when that is < 1.
    Returns the norms before clipping, in named_parameters order (as the official code; each norm is one host read,
    so the trainer computes them only when clipping is on). FSDP-sharded gradients are clipped by the norms of the
    whole tensors (every rank must call this)."""
    from .distributed import global_grad_norms, is_sharded, local_part

    grads = [p.grad for _, p in model.named_parameters() if p.grad is not None]
    if not grads:
        return []
    if any(is_sharded(g) for g in grads):  # FSDP: whole-tensor norms from every rank's shard, one all-reduce
        norms = global_grad_norms([[g] for g in grads]).to(local_part(grads[0]).device)
    else:
        norms = torch.stack([torch.linalg.vector_norm(g.detach(), 2.0).float() for g in grads])
    coefs = clip / (norms + 1e-6)
    for g, coef in zip(grads, coefs):
        # Multiply by min(coef, 1): for coef ≥ 1 that is ×1.0, a no-op, which avoids a host read per tensor.
        g = local_part(g)
        g.mul_(torch.clamp(coef, max=1.0).to(g.dtype))
    return norms.tolist()


def cancel_gradients_last_layer(epoch: int, model: nn.Module, freeze_last_layer: int) -> None:
    """While epoch < freeze_last_layer, drop (set to None) the gradient of every parameter with "last_layer" in
    its name, so that the optimiser leaves it alone: no step, no AdamW moments, no decay."""
    if epoch < freeze_last_layer:
        frozen = [param for name, param in model.named_parameters() if "last_layer" in name]
        for param in frozen:
            param.grad = None


class LARS(torch.optim.Optimizer):
    """Layer-wise adaptive rate scaling with momentum, as DINO offers it for convnets and large batches
    (SPEC §2.4). Per tensor with a gradient g:

    - a tensor that is not 1-D: d = g + wd·p, scaled by the trust ratio η‖p‖/‖d‖ (1 when ‖p‖ or ‖d‖ is 0);
    - a 1-D tensor (bias, norm scale): d = g, neither decayed nor scaled;

    then μ ← momentum·μ + d (μ starts at 0) and p ← p − lr·μ. `weight_decay_filter` and `lars_adaptation_filter`
    are accepted for signature compatibility with DINO's class, which ignores them as well.
    """

    def __init__(self, params, lr=0, weight_decay=0, momentum=0.9, eta=0.001, weight_decay_filter=None,
                 lars_adaptation_filter=None):
        if lr < 0 or weight_decay < 0 or momentum < 0 or eta <= 0:
            raise ValueError(f"LARS needs lr, weight_decay, momentum >= 0 and eta > 0, got lr={lr}, "
                             f"weight_decay={weight_decay}, momentum={momentum}, eta={eta}")
        super().__init__(params, {"lr": lr, "weight_decay": weight_decay, "momentum": momentum, "eta": eta,
                                  "weight_decay_filter": weight_decay_filter,
                                  "lars_adaptation_filter": lars_adaptation_filter})

    @staticmethod
    def _direction(param: torch.Tensor, weight_decay: float, eta: float) -> torch.Tensor:
        """The step direction d for one tensor, before momentum."""
        grad = param.grad
        if param.dim() == 1:
            return grad
        decayed = grad.add(param, alpha=weight_decay)
        param_norm = torch.linalg.vector_norm(param)
        decayed_norm = torch.linalg.vector_norm(decayed)
        # Chosen on the device (no host read per tensor); a zero norm leaves the direction unscaled.
        both_positive = (param_norm > 0) & (decayed_norm > 0)
        trust = torch.where(both_positive, eta * param_norm / decayed_norm, torch.ones_like(param_norm))
        return decayed.mul(trust)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            with_grad = [param for param in group["params"] if param.grad is not None]
            for param in with_grad:
                direction = self._direction(param, group["weight_decay"], group["eta"])
                # "mu" is DINO's state key, so optimiser state dicts carry over between the two classes.
                velocity = self.state[param].setdefault("mu", torch.zeros_like(param))
                velocity.mul_(group["momentum"]).add_(direction)
                param.add_(velocity, alpha=-group["lr"])
        return loss


def build_optimizer(name: str, params_groups: List[Dict]) -> torch.optim.Optimizer:
    """adamw (default betas; for ViTs), sgd (momentum 0.9) or lars (momentum 0.9, η = 0.001; convnets, large
    batches), as main_dino.py. The learning rate and weight decay are set by the schedules every iteration, so
    the constructor values do not matter."""
    if name == "adamw":
        return torch.optim.AdamW(params_groups)
    if name == "sgd":
        return torch.optim.SGD(params_groups, lr=0, momentum=0.9)
    if name == "lars":
        return LARS(params_groups)
    raise ValueError(f"optimizer must be 'adamw', 'sgd' or 'lars', got {name!r}")
