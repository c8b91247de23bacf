"""Adversarial command lines (issue 16 §1, §5, §6): every sub-command with flag values that cannot work and with bad
files. A usage error is one line naming the flag, its value and the accepted range, exit code 2, before any work; a
runtime error is one line, exit code 1, no traceback (unless --debug / DINOKERNELS_DEBUG=1); nothing half-written
and no empty output folder is left behind. Resuming writes to --out or the checkpoint's folder only, and a run
killed (SIGKILL) at random moments leaves every output either absent, the previous or the new complete file.

Most probes call `dinokernels.cli.main` in-process (the same code `python -m dinokernels` runs); a few go through
the real entry point in a subprocess to check the exit codes and stderr end to end."""
import hashlib
import json
import os
import pickle
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import time

import numpy as np
import pytest
import torch

from dinokernels.cli import (UsageError, check_memory, finite_float, main, nonnegative_int, positive_int,
                             probability, removed_if_empty_on_error, vit_memory_bytes)
from dinokernels.train.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from dinokernels.train.progress import JsonlLog


def cli(capsys, *argv):
    """(exit code, stdout, stderr) of `dinokernels *argv` run in this process."""
    try:
        rc = main([str(a) for a in argv])
    except SystemExit as e:  # argparse usage errors
        rc = e.code
    out, err = capsys.readouterr()
    return rc, out, err


def assert_one_line_error(rc, err, code, *needles):
    lines = [line for line in err.splitlines() if line.strip()]
    assert rc == code, (rc, err)
    assert len(lines) == 1, err
    assert "Traceback" not in err and "error:" in lines[0], err
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])


def run_module(*argv, env=None, timeout=240):
    return subprocess.run([sys.executable, "-m", "dinokernels", *map(str, argv)], capture_output=True, text=True,
                          timeout=timeout, cwd=tempfile.gettempdir(),
                          env=dict(os.environ, DINOKERNELS_BACKEND="kernel", **(env or {})))


# Tiny pretraining settings: 8 images of 16 pixels per step, a 4-block ViT, a 64-wide head (~1 s per step on a
# loaded CPU).
TINY = ["--subset", "24", "--batch-size", "8", "--global-size", "16", "--local-size", "8", "--patch-size", "8",
        "--local-crops-number", "0", "--out-dim", "64", "--hidden-dim", "32", "--bottleneck-dim", "16",
        "--num-workers", "0", "--no-eval", "--no-progress"]


# ---- usage errors: one line naming the flag, the value and the accepted range, exit code 2 ----

BAD_FLAGS = [
    ("pretrain", "--drop-path-rate", ["1.5"]), ("pretrain", "--drop-path-rate", ["-0.1"]),
    ("pretrain", "--lr", ["inf"]), ("pretrain", "--lr", ["nan"]), ("pretrain", "--lr", ["0"]),
    ("pretrain", "--lr", ["-0.001"]), ("pretrain", "--lr", ["fast"]),
    ("pretrain", "--epochs", ["-1"]), ("pretrain", "--epochs", ["0"]), ("pretrain", "--epochs", ["1.5"]),
    ("pretrain", "--epochs", ["10000000"]),
    ("pretrain", "--batch-size", ["0"]), ("pretrain", "--patch-size", ["0"]), ("pretrain", "--out-dim", ["0"]),
    ("pretrain", "--global-size", ["0"]), ("pretrain", "--global-size", ["100000"]),
    ("pretrain", "--local-size", ["-8"]), ("pretrain", "--hidden-dim", ["0"]), ("pretrain", "--bottleneck-dim", ["0"]),
    ("pretrain", "--momentum-teacher", ["1.5"]), ("pretrain", "--momentum-teacher", ["nan"]),
    ("pretrain", "--teacher-temp", ["0"]), ("pretrain", "--teacher-temp", ["-inf"]),
    ("pretrain", "--warmup-teacher-temp", ["1e400"]), ("pretrain", "--warmup-teacher-temp-epochs", ["-1"]),
    ("pretrain", "--weight-decay", ["-1"]), ("pretrain", "--weight-decay-end", ["nan"]),
    ("pretrain", "--clip-grad", ["-inf"]), ("pretrain", "--min-lr", ["-1"]), ("pretrain", "--warmup-epochs", ["-2"]),
    ("pretrain", "--freeze-last-layer", ["-1"]),
    ("pretrain", "--global-crops-scale", ["0", "1"]), ("pretrain", "--local-crops-scale", ["0.5", "2"]),
    ("pretrain", "--local-crops-number", ["-1"]), ("pretrain", "--local-crops-number", ["100000"]),
    ("pretrain", "--num-workers", ["-1"]), ("pretrain", "--seed", ["-5"]), ("pretrain", "--saveckp-freq", ["-1"]),
    ("pretrain", "--checkpoint-every", ["-1"]), ("pretrain", "--subset", ["0"]), ("pretrain", "--eval-crop", ["0"]),
    ("pretrain", "--eval-resize", ["99999"]), ("pretrain", "--knn-k", ["0"]), ("pretrain", "--knn-temperature", ["0"]),
    ("pretrain", "--norm-last-layer", ["maybe"]), ("pretrain", "--use-fp16", ["2"]),
    ("pretrain", "--optimizer", ["adam"]), ("pretrain", "--precision", ["fp8"]),
    ("knn", "--resize", ["0"]), ("knn", "--crop", ["0"]), ("knn", "--crop", ["100000"]), ("knn", "--k", ["0"]),
    ("knn", "--k", ["-3"]), ("knn", "--temperature", ["0"]), ("knn", "--temperature", ["inf"]),
    ("knn", "--temperature", ["nan"]), ("knn", "--num-workers", ["-1"]), ("knn", "--patch-size", ["0"]),
    ("knn", "--which", ["both"]),
    ("attention", "--image-size", ["0"]), ("attention", "--image-size", ["100000"]), ("attention", "--tile", ["0"]),
    ("attention", "--tile", ["100000"]), ("attention", "--patch-size", ["-1"]), ("attention", "--which", ["x"]),
]


@pytest.mark.parametrize("command,flag,values", BAD_FLAGS, ids=[f"{c}{f}={'_'.join(v)}" for c, f, v in BAD_FLAGS])
def test_bad_flag_value_is_one_line_usage_error(capsys, tmp_path, command, flag, values):
    required = {"pretrain": ["--out", tmp_path / "out"],
                "knn": ["--checkpoint", tmp_path / "missing.pth"],
                "attention": ["--checkpoint", tmp_path / "missing.pth", "--out", tmp_path / "out" / "a.png"]}[command]
    # A value starting with "-" that argparse does not take for a number goes after "=", as a user types it.
    given = [f"{flag}={values[0]}"] if len(values) == 1 and values[0].startswith("-inf") else [flag, *values]
    rc, out, err = cli(capsys, command, *required, *given)
    assert_one_line_error(rc, err, 2, flag, values[-1])
    assert "accepted" in err or "choose from" in err or "invalid choice" in err
    assert not (tmp_path / "out").exists()  # no work started, nothing written


@pytest.mark.parametrize("argv,needles", [
    (["frobnicate"], ["frobnicate"]),
    ([], ["command"]),
    (["info", "--bogus"], ["--bogus"]),
    (["knn"], ["--checkpoint"]),
    (["attention", "--checkpoint", "x.pth"], ["--out"]),
    (["pretrain", "--global-crops-scale", "0.5"], ["--global-crops-scale"]),
])
def test_malformed_command_lines(capsys, argv, needles):
    rc, out, err = cli(capsys, *argv)
    assert_one_line_error(rc, err, 2, *needles)


@pytest.mark.parametrize("extra,needles", [
    (["--patch-size", "5"], ["patch_size (5)", "global_size (16)"]),  # crops of 16 px in 5-px patches
    (["--patch-size", "32"], ["patch_size (32)"]),  # larger than the crop
    (["--global-crops-scale", "0.9", "0.5"], ["global_crops_scale", "0.9"]),
    (["--warmup-epochs", "5", "--epochs", "2"], ["warmup_epochs (5)", "epochs (2)"]),
    (["--global-size", "8192", "--batch-size", "4096"], ["GiB", "estimate", "available"]),  # memory, up front
    (["--local-crops-number", "64", "--local-size", "4096", "--patch-size", "8", "--batch-size", "512"],
     ["GiB", "estimate"]),
])
def test_combinations_that_cannot_work_are_refused_before_any_work(capsys, tmp_path, extra, needles):
    out = tmp_path / "new" / "run"
    rc, _, err = cli(capsys, "pretrain", *TINY, "--out", out, *extra)
    assert_one_line_error(rc, err, 2, *needles)
    assert not (tmp_path / "new").exists()


def test_argument_types_reusable():
    import argparse

    assert positive_int(10)("10") == 10 and nonnegative_int()("0") == 0 and probability()("1") == 1.0
    with pytest.raises(argparse.ArgumentTypeError, match=r"11 is out of range \(accepted: \[1, 10\]\)"):
        positive_int(10)("11")
    with pytest.raises(argparse.ArgumentTypeError, match=r"not finite"):
        finite_float(0.0)("nan")
    with pytest.raises(argparse.ArgumentTypeError, match=r"\(0.0, 1.0\]"):
        finite_float(0.0, 1.0, lo_open=True)("0")
    with pytest.raises(argparse.ArgumentTypeError, match=r"not a number"):
        probability()("half")
    with pytest.raises(UsageError, match=r"estimate.*available"):
        check_memory(1 << 62, "a test request")
    # the estimate grows with the square of the tokens per image (attention)
    small = vit_memory_bytes(1, 224, 16, 384, 12, 6, training=False)
    assert vit_memory_bytes(1, 448, 16, 384, 12, 6, training=False) > 4 * small > 0


# ---- bad files: one line, exit code 1, nothing left behind ----

def _backbone_file(path):
    """An official-style DINO backbone weight file of the 4-block vit_nano (8-pixel patches, 16-pixel images)."""
    from dinokernels.models.dino import build_backbone

    model, _ = build_backbone("vit_nano", patch_size=8, img_size=16)
    torch.save(model.state_dict(), path)
    return path


class NotPlain:
    pass


BAD_CHECKPOINTS = {
    "missing": None,
    "empty": b"",
    "truncated": "half",
    "first-10-bytes": "head",
    "random-bytes": "random",
    "text": b"this is not a checkpoint\n",
    "json": b'{"teacher": {}}',
    "pickled-code": pickle.dumps(os.system),
    "custom-class": "class",
    "folder": "folder",
    "tensor-not-dict": "tensor",
    "dict-without-weights": "nokeys",
}


def _make_bad_checkpoint(tmp_path, kind):
    path = tmp_path / "bad.pth"
    spec = BAD_CHECKPOINTS[kind]
    if spec is None:
        return path
    if spec == "folder":
        path.mkdir()
        return path
    if isinstance(spec, bytes):
        path.write_bytes(spec)
        return path
    good = _backbone_file(tmp_path / "good.pth").read_bytes()
    if spec == "half":
        path.write_bytes(good[:len(good) // 2])
    elif spec == "head":
        path.write_bytes(good[:10])
    elif spec == "random":
        path.write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    elif spec == "class":
        torch.save({"teacher": NotPlain()}, path)
    elif spec == "tensor":
        torch.save(torch.zeros(3), path)
    elif spec == "nokeys":
        torch.save({"epoch": 3, "config": "x"}, path)
    return path


@pytest.mark.parametrize("kind", list(BAD_CHECKPOINTS))
@pytest.mark.parametrize("command", ["knn", "attention", "pretrain"])
def test_bad_checkpoint_file_is_one_line_runtime_error(capsys, tmp_path, command, kind):
    path = _make_bad_checkpoint(tmp_path, kind)
    out = tmp_path / "outputs"
    argv = {"knn": ["knn", "--checkpoint", path, "--data", tmp_path],
            "attention": ["attention", "--checkpoint", path, "--out", out / "attn.png"],
            "pretrain": ["pretrain", *TINY, "--resume", path, "--out", out]}[command]
    rc, _, err = cli(capsys, *argv)
    assert_one_line_error(rc, err, 1, str(path))
    assert "--debug" in err  # says how to see the traceback
    assert not out.exists()  # no empty output folder


def test_debug_flag_and_environment_variable_show_the_traceback(capsys, tmp_path, monkeypatch):
    path = _make_bad_checkpoint(tmp_path, "truncated")
    rc, _, err = cli(capsys, "knn", "--checkpoint", path, "--debug")
    assert rc == 1 and "Traceback" in err and err.strip().splitlines()[-1].startswith("dinokernels knn: error:")
    monkeypatch.setenv("DINOKERNELS_DEBUG", "1")
    rc, _, err = cli(capsys, "attention", "--checkpoint", path, "--out", tmp_path / "a.png")
    assert rc == 1 and "Traceback" in err


def test_checkpoint_errors_through_the_entry_point(tmp_path):
    """The real `python -m dinokernels`: exit codes and one stderr line, end to end."""
    path = _make_bad_checkpoint(tmp_path, "truncated")
    proc = run_module("knn", "--checkpoint", path)
    assert_one_line_error(proc.returncode, proc.stderr, 1, "truncated or corrupt", str(path))
    proc = run_module("pretrain", "--lr", "inf", "--out", tmp_path / "o")
    assert_one_line_error(proc.returncode, proc.stderr, 2, "--lr", "inf", "accepted")
    assert not (tmp_path / "o").exists()


def _write_image(path, kind):
    from PIL import Image

    rng = np.random.default_rng(1)
    if kind == "16-bit":
        Image.fromarray(rng.integers(0, 65535, (20, 24), dtype=np.uint16)).save(path)
    elif kind == "cmyk":
        Image.fromarray(rng.integers(0, 255, (20, 24, 4), dtype=np.uint8), mode="CMYK").save(path, format="JPEG")
    elif kind == "grey-alpha":
        Image.fromarray(rng.integers(0, 255, (20, 24, 2), dtype=np.uint8), mode="LA").save(path, format="PNG")
    elif kind == "1x1":
        Image.new("RGB", (1, 1), (9, 9, 9)).save(path, format="PNG")
    return path


@pytest.mark.parametrize("kind", ["16-bit", "cmyk", "grey-alpha", "1x1"])
def test_attention_reads_unusual_but_valid_images(capsys, tmp_path, kind):
    from PIL import Image

    ckpt = _backbone_file(tmp_path / "b.pth")
    image = _write_image(tmp_path / f"img.{'jpg' if kind == 'cmyk' else 'png'}", kind)
    out = tmp_path / "sub" / "attn.png"
    rc, stdout, err = cli(capsys, "attention", "--checkpoint", ckpt, "--image", image, "--out", out,
                          "--image-size", "16", "--tile", "16")
    assert rc == 0, err
    with Image.open(out) as grid:
        assert grid.format == "PNG" and grid.size[0] > grid.size[1] >= 16  # image + 4 head tiles in a row
    assert [f for f in os.listdir(out.parent)] == ["attn.png"]  # no temporary file left


def _bad_image(tmp_path, kind):
    from PIL import Image

    path = tmp_path / "img.png"
    if kind == "missing":
        return path
    if kind == "empty":
        path.write_bytes(b"")
    elif kind == "random-bytes":
        path.write_bytes(np.random.default_rng(2).integers(0, 256, 2048, dtype=np.uint8).tobytes())
    elif kind == "truncated":
        Image.fromarray(np.random.default_rng(3).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(path)
        data = path.read_bytes()
        path.write_bytes(data[:len(data) // 3])
    elif kind == "text":
        path.write_text("not an image")
    elif kind == "huge-dimensions":
        # A valid PNG header claiming 100000 × 100000 pixels (10^10: Pillow's decompression-bomb limit refuses it).
        import struct
        import zlib

        def chunk(tag, data):
            return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))
        ihdr = struct.pack(">IIBBBBB", 100000, 100000, 8, 2, 0, 0, 0)
        path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64))
                         + chunk(b"IEND", b""))
    elif kind == "folder":
        path.mkdir()
    return path


@pytest.mark.parametrize("kind", ["missing", "empty", "random-bytes", "truncated", "text", "huge-dimensions",
                                  "folder"])
def test_attention_bad_image_is_one_line_error_and_writes_nothing(capsys, tmp_path, kind):
    ckpt = _backbone_file(tmp_path / "b.pth")
    image = _bad_image(tmp_path, kind)
    out = tmp_path / "new" / "attn.png"
    rc, _, err = cli(capsys, "attention", "--checkpoint", ckpt, "--image", image, "--out", out,
                     "--image-size", "16")
    assert_one_line_error(rc, err, 1)
    assert "img.png" in err
    assert not (tmp_path / "new").exists()  # neither the PNG, nor a temporary file, nor the folder


def test_attention_keeps_a_previous_png_when_it_fails(capsys, tmp_path):
    ckpt = _backbone_file(tmp_path / "b.pth")
    out = tmp_path / "attn.png"
    out.write_bytes(b"previous result")
    rc, _, err = cli(capsys, "attention", "--checkpoint", ckpt, "--image", _bad_image(tmp_path, "truncated"),
                     "--out", out, "--image-size", "16")
    assert rc == 1 and out.read_bytes() == b"previous result"
    assert sorted(os.listdir(tmp_path)) == ["attn.png", "b.pth", "img.png"]


def test_attention_too_large_request_refused_with_estimate(capsys, tmp_path):
    ckpt = _backbone_file(tmp_path / "b.pth")
    rc, _, err = cli(capsys, "attention", "--checkpoint", ckpt, "--image", _write_image(tmp_path / "i.png", "1x1"),
                     "--out", tmp_path / "o" / "a.png", "--image-size", "8192", "--patch-size", "8")
    # 8192 px in 8-px patches: ~10^6 tokens, 4 heads × 10^12 attention weights
    assert_one_line_error(rc, err, 2, "estimate", "GiB")
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("kind", ["missing-folder", "empty-folder", "unreadable-images", "a-file"])
def test_pretrain_bad_data_folder(capsys, tmp_path, kind):
    data = tmp_path / "data"
    if kind == "empty-folder":
        data.mkdir()
    elif kind == "unreadable-images":
        data.mkdir()
        for i in range(3):
            (data / f"{i}.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    elif kind == "a-file":
        data.write_text("x")
    out = tmp_path / "out"
    rc, _, err = cli(capsys, "pretrain", *TINY, "--data", data, "--out", out, "--arch", "vit_nano")
    assert_one_line_error(rc, err, 1, str(data))
    assert not out.exists()


def test_knn_bad_data_folder(capsys, tmp_path):
    ckpt = _backbone_file(tmp_path / "b.pth")
    rc, _, err = cli(capsys, "knn", "--checkpoint", ckpt, "--data", tmp_path / "nope")
    assert_one_line_error(rc, err, 2, "--data", "nope")
    (tmp_path / "flat").mkdir()
    rc, _, err = cli(capsys, "knn", "--checkpoint", ckpt, "--data", tmp_path / "flat")
    assert_one_line_error(rc, err, 1, "flat")


# ---- resume: outputs never go to a folder read from the checkpoint ----

def _parse_pretrain(argv):
    from dinokernels.cli import build_parser

    return build_parser().parse_args(["pretrain", *map(str, argv)])


def _crafted_checkpoint(path, victim):
    from dinokernels.train.config import make_config
    from dinokernels.train.trainer import CHECKPOINT_FORMAT

    config = make_config(out=str(victim), epochs=2).to_dict()
    config["resume"] = str(victim / "checkpoint.pth")
    save_checkpoint({"format": CHECKPOINT_FORMAT, "config": config}, str(path))
    return path


def test_resume_writes_next_to_the_checkpoint_or_to_out_never_to_the_stored_folder(tmp_path):
    from dinokernels.cli import _pretrain_config

    victim = tmp_path / "original_run"
    copy = tmp_path / "copy"
    copy.mkdir()
    ckpt = _crafted_checkpoint(copy / "checkpoint.pth", victim)
    config = _pretrain_config(_parse_pretrain(["--resume", ckpt]))
    assert os.path.abspath(config.out) == str(copy) and config.resume == str(ckpt)
    config = _pretrain_config(_parse_pretrain(["--resume", ckpt, "--out", tmp_path / "elsewhere"]))
    assert config.out == str(tmp_path / "elsewhere")
    # `--resume` alone: <--out or out>/checkpoint.pth, and the outputs there
    config = _pretrain_config(_parse_pretrain(["--resume", "--out", copy]))
    assert config.out == str(copy) and config.resume == str(copy / "checkpoint.pth")


def test_resume_into_a_folder_of_another_run_needs_overwrite(capsys, tmp_path):
    other = tmp_path / "other"
    other.mkdir()
    (other / "summary.json").write_text('{"keep": true}')
    src = tmp_path / "src"
    src.mkdir()
    ckpt = _crafted_checkpoint(src / "checkpoint.pth", tmp_path / "victim")
    rc, _, err = cli(capsys, "pretrain", "--resume", ckpt, "--out", other)
    assert_one_line_error(rc, err, 2, "--overwrite", "summary.json")
    assert (other / "summary.json").read_text() == '{"keep": true}'
    rc, _, err = cli(capsys, "pretrain", *TINY, "--out", other)  # a fresh run too
    assert_one_line_error(rc, err, 2, "--overwrite")
    assert not (tmp_path / "victim").exists()


def test_crafted_stored_settings_are_a_clear_error(capsys, tmp_path):
    from dinokernels.train.trainer import CHECKPOINT_FORMAT

    path = tmp_path / "c.pth"
    save_checkpoint({"format": CHECKPOINT_FORMAT, "config": {"epochs": -4, "lr": float("nan")}}, str(path))
    rc, _, err = cli(capsys, "pretrain", "--resume", path)
    assert_one_line_error(rc, err, 2, str(path), "epochs")
    save_checkpoint({"format": CHECKPOINT_FORMAT, "config": ["not", "a", "dict"]}, str(path))
    rc, _, err = cli(capsys, "pretrain", "--resume", path)
    assert_one_line_error(rc, err, 1, "not a dinokernels pretraining checkpoint")


def test_removed_if_empty_on_error_keeps_folders_with_contents(tmp_path):
    target = tmp_path / "a" / "b" / "c"
    with pytest.raises(RuntimeError):
        with removed_if_empty_on_error(str(target)):
            target.mkdir(parents=True)
            raise RuntimeError("x")
    assert not (tmp_path / "a").exists()
    with pytest.raises(RuntimeError):
        with removed_if_empty_on_error(str(target)):
            target.mkdir(parents=True)
            (target / "result.txt").write_text("keep")
            raise RuntimeError("x")
    assert (target / "result.txt").read_text() == "keep"


# ---- kill at random moments: every output is absent, the previous or the new complete file ----

_SLOW_SAVE_RUNNER = textwrap.dedent("""
    import os, sys, time
    _fsync = os.fsync
    def slow_fsync(fd):  # widen the window between the bytes written and the rename
        time.sleep(0.25)
        _fsync(fd)
    os.fsync = slow_fsync
    from dinokernels.cli import main
    sys.exit(main(sys.argv[1:]))
""")


def _check_outputs_whole(folder):
    """Every output in `folder` is absent or complete; returns the checkpoint's iteration (None if absent)."""
    from PIL import Image

    iteration = None
    if (folder / "checkpoint.pth").exists():
        iteration = load_checkpoint(folder / "checkpoint.pth")["iteration"]
    if (folder / "summary.json").exists():
        json.loads((folder / "summary.json").read_text())
    if (folder / "loss.png").exists():
        with Image.open(folder / "loss.png") as im:
            im.load()
    if (folder / "log.jsonl").exists():
        text = (folder / "log.jsonl").read_text()
        lines = text.split("\n")
        complete = lines[:-1]  # the part after the last newline is '' or a cut line a reader drops
        for line in complete:
            assert isinstance(json.loads(line), dict)
        assert lines[-1] == "" or len(JsonlLog.read(str(folder / "log.jsonl"))) == len(complete)
    return iteration


def _digest(folder):
    return {name: hashlib.sha256((folder / name).read_bytes()).hexdigest() for name in sorted(os.listdir(folder))}


def _run_and_kill(argv, folder, rng, env, after_checkpoint=False):
    """Start `dinokernels argv`, wait until its first save begins (or, with after_checkpoint, until a whole
    checkpoint exists), then SIGKILL it after a random delay."""
    proc = subprocess.Popen([sys.executable, "-c", _SLOW_SAVE_RUNNER, *map(str, argv)], cwd=tempfile.gettempdir(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and proc.poll() is None:  # wait for the first save to begin
        if after_checkpoint and (folder / "checkpoint.pth").exists():
            break
        if not after_checkpoint and folder.exists() and any(n.startswith((".checkpoint", "checkpoint"))
                                                            for n in os.listdir(folder)):
            break
        time.sleep(0.01)
    time.sleep(rng.uniform(0.0, 1.2))
    if proc.poll() is None:
        proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    return proc


def test_sigkill_at_random_moments_leaves_whole_files_and_resume_finishes(tmp_path):
    seed = random.SystemRandom().randrange(1 << 30)
    rng = random.Random(seed)
    env = dict(os.environ, DINOKERNELS_BACKEND="kernel")
    first, copy = tmp_path / "first", tmp_path / "copy"
    args = [*TINY, "--epochs", "3", "--checkpoint-every", "1", "--seed", "1"]
    proc = _run_and_kill(["pretrain", *args, "--out", first], first, rng, env)
    _check_outputs_whole(first)
    attempts = 1
    while not (first / "checkpoint.pth").exists():  # killed before the first save finished: start over, allowed
        if attempts == 3:
            pytest.fail(f"no checkpoint after {attempts} runs (seed {seed}): {proc.stderr.read().decode()[-2000:]}")
        # On a loaded machine one slow save can outlast every random delay: from the second run on, the kill
        # waits for a whole checkpoint (a kill mid-save was already exercised by the first run).
        proc = _run_and_kill(["pretrain", *args, "--out", first, "--overwrite"], first, rng, env,
                             after_checkpoint=True)
        _check_outputs_whole(first)
        attempts += 1
    # The scenario: resume a copy without --out; the original folder must not change.
    shutil.copytree(first, copy)
    before = _digest(first)
    for _ in range(2):
        _run_and_kill(["pretrain", "--resume", copy / "checkpoint.pth"], copy, rng, env)
        assert _check_outputs_whole(copy) is not None, seed
    assert _digest(first) == before, seed
    proc = subprocess.run([sys.executable, "-m", "dinokernels", "pretrain", "--resume", str(copy / "checkpoint.pth")],
                          capture_output=True, text=True, timeout=300, cwd=tempfile.gettempdir(), env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert _check_outputs_whole(copy) == 9
    summary = json.loads((copy / "summary.json").read_text())
    assert summary["iterations"] == 9 and summary["out"] == str(copy)
    iterations = [r["iteration"] for r in JsonlLog.read(str(copy / "log.jsonl")) if r["kind"] == "iter"]
    assert iterations == list(range(1, 10)), (seed, iterations)  # each step logged once across the kills
    assert not [n for n in os.listdir(copy) if n.endswith(".tmp")]  # leftovers of killed saves cleaned up
    assert _digest(first) == before


def test_log_appends_are_whole_lines_and_a_cut_line_is_isolated(tmp_path):
    path = tmp_path / "log.jsonl"
    path.write_text('{"iteration": 1}\n{"iterat')  # a line cut by a power loss
    log = JsonlLog(str(path))
    log.write({"iteration": 2})
    log.close()
    assert JsonlLog.read(str(path)) == [{"iteration": 1}, {"iteration": 2}]
    log = JsonlLog(str(path))
    log.truncate_after(1)
    assert path.read_text() == '{"iteration": 1}\n'


def test_atomic_json_and_png_writes_survive_a_kill_mid_write(tmp_path):
    """A hard kill between the bytes and the rename leaves the previous summary.json / loss.png."""
    summary = tmp_path / "summary.json"
    summary.write_text('{"v": 1}')
    png = tmp_path / "loss.png"
    from dinokernels.train.plot import plot_curve

    plot_curve([0, 1], [1.0, 0.5], str(png))
    previous_png = png.read_bytes()
    script = textwrap.dedent(f"""
        import json, os
        from dinokernels.train import checkpoint as c
        from dinokernels.train.plot import plot_curve
        real = os.fsync
        calls = []
        def die_on_third(fd):  # 1: summary's bytes, 2: the folder after its rename, 3: the PNG's bytes
            calls.append(fd)
            if len(calls) == 3:
                os._exit(9)
            real(fd)
        os.fsync = die_on_third
        with c.atomic_write({str(summary)!r}, "w") as f:
            json.dump({{"v": 2}}, f)
        plot_curve([0, 1, 2], [3.0, 2.0, 1.0], {str(png)!r})
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 9, proc.stderr
    assert json.loads(summary.read_text()) == {"v": 2}  # renamed before the kill: the new file
    assert png.read_bytes() == previous_png  # killed before its rename: the previous picture, whole
    from dinokernels.train.checkpoint import temporary_files

    assert len(temporary_files(str(tmp_path), "loss.png")) == 1  # the cut temporary file, removed by the next run


def test_checkpoint_error_is_a_value_error_naming_the_file(tmp_path):
    path = tmp_path / "c.pth"
    path.write_bytes(b"")
    with pytest.raises(CheckpointError, match="empty"):
        load_checkpoint(path)
    assert issubclass(CheckpointError, ValueError)
