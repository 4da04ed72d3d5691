"""torch.distributed set-up for torchrun: NCCL on GPUs, gloo on CPUs; one process per device.

Every collective has a time limit (`timeout`, seconds; the run's --timeout): a rank that is stopped,
hung or dead makes the others fail with a message saying so within that time, instead of waiting
for the backend's default (30 minutes on gloo) deaf to signals."""

from __future__ import annotations

import datetime
from dataclasses import dataclass
from typing import Any, Callable, List, Optional

import torch
import torch.distributed as dist

DEFAULT_TIMEOUT = 600.0


@dataclass
class DistEnv:
    rank: int
    world: int
    local_rank: int
    device: torch.device
    timeout: float = DEFAULT_TIMEOUT

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world > 1


def setup(device: str = "auto", timeout: float = DEFAULT_TIMEOUT) -> DistEnv:
    """Joins the torchrun job if there is one (WORLD_SIZE > 1), and picks this process's device."""
    from .checks import resolve_device

    from .envvars import env_number

    world = env_number("WORLD_SIZE", "1", int, 1)
    local_rank = env_number("LOCAL_RANK", "0", int, 0)
    if device == "auto" or (device == "cuda" and world > 1):
        resolve_device(device)  # a clear error for cuda without a GPU
        use_cuda = torch.cuda.is_available() and device != "cpu"
        dev = torch.device(f"cuda:{local_rank}") if use_cuda else torch.device("cpu")
    else:
        dev = resolve_device(device)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    if world > 1 and not dist.is_initialized():
        _guard(
            lambda: dist.init_process_group(
                "nccl" if dev.type == "cuda" else "gloo", timeout=datetime.timedelta(seconds=timeout)
            ),
            "joining the process group",
            env_number("RANK", "0", int, 0),
            timeout,
        )
    rank = dist.get_rank() if world > 1 else 0
    return DistEnv(rank, world, local_rank, dev, timeout)


def teardown(env: DistEnv) -> None:
    if env.enabled and dist.is_initialized():
        dist.destroy_process_group()


class RunFailure(RuntimeError):
    """A run ended by a fault outside this process's control (another rank stopped or died, too many
    bad steps in a row): the message says what happened; the command line prints it in one line."""


def _failure(what: str, rank: int, timeout: float, exc: BaseException) -> RunFailure:
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return RunFailure(
        f"rank {rank}: {what} failed or did not finish within --timeout {timeout:g} s: another rank has stopped, "
        f"hung or died (its log says why) [{type(exc).__name__}: {first}]"
    )


def _guard(call: Callable[[], Any], what: str, rank: int, timeout: float) -> Any:
    try:
        return call()
    except RunFailure:
        raise
    except RuntimeError as exc:  # gloo: a timeout, or a peer's connection closed
        raise _failure(what, rank, timeout, exc) from exc


# what the backends say when a peer is gone or silent (gloo's "Connection reset by peer ... GLHF!",
# NCCL's watchdog); a collective inside DDP, FSDP or a checkpoint's writes is not behind _guard
_PEER_LOST = ("gloo", "nccl", "connection reset", "connection closed", "socket", "broken pipe")


def peer_failure(env: "DistEnv", exc: BaseException) -> Optional[RunFailure]:
    """For an error raised in a multi-process run by a collective that `_guard` does not wrap (DDP's
    gradient all-reduce, FSDP's gathers, a checkpoint's writes): the run's message that another rank
    stopped or died, with the backend's first line in brackets; None for any other error."""
    if not env.enabled or isinstance(exc, RunFailure) or not isinstance(exc, RuntimeError):
        return None
    text = f"{type(exc).__name__} {exc}".lower()
    if "dataloader" in text:  # a data-loader worker's timeout or death: its own message says so
        return None
    if isinstance(exc, getattr(dist, "DistError", ())) or any(word in text for word in _PEER_LOST):
        return _failure("a collective between ranks", env.rank, env.timeout, exc)
    return None


def all_reduce(env: DistEnv, t: torch.Tensor, op=dist.ReduceOp.SUM) -> torch.Tensor:
    if env.enabled:
        _guard(lambda: dist.all_reduce(t, op=op), "all_reduce", env.rank, env.timeout)
    return t


def all_gather_objects(env: DistEnv, obj: Any) -> List[Any]:
    if not env.enabled:
        return [obj]
    out: List[Any] = [None] * env.world
    _guard(lambda: dist.all_gather_object(out, obj), "all_gather_object", env.rank, env.timeout)
    return out


def broadcast_object(env: DistEnv, obj: Any, src: int = 0) -> Any:
    """Rank `src`'s `obj` on every rank."""
    if not env.enabled:
        return obj
    box = [obj]
    _guard(lambda: dist.broadcast_object_list(box, src), "broadcast_object_list", env.rank, env.timeout)
    return box[0]


def barrier(env: DistEnv) -> None:
    if env.enabled:
        _guard(lambda: dist.barrier(), "barrier", env.rank, env.timeout)
