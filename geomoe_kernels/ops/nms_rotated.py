"""nms_rotated: greedy non-maximum suppression of rotated boxes (cx, cy, w, h, angle in radians),
class-wise when `idxs` is given: the indices kept, int64, by decreasing score (ties: the lower
index first). A box is suppressed by a kept one of its class with IoU > iou_threshold (mmcv's and
torchvision's rule). The output's length depends on the values: the op waits for the device once
to size it, like every NMS. Triton: the overlap matrix from box_iou_rotated's arithmetic, then one
program walks it in score order."""

from typing import Optional

import torch
from torch import Tensor

from .._checks import FLOAT_DTYPES, INDEX_DTYPES, OpInputError, check_finite, check_tensor
from ..reference import nms_rotated as _ref
from ._declare import Verification, declare
from .box_iou_rotated import random_boxes


def _verify(c, be, dev, dt):
    g = torch.Generator().manual_seed(33)  # the same inputs on every call (the case's generator moves on)
    boxes = torch.cat([random_boxes(40, g, extent=20.0), random_boxes(4, g, extent=20.0).repeat(2, 1)])
    scores = torch.rand(48, generator=g, dtype=torch.float64)
    scores[44:] = scores[40:44]  # tied scores on identical boxes: the lower index is kept
    classes = torch.randint(0, 3, (48,), generator=g)
    kept = nms_rotated(boxes.to(dev, dt), scores.to(dev, dt), 0.3, backend=be)
    kept_by_class = nms_rotated(boxes.to(dev, dt), scores.to(dev, dt), 0.1, classes.to(dev), backend=be)
    return [], [kept, kept_by_class]


def _value_checks(boxes, scores, **_):
    check_finite("nms_rotated", "boxes", boxes)
    check_finite("nms_rotated", "scores", scores)


def _fake(boxes, **_):
    n = torch.library.get_ctx().new_dynamic_size()  # at most N: a symbolic bound is not accepted
    return boxes.new_empty(n, dtype=torch.int64)


@declare(
    reference=_ref.nms_rotated,
    verification=Verification(_verify, dtypes=(torch.float32,)),
    fake=_fake,
    value_checks=_value_checks,
)
def nms_rotated_op(boxes: Tensor, scores: Tensor, iou_threshold: float, idxs: Optional[Tensor]) -> Tensor:
    """int64 indices of the boxes kept, by decreasing score."""
    op = "nms_rotated"
    check_tensor(op, "boxes", boxes, dtypes=FLOAT_DTYPES, shape=(None, 5))
    check_tensor(op, "scores", scores, dtypes=FLOAT_DTYPES, shape=(boxes.shape[0],), device=boxes.device)
    check_tensor(op, "idxs", idxs, dtypes=INDEX_DTYPES, shape=(boxes.shape[0],), device=boxes.device, optional=True)
    if not 0.0 <= iou_threshold <= 1.0:
        raise OpInputError(f"{op}: argument 'iou_threshold' expected a number in [0, 1], got {iou_threshold}")


def nms_rotated(
    boxes: Tensor, scores: Tensor, iou_threshold: float, idxs: Optional[Tensor] = None, backend: str = "auto"
) -> Tensor:
    """Indices (int64) of the rotated boxes [N, 5] kept by greedy NMS, by decreasing score; with
    idxs [N] (class ids) only boxes of the same class suppress each other."""
    return nms_rotated_op(
        boxes.contiguous(), scores.contiguous(), float(iou_threshold), None if idxs is None else idxs.contiguous(), backend
    )
