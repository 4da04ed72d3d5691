"""What the pretraining and fine-tuning loops share: device choice, the warm-up + cosine schedule,
the resumable data loader, and the state a checkpoint carries."""
from __future__ import annotations

import math
from dataclasses import asdict
from typing import Any, Dict, Optional

import torch
from torch.utils.data import DataLoader, Dataset

from .data import ResumableBatchSampler


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def lr_at(step: int, total: int, peak: float, warmup: int, min_ratio: float) -> float:
    """Linear warm-up over `warmup` steps, then cosine from the peak to min_ratio * peak."""
    if step < warmup:
        return peak * (step + 1) / warmup
    t = (step - warmup) / max(1, total - warmup)
    return peak * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * min(t, 1.0))))


def make_loader(dataset: Dataset, batch: int, seed: int, start: int, end: int, workers: int, device: torch.device,
                rank: int = 0, world: int = 1, collate_fn=None) -> DataLoader:
    """This rank's batches for steps start..end-1, the same whether or not the run was resumed. The
    loader gets its own generator: it would otherwise seed its workers from the global RNG and shift
    the random draws (masking, mixing) of a resumed run against a straight one."""
    return DataLoader(
        dataset,
        batch_sampler=ResumableBatchSampler(len(dataset), batch, seed, start, end, rank, world),
        num_workers=workers,
        pin_memory=device.type == "cuda",
        persistent_workers=workers > 0,
        generator=torch.Generator().manual_seed(seed),
        collate_fn=collate_fn,
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


def config_of(args) -> Dict[str, Any]:
    return {k: v for k, v in asdict(args).items() if v is None or isinstance(v, (int, float, str, bool))}


def save_single(directory: str, step: int, keep_last: int, model, optimizer, scaler, args, **extra) -> str:
    """A one-process checkpoint (fine-tuning): weights, optimizer, scaler, step, RNG, config."""
    from . import checkpoint

    state = dict(optimizer=optimizer.state_dict(), scaler=scaler.state_dict(), step=step, rng=[rng_state()],
                 config=config_of(args), world=1, **extra)
    path = checkpoint.save(directory, step, model.state_dict(), state)
    checkpoint.prune(directory, keep_last)
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
    return checkpoint.load(resume, rank_file)
