"""roi_align in torchvision's conventions (geomoe_kernels.reference.roi_align): input [B, C, H, W],
rois [K, 5] (batch index, x1, y1, x2, y2), output_size (PH, PW), spatial_scale, sampling_ratio (<= 0:
adaptive), aligned -> [K, C, PH, PW]. Differentiable in input (rois get no gradient). The backward
is deterministic on every backend: no float atomics (see geomoe_kernels.triton.roi_align)."""

from typing import Sequence, Union

import torch
from torch import Tensor

from .._checks import FLOAT_DTYPES, OpInputError, check_finite, check_index_range, check_tensor, value_checks_enabled
from ..reference import roi_align as _ref
from . import _case
from ._declare import Verification, declare


def _verify(c, be, dev, dt):
    """2 images, 5 x 9 x 11 maps, 7 RoIs (inside, on borders, partly outside, degenerate); adaptive and
    fixed grids, aligned and not."""
    g = torch.Generator().manual_seed(33)  # its own: the case's generator moves on between the calls
    x = torch.randn(2, 5, 9, 11, generator=g, dtype=torch.float64)
    rois = torch.tensor(
        [
            [0, 1.0, 1.0, 15.0, 12.0],
            [1, 0.0, 0.0, 22.0, 18.0],
            [1, -3.0, 4.0, 6.0, 25.0],
            [0, 10.0, 10.0, 10.0, 10.0],
            [1, 20.0, 2.0, 30.0, 9.0],
            [0, 3.5, 7.25, 9.75, 8.5],
            [1, 6.0, 6.0, 7.0, 7.0],
        ],
        dtype=torch.float64,
    )
    (xl,) = _case.leaves({"x": x}, ["x"], dev, dt)
    r = rois.to(dev, dt)
    a = roi_align(xl, r, (3, 2), 0.5, -1, False, backend=be)
    b = roi_align(xl, r, 3, 0.5, 2, True, backend=be)
    up_a = torch.randn(a.shape, generator=g, dtype=torch.float64)
    up_b = torch.randn(b.shape, generator=g, dtype=torch.float64)
    return [a, b, *_case.grads([a, b], [up_a, up_b], [xl])], []


def _fake(input, rois, pooled_height, pooled_width, **_):
    return input.new_empty(rois.shape[0], input.shape[1], pooled_height, pooled_width)


def _check(op, input, rois, pooled_height, pooled_width, sampling_ratio):
    check_tensor(op, "input", input, dtypes=FLOAT_DTYPES, dim=4)
    check_tensor(op, "rois", rois, dtypes=FLOAT_DTYPES, dim=2, device=input.device)
    if rois.shape[1] != 5:
        raise OpInputError(f"{op}: argument 'rois' expected shape [K, 5] (batch index, x1, y1, x2, y2), got {list(rois.shape)}")
    if pooled_height < 1 or pooled_width < 1:
        raise OpInputError(f"{op}: argument 'output_size' expected positive sizes, got ({pooled_height}, {pooled_width})")
    if not isinstance(sampling_ratio, int):
        raise OpInputError(f"{op}: argument 'sampling_ratio' expected an int (<= 0: adaptive), got {sampling_ratio!r}")


@declare(reference=_ref.roi_align, fake=_fake, verification=Verification(_verify, dtypes=(torch.float32, torch.float16)))
def roi_align_op(
    input: Tensor, rois: Tensor, pooled_height: int, pooled_width: int, spatial_scale: float, sampling_ratio: int, aligned: bool
) -> Tensor:
    _check("roi_align", input, rois, pooled_height, pooled_width, sampling_ratio)


@roi_align_op.value_checks
def _(input, rois, **_):
    check_finite("roi_align", "rois", rois)
    if value_checks_enabled(rois) and rois.numel():
        b = rois[:, 0]
        if bool((b != b.round()).any()):
            raise OpInputError("roi_align: argument 'rois' expected integral batch indices in column 0, got fractions")
        check_index_range("roi_align", "rois[:, 0] (batch index)", b.to(torch.int64), 0, input.shape[0])


@declare(reference=_ref.roi_align_backward, backward_of="roi_align", fake=lambda input, **_: torch.empty_like(input))
def roi_align_backward(
    grad_out: Tensor,
    input: Tensor,
    rois: Tensor,
    pooled_height: int,
    pooled_width: int,
    spatial_scale: float,
    sampling_ratio: int,
    aligned: bool,
) -> Tensor:
    """d input."""


def _setup_context(ctx, args, output):
    ctx.save_for_backward(args["input"], args["rois"])
    ctx.config = tuple(args[n] for n in ("pooled_height", "pooled_width", "spatial_scale", "sampling_ratio", "aligned", "backend"))


def _backward(ctx, grad):
    input, rois = ctx.saved_tensors
    ph, pw, scale, sr, aligned, backend = ctx.config
    return {"input": roi_align_backward(grad.contiguous(), input, rois, ph, pw, scale, sr, aligned, backend)}


roi_align_op.register_autograd(_setup_context, _backward)


def roi_align(
    input: Tensor,
    rois: Tensor,
    output_size: Union[int, Sequence[int]],
    spatial_scale: float = 1.0,
    sampling_ratio: int = -1,
    aligned: bool = False,
    backend: str = "auto",
) -> Tensor:
    """[K, C, PH, PW]: each RoI's PH x PW bins, each the mean of its bilinear samples (see the reference)."""
    if isinstance(output_size, int):
        ph, pw = output_size, output_size
    elif isinstance(output_size, (tuple, list)) and len(output_size) == 2 and all(isinstance(s, int) for s in output_size):
        ph, pw = output_size
    else:
        raise OpInputError(f"roi_align: argument 'output_size' expected an int or (height, width), got {output_size!r}")
    return roi_align_op(input.contiguous(), rois.contiguous(), ph, pw, float(spatial_scale), sampling_ratio, bool(aligned), backend)
