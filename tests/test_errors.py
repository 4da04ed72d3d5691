"""Bad input gets an error that names the argument, what was expected and what came."""
import pytest
import torch

from geomoe_kernels import BackendUnavailable, MoEMLP, OpInputError, grouped_mm, layout, masked_depthwise_conv, topk_gating
from geomoe_kernels.ops.gating import topk_gating_op
from geomoe_kernels.ops.grouped_gemm import grouped_mm_op
from geomoe_kernels.ops.permute import permute_op, route_op, unpermute_op
from geomoe_kernels.ops.sparse_conv import masked_depthwise_conv_op


def test_k_larger_than_experts():
    with pytest.raises(OpInputError, match=r"topk_gating: argument 'top_k' expected 1 <= top_k <= 4.*got 5"):
        topk_gating(torch.randn(3, 4), None, 5)
    with pytest.raises(ValueError, match="top_k"):
        MoEMLP(8, num_experts=2, top_k=3)


def test_nan_scores():
    logits = torch.randn(6, 4)
    logits[2, 1] = float("nan")
    with pytest.raises(OpInputError, match=r"'logits' expected finite values, got 1 NaN/Inf"):
        topk_gating(logits, None, 2)
    m = MoEMLP(8, num_experts=4, top_k=2)
    x = torch.randn(5, 8)
    x[0, 0] = float("nan")
    with pytest.raises(OpInputError, match="finite"):
        m(x)


def test_wrong_dtype():
    with pytest.raises(OpInputError, match=r"'logits' expected dtype float32/float64, got torch.float16"):
        topk_gating_op(torch.randn(3, 4).half(), None, 2, "sigmoid", True)
    with pytest.raises(OpInputError, match=r"'weight' expected dtype torch.float32 \(the dtype of 'x'\), got torch.float64"):
        grouped_mm_op(torch.randn(4, 3), torch.randn(2, 3, 5).double(), torch.tensor([0, 2, 4]), None, "none")
    with pytest.raises(OpInputError, match=r"'expert_ids' expected dtype int64, got torch.int32"):
        route_op(torch.zeros(3, 2, dtype=torch.int32), 4)


def test_wrong_device():
    with pytest.raises(OpInputError, match=r"'bias' expected a tensor on cpu .*got one on meta"):
        topk_gating_op(torch.randn(3, 4), torch.zeros(4, device="meta"), 2, "sigmoid", True)
    with pytest.raises(OpInputError, match=r"'weight' expected a tensor on cpu"):
        grouped_mm_op(torch.randn(4, 3), torch.randn(2, 3, 5, device="meta"), torch.tensor([0, 2, 4]), None, "none")


def test_wrong_shape():
    with pytest.raises(OpInputError, match=r"'x' expected 3 columns .* got 7"):
        grouped_mm(torch.randn(4, 7), torch.randn(2, 3, 5), torch.tensor([0, 2, 4]))
    with pytest.raises(OpInputError, match=r"'offsets' expected shape \[3\], got \[2\]"):
        grouped_mm(torch.randn(4, 3), torch.randn(2, 3, 5), torch.tensor([0, 4]))
    with pytest.raises(OpInputError, match=r"'bias' expected shape \[2, 5\], got \[5\]"):
        grouped_mm(torch.randn(4, 3), torch.randn(2, 3, 5), torch.tensor([0, 2, 4]), torch.randn(5))
    with pytest.raises(OpInputError, match=r"'weights' expected shape \[3, 2\], got \[3, 3\]"):
        unpermute_op(torch.randn(6, 4), torch.arange(6), 2, torch.rand(3, 3), None)
    with pytest.raises(ValueError, match=r"MoEMLP: argument 'x' expected last dimension 8"):
        MoEMLP(8, num_experts=4, top_k=2)(torch.randn(3, 9))


def test_non_contiguous_and_overlapping_memory():
    x = torch.randn(8, 6).t()
    with pytest.raises(OpInputError, match=r"'x' expected contiguous memory, got a non-contiguous tensor"):
        permute_op(x, torch.arange(6), 1, None)
    expanded = torch.randn(1, 6).expand(4, 6)
    with pytest.raises(OpInputError, match=r"overlapping memory \(a stride of 0"):
        permute_op(expanded, torch.arange(8), 2, None)
    # the differentiable wrappers make their inputs contiguous themselves
    out = grouped_mm(torch.randn(3, 4).t(), torch.randn(1, 3, 2), torch.tensor([0, 4]))
    assert out.shape == (4, 2)


def test_out_of_range_ids_and_offsets():
    with pytest.raises(OpInputError, match=r"'expert_ids' expected values in \[0, 3\], got values in \[0, 4\]"):
        route_op(torch.tensor([[0, 4], [1, 2]]), 4)
    with pytest.raises(OpInputError, match=r"'expert_ids' expected values in \[0, 3\], got values in \[-1, 2\]"):
        route_op(torch.tensor([[0, -1], [1, 2]]), 4)
    with pytest.raises(OpInputError, match=r"'offsets' expected non-decreasing values from 0 to 4"):
        grouped_mm(torch.randn(4, 3), torch.randn(2, 3, 5), torch.tensor([0, 3, 2]))
    with pytest.raises(OpInputError, match=r"'flat_to_row' expected values in \[0, 5\]"):
        unpermute_op(torch.randn(6, 4), torch.tensor([0, 1, 2, 3, 4, 9]), 2, None, None)


def test_bad_neighbor_tables():
    kept = torch.tensor([[0, 1]])
    nbr = layout.neighbor_table(kept, (2, 2), 2, 3)
    x, w = torch.randn(nbr.shape[0], 3), torch.randn(3, 9)
    bad = nbr.clone()
    bad[0, 0] = 99
    with pytest.raises(OpInputError, match=r"'neighbors' expected values in \[-1, 7\], got values in \[-1, 99\]"):
        masked_depthwise_conv(x, bad, w)
    bad = nbr.clone()
    bad[0, 8] = 2  # points somewhere that does not point back
    with pytest.raises(OpInputError, match="symmetric"):
        masked_depthwise_conv(x, bad, w)
    with pytest.raises(OpInputError, match=r"'neighbors' expected shape \[8, k\*k\] with k odd"):
        masked_depthwise_conv_op(x, nbr[:, :4].contiguous(), w[:, :4].contiguous(), None)
    with pytest.raises(ValueError, match="kernel_size"):
        layout.neighbor_table(kept, (2, 2), 2, 4)


def test_unknown_choices():
    with pytest.raises(OpInputError, match=r"'activation' expected one of \['none', 'gelu', 'silu', 'swiglu'\], got 'relu'"):
        grouped_mm(torch.randn(4, 3), torch.randn(2, 3, 5), torch.tensor([0, 2, 4]), activation="relu")
    with pytest.raises(OpInputError, match="score_func"):
        topk_gating(torch.randn(3, 4), None, 2, "tanh")
    with pytest.raises(ValueError, match="backend"):
        MoEMLP(8, backend="fast")


def test_backend_without_kernels_says_why():
    with pytest.raises(BackendUnavailable, match=r"grouped_mm: backend 'cuda' cannot run here"):
        grouped_mm(torch.randn(4, 3), torch.randn(2, 3, 5), torch.tensor([0, 2, 4]), backend="cuda")
    with pytest.raises(BackendUnavailable, match=r"topk_gating: backend 'triton' cannot run here"):
        topk_gating(torch.randn(3, 4), None, 2, backend="triton")


def test_info_reports_every_backend():
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-m", "geomoe_kernels.info"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    for word in ("torch", "triton", "CUDA core", "grouped_mm", "masked_depthwise_conv", "usable"):
        assert word in out.stdout
