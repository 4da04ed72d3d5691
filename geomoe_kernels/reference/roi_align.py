"""RoIAlign in torchvision's conventions, in plain PyTorch, forward and backward.

input [B, C, H, W]; rois [K, 5] rows (batch index, x1, y1, x2, y2) in input-image coordinates,
scaled by spatial_scale (minus 0.5 when aligned). Each of the PH x PW bins of a RoI averages a
gh x gw grid of bilinear samples at the centres of the grid's cells; gh = sampling_ratio when > 0,
else ceil(roi_h / PH) (gw likewise: 0 and -1 are both adaptive). Not aligned, a RoI is at least
1 x 1. A sample outside [-1, H] x [-1, W] reads 0; one inside is clamped to the map (torchvision's
bilinear_interpolate). An empty grid (a zero-height aligned RoI) gives 0.

The samples of each RoI are laid on a grid of the largest gh x gw among the RoIs (smaller grids
masked): one host sync for that size. Each bin is a weighted sum of rows of the channels-last input
(embedding_bag: the gathered samples are never materialised); the backward multiplies the sparse
transpose of those weights with the bins' gradients. Memory is bounded by doing RoIs in chunks."""

from typing import Iterator

import torch
import torch.nn.functional as F
from torch import Tensor

_CHUNK_ELEMENTS = 1 << 24  # gathered samples per chunk (x channels)


def _grid_sizes(rois: Tensor, PH: int, PW: int, scale: float, sampling_ratio: int, aligned: bool):
    acc = torch.promote_types(rois.dtype, torch.float32)
    r = rois.to(acc)
    off = 0.5 if aligned else 0.0
    x1, y1 = r[:, 1] * scale - off, r[:, 2] * scale - off
    rw, rh = r[:, 3] * scale - off - x1, r[:, 4] * scale - off - y1
    if not aligned:
        rw, rh = rw.clamp_min(1.0), rh.clamp_min(1.0)
    if sampling_ratio > 0:
        gh = torch.full_like(rh, sampling_ratio, dtype=torch.int64)
        gw = torch.full_like(rw, sampling_ratio, dtype=torch.int64)
    else:
        gh, gw = torch.ceil(rh / PH).to(torch.int64), torch.ceil(rw / PW).to(torch.int64)
    return x1, y1, rw, rh, gh, gw


def _axis(start: Tensor, size: Tensor, grid: Tensor, bins: int, gmax: int, extent: int):
    """Per RoI, bin and sample along one axis: (low index, high index, low weight, high weight),
    each [K, bins, gmax], the weights 0 for samples outside the grid or outside [-1, extent]."""
    b = torch.arange(bins, device=start.device, dtype=start.dtype)
    s = torch.arange(gmax, device=start.device, dtype=start.dtype)
    bin_size = (size / bins)[:, None, None]
    g = grid.to(start.dtype).clamp_min(1)[:, None, None]
    pos = start[:, None, None] + b[None, :, None] * bin_size + (s[None, None, :] + 0.5) * bin_size / g
    valid = (pos >= -1.0) & (pos <= extent) & (s[None, None, :] < grid[:, None, None])
    pos = pos.clamp_min(0)
    low = pos.floor().to(torch.int64)
    top = low >= extent - 1
    low = torch.where(top, torch.full_like(low, extent - 1), low)
    high = torch.where(top, low, low + 1)
    pos = torch.where(top, low.to(pos.dtype), pos)
    frac = pos - low
    zero = torch.zeros_like(frac)
    return low, high, torch.where(valid, 1 - frac, zero), torch.where(valid, frac, zero)


def _samples(input: Tensor, rois: Tensor, PH: int, PW: int, scale: float, sampling_ratio: int, aligned: bool) -> Iterator:
    """For each chunk of RoIs: (rows of the chunk, flat pixel index [k, PH, PW, S] into one channel
    plane of the batch laid [B, H, W], weight [k, PH, PW, S] already divided by the sample count)."""
    B, C, H, W = input.shape
    K = rois.shape[0]
    x1, y1, rw, rh, gh, gw = _grid_sizes(rois, PH, PW, scale, sampling_ratio, aligned)
    if K == 0:
        return
    ghm, gwm = max(int(gh.max()), 1), max(int(gw.max()), 1)  # the host sync
    count = (gh * gw).clamp_min(1).to(x1.dtype)
    batch = rois[:, 0].to(torch.int64)
    per_roi = PH * PW * ghm * gwm * 4 * max(C, 1)
    step = max(1, _CHUNK_ELEMENTS // per_roi)
    for lo in range(0, K, step):
        sl = slice(lo, min(K, lo + step))
        yl, yh, wyl, wyh = _axis(y1[sl], rh[sl], gh[sl], PH, ghm, H)
        xl, xh, wxl, wxh = _axis(x1[sl], rw[sl], gw[sl], PW, gwm, W)
        # [k, PH, ghm, 2] x [k, PW, gwm, 2] -> [k, PH, PW, ghm * gwm * 4]
        ys, wy = torch.stack([yl, yh], -1), torch.stack([wyl, wyh], -1)
        xs, wx = torch.stack([xl, xh], -1), torch.stack([wxl, wxh], -1)
        k = ys.shape[0]
        idx = batch[sl, None, None, None, None, None, None] * (H * W) + ys[:, :, None, :, None, :, None] * W + xs[:, None, :, None, :, None, :]
        w = wy[:, :, None, :, None, :, None] * wx[:, None, :, None, :, None, :] / count[sl, None, None, None, None, None, None]
        yield sl, idx.reshape(k, PH, PW, -1), w.reshape(k, PH, PW, -1)


def _channels_last(input: Tensor, acc: torch.dtype) -> Tensor:
    """[B * H * W, C]: one row of channels per pixel, the table the samples index."""
    B, C, H, W = input.shape
    return input.to(acc).permute(0, 2, 3, 1).reshape(B * H * W, C)


def _pool(table: Tensor, idx: Tensor, w: Tensor) -> Tensor:
    """[k, PH, PW, S] samples -> [k * PH * PW, C]: each bin the weighted sum of its samples' rows,
    without materialising the gathered rows (embedding_bag's weighted sum)."""
    S = idx.shape[-1]
    return F.embedding_bag(idx.reshape(-1, S), table, per_sample_weights=w.reshape(-1, S).to(table.dtype), mode="sum")


def roi_align(
    input: Tensor, rois: Tensor, pooled_height: int, pooled_width: int, spatial_scale: float, sampling_ratio: int, aligned: bool
) -> Tensor:
    B, C, H, W = input.shape
    K = rois.shape[0]
    acc = torch.promote_types(input.dtype, torch.float32)
    out = input.new_zeros(K, C, pooled_height, pooled_width, dtype=acc)
    table = _channels_last(input, acc)
    for sl, idx, w in _samples(input, rois, pooled_height, pooled_width, spatial_scale, sampling_ratio, aligned):
        k = idx.shape[0]
        out[sl] = _pool(table, idx, w).reshape(k, pooled_height, pooled_width, C).permute(0, 3, 1, 2)
    return out.to(input.dtype)


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
    """d input (rois get no gradient, as in torchvision): the transpose of the forward's weighted
    sums, a sparse [B*H*W, bins] matrix of the sample weights times the bins' gradients."""
    B, C, H, W = input.shape
    acc = torch.promote_types(input.dtype, torch.float32)
    grad = torch.zeros(B * H * W, C, dtype=acc, device=input.device)
    g = grad_out.to(acc).permute(0, 2, 3, 1)  # [K, PH, PW, C]
    for sl, idx, w in _samples(input, rois, pooled_height, pooled_width, spatial_scale, sampling_ratio, aligned):
        bins = idx.shape[0] * pooled_height * pooled_width
        S = idx.shape[-1]
        cols = torch.arange(bins, device=idx.device).repeat_interleave(S)
        at = torch.stack([idx.reshape(-1), cols])  # in range by construction
        weights_t = torch.sparse_coo_tensor(at, w.reshape(-1).to(acc), (B * H * W, bins), check_invariants=False)
        grad += torch.sparse.mm(weights_t, g[sl].reshape(bins, C))
    return grad.reshape(B, H, W, C).permute(0, 3, 1, 2).contiguous().to(input.dtype)
