"""Which implementation runs an op: the one place that decides.

Every op registers its implementations here by backend name. "auto" picks, for CUDA tensors, the
CUDA core where it is loaded and supports the case, else Triton, else the reference; for CPU tensors,
the emulated CUDA core under GEOMOE_CUDA_EMULATE=1, then Triton under TRITON_INTERPRET=1, else the
reference. An explicit backend that cannot run the case is an error that says why, never a silent
fallback."""
from __future__ import annotations

import os
from typing import Callable, Dict, Optional, Tuple

import torch

from . import self_check

BACKENDS = ("auto", "torch", "triton", "cuda")
KERNEL_BACKENDS = ("triton", "cuda")  # checked against the reference on first use (self_check)

# op name -> backend -> (implementation, supports(*args) -> reason it cannot run, or None)
_REGISTRY: Dict[str, Dict[str, Tuple[Callable, Optional[Callable]]]] = {}
# (op, backend) pairs that run only when asked for by name: kernels not yet verified on a GPU
_EXPLICIT_ONLY = set()

# Why a backend has no implementation at all in this build; filled by the modules that provide them.
_UNAVAILABLE_REASON = {
    "triton": "this build has no Triton kernel for it",
    "cuda": "this build has no CUDA C++ kernel for it",
}


# backend -> device -> why the backend cannot run on that device at all (e.g. no kernel image for its
# architecture), or None; set by the module that provides the backend
_DEVICE_CHECKS: Dict[str, Callable[[torch.device], Optional[str]]] = {}


def set_device_check(backend: str, check: Callable[[torch.device], Optional[str]]) -> None:
    """How a backend says it cannot run on a device (checked before any of its kernels is chosen)."""
    _DEVICE_CHECKS[backend] = check


class BackendUnavailable(RuntimeError):
    """The requested backend cannot run this op on these inputs."""


def register(op: str, backend: str, impl: Callable, supports: Optional[Callable] = None, auto: bool = True) -> None:
    """auto=False: `backend="auto"` never picks it; only an explicit request runs it."""
    if backend not in BACKENDS[1:]:
        raise ValueError(f"unknown backend {backend!r}; expected one of {list(BACKENDS[1:])}")
    _REGISTRY.setdefault(op, {})[backend] = (impl, supports)
    if not auto:
        _EXPLICIT_ONLY.add((op, backend))


def check_backend_name(backend: str) -> None:
    if backend not in BACKENDS:
        raise ValueError(f"argument 'backend' expected one of {list(BACKENDS)}, got {backend!r}")


def triton_interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _why_not(op: str, backend: str, device: torch.device, args) -> Optional[str]:
    entry = _REGISTRY.get(op, {}).get(backend)
    if entry is None:
        return _UNAVAILABLE_REASON.get(backend, "not registered")
    if backend in _DEVICE_CHECKS:  # the CUDA core's check decides on CPU tensors too (its emulation)
        reason = _DEVICE_CHECKS[backend](device)
        if reason is not None:
            return reason
    elif backend == "cuda" and device.type != "cuda":
        return f"the CUDA core runs on CUDA tensors, got tensors on {device}"
    if backend == "triton" and device.type != "cuda" and not triton_interpreting():
        return f"Triton runs on CUDA tensors, or on the CPU with TRITON_INTERPRET=1; got tensors on {device}"
    supports = entry[1]
    return supports(*args) if (supports is not None and args is not None) else None


def select(op: str, backend: str, device: torch.device, args: tuple = ()) -> Callable:
    """The implementation of `op` for `backend` on `device`; `args` go to the support checks."""
    check_backend_name(backend)
    if backend != "auto":
        reason = _why_not(op, backend, device, args)
        if reason is not None:
            raise BackendUnavailable(f"{op}: backend {backend!r} cannot run here: {reason}")
        if backend in KERNEL_BACKENDS:
            self_check.failed_reason(op, backend, device, args)  # asked for by name: runs, with a warning if it failed
        return _REGISTRY[op][backend][0]
    # on CPU tensors "cuda" is the emulated core, when GEOMOE_CUDA_EMULATE turns it on
    order = ("cuda", "triton", "torch") if device.type == "cuda" or triton_interpreting() else ("cuda", "torch")
    for name in order:
        if (op, name) not in _EXPLICIT_ONLY and _why_not(op, name, device, args) is None:
            if name in KERNEL_BACKENDS and self_check.failed_reason(op, name, device, args) is not None:
                continue  # failed its check on this device: the next backend runs
            return _REGISTRY[op][name][0]
    raise BackendUnavailable(f"{op}: no backend can run on {device}")


def available(op: str, device: torch.device) -> Dict[str, Optional[str]]:
    """backend -> None if usable for `op` on `device`, else the reason (for info and tests)."""
    return {b: _why_not(op, b, device, None) for b in BACKENDS[1:]}


# ---- support checks shared by the kernel backends ------------------------------------------------

KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def rows_reason(who: str, t: torch.Tensor) -> Optional[str]:
    """Why `who`'s kernels cannot take these rows, or None."""
    return None if t.dtype in KERNEL_DTYPES else f"{who} takes float16, bfloat16 or float32 rows, got {t.dtype}"


def weights_reason(who: str, w: Optional[torch.Tensor]) -> Optional[str]:
    return None if w is None or w.dtype == torch.float32 else f"{who} takes float32 routing weights, got {w.dtype}"


def gating_reason(who: str, logits: torch.Tensor, top_k: int, max_experts: int, max_k: int) -> Optional[str]:
    if logits.dtype != torch.float32:
        return f"{who} takes float32 logits, got {logits.dtype}"
    if logits.shape[1] > max_experts or top_k > max_k:
        return f"{who} takes at most {max_experts} experts and top_k {max_k}, got {logits.shape[1]} and {top_k}"
    return None
