"""The resumable data loader: a rank's batches of steps start..end-1, the same whether or not the
run was resumed, and its workers started deaf to the stop signals (the loop answers them)."""

from __future__ import annotations

import signal
from typing import Iterator

import torch
from torch.utils.data import DataLoader, Dataset

from ..data import ResumableBatchSampler
from .faults import STOP_SIGNALS, ignore_stop_signals


def start_batches(loader: DataLoader) -> Iterator:
    """iter(loader), its workers started with SIGTERM and SIGINT blocked: they inherit the block
    until `faults.ignore_stop_signals` ignores both, so no signal to the group can kill a worker as
    it starts; one that came meanwhile reaches this process as the block lifts."""
    if loader.num_workers == 0 or not hasattr(signal, "pthread_sigmask"):
        return iter(loader)
    old = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    try:
        return iter(loader)
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


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
        worker_init_fn=ignore_stop_signals if workers > 0 else None,
        timeout=timeout if workers > 0 else 0,
    )
