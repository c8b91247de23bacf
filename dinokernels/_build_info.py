"""dinokernels.build_info(): what was compiled, and whether this machine can use it."""
import os

from . import _ext
from ._version import __version__


def _gpu_status(info):
    import torch

    if not info["extension_loaded"]:
        return False, f"the compiled module did not load ({info['extension_error']})"
    if not info["cuda_compiled"]:
        return False, "dinokernels was built without CUDA (no nvcc at build time, or DINOKERNELS_CUDA=0)"
    if torch.version.cuda is None:
        return False, f"this torch ({torch.__version__}) is a CPU-only build"
    if not torch.cuda.is_available():
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        hint = f" (CUDA_VISIBLE_DEVICES={visible!r})" if visible is not None else ""
        return False, f"torch sees no CUDA device{hint}"
    usable, reason, _count, _driver = _ext.module().cuda_status(torch.cuda.current_device())
    return bool(usable), (None if usable else reason)


def build_info() -> dict:
    """Build and run-time facts: version, extension_loaded (+ extension_error), cuda_compiled, cuda_archs,
    cuda_runtime_version, openmp_threads, cpu_arch, gpu_usable, gpu_unusable_reason, torch_version."""
    import torch

    info = {"version": __version__, "extension_loaded": _ext.loaded()}
    if _ext.loaded():
        compiled = dict(_ext.module().build_info())
        info["extension_version"] = compiled.pop("version")
        info.update(compiled)
    else:
        info.update(extension_error=_ext.load_error(), cuda_compiled=False, cuda_archs="",
                    cuda_runtime_version="", openmp_threads=None, cpu_arch="")
    info["torch_version"] = torch.__version__
    info["torch_cuda_version"] = torch.version.cuda
    info["gpu_usable"], info["gpu_unusable_reason"] = _gpu_status(info)
    if info["gpu_usable"]:
        info["gpu_name"] = torch.cuda.get_device_name()
    return info
