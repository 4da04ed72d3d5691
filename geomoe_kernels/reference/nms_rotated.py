"""Greedy non-maximum suppression of rotated boxes: visit the boxes by decreasing score (ties by
index, a stable sort), keep a box unless a kept box of the same class overlaps it with IoU >
iou_threshold. Returns the kept boxes' indices (int64), by decreasing score.

The IoU comes from box_iou_rotated's reference (float64), for the pairs of one class whose
enclosing boxes meet; the greedy pass is then a walk over the boolean overlap matrix, one row per
kept box."""

from typing import Optional

import torch
from torch import Tensor

from .box_iou_rotated import candidate_pairs, pair_iou_chunked


def overlaps(boxes: Tensor, idxs: Optional[Tensor], iou_threshold: float) -> Tensor:
    """[N, N] bool: box i would suppress box j (j > i, IoU above the threshold, same class where
    idxs is given). Only pairs whose enclosing boxes meet are clipped exactly."""
    b = boxes.double()
    N = b.shape[0]
    ij = candidate_pairs(b, b)
    ij = ij[ij[:, 0] < ij[:, 1]]
    if idxs is not None:
        ij = ij[idxs[ij[:, 0]] == idxs[ij[:, 1]]]
    over = torch.zeros(N, N, dtype=torch.bool, device=boxes.device)
    hit = pair_iou_chunked(b[ij[:, 0]], b[ij[:, 1]]) > iou_threshold
    over[ij[hit, 0], ij[hit, 1]] = True
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
