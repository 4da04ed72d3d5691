"""One training loop for every run kind (docs/trainer.md): the `Trainer` (loop.py) built from
components, one file each: data, schedule (optimizer lr), placement (model), checkpointing, metrics,
faults, rundir; a run kind supplies a `Task` (task.py)."""

from .checkpointing import Checkpointer
from .faults import StopSignals
from .loop import Trainer, launch
from .metrics import MetricsLogger, MoEWindow, Window
from .placement import Placement
from .schedule import Schedule, lr_at, set_lr
from .task import Task

__all__ = [
    "Checkpointer",
    "MetricsLogger",
    "MoEWindow",
    "Placement",
    "Schedule",
    "StopSignals",
    "Task",
    "Trainer",
    "Window",
    "launch",
    "lr_at",
    "set_lr",
]
