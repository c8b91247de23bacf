"""dinokernels.layers.MSDeformAttn against a reference module written here from SPEC §4.3 (locations from reference
points plus offsets, softmax over the L·P samples of each head, the grid_sample core ms_deform_attn_ref): parameter
names and shapes, the published initialisation, outputs and gradients for point and box references, the value
padding mask."""
import math
import warnings

import pytest
import torch
from torch import nn

from dinokernels.layers import MSDeformAttn
from dinokernels.ops import ms_deform_attn_ref

def official_state_shapes(d_model=256, n_levels=4, n_heads=8, n_points=4):
    """The published module's state dict, in registration order: SPEC §4.3's layers, C = d_model, M·L·P samples."""
    samples = n_heads * n_levels * n_points
    return {"sampling_offsets.weight": (samples * 2, d_model), "sampling_offsets.bias": (samples * 2,),
            "attention_weights.weight": (samples, d_model), "attention_weights.bias": (samples,),
            "value_proj.weight": (d_model, d_model), "value_proj.bias": (d_model,),
            "output_proj.weight": (d_model, d_model), "output_proj.bias": (d_model,)}


def official_offset_bias(n_heads, n_levels, n_points):
    """The published sampling-offset bias (SPEC §4.3), (M·L·P·2,) float32: head m points along θ_m = 2πm/M,
    scaled so that its larger |component| is 1, times (i + 1) for point i, the same on every level. The published
    initialisation evaluates it in float32 (θ_m = m·float32(2π/M), cos and sin in float32), which sets the last
    bits, e.g. cos θ ≈ −4.4e-8 rather than 0 at θ = π/2."""
    theta = torch.arange(n_heads, dtype=torch.float32) * (2.0 * math.pi / n_heads)
    direction = torch.stack((torch.cos(theta), torch.sin(theta)), dim=1)  # (M, 2)
    direction = direction / direction.abs().amax(dim=1, keepdim=True)
    scale = torch.arange(1, n_points + 1, dtype=torch.float32)  # (P,)
    bias = direction[:, None, None, :] * scale[None, None, :, None]  # (M, 1, P, 2)
    return bias.expand(n_heads, n_levels, n_points, 2).reshape(-1)


class ReferenceMSDeformAttn(nn.Module):
    """SPEC §4.3's module, written here (weights are loaded from the module under test): value_proj with padded
    positions zeroed → (N, S, M, D); per query the offsets (M, L, P, 2) and the attention logits, softmaxed over
    the L·P samples of each head; locations ref + offset/(W_l, H_l) for points, ref_xy + offset/P·ref_wh·0.5 for
    boxes; ms_deform_attn_ref; output_proj."""

    def __init__(self, d_model, n_levels, n_heads, n_points):
        super().__init__()
        self.shape = (n_heads, n_levels, n_points)
        samples = n_heads * n_levels * n_points
        self.sampling_offsets = nn.Linear(d_model, samples * 2)
        self.attention_weights = nn.Linear(d_model, samples)
        self.value_proj = nn.Linear(d_model, d_model)
        self.output_proj = nn.Linear(d_model, d_model)

    def forward(self, query, reference_points, input_flatten, input_spatial_shapes, input_level_start_index,
                input_padding_mask=None):
        m, levels, points = self.shape
        n, lq, c = query.shape
        value = self.value_proj(input_flatten)
        if input_padding_mask is not None:
            value = torch.where(input_padding_mask[..., None], torch.zeros_like(value), value)
        value = value.reshape(n, -1, m, c // m)
        offsets = self.sampling_offsets(query).reshape(n, lq, m, levels, points, 2)
        logits = self.attention_weights(query).reshape(n, lq, m, levels * points)
        weights = torch.softmax(logits, dim=-1).reshape(n, lq, m, levels, points)
        ref = reference_points[:, :, None, :, None, :]  # (N, Lq, 1, L, 1, 2 or 4)
        if reference_points.shape[-1] == 2:
            width_height = input_spatial_shapes.flip(-1).to(query.dtype)  # (L, 2) = (W_l, H_l)
            locations = ref + offsets / width_height[:, None, :]
        else:
            locations = ref[..., :2] + offsets * ref[..., 2:] * (0.5 / points)
        out = ms_deform_attn_ref(value, input_spatial_shapes, input_level_start_index, locations, weights)
        return self.output_proj(out)


HW = [(6, 9), (3, 5), (2, 3), (1, 1)]


def level_tables(hw=HW):
    shapes = torch.tensor(hw, dtype=torch.int64)
    sizes = shapes[:, 0] * shapes[:, 1]
    return shapes, torch.cumsum(sizes, 0) - sizes


def perturbed_pair(d_model=32, n_levels=4, n_heads=4, n_points=3, dtype=torch.float64):
    """Our module and the reference with the same random (non-initial) weights, so attention is not uniform
    and offsets depend on the query."""
    ours = MSDeformAttn(d_model, n_levels, n_heads, n_points).to(dtype)
    with torch.no_grad():
        for p in ours.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    reference = ReferenceMSDeformAttn(d_model, n_levels, n_heads, n_points).to(dtype)
    reference.load_state_dict(ours.state_dict(), strict=True)
    return ours, reference


def inputs(n=2, lq=11, d_model=32, ref_dim=2, dtype=torch.float64, hw=HW):
    shapes, starts = level_tables(hw)
    s = int((shapes[:, 0] * shapes[:, 1]).sum())
    query = torch.randn(n, lq, d_model, dtype=dtype)
    flat = torch.randn(n, s, d_model, dtype=dtype)
    ref = torch.rand(n, lq, len(hw), ref_dim, dtype=dtype)
    if ref_dim == 4:
        ref[..., 2:] = ref[..., 2:] * 0.5 + 0.05
    return query, ref, flat, shapes, starts


def test_parameter_names_shapes_and_defaults_match_official():
    ours = MSDeformAttn()
    mine = {k: tuple(v.shape) for k, v in ours.state_dict().items()}
    theirs = official_state_shapes()
    assert mine == theirs
    assert list(mine) == list(theirs)
    small = MSDeformAttn(32, 4, 4, 3)
    assert {k: tuple(v.shape) for k, v in small.state_dict().items()} == official_state_shapes(32, 4, 4, 3)
    assert mine["sampling_offsets.weight"] == (256, 256) and mine["sampling_offsets.bias"] == (256,)
    assert mine["attention_weights.weight"] == (128, 256)
    assert (ours.d_model, ours.n_levels, ours.n_heads, ours.n_points, ours.im2col_step) == (256, 4, 8, 4, 64)
    ours.load_state_dict({k: torch.zeros(v) for k, v in theirs.items()}, strict=True)


@pytest.mark.parametrize("n_heads,n_levels,n_points", [(8, 4, 4), (4, 4, 3), (6, 2, 5), (3, 1, 1)])
def test_initialisation_matches_official(n_heads, n_levels, n_points):
    ours = MSDeformAttn(8 * n_heads, n_levels, n_heads, n_points)
    torch.testing.assert_close(ours.sampling_offsets.bias, official_offset_bias(n_heads, n_levels, n_points),
                               rtol=0, atol=0)


def test_initialisation_values():
    ours = MSDeformAttn(256, 4, 8, 4)
    bias = ours.sampling_offsets.bias.view(8, 4, 4, 2)
    # Head m points along θ_m = 2πm/8, scaled so the larger |component| is 1, times (point index + 1).
    directions = torch.tensor([[1, 0], [1, 1], [0, 1], [-1, 1], [-1, 0], [-1, -1], [0, -1], [1, -1]],
                              dtype=torch.float32)
    for i in range(4):
        torch.testing.assert_close(bias[:, 2, i], directions * (i + 1), atol=1e-5, rtol=0)
    assert (ours.sampling_offsets.weight == 0).all()
    assert (ours.attention_weights.weight == 0).all() and (ours.attention_weights.bias == 0).all()
    for lin in (ours.value_proj, ours.output_proj):
        bound = math.sqrt(6 / (lin.in_features + lin.out_features))
        assert (lin.bias == 0).all() and lin.weight.abs().max() <= bound
        assert lin.weight.std().item() == pytest.approx(bound / math.sqrt(3), rel=0.05)


@pytest.mark.parametrize("ref_dim", [2, 4])
@pytest.mark.parametrize("masked", [False, True])
def test_matches_reference_module(ref_dim, masked):
    ours, reference = perturbed_pair()
    query, ref, flat, shapes, starts = inputs(ref_dim=ref_dim)
    mask = torch.rand(flat.shape[:2]) < 0.3 if masked else None
    query.requires_grad_(True)
    flat.requires_grad_(True)
    out = ours(query, ref, flat, shapes, starts, mask)
    want = reference(query, ref, flat, shapes, starts, mask)
    torch.testing.assert_close(out, want, rtol=1e-9, atol=1e-10)
    g = torch.randn_like(out)
    got_grads = torch.autograd.grad(out, [query, flat, *ours.parameters()], g)
    want_grads = torch.autograd.grad(want, [query, flat, *reference.parameters()], g)
    for a, b in zip(got_grads, want_grads):
        torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-9)


def test_float32_module_matches_float64():
    ours, _ = perturbed_pair(dtype=torch.float32)
    ours64 = MSDeformAttn(32, 4, 4, 3).double()
    ours64.load_state_dict({k: v.double() for k, v in ours.state_dict().items()})
    query, ref, flat, shapes, starts = inputs(dtype=torch.float64)
    out = ours(query.float(), ref.float(), flat.float(), shapes, starts)
    torch.testing.assert_close(out.double(), ours64(query, ref, flat, shapes, starts), rtol=1e-4, atol=1e-5)


def test_padding_mask_removes_padded_positions():
    ours, _ = perturbed_pair()
    query, ref, flat, shapes, starts = inputs()
    mask = torch.zeros(flat.shape[:2], dtype=torch.bool)
    mask[0, 20:] = True
    mask[1, ::3] = True
    out = ours(query, ref, flat, shapes, starts, mask)
    changed = flat.clone()
    changed[mask] = torch.randn_like(changed[mask]) * 100
    torch.testing.assert_close(ours(query, ref, changed, shapes, starts, mask), out, rtol=0, atol=0)
    # And the mask does matter: the unmasked module sees the changed values.
    assert (ours(query, ref, changed, shapes, starts) - out).abs().max() > 1e-3


def test_box_references_equal_point_references_with_matching_size():
    # With wh = 2P/(W_l, H_l), the box rule offset/P·wh·0.5 is the point rule offset/(W_l, H_l).
    ours, _ = perturbed_pair()
    query, ref, flat, shapes, starts = inputs()
    wh = 2 * ours.n_points / torch.stack([shapes[:, 1], shapes[:, 0]], -1).double()
    boxes = torch.cat([ref, wh.expand(*ref.shape[:2], -1, -1)], -1)
    torch.testing.assert_close(ours(query, boxes, flat, shapes, starts), ours(query, ref, flat, shapes, starts),
                               rtol=1e-12, atol=1e-12)


def test_constructor_checks_and_warning():
    with pytest.raises(ValueError, match="divisible by n_heads"):
        MSDeformAttn(30, 4, 8, 4)
    with pytest.warns(UserWarning, match="power of 2"):
        MSDeformAttn(24, 4, 8, 4)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        MSDeformAttn(64, 4, 8, 4)
    ours, _ = perturbed_pair()
    query, ref, flat, shapes, starts = inputs(ref_dim=4)
    with pytest.raises(ValueError, match="must be 2 or 4"):
        ours(query, ref[..., :3], flat, shapes, starts)


def test_torch_compile_fullgraph_matches_eager():
    ours, _ = perturbed_pair(dtype=torch.float32)
    query, ref, flat, shapes, starts = inputs(dtype=torch.float32)
    compiled = torch.compile(ours, fullgraph=True)
    torch.testing.assert_close(compiled(query, ref, flat, shapes, starts), ours(query, ref, flat, shapes, starts))
