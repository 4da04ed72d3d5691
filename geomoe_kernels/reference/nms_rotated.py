"""Greedy non-maximum suppression of rotated boxes: visit the boxes by decreasing score (ties by
index, a stable sort), keep a box unless a kept box of the same class overlaps it with IoU >
iou_threshold. Returns the kept boxes' indices (int64), by decreasing score.

The IoU of every pair comes from box_iou_rotated's reference (float64); the greedy pass is then a
walk over the boolean overlap matrix, one row per kept box."""

from typing import Optional

import torch
from torch import Tensor

from .box_iou_rotated import box_iou_rotated


def overlaps(boxes: Tensor, idxs: Optional[Tensor], iou_threshold: float) -> Tensor:
    """[N, N] bool: box i would suppress box j (IoU above the threshold, same class where idxs is given)."""
    over = box_iou_rotated(boxes.double(), boxes.double()) > iou_threshold
    if idxs is not None:
        over &= idxs[:, None] == idxs[None, :]
    return over


def greedy(over: Tensor) -> Tensor:
    """The positions kept by the greedy pass over an [N, N] overlap matrix of boxes sorted by score."""
    removed = torch.zeros(over.shape[0], dtype=torch.bool, device=over.device)
    keep = []
    for i in range(over.shape[0]):
        if not removed[i]:
            keep.append(i)
            removed |= over[i]
    return torch.tensor(keep, dtype=torch.int64, device=over.device)


def nms_rotated(boxes: Tensor, scores: Tensor, iou_threshold: float, idxs: Optional[Tensor]) -> Tensor:
    order = torch.sort(scores.double(), descending=True, stable=True).indices
    if order.numel() == 0:
        return order
    by_score = boxes[order]
    over = overlaps(by_score, None if idxs is None else idxs[order], iou_threshold)
    return order[greedy(over)]
