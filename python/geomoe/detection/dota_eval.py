"""Rotated-box mean average precision as DOTA and DIOR-R report it (mmrotate's DOTAMetric and
eval_rbbox_map): per class, the detections of every image ranked by score; a detection is a true
positive when its best rotated IoU with an unmatched ground truth of its image and class is >= the
threshold (0.5), a false positive otherwise (a match to a "difficult" ground truth counts as
neither); AP is the VOC07 11-point interpolation (mean over recall 0, 0.1, ..., 1 of the best
precision at that recall or above: the published DIOR-R figure) or the area under the precision
envelope; mAP averages the classes that have ground truth."""

from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence

import torch
from torch import Tensor

from geomoe_kernels import box_iou_rotated


@dataclass
class ImageBoxes:
    boxes: Tensor  # [n, 5] le90 rboxes
    labels: Tensor  # [n] int64
    scores: Optional[Tensor] = None  # detections only
    difficult: Optional[Tensor] = None  # ground truth only: [n] bool


def average_precision(recall: Tensor, precision: Tensor, mode: str = "11points") -> float:
    """AP of a ranked list's recall/precision curve (float64 [n])."""
    if mode == "11points":
        total = 0.0
        for t in torch.linspace(0, 1, 11, dtype=torch.float64):
            above = precision[recall >= t - 1e-12]
            total += float(above.max()) if above.numel() else 0.0
        return total / 11
    if mode != "area":
        raise ValueError(f"mode expected '11points' or 'area', got {mode!r}")
    r = torch.cat([recall.new_zeros(1), recall, recall.new_ones(1)])
    p = torch.cat([precision.new_zeros(1), precision, precision.new_zeros(1)])
    p = torch.flip(torch.cummax(torch.flip(p, [0]), 0).values, [0])  # the envelope
    step = torch.nonzero(r[1:] != r[:-1]).view(-1)
    return float(((r[step + 1] - r[step]) * p[step + 1]).sum())


def _class_ranking(dets: Sequence[ImageBoxes], gts: Sequence[ImageBoxes], cls: int, iou_thr: float):
    """(true positive flags, false positive flags) of class `cls`'s detections by decreasing score,
    and its number of non-difficult ground truths."""
    scores, image_of, det_boxes = [], [], []
    for i, d in enumerate(dets):
        keep = d.labels == cls
        scores.append(d.scores[keep].double())
        det_boxes.append(d.boxes[keep].double())
        image_of += [i] * int(keep.sum())
    score = torch.cat(scores) if scores else torch.zeros(0, dtype=torch.float64)
    order = torch.sort(score, descending=True, stable=True).indices.tolist()
    flat = torch.cat(det_boxes) if det_boxes else torch.zeros(0, 5, dtype=torch.float64)
    gt_of = [g.boxes[g.labels == cls].double() for g in gts]
    hard_of = [
        (g.difficult[g.labels == cls] if g.difficult is not None else torch.zeros(len(b), dtype=torch.bool))
        for g, b in zip(gts, gt_of)
    ]
    used = [torch.zeros(len(b), dtype=torch.bool) for b in gt_of]
    tp, fp = torch.zeros(len(order), dtype=torch.float64), torch.zeros(len(order), dtype=torch.float64)
    for rank, k in enumerate(order):
        i = image_of[k]
        if len(gt_of[i]) == 0:
            fp[rank] = 1
            continue
        iou = box_iou_rotated(flat[k : k + 1], gt_of[i])[0]
        best, j = (float(v) for v in iou.max(0))
        j = int(j)
        if best >= iou_thr:
            if hard_of[i][j]:
                continue  # matched to a difficult object: neither
            if not used[i][j]:
                used[i][j] = True
                tp[rank] = 1
            else:
                fp[rank] = 1
        else:
            fp[rank] = 1
    num_gts = sum(int((~h).sum()) for h in hard_of)
    return tp, fp, num_gts


def rotated_map(
    dets: Sequence[ImageBoxes], gts: Sequence[ImageBoxes], num_classes: int, iou_thr: float = 0.5, mode: str = "11points"
) -> Dict[str, object]:
    """{"mAP": mean AP over classes with ground truth, "AP": [per class, None without ground truth],
    "recall": [per class, final recall]} for detections and ground truths of the same images."""
    if len(dets) != len(gts):
        raise ValueError(f"rotated_map: {len(dets)} images of detections but {len(gts)} of ground truth")
    aps: List[Optional[float]] = []
    recalls: List[Optional[float]] = []
    for cls in range(num_classes):
        tp, fp, num_gts = _class_ranking(dets, gts, cls, iou_thr)
        if num_gts == 0:
            aps.append(None)
            recalls.append(None)
            continue
        ctp, cfp = torch.cumsum(tp, 0), torch.cumsum(fp, 0)
        recall = ctp / num_gts
        precision = ctp / torch.clamp(ctp + cfp, min=torch.finfo(torch.float64).eps)
        aps.append(average_precision(recall, precision, mode))
        recalls.append(float(recall[-1]) if recall.numel() else 0.0)
    present = [a for a in aps if a is not None]
    return {"mAP": sum(present) / len(present) if present else 0.0, "AP": aps, "recall": recalls}
