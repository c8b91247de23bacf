"""DINO v1 model: official key layout (manifests in tests/fixtures/official_keys), weight loading, numerics of
the ViT (pos-embed interpolation, attention, drop path), DINOHead and MultiCropWrapper, build_backbone."""
import argparse
import copy
import json
import math
import sys
import types
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dinokernels.layers import Attention, DINOHead, DropPath, WeightNormLinear, drop_path
from dinokernels.models.dino import (MultiCropWrapper, VisionTransformer, WeightsMismatchError, build_backbone,
                                     load_official_weights, strip_prefixes, vit_base, vit_nano, vit_small, vit_tiny)


# Copies of shared/fixtures/official_keys (the DINO v1 manifests and their README), kept in the repository so
# that the strict-loading tests run, and can fail, on any checkout.
FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "official_keys"


def _manifest(name):
    with open(FIXTURES / f"{name}.json") as f:
        return json.load(f)


def _on_meta(fn):
    """Build on the meta device (no memory, no init cost): enough for keys and shapes."""
    with torch.device("meta"):
        return fn()


def _empty(fn):
    """A real but uninitialised model (fast), for loading tests."""
    return _on_meta(fn).to_empty(device="cpu")


def _layout(module):
    return [(k, list(v.shape)) for k, v in module.state_dict().items()]


def _synthetic(keys: dict, prefix=""):
    """Random tensors of the manifest shapes, cheap to write: each is an independent random row broadcast over the
    leading dimensions, so torch.save writes one row of storage per key."""
    return {prefix + k: torch.randn(shape[-1]).expand(shape) for k, shape in keys.items()}


BACKBONES = {"dino_vits16": lambda: vit_small(16), "dino_vits8": lambda: vit_small(8),
             "dino_vitb16": lambda: vit_base(16)}


def _full_model():
    return MultiCropWrapper(vit_small(16), DINOHead(384, 65536))


# ---------------------------------------------------------------------------------------------------- key layout


@pytest.mark.parametrize("name", sorted(BACKBONES))
def test_backbone_matches_official_key_manifest(name):
    m = _manifest(name)
    assert m["checkpoint_key"] is None and not m.get("dtypes")
    assert _layout(_on_meta(BACKBONES[name])) == [(k, list(s)) for k, s in m["keys"].items()]


def test_full_checkpoint_matches_official_key_manifest():
    m = _manifest("dino_vits16_full")
    assert m["checkpoint_key"] == ["student", "teacher"]
    ours = _layout(_on_meta(_full_model))
    assert [(k, list(s)) for k, s in m["keys"]["teacher"].items()] == ours
    assert [(k, list(s)) for k, s in m["keys"]["student"].items()] == [("module." + k, s) for k, s in ours]


@pytest.mark.parametrize("name", sorted(BACKBONES))
def test_official_backbone_file_loads_strictly(name, tmp_path, monkeypatch):
    sd = _synthetic(_manifest(name)["keys"])
    path = tmp_path / f"{name}.pth"
    torch.save(sd, path)
    calls = []
    real_load = torch.load

    def spy(*args, **kwargs):
        calls.append(kwargs.get("weights_only"))
        return real_load(*args, **kwargs)

    monkeypatch.setattr(torch, "load", spy)
    model = _empty(BACKBONES[name])
    missing, unexpected = load_official_weights(model, path)
    assert calls == [True]
    assert missing == [] and unexpected == []
    for k, v in model.state_dict().items():
        assert torch.equal(v, sd[k]), k


def _official_full_checkpoint():
    m = _manifest("dino_vits16_full")
    student = _synthetic(m["keys"]["student"])
    teacher = _synthetic(m["keys"]["teacher"])
    return {"student": student, "teacher": teacher,
            "optimizer": {"state": {}, "param_groups": [{"lr": 1e-3, "params": [0, 1]}]}, "epoch": 100,
            "args": argparse.Namespace(arch="vit_small", patch_size=16, out_dim=65536, norm_last_layer=False,
                                       global_crops_scale=(0.4, 1.0), output_dir="."),
            "dino_loss": {"center": torch.zeros(1, 65536)}}


def test_official_full_checkpoint_loads_strictly(tmp_path):
    ckpt = _official_full_checkpoint()
    path = tmp_path / "dino_deitsmall16_pretrain_full_checkpoint.pth"
    torch.save(ckpt, path)
    for entry, prefix in (("student", "module."), ("teacher", "")):
        wrapper = _empty(_full_model)
        assert load_official_weights(wrapper, path, checkpoint_key=entry) == ([], [])
        for k, v in wrapper.state_dict().items():
            assert torch.equal(v, ckpt[entry][prefix + k]), (entry, k)
        assert not wrapper.head.last_layer.weight_g.requires_grad  # loading does not unfreeze g
    # a bare backbone from the full checkpoint: teacher by default, prefixes stripped, head keys dropped
    backbone = _empty(lambda: vit_small(16))
    assert load_official_weights(backbone, path) == ([], [])
    for k, v in backbone.state_dict().items():
        assert torch.equal(v, ckpt["teacher"]["backbone." + k]), k
    backbone = _empty(lambda: vit_small(16))
    assert load_official_weights(backbone, ckpt, checkpoint_key="student") == ([], [])
    assert torch.equal(backbone.pos_embed, ckpt["student"]["module.backbone.pos_embed"])


def test_load_errors_name_the_keys():
    model = vit_nano(img_size=16)
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    sd.pop("blocks.3.mlp.fc2.bias")
    sd["blocks.9.attn.qkv.weight"] = torch.zeros(1)
    with pytest.raises(WeightsMismatchError) as e:
        load_official_weights(model, sd)
    assert "blocks.3.mlp.fc2.bias" in str(e.value) and "blocks.9.attn.qkv.weight" in str(e.value)
    assert load_official_weights(model, sd, strict=False) == (["blocks.3.mlp.fc2.bias"], ["blocks.9.attn.qkv.weight"])
    sd = dict(model.state_dict())
    sd["pos_embed"] = torch.zeros(1, 5, 128)
    with pytest.raises(WeightsMismatchError, match=r"pos_embed: checkpoint \(1, 5, 128\) vs model \(1, 17, 128\)"):
        load_official_weights(model, sd, strict=False)
    with pytest.raises(KeyError, match="'teacher'"):
        load_official_weights(model, {"epoch": 3, "teacher": {}}, checkpoint_key="student")
    with pytest.raises(KeyError, match="checkpoint_key"):
        load_official_weights(model, {"epoch": 3, "weights": dict(model.state_dict())})


def test_strip_prefixes():
    t = torch.zeros(1)
    sd = {"module.backbone.a": t, "backbone.b": t, "module.c.backbone.d": t, "e": t}
    assert list(strip_prefixes(sd)) == ["a", "b", "c.backbone.d", "e"]
    assert list(strip_prefixes(sd, ("module.",))) == ["backbone.a", "backbone.b", "c.backbone.d", "e"]
    with pytest.raises(ValueError, match="collide"):
        strip_prefixes({"module.a": t, "a": t})


# ----------------------------------------------------------------------------------------------------- the ViT


@pytest.mark.parametrize("fn,dim,depth,heads", [(vit_nano, 128, 4, 4), (vit_tiny, 192, 12, 3),
                                                (vit_small, 384, 12, 6), (vit_base, 768, 12, 12)])
def test_named_sizes(fn, dim, depth, heads):
    m = _on_meta(lambda: fn(patch_size=8))
    assert (m.embed_dim, len(m.blocks), m.num_heads, m.patch_embed.patch_size) == (dim, depth, heads, 8)
    assert m.blocks[0].attn.qkv.bias is not None and m.blocks[0].mlp.fc1.out_features == 4 * dim
    assert m.norm.eps == 1e-6 and isinstance(m.head, nn.Identity)
    assert fn.__defaults__ == ((4,) if fn is vit_nano else (16,))


def test_pos_embed_unchanged_when_tokens_match_and_square():
    m = vit_nano(img_size=32)
    x = m.patch_embed(torch.randn(1, 3, 32, 32))
    x = torch.cat((m.cls_token, x), dim=1)
    assert m.interpolate_pos_encoding(x, 32, 32) is m.pos_embed


def _interpolated_pos_embed(pos_embed, rows, cols):
    """SPEC §2.2: the patch part of pos_embed (1, 1 + N, dim), a √N × √N grid, resized bicubic with scale_factor
    ((rows + 0.1)/√N, (cols + 0.1)/√N); the CLS row is kept as is."""
    cls_row, patches = pos_embed[:, :1], pos_embed[0, 1:]  # (1, 1, dim), (N, dim)
    side = math.sqrt(patches.shape[0])
    grid = patches.T.reshape(1, -1, int(side), int(side))  # (1, dim, √N, √N), row-major patches
    resized = F.interpolate(grid, scale_factor=((rows + 0.1) / side, (cols + 0.1) / side), mode="bicubic")
    return torch.cat((cls_row, resized.flatten(2).transpose(1, 2)), dim=1)


@pytest.mark.parametrize("hw", [(16, 16), (32, 20), (12, 40), (48, 48), (32, 64)])
def test_pos_embed_interpolation(hw):
    h, w = hw
    m = vit_nano(img_size=32)  # 8 × 8 grid
    with torch.no_grad():  # a position embedding that varies along the rows only
        grid = torch.randn(8, 1, m.embed_dim).expand(8, 8, m.embed_dim).reshape(1, 64, -1)
        m.pos_embed[:, 1:] = grid
    tokens = torch.zeros(1, 1 + (h // 4) * (w // 4), m.embed_dim)
    pe = m.interpolate_pos_encoding(tokens, h, w)
    assert pe.shape == (1, 1 + (h // 4) * (w // 4), m.embed_dim)
    assert torch.equal(pe, _interpolated_pos_embed(m.pos_embed, h // 4, w // 4))
    assert torch.equal(pe[:, 0], m.pos_embed[:, 0])
    rows = pe[0, 1:].reshape(h // 4, w // 4, -1)
    torch.testing.assert_close(rows, rows[:, :1].expand_as(rows), rtol=0, atol=1e-5)  # rows stay rows


def _reference_forward(m: VisionTransformer, x):
    """The ViT forward of SPEC §2.2 written out with explicit attention, from the model's own parameters."""
    B, _, h, w = x.shape
    t = m.patch_embed.proj(x).flatten(2).transpose(1, 2)
    t = torch.cat((m.cls_token.expand(B, -1, -1), t), dim=1)
    p = m.patch_embed.patch_size
    same = t.shape[1] == m.pos_embed.shape[1] and h == w  # the official shortcut
    t = t + (m.pos_embed if same else _interpolated_pos_embed(m.pos_embed, h // p, w // p))
    for blk in m.blocks:
        y = F.layer_norm(t, (m.embed_dim,), blk.norm1.weight, blk.norm1.bias, 1e-6)
        qkv = blk.attn.qkv(y).reshape(B, t.shape[1], 3, m.num_heads, -1).permute(2, 0, 3, 1, 4)
        a = (qkv[0] @ qkv[1].transpose(-2, -1) * (m.embed_dim // m.num_heads) ** -0.5).softmax(-1)
        t = t + blk.attn.proj((a @ qkv[2]).transpose(1, 2).reshape(B, t.shape[1], -1))
        y = F.layer_norm(t, (m.embed_dim,), blk.norm2.weight, blk.norm2.bias, 1e-6)
        t = t + blk.mlp.fc2(F.gelu(blk.mlp.fc1(y)))
    return F.layer_norm(t, (m.embed_dim,), m.norm.weight, m.norm.bias, 1e-6)


@pytest.mark.parametrize("hw", [(32, 32), (16, 16), (24, 40)])
def test_vit_forward_matches_official_math(hw):
    m = vit_nano(img_size=32).eval()
    with torch.no_grad():  # non-trivial norms and biases
        for n, p in m.named_parameters():
            if p.dim() == 1:
                p.normal_(0.5 if n.endswith("weight") else 0.0, 0.3)
    x = torch.randn(3, 3, *hw)
    with torch.no_grad():
        ref = _reference_forward(m, x)
        out = m(x)
        inter = m.get_intermediate_layers(x, n=2)
        attn = m.get_last_selfattention(x)
    n_tok = 1 + (hw[0] // 4) * (hw[1] // 4)
    assert out.shape == (3, 128)
    torch.testing.assert_close(out, ref[:, 0], rtol=1e-4, atol=1e-4)
    assert len(inter) == 2 and all(t.shape == (3, n_tok, 128) for t in inter)
    torch.testing.assert_close(inter[-1], ref, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(inter[0], inter[1])
    assert attn.shape == (3, 4, n_tok, n_tok) and (attn >= 0).all()
    torch.testing.assert_close(attn.sum(-1), torch.ones(3, 4, n_tok))


def test_attention_fused_path_matches_explicit():
    attn = Attention(64, num_heads=4, qkv_bias=True)
    x = torch.randn(2, 10, 64, requires_grad=True)
    fused = attn(x)
    explicit, weights = attn(x, return_attention=True)
    torch.testing.assert_close(fused, explicit)
    torch.testing.assert_close(weights, (lambda q, k: (q @ k.transpose(-2, -1) * 16 ** -0.5).softmax(-1))(
        *attn.qkv(x).reshape(2, 10, 3, 4, 16).permute(2, 0, 3, 1, 4)[:2]))
    g1, = torch.autograd.grad(fused.square().sum(), x)
    g2, = torch.autograd.grad(explicit.square().sum(), x)
    torch.testing.assert_close(g1, g2)


def test_drop_path():
    m = vit_nano(img_size=16, drop_path_rate=0.3)
    assert [b.drop_path.drop_prob if isinstance(b.drop_path, DropPath) else 0.0 for b in m.blocks] == \
        [x.item() for x in torch.linspace(0, 0.3, 4)]
    x = torch.randn(4, 3, 16, 16)
    plain = vit_nano(img_size=16)
    plain.load_state_dict(m.state_dict())
    m.eval(), plain.eval()
    with torch.no_grad():
        assert torch.equal(m(x), plain(x))  # identity in eval
        m.train(), plain.train()
        assert not torch.equal(m(x), plain(x))
    # train: whole samples dropped or scaled by 1/keep
    y = drop_path(torch.ones(2000, 3, 5), 0.25, training=True)
    per_sample = y.flatten(1)
    assert torch.equal(per_sample, per_sample[:, :1].expand_as(per_sample))
    assert set(per_sample[:, 0].unique().tolist()) <= {0.0, torch.tensor(1 / 0.75).item()}
    assert abs((per_sample[:, 0] == 0).float().mean().item() - 0.25) < 0.05  # 5 sigma ≈ 0.048
    assert torch.equal(drop_path(y, 0.25, training=False), y)


# ------------------------------------------------------------------------------------------------------ the head


def test_dino_head_layout_and_init():
    h = DINOHead(64, 1000, hidden_dim=512, bottleneck_dim=32)
    assert list(h.state_dict()) == ["mlp.0.weight", "mlp.0.bias", "mlp.2.weight", "mlp.2.bias", "mlp.4.weight",
                                    "mlp.4.bias", "last_layer.weight_g", "last_layer.weight_v"]
    assert [type(l) for l in h.mlp] == [nn.Linear, nn.GELU, nn.Linear, nn.GELU, nn.Linear]
    assert h.last_layer.weight_g.shape == (1000, 1) and h.last_layer.weight_v.shape == (1000, 32)
    assert torch.equal(h.last_layer.weight_g, torch.ones(1000, 1)) and not h.last_layer.weight_g.requires_grad
    assert h.last_layer.weight_v.requires_grad
    assert abs(h.mlp[2].weight.std().item() - 0.02) < 0.001 and h.mlp[2].weight.abs().max() <= 2.0
    assert all(torch.equal(h.mlp[i].bias, torch.zeros_like(h.mlp[i].bias)) for i in (0, 2, 4))
    bound = 1 / math.sqrt(32)  # last layer keeps nn.Linear's default init, as officially
    assert h.last_layer.weight_v.abs().max() <= bound and h.last_layer.weight_v.abs().max() > 0.9 * bound
    assert DINOHead(64, 10, norm_last_layer=False).last_layer.weight_g.requires_grad
    bn = DINOHead(64, 10, use_bn=True, nlayers=4, hidden_dim=32, bottleneck_dim=8)
    assert [type(l) for l in bn.mlp] == [nn.Linear, nn.BatchNorm1d, nn.GELU] * 3 + [nn.Linear]
    assert isinstance(DINOHead(64, 10, nlayers=1, bottleneck_dim=8).mlp, nn.Linear)


def test_dino_head_outputs_are_cosines():
    h = DINOHead(48, 300, hidden_dim=64, bottleneck_dim=16)
    x = torch.randn(20, 48) * 50
    z = h(x)
    assert z.shape == (20, 300) and z.abs().max() <= 1 + 1e-6
    bottleneck = F.normalize(h.mlp(x), dim=-1)
    cos = bottleneck @ F.normalize(h.last_layer.weight_v, dim=-1).t()
    torch.testing.assert_close(z, cos)
    z.sum().backward()
    assert h.last_layer.weight_g.grad is None and h.last_layer.weight_v.grad is not None
    assert copy.deepcopy(h).state_dict().keys() == h.state_dict().keys()  # deep-copyable after a forward


def test_weight_norm_matches_torch_weight_norm():
    ours = WeightNormLinear(16, 24)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        legacy = torch.nn.utils.weight_norm(nn.Linear(16, 24, bias=False))
    legacy.load_state_dict(ours.state_dict())
    assert list(legacy.state_dict()) == list(ours.state_dict())
    x = torch.randn(5, 16)
    torch.testing.assert_close(ours(x), legacy(x))
    ours(x).square().sum().backward()
    legacy(x).square().sum().backward()
    torch.testing.assert_close(ours.weight_g.grad, legacy.weight_g.grad)
    torch.testing.assert_close(ours.weight_v.grad, legacy.weight_v.grad)
    # the newer parametrization API's names load too
    para = torch.nn.utils.parametrizations.weight_norm(nn.Linear(16, 24, bias=False))
    fresh = WeightNormLinear(16, 24)
    fresh.load_state_dict(para.state_dict())
    torch.testing.assert_close(fresh(x), para(x))
    head = DINOHead(8, 24, hidden_dim=16, bottleneck_dim=16)
    sd = {k.replace("weight_g", "parametrizations.weight.original0").replace("weight_v",
          "parametrizations.weight.original1"): v for k, v in head.state_dict().items()}
    assert load_official_weights(DINOHead(8, 24, hidden_dim=16, bottleneck_dim=16), sd) == ([], [])


# ----------------------------------------------------------------------------------------------- multi-crop


def test_multicrop_wrapper_matches_per_crop():
    backbone = vit_nano(img_size=16)
    head = DINOHead(128, 50, hidden_dim=32, bottleneck_dim=8)
    wrapper = MultiCropWrapper(backbone, head).eval()
    assert isinstance(backbone.head, nn.Identity) and not hasattr(backbone, "fc")
    assert list(wrapper.state_dict())[0] == "backbone.cls_token" and list(wrapper.state_dict())[-1] == \
        "head.last_layer.weight_v"
    calls = []
    backbone.register_forward_hook(lambda mod, inp, out: calls.append(tuple(inp[0].shape)))
    head_calls = []
    head.register_forward_hook(lambda mod, inp, out: head_calls.append(tuple(inp[0].shape)))
    crops = [torch.randn(3, 3, 16, 16), torch.randn(3, 3, 16, 16)] + [torch.randn(3, 3, 8, 8) for _ in range(4)] \
        + [torch.randn(3, 3, 16, 8)]
    with torch.no_grad():
        out = wrapper(crops)
        assert calls == [(6, 3, 16, 16), (12, 3, 8, 8), (3, 3, 16, 8)] and head_calls == [(21, 128)]
        expected = torch.cat([head(backbone(c)) for c in crops])
        torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(wrapper(crops[0]), head(backbone(crops[0])))
    assert MultiCropWrapper.resolution_runs([torch.zeros(1, 3, 8, 8), torch.zeros(1, 3, 4, 8),
                                             torch.zeros(1, 3, 4, 8), torch.zeros(1, 3, 8, 8)]) == [1, 3, 4]


def test_multicrop_wrapper_replaces_classifier():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = nn.Linear(4, 6)
            self.fc = nn.Linear(6, 1000)

        def forward(self, x):
            return self.fc(self.body(x.flatten(1)))

    w = MultiCropWrapper(Net(), nn.Identity())
    assert isinstance(w.backbone.fc, nn.Identity) and not hasattr(w.backbone, "head")
    assert w([torch.randn(2, 1, 2, 2)]).shape == (2, 6)


# ---------------------------------------------------------------------------------------------- build_backbone


def test_build_backbone_named():
    m, dim = build_backbone("vit_nano", patch_size=4, drop_path_rate=0.1, img_size=32)
    assert isinstance(m, VisionTransformer) and dim == 128 and m.pos_embed.shape == (1, 65, 128)
    assert m.blocks[-1].drop_path.drop_prob == pytest.approx(0.1)
    assert m(torch.randn(2, 3, 32, 32)).shape == (2, 128)
    m, dim = _on_meta(lambda: build_backbone("vit_small", patch_size=8))
    assert dim == 384 and m.patch_embed.patch_size == 8 and m.pos_embed.shape == (1, 785, 384)


def test_build_backbone_rejects_unknown_arch():
    with pytest.raises(ValueError, match=r"unknown arch 'vit_huge'.*vit_nano, vit_tiny, vit_small, vit_base, "
                                         r"timm:<name>"):
        build_backbone("vit_huge")
    with pytest.raises(ValueError, match="model name"):
        build_backbone("timm:")


def test_build_backbone_timm_missing(monkeypatch):
    monkeypatch.setitem(sys.modules, "timm", None)  # makes `import timm` fail whether or not it is installed
    with pytest.raises(ImportError, match="pip install timm"):
        build_backbone("timm:resnet50")


def test_build_backbone_timm_lazy(monkeypatch):
    created = []

    def create_model(name, **kwargs):
        created.append((name, kwargs))
        net = nn.Linear(3, 2048)
        net.num_features = 2048
        return net

    monkeypatch.setitem(sys.modules, "timm", types.SimpleNamespace(create_model=create_model))
    m, dim = build_backbone("timm:resnet50")
    assert dim == 2048 and created == [("resnet50", {"pretrained": False, "num_classes": 0})]
    build_backbone("timm:vit_small_patch16_224", drop_path_rate=0.1)
    assert created[-1] == ("vit_small_patch16_224", {"pretrained": False, "num_classes": 0, "drop_path_rate": 0.1})
