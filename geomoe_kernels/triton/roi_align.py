"""Triton RoIAlign, forward and a deterministic backward (torchvision's conventions: see
geomoe_kernels.reference.roi_align).

Forward: a program per (RoI, channel block) holds all PH x PW bins x BC channels and walks the
RoI's gh x gw samples (the same grid for every bin of a RoI), gathering the 4 bilinear corners.

Backward without atomics: the bilinear weights of a RoI factor into rows and columns (a sample's
weight at pixel (r, q) is wy(r) * wx(q), and a sample outside [-1, H] or [-1, W] is zero in the
factor of its axis), so d input[b, c, r, q] = sum over RoIs k of image b, bins (ph, pw) of
Ay_k[ph, r] * Ax_k[pw, q] * d out[k, c, ph, pw] / count_k, Ay_k[ph, r] summing the row weights of
bin ph's samples. A program owns a tile of pixels x channels of one image and adds the RoIs that
reach it one after another in index order: every gradient element is written by one program in a
fixed order, so the result has the same bits on every run (float atomics would not)."""

from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from ._config import INTERPRET
from . import kernel, rows_reason

_BC = 16  # channels per program (32 left 8 bytes of local memory a thread in the forward at sm_90)
_TILE = 4 if INTERPRET else 8  # backward: pixel tile TILE x TILE


@triton.jit
def _roi_geometry(Rois, k, scale, sampling, PH: tl.constexpr, PW: tl.constexpr, ALIGNED: tl.constexpr):
    """(batch, x start, y start, bin width, bin height, gw, gh) of RoI k."""
    off = 0.5 if ALIGNED else 0.0
    b = tl.load(Rois + k * 5).to(tl.int32)
    x1 = tl.load(Rois + k * 5 + 1).to(tl.float32) * scale - off
    y1 = tl.load(Rois + k * 5 + 2).to(tl.float32) * scale - off
    rw = tl.load(Rois + k * 5 + 3).to(tl.float32) * scale - off - x1
    rh = tl.load(Rois + k * 5 + 4).to(tl.float32) * scale - off - y1
    if not ALIGNED:
        rw = tl.maximum(rw, 1.0)
        rh = tl.maximum(rh, 1.0)
    bw = rw / PW
    bh = rh / PH
    if sampling > 0:
        gw = sampling
        gh = sampling
    else:
        gw = tl.ceil(bw).to(tl.int32)
        gh = tl.ceil(bh).to(tl.int32)
    return b, x1, y1, bw, bh, gw, gh


@triton.jit
def _axis_weights(pos, extent):
    """Bilinear (low index, high index, low weight, high weight) at pos (any shape), torchvision's
    clamping; both weights 0 outside [-1, extent]."""
    valid = (pos >= -1.0) & (pos <= extent)
    p = tl.maximum(pos, 0.0)
    low = p.to(tl.int32)  # p >= 0: truncation is floor
    top = low >= extent - 1
    low = tl.where(top, extent - 1, low)
    high = tl.where(top, low, low + 1)
    p = tl.where(top, low.to(tl.float32), p)
    frac = p - low.to(tl.float32)
    return low, high, tl.where(valid, 1.0 - frac, 0.0), tl.where(valid, frac, 0.0)


@triton.jit
def _roi_align_fwd_kernel(
    X, Rois, Out, B, C, H, W, scale, sampling,
    PH: tl.constexpr, PW: tl.constexpr, P_POW2: tl.constexpr, ALIGNED: tl.constexpr, BC: tl.constexpr,
):  # fmt: skip
    k = tl.program_id(0)
    c = tl.program_id(1) * BC + tl.arange(0, BC)
    p = tl.arange(0, P_POW2)
    mc, mp = c < C, p < PH * PW
    ph = (p // PW).to(tl.float32)
    pw = (p % PW).to(tl.float32)
    b, x1, y1, bw, bh, gw, gh = _roi_geometry(Rois, k, scale, sampling, PH, PW, ALIGNED)
    # a batch index out of range reads image 0 and gives zeros (where value checks run, they name it)
    inside = ((b >= 0) & (b < B)).to(tl.float32)
    b = tl.where((b >= 0) & (b < B), b, 0)
    plane = X + (b.to(tl.int64) * C + c.to(tl.int64)) * H * W  # [BC] channel planes of image b
    m2 = mp[:, None] & mc[None, :]
    acc = tl.zeros((P_POW2, BC), dtype=tl.float32)
    for iy in range(gh):
        y = y1 + ph * bh + (iy + 0.5) * bh / gh
        yl, yh, wyl, wyh = _axis_weights(y, H)
        for ix in range(gw):
            x = x1 + pw * bw + (ix + 0.5) * bw / gw
            xl, xh, wxl, wxh = _axis_weights(x, W)
            v = tl.load(plane[None, :] + (yl * W + xl)[:, None], mask=m2, other=0.0).to(tl.float32)
            acc += (wyl * wxl)[:, None] * v
            v = tl.load(plane[None, :] + (yl * W + xh)[:, None], mask=m2, other=0.0).to(tl.float32)
            acc += (wyl * wxh)[:, None] * v
            v = tl.load(plane[None, :] + (yh * W + xl)[:, None], mask=m2, other=0.0).to(tl.float32)
            acc += (wyh * wxl)[:, None] * v
            v = tl.load(plane[None, :] + (yh * W + xh)[:, None], mask=m2, other=0.0).to(tl.float32)
            acc += (wyh * wxh)[:, None] * v
    scale_out = inside / tl.maximum(gh * gw, 1).to(tl.float32)  # 0 for an image out of range
    dst = Out + (k.to(tl.int64) * C + c[None, :]) * (PH * PW) + p[:, None]
    tl.store(dst, (acc * scale_out).to(Out.dtype.element_ty), mask=m2)


@triton.jit
def _axis_factor(start, size_bin, grid, bin_idx, idx, extent):
    """sum over the bin's grid samples of the bilinear weight each puts on pixel rows idx [T]."""
    f = tl.zeros(idx.shape, dtype=tl.float32)
    for i in range(grid):
        pos = start + bin_idx * size_bin + (i + 0.5) * size_bin / grid
        low, high, wl, wh = _axis_weights(pos, extent)
        f += tl.where(idx == low, wl, 0.0) + tl.where(idx == high, wh, 0.0)
    return f


@triton.jit
def _roi_align_bwd_kernel(
    G, Rois, DX, K, C, H, W, n_tw, tiles, scale, sampling,
    PH: tl.constexpr, PW: tl.constexpr, ALIGNED: tl.constexpr, T: tl.constexpr, BC: tl.constexpr,
):  # fmt: skip
    img = tl.program_id(0) // tiles
    t = tl.program_id(0) % tiles
    r0 = (t // n_tw) * T
    q0 = (t % n_tw) * T
    rows = r0 + tl.arange(0, T)
    cols = q0 + tl.arange(0, T)
    c = tl.program_id(1) * BC + tl.arange(0, BC)
    mc = c < C
    acc = tl.zeros((T, T, BC), dtype=tl.float32)
    for k in range(K):
        b, x1, y1, bw, bh, gw, gh = _roi_geometry(Rois, k, scale, sampling, PH, PW, ALIGNED)
        # the rows and columns the RoI's samples can reach (clamping keeps them in the map)
        # (an aligned RoI may be inverted, x2 < x1: with a fixed sampling_ratio its samples run back)
        y2 = y1 + bh * PH
        x2 = x1 + bw * PW
        rlo = tl.maximum(tl.floor(tl.minimum(y1, y2)), 0.0) - 1.0
        rhi = tl.minimum(tl.floor(tl.maximum(y1, y2)) + 1.0, H - 1.0)
        qlo = tl.maximum(tl.floor(tl.minimum(x1, x2)), 0.0) - 1.0
        qhi = tl.minimum(tl.floor(tl.maximum(x1, x2)) + 1.0, W - 1.0)
        reach = (b == img) & (rhi >= r0) & (rlo < r0 + T) & (qhi >= q0) & (qlo < q0 + T)
        if reach:
            count = tl.maximum(gh * gw, 1).to(tl.float32)
            gk = G + (k * C + c).to(tl.int64) * (PH * PW)
            for ph in range(PH):
                ay = _axis_factor(y1, bh, gh, ph, rows, H)
                for pw in range(PW):
                    ax = _axis_factor(x1, bw, gw, pw, cols, W)
                    g = tl.load(gk + ph * PW + pw, mask=mc, other=0.0).to(tl.float32) / count
                    acc += (ay[:, None] * ax[None, :])[:, :, None] * g[None, None, :]
    pix = (rows[:, None] * W + cols[None, :])[:, :, None]
    dst = DX + (img.to(tl.int64) * C + c[None, None, :]) * H * W + pix
    m = ((rows[:, None] < H) & (cols[None, :] < W))[:, :, None] & mc[None, None, :]
    tl.store(dst, acc.to(DX.dtype.element_ty), mask=m)


def _reason(input, rois, **_) -> Optional[str]:
    if rois.dtype not in (torch.float32, input.dtype):
        return f"the Triton RoIAlign takes float32 rois or rois in the input's dtype, got {rois.dtype} for {input.dtype}"
    return rows_reason(input)


def _example(dtype) -> None:
    """An FPN level-0 map of a 800 px image and 512 RoIs of 7 x 7 (the RoI head's training batch)."""
    x = torch.randn(1, 256, 200, 200, dtype=dtype)
    xy = torch.rand(512, 2) * 700
    rois = torch.cat([torch.zeros(512, 1), xy, xy + 16 + torch.rand(512, 2) * 100], 1)
    y = roi_align(x, rois, 7, 7, 0.25, 0, True)
    roi_align_backward(y, x, rois, 7, 7, 0.25, 0, True)


@kernel("roi_align", supports=_reason, example=_example)
def roi_align(
    input: Tensor, rois: Tensor, pooled_height: int, pooled_width: int, spatial_scale: float, sampling_ratio: int, aligned: bool
) -> Tensor:
    B, C, H, W = input.shape
    K = rois.shape[0]
    out = input.new_empty(K, C, pooled_height, pooled_width)
    if K and C:
        grid = (K, triton.cdiv(C, _BC))
        _roi_align_fwd_kernel[grid](
            input, rois, out, B, C, H, W, float(spatial_scale), int(sampling_ratio),
            PH=pooled_height, PW=pooled_width, P_POW2=triton.next_power_of_2(pooled_height * pooled_width),
            ALIGNED=bool(aligned), BC=_BC,
        )  # fmt: skip
    return out


@kernel("roi_align_backward", supports=_reason, example=_example)
def roi_align_backward(
    grad_out: Tensor,
    input: Tensor,
    rois: Tensor,
    pooled_height: int,
    pooled_width: int,
    spatial_scale: float,
    sampling_ratio: int,
    aligned: bool,
) -> Tensor:
    B, C, H, W = input.shape
    dx = torch.empty_like(input)
    if dx.numel():
        n_th, n_tw = triton.cdiv(H, _TILE), triton.cdiv(W, _TILE)
        grid = (B * n_th * n_tw, triton.cdiv(C, _BC))
        _roi_align_bwd_kernel[grid](
            grad_out, rois, dx, rois.shape[0], C, H, W, n_tw, n_th * n_tw, float(spatial_scale), int(sampling_ratio),
            PH=pooled_height, PW=pooled_width, ALIGNED=bool(aligned), T=_TILE, BC=_BC,
        )  # fmt: skip
    return dx
