"""Which implementation runs an op: the one place that decides.

Every op is declared here (geomoe_kernels.ops declares them) and registers its implementations by
backend name. "auto" picks, for CUDA tensors, the CUDA core where it is loaded and supports the
case, else Triton, else the reference; for CPU tensors, the emulated CUDA core under
GEOMOE_CUDA_EMULATE=1, then Triton under TRITON_INTERPRET=1, else the reference. An explicit backend
that cannot run the case is an error that says why, never a silent fallback. Support checks take the
op's arguments by name, and may read their dtypes, shapes and non-tensor values only.

The choice (support checks and self-check verdict included) is made once per (op, backend, device,
argument dtypes and shapes, non-tensor arguments) and cached: the eager hot path pays one dict
lookup per op call. The environment (TRITON_INTERPRET, GEOMOE_CUDA_EMULATE, GEOMOE_SELF_CHECK,
GEOMOE_CHECK_VALUES) is therefore read when a choice is first made; after changing one of them at
run time, call forget()."""

from __future__ import annotations

import inspect
import os
from typing import Any, Callable, Dict, Hashable, List, Mapping, Optional, Sequence, Set, Tuple

import torch

from . import _checks

BACKENDS = ("auto", "torch", "triton", "cuda")
KERNEL_BACKENDS = ("triton", "cuda")  # checked against the reference on first use (self_check)

# The first-use check of a kernel backend: (op, backend, device, args) -> why that kernel failed its
# check on this device, or None. Handed in by the package's __init__ (geomoe_kernels.self_check), so
# the registry never imports the verifier; None (the default) runs every kernel unchecked.
_FIRST_USE_CHECK: Optional[Callable[[str, str, torch.device, Mapping[str, Any]], Optional[str]]] = None
_FIRST_USE_PENDING: Optional[Callable[[], bool]] = None

# op name -> None for an op users call, or the name of the op whose backward it computes
_OPS: Dict[str, Optional[str]] = {}
# op name -> backend -> (implementation, supports(**args) -> reason it cannot run, or None)
_REGISTRY: Dict[str, Dict[str, Tuple[Callable, Optional[Callable[..., Optional[str]]]]]] = {}
# (op, backend) pairs that run only when asked for by name: kernels not yet verified on a GPU
_EXPLICIT_ONLY: Set[Tuple[str, str]] = set()
# op name -> the arguments its implementations take, in order (see register)
_IMPL_ARGS: Dict[str, Tuple[str, ...]] = {}
# (op, backend) -> the kernel's example launch, for tools/triton_offline.py (never read by dispatch)
_EXAMPLES: Dict[Tuple[str, str], Optional[Callable[[Any], None]]] = {}

# Why a backend has no implementation of an op; a backend that cannot load at all says so through
# set_unavailable_reason.
_UNAVAILABLE_REASON = {
    "triton": "this build has no Triton kernel for it",
    "cuda": "this build has no CUDA C++ kernel for it",
}


# backend -> device -> why the backend cannot run on that device at all (e.g. no kernel image for its
# architecture), or None; set by the module that provides the backend
_DEVICE_CHECKS: Dict[str, Callable[[torch.device], Optional[str]]] = {}


# (op, backend, device, argument signature) -> (the registry entry chosen, its backend name)
_CHOICES: Dict[Hashable, Tuple[Tuple[Callable, Optional[Callable[..., Optional[str]]]], str]] = {}
_MAX_CHOICES = 4096  # distinct shapes (say, every decode length) are bounded: past this the cache starts over
# Plans made from these choices (the MoE layer's launch plans, geomoe_kernels/nn/_layer_plan.py): key ->
# plan, dropped whenever the choices are (forget, register, a device or first-use check set)
PLANS: Dict[Hashable, Any] = {}


def _drop_choices() -> None:
    _CHOICES.clear()
    PLANS.clear()


def choices_final() -> bool:
    """False while a choice made now is provisional (a self-check running, a CUDA graph capture, a
    compile trace): `select` does not cache it then, and a plan built from it is not kept either."""
    return not (_FIRST_USE_PENDING is not None and _FIRST_USE_PENDING())


def forget() -> None:
    """Drop the cached backend choices and re-read the settings taken from the environment
    (TRITON_INTERPRET, GEOMOE_CUDA_EMULATE, GEOMOE_SELF_CHECK, GEOMOE_CHECK_VALUES): call it after
    changing one of them at run time. Registering an implementation drops the choices too."""
    _drop_choices()
    _checks.read_environment()


def set_device_check(backend: str, check: Callable[[torch.device], Optional[str]]) -> None:
    """How a backend says it cannot run on a device (checked before any of its kernels is chosen)."""
    _DEVICE_CHECKS[backend] = check
    _drop_choices()


def set_first_use_check(
    check: Optional[Callable[[str, str, torch.device, Mapping[str, Any]], Optional[str]]],
    pending: Optional[Callable[[], bool]] = None,
) -> None:
    """The check `select` asks before it runs a kernel backend (see _FIRST_USE_CHECK), and `pending`:
    true while a verdict may be provisional (a check running, a CUDA graph capture, a compile trace),
    when `select` does not cache its choice."""
    global _FIRST_USE_CHECK, _FIRST_USE_PENDING
    _FIRST_USE_CHECK, _FIRST_USE_PENDING = check, pending
    _drop_choices()


class BackendUnavailable(RuntimeError):
    """The requested backend cannot run this op on these inputs."""


def declare(op: str, backward_of: Optional[str] = None, impl_args: Optional[Sequence[str]] = None) -> None:
    """Make `op` known (ops/_declare.py does this for every op); backward_of: the op it differentiates;
    impl_args: the arguments its implementations take, in this order (checked by register)."""
    if op in _OPS:
        raise ValueError(f"op {op!r} is declared twice")
    if backward_of is not None and _OPS.get(backward_of, "") is not None:
        raise ValueError(f"{op} is declared as the backward of {backward_of!r}, which is not a declared forward op")
    _OPS[op] = backward_of
    if impl_args is not None:
        _IMPL_ARGS[op] = tuple(impl_args)


def impl_args(op: str) -> Tuple[str, ...]:
    """The arguments `op`'s implementations take, in order: what select(...) returns may be called
    with them positionally in this order, or by these names (register checks every implementation)."""
    return _IMPL_ARGS[op]


def forward_of(op: str) -> str:
    """The op users call that `op` belongs to: itself, or the op whose backward it computes (as its
    declaration names it)."""
    return _OPS.get(op) or op


def ops() -> List[str]:
    """The ops users call (not the backward ops), in declaration order."""
    return [op for op, backward_of in _OPS.items() if backward_of is None]


def register(
    op: str, backend: str, impl: Callable, supports: Optional[Callable[..., Optional[str]]] = None, auto: bool = True
) -> None:
    """supports(**args) gets the op's arguments by name (backend excluded) and returns why this
    implementation cannot run them, or None. auto=False: `backend="auto"` never picks it; only an
    explicit request runs it."""
    if backend not in BACKENDS[1:]:
        raise ValueError(f"unknown backend {backend!r}; expected one of {list(BACKENDS[1:])}")
    if op not in _OPS:
        raise ValueError(f"{backend} registers an implementation of {op!r}, which no op declares")
    check_signature(op, backend, impl)
    _REGISTRY.setdefault(op, {})[backend] = (impl, supports)
    if not auto:
        _EXPLICIT_ONLY.add((op, backend))
    _drop_choices()


def check_signature(op: str, backend: str, impl: Callable) -> None:
    """Implementations are called with the op's arguments in its declared order (positionally, which
    keeps the hot path lean), so each must name them in that order: checked here, once, when it is
    registered. Parameters after those must have defaults; an implementation that takes `*args` (a
    forwarding wrapper) is not checked. Calling an implementation by keyword therefore works too."""
    want = _IMPL_ARGS.get(op)
    try:
        params = list(inspect.signature(impl).parameters.values())
    except (TypeError, ValueError):  # a builtin without a signature: nothing to check
        return
    if want is None or any(p.kind is inspect.Parameter.VAR_POSITIONAL for p in params):
        return
    got = [p.name for p in params[: len(want)]]
    extra = [p.name for p in params[len(want) :] if p.default is inspect.Parameter.empty and p.kind is not p.VAR_KEYWORD]
    if got != list(want) or extra:
        raise TypeError(
            f"{backend} implementation {getattr(impl, '__qualname__', impl)!r} of {op!r} takes "
            f"({', '.join(p.name for p in params)}); expected the op's arguments in order: ({', '.join(want)})"
            + (f", then only parameters with defaults (no default: {extra})" if extra else "")
        )


def kernel(
    op: str,
    backend: str,
    supports: Optional[Callable[..., Optional[str]]] = None,
    auto: bool = True,
    example: Optional[Callable[[Any], None]] = None,
) -> Callable[[Callable], Callable]:
    """Decorator: the function is `backend`'s implementation of `op` (see register), registered when
    its module is imported; the kernel modules of geomoe_kernels.triton are all imported by the
    package. example(dtype) runs the implementation once or more on CPU tensors of representative
    shapes in that float dtype: tools/triton_offline.py records the launches it makes and compiles
    them (an example may skip dtypes its kernel does not take)."""

    def add(fn: Callable) -> Callable:
        register(op, backend, fn, supports, auto)
        _EXAMPLES[(op, backend)] = example
        return fn

    return add


def kernels(backend: str) -> List[Tuple[str, Callable, Optional[Callable[[Any], None]]]]:
    """(op, implementation, example launch) for each kernel `backend` registered, in registration order."""
    return [(op, impls[backend][0], _EXAMPLES.get((op, backend))) for op, impls in _REGISTRY.items() if backend in impls]


def set_unavailable_reason(backend: str, reason: str) -> None:
    """Why `backend` cannot run the ops it registers no implementation of: a backend that cannot
    load at all (not installed, not built) says so here, once."""
    if backend not in BACKENDS[1:]:
        raise ValueError(f"unknown backend {backend!r}; expected one of {list(BACKENDS[1:])}")
    _UNAVAILABLE_REASON[backend] = reason
    _drop_choices()


def check_backend_name(backend: str) -> None:
    if backend not in BACKENDS:
        raise ValueError(f"argument 'backend' expected one of {list(BACKENDS)}, got {backend!r}")


def triton_interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _why_not(op: str, backend: str, device: torch.device, args: Optional[Mapping[str, Any]]) -> Optional[str]:
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
    return supports(**args) if (supports is not None and args is not None) else None


def _signature(args: Mapping[str, Any]) -> Tuple:
    """What a support check may read of the arguments: tensors' dtypes and shapes, other values."""
    return tuple((v.dtype, v.shape) if isinstance(v, torch.Tensor) else v for v in args.values())


def select(op: str, backend: str, device: torch.device, args: Optional[Mapping[str, Any]] = None) -> Callable:
    """The implementation of `op` for `backend` on `device`; `args` (by name) go to the support checks.
    Cached per (op, backend, device, argument signature): see the module docstring."""
    args = {} if args is None else args
    try:
        key: Optional[Hashable] = (op, backend, device, _signature(args))
        hit = _CHOICES.get(key)
    except TypeError:  # an unhashable argument: choose every time
        key, hit = None, None
    if hit is not None:
        entry, name = hit
        if _REGISTRY[op].get(name) is entry:  # still registered (tests swap implementations in place)
            return entry[0]
    name = _choose(op, backend, device, args)
    entry = _REGISTRY[op][name]
    # a verdict pending (a self-check running, a CUDA graph capture or a compile trace) is not final
    if key is not None and not (_FIRST_USE_PENDING is not None and _FIRST_USE_PENDING()):
        if len(_CHOICES) >= _MAX_CHOICES:
            _CHOICES.clear()
        _CHOICES[key] = (entry, name)
    return entry[0]


def _choose(op: str, backend: str, device: torch.device, args: Mapping[str, Any]) -> str:
    """The backend name that runs `op` here (uncached: every support check and self-check verdict)."""
    check_backend_name(backend)
    if backend != "auto":
        reason = _why_not(op, backend, device, args)
        if reason is not None:
            raise BackendUnavailable(f"{op}: backend {backend!r} cannot run here: {reason}")
        if backend in KERNEL_BACKENDS and _FIRST_USE_CHECK is not None:
            _FIRST_USE_CHECK(op, backend, device, args)  # asked for by name: runs, with a warning if it failed
        return backend
    for name in auto_order(device):
        if (op, name) not in _EXPLICIT_ONLY and _why_not(op, name, device, args) is None:
            if name in KERNEL_BACKENDS and _FIRST_USE_CHECK is not None and _FIRST_USE_CHECK(op, name, device, args) is not None:
                continue  # failed its check on this device: the next backend runs
            return name
    raise BackendUnavailable(f"{op}: no backend can run on {device}")


def auto_order(device: torch.device) -> Tuple[str, ...]:
    """The backends "auto" tries on `device`, first to last (the first that can run the case wins).
    On CPU tensors "cuda" is the emulated core, when GEOMOE_CUDA_EMULATE turns it on; Triton only
    under TRITON_INTERPRET=1."""
    return ("cuda", "triton", "torch") if device.type == "cuda" or triton_interpreting() else ("cuda", "torch")


def auto_choice(op: str, device: torch.device) -> Tuple[str, Dict[str, str]]:
    """(the backend "auto" takes for `op` on `device` for the cases every backend supports, {each
    backend it passed over before that one: why}); for `info`. (A kernel that failed its self-check
    on a device is passed over there too, per dtype: self_check.summary names those.)"""
    passed: Dict[str, str] = {}
    for name in auto_order(device):
        if (op, name) in _EXPLICIT_ONLY:
            passed[name] = "runs only when asked for by name (not yet verified on a GPU)"
            continue
        reason = _why_not(op, name, device, None)
        if reason is None:
            return name, passed
        passed[name] = reason
    return "none", passed


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
