"""Linear probe: multinomial logistic regression on frozen features (a small, full-batch stand-in for DINO's
eval_linear.py, which trains a linear layer with SGD for 100 epochs on ImageNet)."""
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from ..ops import ibot_patch_loss

__all__ = ["linear_probe"]


def linear_probe(train_features: Tensor, train_labels: Tensor, test_features: Tensor, test_labels: Tensor,
                 epochs: int = 300, lr: float = 0.05, weight_decay: float = 1e-4, num_classes: Optional[int] = None,
                 standardize: bool = True, seed: int = 0) -> float:
    """Top-1 test accuracy in [0, 1] of a linear classifier trained on (train_features, train_labels) with AdamW,
    full batch, cross-entropy, a cosine learning-rate schedule. The cross-entropy is the package's fused soft
    cross-entropy kernel (ibot_patch_loss with one-hot targets, weights 1/N and temperature 1 is the mean CE).
    Features are standardised with the train statistics when `standardize`. Deterministic for a given seed (its
    own generator; the global RNG is untouched)."""
    if train_features.dim() != 2 or test_features.dim() != 2 or train_features.shape[1] != test_features.shape[1]:
        raise ValueError(f"linear_probe: features must be (N, D) and (M, D), got {tuple(train_features.shape)} and "
                         f"{tuple(test_features.shape)}")
    x_train = train_features.detach().float().cpu()
    x_test = test_features.detach().float().cpu()
    y_train = train_labels.detach().long().cpu()
    y_test = test_labels.detach().long().cpu()
    if num_classes is None:
        num_classes = int(max(y_train.max().item(), y_test.max().item())) + 1
    if standardize:
        mean = x_train.mean(0, keepdim=True)
        std = x_train.std(0, keepdim=True).clamp_min(1e-6)
        x_train, x_test = (x_train - mean) / std, (x_test - mean) / std
    g = torch.Generator().manual_seed(seed)
    weight = (torch.randn(num_classes, x_train.shape[1], generator=g) * 0.01).requires_grad_()
    bias = torch.zeros(num_classes, requires_grad=True)
    opt = torch.optim.AdamW([weight, bias], lr=lr, weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, epochs))
    targets = F.one_hot(y_train, num_classes).float()
    weights = torch.full((y_train.shape[0],), 1.0 / y_train.shape[0])
    with torch.enable_grad():
        for _ in range(epochs):
            opt.zero_grad(set_to_none=True)
            loss = ibot_patch_loss(F.linear(x_train, weight, bias), targets, weights, student_temp=1.0)
            loss.backward()
            opt.step()
            sched.step()
    with torch.no_grad():
        pred = F.linear(x_test, weight, bias).argmax(1)
    return float((pred == y_test).float().mean().item())
