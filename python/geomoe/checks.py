"""The machine and argument checks every run kind shares: --device names a device this machine
has, numbers in range (the error names the flag), and TORCHINDUCTOR_CACHE_DIR usable."""

from __future__ import annotations

import math
import os
from typing import Any, Optional

import torch


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


def flag(name: str) -> str:
    """A field's flag: max_bad_steps -> --max-bad-steps."""
    return "--" + name.replace("_", "-")


def check_int(name: str, value: Any, minimum: int, optional: bool = False, maximum: Optional[int] = None) -> None:
    """An integer >= minimum (and <= maximum; None allowed when optional: the preset's value); the
    error names the flag."""
    if value is None and optional:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum or (maximum is not None and value > maximum):
        want = f">= {minimum}" if maximum is None else f"in [{minimum}, {maximum}]"
        raise ValueError(f"argument '{flag(name)}' expected an integer {want}, got {value!r}")


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
        raise ValueError(f"argument '{flag(name)}' expected a finite number in {lo}, {hi}, got {value!r}")


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
