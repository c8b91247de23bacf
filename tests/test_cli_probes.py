"""`dinokernels probe seg|depth`: the synthetic demo writes metrics, head and coloured predictions; a saved head
is evaluated again with --head; a DINOv2 weight file works as --checkpoint on folders (16-bit depth PNGs out);
bad input is one line with exit code 2."""
import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

from dinokernels.cli import main
from dinokernels.data.synthetic_dense import write_dense_dataset
from dinokernels.models.dinov2 import DinoVisionTransformer

SMALL = ["--num-train", "16", "--num-val", "6", "--epochs", "2", "--quiet"]


def exit_code(argv):
    try:
        return main(argv)
    except SystemExit as e:  # argparse flag errors
        return e.code


def test_probe_seg_synthetic_demo_and_saved_head(capsys, tmp_path):
    out = str(tmp_path / "seg")
    assert main(["probe", "seg", "--synthetic", "--out", out, *SMALL]) == 0
    printed = capsys.readouterr().out
    assert printed.startswith("probe seg: mIoU ") and "on 6 image(s)" in printed
    assert {"metrics.json", "head.pth", "examples.png", "predictions", "synthetic"} <= set(os.listdir(out))
    report = json.load(open(os.path.join(out, "metrics.json")))
    assert report["task"] == "seg" and report["settings"]["num_classes"] == 4 and len(report["train_loss"]) == 2
    assert report["train"]["images"] == 16 and report["val"]["images"] == 6
    assert 0.0 <= report["metrics"]["miou"] <= 1.0 and report["baseline"]["predicts_class"] == 0
    preds = sorted(os.listdir(os.path.join(out, "predictions")))
    assert len(preds) == 6
    with Image.open(os.path.join(out, "predictions", preds[0])) as img:  # palette PNG: colours that read as classes
        assert img.mode == "P" and img.size == (64, 64) and set(np.unique(np.asarray(img))) <= {0, 1, 2, 3}

    again = str(tmp_path / "again")
    assert main(["probe", "seg", "--synthetic", "--head", os.path.join(out, "head.pth"), "--out", again,
                 *SMALL]) == 0
    second = json.load(open(os.path.join(again, "metrics.json")))
    assert second["train"] is None and second["metrics"] == report["metrics"]  # same head, same val data
    assert "head.pth" not in os.listdir(again)


def test_probe_depth_with_a_weight_file_on_folders(capsys, tmp_path):
    torch.manual_seed(0)
    backbone = DinoVisionTransformer(img_size=32, patch_size=8, embed_dim=64, depth=1, num_heads=1, init_values=1.0)
    ckpt = str(tmp_path / "tiny_dinov2.pth")
    torch.save(backbone.state_dict(), ckpt)
    train = write_dense_dataset(str(tmp_path / "train"), "depth", 8, 48, seed=0)
    val = write_dense_dataset(str(tmp_path / "val"), "depth", 3, 40, seed=1)  # any label size is evaluated as is
    os.remove(os.path.join(val, "depth", "0002.png"))  # an image without depth: skipped and counted
    out = str(tmp_path / "depth")
    assert main(["probe", "depth", "--checkpoint", ckpt, "--train", train, "--val", val, "--out", out,
                 "--image-size", "32", "--epochs", "2", "--quiet"]) == 0
    assert "1 file(s) skipped" in capsys.readouterr().out
    report = json.load(open(os.path.join(out, "metrics.json")))
    assert report["settings"]["with_cls"] is True and report["val"]["images"] == 2
    assert report["val"]["skipped"][0]["reason"] == "no depth/0002.* label"
    assert report["metrics"]["rmse"] > 0 and 0 <= report["metrics"]["delta1"] <= 1
    with Image.open(os.path.join(out, "depth_mm", "0000.png")) as img:
        assert img.mode.startswith("I;16") and img.size == (40, 40) and np.asarray(img).min() >= 1
    with Image.open(os.path.join(out, "predictions", "0001.png")) as img:
        assert img.mode == "RGB" and img.size == (40, 40)


@pytest.mark.parametrize("argv, message", [
    (["probe", "seg", "--out", "{tmp}/o", "--val", "{tmp}"], "--checkpoint is required"),
    (["probe", "seg", "--checkpoint", "{tmp}/none.pth", "--train", "{tmp}", "--out", "{tmp}/o"], "--val is required"),
    (["probe", "depth", "--checkpoint", "{tmp}/none.pth", "--train", "{tmp}", "--val", "{tmp}", "--out", "{tmp}/o"],
     "--checkpoint: checkpoint"),
    (["probe", "seg", "--synthetic", "--train", "{tmp}", "--out", "{tmp}/o"], "leave out --train and --val"),
    (["probe", "seg", "--synthetic", "--image-size", "60", "--out", "{tmp}/o"], "not a multiple of the patch size 8"),
    (["probe", "depth", "--synthetic", "--silog-lambda", "1", "--out", "{tmp}/o"], "out of range"),
    (["probe", "seg", "--synthetic", "--epochs", "0", "--out", "{tmp}/o"], "out of range"),
])
def test_probe_bad_flags_are_one_line_exit_2(capsys, tmp_path, argv, message):
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    assert exit_code(argv) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1, err


def test_probe_bad_data_is_one_line_exit_2(capsys, tmp_path):
    torch.manual_seed(0)
    ckpt = str(tmp_path / "w.pth")
    torch.save(DinoVisionTransformer(img_size=32, patch_size=8, embed_dim=64, depth=1, num_heads=1).state_dict(), ckpt)
    seg = write_dense_dataset(str(tmp_path / "seg"), "seg", 3, 32, seed=0)
    depth_only = write_dense_dataset(str(tmp_path / "depth"), "depth", 2, 32, seed=0)
    base = ["--checkpoint", ckpt, "--out", str(tmp_path / "o"), "--image-size", "32", "--epochs", "1", "--quiet"]
    cases = [
        (["probe", "seg", "--train", depth_only, "--val", seg, *base], "has no masks/ folder"),
        (["probe", "seg", "--train", seg, "--val", seg, "--num-classes", "2", *base], "--num-classes 2"),
    ]
    empty = tmp_path / "empty"
    (empty / "images").mkdir(parents=True)
    (empty / "masks").mkdir()
    cases.append((["probe", "seg", "--train", seg, "--val", str(empty), *base], "no image/label pairs"))
    for argv, message in cases:
        assert exit_code(argv) == 2
        err = capsys.readouterr().err.strip()
        assert message in err and len(err.splitlines()) == 1, err
    # a head of the other task
    assert main(["probe", "seg", "--train", seg, "--val", seg, *base]) == 0
    capsys.readouterr()
    assert exit_code(["probe", "depth", "--head", str(tmp_path / "o" / "head.pth"), "--val", depth_only,
                      *base]) == 2
    assert "is a seg head, not depth" in capsys.readouterr().err
