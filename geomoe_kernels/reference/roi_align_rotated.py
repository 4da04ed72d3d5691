"""RoIAlign over rotated regions, mmcv's RoIAlignRotated semantics (what mmrotate's Oriented R-CNN
pools with): each roi (batch index, cx, cy, w, h, angle) is cut into output_size bins along its own
axes; each bin averages a grid of bilinear samples (sampling_ratio per side, or ceil(roi side /
bins) when sampling_ratio <= 0).

- aligned: roi coordinates are shifted by half a pixel (pixel centres at integer + 0.5); otherwise
  the roi's sides are at least one pixel.
- clockwise: the angle is taken clockwise in image coordinates, i.e. the width runs along
  (cos a, sin a) with y pointing down: mmrotate's le90 boxes, as the published detector pools them;
  counter-clockwise (the default, as mmcv's) negates the angle.
- a sample further than one pixel outside the map contributes 0; one within clamps to the border.
- rois with a non-finite coordinate, or a batch index that names no image (where value checks are
  off: they refuse it), give NaN bins and pass no gradient back.

As a sparse matrix: output [K * PH * PW, C] = S @ input rows [B * H * W, C], with four weights per
sample; the backward is S^T @ grad. The reference builds S in float64 (grouping the rois by their
sample grid) and multiplies; the Triton kernels compute the same samples per bin."""

from typing import Sequence, Tuple

import torch
from torch import Tensor


def _grids(rois: Tensor, output_size: Tuple[int, int], spatial_scale: float, sampling_ratio: int, aligned: bool):
    """Per roi: centre (x, y), side lengths, and the sample grid (gh, gw), in float64."""
    r = rois.double()
    offset = 0.5 if aligned else 0.0
    cx, cy = r[:, 1] * spatial_scale - offset, r[:, 2] * spatial_scale - offset
    w, h = r[:, 3] * spatial_scale, r[:, 4] * spatial_scale
    if not aligned:
        w, h = w.clamp(min=1.0), h.clamp(min=1.0)
    if sampling_ratio > 0:
        gh = gw = torch.full_like(w, float(sampling_ratio))
    else:
        gh = torch.ceil(h / output_size[0]).nan_to_num(0.0).clamp(min=0.0)
        gw = torch.ceil(w / output_size[1]).nan_to_num(0.0).clamp(min=0.0)
    return cx, cy, w, h, gh.long(), gw.long()


def sampling_matrix(
    rois: Tensor,
    shape: Tuple[int, int, int, int],
    output_size: Tuple[int, int],
    spatial_scale: float,
    sampling_ratio: int,
    aligned: bool,
    clockwise: bool,
) -> Tensor:
    """The sparse [K * PH * PW, B * H * W] float64 matrix of bilinear weights (divided by the samples
    per bin)."""
    B, _, H, W = shape
    PH, PW = output_size
    K = rois.shape[0]
    finite = usable(rois, B)  # a roi with a non-finite coordinate or no image samples nothing
    rois = torch.where(finite[:, None], rois, torch.zeros_like(rois))
    cx, cy, w, h, gh, gw = _grids(rois, output_size, spatial_scale, sampling_ratio, aligned)
    gh, gw = gh * finite, gw * finite
    theta = rois[:, 5].double() * (-1.0 if clockwise else 1.0)
    batch = rois[:, 0].long()
    rows, cols, vals = [], [], []
    for g in torch.unique(torch.stack([gh, gw], 1), dim=0).tolist():
        sel = torch.nonzero((gh == g[0]) & (gw == g[1])).view(-1)
        if g[0] == 0 or g[1] == 0:
            continue  # an empty roi: its bins stay 0
        iy = (torch.arange(g[0], dtype=torch.float64) + 0.5) / g[0]
        ix = (torch.arange(g[1], dtype=torch.float64) + 0.5) / g[1]
        ph = torch.arange(PH, dtype=torch.float64)
        pw = torch.arange(PW, dtype=torch.float64)
        bh, bw = h[sel] / PH, w[sel] / PW  # [k]
        # local coordinates from the roi's centre, [k, PH, PW, gh, gw]
        yy = (-h[sel] / 2)[:, None, None] + bh[:, None, None] * (ph[None, :, None] + iy[None, None, :])
        xx = (-w[sel] / 2)[:, None, None] + bw[:, None, None] * (pw[None, :, None] + ix[None, None, :])
        yy, xx = yy[:, :, None, :, None], xx[:, None, :, None, :]
        c, s = torch.cos(theta[sel]).view(-1, 1, 1, 1, 1), torch.sin(theta[sel]).view(-1, 1, 1, 1, 1)
        y = yy * c - xx * s + cy[sel].view(-1, 1, 1, 1, 1)  # turned by theta (y down: clockwise on screen for -theta)
        x = yy * s + xx * c + cx[sel].view(-1, 1, 1, 1, 1)
        n = len(sel)
        y, x = y.expand(n, PH, PW, g[0], g[1]), x.expand(n, PH, PW, g[0], g[1])
        out_row = (
            sel.view(-1, 1, 1, 1, 1) * PH * PW
            + (torch.arange(PH) * PW).view(1, -1, 1, 1, 1)
            + torch.arange(PW).view(1, 1, -1, 1, 1)
        )
        out_row = out_row.expand(n, PH, PW, g[0], g[1])
        r_, c_, v_ = _bilinear(y, x, H, W)
        base = (batch[sel] * H * W).view(-1, 1, 1, 1, 1, 1)
        rows.append(out_row.unsqueeze(-1).expand(r_.shape).reshape(-1))
        cols.append((base + r_ * W + c_).reshape(-1))
        vals.append((v_ / (g[0] * g[1])).reshape(-1))
    if not rows:
        idx = torch.zeros(2, 0, dtype=torch.int64)
        return torch.sparse_coo_tensor(idx, torch.zeros(0, dtype=torch.float64), (K * PH * PW, B * H * W), check_invariants=False)
    idx = torch.stack([torch.cat(rows), torch.cat(cols)])
    return torch.sparse_coo_tensor(idx, torch.cat(vals), (K * PH * PW, B * H * W), check_invariants=False).coalesce()


def _bilinear(y: Tensor, x: Tensor, H: int, W: int):
    """The four neighbours (row, column, weight) of each sample, [..., 4]: weight 0 more than a pixel
    outside the map; clamped to the border within a pixel of it."""
    outside = (y < -1.0) | (y > H) | (x < -1.0) | (x > W)
    y, x = y.clamp(min=0.0), x.clamp(min=0.0)
    y_low, x_low = y.floor().clamp(max=H - 1), x.floor().clamp(max=W - 1)
    y = torch.where(y_low >= H - 1, y_low, y)
    x = torch.where(x_low >= W - 1, x_low, x)
    y_high, x_high = (y_low + 1).clamp(max=H - 1), (x_low + 1).clamp(max=W - 1)
    ly, lx = y - y_low, x - x_low
    hy, hx = 1 - ly, 1 - lx
    keep = (~outside).double()
    rr = torch.stack([y_low, y_low, y_high, y_high], -1).long()
    cc = torch.stack([x_low, x_high, x_low, x_high], -1).long()
    ww = torch.stack([hy * hx, hy * lx, ly * hx, ly * lx], -1) * keep.unsqueeze(-1)
    return rr, cc, ww


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
    S = sampling_matrix(rois, (B, C, H, W), output_size, spatial_scale, sampling_ratio, aligned, clockwise)
    flat = input.double().permute(0, 2, 3, 1).reshape(B * H * W, C)
    out = torch.sparse.mm(S, flat).view(K, PH, PW, C).permute(0, 3, 1, 2)
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
    S = sampling_matrix(rois, (B, C, H, W), (PH, PW), spatial_scale, sampling_ratio, aligned, clockwise)
    g = grad_out.double().permute(0, 2, 3, 1).reshape(K * PH * PW, C)
    grad = torch.sparse.mm(S.t(), g).view(B, H, W, C).permute(0, 3, 1, 2)
    return grad.to(grad_out.dtype).contiguous()
