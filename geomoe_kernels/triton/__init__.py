"""Triton kernels beside their launchers, one file per op family. Each module registers its launchers
as the "triton" backend of their ops itself (backend.kernel, with the support check and an example
launch for tools/triton_offline.py); register() imports every module of this package (names not
starting with "_"), as geomoe_kernels.ops does its op modules, so a new kernel file needs no line
here. Triton reads TRITON_INTERPRET when a kernel is defined, that is when geomoe_kernels is
imported: set it before (the test suite runs its interpreter tests in a process of their own).
Machines without triton import geomoe_kernels all the same (the backend then says why it is out)."""

import importlib
import importlib.util
import pkgutil
from typing import Any, Callable, Optional

from .. import backend as _backend

WHO = "the Triton kernels"


def rows_reason(t) -> Optional[str]:
    """Why the Triton kernels cannot take these rows (a support check's building block), or None."""
    return _backend.rows_reason(WHO, t)


def gating_reason(logits, top_k: int) -> Optional[str]:
    return _backend.gating_reason(WHO, logits, top_k, max_experts=1024, max_k=64)


def kernel(
    op: str, supports: Optional[Callable[..., Optional[str]]] = None, example: Optional[Callable[[Any], None]] = None
) -> Callable[[Callable], Callable]:
    """backend.kernel(op, "triton", ...): registers the decorated launcher as `op`'s Triton kernel."""
    return _backend.kernel(op, "triton", supports=supports, example=example)


def modules() -> list:
    """The kernel modules of this package (geomoe_kernels.triton.<name>), in name order."""
    return [
        f"{__name__}.{m.name}" for m in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name) if not m.name.startswith("_")
    ]


def register() -> None:
    if importlib.util.find_spec("triton") is None:
        _backend.set_unavailable_reason("triton", "triton is not installed")
        return
    for name in modules():
        importlib.import_module(name)
