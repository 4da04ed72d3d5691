"""The rotated-box ops at the published Oriented R-CNN's sizes (800 px images): IoU of 2,000
proposals against 100 boxes, NMS over 2,000 proposals (threshold 0.8, the RPN's, and 0.1 class-wise,
the test-time one), and RoIAlignRotated of 512 rois, 7 x 7, sampling ratio 2, over 256 channels of
a 200 x 200 map (stride 4), forward and backward. Each beside the pure-PyTorch reference (the
`torch` backend, float64 inside, vectorised) as the CPU / torch baseline; RoIAlign also beside a
copy of the bytes it reads and writes. Smoke mode: a few dozen boxes, a 16 x 16 map."""

import math

import pytest
import torch

from benchmarks import common as C
from geomoe_kernels import box_iou_rotated, nms_rotated, roi_align_rotated

IMPLS = ("geomoe", "torch")


def _sizes():
    if C.mode() == "smoke":
        return dict(boxes=40, gt=8, rois=16, channels=8, map=16, extent=64.0)
    return dict(boxes=2000, gt=100, rois=512, channels=256, map=200, extent=800.0)


def _boxes(n: int, extent: float, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    u = torch.rand(n, 5, generator=g)
    side = extent / 13
    b = torch.stack([u[:, 0] * extent, u[:, 1] * extent, 2 + side * u[:, 2], 2 + side * u[:, 3], (u[:, 4] - 0.5) * math.pi], 1)
    return b.to(C.device())


def _backend(impl: str) -> str:
    return "auto" if impl == "geomoe" else "torch"


@pytest.mark.parametrize("impl", IMPLS)
def test_box_iou_rotated(benchmark, impl):
    s = _sizes()
    a, b = _boxes(s["boxes"], s["extent"]), _boxes(s["gt"], s["extent"], seed=1)
    C.run_pedantic(benchmark, lambda: box_iou_rotated(a, b, backend=_backend(impl)))
    benchmark.extra_info.update(group="rotated_iou", impl=impl, pairs=a.shape[0] * b.shape[0])


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("threshold", (0.8, 0.1))
def test_nms_rotated(benchmark, impl, threshold):
    s = _sizes()
    boxes = _boxes(s["boxes"], s["extent"])
    scores = torch.rand(boxes.shape[0], generator=torch.Generator().manual_seed(2)).to(C.device())
    classes = torch.randint(0, 20, (boxes.shape[0],), generator=torch.Generator().manual_seed(3)).to(C.device())
    idxs = classes if threshold == 0.1 else None  # test time: class-wise
    C.run_pedantic(benchmark, lambda: nms_rotated(boxes, scores, threshold, idxs, backend=_backend(impl)))
    benchmark.extra_info.update(group="rotated_nms", impl=impl, boxes=boxes.shape[0], threshold=threshold)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("direction", ("forward", "backward"))
def test_roi_align_rotated(benchmark, impl, direction):
    s = _sizes()
    x = torch.randn(1, s["channels"], s["map"], s["map"], device=C.device(), dtype=C.dtype())
    rois = torch.cat([torch.zeros(s["rois"], 1, device=C.device()), _boxes(s["rois"], s["extent"])], 1)
    be = _backend(impl)
    if direction == "forward":
        fn = lambda: roi_align_rotated(x, rois, 7, 0.25, 2, True, True, backend=be)
    else:
        xg = x.clone().requires_grad_(True)
        y = roi_align_rotated(xg, rois, 7, 0.25, 2, True, True, backend=be)
        g = torch.randn_like(y)
        fn = lambda: torch.autograd.grad(y, xg, g, retain_graph=True)
    # each bin reads 4 samples x 4 neighbours of every channel and writes one value
    nbytes = s["rois"] * s["channels"] * 49 * (16 + 1) * x.element_size()
    C.run_pedantic(benchmark, fn)
    benchmark.extra_info.update(
        group="rotated_roi_align", impl=impl, direction=direction, rois=s["rois"], bytes=nbytes, copy_gbps=C.copy_gbps(nbytes)
    )
