"""Non-maximum suppression in torchvision's conventions, in plain PyTorch.

Boxes are (x1, y1, x2, y2) with x1 <= x2, y1 <= y2; area (x2 - x1) * (y2 - y1) (no +1). Boxes are
visited by decreasing score, ties by increasing index (a stable sort); a box is kept unless a kept
box of the same class (all one class when idxs is None) overlaps it with IoU > iou_threshold
(strictly). IoU of two boxes whose union is empty (both degenerate) is 0. The result: int64
indices into the input of the kept boxes, by decreasing score (ties: lower index first).

The scan goes by blocks of the visiting order (see nms): each block is compared with the boxes
kept before it and then settled among itself by a vectorised fixed-point iteration, so the work
is about N x kept IoUs instead of N x N, and no Python loop runs over the boxes. Host syncs: a
few per block (the kept count, the fixed point's test)."""

from typing import Optional

import torch
from torch import Tensor


def sorted_order(scores: Tensor) -> Tensor:
    """Positions by decreasing score, equal scores by increasing index: the visiting order."""
    return torch.sort(scores, descending=True, stable=True).indices


def pairwise_iou(a: Tensor, b: Tensor) -> Tensor:
    """[N, 4] x [M, 4] -> [N, M] IoU in the inputs' precision (at least float32); 0 where the union is 0."""
    acc = torch.promote_types(a.dtype, torch.float32)
    a, b = a.to(acc), b.to(acc)
    area_a = (a[:, 2] - a[:, 0]) * (a[:, 3] - a[:, 1])
    area_b = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
    lt = torch.maximum(a[:, None, :2], b[None, :, :2])
    rb = torch.minimum(a[:, None, 2:], b[None, :, 2:])
    wh = (rb - lt).clamp_min(0)
    inter = wh[..., 0] * wh[..., 1]
    union = area_a[:, None] + area_b[None, :] - inter
    return torch.where(union > 0, inter / torch.where(union > 0, union, torch.ones_like(union)), torch.zeros_like(union))


_BLOCK = 256  # boxes decided together: each block against the boxes kept before it, then within itself
_SPLIT_CLASSES = 64  # with idxs of at most this many classes, each class is scanned on its own


def _overlaps(a: Tensor, area_a: Tensor, b: Tensor, area_b: Tensor, iou_threshold: float) -> Tensor:
    """[n, m] IoU(a_i, b_j) > iou_threshold, IoU as pairwise_iou's (a zero union: 0/0 = nan, not
    above any threshold, like pairwise_iou's 0 for a threshold in [0, 1])."""
    lt = torch.maximum(a[:, None, :2], b[None, :, :2])
    rb = torch.minimum(a[:, None, 2:], b[None, :, 2:])
    wh = (rb - lt).clamp_min(0)
    inter = wh[..., 0] * wh[..., 1]
    return inter / (area_a[:, None] + area_b[None, :] - inter) > iou_threshold


def _within(over: Tensor, alive: Tensor) -> Tensor:
    """The greedy scan of one block: over [b, b] (row i suppresses column j > i), alive [b] the boxes
    no earlier block removed -> kept [b]. Iterates kept = alive & not suppressed by a kept box: box i's
    value is final once those before it are, so this reaches the greedy result in at most b rounds,
    and it stops at the first fixed point, which is unique (each value is fixed by the earlier ones)."""
    by = over.t().to(torch.float32)  # [j, i]: how many kept boxes suppress j, by a matrix-vector product (exact counts)
    kept = alive
    while True:
        nxt = alive & (torch.mv(by, kept.to(torch.float32)) == 0)
        if torch.equal(nxt, kept):
            return kept
        kept = nxt


def _scan(b: Tensor, c: Optional[Tensor], iou_threshold: float) -> Tensor:
    """Positions kept among boxes b [n, 4] already in the visiting order (c: their classes or None)."""
    n = b.shape[0]
    area = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
    kept_at = []
    kept_boxes, kept_area = b[:0], area[:0]
    kept_cls = c[:0] if c is not None else torch.zeros(0, dtype=torch.int64, device=b.device)
    for lo in range(0, n, _BLOCK):
        hi = min(n, lo + _BLOCK)
        bb, ba = b[lo:hi], area[lo:hi]
        alive = torch.ones(hi - lo, dtype=torch.bool, device=b.device)
        if kept_boxes.shape[0]:
            hit = _overlaps(bb, ba, kept_boxes, kept_area, iou_threshold)
            if c is not None:
                hit &= c[lo:hi, None] == kept_cls[None, :]
            alive = ~hit.any(1)
        over = _overlaps(bb, ba, bb, ba, iou_threshold)
        if c is not None:
            over &= c[lo:hi, None] == c[None, lo:hi]
        at = torch.nonzero(_within(over.triu(1), alive)).squeeze(1)
        kept_at.append(at + lo)
        if hi < n:
            kept_boxes, kept_area = torch.cat([kept_boxes, bb[at]]), torch.cat([kept_area, ba[at]])
            if c is not None:
                kept_cls = torch.cat([kept_cls, c[lo:hi][at]])
    return torch.cat(kept_at)


def nms(boxes: Tensor, scores: Tensor, iou_threshold: float, idxs: Optional[Tensor]) -> Tensor:
    """The greedy scan by blocks of the visiting order: a block's boxes are compared with the boxes
    kept so far (not with every earlier box), then among themselves; with few classes, each class
    on its own. The same result as the box by box scan."""
    order = sorted_order(scores)
    n = order.numel()
    if n == 0:
        return order.to(torch.int64)
    b = boxes[order].to(torch.promote_types(boxes.dtype, torch.float32))
    if idxs is None:
        return order[_scan(b, None, iou_threshold)]
    c = idxs[order]
    classes, counts = torch.unique(c, return_counts=True)
    if classes.numel() > _SPLIT_CLASSES:
        return order[_scan(b, c, iou_threshold)]
    by_class = torch.sort(c, stable=True).indices  # each class's positions, in the visiting order
    kept, start = [], 0
    for count in counts.tolist():
        at = by_class[start : start + count]
        start += count
        kept.append(at[_scan(b[at], None, iou_threshold)])
    return order[torch.sort(torch.cat(kept)).values]  # back in the visiting order
