"""SparseCBlock's planned rows path (one autograd.Function over a cached plan, nn/_cblock_plan.py)
against its path through the torch.library ops: the same bits for the output and every gradient, on
every backend this process runs (the reference here; the Triton interpreter in its own process,
tests/test_triton_interpreter.py), in fp32 and in half precision under autocast; in float64 against
the dense masked block (the published computation); a plan made once per key; no custom-op call."""

import pytest
import torch

from geomoe_kernels import SparseCBlock, _checks, layout
from geomoe_kernels import backend as _backend
from geomoe_kernels._checks import OpInputError
from geomoe_kernels.nn import _cblock_plan
from tests.helpers import HALF, skip_unavailable

GRID, S, K = (3, 4), 2, 5  # 3 x 4 tokens of 2 x 2 cells, a 5 x 5 depthwise conv


def _case(dim=8, images=2, kept=5, device="cpu", seed=0):
    torch.manual_seed(seed)
    keep = torch.stack([torch.randperm(GRID[0] * GRID[1])[:kept] for _ in range(images)])
    block = SparseCBlock(dim, 2.0, kernel_size=K)
    with torch.no_grad():
        for p in block.parameters():
            p.normal_(0, 0.3)
    return block.to(device), keep.to(device)


def _step(block, x, nbr, use_plan, dtype, grad_out):
    block.use_plan = use_plan
    xi = x.clone().requires_grad_(True)
    with torch.autocast(x.device.type, dtype=dtype, enabled=dtype in HALF):
        y = skip_unavailable(block, xi, nbr)
    grads = torch.autograd.grad((y.float() * grad_out).sum(), [xi, *block.parameters()])
    return [y, *grads]


def _same_bits(a, b):
    assert len(a) == len(b)
    for i, (u, v) in enumerate(zip(a, b)):
        assert u.dtype == v.dtype and u.shape == v.shape, i
        assert torch.equal(u, v), (i, (u.double() - v.double()).abs().max())


def test_planned_block_gives_the_ops_path_bits(backend, dtype):
    """fp32 rows and parameters, or half precision under autocast over fp32 parameters (trained so)."""
    block, keep = _case(device=backend.device)
    block.backend = backend.name
    nbr = layout.neighbor_table(keep, GRID, S, K)
    x = torch.randn(nbr.shape[0], 8, device=backend.device)
    g = torch.randn_like(x)
    _same_bits(_step(block, x, nbr, False, dtype, g), _step(block, x, nbr, True, dtype, g))


def test_planned_block_in_float64_matches_the_dense_masked_block():
    """Rows of the visible cells through the planned block, scattered back to the map, against the
    dense block with the mask applied before the depthwise conv (float64, every gradient); the
    scattered output and the map's gradient are exact zeros at masked cells."""
    block, keep = _case()
    block = block.double()
    N, C = keep.shape[0], 8
    x_map = torch.randn(N, C, GRID[0] * S, GRID[1] * S, dtype=torch.float64)
    g_map = torch.randn_like(x_map)
    vis = layout.scatter_cells(torch.ones(keep.numel() * S * S, 1, dtype=torch.float64), keep, S, GRID)
    nbr = layout.neighbor_table(keep, GRID, S, K)

    xr = x_map.clone().requires_grad_(True)
    y = layout.scatter_cells(block(layout.gather_cells(xr, keep, S), nbr), keep, S, GRID)
    ours = [y, *torch.autograd.grad((y * g_map).sum(), [xr, *block.parameters()])]

    xd = x_map.clone().requires_grad_(True)
    y_dense = block.forward_dense(xd, vis) * vis  # only the visible cells are the rows' outputs
    want = [y_dense, *torch.autograd.grad((y_dense * g_map).sum(), [xd, *block.parameters()])]
    for i, (a, b) in enumerate(zip(ours, want)):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10, msg=f"output / gradient {i}")
    masked = vis.expand_as(y) == 0
    assert masked.any() and (~masked).any()
    assert torch.equal(ours[0][masked], torch.zeros_like(ours[0][masked]))
    assert torch.equal(ours[1][masked], torch.zeros_like(ours[1][masked]))


def test_a_plan_is_made_once_per_key_and_a_new_shape_makes_another():
    block, keep = _case()
    nbr = layout.neighbor_table(keep, GRID, S, K)
    built = _cblock_plan.plans_built
    for _ in range(3):
        block(torch.randn(nbr.shape[0], 8, requires_grad=True), nbr).sum().backward()
    assert _cblock_plan.plans_built == built + 1
    nbr2 = layout.neighbor_table(keep[:1], GRID, S, K)
    block(torch.randn(nbr2.shape[0], 8), nbr2)
    assert _cblock_plan.plans_built == built + 2
    _backend.forget()  # a changed environment: the choices and the plans made from them go
    block(torch.randn(nbr.shape[0], 8), nbr)
    assert _cblock_plan.plans_built == built + 3


def test_planned_block_calls_no_custom_op_and_the_ops_path_six():
    from benchmarks import host_overhead as H

    block, keep = _case()
    nbr = layout.neighbor_table(keep, GRID, S, K)
    x = torch.randn(nbr.shape[0], 8, requires_grad=True)

    def step():
        block.zero_grad(set_to_none=True)
        x.grad = None
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = block(x, nbr)
        y.float().sum().backward()

    with _checks.value_checks(False):
        block.use_plan = False
        ops = H.count(step)
        block.use_plan = True
        step()
        planned = H.count(step)
    assert ops["custom_op_calls"] == 6 and planned["custom_op_calls"] == 0
    assert planned["launches"] <= ops["launches"] and planned["host_syncs"] == 0


def test_value_checks_still_run_on_the_planned_path():
    block, keep = _case()
    nbr = layout.neighbor_table(keep, GRID, S, K).clone()
    nbr[0, 0] = nbr.shape[0]  # out of range
    with pytest.raises(OpInputError, match="masked_depthwise_conv: argument 'neighbors' expected values in"):
        block(torch.randn(nbr.shape[0], 8), nbr)


def test_planned_block_refuses_a_second_derivative():
    block, keep = _case()
    nbr = layout.neighbor_table(keep, GRID, S, K)
    x = torch.randn(nbr.shape[0], 8, requires_grad=True)
    (gx,) = torch.autograd.grad(block(x, nbr).square().sum(), [x], create_graph=True)
    with pytest.raises(RuntimeError, match="once_differentiable|double backward"):
        gx.sum().backward()


def test_sparse_front_end_gives_the_same_bits_with_planned_blocks():
    """GeoMoE's stages 1-2 on visible rows (both stages' neighbour tables from one slot table), bf16
    autocast over fp32 parameters: the planned blocks against the blocks through the ops, the
    outputs and every parameter's gradient."""
    from geomoe import GeoMoE, random_masking

    torch.manual_seed(0)
    model = GeoMoE(img_size=64, embed_dim=(16, 32, 48), depth=(1, 1, 1), decoder_embed_dim=32, decoder_depth=1)
    imgs = torch.randn(2, 3, 64, 64)
    keep = random_masking(2, model.grid**2, 0.75, 0.25).keep
    blocks = [*model.blocks1, *model.blocks2]
    params = [p for p in model.parameters() if p.requires_grad]

    def run(use_plan):
        for b in blocks:
            b.use_plan = use_plan
        with torch.autocast("cpu", dtype=torch.bfloat16):
            x, s1, s2 = model._front_end_sparse(imgs, keep)
        loss = x.float().square().mean() + s1.float().square().mean() + s2.float().square().mean()
        grads = torch.autograd.grad(loss, params, allow_unused=True)
        return [x, s1, s2, *(g for g in grads if g is not None)]

    _same_bits(run(False), run(True))
