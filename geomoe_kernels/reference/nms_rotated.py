"""Greedy non-maximum suppression of rotated boxes: visit the boxes by decreasing score (ties by
index, a stable sort), keep a box unless a kept box of the same class overlaps it with IoU >
iou_threshold. Returns the kept boxes' indices (int64), by decreasing score.

The IoU comes from box_iou_rotated's reference (float64), for the pairs of one class whose
enclosing boxes meet. The boxes go in blocks of BLOCK by score: a block's boxes are first checked
against the boxes kept so far, then those left are walked greedily over their own overlap matrix.
The pairs clipped are then about (boxes x kept) plus the survivors' pairs within a block, not all
N^2 / 2 pairs: at a detector's test time (thousands of candidates, rotated NMS 0.1, tens kept)
most boxes fall to an earlier kept box."""

from typing import List, Optional

import torch
from torch import Tensor

from .box_iou_rotated import candidate_pairs, pair_iou_chunked

BLOCK = 128  # boxes a block


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


def suppressed_by(
    kept: Tensor, kept_idxs: Optional[Tensor], boxes: Tensor, idxs: Optional[Tensor], iou_threshold: float
) -> Tensor:
    """[n] bool: some box of `kept` (of the same class where idxs are given) overlaps boxes[j] above
    the threshold."""
    out = torch.zeros(boxes.shape[0], dtype=torch.bool, device=boxes.device)
    if kept.shape[0] == 0 or boxes.shape[0] == 0:
        return out
    ij = candidate_pairs(kept, boxes)
    if kept_idxs is not None and idxs is not None:
        ij = ij[kept_idxs[ij[:, 0]] == idxs[ij[:, 1]]]
    hit = pair_iou_chunked(kept[ij[:, 0]], boxes[ij[:, 1]]) > iou_threshold
    out[ij[hit, 1]] = True
    return out


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
    b = boxes[order].double()
    c = None if idxs is None else idxs[order]
    kept: List[Tensor] = []  # positions in score order
    for lo in range(0, b.shape[0], BLOCK):
        blk, cb = b[lo : lo + BLOCK], None if c is None else c[lo : lo + BLOCK]
        k = torch.cat(kept) if kept else order.new_zeros(0)
        gone = suppressed_by(b[k], None if c is None else c[k], blk, cb, iou_threshold)
        alive = torch.nonzero(~gone).view(-1)
        if alive.numel():
            over = overlaps(blk[alive], None if cb is None else cb[alive], iou_threshold)
            kept.append(lo + alive[greedy(over)])
    return order[torch.cat(kept)] if kept else order[:0]
