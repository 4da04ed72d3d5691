"""Fault handling: SIGTERM/SIGINT ask the loop to save and stop (`StopSignals`), a run of bad steps
ends the run (`BadSteps`, --max-bad-steps), ranks agree on a flag before acting on it (`agree`),
and a peer gone inside DDP/FSDP/DCP is named as such (`peer_failures`)."""

from __future__ import annotations

import contextlib
import os
import signal
import warnings
from typing import Any, Dict, Iterator, List, Optional

import torch
import torch.distributed as dist

from .. import distributed
from .rundir import LOCK_FDS

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class StopSignals:
    """SIGTERM or SIGINT (a scheduler's pre-emption, Ctrl-C, a kill to the whole process group) asks
    the loop to save a checkpoint and end after the current step; a second one ends the process at
    once, by that signal (the last checkpoint stands: saves are atomic). Data-loader workers ignore
    both (see `data.start_batches`), so a signal to the process group reaches the loop alone."""

    def __init__(self):
        self.received: Optional[str] = None
        self._old: Dict[int, Any] = {}

    @property
    def requested(self) -> bool:
        return self.received is not None

    def __enter__(self) -> "StopSignals":
        for sig in STOP_SIGNALS:
            try:
                self._old[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread: no handler, nothing to stop
                pass
        return self

    def _handle(self, signum, frame) -> None:
        name = signal.Signals(signum).name
        if self.received is None:
            self.received = name
            os.write(2, f"\n{name}: saving a checkpoint after this step, then stopping (again: stop at once)\n".encode())
            return
        os.write(2, f"\n{name} again: stopping at once; the last checkpoint stands\n".encode())
        signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)

    def __exit__(self, *exc) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)
        self._old.clear()


def ignore_stop_signals(worker_id: int) -> None:
    """Data-loader worker start: SIGTERM and SIGINT sent to the process group are the main
    process's to answer (it saves and stops, then shuts the workers down). A forked worker also lets
    go of the run-directory lock it inherited, which would otherwise outlive a killed main process."""
    for sig in STOP_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)
    for fd in list(LOCK_FDS):
        try:
            os.close(fd)
        except OSError:
            pass
    LOCK_FDS.clear()
    if hasattr(signal, "pthread_sigmask"):
        signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)


def agree(env: distributed.DistEnv, *flags: bool) -> List[bool]:
    """Each flag true on every rank if it is true on any (so all ranks save and stop together)."""
    if not env.enabled:
        return list(flags)
    t = torch.tensor([1.0 if f else 0.0 for f in flags], device=env.device)
    return [bool(v) for v in distributed.all_reduce(env, t, dist.ReduceOp.MAX).tolist()]


class BadSteps:
    """Steps skipped in a row (a non-finite loss, no readable image): each one warned about (where
    `warn`), and --max-bad-steps of them in a row end the run (the last checkpoint stands)."""

    def __init__(self, limit: int, out: str, warn: bool = True):
        self.limit, self.out, self.warn, self.in_row = limit, out, warn, 0

    def ok(self) -> None:
        self.in_row = 0

    def bad(self, step: int, why: str) -> None:
        """Step `step` (1-based) was skipped because `why`."""
        self.in_row += 1
        if self.warn:
            warnings.warn(f"step {step}: {why}, step skipped ({self.in_row} in a row)")
        if self.in_row >= self.limit:
            raise distributed.RunFailure(
                f"stopping at step {step}: {self.in_row} steps in a row had a non-finite loss or no readable "
                f"images (--max-bad-steps {self.limit}); the last checkpoint in {self.out} is intact"
            )


@contextlib.contextmanager
def peer_failures(env: distributed.DistEnv) -> Iterator[None]:
    """A RuntimeError that is a peer gone inside DDP/FSDP/DCP: say so, not the backend's words."""
    try:
        yield
    except RuntimeError as exc:
        failure = distributed.peer_failure(env, exc)
        if failure is None:
            raise
        raise failure from exc
