"""The learning-rate schedule: linear warm-up, then cosine from the peak to a floor, per step (a
function of the step alone: a resumed run follows the straight run's)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


def lr_at(step: int, total: int, peak: float, warmup: int, min_ratio: float) -> float:
    """Linear warm-up over `warmup` steps, then cosine from the peak to min_ratio * peak."""
    if step < warmup:
        return peak * (step + 1) / warmup
    t = (step - warmup) / max(1, total - warmup)
    return peak * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * min(t, 1.0))))


@dataclass(frozen=True)
class Schedule:
    """lr_at with a run's numbers: schedule(step) is the lr of 0-based `step`."""

    total: int
    peak: float
    warmup: int
    min_ratio: float

    def __call__(self, step: int) -> float:
        return lr_at(step, self.total, self.peak, self.warmup, self.min_ratio)


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Every group at `lr`, times its "lr_scale" where it has one (layer-wise decay)."""
    for group in optimizer.param_groups:
        group["lr"] = lr * group["lr_scale"] if "lr_scale" in group else lr
