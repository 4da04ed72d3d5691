"""info --verify: every usable backend against float64 on a small ragged case, and its verdict logic
catches a kernel that is wrong."""

import subprocess
import sys

import torch

from geomoe_kernels import backend as B
from geomoe_kernels import verify


def test_reference_backend_verifies_in_every_dtype_on_the_cpu():
    verdicts = verify.verify(torch.device("cpu"), backends=("torch",))
    assert {v.status for v in verdicts} == {"verified"}, verify.table(verdicts)
    assert {v.op for v in verdicts} == set(verify.checks())


def test_every_op_declares_a_verification_case():
    assert list(verify.checks()) == B.ops()


def test_a_wrong_kernel_fails_with_the_op_backend_dtype_and_reason(monkeypatch):
    """A "triton" permute 1 % off (its backward, unpermute, stands in by the reference): no Triton runs."""
    right = B._REGISTRY["permute"]["torch"][0]
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # makes "triton" usable on CPU tensors; the kernels below are ours
    monkeypatch.setitem(B._REGISTRY["permute"], "triton", (lambda x, *rest: right(x, *rest) * 1.01, None))
    monkeypatch.setitem(B._REGISTRY["unpermute"], "triton", B._REGISTRY["unpermute"]["torch"])
    verdicts = verify.verify(torch.device("cpu"), ops=["permute"], backends=("triton",), dtypes=(torch.float32,))
    [v] = verdicts
    assert (v.op, v.backend, v.dtype, v.status) == ("permute", "triton", torch.float32, "failed")
    assert "max error" in v.detail


def test_a_crashing_kernel_is_a_failure_not_a_crash(monkeypatch):
    def boom(*args):
        raise RuntimeError("illegal memory access")

    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setitem(B._REGISTRY["route"], "triton", (boom, None))
    [v] = verify.verify(torch.device("cpu"), ops=["route"], backends=("triton",))
    assert v.status == "failed" and "illegal memory access" in v.detail


def test_info_verify_exits_zero_here_and_prints_the_table():
    proc = subprocess.run([sys.executable, "-m", "geomoe_kernels.info", "--verify"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "0 failed" in proc.stdout and "expert_mlp" in proc.stdout
