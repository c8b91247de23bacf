"""`dinokernels detect`: PNGs with boxes and detections.json from a train-detector checkpoint and from a released-format
checkpoint (Swin-T with a small local BERT folder); one-line errors with exit codes 1/2 and nothing written for a
missing, corrupt or mismatched checkpoint, an unreadable image, an empty or too long prompt."""
import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

from dinokernels.cli import main
from dinokernels.models.grounding_dino.predictor import GroundingDINOPredictor
from dinokernels.train.detector import (CHECKPOINT_FORMAT, build_detector, make_detector_config, model_spec)

NAMES = ["red circle", "blue square"]


@pytest.fixture(scope="module")
def detector_ckpt(tmp_path_factory):
    """A train-detector checkpoint of the small model (random weights, as `train-detector` writes them)."""
    config = make_detector_config(image_size=96, num_queries=12)
    spec = model_spec(config, NAMES)
    torch.manual_seed(0)
    model, _ = build_detector(spec)
    path = tmp_path_factory.mktemp("ckpt") / "checkpoint.pth"
    torch.save({"format": CHECKPOINT_FORMAT, "model": model.state_dict(), "model_spec": spec,
                "category_names": NAMES, "config": config.to_dict()}, path)
    return path, model


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    folder = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    paths = []
    for name, (h, w) in [("a.png", (60, 90)), ("b.jpg", (80, 50))]:
        path = folder / name
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(path)
        paths.append(path)
    return paths


def _run(capsys, *argv):
    try:
        code = main([str(a) for a in argv])
    except SystemExit as e:  # argparse's usage errors
        code = e.code
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_detect_writes_pngs_and_json(detector_ckpt, images, tmp_path, capsys):
    ckpt, model = detector_ckpt
    out = tmp_path / "out"
    code, stdout, err = _run(capsys, "detect", "--checkpoint", ckpt, "--image", *images, "--prompt",
                             "red circle . blue square .", "--out", out, "--box-threshold", "0.0")
    assert code == 0, err
    assert sorted(os.listdir(out)) == ["a.png", "b.png", "detections.json"]
    report = json.loads((out / "detections.json").read_text())
    assert report["checkpoint_kind"] == "train-detector" and report["image_size"] == [96, 96]
    assert [r["output"] for r in report["images"]] == ["a.png", "b.png"]
    # The JSON holds what the predictor gives for the same model, prompt and sizes.
    predictor = GroundingDINOPredictor(model, image_size=(96, 96), box_threshold=0.0)
    want = predictor.predict([str(p) for p in images], "red circle . blue square .")
    for entry, res, path in zip(report["images"], want, images):
        with Image.open(path) as im:
            assert (entry["width"], entry["height"]) == im.size
        assert len(entry["detections"]) == len(res["scores"]) == 12  # box threshold 0 keeps every query
        got_boxes = torch.tensor([d["box_xyxy"] for d in entry["detections"]])
        torch.testing.assert_close(got_boxes, res["boxes"], atol=2e-3, rtol=0)
        assert [d["phrase"] for d in entry["detections"]] == res["phrases"]
        with Image.open(out / entry["output"]) as drawn, Image.open(path) as original:
            assert drawn.size == original.size
            # the boxes are drawn: the output differs from the input
            assert np.abs(np.asarray(drawn.convert("RGB"), dtype=np.int16)
                          - np.asarray(original.convert("RGB"), dtype=np.int16)).max() > 0
    assert "24 detection(s) in 2 image(s)" in stdout


def test_detect_released_checkpoint_with_text_encoder(tmp_path, images, capsys):
    """A released-format file ({"model": state dict} with the official names) of a Swin-T model, read with a local
    BERT folder (a small BERT here, the checkpoint built with the same one)."""
    from transformers import BertConfig, BertModel

    from dinokernels.models.grounding_dino import grounding_dino_swint_ogc
    from dinokernels.models.grounding_dino.text import tiny_vocab

    bert_dir = tmp_path / "bert"
    torch.manual_seed(0)
    BertModel(BertConfig(vocab_size=1040, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                         intermediate_size=64)).save_pretrained(bert_dir)
    (bert_dir / "vocab.txt").write_text("\n".join(tiny_vocab(["cat", "dog"])) + "\n")
    model = grounding_dino_swint_ogc(text_encoder=str(bert_dir), num_queries=900)
    ckpt = tmp_path / "groundingdino_swint_ogc.pth"
    torch.save({"model": {"module." + k: v for k, v in model.state_dict().items()}}, ckpt)
    out = tmp_path / "out"
    args = ["detect", "--checkpoint", ckpt, "--image", images[0], "--prompt", "cat . dog .", "--out", out,
            "--image-size", "256", "384"]
    code, _, err = _run(capsys, *args[:-3])  # no --image-size: 800 px, fine too, but slow; check flags first
    assert code == 2 and "--text-encoder" in err and not out.exists()
    code, stdout, err = _run(capsys, *args[:7], "--text-encoder", bert_dir, *args[7:], "--box-threshold", "0")
    assert code == 0, err
    report = json.loads((out / "detections.json").read_text())
    assert report["checkpoint_kind"] == "released (swint)" and report["image_size"] == [256, 384]
    assert len(report["images"][0]["detections"]) == 900
    # A checkpoint of another layout: one line naming the mismatch, exit 1, nothing written.
    state = model.state_dict()
    state["transformer.level_embed"] = torch.zeros(3, 256)
    torch.save({"model": state}, ckpt)
    out2 = tmp_path / "out2"
    code, _, err = _run(capsys, "detect", "--checkpoint", ckpt, "--text-encoder", bert_dir, "--image", images[0],
                        "--prompt", "cat .", "--out", out2)
    assert code == 1 and "transformer.level_embed" in err and len(err.strip().splitlines()) == 1
    assert not out2.exists()


@pytest.mark.parametrize("case", ["missing", "empty", "corrupt", "foreign"])
def test_bad_checkpoint(case, images, tmp_path, capsys):
    ckpt = tmp_path / "ckpt.pth"
    if case == "empty":
        ckpt.write_bytes(b"")
    elif case == "corrupt":
        ckpt.write_bytes(b"PK\x03\x04 garbage that is not a torch archive")
    elif case == "foreign":
        torch.save({"teacher": {"backbone.cls_token": torch.zeros(1, 1, 8)}}, ckpt)
    out = tmp_path / "out"
    code, _, err = _run(capsys, "detect", "--checkpoint", ckpt, "--image", images[0], "--prompt", "cat .",
                        "--out", out)
    assert code == 1, err
    assert "--checkpoint" in err and str(ckpt) in err and len(err.strip().splitlines()) == 1
    assert not out.exists()


def test_bad_images_and_prompts(detector_ckpt, images, tmp_path, capsys):
    ckpt, _ = detector_ckpt
    out = tmp_path / "out"
    base = ["detect", "--checkpoint", ckpt, "--out", out]
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    for argv, want_code, want_text in [
        ([*base, "--image", tmp_path / "missing.png", "--prompt", "red circle ."], 1, "missing.png"),
        ([*base, "--image", images[0], bad, "--prompt", "red circle ."], 1, "bad.png"),
        ([*base, "--image", images[0], "--prompt", "  "], 2, "--prompt is empty"),
        ([*base, "--image", images[0], "--prompt", " . "], 2, "--prompt is empty"),
        ([*base, "--image", images[0], "--prompt", " . ".join(["red circle"] * 40)], 2, "tokens long"),
        ([*base, "--image", images[0], "--prompt", "red .", "--box-threshold", "1.5"], 2, "--box-threshold"),
        ([*base, "--image", images[0], "--prompt", "red .", "--dtype", "float16", "--device", "cpu"], 2,
         "float16"),
        ([*base, "--image", images[0], "--prompt", "red .", "--image-size", "96", "48"], 2, "long-side cap"),
    ]:
        code, _, err = _run(capsys, *argv)
        assert code == want_code, (argv, err)
        assert want_text in err and len(err.strip().splitlines()) == 1, err
        assert not out.exists(), argv


def test_existing_out_folder_keeps_other_files(detector_ckpt, images, tmp_path, capsys):
    ckpt, _ = detector_ckpt
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    code, _, err = _run(capsys, "detect", "--checkpoint", ckpt, "--image", images[0], images[0], "--prompt",
                        "blue square", "--out", out)
    assert code == 0, err
    # two images with one stem get distinct outputs; no staging folder is left behind
    assert sorted(os.listdir(out)) == ["a-2.png", "a.png", "detections.json", "notes.txt"]
    file_out = tmp_path / "file"
    file_out.write_text("x")
    code, _, err = _run(capsys, "detect", "--checkpoint", ckpt, "--image", images[0], "--prompt", "blue square",
                        "--out", file_out)
    assert code == 2 and "not a folder" in err
