"""Grounding DINO weights: official <-> transformers state-dict conversion (checked against the official key
manifests and against transformers' own modules) and loading of released checkpoints."""
import json
import pickle
from pathlib import Path

import pytest
import torch
from torch import nn

transformers = pytest.importorskip("transformers")
from transformers import (
    BertConfig,
    GroundingDinoConfig,
    GroundingDinoForObjectDetection,
    SwinConfig,
)

from dinokernels.models.grounding_dino.convert import (
    KNOWN_EXTRA_CHECKPOINT_KEYS,
    WeightsMismatchError,
    load_official_weights,
    state_dict_from_transformers,
    state_dict_to_transformers,
    swin_relative_position_index,
)

FIXTURES = Path(__file__).resolve().parents[2] / "fixtures" / "official_keys"
HF_SWIN = "model.backbone.conv_encoder.model."

# SPEC §5.1 backbones: (embed dim, depths, heads, window)
SWIN = {"swint_ogc": (96, [2, 2, 6, 2], [3, 6, 12, 24], 7),
        "swinb_cogcoor": (128, [2, 2, 18, 2], [4, 8, 16, 32], 12)}


def _manifest(name):
    with open(FIXTURES / f"groundingdino_{name}.json") as f:
        return json.load(f)


def _model_keys(manifest):
    """key → (shape, dtype) of the official model's state dict (the released file minus its known extras)."""
    dtypes = manifest.get("dtypes", {})
    return {k: (tuple(s), getattr(torch, dtypes.get(k, "float32"))) for k, s in manifest["keys"].items()}


def _full_config(name):
    embed, depths, heads, window = SWIN[name]
    backbone = SwinConfig(embed_dim=embed, depths=depths, num_heads=heads, window_size=window,
                          out_features=["stage2", "stage3", "stage4"])
    return GroundingDinoConfig(backbone_config=backbone, text_config=BertConfig())  # bert-base sizes, d 256, 900 q


def _tiny_config(window=7):
    backbone = SwinConfig(embed_dim=8, depths=[1, 1, 1, 1], num_heads=[1, 1, 1, 1], window_size=window, image_size=98,
                          out_features=["stage2", "stage3", "stage4"])
    text = BertConfig(vocab_size=99, hidden_size=8, num_hidden_layers=2, num_attention_heads=2, intermediate_size=16,
                      max_position_embeddings=32)
    return GroundingDinoConfig(backbone_config=backbone, text_config=text, d_model=32, encoder_layers=2,
                               decoder_layers=2, encoder_ffn_dim=32, decoder_ffn_dim=32, encoder_attention_heads=2,
                               decoder_attention_heads=2, num_queries=2, max_text_len=7, encoder_n_points=2,
                               decoder_n_points=2)


def _random_hf_state_dict(config, seed):
    """transformers' keys and shapes (model built on the meta device, no init cost) with fresh random values; names
    that transformers ties to one tensor (the shared box head) share one value, and the unused swin.layernorm has
    its transformers initial value (identity), as in a real model."""
    with torch.device("meta"):
        model = GroundingDinoForObjectDetection(config)
    gen = torch.Generator().manual_seed(seed)
    by_tensor, out = {}, {}
    for key, tensor in model.state_dict(keep_vars=True).items():
        if id(tensor) not in by_tensor:
            by_tensor[id(tensor)] = torch.empty(tensor.shape).uniform_(-1, 1, generator=gen)
        out[key] = by_tensor[id(tensor)]
    out[HF_SWIN + "swin.layernorm.weight"] = torch.ones_like(out[HF_SWIN + "swin.layernorm.weight"])
    out[HF_SWIN + "swin.layernorm.bias"] = torch.zeros_like(out[HF_SWIN + "swin.layernorm.bias"])
    return out


@pytest.fixture(scope="module", params=sorted(SWIN))
def full_size(request):
    """(name, config, random transformers state dict, converted official state dict) for Swin-T and Swin-B."""
    config = _full_config(request.param)
    hf = _random_hf_state_dict(config, seed=len(request.param))
    return request.param, config, hf, state_dict_from_transformers(hf, config)


@pytest.fixture(scope="module")
def tiny_hf_model():
    torch.manual_seed(0)
    return GroundingDinoForObjectDetection(_tiny_config()).eval()


# ----------------------------------------------------------------------------------------------- conversion


def test_from_transformers_gives_the_official_keys_shapes_and_dtypes(full_size):
    name, _, _, ours = full_size
    expected = _model_keys(_manifest(name))
    assert sorted(ours) == sorted(expected)
    wrong = [(k, tuple(v.shape), v.dtype, expected[k]) for k, v in ours.items()
             if (tuple(v.shape), v.dtype) != expected[k]]
    assert wrong == []


def test_transformers_round_trip_is_bit_exact(full_size):
    _, _, hf, ours = full_size
    back = state_dict_to_transformers(ours)
    assert sorted(back) == sorted(hf)
    assert [k for k in hf if back[k].dtype != hf[k].dtype or not torch.equal(back[k], hf[k])] == []


def test_official_round_trip_is_bit_exact_but_for_the_unused_pooler(full_size):
    name, _, _, converted = full_size
    # random official weights: the converted random ones, with a random (not zero) pooler
    ours = dict(converted)
    pooler = ("bert.pooler.dense.weight", "bert.pooler.dense.bias")
    for key in pooler:
        ours[key] = torch.rand_like(ours[key]) + 0.5
    assert [k for k, v in ours.items() if v.dtype == torch.int64 and not torch.equal(
        v, swin_relative_position_index(SWIN[name][3]))] == []
    hf = state_dict_to_transformers(ours)
    assert not any("pooler" in k for k in hf)
    back = state_dict_from_transformers(hf)
    assert sorted(back) == sorted(ours)
    assert [k for k in ours if k not in pooler and not torch.equal(back[k], ours[k])] == []
    assert all(not back[k].any() for k in pooler)


def test_named_correspondences(full_size):
    """Round trips cannot see a mapping that is wrong the same way in both directions: check the pairs SPEC §5.9
    names, and the q/k/v order of the fused tensors, directly."""
    _, _, hf, ours = full_size
    blk = "backbone.0.layers.2.blocks.1."
    hblk = HF_SWIN + "swin.encoder.layers.2.blocks.1."
    qkv, c = ours[blk + "attn.qkv.weight"], ours[blk + "attn.proj.weight"].shape[0]
    for part, letter in enumerate("qkv"):
        assert torch.equal(qkv[part * c:(part + 1) * c], hf[hblk + f"attention.{letter}_proj.weight"])
        assert torch.equal(ours[blk + "attn.qkv.bias"][part * c:(part + 1) * c],
                           hf[hblk + f"attention.{letter}_proj.bias"])
    pairs = {
        blk + "norm1.weight": hblk + "layernorm_before.weight",
        blk + "norm2.weight": hblk + "layernorm_after.weight",
        "backbone.0.norm1.weight": HF_SWIN + "hidden_states_norms.stage2.weight",
        "backbone.0.norm3.bias": HF_SWIN + "hidden_states_norms.stage4.bias",
        "input_proj.3.1.weight": "model.input_proj_vision.3.1.weight",
        "bert.encoder.layer.5.attention.self.key.weight": "model.text_backbone.encoder.layer.5.attention.self.key.weight",
        "feat_map.weight": "model.text_projection.weight",
        "transformer.encoder.fusion_layers.4.gamma_v": "model.encoder.layers.4.fusion_layer.vision_param",
        "transformer.encoder.fusion_layers.4.gamma_l": "model.encoder.layers.4.fusion_layer.text_param",
        "transformer.encoder.fusion_layers.4.attn.l_proj.bias": "model.encoder.layers.4.fusion_layer.attn.text_proj.bias",
        "transformer.encoder.text_layers.3.norm1.weight":
            "model.encoder.layers.3.text_enhancer_layer.layer_norm_before.weight",
        "transformer.encoder.layers.3.norm2.weight": "model.encoder.layers.3.deformable_layer.final_layer_norm.weight",
        "transformer.decoder.layers.1.cross_attn.sampling_offsets.weight":
            "model.decoder.layers.1.encoder_attn.sampling_offsets.weight",
        "transformer.decoder.layers.1.norm1.weight": "model.decoder.layers.1.encoder_attn_layer_norm.weight",
        "transformer.decoder.layers.1.norm2.weight": "model.decoder.layers.1.self_attn_layer_norm.weight",
        "transformer.decoder.layers.1.norm3.weight": "model.decoder.layers.1.final_layer_norm.weight",
        "transformer.decoder.layers.1.catext_norm.weight": "model.decoder.layers.1.encoder_attn_text_layer_norm.weight",
        "transformer.decoder.norm.weight": "model.decoder.layer_norm.weight",
        "transformer.decoder.ref_point_head.layers.1.weight": "model.decoder.reference_points_head.layers.1.weight",
        "transformer.tgt_embed.weight": "model.query_position_embeddings.weight",
        "transformer.enc_out_bbox_embed.layers.2.weight": "model.encoder_output_bbox_embed.layers.2.weight",
        "transformer.decoder.bbox_embed.4.layers.2.bias": "model.decoder.bbox_embed.4.layers.2.bias",
        "bbox_embed.5.layers.0.weight": "bbox_embed.5.layers.0.weight",
    }
    assert [o for o, h in pairs.items() if not torch.equal(ours[o], hf[h])] == []
    in_proj = ours["transformer.decoder.layers.2.ca_text.in_proj_weight"]
    for part, name in enumerate(("query", "key", "value")):
        assert torch.equal(in_proj[part * 256:(part + 1) * 256], hf[f"model.decoder.layers.2.encoder_attn_text.{name}.weight"])


def test_tiny_round_trip_loads_into_transformers(tiny_hf_model):
    hf = tiny_hf_model.state_dict()
    ours = state_dict_from_transformers(hf, tiny_hf_model.config)
    back = state_dict_to_transformers(ours)
    assert sorted(back) == sorted(hf)
    assert [k for k in hf if not torch.equal(back[k], hf[k])] == []
    fresh = GroundingDinoForObjectDetection(_tiny_config())
    fresh.load_state_dict(back, strict=True)
    assert all(torch.equal(a, b) for a, b in zip(fresh.state_dict().values(), hf.values()))


@pytest.mark.parametrize("window", [1, 2, 7, 12])
def test_relative_position_index_is_transformers_index(window):
    config = _tiny_config(window)
    torch.manual_seed(0)
    model = GroundingDinoForObjectDetection(config)
    buffers = {k: v for k, v in model.named_buffers() if k.endswith("relative_position_index")}
    assert buffers
    ours = state_dict_from_transformers(model.state_dict(), config)
    rebuilt = {k: v for k, v in ours.items() if k.endswith("relative_position_index")}
    assert len(rebuilt) == len(buffers)
    for index in rebuilt.values():
        assert index.shape == (window * window, window * window) and index.dtype == torch.int64
    for buf in buffers.values():
        assert torch.equal(swin_relative_position_index(window).flatten(), buf)


def test_fused_swin_attention_matches_transformers_block(tiny_hf_model):
    """Window attention written from the fused official weights (qkv, relative_position_bias_table, index, proj)
    against transformers' SwinAttention with the converted split weights."""
    ours = state_dict_from_transformers(tiny_hf_model.state_dict())
    attention = tiny_hf_model.model.backbone.conv_encoder.model.swin.encoder.layers[1].blocks[0].attention
    pre = "backbone.0.layers.1.blocks.0.attn."
    dim, window = ours[pre + "proj.weight"].shape[0], 7
    heads = ours[pre + "relative_position_bias_table"].shape[1]
    x = torch.randn(3, window * window, dim)
    qkv = (x @ ours[pre + "qkv.weight"].T + ours[pre + "qkv.bias"]).view(3, -1, 3, heads, dim // heads)
    q, k, v = qkv.permute(2, 0, 3, 1, 4)
    bias = ours[pre + "relative_position_bias_table"][ours[pre + "relative_position_index"]].permute(2, 0, 1)
    attn = torch.softmax(q @ k.transpose(-1, -2) * (dim // heads) ** -0.5 + bias, dim=-1)
    expected = (attn @ v).transpose(1, 2).reshape(3, -1, dim) @ ours[pre + "proj.weight"].T + ours[pre + "proj.bias"]
    with torch.no_grad():
        got = attention(x)[0]
    torch.testing.assert_close(got.reshape(expected.shape), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("module", ["transformer.encoder.text_layers.1.self_attn",
                                    "transformer.decoder.layers.0.self_attn", "transformer.decoder.layers.1.ca_text"])
def test_fused_multihead_attention_matches_transformers(tiny_hf_model, module):
    """torch's nn.MultiheadAttention (the official layer) with the fused weights against transformers' split
    attention module."""
    ours = state_dict_from_transformers(tiny_hf_model.state_dict())
    hf_module = {"transformer.encoder.text_layers.1.self_attn": tiny_hf_model.model.encoder.layers[1].text_enhancer_layer.self_attn,
                 "transformer.decoder.layers.0.self_attn": tiny_hf_model.model.decoder.layers[0].self_attn,
                 "transformer.decoder.layers.1.ca_text": tiny_hf_model.model.decoder.layers[1].encoder_attn_text}[module]
    mha = nn.MultiheadAttention(32, hf_module.num_attention_heads, batch_first=True)
    mha.load_state_dict({k[len(module) + 1:]: v for k, v in ours.items() if k.startswith(module + ".")}, strict=True)
    q, kv = torch.randn(2, 5, 32), torch.randn(2, 4, 32)
    with torch.no_grad():
        torch.testing.assert_close(mha(q, kv, kv, need_weights=False)[0], hf_module(q, kv, kv)[0],
                                   rtol=1e-5, atol=1e-6)


def test_conversion_errors_name_the_keys(tiny_hf_model):
    hf = dict(tiny_hf_model.state_dict())
    bad = dict(hf, **{"model.mystery.weight": torch.zeros(2)})
    del bad[HF_SWIN + "swin.encoder.layers.0.blocks.0.attention.k_proj.weight"]
    with pytest.raises(ValueError, match=r"model\.mystery\.weight.*backbone\.0\.layers\.0\.blocks\.0\.attn\.qkv\.weight"):
        state_dict_from_transformers(bad)
    ours = state_dict_from_transformers(hf)
    with pytest.raises(ValueError, match=r"transformer\.extra_thing.*transformer\.decoder\.layers\.0\.blah"):
        state_dict_to_transformers(dict(ours, **{"transformer.extra_thing": torch.zeros(1),
                                                 "transformer.decoder.layers.0.blah": torch.zeros(1)}))
    key = "backbone.0.layers.0.blocks.0.attn.relative_position_index"
    with pytest.raises(ValueError, match=key.replace(".", r"\.")):
        state_dict_to_transformers(dict(ours, **{key: ours[key].flip(0)}))
    with pytest.raises(ValueError, match="divisible by 3"):
        state_dict_to_transformers(dict(ours, **{"transformer.decoder.layers.0.self_attn.in_proj_bias": torch.zeros(4)}))
    with pytest.raises(ValueError, match="window size 7, config says 5"):
        state_dict_from_transformers(hf, _tiny_config(window=5))
    with pytest.raises(TypeError, match="hf_state_dict"):
        state_dict_from_transformers(dict(hf, **{"model.level_embed": [1.0]}))
    with pytest.raises(TypeError, match="state_dict"):
        state_dict_to_transformers([("a", torch.zeros(1))])


# ----------------------------------------------------------------------------------------------- released files


def _module_with_keys(keys):
    """A module whose state_dict() has exactly these keys, shapes and dtypes (float ones as parameters, the int64
    Swin indices as buffers), all zero."""
    root = nn.Module()
    for key, (shape, dtype) in keys.items():
        *path, leaf = key.split(".")
        node = root
        for part in path:
            if not hasattr(node, part):
                node.add_module(part, nn.Module())
            node = getattr(node, part)
        if dtype.is_floating_point:
            node.register_parameter(leaf, nn.Parameter(torch.zeros(shape, dtype=dtype)))
        else:
            node.register_buffer(leaf, torch.zeros(shape, dtype=dtype))
    return root


@pytest.fixture(scope="module")
def released_swint():
    """A fake groundingdino_swint_ogc.pth content: random tensors with the manifest's keys and shapes under
    checkpoint["model"] with a DDP `module.` prefix, plus the two extra keys the released files carry."""
    gen = torch.Generator().manual_seed(2)
    weights = {}
    for key, (shape, dtype) in _model_keys(_manifest("swint_ogc")).items():
        weights["module." + key] = (torch.empty(shape).uniform_(-1, 1, generator=gen) if dtype.is_floating_point
                                    else torch.randint(0, 169, shape, generator=gen))
    weights["module.bert.embeddings.position_ids"] = torch.arange(512)[None]
    weights["module.label_enc.weight"] = torch.randn(2001, 256, generator=gen)
    return {"model": weights}


def test_released_checkpoint_file_loads_strictly(released_swint, tmp_path):
    path = tmp_path / "groundingdino_swint_ogc.pth"
    torch.save(released_swint, path)
    try:
        target = _module_with_keys(_model_keys(_manifest("swint_ogc")))
        report = load_official_weights(target, path)
    finally:
        path.unlink()
    assert sorted(report.ignored) == sorted(KNOWN_EXTRA_CHECKPOINT_KEYS)
    assert report.missing == [] and report.unexpected == []
    state = target.state_dict()
    assert sorted(report.loaded) == sorted(state)
    assert [k for k, v in state.items() if not torch.equal(v, released_swint["model"]["module." + k])] == []


def test_flat_and_unprefixed_dicts_load(released_swint):
    flat = {k[len("module."):]: v for k, v in released_swint["model"].items()}
    small = {k: v for k, v in flat.items() if k.startswith("transformer.decoder.")}
    target = _module_with_keys({k: (tuple(v.shape), v.dtype) for k, v in small.items()})
    report = load_official_weights(target, small)
    assert sorted(report.loaded) == sorted(small) and report.ignored == []
    assert all(torch.equal(v, small[k]) for k, v in target.state_dict().items())


def test_mismatches_are_named_together(released_swint):
    keys = _model_keys(_manifest("swint_ogc"))
    small_keys = {k: v for k, v in keys.items() if k.startswith(("transformer.decoder.layers.0.", "feat_map."))}
    target = _module_with_keys(small_keys)
    ckpt = {k: released_swint["model"]["module." + k] for k in small_keys}
    ckpt["bert.embeddings.position_ids"] = torch.arange(512)[None]
    ckpt["transformer.mystery.weight"] = torch.zeros(3)
    del ckpt["transformer.decoder.layers.0.norm3.bias"]
    ckpt["feat_map.weight"] = torch.zeros(256, 512)
    ckpt["transformer.decoder.layers.0.linear1.bias"] = torch.full((2048,), float("nan"))
    with pytest.raises(WeightsMismatchError) as info:
        load_official_weights(target, {"model": ckpt})
    message = str(info.value)
    for fragment in ("feat_map.weight: checkpoint shape (256, 512) vs model (256, 768)",
                     "transformer.decoder.layers.0.linear1.bias: non-finite",
                     "1 missing key(s): transformer.decoder.layers.0.norm3.bias",
                     "1 unexpected key(s): transformer.mystery.weight"):
        assert fragment in message
    assert "position_ids" not in message

    # strict=False reports missing and unexpected keys, still refuses wrong shapes
    del ckpt["feat_map.weight"], ckpt["transformer.decoder.layers.0.linear1.bias"]
    before = target.state_dict()["transformer.decoder.layers.0.linear1.bias"].clone()
    report = load_official_weights(target, {"model": ckpt}, strict=False)
    assert sorted(report.missing) == ["feat_map.weight", "transformer.decoder.layers.0.linear1.bias",
                                      "transformer.decoder.layers.0.norm3.bias"]
    assert report.unexpected == ["transformer.mystery.weight"]
    assert report.ignored == ["bert.embeddings.position_ids"]
    assert torch.equal(target.state_dict()["transformer.decoder.layers.0.linear1.bias"], before)
    with pytest.raises(WeightsMismatchError, match=r"feat_map\.bias: checkpoint shape \(3,\)"):
        load_official_weights(target, {"model": dict(ckpt, **{"feat_map.bias": torch.zeros(3)})}, strict=False)


def test_dtype_kind_and_tied_names_are_checked():
    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            shared = nn.Linear(2, 2)
            self.bbox_embed = nn.ModuleList([shared, shared])
            self.register_buffer("index", torch.zeros(3, dtype=torch.int64))

    model = Tied()
    good = {"bbox_embed.0.weight": torch.ones(2, 2), "bbox_embed.0.bias": torch.ones(2),
            "bbox_embed.1.weight": torch.ones(2, 2), "bbox_embed.1.bias": torch.ones(2),
            "index": torch.arange(3)}
    load_official_weights(model, good)
    assert torch.equal(model.bbox_embed[1].weight, torch.ones(2, 2)) and torch.equal(model.index, torch.arange(3))
    with pytest.raises(WeightsMismatchError, match=r"tied .*bbox_embed\.0\.weight, bbox_embed\.1\.weight"):
        load_official_weights(model, dict(good, **{"bbox_embed.1.weight": torch.zeros(2, 2)}))
    with pytest.raises(WeightsMismatchError, match=r"index: checkpoint dtype torch\.float32 vs model torch\.int64"):
        load_official_weights(model, dict(good, index=torch.zeros(3)))


class _NotAllowed:
    pass


@pytest.mark.parametrize("case", ["empty", "truncated", "garbage", "list", "no_tensors", "foreign_class"])
def test_bad_files_give_clear_errors(tmp_path, case):
    path = tmp_path / f"{case}.pth"
    good = tmp_path / "good.pth"
    torch.save({"model": {"feat_map.weight": torch.randn(64, 64)}}, good)
    if case == "empty":
        path.write_bytes(b"")
        match = "is empty"
    elif case == "truncated":
        path.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
        match = "not a readable PyTorch checkpoint"
    elif case == "garbage":
        path.write_bytes(b"<html>404 Not Found</html>")
        match = "not a readable PyTorch checkpoint"
    elif case == "list":
        torch.save([torch.zeros(1)], path)
        match = "holds a list"
    elif case == "no_tensors":
        torch.save({"epoch": 3, "model": {"feat_map.weight": [1.0]}}, path)
        match = "not tensors"
    else:
        with open(path, "wb") as f:
            pickle.dump({"model": _NotAllowed()}, f, protocol=2)
        match = "not a readable PyTorch checkpoint"
    target = _module_with_keys({"feat_map.weight": ((64, 64), torch.float32)})
    with pytest.raises(ValueError, match=match) as info:
        load_official_weights(target, path)
    assert str(path) in str(info.value)
    # no unpickling traceback chained under the message
    assert info.value.__cause__ is None and (info.value.__context__ is None or info.value.__suppress_context__)


def test_missing_path_and_bad_arguments(tmp_path):
    target = _module_with_keys({"feat_map.weight": ((4, 4), torch.float32)})
    missing = tmp_path / "nowhere.pth"
    with pytest.raises(FileNotFoundError, match="nowhere.pth"):
        load_official_weights(target, missing)
    with pytest.raises(IsADirectoryError, match=str(tmp_path)):
        load_official_weights(target, tmp_path)
    with pytest.raises(TypeError, match="path_or_state_dict"):
        load_official_weights(target, 42)
    with pytest.raises(TypeError, match="model"):
        load_official_weights({"feat_map.weight": torch.zeros(4, 4)}, {"feat_map.weight": torch.zeros(4, 4)})
    with pytest.raises(ValueError, match="no weights"):
        load_official_weights(target, {"model": {}})
    with pytest.raises(ValueError, match="both become 'feat_map.weight'"):
        load_official_weights(target, {"feat_map.weight": torch.zeros(4, 4), "module.feat_map.weight": torch.zeros(4, 4)})
