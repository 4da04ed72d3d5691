"""nms: non-maximum suppression in torchvision's conventions (geomoe_kernels.reference.nms):
boxes [N, 4] (x1, y1, x2, y2), scores [N], iou_threshold, idxs [N] int64 class ids or None ->
int64 indices of the kept boxes by decreasing score. Equal scores are visited by increasing index
(a stable sort), so the result is the same on every backend and every run. With idxs, boxes of
different classes never suppress each other (IoU is computed within a class, not by shifting
boxes apart). Not differentiable. The output's length depends on the data: the one host sync."""

from typing import Optional

import torch
from torch import Tensor

from .._checks import FLOAT_DTYPES, INDEX_DTYPES, OpInputError, check_finite, check_tensor, value_checks_enabled
from ..reference import nms as _ref
from ._declare import Verification, declare


def _verify(c, be, dev, dt):
    """100 boxes of 3 classes in clusters (many overlaps), every 10th score repeated (ties)."""
    g = torch.Generator().manual_seed(32)  # its own: the case's generator moves on between the calls
    centres = torch.rand(8, 2, generator=g, dtype=torch.float64) * 50
    xy = centres[torch.randint(0, 8, (100,), generator=g)] + torch.randn(100, 2, generator=g, dtype=torch.float64) * 3
    wh = 5 + torch.rand(100, 2, generator=g, dtype=torch.float64) * 10
    boxes = torch.cat([xy, xy + wh], 1).round()  # integral corners: exact in every dtype
    scores = torch.rand(100, generator=g, dtype=torch.float64)
    scores[::10] = 0.5  # ties
    scores = (scores * 256).round() / 256  # exact in float16 too
    idxs = torch.randint(0, 3, (100,), generator=g)
    kept = nms(boxes.to(dev, dt), scores.to(dev, dt), 0.5, backend=be)
    per_class = nms(boxes.to(dev, dt), scores.to(dev, dt), 0.3, idxs.to(dev), backend=be)
    return [], [kept, per_class]


def _fake(boxes, **_):
    n = torch.library.get_ctx().new_dynamic_size()
    return boxes.new_empty(n, dtype=torch.int64)


@declare(reference=_ref.nms, fake=_fake, verification=Verification(_verify, dtypes=(torch.float32, torch.float16)))
def nms_op(boxes: Tensor, scores: Tensor, iou_threshold: float, idxs: Optional[Tensor]) -> Tensor:
    op = "nms"
    check_tensor(op, "boxes", boxes, dtypes=FLOAT_DTYPES, dim=2)
    if boxes.shape[1] != 4:
        raise OpInputError(f"{op}: argument 'boxes' expected shape [N, 4] (x1, y1, x2, y2), got {list(boxes.shape)}")
    N = boxes.shape[0]
    check_tensor(op, "scores", scores, dtypes=FLOAT_DTYPES, shape=(N,), device=boxes.device)
    check_tensor(op, "idxs", idxs, dtypes=INDEX_DTYPES, shape=(N,), device=boxes.device, optional=True)
    if not isinstance(iou_threshold, (int, float)) or not 0.0 <= float(iou_threshold) <= 1.0:
        raise OpInputError(f"{op}: argument 'iou_threshold' expected a number in [0, 1], got {iou_threshold!r}")


@nms_op.value_checks
def _(boxes, scores, **_):
    check_finite("nms", "boxes", boxes)
    check_finite("nms", "scores", scores)
    if value_checks_enabled(boxes) and boxes.numel():
        bad = (boxes[:, 2] < boxes[:, 0]) | (boxes[:, 3] < boxes[:, 1])
        if bool(bad.any()):
            i = int(torch.argmax(bad.to(torch.uint8)))
            raise OpInputError(
                f"nms: argument 'boxes' expected x1 <= x2 and y1 <= y2 (xyxy), got box {i} = {boxes[i].tolist()}"
            )


def nms(boxes: Tensor, scores: Tensor, iou_threshold: float, idxs: Optional[Tensor] = None, backend: str = "auto") -> Tensor:
    """Indices (int64) of the boxes kept, by decreasing score (see the module docstring)."""
    return nms_op(boxes.contiguous(), scores.contiguous(), float(iou_threshold), None if idxs is None else idxs.contiguous(), backend)
