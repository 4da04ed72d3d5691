"""Anchors, the delta box coder, the max-IoU assigner and the random sampler of the published
Faster R-CNN (DIOR config), in OpenMMLab's conventions (boxes x1, y1, x2, y2; widths x2 - x1, no +1).

Anchors: per level a base size = the stride, scale 8, ratios h/w (0.5, 1, 2), centred on the cell's
top-left corner (centre offset 0); laid out location-major (row, column, then the 3 ratios), the
order the heads' outputs are flattened in.
Coder: deltas ((gx - px) / pw, (gy - py) / ph, log(gw / pw), log(gh / ph)), minus means, over stds;
decoding clamps |dw|, |dh| to log(1000 / 16) and clips the boxes to the image.
Assigner: each prior to the ground truth it overlaps most; negative below neg_iou_thr, positive at
pos_iou_thr or more; then, with match_low_quality, every prior that is a ground truth's best match
(ties included) and overlaps it by min_pos_iou or more is given to it (ground truths in order, a
later one overwriting). Sampler: at most num * pos_fraction positives, the rest negatives, each
drawn at random without replacement."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

import torch
from torch import Tensor

from geomoe_kernels.reference.nms import pairwise_iou

MAX_RATIO = abs(math.log(16 / 1000))


def base_anchors(stride: int, scales: Sequence[float] = (8.0,), ratios: Sequence[float] = (0.5, 1.0, 2.0)) -> Tensor:
    """[len(ratios) * len(scales), 4] around (0, 0): ratios outer, scales inner."""
    r = torch.tensor(ratios, dtype=torch.float64)
    s = torch.tensor(scales, dtype=torch.float64)
    h_ratios = r.sqrt()
    w_ratios = 1 / h_ratios
    ws = (stride * w_ratios[:, None] * s[None, :]).reshape(-1)
    hs = (stride * h_ratios[:, None] * s[None, :]).reshape(-1)
    return torch.stack([-0.5 * ws, -0.5 * hs, 0.5 * ws, 0.5 * hs], dim=1)


def grid_anchors(base: Tensor, size: Tuple[int, int], stride: int, device=None, dtype=torch.float32) -> Tensor:
    """[H * W * A, 4]: the base anchors shifted to every cell (x fastest, then the anchors)."""
    H, W = size
    sx = torch.arange(W, dtype=torch.float64) * stride
    sy = torch.arange(H, dtype=torch.float64) * stride
    yy, xx = torch.meshgrid(sy, sx, indexing="ij")
    shifts = torch.stack([xx, yy, xx, yy], dim=-1).reshape(-1, 1, 4)
    return (shifts + base[None]).reshape(-1, 4).to(device=device, dtype=dtype)


@dataclass(frozen=True)
class AnchorGenerator:
    strides: Tuple[int, ...] = (4, 8, 16, 32, 64)
    scales: Tuple[float, ...] = (8.0,)
    ratios: Tuple[float, ...] = (0.5, 1.0, 2.0)

    @property
    def num_anchors(self) -> int:
        return len(self.scales) * len(self.ratios)

    def __call__(self, sizes: Sequence[Tuple[int, int]], device=None, dtype=torch.float32) -> List[Tensor]:
        if len(sizes) != len(self.strides):
            raise ValueError(f"AnchorGenerator: expected {len(self.strides)} feature map sizes, got {len(sizes)}")
        return [
            grid_anchors(base_anchors(s, self.scales, self.ratios), hw, s, device, dtype) for s, hw in zip(self.strides, sizes)
        ]


@dataclass(frozen=True)
class DeltaXYWHCoder:
    means: Tuple[float, float, float, float] = (0.0, 0.0, 0.0, 0.0)
    stds: Tuple[float, float, float, float] = (1.0, 1.0, 1.0, 1.0)

    def encode(self, priors: Tensor, gt: Tensor) -> Tensor:
        pw, ph = priors[:, 2] - priors[:, 0], priors[:, 3] - priors[:, 1]
        px, py = priors[:, 0] + 0.5 * pw, priors[:, 1] + 0.5 * ph
        gw, gh = gt[:, 2] - gt[:, 0], gt[:, 3] - gt[:, 1]
        gx, gy = gt[:, 0] + 0.5 * gw, gt[:, 1] + 0.5 * gh
        d = torch.stack([(gx - px) / pw, (gy - py) / ph, torch.log(gw / pw), torch.log(gh / ph)], dim=-1)
        return (d - d.new_tensor(self.means)) / d.new_tensor(self.stds)

    def decode(self, priors: Tensor, deltas: Tensor, max_shape: Optional[Tuple[int, int]] = None) -> Tensor:
        """deltas [N, 4k] against priors [N, 4] -> boxes [N, 4k], clipped to max_shape (H, W)."""
        n = deltas.shape[0]
        d = deltas.reshape(n, -1, 4) * deltas.new_tensor(self.stds) + deltas.new_tensor(self.means)
        dx, dy = d[..., 0], d[..., 1]
        dw, dh = d[..., 2].clamp(-MAX_RATIO, MAX_RATIO), d[..., 3].clamp(-MAX_RATIO, MAX_RATIO)
        p = priors[:, None, :]
        pw, ph = p[..., 2] - p[..., 0], p[..., 3] - p[..., 1]
        px, py = p[..., 0] + 0.5 * pw, p[..., 1] + 0.5 * ph
        gx, gy = px + pw * dx, py + ph * dy
        gw, gh = pw * dw.exp(), ph * dh.exp()
        x1, y1, x2, y2 = gx - 0.5 * gw, gy - 0.5 * gh, gx + 0.5 * gw, gy + 0.5 * gh
        if max_shape is not None:
            H, W = max_shape
            x1, x2 = x1.clamp(0, W), x2.clamp(0, W)
            y1, y2 = y1.clamp(0, H), y2.clamp(0, H)
        return torch.stack([x1, y1, x2, y2], dim=-1).reshape(n, -1)


@dataclass(frozen=True)
class MaxIoUAssigner:
    pos_iou_thr: float
    neg_iou_thr: float
    min_pos_iou: float
    match_low_quality: bool

    def __call__(self, priors: Tensor, gt: Tensor) -> Tuple[Tensor, Tensor]:
        """(assigned [N]: 0 negative, -1 ignored, i + 1 ground truth i; max IoU [N])."""
        if gt.shape[0] and priors.shape[0]:
            return self.assign(pairwise_iou(gt, priors))
        return self.assign(priors.new_zeros(gt.shape[0], priors.shape[0]))

    def assign(self, overlaps: Tensor) -> Tuple[Tensor, Tensor]:
        """The same from the IoU [G, N] of the ground truths with the priors (any box kind)."""
        G, N = overlaps.shape
        assigned = torch.full((N,), -1, dtype=torch.int64, device=overlaps.device)
        if G == 0:
            return assigned.zero_(), overlaps.new_zeros(N)
        if N == 0:
            return assigned, overlaps.new_zeros(0)
        max_ov, argmax = overlaps.max(dim=0)
        gt_max, _ = overlaps.max(dim=1)
        assigned[(max_ov >= 0) & (max_ov < self.neg_iou_thr)] = 0
        pos = max_ov >= self.pos_iou_thr
        assigned[pos] = argmax[pos] + 1
        if self.match_low_quality:
            # each ground truth's best priors (ties included) when it reaches min_pos_iou; a prior
            # that is several ground truths' best goes to the last of them (OpenMMLab's loop order)
            best = (overlaps == gt_max[:, None]) & (gt_max[:, None] >= self.min_pos_iou)
            last = G - 1 - best.flip(0).to(torch.uint8).argmax(dim=0)
            assigned = torch.where(best.any(dim=0), last + 1, assigned)
        return assigned, max_ov


@dataclass(frozen=True)
class RandomSampler:
    num: int
    pos_fraction: float

    def __call__(self, assigned: Tensor, generator: Optional[torch.Generator] = None) -> Tuple[Tensor, Tensor]:
        """(positive indices, negative indices)."""
        pos = torch.nonzero(assigned > 0).squeeze(1)
        want_pos = int(self.num * self.pos_fraction)
        pos = _choose(pos, want_pos, generator)
        neg = torch.nonzero(assigned == 0).squeeze(1)
        neg = _choose(neg, self.num - pos.numel(), generator)
        return pos, neg


def _choose(idx: Tensor, k: int, generator: Optional[torch.Generator]) -> Tensor:
    if idx.numel() <= k:
        return idx
    perm = torch.randperm(idx.numel(), generator=generator)[:k].to(idx.device)
    return idx[perm]


def roi_levels(rois: Tensor, num_levels: int = 4, finest_scale: float = 56.0) -> Tensor:
    """The FPN level of each RoI [K, 5]: floor(log2(sqrt(area) / finest_scale + 1e-6)), clamped to
    0 .. num_levels - 1."""
    scale = torch.sqrt((rois[:, 3] - rois[:, 1]) * (rois[:, 4] - rois[:, 2]))
    return torch.floor(torch.log2(scale / finest_scale + 1e-6)).clamp(0, num_levels - 1).to(torch.int64)
