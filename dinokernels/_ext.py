"""The only importer of the compiled module ``dinokernels._C``; remembers why loading failed.

Nothing here imports torch, so ``import dinokernels._ext`` works anywhere.
"""
import importlib
import importlib.machinery
import os
import sys

from ._version import __version__

_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))


class KernelUnavailableError(RuntimeError):
    """A compiled kernel was required (DINOKERNELS_BACKEND=kernel) but is not available."""


def _compiled_module_in(folder: str):
    """The path of a compiled ``_C`` module in `folder`, or None."""
    try:
        names = set(os.listdir(folder))
    except OSError:
        return None
    for suffix in importlib.machinery.EXTENSION_SUFFIXES:
        if "_C" + suffix in names:
            return os.path.join(folder, "_C" + suffix)
    return None


def _missing_module_reason(package_dir: str, search_path) -> str:
    """Why there is no compiled module in `package_dir` (this package's folder), and what to do; `search_path` is
    sys.path. The usual cause: Python started in the repository root of a non-editable install puts the source tree
    (never built in place) first on sys.path, ahead of the installed copy that has the module."""
    installed = None
    for entry in search_path:
        folder = os.path.join(os.path.abspath(entry or os.curdir), "dinokernels")
        if os.path.realpath(folder) != os.path.realpath(package_dir) and _compiled_module_in(folder):
            installed = folder
            break
    if installed is not None:
        return (f"the dinokernels source tree at {package_dir} shadows the installed package at {installed} and "
                f"has no compiled module: run Python from outside the repository root (or `pip install -e .` to "
                f"build in place)")
    root = os.path.dirname(package_dir)
    if os.path.isfile(os.path.join(root, "pyproject.toml")) and os.path.isdir(os.path.join(root, "csrc")):
        return (f"the dinokernels source tree at {package_dir} has no compiled module (it is not built in place): "
                f"`pip install .` and run Python from outside the repository root, or `pip install -e .` to build "
                f"in place")
    return (f"no compiled module dinokernels._C in {package_dir}: reinstall dinokernels from its source tree "
            f"(`pip install .`) on a machine with a C++17 compiler")


# import_module rather than `from . import _C`: a missing submodule then reads "No module named ...", not Python's
# misleading "partially initialized module (most likely due to a circular import)".
try:
    _C = importlib.import_module(__package__ + "._C")
except ModuleNotFoundError as exc:
    _C = None
    if exc.name == __package__ + "._C":
        _LOAD_ERROR = _missing_module_reason(_PACKAGE_DIR, sys.path)
    else:
        _LOAD_ERROR = f"{type(exc).__name__}: {exc}"
except Exception as exc:  # ImportError, OSError from a broken .so, ...: all mean "no kernels"
    _C = None
    _LOAD_ERROR = f"{type(exc).__name__}: {exc}"
else:
    _LOAD_ERROR = None
    if getattr(_C, "__version__", None) != __version__:
        # A stale module (e.g. an old in-tree build) may have other entry-point contracts: never call it.
        _LOAD_ERROR = (f"stale compiled module {_C.__file__}: version {getattr(_C, '__version__', '?')}, "
                       f"package {__version__}; rebuild with `pip install .`")
        _C = None

if _C is not None:
    CudaError = _C.CudaError
else:
    class CudaError(RuntimeError):
        """Raised by CUDA entry points (here: the compiled module is missing)."""


def loaded() -> bool:
    return _C is not None


def load_error():
    """Why ``_C`` did not load, or None."""
    return _LOAD_ERROR


def module():
    """The compiled module; raises KernelUnavailableError when it did not load."""
    if _C is None:
        raise KernelUnavailableError(f"the compiled module dinokernels._C is not available ({_LOAD_ERROR})")
    return _C


_CUDA_COMPILED = _C is not None and bool(_C.build_info()["cuda_compiled"])


def cuda_compiled() -> bool:
    return _CUDA_COMPILED


def kernel(name: str, device_type: str):
    """``_C.<name>_<device_type>``, e.g. kernel("koleo_forward", "cpu")."""
    if _C is None:
        raise KernelUnavailableError(
            f"dinokernels.{name}: the compiled module dinokernels._C is not available ({_LOAD_ERROR})")
    if device_type == "cuda" and not cuda_compiled():
        raise KernelUnavailableError(
            f"dinokernels.{name}: this build of dinokernels has no CUDA kernels (nvcc was not found at build "
            f"time, or DINOKERNELS_CUDA=0); reinstall on a machine with nvcc")
    fn = getattr(_C, f"{name}_{device_type}", None)
    if fn is None:
        raise KernelUnavailableError(f"dinokernels.{name}: no {device_type} kernel")
    return fn


_gpu_reasons = {}


def gpu_unusable_reason(device_index: int) -> str:
    """'' when this build's CUDA kernels run on the device (driver, and a compiled architecture that fits the
    card), else why not. Probed once per device with a one-thread kernel."""
    if device_index not in _gpu_reasons:
        if _C is None:
            _gpu_reasons[device_index] = f"the compiled module dinokernels._C is not available ({_LOAD_ERROR})"
        else:
            usable, reason, _count, _driver = _C.cuda_status(device_index)
            _gpu_reasons[device_index] = "" if usable else reason
    return _gpu_reasons[device_index]
