"""Helpers shared by several test modules (conftest.py puts this folder on sys.path: pytest's importlib mode
does not)."""
import contextlib
import warnings

import pytest
import torch

CUDA_DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def registered(name):
    """torch.ops.dinokernels.<name>, failing with the registered names when it is missing."""
    ns = torch.ops.dinokernels
    if not hasattr(ns, name):
        pytest.fail(f"torch.ops.dinokernels.{name} is not registered (have: {sorted(dir(ns))})")
    return getattr(ns, name)


def max_err(x, ref64):
    return (x.detach().double().cpu() - ref64).abs().max().item()


def assert_within_torch_error(name, got, torch_got, ref64, atol):
    """Kernel error ≤ 4 × the error of PyTorch's own computation in the same precision, + atol: the float32
    rounding floor the CPU float32 tests allow (8·eps·|z/τ| relative to the size of the terms)."""
    err, base = max_err(got, ref64), max_err(torch_got, ref64)
    assert err <= 4 * base + atol, f"{name}: kernel error {err:.3g}, PyTorch's own {base:.3g}, atol {atol:.3g}"


# ---- every backend an op can run on (issue 16 §3: validation is the op's, not the backend's) ----

BACKENDS = ("kernel", "reference", "fallback")


def available_backends():
    from dinokernels import _ext

    return [name for name in BACKENDS if name != "kernel" or _ext.loaded()]


@contextlib.contextmanager
def running_on(name: str):
    """Ops run on `name`: 'kernel' (the compiled module), 'reference' (DINOKERNELS_BACKEND=reference) or 'fallback'
    (DINOKERNELS_BACKEND=auto with the compiled module missing, simulated by hiding dinokernels._ext._C, so every
    op takes its pure-PyTorch reference; the FallbackWarning is silenced)."""
    import dinokernels
    from dinokernels import _ext
    from dinokernels.ops import _dispatch

    saved = _ext._C, _ext._LOAD_ERROR, _dispatch._warned
    try:
        if name == "fallback":
            _ext._C, _ext._LOAD_ERROR, _dispatch._warned = None, "hidden by the test to exercise the fallback", set()
        with dinokernels.use_backend("auto" if name == "fallback" else name), warnings.catch_warnings():
            warnings.simplefilter("ignore", _dispatch.FallbackWarning)
            yield
    finally:
        _ext._C, _ext._LOAD_ERROR, _dispatch._warned = saved


@pytest.fixture(params=BACKENDS)
def backend(request):
    """Runs the test once per backend (see running_on; 'kernel' is skipped when the compiled module did not load).
    Yields the name."""
    if request.param not in available_backends():
        pytest.skip("the compiled module did not load")
    with running_on(request.param):
        yield request.param


def launch_ranks(folder, worker_source: str, argument: str, world: int = 2, timeout: float = 300.0):
    """Runs `worker_source` as `world` gloo ranks (RANK, WORLD_SIZE, a file store in `folder`, one thread each, the
    kernel backend) with `argument` as argv[1]; fails the test with every rank's output if one exits non-zero or the
    run outlasts `timeout`. Returns the ranks' outputs."""
    import os
    import subprocess
    import sys
    import time

    script = os.path.join(folder, "worker.py")
    with open(script, "w") as f:
        f.write(worker_source)
    procs = []
    for rank in range(world):
        env = dict(os.environ, RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), OMP_NUM_THREADS="1",
                   DINOKERNELS_INIT_METHOD="file://" + os.path.join(folder, "store"), DINOKERNELS_BACKEND="kernel")
        procs.append(subprocess.Popen([sys.executable, script, argument], cwd=folder, env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    deadline = time.monotonic() + timeout
    while any(p.poll() is None for p in procs):
        if any(p.poll() not in (None, 0) for p in procs) or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    for p in procs:  # a failed rank leaves the other waiting in a collective
        if p.poll() is None:
            p.kill()
    logs = [p.communicate()[0] for p in procs]
    if any(p.returncode != 0 for p in procs):
        pytest.fail("\n".join(f"--- rank {r} (exit {p.returncode}) ---\n{logs[r]}" for r, p in enumerate(procs)),
                    pytrace=False)
    return logs
