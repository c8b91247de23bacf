"""The package and its compiled module: build facts, imports without a GPU or without _C, backend fallback,
and CUDA entry points called where no GPU is usable."""
import json
import os
import shutil
import struct
import subprocess
import sys
import tempfile
import textwrap

import pytest

import dinokernels
from dinokernels import _ext

KEYS = {"version": str, "extension_loaded": bool, "cuda_compiled": bool, "cuda_archs": str,
        "cuda_runtime_version": str, "openmp_threads": int, "gpu_usable": bool}


# Child interpreters start in a scratch directory: from the repository root, `python -c` / `-m` would import
# the source tree (which has no compiled module) instead of the installed package.
OUTSIDE_REPO = tempfile.gettempdir()


def run_python(code, **env):
    """Runs code in a fresh interpreter, outside the repository."""
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                          env={**os.environ, **env}, cwd=OUTSIDE_REPO, timeout=300)


def test_extension_is_loaded():
    # CI must exercise the compiled kernels: a missing or stale _C is a failure, not a skip.
    assert _ext.loaded(), f"dinokernels._C did not load: {_ext.load_error()}"
    assert _ext.module().__version__ == dinokernels.__version__


def test_build_info_fields():
    info = dinokernels.build_info()
    for key, kind in KEYS.items():
        assert isinstance(info[key], kind), (key, info[key])
    assert info["version"] == dinokernels.__version__
    assert info["openmp_threads"] >= 1
    if info["gpu_usable"]:
        assert info["gpu_unusable_reason"] is None
    else:
        assert isinstance(info["gpu_unusable_reason"], str) and info["gpu_unusable_reason"]
    if info["cuda_compiled"]:
        assert info["cuda_archs"] and info["cuda_runtime_version"]


def test_info_command():
    result = subprocess.run([sys.executable, "-m", "dinokernels", "info", "--json"], capture_output=True,
                            text=True, timeout=120, cwd=OUTSIDE_REPO)
    assert result.returncode == 0, result.stderr
    info = json.loads(result.stdout)
    assert info["extension_loaded"] is True and info["version"] == dinokernels.__version__
    text = subprocess.run([sys.executable, "-m", "dinokernels", "info"], capture_output=True, text=True,
                          timeout=120, cwd=OUTSIDE_REPO)
    assert text.returncode == 0 and "gpu_usable" in text.stdout


def elf_needed(path):
    """DT_NEEDED entries of a 64-bit little-endian ELF shared object."""
    with open(path, "rb") as f:
        data = f.read()
    assert data[:4] == b"\x7fELF" and data[4] == 2 and data[5] == 1, "expected a 64-bit little-endian ELF"
    (shoff,) = struct.unpack_from("<Q", data, 0x28)
    shentsize, shnum = struct.unpack_from("<HH", data, 0x3A)
    sections = [struct.unpack_from("<IIQQQQIIQQ", data, shoff + i * shentsize) for i in range(shnum)]
    for _name, kind, _flags, _addr, offset, size, link, _info, _align, _entsize in sections:
        if kind == 6:  # SHT_DYNAMIC; its sh_link is the string table
            strings = sections[link][4]
            needed = []
            for entry in range(offset, offset + size, 16):
                tag, value = struct.unpack_from("<qQ", data, entry)
                if tag == 0:
                    break
                if tag == 1:  # DT_NEEDED
                    start = strings + value
                    needed.append(data[start:data.index(b"\0", start)].decode())
            return needed
    return []


def test_compiled_module_links_no_libtorch_and_no_shared_cudart():
    needed = elf_needed(_ext.module().__file__)
    assert needed, "no DT_NEEDED entries found"
    assert not [lib for lib in needed if lib.startswith(("libtorch", "libc10", "libcudart", "libstdc++"))], needed


def nvcc_present():
    return bool(shutil.which("nvcc")) or any(
        os.path.isfile(os.path.join(root, "bin", "nvcc"))
        for root in (os.environ.get("CUDA_HOME", ""), os.environ.get("CUDA_PATH", ""), "/usr/local/cuda") if root)


def test_cuda_sources_are_compiled_when_nvcc_is_present():
    # CI has nvcc but no GPU: a silently CPU-only build would leave the CUDA sources unchecked.
    if not nvcc_present() or os.environ.get("DINOKERNELS_CUDA", "auto") == "0":
        pytest.skip("no nvcc on this machine (or DINOKERNELS_CUDA=0): a CPU-only build is expected")
    info = dinokernels.build_info()
    assert info["cuda_compiled"], "nvcc is installed but the module was built without CUDA"
    assert "80" in info["cuda_archs"] or "90" in info["cuda_archs"] or os.environ.get("DINOKERNELS_CUDA_ARCHS")


def test_build_requirements_hold_no_torch():
    root = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
    with open(os.path.join(root, "pyproject.toml")) as f:
        text = f.read()
    requires = text.split("[build-system]")[1].split("requires")[1].split("]")[0]
    assert "pybind11" in requires and "torch" not in requires


def test_import_and_cpu_kernels_without_a_gpu():
    result = run_python("""
        import torch, dinokernels
        from dinokernels.ops import koleo_loss
        info = dinokernels.build_info()
        assert info["gpu_usable"] is False and info["gpu_unusable_reason"], info
        dinokernels.set_backend("kernel")
        print(float(koleo_loss(torch.randn(16, 8))))
    """, CUDA_VISIBLE_DEVICES="")
    assert result.returncode == 0, result.stderr


BLOCK_C = """
import importlib.abc, sys
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name == "dinokernels._C":
            raise ImportError("blocked by the test")
sys.meta_path.insert(0, Block())
"""


def test_import_without_compiled_module_falls_back_with_one_warning():
    result = run_python(BLOCK_C + """
import warnings, torch, dinokernels
from dinokernels.ops import koleo_loss, koleo_loss_ref, nearest_neighbors
info = dinokernels.build_info()
assert info["extension_loaded"] is False and "blocked by the test" in info["extension_error"], info
assert info["gpu_usable"] is False
x = torch.randn(12, 6)
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    first = koleo_loss(x)
    second = koleo_loss(x)
fallbacks = [w for w in caught if "reference" in str(w.message)]
assert len(fallbacks) == 1, [str(w.message) for w in caught]
assert torch.equal(first, koleo_loss_ref(x)) and torch.equal(second, first)
dinokernels.set_backend("kernel")
try:
    koleo_loss(x)
except dinokernels.KernelUnavailableError as exc:
    assert "dinokernels._C is not available" in str(exc)
else:
    raise AssertionError("kernel backend without _C must raise")
print("ok")
""", DINOKERNELS_BACKEND="auto")
    assert result.returncode == 0 and "ok" in result.stdout, result.stderr


def test_bad_backend_setting_is_reported():
    result = run_python("import dinokernels", DINOKERNELS_BACKEND="fastest")
    assert result.returncode != 0 and "DINOKERNELS_BACKEND must be one of auto, kernel, reference" in result.stderr
    with pytest.raises(ValueError, match="backend must be one of"):
        dinokernels.set_backend("gpu")


def test_cuda_entry_point_without_gpu_raises_clear_error():
    result = run_python("""
        from dinokernels import _ext
        C = _ext.module()
        usable, reason, count, _ = C.cuda_status(0)
        assert not usable and reason and count == 0, (usable, reason, count)
        try:
            C.koleo_forward_cuda(0, 0, 4, 4, 1e-8, 0, 0, 0, 0, 0, 0, 0, 0, 0)
        except C.CudaError as exc:
            assert isinstance(exc, RuntimeError)
            assert "dinokernels.koleo_forward_cuda" in str(exc), str(exc)
            print("raised:", exc)
        else:
            raise AssertionError("expected CudaError")
    """, CUDA_VISIBLE_DEVICES="")
    assert result.returncode == 0, result.stderr
    assert "raised: dinokernels.koleo_forward_cuda" in result.stdout


def test_backend_choice_for_a_cuda_device_follows_gpu_usability():
    import torch
    from dinokernels.ops import _dispatch

    cuda0 = torch.device("cuda", 0)
    info = dinokernels.build_info()
    if info["gpu_usable"]:
        assert _dispatch.use_reference("koleo_forward", cuda0) is False
        return
    with pytest.raises(dinokernels.KernelUnavailableError, match="koleo_forward"):
        _dispatch.use_reference("koleo_forward", cuda0)  # conftest selects the 'kernel' backend
    _dispatch._warned.discard(("koleo_forward", "cuda"))  # the fallback warns once per op and device
    with dinokernels.use_backend("auto"), pytest.warns(_dispatch.FallbackWarning, match="reference"):
        assert _dispatch.use_reference("koleo_forward", cuda0) is True
