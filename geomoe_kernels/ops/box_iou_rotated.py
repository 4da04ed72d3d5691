"""box_iou_rotated: the IoU of every pair of rotated boxes (cx, cy, w, h, angle in radians; mmcv's
and mmrotate's convention), exact for convex quadrilaterals (see reference/box_iou_rotated.py for
the method, the empty and non-finite boxes). Not differentiable: the detectors use it to match and
suppress, not in a loss. Triton: one program per tile of pairs, float32 arithmetic (float64 for
float64 boxes)."""

import math

import torch
from torch import Tensor

from .._checks import FLOAT_DTYPES, check_tensor
from ..reference import box_iou_rotated as _ref
from ._declare import Verification, declare


def _verify(c, be, dev, dt):
    g = torch.Generator().manual_seed(33)  # the same inputs on every call (the case's generator moves on)
    b1 = random_boxes(37, g)
    b2 = torch.cat([b1[:9], random_boxes(20, g)])  # identical boxes among them
    return [box_iou_rotated(b1.to(dev, dt), b2.to(dev, dt), backend=be)], []


def random_boxes(n: int, generator: torch.Generator, extent: float = 30.0) -> Tensor:
    """n float64 boxes in a [0, extent]^2 scene, sides 1-13, angles in [-pi/2, pi/2)."""
    u = torch.rand(n, 5, generator=generator, dtype=torch.float64)
    return torch.stack([u[:, 0] * extent, u[:, 1] * extent, 1 + 12 * u[:, 2], 1 + 12 * u[:, 3], (u[:, 4] - 0.5) * math.pi], 1)


@declare(
    reference=_ref.box_iou_rotated,
    verification=Verification(_verify, dtypes=(torch.float32,)),
    fake=lambda boxes1, boxes2: boxes1.new_empty(boxes1.shape[0], boxes2.shape[0]),
)
def box_iou_rotated_op(boxes1: Tensor, boxes2: Tensor) -> Tensor:
    """[N, M] IoU of boxes1 [N, 5] and boxes2 [M, 5], in boxes1's dtype."""
    check_tensor("box_iou_rotated", "boxes1", boxes1, dtypes=FLOAT_DTYPES, shape=(None, 5))
    check_tensor("box_iou_rotated", "boxes2", boxes2, dtypes=(boxes1.dtype,), shape=(None, 5), device=boxes1.device)


def box_iou_rotated(boxes1: Tensor, boxes2: Tensor, backend: str = "auto") -> Tensor:
    """IoU [N, M] of rotated boxes1 [N, 5] and boxes2 [M, 5] (cx, cy, w, h, angle in radians)."""
    return box_iou_rotated_op(boxes1.contiguous(), boxes2.contiguous(), backend)
