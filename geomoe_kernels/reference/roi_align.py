"""RoIAlign in torchvision's conventions, in plain PyTorch, forward and backward.

input [B, C, H, W]; rois [K, 5] rows (batch index, x1, y1, x2, y2) in input-image coordinates,
scaled by spatial_scale (minus 0.5 when aligned). Each of the PH x PW bins of a RoI averages a
gh x gw grid of bilinear samples at the centres of the grid's cells; gh = sampling_ratio when > 0,
else ceil(roi_h / PH) (gw likewise: 0 and -1 are both adaptive). Not aligned, a RoI is at least
1 x 1. A sample outside [-1, H] x [-1, W] reads 0; one inside is clamped to the map (torchvision's
bilinear_interpolate). An empty grid (a zero-height aligned RoI) gives 0.

RoIs are grouped by their gh x gw grid (host syncs: the groups and their sizes), so no sample is
padding; only an empty grid is masked. Each bin is a weighted sum of rows of the channels-last input
(embedding_bag: the gathered samples are never materialised); the backward multiplies the sparse
transpose of those weights with the bins' gradients. Memory is bounded by doing RoIs in chunks."""

from typing import Iterator

import torch
import torch.nn.functional as F
from torch import Tensor

_CHUNK_SAMPLES = 1 << 20  # bilinear taps per chunk of RoIs (an int64 index and a weight each)


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
    """For each chunk of RoIs of one grid size: (the chunk's RoIs [k] int64, flat pixel index
    [k, PH, PW, S] into one channel plane of the batch laid [B, H, W], weight [k, PH, PW, S] already
    divided by the sample count). RoIs are grouped by their (gh, gw) grid so that no sample is
    padding: with adaptive grids a few large RoIs would otherwise set the grid of all."""
    B, C, H, W = input.shape
    K = rois.shape[0]
    x1, y1, rw, rh, gh, gw = _grid_sizes(rois, PH, PW, scale, sampling_ratio, aligned)
    if K == 0:
        return
    count = (gh * gw).clamp_min(1).to(x1.dtype)
    batch = rois[:, 0].to(torch.int64)
    key = gh * (int(gw.max()) + 1) + gw  # the host syncs: the grid sizes and the groups' sizes
    key, order = torch.sort(key, stable=True)
    sizes, counts = torch.unique_consecutive(key, return_counts=True)
    start = 0
    for _, n in zip(sizes.tolist(), counts.tolist()):
        group = order[start : start + n]
        start += n
        ghm, gwm = max(int(gh[group[0]]), 1), max(int(gw[group[0]]), 1)
        step = max(1, _CHUNK_SAMPLES // (PH * PW * ghm * gwm * 4))
        for lo in range(0, n, step):
            at = group[lo : lo + step]
            yl, yh, wyl, wyh = _axis(y1[at], rh[at], gh[at], PH, ghm, H)
            xl, xh, wxl, wxh = _axis(x1[at], rw[at], gw[at], PW, gwm, W)
            # [k, PH, ghm, 2] x [k, PW, gwm, 2] -> [k, PH, PW, ghm * gwm * 4]: the rows' offsets and the
            # y weights (over the sample count) first, then one broadcast op each for indices and weights
            rows = batch[at, None, None, None] * (H * W) + torch.stack([yl, yh], -1) * W
            wy = torch.stack([wyl, wyh], -1) / count[at, None, None, None]
            xs, wx = torch.stack([xl, xh], -1), torch.stack([wxl, wxh], -1)
            k = rows.shape[0]
            shape = (k, PH, PW, ghm, gwm, 2, 2)  # written in this layout (out=): the reshapes below copy nothing
            idx = torch.add(rows[:, :, None, :, None, :, None], xs[:, None, :, None, :, None, :], out=rows.new_empty(shape))
            w = torch.mul(wy[:, :, None, :, None, :, None], wx[:, None, :, None, :, None, :], out=wy.new_empty(shape))
            yield at, idx.reshape(k, PH, PW, -1), w.reshape(k, PH, PW, -1)


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
    out = input.new_zeros(K, pooled_height, pooled_width, C, dtype=acc)
    table = _channels_last(input, acc)
    for at, idx, w in _samples(input, rois, pooled_height, pooled_width, spatial_scale, sampling_ratio, aligned):
        out.index_copy_(0, at, _pool(table, idx, w).reshape(idx.shape[0], pooled_height, pooled_width, C))
    return out.permute(0, 3, 1, 2).contiguous().to(input.dtype)


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
    for at, idx, w in _samples(input, rois, pooled_height, pooled_width, spatial_scale, sampling_ratio, aligned):
        bins = idx.shape[0] * pooled_height * pooled_width
        S = idx.shape[-1]
        cols = torch.arange(bins, device=idx.device).repeat_interleave(S)
        where = torch.stack([idx.reshape(-1), cols])  # in range by construction
        weights_t = torch.sparse_coo_tensor(where, w.reshape(-1).to(acc), (B * H * W, bins), check_invariants=False)
        grad += torch.sparse.mm(weights_t, g[at].reshape(bins, C))
    return grad.reshape(B, H, W, C).permute(0, 3, 1, 2).contiguous().to(input.dtype)
