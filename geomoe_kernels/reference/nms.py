"""Non-maximum suppression in torchvision's conventions, in plain PyTorch.

Boxes are (x1, y1, x2, y2) with x1 <= x2, y1 <= y2; area (x2 - x1) * (y2 - y1) (no +1). Boxes are
visited by decreasing score, ties by increasing index (a stable sort); a box is kept unless a kept
box of the same class (all one class when idxs is None) overlaps it with IoU > iou_threshold
(strictly). IoU of two boxes whose union is empty (both degenerate) is 0. The result: int64
indices into the input of the kept boxes, by decreasing score (ties: lower index first)."""

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


def nms(boxes: Tensor, scores: Tensor, iou_threshold: float, idxs: Optional[Tensor]) -> Tensor:
    order = sorted_order(scores)
    n = order.numel()
    if n == 0:
        return order.to(torch.int64)
    b = boxes[order]
    over = pairwise_iou(b, b) > iou_threshold
    if idxs is not None:
        c = idxs[order]
        over &= c[:, None] == c[None, :]
    over = over.triu(1)  # a box suppresses only those after it in the visiting order
    # the greedy scan on the host, each row of `over` packed into a Python integer (bit j: box j)
    pad = (-n) % 8
    bits = torch.nn.functional.pad(over, (0, pad)).reshape(n, -1, 8).to(torch.int32)
    packed = (bits << torch.arange(8, device=bits.device, dtype=torch.int32)).sum(-1).to(torch.uint8).cpu()
    removed, keep = 0, []
    for i, row in enumerate(packed.tolist()):
        if not (removed >> i) & 1:
            keep.append(i)
            removed |= int.from_bytes(bytes(row), "little")
    return order[torch.tensor(keep, dtype=torch.int64, device=order.device)]
