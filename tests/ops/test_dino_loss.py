"""dino_loss and dino_loss_centered: kernels against the DINO v1 loss of SPEC §2.1 evaluated in float64 by the oracles
of tests/ssl_references.py (loss and gradient), gradcheck, opcheck, torch.compile, non-contiguous and 16-bit input, bad
input, and the CUDA kernels (marked `cuda`)."""
import math

import pytest
import torch

import dinokernels
from dinokernels import _config
from dinokernels.ops import dino_loss, dino_loss_centered, softmax_center
from dinokernels.ops.dino_loss_ref import dino_loss_centered_ref, dino_loss_ref
from dk_test_helpers import CUDA_DTYPES, assert_within_torch_error, registered
from dk_test_helpers import backend  # noqa: F401 (a fixture, used by name)
from ssl_references import DinoV1Reference, cross_view_cross_entropy


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


def grad_term_scale(student, teacher_probs, student_temp):
    """The largest term of the gradient (ΣP_v·softmax(z_v/τ) + P_v)/(τ·n_pairs·B), P_v = Σ_{t≠v} p_t: the scale of
    its rounding error (the gradient itself can cancel to far less, e.g. 0 for K = 1 or flat logits)."""
    s, b, _ = student.shape
    t = teacher_probs.shape[0]
    soft = torch.softmax(student.double() / student_temp, dim=-1)
    p = teacher_probs.double()
    best = 0.0
    for v in range(s):
        pv = sum((p[i] for i in range(t) if i != v), torch.zeros_like(soft[v]))
        best = max(best, (pv.sum(-1, keepdim=True) * soft[v] + pv).max().item())
    return best / (student_temp * (t * s - t) * b)


def assert_matches(loss, grad, loss_ref, grad_ref, dtype, amax, grad_scale):
    tol = tolerance(dtype, amax)
    assert loss.dtype == dtype and grad.dtype == dtype
    torch.testing.assert_close(loss.double(), loss_ref, rtol=tol, atol=tol)
    torch.testing.assert_close(grad.double(), grad_ref, rtol=tol, atol=tol * grad_scale)


def teacher_probs_like(t, b, k, dtype=torch.float64, scale=1.0, temp=0.04):
    return torch.softmax(torch.randn(t, b, k, dtype=torch.float64) * scale / temp, dim=-1).to(dtype)


# (S, T, B, K): S ∈ {2, 4, 10}, T ∈ {1, 2}, B ∈ {1, 3}, K off every tile size.
SHAPES = [(2, 2, 3, 7), (4, 2, 3, 1000), (10, 2, 1, 4099), (10, 2, 3, 257), (2, 1, 3, 7), (4, 1, 1, 1),
          (3, 2, 1, 1), (4, 2, 2, 65537)]

# name → (student logits scale, student temp, teacher logits scale, teacher temp)
REGIMES = {
    "normal": (1.0, 0.1, 1.0, 0.04),
    "peaked": (30.0, 0.1, 30.0, 0.04),
    "flat": (1e-4, 0.1, 1e-4, 0.07),
    "huge": (1e4, 0.1, 1.0, 0.04),
}


CASES = [(*shape, regime) for shape in SHAPES for regime in REGIMES if shape[3] < 65537 or regime == "normal"]


def make_case(s, t, b, k, regime, dtype):
    s_scale, s_temp, t_scale, t_temp = REGIMES[regime]
    student = (torch.randn(s, b, k, dtype=torch.float64) * s_scale).to(dtype)
    teacher = teacher_probs_like(t, b, k, dtype, t_scale, t_temp)
    return student, teacher, s_temp, student.abs().max().item() / s_temp


# ---------------------------------------------------------------- dino_loss, CPU kernel


@pytest.mark.parametrize("S,T,B,K,regime", CASES)
def test_float64_matches_reference(S, T, B, K, regime):
    student, teacher, temp, amax = make_case(S, T, B, K, regime, torch.float64)
    loss, grad = loss_and_grad(dino_loss, student, teacher, temp)
    loss_ref, grad_ref = loss_and_grad(cross_view_cross_entropy, student, teacher, temp)
    assert_matches(loss, grad, loss_ref, grad_ref, torch.float64, amax, grad_term_scale(student, teacher, temp))


@pytest.mark.parametrize("S,T,B,K,regime", CASES)
def test_float32_matches_float64(S, T, B, K, regime):
    student, teacher, temp, amax = make_case(S, T, B, K, regime, torch.float32)
    loss, grad = loss_and_grad(dino_loss, student, teacher, temp)
    loss_ref, grad_ref = loss_and_grad(cross_view_cross_entropy, student.double(), teacher.double(), temp)
    assert_matches(loss, grad, loss_ref, grad_ref, torch.float32, amax, grad_term_scale(student, teacher, temp))


def test_all_equal_logits_give_log_k():
    # Uniform student and any targets: every cross-entropy is log K and the gradient is (1/K − p)/τ/(n·B).
    S, T, B, K = 4, 2, 3, 1000
    student = torch.full((S, B, K), 3.25, dtype=torch.float64)
    teacher = teacher_probs_like(T, B, K)
    loss, grad = loss_and_grad(dino_loss, student, teacher, 0.1)
    torch.testing.assert_close(loss, torch.tensor(math.log(K), dtype=torch.float64), rtol=1e-12, atol=0)
    n_terms = T * S - T
    expected = torch.zeros_like(grad)
    for v in range(S):
        targets = [teacher[t] for t in range(T) if t != v]
        expected[v] = (len(targets) / K - sum(targets)) / 0.1 / (n_terms * B)
    torch.testing.assert_close(grad, expected, rtol=1e-10, atol=1e-14)


def test_student_default_temperature_is_0_1():
    student, teacher = torch.randn(3, 2, 9, dtype=torch.float64), teacher_probs_like(2, 2, 9)
    assert torch.equal(dino_loss(student, teacher), dino_loss(student, teacher, 0.1))
    torch.testing.assert_close(dino_loss(student, teacher), cross_view_cross_entropy(student, teacher, 0.1),
                               rtol=1e-12, atol=0)


def test_unnormalised_targets_follow_the_formula():
    # The loss of SPEC §2.1 is Σ −p·log q for whatever p it gets (the targets are not renormalised). Targets
    # rounded to bfloat16 (what a 16-bit teacher produces) or arbitrary non-negative weights do not sum to exactly
    # 1 per row; a fused form that assumes they do would be off by (Σp − 1)·LSE.
    S, T, B, K = 4, 2, 3, 500
    student = torch.randn(S, B, K, dtype=torch.float64) * 5
    for teacher in (teacher_probs_like(T, B, K, scale=0.3).bfloat16().double(),
                    torch.rand(T, B, K, dtype=torch.float64) * 2 / K):
        assert (teacher.sum(-1) - 1).abs().max() > 1e-4
        loss, grad = loss_and_grad(dino_loss, student, teacher, 0.1)
        loss_ref, grad_ref = loss_and_grad(cross_view_cross_entropy, student, teacher, 0.1)
        assert_matches(loss, grad, loss_ref, grad_ref, torch.float64, student.abs().max().item() / 0.1,
                       grad_term_scale(student, teacher, 0.1))


@pytest.mark.parametrize("S,T,B,K", [(2, 2, 2, 5), (3, 1, 1, 4), (4, 2, 2, 6), (3, 2, 2, 1)])
def test_gradcheck(S, T, B, K):
    student = torch.randn(S, B, K, dtype=torch.float64, requires_grad=True)
    teacher = teacher_probs_like(T, B, K, scale=0.1)
    assert torch.autograd.gradcheck(lambda s: dino_loss(s, teacher, 0.1), (student,), eps=1e-6, atol=1e-6)


def test_gradient_flows_to_student_only():
    student = torch.randn(4, 3, 11, requires_grad=True)
    teacher = teacher_probs_like(2, 3, 11, torch.float32).requires_grad_(True)
    loss = dino_loss(student, teacher, 0.1)
    g_student, g_teacher = torch.autograd.grad(loss, (student, teacher), allow_unused=True)
    assert g_student is not None and g_student.abs().sum() > 0
    assert g_teacher is None or not bool(g_teacher.any())
    # Only the teacher requiring grad: nothing to differentiate.
    loss = dino_loss(student.detach(), teacher, 0.1)
    assert not loss.requires_grad


def test_backward_scales_with_upstream_gradient():
    student = torch.randn(3, 2, 20, dtype=torch.float64, requires_grad=True)
    teacher = teacher_probs_like(2, 2, 20)
    (g1,) = torch.autograd.grad(dino_loss(student, teacher), student)
    (g2,) = torch.autograd.grad(-2.5 * dino_loss(student, teacher), student)
    torch.testing.assert_close(g2, -2.5 * g1, rtol=1e-14, atol=0)


@pytest.mark.parametrize("centered", [False, True])
def test_gradient_from_the_forward_pass_is_deterministic_and_reusable(centered):
    """On the CPU the forward writes the gradient from its own exponentials when the student needs one. It must not
    depend on the thread count, must match the standalone backward kernel, and a retained graph must give the
    same gradient again (the first backward hands out the forward's buffer; later ones recompute it)."""
    S, T, B, K = 5, 2, 3, 4099
    student = torch.randn(S, B, K) * 3
    teacher, center = torch.randn(T, B, K), torch.randn(K) * 0.1
    targets = teacher if centered else torch.softmax(teacher / 0.04, dim=-1)

    def run(x):
        return dino_loss_centered(x, teacher, center, 0.04) if centered else dino_loss(x, targets)

    threads = torch.get_num_threads()
    grads = []
    try:
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            grads.append(loss_and_grad(run, student)[1])
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(grads[0], grads[1]) and torch.equal(grads[0], grads[2])
    with torch.no_grad():  # no gradient wanted: the forward-only kernel, then the standalone backward
        loss_plain = run(student)
    x = student.clone().requires_grad_(True)
    loss = run(x)
    torch.testing.assert_close(loss.detach(), loss_plain, rtol=1e-6, atol=0)  # centered: targets summed differently
    loss.backward(retain_graph=True)
    first = x.grad.clone()
    loss.backward(retain_graph=True)
    assert torch.equal(x.grad, 2 * first)
    (-0.5 * loss).backward()
    torch.testing.assert_close(x.grad, 1.5 * first, rtol=1e-6, atol=0)
    assert torch.equal(first, grads[0])
    ref_grad = loss_and_grad(dino_loss_centered_ref if centered else dino_loss_ref, student.double(),
                             *((teacher.double(), center.double(), 0.04) if centered else (targets.double(),)))[1]
    torch.testing.assert_close(first.double(), ref_grad, rtol=0, atol=1e-5 * ref_grad.abs().max().item())


@pytest.mark.parametrize("S,T,B,K", [(3, 2, 3, 120_007), (2, 1, 1, 600_001)])
@pytest.mark.parametrize("centered", [False, True])
def test_large_gradient_written_with_streaming_stores(S, T, B, K, centered):
    """A CPU gradient of 4 MiB or more is written with non-temporal stores from the first vector-aligned element of
    each row (K odd: every row starts at a different alignment). Against float64, for 1 and 2 threads."""
    assert S * B * K * 4 >= 4 << 20
    student = torch.randn(S, B, K) * 2
    teacher, center = torch.randn(T, B, K), torch.randn(K) * 0.1
    probs = torch.softmax((teacher.double() - center.double()) / 0.04, dim=-1)
    if centered:
        def run(x):
            return dino_loss_centered(x, teacher, center, 0.04)
    else:
        def run(x):
            return dino_loss(x, probs.float())
    threads = torch.get_num_threads()
    results = []
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            results.append(loss_and_grad(run, student))
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(results[0][0], results[1][0]) and torch.equal(results[0][1], results[1][1])
    loss_ref, grad_ref = loss_and_grad(cross_view_cross_entropy, student.double(), probs, 0.1)
    amax = student.abs().max().item() / 0.1
    if centered:
        amax = max(amax, (teacher - center).abs().max().item() / 0.04)
    assert_matches(*results[0], loss_ref, grad_ref, torch.float32, amax, grad_term_scale(student, probs, 0.1))


@pytest.mark.parametrize("centered", [False, True])
def test_backward_allocates_no_zero_gradient_for_the_statistics(centered):
    """Only the loss is differentiable. Autograd must not build zero-filled gradients for the other outputs of the
    forward op (the (S, B, K) gradient buffer among them): that was one more S·B·K allocation and memset per
    backward, doubling the peak memory of a CPU training step."""
    S, T, B, K = 4, 2, 3, 257
    student = torch.randn(S, B, K, requires_grad=True)
    teacher, center = torch.randn(T, B, K), torch.randn(K) * 0.1
    loss = dino_loss_centered(student, teacher, center, 0.04) if centered else \
        dino_loss(student, torch.softmax(teacher / 0.04, dim=-1))
    with torch.profiler.profile(record_shapes=True) as prof:
        (grad,) = torch.autograd.grad(loss, student)
    # (The scalar fill_ of the loss's own grad_output, ones(()), is autograd.grad's and stays.)
    filled = [(e.name, e.input_shapes) for e in prof.events()
              if e.name in ("aten::zeros", "aten::zeros_like", "aten::zero_", "aten::fill_")
              and e.input_shapes and e.input_shapes[0] != []]
    assert filled == [], filled
    assert grad.shape == student.shape and torch.isfinite(grad).all()


def test_non_contiguous_inputs():
    S, T, B, K = 4, 2, 3, 129
    base_s = torch.randn(B, S, 2 * K, dtype=torch.float64)
    base_t = teacher_probs_like(B, T, 2 * K).permute(1, 0, 2)
    student = base_s.permute(1, 0, 2)[:, :, ::2]
    teacher = base_t[:, :, :K]
    assert not student.is_contiguous() and not teacher.is_contiguous()
    loss, grad = loss_and_grad(dino_loss, student, teacher, 0.1)
    loss_c, grad_c = loss_and_grad(dino_loss, student.contiguous(), teacher.contiguous(), 0.1)
    torch.testing.assert_close(loss, loss_c, rtol=0, atol=0)
    torch.testing.assert_close(grad, grad_c, rtol=0, atol=0)
    assert grad.shape == student.shape


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_input_on_cpu_is_upcast(dtype):
    student = torch.randn(4, 3, 300).to(dtype)
    teacher = teacher_probs_like(2, 3, 300, torch.float32)
    for t in (teacher, teacher.to(dtype)):
        loss, grad = loss_and_grad(dino_loss, student, t, 0.1)
        assert loss.dtype == torch.float32 and grad.dtype == dtype
        loss32, grad32 = loss_and_grad(dino_loss, student.float(), t.float(), 0.1)
        torch.testing.assert_close(loss, loss32)
        torch.testing.assert_close(grad, grad32.to(dtype))


def test_torch_compile_fullgraph():
    def fn(student, teacher):
        return dino_loss(student * 2.0, teacher, 0.1) + 0.5 * dino_loss(student[:3], teacher, 0.2)

    compiled = torch.compile(fn, fullgraph=True)
    student, teacher = torch.randn(5, 3, 40), teacher_probs_like(2, 3, 40, torch.float32)
    loss, grad = loss_and_grad(fn, student, teacher)
    loss_c, grad_c = loss_and_grad(compiled, student, teacher)
    torch.testing.assert_close(loss_c, loss)
    torch.testing.assert_close(grad_c, grad)


def test_reference_backend_runs_the_reference():
    student, teacher = torch.randn(3, 2, 12), teacher_probs_like(2, 2, 12, torch.float32)
    with dinokernels.use_backend("reference"):
        assert torch.equal(dino_loss(student, teacher, 0.1), dino_loss_ref(student, teacher, 0.1))


# ---------------------------------------------------------------- dino_loss_centered, CPU kernel


def spaced_logits(rows, k, spacing):
    """rows × k logits, each row a random permutation of values `spacing` apart, centred on 0."""
    return torch.stack([(torch.randperm(k) - (k - 1) / 2) * spacing for _ in range(rows)]).double()


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("S,T,B,K,t_scale,t_temp", [
    (10, 2, 3, 1000, 1.0, 0.04), (2, 2, 1, 7, 1.0, 0.07), (4, 1, 3, 4099, 30.0, 0.04),
    (4, 2, 2, 65537, 1.0, 0.04), (3, 2, 2, 33, 1e-4, 0.07), (3, 2, 2, 33, 1e4, 0.04), (2, 2, 3, 1, 1.0, 0.04),
])
def test_centered_matches_reference_dino_loss_and_center_update(S, T, B, K, t_scale, t_temp, dtype):
    student = (torch.randn(S, B, K, dtype=torch.float64) * 3).to(dtype)
    if t_scale >= 1e4:
        # Logits up to ±1e4 (exp would overflow 1e5 times over), 600 apart: the targets are exactly one-hot in
        # any precision, so only the student's scale sets the accuracy of the loss.
        teacher = spaced_logits(T * B, K, 2e4 / K).reshape(T, B, K).to(dtype)
        center = (torch.randn(1, K, dtype=torch.float64)).to(dtype)
        amax = student.abs().max().item() / 0.1
    else:
        teacher = (torch.randn(T, B, K, dtype=torch.float64) * t_scale).to(dtype)
        center = (torch.randn(1, K, dtype=torch.float64) * t_scale * 0.5).to(dtype)
        # Gradient error grows with the student's logits/τ_s; the targets' with the teacher's (logit − c)/τ_t.
        amax = max(student.abs().max().item() / 0.1, (teacher - center).abs().max().item() / t_temp)
    reference = DinoV1Reference(K, S, t_temp, n_global=T, center=center)
    loss_ref, grad_ref = loss_and_grad(reference, student.double().reshape(S * B, K), teacher.double().reshape(-1, K))
    grad_ref = grad_ref.reshape(S, B, K)
    probs = torch.softmax((teacher.double() - center.double()) / t_temp, dim=-1)
    if t_scale >= 1e4:
        assert bool(((probs == 0) | (probs == 1)).all())
        assert not torch.isfinite(torch.exp(teacher.double() / t_temp)).all()

    s = student.clone().requires_grad_(True)
    loss, logit_sum = dino_loss_centered(s, teacher, center, t_temp, 0.1, return_sum=True)
    (grad,) = torch.autograd.grad(loss, s)
    assert_matches(loss.detach(), grad, loss_ref, grad_ref, dtype, amax, grad_term_scale(student, probs, 0.1))

    assert logit_sum.shape == (K,) and logit_sum.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert not logit_sum.requires_grad
    n_rows = T * B
    sum_atol = torch.finfo(dtype).eps * max(n_rows, 16) * teacher.double().abs().sum(dim=(0, 1)).max().item()
    torch.testing.assert_close(logit_sum.double(), teacher.double().sum(dim=(0, 1)), rtol=0, atol=sum_atol)
    # The v1 update c ← 0.9c + 0.1·Σz/(T·B) from the returned sum reproduces the reference center.
    new_center = 0.9 * center.double().reshape(1, K) + 0.1 * logit_sum.double() / n_rows
    torch.testing.assert_close(new_center, reference.center, rtol=1e-12, atol=0.1 * sum_atol / n_rows + 1e-15)


# Large common offsets in the logits (DINO's center starts at 0; DINOv2's head norm g is trainable): the float32
# kernels against PyTorch's own float32 evaluation of the formula, both measured against float64.
# Targets computed by PyTorch are normalised (each row sums to 1 up to eps), so the teacher's offset costs it almost
# nothing; a fused kernel should do as well. (A student offset of 1e3 at τ_s = 0.1 costs the kernel's gradient
# ~eps·|z/τ_s| on the top entries, where PyTorch's is exact: up to ~30× PyTorch's error, within the generic
# eps·|z/τ| bound of test_float32_matches_float64, so not asserted here.)
OFFSET_CASES = {  # name → (student logits, teacher logits or None for probability targets) makers, S=4 T=2 B=3
    "student_uniform_1e4": (lambda k: (torch.rand(4, 3, k) * 2 - 1) * 1e4, None),
    "teacher_randn": (lambda k: torch.randn(4, 3, k) * 3, lambda k: torch.randn(2, 3, k)),
    "teacher_offset_1e2": (lambda k: torch.randn(4, 3, k) * 3, lambda k: 1e2 + torch.randn(2, 3, k)),
    "teacher_offset_1e3": (lambda k: torch.randn(4, 3, k) * 3, lambda k: 1e3 + torch.randn(2, 3, k)),
    "teacher_spaced_1e4": (lambda k: torch.randn(4, 3, k) * 3, lambda k: spaced_logits(6, k, 2e4 / k).reshape(2, 3, k)),
}


@pytest.mark.parametrize("case", list(OFFSET_CASES))
def test_float32_error_within_20x_pytorch_float32(case):
    K, t_temp = 1000, 0.04
    make_student, make_teacher = OFFSET_CASES[case]
    for _ in range(3):
        student = make_student(K).float()
        if make_teacher is None:
            teacher = teacher_probs_like(2, 3, K, torch.float32)
            fn, ref_fn, args, probs64 = dino_loss, dino_loss_ref, (teacher, 0.1), teacher.double()
        else:
            teacher, center = make_teacher(K).float(), torch.randn(K)
            fn, ref_fn, args = dino_loss_centered, dino_loss_centered_ref, (teacher, center, t_temp, 0.1)
            probs64 = torch.softmax((teacher.double() - center.double()) / t_temp, dim=-1)
        loss, grad = loss_and_grad(fn, student, *args)
        loss_t, grad_t = loss_and_grad(ref_fn, student, *args)
        loss64, grad64 = loss_and_grad(ref_fn, student.double(), *(a.double() if torch.is_tensor(a) else a
                                                                    for a in args))
        # Floor: float32 rounding of the student's logits relative to their row maximum.
        spread = (student.double().amax(-1, keepdim=True) - student.double()).max().item() / 0.1
        floor = 16 * torch.finfo(torch.float32).eps * spread
        for name, got, own, ref, scale in (("loss", loss, loss_t, loss64, 1.0),
                                           ("grad", grad, grad_t, grad64, grad_term_scale(student, probs64, 0.1))):
            err = (got.double() - ref).abs().max().item()
            base = (own.double() - ref).abs().max().item()
            assert err <= 20 * base + floor * scale, (f"{name}: kernel float32 error {err:.3g}, PyTorch float32 "
                                                      f"{base:.3g}, floor {floor * scale:.3g}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("K", [50, 4099])
def test_logits_near_1e9_match_the_exact_loss(K, dtype):
    """Issue 16: student logits around 1e9 raised "non-finite loss (overflow)" (z·(1/τ_s) fused with the rounded
    maximum into an FMA gave exp(±512)), where the loss itself is ~1e3. Logits 1e9 + multiples of 128 (exact in
    float32); the exact loss is shift-invariant per row, so the oracle is float64 on the row-shifted logits. The
    centered variant puts teacher logits and center near 1e9 as well."""
    gen = torch.Generator().manual_seed(K)
    student = 1e9 + 128.0 * torch.randint(-40, 41, (4, 3, K), generator=gen, dtype=torch.float64)
    teacher_logits = -1e9 + 128.0 * torch.randint(-40, 41, (2, 3, K), generator=gen, dtype=torch.float64)
    center = -2e9 + 128.0 * torch.randint(-5, 6, (K,), generator=gen, dtype=torch.float64)
    for x in (student, teacher_logits, center):
        assert torch.equal(x.float().double(), x)
    shifted = student - student.amax(-1, keepdim=True)
    t_temp = 300.0
    centered = teacher_logits - center  # exact: integers below 2^53, and so is the shift by the row maximum
    probs64 = torch.softmax((centered - centered.amax(-1, keepdim=True)) / t_temp, dim=-1)
    cases = ((dino_loss, (probs64.to(dtype), 50.0), dino_loss_ref, (probs64, 50.0)),
             (dino_loss_centered, (teacher_logits.to(dtype), center.to(dtype), t_temp, 50.0), dino_loss_ref,
              (probs64, 50.0)))
    tol = tolerance(dtype, 1.0)  # exponents (z − max)/τ_s are exact to their own size, ≤ 10240/50
    for fn, args, ref_fn, ref_args in cases:
        loss, grad = loss_and_grad(fn, student.to(dtype), *args)
        loss64, grad64 = loss_and_grad(ref_fn, shifted, *ref_args)
        assert 10 < loss64.item() < 1e5
        torch.testing.assert_close(loss.double(), loss64, rtol=tol, atol=0)
        torch.testing.assert_close(grad.double(), grad64, rtol=0, atol=tol * grad64.abs().max().item())
    # A single row [[1e9, 0]]-like case at the default temperature: finite, and the exact value.
    student = torch.tensor([[[1e9, 0.0]], [[0.0, 1e9]]], dtype=dtype)
    probs = torch.tensor([[[0.5, 0.5]], [[0.25, 0.75]]], dtype=dtype)
    loss = dino_loss(student, probs)
    exact = (0.5 * 1e10 + 0.75 * 1e10) / 2  # view 0 vs teacher 1 and view 1 vs teacher 0, mean over 2 pairs
    torch.testing.assert_close(loss.double(), torch.tensor(exact, dtype=torch.float64), rtol=1e-6, atol=0)


def test_zero_target_against_a_logit_gap_beyond_the_float_range():
    # z − max overflows to −inf where the target is 0: the term is 0, not NaN.
    big = torch.finfo(torch.float32).max * 0.9
    student = torch.tensor([[[big, -big, 0.0]], [[0.0, 1.0, 2.0]]])
    probs = torch.tensor([[[1.0, 0.0, 0.0]], [[1.0, 0.0, 0.0]]])
    loss = dino_loss(student, probs)
    loss64 = dino_loss_ref(student.double() - student.double().amax(-1, keepdim=True), probs.double())
    torch.testing.assert_close(loss.double(), loss64, rtol=1e-6, atol=0)


def test_centered_equals_softmax_center_then_dino_loss():
    S, T, B, K = 6, 2, 3, 777
    student = torch.randn(S, B, K, dtype=torch.float64)
    teacher = torch.randn(T, B, K, dtype=torch.float64)
    center = torch.randn(K, dtype=torch.float64) * 0.3
    for temp in (0.04, 0.07):
        probs = softmax_center(teacher.reshape(T * B, K), center, temp).reshape(T, B, K)
        loss2, grad2 = loss_and_grad(dino_loss, student, probs, 0.1)
        loss1, grad1 = loss_and_grad(dino_loss_centered, student, teacher, center, temp, 0.1)
        torch.testing.assert_close(loss1, loss2, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(grad1, grad2, rtol=1e-10, atol=1e-12 * grad2.abs().max().item())


def test_centered_return_sum_default_and_center_shapes():
    S, T, B, K = 3, 2, 2, 50
    student, teacher = torch.randn(S, B, K, dtype=torch.float64), torch.randn(T, B, K, dtype=torch.float64)
    center = torch.randn(K, dtype=torch.float64)
    loss = dino_loss_centered(student, teacher, center, 0.04)
    assert isinstance(loss, torch.Tensor) and loss.shape == ()
    assert torch.equal(loss, dino_loss_centered(student, teacher, center, 0.04, 0.1, return_sum=False))
    for c in (center.reshape(1, K), center.reshape(1, 1, K)):
        assert torch.equal(dino_loss_centered(student, teacher, c, 0.04), loss)
    loss_s, total = dino_loss_centered(student, teacher, center, 0.04, return_sum=True)
    assert torch.equal(loss_s, loss)


@pytest.mark.parametrize("S,T,B,K", [(2, 2, 2, 5), (3, 1, 2, 4), (4, 2, 1, 6)])
def test_centered_gradcheck(S, T, B, K):
    student = torch.randn(S, B, K, dtype=torch.float64, requires_grad=True)
    teacher = torch.randn(T, B, K, dtype=torch.float64)
    center = torch.randn(K, dtype=torch.float64) * 0.1
    assert torch.autograd.gradcheck(lambda s: dino_loss_centered(s, teacher, center, 0.07, 0.1), (student,),
                                    eps=1e-6, atol=1e-6)


def test_centered_gradient_flows_to_student_only():
    student = torch.randn(3, 2, 9, requires_grad=True)
    teacher = torch.randn(2, 2, 9, requires_grad=True)
    center = torch.randn(1, 9, requires_grad=True)
    loss, total = dino_loss_centered(student, teacher, center, 0.04, return_sum=True)
    grads = torch.autograd.grad(loss, (student, teacher, center), allow_unused=True)
    assert grads[0] is not None and grads[0].abs().sum() > 0
    for g in grads[1:]:
        assert g is None or not bool(g.any())
    assert not total.requires_grad


def test_centered_non_contiguous_inputs():
    S, T, B, K = 4, 2, 3, 65
    student = torch.randn(B, S, K, dtype=torch.float64).permute(1, 0, 2)
    teacher = torch.randn(T, B, 2 * K, dtype=torch.float64)[:, :, ::2]
    center = torch.randn(2 * K, dtype=torch.float64)[1::2]
    assert not (student.is_contiguous() or teacher.is_contiguous() or center.is_contiguous())
    out = dino_loss_centered(student, teacher, center, 0.04, return_sum=True)
    ref = dino_loss_centered(student.contiguous(), teacher.contiguous(), center.contiguous(), 0.04, return_sum=True)
    assert torch.equal(out[0], ref[0]) and torch.equal(out[1], ref[1])
    g = torch.autograd.grad(dino_loss_centered(student.requires_grad_(), teacher, center, 0.04), student)[0]
    s_c = student.detach().contiguous().requires_grad_()
    g_c = torch.autograd.grad(dino_loss_centered(s_c, teacher.contiguous(), center.contiguous(), 0.04), s_c)[0]
    assert torch.equal(g, g_c)


def test_centered_half_input_on_cpu_is_upcast():
    student = torch.randn(4, 2, 100).bfloat16()
    teacher = torch.randn(2, 2, 100).bfloat16()
    center = torch.randn(1, 100) * 0.1  # the center buffer stays float32 under autocast
    loss, grad = loss_and_grad(dino_loss_centered, student, teacher, center, 0.04)
    assert loss.dtype == torch.float32 and grad.dtype == torch.bfloat16
    loss32, grad32 = loss_and_grad(dino_loss_centered, student.float(), teacher.float(), center, 0.04)
    torch.testing.assert_close(loss, loss32)
    torch.testing.assert_close(grad, grad32.bfloat16())


def test_centered_torch_compile_fullgraph():
    def fn(student, teacher, center):
        loss, total = dino_loss_centered(student, teacher, center, 0.04, 0.1, return_sum=True)
        return loss, 0.9 * center + 0.1 * total / 6

    compiled = torch.compile(fn, fullgraph=True)
    student, teacher, center = torch.randn(4, 3, 40), torch.randn(2, 3, 40), torch.randn(1, 40)
    s1 = student.clone().requires_grad_()
    loss, c = fn(s1, teacher, center)
    (grad,) = torch.autograd.grad(loss, s1)
    s2 = student.clone().requires_grad_()
    loss_c, c_c = compiled(s2, teacher, center)
    (grad_c,) = torch.autograd.grad(loss_c, s2)
    torch.testing.assert_close(loss_c, loss)
    torch.testing.assert_close(c_c, c)
    torch.testing.assert_close(grad_c, grad)


# ---------------------------------------------------------------- opcheck on the registered ops


# dinokernels::soft_ce_forward(student (S, B, K), teacher (T, B, K), center (K,) or None, weights (B,) or None,
# skip_same_view, student_temp, teacher_temp, scale, return_teacher_sum, arg_names, with_grad) → (loss, student
# statistics, target_sum, teacher statistics, teacher_sum, grad_student: (S, B, K) from the same pass when with_grad
# on the CPU, else (0,)); dinokernels::soft_ce_backward(grad_loss, student, teacher, center, weights,
# skip_same_view, student_temp, teacher_temp, scale, *the three statistics) → grad_student.
NAMES = "dino_loss,student_logits,teacher_probs,center,weights"


def _opcheck_soft_ce(student, teacher, center, args):
    forward, backward = registered("soft_ce_forward"), registered("soft_ce_backward")
    torch.library.opcheck(forward, (student, teacher, center, None, *args, NAMES))
    torch.library.opcheck(forward, (student.detach(), teacher, center, None, *args, NAMES))
    torch.library.opcheck(forward, (student, teacher, center, None, *args, NAMES, True))
    _, student_stats, target_sum, teacher_stats, _, _ = forward(student.detach(), teacher, center, None, *args,
                                                                NAMES)
    grad_loss = torch.tensor(1.5, dtype=target_sum.dtype, device=target_sum.device)
    torch.library.opcheck(backward, (grad_loss, student.detach(), teacher, center, None, *args[:-1], student_stats,
                                     target_sum, teacher_stats))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_opcheck(dtype):
    for S, T, B, K in [(3, 2, 2, 7), (2, 1, 1, 33)]:
        student = torch.randn(S, B, K, dtype=dtype, requires_grad=True)
        teacher = teacher_probs_like(T, B, K, dtype)
        _opcheck_soft_ce(student, teacher, None, (True, 0.1, 1.0, 1.0 / ((T * S - T) * B), False))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_opcheck_centered(dtype):
    S, T, B, K = 3, 2, 2, 7
    student = torch.randn(S, B, K, dtype=dtype, requires_grad=True)
    teacher, center = torch.randn(T, B, K, dtype=dtype), torch.randn(K, dtype=dtype)
    for return_sum in (True, False):
        _opcheck_soft_ce(student, teacher, center, (True, 0.1, 0.04, 1.0 / ((T * S - T) * B), return_sum))


# ---------------------------------------------------------------- bad input

def _good(S=3, T=2, B=2, K=5):
    return torch.randn(S, B, K), teacher_probs_like(T, B, K, torch.float32)


def _with(t, index, value):
    t = t.clone()
    t[index] = value
    return t


BAD_INPUTS = [  # (student, teacher, student_temp) makers, exception, argument named in the message, fragment
    (lambda: (torch.randn(6, 5), _good()[1], 0.1), ValueError, "student_logits", "3-D"),
    (lambda: (_good()[0], torch.randn(4, 5).softmax(-1), 0.1), ValueError, "teacher_probs", "3-D"),
    (lambda: (torch.randn(1, 3, 2, 5), _good()[1], 0.1), ValueError, "student_logits", "3-D"),
    (lambda: (_good(K=5)[0], _good(K=6)[1], 0.1), ValueError, "teacher_probs", ""),
    (lambda: (_good(B=2)[0], _good(B=3)[1], 0.1), ValueError, "teacher_probs", ""),
    (lambda: (_good(S=1)[0], _good(T=2)[1], 0.1), ValueError, "(student_logits|teacher_probs)", ""),
    (lambda: (torch.randn(3, 0, 5), torch.randn(2, 0, 5), 0.1), ValueError, "(student_logits|teacher_probs)", ""),
    (lambda: (_good()[0].long(), _good()[1], 0.1), TypeError, "student_logits", ""),
    (lambda: (_good()[0], _good()[1].int(), 0.1), TypeError, "teacher_probs", ""),
    (lambda: (_with(_good()[0], (1, 0, 2), float("nan")), _good()[1], 0.1), ValueError, "student_logits",
     "non-finite"),
    (lambda: (_good()[0], _with(_good()[1], (0, 1, 4), float("inf")), 0.1), ValueError, "teacher_probs",
     "non-finite"),
    (lambda: (_good()[0], _with(_good()[1], (1, 1, 0), float("nan")), 0.1), ValueError, "teacher_probs",
     "non-finite"),
    (lambda: (_good()[0], _good()[1], 0.0), ValueError, "student_temp", ""),
    (lambda: (_good()[0], _good()[1], -0.1), ValueError, "student_temp", ""),
    (lambda: (_good()[0], _good()[1], float("nan")), ValueError, "student_temp", ""),
]


@pytest.mark.parametrize("make,exc,arg,fragment", BAD_INPUTS)
@pytest.mark.usefixtures("backend")
def test_bad_input_raises_naming_the_argument(make, exc, arg, fragment):
    student, teacher, temp = make()
    with pytest.raises(exc, match=f"'{arg}'.*{fragment}") as info:
        dino_loss(student, teacher, temp)
    assert "dinokernels." in str(info.value)


CENTERED_BAD = [  # keyword overrides of a good call, exception, argument named
    ({"center": torch.randn(6)}, ValueError, "center"),
    ({"center": torch.tensor([0.0, float("nan"), 0.0, 0.0, 0.0])}, ValueError, "center"),
    ({"teacher_logits": _with(torch.randn(2, 2, 5), (1, 0, 3), float("inf"))}, ValueError, "teacher_logits"),
    ({"teacher_logits": _with(torch.randn(2, 2, 5), (0, 1, 1), float("nan"))}, ValueError, "teacher_logits"),
    ({"teacher_logits": torch.randn(4, 5)}, ValueError, "teacher_logits"),
    ({"teacher_logits": torch.randn(2, 2, 6)}, ValueError, "(teacher_logits|center)"),
    ({"student_logits": _with(torch.randn(3, 2, 5), (2, 1, 1), float("nan"))}, ValueError, "student_logits"),
    ({"student_logits": torch.randn(1, 2, 5)}, ValueError, "(student_logits|teacher_logits)"),
    ({"teacher_temp": 0.0}, ValueError, "teacher_temp"),
    ({"teacher_temp": -0.04}, ValueError, "teacher_temp"),
    ({"teacher_temp": float("nan")}, ValueError, "teacher_temp"),
    ({"student_temp": 0.0}, ValueError, "student_temp"),
    ({"center": torch.zeros(5, dtype=torch.int64)}, TypeError, "center"),
]


@pytest.mark.parametrize("override,exc,arg", CENTERED_BAD)
@pytest.mark.usefixtures("backend")
def test_centered_bad_input_raises_naming_the_argument(override, exc, arg):
    kwargs = dict(student_logits=torch.randn(3, 2, 5), teacher_logits=torch.randn(2, 2, 5), center=torch.zeros(5),
                  teacher_temp=0.04, student_temp=0.1)
    kwargs.update(override)
    with pytest.raises(exc, match=f"'{arg}'"):
        dino_loss_centered(**kwargs)


def test_nonfinite_gives_nonfinite_loss_when_check_is_off():
    student, teacher = _good(4, 2, 3, 20)
    cases = [(_with(student, (2, 1, 3), float("nan")), teacher), (_with(student, (0, 0, 0), float("inf")), teacher),
             (student, _with(teacher, (1, 2, 5), float("nan")))]
    previous_setting = _config.finite_check_setting()
    _config.set_check_finite(False)
    try:
        for s, t in cases:
            assert not torch.isfinite(dino_loss(s, t, 0.1))
            assert not torch.isfinite(cross_view_cross_entropy(s, t, 0.1))
        center = torch.zeros(20)
        center[7] = float("nan")
        assert not torch.isfinite(dino_loss_centered(student, torch.randn(2, 3, 20), center, 0.04))
    finally:
        _config.set_check_finite(previous_setting)


# ---------------------------------------------------------------- CUDA kernels

@pytest.mark.cuda
@pytest.mark.parametrize("dtype", CUDA_DTYPES)
@pytest.mark.parametrize("S,T,B,K", [(10, 2, 3, 65537), (4, 2, 16, 4099), (2, 1, 5, 7)])
def test_cuda_matches_float64(S, T, B, K, dtype):
    student = (torch.randn(S, B, K) * 3).to(dtype).cuda()
    teacher = teacher_probs_like(T, B, K, torch.float32).to(dtype).cuda()
    loss, grad = loss_and_grad(dino_loss, student, teacher, 0.1)
    assert loss.dtype == torch.float32 and grad.dtype == dtype and grad.is_cuda
    loss_t, grad_t = loss_and_grad(dino_loss_ref, student, teacher, 0.1)  # PyTorch in this precision
    student64, teacher64 = student.double().cpu(), teacher.double().cpu()
    loss64, grad64 = loss_and_grad(cross_view_cross_entropy, student64, teacher64, 0.1)
    floor = 8 * torch.finfo(torch.float32).eps * student64.abs().max().item() / 0.1
    assert_within_torch_error("loss", loss, loss_t, loss64, floor)
    assert_within_torch_error("grad", grad, grad_t, grad64, floor * grad_term_scale(student64, teacher64, 0.1))


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", CUDA_DTYPES)
def test_cuda_centered_matches_reference(dtype):
    S, T, B, K = 10, 2, 8, 65537
    student = (torch.randn(S, B, K) * 3).to(dtype).cuda()
    teacher = (torch.randn(T, B, K) * 2).to(dtype).cuda()
    center = (torch.randn(1, K) * 0.5).cuda()  # the center buffer is float32
    s = student.clone().requires_grad_(True)
    loss, total = dino_loss_centered(s, teacher, center, 0.04, 0.1, return_sum=True)
    (grad,) = torch.autograd.grad(loss, s)
    assert grad.dtype == dtype and total.dtype == torch.float32 and total.shape == (K,)
    s_t = student.clone().requires_grad_(True)
    loss_t, total_t = dino_loss_centered_ref(s_t, teacher, center, 0.04, 0.1, return_sum=True)
    (grad_t,) = torch.autograd.grad(loss_t, s_t)
    reference = DinoV1Reference(K, S, 0.04, n_global=T, center=center.cpu())
    loss64, grad64 = loss_and_grad(reference, student.double().cpu().reshape(S * B, K),
                                   teacher.double().cpu().reshape(T * B, K))
    student64, teacher64, center64 = student.double().cpu(), teacher.double().cpu(), center.double().cpu()
    probs64 = torch.softmax((teacher64 - center64) / 0.04, dim=-1)
    floor = 8 * torch.finfo(torch.float32).eps * max(student64.abs().max().item() / 0.1,
                                                     (teacher64 - center64).abs().max().item() / 0.04)
    assert_within_torch_error("loss", loss, loss_t, loss64, floor)
    assert_within_torch_error("grad", grad, grad_t, grad64.reshape(S, B, K),
                              floor * grad_term_scale(student64, probs64, 0.1))
    sum64 = teacher64.sum(dim=(0, 1))
    assert_within_torch_error("sum", total, total_t, sum64,
                              torch.finfo(torch.float32).eps * 16 * teacher64.abs().sum(dim=(0, 1)).max().item())


@pytest.mark.cuda
@pytest.mark.parametrize("S,T,B,K", [(2, 1, 1, 7), (17, 3, 2, 70001), (9, 2, 1, 81923)])
def test_cuda_row_merge_matches_cpu_kernel(S, T, B, K):
    """The CUDA row merge splits a row's 2048-column chunks over 32 lanes and its views over 8 warps: one chunk and
    B = 1, more chunks than lanes (35, 41) and more views than warps (17, 9) match the CPU kernel in both teacher
    modes, and a second run gives the same bits."""
    student = torch.randn(S, B, K)
    teacher = teacher_probs_like(T, B, K, torch.float32)
    logits, center = torch.randn(T, B, K), torch.randn(K) * 0.5
    # float32 on both sides; exponent arguments reach |z|/τ_s and |z_t − c|/τ_t
    tol = tolerance(torch.float32, max(student.abs().max().item() / 0.1, (logits - center).abs().max().item() / 0.04))
    for fn, args in ((dino_loss, (teacher, 0.1)), (dino_loss_centered, (logits, center, 0.04, 0.1))):
        loss_cpu, grad_cpu = loss_and_grad(fn, student, *args)
        cuda_args = tuple(a.cuda() if isinstance(a, torch.Tensor) else a for a in args)
        loss_gpu, grad_gpu = loss_and_grad(fn, student.cuda(), *cuda_args)
        torch.testing.assert_close(loss_gpu.cpu(), loss_cpu, rtol=tol, atol=tol)
        torch.testing.assert_close(grad_gpu.cpu(), grad_cpu, rtol=max(tol, 1e-4),
                                   atol=1e-5 * grad_cpu.abs().max().item())
        again = loss_and_grad(fn, student.cuda(), *cuda_args)
        assert torch.equal(again[0], loss_gpu) and torch.equal(again[1], grad_gpu)


def _gpu_storage_and_view(values, offset):
    """values on the GPU as a contiguous view starting `offset` elements into its storage (a misaligned pointer),
    and that storage's tensor."""
    storage = torch.zeros(values.numel() + offset, dtype=values.dtype, device="cuda")
    storage[offset:] = values.reshape(-1).cuda()
    return storage, storage[offset:].view(values.shape)


def _gpu_view(values, offset):
    return _gpu_storage_and_view(values, offset)[1]


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", CUDA_DTYPES)
@pytest.mark.parametrize("K", [4, 4099, 6144, 8196])
def test_cuda_vector_and_scalar_paths_match_cpu_kernel(K, dtype):
    """Packs of 4 columns are read 16 (float32) / 8 (16-bit) bytes at a time when K % 4 == 0 and every buffer is
    aligned, element by element otherwise: aligned buffers, K off the vector width, and a student, teacher or
    center view starting one element into its storage give the CPU kernel's loss and gradient, in both teacher
    modes (16-bit teacher logits, float32 targets)."""
    S, T, B = 3, 2, 2
    student = torch.randn(S, B, K).to(dtype)
    probs = teacher_probs_like(T, B, K, torch.float32)
    logits, center = torch.randn(T, B, K).to(dtype), torch.randn(K) * 0.5
    eps = torch.finfo(dtype).eps
    tol = tolerance(torch.float32, max(student.float().abs().max().item() / 0.1,
                                       (logits.float() - center).abs().max().item() / 0.04))
    for student_off, teacher_off, center_off in ((0, 0, 0), (1, 0, 0), (0, 1, 0), (0, 0, 1)):
        cases = ((dino_loss, (probs, 0.1), (_gpu_view(probs, teacher_off), 0.1)),
                 (dino_loss_centered, (logits.float(), center, 0.04, 0.1),
                  (_gpu_view(logits, teacher_off), _gpu_view(center, center_off), 0.04, 0.1)))
        for fn, cpu_args, gpu_args in cases:
            loss_cpu, grad_cpu = loss_and_grad(fn, student.float(), *cpu_args)
            storage = _gpu_storage_and_view(student, student_off)[0].requires_grad_(True)
            loss_gpu = fn(storage[student_off:].view(S, B, K), *gpu_args)  # the kernel sees the view's pointer
            grad_gpu = torch.autograd.grad(loss_gpu, storage)[0][student_off:].view(S, B, K)
            assert grad_gpu.dtype == dtype
            torch.testing.assert_close(loss_gpu.detach().cpu(), loss_cpu, rtol=tol, atol=tol)
            # the gradient is rounded to `dtype` once: up to an ulp apart where float32 results straddle a rounding
            torch.testing.assert_close(grad_gpu.float().cpu(), grad_cpu.to(dtype).float(),
                                       rtol=max(2 * eps, tol, 1e-4), atol=1e-5 * grad_cpu.abs().max().item())


@pytest.mark.cuda
def test_cuda_matches_cpu_kernel_deterministic_and_bad_input():
    student, teacher = torch.randn(4, 6, 5000), teacher_probs_like(2, 6, 5000, torch.float32)
    loss_cpu, grad_cpu = loss_and_grad(dino_loss, student, teacher, 0.1)
    loss_gpu, grad_gpu = loss_and_grad(dino_loss, student.cuda(), teacher.cuda(), 0.1)
    torch.testing.assert_close(loss_gpu.cpu(), loss_cpu, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grad_gpu.cpu(), grad_cpu, rtol=1e-4, atol=1e-5 * grad_cpu.abs().max().item())
    again = loss_and_grad(dino_loss, student.cuda(), teacher.cuda(), 0.1)
    assert torch.equal(again[0], loss_gpu) and torch.equal(again[1], grad_gpu)
    bad = student.clone().cuda()
    bad[1, 2, 3] = float("nan")
    with _config.checking_finite(True), pytest.raises(ValueError, match="'student_logits'.*non-finite"):
        dino_loss(bad, teacher.cuda(), 0.1)
    assert not torch.isfinite(dino_loss(bad, teacher.cuda(), 0.1)).all()  # CUDA default: unchecked
    with pytest.raises(TypeError, match="'student_logits'"):
        dino_loss(student.double().cuda(), teacher.double().cuda(), 0.1)
    _opcheck_soft_ce(student[:, :2, :33].contiguous().cuda().requires_grad_(),
                     teacher[:, :2, :33].contiguous().cuda(), None, (True, 0.1, 1.0, 1.0 / 12, False))
