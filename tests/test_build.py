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


# Runs `python -m dinokernels info` the way runpy does for `-m`, after dropping an editable install's import hook:
# that hook would supply _C from the checkout it points at, where a non-editable install (CI, README) has none.
RUN_INFO_WITHOUT_EDITABLE_HOOK = """
import runpy, sys
sys.meta_path[:] = [f for f in sys.meta_path if not getattr(f, "__module__", "").startswith("__editable__")]
sys.argv = ["dinokernels", "info"]
runpy.run_module("dinokernels", run_name="__main__", alter_sys=True)
"""


def info_lines(stdout):
    """`dinokernels info`'s "key  value" lines as a dict."""
    return dict(line.split(None, 1) for line in stdout.splitlines() if len(line.split(None, 1)) == 2)


def copy_package(destination, with_compiled_module):
    """A copy of the installed package's sources in destination/dinokernels; its compiled module linked in, or
    left out as in a source checkout that was never built in place."""
    package = os.path.dirname(dinokernels.__file__)
    copy = os.path.join(destination, "dinokernels")
    shutil.copytree(package, copy, ignore=shutil.ignore_patterns("_C.*", "__pycache__"))
    if with_compiled_module:
        compiled = _ext.module().__file__
        os.symlink(compiled, os.path.join(copy, os.path.basename(compiled)))
    return copy


def test_source_tree_shadowing_the_installed_package_is_named_not_a_circular_import(tmp_path):
    # `pip install .` then Python in the repository root: the working directory, first on sys.path, holds the
    # sources without _C, ahead of the installed copy. Python's own message blamed a circular import.
    source = copy_package(tmp_path / "repo", with_compiled_module=False)
    installed = copy_package(tmp_path / "site-packages", with_compiled_module=True)
    env = {**os.environ, "PYTHONPATH": str(tmp_path / "site-packages"), "DINOKERNELS_BACKEND": "auto"}
    info = subprocess.run([sys.executable, "-c", RUN_INFO_WITHOUT_EDITABLE_HOOK], capture_output=True, text=True,
                          env=env, cwd=tmp_path / "repo", timeout=300)
    assert info.returncode == 0, info.stderr
    assert "circular" not in info.stdout + info.stderr
    reason = (f"the dinokernels source tree at {source} shadows the installed package at {installed} and has no "
              f"compiled module: run Python from outside the repository root (or `pip install -e .` to build in "
              f"place)")
    lines = info_lines(info.stdout)
    assert lines["extension_loaded"] == "False" and lines["extension_error"] == reason, info.stdout

    # The same reason reaches the user through the kernel backend's error and the fallback's warning.
    kernel = subprocess.run([sys.executable, "-c", RUN_INFO_WITHOUT_EDITABLE_HOOK.replace(
        'sys.argv = ["dinokernels", "info"]\nrunpy.run_module("dinokernels", run_name="__main__", alter_sys=True)',
        textwrap.dedent("""
        import warnings, torch, dinokernels
        from dinokernels.ops import koleo_loss
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            koleo_loss(torch.randn(8, 4))
        print("WARNING", *[str(w.message) for w in caught])
        dinokernels.set_backend("kernel")
        try:
            koleo_loss(torch.randn(8, 4))
        except dinokernels.KernelUnavailableError as exc:
            print("ERROR", exc)
        """))], capture_output=True, text=True, env=env, cwd=tmp_path / "repo", timeout=300)
    assert kernel.returncode == 0, kernel.stderr
    assert "circular" not in kernel.stdout + kernel.stderr
    warning, error = kernel.stdout.splitlines()[-2:]
    assert warning.startswith("WARNING") and reason in warning, kernel.stdout
    assert error.startswith("ERROR dinokernels.koleo_forward") and reason in error, kernel.stdout


def test_missing_module_reason_names_the_case(tmp_path, monkeypatch):
    # Which copy of the package lacks _C, and whether an installed one on sys.path has it, decide the advice.
    source = copy_package(tmp_path / "repo", with_compiled_module=False)
    installed = copy_package(tmp_path / "site-packages", with_compiled_module=True)
    repo, site = str(tmp_path / "repo"), str(tmp_path / "site-packages")
    assert _ext._missing_module_reason(source, [repo, site]) == (
        f"the dinokernels source tree at {source} shadows the installed package at {installed} and has no compiled "
        f"module: run Python from outside the repository root (or `pip install -e .` to build in place)")
    # A folder that is not a checkout, nothing installed elsewhere.
    assert _ext._missing_module_reason(source, [repo]) == (
        f"no compiled module dinokernels._C in {source}: reinstall dinokernels from its source tree (`pip install .`) "
        f"on a machine with a C++17 compiler")
    # A checkout (pyproject.toml and csrc/ beside the package) that was never built, nothing installed elsewhere.
    (tmp_path / "repo" / "pyproject.toml").write_text("[project]\nname = 'dinokernels'\n")
    (tmp_path / "repo" / "csrc").mkdir()
    assert _ext._missing_module_reason(source, [repo, str(tmp_path / "missing")]) == (
        f"the dinokernels source tree at {source} has no compiled module (it is not built in place): `pip install .` "
        f"and run Python from outside the repository root, or `pip install -e .` to build in place")
    # The installed copy itself is not "elsewhere"; a relative entry ('' is the working directory) is resolved.
    assert "shadows" not in _ext._missing_module_reason(installed, [site])
    monkeypatch.chdir(site)
    assert f"installed package at {installed}" in _ext._missing_module_reason(source, [""])
