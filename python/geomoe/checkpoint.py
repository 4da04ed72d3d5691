"""Training checkpoints, one directory per step:

    ckpt_00000100/model.safetensors   the weights (and buffers: expert biases), readable anywhere
    ckpt_00000100/train_state.pt      optimizer, grad scaler, step, data position, RNG states, config

A checkpoint is written into a temporary directory, each file fsynced, then renamed into place (an
atomic step on POSIX): a crash or kill -9 mid-save leaves at most a `.tmp` directory that is never
read, and the previous checkpoint stands. `--resume auto` takes the newest one that reads; a
truncated or corrupt one gets a warning naming it and why, and the one before is used."""
from __future__ import annotations

import glob
import importlib
import os
import re
import shutil
import time
import warnings
from typing import Any, Dict, Optional

import torch

_NAME = re.compile(r"ckpt_(\d+)$")
MODEL_FILE = "model.safetensors"
STATE_FILE = "train_state.pt"


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_file(path: str) -> None:
    with open(path, "rb+") as f:
        os.fsync(f.fileno())


def checkpoint_path(directory: str, step: int) -> str:
    return os.path.join(directory, f"ckpt_{step:08d}")


def temp_path(directory: str, step: int) -> str:
    return os.path.join(directory, f".ckpt_{step:08d}.tmp")


def begin(directory: str, step: int) -> str:
    """A fresh temporary directory for checkpoint `step` (one writer creates it)."""
    tmp = temp_path(directory, step)
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    return tmp


def write_model(tmp: str, model_state: Dict[str, torch.Tensor]) -> None:
    from safetensors.torch import save_file

    weights = {k: v.detach().to("cpu").contiguous() for k, v in model_state.items()}
    save_file(weights, os.path.join(tmp, MODEL_FILE))
    _fsync_file(os.path.join(tmp, MODEL_FILE))


def write_state(tmp: str, obj: Any, name: str = STATE_FILE) -> None:
    slow = float(os.environ.get("GEOMOE_FAULT_SLOW_SAVE", "0"))  # fault-injection tests: a window to kill in
    if slow:
        time.sleep(slow)
    with open(os.path.join(tmp, name), "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())


def commit(directory: str, step: int) -> str:
    """Move the finished temporary directory into place: the checkpoint exists from this instant."""
    tmp, final = temp_path(directory, step), checkpoint_path(directory, step)
    _fsync_dir(tmp)
    if os.path.exists(final):  # saving the same step again (a resumed run that ends where it began)
        shutil.rmtree(final)
    os.replace(tmp, final)
    _fsync_dir(directory)
    return final


def save(directory: str, step: int, model_state: Dict[str, torch.Tensor], train_state: Dict[str, Any]) -> str:
    """Write checkpoint `step` atomically from one process; returns its path."""
    tmp = begin(directory, step)
    write_model(tmp, model_state)
    write_state(tmp, train_state)
    return commit(directory, step)


def list_checkpoints(directory: str):
    """Checkpoint directories, oldest first (temporary ones never count)."""
    found = []
    for p in glob.glob(os.path.join(directory, "ckpt_*")):
        m = _NAME.search(p)
        if m and os.path.isdir(p):
            found.append((int(m.group(1)), p))
    return [p for _, p in sorted(found)]


def prune(directory: str, keep_last: int) -> None:
    """Keep the newest `keep_last` checkpoints; remove temporary directories a crash left behind."""
    if keep_last > 0:
        for path in list_checkpoints(directory)[:-keep_last]:
            shutil.rmtree(path, ignore_errors=True)
    for tmp in glob.glob(os.path.join(directory, ".ckpt_*.tmp")):
        shutil.rmtree(tmp, ignore_errors=True)


def load(path: str, rank_file: Optional[str] = None) -> Dict[str, Any]:
    """{"model": weights, **train_state, "path": path} (+ "rank_state" from `rank_file` if named);
    a clear error if any part cannot be read."""
    from safetensors.torch import load_file

    try:
        model = load_file(os.path.join(path, MODEL_FILE))
        state = torch.load(os.path.join(path, STATE_FILE), map_location="cpu", weights_only=True)
        if rank_file is not None:
            importlib.import_module("torch.distributed.tensor")  # FSDP2 shards are DTensors: weights_only needs the type

            state["rank_state"] = torch.load(os.path.join(path, rank_file), map_location="cpu", weights_only=True)
    except Exception as exc:  # truncated, corrupt or missing: name it and why
        raise RuntimeError(f"checkpoint {path} cannot be read ({type(exc).__name__}: {exc})") from exc
    return {"model": model, **state, "path": path}


def load_latest(directory: str, rank_file: Optional[str] = None) -> Optional[Dict[str, Any]]:
    """The newest checkpoint that reads, warning about each newer one that does not; None if none."""
    for path in reversed(list_checkpoints(directory)):
        try:
            return load(path, rank_file)
        except RuntimeError as exc:
            warnings.warn(f"{exc}; trying the previous checkpoint")
    return None
