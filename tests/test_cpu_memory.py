"""geomoe_kernels turns on torch's huge-page allocation of large CPU tensors at import (Linux), keeps
a value the user set, and says which in `info`. Each case runs in a fresh interpreter: torch reads the
switch once, at its first CPU allocation."""

import os
import subprocess
import sys

import pytest

PROBE = "import geomoe; from geomoe_kernels import cpu_memory; print(cpu_memory.huge_pages_requested())"

linux_only = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="transparent huge pages are Linux's")


def _probe(value):
    env = {k: v for k, v in os.environ.items() if k != "THP_MEM_ALLOC_ENABLE"}
    if value is not None:
        env["THP_MEM_ALLOC_ENABLE"] = value
    out = subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True, text=True, check=True)
    return out.stdout.strip()


@linux_only
def test_importing_the_package_requests_huge_pages():
    assert _probe(None) == "True"


@linux_only
def test_a_user_opt_out_is_kept():
    assert _probe("0") == "False"


def test_info_reports_the_state():
    from geomoe_kernels import info

    assert "CPU huge pages" in info.report()
