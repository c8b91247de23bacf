"""matching_cost: the fused kernel against the float64 batched reference and a DETR-style (flattened batch)
cost, with padding, per-image counts, G = 0 images, batch 1, token maps of every kind, extreme logits,
non-contiguous and bad inputs; CUDA kernels (marked `cuda`), incl. the small run for compute-sanitizer."""
import math

import pytest
import torch

from dinokernels._config import checking_finite
from dinokernels.ops import linear_sum_assignment, matching_cost, matching_cost_flat, matching_cost_ref
from dinokernels.ops.matching_cost import matching_cost_op
from dk_test_helpers import backend  # noqa: F401 (fixture: every backend)


def make_inputs(B, Q, T, G, counts=None, dtype=torch.float64, device="cpu", density=0.1, scale=3.0):
    logits = torch.randn(B, Q, T, dtype=dtype, device=device) * scale
    pred = torch.cat([torch.rand(B, Q, 2), torch.rand(B, Q, 2) * 0.5 + 0.01], -1).to(device, dtype)
    tgt = torch.cat([torch.rand(B, G, 2), torch.rand(B, G, 2) * 0.5 + 0.01], -1).to(device, dtype)
    pmap = torch.rand(B, G, T, device=device) < density
    pmap[..., 0] |= ~pmap.any(-1)  # every target has a token unless a test clears it
    counts = [G] * B if counts is None else counts
    return logits, pred, tgt, pmap, counts


@pytest.mark.parametrize("B,Q,T,G,counts", [(3, 17, 33, 6, [6, 0, 2]), (1, 5, 1, 1, [1]), (2, 40, 256, 20, [20, 13]),
                                            (4, 9, 7, 3, [0, 0, 0, 0])])
def test_float64_matches_reference(B, Q, T, G, counts):
    args = make_inputs(B, Q, T, G, counts)
    out = matching_cost(*args)
    ref = matching_cost_ref(*args)
    assert out.shape == (B, Q, G) and out.dtype == torch.float64
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)
    for b in range(B):
        assert torch.isinf(out[b, :, counts[b]:]).all()  # padding columns: +inf by default


def test_matches_detr_style_flattened_cost():
    B, Q, T, G, counts = 3, 30, 64, 8, [8, 3, 5]
    logits, pred, tgt, pmap, _ = make_inputs(B, Q, T, G, counts)
    out = matching_cost(logits, pred, tgt, pmap, counts, cost_class=2.0, cost_bbox=5.0, cost_giou=2.0)
    targets = [{"boxes": tgt[b, :counts[b]], "positive_map": pmap[b, :counts[b]]} for b in range(B)]
    flat = matching_cost_flat(logits, pred, targets, cost_class=2.0, dtype=torch.float64)
    for b, block in enumerate(flat.split(counts, -1)):
        torch.testing.assert_close(out[b, :, :counts[b]], block[b], rtol=1e-10, atol=1e-10)


def test_float32_close_to_float64_reference():
    args = make_inputs(4, 64, 128, 10, [10, 1, 0, 7], dtype=torch.float64)
    ref = matching_cost_ref(*args)
    logits, pred, tgt, pmap, counts = args
    out = matching_cost(logits.float(), pred.float(), tgt.float(), pmap, counts)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=2e-5)


def test_float_maps_weights_and_empty_map():
    """Float maps are token weights (normalised by their sum); an all-zero map gives class cost 0."""
    logits, pred, tgt, _, counts = make_inputs(2, 11, 20, 4)
    pmap = torch.rand(2, 4, 20, dtype=torch.float64) * (torch.rand(2, 4, 20) < 0.3)
    pmap[1, 2] = 0
    out = matching_cost(logits, pred, tgt, pmap, counts, cost_class=1.5, cost_bbox=0.5, cost_giou=3.0)
    torch.testing.assert_close(out, matching_cost_ref(logits, pred, tgt, pmap, counts, 1.5, 0.5, 3.0),
                               rtol=1e-10, atol=1e-10)
    boxes_only = matching_cost(logits, pred, tgt, pmap, counts, cost_class=0.0, cost_bbox=0.5, cost_giou=3.0)
    torch.testing.assert_close(out[1, :, 2], boxes_only[1, :, 2], rtol=0, atol=0)
    scaled = matching_cost(logits, pred, tgt, pmap * 7.0, counts, cost_class=1.5, cost_bbox=0.5, cost_giou=3.0)
    torch.testing.assert_close(scaled, out, rtol=1e-10, atol=1e-10)


def test_weights_alpha_gamma_pad_value():
    args = make_inputs(2, 13, 9, 5, [5, 2])
    kw = dict(cost_class=2.0, cost_bbox=1.0, cost_giou=0.5, alpha=0.4, gamma=1.5, pad_value=-3.0)
    out = matching_cost(*args, **kw)
    torch.testing.assert_close(out, matching_cost_ref(*args, **kw), rtol=1e-10, atol=1e-10)
    assert (out[1, :, 2:] == -3.0).all()


def test_extreme_logits_stay_finite_and_accurate():
    logits, pred, tgt, pmap, counts = make_inputs(2, 8, 16, 4, density=0.5)
    logits[0, 0] = 40.0
    logits[0, 1] = -40.0
    logits[1, 0] = math.inf
    logits[1, 1] = -math.inf
    out = matching_cost(logits, pred, tgt, pmap, counts)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, matching_cost_ref(logits, pred, tgt, pmap, counts), rtol=1e-9, atol=1e-9)
    out32 = matching_cost(logits.float(), pred.float(), tgt.float(), pmap, counts)
    torch.testing.assert_close(out32.double(), out, rtol=1e-5, atol=1e-4)


def test_per_token_focal_term_float32_accuracy():
    """One-hot maps turn each column into one token's focal (pos − neg): the float32 kernel (vectorised exp/log on
    the CPU) against float64 over the whole logit range, ±inf included; NaN propagates to its column."""
    x = torch.cat([torch.linspace(-60, 60, 2001, dtype=torch.float64), torch.tensor([math.inf, -math.inf, 1e-30])])
    T = x.numel()
    logits = x.reshape(1, 1, T)
    pred = torch.tensor([[[0.5, 0.5, 0.2, 0.2]]], dtype=torch.float64)
    tgt = pred.expand(1, T, 4).contiguous()
    pmap = torch.eye(T, dtype=torch.bool)[None]
    kw = dict(cost_class=1.0, cost_bbox=0.0, cost_giou=0.0)
    ref = matching_cost(logits, pred, tgt, pmap, [T], **kw)
    torch.testing.assert_close(ref, matching_cost_ref(logits, pred, tgt, pmap, [T], **kw), rtol=1e-9, atol=1e-9)
    out = matching_cost(logits.float(), pred.float(), tgt.float(), pmap, [T], **kw)
    torch.testing.assert_close(out.double(), ref, rtol=2e-6, atol=1e-6)
    logits[0, 0, 7] = math.nan
    with pytest.raises(ValueError, match="'pred_logits' contains 1 NaN"):
        matching_cost(logits.float(), pred.float(), tgt.float(), pmap, [T], **kw)
    with checking_finite(False):  # unchecked, NaN propagates to its column as in the dense matmul
        out = matching_cost(logits.float(), pred.float(), tgt.float(), pmap, [T], **kw)
    ref = matching_cost_ref(logits, pred, tgt, pmap, [T], **kw)
    assert torch.isnan(out[0, 0, 7]) and torch.equal(torch.isnan(out), torch.isnan(ref))


def test_degenerate_boxes_finite():
    logits, pred, tgt, pmap, counts = make_inputs(1, 6, 4, 3)
    pred[0, :3, 2:] = 0  # zero-size predictions
    tgt[0, 0] = pred[0, 0]  # a target identical to a point prediction
    out = matching_cost(logits, pred, tgt, pmap, counts)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, matching_cost_ref(logits, pred, tgt, pmap, counts), rtol=1e-10, atol=1e-10)


def test_non_contiguous_bool_and_half_inputs_and_counts_kinds():
    logits, pred, tgt, pmap, counts = make_inputs(3, 12, 10, 4, [4, 1, 3], dtype=torch.float32)
    ref = matching_cost_ref(logits.double(), pred.double(), tgt.double(), pmap, counts).float()
    lt = logits.transpose(1, 2).contiguous().transpose(1, 2)
    assert not lt.is_contiguous()
    out = matching_cost(lt, pred[:, :, [0, 1, 2, 3]], tgt, pmap.float(), torch.tensor(counts, dtype=torch.int32))
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=2e-5)
    half = matching_cost(logits.half(), pred, tgt, pmap, counts)  # 16-bit input is upcast on the CPU
    assert half.dtype == torch.float32


def test_requires_grad_inputs_are_detached_and_empty_shapes():
    logits, pred, tgt, pmap, counts = make_inputs(2, 5, 3, 2, dtype=torch.float32)
    out = matching_cost(logits.requires_grad_(), pred.requires_grad_(), tgt, pmap, counts)
    assert not out.requires_grad
    assert matching_cost(logits[:, :0], pred[:, :0], tgt, pmap, counts).shape == (2, 0, 2)
    assert matching_cost(logits[:0], pred[:0], tgt[:0], pmap[:0], []).shape == (0, 5, 2)
    assert matching_cost(logits, pred, tgt[:, :0], pmap[:, :0], [0, 0]).shape == (2, 5, 0)


def test_opcheck():
    logits, pred, tgt, pmap, counts = make_inputs(2, 6, 5, 3, [3, 1], dtype=torch.float32)
    torch.library.opcheck(matching_cost_op, (logits, pred, tgt, torch.tensor(counts), pmap.float(), 1.0, 5.0,
                                             2.0, 0.25, 2.0, math.inf))


def test_torch_compile_fullgraph():
    logits, pred, tgt, pmap, counts = make_inputs(2, 6, 5, 3, [3, 1], dtype=torch.float32)
    args = (logits, pred, tgt, torch.tensor(counts), pmap.float())
    fn = torch.compile(lambda *a: matching_cost_op(*a, 1.0, 5.0, 2.0, 0.25, 2.0, math.inf), fullgraph=True)
    torch.testing.assert_close(fn(*args), matching_cost_op(*args, 1.0, 5.0, 2.0, 0.25, 2.0, math.inf),
                               rtol=0, atol=0)


@pytest.mark.usefixtures("backend")
def test_bad_inputs():
    logits, pred, tgt, pmap, counts = make_inputs(2, 6, 5, 3, dtype=torch.float32)
    with pytest.raises(ValueError, match="'pred_logits'"):
        matching_cost(logits[0], pred, tgt, pmap, counts)
    with pytest.raises(ValueError, match="'pred_boxes'"):
        matching_cost(logits, pred[..., :3], tgt, pmap, counts)
    with pytest.raises(ValueError, match="'tgt_boxes'"):
        matching_cost(logits, pred, tgt[:1], pmap, counts)
    with pytest.raises(ValueError, match="'positive_map'"):
        matching_cost(logits, pred, tgt, pmap[..., :4], counts)
    with pytest.raises(TypeError, match="'positive_map'"):
        matching_cost(logits, pred, tgt, pmap.long(), counts)
    with pytest.raises(ValueError, match="'tgt_counts'"):
        matching_cost(logits, pred, tgt, pmap, [3, 4])
    with pytest.raises(ValueError, match="'tgt_counts'"):
        matching_cost(logits, pred, tgt, pmap, [3])
    with pytest.raises(TypeError, match="'tgt_counts'"):
        matching_cost(logits, pred, tgt, pmap, torch.tensor([1.0, 2.0]))
    with pytest.raises(TypeError, match="'tgt_counts'"):
        matching_cost(logits, pred, tgt, pmap, [1.0, 2.7])  # not truncated to [1, 2]
    signed = pmap.float().clone()
    signed[0, 0, 0] = -1.0
    with pytest.raises(ValueError, match="'positive_map'.*nonnegative"):
        matching_cost(logits, pred, tgt, signed, counts)
    signed[0, 0, 0] = math.nan
    with pytest.raises(ValueError, match="'positive_map'.*nonnegative"):
        matching_cost(logits, pred, tgt, signed, counts)
    with pytest.raises(ValueError, match="'alpha'"):
        matching_cost(logits, pred, tgt, pmap, counts, alpha=1.5)
    with pytest.raises(ValueError, match="'cost_bbox'"):
        matching_cost(logits, pred, tgt, pmap, counts, cost_bbox=math.nan)
    for name, index, value in (("pred_logits", (1, 2, 0), math.nan), ("pred_boxes", (0, 1, 2), math.inf),
                               ("tgt_boxes", (1, 0, 0), -math.inf), ("tgt_boxes", (0, 2, 1), math.nan)):
        args = dict(pred_logits=logits, pred_boxes=pred, tgt_boxes=tgt)
        args[name] = args[name].clone()
        args[name][index] = value
        with pytest.raises(ValueError, match=f"'{name}' contains 1 "):
            matching_cost(positive_map=pmap, tgt_counts=counts, **args)
    for name in ("pred_boxes", "tgt_boxes"):  # 5·L1 > float32's 3.4e38: the cost is not representable
        args = dict(pred_logits=logits, pred_boxes=pred, tgt_boxes=tgt)
        args[name] = torch.full_like(args[name], 3e38)
        with pytest.raises(ValueError, match=f"'{name}' gives a non-finite cost"):
            matching_cost(positive_map=pmap, tgt_counts=counts, **args)
    padded = tgt.clone()
    padded[1, 2] = math.nan  # past tgt_counts[1] = 2: padding, never read
    out = matching_cost(logits, pred, padded, pmap, [3, 2])
    assert torch.isfinite(out[1, :, :2]).all() and torch.isinf(out[1, :, 2]).all()


# ---- CUDA ----

@pytest.mark.cuda
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 2e-5), (torch.float16, 2e-2), (torch.bfloat16, 1e-1)])
def test_cuda_matches_reference(dtype, tol):
    for B, Q, T, G, counts in [(4, 900, 256, 20, [20, 0, 7, 13]), (2, 33, 2500, 5, [5, 1]), (1, 3, 1, 1, [1])]:
        logits, pred, tgt, pmap, counts = make_inputs(B, Q, T, G, counts, dtype=torch.float32, device="cuda")
        logits = logits.to(dtype)
        ref = matching_cost_ref(logits.double(), pred.double(), tgt.double(), pmap, counts)
        out = matching_cost(logits, pred, tgt, pmap, counts)
        assert out.dtype == torch.float32 and out.device.type == "cuda"
        torch.testing.assert_close(out.double(), ref, rtol=tol, atol=tol)
        cpu = matching_cost(logits.float().cpu(), pred.cpu(), tgt.cpu(), pmap.cpu(), counts)
        torch.testing.assert_close(out.cpu(), cpu, rtol=tol, atol=tol)


@pytest.mark.cuda
def test_cuda_matching_small_run_for_sanitizer():
    """Touches every CUDA kernel of matching (matching_cost in each logits dtype, the batched LSA in each cost
    dtype) on awkward sizes: 1 token, > 2048 tokens (two chunks), G = 0 images, wide, tall, empty problems."""
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        for B, Q, T, G, counts in [(1, 1, 1, 1, [1]), (3, 37, 2049, 9, [9, 0, 4]), (2, 5, 3, 7, [7, 6])]:
            logits, pred, tgt, pmap, counts = make_inputs(B, Q, T, G, counts, dtype=torch.float32, device="cuda")
            cost = matching_cost(logits.to(dtype), pred, tgt, pmap, counts)
            assert torch.isfinite(cost[:, :, :min(counts)]).all()
            pairs = linear_sum_assignment(cost, num_cols=counts)
            assert [len(r) for r, _ in pairs] == [min(Q, c) for c in counts]
    for dtype in (torch.float32, torch.float64, torch.float16, torch.bfloat16):
        cost = torch.rand(5, 33, 7, device="cuda").to(dtype)
        pairs = linear_sum_assignment(cost, num_rows=[33, 0, 1, 7, 20], num_cols=[7, 3, 7, 1, 0])
        assert [len(r) for r, _ in pairs] == [7, 0, 1, 1, 0]
    torch.cuda.synchronize()


@pytest.mark.parametrize("backend", ["kernel", "reference", "fallback"], indirect=True)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_16bit_inputs_give_a_float32_cost_on_every_backend(backend, dtype):
    """16-bit input is computed in float32 on every backend (torch.cdist has no 16-bit CPU kernel) and the cost is
    float32, equal to the cost of the same values given in float32."""
    logits, pred, tgt, pmap, counts = make_inputs(2, 9, 11, 4, [4, 1], dtype=torch.float32)
    low = tuple(t.to(dtype) for t in (logits, pred, tgt))
    out = matching_cost(*low, pmap, torch.tensor(counts))
    assert out.dtype == torch.float32
    expected = matching_cost(*(t.float() for t in low), pmap, torch.tensor(counts))
    torch.testing.assert_close(out, expected, rtol=1e-6, atol=1e-6)
