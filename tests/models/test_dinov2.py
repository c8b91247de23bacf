"""DINOv2 backbone: official layouts (all eight hub manifests, block chunks, training checkpoints), token order and
masking semantics, position-embedding interpolation, and parity with transformers' Dinov2Model /
Dinov2WithRegistersModel in both conversion directions."""
import json
import os

import pytest
import torch
import torch.nn.functional as F

from dinokernels.layers import Block, LayerScale, SwiGLUFFN, swiglu_hidden_features
from dinokernels.models import dinov2
from dinokernels.models.dinov2 import (HUB_MODELS, DinoVisionTransformer, from_transformers, load_official_weights,
                                       state_dict_from_transformers, state_dict_to_transformers, to_transformers)

MANIFESTS = os.path.join(os.path.dirname(__file__), "..", "fixtures", "official_keys")
transformers = pytest.importorskip("transformers")


def manifest(name):
    with open(os.path.join(MANIFESTS, f"{name}.json")) as f:
        return json.load(f)["keys"]


def tiny(**kw):
    args = dict(img_size=56, patch_size=14, embed_dim=32, depth=4, num_heads=2, init_values=1.0, block_chunks=0)
    args.update(kw)
    return DinoVisionTransformer(**args).eval()


def randomise(model, std=0.3, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * std)
    return model


# ---- layouts --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", sorted(HUB_MODELS))
def test_hub_builders_match_the_official_manifests(name):
    with torch.device("meta"):  # ViT-g has 1.1 B parameters: shapes only
        model = HUB_MODELS[name]()
    expected = manifest(name)
    sd = model.state_dict()
    assert list(sd) == list(expected)  # same keys, same order
    assert {k: list(v.shape) for k, v in sd.items()} == expected


@pytest.mark.parametrize("name", sorted(HUB_MODELS))
def test_official_layouts_load_strictly(name):
    with torch.device("meta"):
        model = HUB_MODELS[name]()
        fake = {k: torch.empty(shape) for k, shape in manifest(name).items()}
    report = load_official_weights(model, fake)
    assert len(report["loaded"]) == len(fake) and report["ignored"] == []
    fake.popitem()
    with pytest.raises(ValueError, match="missing keys \\(1\\)"):
        load_official_weights(model, fake)


def test_real_values_load_and_chunked_layouts_round_trip(tmp_path):
    flat = randomise(tiny())
    chunked = tiny(block_chunks=2)
    keys = list(chunked.state_dict())
    assert "blocks.0.0.norm1.weight" in keys and "blocks.1.2.norm1.weight" in keys  # global indices kept
    assert not any(k.startswith("blocks.1.0.") for k in keys)  # identity padding has no parameters
    load_official_weights(chunked, flat.state_dict())
    x = torch.randn(2, 3, 56, 42)
    with torch.no_grad():
        a, b = flat.forward_features(x), chunked.forward_features(x)
    torch.testing.assert_close(a["x_prenorm"], b["x_prenorm"], rtol=0, atol=0)
    back = tiny()
    path = tmp_path / "chunked.pth"
    torch.save(chunked.state_dict(), path)
    load_official_weights(back, path)
    for k, v in flat.state_dict().items():
        assert torch.equal(back.state_dict()[k], v)
    assert [len(c) for c in chunked.blocks] == [2, 4]
    torch.testing.assert_close(chunked.get_intermediate_layers(x, 2)[1], flat.get_intermediate_layers(x, 2)[1])


def test_training_checkpoint_teacher_backbone(tmp_path):
    src = randomise(tiny())
    teacher = {f"backbone.{k}": v for k, v in src.state_dict().items()}
    teacher["dino_head.mlp.0.weight"] = torch.zeros(3, 3)
    teacher["ibot_head.last_layer.weight_g"] = torch.zeros(3, 1)
    path = tmp_path / "teacher_checkpoint.pth"
    torch.save({"teacher": {f"module.{k}": v for k, v in teacher.items()}}, path)
    model = tiny()
    report = load_official_weights(model, path)
    assert sorted(report["ignored"]) == ["module.dino_head.mlp.0.weight", "module.ibot_head.last_layer.weight_g"]
    for k, v in src.state_dict().items():
        assert torch.equal(model.state_dict()[k], v)


def test_bad_checkpoints_are_named(tmp_path):
    model = tiny()
    sd = dict(randomise(tiny()).state_dict())
    sd["blocks.0.attn.qkv.weight"] = torch.zeros(5, 5)
    sd["head.weight"] = torch.zeros(1)
    del sd["norm.bias"]
    with pytest.raises(ValueError) as e:
        load_official_weights(model, sd)
    msg = str(e.value)
    assert "missing keys (1): norm.bias" in msg and "unexpected keys (1): head.weight" in msg
    assert "blocks.0.attn.qkv.weight: checkpoint (5, 5) vs model (96, 32)" in msg
    report = load_official_weights(model, sd, strict=False)
    assert report["missing"] == ["norm.bias"] and report["unexpected"] == ["head.weight"]
    with pytest.raises(FileNotFoundError, match="no such file"):
        load_official_weights(model, tmp_path / "nope.pth")
    (tmp_path / "empty.pth").write_bytes(b"")
    with pytest.raises(ValueError, match="is empty"):
        load_official_weights(model, tmp_path / "empty.pth")
    (tmp_path / "junk.pth").write_bytes(os.urandom(256))
    with pytest.raises(ValueError, match="not a readable PyTorch checkpoint"):
        load_official_weights(model, tmp_path / "junk.pth")
    good = tmp_path / "good.pth"
    torch.save(randomise(tiny()).state_dict(), good)
    (tmp_path / "truncated.pth").write_bytes(good.read_bytes()[:500])
    with pytest.raises(ValueError, match="not a readable PyTorch checkpoint"):
        load_official_weights(model, tmp_path / "truncated.pth")
    with pytest.raises(ValueError, match="not a state dict"):
        load_official_weights(model, {1: torch.zeros(1)})


# ---- the model ------------------------------------------------------------------------------------------------

def test_token_order_registers_and_mask_token():
    m = randomise(tiny(num_register_tokens=3, depth=1))
    x = torch.randn(2, 3, 28, 42)
    masks = torch.zeros(2, 6, dtype=torch.bool)
    masks[0, 4] = True
    tokens = m.prepare_tokens_with_masks(x, masks)
    assert tokens.shape == (2, 1 + 3 + 6, 32)
    pos = m.interpolate_pos_encoding(torch.zeros(1, 7, 32), 28, 42)  # (1, 1 + 6, D)
    torch.testing.assert_close(tokens[:, 0], (m.cls_token[0] + pos[:, 0]).expand(2, -1))
    torch.testing.assert_close(tokens[:, 1:4], m.register_tokens.expand(2, -1, -1))  # no position embedding
    torch.testing.assert_close(tokens[0, 4 + 4], m.mask_token[0] + pos[0, 1 + 4])  # replaced before pos-embed
    patches = m.patch_embed(x)
    torch.testing.assert_close(tokens[1, 4:], patches[1] + pos[0, 1:])
    out = m.forward_features(x, masks)
    assert out["x_norm_clstoken"].shape == (2, 32) and out["x_norm_regtokens"].shape == (2, 3, 32)
    assert out["x_norm_patchtokens"].shape == (2, 6, 32) and out["x_prenorm"].shape == (2, 10, 32)
    assert out["masks"] is masks
    torch.testing.assert_close(out["x_norm_clstoken"], m.norm(out["x_prenorm"])[:, 0])
    torch.testing.assert_close(m(x), m.forward_features(x)["x_norm_clstoken"])  # forward: the normed CLS
    assert not torch.allclose(m(x)[0], out["x_norm_clstoken"][0])  # image 0 had a masked patch
    crops = m.forward_features([torch.randn(2, 3, 28, 28), torch.randn(2, 3, 14, 14)])
    assert [c["x_norm_patchtokens"].shape[1] for c in crops] == [4, 1]


def test_interpolation_semantics():
    m = randomise(tiny(img_size=70, interpolate_offset=0.1))  # a 5 × 5 stored grid
    grid = m.pos_embed[:, 1:].reshape(1, 5, 5, 32).permute(0, 3, 1, 2)
    got = m.interpolate_pos_encoding(torch.zeros(1, 1 + 3 * 7, 32), 42, 98)[:, 1:]
    want = F.interpolate(grid, scale_factor=(3.1 / 5, 7.1 / 5), mode="bicubic").permute(0, 2, 3, 1).reshape(1, -1, 32)
    torch.testing.assert_close(got, want)
    m.interpolate_offset, m.interpolate_antialias = 0.0, True  # the _reg models
    got = m.interpolate_pos_encoding(torch.zeros(1, 1 + 3 * 7, 32), 42, 98)[:, 1:]
    want = F.interpolate(grid, size=(3, 7), mode="bicubic", antialias=True).permute(0, 2, 3, 1).reshape(1, -1, 32)
    torch.testing.assert_close(got, want)
    assert m.interpolate_pos_encoding(torch.zeros(1, 26, 32), 70, 70) is not None  # native size: stored table
    torch.testing.assert_close(m.interpolate_pos_encoding(torch.zeros(1, 26, 32), 70, 70), m.pos_embed)


def test_intermediate_layers_and_errors():
    m = randomise(tiny(num_register_tokens=2))
    x = torch.randn(2, 3, 42, 28)
    outs = m.get_intermediate_layers(x, n=2, reshape=True, return_class_token=True)
    assert len(outs) == 2 and outs[0][0].shape == (2, 32, 3, 2) and outs[0][1].shape == (2, 32)
    last = m.get_intermediate_layers(x, n=[3], norm=True)[0]
    torch.testing.assert_close(last, m.forward_features(x)["x_norm_patchtokens"])
    with pytest.raises(ValueError, match="not a multiple of the patch size 14; resize or crop to multiples of 14"):
        m(torch.randn(1, 3, 30, 28))
    with pytest.raises(ValueError, match="block indices"):
        m.get_intermediate_layers(x, n=[7])
    with pytest.raises(ValueError, match="ffn_layer"):
        tiny(ffn_layer="gelu")
    with pytest.raises(ValueError, match="masks must be bool"):
        m.forward_features(x, torch.zeros(2, 5, dtype=torch.bool))


def test_layers_swiglu_layerscale_and_drop_path():
    assert swiglu_hidden_features(4 * 1536) == 4096  # ViT-g, SPEC §3.1
    ffn = SwiGLUFFN(6, 8)
    x = torch.randn(3, 6, dtype=torch.float64)
    ffn = ffn.double()
    w, b = ffn.w12.weight, ffn.w12.bias
    x1, x2 = x @ w[:8].T + b[:8], x @ w[8:].T + b[8:]
    torch.testing.assert_close(ffn(x), (x1 * torch.sigmoid(x1) * x2) @ ffn.w3.weight.T + ffn.w3.bias)
    assert torch.equal(LayerScale(4, 1e-5).gamma, torch.full((4,), 1e-5))
    m = DinoVisionTransformer(img_size=28, patch_size=14, embed_dim=16, depth=3, num_heads=2, drop_path_rate=0.3,
                              drop_path_uniform=True)
    assert [b.drop_path_rate for b in m._block_list()] == [0.3, 0.3, 0.3]
    assert [b.drop_path_rate for b in tiny(drop_path_rate=0.3)._block_list()] == pytest.approx([0, 0.1, 0.2, 0.3])
    # Subset stochastic depth: in training each branch updates only ⌊B(1 − p)⌋ samples, scaled by B/kept.
    block = Block(8, 2, drop_path=0.5, init_values=1.0, subset_drop_path=True).train()
    x = torch.randn(8, 3, 8)
    y = block(x)
    changed = (y - x).abs().flatten(1).sum(1) > 0
    assert int(changed.sum()) <= 8  # at most the union of two subsets of 4
    assert int(changed.sum()) >= 4
    block.eval()
    torch.testing.assert_close(block(x), x + block._attn_branch(x) + block._ffn_branch(x + block._attn_branch(x)))


# ---- transformers ----------------------------------------------------------------------------------------------

def hf_model(registers: bool, swiglu: bool = False, seed: int = 0):
    common = dict(hidden_size=32, num_hidden_layers=3, num_attention_heads=2, intermediate_size=128, mlp_ratio=4,
                  image_size=56, patch_size=14, layerscale_value=0.7, use_swiglu_ffn=swiglu)
    if registers:
        model = transformers.Dinov2WithRegistersModel(transformers.Dinov2WithRegistersConfig(num_register_tokens=4,
                                                                                             **common))
    else:
        model = transformers.Dinov2Model(transformers.Dinov2Config(**common))
    return randomise(model.eval(), std=0.2, seed=seed)


def assert_same_outputs(ours, hf, x):
    with torch.no_grad():
        a = hf(pixel_values=x).last_hidden_state
        b = ours.forward_features(x)
    r = ours.num_register_tokens
    torch.testing.assert_close(b["x_norm_clstoken"], a[:, 0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(b["x_norm_patchtokens"], a[:, 1 + r:], rtol=1e-5, atol=1e-5)
    if r:
        torch.testing.assert_close(b["x_norm_regtokens"], a[:, 1:1 + r], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("registers", [False, True])
@pytest.mark.parametrize("swiglu", [False, True])
def test_parity_with_transformers_both_directions(registers, swiglu):
    hf = hf_model(registers, swiglu)
    ours = from_transformers(hf).eval()
    assert ours.num_register_tokens == (4 if registers else 0)
    for size in [(56, 56), (42, 70)]:  # native, and non-square (interpolated)
        assert_same_outputs(ours, hf, torch.randn(2, 3, *size))
    back = to_transformers(ours)
    assert type(back) is type(hf)
    hf_sd = hf.state_dict()
    assert set(back.state_dict()) == set(hf_sd)
    for k, v in back.state_dict().items():
        assert torch.equal(v, hf_sd[k]), k
    # our own model handed to transformers computes the same
    mine = randomise(tiny(num_register_tokens=4 if registers else 0, ffn_layer="swiglufused" if swiglu else "mlp",
                          interpolate_offset=0.0, interpolate_antialias=registers), seed=3)
    assert_same_outputs(mine, to_transformers(mine), torch.randn(1, 3, 56, 28))


def test_official_non_reg_interpolation_differs_from_transformers_off_native():
    """transformers resizes to an explicit size; the official non-_reg models use the +0.1 scale factor."""
    hf = hf_model(False)
    official = from_transformers(hf, interpolate_offset=0.1)
    x = torch.randn(1, 3, 42, 70)
    with torch.no_grad():
        diff = (official.forward_features(x)["x_norm_patchtokens"] - hf(pixel_values=x).last_hidden_state[:, 1:])
    assert diff.abs().max() > 1e-4
    assert_same_outputs(official, hf, torch.randn(1, 3, 56, 56))  # identical at the native size


def test_local_transformers_directory(tmp_path):
    hf = hf_model(True)
    hf.save_pretrained(tmp_path)
    ours = from_transformers(str(tmp_path))
    assert_same_outputs(ours, hf, torch.randn(1, 3, 56, 56))
    with pytest.raises(FileNotFoundError):
        from_transformers(str(tmp_path / "missing"))
    with pytest.raises(TypeError):
        from_transformers(torch.nn.Linear(2, 2))


def test_state_dict_conversion_refuses_unknown_keys():
    sd = hf_model(False).state_dict()
    sd["encoder.layer.0.extra.weight"] = torch.zeros(1)
    with pytest.raises(ValueError, match="encoder.layer.0.extra.weight"):
        state_dict_from_transformers(sd)
    ours = dict(tiny().state_dict())
    ours["blocks.0.unknown"] = torch.zeros(1)
    with pytest.raises(ValueError, match="blocks.0.unknown"):
        state_dict_to_transformers(ours)


def test_public_names():
    for name in ["vit_small", "vit_base", "vit_large", "vit_giant2", "dinov2_vits14_reg", "load_official_weights"]:
        assert hasattr(dinov2, name)
