"""Triton NMS: an IoU bitmask kernel and a one-program suppression scan, both on the device.

The boxes are sorted by decreasing score (stable: equal scores by increasing index, as the
reference), then _iou_mask_kernel writes mask[i, w], bit j of 32-bit word w set where box 32w+j
comes after box i in that order, has its class (when idxs is given) and overlaps it with IoU >
threshold. _suppress_kernel walks the boxes in order in one program, the removed boxes' bits in
registers (words of 32 boxes), and marks each box kept unless a kept box removed it. The kept
positions are read back with nonzero: the host sync that sizes the output, the only one."""

from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from . import kernel, rows_reason

BITS = 32
MAX_BOXES = 16384  # the scan keeps ceil(N / 32) words in registers (and N x N bits fit int32 offsets); beyond: the reference
_BI = 32  # rows of the mask per program


@triton.jit
def _iou_mask_kernel(Boxes, Cls, Mask, N, W, thr, HAS_CLS: tl.constexpr, BI: tl.constexpr):
    i = tl.program_id(0) * BI + tl.arange(0, BI)
    w = tl.program_id(1)
    j = w * 32 + tl.arange(0, 32)
    mi, mj = i < N, j < N
    ax1 = tl.load(Boxes + i * 4 + 0, mask=mi, other=0.0).to(tl.float32)
    ay1 = tl.load(Boxes + i * 4 + 1, mask=mi, other=0.0).to(tl.float32)
    ax2 = tl.load(Boxes + i * 4 + 2, mask=mi, other=0.0).to(tl.float32)
    ay2 = tl.load(Boxes + i * 4 + 3, mask=mi, other=0.0).to(tl.float32)
    bx1 = tl.load(Boxes + j * 4 + 0, mask=mj, other=0.0).to(tl.float32)
    by1 = tl.load(Boxes + j * 4 + 1, mask=mj, other=0.0).to(tl.float32)
    bx2 = tl.load(Boxes + j * 4 + 2, mask=mj, other=0.0).to(tl.float32)
    by2 = tl.load(Boxes + j * 4 + 3, mask=mj, other=0.0).to(tl.float32)
    iw = tl.maximum(tl.minimum(ax2[:, None], bx2[None, :]) - tl.maximum(ax1[:, None], bx1[None, :]), 0.0)
    ih = tl.maximum(tl.minimum(ay2[:, None], by2[None, :]) - tl.maximum(ay1[:, None], by1[None, :]), 0.0)
    inter = iw * ih
    area_a = (ax2 - ax1) * (ay2 - ay1)
    area_b = (bx2 - bx1) * (by2 - by1)
    union = area_a[:, None] + area_b[None, :] - inter
    iou = tl.where(union > 0, inter / tl.where(union > 0, union, 1.0), 0.0)
    hit = (iou > thr) & (j[None, :] > i[:, None]) & mj[None, :] & mi[:, None]
    if HAS_CLS:
        ci = tl.load(Cls + i, mask=mi, other=0)
        cj = tl.load(Cls + j, mask=mj, other=0)
        hit = hit & (ci[:, None] == cj[None, :])
    bit = tl.arange(0, 32)
    words = tl.sum(tl.where(hit, 1 << bit[None, :], 0), axis=1)  # distinct powers of two: the sum is the OR
    tl.store(Mask + i.to(tl.int64) * W + w, words, mask=mi)


@triton.jit
def _suppress_kernel(Mask, Keep, N, W, W_POW2: tl.constexpr):
    w = tl.arange(0, W_POW2)
    removed = tl.zeros((W_POW2,), dtype=tl.int32)
    for i in range(N):
        word = tl.sum(tl.where(w == i // 32, removed, 0))
        alive = ((word >> (i % 32)) & 1) == 0
        row = tl.load(Mask + i * W + w, mask=w < W, other=0)
        removed = removed | tl.where(alive, row, 0)
        tl.store(Keep + i, alive.to(tl.int8))


def _reason(boxes, idxs, **_) -> Optional[str]:
    if boxes.shape[0] > MAX_BOXES:
        return f"the Triton NMS takes at most {MAX_BOXES} boxes, got {boxes.shape[0]}"
    return rows_reason(boxes)


def _example(dtype) -> None:
    """The RPN's per-image NMS: 2000 boxes a level, 5 levels as classes."""
    xy = torch.rand(10000, 2) * 700
    boxes = torch.cat([xy, xy + 8 + torch.rand(10000, 2) * 100], 1).to(dtype)
    nms(boxes, torch.rand(10000).to(dtype), 0.7, torch.randint(0, 5, (10000,)))


@kernel("nms", supports=_reason, example=_example)
def nms(boxes: Tensor, scores: Tensor, iou_threshold: float, idxs: Optional[Tensor]) -> Tensor:
    N = boxes.shape[0]
    order = torch.sort(scores, descending=True, stable=True).indices
    if N == 0:
        return order
    b = boxes.index_select(0, order).contiguous()
    cls = idxs.index_select(0, order).contiguous() if idxs is not None else b
    W = triton.cdiv(N, BITS)
    mask = torch.empty(N, W, dtype=torch.int32, device=boxes.device)
    _iou_mask_kernel[(triton.cdiv(N, _BI), W)](b, cls, mask, N, W, float(iou_threshold), HAS_CLS=idxs is not None, BI=_BI)
    keep = torch.empty(N, dtype=torch.int8, device=boxes.device)
    _suppress_kernel[(1,)](mask, keep, N, W, W_POW2=triton.next_power_of_2(W))
    return order.index_select(0, torch.nonzero(keep).squeeze(1))
