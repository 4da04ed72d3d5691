"""Training checkpoints: written atomically (temp file, fsync, rename) so a crash mid-save never
leaves a half file under a real name; the newest one that loads is the one resumed."""
from __future__ import annotations

import glob
import os
import re
import warnings
from typing import Any, Dict, Optional

import torch

_NAME = re.compile(r"ckpt_(\d+)\.pt$")


def save_atomic(obj: Dict[str, Any], path: str) -> None:
    tmp = f"{path}.tmp.{os.getpid()}"
    with open(tmp, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    dir_fd = os.open(os.path.dirname(os.path.abspath(path)), os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def checkpoint_path(directory: str, step: int) -> str:
    return os.path.join(directory, f"ckpt_{step:08d}.pt")


def list_checkpoints(directory: str):
    """Paths, oldest first."""
    found = [(int(m.group(1)), p) for p in glob.glob(os.path.join(directory, "ckpt_*.pt")) if (m := _NAME.search(p))]
    return [p for _, p in sorted(found)]


def prune(directory: str, keep_last: int) -> None:
    for path in list_checkpoints(directory)[:-keep_last] if keep_last > 0 else []:
        os.remove(path)


def load(path: str) -> Dict[str, Any]:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # a truncated or corrupt file: name it and why
        raise RuntimeError(f"checkpoint {path} cannot be read ({type(exc).__name__}: {exc})") from exc


def load_latest(directory: str) -> Optional[Dict[str, Any]]:
    """The newest checkpoint that reads, warning about each newer one that does not; None if none."""
    for path in reversed(list_checkpoints(directory)):
        try:
            state = load(path)
        except RuntimeError as exc:
            warnings.warn(f"{exc}; trying the previous checkpoint")
            continue
        state["path"] = path
        return state
    return None
