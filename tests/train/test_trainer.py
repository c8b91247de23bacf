"""The training loop on a tiny configuration: bit-identical resume after a crash, the non-finite-loss stop, the
schedules actually applied, the log and the loss plot."""
import json
import math
import os

import pytest
import torch

from dinokernels.train import methods as methods_mod
from dinokernels.train import trainer as trainer_mod
from dinokernels.train.checkpoint import load_checkpoint
from dinokernels.train.config import make_config
from dinokernels.train.ema import unwrap
from dinokernels.train.schedules import cosine_scheduler
from dinokernels.train.trainer import NonFiniteLossError, train_dino


def tiny(out, **kw):
    """6 iterations per epoch of a 4-block ViT on 16-pixel digits: about a second per epoch."""
    values = dict(out=str(out), subset=48, batch_size_per_gpu=8, epochs=2, warmup_epochs=1, global_size=16,
                  local_size=8, digits_size=16, local_crops_number=2, out_dim=64, hidden_dim=32, bottleneck_dim=16,
                  drop_path_rate=0.1, evaluate=False, progress=False, num_workers=0, seed=3, lr=0.004)
    values.update(kw)
    return make_config(**values)


class Crash(Exception):
    pass


def _fail_at(monkeypatch, call, make_output=None):
    """forward_views raises Crash (or returns make_output(student_out, teacher_out)) on its `call`-th call."""
    real = trainer_mod.forward_views
    count = {"n": 0}

    def wrapped(student, teacher, images):
        count["n"] += 1
        s, t = real(student, teacher, images)
        if count["n"] == call:
            if make_output is None:
                raise Crash(f"simulated crash at call {call}")
            return make_output(s, t)
        return s, t

    monkeypatch.setattr(trainer_mod, "forward_views", wrapped)


def _losses(out):
    with open(os.path.join(out, "log.jsonl")) as f:
        return [(r["iteration"], r["loss"]) for r in map(json.loads, f) if r["kind"] == "iter"]


def _assert_same_state(a, b):
    for key in ("student", "teacher", "dino_loss"):
        assert a[key].keys() == b[key].keys()
        for name in a[key]:
            assert torch.equal(a[key][name], b[key][name]), f"{key}.{name} differs"
    sa, sb = a["optimizer"]["state"], b["optimizer"]["state"]
    assert sa.keys() == sb.keys()
    for i in sa:
        for name in sa[i]:
            assert torch.equal(torch.as_tensor(sa[i][name]), torch.as_tensor(sb[i][name])), f"optimizer {i}.{name}"
    assert (a["epoch"], a["epoch_iteration"], a["iteration"]) == (b["epoch"], b["epoch_iteration"], b["iteration"])


@pytest.mark.parametrize("crash_call", [9, 6])  # mid-epoch 1 (after 8 steps), and the first call after epoch 0
def test_resume_after_crash_is_bit_identical(tmp_path, monkeypatch, crash_call):
    straight = train_dino(tiny(tmp_path / "a", checkpoint_every=1))
    assert straight["iterations"] == 12

    _fail_at(monkeypatch, crash_call + 1)  # crash while computing step `crash_call` (0-based)
    with pytest.raises(Crash):
        train_dino(tiny(tmp_path / "b", checkpoint_every=1))
    monkeypatch.undo()
    saved = load_checkpoint(tmp_path / "b" / "checkpoint.pth")
    assert saved["iteration"] == crash_call  # the checkpoint of the last finished step
    resumed = train_dino(tiny(tmp_path / "b", checkpoint_every=1, resume=str(tmp_path / "b" / "checkpoint.pth")))
    assert resumed["iterations"] == 12 and resumed["resumed_from"]

    _assert_same_state(load_checkpoint(tmp_path / "a" / "checkpoint.pth"),
                       load_checkpoint(tmp_path / "b" / "checkpoint.pth"))
    assert _losses(tmp_path / "a") == _losses(tmp_path / "b")  # same curve, each iteration logged once


def test_resume_from_epoch_checkpoint_with_more_epochs(tmp_path):
    """Epoch-end checkpoints (checkpointNNNN.pth) resume too; a finished run resumed with the same epochs is a
    no-op."""
    train_dino(tiny(tmp_path / "a", saveckp_freq=1))
    assert os.path.isfile(tmp_path / "a" / "checkpoint0000.pth")
    assert os.path.isfile(tmp_path / "a" / "checkpoint0001.pth")
    res = train_dino(tiny(tmp_path / "b", resume=str(tmp_path / "a" / "checkpoint0000.pth")))
    _assert_same_state(load_checkpoint(tmp_path / "a" / "checkpoint.pth"),
                       load_checkpoint(tmp_path / "b" / "checkpoint.pth"))
    assert res["iterations"] == 12
    again = train_dino(tiny(tmp_path / "b", resume=str(tmp_path / "b" / "checkpoint.pth")))
    assert again["final_loss"] is None and again["iterations"] == 12


def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(tmp_path, monkeypatch):
    out = tmp_path / "run"
    _fail_at(monkeypatch, 6, lambda s, t: (s * float("nan"), t))  # step 5 of epoch 0
    with pytest.raises(NonFiniteLossError, match=r"not finite at epoch 0, iteration 5.*last good checkpoint") as e:
        train_dino(tiny(out, checkpoint_every=2))
    assert str(out / "checkpoint.pth") in str(e.value)
    good = load_checkpoint(out / "checkpoint.pth")
    assert good["iteration"] == 4 and good["epoch"] == 0 and good["epoch_iteration"] == 4
    assert all(torch.isfinite(v).all() for v in good["student"].values())
    assert sorted(os.listdir(out)) == ["checkpoint.pth", "log.jsonl"]  # no partial file, no summary
    assert [i for i, _ in _losses(out)] == [1, 2, 3, 4, 5]
    # and training goes on from there
    monkeypatch.undo()
    res = train_dino(tiny(out, checkpoint_every=2, resume=str(out / "checkpoint.pth")))
    assert res["iterations"] == 12


def test_inf_teacher_output_stops_too(tmp_path, monkeypatch):
    _fail_at(monkeypatch, 1, lambda s, t: (s, t + float("inf")))
    with pytest.raises(NonFiniteLossError, match="No checkpoint had been written yet"):
        train_dino(tiny(tmp_path))


def test_schedules_freeze_and_outputs(tmp_path, monkeypatch):
    """lr (linear scaling), wd and momentum follow the official schedules per iteration; the last layer does not
    move during epoch 0 and moves afterwards; log.jsonl, loss.png and summary.json are written."""
    seen = []
    real_ema = methods_mod.ema_update

    def spy(teacher, student, m):
        head = unwrap(student).head.last_layer
        seen.append((m, head.weight_v.detach().clone()))
        real_ema(teacher, student, m)

    monkeypatch.setattr(methods_mod, "ema_update", spy)
    cfg = tiny(tmp_path, norm_last_layer=False, drop_path_rate=0.0)
    res = train_dino(cfg)
    with open(tmp_path / "log.jsonl") as f:
        log = [json.loads(line) for line in f]
    iters = [r for r in log if r["kind"] == "iter"]
    lr = cosine_scheduler(cfg.lr * 8 / 256, cfg.min_lr, 2, 6, warmup_epochs=1)
    wd = cosine_scheduler(cfg.weight_decay, cfg.weight_decay_end, 2, 6)
    mom = cosine_scheduler(cfg.momentum_teacher, 1, 2, 6)
    assert [r["lr"] for r in iters] == lr.tolist()
    assert [r["wd"] for r in iters] == wd.tolist()
    assert [r["momentum"] for r in iters] == mom.tolist() == [m for m, _ in seen]
    v = [w for _, w in seen]
    assert all(torch.equal(v[0], w) for w in v[:6])  # frozen through epoch 0
    assert not torch.equal(v[5], v[7])
    assert [r["epoch"] for r in log if r["kind"] == "epoch"] == [0, 1]
    with open(tmp_path / "loss.png", "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    with open(tmp_path / "summary.json") as f:
        summary = json.load(f)
    assert summary["iterations"] == 12 and summary["wall_seconds"] > 0 and res["loss_png"].endswith("loss.png")


def test_bad_batch_size(tmp_path):
    with pytest.raises(ValueError, match="lower --batch-size"):
        train_dino(tiny(tmp_path, batch_size_per_gpu=64))


def test_resume_with_other_model_refused(tmp_path):
    train_dino(tiny(tmp_path / "a", epochs=1, warmup_epochs=0))
    with pytest.raises(ValueError, match="out_dim"):
        train_dino(tiny(tmp_path / "b", out_dim=32, resume=str(tmp_path / "a" / "checkpoint.pth")))


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_low_precision_autocast_runs(tmp_path, precision):
    """bfloat16 autocast, and float16 with the GradScaler (unscale before the per-tensor clip), on the CPU."""
    res = train_dino(tiny(tmp_path, precision=precision, epochs=1, warmup_epochs=0))
    assert res["precision"] == precision and res["iterations"] == 6 and math.isfinite(res["final_loss"])
    ckpt = load_checkpoint(tmp_path / "checkpoint.pth")
    assert (ckpt["fp16_scaler"] is not None) == (precision == "fp16")
    assert all(v.dtype == torch.float32 for v in ckpt["student"].values() if v.is_floating_point())
