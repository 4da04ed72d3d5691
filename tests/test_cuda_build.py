"""CI builds the CUDA core on every run (nvcc is on the CI machine, no GPU): it must have compiled,
linked and imported, for the architectures asked for, with no register spills."""
import os
import re

import pytest

import geomoe_kernels
from geomoe_kernels import cuda

REQUIRED = os.environ.get("GEOMOE_REQUIRE_CUDA") == "1"


@pytest.mark.skipif(not REQUIRED and cuda._core is None, reason="CUDA core not built here (no nvcc); CI requires it")
def test_cuda_core_built_without_spills():
    assert cuda._core is not None, cuda._status
    assert cuda._core.architectures() == os.environ.get("GEOMOE_CUDA_ARCHS", "80;90a")
    report = open(os.path.join(os.path.dirname(geomoe_kernels.__file__), "_cuda_build.txt")).read()
    entries = re.findall(r"Compiling entry function '(\w+)'", report)
    assert len(entries) >= 10
    spills = [int(x) for x in re.findall(r"(\d+) bytes spill stores", report)]
    stacks = [int(x) for x in re.findall(r"(\d+) bytes stack frame", report)]
    assert len(spills) == len(entries) and not any(spills) and not any(stacks)
