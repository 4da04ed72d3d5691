"""Independent float64 answers for the rotated-box ops: polygons and their intersections from
shapely, a greedy NMS written out with them, and RoIAlignRotated as a per-sample Python loop of
the documented semantics (mmcv's RoIAlignRotated)."""

import math
from typing import List, Optional

import torch
from shapely.geometry import Polygon

MAX_GRID = 64  # roi_align_rotated's documented bound on the adaptive samples a bin side


def polygon(box) -> Polygon:
    cx, cy, w, h, a = (float(v) for v in box)
    c, s = math.cos(a), math.sin(a)
    pts = [(-w / 2, -h / 2), (w / 2, -h / 2), (w / 2, h / 2), (-w / 2, h / 2)]
    return Polygon([(cx + x * c - y * s, cy + x * s + y * c) for x, y in pts])


def iou(b1, b2) -> float:
    if min(float(b1[2]), float(b1[3]), float(b2[2]), float(b2[3])) <= 0:
        return 0.0
    p, q = polygon(b1), polygon(b2)
    inter = p.intersection(q).area
    return inter / (p.area + q.area - inter)


def iou_matrix(boxes1: torch.Tensor, boxes2: torch.Tensor) -> torch.Tensor:
    return torch.tensor([[iou(a, b) for b in boxes2.tolist()] for a in boxes1.tolist()], dtype=torch.float64).view(
        len(boxes1), len(boxes2)
    )


def nms(boxes: torch.Tensor, scores: torch.Tensor, threshold: float, classes: Optional[torch.Tensor] = None) -> List[int]:
    order = sorted(range(len(scores)), key=lambda i: (-float(scores[i]), i))
    kept: List[int] = []
    for i in order:
        if all(iou(boxes[i], boxes[j]) <= threshold or (classes is not None and classes[i] != classes[j]) for j in kept):
            kept.append(i)
    return kept


def roi_align_rotated(inp, rois, out_size, scale, sampling_ratio, aligned, clockwise) -> torch.Tensor:
    B, C, H, W = inp.shape
    PH, PW = out_size
    out = torch.zeros(len(rois), C, PH, PW, dtype=torch.float64)
    inp = inp.double()
    for k, r in enumerate(rois.tolist()):
        b, off = int(r[0]), (0.5 if aligned else 0.0)
        cx, cy, w, h = r[1] * scale - off, r[2] * scale - off, r[3] * scale, r[4] * scale
        th = -r[5] if clockwise else r[5]
        if not aligned:
            w, h = max(w, 1.0), max(h, 1.0)
        # adaptive: ceil(side / bins) as mmcv's, at most MAX_GRID (mmcv's has no bound)
        gh = sampling_ratio if sampling_ratio > 0 else min(MAX_GRID, max(0, math.ceil(h / PH)))
        gw = sampling_ratio if sampling_ratio > 0 else min(MAX_GRID, max(0, math.ceil(w / PW)))
        for ph in range(PH):
            for pw in range(PW):
                acc = torch.zeros(C, dtype=torch.float64)
                for iy in range(gh):
                    yy = -h / 2 + ph * h / PH + (iy + 0.5) * h / PH / gh
                    for ix in range(gw):
                        xx = -w / 2 + pw * w / PW + (ix + 0.5) * w / PW / gw
                        y = yy * math.cos(th) - xx * math.sin(th) + cy
                        x = yy * math.sin(th) + xx * math.cos(th) + cx
                        if y < -1 or y > H or x < -1 or x > W:
                            continue
                        y, x = max(y, 0.0), max(x, 0.0)
                        y0, x0 = int(y), int(x)
                        if y0 >= H - 1:
                            y0 = y1 = H - 1
                            y = float(y0)
                        else:
                            y1 = y0 + 1
                        if x0 >= W - 1:
                            x0 = x1 = W - 1
                            x = float(x0)
                        else:
                            x1 = x0 + 1
                        ly, lx = y - y0, x - x0
                        acc += (1 - ly) * (1 - lx) * inp[b, :, y0, x0] + (1 - ly) * lx * inp[b, :, y0, x1]
                        acc += ly * (1 - lx) * inp[b, :, y1, x0] + ly * lx * inp[b, :, y1, x1]
                out[k, :, ph, pw] = acc / max(gh * gw, 1)
    return out
