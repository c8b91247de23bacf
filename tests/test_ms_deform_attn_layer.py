"""dinokernels.layers.MSDeformAttn against the official Deformable-DETR module (written out below, with the
official pure-PyTorch core in place of the CUDA function): parameter names and shapes, initialisation, outputs and
gradients for point and box references, the value padding mask."""
import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dinokernels.layers import MSDeformAttn
from dinokernels.ops import ms_deform_attn_ref


class OfficialMSDeformAttn(nn.Module):
    """fundamentalvision/Deformable-DETR models/ops/modules/ms_deform_attn.py, with MSDeformAttnFunction replaced by
    ms_deform_attn_core_pytorch (ms_deform_attn_ref) and the power-of-2 warning dropped."""

    def __init__(self, d_model=256, n_levels=4, n_heads=8, n_points=4):
        super().__init__()
        self.im2col_step = 64
        self.d_model = d_model
        self.n_levels = n_levels
        self.n_heads = n_heads
        self.n_points = n_points
        self.sampling_offsets = nn.Linear(d_model, n_heads * n_levels * n_points * 2)
        self.attention_weights = nn.Linear(d_model, n_heads * n_levels * n_points)
        self.value_proj = nn.Linear(d_model, d_model)
        self.output_proj = nn.Linear(d_model, d_model)
        self._reset_parameters()

    def _reset_parameters(self):
        nn.init.constant_(self.sampling_offsets.weight.data, 0.)
        thetas = torch.arange(self.n_heads, dtype=torch.float32) * (2.0 * math.pi / self.n_heads)
        grid_init = torch.stack([thetas.cos(), thetas.sin()], -1)
        grid_init = (grid_init / grid_init.abs().max(-1, keepdim=True)[0]).view(self.n_heads, 1, 1, 2).repeat(
            1, self.n_levels, self.n_points, 1)
        for i in range(self.n_points):
            grid_init[:, :, i, :] *= i + 1
        with torch.no_grad():
            self.sampling_offsets.bias = nn.Parameter(grid_init.view(-1))
        nn.init.constant_(self.attention_weights.weight.data, 0.)
        nn.init.constant_(self.attention_weights.bias.data, 0.)
        nn.init.xavier_uniform_(self.value_proj.weight.data)
        nn.init.constant_(self.value_proj.bias.data, 0.)
        nn.init.xavier_uniform_(self.output_proj.weight.data)
        nn.init.constant_(self.output_proj.bias.data, 0.)

    def forward(self, query, reference_points, input_flatten, input_spatial_shapes, input_level_start_index,
                input_padding_mask=None):
        N, Len_q, _ = query.shape
        N, Len_in, _ = input_flatten.shape
        assert (input_spatial_shapes[:, 0] * input_spatial_shapes[:, 1]).sum() == Len_in
        value = self.value_proj(input_flatten)
        if input_padding_mask is not None:
            value = value.masked_fill(input_padding_mask[..., None], float(0))
        value = value.view(N, Len_in, self.n_heads, self.d_model // self.n_heads)
        sampling_offsets = self.sampling_offsets(query).view(N, Len_q, self.n_heads, self.n_levels, self.n_points, 2)
        attention_weights = self.attention_weights(query).view(N, Len_q, self.n_heads, self.n_levels * self.n_points)
        attention_weights = F.softmax(attention_weights, -1).view(N, Len_q, self.n_heads, self.n_levels,
                                                                  self.n_points)
        if reference_points.shape[-1] == 2:
            offset_normalizer = torch.stack([input_spatial_shapes[..., 1], input_spatial_shapes[..., 0]], -1)
            sampling_locations = reference_points[:, :, None, :, None, :] \
                + sampling_offsets / offset_normalizer[None, None, None, :, None, :]
        elif reference_points.shape[-1] == 4:
            sampling_locations = reference_points[:, :, None, :, None, :2] \
                + sampling_offsets / self.n_points * reference_points[:, :, None, :, None, 2:] * 0.5
        else:
            raise ValueError(
                'Last dim of reference_points must be 2 or 4, but get {} instead.'.format(reference_points.shape[-1]))
        output = ms_deform_attn_ref(value, input_spatial_shapes, input_level_start_index, sampling_locations,
                                    attention_weights)
        output = self.output_proj(output)
        return output


HW = [(6, 9), (3, 5), (2, 3), (1, 1)]


def level_tables(hw=HW):
    shapes = torch.tensor(hw, dtype=torch.int64)
    sizes = shapes[:, 0] * shapes[:, 1]
    return shapes, torch.cumsum(sizes, 0) - sizes


def perturbed_pair(d_model=32, n_levels=4, n_heads=4, n_points=3, dtype=torch.float64):
    """Our module and the official one with the same random (non-initial) weights, so attention is not uniform
    and offsets depend on the query."""
    ours = MSDeformAttn(d_model, n_levels, n_heads, n_points).to(dtype)
    with torch.no_grad():
        for p in ours.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    official = OfficialMSDeformAttn(d_model, n_levels, n_heads, n_points).to(dtype)
    official.load_state_dict(ours.state_dict(), strict=True)
    return ours, official


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
    ours, official = MSDeformAttn(), OfficialMSDeformAttn()
    mine = {k: tuple(v.shape) for k, v in ours.state_dict().items()}
    theirs = {k: tuple(v.shape) for k, v in official.state_dict().items()}
    assert mine == theirs
    assert list(mine) == list(theirs)
    assert mine["sampling_offsets.weight"] == (256, 256) and mine["sampling_offsets.bias"] == (256,)
    assert mine["attention_weights.weight"] == (128, 256)
    assert (ours.d_model, ours.n_levels, ours.n_heads, ours.n_points, ours.im2col_step) == (256, 4, 8, 4, 64)
    ours.load_state_dict(official.state_dict(), strict=True)


def test_initialisation_matches_official():
    ours, official = MSDeformAttn(256, 4, 8, 4), OfficialMSDeformAttn(256, 4, 8, 4)
    torch.testing.assert_close(ours.sampling_offsets.bias, official.sampling_offsets.bias, rtol=0, atol=0)
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
def test_matches_official_module(ref_dim, masked):
    ours, official = perturbed_pair()
    query, ref, flat, shapes, starts = inputs(ref_dim=ref_dim)
    mask = torch.rand(flat.shape[:2]) < 0.3 if masked else None
    query.requires_grad_(True)
    flat.requires_grad_(True)
    out = ours(query, ref, flat, shapes, starts, mask)
    want = official(query, ref, flat, shapes, starts, mask)
    torch.testing.assert_close(out, want, rtol=1e-9, atol=1e-10)
    g = torch.randn_like(out)
    got_grads = torch.autograd.grad(out, [query, flat, *ours.parameters()], g)
    want_grads = torch.autograd.grad(want, [query, flat, *official.parameters()], g)
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
