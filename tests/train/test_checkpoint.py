"""Atomic checkpoint writes, weights_only loading and the RNG state round trip."""
import os
import random
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

from dinokernels.train import checkpoint as ckpt_mod
from dinokernels.train.checkpoint import get_rng_state, load_checkpoint, save_checkpoint, set_rng_state, to_plain


def _payload(value):
    return {"student": {"w": torch.full((64, 64), float(value))}, "epoch": value, "config": {"scale": [0.4, 1.0]},
            "rng": get_rng_state()}


def test_save_load_weights_only(tmp_path):
    path = tmp_path / "sub" / "checkpoint.pth"
    save_checkpoint(_payload(1), str(path))
    got = load_checkpoint(str(path))
    assert got["epoch"] == 1 and torch.equal(got["student"]["w"], torch.ones(64, 64))
    torch.load(str(path), weights_only=True)  # plain data only
    assert os.listdir(path.parent) == ["checkpoint.pth"]  # no temporary file left


def test_exception_mid_write_keeps_previous_file(tmp_path, monkeypatch):
    path = str(tmp_path / "checkpoint.pth")
    save_checkpoint(_payload(1), path)

    def crashing_save(obj, f, *args, **kwargs):
        f.write(b"PK\x03\x04 half a checkpoint")
        raise KeyboardInterrupt("simulated crash during the write")

    monkeypatch.setattr(ckpt_mod.torch, "save", crashing_save)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(_payload(2), path)
    monkeypatch.undo()
    assert load_checkpoint(path)["epoch"] == 1
    assert os.listdir(tmp_path) == ["checkpoint.pth"]  # the partial temporary file was removed


def test_process_killed_mid_write_keeps_previous_file(tmp_path):
    """A hard kill (no exception handler runs) after the bytes are written but before the rename."""
    path = str(tmp_path / "checkpoint.pth")
    save_checkpoint(_payload(1), path)
    script = textwrap.dedent(f"""
        import os, torch
        from dinokernels.train import checkpoint as c
        c.os.fsync = lambda fd: os._exit(9)  # die between the write and os.replace
        c.save_checkpoint({{"epoch": 2, "w": torch.zeros(1000)}}, {path!r})
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 9, proc.stderr
    assert load_checkpoint(path)["epoch"] == 1
    leftovers = [f for f in os.listdir(tmp_path) if f != "checkpoint.pth"]
    assert all(f.startswith(".checkpoint.pth.") and f.endswith(".tmp") for f in leftovers)


def test_rng_round_trip_through_a_file(tmp_path):
    state = get_rng_state()
    first = (random.random(), np.random.rand(3).tolist(), np.random.randn(), torch.rand(4).tolist())
    save_checkpoint({"rng": state}, str(tmp_path / "c.pth"))
    random.seed(123), np.random.seed(5), torch.manual_seed(7)
    set_rng_state(load_checkpoint(str(tmp_path / "c.pth"))["rng"])
    again = (random.random(), np.random.rand(3).tolist(), np.random.randn(), torch.rand(4).tolist())
    assert first == again


def test_to_plain():
    class P(os.PathLike):
        def __fspath__(self):
            return "/x"
    assert to_plain({"a": (1, 2), "b": np.float32(0.5), "c": P(), "d": None, 1: [True]}) == \
        {"a": [1, 2], "b": 0.5, "c": "/x", "d": None, "1": [True]}


def test_atomic_write_keeps_previous_file_on_error_and_usual_permissions(tmp_path):
    path = tmp_path / "summary.json"
    with ckpt_mod.atomic_write(str(path), "w") as f:
        f.write('{"v": 1}')
    with pytest.raises(RuntimeError):
        with ckpt_mod.atomic_write(str(path), "w") as f:
            f.write('{"v": 2, "half')
            raise RuntimeError("crash mid-write")
    assert path.read_text() == '{"v": 1}' and os.listdir(tmp_path) == ["summary.json"]
    mask = os.umask(0)
    os.umask(mask)
    assert (os.stat(path).st_mode & 0o777) == 0o666 & ~mask  # not mkstemp's 0600


@pytest.mark.parametrize("content,reason", [
    (b"", "empty"), ("half", "truncated or corrupt"), (b"\x00\x01garbage" * 50, "not a torch checkpoint"),
    ("class", "safe loading"),
])
def test_load_checkpoint_bad_files_are_one_checkpoint_error(tmp_path, content, reason):
    path = tmp_path / "c.pth"
    if content == "half":
        save_checkpoint(_payload(1), str(path))
        data = path.read_bytes()
        path.write_bytes(data[:len(data) // 2])
    elif content == "class":
        torch.save({"obj": ckpt_mod.CheckpointError("not plain data")}, str(path))
    else:
        path.write_bytes(content)
    with pytest.raises(ckpt_mod.CheckpointError, match=reason) as e:
        load_checkpoint(str(path))
    assert str(path) in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(FileNotFoundError, match="no such file"):
        load_checkpoint(str(tmp_path / "missing.pth"))
