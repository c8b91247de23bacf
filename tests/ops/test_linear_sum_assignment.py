"""linear_sum_assignment: the total cost equals scipy's on thousands of random problems (square, tall, wide,
integer costs full of ties, one row, one column, empty, B = 1, ragged batches), every answer is a valid matching,
the CPU reproduces scipy's own assignment on continuous costs; +inf, infeasible, NaN and −inf; dtypes, bad
inputs; CUDA (marked `cuda`) on many problems including 900 × 20."""
import math

import numpy as np
import pytest
import torch
from scipy.optimize import linear_sum_assignment as scipy_lsa

from dinokernels.ops import linear_sum_assignment, linear_sum_assignment_padded
from dinokernels.ops.linear_sum_assignment import linear_sum_assignment_op
from dk_test_helpers import backend  # noqa: F401 (fixture: the test runs on every backend)


def random_batch(B, N, M, kind, gen):
    """(B, N, M) float64 costs and ragged sizes; kind picks the value distribution."""
    if kind == "normal":
        cost = torch.randn(B, N, M, dtype=torch.float64, generator=gen)
    elif kind == "ties":
        cost = torch.randint(0, 4, (B, N, M), generator=gen).double()
    elif kind == "wide_range":
        cost = torch.randn(B, N, M, dtype=torch.float64, generator=gen) * 10.0 ** torch.randint(
            -3, 6, (B, 1, 1), generator=gen).double()
    else:
        raise ValueError(kind)
    rows = torch.randint(0, N + 1, (B,), generator=gen)
    cols = torch.randint(0, M + 1, (B,), generator=gen)
    return cost, rows, cols


def check_problem(cost, rows, cols, exact_scipy=False, maximize=False, atol=1e-9):
    """(rows, cols) for the (n, m) numpy cost: a valid matching with scipy's optimal total."""
    n, m = cost.shape
    rows, cols = rows.cpu().numpy(), cols.cpu().numpy()
    k = min(n, m)
    assert len(rows) == len(cols) == k
    assert (np.diff(rows) > 0).all(), rows  # ascending, distinct
    assert len(set(cols.tolist())) == k
    if k:
        assert rows.min() >= 0 and rows.max() < n and cols.min() >= 0 and cols.max() < m
    r, c = scipy_lsa(cost, maximize=maximize)
    expected = cost[r, c].sum()
    total = cost[rows, cols].sum()
    assert abs(total - expected) <= atol * max(1.0, abs(expected)), (total, expected)
    if exact_scipy:
        np.testing.assert_array_equal(rows, r)
        np.testing.assert_array_equal(cols, c)


@pytest.mark.parametrize("kind", ["normal", "ties", "wide_range"])
@pytest.mark.parametrize("N,M,B", [(6, 6, 600), (12, 5, 400), (5, 13, 400), (30, 30, 100), (1, 9, 50),
                                   (9, 1, 50)])
def test_optimal_on_random_ragged_batches(kind, N, M, B):
    gen = torch.Generator().manual_seed(int(torch.randint(0, 2**31, ())))
    cost, rows, cols = random_batch(B, N, M, kind, gen)
    pairs = linear_sum_assignment(cost, num_rows=rows, num_cols=cols)
    assert len(pairs) == B
    for b, (r, c) in enumerate(pairs):
        assert r.dtype == c.dtype == torch.int64
        check_problem(cost[b, :rows[b], :cols[b]].numpy(), r, c, exact_scipy=(kind == "normal"))


@pytest.mark.parametrize("shape", [(900, 20), (20, 900), (300, 100), (100, 100)])
def test_detr_shapes_float32(shape):
    cost = torch.rand(3, *shape)
    for b, (r, c) in enumerate(linear_sum_assignment(cost)):
        check_problem(cost[b].double().numpy(), r, c, atol=1e-6)


def test_two_dimensional_input_and_padded_output():
    cost = torch.randn(7, 4, dtype=torch.float64)
    r, c = linear_sum_assignment(cost)
    check_problem(cost.numpy(), r, c, exact_scipy=True)
    rows, cols, counts = linear_sum_assignment_padded(torch.randn(3, 5, 4), num_rows=[5, 2, 0], num_cols=4)
    assert rows.shape == cols.shape == (3, 4) and counts.tolist() == [4, 2, 0]
    assert (rows[1, 2:] == -1).all() and (cols[2] == -1).all()


def test_empty_problems_and_batches():
    for shape in [(0, 5), (5, 0), (0, 0)]:
        r, c = linear_sum_assignment(torch.rand(*shape))
        assert r.shape == c.shape == (0,)
    assert linear_sum_assignment(torch.rand(0, 3, 4)) == []
    pairs = linear_sum_assignment(torch.rand(2, 0, 4))
    assert [len(r) for r, _ in pairs] == [0, 0]


def test_dtypes_and_non_contiguous():
    cost = torch.randn(4, 8, 6, dtype=torch.float64)
    for c in (cost.float(), cost.half().float(), cost.transpose(1, 2).contiguous().transpose(1, 2)):
        for b, (r, cc) in enumerate(linear_sum_assignment(c)):
            check_problem(c[b].double().numpy(), r, cc, atol=1e-6)
    ints = torch.randint(-5, 5, (3, 6, 9))
    for b, (r, c) in enumerate(linear_sum_assignment(ints)):
        check_problem(ints[b].double().numpy(), r, c, atol=0)
    half = cost.half()
    for b, (r, c) in enumerate(linear_sum_assignment(half)):
        check_problem(half[b].double().numpy(), r, c, atol=1e-6)


def test_maximize():
    cost = torch.randn(5, 7, 4, dtype=torch.float64)
    for b, (r, c) in enumerate(linear_sum_assignment(cost, maximize=True)):
        check_problem(cost[b].numpy(), r, c, maximize=True, exact_scipy=True)


def test_inf_entries_forbid_pairs():
    gen = torch.Generator().manual_seed(5)
    cost = torch.rand(200, 6, 8, dtype=torch.float64, generator=gen)
    cost[torch.rand(cost.shape, generator=gen) < 0.3] = math.inf
    feasible = []
    for b in range(cost.shape[0]):
        try:
            scipy_lsa(cost[b].numpy())
            feasible.append(b)
        except ValueError:
            pass
    assert len(feasible) > 20
    pairs = linear_sum_assignment(cost[feasible])
    for b, (r, c) in zip(feasible, pairs):
        assert torch.isfinite(cost[b, r, c]).all()
        check_problem(cost[b].numpy(), r, c)
    for b in sorted(set(range(cost.shape[0])) - set(feasible))[:20]:  # what scipy refuses, the solver refuses
        with pytest.raises(ValueError, match="infeasible"):
            linear_sum_assignment(cost[b])


def test_infeasible_nan_and_neg_inf_raise(backend):
    cost = torch.rand(3, 4, 4)
    bad = cost.clone()
    bad[1, :, 2] = math.inf  # column 2 cannot be assigned
    with pytest.raises(ValueError, match=r"infeasible \(problem 1\)"):
        linear_sum_assignment(bad)
    bad = cost.clone()
    bad[2, 0, 0] = math.nan
    with pytest.raises(ValueError, match=r"invalid numeric entries \(problem 2\)"):
        linear_sum_assignment(bad)
    bad = cost.clone()
    bad[0, 3, 1] = -math.inf
    with pytest.raises(ValueError, match="invalid numeric entries"):
        linear_sum_assignment(bad)
    with pytest.raises(ValueError, match="invalid numeric entries"):
        linear_sum_assignment(torch.full((2, 2), math.inf), maximize=True)
    # entries outside a problem's valid region are never read
    outside = cost.clone()
    outside[:, 3, :] = math.nan
    assert len(linear_sum_assignment(outside, num_rows=3)) == 3


def test_bad_inputs(backend):
    with pytest.raises(TypeError, match="'cost'"):
        linear_sum_assignment([[1.0]])
    with pytest.raises(ValueError, match="'cost'"):
        linear_sum_assignment(torch.rand(4))
    with pytest.raises(ValueError, match="'cost'"):
        linear_sum_assignment(torch.rand(2, 2, 2, 2))
    with pytest.raises(TypeError, match="'cost'"):
        linear_sum_assignment(torch.rand(2, 2, dtype=torch.complex64))
    with pytest.raises(ValueError, match="'num_rows'"):
        linear_sum_assignment(torch.rand(2, 3, 4), num_rows=[3, 4])
    with pytest.raises(ValueError, match="'num_cols'"):
        linear_sum_assignment(torch.rand(2, 3, 4), num_cols=[-1, 4])
    with pytest.raises(TypeError, match="'num_cols'"):
        linear_sum_assignment(torch.rand(2, 3, 4), num_cols=[2.7, 4])  # not truncated to 2
    with pytest.raises(ValueError, match="'num_rows'"):
        linear_sum_assignment(torch.rand(2, 3, 4), num_rows=[1, 2, 3])
    with pytest.raises(TypeError, match="'num_cols'"):
        linear_sum_assignment(torch.rand(2, 3, 4), num_cols=torch.tensor([1.0, 2.0]))
    with pytest.raises(TypeError, match="'num_cols'"):
        linear_sum_assignment(torch.rand(2, 3, 4), num_cols="ab")


def test_opcheck():
    cost = torch.rand(3, 5, 4)
    torch.library.opcheck(linear_sum_assignment_op, (cost, torch.tensor([5, 2, 0]), torch.tensor([4, 4, 1])))


def test_torch_compile_fullgraph():
    cost, rows, cols = torch.rand(3, 5, 4), torch.tensor([5, 2, 0]), torch.tensor([4, 4, 1])
    fn = torch.compile(lambda *a: linear_sum_assignment_op(*a), fullgraph=True)
    for a, b in zip(fn(cost, rows, cols), linear_sum_assignment_op(cost, rows, cols)):
        assert torch.equal(a, b)


# ---- CUDA ----

@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_cuda_optimal_on_random_problems(dtype):
    gen = torch.Generator().manual_seed(int(torch.randint(0, 2**31, ())))
    for kind in ("normal", "ties"):
        for N, M, B in [(6, 6, 500), (12, 5, 300), (5, 13, 300), (40, 40, 50), (1, 9, 20), (9, 1, 20)]:
            cost, rows, cols = random_batch(B, N, M, kind, gen)
            cost = cost.to(dtype)
            pairs = linear_sum_assignment(cost.cuda(), num_rows=rows.cuda(), num_cols=cols)
            for b, (r, c) in enumerate(pairs):
                assert r.device.type == "cuda"
                check_problem(cost[b, :rows[b], :cols[b]].double().numpy(), r, c,
                              atol=1e-9 if dtype == torch.float64 else 1e-5)


@pytest.mark.cuda
def test_cuda_detr_shapes_and_16_bit():
    for shape, B in [((900, 20), 28), ((20, 900), 4), ((300, 100), 8), ((900, 900), 2)]:
        cost = torch.rand(B, *shape)
        for b, (r, c) in enumerate(linear_sum_assignment(cost.cuda())):
            check_problem(cost[b].double().numpy(), r, c, atol=1e-6)
    for dtype in (torch.float16, torch.bfloat16):
        cost = torch.rand(6, 50, 10).to(dtype)
        for b, (r, c) in enumerate(linear_sum_assignment(cost.cuda())):
            check_problem(cost[b].double().numpy(), r, c, atol=1e-6)


@pytest.mark.cuda
def test_cuda_errors_and_inf():
    cost = torch.rand(3, 4, 4, device="cuda")
    cost[1, :, 2] = math.inf
    with pytest.raises(ValueError, match=r"infeasible \(problem 1\)"):
        linear_sum_assignment(cost)
    cost[1, :, 2] = math.nan
    with pytest.raises(ValueError, match=r"invalid numeric entries \(problem 1\)"):
        linear_sum_assignment(cost)
    cost = torch.rand(50, 6, 8, dtype=torch.float64)
    cost[cost < 0.2] = math.inf
    ok = []
    for b in range(50):
        try:
            scipy_lsa(cost[b].numpy())
            ok.append(b)
        except ValueError:
            pass
    for b, (r, c) in zip(ok, linear_sum_assignment(cost[ok].cuda())):
        check_problem(cost[b].numpy(), r, c)
