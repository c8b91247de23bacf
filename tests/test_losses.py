"""Loss modules (dinokernels.losses) against the float64 oracles of tests/ssl_references.py, written here from
SPEC §2.1 (DINO v1), §3.2-§3.4 (DINOv2 teacher side, iBOT) and §3.5 (KoLeo). Loss values, student gradients,
centers over consecutive steps, the teacher temperature schedule, Sinkhorn-Knopp targets, and bad input.
Multi-process behaviour is in test_distributed.py."""
import numpy as np
import pytest
import torch

import dinokernels
from dinokernels.losses import DINOLoss, KoLeoLoss, iBOTPatchLoss, teacher_temp_schedule
from ssl_references import (DinoV1Reference, center_after, centered_targets, cross_view_cross_entropy,
                            ibot_dense_loss, ibot_masked_loss, koleo_reference, masked_token_weights,
                            patch_center_after, sinkhorn_targets, teacher_temperatures)


# ---------------------------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------------------------

def loss_and_grad(fn, x, *args, **kwargs):
    x = x.detach().clone().requires_grad_(True)
    loss = fn(x, *args, **kwargs)
    (grad,) = torch.autograd.grad(loss, x)
    return loss.detach(), grad


def close(actual, expected, dtype):
    """actual (computed in dtype from dtype-representable inputs) vs the float64 oracle value: relative error,
    with an absolute floor relative to the largest expected magnitude (gradients and probabilities have many
    near-zero entries)."""
    rtol = 1e-10 if dtype == torch.float64 else 2e-5
    atol = rtol * 0.5 * float(expected.detach().abs().max()) if expected.numel() else 0.0
    torch.testing.assert_close(actual.double(), expected.double(), rtol=rtol, atol=atol)


def teacher_logits(n, k, dtype=torch.float64):
    """Cosine-like teacher logits (|z| ≲ 1, as a normalised head gives) plus a per-prototype offset, so that the
    center matters."""
    return (torch.randn(n, k, dtype=torch.float64) * 0.4 + torch.randn(1, k, dtype=torch.float64) * 0.3).to(dtype)


def new_dino(k, ncrops, dtype, **kw):
    loss = DINOLoss(k, ncrops, **kw)
    return loss.double() if dtype == torch.float64 else loss


# ---------------------------------------------------------------------------------------------------------------
# DINOLoss
# ---------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("ncrops", [2, 4, 10])
def test_dino_loss_centering_matches_reference_over_steps(ncrops, dtype):
    """Loss, student gradient and center over five consecutive steps, across the warm-up of the teacher
    temperature (30 of 100 epochs) so each step uses a different τ_t and the center of the previous step."""
    k, b = 67, 5
    kw = dict(warmup_teacher_temp=0.04, teacher_temp=0.07, warmup_teacher_temp_epochs=30, nepochs=100)
    ours = new_dino(k, ncrops, dtype, **kw)
    reference = DinoV1Reference(k, ncrops, teacher_temperatures(kw["warmup_teacher_temp"], kw["teacher_temp"],
                                                               kw["warmup_teacher_temp_epochs"], kw["nepochs"]))
    assert ours.center.dtype == dtype and ours.center.shape == (1, k) and not ours.center.any()
    for epoch in (0, 15, 29, 30, 99):
        student = (torch.randn(ncrops * b, k, dtype=torch.float64) * 2).to(dtype).double()
        teacher = teacher_logits(2 * b, k).to(dtype).double()
        expected, expected_grad = loss_and_grad(reference, student, teacher, epoch)
        loss, grad = loss_and_grad(ours, student.to(dtype), teacher.to(dtype), epoch)
        assert loss.shape == () and loss.dtype == dtype
        close(loss, expected, dtype)
        close(grad, expected_grad, dtype)
        close(ours.center, reference.center, dtype)
    assert ours.center.dtype == dtype


def test_dino_loss_center_update_follows_the_loss():
    """The loss of a step uses the center before that step's batch; the center moves only in "centering"."""
    k, b = 33, 4
    ours = DINOLoss(k, 4).double()
    student = torch.randn(4 * b, k, dtype=torch.float64)
    teacher = teacher_logits(2 * b, k)
    from dinokernels.ops.dino_loss_ref import dino_loss_centered_ref
    before = ours.center.clone()
    loss = ours(student, teacher)
    expected = dino_loss_centered_ref(student.reshape(4, b, k), teacher.reshape(2, b, k), before, 0.04)
    close(loss, expected, torch.float64)
    close(ours.center, 0.9 * before + 0.1 * teacher.mean(0, keepdim=True), torch.float64)
    # With center_momentum 1 the center never moves.
    frozen = DINOLoss(k, 4, center_momentum=1.0)
    frozen(student.float(), teacher.float())
    assert not frozen.center.any()


def test_dino_loss_gradient_after_center_update_and_teacher_gets_none():
    """backward() runs after forward() replaced the center; the gradient must still be that of the loss as
    computed, and the teacher gets no gradient."""
    k, b, ncrops = 40, 3, 6
    ours = DINOLoss(k, ncrops).double()
    ours.center = teacher_logits(1, k)
    reference = DinoV1Reference(k, ncrops, 0.04, center=ours.center)
    student = torch.randn(ncrops * b, k, dtype=torch.float64, requires_grad=True)
    teacher = teacher_logits(2 * b, k).requires_grad_(True)
    ours(student, teacher).backward()
    assert teacher.grad is None
    expected_grad = torch.autograd.grad(reference(student, teacher.detach(), 0), student)[0]
    close(student.grad, expected_grad, torch.float64)


@pytest.mark.parametrize("warmup_temp,temp,warmup_epochs,nepochs", [
    (0.04, 0.07, 30, 100), (0.04, 0.04, 0, 100), (0.04, 0.07, 1, 10), (0.02, 0.07, 10, 10), (0.04, 0.07, 7, 300),
    (0.07, 0.04, 2, 3),
])
def test_teacher_temp_schedule_matches_reference(warmup_temp, temp, warmup_epochs, nepochs):
    expected = teacher_temperatures(warmup_temp, temp, warmup_epochs, nepochs)
    ours = DINOLoss(8, 4, warmup_temp, temp, warmup_epochs, nepochs).teacher_temp_schedule
    assert ours.dtype == torch.float64 and ours.shape == (nepochs,)
    assert torch.equal(ours, torch.from_numpy(expected)), (ours, expected)
    assert torch.equal(teacher_temp_schedule(warmup_temp, temp, warmup_epochs, nepochs), ours)


def test_teacher_temp_schedule_values():
    s = DINOLoss(8, 4, 0.04, 0.07, 30, 100).teacher_temp_schedule
    assert s[0] == 0.04 and s[29] == 0.07 and (s[29:] == 0.07).all()
    assert torch.allclose(s[:30], torch.linspace(0.04, 0.07, 30, dtype=torch.float64), rtol=0, atol=1e-15)
    assert (s[1:30] > s[:29]).all()
    # The schedule is not state: the center is, under the official key.
    assert list(DINOLoss(8, 4).state_dict()) == ["center"]
    # It can be replaced (any positive 1-D sequence), and forward reads the new one.
    loss = DINOLoss(8, 4)
    loss.teacher_temp_schedule = np.array([0.05, 0.06])
    assert torch.equal(loss.teacher_temp_schedule, torch.tensor([0.05, 0.06], dtype=torch.float64))
    with pytest.raises(ValueError, match="epoch"):
        loss(torch.randn(8, 8), torch.randn(4, 8), 2)
    with pytest.raises(ValueError, match="teacher_temp_schedule"):
        loss.teacher_temp_schedule = [0.04, 0.0]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_dino_loss_teacher_temp_override(dtype):
    """teacher_temp= replaces the schedule (DINOv2's per-iteration τ_t); epoch is then not used."""
    k, b, ncrops = 50, 4, 4
    ours = new_dino(k, ncrops, dtype, warmup_teacher_temp=0.04, teacher_temp=0.07, warmup_teacher_temp_epochs=30)
    reference = DinoV1Reference(k, ncrops, teacher_temperatures(0.04, 0.07, 30, 100))
    for step, temp in enumerate((0.041, 0.0555, 0.07)):
        reference.temperatures = np.array([temp])
        student = torch.randn(ncrops * b, k, dtype=torch.float64).to(dtype).double()
        teacher = teacher_logits(2 * b, k).to(dtype).double()
        expected, expected_grad = loss_and_grad(reference, student, teacher, 0)
        loss, grad = loss_and_grad(ours, student.to(dtype), teacher.to(dtype), epoch=10_000 * step,
                                   teacher_temp=temp)
        close(loss, expected, dtype)
        close(grad, expected_grad, dtype)
        close(ours.center, reference.center, dtype)


@pytest.mark.parametrize("n_global,ncrops", [(1, 2), (1, 5), (3, 3), (3, 7)])
def test_dino_loss_other_global_crop_counts(n_global, ncrops):
    k, b = 29, 3
    ours = DINOLoss(k, ncrops, n_global_crops=n_global).double()
    reference = DinoV1Reference(k, ncrops, 0.04, n_global=n_global)
    for _ in range(2):
        student = torch.randn(ncrops * b, k, dtype=torch.float64)
        teacher = teacher_logits(n_global * b, k)
        expected, expected_grad = loss_and_grad(reference, student, teacher, 0)
        loss, grad = loss_and_grad(ours, student, teacher, 0)
        close(loss, expected, torch.float64)
        close(grad, expected_grad, torch.float64)
        close(ours.center, reference.center, torch.float64)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("ncrops", [2, 4, 10])
def test_dino_loss_sinkhorn_knopp_matches_reference(ncrops, dtype):
    """centering="sinkhorn_knopp": DINOv2's SK targets over the 2B teacher rows, v1's cross-view loss; the
    center stays zero."""
    k, b, temp = 45, 6, 0.05
    ours = new_dino(k, ncrops, dtype, teacher_temp=temp, centering="sinkhorn_knopp")
    for iters in (3,):
        student = (torch.randn(ncrops * b, k, dtype=torch.float64) * 2).to(dtype).double()
        teacher = teacher_logits(2 * b, k).to(dtype).double()
        targets = sinkhorn_targets(teacher, temp, iters)
        expected, expected_grad = loss_and_grad(
            lambda s: cross_view_cross_entropy(s.view(ncrops, b, k), targets.view(2, b, k)), student)
        loss, grad = loss_and_grad(ours, student.to(dtype), teacher.to(dtype))
        close(loss, expected, dtype)
        close(grad, expected_grad, dtype)
        assert not ours.center.any()
        # DINOv2-style access to the targets.
        close(ours.sinkhorn_knopp_teacher(teacher.to(dtype), temp), targets, dtype)


@pytest.mark.parametrize("iters", [1, 3, 5])
def test_dino_loss_sinkhorn_iterations(iters):
    k, b, temp = 31, 4, 0.06
    ours = DINOLoss(k, 3, teacher_temp=temp, centering="sinkhorn_knopp", sinkhorn_iterations=iters).double()
    teacher = teacher_logits(2 * b, k)
    student = torch.randn(3 * b, k, dtype=torch.float64)
    targets = sinkhorn_targets(teacher, temp, iters)
    expected = cross_view_cross_entropy(student.view(3, b, k), targets.view(2, b, k))
    close(ours(student, teacher), expected, torch.float64)
    close(ours.sinkhorn_knopp_teacher(teacher, temp), targets, torch.float64)
    close(ours.sinkhorn_knopp_teacher(teacher, temp, n_iterations=iters + 1),
          sinkhorn_targets(teacher, temp, iters + 1), torch.float64)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_dino_loss_dinov2_teacher_api_matches_reference(dtype):
    """softmax_center_teacher then update_center, step after step (DINOv2's trainer order): DINOv2's asynchronous
    center update is applied before the next targets (SPEC §3.2), so each step's targets use the center of all
    earlier steps; also (…, K) input to softmax_center_teacher."""
    k, b = 70, 5
    ours = new_dino(k, 4, dtype)
    center = torch.zeros(1, k, dtype=torch.float64)
    for temp in (0.04, 0.05, 0.07):
        teacher = teacher_logits(2 * b, k).to(dtype).double()
        expected = centered_targets(teacher, center, temp)
        probs = ours.softmax_center_teacher(teacher.to(dtype), temp)
        assert probs.shape == (2 * b, k) and probs.dtype == dtype
        close(probs, expected, dtype)
        close(ours.softmax_center_teacher(teacher.to(dtype).view(2, b, k), temp), expected.view(2, b, k), dtype)
        center = center_after(center, teacher)
        ours.update_center(teacher.to(dtype))
        close(ours.center, center, dtype)


def test_dino_loss_forward_equals_teacher_api_composition():
    """forward("centering") = targets from softmax_center_teacher + the cross-view loss, then update_center."""
    k, b, ncrops = 24, 3, 5
    a, c = DINOLoss(k, ncrops).double(), DINOLoss(k, ncrops).double()
    for _ in range(3):
        student = torch.randn(ncrops * b, k, dtype=torch.float64)
        teacher = teacher_logits(2 * b, k)
        probs = c.softmax_center_teacher(teacher, 0.04)
        expected = cross_view_cross_entropy(student.view(ncrops, b, k), probs.view(2, b, k))
        c.update_center(teacher)
        close(a(student, teacher), expected, torch.float64)
        close(a.center, c.center, torch.float64)


def test_dino_loss_loads_official_state_dict():
    # The official loss object's state: one float32 buffer "center" of shape (1, K) (SPEC §2.1, §2.6).
    official = {"center": teacher_logits(1, 16).float()}
    ours = DINOLoss(16, 4)
    assert {k: (v.shape, v.dtype) for k, v in ours.state_dict().items()} == {"center": ((1, 16), torch.float32)}
    ours.load_state_dict(official)
    assert torch.equal(ours.center, official["center"])


def test_dino_loss_module_exported():
    assert dinokernels.DINOLoss is DINOLoss
    assert dinokernels.iBOTPatchLoss is iBOTPatchLoss
    assert dinokernels.KoLeoLoss is KoLeoLoss


@pytest.mark.parametrize("make,match", [
    (lambda: DINOLoss(8, 4, centering="center"), "centering"),
    (lambda: DINOLoss(8, 4, warmup_teacher_temp_epochs=101, nepochs=100), "warmup_teacher_temp_epochs"),
    (lambda: DINOLoss(8, 1, n_global_crops=1), "ncrops"),
    (lambda: DINOLoss(8, 1), "ncrops"),
    (lambda: DINOLoss(0, 4), "out_dim"),
    (lambda: DINOLoss(8, 4, teacher_temp=0.0), "teacher_temp"),
    (lambda: DINOLoss(8, 4, student_temp=-0.1), "student_temp"),
    (lambda: DINOLoss(8, 4, center_momentum=1.5), "center_momentum"),
    (lambda: DINOLoss(8, 4, sinkhorn_iterations=0), "sinkhorn_iterations"),
])
def test_dino_loss_bad_construction(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_dino_loss_bad_inputs():
    k, b = 8, 3
    loss = DINOLoss(k, 4, warmup_teacher_temp_epochs=10, nepochs=20)
    s, t = torch.randn(4 * b, k), torch.randn(2 * b, k)
    loss(s, t, 19)  # the last epoch is fine
    cases = [
        ((torch.randn(4 * b + 1, k), t), {}, "student_output.*multiple of ncrops"),
        ((s, torch.randn(2 * b + 1, k)), {}, "teacher_output.*multiple of n_global_crops"),
        ((s, torch.randn(2 * (b + 1), k)), {}, "teacher_output.*images per crop"),
        ((torch.randn(4 * b, k + 1), t), {}, "student_output.*out_dim"),
        ((s, torch.randn(2 * b, k + 1)), {}, "teacher_output.*out_dim"),
        ((s.reshape(4, b, k), t), {}, "student_output.*2-D"),
        ((s, t.reshape(2, b, k)), {}, "teacher_output.*2-D"),
        ((torch.randn(0, k), torch.randn(0, k)), {}, "student_output"),
        ((s, t, 20), {}, "epoch.*schedule"),
        ((s, t, -1), {}, "epoch"),
        ((s, t), {"teacher_temp": 0.0}, "teacher_temp"),
    ]
    center = loss.center.clone()
    for args, kwargs, match in cases:
        with pytest.raises(ValueError, match=match):
            loss(*args, **kwargs)
    assert torch.equal(loss.center, center)  # failed calls leave the center alone
    with pytest.raises(TypeError, match="epoch"):
        loss(s, t, 1.5)
    with pytest.raises(ValueError, match="out_dim"):
        loss.update_center(torch.randn(2 * b, k + 1))
    with pytest.raises(ValueError, match="out_dim"):
        loss.softmax_center_teacher(torch.randn(2 * b, k + 1), 0.04)
    with pytest.raises(ValueError, match="no rows"):
        loss.update_center(torch.randn(0, k))


# ---------------------------------------------------------------------------------------------------------------
# iBOTPatchLoss
# ---------------------------------------------------------------------------------------------------------------

def random_masks(n_images, n_patches, empty_image=True):
    """Random (n_images, n_patches) bool masks with varying counts, one image without masked patches."""
    probs = torch.rand(n_images, 1) * 0.6 + 0.1
    masks = torch.rand(n_images, n_patches) < probs
    masks[0, 0] = True
    if empty_image and n_images > 1:
        masks[-1] = False
    return masks


def targets(n, k, temp=0.05):
    return torch.softmax(teacher_logits(n, k) / temp, dim=-1)


def new_ibot(k, dtype, **kw):
    loss = iBOTPatchLoss(k, **kw)
    return loss.double() if dtype == torch.float64 else loss


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("n_images,n_patches,k", [(4, 16, 33), (2, 49, 130), (7, 9, 5)])
def test_ibot_forward_masked_default_weights(n_images, n_patches, k, dtype):
    masks = random_masks(n_images, n_patches)
    m = int(masks.sum())
    student = (torch.randn(m, k, dtype=torch.float64) * 2).to(dtype).double()
    teacher = targets(m, k).to(dtype).double()
    ours = new_ibot(k, dtype)
    expected, expected_grad = loss_and_grad(ibot_masked_loss, student, teacher, masks)
    loss, grad = loss_and_grad(ours.forward_masked, student.to(dtype), teacher.to(dtype), masks)
    assert loss.shape == () and loss.dtype == dtype
    close(loss, expected, dtype)
    close(grad, expected_grad, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_ibot_forward_masked_upperbound_buffer_and_weights(dtype):
    """The collate layout: student/teacher rows in an `upperbound` buffer, n_masked_patches real rows first,
    masks_weight given (collate's, and arbitrary positive weights); padding rows get no gradient."""
    n_images, n_patches, k = 6, 25, 40
    masks = random_masks(n_images, n_patches)
    m = int(masks.sum())
    upper = m + 7
    student = torch.randn(upper, k, dtype=torch.float64).to(dtype).double()
    teacher = targets(upper, k).to(dtype).double()
    collate_weight = masked_token_weights(masks).float()  # as the collate function hands them over
    ours = new_ibot(k, dtype)
    for weight, n_masked in ((collate_weight, m), (torch.rand(m, dtype=torch.float64) + 0.1, m),
                             (collate_weight[:m - 3], m - 3), (collate_weight[:m - 3], torch.tensor(m - 3))):
        expected, expected_grad = loss_and_grad(ibot_masked_loss, student, teacher, masks,
                                                n_masked=n_masked, weights=weight)
        loss, grad = loss_and_grad(ours.forward_masked, student.to(dtype), teacher.to(dtype), masks,
                                   n_masked_patches=n_masked, masks_weight=weight.to(dtype))
        close(loss, expected, dtype)
        close(grad, expected_grad, dtype)
        assert not grad[int(n_masked):].any()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_ibot_dense_forward_matches_reference(dtype):
    n_images, n_patches, k = 5, 12, 21
    masks = random_masks(n_images, n_patches)
    student = torch.randn(n_images, n_patches, k, dtype=torch.float64).to(dtype).double()
    teacher = targets(n_images * n_patches, k).to(dtype).double().view(n_images, n_patches, k)
    ours = new_ibot(k, dtype)
    expected, expected_grad = loss_and_grad(ibot_dense_loss, student, teacher, masks)
    loss, grad = loss_and_grad(ours, student.to(dtype), teacher.to(dtype), masks)
    close(loss, expected, dtype)
    close(grad, expected_grad, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_ibot_center_and_targets_over_steps(dtype):
    """DINOv2's trainer order: targets from softmax_center_teacher, then update_center on the raw masked tokens
    (the asynchronous update lands before the next targets, SPEC §3.4); three steps with varying token counts,
    as (n, K) and as the trainer's (1, n, K) view."""
    k = 55
    center = torch.zeros(1, 1, k, dtype=torch.float64)
    ours = new_ibot(k, dtype)
    ours_3d = new_ibot(k, dtype)
    assert ours.center.shape == (1, 1, k) and ours.center.dtype == dtype and not ours.center.any()
    for n, temp in ((13, 0.04), (30, 0.06), (7, 0.07)):
        raw = teacher_logits(n, k).to(dtype).double().unsqueeze(0)  # the trainer's (1, n, K) view
        expected = centered_targets(raw[0], center, temp)
        center = patch_center_after(center, raw)
        probs = ours.softmax_center_teacher(raw[0].to(dtype), temp)
        assert probs.shape == (n, k) and probs.dtype == dtype
        close(probs, expected, dtype)
        close(ours_3d.softmax_center_teacher(raw.to(dtype), temp), expected.unsqueeze(0), dtype)
        ours.update_center(raw[0].to(dtype))
        ours_3d.update_center(raw.to(dtype))
        close(ours.center, center, dtype)
        close(ours_3d.center, center, dtype)


def test_ibot_center_with_several_leading_entries():
    """(b, n, K) update: mean over n per entry, then mean over b (SPEC §3.4)."""
    k = 9
    raw = teacher_logits(12, k).view(3, 4, k)
    ours = iBOTPatchLoss(k, center_momentum=0.7).double()
    ours.update_center(raw)
    expected = patch_center_after(torch.zeros(1, 1, k, dtype=torch.float64), raw, momentum=0.7)
    close(ours.center, expected, torch.float64)
    close(ours.center, 0.3 * raw.mean(dim=(0, 1)).view(1, 1, k), torch.float64)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("iters", [1, 3])
def test_ibot_sinkhorn_knopp_teacher_single_process(iters, dtype):
    """Works without torch.distributed (the published iBOT one does not: SPEC §3.3, iBOT SK bug), equals the
    plain iterations."""
    n, k, temp = 37, 64, 0.05
    teacher = teacher_logits(n, k).to(dtype).double()
    expected = sinkhorn_targets(teacher, temp, n_iterations=iters)
    ours = new_ibot(k, dtype)
    got = ours.sinkhorn_knopp_teacher(teacher.to(dtype), temp, n_iterations=iters,
                                      n_masked_patches_tensor=torch.tensor([n]))
    assert got.shape == (n, k) and got.dtype == dtype
    close(got, expected, dtype)
    close(got.sum(-1), torch.ones(n, dtype=torch.float64), dtype)
    if iters == 3:
        close(ours.sinkhorn_knopp_teacher(teacher.to(dtype), temp), expected, dtype)


def test_ibot_state_dict_is_official():
    # The official iBOT loss state: one float32 buffer "center" of shape (1, 1, K) (SPEC §3.4).
    official = {"center": teacher_logits(1, 12).view(1, 1, 12).float()}
    ours = iBOTPatchLoss(12)
    assert {k: (v.shape, v.dtype) for k, v in ours.state_dict().items()} == {"center": ((1, 1, 12), torch.float32)}
    ours.load_state_dict(official)
    assert torch.equal(ours.center, official["center"])


def test_ibot_bad_inputs():
    k = 8
    loss = iBOTPatchLoss(k)
    masks = random_masks(3, 10)
    m = int(masks.sum())
    s, t = torch.randn(m, k), targets(m, k).float()
    loss.forward_masked(s, t, masks)
    cases = [
        ((torch.randn(m + 1, k), targets(m + 1, k).float(), masks), {}, ValueError, "masked patches"),
        ((torch.randn(m, k + 1), targets(m, k + 1).float(), masks), {}, ValueError, "patch_out_dim"),
        ((s, t[:-1], masks), {}, ValueError, "teacher_patch_tokens_masked.*shape"),
        ((s, t, masks.view(-1)), {}, ValueError, "student_masks_flat.*2-D"),
        ((s, t, masks[:0]), {}, ValueError, "student_masks_flat.*no images"),
        ((s, t, masks.float()), {}, TypeError, "student_masks_flat.*bool"),
        ((s, t, masks), {"n_masked_patches": m + 1}, ValueError, "n_masked_patches"),
        ((s, t, masks), {"masks_weight": torch.ones(m - 1)}, ValueError, "masks_weight"),
        ((s, t, masks), {"n_masked_patches": m - 1}, ValueError, "masked patches"),
    ]
    for args, kwargs, kind, match in cases:
        with pytest.raises(kind, match=match):
            loss.forward_masked(*args, **kwargs)
    with pytest.raises(ValueError, match="patch_out_dim"):
        loss.update_center(torch.randn(5, k + 1))
    with pytest.raises(ValueError, match="no tokens"):
        loss.update_center(torch.randn(0, k))
    with pytest.raises(ValueError, match="patch_out_dim"):
        loss.softmax_center_teacher(torch.randn(5, k + 1), 0.04)
    with pytest.raises(TypeError, match="n_iterations"):
        loss.sinkhorn_knopp_teacher(torch.randn(5, k), 0.04, torch.tensor(5))
    with pytest.raises(ValueError, match="center_momentum"):
        iBOTPatchLoss(k, center_momentum=-0.1)
    assert not loss.center.any()


# ---------------------------------------------------------------------------------------------------------------
# KoLeoLoss
# ---------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("b,d", [(2, 8), (16, 384), (65, 33)])
def test_koleo_matches_reference(b, d, dtype):
    x = torch.randn(b, d, dtype=torch.float64).to(dtype).double()
    expected, expected_grad = loss_and_grad(koleo_reference, x)
    ours = KoLeoLoss()
    assert not list(ours.parameters()) and not list(ours.buffers())
    loss, grad = loss_and_grad(ours, x.to(dtype))
    assert loss.shape == () and loss.dtype == dtype
    close(loss, expected, dtype)
    close(grad, expected_grad, dtype)
    close(ours(x.to(dtype), eps=1e-6), koleo_reference(x, eps=1e-6), dtype)


def test_koleo_bad_input():
    with pytest.raises(ValueError, match="at least 2 rows"):
        KoLeoLoss()(torch.randn(1, 8))
    with pytest.raises(ValueError, match="2-D"):
        KoLeoLoss()(torch.randn(8))


def test_dino_loss_under_torch_compile():
    """The module (center replaced every step, schedule lookup) compiles and matches eager over steps."""
    k, b, ncrops = 32, 3, 4
    eager = DINOLoss(k, ncrops, 0.04, 0.07, 5, 10)
    compiled_module = DINOLoss(k, ncrops, 0.04, 0.07, 5, 10)
    compiled = torch.compile(compiled_module)
    for epoch in (0, 3, 7):
        student = torch.randn(ncrops * b, k)
        teacher = teacher_logits(2 * b, k, torch.float32)
        expected, expected_grad = loss_and_grad(eager, student, teacher, epoch)
        loss, grad = loss_and_grad(compiled, student, teacher, epoch)
        torch.testing.assert_close(loss, expected, rtol=1e-6, atol=0)
        torch.testing.assert_close(grad, expected_grad, rtol=1e-6, atol=1e-8)
        torch.testing.assert_close(compiled_module.center, eager.center, rtol=1e-6, atol=1e-8)
