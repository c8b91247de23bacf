"""ms_deform_attn: CPU kernel forward and every gradient against the float64 references (the official CUDA
kernel's arithmetic written with gathers, and Deformable-DETR's grid_sample formulation), on fresh random inputs:
non-square and 1×1 levels, points outside the image and exactly on pixel centres, grid lines and the skip
boundaries, realistic and uniform locations, awkward D, L and P; gradcheck, opcheck, torch.compile, non-contiguous
and empty inputs, bad input; the CUDA kernels (marked `cuda`) in float32/float16/bfloat16."""
import pytest
import torch

import dinokernels
from dinokernels import _config
from dinokernels.ops import ms_deform_attn, ms_deform_attn_gather_ref, ms_deform_attn_ref
from dk_test_helpers import registered
from dk_test_helpers import backend  # noqa: F401 (a fixture, used by name)

CUDA_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def levels(hw):
    shapes = torch.tensor(hw, dtype=torch.int64)
    sizes = shapes[:, 0] * shapes[:, 1]
    return shapes, torch.cumsum(sizes, 0) - sizes


def reference_grid(hw, dtype=torch.float64):
    """Pixel centres of every level, normalised (x, y), levels concatenated: (S, 2) (the encoder's queries)."""
    parts = []
    for h, w in hw:
        ys, xs = torch.meshgrid((torch.arange(h, dtype=dtype) + 0.5) / h, (torch.arange(w, dtype=dtype) + 0.5) / w,
                                indexing="ij")
        parts.append(torch.stack([xs, ys], -1).reshape(-1, 2))
    return torch.cat(parts)


def make_inputs(n, lq, m, d, hw, p, mode="uniform", dtype=torch.float64, device="cpu"):
    """(value, spatial_shapes, level_start_index, sampling_locations, attention_weights).
    uniform: locations U(−0.2, 1.2), so some fall outside; realistic: reference points (pixel centres of the
    levels, cycled over the queries) plus offsets of about two pixels of each level; attention weights softmaxed."""
    shapes, starts = levels(hw)
    s = int((shapes[:, 0] * shapes[:, 1]).sum())
    nl = len(hw)
    value = torch.randn(n, s, m, d, dtype=torch.float64)
    if mode == "uniform":
        loc = torch.rand(n, lq, m, nl, p, 2, dtype=torch.float64) * 1.4 - 0.2
    else:
        grid = reference_grid(hw)
        ref = grid[torch.arange(lq) % s] if s else grid[:0]
        wh = torch.tensor([[w, h] for h, w in hw], dtype=torch.float64)
        loc = ref[None, :, None, None, None, :] + torch.randn(n, lq, m, nl, p, 2, dtype=torch.float64) * 2 / \
            wh[None, None, None, :, None, :]
    attn = torch.softmax(torch.randn(n, lq, m, nl * p, dtype=torch.float64), -1).reshape(n, lq, m, nl, p)
    return [value.to(device, dtype), shapes, starts, loc.to(device, dtype), attn.to(device, dtype)]


def forward_and_grads(fn, inputs, grad_out=None):
    value, shapes, starts, loc, attn = [t.detach().clone() for t in inputs]
    for t in (value, loc, attn):
        t.requires_grad_(True)
    out = fn(value, shapes, starts, loc, attn)
    if grad_out is None:
        grad_out = torch.randn_like(out)
    grads = torch.autograd.grad(out, (value, loc, attn), grad_out.to(out.dtype), allow_unused=True)
    return (out.detach(), *grads), grad_out


def assert_close_scaled(actual, expected, rtol, name=""):
    """|actual − expected| ≤ rtol·(|expected| + max|expected|·1e-2 + 1e-12): relative where the values are
    large, absolute near zeros that come from cancellation."""
    actual, expected = actual.double(), expected.double()
    tol = rtol * (expected.abs() + expected.abs().max() * 1e-2 + 1e-12)
    excess = ((actual - expected).abs() - tol).max().item() if actual.numel() else 0.0
    assert excess <= 0, f"{name}: max excess {excess:.3e} over rtol {rtol} (max |err| " \
                        f"{(actual - expected).abs().max().item():.3e})"


NAMES = ("output", "grad_value", "grad_sampling_locations", "grad_attention_weights")


def near_kink(loc, shapes, tol=1e-4):
    """(N, Lq, M, L, P, 2) mask of samples with a pixel coordinate within `tol` of an integer. There the location
    gradient jumps (another corner pair takes over, or the sample starts being skipped), so a float32 position that
    rounds across the integer gives the other one-sided derivative. Output and the other gradients are continuous."""
    sizes = torch.stack([shapes[:, 1], shapes[:, 0]], -1).to(loc.device, torch.float64)  # (L, 2) as (W, H)
    pix = loc.double() * sizes[:, None, :] - 0.5
    near = ((pix - pix.round()).abs() < tol).any(-1, keepdim=True)
    return near.expand_as(loc)


def mask_kinks(got, want, loc, shapes):
    """Zeroes the location gradients of samples next to a kink (see near_kink) in both results."""
    mask = near_kink(loc, shapes)
    assert mask.double().mean() < 0.05, "too many samples next to a kink for a meaningful comparison"
    got, want = list(got), list(want)
    got[2] = got[2].masked_fill(mask, 0)
    want[2] = want[2].masked_fill(mask, 0)
    return got, want

# (N, Lq, M, D, levels (H, W), P, location mode)
CASES = {
    "non_square_1x1": (2, 7, 3, 5, [(5, 7), (3, 2), (1, 1)], 4, "uniform"),
    "batch1_D1_L1_P1": (1, 5, 2, 1, [(4, 6)], 1, "uniform"),
    "D3_L5": (2, 4, 1, 3, [(6, 5), (4, 4), (2, 3), (1, 2), (1, 1)], 2, "uniform"),
    "D33_P16": (1, 3, 2, 33, [(3, 4), (2, 2)], 16, "uniform"),
    "D67_L8": (1, 3, 2, 67, [(3, 5), (2, 2), (1, 3), (4, 1), (1, 1), (2, 1), (3, 3), (1, 2)], 2, "uniform"),
    "realistic_encoder": (2, 143, 2, 8, [(8, 10), (4, 5), (2, 3), (1, 2)], 4, "realistic"),
    "realistic_D32": (1, 40, 8, 32, [(6, 9), (3, 5), (2, 3), (1, 2)], 4, "realistic"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_float64_matches_official_kernel_arithmetic(case):
    n, lq, m, d, hw, p, mode = CASES[case]
    inputs = make_inputs(n, lq, m, d, hw, p, mode)
    got, grad_out = forward_and_grads(ms_deform_attn, inputs)
    want, _ = forward_and_grads(ms_deform_attn_gather_ref, inputs, grad_out)
    for name, a, b in zip(NAMES, got, want):
        assert a.dtype == torch.float64
        assert_close_scaled(a, b, 1e-10, name)


@pytest.mark.parametrize("case", list(CASES))
def test_float64_matches_grid_sample_reference(case):
    # Random locations never land exactly on the skip boundary, where the two references differ (module doc).
    n, lq, m, d, hw, p, mode = CASES[case]
    inputs = make_inputs(n, lq, m, d, hw, p, mode)
    got, grad_out = forward_and_grads(ms_deform_attn, inputs)
    want, _ = forward_and_grads(ms_deform_attn_ref, inputs, grad_out)
    for name, a, b in zip(NAMES, got, want):
        assert_close_scaled(a, b, 1e-9, name)


@pytest.mark.parametrize("case", list(CASES))
def test_float32_matches_float64(case):
    n, lq, m, d, hw, p, mode = CASES[case]
    inputs = make_inputs(n, lq, m, d, hw, p, mode, dtype=torch.float32)
    got, grad_out = forward_and_grads(ms_deform_attn, inputs)
    inputs64 = [t.double() if t.is_floating_point() else t for t in inputs]
    want, _ = forward_and_grads(ms_deform_attn_gather_ref, inputs64, grad_out.double())
    got, want = mask_kinks(got, want, inputs[3], inputs[1])
    for name, a, b in zip(NAMES, got, want):
        assert a.dtype == torch.float32
        assert_close_scaled(a, b, 2e-4, name)


def border_locations(hw, m, p):
    """Every coordinate j/(2·size) for j in [−3, 2·size + 3]: pixel centres, grid lines, 0 and 1, the skip boundaries
    x·W − 0.5 = −1 and = W, and just beyond. Sizes are powers of 2, so x·W is exact in any float format."""
    nl = len(hw)
    cols = []
    for l, (h, w) in enumerate(hw):
        xs = torch.arange(-3, 2 * w + 4, dtype=torch.float64) / (2 * w)
        ys = torch.arange(-3, 2 * h + 4, dtype=torch.float64) / (2 * h)
        gy, gx = torch.meshgrid(ys, xs, indexing="ij")
        cols.append(torch.stack([gx, gy], -1).reshape(-1, 2))
    count = max(c.shape[0] for c in cols)
    loc = torch.zeros(count, m, nl, p, 2, dtype=torch.float64)
    for l, c in enumerate(cols):
        for pt in range(p):
            for head in range(m):
                # A different cyclic shift per (head, point) mixes positions across samples of one query.
                loc[:, head, l, pt] = c[(torch.arange(count) * (1 + pt) + 3 * head) % c.shape[0]]
    return loc


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_border_and_centre_locations(dtype):
    hw = [(4, 8), (2, 2), (1, 1), (8, 1)]
    m, p, d = 2, 3, 5
    loc = border_locations(hw, m, p)[None]
    lq = loc.shape[1]
    value, shapes, starts, _, attn = make_inputs(1, lq, m, d, hw, p)
    inputs = [value.to(dtype), shapes, starts, loc.to(dtype), attn.to(dtype)]
    got, grad_out = forward_and_grads(ms_deform_attn, inputs)
    inputs64 = [t.double() if t.is_floating_point() else t for t in inputs]
    want, _ = forward_and_grads(ms_deform_attn_gather_ref, inputs64, grad_out.double())
    rtol = 1e-10 if dtype == torch.float64 else 2e-4
    for name, a, b in zip(NAMES, got, want):
        assert_close_scaled(a, b, rtol, name)
    # The forward agrees with grid_sample everywhere, boundaries included (only the location gradient differs).
    assert_close_scaled(got[0], ms_deform_attn_ref(*inputs64), rtol, "output vs grid_sample")
    # Samples on or beyond the skip boundary contribute nothing and get zero location/weight gradients.
    x_im = loc[..., 0] * torch.tensor([w for _, w in hw], dtype=torch.float64)[:, None] - 0.5
    y_im = loc[..., 1] * torch.tensor([h for h, _ in hw], dtype=torch.float64)[:, None] - 0.5
    h_lim = torch.tensor([h for h, _ in hw], dtype=torch.float64)[:, None]
    w_lim = torch.tensor([w for _, w in hw], dtype=torch.float64)[:, None]
    skipped = (x_im <= -1) | (y_im <= -1) | (x_im >= w_lim) | (y_im >= h_lim)
    assert skipped.any() and (~skipped).any()
    assert (got[3][skipped] == 0).all() and (got[2][skipped] == 0).all()


def test_output_of_pixel_centre_sampling_is_the_pixel():
    # One level, weights 1 on one point at a pixel centre: the output is that pixel's value, exactly (sizes are
    # powers of 2, so the centres are exact binary fractions).
    hw = [(4, 8)]
    value, shapes, starts, _, _ = make_inputs(2, 32, 2, 7, hw, 1)
    loc = reference_grid(hw)[None, :, None, None, None, :].expand(2, 32, 2, 1, 1, 2).contiguous()
    attn = torch.ones(2, 32, 2, 1, 1, dtype=torch.float64)
    out = ms_deform_attn(value, shapes, starts, loc, attn)
    assert torch.equal(out, value.reshape(2, 32, 14))


def test_gradcheck():
    value, shapes, starts, loc, attn = make_inputs(1, 3, 2, 3, [(3, 4), (2, 2), (1, 1)], 2)
    for t in (value, loc, attn):
        t.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda v, x, a: ms_deform_attn(v, shapes, starts, x, a), (value, loc, attn),
                                    eps=1e-6, atol=1e-6)


def test_gradcheck_realistic_d32():
    value, shapes, starts, loc, attn = make_inputs(2, 4, 2, 32, [(4, 5), (2, 3)], 4, "realistic")
    for t in (value, loc, attn):
        t.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda v, x, a: ms_deform_attn(v, shapes, starts, x, a), (value, loc, attn),
                                    eps=1e-6, atol=1e-6)


@pytest.mark.parametrize("m,lq,threads", [(1, 200, 4), (2, 200, 4), (2, 5, 4), (1, 200, 20)])
def test_backward_is_deterministic_and_split_queries_match(m, lq, threads):
    # N·M < 4 heads cannot feed 4 threads: the backward then splits the queries over partial grad_value copies;
    # (2, 200) also scatters into head-major copies, (2, 5) (fewer samples than value rows) does not; 20 threads
    # for one head hit the cap of 8 query chunks.
    inputs = make_inputs(1, lq, m, 6, [(6, 7), (3, 3)], 4, "realistic")
    previous = torch.get_num_threads()
    try:
        torch.set_num_threads(threads)
        first, grad_out = forward_and_grads(ms_deform_attn, inputs)
        second, _ = forward_and_grads(ms_deform_attn, inputs, grad_out)
        torch.set_num_threads(1)
        single, _ = forward_and_grads(ms_deform_attn, inputs, grad_out)
    finally:
        torch.set_num_threads(previous)
    for a, b in zip(first, second):
        assert torch.equal(a, b)
    want, _ = forward_and_grads(ms_deform_attn_gather_ref, inputs, grad_out)
    for name, a, b, c in zip(NAMES, first, single, want):
        assert_close_scaled(a, c, 1e-10, name)
        assert_close_scaled(b, c, 1e-10, name)


def test_non_contiguous_inputs():
    value, shapes, starts, loc, attn = make_inputs(2, 6, 3, 4, [(3, 4), (2, 2)], 2)
    value_nc = value.transpose(2, 3).contiguous().transpose(2, 3)
    loc_nc = loc.transpose(0, 1).contiguous().transpose(0, 1)
    attn_nc = attn.transpose(3, 4).contiguous().transpose(3, 4)
    assert not (value_nc.is_contiguous() or loc_nc.is_contiguous() or attn_nc.is_contiguous())
    shapes_nc = torch.stack([shapes[:, 0], shapes[:, 1]], 1).t().contiguous().t()
    got, grad_out = forward_and_grads(ms_deform_attn, [value_nc, shapes_nc, starts, loc_nc, attn_nc])
    want, _ = forward_and_grads(ms_deform_attn, [value, shapes, starts, loc, attn], grad_out)
    for a, b in zip(got, want):
        assert torch.equal(a, b)


@pytest.mark.parametrize("n,lq", [(0, 5), (2, 0), (0, 0)])
def test_empty_batch_or_queries(n, lq):
    inputs = make_inputs(n, lq, 2, 3, [(2, 3), (1, 1)], 2)
    (out, gv, gl, ga), _ = forward_and_grads(ms_deform_attn, inputs)
    assert out.shape == (n, lq, 6)
    assert gv.shape == inputs[0].shape and (gv == 0).all()
    assert gl.shape == inputs[3].shape and ga.shape == inputs[4].shape


def test_int32_level_tables_and_mixed_location_dtype():
    value, shapes, starts, loc, attn = make_inputs(1, 5, 2, 4, [(3, 4), (2, 2)], 2)
    want = ms_deform_attn(value, shapes, starts, loc, attn)
    got = ms_deform_attn(value, shapes.int(), starts.int(), loc.float(), attn.float())
    assert got.dtype == torch.float64
    assert_close_scaled(got, ms_deform_attn_gather_ref(value, shapes, starts, loc.float().double(),
                                                       attn.float().double()), 1e-10)
    # Rounding loc and attn to float32 moves the output by at most 2^-24·max|v| through the weights (they sum to
    # one) plus, through the locations, 2·max|v| per pixel of shift and |Δloc|·(W + H) ≤ 2^-24·1.2·(W + H) pixels
    # (locations lie in [−0.2, 1.2]); a relative tolerance is wrong where the output cancels to near zero.
    bound = 2.0 ** -24 * value.abs().max().item() * (1 + 2 * 1.2 * (4 + 3))
    torch.testing.assert_close(got, want, rtol=0, atol=bound)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_input_on_cpu_is_computed_in_float32(dtype):
    value, shapes, starts, loc, attn = make_inputs(1, 9, 2, 5, [(3, 4), (2, 2)], 2, dtype=dtype)
    out = ms_deform_attn(value, shapes, starts, loc, attn)
    assert out.dtype == dtype
    want = ms_deform_attn(value.float(), shapes, starts, loc.float(), attn.float()).to(dtype)
    assert torch.equal(out, want)


def test_torch_compile_fullgraph():
    def fn(value, shapes, starts, loc, attn):
        return ms_deform_attn(value * 2.0, shapes, starts, loc.clamp(-0.5, 1.5), attn.softmax(-1)) + 1.0

    compiled = torch.compile(fn, fullgraph=True)
    inputs = make_inputs(2, 6, 2, 8, [(3, 4), (2, 2)], 2, dtype=torch.float32)
    got, grad_out = forward_and_grads(compiled, inputs)
    want, _ = forward_and_grads(fn, inputs, grad_out)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_opcheck(dtype):
    forward, backward = registered("ms_deform_attn_forward"), registered("ms_deform_attn_backward")
    value, shapes, starts, loc, attn = make_inputs(2, 5, 2, 3, [(3, 4), (2, 2)], 2, dtype=dtype)
    for t in (value, loc, attn):
        t.requires_grad_(True)
    torch.library.opcheck(forward, (value, shapes, starts, loc, attn))
    torch.library.opcheck(forward, (value.detach(), shapes, starts, loc.detach(), attn.detach()))
    grad_out = torch.randn(2, 5, 6, dtype=dtype)
    torch.library.opcheck(backward, (grad_out, value.detach(), shapes, starts, loc.detach(), attn.detach()))


def test_reference_backend_runs_the_reference():
    inputs = make_inputs(1, 4, 2, 3, [(3, 4)], 2, dtype=torch.float32)
    with dinokernels.use_backend("reference"):
        assert torch.equal(ms_deform_attn(*inputs), ms_deform_attn_ref(*inputs))


# ---------------------------------------------------------------- bad input


def _bad(**changes):
    inputs = dict(zip(("value", "spatial_shapes", "level_start_index", "sampling_locations", "attention_weights"),
                      make_inputs(1, 3, 2, 4, [(3, 4), (2, 2)], 2)))
    for key, fn in changes.items():
        inputs[key] = fn(inputs[key])
    return inputs


def _levels_table(hw):
    return levels(hw)


BAD = {
    "value not 4-D": (dict(value=lambda v: v[0]), ValueError, "'value' must be 4-D"),
    "value integer": (dict(value=lambda v: v.long()), TypeError, "'value' must have a floating-point dtype"),
    "value list": (dict(value=lambda v: v.tolist()), TypeError, "'value' must be a torch.Tensor"),
    "S mismatch": (dict(value=lambda v: v[:, :-1]), ValueError, "'value' has S=15 rows"),
    "start mismatch": (dict(level_start_index=lambda s: s + torch.tensor([0, 1])), ValueError,
                       "'level_start_index' must be the exclusive prefix sum"),
    "start length": (dict(level_start_index=lambda s: s[:1]), ValueError, "'level_start_index' must have L=2"),
    "shapes float": (dict(spatial_shapes=lambda s: s.double()), TypeError, "'spatial_shapes' must have an integer"),
    "shapes zero": (dict(spatial_shapes=lambda s: s * torch.tensor([[1, 1], [0, 1]])), ValueError,
                    "'spatial_shapes' must hold positive"),
    "shapes 3 columns": (dict(spatial_shapes=lambda s: torch.cat([s, s[:, :1]], 1)), ValueError,
                         "'spatial_shapes' must be (L, 2)"),
    "locations wrong L": (dict(sampling_locations=lambda x: x[:, :, :, :1]), ValueError,
                          "'sampling_locations' must be (N, Lq, M, L, P, 2)"),
    "locations last dim 3": (dict(sampling_locations=lambda x: torch.cat([x, x[..., :1]], -1)), ValueError,
                             "'sampling_locations' must be (N, Lq, M, L, P, 2)"),
    "weights wrong P": (dict(attention_weights=lambda a: a[..., :1]), ValueError,
                        "'attention_weights' must be (N, Lq, M, L, P)"),
    "weights wrong N": (dict(attention_weights=lambda a: torch.cat([a, a])), ValueError,
                        "'attention_weights' must be (N, Lq, M, L, P)"),
    "weights on meta": (dict(attention_weights=lambda a: a.to("meta")), ValueError,
                        "'attention_weights' must be on a CPU or CUDA device"),
    "P > 16": (dict(sampling_locations=lambda x: x.repeat(1, 1, 1, 1, 9, 1),
                    attention_weights=lambda a: a.repeat(1, 1, 1, 1, 9)), ValueError,
               "'sampling_locations' must have 1 to 16 points per level, got P=18"),
}


@pytest.mark.parametrize("case", list(BAD))
@pytest.mark.usefixtures("backend")
def test_bad_input_raises_naming_the_argument(case):
    changes, kind, message = BAD[case]
    with pytest.raises(kind, match="dinokernels.ms_deform_attn: argument " + message.replace("(", r"\(")
                       .replace(")", r"\)")):
        ms_deform_attn(**_bad(**changes))


@pytest.mark.usefixtures("backend")
def test_more_than_8_levels_raises():
    value, shapes, starts, loc, attn = make_inputs(1, 2, 1, 2, [(1, 1)] * 9, 1)
    with pytest.raises(ValueError, match="'spatial_shapes' must have 1 to 8 levels, got L=9"):
        ms_deform_attn(value, shapes, starts, loc, attn)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_widest_level_keeps_the_half_pixel_offset_and_wider_raises(dtype):
    """Issue 16: levels up to 2^24 wide were accepted, but float32 x·W − 0.5 rounds the half-pixel offset away
    beyond 2^23 (the sample lands half a pixel off). A 1 × 2^23 level: samples a quarter or half pixel past a pixel
    centre blend exactly 3:1 or 1:1 with the next pixel; one more column raises naming spatial_shapes."""
    width = 1 << 23
    value = torch.arange(width, dtype=dtype).reshape(1, width, 1, 1) % 1024
    shapes, starts = torch.tensor([[1, width]]), torch.tensor([0])
    cols = torch.tensor([5.0, 1000.0, width - 300.0, width - 2.0], dtype=torch.float64)
    frac = torch.tensor([0.25, 0.25, 0.5, 0.5], dtype=torch.float64)  # w_im = col + frac, x exact in float32
    x = (cols + 0.5 + frac) / width
    assert torch.equal(x.float().double(), x)
    loc = torch.stack([x, torch.full_like(x, 0.5)], -1).reshape(1, 4, 1, 1, 1, 2).to(dtype)
    attn = torch.ones(1, 4, 1, 1, 1, dtype=dtype)
    out = ms_deform_attn(value, shapes, starts, loc, attn)
    v = (cols.long() % 1024).double()
    expected = (1 - frac) * v + frac * ((cols.long() + 1) % 1024).double()
    assert torch.equal(out.reshape(4).double(), expected)
    wider = torch.zeros(1, width + 1, 1, 1, dtype=dtype)
    with pytest.raises(ValueError, match=r"'spatial_shapes' level 0 has \(H, W\) = \(1, 8388609\); each must be in "
                                         r"\[1, 2\^23\]"):
        ms_deform_attn(wider, torch.tensor([[1, width + 1]]), starts, loc, attn)


@pytest.mark.usefixtures("backend")
def test_level_wider_than_2_23_raises_on_every_backend():
    # Issue 16 §3: the level table's limits are the op's, so the reference refuses them too (before it samples).
    width = (1 << 23) + 1
    loc, attn = torch.full((1, 1, 1, 1, 1, 2), 0.5), torch.ones(1, 1, 1, 1, 1)
    with pytest.raises(ValueError, match=r"'spatial_shapes' level 0 has \(H, W\) = \(1, 8388609\); each must be in "
                                         r"\[1, 2\^23\]"):
        ms_deform_attn(torch.zeros(1, width, 1, 1), torch.tensor([[1, width]]), torch.tensor([0]), loc, attn)


def test_compiled_module_checks_level_table_itself():
    # The C++ entry point validates what it receives (DESIGN §1), whatever Python checked.
    from dinokernels import _ext

    value, shapes, starts, loc, attn = make_inputs(1, 2, 1, 2, [(2, 2)], 1)
    out = torch.empty(1, 2, 2, dtype=torch.float64)
    bad_starts = torch.tensor([1])
    with pytest.raises(ValueError, match="'level_start_index' must be the exclusive prefix sum"):
        _ext.module().ms_deform_attn_forward_cpu(value.data_ptr(), shapes.data_ptr(), bad_starts.data_ptr(),
                                                 loc.data_ptr(), attn.data_ptr(), 1, 1, 4, 1, 2, 2, 1, 1,
                                                 out.data_ptr(), 1)
    with pytest.raises(ValueError, match="'value' has S=5 rows but the levels hold"):
        _ext.module().ms_deform_attn_forward_cpu(value.data_ptr(), shapes.data_ptr(), starts.data_ptr(),
                                                 loc.data_ptr(), attn.data_ptr(), 1, 1, 5, 1, 2, 2, 1, 1,
                                                 out.data_ptr(), 1)


@pytest.mark.parametrize("where", ["value", "sampling_locations", "attention_weights"])
@pytest.mark.usefixtures("backend")
def test_non_finite_input_raises(where):
    value, shapes, starts, loc, attn = make_inputs(1, 4, 2, 3, [(3, 4)], 2)
    loc = loc.clamp(0.2, 0.8)  # every sample inside: a NaN value pixel reaches the output
    target = {"value": value, "sampling_locations": loc, "attention_weights": attn}[where]
    target.view(-1)[0] = float("nan")
    if where == "value":
        value[:] = float("nan")
    with pytest.raises(ValueError, match=f"argument '{where}' contains .* non-finite"):
        ms_deform_attn(value, shapes, starts, loc, attn)
    previous = _config.finite_check_setting()
    try:
        _config.set_check_finite(False)
        ms_deform_attn(value, shapes, starts, loc, attn)
    finally:
        _config.set_check_finite(previous)


# ---------------------------------------------------------------- CUDA


def _cuda_case(n, lq, m, d, hw, p, mode, dtype, location_dtype):
    inputs = make_inputs(n, lq, m, d, hw, p, mode, device="cuda")
    value, shapes, starts, loc, attn = inputs
    return [value.to(dtype), shapes.cuda(), starts.cuda(), loc.to(location_dtype), attn.to(location_dtype)]


CUDA_CASES = {
    "aligned_L4_P4": (2, 300, 8, 32, [(10, 17), (5, 9), (3, 5), (2, 3)], 4, "realistic"),
    "unaligned_D3_generic_L5": (2, 37, 3, 3, [(6, 5), (4, 4), (2, 3), (1, 2), (1, 1)], 2, "uniform"),
    "unaligned_D33_P16": (1, 19, 2, 33, [(3, 4), (2, 2)], 16, "uniform"),
    "D64_many_steps": (1, 50, 2, 64, [(5, 7), (3, 3), (2, 2), (1, 1)], 4, "uniform"),
    "D1_L1_P1": (3, 11, 2, 1, [(4, 6)], 1, "uniform"),
    "D200_generic": (1, 9, 1, 200, [(3, 3)], 3, "realistic"),
}


def _lowp_errors(dtype, location_dtype, case):
    n, lq, m, d, hw, p, mode = CUDA_CASES[case]
    inputs = _cuda_case(n, lq, m, d, hw, p, mode, dtype, location_dtype)
    got, grad_out = forward_and_grads(ms_deform_attn, inputs)
    grad_out = grad_out.to(dtype)
    inputs64 = [t.double() if t.is_floating_point() else t for t in inputs]
    want, _ = forward_and_grads(ms_deform_attn_gather_ref, inputs64, grad_out.double())
    # PyTorch's own formulation in this precision (grid_sample needs the grid in the value's dtype).
    torch_inputs = [t.to(dtype) if t.is_floating_point() else t for t in inputs]
    torch_lowp, _ = forward_and_grads(ms_deform_attn_ref, torch_inputs, grad_out)
    if location_dtype == torch.float32:  # 16-bit locations times W are exact in float32: no kink can flip
        got, want = mask_kinks(got, want, inputs[3], inputs[1])
    return got, want, torch_lowp


@pytest.mark.cuda
@pytest.mark.parametrize("case", list(CUDA_CASES))
@pytest.mark.parametrize("dtype,location_dtype", [(torch.float32, torch.float32), (torch.float16, torch.float32),
                                                  (torch.float16, torch.float16), (torch.bfloat16, torch.float32),
                                                  (torch.bfloat16, torch.bfloat16)])
def test_cuda_matches_float64_reference(case, dtype, location_dtype):
    """Against the float64 reference on the same (rounded) inputs: within 2× the error of PyTorch's own
    grid_sample formulation in that precision, plus a few output ulps."""
    got, want, torch_lowp = _lowp_errors(dtype, location_dtype, case)
    assert got[0].dtype == dtype and got[1].dtype == dtype and got[2].dtype == location_dtype
    eps = torch.finfo(dtype).eps
    for name, a, b, t in zip(NAMES, got, want, torch_lowp):
        err = (a.double() - b).abs().max().item()
        torch_err = (t.double() - b).abs().max().item()
        scale = b.abs().max().item()
        if name == "grad_sampling_locations":
            # grid_sample's location gradient differs from the kernel's on the skip boundary (ref module doc); the
            # float64 gather reference is exact, so hold the kernel to a precision-relative bound instead.
            bound = (64 if dtype == torch.float32 else 32) * eps * scale
        else:
            bound = 2 * torch_err + 4 * eps * scale
        assert err <= bound + 1e-6, f"{name}: error {err:.3e} > bound {bound:.3e} (PyTorch {torch_err:.3e})"


@pytest.mark.cuda
def test_cuda_float32_matches_cpu_kernel():
    inputs = make_inputs(2, 100, 4, 32, [(8, 10), (4, 5), (2, 3), (1, 2)], 4, "realistic", dtype=torch.float32)
    cpu, grad_out = forward_and_grads(ms_deform_attn, inputs)
    gpu, _ = forward_and_grads(ms_deform_attn, [t.cuda() for t in inputs], grad_out.cuda())
    gpu, cpu = mask_kinks([t.cpu() for t in gpu], cpu, inputs[3], inputs[1])
    for name, a, b in zip(NAMES, gpu, cpu):
        assert_close_scaled(a, b, 1e-4, name)


@pytest.mark.cuda
def test_cuda_unaligned_pointer_takes_scalar_path():
    value, shapes, starts, loc, attn = make_inputs(1, 20, 2, 32, [(4, 5), (2, 2)], 4, device="cuda",
                                                   dtype=torch.float32)
    storage = torch.cat([torch.zeros(1, device="cuda"), value.reshape(-1)]).requires_grad_(True)
    shifted = storage[1:].view_as(value)  # 4-byte offset: no 16-byte loads possible
    assert shifted.data_ptr() % 16 != 0 and shifted.is_contiguous()
    out = ms_deform_attn(shifted, shapes, starts, loc, attn)
    grad_out = torch.randn_like(out)
    (grad_storage,) = torch.autograd.grad(out, storage, grad_out)
    want, _ = forward_and_grads(ms_deform_attn, [value, shapes, starts, loc, attn], grad_out)
    assert_close_scaled(out, want[0], 1e-5, "output")
    assert_close_scaled(grad_storage[1:].view_as(value), want[1], 1e-5, "grad_value")


@pytest.mark.cuda
@pytest.mark.parametrize("n,lq", [(0, 5), (2, 0)])
def test_cuda_empty(n, lq):
    inputs = make_inputs(n, lq, 2, 8, [(2, 3), (1, 1)], 2, device="cuda", dtype=torch.float16)
    (out, gv, gl, ga), _ = forward_and_grads(ms_deform_attn, inputs)
    assert out.shape == (n, lq, 16) and out.dtype == torch.float16 and (gv == 0).all()


@pytest.mark.cuda
def test_cuda_ms_deform_attn_small_run_for_sanitizer():
    """Touches every CUDA kernel instance: forward and backward, (L, P) = (4, 4) and generic, 16-byte and scalar
    paths, float32 and 16-bit locations, group counts that leave partial warps and blocks."""
    cases = [(1, 3, 1, 8, [(3, 4), (2, 2), (1, 2), (1, 1)], 4),   # aligned fp16 (8 ch), partial warp
             (2, 5, 3, 3, [(3, 4), (2, 2), (1, 2), (1, 1)], 4),   # unaligned, specialised L, P
             (1, 7, 2, 36, [(2, 5), (1, 1)], 3),                  # aligned fp32, several steps, generic
             (1, 4, 1, 70, [(3, 3)] * 5, 16)]                     # generic, many steps, P = 16
    for dtype in CUDA_DTYPES:
        for location_dtype in {torch.float32, dtype}:
            for n, lq, m, d, hw, p in cases:
                inputs = _cuda_case(n, lq, m, d, hw, p, "uniform", dtype, location_dtype)
                (out, gv, gl, ga), _ = forward_and_grads(ms_deform_attn, inputs)
                for t in (out, gv, gl, ga):
                    assert torch.isfinite(t.float()).all()
    torch.cuda.synchronize()
