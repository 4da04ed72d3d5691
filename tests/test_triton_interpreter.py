"""Runs the backend-parametrised tests (tests/ops/, the MoE layer's, the model's and the transformers
models') again in a
pytest process of their own with TRITON_INTERPRET=1, where "triton" is the backend they check on
the CPU: Triton reads the variable once per process, and the rest of this suite keeps the
reference path. tests/conftest.py keeps only those tests there."""

import os
import subprocess
import sys

import pytest

pytest.importorskip("triton")
HERE = os.path.dirname(os.path.abspath(__file__))
TESTS = [
    "ops",
    "test_moe_mlp.py",
    "test_layer_plan.py",
    "test_cblock_plan.py",
    "test_model.py",
    "test_transformers_backend.py",
    "test_moe_from_transformers.py",
]

if os.environ.get("TRITON_INTERPRET") == "1":
    pytest.skip("this process is the interpreter's", allow_module_level=True)


def test_triton_kernels_under_the_interpreter():
    env = dict(os.environ, TRITON_INTERPRET="1")
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *(os.path.join(HERE, t) for t in TESTS)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1200, cwd=os.path.dirname(HERE))
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-3000:]
    last = proc.stdout.strip().splitlines()[-1]
    assert " passed" in last and "failed" not in last, last
