"""ibot_patch_loss: the kernel against the iBOT masked-patch loss of SPEC §3.4 evaluated in float64 by the oracles of
tests/ssl_references.py (loss and gradient), gradcheck, opcheck, torch.compile, empty and awkward inputs, bad input, and
the CUDA kernel (marked `cuda`)."""
import pytest
import torch

import dinokernels
from dinokernels import _config
from dinokernels.ops import ibot_patch_loss
from dinokernels.ops.ibot_patch_loss_ref import ibot_patch_loss_ref
from dk_test_helpers import CUDA_DTYPES, assert_within_torch_error, registered
from dk_test_helpers import backend  # noqa: F401 (a fixture, used by name)
from ssl_references import ibot_masked_loss, masked_token_weights, token_cross_entropy


def weighted_token_ce(student, teacher, weights, student_temp):
    """Σ_j w_j·(−Σ_k t_jk·log_softmax(s_j/τ)_k) in float64 (SPEC §3.4 before the division by the image count)."""
    return (weights.double() * token_cross_entropy(student, teacher, student_temp)).sum()


def loss_and_grad(fn, x, *args, **kwargs):
    x = x.detach().clone().requires_grad_(True)
    loss = fn(x, *args, **kwargs)
    (grad,) = torch.autograd.grad(loss, x)
    return loss.detach(), grad


def tolerance(dtype, amax):
    """Relative accuracy of a softmax-type computation in `dtype` whose exponent arguments (logit/temperature)
    reach `amax` in magnitude: every argument carries a rounding error of about eps·amax."""
    eps = torch.finfo(dtype).eps
    return max(1e-5 if dtype != torch.float64 else 1e-10, 8 * eps * amax)


def assert_matches(loss, grad, loss_ref, grad_ref, dtype, amax, student, teacher, weights, temp):
    """Loss error ≈ Σ|w|·eps·amax; gradient error ≈ tol × its largest term |w|·(Σt·softmax + t)/τ (the gradient
    itself can cancel to far less, e.g. 0 for K = 1 or flat logits)."""
    tol = tolerance(dtype, amax)
    assert loss.dtype == dtype and grad.dtype == dtype and loss.shape == ()
    w, t = weights.double().abs()[:, None], teacher.double()
    terms = w * (t.sum(-1, keepdim=True) * torch.softmax(student.double() / temp, dim=-1) + t) / temp
    torch.testing.assert_close(loss.double(), loss_ref, rtol=tol, atol=tol * max(w.sum().item(), 1e-30))
    torch.testing.assert_close(grad.double(), grad_ref, rtol=tol, atol=tol * terms.max().item())


def targets(n, k, dtype=torch.float64, scale=1.0, temp=0.04):
    return torch.softmax(torch.randn(n, k, dtype=torch.float64) * scale / temp, dim=-1).to(dtype)


# name → (student logits scale, student temp, teacher logits scale, teacher temp)
REGIMES = {
    "normal": (1.0, 0.1, 1.0, 0.04),
    "peaked": (30.0, 0.1, 30.0, 0.04),
    "flat": (1e-4, 0.1, 1e-4, 0.07),
    "huge": (1e4, 0.1, 1.0, 0.07),
}
# (17, 65537): a gradient over 4 MiB, written by the CPU kernel with non-temporal stores, rows misaligned.
SHAPES = [(1, 1), (1, 7), (7, 1000), (300, 33), (13, 4099), (3, 65537), (17, 65537)]


def make_case(n, k, regime, dtype):
    s_scale, s_temp, t_scale, t_temp = REGIMES[regime]
    student = (torch.randn(n, k, dtype=torch.float64) * s_scale).to(dtype)
    teacher = targets(n, k, dtype, t_scale, t_temp)
    weights = (torch.rand(n, dtype=torch.float64) / max(n, 1)).to(dtype)
    return student, teacher, weights, s_temp, max(student.abs().max().item() / s_temp, 1.0)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("n,K,regime", [(n, k, r) for n, k in SHAPES for r in REGIMES if k < 65537 or r == "normal"])
def test_matches_reference(n, K, regime, dtype):
    student, teacher, weights, temp, amax = make_case(n, K, regime, dtype)
    loss, grad = loss_and_grad(ibot_patch_loss, student, teacher, weights, temp)
    loss_ref, grad_ref = loss_and_grad(weighted_token_ce, student.double(), teacher, weights, temp)
    assert_matches(loss, grad, loss_ref, grad_ref, dtype, amax, student, teacher, weights, temp)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_matches_dinov2_forward_masked_with_mask_weights(dtype):
    # 2B = 6 global-crop images of 49 patches, one without any masked patch: the dinov2 weights 1/max(n_i, 1)
    # per masked token and the division by 2B, against ibot_patch_loss(...) / 2B.
    n_images, n_patches, K = 6, 49, 513
    masks = torch.rand(n_images, n_patches) < torch.tensor([0.1, 0.5, 0.3, 0.0, 0.45, 0.2])[:, None]
    masks[0, 3] = True
    n = int(masks.sum())
    student = (torch.randn(n, K, dtype=torch.float64) * 2).to(dtype)
    teacher = targets(n, K, dtype)
    weights = masked_token_weights(masks).to(dtype)  # 1/max(n_i, 1) per masked token
    loss, grad = loss_and_grad(lambda s: ibot_patch_loss(s, teacher, weights, 0.1) / n_images, student)
    loss_ref, grad_ref = loss_and_grad(ibot_masked_loss, student.double(), teacher, masks, student_temp=0.1)
    assert_matches(loss, grad, loss_ref, grad_ref, dtype, student.abs().max().item() / 0.1, student, teacher,
                   weights / n_images, 0.1)


def test_all_equal_logits_give_weighted_log_k():
    n, K = 5, 1000
    student = torch.full((n, K), -2.0, dtype=torch.float64)
    teacher, weights = targets(n, K), torch.rand(n, dtype=torch.float64)
    loss, grad = loss_and_grad(ibot_patch_loss, student, teacher, weights, 0.1)
    torch.testing.assert_close(loss, weights.sum() * torch.log(torch.tensor(K, dtype=torch.float64)),
                               rtol=1e-12, atol=0)
    torch.testing.assert_close(grad, weights[:, None] * (1 / K - teacher) / 0.1, rtol=1e-10, atol=1e-14)


def test_zero_and_negative_weights():
    n, K = 8, 40
    student, teacher = torch.randn(n, K, dtype=torch.float64), targets(n, K)
    weights = torch.randn(n, dtype=torch.float64)
    weights[[1, 5]] = 0.0
    loss, grad = loss_and_grad(ibot_patch_loss, student, teacher, weights, 0.1)
    loss_ref, grad_ref = loss_and_grad(weighted_token_ce, student, teacher, weights, 0.1)
    assert_matches(loss, grad, loss_ref, grad_ref, torch.float64, student.abs().max().item() / 0.1, student,
                   teacher, weights, 0.1)
    assert not bool(grad[[1, 5]].any())


def test_unnormalised_targets_follow_the_formula():
    # Targets rounded to bfloat16 or arbitrary non-negative weights: Σ_k t_k ≠ 1, and the loss of SPEC §3.4 is
    # still Σ −t·log q (a fused form assuming Σt = 1 would be off by (Σt − 1)·LSE).
    n, K = 9, 700
    student, weights = torch.randn(n, K, dtype=torch.float64) * 5, torch.rand(n, dtype=torch.float64)
    for teacher in (targets(n, K, scale=0.3).bfloat16().double(), torch.rand(n, K, dtype=torch.float64) * 2 / K):
        assert (teacher.sum(-1) - 1).abs().max() > 1e-4
        loss, grad = loss_and_grad(ibot_patch_loss, student, teacher, weights, 0.1)
        loss_ref, grad_ref = loss_and_grad(weighted_token_ce, student, teacher, weights, 0.1)
        assert_matches(loss, grad, loss_ref, grad_ref, torch.float64, student.abs().max().item() / 0.1, student,
                       teacher, weights, 0.1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_empty_input_gives_zero(dtype):
    student = torch.randn(0, 11, dtype=dtype, requires_grad=True)
    loss = ibot_patch_loss(student, torch.rand(0, 11, dtype=dtype), torch.rand(0, dtype=dtype), 0.1)
    assert loss.shape == () and loss.dtype == dtype and loss.item() == 0.0
    (grad,) = torch.autograd.grad(loss, student)
    assert grad.shape == (0, 11) and grad.dtype == dtype


def test_default_temperature_is_0_1():
    student, teacher, weights = torch.randn(4, 9, dtype=torch.float64), targets(4, 9), torch.rand(4).double()
    assert torch.equal(ibot_patch_loss(student, teacher, weights), ibot_patch_loss(student, teacher, weights, 0.1))


@pytest.mark.parametrize("n,K", [(1, 3), (4, 5), (6, 1), (3, 9)])
def test_gradcheck(n, K):
    student = torch.randn(n, K, dtype=torch.float64, requires_grad=True)
    teacher, weights = targets(n, K, scale=0.1), torch.rand(n, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda s: ibot_patch_loss(s, teacher, weights, 0.1), (student,), eps=1e-6,
                                    atol=1e-6)


def test_gradient_flows_to_student_only():
    student = torch.randn(5, 12, requires_grad=True)
    teacher = targets(5, 12, torch.float32).requires_grad_(True)
    weights = torch.rand(5, requires_grad=True)
    loss = ibot_patch_loss(student, teacher, weights, 0.1)
    grads = torch.autograd.grad(loss, (student, teacher, weights), allow_unused=True)
    assert grads[0] is not None and grads[0].abs().sum() > 0
    for g in grads[1:]:
        assert g is None or not bool(g.any())


def test_non_contiguous_inputs():
    n, K = 31, 130
    student = torch.randn(K, n, dtype=torch.float64).T
    teacher = targets(n, 2 * K)[:, ::2]
    weights = torch.rand(2 * n, dtype=torch.float64)[::2]
    assert not (student.is_contiguous() or teacher.is_contiguous() or weights.is_contiguous())
    loss, grad = loss_and_grad(ibot_patch_loss, student, teacher, weights, 0.1)
    loss_c, grad_c = loss_and_grad(ibot_patch_loss, student.contiguous(), teacher.contiguous(),
                                   weights.contiguous(), 0.1)
    torch.testing.assert_close(loss, loss_c, rtol=0, atol=0)
    torch.testing.assert_close(grad, grad_c, rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_input_on_cpu_is_upcast(dtype):
    student = torch.randn(20, 300).to(dtype)
    teacher, weights = targets(20, 300, torch.float32), torch.rand(20)
    for t, w in ((teacher, weights), (teacher.to(dtype), weights.to(dtype))):
        loss, grad = loss_and_grad(ibot_patch_loss, student, t, w, 0.1)
        assert loss.dtype == torch.float32 and grad.dtype == dtype
        loss32, grad32 = loss_and_grad(ibot_patch_loss, student.float(), t.float(), w.float(), 0.1)
        torch.testing.assert_close(loss, loss32)
        torch.testing.assert_close(grad, grad32.to(dtype))


def test_torch_compile_fullgraph():
    def fn(student, teacher, weights):
        return ibot_patch_loss(student * 2.0, teacher, weights, 0.1) + ibot_patch_loss(student[:4], teacher[:4],
                                                                                         weights[:4], 0.2)

    compiled = torch.compile(fn, fullgraph=True)
    student, teacher, weights = torch.randn(10, 50), targets(10, 50, torch.float32), torch.rand(10)
    loss, grad = loss_and_grad(fn, student, teacher, weights)
    loss_c, grad_c = loss_and_grad(compiled, student, teacher, weights)
    torch.testing.assert_close(loss_c, loss)
    torch.testing.assert_close(grad_c, grad)


def test_reference_backend_runs_the_reference():
    student, teacher, weights = torch.randn(6, 12), targets(6, 12, torch.float32), torch.rand(6)
    with dinokernels.use_backend("reference"):
        assert torch.equal(ibot_patch_loss(student, teacher, weights, 0.1),
                           ibot_patch_loss_ref(student, teacher, weights, 0.1))


def _opcheck_soft_ce(student, teacher, weights):
    """iBOT runs dinokernels::soft_ce_forward / soft_ce_backward on one view (1, n, K) with per-row weights."""
    forward, backward = registered("soft_ce_forward"), registered("soft_ce_backward")
    args = (False, 0.1, 1.0, 1.0)
    names = "ibot_patch_loss,student_patch_logits,teacher_patch_probs,center,weights"
    s, t = student[None], teacher[None]
    torch.library.opcheck(forward, (s, t, None, weights, *args, False, names))
    torch.library.opcheck(forward, (s.detach(), t, None, weights, *args, False, names))
    torch.library.opcheck(forward, (s, t, None, weights, *args, False, names, True))
    _, student_stats, target_sum, teacher_stats, _, _ = forward(s.detach(), t, None, weights, *args, False, names)
    grad_loss = torch.tensor(0.7, dtype=target_sum.dtype, device=target_sum.device)
    torch.library.opcheck(backward, (grad_loss, s.detach(), t, None, weights, *args, student_stats, target_sum,
                                     teacher_stats))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_opcheck(dtype):
    for n, K in [(5, 7), (1, 33)]:
        student = torch.randn(n, K, dtype=dtype, requires_grad=True)
        _opcheck_soft_ce(student, targets(n, K, dtype), torch.rand(n, dtype=dtype))


# ---------------------------------------------------------------- bad input

def _with(t, index, value):
    t = t.clone()
    t[index] = value
    return t


BAD_INPUTS = [  # keyword overrides of a good call (n=4, K=6), exception, argument named, message fragment
    ({"student_patch_logits": torch.randn(4, 6, 1)}, ValueError, "student_patch_logits", "2-D"),
    ({"student_patch_logits": torch.randn(6)}, ValueError, "student_patch_logits", "2-D"),
    ({"teacher_patch_probs": torch.rand(2, 2, 6)}, ValueError, "teacher_patch_probs", "2-D"),
    ({"teacher_patch_probs": torch.rand(4, 7)}, ValueError, "teacher_patch_probs", ""),
    ({"teacher_patch_probs": torch.rand(5, 6)}, ValueError, "teacher_patch_probs", ""),
    ({"weights": torch.rand(5)}, ValueError, "weights", ""),
    ({"weights": torch.rand(4, 1)}, ValueError, "weights", ""),
    ({"weights": torch.rand(())}, ValueError, "weights", ""),
    ({"student_patch_logits": torch.ones(4, 6, dtype=torch.int32)}, TypeError, "student_patch_logits", ""),
    ({"teacher_patch_probs": torch.ones(4, 6, dtype=torch.int64)}, TypeError, "teacher_patch_probs", ""),
    ({"weights": torch.ones(4, dtype=torch.bool)}, TypeError, "weights", ""),
    ({"student_patch_logits": _with(torch.randn(4, 6), (2, 5), float("nan"))}, ValueError, "student_patch_logits",
     "non-finite"),
    ({"teacher_patch_probs": _with(torch.rand(4, 6), (0, 0), float("inf"))}, ValueError, "teacher_patch_probs",
     "non-finite"),
    ({"weights": _with(torch.rand(4), 3, float("nan"))}, ValueError, "weights", "non-finite"),
    ({"student_temp": 0.0}, ValueError, "student_temp", ""),
    ({"student_temp": -1.0}, ValueError, "student_temp", ""),
    ({"student_temp": float("nan")}, ValueError, "student_temp", ""),
]


@pytest.mark.parametrize("override,exc,arg,fragment", BAD_INPUTS)
@pytest.mark.usefixtures("backend")
def test_bad_input_raises_naming_the_argument(override, exc, arg, fragment):
    kwargs = dict(student_patch_logits=torch.randn(4, 6), teacher_patch_probs=targets(4, 6, torch.float32),
                  weights=torch.rand(4), student_temp=0.1)
    kwargs.update(override)
    with pytest.raises(exc, match=f"'{arg}'.*{fragment}") as info:
        ibot_patch_loss(**kwargs)
    assert "dinokernels." in str(info.value)


def test_nonfinite_gives_nonfinite_loss_when_check_is_off():
    student, teacher, weights = torch.randn(6, 20), targets(6, 20, torch.float32), torch.rand(6)
    cases = [(_with(student, (2, 3), float("nan")), teacher, weights),
             (_with(student, (0, 0), float("inf")), teacher, weights),
             (student, _with(teacher, (1, 5), float("nan")), weights),
             (student, teacher, _with(weights, 4, float("inf")))]
    previous_setting = _config.finite_check_setting()
    _config.set_check_finite(False)
    try:
        for s, t, w in cases:
            assert not torch.isfinite(ibot_patch_loss(s, t, w, 0.1))
            assert not torch.isfinite(weighted_token_ce(s, t, w, 0.1))
    finally:
        _config.set_check_finite(previous_setting)


# ---------------------------------------------------------------- CUDA kernel

@pytest.mark.cuda
@pytest.mark.parametrize("dtype", CUDA_DTYPES)
@pytest.mark.parametrize("n,K", [(37, 65537), (1000, 4099), (3, 7)])
def test_cuda_matches_float64(n, K, dtype):
    student = (torch.randn(n, K) * 3).to(dtype).cuda()
    teacher = targets(n, K, torch.float32).to(dtype).cuda()
    weights = (torch.rand(n) / n).to(dtype).cuda()
    loss, grad = loss_and_grad(ibot_patch_loss, student, teacher, weights, 0.1)
    assert loss.dtype == torch.float32 and grad.dtype == dtype and grad.is_cuda
    loss_t, grad_t = loss_and_grad(ibot_patch_loss_ref, student, teacher, weights, 0.1)  # PyTorch, this precision
    student64, teacher64, weights64 = student.double().cpu(), teacher.double().cpu(), weights.double().cpu()
    loss64, grad64 = loss_and_grad(weighted_token_ce, student64, teacher64, weights64, 0.1)
    floor = 8 * torch.finfo(torch.float32).eps * student64.abs().max().item() / 0.1
    terms = weights64[:, None] * (teacher64.sum(-1, keepdim=True) * torch.softmax(student64 / 0.1, -1) + teacher64)
    assert_within_torch_error("loss", loss, loss_t, loss64, floor * weights64.sum().item())
    assert_within_torch_error("grad", grad, grad_t, grad64, floor * terms.max().item() / 0.1)


@pytest.mark.cuda
def test_cuda_matches_cpu_kernel_empty_and_bad_input():
    student, teacher, weights = torch.randn(50, 3000), targets(50, 3000, torch.float32), torch.rand(50)
    loss_cpu, grad_cpu = loss_and_grad(ibot_patch_loss, student, teacher, weights, 0.1)
    loss_gpu, grad_gpu = loss_and_grad(ibot_patch_loss, student.cuda(), teacher.cuda(), weights.cuda(), 0.1)
    torch.testing.assert_close(loss_gpu.cpu(), loss_cpu, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grad_gpu.cpu(), grad_cpu, rtol=1e-4, atol=1e-5 * grad_cpu.abs().max().item())
    empty = torch.randn(0, 5, device="cuda", requires_grad=True)
    loss = ibot_patch_loss(empty, torch.rand(0, 5, device="cuda"), torch.rand(0, device="cuda"), 0.1)
    assert loss.item() == 0.0 and torch.autograd.grad(loss, empty)[0].shape == (0, 5)
    bad = teacher.clone().cuda()
    bad[3, 7] = float("inf")
    with _config.checking_finite(True), pytest.raises(ValueError, match="'teacher_patch_probs'.*non-finite"):
        ibot_patch_loss(student.cuda(), bad, weights.cuda(), 0.1)
    # CUDA default: unchecked (no sync), the loss is not finite
    assert not torch.isfinite(ibot_patch_loss(student.cuda(), bad, weights.cuda(), 0.1)).all()
    _opcheck_soft_ce(student[:4, :33].contiguous().cuda().requires_grad_(), teacher[:4, :33].contiguous().cuda(),
                     weights[:4].cuda())


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", CUDA_DTYPES)
@pytest.mark.parametrize("n,K", [(1, 4), (37, 4100)])
def test_cuda_vector_and_scalar_paths_match_cpu_kernel(n, K, dtype):
    """One view and one teacher (S = T = 1) through the 4-wide load path (K % 4 == 0, aligned) and, for a student
    view starting one element into its storage, the element-wise path: the CPU kernel's loss and gradient."""
    student, teacher, weights = torch.randn(n, K).to(dtype), targets(n, K, torch.float32), torch.rand(n)
    loss_cpu, grad_cpu = loss_and_grad(ibot_patch_loss, student.float(), teacher, weights, 0.1)
    tol = tolerance(torch.float32, student.float().abs().max().item() / 0.1)
    eps = torch.finfo(dtype).eps
    for offset in (0, 1):
        storage = torch.zeros(n * K + offset, dtype=dtype, device="cuda")
        storage[offset:] = student.reshape(-1).cuda()
        storage.requires_grad_(True)
        loss = ibot_patch_loss(storage[offset:].view(n, K), teacher.cuda(), weights.cuda(), 0.1)
        grad = torch.autograd.grad(loss, storage)[0][offset:].view(n, K)
        torch.testing.assert_close(loss.detach().cpu(), loss_cpu, rtol=tol, atol=tol)
        torch.testing.assert_close(grad.float().cpu(), grad_cpu.to(dtype).float(), rtol=max(2 * eps, tol, 1e-4),
                                   atol=1e-5 * grad_cpu.abs().max().item())
