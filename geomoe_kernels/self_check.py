"""Self-verification on first use: before `backend="auto"` first runs a kernel backend (Triton or the
CUDA core) for an op and dtype on a device, that kernel is checked once against the reference on
the same device (geomoe_kernels.verify's small ragged case, forward and backward, with its
tolerance policy). The verdict is cached on disk per (device name, compute capability, driver,
library version, op, backend, dtype), so each combination is checked once per machine and again
after an upgrade.

A kernel that fails is never chosen by "auto" on that device: one warning names the op, backend,
dtype and the error, and the next backend runs. Asked for by name (backend="triton"/"cuda"), a
failed kernel still runs, with the same warning.

GEOMOE_SELF_CHECK=0 turns it off; =1 turns it on for every device (by default only CUDA devices are
checked: CPU kernels run under test harnesses). The cache is one JSON file in
$GEOMOE_CACHE_DIR, else $XDG_CACHE_HOME/geomoe_kernels, else ~/.cache/geomoe_kernels; writers
merge under a file lock and replace the file atomically, so concurrent ranks are safe, and a
corrupt file is treated as empty and rewritten."""

from __future__ import annotations

import contextlib
import functools
import json
import os
import tempfile
import time
import warnings
from typing import Dict, Optional, Tuple

import torch

from . import _checks, _version, backend
from .ops import _declare

CACHE_NAME = "self_check.json"
_memo: Dict[str, Dict[str, str]] = {}  # this process's verdicts (the file is read once per key)
_warned: set = set()
_running = False  # a check runs ops itself: no nested checks
last_check_seconds: Optional[float] = None


def enabled(device: torch.device) -> bool:
    if device.type == "cuda" and not torch.cuda.is_available():  # nothing could run the check (a CPU torch)
        return False
    flag = _checks.env_switch("GEOMOE_SELF_CHECK")  # the usual words, or an error naming it
    if flag is not None:
        return flag
    return device.type == "cuda"


def cache_path() -> str:
    root = os.environ.get("GEOMOE_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "geomoe_kernels"
    )
    return os.path.join(root, CACHE_NAME)


def family(op: str) -> str:
    """The public op a registry entry belongs to (a backward is checked with its forward, as the
    backward's declaration names it)."""
    return backend.forward_of(op)


def _device_id(device: torch.device) -> str:
    index = device.index if device.index is not None or device.type != "cuda" else torch.cuda.current_device()
    return _device_id_cached(device.type, index, os.environ.get("TRITON_INTERPRET", "0"))


@functools.lru_cache(maxsize=None)
def _device_id_cached(kind: str, index: Optional[int], interpreting: str) -> str:
    version = _version.__version__
    if kind == "cuda":
        p = torch.cuda.get_device_properties(index)
        driver = torch.cuda.driver_version() if hasattr(torch.cuda, "driver_version") else torch.version.cuda
        return f"{p.name}|sm_{p.major}{p.minor}|driver {driver}|geomoe {version}"
    return f"cpu|interpreter {interpreting}|geomoe {version}"


def key(device: torch.device, op: str, backend: str, dtype: torch.dtype) -> str:
    return f"{_device_id(device)}|{family(op)}|{backend}|{str(dtype).replace('torch.', '')}"


def _read() -> Dict[str, Dict[str, str]]:
    try:
        with open(cache_path()) as f:
            data = json.load(f)
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}  # missing or corrupt: start over


@contextlib.contextmanager
def _locked():
    path = cache_path()
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path + ".lock", "a") as lock:
        try:
            import fcntl

            fcntl.flock(lock, fcntl.LOCK_EX)
        except ImportError:  # no fcntl (Windows): the atomic replace still keeps the file whole
            pass
        yield


def _store(k: str, verdict: Dict[str, str]) -> None:
    path = cache_path()
    try:
        with _locked():
            data = _read()
            data[k] = verdict
            fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), prefix=".self_check.")
            with os.fdopen(fd, "w") as f:
                json.dump(data, f, indent=0, sort_keys=True)
            os.replace(tmp, path)
    except OSError as e:  # a read-only home is no reason to fail the op: keep the verdict in memory
        warnings.warn(f"geomoe_kernels self-check: cannot write the cache {path} ({e}); verdicts last this process only")


def _dtype_of(op: str, args) -> Optional[torch.dtype]:
    """The dtype row of verify's table that this call belongs to: the one row of an op whose case
    has one (gating and routing: float32), else the first floating-point argument's dtype."""
    rows = _declare.DECLARED[family(op)].verification if family(op) in _declare.DECLARED else None
    if rows is not None and rows.dtypes is not None and len(rows.dtypes) == 1:
        return rows.dtypes[0]
    for a in args.values() if isinstance(args, dict) else args or ():
        if isinstance(a, torch.Tensor) and a.is_floating_point():
            return a.dtype
    return None


def pending() -> bool:
    """True while a verdict may be "unchecked" only for now: a check is running, or a CUDA graph
    capture or a compile trace is under way (the backend does not cache a choice made then)."""
    return _running or _capturing()


def _capturing() -> bool:
    """Inside a CUDA graph capture or a torch.compile trace a check cannot run (it syncs)."""
    if torch.cuda.is_available() and torch.cuda.is_current_stream_capturing():
        return True
    return bool(getattr(torch.compiler, "is_compiling", lambda: False)())


def verdict(op: str, backend: str, device: torch.device, args) -> Tuple[str, str]:
    """("verified" | "failed" | "unchecked", detail) for this kernel on this device, checking it
    (once per cache) if it has not been checked yet."""
    global _running, last_check_seconds
    dtype = _dtype_of(op, args)
    if dtype is None or _running or not enabled(device):
        return "unchecked", ""
    k = key(device, op, backend, dtype)
    if k not in _memo:
        cached = _read().get(k)
        if cached is None:
            if _capturing():
                return "unchecked", ""
            from . import verify  # at the first check only: importing the package leaves the verifier out

            _running, start = True, time.perf_counter()
            try:  # whatever the caller's context: the check needs autograd and its own precision
                with torch.inference_mode(False), torch.enable_grad(), torch.autocast(device.type, enabled=False):
                    [checked] = verify.verify(device, ops=[family(op)], backends=(backend,), dtypes=(dtype,))
            finally:
                _running = False
            last_check_seconds = time.perf_counter() - start
            cached = {"status": checked.status, "detail": checked.detail, "seconds": f"{last_check_seconds:.2f}"}
            _store(k, cached)
        _memo[k] = cached
    entry = _memo[k]
    return entry["status"], entry.get("detail", "")


def failed_reason(op: str, backend: str, device: torch.device, args) -> Optional[str]:
    """None if the kernel may run; else the reason, warned about once per (op family, backend, dtype)."""
    status, detail = verdict(op, backend, device, args)
    if status != "failed":
        return None
    reason = f"{family(op)}: backend {backend!r} failed its self-check on this device ({_dtype_of(op, args)}): {detail}"
    if (family(op), backend, _dtype_of(op, args)) not in _warned:
        _warned.add((family(op), backend, _dtype_of(op, args)))
        warnings.warn(reason + "; GEOMOE_SELF_CHECK=0 turns the check off", RuntimeWarning, stacklevel=4)
    return reason


def forget() -> None:
    """Drop this process's memory of verdicts and warnings (the file stays), and the backend choices
    made from them: tests, re-checks."""
    _memo.clear()
    _warned.clear()
    backend.forget()


def summary() -> str:
    data = _read()
    failed = [k for k, v in data.items() if v.get("status") == "failed"]
    flag = _checks.env_switch("GEOMOE_SELF_CHECK")
    state = {None: "on for CUDA devices", False: "off (GEOMOE_SELF_CHECK=0)"}.get(
        flag, "on for every device (GEOMOE_SELF_CHECK=1)"
    )
    secs = [float(v.get("seconds", 0)) for v in data.values()]
    cost = f"; a check takes {min(secs):.2f}-{max(secs):.2f} s, once per kernel and dtype" if secs else ""
    return f"self-check {state}: {len(data)} verdicts cached in {cache_path()}, {len(failed)} failed{cost}" + "".join(
        f"\n  failed: {k}: {data[k].get('detail', '')}" for k in failed
    )
