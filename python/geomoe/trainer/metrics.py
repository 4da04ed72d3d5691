"""Metrics and logging: sums over a log interval (`Window`; `MoEWindow` for a mixture-of-experts
model's loss, auxiliary losses, expert loads and gradient norm, kept on the device: one host sync
per record), and `MetricsLogger`: each record a line of metrics.jsonl, TensorBoard scalars where
asked for, and its printed line."""

from __future__ import annotations

import json
import os
import resource
import time
from typing import Any, Dict, Optional, Sequence

import torch
from tqdm import tqdm

from .. import distributed


def append_jsonl(path: str, record: Dict[str, Any]) -> None:
    """Append one JSON line. A run killed mid-write leaves a partial last line: the next record then
    starts on a line of its own (`geomoe report` skips the partial one)."""
    with open(path, "a+b") as f:
        f.seek(0, os.SEEK_END)
        if f.tell():
            f.seek(-1, os.SEEK_END)
            if f.read(1) != b"\n":
                f.write(b"\n")
        f.write((json.dumps(record) + "\n").encode())


def load_balance(loads: torch.Tensor) -> float:
    """Max over mean expert load, worst layer (1.0 is perfectly balanced)."""
    loads = loads.float()
    return float((loads.max(dim=-1).values / loads.mean(dim=-1).clamp_min(1e-9)).max()) if loads.numel() else 1.0


def memory_bytes(device: torch.device) -> int:
    """Peak memory: the device's allocator on a GPU, the process's resident set on a CPU."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024  # Linux reports KiB


class Window:
    """What every run kind counts over a log interval: the clock, bad steps and skipped images (the
    Trainer adds to both). Subclasses add their sums and make the record."""

    def __init__(self):
        self.reset()

    def reset(self) -> None:
        self.t0 = time.perf_counter()
        self.bad_steps = self.skipped_images = 0

    def start_clock(self) -> None:
        self.t0 = time.perf_counter()


class MoEWindow(Window):
    """Sums over a log interval kept on the device: one host sync per log line, not per step."""

    def __init__(self, device: torch.device):
        self.device = device
        super().__init__()

    def reset(self) -> None:
        super().reset()
        self.steps = self.images = self.tokens = 0
        self.loss = self.aux = self.grad_norm = self.loads = None

    def add(self, images: int, tokens: int, loss, aux, loads, grad_norm) -> None:
        self.steps += 1
        self.images += images
        self.tokens += tokens
        d = lambda acc, v: v.detach().float() if acc is None else acc + v.detach().float()
        self.loss, self.aux, self.grad_norm, self.loads = (
            d(self.loss, loss),
            d(self.aux, aux),
            d(self.grad_norm, grad_norm),
            d(self.loads, loads),
        )

    def record(self, step: int, lr: float, model, env: distributed.DistEnv) -> Optional[Dict[str, Any]]:
        seconds = time.perf_counter() - self.t0
        if self.steps == 0:
            rec = None
        else:
            n = self.steps
            # the loss and aux losses averaged over the ranks (equal shares of the global batch):
            # the global batch's loss, whatever the number of processes
            both = distributed.all_reduce(env, torch.cat([self.loss.reshape(1), self.aux.reshape(-1)])) / env.world
            self.loss, self.aux = both[0], both[1:]
            aux = (self.aux / n).tolist()
            loads = (self.loads / n).tolist()
            rec = {
                "step": step,
                "loss": float(self.loss) / n,
                "lr": lr,
                "images_per_s": self.images / seconds,
                "tokens_per_s": self.tokens / seconds,
                "aux": sum(aux) / max(len(aux), 1),
                "aux_per_layer": aux,
                "load_per_layer": loads,
                "load_max_over_mean": load_balance(self.loads / n),
                "expert_bias_per_layer": [m.expert_bias.tolist() for m in model.moe_layers()],
                "grad_norm": float(self.grad_norm) / n,
                "memory_bytes": memory_bytes(env.device),
                "bad_steps": self.bad_steps,
                "skipped_images": self.skipped_images,
                "world": env.world,
            }
        self.reset()
        return rec


class MetricsLogger:
    """Writes each record to <out>/metrics.jsonl, the `tensorboard_keys` of it as TensorBoard scalars
    (under <out>/tensorboard, where asked for and installed), and prints its line."""

    def __init__(self, out: str, tensorboard_keys: Sequence[str] = (), tensorboard: bool = True):
        self.path = os.path.join(out, "metrics.jsonl")
        self.keys = tuple(tensorboard_keys)
        self.writer = self._tensorboard(out) if self.keys and tensorboard else None

    @staticmethod
    def _tensorboard(out: str):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:  # tensorboard not installed: metrics.jsonl only
            return None
        return SummaryWriter(os.path.join(out, "tensorboard"))

    def write(self, record: Dict[str, Any], line: str) -> None:
        append_jsonl(self.path, record)
        if self.writer is not None:
            for key in self.keys:
                self.writer.add_scalar(key, record[key], record["step"])
        tqdm.write(line)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
