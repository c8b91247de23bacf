"""Two CPU processes (gloo, file:// rendezvous, no torchrun) train DINO with DDP for a couple of steps; the result
equals one process training on both processes' images (the same global batch)."""
import json
import textwrap

import pytest
import torch
from dk_test_helpers import launch_ranks

from dinokernels.train.checkpoint import load_checkpoint
from dinokernels.train.config import make_config
from dinokernels.train.trainer import train_dino

WORLD = 2
SETTINGS = dict(preset="digits", subset=32, epochs=1, warmup_epochs=0, global_size=16, local_size=8,
                digits_size=16, local_crops_number=2, out_dim=64, hidden_dim=32, bottleneck_dim=16, drop_path_rate=0.0,
                evaluate=False, progress=False, num_workers=0, seed=5, freeze_last_layer=0,
                optimizer="sgd", lr=4.0)  # SGD: unlike Adam, its step depends on the gradient scale (averaging)

WORKER = textwrap.dedent("""
    import json, os, sys
    import torch
    import dinokernels
    from dinokernels.train.config import make_config
    from dinokernels.train.trainer import train_dino
    from dinokernels.train.distributed import get_world_size, cleanup_distributed

    torch.set_num_threads(1)
    settings = json.loads(sys.argv[1])
    result = train_dino(make_config(**settings))
    assert get_world_size() == int(os.environ["WORLD_SIZE"]), get_world_size()
    assert result["world_size"] == 2 and result["iterations"] == 4, result
    cleanup_distributed()
""")


def _launch(folder, settings):
    return launch_ranks(folder, WORKER, json.dumps(settings), WORLD, timeout=240)


@pytest.mark.skipif(not (torch.distributed.is_available() and torch.distributed.is_gloo_available()),
                    reason="torch.distributed with gloo is not available")
def test_two_process_ddp_equals_one_process_with_the_global_batch(tmp_path):
    ddp_out = tmp_path / "ddp"
    logs = _launch(str(tmp_path), dict(SETTINGS, out=str(ddp_out), batch_size_per_gpu=4))
    assert "× 2 processes" in logs[0]
    ddp = load_checkpoint(ddp_out / "checkpoint.pth")
    assert ddp["world_size"] == 2 and ddp["iteration"] == 4 and len(ddp["rng"]) == 2
    summary = json.load(open(ddp_out / "summary.json"))
    assert summary["world_size"] == 2

    single = train_dino(make_config(**dict(SETTINGS, out=str(tmp_path / "one"), batch_size_per_gpu=8)))
    assert single["iterations"] == 4
    one = load_checkpoint(tmp_path / "one" / "checkpoint.pth")
    # same lr (linear scaling uses the global batch 2 × 4 = 8), same images per step, same center
    for key in ("teacher", "student"):
        for name, value in one[key].items():
            torch.testing.assert_close(ddp[key][name], value, rtol=1e-4, atol=2e-6, msg=lambda m: f"{key}.{name}: {m}")
    torch.testing.assert_close(ddp["dino_loss"]["center"], one["dino_loss"]["center"], rtol=1e-4, atol=1e-6)
    assert not torch.equal(one["student"]["backbone.pos_embed"], one["teacher"]["backbone.pos_embed"])  # trained


BN_WORKER = textwrap.dedent("""
    import json, sys
    import torch
    import dinokernels
    from dinokernels.train.config import make_config
    from dinokernels.train.trainer import train_dino
    from dinokernels.train.distributed import cleanup_distributed

    torch.set_num_threads(1)
    try:
        train_dino(make_config(**json.loads(sys.argv[1])))
    except ValueError as error:
        print("refused:", error)
    else:
        raise SystemExit("a batch-norm head trained under CPU DDP")
    cleanup_distributed()
""")


@pytest.mark.skipif(not (torch.distributed.is_available() and torch.distributed.is_gloo_available()),
                    reason="torch.distributed with gloo is not available")
def test_batch_norm_head_under_cpu_ddp_is_refused_before_training(tmp_path):
    # torch's SyncBatchNorm only runs on GPUs; without the check each rank failed inside its first forward.
    logs = launch_ranks(str(tmp_path), BN_WORKER,
                        json.dumps(dict(SETTINGS, out=str(tmp_path / "bn"), batch_size_per_gpu=4, use_bn_in_head=True)),
                        WORLD, timeout=240)
    for log in logs:
        assert "refused:" in log and "SyncBatchNorm" in log and "one process" in log, log
    assert not (tmp_path / "bn" / "checkpoint.pth").exists()
