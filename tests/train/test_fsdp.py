"""`pretrain --fsdp`: FSDP (torch.distributed.fsdp.fully_shard) on two CPU processes over gloo.

One launch of two processes runs every distributed case in turn (process start-up is most of the cost):
* DINO (SGD, so that the step depends on the gradient scale; clipping small enough to act on every tensor) and
  DINOv2 (AdamW, per-sub-module clipping small enough to act) each under DDP and under FSDP with the same seed,
  data and world size: the same per-iteration losses and the same weights, optimiser state and centers. DDP is the
  exactly comparable baseline (the same two per-rank batches; DINOv2's masks and KoLeo are per-rank batch, so one
  process with the global batch is not the same computation);
* an FSDP DINOv2 run resumed under FSDP from its epoch-0 checkpoint ends where the uninterrupted run ends;
* FSDP with bf16 compute trains (its losses near, not equal to, float32's).
A checkpoint written under FSDP is a full state dict: it loads in a single process without FSDP, resumes there, and
its backbone loads into a DinoVisionTransformer."""
import json
import math
import os
import textwrap

import pytest
import torch
from dk_test_helpers import launch_ranks

from dinokernels.cli import main as cli_main
from dinokernels.train.checkpoint import load_checkpoint
from dinokernels.train.config import make_config
from dinokernels.train.trainer import train_dino

pytestmark = pytest.mark.skipif(not (torch.distributed.is_available() and torch.distributed.is_gloo_available()),
                                reason="torch.distributed with gloo is not available")

WORLD = 2
# the plain digits job: the default (coloured digits) has a batch-norm head, which FSDP cannot shard
DINO = dict(method="dino", preset="digits", subset=16, epochs=1, warmup_epochs=0, global_size=16, local_size=8,
            digits_size=16, local_crops_number=2, out_dim=64, hidden_dim=32, bottleneck_dim=16, drop_path_rate=0.0,
            evaluate=False, progress=False, num_workers=0, seed=5, freeze_last_layer=0, optimizer="sgd", lr=4.0,
            clip_grad=0.05, batch_size_per_gpu=4, device="cpu", arch="vit_nano")
# 16 digits at 8px, 4 per rank and step (2 iterations per epoch), 2×2 patches of 4; every global crop masked
DINOV2 = dict(method="dinov2", subset=16, batch_size_per_gpu=4, epochs=2, warmup_epochs=0, digits_size=8,
              global_size=8, local_size=4, patch_size=4, local_crops_number=2, out_dim=32, hidden_dim=16,
              bottleneck_dim=8, mask_probability=1.0, mask_ratio=(0.25, 0.5), drop_path_rate=0.0, evaluate=False,
              progress=False, num_workers=0, seed=3, freeze_last_layer=0, layerscale=0.1, device="cpu",
              arch="vit_nano", clip_grad=0.5, saveckp_freq=1, ibot_separate_head=True)

WORKER = textwrap.dedent("""
    import json, os, sys, time
    t0 = time.perf_counter()
    import torch
    from dinokernels.train import methods
    from dinokernels.train.config import make_config
    from dinokernels.train.distributed import cleanup_distributed, get_world_size, is_sharded, local_part
    from dinokernels.train.trainer import train_dino

    torch.set_num_threads(1)
    built = []
    real_build = methods.build_method

    def build_and_keep(config, device):
        built.append(real_build(config, device))
        return built[-1]

    methods.build_method = build_and_keep
    print(f"imports: {time.perf_counter() - t0:.1f} s", flush=True)
    shards = {}
    for name, settings in json.loads(sys.argv[1]):
        t0 = time.perf_counter()
        result = train_dino(make_config(**settings))
        print(f"{name}: {time.perf_counter() - t0:.1f} s", flush=True)
        assert result["world_size"] == 2 and get_world_size() == 2, result
        student = built[-1].student
        params = list(student.parameters())
        shards[name] = {"sharded": all(is_sharded(p) for p in params), "global": sum(p.numel() for p in params),
                        "local": sum(local_part(p).numel() for p in params)}
        if name in ("dino_fsdp", "v2_fsdp", "distil_fsdp"):  # the final model: gathered, whole on rank 0 only
            final = built[-1].eval_backbone()
            assert (final is None) == (os.environ["RANK"] != "0"), final
            if final is not None:
                assert not any(is_sharded(t) for t in final.state_dict().values())
                torch.save(final.state_dict(), f"eval_{name}.pth")
    with open(f"shards{os.environ['RANK']}.json", "w") as f:
        json.dump(shards, f)
    built.clear()  # as after a CLI run: the sharded models are gone before the group ends
    cleanup_distributed()
""")


def _launch(folder, runs):
    logs = launch_ranks(folder, WORKER, json.dumps(runs), WORLD, timeout=300)
    shards = [json.load(open(os.path.join(folder, f"shards{r}.json"))) for r in range(WORLD)]
    return logs, shards


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("fsdp")
    out = {name: str(root / name) for name in ("dino_ddp", "dino_fsdp", "v2_ddp", "v2_fsdp", "v2_resumed",
                                                "v2_bf16", "distil_ddp", "distil_fsdp")}
    # distillation: a frozen, wider (vit_tiny, 192) teacher for the vit_nano (128) student
    from dinokernels.train.methods import build_dinov2_backbone

    torch.manual_seed(11)
    teacher, _ = build_dinov2_backbone(make_config(**dict(DINOV2, arch="vit_tiny")), 0.0)
    torch.save(teacher.state_dict(), root / "teacher.pth")
    distil = dict(DINOV2, epochs=1, distill_teacher=str(root / "teacher.pth"), distill_teacher_arch="vit_tiny")
    plan = [
        ("dino_ddp", dict(DINO, out=out["dino_ddp"])),
        ("dino_fsdp", dict(DINO, out=out["dino_fsdp"], fsdp=True)),
        ("v2_ddp", dict(DINOV2, out=out["v2_ddp"])),
        ("v2_fsdp", dict(DINOV2, out=out["v2_fsdp"], fsdp=True)),
        ("v2_resumed", dict(DINOV2, out=out["v2_resumed"], fsdp=True,
                            resume=os.path.join(out["v2_fsdp"], "checkpoint0000.pth"))),
        ("v2_bf16", dict(DINOV2, out=out["v2_bf16"], fsdp=True, fsdp_mixed_precision="bf16", epochs=1)),
        ("distil_ddp", dict(distil, out=out["distil_ddp"])),
        ("distil_fsdp", dict(distil, out=out["distil_fsdp"], fsdp=True)),
    ]
    for _, settings in plan:  # JSON: tuples become lists
        settings["mask_ratio"] = list(settings.get("mask_ratio", (0.1, 0.5)))
    logs, shards = _launch(str(root), plan)
    return {"out": out, "logs": logs, "shards": shards, "root": root}


def _losses(folder):
    with open(os.path.join(folder, "log.jsonl")) as f:
        return [r["loss"] for r in map(json.loads, f) if r["kind"] == "iter"]


def _close_states(a, b, what, rtol=1e-4, atol=2e-6):
    assert a.keys() == b.keys(), what
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=rtol, atol=atol, msg=lambda m: f"{what}.{name}: {m}")


def _close_optimizer(a, b, what):
    assert [len(g["params"]) for g in a["param_groups"]] == [len(g["params"]) for g in b["param_groups"]]
    assert a["state"].keys() == b["state"].keys(), what
    for index in a["state"]:
        for key, value in a["state"][index].items():
            torch.testing.assert_close(value, b["state"][index][key], rtol=1e-4, atol=2e-6,
                                       msg=lambda m: f"{what} {index}.{key}: {m}")


def test_fsdp_really_shards_and_says_so(runs):
    for name in ("dino_fsdp", "v2_fsdp", "v2_bf16"):
        for rank_shards in runs["shards"]:
            s = rank_shards[name]
            assert s["sharded"] and s["local"] < s["global"], (name, s)
        assert sum(r[name]["local"] for r in runs["shards"]) == runs["shards"][0][name]["global"]
    for name in ("dino_ddp", "v2_ddp"):
        assert not runs["shards"][0][name]["sharded"]
    assert "FSDP (float32 compute)" in runs["logs"][0] and "FSDP (bfloat16 compute)" in runs["logs"][0]
    summary = json.load(open(os.path.join(runs["out"]["v2_bf16"], "summary.json")))
    assert summary["fsdp"] is True and summary["fsdp_compute_dtype"] == "bfloat16"


def test_fsdp_final_model_is_gathered_whole_on_rank0(runs):
    dino = torch.load(runs["root"] / "eval_dino_fsdp.pth", weights_only=True)
    ckpt = load_checkpoint(os.path.join(runs["out"]["dino_fsdp"], "checkpoint.pth"))
    assert dino.keys() == ckpt["teacher"].keys()
    for k, v in dino.items():
        assert torch.equal(v, ckpt["teacher"][k]), k
    v2 = torch.load(runs["root"] / "eval_v2_fsdp.pth", weights_only=True)
    state = load_checkpoint(os.path.join(runs["out"]["v2_fsdp"], "checkpoint.pth"))["method"]
    expected = {k.replace("teacher.dino_head.", "head.").replace("teacher.", ""): v for k, v in state.items()
                if k.startswith(("teacher.backbone.", "teacher.dino_head."))}
    assert v2.keys() == expected.keys()
    for k, v in v2.items():
        assert torch.equal(v, expected[k]), k
    distilled = torch.load(runs["root"] / "eval_distil_fsdp.pth", weights_only=True)  # the student EMA
    state = load_checkpoint(os.path.join(runs["out"]["distil_fsdp"], "checkpoint.pth"))["method"]
    expected = {k.replace("student_ema.dino_head.", "head.").replace("student_ema.", ""): v for k, v in state.items()
                if k.startswith(("student_ema.backbone.", "student_ema.dino_head."))}
    assert distilled.keys() == expected.keys()
    for k, v in distilled.items():
        assert torch.equal(v, expected[k]), k


def test_dino_fsdp_equals_ddp(runs):
    ddp, fsdp = (load_checkpoint(os.path.join(runs["out"][n], "checkpoint.pth")) for n in ("dino_ddp", "dino_fsdp"))
    torch.testing.assert_close(_losses(runs["out"]["dino_fsdp"]), _losses(runs["out"]["dino_ddp"]), rtol=1e-5,
                               atol=0)
    assert fsdp["world_size"] == 2 and fsdp["config"]["fsdp"] is True
    for key in ("student", "teacher"):
        _close_states(fsdp[key], ddp[key], key)
        assert all(v.dtype == torch.float32 for v in fsdp[key].values() if v.is_floating_point())
    # the full-state layout of a plain model: DDP's student keys carry no prefix here either
    assert fsdp["student"].keys() == ddp["student"].keys()
    torch.testing.assert_close(fsdp["dino_loss"]["center"], ddp["dino_loss"]["center"], rtol=1e-4, atol=1e-6)
    _close_optimizer(fsdp["optimizer"], ddp["optimizer"], "optimizer")
    assert not torch.equal(ddp["student"]["backbone.pos_embed"], ddp["teacher"]["backbone.pos_embed"])  # trained


def test_dinov2_fsdp_equals_ddp(runs):
    ddp, fsdp = (load_checkpoint(os.path.join(runs["out"][n], "checkpoint.pth")) for n in ("v2_ddp", "v2_fsdp"))
    losses = _losses(runs["out"]["v2_fsdp"])
    assert len(losses) == 4
    torch.testing.assert_close(losses, _losses(runs["out"]["v2_ddp"]), rtol=1e-5, atol=0)
    _close_states(fsdp["method"], ddp["method"], "method")
    _close_optimizer(fsdp["optimizer"], ddp["optimizer"], "optimizer")
    start = load_checkpoint(os.path.join(runs["out"]["v2_fsdp"], "checkpoint0000.pth"))
    moved = [k for k in fsdp["method"] if k.startswith("student.backbone.blocks")
             and not torch.equal(fsdp["method"][k], start["method"][k])]
    assert moved


def test_distillation_under_fsdp_equals_ddp_and_keeps_the_teacher(runs):
    ddp, fsdp = (load_checkpoint(os.path.join(runs["out"][n], "checkpoint.pth"))["method"]
                 for n in ("distil_ddp", "distil_fsdp"))
    torch.testing.assert_close(_losses(runs["out"]["distil_fsdp"]), _losses(runs["out"]["distil_ddp"]), rtol=1e-5,
                               atol=0)
    _close_states(fsdp, ddp, "method")
    teacher = torch.load(runs["root"] / "teacher.pth", weights_only=True)
    for k, v in teacher.items():  # the frozen teacher, sharded for the steps, comes back unchanged
        assert torch.equal(fsdp["teacher.backbone." + k], v), k
    # the student EMA follows the student at 1 − momentum of its steps: kept, and not the student itself
    assert any(not torch.equal(fsdp[k], fsdp[k.replace("student_ema.", "student.", 1)])
               for k in fsdp if k.startswith("student_ema.backbone.blocks"))


def test_fsdp_resume_under_fsdp_continues_the_run(runs):
    straight = load_checkpoint(os.path.join(runs["out"]["v2_fsdp"], "checkpoint.pth"))
    resumed = load_checkpoint(os.path.join(runs["out"]["v2_resumed"], "checkpoint.pth"))
    assert resumed["iteration"] == straight["iteration"] == 4
    assert "resuming at epoch 1, iteration 2" in runs["logs"][0]
    # the resumed run's own folder logs its two iterations
    torch.testing.assert_close(_losses(runs["out"]["v2_resumed"]), _losses(runs["out"]["v2_fsdp"])[2:],
                               rtol=1e-6, atol=0)
    _close_states(resumed["method"], straight["method"], "method", rtol=1e-6, atol=1e-7)
    _close_optimizer(resumed["optimizer"], straight["optimizer"], "optimizer")


def test_fsdp_checkpoint_loads_and_resumes_in_one_process_without_fsdp(runs, tmp_path):
    from dinokernels.models import dinov2
    from dinokernels.train.methods import (
        DINOv2TrainingMethod,
        build_dinov2_backbone,
        dinov2_checkpoint_backbone,
    )

    path = os.path.join(runs["out"]["v2_fsdp"], "checkpoint0000.pth")
    ckpt = load_checkpoint(path)
    config = make_config(**dict(DINOV2, out=str(tmp_path / "one")))
    method = DINOv2TrainingMethod(config, torch.device("cpu"))
    method.load_state_dict(ckpt)
    method.optimizer.load_state_dict(ckpt["optimizer"])
    for key, value in method.method.state_dict().items():
        assert torch.equal(value, ckpt["method"][key]), key
    backbone, _ = build_dinov2_backbone(config, 0.0)
    dinov2.load_official_weights(backbone, dinov2_checkpoint_backbone(ckpt, "teacher"))
    # a single process with the global batch continues the two-process FSDP run (its own masks: not bit-equal)
    result = train_dino(config.replace(resume=path, batch_size_per_gpu=8))
    assert result["world_size"] == 1 and result["iterations"] == 4 and result["resumed_from"] == path
    final = load_checkpoint(tmp_path / "one" / "checkpoint.pth")
    assert final["config"]["fsdp"] is False
    assert any(not torch.equal(final["method"][k], ckpt["method"][k]) for k in ckpt["method"]
               if k.startswith("student.backbone.blocks"))


def test_fsdp_bf16_compute_trains_near_float32(runs):
    bf16 = _losses(runs["out"]["v2_bf16"])
    fp32 = _losses(runs["out"]["v2_fsdp"])[:2]  # epochs 1 vs 2: the same first-iteration schedule values
    assert len(bf16) == 2 and all(map(lambda v: v == v, bf16))
    assert bf16[0] != fp32[0]  # computed in bfloat16 ...
    assert abs(bf16[0] - fp32[0]) < 0.05 * abs(fp32[0])  # ... which rounds at ~3 significant digits
    ckpt = load_checkpoint(os.path.join(runs["out"]["v2_bf16"], "checkpoint.pth"))
    assert all(v.dtype == torch.float32 for v in ckpt["method"].values() if v.is_floating_point())


@pytest.mark.parametrize("separate_head", [True, False])
def test_fsdp_in_one_process_equals_plain_training(tmp_path, separate_head):
    """Without torchrun, --fsdp runs on a process group of one (and ends it): the same run as without FSDP. With
    the default shared head, FSDP runs the DINO head twice per step (CLS and masked patch tokens)."""
    run = dict(DINOV2, epochs=1, subset=8, ibot_separate_head=separate_head)
    plain = train_dino(make_config(**dict(run, out=str(tmp_path / "plain"))))
    assert plain["fsdp"] is False
    sharded = train_dino(make_config(**dict(run, out=str(tmp_path / "fsdp"), fsdp=True)))
    assert not torch.distributed.is_initialized()
    assert sharded["fsdp"] is True and sharded["world_size"] == 1
    torch.testing.assert_close(_losses(tmp_path / "fsdp"), _losses(tmp_path / "plain"), rtol=1e-6, atol=0)
    a, b = (load_checkpoint(tmp_path / n / "checkpoint.pth") for n in ("fsdp", "plain"))
    _close_states(a["method"], b["method"], "method", rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("argv, message", [
    (["--fsdp-mixed-precision", "bf16"], "fsdp_mixed_precision needs fsdp"),
    (["--fsdp", "--precision", "bf16"], "use fsdp_mixed_precision bf16"),
    (["--fsdp", "--optimizer", "lars"], "optimizer lars cannot be combined with fsdp"),
    (["--fsdp", "--use-bn-in-head", "true"], "use_bn_in_head cannot be combined with fsdp"),
    (["--fsdp", "--fsdp-mixed-precision", "fp8"], "invalid choice"),
])
def test_cli_bad_fsdp_flags_are_usage_errors(tmp_path, capsys, argv, message):
    out = str(tmp_path / "bad")
    try:
        code = cli_main(["pretrain", "--out", out] + argv)
    except SystemExit as e:  # argparse's own errors
        code = e.code
    assert code == 2
    assert message in capsys.readouterr().err
    assert not os.path.exists(out)


def test_cli_fsdp_fp16_in_one_process_then_resume_without_fsdp(tmp_path, capsys):
    """--fsdp --fsdp-mixed-precision fp16 on the CPU (float16 compute with loss scaling), then --resume --no-fsdp:
    the stored FSDP settings are dropped and the plain run continues from the full checkpoint."""
    out = str(tmp_path / "run")
    common = ["--method", "dinov2", "--subset", "8", "--batch-size", "4", "--global-size", "8", "--local-size", "4",
              "--patch-size", "4", "--local-crops-number", "2", "--out-dim", "32",
              "--hidden-dim", "16", "--bottleneck-dim", "8", "--arch", "vit_nano", "--device", "cpu", "--no-eval",
              "--no-progress", "--num-workers", "0"]
    assert cli_main(["pretrain", "--out", out, "--epochs", "1", "--fsdp", "--fsdp-mixed-precision", "fp16"]
                    + common) == 0
    err = capsys.readouterr().err
    assert "FSDP (float16 compute)" in err and "float16 on the CPU is slow" in err
    ckpt = load_checkpoint(os.path.join(out, "checkpoint.pth"))
    assert ckpt["config"]["fsdp"] is True and ckpt["config"]["fsdp_mixed_precision"] == "fp16"
    assert ckpt["fp16_scaler"] is not None and ckpt["fp16_scaler"]["scale"] > 0  # the loss scaler's state
    assert all(v.dtype == torch.float32 for v in ckpt["method"].values() if v.is_floating_point())
    assert cli_main(["pretrain", "--resume", os.path.join(out, "checkpoint.pth"), "--epochs", "2", "--no-fsdp"]) == 0
    resumed = load_checkpoint(os.path.join(out, "checkpoint.pth"))
    assert resumed["iteration"] == 4 and resumed["config"]["fsdp"] is False
    assert resumed["config"]["fsdp_mixed_precision"] == "auto"
    assert "FSDP" not in capsys.readouterr().err


def test_world_size_without_rank_is_a_clear_error(monkeypatch, tmp_path):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.delenv("RANK", raising=False)
    with pytest.raises(RuntimeError, match="RANK is not set: start the processes with torchrun"):
        train_dino(make_config(**dict(DINOV2, epochs=1, out=str(tmp_path / "x"), fsdp=True)))
    assert not torch.distributed.is_initialized()


@pytest.mark.cuda
def test_fsdp_on_cuda_one_process(tmp_path):
    """On a GPU (NCCL group of one): FSDP without mixed precision equals plain float32 training; the default
    (auto) computes in bf16 near it and resumes under FSDP; fp16 compute with loss scaling trains DINO."""
    v2 = dict(DINOV2, device="cuda")
    plain = train_dino(make_config(**dict(v2, precision="fp32", out=str(tmp_path / "plain"))))
    none = train_dino(make_config(**dict(v2, fsdp=True, fsdp_mixed_precision="none", out=str(tmp_path / "none"))))
    assert none["fsdp_compute_dtype"] is None and plain["fsdp"] is False
    torch.testing.assert_close(_losses(tmp_path / "none"), _losses(tmp_path / "plain"), rtol=1e-4, atol=0)
    a, b = (load_checkpoint(tmp_path / n / "checkpoint.pth") for n in ("none", "plain"))
    _close_states(a["method"], b["method"], "method", rtol=1e-3, atol=1e-5)

    auto = train_dino(make_config(**dict(v2, fsdp=True, out=str(tmp_path / "auto"))))
    assert auto["fsdp_compute_dtype"] == "bfloat16" and auto["precision"] == "fp32"
    bf16, fp32 = _losses(tmp_path / "auto"), _losses(tmp_path / "plain")
    assert bf16 != fp32 and all(abs(x - y) < 0.05 * abs(y) for x, y in zip(bf16, fp32))
    resumed = train_dino(make_config(**dict(v2, fsdp=True, out=str(tmp_path / "resumed"),
                                            resume=str(tmp_path / "auto" / "checkpoint0000.pth"))))
    assert resumed["iterations"] == auto["iterations"] == 8  # one process: 4 iterations of 4 images per epoch
    torch.testing.assert_close(_losses(tmp_path / "resumed"), bf16[4:], rtol=1e-3, atol=0)

    fp16 = train_dino(make_config(**dict(DINO, device="cuda", fsdp=True, fsdp_mixed_precision="fp16",
                                         out=str(tmp_path / "fp16"))))
    assert fp16["fsdp_compute_dtype"] == "float16" and all(map(math.isfinite, _losses(tmp_path / "fp16")))
    assert load_checkpoint(tmp_path / "fp16" / "checkpoint.pth")["fp16_scaler"]["scale"] > 0
    assert not torch.distributed.is_initialized()
