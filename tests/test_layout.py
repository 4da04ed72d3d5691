"""The compact visible layout of block-masked maps (geomoe_kernels.layout): the neighbour table
against a dense map, Z-order, gather / scatter, strided convs as one GEMM; the CBlock on it compiles."""

import pytest
import torch
import torch.nn.functional as F

from geomoe_kernels import layout


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


def test_neighbor_tables_of_several_stages_match_the_dense_map():
    """One slot table for every stage (the masked front end's stages 1 and 2, and a 1-cell stage with
    a wider reach in tokens); no kept token at all."""
    grid = (4, 5)
    kept = _kept(3, *grid, 6)
    stages = [(4, 5), (2, 5), (1, 5), (2, 3)]
    tables = layout.neighbor_tables(kept, grid, stages)
    for (s, k), t in zip(stages, tables):
        assert torch.equal(t, _brute_neighbors(kept, grid, s, k)), (s, k)
        assert torch.equal(t, layout.neighbor_table(kept, grid, s, k)), (s, k)
    assert layout.neighbor_tables(kept[:, :0], grid, stages)[0].shape == (0, 25)


def test_a_step_builds_the_neighbor_tables_in_a_few_small_ops_without_a_sync():
    """The shape's constants (Z-order, each tap's neighbour offset and cell) are made once; a step's
    tables are the slot table (5 ops) and 4 ops per stage (there were 83 per stage)."""
    from benchmarks import host_overhead as H

    grid = (6, 6)
    kept = _kept(2, *grid, 9)
    layout.neighbor_tables(kept, grid, [(4, 5), (2, 5)])  # the constants made
    counts = H.count(lambda: layout.neighbor_tables(_kept(2, *grid, 9), grid, [(4, 5), (2, 5)]))
    assert counts["host_syncs"] == 0
    assert counts["launches"] - counts["torch_ops"].get("randperm", 0) - counts["torch_ops"].get("stack", 0) <= 13, counts


def test_cached_index_constants_made_under_inference_mode_serve_a_training_step():
    grid, s = (3, 4), 4
    kept = _kept(2, *grid, 5)
    layout._CONSTANTS.clear()
    with torch.inference_mode():
        layout.gather_cells(torch.randn(2, 3, 12, 16), kept, s)
        layout.neighbor_table(kept, grid, s, 5)
    x = torch.randn(2, 3, 12, 16, requires_grad=True)
    rows = layout.gather_cells(x, kept, s)
    (g,) = torch.autograd.grad(rows.sum(), x)
    vis = layout.scatter_cells(torch.ones(rows.shape[0], 1), kept, s, grid)
    assert torch.equal(g, vis.expand_as(x))


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


@pytest.mark.parametrize("cout", [3, 64])  # fewer / more output channels than grouped rows: either operand permuted
@pytest.mark.parametrize("s", [2, 4])
def test_strided_conv_rows_matches_conv2d(s, cout):
    grid = (3, 3)
    kept = _kept(2, *grid, 4)
    x = torch.randn(2, 5, 3 * 4, 3 * 4, dtype=torch.float64, requires_grad=True)
    conv = torch.nn.Conv2d(5, cout, s, stride=s).double()
    rows = layout.gather_cells(x, kept, 4)
    got = layout.strided_conv_rows(rows, conv.weight, conv.bias)
    want = layout.gather_cells(conv(x), kept, 4 // s)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-12)
    g = torch.randn_like(got)
    grads = torch.autograd.grad(got, (x, conv.weight, conv.bias), g)
    grads_want = torch.autograd.grad(want, (x, conv.weight, conv.bias), g)
    for a, b in zip(grads, grads_want):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-11)


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


def test_neighbor_tables_and_gather_compile_fullgraph_and_keep_no_traced_constant():
    """Under torch.compile the shape constants are made in the trace, never kept: the eager calls
    after it make and keep real tensors, and every result is the eager one."""
    grid = (4, 4)
    kept = _kept(2, *grid, 5)
    layout._CONSTANTS.clear()
    tables = torch.compile(lambda k: layout.neighbor_tables(k, grid, [(4, 5), (2, 3)]), fullgraph=True, backend="aot_eager")
    x = torch.randn(2, 3, 16, 16)
    gather = torch.compile(lambda x, k: layout.gather_cells(x, k, 4), fullgraph=True, backend="aot_eager")
    got, rows = tables(kept), gather(x, kept)
    assert not layout._CONSTANTS
    want = layout.neighbor_tables(kept, grid, [(4, 5), (2, 3)])
    assert all(torch.equal(a, b) for a, b in zip(got, want))
    assert torch.equal(rows, layout.gather_cells(x, kept, 4))
    assert layout._CONSTANTS and all(
        type(t) is torch.Tensor for v in layout._CONSTANTS.values() for t in (v if isinstance(v, tuple) else (v,))
    )
