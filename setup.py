"""Builds dinokernels._C with CMake (see CMakeLists.txt). Metadata lives in pyproject.toml.

Environment:
  DINOKERNELS_CUDA        unset/auto: compile CUDA when nvcc is found; 0: never; 1: nvcc is required.
  DINOKERNELS_CUDA_ARCHS  CMAKE_CUDA_ARCHITECTURES (default "80-real;90-real;90-virtual").
  DINOKERNELS_CPU_ARCH    -march for the CPU kernels (default "native"; "x86-64-v3" for portable builds,
                          "none" for the compiler's default).
  DINOKERNELS_BUILD_JOBS  parallel compile jobs (default: CPU count).
"""
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent


def _version():
    text = (ROOT / "dinokernels" / "_version.py").read_text()
    return re.search(r'__version__\s*=\s*"([^"]+)"', text).group(1)


def _find_nvcc():
    candidates = [shutil.which("nvcc")]
    for var in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(var):
            candidates.append(os.path.join(os.environ[var], "bin", "nvcc"))
    candidates.append("/usr/local/cuda/bin/nvcc")
    for path in candidates:
        if path and os.path.isfile(path) and os.access(path, os.X_OK):
            return os.path.realpath(path)
    return None


def _cuda_compiler():
    setting = os.environ.get("DINOKERNELS_CUDA", "auto").strip().lower()
    if setting in ("0", "off", "false", "no"):
        return None
    nvcc = _find_nvcc()
    if setting in ("1", "on", "true", "yes") and nvcc is None:
        raise RuntimeError("DINOKERNELS_CUDA=1 but nvcc was not found (PATH, CUDA_HOME, /usr/local/cuda)")
    if setting not in ("auto", "", "1", "on", "true", "yes"):
        raise RuntimeError(f"DINOKERNELS_CUDA must be 0, 1 or auto, got {setting!r}")
    return nvcc


def _drop_stale_cache(build_dir: Path, fingerprint: dict):
    """An in-tree CMake cache from an earlier (isolated) build points at a deleted cmake/ninja/python:
    start afresh whenever the tools or settings it was configured with changed."""
    stamp = build_dir / "dk_fingerprint.json"
    if build_dir.exists():
        try:
            old = json.loads(stamp.read_text())
        except (OSError, ValueError):
            old = None
        if old != fingerprint:
            shutil.rmtree(build_dir)
    build_dir.mkdir(parents=True, exist_ok=True)
    stamp.write_text(json.dumps(fingerprint, sort_keys=True))


class CMakeExtension(Extension):
    def __init__(self, name):
        super().__init__(name, sources=[])


class CMakeBuild(build_ext):
    def build_extension(self, ext):
        import pybind11

        cmake = shutil.which("cmake")
        ninja = shutil.which("ninja")
        if cmake is None:
            raise RuntimeError("cmake was not found; `pip install cmake` (a build requirement)")
        out_dir = Path(self.get_ext_fullpath(ext.name)).resolve().parent
        nvcc = _cuda_compiler()
        jobs = os.environ.get("DINOKERNELS_BUILD_JOBS") or str(os.cpu_count() or 2)
        args = [
            f"-DCMAKE_LIBRARY_OUTPUT_DIRECTORY={out_dir}",
            f"-DPython_EXECUTABLE={sys.executable}",
            f"-Dpybind11_DIR={pybind11.get_cmake_dir()}",
            "-DCMAKE_BUILD_TYPE=Release",
            f"-DDK_VERSION={_version()}",
            f"-DDK_CPU_ARCH={os.environ.get('DINOKERNELS_CPU_ARCH', 'native')}",
            f"-DDK_WITH_CUDA={'ON' if nvcc else 'OFF'}",
        ]
        if ninja:
            args += ["-G", "Ninja", f"-DCMAKE_MAKE_PROGRAM={ninja}"]
        if nvcc:
            args += [f"-DCMAKE_CUDA_COMPILER={nvcc}", f"-DDK_NVCC_THREADS={min(int(jobs), 4)}"]
            if os.environ.get("DINOKERNELS_CUDA_ARCHS"):
                args.append(f"-DCMAKE_CUDA_ARCHITECTURES={os.environ['DINOKERNELS_CUDA_ARCHS']}")
        build_dir = Path(self.build_temp).resolve() / "cmake"
        _drop_stale_cache(build_dir, {"cmake": cmake, "ninja": ninja, "python": sys.executable,
                                      "source": str(ROOT), "args": args})
        print(f"dinokernels: CUDA {'with ' + nvcc if nvcc else 'disabled'}", flush=True)
        subprocess.check_call([cmake, "-S", str(ROOT), "-B", str(build_dir), *args])
        subprocess.check_call([cmake, "--build", str(build_dir), "--parallel", jobs])


setup(ext_modules=[CMakeExtension("dinokernels._C")], cmdclass={"build_ext": CMakeBuild})
