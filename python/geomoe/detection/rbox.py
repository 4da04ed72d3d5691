"""Rotated boxes for oriented detection, in mmrotate's le90 convention (what the published DIOR-R
detector, Oriented R-CNN, uses): a box is (cx, cy, w, h, angle) with w >= h after normalisation,
angle in [-pi/2, pi/2), the width along (cos a, sin a) in image coordinates (y down); a
quadrilateral ("qbox") is its four corners (x1, y1, ..., x4, y4); a horizontal box ("hbox") is
(x1, y1, x2, y2).

The two box coders of Oriented R-CNN:
- MidpointOffsetCoder (the oriented RPN): a horizontal anchor to a rotated box by 6 deltas: the
  box's enclosing hbox (dx, dy, dw, dh as usual) plus the offsets of the midpoints where the
  rotated box touches the top and right sides of its hbox (da, db, each in [-0.5, 0.5] of a side);
  decoding rebuilds the parallelogram those points span and makes it a rectangle by scaling its
  half-diagonals to the longest.
  As published, "on the top side" means within 0.1 px of the hbox's top: a box turned less than
  about 0.1 px / its width from an axis gets both corners of that side, and then a target that
  decodes to a sliver. Kept so, for the published recipe's targets.
- DeltaXYWHTCoder (the RoI head, DeltaXYWHTRBBoxCoder with edge_swap and proj_xy): centre offsets
  in the proposal's own frame, log side ratios, and the angle difference, taking the ground truth's
  sides swapped (and its angle turned by pi/2) when that makes the angle difference smaller."""

import math
from dataclasses import dataclass
from typing import Sequence

import torch
from torch import Tensor

WH_RATIO_CLIP = 16 / 1000  # mmdet's bound on exp(dw), exp(dh) when decoding


def norm_angle_le90(angle: Tensor) -> Tensor:
    """Into [-pi/2, pi/2)."""
    return torch.remainder(angle + math.pi / 2, math.pi) - math.pi / 2


def qbox_to_rbox(q: Tensor) -> Tensor:
    """[..., 8] corners in order -> [..., 5] le90 boxes: the centre is the diagonal's midpoint, the
    longer of the first two sides is the width and gives the angle."""
    p = q.reshape(*q.shape[:-1], 4, 2)
    e1, e2 = p[..., 1, :] - p[..., 0, :], p[..., 3, :] - p[..., 0, :]  # the two sides at the first corner
    l1, l2 = e1.norm(dim=-1), e2.norm(dim=-1)
    a1, a2 = torch.atan2(e1[..., 1], e1[..., 0]), torch.atan2(e2[..., 1], e2[..., 0])
    first_longer = l1 > l2
    angle = norm_angle_le90(torch.where(first_longer, a1, a2))
    centre = (p[..., 0, :] + p[..., 2, :]) / 2
    w, h = torch.maximum(l1, l2), torch.minimum(l1, l2)
    return torch.cat([centre, w[..., None], h[..., None], angle[..., None]], -1)


def rbox_to_qbox(r: Tensor) -> Tensor:
    """[..., 5] -> [..., 8]: the corners (-w/2, -h/2), (w/2, -h/2), (w/2, h/2), (-w/2, h/2) turned."""
    cx, cy, w, h, a = r.unbind(-1)
    c, s = torch.cos(a), torch.sin(a)
    out = []
    for sx, sy in ((-1, -1), (1, -1), (1, 1), (-1, 1)):
        x, y = sx * w / 2, sy * h / 2
        out += [cx + x * c - y * s, cy + x * s + y * c]
    return torch.stack(out, -1)


def rbox_to_hbox(r: Tensor) -> Tensor:
    """[..., 5] -> [..., 4]: the axis-aligned box enclosing the rotated one."""
    cx, cy, w, h, a = r.unbind(-1)
    c, s = torch.cos(a).abs(), torch.sin(a).abs()
    hw, hh = (w * c + h * s) / 2, (w * s + h * c) / 2
    return torch.stack([cx - hw, cy - hh, cx + hw, cy + hh], -1)


def _normalise(deltas: Tensor, means: Sequence[float], stds: Sequence[float]) -> Tensor:
    return (deltas - deltas.new_tensor(means)) / deltas.new_tensor(stds)


def _denormalise(deltas: Tensor, means: Sequence[float], stds: Sequence[float]) -> Tensor:
    return deltas * deltas.new_tensor(stds) + deltas.new_tensor(means)


@dataclass(frozen=True)
class MidpointOffsetCoder:
    means: Sequence[float] = (0.0,) * 6
    stds: Sequence[float] = (1.0, 1.0, 1.0, 1.0, 0.5, 0.5)  # the published oriented RPN's

    def encode(self, anchors: Tensor, gt: Tensor) -> Tensor:
        """anchors [n, 4] hboxes, gt [n, 5] rboxes -> [n, 6]."""
        px, py = (anchors[:, 0] + anchors[:, 2]) / 2, (anchors[:, 1] + anchors[:, 3]) / 2
        pw, ph = anchors[:, 2] - anchors[:, 0], anchors[:, 3] - anchors[:, 1]
        hb, q = rbox_to_hbox(gt), rbox_to_qbox(gt)
        gx, gy = (hb[:, 0] + hb[:, 2]) / 2, (hb[:, 1] + hb[:, 3]) / 2
        gw, gh = hb[:, 2] - hb[:, 0], hb[:, 3] - hb[:, 1]
        xs, ys = q[:, 0::2], q[:, 1::2]
        # the corner on the hbox's top side (the rightmost, if a side lies on it), and the one on its right side
        on_top = (ys - ys.min(1, keepdim=True).values).abs() <= 0.1
        on_right = (xs - xs.max(1, keepdim=True).values).abs() <= 0.1
        ga = torch.where(on_top, xs, torch.full_like(xs, -math.inf)).max(1).values
        gb = torch.where(on_right, ys, torch.full_like(ys, -math.inf)).max(1).values
        d = torch.stack(
            [(gx - px) / pw, (gy - py) / ph, torch.log(gw / pw), torch.log(gh / ph), (ga - gx) / gw, (gb - gy) / gh], 1
        )
        return _normalise(d, self.means, self.stds)

    def decode(self, anchors: Tensor, deltas: Tensor) -> Tensor:
        """anchors [n, 4], deltas [n, 6] -> [n, 5] le90 rboxes."""
        dx, dy, dw, dh, da, db = _denormalise(deltas, self.means, self.stds).unbind(1)
        bound = abs(math.log(WH_RATIO_CLIP))
        dw, dh = dw.clamp(-bound, bound), dh.clamp(-bound, bound)
        px, py = (anchors[:, 0] + anchors[:, 2]) / 2, (anchors[:, 1] + anchors[:, 3]) / 2
        pw, ph = anchors[:, 2] - anchors[:, 0], anchors[:, 3] - anchors[:, 1]
        gx, gy, gw, gh = px + pw * dx, py + ph * dy, pw * dw.exp(), ph * dh.exp()
        x1, y1, x2, y2 = gx - gw / 2, gy - gh / 2, gx + gw / 2, gy + gh / 2
        da, db = da.clamp(-0.5, 0.5), db.clamp(-0.5, 0.5)
        ga, gb = gx + da * gw, gy + db * gh
        ga_, gb_ = gx - da * gw, gy - db * gh
        poly = torch.stack([ga, y1, x2, gb, ga_, y2, x1, gb_], 1).view(-1, 4, 2)
        centre = torch.stack([gx, gy], 1)[:, None, :]
        half = poly - centre  # a parallelogram's half-diagonals; equal lengths make it a rectangle
        length = half.norm(dim=-1, keepdim=True)
        half = half * (length.max(1, keepdim=True).values / length.clamp(min=1e-12))
        return qbox_to_rbox((half + centre).reshape(-1, 8))


@dataclass(frozen=True)
class DeltaXYWHTCoder:
    means: Sequence[float] = (0.0,) * 5
    stds: Sequence[float] = (0.1, 0.1, 0.2, 0.2, 0.1)  # the published RoI head's

    def encode(self, proposals: Tensor, gt: Tensor) -> Tensor:
        """proposals, gt [n, 5] le90 rboxes -> [n, 5]."""
        px, py, pw, ph, pa = proposals.unbind(1)
        gx, gy, gw, gh, ga = gt.unbind(1)
        c, s = torch.cos(pa), torch.sin(pa)
        dx = (c * (gx - px) + s * (gy - py)) / pw  # in the proposal's frame
        dy = (-s * (gx - px) + c * (gy - py)) / ph
        t1, t2 = norm_angle_le90(ga - pa), norm_angle_le90(ga - pa + math.pi / 2)
        keep = t1.abs() < t2.abs()  # else swap the ground truth's sides (the same box, turned a quarter)
        w, h = torch.where(keep, gw, gh), torch.where(keep, gh, gw)
        d = torch.stack([dx, dy, torch.log(w / pw), torch.log(h / ph), torch.where(keep, t1, t2)], 1)
        return _normalise(d, self.means, self.stds)

    def decode(self, proposals: Tensor, deltas: Tensor) -> Tensor:
        """proposals [n, 5], deltas [n, 5] -> [n, 5] le90 rboxes with w >= h."""
        dx, dy, dw, dh, da = _denormalise(deltas, self.means, self.stds).unbind(1)
        bound = abs(math.log(WH_RATIO_CLIP))
        dw, dh = dw.clamp(-bound, bound), dh.clamp(-bound, bound)
        px, py, pw, ph, pa = proposals.unbind(1)
        c, s = torch.cos(pa), torch.sin(pa)
        gx = dx * pw * c - dy * ph * s + px
        gy = dx * pw * s + dy * ph * c + py
        gw, gh = pw * dw.exp(), ph * dh.exp()
        ga = norm_angle_le90(pa + da)
        wider = gw > gh
        w, h = torch.where(wider, gw, gh), torch.where(wider, gh, gw)
        a = norm_angle_le90(torch.where(wider, ga, ga + math.pi / 2))
        return torch.stack([gx, gy, w, h, a], 1)
