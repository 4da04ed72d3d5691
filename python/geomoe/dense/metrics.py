"""Segmentation metrics as the published evaluation computes them (the OpenMMLab IoU metric), from
one confusion matrix accumulated over every image and, under DDP, summed over the processes.

counts[c, p]: pixels of label c (ignore index excluded) predicted p; a last column counts pixels
predicted as a class the dataset does not have (the published SpaceNet head has 7 outputs for 2
classes: such predictions are no class's prediction, as in the published count). Per class c:
  IoU = I / (P + L - I), Acc = I / L, Precision = I / P, Recall = I / L,
  Fscore = 2 Precision Recall / (Precision + Recall)
with I = counts[c, c], L = the row's sum (all its pixels), P = the column's sum over labelled pixels.
aAcc = sum I / sum L. The means (mIoU, mAcc, mFscore, ...) skip classes whose value is undefined
(NaN: 0 / 0); every value is a percentage, rounded to 2 decimals as published."""

from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence

import numpy as np
import torch
from torch import Tensor

from .uperhead import IGNORE_INDEX


class ConfusionMatrix:
    def __init__(self, num_classes: int, ignore_index: int = IGNORE_INDEX, device=None):
        if num_classes < 1:
            raise ValueError(f"argument 'num_classes' expected at least 1, got {num_classes}")
        self.num_classes, self.ignore_index = num_classes, ignore_index
        self.counts = torch.zeros(num_classes, num_classes + 1, dtype=torch.int64, device=device)

    def update(self, pred: Tensor, label: Tensor) -> None:
        """pred, label: integer maps of the same shape (any batch)."""
        if pred.shape != label.shape:
            raise ValueError(
                f"ConfusionMatrix.update: pred shape {list(pred.shape)} differs from label shape {list(label.shape)}"
            )
        C = self.num_classes
        label = label.reshape(-1).long()
        pred = pred.reshape(-1).long()
        keep = label != self.ignore_index
        label, pred = label[keep], pred[keep]
        pred = torch.where((pred >= 0) & (pred < C), pred, torch.full_like(pred, C))
        idx = label.clamp(0, C - 1) * (C + 1) + pred
        self.counts += torch.bincount(idx, minlength=C * (C + 1)).reshape(C, C + 1).to(self.counts.device)

    def all_reduce(self) -> None:
        """Sum over the processes of the default group (no-op without one)."""
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(self.counts)

    def compute(self, class_names: Optional[Sequence[str]] = None) -> Dict[str, Any]:
        return metrics_from_counts(self.counts.cpu().numpy(), class_names)


def _pct(x: float) -> Optional[float]:
    return None if np.isnan(x) else round(float(x) * 100, 2)


def metrics_from_counts(counts: np.ndarray, class_names: Optional[Sequence[str]] = None) -> Dict[str, Any]:
    """{"aAcc", "mIoU", "mAcc", "mFscore", "mPrecision", "mRecall", "per_class": [{class, IoU, Acc,
    Fscore, Precision, Recall}]} from counts [C, C + 1] (a [C, C] matrix is accepted too)."""
    counts = np.asarray(counts, dtype=np.float64)
    C = counts.shape[0]
    names: List[str] = list(class_names) if class_names is not None else [str(c) for c in range(C)]
    inter = np.diag(counts[:, :C])
    area_label = counts.sum(1)
    area_pred = counts[:, :C].sum(0)
    union = area_pred + area_label - inter
    with np.errstate(divide="ignore", invalid="ignore"):
        iou = inter / union
        acc = inter / area_label
        precision = inter / area_pred
        recall = acc
        fscore = 2 * precision * recall / (precision + recall)
        aacc = inter.sum() / area_label.sum()

    def mean(v: np.ndarray) -> Optional[float]:
        return None if np.all(np.isnan(v)) else _pct(np.nanmean(v))

    per_class = [
        dict(
            class_=names[c],
            IoU=_pct(iou[c]),
            Acc=_pct(acc[c]),
            Fscore=_pct(fscore[c]),
            Precision=_pct(precision[c]),
            Recall=_pct(recall[c]),
        )
        for c in range(C)
    ]
    for p in per_class:
        p["class"] = p.pop("class_")
    return dict(
        aAcc=_pct(aacc),
        mIoU=mean(iou),
        mAcc=mean(acc),
        mFscore=mean(fscore),
        mPrecision=mean(precision),
        mRecall=mean(recall),
        per_class=per_class,
    )


def metrics_line(m: Dict[str, Any]) -> str:
    """The published log line's form: 'aAcc: 96.4200 mIoU: 78.2200 mAcc: 87.1400 mFscore: 86.6200'."""

    def f(v):
        return "nan" if v is None else f"{v:.4f}"

    return " ".join(f"{k}: {f(m[k])}" for k in ("aAcc", "mIoU", "mAcc", "mFscore"))
