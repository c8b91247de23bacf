"""The command line: `dinokernels info` still works; `pretrain` (a small smoke run through `python -m dinokernels`),
`knn` and `attention` on the checkpoint it writes; flag parsing (official defaults with --data, the built-in preset
without); no torchvision/timm import."""
import argparse
import json
import os
import subprocess
import sys
import tempfile

import pytest

from dinokernels.cli import _pretrain_config, main


def run_cli(*args, timeout=300):
    # Run from outside the repository: `-m` puts the working directory first on sys.path, and from the repository
    # root that is the source tree, which has no compiled module when the package is installed non-editable (CI).
    return subprocess.run([sys.executable, "-m", "dinokernels", *args], capture_output=True, text=True,
                          timeout=timeout, env=dict(os.environ, DINOKERNELS_BACKEND="kernel"),
                          cwd=tempfile.gettempdir())


def _parse(argv):
    parser = argparse.ArgumentParser()
    commands = parser.add_subparsers(dest="command")
    from dinokernels.cli import add_commands
    add_commands(commands)
    return parser.parse_args(["pretrain", *argv])


def test_info_still_works(capsys):
    assert main(["info"]) == 0
    assert "version" in capsys.readouterr().out


def test_script_and_module_run_the_one_main():
    # The command line lives in cli.py: the `dinokernels` script and `python -m dinokernels` both call cli.main.
    import importlib
    import dinokernels.__main__ as module_entry

    with open(os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "pyproject.toml")) as f:
        scripts = f.read().split("[project.scripts]")[1].split("[")[0]
    target = scripts.split("dinokernels =")[1].split()[0].strip('"')
    module_name, function = target.split(":")
    assert getattr(importlib.import_module(module_name), function) is main
    assert module_entry.main is main
    proc = run_cli("--help")
    assert proc.returncode == 0 and all(c in proc.stdout for c in ("info", "pretrain", "knn", "attention"))


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("cli") / "run"
    proc = run_cli("pretrain", "--epochs", "1", "--subset", "128", "--batch-size", "32", "--out", str(out),
                   "--no-progress")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return out, proc


def test_pretrain_smoke_run_writes_summary(smoke_run):
    out, proc = smoke_run
    summary = json.load(open(out / "summary.json"))
    for key in ("knn_learned", "knn_random_init", "knn_raw_pixels"):
        assert 0.0 <= summary[key] <= 1.0, key
    # the default data (coloured digits) and their raw-pixel k-NN are fixed: 228 of the 359 test images (63.5 %)
    assert summary["knn_raw_pixels"] == pytest.approx(228 / 359) and summary["dataset"] == "coloured-digits"
    assert summary["wall_seconds"] > 0 and summary["iterations"] == 4
    assert summary["config"]["arch"] == "vit_nano" and summary["config"]["epochs"] == 1
    assert {"teacher_entropy", "teacher_mean_entropy", "ln_K", "collapse"} <= set(summary)
    for name in ("checkpoint.pth", "log.jsonl", "loss.png"):
        assert (out / name).is_file(), name
    assert "k-NN top-1" in proc.stdout and "random init" in proc.stdout and "raw pixels" in proc.stdout
    assert "teacher output entropy" in proc.stdout and "wall time" in proc.stdout


def test_knn_command(smoke_run):
    out, _ = smoke_run
    proc = run_cli("knn", "--checkpoint", str(out / "checkpoint.pth"), "--json")
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    summary = json.load(open(out / "summary.json"))
    assert result["knn_learned"] == pytest.approx(summary["knn_learned"])  # same features, same k-NN
    assert "raw pixels" in result["results"]
    proc = run_cli("knn", "--checkpoint", str(out / "checkpoint.pth"), "--which", "student", "--no-baselines")
    assert proc.returncode == 0 and "learned (student)" in proc.stdout and "random init" not in proc.stdout


def test_attention_command(smoke_run, tmp_path):
    out, _ = smoke_run
    png = tmp_path / "attn.png"
    proc = run_cli("attention", "--checkpoint", str(out / "checkpoint.pth"), "--out", str(png))
    assert proc.returncode == 0, proc.stderr
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and "4 heads" in proc.stdout
    from PIL import Image
    img = tmp_path / "digit.png"
    Image.new("RGB", (20, 30), (255, 255, 255)).save(img)
    proc = run_cli("attention", "--checkpoint", str(out / "checkpoint.pth"), "--image", str(img), "--out",
                   str(tmp_path / "b.png"), "--image-size", "24")
    assert proc.returncode == 0, proc.stderr


def test_resume_without_checkpoint_fails_cleanly(tmp_path):
    proc = run_cli("pretrain", "--resume", "--out", str(tmp_path / "nothing"))
    assert proc.returncode != 0 and "no checkpoint" in proc.stderr


def test_flags_official_defaults_with_data_and_preset_without(tmp_path):
    real = _pretrain_config(_parse(["--data", str(tmp_path)]))
    assert (real.arch, real.patch_size, real.out_dim, real.epochs, real.batch_size_per_gpu, real.lr,
            real.warmup_epochs, real.momentum_teacher, real.local_crops_number, real.global_size) == \
        ("vit_small", 16, 65536, 100, 64, 0.0005, 10, 0.996, 8, 224)
    digits = _pretrain_config(_parse(["--epochs", "1", "--batch_size_per_gpu", "16", "--global-crops-scale", "0.5",
                                      "1", "--norm_last_layer", "false", "--use-fp16", "false"]))
    assert digits.arch == "vit_nano" and digits.epochs == 1 and digits.warmup_epochs == 1
    assert digits.batch_size_per_gpu == 16 and digits.global_crops_scale == (0.5, 1.0)
    assert digits.norm_last_layer is False and digits.precision == "fp32"
    assert "--batch-size" in run_cli("pretrain", "--help").stdout


def test_no_torchvision_or_timm_import():
    # torch itself imports tqdm when it is installed: only what dinokernels adds counts.
    code = ("import sys, torch; before = set(sys.modules); "
            "import dinokernels.cli, dinokernels.train.trainer, dinokernels.eval.report, "
            "dinokernels.eval.attention, dinokernels.eval.loading, dinokernels.models.dino, dinokernels.data; "
            "bad = [m for m in ('torchvision', 'timm', 'matplotlib', 'tqdm') if m in set(sys.modules) - before]; "
            "assert not bad, bad")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr


def test_resume_continues_with_the_checkpoint_settings(smoke_run, tmp_path):
    import shutil
    out, _ = smoke_run
    copy = tmp_path / "run"
    shutil.copytree(out, copy)
    proc = run_cli("pretrain", "--resume", "--out", str(copy), "--epochs", "2", "--no-eval", "--no-progress")
    assert proc.returncode == 0, proc.stderr
    assert "resuming at epoch 1, iteration 4" in proc.stderr
    summary = json.load(open(copy / "summary.json"))
    assert summary["iterations"] == 8 and summary["config"]["subset"] == 128  # settings from the checkpoint
    assert summary["config"]["batch_size_per_gpu"] == 32 and summary["resumed_from"].endswith("checkpoint.pth")
