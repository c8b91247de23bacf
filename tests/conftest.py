"""Shared test set-up.

* Every test runs with DINOKERNELS_BACKEND=kernel semantics: a missing compiled kernel is an error, never a
  silent fallback to the reference the kernel is compared against.
* Tests marked `cuda` skip without a usable GPU, unless DINOKERNELS_REQUIRE_CUDA=1 turns the skip into a
  failure (the GPU check script sets it).
* Inputs are fresh random draws: the base seed changes every run and is printed in the header
  (DINOKERNELS_TEST_SEED reproduces a run).
"""
import functools
import os
import random
import sys
import zlib

import pytest
import torch

import dinokernels

# importlib mode keeps test folders off sys.path; this one holds dk_test_helpers (and no package to shadow).
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

REQUIRE_CUDA = os.environ.get("DINOKERNELS_REQUIRE_CUDA", "0") == "1"
BASE_SEED = int(os.environ.get("DINOKERNELS_TEST_SEED") or random.SystemRandom().randrange(2**31))


def pytest_report_header(config):
    info = dinokernels.build_info()
    return [f"dinokernels {info['version']} from {os.path.dirname(dinokernels.__file__)}",
            f"extension_loaded={info['extension_loaded']} cuda_compiled={info['cuda_compiled']} "
            f"gpu_usable={info['gpu_usable']} ({info['gpu_unusable_reason'] or info.get('gpu_name')})",
            f"DINOKERNELS_TEST_SEED={BASE_SEED}"]


@functools.lru_cache(maxsize=None)
def gpu_status():
    info = dinokernels.build_info()
    return info["gpu_usable"], info["gpu_unusable_reason"]


@pytest.fixture(autouse=True)
def _kernel_backend_and_seed(request):
    previous = dinokernels.get_backend()
    dinokernels.set_backend("kernel")
    torch.manual_seed(BASE_SEED ^ zlib.crc32(request.node.nodeid.encode()))
    yield
    dinokernels.set_backend(previous)


@pytest.fixture(autouse=True)
def _cuda_gate(request):
    if request.node.get_closest_marker("cuda") is None:
        return
    usable, reason = gpu_status()
    if not usable:
        if REQUIRE_CUDA:
            pytest.fail(f"DINOKERNELS_REQUIRE_CUDA=1 but no usable GPU: {reason}")
        pytest.skip(f"no usable GPU: {reason}")
