"""`dinokernels train-detector`: a one-iteration run on tiny synthetic shapes writes its outputs, a second run into
the same folder is refused without --overwrite, --resume continues with a larger --epochs, and bad inputs are one
line with the documented exit codes (2 for flags, 1 for data)."""
import json
import os

import pytest

from dinokernels.cli import main
from dinokernels.train.checkpoint import load_checkpoint

TINY = ["--num-train", "2", "--num-val", "2", "--image-size", "64", "--batch-size", "2", "--num-queries", "5",
        "--colors", "red", "blue", "--shapes", "circle", "square", "--no-progress", "--threads", "1"]


def test_train_detector_runs_refuses_reuse_and_resumes(capsys, tmp_path):
    out = str(tmp_path / "run")
    assert main(["train-detector", "--out", out, "--epochs", "1", *TINY]) == 0
    printed = capsys.readouterr().out
    assert "val COCO box AP" in printed and "named" in printed
    assert sorted(os.listdir(out)) == ["checkpoint.pth", "log.jsonl", "loss.png", "summary.json"]
    summary = json.load(open(os.path.join(out, "summary.json")))
    assert summary["iterations"] == 1 and summary["config"]["model"] == "small"
    assert summary["config"]["lr"] == 2e-3 and summary["config"]["colors"] == ["red", "blue"]

    assert main(["train-detector", "--out", out, "--epochs", "1", *TINY]) == 2
    assert "already holds another run's files" in capsys.readouterr().err

    assert main(["train-detector", "--resume", os.path.join(out, "checkpoint.pth"), "--epochs", "2",
                 "--no-eval", "--no-progress"]) == 0
    ckpt = load_checkpoint(os.path.join(out, "checkpoint.pth"))
    assert ckpt["iteration"] == 2 and ckpt["epoch"] == 2 and ckpt["config"]["epochs"] == 2
    assert [json.loads(line)["iteration"] for line in open(os.path.join(out, "log.jsonl"))] == [1, 2]


def exit_code(argv):
    """main's return value, or the code of argparse's SystemExit (flag errors)."""
    try:
        return main(argv)
    except SystemExit as e:
        return e.code


@pytest.mark.parametrize("argv, code, needle", [
    (["--epochs", "0"], 2, "--epochs"),
    (["--model", "swint"], 2, "text_encoder"),
    (["--colors", "mauve"], 2, "unknown colour"),
    (["--data", "{tmp}/missing"], 1, "no such folder"),
    (["--data", "{tmp}/nocats"], 1, "'categories'"),
    (["--data", "{tmp}/empty"], 1, "no images"),
    (["--resume", "{tmp}/none.pth"], 1, "no checkpoint"),
])
def test_bad_inputs_are_one_line(capsys, tmp_path, argv, code, needle):
    for name, data in (("nocats", {"images": [{"id": 1, "file_name": "a.png"}], "annotations": []}),
                       ("empty", {"images": [], "annotations": [], "categories": [{"id": 1, "name": "cat"}]})):
        for sub in ("annotations", "train", "val"):
            os.makedirs(tmp_path / name / sub)
        for split in ("train", "val"):
            json.dump(data, open(tmp_path / name / "annotations" / f"instances_{split}.json", "w"))
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    assert exit_code(["train-detector", "--out", str(tmp_path / "out"), *argv]) == code
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and needle in err[0], err
    assert not os.path.exists(tmp_path / "out")  # a failed run leaves no empty output folder
