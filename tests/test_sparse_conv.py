import pytest
import torch
import torch.nn.functional as F

from geomoe_kernels import layout, masked_depthwise_conv
from geomoe_kernels.ops.sparse_conv import masked_depthwise_conv_backward_op, masked_depthwise_conv_op


def _kept(N, H, W, L):
    return torch.stack([torch.randperm(H * W)[:L] for _ in range(N)])


def _brute_neighbors(kept, grid, s, k):
    """From a dense map of row numbers: the obvious way, O(cells)."""
    N, L = kept.shape
    H, W = grid
    ids = torch.arange(N * L * s * s, dtype=torch.float64)[:, None]
    rowmap = layout.scatter_cells(ids + 1, kept, s, grid)[:, 0]  # 0 where not kept, else row + 1
    p = k // 2
    padded = F.pad(rowmap, (p, p, p, p))
    out = torch.empty(N * L * s * s, k * k, dtype=torch.int64)
    for r in range(N * L * s * s):
        n = r // (L * s * s)
        pos = (rowmap[n] == r + 1).nonzero()[0]
        y, x = int(pos[0]), int(pos[1])
        win = padded[n, y : y + k, x : x + k].reshape(-1)
        out[r] = win.long() - 1
    return out


@pytest.mark.parametrize("s", [1, 2, 4])
@pytest.mark.parametrize("k", [3, 5])
def test_neighbor_table_matches_dense_map(s, k):
    grid = (4, 5)
    kept = _kept(2, *grid, 7)
    assert torch.equal(layout.neighbor_table(kept, grid, s, k), _brute_neighbors(kept, grid, s, k))


def test_zorder_groups_are_stage2_cells():
    cells = layout.zorder_cells(4)
    # each consecutive group of 4 cells is one 2x2 block, row-major inside
    for g in range(4):
        block = cells[4 * g : 4 * g + 4]
        assert (block // 2).unique(dim=0).shape[0] == 1
        assert ((block % 2)[:, 0] * 2 + (block % 2)[:, 1]).tolist() == [0, 1, 2, 3]


def test_gather_scatter_round_trip():
    grid, s = (3, 4), 4
    kept = _kept(2, *grid, 5)
    x = torch.randn(2, 6, 12, 16)
    rows = layout.gather_cells(x, kept, s)
    back = layout.scatter_cells(rows, kept, s, grid)
    vis = layout.scatter_cells(torch.ones(rows.shape[0], 1), kept, s, grid)
    assert torch.equal(back, x * vis)


@pytest.mark.parametrize("s", [2, 4])
def test_strided_conv_rows_matches_conv2d(s):
    grid = (3, 3)
    kept = _kept(2, *grid, 4)
    x = torch.randn(2, 5, 3 * 4, 3 * 4, dtype=torch.float64)
    conv = torch.nn.Conv2d(5, 7, s, stride=s).double()
    rows = layout.gather_cells(x, kept, 4)
    got = layout.strided_conv_rows(rows, conv.weight, conv.bias)
    want = layout.gather_cells(conv(x), kept, 4 // s)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-12)


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


def test_opcheck():
    kept = _kept(2, 3, 3, 4)
    nbr = layout.neighbor_table(kept, (3, 3), 2, 5)
    x = torch.randn(nbr.shape[0], 3)
    w = torch.randn(3, 25)
    torch.library.opcheck(masked_depthwise_conv_op, (x, nbr, w, torch.randn(3)))
    torch.library.opcheck(masked_depthwise_conv_op, (x, nbr, w, None))
    torch.library.opcheck(masked_depthwise_conv_backward_op, (torch.randn_like(x), x, nbr, w))


def test_sparse_cblock_compiles_fullgraph():
    from geomoe_kernels import SparseCBlock

    block = SparseCBlock(8, kernel_size=3)
    nbr = layout.neighbor_table(_kept(2, 3, 3, 4), (3, 3), 2, 3)
    x = torch.randn(nbr.shape[0], 8, requires_grad=True)
    compiled = torch.compile(block, fullgraph=True, backend="aot_eager")
    y = compiled(x, nbr)
    g = torch.autograd.grad(y.square().sum(), x)[0]
    y2 = block(x, nbr)
    g2 = torch.autograd.grad(y2.square().sum(), x)[0]
    torch.testing.assert_close(y, y2)
    torch.testing.assert_close(g, g2)
