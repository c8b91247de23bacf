"""load_feature_model: every checkpoint format round-trips through a file with tiny random models, and the features
equal the source model's own outputs; bad inputs are one clear error."""
import json
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from feature_test_helpers import tiny_dinov2  # noqa: E402

from dinokernels.features import FeatureModel, dinov2_kwargs_from_shapes, load_feature_model  # noqa: E402
from dinokernels.features.backbone import checkpoint_fingerprint  # noqa: E402
from dinokernels.models.dino import DINOHead, MultiCropWrapper, build_backbone  # noqa: E402

MANIFESTS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "fixtures", "official_keys")


def dinov2_reference(model, x):
    out = model.forward_features(x)
    B, _, H, W = x.shape
    p = model.patch_size
    return out["x_norm_clstoken"], out["x_norm_patchtokens"].reshape(B, H // p, W // p, -1)


def assert_features(fm: FeatureModel, cls, patches, x):
    got = fm.forward_features(x)
    assert set(got) == {"cls", "patch_mean", "patch_tokens"}
    torch.testing.assert_close(got["cls"], cls, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got["patch_tokens"], patches, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got["patch_mean"], patches.flatten(1, 2).mean(1), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("registers,ffn,chunks", [(0, "mlp", 0), (2, "mlp", 2), (0, "swiglufused", 0)])
def test_dinov2_weight_file_architecture_inferred(tmp_path, registers, ffn, chunks):
    model = tiny_dinov2(registers=registers, ffn=ffn, chunks=chunks)
    path = tmp_path / "w.pth"
    torch.save(model.state_dict(), path)
    fm = load_feature_model(str(path))
    assert fm.kind == "dinov2" and fm.patch_size == 4 and fm.embed_dim == 64
    assert fm.num_register_tokens == registers and not fm.training
    assert fm.mean == pytest.approx((0.485, 0.456, 0.406)) and fm.default_image_size % 4 == 0
    with torch.no_grad():
        for size in [(16, 16), (12, 20)]:  # the stored grid, and interpolated position embeddings
            x = torch.randn(2, 3, *size)
            assert_features(fm, *dinov2_reference(model, x), x)


def test_dinov2_training_layout_and_safetensors_and_transformers_state_dict(tmp_path):
    model = tiny_dinov2(registers=1, seed=3)
    x = torch.randn(1, 3, 16, 16)
    ref = dinov2_reference(model, x)
    heads = {"dino_head.mlp.0.weight": torch.randn(8, 64), "ibot_head.mlp.0.weight": torch.randn(8, 64)}
    teacher = {"backbone." + k: v for k, v in model.state_dict().items()} | heads
    torch.save({"teacher": teacher, "iteration": 5}, tmp_path / "teacher_checkpoint.pth")
    assert_features(load_feature_model(str(tmp_path / "teacher_checkpoint.pth")), *ref, x)
    with pytest.raises(ValueError, match="no 'student' entry"):
        load_feature_model(str(tmp_path / "teacher_checkpoint.pth"), which="student")

    both = {"student.backbone." + k: v + 1 for k, v in model.state_dict().items()}
    both |= {"teacher.backbone." + k: v for k, v in model.state_dict().items()} | {"teacher.dino_head.w": heads[
        "dino_head.mlp.0.weight"]}
    torch.save({"model": both, "iteration": 9}, tmp_path / "model_0000009.rank_0.pth")
    assert_features(load_feature_model(str(tmp_path / "model_0000009.rank_0.pth")), *ref, x)
    student = load_feature_model(str(tmp_path / "model_0000009.rank_0.pth"), which="student")
    torch.testing.assert_close(student.backbone.cls_token, model.cls_token + 1)

    from safetensors.torch import save_file
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp_path / "w.safetensors"))
    assert_features(load_feature_model(str(tmp_path / "w.safetensors")), *ref, x)


def test_width_without_a_64_channel_head_count_needs_num_heads(tmp_path):
    model = tiny_dinov2(embed_dim=48, heads=3)
    torch.save(model.state_dict(), tmp_path / "w.pth")
    with pytest.raises(ValueError, match="num_heads"):
        load_feature_model(str(tmp_path / "w.pth"))
    fm = load_feature_model(str(tmp_path / "w.pth"), num_heads=3)
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        assert_features(fm, *dinov2_reference(model, x), x)


@pytest.mark.parametrize("name", ["dinov2_vits14", "dinov2_vitb14_reg", "dinov2_vitl14", "dinov2_vitg14",
                                  "dinov2_vitg14_reg"])
def test_official_manifests_give_the_hub_architectures(name):
    from dinokernels.models.dinov2 import HUB_MODELS

    manifest = json.load(open(os.path.join(MANIFESTS, name + ".json")))
    kwargs = dinov2_kwargs_from_shapes(manifest["keys"])
    expected = {"dinov2_vits14": (384, 12, 6), "dinov2_vitb14_reg": (768, 12, 12), "dinov2_vitl14": (1024, 24, 16),
                "dinov2_vitg14": (1536, 40, 24), "dinov2_vitg14_reg": (1536, 40, 24)}[name]
    assert (kwargs["embed_dim"], kwargs["depth"], kwargs["num_heads"]) == expected
    assert kwargs["img_size"] == 518 and kwargs["patch_size"] == 14 and kwargs["init_values"] == 1.0
    assert kwargs["ffn_layer"] == ("swiglufused" if "vitg" in name else "mlp") and kwargs["mlp_ratio"] == 4
    registers = name.endswith("_reg")
    assert kwargs["num_register_tokens"] == (4 if registers else 0)
    assert (kwargs["interpolate_offset"], kwargs["interpolate_antialias"]) == ((0.0, True) if registers
                                                                                else (0.1, False))
    if "vitg" not in name:  # the inferred model has exactly the manifest's keys and shapes (ViT-g: too big here)
        from dinokernels.models.dinov2 import DinoVisionTransformer
        with torch.device("meta"):
            built = DinoVisionTransformer(**kwargs)
        assert {k: list(v.shape) for k, v in built.state_dict().items()} == manifest["keys"]
        assert set(HUB_MODELS)  # the hub builders exist for the same names


def test_official_small_file_of_zeros_loads(tmp_path):
    manifest = json.load(open(os.path.join(MANIFESTS, "dinov2_vits14_reg.json")))
    torch.save({k: torch.zeros(s) for k, s in manifest["keys"].items()}, tmp_path / "dinov2_vits14_reg4.pth")
    fm = load_feature_model(str(tmp_path / "dinov2_vits14_reg4.pth"))
    assert (fm.patch_size, fm.embed_dim, fm.num_register_tokens, fm.default_image_size) == (14, 384, 4, 224)
    out = fm.forward_features(torch.randn(1, 3, 28, 42))
    assert out["patch_tokens"].shape == (1, 2, 3, 384) and out["cls"].shape == (1, 384)


def test_dino_v1_backbone_and_full_checkpoint(tmp_path):
    torch.manual_seed(0)
    backbone, dim = build_backbone("vit_nano", patch_size=4, img_size=16)
    torch.save(backbone.state_dict(), tmp_path / "plain.pth")
    x = torch.randn(2, 3, 16, 24)
    with torch.no_grad():
        tokens = backbone.get_intermediate_layers(x, 1)[0]
    ref = tokens[:, 0], tokens[:, 1:].reshape(2, 4, 6, dim)
    fm = load_feature_model(str(tmp_path / "plain.pth"))
    assert fm.kind == "dino" and fm.patch_size == 4 and fm.embed_dim == 128
    assert_features(fm, *ref, x)

    teacher = MultiCropWrapper(backbone, DINOHead(dim, 16, hidden_dim=8, bottleneck_dim=4))
    student = {"module." + k: v * 0.5 for k, v in teacher.state_dict().items()}
    torch.save({"teacher": teacher.state_dict(), "student": student, "epoch": 1}, tmp_path / "full.pth")
    assert_features(load_feature_model(str(tmp_path / "full.pth")), *ref, x)
    s = load_feature_model(str(tmp_path / "full.pth"), which="student")
    torch.testing.assert_close(s.backbone.pos_embed, backbone.pos_embed * 0.5)


def test_pretrain_checkpoints_dino_and_dinov2(tmp_path):
    from dinokernels.train.config import PretrainConfig
    from dinokernels.train.methods import DINOv2TrainingMethod, build_dinov2_backbone
    from dinokernels.train.trainer import CHECKPOINT_FORMAT

    cfg = PretrainConfig(method="dinov2", arch="vit_nano", patch_size=4, global_size=16, local_size=8,
                         num_register_tokens=1)
    model, _ = build_dinov2_backbone(cfg, 0.0)
    model.eval()
    state = {"teacher.backbone." + k: v for k, v in model.state_dict().items()}
    state |= {"student.backbone." + k: v + 1 for k, v in model.state_dict().items()}
    torch.save({"format": DINOv2TrainingMethod.checkpoint_format, "config": cfg.to_dict(), "method": state},
               tmp_path / "v2.pth")
    fm = load_feature_model(str(tmp_path / "v2.pth"))
    from dinokernels.data import DIGITS_MEAN
    assert fm.kind == "dinov2" and fm.mean == pytest.approx(DIGITS_MEAN) and fm.default_image_size == 16
    x = torch.randn(1, 3, 16, 16)
    with torch.no_grad():
        assert_features(fm, *dinov2_reference(model, x), x)
    st = load_feature_model(str(tmp_path / "v2.pth"), which="student")
    torch.testing.assert_close(st.backbone.pos_embed, model.pos_embed + 1)

    cfg1 = PretrainConfig(arch="vit_nano", patch_size=4, global_size=16, local_size=8, data="/somewhere")
    backbone, dim = build_backbone("vit_nano", patch_size=4, img_size=16)
    wrapped = MultiCropWrapper(backbone, DINOHead(dim, 16, hidden_dim=8, bottleneck_dim=4))
    torch.save({"format": CHECKPOINT_FORMAT, "config": cfg1.to_dict(), "teacher": wrapped.state_dict(),
                "student": wrapped.state_dict()}, tmp_path / "v1.pth")
    fm1 = load_feature_model(str(tmp_path / "v1.pth"))
    assert fm1.kind == "dino" and fm1.mean == pytest.approx((0.485, 0.456, 0.406))
    assert fm1.default_image_size == 224
    torch.testing.assert_close(fm1.backbone.pos_embed, backbone.pos_embed)


def test_transformers_model_folder(tmp_path):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.Dinov2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, mlp_ratio=4,
                                       image_size=16, patch_size=4, layerscale_value=0.5)
    hf = transformers.Dinov2Model(config).eval()
    with torch.no_grad():
        for p in hf.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    hf.save_pretrained(str(tmp_path / "hf"))
    json.dump({"image_mean": [0.5, 0.5, 0.5], "image_std": [0.25, 0.25, 0.25], "crop_size": {"height": 20,
                                                                                              "width": 20}},
              open(tmp_path / "hf" / "preprocessor_config.json", "w"))
    fm = load_feature_model(str(tmp_path / "hf"))
    assert fm.mean == (0.5, 0.5, 0.5) and fm.std == (0.25, 0.25, 0.25) and fm.default_image_size == 20
    for size in [(16, 16), (20, 12)]:
        x = torch.randn(2, 3, *size)
        with torch.no_grad():
            hidden = hf(pixel_values=x).last_hidden_state
        ref = hidden[:, 0], hidden[:, 1:].reshape(2, size[0] // 4, size[1] // 4, 32)
        assert_features(fm, *ref, x)
    # the same weights as a state dict file (transformers names) load too, with transformers' interpolation
    torch.save(hf.state_dict(), tmp_path / "hf_state.pth")
    fm2 = load_feature_model(str(tmp_path / "hf_state.pth"), num_heads=2)
    x = torch.randn(1, 3, 20, 12)
    with torch.no_grad():
        hidden = hf(pixel_values=x).last_hidden_state
    assert_features(fm2, hidden[:, 0], hidden[:, 1:].reshape(1, 5, 3, 32), x)


def test_bad_checkpoints_are_one_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such file"):
        load_feature_model(str(tmp_path / "missing.pth"))
    (tmp_path / "empty.pth").write_bytes(b"")
    with pytest.raises(ValueError, match="empty"):
        load_feature_model(str(tmp_path / "empty.pth"))
    (tmp_path / "junk.pth").write_bytes(os.urandom(300))
    with pytest.raises(ValueError, match="cannot be read"):
        load_feature_model(str(tmp_path / "junk.pth"))
    os.makedirs(tmp_path / "folder")
    with pytest.raises(ValueError, match="config.json"):
        load_feature_model(str(tmp_path / "folder"))
    json.dump({"model_type": "bert"}, open(tmp_path / "folder" / "config.json", "w"))
    with pytest.raises(ValueError, match="'bert'"):
        load_feature_model(str(tmp_path / "folder"))
    torch.save({"epoch": 3, "lr": 0.1}, tmp_path / "nodict.pth")
    with pytest.raises(ValueError, match="unknown format"):
        load_feature_model(str(tmp_path / "nodict.pth"))
    torch.save({"fc.weight": torch.zeros(2, 2)}, tmp_path / "linear.pth")
    with pytest.raises(ValueError, match="unknown format"):
        load_feature_model(str(tmp_path / "linear.pth"))
    torch.save({"format": "dinokernels.grounding_detector.v1", "model": {}}, tmp_path / "det.pth")
    with pytest.raises(ValueError, match="grounding_detector"):
        load_feature_model(str(tmp_path / "det.pth"))
    model = tiny_dinov2()
    sd = model.state_dict()
    sd["blocks.0.attn.qkv.weight"] = sd["blocks.0.attn.qkv.weight"][:-1]  # a damaged file
    torch.save(sd, tmp_path / "damaged.pth")
    with pytest.raises(ValueError, match="damaged.pth"):
        load_feature_model(str(tmp_path / "damaged.pth"))
    torch.save(model.state_dict(), tmp_path / "ok.pth")
    with pytest.raises(ValueError, match="which"):
        load_feature_model(str(tmp_path / "ok.pth"), which="ema")
    with pytest.raises(ValueError, match="device"):
        load_feature_model(str(tmp_path / "ok.pth"), device="tpu:9")


def test_forward_features_rejects_bad_images(tmp_path):
    fm = FeatureModel(tiny_dinov2(), "dinov2", 4, 64)
    with pytest.raises(ValueError, match="multiple of the patch size 4"):
        fm.forward_features(torch.randn(1, 3, 16, 18))
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        fm.forward_features(torch.randn(3, 16, 16))
    with pytest.raises(ValueError, match="empty batch"):
        fm.forward_features(torch.randn(0, 3, 16, 16))
    with pytest.raises(TypeError, match="float"):
        fm.forward_features(torch.zeros(1, 3, 16, 16, dtype=torch.uint8))
    fm.train()
    assert not fm.training and not fm.backbone.training  # stays frozen


def test_fingerprint_follows_content_not_path(tmp_path):
    model = tiny_dinov2()
    torch.save(model.state_dict(), tmp_path / "a.pth")
    os.makedirs(tmp_path / "moved")
    os.replace(tmp_path / "a.pth", tmp_path / "moved" / "a.pth")
    first = checkpoint_fingerprint(str(tmp_path / "moved" / "a.pth"))
    torch.save(tiny_dinov2(seed=1).state_dict(), tmp_path / "b.pth")
    assert first != checkpoint_fingerprint(str(tmp_path / "b.pth"))
    import shutil
    shutil.copy(tmp_path / "moved" / "a.pth", tmp_path / "copy.pth")  # torch.save's archive holds the file name
    assert first == checkpoint_fingerprint(str(tmp_path / "copy.pth"))
