"""The one training loop every run kind shares (`Trainer`), and `launch`: the process around it
(stop signals, the torchrun job or one process, the lock on the run directory, a peer's failure
named as such). What differs between run kinds comes from their `Task` (task.py)."""

from __future__ import annotations

import contextlib
import time
import warnings
from typing import Any, Dict, List, Optional

from tqdm import tqdm

from .. import distributed
from ..checks import check_torch_cache_dir, resolve_device
from .data import start_batches
from .faults import BadSteps, StopSignals, agree, peer_failures
from .metrics import MetricsLogger
from .rundir import RunDirectory
from .task import Task


class Counters:
    """What the loop counts over this process's steps: steps that trained, whether any image
    decoded, images skipped as unreadable."""

    def __init__(self):
        self.trained, self.read_any, self.unreadable = 0, False, 0


class Trainer:
    """Runs a Task: `task.setup(self)` at construction, then `run()`: the loop (see Task)."""

    def __init__(self, task: Task, env: distributed.DistEnv, stop: StopSignals):
        self.task, self.env, self.stop = task, env, stop
        self.counters = Counters()
        task.trainer = self
        task.setup(self)

    def agree(self, *flags: bool) -> List[bool]:
        """Each flag true on every rank if it is true on any."""
        return agree(self.env, *flags)

    def run(self) -> Dict[str, Any]:
        """The loop; a normal end or a signal commits every save (the last one included); an
        exception finishes and commits a save in flight (or removes it) before it propagates."""
        try:
            return self._loop()
        except BaseException:
            try:
                self.task.checkpointer.settle_pending()
            except Exception as exc:  # the run's own error is the one to see
                warnings.warn(f"the save in flight could not be settled ({type(exc).__name__}: {exc})")
            raise

    def _save_cadence(self, step: int, end: int, last_save: float) -> Any:
        """(stopping, due): a signal asked to stop (on any rank), or a save is due after `step`: the
        run kind's (an epoch end), every --save-every steps, or --save-minutes since the last one
        (rank 0's clock decides for all: one all-reduce)."""
        args, task = self.task.args, self.task
        minutes = getattr(args, "save_minutes", 0)
        timed = bool(minutes) and self.env.main and time.monotonic() - last_save >= 60 * minutes
        stopping, timed = self.agree(self.stop.requested, timed)
        every = getattr(args, "save_every", 0)
        due = timed or bool(every and step % every == 0)
        return stopping, task.save_due(step) or (due and step != end)

    def _loop(self) -> Dict[str, Any]:
        task, env = self.task, self.env
        done = task.complete()
        if done is not None:
            return done
        start = step = task.start
        end = task.steps if task.stop_after is None else min(task.steps, start + task.stop_after)
        loader = task.loader(start, end)
        if env.main:
            print(task.banner())
        logger = (
            MetricsLogger(task.args.out, task.tensorboard_keys, getattr(task.args, "tensorboard", True)) if env.main else None
        )
        bar = tqdm(
            total=task.steps, initial=start, disable=not (task.args.progress and env.main), dynamic_ncols=True, leave=False
        )
        history: List[Dict[str, Any]] = []
        bad = BadSteps(task.args.max_bad_steps, task.args.out, warn=env.main)
        final: Optional[str] = None
        saved_at, stopped, last_save = None, False, time.monotonic()
        task.window.start_clock()
        task.wrapped.train()
        for batch in start_batches(loader):
            step = self._step(batch, step, bad)
            bar.update(1)
            if task.log_due(step, end):
                record = task.record(step, self._lr)
                if env.main and record is not None:
                    history.append(record)
                    logger.write(record, task.log_line(record))
            stopping, due = self._save_cadence(step, end, last_save)
            if stopping or due:
                final, saved_at, last_save = task.checkpointer.save(step, final=stopping), step, time.monotonic()
            if stopping:
                if env.main:
                    print(f"{self.stop.received or 'SIGTERM'}: stopped at step {step}; checkpoint {final}")
                stopped = True
                break
        if not stopped:
            task.check_end(step)
            if step > start and saved_at != step:
                final = task.checkpointer.save(step, final=True)
        bar.close()
        if logger is not None:
            logger.close()
        return task.result(history, final, step)

    def _step(self, batch, step: int, bad: BadSteps) -> int:
        """One step of the loop: the lr, the task's step, the counts; returns the steps done."""
        task, counters = self.task, self.counters
        self._lr = lr = task.schedule(step)
        why = task.train_step(batch, lr, step)
        skipped = int(batch[-1])
        task.window.skipped_images += skipped
        counters.read_any, counters.unreadable = counters.read_any or batch[0] is not None, counters.unreadable + skipped
        step += 1
        if why is None:
            counters.trained += 1
            bad.ok()
        else:
            task.window.bad_steps += 1
            bad.bad(step, why)
        return step


def launch(task: Task, device: str, timeout: float) -> Dict[str, Any]:
    """Run `task` in this process: stop signals caught from the start (a signal during set-up stops
    the run after its first step), the torchrun job joined (task.multi_process) or one process on
    `device`, the run directory locked by the rank that writes it, a peer's failure named as such."""
    check_torch_cache_dir()
    with StopSignals() as stop:
        if task.multi_process:
            env = distributed.setup(device, timeout)
        else:
            env = distributed.DistEnv(0, 1, 0, resolve_device(device), timeout)
        try:
            with peer_failures(env):
                with RunDirectory(task.args.out) if env.main else contextlib.nullcontext():
                    result = Trainer(task, env, stop).run()
            distributed.barrier(env)  # on success only: no rank tears gloo down while another still talks to it
            return result
        finally:
            distributed.teardown(env)
