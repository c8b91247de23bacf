"""Linear probe, teacher entropy, the report table, and the attention-map picture."""
import math

import numpy as np
import pytest
import torch
from PIL import Image

from dinokernels.eval.attention import attention_grid, cls_attention_maps, colorize, visualize_attention
from dinokernels.eval.linear import linear_probe
from dinokernels.eval.report import collapse_verdict, format_table, summary_keys, teacher_entropy
from dinokernels.models.dino import DINOHead, MultiCropWrapper, build_backbone


def test_linear_probe_separable_and_chance():
    g = torch.Generator().manual_seed(0)
    centers = torch.randn(4, 10, generator=g) * 3
    y = torch.randint(0, 4, (400,), generator=g)
    x = centers[y] + torch.randn(400, 10, generator=g)
    acc = linear_probe(x[:300], y[:300], x[300:], y[300:])
    assert acc > 0.9
    noise = torch.randn(400, 10, generator=g)
    assert linear_probe(noise[:300], y[:300], noise[300:], y[300:], epochs=50) < 0.6
    assert linear_probe(x[:300], y[:300], x[300:], y[300:]) == acc  # deterministic


def test_teacher_entropy_and_verdict():
    backbone, dim = build_backbone("vit_nano", patch_size=4, img_size=16)
    teacher = MultiCropWrapper(backbone, DINOHead(dim, 50, hidden_dim=16, bottleneck_dim=8))
    data = [(torch.randn(6, 3, 16, 16), torch.zeros(6))]
    e = teacher_entropy(teacher, data, torch.zeros(1, 50), 0.04)
    assert 0 <= e["teacher_entropy"] <= math.log(50) + 1e-6 and 0 <= e["teacher_mean_entropy"] <= math.log(50) + 1e-6
    assert e["teacher_entropy"] <= e["teacher_mean_entropy"] + 1e-6  # concavity
    assert e["ln_K"] == pytest.approx(math.log(50))
    hot = teacher_entropy(teacher, data, torch.zeros(1, 50), 1e4)  # huge temperature: uniform targets
    assert collapse_verdict(hot) == "collapsed to uniform"
    assert collapse_verdict({"ln_K": 5.0, "teacher_entropy": 0.01, "teacher_mean_entropy": 0.02}) == \
        "collapsed to one prototype"
    assert collapse_verdict({"ln_K": 5.0, "teacher_entropy": 1.0, "teacher_mean_entropy": 4.0}) == "ok"


def test_table_and_summary_keys():
    results = {"learned (teacher)": {"knn": 0.9, "linear": 0.95}, "random init": {"knn": 0.5, "linear": 0.7},
               "raw pixels": {"knn": 0.97}}
    table = format_table(results, {"ln_K": math.log(1024), "teacher_entropy": 2.0, "teacher_mean_entropy": 6.0,
                                   "teacher_temp": 0.04})
    assert "90.0%" in table and "50.0%" in table and "97.0%" in table and "verdict: ok" in table
    assert summary_keys(results) == {"knn_learned": 0.9, "linear_learned": 0.95, "knn_random_init": 0.5,
                                     "linear_random_init": 0.7, "knn_raw_pixels": 0.97}


def test_cls_attention_maps_match_last_selfattention():
    model, _ = build_backbone("vit_nano", patch_size=4, img_size=16)
    x = torch.randn(3, 18, 13)  # cropped to 16 × 12
    maps = cls_attention_maps(model, x, upsample=False)
    attn = model.get_last_selfattention(x[None, :, :16, :12])
    assert maps.shape == (4, 4, 3)
    torch.testing.assert_close(maps, attn[0, :, 0, 1:].reshape(4, 4, 3))
    up = cls_attention_maps(model, x)
    assert up.shape == (4, 16, 12) and torch.equal(up[:, ::4, ::4], maps)
    assert float(maps.sum(dim=(1, 2)).max()) <= 1 + 1e-5


def test_colorize_and_grid(tmp_path):
    rgb = colorize(np.array([[0.0, 0.5], [1.0, 2.0]]))
    assert rgb.shape == (2, 2, 3) and rgb.dtype == np.uint8
    assert tuple(rgb[0, 0]) == (68, 1, 84) and tuple(rgb[1, 1]) == (253, 231, 37)  # viridis ends
    assert colorize(np.ones((2, 2))).shape == (2, 2, 3)  # constant map: no division by zero
    grid = attention_grid(np.zeros((8, 8, 3), np.uint8), torch.rand(6, 8, 8), tile=32)
    assert grid.size == (7 * 36 + 4, 36 + 4 + 14)


def test_visualize_attention_png(tmp_path):
    model, _ = build_backbone("vit_nano", patch_size=4, img_size=32)
    img_path = tmp_path / "img.png"
    Image.fromarray((np.random.default_rng(0).random((40, 50, 3)) * 255).astype(np.uint8)).save(img_path)
    out = visualize_attention(model, str(img_path), str(tmp_path / "maps" / "attn.png"), image_size=32, tile=48)
    with Image.open(out) as im:
        assert im.format == "PNG" and im.size == (5 * 52 + 4, 52 + 4 + 14)
