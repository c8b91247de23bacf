"""koleo_loss and nearest_neighbors: kernels against float64 references, the DINOv2 formula of SPEC §3.5
(tests/ssl_references.py),
gradcheck, opcheck, torch.compile, awkward and bad inputs, and the CUDA kernels (marked `cuda`)."""
import math

import pytest
import torch
import torch.nn.functional as F

import dinokernels
from dinokernels import _config, _ext
from dinokernels.ops import koleo_loss, koleo_loss_ref, nearest_neighbors, nearest_neighbors_ref
from dinokernels.ops.koleo import koleo_backward, koleo_forward, nearest_neighbors_op
from ssl_references import koleo_reference
from dk_test_helpers import backend  # noqa: F401 (a fixture, used by name)

SHAPES = [(2, 8), (3, 5), (257, 33), (1024, 384)]


def loss_and_grad(fn, x):
    x = x.detach().clone().requires_grad_(True)
    loss = fn(x)
    (grad,) = torch.autograd.grad(loss, x)
    return loss.detach(), grad


def koleo_with_index(x, nn_index, eps=1e-8):
    """The KoLeo formula with given neighbours, for comparing low-precision runs in float64."""
    unit = x / torch.linalg.vector_norm(x, dim=-1, keepdim=True).clamp_min(eps)
    return -torch.log(torch.linalg.vector_norm(unit - unit[nn_index] + 1e-8, dim=-1) + eps).mean()


def assert_is_nearest(x, y, index, exclude_self, tol):
    """index[i] attains max_j x_i·y_j (float64) up to tol: what a float32 search can promise."""
    sims = x.double() @ (x if y is None else y).double().T
    if exclude_self:
        k = min(sims.shape)
        sims[torch.arange(k), torch.arange(k)] = -math.inf
    best = sims.max(dim=1).values
    chosen = sims.gather(1, index[:, None].cpu())[:, 0]
    assert bool((best - chosen <= tol * best.abs().clamp_min(1)).all()), (best - chosen).max()


# ---------------------------------------------------------------- koleo_loss, CPU kernel


@pytest.mark.parametrize("B,D", SHAPES)
def test_float64_matches_reference(B, D):
    x = torch.randn(B, D, dtype=torch.float64)
    loss, grad = loss_and_grad(koleo_loss, x)
    loss_ref, grad_ref = loss_and_grad(koleo_loss_ref, x)
    torch.testing.assert_close(loss, loss_ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(grad, grad_ref, rtol=1e-9, atol=1e-12 * grad_ref.abs().max().item())
    _, nn_index, norms, dists = koleo_forward(x, 1e-8)
    unit = F.normalize(x, dim=-1, eps=1e-8)
    sims = unit @ unit.T
    sims.fill_diagonal_(-math.inf)
    assert torch.equal(nn_index, sims.argmax(dim=1))
    torch.testing.assert_close(norms, x.norm(dim=1), rtol=1e-14, atol=0)
    torch.testing.assert_close(dists, F.pairwise_distance(unit, unit[nn_index], eps=1e-8), rtol=1e-12, atol=0)


@pytest.mark.parametrize("B,D", SHAPES)
def test_float32_matches_float64(B, D):
    x = torch.randn(B, D) * 3
    loss, grad = loss_and_grad(koleo_loss, x)
    assert loss.dtype == torch.float32 and grad.dtype == torch.float32
    nn_index = koleo_forward(x, 1e-8)[1]
    assert_is_nearest(F.normalize(x, dim=-1), None, nn_index, True, tol=1e-5)
    loss64, grad64 = loss_and_grad(lambda t: koleo_with_index(t, nn_index), x.double())
    torch.testing.assert_close(loss.double(), loss64, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad.double(), grad64, rtol=1e-3, atol=1e-4 * grad64.abs().max().item())


def test_matches_dinov2_formula():
    reference = koleo_reference
    for B, D in [(64, 384), (7, 3), (200, 1024)]:
        x = torch.randn(B, D, dtype=torch.float64)
        loss, grad = loss_and_grad(koleo_loss, x)
        loss_off, grad_off = loss_and_grad(reference, x)
        torch.testing.assert_close(loss, loss_off, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(grad, grad_off, rtol=1e-9, atol=1e-12 * grad_off.abs().max().item())


@pytest.mark.parametrize("B,D", [(2, 3), (5, 4), (9, 17)])
def test_gradcheck(B, D):
    x = torch.randn(B, D, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(koleo_loss, (x,), eps=1e-6, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_opcheck(dtype):
    for B, D in [(2, 3), (33, 20)]:
        x = torch.randn(B, D, dtype=dtype, requires_grad=True)
        torch.library.opcheck(koleo_forward, (x, 1e-8))
        torch.library.opcheck(koleo_forward, (x.detach(), 1e-6))
        out = koleo_forward(x.detach(), 1e-8)
        torch.library.opcheck(koleo_backward, (torch.ones((), dtype=dtype), x.detach(), *out[1:], 1e-8))


def test_torch_compile_fullgraph():
    def fn(t):
        return koleo_loss(t * 2.0) + 0.5 * koleo_loss(t[:10])

    compiled = torch.compile(fn, fullgraph=True)
    x = torch.randn(64, 48)
    loss, grad = loss_and_grad(fn, x)
    loss_c, grad_c = loss_and_grad(compiled, x)
    torch.testing.assert_close(loss_c, loss)
    torch.testing.assert_close(grad_c, grad)


def test_duplicate_rows_give_finite_loss_and_gradient():
    x = torch.randn(10, 16, dtype=torch.float64)
    x[1] = x[0]
    x[7] = 2.5 * x[3]  # same direction: identical after normalisation
    loss, grad = loss_and_grad(koleo_loss, x)
    loss_ref, grad_ref = loss_and_grad(koleo_loss_ref, x)
    assert torch.isfinite(loss) and torch.isfinite(grad).all()
    torch.testing.assert_close(loss, loss_ref, rtol=1e-10, atol=0)
    # A duplicate pair's gradient is (rounding of x̂_a - x̂_b) / 1e-16: ill-conditioned in any implementation,
    # so only the other rows are compared.
    others = torch.ones(10, dtype=torch.bool)
    others[[0, 1, 3, 7]] = False
    torch.testing.assert_close(grad[others], grad_ref[others], rtol=1e-7, atol=1e-9 * grad_ref.abs().max().item())
    same = torch.randn(1, 5).repeat(6, 1)  # every row identical: neighbour is the smallest other index
    loss, grad = loss_and_grad(koleo_loss, same)
    assert torch.isfinite(loss) and torch.isfinite(grad).all()
    assert koleo_forward(same, 1e-8)[1].tolist() == [1, 0, 0, 0, 0, 0]


@pytest.mark.parametrize("seed", range(4))
def test_float32_duplicate_rows_loss_matches_float64(seed):
    """A duplicated image in a float32 batch: its distance must be exactly the 1e-8·√D of identical rows. A fused
    multiply-add in x_i/‖x_i‖ − x_j/‖x_j‖ once left a rounding error there that the log magnified (0.6 % off)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(12, 24, generator=g)
    x[5] = x[2]
    x[9] = x[0]
    expected = koleo_reference(x.double())
    torch.testing.assert_close(koleo_loss(x).double(), expected, rtol=2e-6, atol=0)
    same = torch.full((6, 8), 0.7)  # every row identical
    torch.testing.assert_close(koleo_loss(same).double(), koleo_reference(same.double()), rtol=2e-6, atol=0)


def test_zero_and_tiny_rows():
    x = torch.randn(6, 8, dtype=torch.float64)
    x[2] = 0.0
    x[4] = 1e-12
    loss, grad = loss_and_grad(koleo_loss, x)
    loss_ref, grad_ref = loss_and_grad(koleo_loss_ref, x)
    torch.testing.assert_close(loss, loss_ref)
    torch.testing.assert_close(grad, grad_ref, rtol=1e-7, atol=1e-9 * grad_ref.abs().max().item())


def test_non_contiguous_input():
    base = torch.randn(40, 70, dtype=torch.float64)
    for x in (base.T, base[:, ::2], base[::3]):
        assert not x.is_contiguous()
        loss, grad = loss_and_grad(koleo_loss, x)
        loss_c, grad_c = loss_and_grad(koleo_loss, x.contiguous())
        torch.testing.assert_close(loss, loss_c, rtol=0, atol=0)
        torch.testing.assert_close(grad, grad_c, rtol=0, atol=0)


def test_result_does_not_depend_on_thread_count():
    x = torch.randn(300, 96)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = loss_and_grad(koleo_loss, x)
        torch.set_num_threads(max(2, threads))
        many = loss_and_grad(koleo_loss, x)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one[0], many[0]) and torch.equal(one[1], many[1])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_input_on_cpu_is_upcast(dtype):
    x = torch.randn(50, 24).to(dtype)
    loss, grad = loss_and_grad(koleo_loss, x)
    assert loss.dtype == torch.float32 and grad.dtype == dtype
    loss32, grad32 = loss_and_grad(koleo_loss, x.float())
    torch.testing.assert_close(loss, loss32)
    torch.testing.assert_close(grad, grad32.to(dtype))


def test_reference_backend_runs_the_reference():
    x = torch.randn(30, 12)
    with dinokernels.use_backend("reference"):
        assert torch.equal(koleo_loss(x), koleo_loss_ref(x))


BAD_INPUTS = [
    (lambda: torch.randn(1, 8), ValueError, "at least 2 rows"),
    (lambda: torch.randn(0, 8), ValueError, "at least 2 rows"),
    (lambda: torch.randn(4, 0), ValueError, "at least one column"),
    (lambda: torch.randn(8), ValueError, "must be 2-D"),
    (lambda: torch.randn(2, 3, 4), ValueError, "must be 2-D"),
    (lambda: torch.ones(4, 3, dtype=torch.int64), TypeError, "floating-point"),
    (lambda: [[1.0, 2.0], [3.0, 4.0]], TypeError, "torch.Tensor"),
    (lambda: torch.tensor([[1.0, 2.0], [float("nan"), 0.0], [3.0, 1.0]]), ValueError, "1 non-finite"),
    (lambda: torch.tensor([[1.0, float("inf")], [float("-inf"), 0.0]]), ValueError, "2 non-finite"),
]


@pytest.mark.parametrize("make,exc,fragment", BAD_INPUTS)
@pytest.mark.usefixtures("backend")
def test_bad_input_raises_naming_the_argument(make, exc, fragment):
    with pytest.raises(exc, match=fragment) as info:
        koleo_loss(make())
    assert "dinokernels.koleo_loss" in str(info.value) and "argument 'x'" in str(info.value)


@pytest.mark.parametrize("eps", [0.0, -1.0, float("nan"), float("inf"), True])
@pytest.mark.usefixtures("backend")
def test_bad_eps(eps):
    with pytest.raises(ValueError, match="argument 'eps'"):
        koleo_loss(torch.randn(4, 3), eps=eps)


def test_nonfinite_gives_nan_when_check_is_off():
    x = torch.randn(50, 4)
    x[2, 1] = float("nan")
    previous_setting = _config.finite_check_setting()
    _config.set_check_finite(False)
    try:
        loss, grad = loss_and_grad(koleo_loss, x)
    finally:
        _config.set_check_finite(previous_setting)
    assert torch.isnan(loss)
    assert torch.isnan(grad).all()  # no row may receive a clean-looking gradient from a NaN loss
    assert torch.isnan(koleo_loss_ref(x))  # the reference never turns NaN into a finite loss either


def test_cpp_entry_points_validate_their_arguments():
    C = _ext.module()
    x = torch.randn(4, 3)
    out = [torch.empty(()), torch.empty(4, dtype=torch.int64), torch.empty(4), torch.empty(4)]
    ptrs = [t.data_ptr() for t in out]
    nbytes = C.koleo_workspace_bytes_cpu(4, 3, 0)
    ws = torch.empty(nbytes, dtype=torch.uint8)
    f32 = C.dtype_codes["float32"]
    with pytest.raises(ValueError, match=r"koleo_forward_cpu: argument 'x' needs at least 2 rows"):
        C.koleo_forward_cpu(x.data_ptr(), f32, 1, 3, 1e-8, *ptrs, ws.data_ptr(), nbytes, 1)
    with pytest.raises(ValueError, match=r"koleo_forward_cpu: argument 'loss' is a null pointer"):
        C.koleo_forward_cpu(x.data_ptr(), f32, 4, 3, 1e-8, 0, *ptrs[1:], ws.data_ptr(), nbytes, 1)
    with pytest.raises(ValueError, match=r"argument 'x' has unsupported dtype float16"):
        C.koleo_forward_cpu(x.data_ptr(), C.dtype_codes["float16"], 4, 3, 1e-8, *ptrs, ws.data_ptr(), nbytes, 1)
    with pytest.raises(ValueError, match=r"argument 'workspace' holds"):
        C.koleo_forward_cpu(x.data_ptr(), f32, 4, 3, 1e-8, *ptrs, ws.data_ptr(), nbytes - 1, 1)
    with pytest.raises(ValueError, match=r"argument 'eps'"):
        C.koleo_forward_cpu(x.data_ptr(), f32, 4, 3, -1.0, *ptrs, ws.data_ptr(), nbytes, 1)
    bad_index = torch.tensor([1, 0, 7, 2])
    with pytest.raises(ValueError, match=r"koleo_backward_cpu: argument 'nn_index' entry 2 is 7"):
        C.koleo_backward_cpu(out[0].data_ptr(), x.data_ptr(), f32, 4, 3, 1e-8, bad_index.data_ptr(), ptrs[2],
                             ptrs[3], torch.empty_like(x).data_ptr(), 1)
    with pytest.raises(ValueError, match=r"nearest_neighbors_cpu: argument 'y' needs at least 2 rows"):
        C.nearest_neighbors_cpu(x.data_ptr(), x.data_ptr(), f32, 4, 1, 3, True, ptrs[2], ptrs[1],
                                ws.data_ptr(), nbytes, 1)


def test_backward_op_validates_saved_tensors():
    x = torch.randn(6, 4)
    _, nn_index, norms, dists = koleo_forward(x, 1e-8)
    with pytest.raises(ValueError, match="argument 'norms'"):
        koleo_backward(torch.ones(()), x, nn_index, norms[:3], dists, 1e-8)
    with pytest.raises(ValueError, match="argument 'nn_index'"):
        koleo_backward(torch.ones(()), x, nn_index.int(), norms, dists, 1e-8)
    with pytest.raises(ValueError, match="argument 'grad_loss' must hold one value"):
        koleo_backward(torch.ones(2), x, nn_index, norms, dists, 1e-8)


# ---------------------------------------------------------------- nearest_neighbors, CPU kernel

NN_CASES = [  # (N, M or None for a self-search, D, exclude_self)
    (257, None, 33, True),
    (257, None, 33, False),
    (1, None, 4, False),
    (2, None, 1, True),
    (300, 77, 20, False),
    (77, 300, 20, True),
    (1000, 1, 16, False),
    (5, 700, 130, False),
    (64, 64, 64, True),
]


@pytest.mark.parametrize("N,M,D,exclude", NN_CASES)
def test_nearest_neighbors_float64_matches_reference(N, M, D, exclude):
    x = torch.randn(N, D, dtype=torch.float64)
    y = None if M is None else torch.randn(M, D, dtype=torch.float64)
    sim, index = nearest_neighbors(x, y, exclude_self=exclude)
    sim_ref, index_ref = nearest_neighbors_ref(x, y, exclude_self=exclude)
    assert torch.equal(index, index_ref)
    torch.testing.assert_close(sim, sim_ref, rtol=1e-13, atol=1e-13)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("N,M,D,exclude", NN_CASES)
def test_nearest_neighbors_ties_pick_the_smallest_index(N, M, D, exclude, dtype):
    # Small integers: every product and sum is exact, so ties are exact and the index rule is observable.
    x = torch.randint(-2, 3, (N, D)).to(dtype)
    y = None if M is None else torch.randint(-2, 3, (M, D)).to(dtype)
    sim, index = nearest_neighbors(x, y, exclude_self=exclude)
    sim_ref, index_ref = nearest_neighbors_ref(x, y, exclude_self=exclude)
    assert torch.equal(index, index_ref)
    assert torch.equal(sim, sim_ref)


@pytest.mark.parametrize("N,M,D,exclude", NN_CASES)
def test_nearest_neighbors_float32(N, M, D, exclude):
    x = torch.randn(N, D)
    y = None if M is None else torch.randn(M, D)
    sim, index = nearest_neighbors(x, y, exclude_self=exclude)
    assert sim.dtype == torch.float32 and index.dtype == torch.int64
    assert_is_nearest(x, y, index, exclude, tol=1e-5)
    cand = (x if y is None else y).double()
    torch.testing.assert_close(sim.double(), (x.double() * cand[index]).sum(1), rtol=1e-5, atol=1e-5)


def test_nearest_neighbors_defaults_and_empty():
    x = F.normalize(torch.randn(20, 5), dim=1)
    assert torch.equal(nearest_neighbors(x)[1], nearest_neighbors(x, exclude_self=True)[1])
    assert torch.equal(nearest_neighbors(x, x.clone())[1], torch.arange(20))  # y given: self not excluded
    sim, index = nearest_neighbors(torch.randn(0, 5), torch.randn(3, 5))
    assert sim.shape == (0,) and index.shape == (0,)


def test_nearest_neighbors_gradcheck_and_opcheck():
    x = torch.randn(12, 5, dtype=torch.float64, requires_grad=True)
    y = torch.randn(7, 5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b: nearest_neighbors(a, b)[0], (x, y))
    assert torch.autograd.gradcheck(lambda a: nearest_neighbors(a)[0], (x,))
    for args in ((x, y, False), (x, None, True), (x.detach().float(), y.detach().float(), True)):
        torch.library.opcheck(nearest_neighbors_op, args)


@pytest.mark.parametrize("args,exc,fragment", [
    ((torch.randn(4, 3), torch.randn(5, 2)), ValueError, "argument 'y' must have x's 3 columns"),
    ((torch.randn(4, 3), torch.randn(5, 3, dtype=torch.float64)), TypeError, "argument 'y' must match"),
    ((torch.randn(4, 3), torch.randn(0, 3)), ValueError, "at least one candidate"),
    ((torch.randn(1, 3),), ValueError, "at least 2 candidate rows"),
    ((torch.randn(4, 3), torch.randn(1, 3), True), ValueError, "at least 2 candidate rows"),
    ((torch.randn(4, 3, 1),), ValueError, "argument 'x' must be 2-D"),
    ((torch.tensor([[0.0, float("nan")], [1.0, 1.0]]),), ValueError, "non-finite"),
    ((torch.randn(4, 2), torch.tensor([[0.0, float("inf")], [1.0, 1.0]])), ValueError, "non-finite"),
])
@pytest.mark.usefixtures("backend")
def test_nearest_neighbors_bad_input(args, exc, fragment):
    with pytest.raises(exc, match=fragment) as info:
        nearest_neighbors(*args)
    assert "dinokernels.nearest_neighbors" in str(info.value)


# ---------------------------------------------------------------- CUDA kernels

CUDA_DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# Tolerances: the result is stored in the input precision, so they scale with its epsilon.
GRAD_RTOL = {torch.float32: 1e-3, torch.float16: 4e-3, torch.bfloat16: 3e-2}


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", CUDA_DTYPES)
@pytest.mark.parametrize("B,D", SHAPES)
def test_cuda_koleo_matches_float64(B, D, dtype):
    x = (torch.randn(B, D) * 2).to(dtype).cuda()
    loss, grad = loss_and_grad(koleo_loss, x)
    assert loss.dtype == torch.float32 and grad.dtype == dtype and grad.is_cuda
    nn_index = koleo_forward(x, 1e-8)[1]
    x64 = x.double().cpu()
    assert_is_nearest(F.normalize(x64, dim=-1), None, nn_index, True, tol=1e-5)
    loss64, grad64 = loss_and_grad(lambda t: koleo_with_index(t, nn_index.cpu()), x64)
    torch.testing.assert_close(loss.double().cpu(), loss64, rtol=1e-5, atol=1e-6)
    # float16 gradients of ~1e-6 are subnormal (spacing 2**-24): the output format's own rounding.
    subnormal = 2.0**-24 if dtype == torch.float16 else 0.0
    torch.testing.assert_close(grad.double().cpu(), grad64, rtol=GRAD_RTOL[dtype],
                               atol=GRAD_RTOL[dtype] * 0.1 * grad64.abs().max().item() + 2 * subnormal)


@pytest.mark.cuda
@pytest.mark.parametrize("B,D", [(3000, 64), (5000, 33)])
def test_cuda_large_batches_span_several_tiles_per_split(B, D):
    # Above ~1100 rows each column split of the search holds several 64-column tiles, and the last split is
    # shorter: the paths the smaller shapes never reach.
    x = torch.randn(B, D, device="cuda")
    nn_index = koleo_forward(x, 1e-8)[1]
    assert_is_nearest(F.normalize(x.double().cpu(), dim=-1), None, nn_index, True, tol=1e-5)
    y = torch.randn(B + 77, D, device="cuda")
    sim, index = nearest_neighbors(x, y)
    assert_is_nearest(x.double().cpu(), y.double().cpu(), index, False, tol=1e-5)


@pytest.mark.cuda
def test_cuda_matches_cpu_kernel_and_is_deterministic():
    x = torch.randn(700, 96)
    loss_cpu, grad_cpu = loss_and_grad(koleo_loss, x)
    loss_gpu, grad_gpu = loss_and_grad(koleo_loss, x.cuda())
    torch.testing.assert_close(loss_gpu.cpu(), loss_cpu, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad_gpu.cpu(), grad_cpu, rtol=1e-3, atol=1e-4 * grad_cpu.abs().max().item())
    again = loss_and_grad(koleo_loss, x.cuda())
    assert torch.equal(again[0], loss_gpu) and torch.equal(again[1], grad_gpu)


@pytest.mark.cuda
def test_cuda_duplicates_side_stream_and_opcheck():
    x = torch.randn(33, 40, device="cuda")
    x[5] = x[9]
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        loss, grad = loss_and_grad(koleo_loss, x)
    stream.synchronize()
    assert torch.isfinite(loss) and torch.isfinite(grad).all()
    loss_ref, grad_ref = loss_and_grad(koleo_loss_ref, x.double().cpu())
    torch.testing.assert_close(loss.double().cpu(), loss_ref, rtol=1e-4, atol=1e-5)
    torch.library.opcheck(koleo_forward, (x.requires_grad_(), 1e-8))


@pytest.mark.cuda
def test_cuda_bad_inputs():
    x = torch.randn(8, 4, device="cuda")
    x[3, 2] = float("inf")
    with _config.checking_finite(True), pytest.raises(ValueError, match="argument 'x' contains 1 non-finite"):
        koleo_loss(x)
    assert not torch.isfinite(koleo_loss(x)).all()  # CUDA default: unchecked
    previous_setting = _config.finite_check_setting()
    _config.set_check_finite(False)
    try:
        assert torch.isnan(koleo_loss(x)).item()
    finally:
        _config.set_check_finite(previous_setting)
    with pytest.raises(TypeError, match="cuda kernel takes float32, float16, bfloat16"):
        koleo_loss(torch.randn(4, 3, dtype=torch.float64, device="cuda"))
    wide = torch.randn(4, 8193, device="cuda")
    assert torch.isfinite(koleo_loss(wide))  # forward alone has no width limit
    with pytest.raises(ValueError, match="CUDA backward supports at most 8192"):
        koleo_loss(wide.requires_grad_())
    with pytest.raises(ValueError, match="at least 2 rows"):
        koleo_loss(torch.randn(1, 3, device="cuda"))


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", CUDA_DTYPES)
@pytest.mark.parametrize("N,M,D,exclude", NN_CASES)
def test_cuda_nearest_neighbors(N, M, D, exclude, dtype):
    x = torch.randint(-2, 3, (N, D)).to(dtype).cuda()
    y = None if M is None else torch.randint(-2, 3, (M, D)).to(dtype).cuda()
    sim, index = nearest_neighbors(x, y, exclude_self=exclude)
    sim_ref, index_ref = nearest_neighbors_ref(x.double().cpu(), None if y is None else y.double().cpu(), exclude)
    assert torch.equal(index.cpu(), index_ref)  # exact integer ties: the index rule must hold on the GPU too
    assert torch.equal(sim.double().cpu(), sim_ref)
    xr = torch.randn(N, D, device="cuda").to(dtype)
    yr = None if M is None else torch.randn(M, D, device="cuda").to(dtype)
    sim, index = nearest_neighbors(xr, yr, exclude_self=exclude)
    assert_is_nearest(xr.double().cpu(), None if yr is None else yr.double().cpu(), index.cpu(), exclude, 1e-5)


@pytest.mark.cuda
def test_cuda_small_run_for_sanitizer():
    """Touches every CUDA kernel with awkward sizes; the GPU check runs this under compute-sanitizer."""
    for dtype in CUDA_DTYPES:
        for B, D in [(2, 1), (3, 17), (65, 130), (130, 8)]:
            x = torch.randn(B, D, device="cuda").to(dtype).requires_grad_()
            koleo_loss(x).backward()
            assert torch.isfinite(x.grad.float()).all()
            sim, index = nearest_neighbors(x.detach(), torch.randn(67, D, device="cuda").to(dtype))
            assert bool((index >= 0).all() and (index < 67).all())
    torch.cuda.synchronize()
