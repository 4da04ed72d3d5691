"""IoU of rotated boxes (cx, cy, w, h, angle in radians), the convention of mmcv / mmrotate: a
box's width runs along (cos a, sin a) and its height along (-sin a, cos a) in image coordinates.

The intersection of two convex polygons by Green's theorem, without building (or sorting) the
intersection polygon: its boundary is the part of A's boundary inside B plus the part of B's
boundary inside A, and its area is the sum over those pieces of cross(start, end) / 2. Each edge
of a convex polygon enters and leaves the other convex polygon at most once, so the part inside is
one parametric interval [t0, t1] (Cyrus-Beck clipping against the other's four half-planes):
branch-free arithmetic that vectorises over pairs here and runs per pair in the Triton kernel.

An edge lying on the other box's boundary (identical boxes, boxes sharing a side) would be counted
twice, once from each box: A's edges count where they run along B's boundary in B's direction
(the shared side of two overlapping boxes), B's edges never count on A's boundary, and an edge of A
that runs along B's boundary in the opposite direction (two boxes touching from outside) does not
count either. "Parallel" and "on the line" are decided within TOLERANCE (relative to the edges'
lengths) by the same numbers in both passes: an exact test would let rounding (about 1e-16 of a
rotated box's coordinates) decide, and count a shared side twice or not at all.

Boxes with w <= 0 or h <= 0 are empty: their IoU with anything is 0. A box with a non-finite
coordinate gives NaN in its row or column (never a silently wrong number). The arithmetic runs in
float64 here (float32 in the Triton kernel, float64 for float64 boxes), relative to the first box's
centre, so that boxes far from the origin keep their precision, and scaled to the pair's largest
side, so that the areas of huge boxes do not overflow (nor those of tiny ones underflow)."""

import torch
from torch import Tensor

PAIRS_PER_CHUNK = 1 << 16  # pairs evaluated at once: bounds the [pairs, 4, 4] temporaries
TOLERANCE = 1e-6  # relative: edges this near parallel, or this near a line, count as parallel / on it


def corners(boxes: Tensor) -> Tensor:
    """[..., 5] -> [..., 4, 2]: the corners, counter-clockwise in (x, y) with y up (so a box's
    interior lies to the left of each edge); in image coordinates (y down) that order is clockwise."""
    cx, cy, w, h, a = boxes.unbind(-1)
    c, s = torch.cos(a), torch.sin(a)
    half_w = torch.stack([w * c, w * s], -1) / 2  # along the width
    half_h = torch.stack([-h * s, h * c], -1) / 2  # along the height
    centre = torch.stack([cx, cy], -1)
    return torch.stack(
        [centre - half_w - half_h, centre + half_w - half_h, centre + half_w + half_h, centre - half_w + half_h], -2
    )


def _cross(u: Tensor, v: Tensor) -> Tensor:
    return u[..., 0] * v[..., 1] - u[..., 1] * v[..., 0]


def _inside_part(edges_of: Tensor, clip_by: Tensor, closed: bool) -> Tensor:
    """sum over the edges of polygons `edges_of` [P, 4, 2] of cross(start, end) / 2 of the part of
    each edge inside the polygon `clip_by` [P, 4, 2] (closed: A against B; open: B against A)."""
    start = edges_of.unsqueeze(2)  # [P, 4 edges, 1, 2]
    d = (edges_of.roll(-1, 1) - edges_of).unsqueeze(2)
    origin = clip_by.unsqueeze(1)  # [P, 1, 4 planes, 2]
    e = (clip_by.roll(-1, 1) - clip_by).unsqueeze(1)
    a = _cross(e, start - origin)  # the signed distance (times |e|) of the edge's start
    b = _cross(e, d)  # its rate along the edge
    # parallel and on-the-line within a relative tolerance, as the Triton kernel decides them: rounding
    # leaves b and a near 1e-16 rather than 0 for the sides of rotated boxes that touch or coincide
    scale = e.norm(dim=-1) * d.norm(dim=-1)
    parallel = b.abs() <= TOLERANCE * scale
    t = -a / torch.where(parallel, torch.ones_like(b), b)
    t0 = torch.where(~parallel & (b > 0), t, torch.zeros_like(t)).amax(2).clamp(min=0.0)
    t1 = torch.where(~parallel & (b < 0), t, torch.ones_like(t)).amin(2).clamp(max=1.0)
    if closed:  # on the other box's line: inside only when running its way (a shared side)
        on_line = a.abs() <= TOLERANCE * scale
        parallel_in = ((a > 0) & ~on_line) | (on_line & ((e * d).sum(-1) > 0))
    else:  # decided from the closed pass's number for this pair of edges, so the two passes agree
        parallel_in = (a > 0) & ~(_cross(d, origin - start).abs() <= TOLERANCE * scale)
    parallel_ok = torch.where(parallel, parallel_in, torch.ones_like(parallel_in)).all(2)
    length = torch.where(parallel_ok, (t1 - t0).clamp(min=0.0), torch.zeros_like(t0))
    return (length * _cross(start.squeeze(2), d.squeeze(2))).sum(1) / 2


def pair_iou(b1: Tensor, b2: Tensor) -> Tensor:
    """IoU of b1[i] and b2[i] for equal-length [P, 5] float64 boxes."""
    shift = torch.cat([b1[:, :2], torch.zeros_like(b1[:, 2:])], 1)
    # IoU does not change with the scale: each pair is scaled by the power of two nearest its largest
    # side (exact arithmetic), so that areas neither overflow (w h of huge boxes) nor underflow
    _, exponent = torch.frexp(torch.maximum(b1[:, 2:4].abs().amax(1), b2[:, 2:4].abs().amax(1)))
    scale = torch.ldexp(torch.ones_like(b1[:, :1]), -exponent[:, None].clamp(-1000, 1000))
    scale = torch.cat([scale.expand(-1, 4), torch.ones_like(scale)], 1)
    b1, b2 = (b1 - shift) * scale, (b2 - shift) * scale
    p1, p2 = corners(b1), corners(b2)
    inter = _inside_part(p1, p2, closed=True) + _inside_part(p2, p1, closed=False)
    area1, area2 = b1[:, 2] * b1[:, 3], b2[:, 2] * b2[:, 3]
    inter = torch.minimum(inter.clamp(min=0.0), torch.minimum(area1, area2))
    valid = (b1[:, 2] > 0) & (b1[:, 3] > 0) & (b2[:, 2] > 0) & (b2[:, 3] > 0)
    iou = torch.where(valid, inter / torch.where(valid, area1 + area2 - inter, torch.ones_like(inter)), torch.zeros_like(inter))
    finite = torch.isfinite(b1).all(1) & torch.isfinite(b2).all(1)
    return torch.where(finite, iou, torch.full_like(iou, float("nan")))


def enclosing(boxes: Tensor) -> Tensor:
    """[..., 5] -> [..., 4]: the axis-aligned box (x1, y1, x2, y2) around each rotated box."""
    cx, cy, w, h, a = boxes.unbind(-1)
    c, s = torch.cos(a).abs(), torch.sin(a).abs()
    hw, hh = (w.abs() * c + h.abs() * s) / 2, (w.abs() * s + h.abs() * c) / 2
    return torch.stack([cx - hw, cy - hh, cx + hw, cy + hh], -1)


def candidate_pairs(boxes1: Tensor, boxes2: Tensor) -> Tensor:
    """[P, 2] (i, j) whose enclosing boxes meet: only those can overlap (pairs with a non-finite
    box are left out too)."""
    e1, e2 = enclosing(boxes1), enclosing(boxes2)
    rows = max(1, PAIRS_PER_CHUNK * 16 // max(1, boxes2.shape[0]))
    found = []
    for i in range(0, boxes1.shape[0], rows):
        a = e1[i : i + rows, None, :]
        meet = (a[..., 0] <= e2[:, 2]) & (e2[:, 0] <= a[..., 2]) & (a[..., 1] <= e2[:, 3]) & (e2[:, 1] <= a[..., 3])
        ij = torch.nonzero(meet)
        ij[:, 0] += i
        found.append(ij)
    return torch.cat(found) if found else torch.zeros(0, 2, dtype=torch.int64)


def pair_iou_chunked(b1: Tensor, b2: Tensor) -> Tensor:
    """pair_iou over equal-length [P, 5] float64 boxes, PAIRS_PER_CHUNK at a time."""
    return (
        torch.cat(
            [pair_iou(b1[i : i + PAIRS_PER_CHUNK], b2[i : i + PAIRS_PER_CHUNK]) for i in range(0, b1.shape[0], PAIRS_PER_CHUNK)]
        )
        if b1.shape[0]
        else b1.new_zeros(0)
    )


def box_iou_rotated(boxes1: Tensor, boxes2: Tensor) -> Tensor:
    """[N, 5], [M, 5] -> [N, M] in boxes1's dtype. The exact clipping runs only on the pairs whose
    enclosing boxes meet (the rest are 0): detection's matrices are mostly such zeros."""
    N, M = boxes1.shape[0], boxes2.shape[0]
    b1, b2 = boxes1.double(), boxes2.double()
    out = torch.zeros(N, M, dtype=torch.float64, device=boxes1.device)
    if N and M:
        ij = candidate_pairs(b1, b2)
        out[ij[:, 0], ij[:, 1]] = pair_iou_chunked(b1[ij[:, 0]], b2[ij[:, 1]])
        bad1, bad2 = ~torch.isfinite(b1).all(1), ~torch.isfinite(b2).all(1)
        out[bad1] = float("nan")
        out[:, bad2] = float("nan")
    return out.to(boxes1.dtype)
