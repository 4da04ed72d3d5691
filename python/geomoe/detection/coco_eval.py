"""COCO box AP (pycocotools' COCOeval, the published DIOR metric: bbox_mAP and bbox_mAP_50) from
detections and ground truths held in memory. pycocotools is optional: imported when called."""

from __future__ import annotations

import contextlib
import io
from typing import Dict, List, Sequence

import torch
from torch import Tensor


def _xywh(boxes: Tensor) -> List[List[float]]:
    b = boxes.detach().double().cpu()
    return torch.stack([b[:, 0], b[:, 1], b[:, 2] - b[:, 0], b[:, 3] - b[:, 1]], 1).tolist()


def coco_ap(
    detections: Sequence[Dict[str, Tensor]], ground_truths: Sequence[Dict[str, Tensor]], class_names: Sequence[str]
) -> Dict[str, float]:
    """Per image {"boxes" xyxy, "scores", "labels" 0..C-1} and {"boxes", "labels"} -> {"bbox_mAP",
    "bbox_mAP_50", "bbox_mAP_75", "AP50/<class>" ...} (COCOeval's, -1 where a class has no ground truth)."""
    try:
        from pycocotools.coco import COCO
        from pycocotools.cocoeval import COCOeval
    except ImportError as exc:  # pragma: no cover - depends on the install
        raise RuntimeError("COCO evaluation needs pycocotools: pip install pycocotools") from exc
    if len(detections) != len(ground_truths):
        raise ValueError(f"coco_ap: {len(detections)} detection lists for {len(ground_truths)} images")
    images, anns, dets = [], [], []
    for i, (d, g) in enumerate(zip(detections, ground_truths)):
        images.append({"id": i + 1, "width": 0, "height": 0})
        for box, lab in zip(_xywh(g["boxes"]), g["labels"].tolist()):
            anns.append({"id": len(anns) + 1, "image_id": i + 1, "category_id": int(lab) + 1, "bbox": box, "area": box[2] * box[3], "iscrowd": 0})
        for box, s, lab in zip(_xywh(d["boxes"]), d["scores"].tolist(), d["labels"].tolist()):
            dets.append({"image_id": i + 1, "category_id": int(lab) + 1, "bbox": box, "score": float(s)})
    gt = COCO()
    gt.dataset = {"images": images, "annotations": anns, "categories": [{"id": k + 1, "name": n} for k, n in enumerate(class_names)]}
    with contextlib.redirect_stdout(io.StringIO()):
        gt.createIndex()
        dt = gt.loadRes(dets) if dets else COCO()
        if not dets:
            dt.dataset = {"images": images, "annotations": [], "categories": gt.dataset["categories"]}
            dt.createIndex()
        ev = COCOeval(gt, dt, "bbox")
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    out = {"bbox_mAP": float(ev.stats[0]), "bbox_mAP_50": float(ev.stats[1]), "bbox_mAP_75": float(ev.stats[2])}
    prec = ev.eval["precision"]  # [T, R, K, A, M]: IoU thresholds, recall points, classes, areas, max dets
    for k, name in enumerate(class_names):
        p = prec[0, :, k, 0, -1]
        p = p[p > -1]
        out[f"AP50/{name}"] = float(p.mean()) if p.size else -1.0
    return out
