"""Parameter groups, per-tensor gradient clipping, freezing the last layer, LARS (DINO v1 semantics, SPEC §2.4),
against references written here from those facts."""
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


def _exempt_from_decay(name, param):
    return name.endswith(".bias") or param.dim() == 1


def params_groups_reference(model):
    """SPEC §2.4: the trainable parameters in named_parameters order, split in two groups: biases and every 1-D
    tensor (weight_decay 0), and the rest (decayed by the schedule)."""
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    return [{"params": [p for n, p in trainable if not _exempt_from_decay(n, p)]},
            {"params": [p for n, p in trainable if _exempt_from_decay(n, p)], "weight_decay": 0.0}]


def clip_gradients_reference(model, clip):
    """SPEC §2.4 and its eps register: per parameter tensor with a gradient, in named_parameters order, the norm
    n = ‖g‖₂ (returned, before clipping); g is scaled by clip/(n + 1e-6) when that factor is below 1."""
    norms = []
    for _, param in model.named_parameters():
        if param.grad is None:
            continue
        norm = float(param.grad.double().norm())
        norms.append(norm)
        factor = clip / (norm + 1e-6)
        if factor < 1:
            param.grad.mul_(factor)
    return norms


@pytest.mark.parametrize("norm_last_layer", [True, False])
def test_params_groups(norm_last_layer):
    model = _model(norm_last_layer)
    groups = get_params_groups(model)
    ref = params_groups_reference(model)
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
    # the frozen weight-norm scale is in no group; a trainable one (1-D? no: (K, 1)) is decayed (it is not 1-D)
    assert all((n in decayed) == (not norm_last_layer) for n in g_name)
    assert len(decayed) + len(exempt) == sum(p.requires_grad for p in model.parameters())


def test_clip_gradients_matches_reference():
    model = _model()
    x = [torch.randn(3, 3, 16, 16), torch.randn(3, 3, 8, 8)]
    (model(x) ** 2).sum().mul(50).backward()
    twin = copy.deepcopy(model)
    for p, q in zip(model.parameters(), twin.parameters()):
        q.grad = None if p.grad is None else p.grad.clone()
    for clip in (3.0, 0.05):
        norms = clip_gradients(model, clip)
        ref_norms = clip_gradients_reference(twin, clip)
        # The kernel sums squares in float32 over up to ~1e5 elements: its rounding reaches ~1e-6 relative of
        # the float64 norm (measured 1.08e-6 for one draw), hence 1e-5.
        assert norms == pytest.approx(ref_norms, rel=1e-5)
        for (n, p), (_, q) in zip(model.named_parameters(), twin.named_parameters()):
            if p.grad is not None:
                torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=0, msg=n)  # scaled by those norms
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


class ReferenceLARS(torch.optim.Optimizer):
    """DINO's LARS semantics, written here from the math, with float64 arithmetic (the result is stored back in
    the parameter's dtype; the momentum buffer stays float64). Facts: for every tensor with a gradient, if it is
    not 1-D (biases and norm weights are exempt from both), g ← g + wd·p, then g ← g·η‖p‖/‖g‖, the trust ratio
    being 1 when ‖p‖ = 0 or ‖g‖ = 0; then μ ← momentum·μ + g (no dampening, μ starts at 0) and p ← p − lr·μ.
    Defaults: lr 0, weight decay 0, momentum 0.9, η 0.001."""

    def __init__(self, params, lr=0.0, weight_decay=0.0, momentum=0.9, eta=0.001):
        super().__init__(params, dict(lr=lr, weight_decay=weight_decay, momentum=momentum, eta=eta))

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            for param in group["params"]:
                if param.grad is None:
                    continue
                p, g = param.double(), param.grad.double()
                if p.dim() != 1:
                    g = g + group["weight_decay"] * p
                    p_norm, g_norm = float(p.norm()), float(g.norm())
                    if p_norm > 0 and g_norm > 0:
                        g = g * (group["eta"] * p_norm / g_norm)
                velocity = self.state[param].setdefault("velocity", torch.zeros_like(p))
                velocity.mul_(group["momentum"]).add_(g)
                param.copy_(p - group["lr"] * velocity)


def test_lars_matches_reference():
    """Same parameters after several steps with schedules changing lr and weight decay, a zero weight tensor
    (trust ratio 1) and a frozen tensor with no gradient."""
    torch.manual_seed(0)
    models = [_model(norm_last_layer=False) for _ in range(2)]
    models[1].load_state_dict(models[0].state_dict())
    for m in models:
        m.backbone.blocks[0].mlp.fc2.weight.data.zero_()  # ‖p‖ = 0: trust ratio 1
    optims = [LARS(get_params_groups(models[0])), ReferenceLARS(get_params_groups(models[1]))]
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
