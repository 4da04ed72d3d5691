"""The run-kind interface: what a kind of run (pretraining, fine-tuning, a dense task) supplies to
the one training loop (`trainer.loop.Trainer`). Everything else (the loop, bad-step and signal
handling, checkpoint cadence and atomic saves, resume, metrics lines) is the Trainer's and its
components'. docs/trainer.md says how a new run kind plugs in."""

from __future__ import annotations

from typing import Any, Dict, Iterable, List, Optional, Tuple

import torch
from torch import nn

from .checkpointing import Checkpointer
from .metrics import Window
from .placement import Placement
from .schedule import Schedule


class Task:
    """One run kind. `setup` builds everything below; the Trainer then runs the loop:

    for batch in task.loader(start, end):          # (images or None, ..., skipped: int)
        lr = task.schedule(step)
        why = task.train_step(batch, lr, step)      # None: trained; else why it was skipped
        step += 1                                   # bad steps counted, --max-bad-steps enforced
        if task.log_due(step, end): record = task.record(step, lr)  # evaluation goes here
        save if stopping, task.save_due(step), or every N steps / minutes (checkpointer)
    task.check_end(step); final save; return task.result(history, checkpoint, step)
    """

    kind: str = "run"  # the subcommand: "geomoe <kind>: ..." in the banner and messages
    multi_process: bool = False  # True: joins a torchrun job (distributed.setup); else one process
    tensorboard_keys: Tuple[str, ...] = ()  # record keys written as TensorBoard scalars (none: no writer)

    # set by setup() --------------------------------------------------------------------------------
    args: Any  # the run kind's dataclass: out, keep_last, progress, max_bad_steps, timeout are read
    trainer: Any  # the loop.Trainer running this task (its env, counters, agree()), set before setup
    model: nn.Module  # unwrapped: its state_dict is the checkpoint's weights
    wrapped: nn.Module  # what the step calls (DDP/FSDP wrapper, or the model itself)
    placement: Placement  # where the parameters live (one process, DDP, FSDP2, expert parallel)
    optimizer: torch.optim.Optimizer
    scaler: Any  # torch.amp.GradScaler (disabled where not fp16)
    schedule: Schedule  # lr of a step
    checkpointer: Checkpointer
    window: Window  # sums over a log interval; the Trainer adds bad steps and skipped images
    steps: int  # the run's total optimizer steps
    start: int = 0  # the first step of this process (a resume's checkpoint step)
    stop_after: Optional[int] = None  # end this process after N steps (with a checkpoint)
    run_id: str  # the run's identity (checkpoints of other runs are never pruned)
    run_args: Dict[str, Any]  # run-defining arguments: a resume with one changed is warned about

    def setup(self, trainer: Any) -> None:
        """Build the model, data, placement, optimizer + schedule and checkpointer; on a resume,
        restore (`self.checkpointer.restore(state)` sets `self.start`)."""
        raise NotImplementedError

    def loader(self, start: int, end: int) -> Iterable:
        """The batches of steps start..end-1, each a tuple (images or None when none decoded, ...,
        the number of unreadable samples skipped); the same batches whether or not resumed."""
        raise NotImplementedError

    def banner(self) -> str:
        """The line printed (rank 0) as the loop starts."""
        raise NotImplementedError

    def train_step(self, batch: Tuple[Any, ...], lr: float, step: int) -> Optional[str]:
        """Forward, loss, backward, optimizer step at `lr` (0-based `step`). Returns None when the
        step trained, else why it was skipped ("non-finite loss"): the Trainer warns and counts."""
        raise NotImplementedError

    def log_due(self, step: int, end: int) -> bool:
        """Whether a metrics record is made after `step` (1-based: steps done)."""
        raise NotImplementedError

    def record(self, step: int, lr: float) -> Optional[Dict[str, Any]]:
        """The metrics record of the interval ending at `step` (on every rank: it may be a
        collective); evaluation runs here. None: nothing to log."""
        raise NotImplementedError

    def log_line(self, record: Dict[str, Any]) -> str:
        """The printed line of a record (metrics.jsonl gets the record itself)."""
        raise NotImplementedError

    def save_due(self, step: int) -> bool:
        """A checkpoint the run kind wants after `step` besides the cadence (e.g. each epoch end)."""
        return False

    def checkpoint_state(self, step: int) -> Dict[str, Any]:
        """Entries of the run kind added to each checkpoint's training state (read back in setup)."""
        return {}

    def complete(self) -> Optional[Dict[str, Any]]:
        """A resumed run that is already at its end: the result to return without a loop; else None."""
        return None

    def check_end(self, step: int) -> None:
        """After the last step of a run that was not stopped, before its final save (e.g. refuse a
        run in which no image could be read)."""

    def result(self, history: List[Dict[str, Any]], checkpoint: Optional[str], step: int) -> Dict[str, Any]:
        """What the run returns (and its closing line)."""
        return {"history": history, "checkpoint": checkpoint, "model": self.model, "step": step}
