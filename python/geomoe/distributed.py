"""torch.distributed set-up for torchrun: NCCL on GPUs, gloo on CPUs; one process per device."""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, List

import torch
import torch.distributed as dist


@dataclass
class DistEnv:
    rank: int
    world: int
    local_rank: int
    device: torch.device

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world > 1


def setup(device: str = "auto") -> DistEnv:
    """Joins the torchrun job if there is one (WORLD_SIZE > 1), and picks this process's device."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = torch.cuda.is_available() and device != "cpu" and not device.startswith("cpu")
    if device == "auto" or (device == "cuda" and world > 1):
        dev = torch.device(f"cuda:{local_rank}") if use_cuda else torch.device("cpu")
    else:
        dev = torch.device(device)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo")
    rank = dist.get_rank() if world > 1 else 0
    return DistEnv(rank, world, local_rank, dev)


def teardown(env: DistEnv) -> None:
    if env.enabled and dist.is_initialized():
        dist.destroy_process_group()


def all_reduce(env: DistEnv, t: torch.Tensor, op=dist.ReduceOp.SUM) -> torch.Tensor:
    if env.enabled:
        dist.all_reduce(t, op=op)
    return t


def all_gather_objects(env: DistEnv, obj: Any) -> List[Any]:
    if not env.enabled:
        return [obj]
    out: List[Any] = [None] * env.world
    dist.all_gather_object(out, obj)
    return out


def barrier(env: DistEnv) -> None:
    if env.enabled:
        dist.barrier()
