"""Bad input to the layers, and a backend that cannot run, get an error that names the argument,
what was expected and what came. (Each op's own argument errors are tested in tests/ops/.)"""

import subprocess
import sys

import pytest
import torch

from geomoe_kernels import BackendUnavailable, MoEMLP, OpInputError, grouped_mm


def test_layer_arguments():
    with pytest.raises(ValueError, match="top_k"):
        MoEMLP(8, num_experts=2, top_k=3)
    with pytest.raises(ValueError, match=r"MoEMLP: argument 'x' expected last dimension 8"):
        MoEMLP(8, num_experts=4, top_k=2)(torch.randn(3, 9))
    with pytest.raises(ValueError, match="backend"):
        MoEMLP(8, backend="fast")


def test_nan_input_to_the_layer():
    m = MoEMLP(8, num_experts=4, top_k=2)
    x = torch.randn(5, 8)
    x[0, 0] = float("nan")
    with pytest.raises(OpInputError, match="finite"):
        m(x)


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CUDA core may run it here")
def test_backend_without_kernels_says_why():
    with pytest.raises(BackendUnavailable, match=r"grouped_mm: backend 'cuda' cannot run here"):
        grouped_mm(torch.randn(4, 3), torch.randn(2, 3, 5), torch.tensor([0, 2, 4]), backend="cuda")


def test_info_reports_every_backend_and_op():
    from geomoe_kernels import backend

    out = subprocess.run([sys.executable, "-m", "geomoe_kernels.info"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    for word in ("torch", "triton", "CUDA core", "auto ->", *backend.ops()):
        assert word in out.stdout
