"""Triton kernels of the rotated-box ops (box_iou_rotated, nms_rotated, roi_align_rotated).

IoU: one program per tile of pairs, the Green's-theorem clipping of reference/box_iou_rotated.py
(each edge of one box clipped against the other's four half-planes, no polygon built or sorted),
coordinates relative to the first box's centre and scaled to the pair's largest side (huge
boxes' areas stay finite), pairs whose enclosing boxes do not meet 0 outright. Two edges count
as parallel when |cross| is below 1e-6 of the product of their lengths: then the edge is in or
out as a whole, which decides identical boxes and shared sides the same way whatever rounding (or
fused multiply-adds) the compiler chose; a nearly parallel edge misjudged so moves the area by at
most its length times 1e-6 of it.

RoIAlign's adaptive grid is bounded as the reference's (MAX_GRID samples a bin side).

NMS: the same arithmetic writes a bit matrix (box i overlaps box j above the threshold, same
class), 32 columns to a word, in the layout of nms's; nms's one-program scan then walks it.

RoIAlign: forward one program per (roi, bins, channels), its samples summed in a fixed order;
backward atomic adds into a float32 gradient (see ops/roi_align_rotated.py for determinism)."""

import math
from typing import List, Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from ..reference.roi_align_rotated import MAX_GRID
from ..reference.roi_align_rotated import roi_align_rotated_backward as _deterministic_backward
from ._config import INTERPRET
from . import kernel, rows_reason
from .nms import MAX_BOXES, _suppress_kernel

WHO = "the Triton rotated-box kernels"
# pairs per program: rows x 32 columns (one word of NMS bits). A pair keeps ~100 float32 values live:
# 8 x 32 on 4 warps is 2 pairs a thread, no spills at sm_90 (64 x 64 spilled 11 KB a thread in the
# offline compile), 16 x 32 still 240 B; the interpreter's cost is per operation, so it takes large tiles
IOU_ROWS = 64 if INTERPRET else 8
IOU_COLS = 64 if INTERPRET else 32
WORD = 32  # suppression bits per word
ROI_BINS = 16 if INTERPRET else 64
ROI_CHANNELS = 4 if INTERPRET else 32
_MAX_GRID: tl.constexpr = tl.constexpr(float(MAX_GRID))  # adaptive samples per bin side at most, as the reference


@triton.jit
def _clip(t0, t1, ok, px, py, dx, dy, ox, oy, ex, ey, CLOSED: tl.constexpr):
    """Narrows [t0, t1] of the edge p + t d to the half-plane left of the line o + s e."""
    a = ex * (py - oy) - ey * (px - ox)
    b = ex * dy - ey * dx
    scale = tl.sqrt(ex * ex + ey * ey) * tl.sqrt(dx * dx + dy * dy)
    parallel = tl.abs(b) <= 1e-6 * scale
    t = -a / tl.where(parallel, 1.0, b)
    t0 = tl.where(~parallel & (b > 0), tl.maximum(t0, t), t0)
    t1 = tl.where(~parallel & (b < 0), tl.minimum(t1, t), t1)
    if CLOSED:  # on the other box's line: inside only when running its way (a shared side)
        on_line = tl.abs(a) <= 1e-6 * scale
        inside = ((a > 0) & ~on_line) | (on_line & (ex * dx + ey * dy > 0))
    else:  # decided from the closed pass's number for this pair of edges, so the two passes agree
        on_line = tl.abs(dx * (oy - py) - dy * (ox - px)) <= 1e-6 * scale
        inside = (a > 0) & ~on_line
    ok = ok & (~parallel | inside)
    return t0, t1, ok


@triton.jit
def _edge_inside(px, py, qx, qy, c0x, c0y, c1x, c1y, c2x, c2y, c3x, c3y, CLOSED: tl.constexpr):
    """cross(start, end) / 2 of the part of edge p -> q inside the quadrilateral c0..c3."""
    dx, dy = qx - px, qy - py
    t0 = tl.zeros_like(px)
    t1 = tl.zeros_like(px) + 1.0
    ok = px == px  # true, and false for NaN
    t0, t1, ok = _clip(t0, t1, ok, px, py, dx, dy, c0x, c0y, c1x - c0x, c1y - c0y, CLOSED)
    t0, t1, ok = _clip(t0, t1, ok, px, py, dx, dy, c1x, c1y, c2x - c1x, c2y - c1y, CLOSED)
    t0, t1, ok = _clip(t0, t1, ok, px, py, dx, dy, c2x, c2y, c3x - c2x, c3y - c2y, CLOSED)
    t0, t1, ok = _clip(t0, t1, ok, px, py, dx, dy, c3x, c3y, c0x - c3x, c0y - c3y, CLOSED)
    length = tl.where(ok, tl.maximum(t1 - t0, 0.0), 0.0)
    return length * (px * dy - py * dx) * 0.5


@triton.jit
def _pair_iou(B1, B2, rows, cols, N, M, COMPUTE: tl.constexpr):
    """IoU [rows, cols] of boxes B1[rows] and B2[cols] (NaN where a box is not finite)."""
    mr, mc = rows < N, cols < M
    cx1 = tl.load(B1 + rows * 5 + 0, mask=mr, other=0.0).to(COMPUTE)[:, None]
    cy1 = tl.load(B1 + rows * 5 + 1, mask=mr, other=0.0).to(COMPUTE)[:, None]
    w1 = tl.load(B1 + rows * 5 + 2, mask=mr, other=0.0).to(COMPUTE)[:, None]
    h1 = tl.load(B1 + rows * 5 + 3, mask=mr, other=0.0).to(COMPUTE)[:, None]
    a1 = tl.load(B1 + rows * 5 + 4, mask=mr, other=0.0).to(COMPUTE)[:, None]
    cx2 = tl.load(B2 + cols * 5 + 0, mask=mc, other=0.0).to(COMPUTE)[None, :]
    cy2 = tl.load(B2 + cols * 5 + 1, mask=mc, other=0.0).to(COMPUTE)[None, :]
    w2 = tl.load(B2 + cols * 5 + 2, mask=mc, other=0.0).to(COMPUTE)[None, :]
    h2 = tl.load(B2 + cols * 5 + 3, mask=mc, other=0.0).to(COMPUTE)[None, :]
    a2 = tl.load(B2 + cols * 5 + 4, mask=mc, other=0.0).to(COMPUTE)[None, :]
    # half-axes (width along (cos, sin), height along (-sin, cos)); box 1's centre is the origin, and the
    # pair is scaled to its largest side (IoU does not change): w h of huge boxes would overflow
    zero = cx1 * 0.0 + cx2 * 0.0  # [rows, cols] (a sum first could overflow to inf, and inf * 0 is NaN)
    size = tl.maximum(zero + tl.maximum(tl.abs(w1), tl.abs(h1)), zero + tl.maximum(tl.abs(w2), tl.abs(h2)))
    scale = tl.where((size > 0) & (size < float("inf")), 1.0 / tl.where(size > 0, size, 1.0), 1.0)
    w1, h1, w2, h2 = w1 * scale, h1 * scale, w2 * scale, h2 * scale
    c1, s1 = tl.cos(a1), tl.sin(a1)
    ux1, uy1, vx1, vy1 = zero + w1 * c1 * 0.5, zero + w1 * s1 * 0.5, zero - h1 * s1 * 0.5, zero + h1 * c1 * 0.5
    c2, s2 = tl.cos(a2), tl.sin(a2)
    ux2, uy2, vx2, vy2 = zero + w2 * c2 * 0.5, zero + w2 * s2 * 0.5, zero - h2 * s2 * 0.5, zero + h2 * c2 * 0.5
    dx, dy = (cx2 - cx1) * scale, (cy2 - cy1) * scale
    # only boxes whose enclosing boxes meet can overlap (as the reference's candidate pairs); the rest are
    # 0 without clipping (their scaled distance can be inf: inf - inf is NaN)
    meet = tl.abs(dx) <= (tl.abs(ux1) + tl.abs(vx1)) + (tl.abs(ux2) + tl.abs(vx2))
    meet = meet & (tl.abs(dy) <= (tl.abs(uy1) + tl.abs(vy1)) + (tl.abs(uy2) + tl.abs(vy2)))
    p0x, p0y, p1x, p1y = -ux1 - vx1, -uy1 - vy1, ux1 - vx1, uy1 - vy1
    p2x, p2y, p3x, p3y = ux1 + vx1, uy1 + vy1, -ux1 + vx1, -uy1 + vy1
    q0x, q0y, q1x, q1y = dx - ux2 - vx2, dy - uy2 - vy2, dx + ux2 - vx2, dy + uy2 - vy2
    q2x, q2y, q3x, q3y = dx + ux2 + vx2, dy + uy2 + vy2, dx - ux2 + vx2, dy - uy2 + vy2
    inter = _edge_inside(p0x, p0y, p1x, p1y, q0x, q0y, q1x, q1y, q2x, q2y, q3x, q3y, True)
    inter += _edge_inside(p1x, p1y, p2x, p2y, q0x, q0y, q1x, q1y, q2x, q2y, q3x, q3y, True)
    inter += _edge_inside(p2x, p2y, p3x, p3y, q0x, q0y, q1x, q1y, q2x, q2y, q3x, q3y, True)
    inter += _edge_inside(p3x, p3y, p0x, p0y, q0x, q0y, q1x, q1y, q2x, q2y, q3x, q3y, True)
    inter += _edge_inside(q0x, q0y, q1x, q1y, p0x, p0y, p1x, p1y, p2x, p2y, p3x, p3y, False)
    inter += _edge_inside(q1x, q1y, q2x, q2y, p0x, p0y, p1x, p1y, p2x, p2y, p3x, p3y, False)
    inter += _edge_inside(q2x, q2y, q3x, q3y, p0x, p0y, p1x, p1y, p2x, p2y, p3x, p3y, False)
    inter += _edge_inside(q3x, q3y, q0x, q0y, p0x, p0y, p1x, p1y, p2x, p2y, p3x, p3y, False)
    area1, area2 = zero + w1 * h1, zero + w2 * h2
    inter = tl.minimum(tl.maximum(inter, 0.0), tl.minimum(area1, area2))
    valid = (w1 > 0) & (h1 > 0) & (w2 > 0) & (h2 > 0)
    iou = tl.where(valid & meet, inter / tl.where(valid, area1 + area2 - inter, 1.0), 0.0)
    finite1 = (tl.abs(cx1) < float("inf")) & (tl.abs(cy1) < float("inf")) & (tl.abs(w1) < float("inf"))
    finite1 = finite1 & (tl.abs(h1) < float("inf")) & (tl.abs(a1) < float("inf"))
    finite2 = (tl.abs(cx2) < float("inf")) & (tl.abs(cy2) < float("inf")) & (tl.abs(w2) < float("inf"))
    finite2 = finite2 & (tl.abs(h2) < float("inf")) & (tl.abs(a2) < float("inf"))
    return tl.where(finite1 & finite2, iou, float("nan"))


@triton.jit
def _iou_kernel(B1, B2, Out, N, M, COMPUTE: tl.constexpr, BN: tl.constexpr, BM: tl.constexpr):
    rows = tl.program_id(0) * BN + tl.arange(0, BN).to(tl.int64)
    cols = tl.program_id(1) * BM + tl.arange(0, BM).to(tl.int64)
    iou = _pair_iou(B1, B2, rows, cols, N, M, COMPUTE)
    mask = (rows < N)[:, None] & (cols < M)[None, :]
    tl.store(Out + rows[:, None] * M + cols[None, :], iou.to(Out.dtype.element_ty), mask=mask)


@triton.jit
def _overlap_bits_kernel(
    Boxes, Classes, Bits, N, WORDS, Threshold, HAS_CLASSES: tl.constexpr, COMPUTE: tl.constexpr, BN: tl.constexpr
):
    """Bits[i, w] bit b: box i overlaps box 32 w + b above the threshold (same class), j > i."""
    rows = tl.program_id(0) * BN + tl.arange(0, BN).to(tl.int64)
    word = tl.program_id(1)
    cols = word * 32 + tl.arange(0, 32).to(tl.int64)
    iou = _pair_iou(Boxes, Boxes, rows, cols, N, N, COMPUTE)
    over = (iou > tl.load(Threshold)) & (cols[None, :] > rows[:, None]) & (cols < N)[None, :]
    if HAS_CLASSES:
        ci = tl.load(Classes + rows, mask=rows < N, other=-1)
        cj = tl.load(Classes + cols, mask=cols < N, other=-2)
        over = over & (ci[:, None] == cj[None, :])
    bits = tl.sum(over.to(tl.int32) << tl.arange(0, 32)[None, :], axis=1)  # distinct bits: the sum is the OR
    tl.store(Bits + rows * WORDS + word, bits, mask=rows < N)


def _compute_dtype(t: Tensor):
    return tl.float64 if t.dtype == torch.float64 else tl.float32


def box_iou_rotated(boxes1: Tensor, boxes2: Tensor) -> Tensor:
    N, M = boxes1.shape[0], boxes2.shape[0]
    out = torch.empty(N, M, dtype=boxes1.dtype, device=boxes1.device)
    if N and M:
        grid = (triton.cdiv(N, IOU_ROWS), triton.cdiv(M, IOU_COLS))
        _iou_kernel[grid](boxes1, boxes2, out, N, M, COMPUTE=_compute_dtype(boxes1), BN=IOU_ROWS, BM=IOU_COLS)
    return out


def nms_rotated(boxes: Tensor, scores: Tensor, iou_threshold: float, idxs: Optional[Tensor]) -> Tensor:
    N = boxes.shape[0]
    order = torch.sort(scores, descending=True, stable=True).indices
    if N == 0:
        return order
    words = triton.cdiv(N, WORD)
    by_score = boxes.index_select(0, order).contiguous()
    classes = idxs.index_select(0, order).contiguous() if idxs is not None else order
    bits = torch.empty(N, words, dtype=torch.int32, device=boxes.device)
    # in the compute dtype from memory: a float argument would reach the kernel as float32
    threshold = torch.full(
        (1,), iou_threshold, dtype=torch.float64 if boxes.dtype == torch.float64 else torch.float32, device=boxes.device
    )
    grid = (triton.cdiv(N, IOU_ROWS), words)
    _overlap_bits_kernel[grid](
        by_score, classes, bits, N, words, threshold, HAS_CLASSES=idxs is not None, COMPUTE=_compute_dtype(boxes), BN=IOU_ROWS
    )
    keep = torch.empty(N, dtype=torch.int8, device=boxes.device)
    _suppress_kernel[(1,)](bits, keep, N, words, W_POW2=triton.next_power_of_2(words))  # nms's scan
    return order[keep.nonzero().view(-1)]  # the op's one wait for the device: the output's length


@triton.jit
def _roi_geometry(Rois, k, spatial_scale, sampling_ratio, PH, PW, B, ALIGNED: tl.constexpr, CLOCKWISE: tl.constexpr):
    """Roi k: (valid, image, centre x, y, width, height, cos, sin, samples per side gh, gw)."""
    r = Rois + k * 6
    b = tl.load(r + 0).to(tl.float32)
    cx = tl.load(r + 1).to(tl.float32) * spatial_scale
    cy = tl.load(r + 2).to(tl.float32) * spatial_scale
    w = tl.load(r + 3).to(tl.float32) * spatial_scale
    h = tl.load(r + 4).to(tl.float32) * spatial_scale
    theta = tl.load(r + 5).to(tl.float32)
    if CLOCKWISE:
        theta = -theta
    if ALIGNED:
        cx -= 0.5
        cy -= 0.5
    else:
        w = tl.maximum(w, 1.0)
        h = tl.maximum(h, 1.0)
    inf = float("inf")
    finite = (tl.abs(cx) < inf) & (tl.abs(cy) < inf) & (tl.abs(w) < inf) & (tl.abs(h) < inf) & (tl.abs(theta) < inf)
    valid = finite & (b >= 0) & (b < B) & (b == tl.floor(b))
    if sampling_ratio > 0:
        gh = sampling_ratio
        gw = sampling_ratio
    else:
        gh = tl.minimum(tl.maximum(tl.ceil(h / PH), 0.0), _MAX_GRID).to(tl.int32)  # bounded: a huge roi's loop
        gw = tl.minimum(tl.maximum(tl.ceil(w / PW), 0.0), _MAX_GRID).to(tl.int32)
    gh = tl.where(valid, gh, 0)
    gw = tl.where(valid, gw, 0)
    return valid, tl.where(valid, b, 0.0).to(tl.int64), cx, cy, w, h, tl.cos(theta), tl.sin(theta), gh, gw


@triton.jit
def _bilinear(y, x, H, W):
    """Four (flat index, weight) pairs per sample: weight 0 more than a pixel outside the map."""
    outside = (y < -1.0) | (y > H) | (x < -1.0) | (x > W)
    y = tl.maximum(y, 0.0)
    x = tl.maximum(x, 0.0)
    y_low = tl.minimum(tl.floor(y), H - 1.0)
    x_low = tl.minimum(tl.floor(x), W - 1.0)
    y = tl.where(y_low >= H - 1, y_low, y)
    x = tl.where(x_low >= W - 1, x_low, x)
    y_high = tl.minimum(y_low + 1.0, H - 1.0)
    x_high = tl.minimum(x_low + 1.0, W - 1.0)
    ly, lx = y - y_low, x - x_low
    hy, hx = 1.0 - ly, 1.0 - lx
    keep = tl.where(outside, 0.0, 1.0)
    yl, yh = y_low.to(tl.int64), y_high.to(tl.int64)
    xl, xh = x_low.to(tl.int64), x_high.to(tl.int64)
    return yl * W + xl, yl * W + xh, yh * W + xl, yh * W + xh, hy * hx * keep, hy * lx * keep, ly * hx * keep, ly * lx * keep


@triton.jit
def _sample(iy, ix, gh, gw, ph, pw, bin_h, bin_w, h, w, cos, sin, cx, cy, H, W):
    """Sample (iy, ix) of each bin (ph, pw): placed in the roi's frame, turned, and its four
    neighbours with their weights (_bilinear)."""
    yy = -h / 2 + ph * bin_h + (iy + 0.5) * bin_h / gh
    xx = -w / 2 + pw * bin_w + (ix + 0.5) * bin_w / gw
    return _bilinear(yy * cos - xx * sin + cy, yy * sin + xx * cos + cx, H, W)


@triton.jit
def _roi_align_rotated_kernel(
    X, Rois, Out, B, C, H, W, PH, PW, spatial_scale, sampling_ratio,
    ALIGNED: tl.constexpr, CLOCKWISE: tl.constexpr, BP: tl.constexpr, BC: tl.constexpr,
):  # fmt: skip
    k = tl.program_id(0).to(tl.int64)
    bins = tl.program_id(1) * BP + tl.arange(0, BP)
    c = tl.program_id(2) * BC + tl.arange(0, BC).to(tl.int64)
    mb, mc = bins < PH * PW, c < C
    valid, b, cx, cy, w, h, cos, sin, gh, gw = _roi_geometry(
        Rois, k, spatial_scale, sampling_ratio, PH, PW, B, ALIGNED, CLOCKWISE
    )
    ph, pw = (bins // PW).to(tl.float32), (bins % PW).to(tl.float32)
    bin_h, bin_w = h / PH, w / PW
    plane = X + b * C * H * W + c[:, None] * H * W
    mask = mc[:, None] & mb[None, :]
    acc = tl.zeros((BC, BP), dtype=tl.float32)
    for iy in range(gh):
        for ix in range(gw):
            i1, i2, i3, i4, w1, w2, w3, w4 = _sample(iy, ix, gh, gw, ph, pw, bin_h, bin_w, h, w, cos, sin, cx, cy, H, W)
            acc += w1[None, :] * tl.load(plane + i1[None, :], mask=mask, other=0.0).to(tl.float32)
            acc += w2[None, :] * tl.load(plane + i2[None, :], mask=mask, other=0.0).to(tl.float32)
            acc += w3[None, :] * tl.load(plane + i3[None, :], mask=mask, other=0.0).to(tl.float32)
            acc += w4[None, :] * tl.load(plane + i4[None, :], mask=mask, other=0.0).to(tl.float32)
    count = tl.maximum(gh * gw, 1).to(tl.float32)
    out = tl.where(valid, acc / count, float("nan"))
    dst = Out + k * C * PH * PW + c[:, None] * PH * PW + bins[None, :]
    tl.store(dst, out.to(Out.dtype.element_ty), mask=mask)


@triton.jit
def _roi_align_rotated_backward_kernel(
    G, Rois, DX, B, C, H, W, PH, PW, spatial_scale, sampling_ratio,
    ALIGNED: tl.constexpr, CLOCKWISE: tl.constexpr, BP: tl.constexpr, BC: tl.constexpr,
):  # fmt: skip
    k = tl.program_id(0).to(tl.int64)
    bins = tl.program_id(1) * BP + tl.arange(0, BP)
    c = tl.program_id(2) * BC + tl.arange(0, BC).to(tl.int64)
    mb, mc = bins < PH * PW, c < C
    valid, b, cx, cy, w, h, cos, sin, gh, gw = _roi_geometry(
        Rois, k, spatial_scale, sampling_ratio, PH, PW, B, ALIGNED, CLOCKWISE
    )
    mask = mc[:, None] & mb[None, :]  # an invalid roi has no samples (gh = gw = 0): nothing is added
    count = tl.maximum(gh * gw, 1).to(tl.float32)
    g = tl.load(G + k * C * PH * PW + c[:, None] * PH * PW + bins[None, :], mask=mask, other=0.0).to(tl.float32) / count
    ph, pw = (bins // PW).to(tl.float32), (bins % PW).to(tl.float32)
    bin_h, bin_w = h / PH, w / PW
    plane = DX + b * C * H * W + c[:, None] * H * W
    for iy in range(gh):
        for ix in range(gw):
            i1, i2, i3, i4, w1, w2, w3, w4 = _sample(iy, ix, gh, gw, ph, pw, bin_h, bin_w, h, w, cos, sin, cx, cy, H, W)
            tl.atomic_add(plane + i1[None, :], w1[None, :] * g, mask=mask)
            tl.atomic_add(plane + i2[None, :], w2[None, :] * g, mask=mask)
            tl.atomic_add(plane + i3[None, :], w3[None, :] * g, mask=mask)
            tl.atomic_add(plane + i4[None, :], w4[None, :] * g, mask=mask)


def _roi_grid(rois: Tensor, C: int, PH: int, PW: int):
    return (rois.shape[0], triton.cdiv(PH * PW, ROI_BINS), triton.cdiv(C, ROI_CHANNELS))


def roi_align_rotated(
    input: Tensor, rois: Tensor, output_size: List[int], spatial_scale: float, sampling_ratio: int, aligned: bool, clockwise: bool
) -> Tensor:
    B, C, H, W = input.shape
    PH, PW = output_size
    out = torch.empty(rois.shape[0], C, PH, PW, dtype=input.dtype, device=input.device)
    if rois.shape[0] and C:
        _roi_align_rotated_kernel[_roi_grid(rois, C, PH, PW)](
            input, rois, out, B, C, H, W, PH, PW, float(spatial_scale), int(sampling_ratio),
            ALIGNED=aligned, CLOCKWISE=clockwise, BP=ROI_BINS, BC=ROI_CHANNELS,
        )  # fmt: skip
    return out


def roi_align_rotated_backward(
    grad_out: Tensor,
    rois: Tensor,
    input_shape: List[int],
    spatial_scale: float,
    sampling_ratio: int,
    aligned: bool,
    clockwise: bool,
) -> Tensor:
    if torch.are_deterministic_algorithms_enabled():  # a fixed order of sums: the sparse product
        return _deterministic_backward(grad_out, rois, input_shape, spatial_scale, sampling_ratio, aligned, clockwise)
    B, C, H, W = input_shape
    K, _, PH, PW = grad_out.shape
    grad = torch.zeros(B, C, H, W, dtype=torch.float32, device=grad_out.device)
    if K and C:
        _roi_align_rotated_backward_kernel[_roi_grid(rois, C, PH, PW)](
            grad_out, rois, grad, B, C, H, W, PH, PW, float(spatial_scale), int(sampling_ratio),
            ALIGNED=aligned, CLOCKWISE=clockwise, BP=ROI_BINS, BC=ROI_CHANNELS,
        )  # fmt: skip
    return grad.to(grad_out.dtype)


MAX_COLUMN_WORDS = 65535  # the grid's second axis: IoU column tiles of 32, NMS words of 32


def _boxes_reason(boxes: Tensor, boxes2: Optional[Tensor] = None, **_) -> Optional[str]:
    if boxes.dtype not in (torch.float32, torch.float64):
        return f"{WHO} take float32 or float64 boxes, got {boxes.dtype}"
    if boxes2 is None and boxes.shape[0] > MAX_BOXES:  # NMS: the scan keeps a bit per box in registers
        return f"{WHO} take at most {MAX_BOXES} boxes to suppress, got {boxes.shape[0]}"
    n = (boxes2 if boxes2 is not None else boxes).shape[0]
    if n > 32 * MAX_COLUMN_WORDS:
        return f"{WHO} take at most {32 * MAX_COLUMN_WORDS} boxes in a column (the grid's second axis), got {n}"
    return None


def _example(dtype) -> None:
    """Detector-sized calls: 2,000 proposals against 100 boxes; NMS over 2,000; 512 rois of a 7 x 7 pool
    over 256 channels of a 200 x 200 map (the published Oriented R-CNN's RoI head at 800 px)."""
    g = torch.Generator().manual_seed(0)
    u = torch.rand(2000, 5, generator=g)
    boxes = torch.stack([u[:, 0] * 800, u[:, 1] * 800, 4 + 60 * u[:, 2], 4 + 60 * u[:, 3], (u[:, 4] - 0.5) * math.pi], 1)
    if dtype == torch.float32:
        box_iou_rotated(boxes, boxes[:100].contiguous())
        nms_rotated(boxes, torch.rand(2000, generator=g), 0.1, None)
    x = torch.randn(1, 256, 200, 200).to(dtype)
    rois = torch.cat([torch.zeros(512, 1), boxes[:512] / 4], 1)
    out = roi_align_rotated(x, rois, [7, 7], 0.25, 2, True, True)
    roi_align_rotated_backward(out, rois, list(x.shape), 0.25, 2, True, True)


kernel("box_iou_rotated", lambda boxes1, boxes2, **_: _boxes_reason(boxes1, boxes2), _example)(box_iou_rotated)
kernel("nms_rotated", _boxes_reason, _example)(nms_rotated)
kernel("roi_align_rotated", lambda input, **_: rows_reason(input), _example)(roi_align_rotated)
kernel("roi_align_rotated_backward", lambda grad_out, **_: rows_reason(grad_out), _example)(roi_align_rotated_backward)
