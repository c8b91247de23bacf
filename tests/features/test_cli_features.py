"""`dinokernels embed` and `dinokernels retrieve` end to end on generated folders; bad input is one line, exit 2
(usage) or 1 (a file that cannot be read), as every other command."""
import json
import os
import sys

import numpy as np
import pytest
import torch
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from feature_test_helpers import tiny_dinov2, write_image_folder  # noqa: E402

from dinokernels.cli import main  # noqa: E402
from dinokernels.features import load_embeddings, retrieval_metrics  # noqa: E402
from dinokernels.features.retrieve import labels_from_folders  # noqa: E402


def cli(capsys, *argv):
    try:
        rc = main([str(a) for a in argv])
    except SystemExit as e:
        rc = e.code
    out, err = capsys.readouterr()
    return rc, out, err


def one_line_error(rc, err, code, *needles):
    lines = [x for x in err.splitlines() if x.strip()]
    assert rc == code, (rc, err)
    assert len(lines) == 1 and "error:" in lines[0] and "Traceback" not in err, err
    for n in needles:
        assert n in lines[0], (n, lines[0])


@pytest.fixture
def files(tmp_path):
    ckpt = tmp_path / "w.pth"
    torch.save(tiny_dinov2().state_dict(), ckpt)
    gallery = tmp_path / "gallery"
    write_image_folder(str(gallery), classes=("red", "green", "blue"), per_class=4, seed=1)
    query = tmp_path / "query"
    write_image_folder(str(query), classes=("red", "green", "blue"), per_class=1, seed=1)  # same class colours
    return str(ckpt), str(query), str(gallery), tmp_path


def test_embed_command(files, capsys):
    ckpt, _, gallery, tmp = files
    out = tmp / "emb"
    rc, stdout, err = cli(capsys, "embed", "--checkpoint", ckpt, "--data", gallery, "--out", out, "--what", "cls",
                          "patch_tokens", "--image-size", "16", "--batch-size", "5", "--no-progress")
    assert rc == 0, err
    assert "embedded 12 of 12 images" in stdout and "1 shard" in stdout
    assert sorted(os.listdir(out)) == ["manifest.jsonl", "meta.json", "patch_00000.npy", "shard_00000.npy"]
    rc, stdout, _ = cli(capsys, "embed", "--checkpoint", ckpt, "--data", gallery, "--out", out, "--what", "cls",
                        "patch_tokens", "--image-size", "16", "--no-progress")
    assert rc == 0 and "resumed after 12 files" in stdout


def test_retrieve_command_with_metrics_json_and_grid(files, capsys):
    ckpt, query, gallery, tmp = files
    cache = tmp / "cache"
    rc, stdout, err = cli(capsys, "retrieve", "--checkpoint", ckpt, "--query", query, "--gallery", gallery,
                          "--image-size", "16", "--k", "1", "3", "--out", tmp / "res" / "r.json", "--grid",
                          tmp / "g.png", "--cache", cache, "--no-progress")
    assert rc == 0, err
    assert "mAP" in stdout and "recall@3" in stdout
    report = json.load(open(tmp / "res" / "r.json"))
    qp, qf = load_embeddings(str(cache / "query"))
    gp, gf = load_embeddings(str(cache / "gallery"))
    expected = retrieval_metrics(qf, gf, labels_from_folders(qp, query), labels_from_folders(gp, gallery), (1, 3))
    assert report["metrics"] == pytest.approx(expected)
    assert len(report["queries"]) == 3 and all(len(q["results"]) == 3 for q in report["queries"])
    first = report["queries"][0]
    assert first["label"] == os.path.basename(os.path.dirname(first["path"]))
    scores = [r["score"] for r in first["results"]]
    assert scores == sorted(scores, reverse=True)
    assert Image.open(tmp / "g.png").size[0] > 0

    # the same from the cached embeddings, without a checkpoint; the query set against itself leaves each out
    rc, stdout2, err = cli(capsys, "retrieve", "--embeddings", cache / "query", cache / "gallery", "--k", "1", "3",
                           "--out", tmp / "r2.json")
    assert rc == 0, err
    assert json.load(open(tmp / "r2.json"))["metrics"] == report["metrics"]
    rc, _, err = cli(capsys, "retrieve", "--embeddings", cache / "gallery", "--k", "2", "--out", tmp / "r3.json")
    assert rc == 0, err
    for q in json.load(open(tmp / "r3.json"))["queries"]:
        assert q["path"] not in [r["path"] for r in q["results"]]


def test_retrieve_with_csv_labels(files, capsys):
    ckpt, query, gallery, tmp = files
    rows = ["path,label"] + [f"{c}/{i:03d}.{'png' if i % 2 == 0 else 'jpg'},{'warm' if c == 'red' else 'cold'}"
                             for c in ("red", "green", "blue") for i in range(4)]
    (tmp / "labels.csv").write_text("\n".join(rows) + "\n")
    rc, stdout, err = cli(capsys, "retrieve", "--checkpoint", ckpt, "--query", gallery, "--gallery", gallery,
                          "--labels", tmp / "labels.csv", "--image-size", "16", "--k", "1", "--out", tmp / "r.json",
                          "--no-progress")
    assert rc == 0, err
    report = json.load(open(tmp / "r.json"))
    assert {q["label"] for q in report["queries"]} == {"warm", "cold"}
    assert report["metrics"]["scored_queries"] == 12
    rc, stdout, err = cli(capsys, "retrieve", "--checkpoint", ckpt, "--query", query, "--gallery", gallery,
                          "--labels", "none", "--image-size", "16", "--no-progress")
    assert rc == 0 and "no metrics" in stdout


def test_bad_input_is_one_line(files, capsys):
    ckpt, query, gallery, tmp = files
    base = ["embed", "--checkpoint", ckpt, "--data", gallery, "--no-progress"]
    one_line_error(*cli(capsys, *base[:-2], tmp / "nowhere", "--out", tmp / "o")[::2], 2, "--data", "no such folder")
    one_line_error(*cli(capsys, "embed", "--checkpoint", tmp / "missing.pth", "--data", gallery, "--out",
                        tmp / "o")[::2], 2, "--checkpoint", "no such file")
    one_line_error(*cli(capsys, *base, "--out", tmp / "o", "--image-size", "18")[::2], 2, "--image-size 18",
                   "patch size 4")
    one_line_error(*cli(capsys, *base, "--out", tmp / "o", "--batch-size", "0")[::2], 2, "--batch-size")
    one_line_error(*cli(capsys, *base, "--out", tmp / "o", "--what", "pixels")[::2], 2, "--what")
    one_line_error(*cli(capsys, *base, "--out", tmp / "o", "--device", "tpu")[::2], 2, "--device")
    assert not os.path.exists(tmp / "o")
    (tmp / "junk.pth").write_bytes(b"\x00garbage" * 10)
    one_line_error(*cli(capsys, "embed", "--checkpoint", tmp / "junk.pth", "--data", gallery, "--out",
                        tmp / "o")[::2], 1, "junk.pth")
    assert cli(capsys, *base, "--out", tmp / "o", "--image-size", "16")[0] == 0
    one_line_error(*cli(capsys, *base, "--out", tmp / "o", "--image-size", "20")[::2], 2, "other settings",
                   "image_size")
    (tmp / "afile").write_text("x")
    one_line_error(*cli(capsys, *base, "--out", tmp / "afile")[::2], 2, "--out", "is a file")

    one_line_error(*cli(capsys, "retrieve", "--query", query, "--gallery", gallery)[::2], 2, "--checkpoint")
    one_line_error(*cli(capsys, "retrieve", "--embeddings", tmp / "emb_none")[::2], 2, "--embeddings",
                   "no such folder")
    one_line_error(*cli(capsys, "retrieve", "--embeddings", tmp / "o", "--feature", "patch_mean")[::2], 2,
                   "no patch_mean features")
    one_line_error(*cli(capsys, "retrieve", "--embeddings", tmp / "o", "--labels", tmp / "x.csv")[::2], 2,
                   "--labels")
    one_line_error(*cli(capsys, "retrieve", "--embeddings", tmp / "o", "--k", "0")[::2], 2, "--k")
    one_line_error(*cli(capsys, "retrieve", "--embeddings", tmp / "o", "--out", tmp)[::2], 2, "--out", "folder")
    empty = tmp / "empty"
    os.makedirs(empty)
    one_line_error(*cli(capsys, "retrieve", "--checkpoint", ckpt, "--query", empty, "--gallery", gallery)[::2], 2,
                   "--query", "no image files")
    arr = np.load(tmp / "o" / "shard_00000.npy")
    assert arr.shape == (12, 64)


def test_retrieve_labels_without_any_positive_give_no_metrics_not_nan(files, capsys):
    ckpt, _, gallery, tmp = files
    query = tmp / "other_query"
    write_image_folder(str(query), classes=("yellow",), per_class=2, seed=3)  # a class the gallery lacks
    rc, stdout, err = cli(capsys, "retrieve", "--checkpoint", ckpt, "--query", query, "--gallery", gallery,
                          "--image-size", "16", "--k", "1", "--out", tmp / "r.json", "--no-progress")
    assert rc == 0, err
    assert "no metrics" in stdout and "nan" not in stdout.lower()
    text = (tmp / "r.json").read_text()
    assert "NaN" not in text and json.loads(text)["metrics"] is None
