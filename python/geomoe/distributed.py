"""torch.distributed set-up for torchrun: NCCL on GPUs, gloo on CPUs; one process per device.

Every collective has a time limit (`timeout`, seconds; the run's --timeout): a rank that is stopped,
hung or dead makes the others fail with a message saying so within that time, instead of waiting
for the backend's default (30 minutes on gloo) deaf to signals."""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass
from typing import Any, Callable, List

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
    from .runtime import resolve_device

    world = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
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
            int(os.environ.get("RANK", "0")),
            timeout,
        )
    rank = dist.get_rank() if world > 1 else 0
    return DistEnv(rank, world, local_rank, dev, timeout)


def teardown(env: DistEnv) -> None:
    if env.enabled and dist.is_initialized():
        dist.destroy_process_group()


def _guard(call: Callable[[], Any], what: str, rank: int, timeout: float) -> Any:
    try:
        return call()
    except RuntimeError as exc:  # gloo: a timeout, or a peer's connection closed
        raise RuntimeError(
            f"rank {rank}: {what} failed or did not finish within --timeout {timeout:g} s: another rank has stopped, "
            f"hung or died (its log says why) [{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}]"
        ) from exc


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
