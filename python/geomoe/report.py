"""geomoe report RUN_DIR: plots of a run's metrics.jsonl (loss and lr, throughput, the expert load of
every MoE layer over the steps as a heatmap), written as PNG files into the run directory."""

from __future__ import annotations

import json
import os
import warnings
from typing import Any, Dict, List


def read_metrics(run_dir: str) -> List[Dict[str, Any]]:
    """The records of RUN_DIR/metrics.jsonl. A line that is not a whole JSON record (a run killed
    while writing it leaves a partial last line) is skipped with a warning naming it."""
    path = os.path.join(run_dir, "metrics.jsonl")
    if not os.path.exists(path):
        raise FileNotFoundError(f"argument 'RUN_DIR' expected a run directory with metrics.jsonl, got {run_dir!r}")
    rows, broken = [], []
    with open(path, errors="replace") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                row = None
            if isinstance(row, dict) and "step" in row:
                rows.append(row)
            else:
                broken.append(number)
    if broken:
        warnings.warn(
            f"{path}: skipped line(s) {', '.join(map(str, broken[:10]))}"
            f"{' ...' if len(broken) > 10 else ''}: not a whole metrics record (a run stopped while writing it?)"
        )
    if not rows:
        raise ValueError(f"argument 'RUN_DIR' expected metrics records in {path}, got none yet")
    return rows


def write_report(run_dir: str) -> List[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    rows = read_metrics(run_dir)
    steps = [r["step"] for r in rows]
    made = []

    def series(key: str):
        """(steps, values) of the records that have `key` (a line may lack a field: older or other runs)."""
        have = [r for r in rows if isinstance(r.get(key), (int, float))]
        return [r["step"] for r in have], [r[key] for r in have]

    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(*series("loss"), label="loss (norm-pix MSE)")
    ax.set(xlabel="step", ylabel="loss", title="pretraining loss")
    if series("lr")[0]:
        twin = ax.twinx()
        twin.plot(*series("lr"), color="tab:gray", alpha=0.6, label="lr")
        twin.set_ylabel("learning rate")
    ax.grid(True, alpha=0.3)
    made.append(_save(fig, run_dir, "loss.png"))

    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(*series("images_per_s"), label="images/s")
    ax.set(xlabel="step", ylabel="images / s", title="throughput (all ranks)")
    if series("tokens_per_s")[0]:
        twin = ax.twinx()
        twin.plot(*series("tokens_per_s"), color="tab:orange", alpha=0.6)
        twin.set_ylabel("encoder tokens / s")
    ax.grid(True, alpha=0.3)
    made.append(_save(fig, run_dir, "throughput.png"))

    loads = np.array([r["load_per_layer"] for r in rows if r.get("load_per_layer")], dtype=float)  # [t, L, E]
    if loads.size:
        share = loads / loads.sum(-1, keepdims=True).clip(min=1e-9) * loads.shape[-1]  # 1 = a fair share
        L = share.shape[1]
        fig, axes = plt.subplots(L, 1, figsize=(8, 1.2 + 1.4 * L), squeeze=False, sharex=True)
        for i in range(L):
            im = axes[i, 0].imshow(
                share[:, i, :].T,
                aspect="auto",
                cmap="viridis",
                origin="lower",
                extent=[steps[0], steps[-1], -0.5, share.shape[-1] - 0.5],
                vmin=0,
                vmax=max(2.0, share.max()),
            )
            axes[i, 0].set_ylabel(f"layer {i}\nexpert")
        axes[-1, 0].set_xlabel("step")
        fig.colorbar(im, ax=axes[:, 0].tolist(), label="load / fair share")
        fig.suptitle("expert load over the run")
        made.append(_save(fig, run_dir, "expert_load.png", tight=False))
    return made


def _save(fig, run_dir: str, name: str, tight: bool = True) -> str:
    import matplotlib.pyplot as plt

    path = os.path.join(run_dir, name)
    if tight:
        fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
