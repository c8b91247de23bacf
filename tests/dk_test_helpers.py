"""Helpers shared by several test modules (conftest.py puts this folder on sys.path: pytest's importlib mode
does not)."""
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


@pytest.fixture(params=BACKENDS)
def backend(request, monkeypatch):
    """Runs the test once per way an op can execute: 'kernel' (the compiled module; skipped when it did not load),
    'reference' (DINOKERNELS_BACKEND=reference) and 'fallback' (DINOKERNELS_BACKEND=auto with the compiled module
    missing, simulated by hiding dinokernels._ext._C, so every op takes its pure-PyTorch reference after one
    FallbackWarning). Yields the name."""
    import warnings

    import dinokernels
    from dinokernels import _ext
    from dinokernels.ops import _dispatch

    name = request.param
    if name == "kernel" and not _ext.loaded():
        pytest.skip(f"the compiled module did not load: {_ext.load_error()}")
    if name == "fallback":
        monkeypatch.setattr(_ext, "_C", None)
        monkeypatch.setattr(_ext, "_LOAD_ERROR", "hidden by the test to exercise the fallback")
        monkeypatch.setattr(_dispatch, "_warned", set())
    with dinokernels.use_backend("auto" if name == "fallback" else name), warnings.catch_warnings():
        warnings.simplefilter("ignore", _dispatch.FallbackWarning)
        yield name
