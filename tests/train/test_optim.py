"""Parameter groups, per-tensor gradient clipping, freezing the last layer (official utils.py semantics)."""
import copy

import pytest
import torch
from torch import nn

from dinokernels.models.dino import DINOHead, MultiCropWrapper, build_backbone
from dinokernels.train.optim import (LARS, build_optimizer, cancel_gradients_last_layer, clip_gradients,
                                     get_params_groups)


def _model(norm_last_layer=True):
    backbone, dim = build_backbone("vit_nano", patch_size=4, img_size=16)
    return MultiCropWrapper(backbone, DINOHead(dim, 32, norm_last_layer=norm_last_layer, hidden_dim=16,
                                               bottleneck_dim=8))


def official_get_params_groups(model):
    regularized, not_regularized = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        if name.endswith(".bias") or len(param.shape) == 1:
            not_regularized.append(param)
        else:
            regularized.append(param)
    return [{'params': regularized}, {'params': not_regularized, 'weight_decay': 0.}]


def official_clip_gradients(model, clip):
    norms = []
    for name, p in model.named_parameters():
        if p.grad is not None:
            param_norm = p.grad.data.norm(2)
            norms.append(param_norm.item())
            clip_coef = clip / (param_norm + 1e-6)
            if clip_coef < 1:
                p.grad.data.mul_(clip_coef)
    return norms


@pytest.mark.parametrize("norm_last_layer", [True, False])
def test_params_groups(norm_last_layer):
    model = _model(norm_last_layer)
    groups = get_params_groups(model)
    ref = official_get_params_groups(model)
    assert [[id(p) for p in g["params"]] for g in groups] == [[id(p) for p in g["params"]] for g in ref]
    assert groups[1]["weight_decay"] == 0.0 and "weight_decay" not in groups[0]
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = {names[id(p)] for p in groups[0]["params"]}
    exempt = {names[id(p)] for p in groups[1]["params"]}
    assert all(p.dim() > 1 for p in groups[0]["params"])
    assert not any(n.endswith(".bias") for n in decayed)
    assert {"backbone.cls_token", "backbone.pos_embed", "backbone.patch_embed.proj.weight"} <= decayed
    assert {"backbone.norm.weight", "backbone.norm.bias", "backbone.blocks.0.norm1.weight"} <= exempt
    g_name = [n for n, _ in model.named_parameters() if n.endswith("weight_g")]
    # the frozen weight-norm scale is in no group; a trainable one (1-D? no: (K, 1)) is decayed like the official
    assert all((n in decayed) == (not norm_last_layer) for n in g_name)
    assert len(decayed) + len(exempt) == sum(p.requires_grad for p in model.parameters())


def test_clip_gradients_matches_official():
    model = _model()
    x = [torch.randn(3, 3, 16, 16), torch.randn(3, 3, 8, 8)]
    (model(x) ** 2).sum().mul(50).backward()
    twin = copy.deepcopy(model)
    for p, q in zip(model.parameters(), twin.parameters()):
        q.grad = None if p.grad is None else p.grad.clone()
    for clip in (3.0, 0.05):
        norms = clip_gradients(model, clip)
        ref_norms = official_clip_gradients(twin, clip)
        assert norms == pytest.approx(ref_norms, rel=1e-6)
        for (n, p), (_, q) in zip(model.named_parameters(), twin.named_parameters()):
            if p.grad is not None:
                torch.testing.assert_close(p.grad, q.grad, rtol=1e-6, atol=0, msg=n)
    post = [p.grad.norm().item() for p in model.parameters() if p.grad is not None]
    assert max(post) <= 0.05 * (1 + 1e-5)
    assert any(n > 0.05 for n in norms)  # something was clipped


def test_clip_leaves_small_gradients_bit_identical():
    model = _model()
    (model([torch.randn(2, 3, 16, 16)]).sum() * 1e-3).backward()
    before = [p.grad.clone() for p in model.parameters() if p.grad is not None]
    clip_gradients(model, 1e6)
    after = [p.grad for p in model.parameters() if p.grad is not None]
    assert all(torch.equal(a, b) for a, b in zip(after, before))


def test_cancel_gradients_last_layer_and_adamw_skips_it():
    model = _model(norm_last_layer=False)
    opt = build_optimizer("adamw", get_params_groups(model))
    for g in opt.param_groups:
        g["lr"] = 0.1
    last = {n: p.detach().clone() for n, p in model.named_parameters() if "last_layer" in n}
    assert set(last) == {"head.last_layer.weight_g", "head.last_layer.weight_v"}
    other = model.backbone.cls_token.detach().clone()
    model([torch.randn(2, 3, 16, 16)]).pow(2).sum().backward()
    cancel_gradients_last_layer(0, model, 1)  # epoch 0 < 1: frozen
    assert all(p.grad is None for n, p in model.named_parameters() if "last_layer" in n)
    opt.step()
    for n, p in model.named_parameters():
        if "last_layer" in n:
            assert torch.equal(p, last[n]), n  # no decay, no moment update
            assert p not in opt.state or not opt.state[p]
    assert not torch.equal(model.backbone.cls_token, other)
    # from epoch 1 on the gradients are kept
    model.zero_grad()
    model([torch.randn(2, 3, 16, 16)]).pow(2).sum().backward()
    cancel_gradients_last_layer(1, model, 1)
    assert all(p.grad is not None for n, p in model.named_parameters() if "last_layer" in n)


def test_build_optimizer():
    groups = get_params_groups(nn.Linear(3, 2))
    assert isinstance(build_optimizer("adamw", groups), torch.optim.AdamW)
    assert isinstance(build_optimizer("sgd", get_params_groups(nn.Linear(3, 2))), torch.optim.SGD)
    assert isinstance(build_optimizer("lars", get_params_groups(nn.Linear(3, 2))), LARS)
    with pytest.raises(ValueError, match="optimizer"):
        build_optimizer("lamb", groups)


class OfficialLARS(torch.optim.Optimizer):
    """facebookresearch/dino utils.LARS, verbatim but for formatting."""

    def __init__(self, params, lr=0, weight_decay=0, momentum=0.9, eta=0.001,
                 weight_decay_filter=None, lars_adaptation_filter=None):
        defaults = dict(lr=lr, weight_decay=weight_decay, momentum=momentum, eta=eta,
                        weight_decay_filter=weight_decay_filter, lars_adaptation_filter=lars_adaptation_filter)
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self):
        for g in self.param_groups:
            for p in g['params']:
                dp = p.grad
                if dp is None:
                    continue
                if p.ndim != 1:
                    dp = dp.add(p, alpha=g['weight_decay'])
                if p.ndim != 1:
                    param_norm = torch.norm(p)
                    update_norm = torch.norm(dp)
                    one = torch.ones_like(param_norm)
                    q = torch.where(param_norm > 0.,
                                    torch.where(update_norm > 0, (g['eta'] * param_norm / update_norm), one), one)
                    dp = dp.mul(q)
                param_state = self.state[p]
                if 'mu' not in param_state:
                    param_state['mu'] = torch.zeros_like(p)
                mu = param_state['mu']
                mu.mul_(g['momentum']).add_(dp)
                p.add_(mu, alpha=-g['lr'])


def test_lars_matches_official():
    """Same parameters after several steps with schedules changing lr and weight decay, a zero weight tensor
    (trust ratio 1) and a frozen tensor with no gradient."""
    torch.manual_seed(0)
    models = [_model(norm_last_layer=False) for _ in range(2)]
    models[1].load_state_dict(models[0].state_dict())
    for m in models:
        m.backbone.blocks[0].mlp.fc2.weight.data.zero_()  # ‖p‖ = 0: trust ratio 1
    optims = [LARS(get_params_groups(models[0])), OfficialLARS(get_params_groups(models[1]))]
    x = torch.randn(4, 3, 16, 16)
    for it in range(4):
        for model, opt in zip(models, optims):
            for i, group in enumerate(opt.param_groups):
                group["lr"] = 0.1 / (it + 1)
                if i == 0:
                    group["weight_decay"] = 0.04 + 0.01 * it
            opt.zero_grad()
            model(x).pow(2).mean().backward()
            model.head.last_layer.weight_v.grad = None
            opt.step()
    for (name, a), (_, b) in zip(models[0].named_parameters(), models[1].named_parameters()):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7, msg=name)
    assert models[0].backbone.blocks[0].mlp.fc2.weight.abs().sum() > 0
    with pytest.raises(ValueError, match="eta"):
        LARS(get_params_groups(models[0]), eta=0)
