"""roi_align_rotated: RoIAlign over rotated regions with mmcv's RoIAlignRotated semantics (the pooling
of mmrotate's Oriented R-CNN; reference/roi_align_rotated.py says exactly what it samples).
input [B, C, H, W] (any float dtype; sums in float32 or wider), rois [K, 6] (batch index, cx, cy,
w, h, angle in radians) -> [K, C, PH, PW] in input's dtype. Differentiable in input (the rois come
from proposals: no gradient flows to them). The published detector pools 7 x 7 with
sampling_ratio 2, aligned, clockwise. An adaptive grid (sampling_ratio <= 0) is ceil(roi side / bins)
samples a bin side as mmcv's, but at most MAX_GRID (64; mmcv's is unbounded: a huge roi would take
more memory or time than any machine has); a fixed sampling_ratio above it is refused.

Triton: the forward is one program per (roi, block of bins, block of channels), summing its
samples in a fixed order; the backward adds each sample's four weighted gradients into the input's
gradient with atomic adds (as mmcv and torchvision do on a GPU: the last bits of a float32 sum
then depend on the order the adds land in); under torch.use_deterministic_algorithms(True) it
takes the reference's sparse product instead, whose sums are in a fixed order."""

from typing import List

import torch
from torch import Tensor

from .._checks import FLOAT_DTYPES, OpInputError, check_tensor, value_checks_enabled
from ..reference import roi_align_rotated as _ref
from . import _case
from ._declare import Verification, declare

OP = "roi_align_rotated"


def _verify(c, be, dev, dt):
    g = torch.Generator().manual_seed(33)  # the same inputs on every call (the case's generator moves on)
    x = torch.randn(2, 5, 9, 11, generator=g, dtype=torch.float64)
    rois = torch.tensor(
        [
            [0, 5, 4, 6, 3, 0.3],
            [1, 2, 2, 4, 8, -1.2],
            [0, 10, 8, 3, 3, 1.5708],
            [1, -1, -1, 2, 2, 0.1],
            [1, 5.5, 4.5, 20, 15, 2.0],
        ],
        dtype=torch.float64,
    )
    g_out = torch.randn(5, 5, 3, 2, generator=g, dtype=torch.float64)
    (leaf,) = _case.leaves({"x": x}, ["x"], dev, dt)
    y = roi_align_rotated(leaf, rois.to(dev, dt), (3, 2), 0.5, 2, True, True, backend=be)
    return [y, *_case.grads([y], [g_out], [leaf])], []


def _check_batch_index(rois: Tensor, batch: int) -> None:
    """Every roi's batch index an integer in [0, batch) (the kernels read no image for any other)."""
    if rois.numel() == 0 or not value_checks_enabled(rois):
        return
    b = rois[:, 0]
    bad = (b != b.floor()) | (b < 0) | (b >= batch)
    if bool(bad.any()):
        i = int(torch.argmax(bad.to(torch.uint8)))
        raise OpInputError(
            f"{OP}: argument 'rois' expected batch indices (column 0) in 0..{batch - 1}, got {float(b[i])} in row {i}"
        )


def _check(input: Tensor, rois: Tensor, output_size: List[int], sampling_ratio: int) -> None:
    check_tensor(OP, "input", input, dtypes=FLOAT_DTYPES, dim=4)
    check_tensor(OP, "rois", rois, dtypes=FLOAT_DTYPES, shape=(None, 6), device=input.device)
    if len(output_size) != 2 or min(output_size) < 1:
        raise OpInputError(f"{OP}: argument 'output_size' expected two positive ints (PH, PW), got {list(output_size)}")
    if sampling_ratio > _ref.MAX_GRID:
        raise OpInputError(
            f"{OP}: argument 'sampling_ratio' expected at most {_ref.MAX_GRID} samples a bin side (or <= 0: adaptive, "
            f"ceil(roi side / bins) capped at {_ref.MAX_GRID}), got {sampling_ratio}"
        )
    if min(input.shape[2:]) < 1:
        raise OpInputError(f"{OP}: argument 'input' expected a non-empty map, got shape {list(input.shape)}")


@declare(
    reference=_ref.roi_align_rotated,
    verification=Verification(_verify),
    fake=lambda input, rois, output_size, **_: input.new_empty(rois.shape[0], input.shape[1], *output_size),
    value_checks=lambda input, rois, **_: _check_batch_index(rois, input.shape[0]),
)
def roi_align_rotated_op(
    input: Tensor, rois: Tensor, output_size: List[int], spatial_scale: float, sampling_ratio: int, aligned: bool, clockwise: bool
) -> Tensor:
    """[K, C, PH, PW]: each rotated roi pooled into PH x PW bins."""
    _check(input, rois, output_size, sampling_ratio)


@declare(
    reference=_ref.roi_align_rotated_backward,
    backward_of=OP,
    fake=lambda grad_out, input_shape, **_: grad_out.new_empty(input_shape),
)
def roi_align_rotated_backward(
    grad_out: Tensor,
    rois: Tensor,
    input_shape: List[int],
    spatial_scale: float,
    sampling_ratio: int,
    aligned: bool,
    clockwise: bool,
) -> Tensor:
    """The gradient of the input [B, C, H, W]."""
    check_tensor(f"{OP}_backward", "grad_out", grad_out, dtypes=FLOAT_DTYPES, dim=4)
    check_tensor(f"{OP}_backward", "rois", rois, dtypes=FLOAT_DTYPES, shape=(grad_out.shape[0], 6), device=grad_out.device)


def _setup_context(ctx, args, output):
    ctx.save_for_backward(args["rois"])
    ctx.config = (list(args["input"].shape), args["spatial_scale"], args["sampling_ratio"], args["aligned"], args["clockwise"])
    ctx.backend = args["backend"]


def _backward(ctx, grad_out):
    if not ctx.needs_grad["input"]:
        return {}
    (rois,) = ctx.saved_tensors
    return {"input": roi_align_rotated_backward(grad_out.contiguous(), rois, *ctx.config, ctx.backend)}


roi_align_rotated_op.register_autograd(_setup_context, _backward)


def roi_align_rotated(
    input: Tensor,
    rois: Tensor,
    output_size,
    spatial_scale: float = 1.0,
    sampling_ratio: int = 0,
    aligned: bool = True,
    clockwise: bool = False,
    backend: str = "auto",
) -> Tensor:
    """Pool each rotated roi [K, 6] (batch index, cx, cy, w, h, angle) of input [B, C, H, W] into
    output_size (an int or (PH, PW)) bins: [K, C, PH, PW]. Defaults as mmcv's RoIAlignRotated."""
    size = [int(output_size)] * 2 if isinstance(output_size, int) else [int(s) for s in output_size]
    return roi_align_rotated_op(
        input.contiguous(),
        rois.contiguous(),
        size,
        float(spatial_scale),
        int(sampling_ratio),
        bool(aligned),
        bool(clockwise),
        backend,
    )
