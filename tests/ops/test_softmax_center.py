"""softmax_center: the kernel against softmax((z − c)/τ) and Σ_n z_n written out here in float64, the DINO v1 center
update, empty, awkward and non-contiguous input, opcheck, torch.compile, bad input, and the CUDA kernel (marked
`cuda`)."""
import os

import pytest
import torch

import dinokernels
from dinokernels import _config
from dinokernels.ops import softmax_center
from dinokernels.ops.softmax_center_ref import softmax_center_ref
from dk_test_helpers import CUDA_DTYPES, registered
from dk_test_helpers import backend  # noqa: F401 (a fixture, used by name)


def targets_and_logit_sum(z, c, temp):
    """DINO v1 / DINOv2 teacher targets softmax((z − c)/τ_t) and the raw-logit sum of the center update, float64."""
    z = z.double()
    return torch.softmax((z - c.double().reshape(1, -1)) / temp, dim=-1), z.sum(dim=0)


def tolerance(dtype, amax):
    """Relative accuracy of a softmax in `dtype` whose arguments (z − c)/τ reach `amax` in magnitude: every
    argument carries a rounding error of about eps·amax."""
    eps = torch.finfo(dtype).eps
    return max(1e-5 if dtype != torch.float64 else 1e-10, 8 * eps * amax)


def assert_probs_close(probs, ref, dtype, amax):
    tol = tolerance(dtype, amax)
    torch.testing.assert_close(probs.double(), ref, rtol=tol, atol=tol * 1e-6)


def assert_sum_close(total, z, dtype):
    # Summing N values: error ≤ N·eps·Σ|z| for any order of summation.
    z = z.double()
    atol = torch.finfo(dtype).eps * max(z.shape[0], 16) * z.abs().sum(dim=0)
    err = (total.double() - z.sum(dim=0)).abs()
    assert bool((err <= atol).all()), f"max error {err.max().item():.3g} (allowed {atol.max().item():.3g})"


# name → (logits scale, center scale, teacher temp)
REGIMES = {
    "normal": (1.0, 0.5, 0.04),
    "peaked": (30.0, 10.0, 0.04),
    "flat": (1e-4, 1e-4, 0.07),
    "huge": (1e4, 1e3, 0.04),
}
SHAPES = [(1, 1), (1, 7), (3, 1000), (64, 4099), (257, 33), (2, 65537), (5, 1)]


def make_case(n, k, regime, dtype):
    z_scale, c_scale, temp = REGIMES[regime]
    if regime == "huge":
        z = (torch.rand(n, k, dtype=torch.float64) * 2 - 1) * z_scale  # anywhere in ±1e4
    else:
        z = torch.randn(n, k, dtype=torch.float64) * z_scale
    c = torch.randn(k, dtype=torch.float64) * c_scale
    z, c = z.to(dtype), c.to(dtype)
    amax = max(((z.double() - c.double()) / temp).abs().max().item(), 1.0) if n else 1.0
    return z, c, temp, amax


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("N,K,regime", [(n, k, r) for n, k in SHAPES for r in REGIMES if k < 65537 or r == "huge"])
def test_matches_formula(N, K, regime, dtype):
    z, c, temp, amax = make_case(N, K, regime, dtype)
    probs, total = softmax_center(z, c, temp, return_sum=True)
    assert probs.dtype == dtype and total.dtype == dtype
    assert probs.shape == (N, K) and total.shape == (K,)
    probs_ref, _ = targets_and_logit_sum(z, c, temp)
    assert_probs_close(probs, probs_ref, dtype, amax)
    assert_sum_close(total, z, dtype)
    assert torch.equal(softmax_center(z, c, temp), probs)
    assert torch.isfinite(probs).all()


def test_huge_logits_are_finite_and_one_hot_where_exp_overflows():
    # Logits within ±1e4 spaced 300 apart: exp(z/τ) overflows any float, the exact targets are one-hot.
    N, K = 6, 65
    z = torch.stack([(torch.randperm(K) - (K - 1) / 2) * 300.0 for _ in range(N)])
    assert not torch.isfinite(torch.exp(z.double() / 0.04)).all()
    for dtype in (torch.float32, torch.float64):
        probs = softmax_center(z.to(dtype), torch.zeros(K, dtype=dtype), 0.04)
        assert torch.equal(probs, torch.nn.functional.one_hot(z.argmax(dim=1), K).to(dtype))
    # Everything 1e4 higher than the center: only differences matter.
    for dtype in (torch.float32, torch.float64):
        base = torch.randn(N, K, dtype=dtype)
        probs = softmax_center(base + 1e4, torch.full((K,), -1e4, dtype=dtype), 1.0)
        assert torch.isfinite(probs).all()
        # (base + 1e4) − (−1e4) is rounded at 2e4 (float32 spacing 2e-3): the argument error the tolerance allows.
        z_rounded = (base + 1e4).double()
        assert_probs_close(probs, torch.softmax(z_rounded + 1e4, dim=-1), dtype, 2e4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_logits_beyond_float32_integer_spacing_are_exact(dtype):
    """Issue 16: [[1e9, 0]] raised (float32), and a row of 5e8 gave all zeros: (z − c)·(1/τ) was fused into an
    FMA against the rounded maximum, giving exp(±512). Rows of logits near 5e8 that differ by multiples of their
    spacing (32) have an exact softmax the kernel must reproduce; rows sum to 1."""
    assert torch.equal(softmax_center(torch.tensor([[1e9, 0.0]], dtype=dtype), torch.zeros(2, dtype=dtype), 0.04),
                       torch.tensor([[1.0, 0.0]], dtype=dtype))
    for k in (2, 40, 4099):
        z = torch.zeros(3, k, dtype=dtype)
        z[:, 0] = 5e8
        probs = softmax_center(z, torch.zeros(k, dtype=dtype), 0.04)
        assert torch.equal(probs, torch.nn.functional.one_hot(torch.zeros(3, dtype=torch.long), k).to(dtype))
    gen = torch.Generator().manual_seed(0)
    z = 5e8 + 64.0 * torch.randint(-50, 51, (4, 999), generator=gen, dtype=torch.float64)
    c = 32.0 * torch.randint(-3, 4, (999,), generator=gen, dtype=torch.float64)
    assert torch.equal(z.to(dtype).double(), z) and torch.equal(c.to(dtype).double(), c)  # exact in both dtypes
    for temp in (100.0, 1000.0):
        probs = softmax_center(z.to(dtype), c.to(dtype), temp)
        shifted = z - c  # integers below 2^53: exact in float64, and so is the shift by the row maximum
        exact = torch.softmax((shifted - shifted.amax(1, keepdim=True)) / temp, dim=-1)
        tol = tolerance(dtype, 1.0)  # the arguments (z − c − max)/τ are exact: no eps·|z/τ| term
        torch.testing.assert_close(probs.double(), exact, rtol=tol, atol=tol * 1e-6)
        torch.testing.assert_close(probs.double().sum(1), torch.ones(4, dtype=torch.float64),
                                   rtol=0, atol=8 * torch.finfo(dtype).eps)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_logit_minus_center_beyond_the_float_range_is_finite(dtype):
    # z − c overflows the dtype although both are finite; the exact targets are one-hot, or split evenly where
    # z − c ties at 0.9·max (row 1, columns 0 and 2).
    big = torch.finfo(dtype).max * 0.9
    z = torch.tensor([[big, 0.0, -big], [0.0, 1.0, big]], dtype=dtype)
    c = torch.tensor([-big, 0.0, 0.0], dtype=dtype)
    probs, total = softmax_center(z, c, 0.04, return_sum=True)
    assert torch.equal(probs, torch.tensor([[1.0, 0.0, 0.0], [0.5, 0.0, 0.5]], dtype=dtype))
    assert torch.equal(total, z.sum(0))


def test_huge_logit_rows_sum_to_one():
    """exp(a − m)/s, not exp(a − (m + log s)): the rounding of a log-sum-exp near 2.5e5 (float32 spacing 0.016)
    no longer leaks into the row sum."""
    gen = torch.Generator().manual_seed(1)
    for dtype in (torch.float32, torch.float64):
        for k in (7, 4097, 65537):
            z = ((torch.rand(5, k, generator=gen) * 2 - 1) * 1e4).to(dtype)
            z[1, -1] = 2e4
            c = (torch.randn(k, generator=gen) * 0.5).to(dtype)
            probs = softmax_center(z, c, 0.04)
            torch.testing.assert_close(probs.double().sum(1), torch.ones(5, dtype=torch.float64), rtol=0,
                                       atol=16 * torch.finfo(dtype).eps)


@pytest.mark.usefixtures("backend")
def test_temperature_whose_reciprocal_overflows_float32_raises():
    with pytest.raises(ValueError, match="'teacher_temp'.*too small for float32"):
        softmax_center(torch.zeros(2, 3), torch.zeros(3), 1e-39)
    # float64 takes it: the exact targets are one-hot (ties split evenly).
    probs = softmax_center(torch.tensor([[1.0, 0.0, 1.0]], dtype=torch.float64), torch.zeros(3, dtype=torch.float64),
                           1e-39)
    assert torch.equal(probs, torch.tensor([[0.5, 0.0, 0.5]], dtype=torch.float64))


def test_all_equal_logits_give_uniform():
    for dtype in (torch.float32, torch.float64):
        for K in (1, 7, 4099):
            z = torch.full((3, K), 2.5, dtype=dtype)
            probs, total = softmax_center(z, torch.full((1, K), 2.5, dtype=dtype), 0.04, return_sum=True)
            torch.testing.assert_close(probs, torch.full_like(probs, 1.0 / K), rtol=4 * torch.finfo(dtype).eps,
                                       atol=0)
            assert torch.equal(total, torch.full((K,), 7.5, dtype=dtype))
            # A center that cancels the logits' variation gives uniform targets too.
            row = torch.randn(K, dtype=dtype)
            probs = softmax_center(row.expand(4, K), row, 0.07)
            torch.testing.assert_close(probs, torch.full_like(probs, 1.0 / K), rtol=4 * torch.finfo(dtype).eps,
                                       atol=0)


def test_center_shapes_and_default():
    N, K = 5, 37
    z, c = torch.randn(N, K, dtype=torch.float64), torch.randn(K, dtype=torch.float64)
    probs = softmax_center(z, c, 0.04)
    assert isinstance(probs, torch.Tensor)
    for shaped in (c.reshape(1, K), c.reshape(1, 1, K)):
        assert torch.equal(softmax_center(z, shaped, 0.04), probs)
    assert torch.equal(softmax_center(z, c, 0.04, return_sum=False), probs)


def test_dino_center_update():
    # DINO v1 / DINOv2 'centering': c ← 0.9c + 0.1·Σ_rows z/(2B·W) with W = 1, over a few steps.
    two_b, K = 8, 300
    center = torch.zeros(1, K, dtype=torch.float64)
    center_ref = center.clone()
    for _ in range(3):
        z = torch.randn(two_b, K, dtype=torch.float64) * 2 + 0.5
        probs, total = softmax_center(z, center, 0.04, return_sum=True)
        probs_ref = torch.softmax((z - center_ref) / 0.04, dim=-1)
        torch.testing.assert_close(probs, probs_ref, rtol=1e-10, atol=1e-16)
        center = center * 0.9 + total / two_b * 0.1
        center_ref = center_ref * 0.9 + torch.sum(z, dim=0, keepdim=True) / len(z) * (1 - 0.9)
        torch.testing.assert_close(center, center_ref, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_empty_batch(dtype):
    probs, total = softmax_center(torch.randn(0, 9, dtype=dtype), torch.randn(9, dtype=dtype), 0.04,
                                  return_sum=True)
    assert probs.shape == (0, 9) and probs.dtype == dtype
    assert total.shape == (9,) and total.dtype == dtype and not bool(total.any())
    assert softmax_center(torch.randn(0, 9, dtype=dtype), torch.randn(9, dtype=dtype), 0.04).shape == (0, 9)


def test_no_gradient():
    z = torch.randn(4, 10, requires_grad=True)
    c = torch.randn(10, requires_grad=True)
    probs, total = softmax_center(z, c, 0.04, return_sum=True)
    assert not probs.requires_grad and not total.requires_grad


def test_inputs_are_not_modified():
    z, c = torch.randn(6, 50), torch.randn(1, 50)
    z0, c0 = z.clone(), c.clone()
    softmax_center(z, c, 0.04, return_sum=True)
    assert torch.equal(z, z0) and torch.equal(c, c0)


def test_non_contiguous_inputs():
    N, K = 40, 130
    z_t = torch.randn(K, N, dtype=torch.float64).T
    z_s = torch.randn(2 * N, K, dtype=torch.float64)[::2]
    z_c = torch.randn(N, 2 * K, dtype=torch.float64)[:, 1::2]
    c = torch.randn(3 * K, dtype=torch.float64)[::3]
    for z in (z_t, z_s, z_c):
        assert not z.is_contiguous()
        for center in (c, c.contiguous()):
            out = softmax_center(z, center, 0.04, return_sum=True)
            ref = softmax_center(z.contiguous(), c.contiguous(), 0.04, return_sum=True)
            assert torch.equal(out[0], ref[0]) and torch.equal(out[1], ref[1])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_input_on_cpu_is_upcast(dtype):
    z = (torch.randn(16, 300) * 3).to(dtype)
    for c in (torch.randn(1, 300) * 0.5, (torch.randn(300) * 0.5).to(dtype)):  # float32 buffer or 16-bit
        probs, total = softmax_center(z, c, 0.04, return_sum=True)
        assert probs.dtype == torch.float32 and total.dtype == torch.float32
        probs32, total32 = softmax_center(z.float(), c.float(), 0.04, return_sum=True)
        torch.testing.assert_close(probs, probs32)
        torch.testing.assert_close(total, total32)


def test_torch_compile_fullgraph():
    def fn(z, c):
        probs, total = softmax_center(z * 2.0, c, 0.04, return_sum=True)
        return probs * 3.0, 0.9 * c + 0.1 * total / z.shape[0]

    compiled = torch.compile(fn, fullgraph=True)
    z, c = torch.randn(12, 70), torch.randn(1, 70)
    out, out_c = fn(z, c), compiled(z, c)
    torch.testing.assert_close(out_c[0], out[0])
    torch.testing.assert_close(out_c[1], out[1])


def test_reference_backend_runs_the_reference():
    z, c = torch.randn(6, 12), torch.randn(12)
    with dinokernels.use_backend("reference"):
        out = softmax_center(z, c, 0.04, return_sum=True)
    ref = softmax_center_ref(z, c, 0.04, return_sum=True)
    assert torch.equal(out[0], ref[0]) and torch.equal(out[1], ref[1])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_opcheck(dtype):
    op = registered("softmax_center")  # (teacher_logits (N, K), center (K,), teacher_temp, return_sum)
    for N, K in [(5, 7), (1, 33), (0, 4)]:
        z, c = torch.randn(N, K, dtype=dtype), torch.randn(K, dtype=dtype)
        for return_sum in (True, False):
            torch.library.opcheck(op, (z, c, 0.04, return_sum))


# ---------------------------------------------------------------- bad input

def _with(t, index, value):
    t = t.clone()
    t[index] = value
    return t


BAD_INPUTS = [  # keyword overrides of a good call (N=4, K=6), exception, argument named, message fragment
    ({"teacher_logits": torch.randn(6)}, ValueError, "teacher_logits", "2-D"),
    ({"teacher_logits": torch.randn(2, 2, 6)}, ValueError, "teacher_logits", "2-D"),
    ({"center": torch.randn(7)}, ValueError, "center", ""),
    ({"center": torch.randn(2, 6)}, ValueError, "center", ""),
    ({"teacher_logits": torch.ones(4, 6, dtype=torch.int64)}, TypeError, "teacher_logits", ""),
    ({"center": torch.zeros(6, dtype=torch.int32)}, TypeError, "center", ""),
    ({"teacher_logits": _with(torch.randn(4, 6), (3, 2), float("nan"))}, ValueError, "teacher_logits", "non-finite"),
    ({"teacher_logits": _with(torch.randn(4, 6), (0, 5), float("inf"))}, ValueError, "teacher_logits", "non-finite"),
    ({"center": _with(torch.randn(6), 1, float("nan"))}, ValueError, "center", "non-finite"),
    ({"center": _with(torch.randn(6), 0, float("-inf"))}, ValueError, "center", "non-finite"),
    ({"teacher_temp": 0.0}, ValueError, "teacher_temp", ""),
    ({"teacher_temp": -0.04}, ValueError, "teacher_temp", ""),
    ({"teacher_temp": float("nan")}, ValueError, "teacher_temp", ""),
    ({"teacher_temp": float("inf")}, ValueError, "teacher_temp", ""),
]


@pytest.mark.parametrize("override,exc,arg,fragment", BAD_INPUTS)
@pytest.mark.usefixtures("backend")
def test_bad_input_raises_naming_the_argument(override, exc, arg, fragment):
    kwargs = dict(teacher_logits=torch.randn(4, 6), center=torch.zeros(6), teacher_temp=0.04)
    kwargs.update(override)
    with pytest.raises(exc, match=f"'{arg}'.*{fragment}") as info:
        softmax_center(**kwargs)
    assert "dinokernels." in str(info.value)


def test_nonfinite_gives_nan_when_check_is_off():
    z, c = torch.randn(5, 20), torch.randn(20)
    previous_setting = _config.finite_check_setting()
    _config.set_check_finite(False)
    try:
        probs = softmax_center(_with(z, (2, 3), float("nan")), c, 0.04)
        assert torch.isnan(probs[2]).all() and torch.isfinite(probs[[0, 1, 3, 4]]).all()
        probs = softmax_center(z, _with(c, 7, float("nan")), 0.04)
        assert torch.isnan(probs).all()
    finally:
        _config.set_check_finite(previous_setting)


def test_finite_checks_default_to_the_cpu_only():
    """DINOKERNELS_CHECK_FINITE: auto (default) checks on the CPU, where it is cheap, and not on CUDA, where reading
    the flag back would make every op wait for the GPU; 1 checks everywhere, 0 nowhere."""
    import subprocess
    import sys

    code = "from dinokernels import _config; print(_config.check_finite('cpu'), _config.check_finite('cuda'))"
    for value, expected in ((None, "True False"), ("auto", "True False"), ("1", "True True"), ("0", "False False")):
        env = {k: v for k, v in os.environ.items() if k != "DINOKERNELS_CHECK_FINITE"}
        if value is not None:
            env["DINOKERNELS_CHECK_FINITE"] = value
        out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
        assert out.stdout.split() == expected.split(), (value, out.stdout)
    with _config.checking_finite(True):
        assert _config.check_finite("cuda") and _config.check_finite("cpu")
        with _config.checking_finite(None):
            assert _config.check_finite("cpu") and not _config.check_finite("cuda")
    with pytest.raises(ValueError, match="DINOKERNELS_CHECK_FINITE must be auto, 0 or 1"):
        _config._parse_flag("sometimes", "DINOKERNELS_CHECK_FINITE")


# ---------------------------------------------------------------- CUDA kernel



@pytest.mark.cuda
@pytest.mark.parametrize("dtype", CUDA_DTYPES)
@pytest.mark.parametrize("N,K", [(256, 65537), (1000, 4099), (3, 7), (0, 5)])
def test_cuda_matches_float64(N, K, dtype):
    z = (torch.randn(N, K) * 3).to(dtype).cuda()
    c = (torch.randn(1, K) * 0.5).cuda()  # the center buffer is float32
    probs, total = softmax_center(z, c, 0.04, return_sum=True)
    assert probs.dtype == torch.float32 and total.dtype == torch.float32 and probs.is_cuda
    probs_t, total_t = softmax_center_ref(z, c, 0.04, return_sum=True)  # PyTorch in this precision
    z64, c64 = z.double().cpu(), c.double().cpu()
    probs64, total64 = targets_and_logit_sum(z64, c64, 0.04)
    # Kernel error ≤ 4 × PyTorch's own in this precision + the float32 rounding floor the CPU tests allow.
    eps = torch.finfo(torch.float32).eps
    floors = (tolerance(torch.float32, (z64 - c64).abs().max().item() / 0.04 if N else 1.0),
              eps * max(N, 16) * (z64.abs().sum(dim=0).max().item() if N else 0.0))
    for name, got, own, ref, floor in (("probs", probs, probs_t, probs64, floors[0]),
                                       ("sum", total, total_t, total64, floors[1])):
        err = (got.double().cpu() - ref).abs().max().item() if ref.numel() else 0.0
        base = (own.double().cpu() - ref).abs().max().item() if ref.numel() else 0.0
        assert err <= 4 * base + floor, f"{name}: kernel error {err:.3g}, PyTorch's own {base:.3g}, floor {floor:.3g}"
    if N == 0:
        assert probs.shape == (0, K) and not bool(total.any())


@pytest.mark.cuda
def test_cuda_matches_cpu_kernel_and_bad_input():
    z, c = torch.randn(64, 5000) * 2, torch.randn(5000)
    probs_cpu, total_cpu = softmax_center(z, c, 0.07, return_sum=True)
    probs_gpu, total_gpu = softmax_center(z.cuda(), c.cuda(), 0.07, return_sum=True)
    torch.testing.assert_close(probs_gpu.cpu(), probs_cpu, rtol=1e-4, atol=1e-9)
    torch.testing.assert_close(total_gpu.cpu(), total_cpu, rtol=1e-5, atol=1e-4)
    huge = ((torch.rand(8, 777) * 2 - 1) * 1e4).cuda()
    assert torch.isfinite(softmax_center(huge, torch.zeros(777, device="cuda"), 0.04)).all()
    bad = c.clone().cuda()
    bad[11] = float("nan")
    with _config.checking_finite(True), pytest.raises(ValueError, match="'center'.*non-finite"):
        softmax_center(z.cuda(), bad, 0.07)
    assert not torch.isfinite(softmax_center(z.cuda(), bad, 0.07)).all()  # CUDA default: unchecked
    torch.library.opcheck(registered("softmax_center"), (z[:5, :33].contiguous().cuda(), c[:33].cuda(), 0.04, True))


@pytest.mark.cuda
def test_cuda_rows_split_over_blocks():
    """Rows longer than one block's chunk (4096) are split over blocks: chunk counts of 2, 3 and 17 (K = 4097,
    12289, 65537) match the CPU kernel, with the row maximum in the last chunk or alone in a middle one; logits of
    ±1e4 stay finite and pick the same column; a NaN in a later chunk raises."""
    for k in (4097, 12289, 65537):
        z = torch.randn(5, k) * 3
        z[1, -1] = 40.0  # the maximum of row 1 in its last chunk
        z[2] = -30.0
        z[2, k // 2] = 0.0  # row 2: one dominant column in a middle chunk
        c = torch.randn(k) * 0.5
        probs_cpu = softmax_center(z, c, 0.04)
        probs_gpu = softmax_center(z.cuda(), c.cuda(), 0.04)
        torch.testing.assert_close(probs_gpu.cpu(), probs_cpu, rtol=1e-4, atol=1e-9)
        # ±1e4: z/τ ~ 2.5e5. The exponents (d − max)·2/τ are taken after the subtraction and the row is divided
        # by its sum (no rounded LSE), so the rows sum to 1 up to float32 summation error, and match the CPU.
        huge = (torch.rand(5, k) * 2 - 1) * 1e4
        huge[1, -1] = 2e4
        probs_huge = softmax_center(huge.cuda(), c.cuda(), 0.04)
        assert torch.isfinite(probs_huge).all()
        torch.testing.assert_close(probs_huge.sum(1).cpu(), torch.ones(5), rtol=0, atol=1e-5)
        torch.testing.assert_close(probs_huge.cpu(), softmax_center(huge, c, 0.04), rtol=1e-4, atol=1e-9)
        bad = z.clone()
        bad[3, k - 2] = float("nan")
        with _config.checking_finite(True), pytest.raises(ValueError, match="'teacher_logits'.*non-finite"):
            softmax_center(bad.cuda(), c.cuda(), 0.04)
        assert not torch.isfinite(softmax_center(bad.cuda(), c.cuda(), 0.04)).all()  # CUDA default: unchecked


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", CUDA_DTYPES)
@pytest.mark.parametrize("N,K", [(1, 1), (9, 4), (100, 4099), (100, 8192), (17, 1027)])
def test_cuda_vector_and_scalar_paths_with_fused_column_sum(N, K, dtype):
    """4-wide loads and stores need K % 4 == 0 and aligned pointers: an aligned input and one starting one element
    into its storage, K off the vector width, one and several 8-row tiles and 8 row groups give the CPU kernel's
    targets and the float64 column sum from the same pass, with the same bits on a second run."""
    base = (torch.randn(N * K + 1) * 3).to(dtype).cuda()
    c = torch.randn(K) * 0.5
    for z in (base[:N * K].view(N, K), base[1:].view(N, K)):  # aligned, then one element off (storage offset 1)
        assert z.is_contiguous()
        probs, total = softmax_center(z, c.cuda(), 0.04, return_sum=True)
        z32 = z.float().cpu()
        torch.testing.assert_close(probs.cpu(), softmax_center(z32, c, 0.04), rtol=1e-4, atol=1e-9)
        sum64 = z32.double().sum(0)
        err = (total.double().cpu() - sum64).abs()
        allowed = torch.finfo(torch.float32).eps * (1 + z32.double().abs().sum(0))
        assert bool((err <= allowed).all()), f"column sum error {err.max().item():.3g}"
        again = softmax_center(z, c.cuda(), 0.04, return_sum=True)
        assert torch.equal(again[0], probs) and torch.equal(again[1], total)
        assert torch.equal(softmax_center(z, c.cuda(), 0.04), probs)  # without the sum: same targets


@pytest.mark.cuda
def test_cuda_chunk_of_minus_inf_adds_nothing():
    """A whole 4096-column statistics chunk of −inf logits contributes nothing to its row's sum (not NaN)."""
    k = 3 * 4096 + 5
    z, c = torch.randn(3, k) * 2, torch.randn(k) * 0.5
    z[1, :4096] = float("-inf")
    z[2, 4096:] = float("-inf")
    probs = softmax_center(z.cuda(), c.cuda(), 0.07)
    exact = torch.softmax((z.double() - c.double()) / 0.07, dim=-1)
    torch.testing.assert_close(probs.double().cpu(), exact, rtol=1e-4, atol=1e-9)
    assert bool((probs[1, :4096] == 0).all()) and bool((probs[2, 4096:] == 0).all())
