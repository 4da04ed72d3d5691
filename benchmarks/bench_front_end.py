"""The visible-only front end against the published dense masked one: one CBlock and stages 1-2
whole, forward + backward, at mask ratios 0.6, 0.75 and 0.85, with peak memory on a GPU."""
import pytest
import torch

from benchmarks import common as C
from geomoe import GeoMoE, random_masking
from geomoe.masking import visibility_map
from geomoe_kernels import SparseCBlock, layout

MASKS = (0.6, 0.75, 0.85)


def _sizes():
    """(images, model config): the published widths except in smoke mode."""
    if C.mode() == "smoke":
        return 2, dict(img_size=64, embed_dim=(16, 24, 32), depth=(1, 1, 1), num_heads=2, num_experts=4, top_k=2,
                       decoder_embed_dim=16, decoder_depth=1, decoder_num_heads=2)
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
    benchmark.extra_info.update(group="front_end", impl=front_end, mask_ratio=mask_ratio, images=n,
                                peak_memory_bytes=_peak(base))


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
    benchmark.extra_info.update(group="cblock", impl=front_end, mask_ratio=0.75, images=n, width=width,
                                peak_memory_bytes=_peak(base))
