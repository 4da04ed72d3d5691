"""What the pretraining and fine-tuning loops share: device choice, the warm-up + cosine schedule,
the resumable data loader, the state a checkpoint carries, argument checks, the run's claim on its
directory, and stopping on SIGTERM/SIGINT."""

from __future__ import annotations

import json
import math
import os
import signal
import uuid
import warnings
from dataclasses import asdict
from typing import Any, Dict, Iterator, Optional

import torch
from torch.utils.data import DataLoader, Dataset

from .data import ResumableBatchSampler
from .envvars import env_number  # noqa: F401  (also public here)

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)
_LOCK_FDS: set = set()  # run-directory locks this process holds (forked loader workers close them)


def resolve_device(name: str) -> torch.device:
    """'auto', 'cpu', 'cuda' or 'cuda:N' -> a device this machine has; a clear error otherwise."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except (RuntimeError, ValueError) as exc:
        raise ValueError(f"argument '--device' expected auto, cpu, cuda or cuda:N, got {name!r}") from exc
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            built = f"built with CUDA {torch.version.cuda}" if torch.version.cuda else "a CPU-only build"
            raise ValueError(
                f"argument '--device' expected a device this machine has, got {name!r}, but torch sees no CUDA GPU "
                f"(torch {torch.__version__}, {built}); use --device cpu or auto"
            )
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(
                f"argument '--device' expected cuda:0 to cuda:{torch.cuda.device_count() - 1} (the GPUs here), got {name!r}"
            )
    elif dev.type != "cpu":
        raise ValueError(f"argument '--device' expected auto, cpu, cuda or cuda:N, got {name!r}")
    return dev


# ---- argument checks -----------------------------------------------------------------------------


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def check_int(name: str, value: Any, minimum: int, optional: bool = False, maximum: Optional[int] = None) -> None:
    """An integer >= minimum (and <= maximum; None allowed when optional: the preset's value); the
    error names the flag."""
    if value is None and optional:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum or (maximum is not None and value > maximum):
        want = f">= {minimum}" if maximum is None else f"in [{minimum}, {maximum}]"
        raise ValueError(f"argument '{_flag(name)}' expected an integer {want}, got {value!r}")


def check_float(
    name: str,
    value: Any,
    low: float,
    high: float = math.inf,
    low_open: bool = False,
    high_open: bool = False,
    optional: bool = False,
) -> None:
    """A finite number in the interval [low, high] (open ends as asked); the error names the flag."""
    if value is None and optional:
        return
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    ok = ok and (value > low if low_open else value >= low) and (value < high if high_open else value <= high)
    if not ok:
        lo = f"{'(' if low_open else '['}{low:g}"
        hi = "inf)" if high == math.inf else f"{high:g}{')' if high_open else ']'}"
        raise ValueError(f"argument '{_flag(name)}' expected a finite number in {lo}, {hi}, got {value!r}")


def check_torch_cache_dir() -> None:
    """TORCHINDUCTOR_CACHE_DIR, where set, must be a directory torch can make: its optimizers import
    dynamo, which makes it (a file in the way ended a run deep in torch, or, after an earlier failed
    import was caught, with "Artifact of type=precompile already registered")."""
    path = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    if not path:
        return
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as exc:
        raise ValueError(
            f"environment variable TORCHINDUCTOR_CACHE_DIR expected a directory torch can create, got {path!r} "
            f"({type(exc).__name__}: {exc.strerror or exc})"
        ) from exc


# ---- the run's directory and identity ------------------------------------------------------------


def new_run_id() -> str:
    return uuid.uuid4().hex[:16]


class RunDirectory:
    """A run's claim on its directory, taken by the process that writes checkpoints: an exclusive
    lock (a second process on the same directory is refused while the first runs; the kernel drops
    the lock when the process ends, however it ends), and recovery of an interrupted re-save."""

    def __init__(self, directory: str, flag: str = "--out"):
        self.directory, self.flag, self._fd = directory, flag, None

    def __enter__(self) -> "RunDirectory":
        from . import checkpoint

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
        _LOCK_FDS.add(fd)
        checkpoint.recover(self.directory)
        return self

    def __exit__(self, *exc) -> None:
        if self._fd is not None:
            _LOCK_FDS.discard(self._fd)
            try:  # removed while held, so no file is left behind (a killed run leaves it: harmless)
                os.unlink(self._path)
            except OSError:
                pass
            os.close(self._fd)  # drops the lock
            self._fd = None


def refuse_fresh_run_into_used_directory(directory: str, resume: Optional[str], flag: str = "--out") -> None:
    """A run without --resume starts only in a directory that holds no checkpoints: it would
    otherwise mix its checkpoints with another run's (and a later --resume auto would pick theirs)."""
    from . import checkpoint

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
    label = lambda k: "global batch (--batch-size x processes)" if k == "global_batch" else _flag(k)
    changed = [f"{label(k)} {then[k]!r} -> {v!r}" for k, v in now.items() if k in then and then[k] != v]
    if changed and warn:
        warnings.warn(
            f"resuming {state['path']} with run-defining arguments changed since it was written: {', '.join(changed)}; "
            "the result will differ from a straight run"
        )


def describe_run(state: Dict[str, Any]) -> str:
    """What run wrote a checkpoint, in flags (its "run" or "config" record), for errors."""
    rec = state.get("run") if isinstance(state.get("run"), dict) else state.get("config")
    if not isinstance(rec, dict):
        return "a run of an unrecorded model"
    parts = [f"--{k} {rec[k]}" for k in ("model", "config") if rec.get(k) is not None]
    if rec.get("in_chans") is not None:
        parts.append(f"{rec['in_chans']} bands")
    return ", ".join(parts) or "a run of an unrecorded model"


def check_checkpoint_fits(state: Dict[str, Any], model_state: Dict[str, torch.Tensor], asked: str, held: str = "") -> None:
    """Resuming: the checkpoint's weights (`state["model"]`) must be the run's model's tensors, with
    their shapes; else a ValueError says what the checkpoint holds (`held`: more about it, e.g. a
    class count) and what this run asked for (`asked`), with counts and the first names that differ,
    instead of load_state_dict's list of every key."""
    saved = state["model"]
    missing = [k for k in model_state if k not in saved]
    unexpected = [k for k in saved if k not in model_state]
    shapes = [
        f"{k}: checkpoint {list(saved[k].shape)}, this run {list(v.shape)}"
        for k, v in model_state.items()
        if k in saved and tuple(saved[k].shape) != tuple(v.shape)
    ]
    if not (missing or unexpected or shapes):
        return
    first = lambda names: ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")
    parts = []
    if missing:
        parts.append(f"{len(missing)} of this run's {len(model_state)} tensors are not in it ({first(missing)})")
    if unexpected:
        parts.append(f"{len(unexpected)} of its {len(saved)} tensors are not in this run's model ({first(unexpected)})")
    if shapes:
        parts.append(f"{len(shapes)} have another shape ({first(shapes)})")
    raise ValueError(
        f"checkpoint {state['path']} holds the weights of {describe_run(state)}{held}; this run asked for {asked}: "
        + "; ".join(parts)
        + ". Resume it with the arguments it was written with, or start a new run from its weights (--init-weights, "
        "fine-tuning --weights)"
    )


# ---- stopping on a signal ------------------------------------------------------------------------


class StopSignals:
    """SIGTERM or SIGINT (a scheduler's pre-emption, Ctrl-C, a kill to the whole process group) asks
    the loop to save a checkpoint and end after the current step; a second one ends the process at
    once, by that signal (the last checkpoint stands: saves are atomic). Data-loader workers ignore
    both (see `start_batches`), so a signal to the process group reaches the loop alone."""

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


def _ignore_stop_signals(worker_id: int) -> None:
    """Data-loader worker start: SIGTERM and SIGINT sent to the process group are the main
    process's to answer (it saves and stops, then shuts the workers down). A forked worker also lets
    go of the run-directory lock it inherited, which would otherwise outlive a killed main process."""
    for sig in STOP_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)
    for fd in list(_LOCK_FDS):
        try:
            os.close(fd)
        except OSError:
            pass
    _LOCK_FDS.clear()
    if hasattr(signal, "pthread_sigmask"):
        signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)


def start_batches(loader: DataLoader) -> Iterator:
    """iter(loader), its workers started with SIGTERM and SIGINT blocked: they inherit the block
    until `_ignore_stop_signals` ignores both, so no signal to the group can kill a worker as it
    starts; one that came meanwhile reaches this process as the block lifts."""
    if loader.num_workers == 0 or not hasattr(signal, "pthread_sigmask"):
        return iter(loader)
    old = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    try:
        return iter(loader)
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


def lr_at(step: int, total: int, peak: float, warmup: int, min_ratio: float) -> float:
    """Linear warm-up over `warmup` steps, then cosine from the peak to min_ratio * peak."""
    if step < warmup:
        return peak * (step + 1) / warmup
    t = (step - warmup) / max(1, total - warmup)
    return peak * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * min(t, 1.0))))


def make_loader(
    dataset: Dataset,
    batch: int,
    seed: int,
    start: int,
    end: int,
    workers: int,
    device: torch.device,
    rank: int = 0,
    world: int = 1,
    collate_fn=None,
    timeout: float = 0,
) -> DataLoader:
    """This rank's batches for steps start..end-1, the same whether or not the run was resumed. The
    loader gets its own generator: it would otherwise seed its workers from the global RNG and shift
    the random draws (masking, mixing) of a resumed run against a straight one. With workers, a
    batch that takes longer than `timeout` seconds (0: no limit) is an error; iterate it through
    `start_batches`."""
    return DataLoader(
        dataset,
        batch_sampler=ResumableBatchSampler(len(dataset), batch, seed, start, end, rank, world),
        num_workers=workers,
        pin_memory=device.type == "cuda",
        persistent_workers=workers > 0,
        generator=torch.Generator().manual_seed(seed),
        collate_fn=collate_fn,
        worker_init_fn=_ignore_stop_signals if workers > 0 else None,
        timeout=timeout if workers > 0 else 0,
    )


def rng_state() -> Dict[str, Any]:
    """The global torch RNGs. Data randomness is a pure function of (seed, epoch, index)."""
    state: Dict[str, Any] = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


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


def config_of(args) -> Dict[str, Any]:
    return {k: v for k, v in asdict(args).items() if v is None or isinstance(v, (int, float, str, bool))}


def save_single(directory: str, step: int, keep_last: int, model, optimizer, scaler, args, run: Dict[str, Any], **extra) -> str:
    """A one-process checkpoint (fine-tuning): weights, optimizer, scaler, step, RNG, config and the
    run's identity and run-defining arguments (`run`: {"id": ..., ...})."""
    from . import checkpoint

    state = dict(
        optimizer=optimizer.state_dict(),
        scaler=scaler.state_dict(),
        step=step,
        rng=[rng_state()],
        config=config_of(args),
        world=1,
        run=run,
        **extra,
    )
    path = checkpoint.save(directory, step, model.state_dict(), state)
    checkpoint.prune(directory, keep_last, run["id"])
    return path


def restore_single(state: Dict[str, Any], model, optimizer, scaler) -> int:
    """Loads what save_single saved; returns the step to continue from."""
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    scaler.load_state_dict(state["scaler"])
    set_rng_state(state["rng"][0])
    return int(state["step"])


def load_resume_state(resume: Optional[str], directory: str, rank_file: Optional[str] = None) -> Optional[Dict[str, Any]]:
    """--resume auto: the newest readable checkpoint in the run directory (None if there is none);
    --resume PATH: that checkpoint directory, which must read."""
    from . import checkpoint

    if not resume:
        return None
    if resume == "auto":
        state = checkpoint.load_latest(directory, rank_file)
        if state is None and checkpoint.list_checkpoints(directory):
            raise RuntimeError(
                f"--resume auto: no checkpoint in {directory} can be read (see the warnings above); "
                "refusing to start over on top of them: move them aside or name one with --resume PATH"
            )
        return state
    if not os.path.isdir(resume):
        raise ValueError(f"argument '--resume' expected 'auto' or a checkpoint directory (ckpt_<step>/), got {resume!r}")
    return checkpoint.load(resume, rank_file)
