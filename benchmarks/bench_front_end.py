"""The visible-only front end against the published dense masked one: one CBlock and stages 1-2
whole, forward + backward, at mask ratios 0.6, 0.75 and 0.85, with peak memory on a GPU; and its
kernels on stage-1 rows at mask 0.75 (the masked depthwise conv against a copy of the same bytes,
the fused LayerNorm + 1x1 conv against torch's layer_norm, linear and GELU, and torch.mm)."""

import pytest
import torch
import torch.nn.functional as F

from benchmarks import common as C
from geomoe import GeoMoE, random_masking
from geomoe.masking import visibility_map
from geomoe_kernels import SparseCBlock, layout, masked_depthwise_conv, norm_linear

MASKS = (0.6, 0.75, 0.85)


def _sizes():
    """(images, model config): the published widths except in smoke mode."""
    if C.mode() == "smoke":
        return 2, dict(C.SMOKE_MODEL)
    return (64 if C.mode() == "gpu" else 4), {}


def _peak_reset():
    if C.device().type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        return torch.cuda.memory_allocated()
    return None


def _peak(base):
    return None if base is None else torch.cuda.max_memory_allocated() - base


@pytest.mark.parametrize("front_end", ("sparse", "dense"))
@pytest.mark.parametrize("mask_ratio", MASKS)
def test_front_end_fwdbwd(benchmark, front_end, mask_ratio):
    n, cfg = _sizes()
    model = GeoMoE(**cfg).to(C.device())
    G = model.grid
    imgs = torch.randn(n, 3, model.img_size, model.img_size, device=C.device())
    keep = random_masking(n, G * G, mask_ratio, 0.25, device=C.device()).keep
    run_front = model._front_end_sparse if front_end == "sparse" else model._front_end_dense
    params = [p for p in model.parameters() if p.requires_grad]

    def step():
        for p in params:
            p.grad = None
        with torch.autocast(C.device().type, dtype=C.dtype(), enabled=C.device().type == "cuda"):
            x, s1, s2 = run_front(imgs, keep)
        (x.float().square().mean() + s1.float().square().mean() + s2.float().square().mean()).backward()

    step()
    base = _peak_reset()
    C.run_pedantic(benchmark, step)
    benchmark.extra_info.update(group="front_end", impl=front_end, mask_ratio=mask_ratio, images=n, peak_memory_bytes=_peak(base))


@pytest.mark.parametrize("front_end", ("sparse", "dense"))
def test_cblock_fwdbwd(benchmark, front_end):
    n, cfg = _sizes()
    width = 16 if C.mode() == "smoke" else 256
    grid = 4 if C.mode() == "smoke" else 14
    blk = SparseCBlock(width).to(C.device())
    keep = random_masking(n, grid * grid, 0.75, 0.25, device=C.device()).keep
    dense = torch.randn(n, width, grid * 4, grid * 4, device=C.device(), requires_grad=True)
    if front_end == "sparse":
        nbr = layout.neighbor_table(keep, (grid, grid), 4, 5)
        rows = layout.gather_cells(dense.detach(), keep, 4).requires_grad_(True)
        fn = lambda: blk.forward_rows(rows, nbr)
    else:
        vis = visibility_map(keep, grid, 4)
        fn = lambda: blk.forward_dense(dense, vis)

    def step():
        with torch.autocast(C.device().type, dtype=C.dtype(), enabled=C.device().type == "cuda"):
            out = fn()
        out.float().square().mean().backward()

    step()
    base = _peak_reset()
    C.run_pedantic(benchmark, step)
    benchmark.extra_info.update(
        group="cblock", impl=front_end, mask_ratio=0.75, images=n, width=width, peak_memory_bytes=_peak(base)
    )


def _stage1_rows(width: int):
    """(rows [R, width], neighbour table) of stage 1 at mask 0.75."""
    n, _ = _sizes()
    grid = 4 if C.mode() == "smoke" else 14
    keep = random_masking(n, grid * grid, 0.75, 0.25, device=C.device()).keep
    nbr = layout.neighbor_table(keep, (grid, grid), 4, 5)
    return torch.randn(nbr.shape[0], width, device=C.device(), dtype=C.dtype()), nbr


@pytest.mark.parametrize("direction", ("forward", "backward"))
def test_masked_depthwise_conv(benchmark, direction):
    width = 16 if C.mode() == "smoke" else 256
    x, nbr = _stage1_rows(width)
    w = torch.randn(width, 25, device=C.device(), dtype=C.dtype()) / 5
    b = torch.zeros(width, device=C.device(), dtype=C.dtype())
    if direction == "forward":
        fn = lambda: masked_depthwise_conv(x, nbr, w, b)
        nbytes = 2 * x.numel() * x.element_size() + nbr.numel() * 8  # rows in and out, the table
    else:
        xg, wg = x.clone().requires_grad_(True), w.clone().requires_grad_(True)
        y = masked_depthwise_conv(xg, nbr, wg, b)
        g = torch.randn_like(y)
        fn = lambda: torch.autograd.grad(y, (xg, wg), g, retain_graph=True)
        nbytes = 3 * x.numel() * x.element_size() + 2 * nbr.numel() * 8  # x and grad in, dx out
    C.run_pedantic(benchmark, fn)
    benchmark.extra_info.update(
        group="masked_dwconv",
        impl="geomoe",
        direction=direction,
        rows=x.shape[0],
        width=width,
        bytes=nbytes,
        copy_gbps=C.copy_gbps(nbytes),
    )


@pytest.mark.parametrize("impl", ("geomoe", "torch"))
@pytest.mark.parametrize("layer", ("conv1", "fc1"))
def test_norm_linear(benchmark, impl, layer):
    """LN + 1x1 conv (conv1: 256 -> 256) and LN + fc1 + GELU (256 -> 1024), forward, float32 rows
    and the GEMM in the benchmark dtype, as under autocast."""
    width = 16 if C.mode() == "smoke" else 256
    out_width = width if layer == "conv1" else 4 * width
    act = "none" if layer == "conv1" else "gelu"
    x, _ = _stage1_rows(width)
    x = x.float()
    nw, nb = torch.ones(width, device=C.device()), torch.zeros(width, device=C.device())
    w = torch.randn(out_width, width, device=C.device(), dtype=C.dtype()) / width**0.5
    b = torch.zeros(out_width, device=C.device(), dtype=C.dtype())
    if impl == "geomoe":
        fn = lambda: norm_linear(x, nw, nb, w, b, act, 1e-6)
    else:

        def fn():
            y = F.linear(F.layer_norm(x, [width], nw, nb, 1e-6).to(w.dtype), w, b)
            return F.gelu(y) if act == "gelu" else y

    C.run_pedantic(benchmark, fn)
    R = x.shape[0]
    benchmark.extra_info.update(
        group="norm_linear",
        impl=impl,
        layer=layer,
        rows=R,
        flops=2 * R * width * out_width,
        mm_tflops=C.mm_tflops(R, width, out_width),
    )
