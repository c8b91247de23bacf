"""DINO v1's optimiser pieces (SPEC §2.4), as in facebookresearch/dino utils.py: parameter groups (weight decay on
group 0 only), per-tensor gradient clipping, cancelling the last layer's gradients during the first epochs."""
from typing import Dict, List

import torch
from torch import nn

__all__ = ["get_params_groups", "clip_gradients", "cancel_gradients_last_layer", "build_optimizer", "LARS"]


def get_params_groups(model: nn.Module) -> List[Dict]:
    """[{'params': regularized}, {'params': not_regularized, 'weight_decay': 0.}]: biases and every 1-D parameter
    (norm weights, ...) are not regularised; parameters that do not require gradients are left out (the frozen
    weight-norm scale of the head's last layer). The trainer sets group 0's weight decay every iteration."""
    regularized, not_regularized = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        if name.endswith(".bias") or len(param.shape) == 1:
            not_regularized.append(param)
        else:
            regularized.append(param)
    return [{"params": regularized}, {"params": not_regularized, "weight_decay": 0.0}]


@torch.no_grad()
def clip_gradients(model: nn.Module, clip: float) -> List[float]:
    """Per-parameter-tensor clipping: each gradient g is scaled by clip/(‖g‖₂ + 1e-6) when that is < 1.
    Returns the norms before clipping, in named_parameters order (as the official code; each norm is one host read,
    so the trainer computes them only when clipping is on)."""
    grads = [p.grad for _, p in model.named_parameters() if p.grad is not None]
    if not grads:
        return []
    norms = torch.stack([torch.linalg.vector_norm(g.detach(), 2.0).float() for g in grads])
    coefs = clip / (norms + 1e-6)
    for g, coef in zip(grads, coefs):
        # Multiply by min(coef, 1): for coef ≥ 1 that is ×1.0, a no-op, which avoids a host read per tensor.
        g.mul_(torch.clamp(coef, max=1.0).to(g.dtype))
    return norms.tolist()


def cancel_gradients_last_layer(epoch: int, model: nn.Module, freeze_last_layer: int) -> None:
    """During the first `freeze_last_layer` epochs the gradients of every parameter whose name contains
    "last_layer" are set to None, so the optimiser skips them entirely (no AdamW moment or decay update)."""
    if epoch >= freeze_last_layer:
        return
    for name, param in model.named_parameters():
        if "last_layer" in name:
            param.grad = None


class LARS(torch.optim.Optimizer):
    """DINO's LARS (utils.LARS, from Barlow Twins), for convnets and large batches. For every tensor that is not
    1-D: g ← g + wd·p, then g ← g·η‖p‖/‖g‖ (×1 when either norm is 0); 1-D tensors (biases, norms) get neither.
    Then μ ← momentum·μ + g and p ← p − lr·μ. The `weight_decay_filter` / `lars_adaptation_filter` arguments of
    the official class are accepted and, as there, unused."""

    def __init__(self, params, lr=0, weight_decay=0, momentum=0.9, eta=0.001, weight_decay_filter=None,
                 lars_adaptation_filter=None):
        if lr < 0 or weight_decay < 0 or momentum < 0 or eta <= 0:
            raise ValueError(f"LARS needs lr, weight_decay, momentum >= 0 and eta > 0, got lr={lr}, "
                             f"weight_decay={weight_decay}, momentum={momentum}, eta={eta}")
        defaults = dict(lr=lr, weight_decay=weight_decay, momentum=momentum, eta=eta,
                        weight_decay_filter=weight_decay_filter, lars_adaptation_filter=lars_adaptation_filter)
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                update = p.grad
                if p.ndim != 1:
                    update = update.add(p, alpha=group["weight_decay"])
                    param_norm, update_norm = torch.linalg.vector_norm(p), torch.linalg.vector_norm(update)
                    # Device-side where: no host read per tensor.
                    trust = torch.where((param_norm > 0) & (update_norm > 0),
                                        group["eta"] * param_norm / update_norm, torch.ones_like(param_norm))
                    update = update.mul(trust)
                state = self.state[p]
                if "mu" not in state:
                    state["mu"] = torch.zeros_like(p)
                state["mu"].mul_(group["momentum"]).add_(update)
                p.add_(state["mu"], alpha=-group["lr"])
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
