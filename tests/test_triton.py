"""Runs tests/triton_interpreted.py (the Triton kernels against the reference, on the CPU) in its
own pytest process with TRITON_INTERPRET=1: Triton reads the variable once per process, and the
rest of this suite must keep the reference path."""
import os
import subprocess
import sys

import pytest

pytest.importorskip("triton")
HERE = os.path.dirname(os.path.abspath(__file__))


def test_triton_kernels_under_the_interpreter():
    env = dict(os.environ, TRITON_INTERPRET="1")
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-o", "python_files=triton_interpreted.py",
           os.path.join(HERE, "triton_interpreted.py")]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1200, cwd=os.path.dirname(HERE))
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-3000:]
    assert " passed" in proc.stdout and "failed" not in proc.stdout.splitlines()[-1]
