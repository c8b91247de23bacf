"""Grounding DINO's Swin backbone (dinokernels.models.grounding_dino.swin): official key layout (manifests),
parity with transformers' SwinBackbone on converted random weights (padding paths, odd merges, shifted windows),
the relative position index and drop-path schedule from their definitions, converters, backward, bad inputs."""
import json
from pathlib import Path

import pytest
import torch

from dinokernels.models.grounding_dino.swin import (
    SwinTransformer,
    relative_position_index,
    swin_b,
    swin_state_dict_from_transformers,
    swin_state_dict_to_transformers,
    swin_t,
)

transformers = pytest.importorskip("transformers")
from transformers import SwinBackbone, SwinConfig

FIXTURES = Path(__file__).resolve().parents[2] / "fixtures" / "official_keys"
PREFIX = "backbone.0."


def manifest_backbone(name):
    m = json.loads((FIXTURES / f"{name}.json").read_text())
    dtypes = m.get("dtypes", {})
    return [(k[len(PREFIX):], v, dtypes.get(k, "float32")) for k, v in m["keys"].items() if k.startswith(PREFIX)]


@pytest.mark.parametrize("name,build", [("groundingdino_swint_ogc", swin_t), ("groundingdino_swinb_cogcoor", swin_b)])
def test_state_dict_matches_official_manifest(name, build):
    expected = manifest_backbone(name)
    if build is swin_b:
        with torch.device("meta"):  # ~88M parameters: shapes are all this test needs
            model = build()
    else:
        model = build()
    got = [(k, list(v.shape), str(v.dtype).replace("torch.", "")) for k, v in model.state_dict().items()]
    assert got == expected  # names, order, shapes, dtypes
    if build is swin_t:  # a zero state dict with exactly the manifest's entries loads strictly
        zeros = {k: torch.zeros(s, dtype=getattr(torch, d)) for k, s, d in expected}
        zeros.update({k: v for k, v in model.state_dict().items() if k.endswith("relative_position_index")})
        model.load_state_dict(zeros, strict=True)


def test_swin_b_parameter_count_and_layout():
    with torch.device("meta"):
        model = swin_b()
    n = sum(p.numel() for p in model.parameters())
    expected = sum(torch.Size(s).numel() for k, s, d in manifest_backbone("groundingdino_swinb_cogcoor")
                   if d == "float32")
    assert n == expected
    assert model.out_channels == [256, 512, 1024] and model.out_strides == [8, 16, 32]
    assert model.layers[2].blocks[1].shift_size == 6 and model.layers[2].blocks[0].shift_size == 0


def test_relative_position_index_from_definition():
    for w in (1, 2, 3, 7):
        idx = relative_position_index(w)
        assert idx.shape == (w * w, w * w) and idx.dtype == torch.int64
        for q in range(w * w):
            for k in range(w * w):
                (r1, c1), (r2, c2) = divmod(q, w), divmod(k, w)
                assert idx[q, k] == (r1 - r2 + w - 1) * (2 * w - 1) + (c1 - c2 + w - 1)
    assert relative_position_index(7).max() == 13 * 13 - 1


def test_drop_path_schedule_linear():
    model = SwinTransformer(embed_dim=8, depths=(1, 2, 3, 2), num_heads=(1, 1, 2, 2), window_size=2,
                            drop_path_rate=0.35)
    probs = [getattr(b.drop_path, "drop_prob", 0.0) for layer in model.layers for b in layer.blocks]
    assert probs == pytest.approx(torch.linspace(0, 0.35, 8).tolist())
    assert probs[0] == 0.0


def tiny_pair(window=3, depths=(1, 2, 2, 2), heads=(1, 2, 2, 4), embed=8, dtype=torch.float32):
    ours = SwinTransformer(embed_dim=embed, depths=depths, num_heads=heads, window_size=window,
                           drop_path_rate=0.0).to(dtype).eval()
    with torch.no_grad():  # non-trivial norms and biases, so every mapped tensor matters
        for p in ours.parameters():
            p.normal_(0.0, 0.3)
    config = SwinConfig(embed_dim=embed, depths=list(depths), num_heads=list(heads), window_size=window,
                        out_features=["stage2", "stage3", "stage4"], drop_path_rate=0.0)
    theirs = SwinBackbone(config).to(dtype).eval()
    result = theirs.load_state_dict(swin_state_dict_to_transformers(ours.state_dict()), strict=False)
    assert result.unexpected_keys == []
    assert sorted(result.missing_keys) == ["swin.layernorm.bias", "swin.layernorm.weight"]  # unused by the backbone
    return ours, theirs


# (H, W): not multiples of patch or window (padding at every stage, odd merges), a smallest-stage map equal to the
# window (transformers' backbone still partitions and shifts there), and exact multiples (no padding).
@pytest.mark.parametrize("size", [(101, 117), (93, 70), (96, 96), (72, 144)])
def test_parity_with_transformers_swin_backbone(size):
    ours, theirs = tiny_pair()
    x = torch.randn(2, 3, *size)
    with torch.no_grad():
        a, b = ours(x), theirs(x).feature_maps
    assert len(a) == len(b) == 3
    for i, (u, v) in enumerate(zip(a, b)):
        assert u.shape == v.shape
        stride = 8 * 2 ** i
        assert u.shape[-2:] == (-(-size[0] // stride), -(-size[1] // stride))
        torch.testing.assert_close(u, v, atol=1e-5, rtol=1e-5)


def test_parity_float64_window_7():
    ours, theirs = tiny_pair(window=7, depths=(2, 2, 2, 2), heads=(1, 1, 2, 2), dtype=torch.float64)
    x = torch.randn(1, 3, 243, 257, dtype=torch.float64)  # last stage 8×9 > window: padded shifted windows
    with torch.no_grad():
        for u, v in zip(ours(x), theirs(x).feature_maps):
            torch.testing.assert_close(u, v, atol=1e-10, rtol=1e-10)


def test_converters_round_trip_with_prefixes():
    ours, theirs = tiny_pair()
    sd = {PREFIX + k: v for k, v in ours.state_dict().items()}
    sd["bert.embeddings.word_embeddings.weight"] = torch.zeros(3, 2)  # outside the prefix: ignored
    hf = swin_state_dict_to_transformers(sd, prefix=PREFIX, hf_prefix="model.backbone.conv_encoder.model.")
    assert all(k.startswith("model.backbone.conv_encoder.model.") for k in hf)
    assert not any("relative_position_index" in k for k in hf)
    back = swin_state_dict_from_transformers(hf, hf_prefix="model.backbone.conv_encoder.model.", prefix=PREFIX)
    assert set(back) == set(sd) - {"bert.embeddings.word_embeddings.weight"}
    for k, v in back.items():
        assert torch.equal(v, sd[k]), k
    # transformers' own state dict (with its unused final norm) converts into one that loads strictly
    fresh = SwinTransformer(embed_dim=8, depths=(1, 2, 2, 2), num_heads=(1, 2, 2, 4), window_size=3)
    fresh.load_state_dict(swin_state_dict_from_transformers(theirs.state_dict()), strict=True)
    q = theirs.state_dict()["swin.encoder.layers.1.blocks.1.attention.k_proj.weight"]
    assert torch.equal(fresh.layers[1].blocks[1].attn.qkv.weight[16:32], q)


def test_converters_reject_unknown_and_incomplete():
    ours, theirs = tiny_pair()
    sd = dict(ours.state_dict())
    sd["layers.0.blocks.0.attn.mystery"] = torch.zeros(1)
    with pytest.raises(KeyError, match="layers.0.blocks.0.attn.mystery"):
        swin_state_dict_to_transformers(sd)
    bad_index = dict(ours.state_dict())
    bad_index["layers.0.blocks.0.attn.relative_position_index"] = torch.zeros(9, 9, dtype=torch.long)
    with pytest.raises(ValueError, match="relative_position_index"):
        swin_state_dict_to_transformers(bad_index)
    hf = dict(theirs.state_dict())
    del hf["swin.encoder.layers.0.blocks.0.attention.v_proj.weight"]
    with pytest.raises(KeyError, match=r"lacks \['v'\]"):
        swin_state_dict_from_transformers(hf)
    with pytest.raises(KeyError, match="prefix"):
        swin_state_dict_to_transformers(ours.state_dict(), prefix="backbone.1.")
    with pytest.raises(TypeError, match="sd must be a dict"):
        swin_state_dict_from_transformers([("a", torch.zeros(1))])


def test_backward_smoke_with_drop_path_and_checkpointing():
    torch.manual_seed(0)
    model = SwinTransformer(embed_dim=8, depths=(2, 2, 2, 2), num_heads=(1, 2, 2, 4), window_size=3,
                            drop_path_rate=0.3, use_checkpoint=True).train()
    x = torch.randn(3, 3, 50, 61, requires_grad=True)
    outs = model(x)
    sum(o.square().mean() for o in outs).backward()
    assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    # eval is deterministic and checkpointing does not change the forward
    model.eval()
    with torch.no_grad():
        a, b = model(x), model(x)
    for u, v in zip(a, b):
        assert torch.equal(u, v)


def test_small_and_tiny_inputs():
    model = SwinTransformer(embed_dim=8, depths=(1, 1, 1, 1), num_heads=(1, 1, 1, 1), window_size=7).eval()
    with torch.no_grad():
        for size in ((4, 4), (1, 1), (5, 33)):
            outs = model(torch.randn(1, 3, *size))
            assert [tuple(o.shape[1:]) for o in outs] == [
                (16, -(-size[0] // 8), -(-size[1] // 8)), (32, -(-size[0] // 16), -(-size[1] // 16)),
                (64, -(-size[0] // 32), -(-size[1] // 32))]
            assert all(torch.isfinite(o).all() for o in outs)


def test_batch_items_independent():
    model = SwinTransformer(embed_dim=8, depths=(1, 2, 1, 1), num_heads=(1, 1, 1, 1), window_size=3).eval()
    x = torch.randn(3, 3, 40, 52)
    with torch.no_grad():
        full = model(x)
        single = model(x[1:2])
    for u, v in zip(full, single):
        torch.testing.assert_close(u[1:2], v, atol=1e-6, rtol=1e-5)


def test_bad_inputs_and_arguments():
    model = SwinTransformer(embed_dim=8, depths=(1, 1), num_heads=(1, 1), window_size=3, out_indices=(0, 1))
    with pytest.raises(ValueError, match=r"x must be \(B, 3, H, W\)"):
        model(torch.randn(3, 16, 16))
    with pytest.raises(ValueError, match=r"x must be \(B, 3, H, W\)"):
        model(torch.randn(1, 4, 16, 16))
    with pytest.raises(ValueError, match="floating point"):
        model(torch.zeros(1, 3, 16, 16, dtype=torch.long))
    with pytest.raises(ValueError, match="non-empty batch"):
        model(torch.zeros(0, 3, 16, 16))
    with pytest.raises(ValueError, match="NaN or inf"):
        model(torch.full((1, 3, 16, 16), float("nan")))
    with pytest.raises(ValueError, match="float64"):
        model(torch.zeros(1, 3, 16, 16, dtype=torch.float64))
    with pytest.raises(TypeError, match="x must be a tensor"):
        model([[1.0]])
    with pytest.raises(ValueError, match="out_indices"):
        SwinTransformer(depths=(2, 2), num_heads=(3, 6), out_indices=(1, 2))
    with pytest.raises(ValueError, match="equal length"):
        SwinTransformer(depths=(2, 2, 6), num_heads=(3, 6))
    with pytest.raises(ValueError, match="not divisible"):
        SwinTransformer(embed_dim=10, depths=(1,), num_heads=(3,), out_indices=(0,))
    assert [o.shape[1] for o in model(torch.randn(1, 3, 16, 16))] == [8, 16]
    assert hasattr(model, "norm0") and hasattr(model, "norm1")
