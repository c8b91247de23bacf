"""DINOv2's objective: one step against an independent float64 reference of the total (SPEC §3.2–3.5), centering
and Sinkhorn-Knopp targets, the 0-local-crop normalisation, distillation (a teacher that does not move), parameter
groups and schedules (SPEC §3.8)."""
import math

import numpy as np
import pytest
import torch

from dinokernels.data.masking import collate_ibot
from dinokernels.models.dinov2 import DinoVisionTransformer
from dinokernels.train.dinov2_method import (DINOv2Method, apply_schedules, dino_term_normaliser,
                                             dinov2_param_groups, dinov2_schedules)

K = 24


def backbone(seed=0, depth=2, embed=16):
    torch.manual_seed(seed)
    return DinoVisionTransformer(img_size=28, patch_size=7, embed_dim=embed, depth=depth, num_heads=2,
                                 init_values=0.5, block_chunks=0)


def method(n_local=2, centering="centering", separate=True, **kw):
    m = DINOv2Method(backbone(), 16, out_dim=K, ibot_out_dim=K + 4 if separate else K, separate_ibot_head=separate,
                     head_hidden_dim=20, head_bottleneck_dim=12, n_local_crops=n_local, centering=centering, **kw)
    m = m.double()
    with torch.no_grad():  # a teacher different from the student, as after some training
        for p in m.teacher.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return m


def batch(B=3, n_local=2, seed=1):
    g = torch.Generator().manual_seed(seed)
    glob = [torch.randn(B, 3, 28, 28, generator=g, dtype=torch.float64) for _ in range(2)]
    loc = [torch.randn(B, 3, 14, 14, generator=g, dtype=torch.float64) for _ in range(n_local)]
    out = collate_ibot(glob, loc, patch_size=7, generator=g)
    assert out["mask_indices_list"].numel() > 0
    return out


def ce(target, logits, temp):
    """−Σ_k t_k log softmax(s/τ)_k, float64, per row."""
    return -(target * torch.log_softmax(logits / temp, dim=-1)).sum(-1)


def sinkhorn_reference(z, temp, iters=3):
    """SPEC §3.3 in float64, single process: Q = exp(z/τ)ᵀ, normalise total, then rows/K and columns/B thrice."""
    q = torch.exp(z / temp).t()
    K_, B_ = q.shape
    q = q / q.sum()
    for _ in range(iters):
        q = q / q.sum(dim=1, keepdim=True) / K_
        q = q / q.sum(dim=0, keepdim=True) / B_
    return (q * B_).t()


def koleo_reference(x):
    x = x / x.norm(dim=1, keepdim=True).clamp_min(1e-8)
    sims = x @ x.t()
    sims.fill_diagonal_(-1)
    nn_idx = sims.argmax(1)
    d = (x - x[nn_idx] + 1e-8).norm(dim=1)
    return -torch.log(d + 1e-8).mean()


def reference_total(m, b, teacher_temp, centering):
    """The DINOv2 total computed from the networks' outputs with explicit loops (SPEC §3.2)."""
    gc, lc, masks = b["collated_global_crops"], b["collated_local_crops"], b["collated_masks"]
    B = gc.shape[0] // 2
    n_local = lc.shape[0] // B
    with torch.no_grad():
        t_out = m.teacher["backbone"].forward_features(gc)
        t_cls = m.teacher["dino_head"](t_out["x_norm_clstoken"])
        t_patch = t_out["x_norm_patchtokens"].flatten(0, 1)[masks.flatten()]
        t_ibot = m.teacher["ibot_head"](t_patch)
    if centering == "centering":
        dino_t = torch.softmax((t_cls - m.dino_loss.center) / teacher_temp, -1)
        ibot_t = torch.softmax((t_ibot - m.ibot_loss.center[0]) / teacher_temp, -1)
    else:
        dino_t = sinkhorn_reference(t_cls, teacher_temp)
        ibot_t = sinkhorn_reference(t_ibot, teacher_temp)
    s_g = m.student["backbone"].forward_features(gc, masks=masks)
    s_l = m.student["backbone"].forward_features(lc)
    s_dino_g = m.student["dino_head"](s_g["x_norm_clstoken"])
    s_dino_l = m.student["dino_head"](s_l["x_norm_clstoken"])
    n_total = max(2 * n_local, 1) + 2
    teacher_swapped = torch.cat([dino_t[B:], dino_t[:B]])
    dino_global = 2 * ce(teacher_swapped, s_dino_g, 0.1).mean() / n_total  # one 2B-row CE, ×2
    dino_local = 0.0
    for v in range(n_local):
        for t in range(2):
            dino_local = dino_local + ce(dino_t[t * B:(t + 1) * B], s_dino_l[v * B:(v + 1) * B], 0.1).mean()
    dino_local = dino_local / n_total
    koleo = sum(koleo_reference(s_g["x_norm_clstoken"][i * B:(i + 1) * B]) for i in range(2))
    s_patch = s_g["x_norm_patchtokens"].flatten(0, 1)[masks.flatten()]
    s_ibot = m.student["ibot_head"](s_patch)
    counts = masks.sum(1).clamp(min=1).double()
    w = (1 / counts)[masks.nonzero()[:, 0]]
    ibot = (w * ce(ibot_t, s_ibot, 0.1)).sum() / (2 * B)
    total = dino_local + dino_global + 0.1 * koleo + ibot
    parts = {"dino_local": dino_local, "dino_global": dino_global, "koleo": koleo, "ibot": ibot}
    return total, {k: float(v.detach()) if torch.is_tensor(v) else v for k, v in parts.items()}, t_cls, t_ibot


@pytest.mark.parametrize("centering", ["centering", "sinkhorn_knopp"])
def test_one_step_equals_float64_reference(centering):
    m = method(centering=centering)
    with torch.no_grad():
        m.dino_loss.center.copy_(0.1 * torch.randn(1, K))
        m.ibot_loss.center.copy_(0.1 * torch.randn(1, 1, K + 4))
    b = batch()
    torch.manual_seed(7)  # identical student forward randomness (none: no drop path, eval-free modules)
    ref_total, ref_parts, t_cls, t_ibot = reference_total(m, b, 0.05, centering)
    c_dino, c_ibot = m.dino_loss.center.clone(), m.ibot_loss.center.clone()
    total, parts = m(b, 0.05)
    # rtol 1e-7: the collate's per-token weights 1/n_i are float32 (as DINOv2's), the reference's float64.
    torch.testing.assert_close(total, ref_total, rtol=1e-7, atol=1e-10)
    for key, value in ref_parts.items():
        assert parts[key] == pytest.approx(value, rel=1e-7, abs=1e-10), key
    if centering == "centering":  # centers updated after use, as an EMA of the raw teacher logits
        torch.testing.assert_close(m.dino_loss.center, 0.9 * c_dino + 0.1 * t_cls.mean(0, keepdim=True))
        torch.testing.assert_close(m.ibot_loss.center, 0.9 * c_ibot + 0.1 * t_ibot.mean(0).reshape(1, 1, -1))
    else:
        assert torch.equal(m.dino_loss.center, c_dino)  # no center on the Sinkhorn-Knopp path
    total.backward()
    grads = [p.grad for p in m.student.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
    assert all(p.grad is None for p in m.teacher.parameters())


def test_no_local_crops_divides_the_global_term_by_three():
    assert [dino_term_normaliser(n) for n in (0, 1, 8)] == [3, 4, 18]
    m = method(n_local=0)
    b = batch(n_local=0)
    ref_total, ref_parts, _, _ = reference_total(m, b, 0.07, "centering")
    total, parts = m(b, 0.07)
    torch.testing.assert_close(total, ref_total, rtol=1e-7, atol=1e-10)
    assert parts["dino_local"] == pytest.approx(0.0, abs=1e-12)


def test_wrong_local_crop_count_is_refused():
    with pytest.raises(ValueError, match="local crops per image"):
        method(n_local=2)(batch(n_local=1), 0.04)


def test_distillation_teacher_does_not_move_and_student_ema_does():
    student = backbone(seed=3)
    teacher = DinoVisionTransformer(img_size=28, patch_size=7, embed_dim=16, depth=3, num_heads=2, init_values=1.0,
                                    block_chunks=0)
    m = DINOv2Method(student, 16, out_dim=K, separate_ibot_head=False, head_hidden_dim=20, head_bottleneck_dim=12,
                     n_local_crops=2, teacher_backbone=teacher).double()
    assert m.distillation and m.final_backbone() is m.student_ema["backbone"]
    before = {k: v.clone() for k, v in m.teacher.state_dict().items()}
    ema_before = [p.clone() for p in m.student_ema.parameters()]
    opt = torch.optim.AdamW([p for p in m.student.parameters() if p.requires_grad], lr=1e-2)
    b = batch()
    total, parts = m(b, 0.04)
    assert parts["ibot"] > 0  # iBOT over every patch token of the global crops
    total.backward()
    opt.step()
    m.update_teacher(0.9)
    for k, v in m.teacher.state_dict().items():
        if not k.endswith("center"):
            assert torch.equal(v, before[k]), k
    assert any(not torch.equal(a, p) for a, p in zip(ema_before, m.student_ema.parameters()))
    assert all(getattr(mod, "drop_path_rate", 0.0) == 0.0 for mod in m.student.modules())


def test_param_groups_layer_decay_patch_embed_and_weight_decay():
    m = method()
    groups = dinov2_param_groups(m.student, layer_decay=0.9, patch_embed_lr_mult=0.2)
    by_name = {name: g for g in groups for name in g["names"]}
    n_blocks = 2
    assert by_name["backbone.cls_token"]["lr_multiplier"] == pytest.approx(0.9 ** (n_blocks + 1))
    assert by_name["backbone.patch_embed.proj.weight"]["lr_multiplier"] == pytest.approx(0.2 * 0.9 ** 3)
    assert by_name["backbone.blocks.0.attn.qkv.weight"]["lr_multiplier"] == pytest.approx(0.9 ** 2)
    assert by_name["backbone.blocks.1.mlp.fc1.weight"]["lr_multiplier"] == pytest.approx(0.9)
    assert by_name["backbone.norm.weight"]["lr_multiplier"] == 1.0
    assert by_name["dino_head.mlp.0.weight"]["lr_multiplier"] == 1.0
    for name in ["backbone.blocks.0.attn.qkv.bias", "backbone.blocks.0.ls1.gamma", "backbone.norm.weight",
                 "backbone.blocks.1.norm2.weight"]:
        assert by_name[name]["wd_multiplier"] == 0.0, name
    assert by_name["backbone.pos_embed"]["wd_multiplier"] == 1.0  # pos and cls are decayed in DINOv2
    assert by_name["dino_head.last_layer.weight_g"]["is_last_layer"]
    assert not by_name["dino_head.mlp.0.weight"]["is_last_layer"]
    n_params = sum(p.numel() for p in m.student.parameters() if p.requires_grad)
    assert sum(p.numel() for g in groups for p in g["params"]) == n_params
    # chunked layouts get the same layer ids
    chunked = DinoVisionTransformer(img_size=28, patch_size=7, embed_dim=16, depth=4, num_heads=2, block_chunks=2)
    g2 = dinov2_param_groups(torch.nn.ModuleDict({"backbone": chunked}))
    names = {n: g for g in g2 for n in g["names"]}
    assert names["backbone.blocks.1.3.attn.qkv.weight"]["lr_multiplier"] == pytest.approx(0.9)


def test_schedules():
    s = dinov2_schedules(100, 10, lr=4e-3, batch_total=256, warmup_epochs=2, warmup_teacher_temp_epochs=3,
                         freeze_last_layer_epochs=1)
    peak = 4e-3 * math.sqrt(256 / 1024)
    assert s["lr"][19] == pytest.approx(peak) and s["lr"][0] == 0.0
    assert s["lr"].shape == (100,)
    assert s["lr"][-1] == pytest.approx(1e-6 + 0.5 * (peak - 1e-6) * (1 + math.cos(math.pi * 79 / 80)))
    assert np.all(s["last_layer_lr"][:10] == 0) and s["last_layer_lr"][29] == pytest.approx(peak)
    np.testing.assert_allclose(s["teacher_temp"][:30], np.linspace(0.04, 0.07, 30))
    assert np.all(s["teacher_temp"][30:] == 0.07)
    assert s["momentum"][0] == pytest.approx(0.992) and s["momentum"][-1] == pytest.approx(1.0, abs=1e-5)
    assert s["wd"][0] == pytest.approx(0.04)
    m = method()
    groups = dinov2_param_groups(m.student)
    opt = torch.optim.AdamW(groups)
    apply_schedules(opt, s, 5)
    for g in opt.param_groups:
        expected = (s["last_layer_lr"][5] if g["is_last_layer"] else s["lr"][5]) * g["lr_multiplier"]
        assert g["lr"] == pytest.approx(expected)
        assert g["weight_decay"] == pytest.approx(s["wd"][5] * g["wd_multiplier"])
    with pytest.raises(ValueError, match="scaling"):
        dinov2_schedules(10, 1, scaling="cubic")


def test_clip_per_submodule():
    m = method()
    total, _ = m(batch(), 0.04)
    (total * 1e3).backward()
    norms = m.clip_gradients(1.0)
    assert set(norms) == {"backbone", "dino_head", "ibot_head"}
    for name, module in m.student.items():
        grads = [p.grad for p in module.parameters() if p.grad is not None]
        total_norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))
        assert float(total_norm) <= 1.0 + 1e-6 or norms[name] <= 1.0
