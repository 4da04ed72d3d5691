"""masked_depthwise_conv: the reference against a dense masked conv2d in float64; every backend
against the reference; opcheck; bad neighbour tables."""

import pytest
import torch
import torch.nn.functional as F

from geomoe_kernels import OpInputError, layout, masked_depthwise_conv
from geomoe_kernels.ops.sparse_conv import masked_depthwise_conv_backward, masked_depthwise_conv_op
from tests.helpers import assert_backend_close, assert_runs_close, three_runs


def _kept(N, H, W, L):
    return torch.stack([torch.randperm(H * W)[:L] for _ in range(N)])


def _dense_masked(rows, kept, s, grid, weight, bias):
    k = int(weight.shape[1] ** 0.5)
    dense = layout.scatter_cells(rows, kept, s, grid)
    out = F.conv2d(dense, weight.view(-1, 1, k, k), bias, padding=k // 2, groups=rows.shape[1])
    return layout.gather_cells(out, kept, s)


@pytest.mark.parametrize("case", ["random", "all_visible", "single", "corners"])
@pytest.mark.parametrize("k", [3, 5])
def test_conv_matches_dense_masked_conv(case, k):
    grid, s, C = (4, 4), 4, 6
    if case == "random":
        kept = _kept(3, *grid, 5)
    elif case == "all_visible":
        kept = torch.stack([torch.randperm(16) for _ in range(2)])
    elif case == "single":
        kept = torch.tensor([[5], [0]])
    else:
        kept = torch.tensor([[0, 3, 12, 15], [15, 0, 1, 4]])
    nbr = layout.neighbor_table(kept, grid, s, k)
    rows = torch.randn(nbr.shape[0], C, dtype=torch.float64, requires_grad=True)
    w = torch.randn(C, k * k, dtype=torch.float64, requires_grad=True)
    b = torch.randn(C, dtype=torch.float64, requires_grad=True)
    got = masked_depthwise_conv(rows, nbr, w, b)
    want = _dense_masked(rows, kept, s, grid, w, b)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-12)
    g = torch.randn_like(got)
    for a, bb in zip(torch.autograd.grad(got, (rows, w, b), g), torch.autograd.grad(want, (rows, w, b), g)):
        torch.testing.assert_close(a, bb, rtol=0, atol=1e-11)


def test_gradcheck():
    kept = _kept(2, 3, 3, 3)
    nbr = layout.neighbor_table(kept, (3, 3), 2, 3)
    x = torch.randn(nbr.shape[0], 2, dtype=torch.float64, requires_grad=True)
    w = torch.randn(2, 9, dtype=torch.float64, requires_grad=True)
    b = torch.randn(2, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, w, b: masked_depthwise_conv(x, nbr, w, b), (x, w, b))


def test_low_precision_within_tolerance():
    kept = _kept(2, 4, 4, 6)
    nbr = layout.neighbor_table(kept, (4, 4), 4, 5)
    x = torch.randn(nbr.shape[0], 8)
    w = torch.randn(8, 25) / 5
    want = masked_depthwise_conv(x.double(), nbr, w.double())
    got = masked_depthwise_conv(x.half(), nbr, w.half()).double()
    torch.testing.assert_close(got, want, rtol=2e-2, atol=1.4e-2)


@pytest.mark.parametrize("k", [3, 5])
def test_backend_matches_reference(backend, dtype, k):
    kept = torch.stack([torch.randperm(16)[:5] for _ in range(2)])
    kept[1, 0] = 0  # a corner token
    nbr = layout.neighbor_table(kept, (4, 4), 4, k).to(backend.device)
    x = torch.randn(nbr.shape[0], 20).to(backend.device, dtype).requires_grad_(True)
    w = (torch.randn(20, k * k) / k).to(backend.device, dtype).requires_grad_(True)
    b = torch.randn(20).to(backend.device, dtype).requires_grad_(True)
    outs = three_runs(lambda name, x, w, b: masked_depthwise_conv(x, nbr, w, b, backend=name), (x, w, b), backend.name)
    assert_runs_close(outs, dtype, backend.name)


def test_opcheck():
    kept = _kept(2, 3, 3, 4)
    nbr = layout.neighbor_table(kept, (3, 3), 2, 5)
    x = torch.randn(nbr.shape[0], 3)
    w = torch.randn(3, 25)
    torch.library.opcheck(masked_depthwise_conv_op.op, (x, nbr, w, torch.randn(3)))
    torch.library.opcheck(masked_depthwise_conv_op.op, (x, nbr, w, None))
    torch.library.opcheck(masked_depthwise_conv_backward.op, (torch.randn_like(x), x, nbr, w))


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


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_triton_weight_gradient_is_the_same_bits_whichever_config_runs(backend, dtype, monkeypatch):
    """The weight gradient's programs each sum a fixed run of rows in registers, one row after
    another: channel tiles and warp counts (what autotuning picks) change no bit of dweight or
    dbias. 47 rows make three programs, the last one short and ending inside a step of rows in
    flight; 37 channels leave every tile width a tail; the results match the reference."""
    if backend.name != "triton":
        pytest.skip("the Triton kernels' configs")
    import triton

    from geomoe_kernels.triton import sparse_conv as ts

    interpreting = backend.device.type == "cpu"
    kept = torch.stack([torch.randperm(64)[:47] for _ in range(1)])
    nbr = layout.neighbor_table(kept, (8, 8), 1, 5).to(backend.device)
    rows = nbr.shape[0]
    assert -(-rows // ts.WGRAD_ROWS) >= 2 and rows % 4
    x = torch.randn(rows, 37).to(backend.device, dtype)
    g = torch.randn(rows, 37).to(backend.device, dtype)
    w = (torch.randn(37, 25) / 5).to(backend.device, dtype)
    results = []
    for bc, warps in [(16, 1), (8, 2), (32, 4)] if interpreting else [(64, 4), (128, 4), (32, 2)]:
        monkeypatch.setattr(ts._dwconv_wgrad_kernel, "configs", [triton.Config({"BC": bc}, num_warps=warps)])
        monkeypatch.setattr(ts._dwconv_wgrad_kernel, "cache", {})
        results.append(masked_depthwise_conv_backward(g, x, nbr, w, backend="triton")[1:])
    for dw, db in results[1:]:
        assert torch.equal(dw, results[0][0]) and torch.equal(db, results[0][1])
    _, dw_ref, db_ref = masked_depthwise_conv_backward(g.double(), x.double(), nbr, w.double(), backend="torch")
    _, dw_same, db_same = masked_depthwise_conv_backward(g, x, nbr, w, backend="torch")
    assert_backend_close(results[0][0], dw_same, dw_ref, dtype, "triton", grad=True)
    assert_backend_close(results[0][1], db_same, db_ref, dtype, "triton", grad=True)
