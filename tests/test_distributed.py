"""Multi-process behaviour of the loss modules and of sinkhorn_knopp: two CPU ranks over gloo.

The main process draws every rank's inputs, writes them to a temporary folder and starts two worker processes
(`python worker.py RANK`, process group initialised from a file:// store in the same folder). Each worker runs the
ops and modules on its own slice and saves what it got; the tests compare that with single-process runs on the
concatenated batch. A worker that raises makes the fixture fail with its traceback (and the other worker is
killed rather than left waiting in a collective).
"""
import os
import random
import subprocess
import sys
import textwrap
import time

import pytest
import torch

from dinokernels.losses import DINOLoss
from dinokernels.ops import sinkhorn_knopp
from dinokernels.ops.dino_loss_ref import dino_loss_centered_ref, dino_loss_ref
from dinokernels.ops.sinkhorn_knopp_ref import sinkhorn_knopp_ref

WORLD = 2
SEED = int(os.environ.get("DINOKERNELS_TEST_SEED") or random.SystemRandom().randrange(2**31))
K = 23
NCROPS, B = 4, 3  # DINO: per-rank batch
SK_CASES = [  # (rows on rank 0, rows on rank 1, teacher_temp, iterations, dtype)
    (5, 11, 0.05, 3, torch.float64),
    (5, 11, 0.04, 3, torch.float32),
    (9, 2, 0.07, 1, torch.float64),
    (8, 8, 0.05, 5, torch.float64),
    (0, 7, 0.05, 3, torch.float64),  # a rank without samples
]
IBOT_TOKENS = [(4, 9), (13, 1), (2, 11)]  # masked tokens per rank, per step
DINO_TEMPS = (0.04, 0.055, 0.07)
MOMENTUM = 0.8

WORKER = textwrap.dedent('''
    import datetime
    import os
    import sys

    import torch
    import torch.distributed as dist

    rank, world, folder = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
    dist.init_process_group("gloo", init_method="file://" + os.path.join(folder, "store"), rank=rank,
                            world_size=world, timeout=datetime.timedelta(seconds=60))
    import dinokernels
    from dinokernels.losses import DINOLoss, iBOTPatchLoss
    from dinokernels.ops import sinkhorn_knopp
    from dinokernels.ops.sinkhorn_knopp_ref import sinkhorn_knopp_plain

    dinokernels.set_backend("kernel")
    data = torch.load(os.path.join(folder, "inputs.pt"))
    out = {"sk": [], "sk_plain": [], "dino_loss": [], "dino_center": [], "dino_sk_loss": [],
           "ibot_center": [], "ibot_sk": []}

    for ranks, temp, iters in data["sk"]:
        out["sk"].append(sinkhorn_knopp(ranks[rank], temp, iters))
        out["sk_plain"].append(sinkhorn_knopp_plain(ranks[rank], temp, iters))

    centering = DINOLoss(data["k"], data["ncrops"], center_momentum=data["momentum"]).double()
    sk = DINOLoss(data["k"], data["ncrops"], centering="sinkhorn_knopp").double()
    for (students, teachers), temp in zip(data["dino_steps"], data["dino_temps"]):
        out["dino_loss"].append(centering(students[rank], teachers[rank], teacher_temp=temp))
        out["dino_center"].append(centering.center.clone())
        out["dino_sk_loss"].append(sk(students[rank], teachers[rank], teacher_temp=temp))

    ibot = iBOTPatchLoss(data["k"], center_momentum=data["momentum"]).double()
    for tokens in data["ibot_steps"]:
        out["ibot_sk"].append(ibot.sinkhorn_knopp_teacher(tokens[rank], 0.05,
                                                          n_masked_patches_tensor=torch.tensor([len(tokens[rank])])))
        ibot.update_center(tokens[rank])
        out["ibot_center"].append(ibot.center.clone())

    # process_group is honoured: a group holding rank 0 only behaves like a single process on rank 0's data.
    alone = dist.new_group([0])
    if rank == 0:
        ranks, temp, iters = data["sk"][0]
        out["sk_group0"] = sinkhorn_knopp(ranks[0], temp, iters, process_group=alone)
        solo = DINOLoss(data["k"], data["ncrops"], process_group=alone).double()
        students, teachers = data["dino_steps"][0]
        solo(students[0], teachers[0])
        out["dino_center_group0"] = solo.center.clone()
        solo_ibot = iBOTPatchLoss(data["k"], process_group=alone).double()
        solo_ibot.update_center(data["ibot_steps"][0][0])
        out["ibot_center_group0"] = solo_ibot.center.clone()

    torch.save(out, os.path.join(folder, f"rank{rank}.pt"))
    dist.barrier()
    dist.destroy_process_group()
''')


def _inputs():
    g = torch.Generator().manual_seed(SEED)

    def logits(n, k=K, dtype=torch.float64):
        return (torch.randn(n, k, generator=g, dtype=torch.float64) * 0.5).to(dtype)

    sk = [([logits(n0, dtype=dtype), logits(n1, dtype=dtype)], temp, iters) for n0, n1, temp, iters, dtype in SK_CASES]
    dino_steps = [([logits(NCROPS * B) * 3 for _ in range(WORLD)],
                   [logits(2 * B) + 0.3 for _ in range(WORLD)]) for _ in DINO_TEMPS]
    ibot_steps = [[logits(n) + 0.2 for n in counts] for counts in IBOT_TOKENS]
    return dict(k=K, ncrops=NCROPS, momentum=MOMENTUM, sk=sk, dino_steps=dino_steps, dino_temps=DINO_TEMPS,
                ibot_steps=ibot_steps)


def _run_workers(folder, timeout=90.0):
    script = os.path.join(folder, "worker.py")
    with open(script, "w") as f:
        f.write(WORKER)
    env = dict(os.environ, DINOKERNELS_BACKEND="kernel", OMP_NUM_THREADS="1")
    procs = [subprocess.Popen([sys.executable, script, str(rank), str(WORLD), folder], cwd=folder, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for rank in range(WORLD)]
    deadline = time.monotonic() + timeout
    failed = None
    while any(p.poll() is None for p in procs):
        failed = next((r for r, p in enumerate(procs) if p.poll() not in (None, 0)), None)
        if failed is not None or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    for p in procs:  # a rank that failed leaves the others blocked in a collective
        if p.poll() is None:
            p.kill()
    logs = [p.communicate()[0] for p in procs]
    codes = [p.returncode for p in procs]
    if any(c != 0 for c in codes):
        detail = "\n".join(f"--- rank {r} (exit {codes[r]}) ---\n{logs[r]}" for r in range(WORLD))
        reason = "timed out" if failed is None else f"rank {failed} failed"
        pytest.fail(f"distributed workers {reason} (DINOKERNELS_TEST_SEED={SEED}):\n{detail}", pytrace=False)
    return [torch.load(os.path.join(folder, f"rank{rank}.pt")) for rank in range(WORLD)]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    if not (torch.distributed.is_available() and torch.distributed.is_gloo_available()):
        pytest.skip("torch.distributed with gloo is not available")
    folder = str(tmp_path_factory.mktemp("dist"))
    data = _inputs()
    torch.save(data, os.path.join(folder, "inputs.pt"))
    return data, _run_workers(folder)


def close(actual, expected, dtype=torch.float64, what=""):
    rtol, atol = (1e-10, 1e-12) if dtype == torch.float64 else (2e-5, 2e-6)
    torch.testing.assert_close(actual.double(), expected.double(), rtol=rtol, atol=atol,
                               msg=lambda m: f"{what} (DINOKERNELS_TEST_SEED={SEED}): {m}")


def test_sinkhorn_knopp_two_ranks_equals_concatenated_batch(run):
    data, results = run
    for case, (ranks, temp, iters) in enumerate(data["sk"]):
        full = torch.cat(ranks)
        single = sinkhorn_knopp(full, temp, iters)  # not distributed in this process
        reference = sinkhorn_knopp_ref(full.double(), temp, iters)
        close(single, reference, full.dtype, f"case {case}: single-process op vs reference")
        offsets = [0, ranks[0].shape[0], full.shape[0]]
        for rank in range(WORLD):
            got = results[rank]["sk"][case]
            assert got.shape == ranks[rank].shape and got.dtype == ranks[rank].dtype, (case, rank, got.shape)
            expected = single[offsets[rank]:offsets[rank + 1]]
            close(got, expected, full.dtype, f"case {case} rank {rank}: distributed op")
            if ranks[rank].shape[0]:
                close(got.sum(-1), torch.ones(ranks[rank].shape[0]), full.dtype, f"case {case} rank {rank}: rows")
            close(results[rank]["sk_plain"][case], reference[offsets[rank]:offsets[rank + 1]], full.dtype,
                  f"case {case} rank {rank}: plain iterations, distributed")
    close(results[0]["sk_group0"], sinkhorn_knopp(data["sk"][0][0][0], data["sk"][0][1], data["sk"][0][2]),
          what="process_group of rank 0 alone")


def test_dino_loss_center_two_ranks_equals_concatenated_batch(run):
    """The center after each step equals that of one process fed both ranks' images; each rank's loss is its own
    images' loss under the shared center."""
    data, results = run
    whole = DINOLoss(K, NCROPS, center_momentum=MOMENTUM).double()
    for step, ((students, teachers), temp) in enumerate(zip(data["dino_steps"], data["dino_temps"])):
        student = torch.cat([s.view(NCROPS, B, K) for s in students], dim=1).reshape(-1, K)
        teacher = torch.cat([t.view(2, B, K) for t in teachers], dim=1).reshape(-1, K)
        center_before = whole.center.clone()
        whole(student, teacher, teacher_temp=temp)
        for rank in range(WORLD):
            close(results[rank]["dino_center"][step], whole.center, what=f"step {step} rank {rank}: center")
            expected = dino_loss_centered_ref(students[rank].view(NCROPS, B, K), teachers[rank].view(2, B, K),
                                              center_before, temp)
            close(results[rank]["dino_loss"][step], expected, what=f"step {step} rank {rank}: loss")
        # The formula, spelled out: the mean of all ranks' raw teacher rows.
        close(whole.center, MOMENTUM * center_before + (1 - MOMENTUM) * torch.cat(teachers).mean(0, keepdim=True),
              what=f"step {step}: center formula")
    students, teachers = data["dino_steps"][0]
    close(results[0]["dino_center_group0"], 0.1 * teachers[0].mean(0, keepdim=True), what="process_group")


def test_dino_loss_sinkhorn_two_ranks(run):
    """centering="sinkhorn_knopp": targets come from both ranks' teacher rows together."""
    data, results = run
    for step, ((students, teachers), temp) in enumerate(zip(data["dino_steps"], data["dino_temps"])):
        targets = sinkhorn_knopp_ref(torch.cat(teachers), temp, 3).split(2 * B)
        for rank in range(WORLD):
            expected = dino_loss_ref(students[rank].view(NCROPS, B, K), targets[rank].view(2, B, K))
            close(results[rank]["dino_sk_loss"][step], expected, what=f"step {step} rank {rank}: SK loss")
            local_only = dino_loss_ref(students[rank].view(NCROPS, B, K),
                                       sinkhorn_knopp_ref(teachers[rank], temp, 3).view(2, B, K))
            assert not torch.allclose(local_only, expected, rtol=1e-6, atol=0), "SK targets were not global"


def test_ibot_center_two_ranks_is_mean_of_rank_means(run):
    data, results = run
    center = torch.zeros(1, 1, K, dtype=torch.float64)
    for step, tokens in enumerate(data["ibot_steps"]):
        rank_means = torch.stack([t.mean(0) for t in tokens])
        center = MOMENTUM * center + (1 - MOMENTUM) * rank_means.mean(0).view(1, 1, K)
        assert not torch.allclose(rank_means.mean(0), torch.cat(tokens).mean(0)), "token counts must differ"
        targets = sinkhorn_knopp_ref(torch.cat(tokens), 0.05, 3).split([len(t) for t in tokens])
        for rank in range(WORLD):
            close(results[rank]["ibot_center"][step], center, what=f"step {step} rank {rank}: iBOT center")
            close(results[rank]["ibot_sk"][step], targets[rank], what=f"step {step} rank {rank}: iBOT SK targets")
    close(results[0]["ibot_center_group0"], 0.1 * data["ibot_steps"][0][0].mean(0).view(1, 1, K),
          what="process_group")
