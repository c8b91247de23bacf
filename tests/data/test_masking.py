"""iBOT block masking and the DINOv2 collate against SPEC §3.6: counts, shapes, ratio bands, upper bound, weights,
rectangle geometry, determinism."""
import pytest
import torch

from dinokernels.data.masking import BlockMaskGenerator, collate_ibot, ibot_masks


def test_generator_never_exceeds_and_usually_reaches_the_target():
    g = torch.Generator().manual_seed(0)
    gen = BlockMaskGenerator(16, 16, max_num_patches=128)
    reached = 0
    for target in range(0, 129, 4):
        m = gen(target, g)
        assert m.shape == (16, 16) and m.dtype == torch.bool
        assert int(m.sum()) <= target
        reached += int(m.sum()) >= 0.75 * target
    assert reached >= 30  # 33 targets; the early stop makes shortfalls rare but possible
    assert int(gen(0, g).sum()) == 0


def test_a_single_block_is_a_rectangle_with_bounded_aspect():
    g = torch.Generator().manual_seed(1)
    gen = BlockMaskGenerator(20, 20)
    for _ in range(200):
        m = torch.zeros(20, 20, dtype=torch.bool)
        added = gen._add_block(m, 40, g)
        if added == 0:
            continue
        rows = m.any(1).nonzero().flatten()
        cols = m.any(0).nonzero().flatten()
        h, w = int(rows[-1] - rows[0] + 1), int(cols[-1] - cols[0] + 1)
        assert int(m.sum()) == h * w == added <= 40  # one filled rectangle
        assert h < 20 and w < 20  # strictly inside the grid
        # h·w ≈ area ∈ [4, 40] and h/w ≈ aspect ∈ [0.3, 1/0.3] up to the rounding of each side
        assert (h - 0.5) / (w + 0.5) <= 1 / 0.3 and (h + 0.5) / (w - 0.5 if w > 0.5 else 1e-9) >= 0.3


def test_collate_statistics():
    B, n_tokens = 32, 16 * 16
    g = torch.Generator().manual_seed(2)
    globals_ = [torch.randn(B, 3, 224, 224), torch.randn(B, 3, 224, 224)]
    locals_ = [torch.randn(B, 3, 98, 98) for _ in range(3)]
    out = collate_ibot(globals_, locals_, patch_size=14, generator=g, dtype=torch.float16)
    masks = out["collated_masks"]
    assert masks.shape == (2 * B, n_tokens) and out["collated_global_crops"].dtype == torch.float16
    assert out["collated_local_crops"].shape == (3 * B, 3, 98, 98)
    counts = masks.sum(-1)
    n_masked_images = int((counts > 0).sum())
    assert n_masked_images <= int(2 * B * 0.5) == 32  # ⌊2B·0.5⌋ images are asked for masks
    assert n_masked_images >= 30  # a request can come out empty only when its rectangles all fail
    bounds = torch.linspace(0.1, 0.5, 33)
    assert out["upperbound"] == sum(int(n_tokens * b) for b in bounds[1:].tolist())
    assert int(counts.sum()) <= out["upperbound"]
    assert int(counts.max()) <= int(n_tokens * 0.5)
    # requests are spread over the ratio bands 0.1 … 0.5: the realised ratios cover the range
    ratios = sorted((counts[counts > 0].float() / n_tokens).tolist())
    assert ratios[0] < 0.15 and ratios[-1] > 0.4
    # flat indices and per-token weights 1/n_i of the token's own image
    assert torch.equal(out["mask_indices_list"], masks.flatten().nonzero().flatten())
    image_of = out["mask_indices_list"] // n_tokens
    torch.testing.assert_close(out["masks_weight"], 1.0 / counts[image_of].float())
    assert int(out["n_masked_patches"]) == int(counts.sum())
    torch.testing.assert_close(out["masks_weight"].sum(), torch.tensor(float(n_masked_images)))
    # shuffled: masked images are not simply the first half
    assert (counts[:B] > 0).sum() not in (0, B) or (counts[B:] > 0).sum() not in (0, B)


def test_deterministic_and_validated():
    a, ua = ibot_masks(8, 6, 7, generator=torch.Generator().manual_seed(5))
    b, ub = ibot_masks(8, 6, 7, generator=torch.Generator().manual_seed(5))
    assert torch.equal(a, b) and ua == ub and a.shape == (8, 42)
    with pytest.raises(ValueError, match="mask_probability"):
        ibot_masks(4, 4, 4, mask_probability=1.5)
    with pytest.raises(ValueError, match="mask_ratio"):
        ibot_masks(4, 4, 4, mask_ratio=(0.6, 0.2))
    with pytest.raises(ValueError, match="multiples of the patch size"):
        collate_ibot([torch.zeros(1, 3, 30, 28)], [], patch_size=14)
    with pytest.raises(ValueError, match="grid"):
        BlockMaskGenerator(0, 3)
    empty = collate_ibot([torch.zeros(2, 3, 28, 28)], [], patch_size=14, mask_probability=0.0)
    assert empty["mask_indices_list"].numel() == 0 and empty["upperbound"] == 0
    assert empty["collated_local_crops"].shape == (0, 3, 28, 28)
