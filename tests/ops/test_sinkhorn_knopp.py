"""sinkhorn_knopp: the kernel against the plain iterations of SPEC §3.3 (sinkhorn_knopp_plain: exp(z/τ) with no max
subtraction, float64, wherever they are finite; the float32 plain form overflows above z/τ = 88.72, as the published
teacher does) and the log-domain reference where they overflow, row sums, N=1 / K=1 / rectangular inputs, opcheck,
non-contiguous and 16-bit input, bad input, and the CUDA kernel (marked `cuda`)."""
import pytest
import torch

import dinokernels
from dinokernels import _config
from dinokernels.ops import sinkhorn_knopp
from dinokernels.ops.sinkhorn_knopp_ref import sinkhorn_knopp_plain, sinkhorn_knopp_ref
from dk_test_helpers import CUDA_DTYPES, registered
from dk_test_helpers import backend  # noqa: F401 (a fixture, used by name)


def tolerance(dtype, amax, n_iterations=3):
    """Relative accuracy of Sinkhorn-Knopp in `dtype` with exponent arguments z/τ up to `amax`: each argument
    carries a rounding error of about eps·amax, and each iteration adds a little."""
    eps = torch.finfo(dtype).eps
    return max(1e-5 if dtype != torch.float64 else 1e-10, 8 * eps * (amax + 4 * n_iterations))


def assert_targets_close(out, ref, dtype, amax, n_iterations=3):
    tol = tolerance(dtype, amax, n_iterations)
    torch.testing.assert_close(out.double(), ref.double(), rtol=tol, atol=tol * 1e-6)


def assert_rows_sum_to_one(out, tol):
    err = (out.double().sum(dim=1) - 1).abs().max().item()
    assert err <= tol, f"row sums off by {err:.3g}"


SHAPES = [(64, 1000), (33, 4099), (256, 128), (5, 3), (2, 65537), (2, 2)]  # N ≠ K both ways, K off every tile


@pytest.mark.parametrize("n_iterations", [1, 3, 5])
@pytest.mark.parametrize("N,K,temp", [(*shape, (0.04, 0.07)[i % 2]) for i, shape in enumerate(SHAPES)])
def test_float64_matches_plain_iterations(N, K, temp, n_iterations):
    z = torch.randn(N, K, dtype=torch.float64)
    out = sinkhorn_knopp(z, temp, n_iterations)
    assert out.dtype == torch.float64 and out.shape == (N, K)
    ref = sinkhorn_knopp_plain(z, temp, n_iterations)
    assert torch.isfinite(ref).all()
    amax = z.abs().max().item() / temp
    assert_targets_close(out, ref, torch.float64, amax, n_iterations)
    assert_rows_sum_to_one(out, 1e-12)
    # The two references (plain and log-domain) agree too.
    assert_targets_close(sinkhorn_knopp_ref(z, temp, n_iterations), ref, torch.float64, amax, n_iterations)


@pytest.mark.parametrize("n_iterations", [1, 3, 5])
@pytest.mark.parametrize("N,K", SHAPES)
def test_float32_matches_plain_float64(N, K, n_iterations):
    temp = 0.07
    z = torch.randn(N, K) * 0.7
    out = sinkhorn_knopp(z, temp, n_iterations)
    assert out.dtype == torch.float32 and out.shape == (N, K)
    ref = sinkhorn_knopp_plain(z.double(), temp, n_iterations)
    amax = z.abs().max().item() / temp
    assert_targets_close(out, ref, torch.float32, amax, n_iterations)
    assert_rows_sum_to_one(out, tolerance(torch.float32, amax, n_iterations))


def test_float32_is_finite_where_the_float32_plain_form_overflows():
    # z up to ~5 at τ = 0.04: z/τ > 88.7 overflows exp in float32 (dinov2 PR #583) but not in float64.
    z = torch.randn(64, 2000) * 1.3
    z[3, 17] = 4.5
    assert not torch.isfinite(sinkhorn_knopp_plain(z.clone(), 0.04)).all()
    out = sinkhorn_knopp(z, 0.04)
    assert torch.isfinite(out).all()
    ref = sinkhorn_knopp_plain(z.double(), 0.04)
    assert torch.isfinite(ref).all()
    assert_targets_close(out, ref, torch.float32, z.abs().max().item() / 0.04)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("N,K,kind", [(16, 300, "uniform"), (300, 16, "uniform"), (8, 4099, "uniform"),
                                      (12, 50, "all_low"), (12, 50, "all_high")])
def test_finite_where_the_plain_form_is_not(N, K, kind, dtype):
    if kind == "uniform":
        z = (torch.rand(N, K, dtype=torch.float64) * 2 - 1) * 1e4  # anywhere in ±1e4
    else:  # everything near ∓1e4: exp underflows to 0 (0/0) or overflows (inf/inf) in the plain form
        z = torch.randn(N, K, dtype=torch.float64) * 2 + (-1e4 if kind == "all_low" else 1e4)
    z = z.to(dtype)
    plain = sinkhorn_knopp_plain(z.double(), 0.04)
    assert not torch.isfinite(plain).all()  # even float64 breaks here
    out = sinkhorn_knopp(z, 0.04)
    assert out.dtype == dtype and torch.isfinite(out).all() and bool((out >= 0).all())
    amax = z.abs().max().item() / 0.04
    if dtype == torch.float64:
        ref = sinkhorn_knopp_ref(z, 0.04)
        tol = tolerance(torch.float64, amax)
        torch.testing.assert_close(out, ref, rtol=tol, atol=tol)
        assert_rows_sum_to_one(out, tol)
        # A shift of every logit by one constant leaves the plain result unchanged (its first step divides it
        # out), and the shifted logits (exact in float64) are small enough for the plain form.
        if kind != "uniform":
            shifted = sinkhorn_knopp_plain(z - z.mean(), 0.04)
            assert torch.isfinite(shifted).all()
            assert_targets_close(out, shifted, torch.float64, amax)
    else:
        ref = sinkhorn_knopp_ref(z.double(), 0.04)
        tol = tolerance(torch.float32, amax)
        torch.testing.assert_close(out.double(), ref, rtol=tol, atol=tol)
        assert_rows_sum_to_one(out, tol)


def test_shift_by_a_constant_matches_the_shifted_plain_form():
    # Logits 1e4 + small: the plain form overflows; shifting all logits by −1e4 changes nothing mathematically and
    # makes the plain form computable, so the kernel on the raw logits must equal it.
    z = torch.randn(40, 300, dtype=torch.float64) * 0.5
    assert not torch.isfinite(sinkhorn_knopp_plain(z + 1e4, 0.04)).all()
    ref = sinkhorn_knopp_plain(z, 0.04)
    out = sinkhorn_knopp(z + 1e4, 0.04)
    # (z + 1e4)/τ carries an error of about eps·2.5e5 in each argument.
    assert_targets_close(out, ref, torch.float64, 1e4 / 0.04)
    out32 = sinkhorn_knopp((z + 1e4).float(), 0.04)
    ref32 = sinkhorn_knopp_plain((z.float() + 1e4).double() - 1e4, 0.04)  # same rounded input, computed exactly
    assert_targets_close(out32, ref32, torch.float32, 1e4 / 0.04)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_rows_sum_to_one_at_huge_logits(dtype):
    """Issue 16: float32 logits with |z/τ| ~ 1e10 gave rows summing to 1.006…2 (exp(a + α + β) with a rounded
    LSE). Logits 4e8 + multiples of 64 at τ = 64 have exponents (z − max)/τ that are small integers: the exact
    targets are the float64 log-domain reference on the logits less 4e8 (a common shift is a uniform scale,
    which Sinkhorn-Knopp cancels; without it the reference rounds its log-sums at 6e6), and rows sum to 1."""
    gen = torch.Generator().manual_seed(3)
    z = 4e8 + 64.0 * torch.randint(-6, 7, (48, 999), generator=gen, dtype=torch.float64)
    assert torch.equal(z.float().double(), z)
    out = sinkhorn_knopp(z.to(dtype), 64.0)
    assert_targets_close(out, sinkhorn_knopp_ref(z - 4e8, 64.0), dtype, 12.0)
    assert_rows_sum_to_one(out, 16 * torch.finfo(dtype).eps)
    # Gaussian logits at 4e8 and τ = 0.04: exponents of 1e10, one winner per row, rows still sum to 1.
    z = torch.randn(64, 4099, generator=gen, dtype=torch.float64) * 4e8
    out = sinkhorn_knopp(z.to(dtype), 0.04)
    assert torch.isfinite(out).all()
    assert_rows_sum_to_one(out, 16 * torch.finfo(dtype).eps)
    ref = sinkhorn_knopp_ref(z.to(dtype).double(), 0.04)
    torch.testing.assert_close(out.double(), ref, rtol=0, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("offset", [100.0, 1e6])
def test_rows_dominated_in_every_column(offset, dtype):
    """A row lower than another by `offset`/τ in every column: exp((z − column max)/τ) underflows for the whole
    row, which the kernel stores shifted by the row's own maximum instead (its targets are still a distribution
    over the columns where it is least dominated)."""
    gen = torch.Generator().manual_seed(int(offset))
    z = torch.randn(6, 300, generator=gen, dtype=torch.float64)
    z[2] -= offset
    z[4] = z[4] * 0.1 - 2 * offset
    out = sinkhorn_knopp(z.to(dtype), 1.0)
    ref = sinkhorn_knopp_ref(z.to(dtype).double(), 1.0)
    assert_targets_close(out, ref, dtype, 2 * offset if dtype == torch.float64 else 4.0)
    assert_rows_sum_to_one(out, 16 * torch.finfo(dtype).eps)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_one_sample_gives_uniform_targets(dtype):
    # N = 1: each prototype's column normalisation over the single sample makes every entry equal.
    for K in (1, 7, 4099):
        z = torch.randn(1, K, dtype=dtype) * 3
        for n_iterations in (1, 3):
            out = sinkhorn_knopp(z, 0.04, n_iterations)
            tol = tolerance(dtype, z.abs().max().item() / 0.04, n_iterations)
            torch.testing.assert_close(out, torch.full((1, K), 1.0 / K, dtype=dtype), rtol=tol, atol=0)
            torch.testing.assert_close(out.double(), sinkhorn_knopp_plain(z.double(), 0.04, n_iterations), rtol=tol,
                                       atol=0)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_one_prototype_gives_ones(dtype):
    z = torch.randn(9, 1, dtype=dtype) * 3
    out = sinkhorn_knopp(z, 0.04)
    assert out.shape == (9, 1)
    torch.testing.assert_close(out, torch.ones(9, 1, dtype=dtype), rtol=tolerance(dtype, z.abs().max().item() / 0.04),
                               atol=0)


def test_equal_logits_give_uniform_targets():
    for N, K in ((4, 4), (6, 13), (13, 6)):
        out = sinkhorn_knopp(torch.full((N, K), 0.3, dtype=torch.float64), 0.05)
        torch.testing.assert_close(out, torch.full((N, K), 1.0 / K, dtype=torch.float64), rtol=1e-13, atol=0)


def test_default_iterations_are_3():
    z = torch.randn(20, 30, dtype=torch.float64)
    assert torch.equal(sinkhorn_knopp(z, 0.05), sinkhorn_knopp(z, 0.05, 3))
    assert not torch.allclose(sinkhorn_knopp(z, 0.05, 1), sinkhorn_knopp(z, 0.05, 3), rtol=1e-6, atol=0)


def test_no_gradient_and_inputs_unmodified():
    z = torch.randn(8, 40, requires_grad=True)
    z0 = z.detach().clone()
    out = sinkhorn_knopp(z, 0.04)
    assert not out.requires_grad
    assert torch.equal(z.detach(), z0)


def test_non_contiguous_inputs():
    N, K = 30, 70
    for z in (torch.randn(K, N, dtype=torch.float64).T, torch.randn(2 * N, K, dtype=torch.float64)[::2],
              torch.randn(N, 3 * K, dtype=torch.float64)[:, 1::3]):
        assert not z.is_contiguous()
        assert torch.equal(sinkhorn_knopp(z, 0.04), sinkhorn_knopp(z.contiguous(), 0.04))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_input_on_cpu_is_upcast(dtype):
    z = torch.randn(32, 300).to(dtype)
    out = sinkhorn_knopp(z, 0.04)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, sinkhorn_knopp(z.float(), 0.04))


def test_torch_compile_fullgraph():
    def fn(z):
        return sinkhorn_knopp(z * 2.0, 0.05, 3).reshape(2, -1, z.shape[1]) * 0.5

    compiled = torch.compile(fn, fullgraph=True)
    z = torch.randn(12, 70)
    torch.testing.assert_close(compiled(z), fn(z))


def test_reference_backend_runs_the_reference():
    z = torch.randn(6, 12)
    with dinokernels.use_backend("reference"):
        out = sinkhorn_knopp(z, 0.04)
    assert torch.equal(out, sinkhorn_knopp_ref(z, 0.04))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_opcheck(dtype):
    for N, K in [(5, 7), (1, 33), (40, 3)]:
        torch.library.opcheck(registered("sinkhorn_knopp"), (torch.randn(N, K, dtype=dtype), 0.04, 3))


# ---------------------------------------------------------------- bad input

def _with(t, index, value):
    t = t.clone()
    t[index] = value
    return t


BAD_INPUTS = [  # keyword overrides of a good call (N=4, K=6), exception, argument named, message fragment
    ({"teacher_logits": torch.randn(6)}, ValueError, "teacher_logits", "2-D"),
    ({"teacher_logits": torch.randn(2, 2, 6)}, ValueError, "teacher_logits", "2-D"),
    ({"teacher_logits": torch.randn(0, 6)}, ValueError, "teacher_logits", ""),
    ({"teacher_logits": torch.ones(4, 6, dtype=torch.int64)}, TypeError, "teacher_logits", ""),
    ({"teacher_logits": _with(torch.randn(4, 6), (1, 1), float("nan"))}, ValueError, "teacher_logits", "non-finite"),
    ({"teacher_logits": _with(torch.randn(4, 6), (3, 0), float("inf"))}, ValueError, "teacher_logits", "non-finite"),
    ({"teacher_temp": 0.0}, ValueError, "teacher_temp", ""),
    ({"teacher_temp": -0.04}, ValueError, "teacher_temp", ""),
    ({"teacher_temp": float("nan")}, ValueError, "teacher_temp", ""),
    ({"n_iterations": 0}, ValueError, "n_iterations", ""),
    ({"n_iterations": -2}, ValueError, "n_iterations", ""),
]


@pytest.mark.parametrize("override,exc,arg,fragment", BAD_INPUTS)
@pytest.mark.usefixtures("backend")
def test_bad_input_raises_naming_the_argument(override, exc, arg, fragment):
    kwargs = dict(teacher_logits=torch.randn(4, 6), teacher_temp=0.04, n_iterations=3)
    kwargs.update(override)
    with pytest.raises(exc, match=f"'{arg}'.*{fragment}") as info:
        sinkhorn_knopp(**kwargs)
    assert "dinokernels." in str(info.value)


def test_nonfinite_gives_nan_when_check_is_off():
    z = torch.randn(5, 20)
    z[2, 3] = float("nan")
    previous_setting = _config.finite_check_setting()
    _config.set_check_finite(False)
    try:
        out = sinkhorn_knopp(z, 0.04)
    finally:
        _config.set_check_finite(previous_setting)
    assert torch.isnan(out).any()


# ---------------------------------------------------------------- CUDA kernel



@pytest.mark.cuda
@pytest.mark.parametrize("dtype", CUDA_DTYPES)
@pytest.mark.parametrize("N,K", [(512, 65537), (2048, 4099), (3, 7)])
def test_cuda_matches_float64(N, K, dtype):
    z = (torch.randn(N, K) * 0.7).to(dtype).cuda()
    out = sinkhorn_knopp(z, 0.07)
    assert out.dtype == torch.float32 and out.is_cuda and out.shape == (N, K)
    own = sinkhorn_knopp_ref(z, 0.07)  # PyTorch in this precision (float32 arithmetic on the 16-bit input)
    ref64 = sinkhorn_knopp_plain(z.double().cpu(), 0.07)
    err = (out.double().cpu() - ref64).abs().max().item()
    base = (own.double().cpu() - ref64).abs().max().item()
    # + the float32 rounding floor the CPU float32 tests allow.
    floor = tolerance(torch.float32, z.abs().max().item() / 0.07) * ref64.abs().max().item()
    assert err <= 4 * base + floor, f"kernel error {err:.3g}, PyTorch's own {base:.3g}, floor {floor:.3g}"
    assert_rows_sum_to_one(out, tolerance(torch.float32, z.abs().max().item() / 0.07))


@pytest.mark.cuda
def test_cuda_matches_cpu_kernel_huge_logits_and_bad_input():
    z = torch.randn(300, 5000)
    torch.testing.assert_close(sinkhorn_knopp(z.cuda(), 0.04).cpu(), sinkhorn_knopp(z, 0.04), rtol=1e-4, atol=1e-9)
    huge = (torch.rand(64, 777) * 2 - 1) * 1e4
    out = sinkhorn_knopp(huge.cuda(), 0.04)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out.double().cpu(), sinkhorn_knopp_ref(huge.double(), 0.04),
                               rtol=0, atol=tolerance(torch.float32, 1e4 / 0.04))
    with pytest.raises(ValueError, match="'n_iterations'"):
        sinkhorn_knopp(z.cuda(), 0.04, 0)
    bad = z.clone().cuda()
    bad[5, 5] = float("inf")
    with _config.checking_finite(True), pytest.raises(ValueError, match="'teacher_logits'.*non-finite"):
        sinkhorn_knopp(bad, 0.04)
    assert not torch.isfinite(sinkhorn_knopp(bad, 0.04)).all()  # CUDA default: unchecked
    torch.library.opcheck(registered("sinkhorn_knopp"), (z[:7, :33].contiguous().cuda(), 0.04, 3))


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", CUDA_DTYPES)
@pytest.mark.parametrize("N,K", [(3, 4), (64, 4100), (9, 65536)])
def test_cuda_vector_and_scalar_row_paths(N, K, dtype):
    """The sample and output steps read packs of 4 columns with one load when K % 4 == 0 and the pointers are
    aligned, element by element otherwise, with the same columns per thread: an aligned input and the same values
    in a view one element into its storage give the same bits, the CPU kernel's targets, and the staged
    (distributed) path's."""
    from dinokernels.ops.sinkhorn_knopp import _distributed

    values = (torch.randn(N, K) * 0.7).to(dtype)
    storage = torch.zeros(N * K + 1, dtype=dtype, device="cuda")
    storage[1:] = values.reshape(-1).cuda()
    aligned, shifted = values.cuda(), storage[1:].view(N, K)
    out = sinkhorn_knopp(aligned, 0.07)
    assert torch.equal(sinkhorn_knopp(shifted, 0.07), out)
    torch.testing.assert_close(out.cpu(), sinkhorn_knopp(values.float(), 0.07), rtol=1e-4, atol=1e-9)
    torch.testing.assert_close(_distributed(aligned, 0.07, 3, None), out, rtol=1e-5, atol=1e-7)
