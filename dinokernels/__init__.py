"""dinokernels: fused CPU and CUDA kernels for DINO, DINOv2 and Grounding DINO.

Imports without a GPU and without the compiled module (then ops fall back to their references; see
dinokernels.build_info() and DINOKERNELS_BACKEND).
"""
from ._version import __version__
from ._build_info import build_info
from ._config import get_backend, set_backend, use_backend
from ._ext import CudaError, KernelUnavailableError
from . import ops
from .losses import DINOLoss, KoLeoLoss, iBOTPatchLoss

__all__ = ["__version__", "build_info", "get_backend", "set_backend", "use_backend", "CudaError",
           "KernelUnavailableError", "ops", "DINOLoss", "iBOTPatchLoss", "KoLeoLoss"]
