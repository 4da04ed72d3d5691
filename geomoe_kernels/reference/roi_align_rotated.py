"""RoIAlign over rotated regions, mmcv's RoIAlignRotated semantics (what mmrotate's Oriented R-CNN
pools with): each roi (batch index, cx, cy, w, h, angle) is cut into output_size bins along its own
axes; each bin averages a grid of bilinear samples (sampling_ratio per side, or ceil(roi side /
bins) when sampling_ratio <= 0, at most MAX_GRID: mmcv's grid is unbounded, and a huge roi would
ask for more samples than memory or time allow).

- aligned: roi coordinates are shifted by half a pixel (pixel centres at integer + 0.5); otherwise
  the roi's sides are at least one pixel.
- clockwise: the angle is taken clockwise in image coordinates, i.e. the width runs along
  (cos a, sin a) with y pointing down: mmrotate's le90 boxes, as the published detector pools them;
  counter-clockwise (the default, as mmcv's) negates the angle.
- a sample further than one pixel outside the map contributes 0; one within clamps to the border.
- rois with a non-finite coordinate, or a batch index that names no image (where value checks are
  off: they refuse it), give NaN bins and pass no gradient back.

As a sparse matrix: output [K * PH * PW, C] = S @ input rows [B * H * W, C], with four weights per
sample; the backward is S^T @ grad. The reference builds S in the inputs' precision, at least
float32 (float64 inputs give float64 answers; CPU training's float32 runs at half the memory
traffic), for all the rois of one sample grid at once (one grid with a fixed sampling_ratio), at
most ENTRIES_PER_CHUNK entries at a time, as compressed rows: each bin's entries are contiguous,
so the rows need no sort; the backward sorts each chunk's entries by pixel (a stable sort: sums in
a fixed order)."""

import warnings
from typing import Iterator, Sequence, Tuple

import torch
from torch import Tensor

MAX_GRID = 64  # samples per bin side at most (sampling_ratio <= 0); a fixed sampling_ratio above it is refused
ENTRIES_PER_CHUNK = 1 << 22  # bounds the temporaries: four weights per sample


def _grids(rois: Tensor, output_size: Tuple[int, int], spatial_scale: float, sampling_ratio: int, aligned: bool):
    """Per roi: centre (x, y), side lengths, and the sample grid (gh, gw), in rois' dtype."""
    r = rois
    offset = 0.5 if aligned else 0.0
    cx, cy = r[:, 1] * spatial_scale - offset, r[:, 2] * spatial_scale - offset
    w, h = r[:, 3] * spatial_scale, r[:, 4] * spatial_scale
    if not aligned:
        w, h = w.clamp(min=1.0), h.clamp(min=1.0)
    if sampling_ratio > 0:
        gh = gw = torch.full_like(w, float(sampling_ratio))
    else:
        gh = torch.ceil(h / output_size[0]).nan_to_num(0.0).clamp(0.0, MAX_GRID)
        gw = torch.ceil(w / output_size[1]).nan_to_num(0.0).clamp(0.0, MAX_GRID)
    return cx, cy, w, h, gh.long(), gw.long()


def _chunks(
    rois: Tensor,
    shape: Tuple[int, int, int, int],
    output_size: Tuple[int, int],
    spatial_scale: float,
    sampling_ratio: int,
    aligned: bool,
    clockwise: bool,
) -> Iterator[Tuple[Tensor, Tensor, Tensor]]:
    """(roi indices [k], pixel indices [k * PH * PW, n], weights [k * PH * PW, n]): the rows of S of
    those rois, bin after bin, each bin's n = 4 gh gw bilinear weights (divided by the samples per
    bin; 0 for a sample outside the map) in a fixed order. Empty rois (no samples) are left out:
    their bins stay 0. Pixel indices are int32 where the batch's pixels allow (a faster sort)."""
    B, _, H, W = shape
    PH, PW = output_size
    dev = rois.device
    index = torch.int32 if B * H * W < 2**31 - 1 else torch.int64
    finite = usable(rois, B)  # a roi with a non-finite coordinate or no image samples nothing
    rois = torch.where(finite[:, None], rois, torch.zeros_like(rois))
    cx, cy, w, h, gh, gw = _grids(rois, output_size, spatial_scale, sampling_ratio, aligned)
    gh, gw = gh * finite, gw * finite
    theta = rois[:, 5] * (-1.0 if clockwise else 1.0)
    cos, sin = torch.cos(theta), torch.sin(theta)
    base = rois[:, 0].to(index) * (H * W)
    ph = torch.arange(PH, dtype=rois.dtype, device=dev)
    pw = torch.arange(PW, dtype=rois.dtype, device=dev)
    fixed = sampling_ratio > 0
    grids = [(sampling_ratio, sampling_ratio)] if fixed else torch.unique(torch.stack([gh, gw], 1), dim=0).tolist()
    for g0, g1 in ((int(a), int(b)) for a, b in grids):
        if g0 == 0 or g1 == 0:
            continue  # an empty roi: its bins stay 0
        group = torch.nonzero(finite if fixed else (gh == g0) & (gw == g1)).view(-1)
        iy = (torch.arange(g0, dtype=rois.dtype, device=dev) + 0.5) / g0
        ix = (torch.arange(g1, dtype=rois.dtype, device=dev) + 0.5) / g1
        step = max(1, ENTRIES_PER_CHUNK // (PH * PW * g0 * g1 * 4))
        for lo in range(0, group.numel(), step):
            sel = group[lo : lo + step]
            hs, ws = h[sel][:, None, None], w[sel][:, None, None]
            # local coordinates from the roi's centre, [k, PH, PW, gh, gw]
            yy = (-hs / 2 + hs / PH * (ph[None, :, None] + iy[None, None, :]))[:, :, None, :, None]
            xx = (-ws / 2 + ws / PW * (pw[None, :, None] + ix[None, None, :]))[:, None, :, None, :]
            c, s = cos[sel].view(-1, 1, 1, 1, 1), sin[sel].view(-1, 1, 1, 1, 1)
            y = yy * c - xx * s + cy[sel].view(-1, 1, 1, 1, 1)  # turned by theta
            x = yy * s + xx * c + cx[sel].view(-1, 1, 1, 1, 1)
            cols, vals = _bilinear(y, x, H, W, base[sel].view(-1, 1, 1, 1, 1), 1.0 / (g0 * g1))
            yield sel, cols.view(sel.numel() * PH * PW, -1), vals.view(sel.numel() * PH * PW, -1)


def _bilinear(y: Tensor, x: Tensor, H: int, W: int, base: Tensor, scale: float):
    """The four neighbours (flat pixel index from base, weight times scale) of each sample, [..., 4]:
    weight 0 more than a pixel outside the map; clamped to the border within a pixel of it."""
    outside = (y < -1.0) | (y > H) | (x < -1.0) | (x > W)
    y, x = y.clamp(min=0.0), x.clamp(min=0.0)
    y_low, x_low = y.floor().clamp(max=H - 1), x.floor().clamp(max=W - 1)
    top, right = y_low >= H - 1, x_low >= W - 1  # on the last row (column) a sample reads it alone
    ly = torch.where(top, 0.0, y - y_low)
    lx = torch.where(right, 0.0, x - x_low)
    inside = (~outside).to(y.dtype) * scale
    hy, ly, hx = (1 - ly) * inside, ly * inside, 1 - lx
    i00 = base + y_low.to(base.dtype) * W + x_low.to(base.dtype)
    dy = (~top).to(base.dtype) * W
    dx = (~right).to(base.dtype)
    cols = torch.stack([i00, i00 + dx, i00 + dy, i00 + dy + dx], -1)
    vals = torch.stack([hy * hx, hy * lx, ly * hx, ly * lx], -1)
    return cols, vals


def _csr(offsets: Tensor, columns: Tensor, values: Tensor, size: Tuple[int, int]) -> Tensor:
    with warnings.catch_warnings():  # torch calls its compressed-row layout beta, once a process
        warnings.filterwarnings("ignore", "Sparse CSR tensor support is in beta", UserWarning)
        return torch.sparse_csr_tensor(offsets, columns, values, size, check_invariants=False)


def usable(rois: Tensor, batch: int) -> Tensor:
    """[K] bool: the roi's coordinates are finite and its batch index names an image."""
    b = rois[:, 0]
    return torch.isfinite(rois[:, 1:]).all(1) & (b >= 0) & (b < batch) & (b == b.floor())


def _nan_rows(out: Tensor, rois: Tensor, batch: int) -> Tensor:
    bad = ~usable(rois, batch)
    return torch.where(bad.view(-1, 1, 1, 1), torch.full_like(out, float("nan")), out)


def roi_align_rotated(
    input: Tensor,
    rois: Tensor,
    output_size: Tuple[int, int],
    spatial_scale: float,
    sampling_ratio: int,
    aligned: bool,
    clockwise: bool,
) -> Tensor:
    B, C, H, W = input.shape
    K, (PH, PW) = rois.shape[0], output_size
    acc = torch.promote_types(torch.promote_types(input.dtype, rois.dtype), torch.float32)
    rois = rois.to(acc)
    flat = input.to(acc).permute(0, 2, 3, 1).reshape(B * H * W, C)
    out = flat.new_zeros(K, PH * PW, C)
    for sel, cols, vals in _chunks(rois, (B, C, H, W), output_size, spatial_scale, sampling_ratio, aligned, clockwise):
        rows, n = cols.shape
        offsets = torch.arange(0, rows * n + 1, n, dtype=cols.dtype, device=cols.device)
        S = _csr(offsets, cols.view(-1), vals.view(-1), (rows, B * H * W))
        if sel.numel() == K:  # every roi at once (a fixed sampling_ratio, one chunk)
            out = (S @ flat).view(K, PH * PW, C)
        else:
            out[sel] = (S @ flat).view(-1, PH * PW, C)
    out = out.view(K, PH, PW, C).permute(0, 3, 1, 2)
    return _nan_rows(out, rois, B).to(input.dtype).contiguous()


def roi_align_rotated_backward(
    grad_out: Tensor,
    rois: Tensor,
    input_shape: Sequence[int],
    spatial_scale: float,
    sampling_ratio: int,
    aligned: bool,
    clockwise: bool,
) -> Tensor:
    B, C, H, W = input_shape
    K, _, PH, PW = grad_out.shape
    acc = torch.promote_types(torch.promote_types(grad_out.dtype, rois.dtype), torch.float32)
    rois = rois.to(acc)
    g = grad_out.to(acc).permute(0, 2, 3, 1).reshape(K, PH * PW, C)
    grad = g.new_zeros(B * H * W, C)
    for sel, cols, vals in _chunks(rois, (B, C, H, W), (PH, PW), spatial_scale, sampling_ratio, aligned, clockwise):
        rows, n = cols.shape
        flat = cols.view(-1)
        order = torch.sort(flat, stable=True).indices  # S^T's rows: by pixel, each pixel's bins in order
        per_pixel = torch.bincount(flat, minlength=B * H * W).cumsum(0).to(cols.dtype)
        offsets = torch.cat([per_pixel.new_zeros(1), per_pixel])
        St = _csr(offsets, (order // n).to(cols.dtype), vals.view(-1)[order], (B * H * W, rows))
        grad += St @ g[sel].reshape(-1, C)
    return grad.view(B, H, W, C).permute(0, 3, 1, 2).to(grad_out.dtype).contiguous()
