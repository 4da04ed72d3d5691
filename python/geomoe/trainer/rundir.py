"""The run's directory and identity: the lock a run holds on its --out, the refusal of a new run
into a directory holding another run's checkpoints, the run id, and the warning when a resume
changes run-defining arguments."""

from __future__ import annotations

import os
import uuid
import warnings
from typing import Any, Dict, Optional

from .. import checkpoint
from ..checks import flag

LOCK_FDS: set = set()  # run-directory locks this process holds (forked loader workers close them)


def new_run_id() -> str:
    return uuid.uuid4().hex[:16]


class RunDirectory:
    """A run's claim on its directory, taken by the process that writes checkpoints: an exclusive
    lock (a second process on the same directory is refused while the first runs; the kernel drops
    the lock when the process ends, however it ends), and recovery of an interrupted re-save."""

    def __init__(self, directory: str, flag: str = "--out"):
        self.directory, self.flag, self._fd = directory, flag, None

    def __enter__(self) -> "RunDirectory":
        os.makedirs(self.directory, exist_ok=True)
        self._path = os.path.join(self.directory, ".lock")
        while True:
            fd = os.open(self._path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                import fcntl

                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.read(fd, 64).decode(errors="replace").strip() or "?"
                os.close(fd)
                raise RuntimeError(
                    f"argument '{self.flag}' expected a directory no other run is using, got {self.directory!r}: "
                    f"process {holder} holds it (two runs cannot share a run directory)"
                ) from None
            except (ImportError, OSError):  # no flock here (Windows, some network filesystems): go on unlocked
                break
            # the holder before us removes the file as it lets go: a lock on a removed file is no lock
            try:
                if os.stat(self._path).st_ino == os.fstat(fd).st_ino:
                    break
            except FileNotFoundError:
                pass
            os.close(fd)
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())
        self._fd = fd
        LOCK_FDS.add(fd)
        checkpoint.recover(self.directory)
        return self

    def __exit__(self, *exc) -> None:
        if self._fd is not None:
            LOCK_FDS.discard(self._fd)
            try:  # removed while held, so no file is left behind (a killed run leaves it: harmless)
                os.unlink(self._path)
            except OSError:
                pass
            os.close(self._fd)  # drops the lock
            self._fd = None


def refuse_fresh_run_into_used_directory(directory: str, resume: Optional[str], flag: str = "--out") -> None:
    """A run without --resume starts only in a directory that holds no checkpoints: it would
    otherwise mix its checkpoints with another run's (and a later --resume auto would pick theirs)."""
    if resume:
        return
    found = checkpoint.list_checkpoints(directory)
    if found:
        names = ", ".join(os.path.basename(p) for p in found[-3:])
        more = f" and {len(found) - 3} older" if len(found) > 3 else ""
        raise RuntimeError(
            f"argument '{flag}' expected a directory without checkpoints for a new run, got {directory!r}, which holds "
            f"{names}{more} of an earlier run: pass --resume auto to continue that run, or give a new {flag} "
            f"(nothing in it was changed)"
        )


def run_identity(state: Optional[Dict[str, Any]]) -> str:
    """The run id a resumed run carries on; a new one for a fresh run (or an old checkpoint without one)."""
    run = (state or {}).get("run")
    return run["id"] if isinstance(run, dict) and run.get("id") else new_run_id()


def warn_changed_run_arguments(state: Dict[str, Any], now: Dict[str, Any], warn: bool = True) -> None:
    """Resuming with run-defining arguments (seed, batch size, lr, ...) other than the checkpoint's
    gives a run that no straight run matches: say which changed (where `warn`: one rank says it). A
    different --config cannot load: an error."""
    then = state.get("run")
    if not isinstance(then, dict):
        return
    for key in ("model", "config"):
        if key in then and key in now and then[key] != now[key]:
            raise ValueError(
                f"checkpoint {state['path']} was written by a run with --{key} {then[key]}; this run has "
                f"--{key} {now[key]}: resume it with --{key} {then[key]}, or start a new run from its weights "
                f"(--init-weights, fine-tuning --weights)"
            )
    label = lambda k: "global batch (--batch-size x processes)" if k == "global_batch" else flag(k)
    changed = [f"{label(k)} {then[k]!r} -> {v!r}" for k, v in now.items() if k in then and then[k] != v]
    if changed and warn:
        warnings.warn(
            f"resuming {state['path']} with run-defining arguments changed since it was written: {', '.join(changed)}; "
            "the result will differ from a straight run"
        )
