"""`pretrain --method dinov2` end to end on tiny settings: every loss term in log.jsonl and loss.png, resume across
the high-resolution switch equal to the uninterrupted run, distillation from a saved DinoVisionTransformer (the
teacher does not move, the student EMA does), DINOv2's defaults, the CLI (flags, resume, knn) and two processes
under gloo."""
import json
import math
import os
import subprocess
import sys
import textwrap
import time

import pytest
import torch

from dinokernels.cli import main as cli_main
from dinokernels.train import methods as methods_mod
from dinokernels.train.checkpoint import load_checkpoint
from dinokernels.train.config import DINOV2_DEFAULTS, make_config
from dinokernels.train.trainer import train_dino

# 8 digits at 8px, batches of 4 (2 iterations per epoch), 2×2 patches of 4 in the global crops, 1 patch in the
# 4-pixel local crops; every mask drawn (mask_probability 1) so that iBOT has targets in every step.
TINY = dict(method="dinov2", subset=8, batch_size_per_gpu=4, epochs=1, warmup_epochs=0, digits_size=8,
            global_size=8, local_size=4, patch_size=4, local_crops_number=2, out_dim=32, hidden_dim=16,
            bottleneck_dim=8, mask_probability=1.0, mask_ratio=(0.25, 0.5), drop_path_rate=0.1, evaluate=False,
            progress=False, num_workers=0, seed=3, freeze_last_layer=0, layerscale=0.1, device="cpu")
TERMS = ("dino_local", "dino_global", "ibot", "koleo")


def _iters(out):
    with open(os.path.join(out, "log.jsonl")) as f:
        return [r for r in map(json.loads, f) if r["kind"] == "iter"]


def test_two_iterations_log_every_term_and_plot(tmp_path):
    out = str(tmp_path / "run")
    result = train_dino(make_config(out=out, **TINY))
    assert result["iterations"] == 2
    records = _iters(out)
    assert [r["iteration"] for r in records] == [1, 2]
    for r in records:
        for name in TERMS + ("loss",):
            assert math.isfinite(r[name]), (name, r)
        assert r["dino_local"] > 0 and r["dino_global"] > 0 and r["ibot"] > 0  # local crops and masks present
        total = r["dino_local"] + r["dino_global"] + 0.1 * r["koleo"] + r["ibot"]
        assert r["loss"] == pytest.approx(total, rel=1e-5)
    assert os.path.getsize(os.path.join(out, "loss.png")) > 0
    ckpt = load_checkpoint(os.path.join(out, "checkpoint.pth"))
    assert ckpt["format"] == "dinokernels.dinov2.v1" and ckpt["method"] != "dino"
    assert ckpt["config"]["method"] == "dinov2"


def test_dinov2_defaults_and_builtin_preset():
    c = make_config(method="dinov2", data="somewhere")  # DINOv2's recipe (SPEC §3.8), no preset
    assert (c.preset, c.arch, c.patch_size, c.out_dim) == (None, "vit_large", 16, 65536)
    assert (c.lr, c.lr_scaling, c.momentum_teacher, c.teacher_temp, c.warmup_teacher_temp_epochs) == \
        (4e-3, "sqrt_wrt_1024", 0.992, 0.07, 30)
    assert (c.drop_path_rate, c.drop_path_uniform, c.layerscale, c.blur_semantics) == (0.3, True, 1e-5, "released")
    assert (c.global_crops_scale, c.local_crops_scale, c.clip_grad, c.freeze_last_layer) == \
        ((0.32, 1.0), (0.05, 0.32), 3.0, 1)
    assert all(getattr(c, k) == (tuple(v) if isinstance(v, tuple) else v) for k, v in DINOV2_DEFAULTS.items())
    builtin = make_config(method="dinov2")
    assert builtin.preset == "dinov2-digits" and builtin.method == "dinov2" and builtin.data is None
    assert builtin.global_size // builtin.patch_size >= 4  # a patch grid iBOT can mask
    assert make_config(preset="dinov2-digits").method == "dinov2"
    v1 = make_config()  # DINO v1 is untouched
    assert (v1.method, v1.preset, v1.lr, v1.momentum_teacher) == ("dino", "coloured-digits", 0.004, 0.98)
    with pytest.raises(ValueError, match="distill_teacher needs method dinov2"):
        make_config(distill_teacher="x.pth", distill_teacher_arch="vit_nano")


def _record_global_sides(monkeypatch):
    sides = []
    real = methods_mod.DINOv2TrainingMethod.prepare_batch

    def spy(self, images, it):
        sides.append((it, images[0].shape[-1], images[2].shape[-1]))
        return real(self, images, it)

    monkeypatch.setattr(methods_mod.DINOv2TrainingMethod, "prepare_batch", spy)
    return sides


class Crash(RuntimeError):
    pass


def test_resume_across_the_high_resolution_switch_equals_the_uninterrupted_run(tmp_path, monkeypatch):
    settings = dict(TINY, epochs=2, highres_epochs=1, highres_global_size=16, checkpoint_every=1)
    sides = _record_global_sides(monkeypatch)
    full = train_dino(make_config(out=str(tmp_path / "full"), **settings))
    assert full["iterations"] == 4
    # epoch 0 at 8px (local 4px), epoch 1 at 16px (local crops scaled alike: 8px)
    assert sides == [(0, 8, 4), (1, 8, 4), (2, 16, 8), (3, 16, 8)]

    real_forward = methods_mod.DINOv2TrainingMethod.forward

    def crash_at_switch(self, batch, epoch):
        if batch["collated_global_crops"].shape[-1] == 16:
            raise Crash("killed at the switch")
        return real_forward(self, batch, epoch)

    monkeypatch.setattr(methods_mod.DINOv2TrainingMethod, "forward", crash_at_switch)
    part = str(tmp_path / "part")
    with pytest.raises(Crash):
        train_dino(make_config(out=part, **settings))
    assert load_checkpoint(os.path.join(part, "checkpoint.pth"))["iteration"] == 2
    monkeypatch.setattr(methods_mod.DINOv2TrainingMethod, "forward", real_forward)
    resumed = train_dino(make_config(out=part, resume=os.path.join(part, "checkpoint.pth"), **settings))
    assert resumed["iterations"] == 4

    a = load_checkpoint(tmp_path / "full" / "checkpoint.pth")
    b = load_checkpoint(os.path.join(part, "checkpoint.pth"))
    assert a["method"].keys() == b["method"].keys()
    for key in a["method"]:
        assert torch.equal(a["method"][key], b["method"][key]), key
    assert [r["loss"] for r in _iters(str(tmp_path / "full"))] == [r["loss"] for r in _iters(part)]


def _teacher_file(tmp_path, arch="vit_tiny"):
    """A saved DinoVisionTransformer state dict, wider than the vit_nano student (192 vs 128)."""
    from dinokernels.train.methods import build_dinov2_backbone

    torch.manual_seed(11)
    teacher, _ = build_dinov2_backbone(make_config(**dict(TINY, arch=arch)), 0.0)
    path = str(tmp_path / "teacher.pth")
    torch.save(teacher.state_dict(), path)
    return path, teacher.state_dict()


def test_distillation_step_keeps_the_teacher_and_moves_the_student_ema(tmp_path):
    path, teacher_state = _teacher_file(tmp_path)
    cfg = make_config(out=str(tmp_path / "distil"), distill_teacher=path, distill_teacher_arch="vit_tiny",
                      saveckp_freq=1, **dict(TINY, subset=4, epochs=2))
    method = methods_mod.DINOv2TrainingMethod(cfg, torch.device("cpu"))
    assert method.method.distillation
    for k, v in teacher_state.items():  # the saved weights were loaded
        assert torch.equal(method.method.teacher["backbone"].state_dict()[k], v), k
    # no stochastic depth on the distilled student
    assert all(getattr(m, "drop_prob", 0.0) == 0.0 for m in method.method.student.modules())

    result = train_dino(cfg)  # one step per epoch; checkpoint0000.pth after the first
    assert result["iterations"] == 2
    first = load_checkpoint(os.path.join(cfg.out, "checkpoint0000.pth"))["method"]
    state = load_checkpoint(os.path.join(cfg.out, "checkpoint.pth"))["method"]
    for k, v in teacher_state.items():
        assert torch.equal(state["teacher.backbone." + k], v), k
    for k in (k for k in state if k.startswith("teacher.")):
        assert torch.equal(state[k], first[k]), k
    moved = [k for k in state if k.startswith("student_ema.") and not torch.equal(state[k], first[k])]
    assert any(k.startswith("student_ema.backbone.blocks") for k in moved)
    r = _iters(cfg.out)[1]
    assert r["ibot"] > 0 and math.isfinite(r["koleo"])  # iBOT on every patch of the two global crops

    # the reported model: knn reads the student EMA as the final model
    from dinokernels.eval.loading import load_backbone

    model, config, _ = load_backbone(os.path.join(cfg.out, "checkpoint.pth"))
    assert config.method == "dinov2" and model.embed_dim == 128
    for k, v in model.state_dict().items():
        assert torch.equal(v, state["student_ema.backbone." + k]), k


def test_cli_dinov2_run_resume_and_knn(tmp_path, capsys):
    out = str(tmp_path / "cli")
    argv = ["pretrain", "--method", "dinov2", "--out", out, "--subset", "8", "--batch-size", "4", "--epochs", "1",
            "--warmup-epochs", "0", "--global-size", "8", "--local-size", "4",
            "--patch-size", "4", "--local-crops-number", "2", "--out-dim", "32", "--hidden-dim", "16",
            "--bottleneck-dim", "8", "--mask-probability", "1", "--mask-ratio", "0.25", "0.5",
            "--layerscale", "0.1", "--koleo-loss-weight", "0.2", "--ibot-loss-weight", "0.5",
            "--centering", "sinkhorn_knopp", "--ibot-separate-head", "true", "--ibot-out-dim", "24",
            "--layer-decay", "0.8", "--patch-embed-lr-mult", "0.5", "--blur-semantics", "nominal",
            "--num-register-tokens", "1", "--no-eval", "--no-progress", "--num-workers", "0", "--device", "cpu"]
    assert cli_main(argv) == 0
    ckpt = load_checkpoint(os.path.join(out, "checkpoint.pth"))
    cfg = ckpt["config"]
    assert (cfg["method"], cfg["centering"], cfg["ibot_separate_head"], cfg["ibot_out_dim"], cfg["layer_decay"],
            cfg["koleo_loss_weight"], cfg["num_register_tokens"], cfg["mask_ratio"]) == \
        ("dinov2", "sinkhorn_knopp", True, 24, 0.8, 0.2, 1, [0.25, 0.5])
    assert any(k.startswith("student.ibot_head.") for k in ckpt["method"])
    # resume with more epochs: the checkpoint's method and recipe are used
    assert cli_main(["pretrain", "--resume", os.path.join(out, "checkpoint.pth"), "--epochs", "2"]) == 0
    resumed = load_checkpoint(os.path.join(out, "checkpoint.pth"))
    assert resumed["iteration"] == 4 and resumed["config"]["method"] == "dinov2"
    capsys.readouterr()
    assert cli_main(["knn", "--checkpoint", os.path.join(out, "checkpoint.pth"), "--json", "--no-baselines",
                     "--device", "cpu"]) == 0
    results = json.loads(capsys.readouterr().out)["results"]
    assert len(results) == 1 and all(0.0 <= r["knn"] <= 1.0 for r in results.values())


@pytest.mark.parametrize("argv, message", [
    (["--layer-decay", "0.5"], "--method dinov2 only"),
    (["--method", "dinov2", "--mask-ratio", "0.6", "0.2"], "mask_ratio"),
    (["--method", "dinov2", "--mask-ratio", "0.1", "1.5"], "out of range"),
    (["--method", "dinov2", "--layer-decay", "0"], "out of range"),
    (["--method", "dinov2", "--distill-teacher", "/nonexistent/t.pth"], "no such file"),
    (["--method", "dinov2", "--highres-epochs", "1", "--highres-global-size", "18"], "multiples of the patch"),
    (["--method", "dinov3"], "invalid choice"),
])
def test_cli_bad_dinov2_flags_are_usage_errors(tmp_path, capsys, argv, message):
    out = str(tmp_path / "bad")
    try:
        code = cli_main(["pretrain", "--out", out] + argv)
    except SystemExit as e:  # argparse's own errors
        code = e.code
    assert code == 2
    assert message in capsys.readouterr().err
    assert not os.path.exists(out)


WORKER = textwrap.dedent("""
    import json, os, sys
    import torch
    from dinokernels.train import methods
    from dinokernels.train.config import make_config
    from dinokernels.train.trainer import train_dino
    from dinokernels.train.distributed import cleanup_distributed

    torch.set_num_threads(1)
    rank = os.environ["RANK"]
    built = []
    real_build = methods.build_method

    def build_and_keep(config, device):
        method = real_build(config, device)
        torch.save(method.method.student.state_dict(), f"start{rank}.pth")
        built.append(method)
        return method

    methods.build_method = build_and_keep
    result = train_dino(make_config(**json.loads(sys.argv[1])))
    assert result["world_size"] == 2 and result["iterations"] == 2, result
    torch.save(built[0].method.student.state_dict(), f"student{rank}.pth")
    cleanup_distributed()
""")


@pytest.mark.skipif(not (torch.distributed.is_available() and torch.distributed.is_gloo_available()),
                    reason="torch.distributed with gloo is not available")
def test_two_processes_under_gloo_keep_identical_weights(tmp_path):
    settings = dict(TINY, subset=16, drop_path_rate=0.0, out=str(tmp_path / "ddp"))
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    procs = []
    for rank in range(2):
        env = dict(os.environ, RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", OMP_NUM_THREADS="1",
                   DINOKERNELS_INIT_METHOD="file://" + str(tmp_path / "store"))
        procs.append(subprocess.Popen([sys.executable, str(script), json.dumps(settings)], cwd=str(tmp_path), env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    deadline = time.monotonic() + 240
    while any(p.poll() is None for p in procs) and time.monotonic() < deadline:
        if any(p.poll() not in (None, 0) for p in procs):
            break
        time.sleep(0.1)
    for p in procs:
        if p.poll() is None:
            p.kill()
    logs = [p.communicate()[0] for p in procs]
    if any(p.returncode != 0 for p in procs):
        pytest.fail("\n".join(f"--- rank {r} ---\n{log}" for r, log in enumerate(logs)), pytrace=False)
    assert "× 2 processes" in logs[0]
    ckpt = load_checkpoint(tmp_path / "ddp" / "checkpoint.pth")
    assert ckpt["world_size"] == 2 and len(ckpt["rng"]) == 2
    # every rank starts from rank 0's weights and, the gradients being averaged, ends with the same student
    start = [torch.load(tmp_path / f"start{r}.pth", weights_only=True) for r in range(2)]
    end = [torch.load(tmp_path / f"student{r}.pth", weights_only=True) for r in range(2)]
    for k in end[0]:
        assert torch.equal(start[0][k], start[1][k]), k
        assert torch.equal(end[0][k], end[1][k]), k
        assert torch.equal(end[0][k], ckpt["method"]["student." + k]), k
    assert any(not torch.equal(start[0][k], end[0][k]) for k in end[0] if k.startswith("backbone.blocks"))
