"""Loads the compiled CUDA core (geomoe_kernels._cuda_core, built by setup.py with nvcc) and says
why when it cannot."""
from __future__ import annotations

import importlib
from typing import Optional, Tuple


def load() -> Tuple[Optional[object], str]:
    """(module or None, a line saying what was loaded or why not)."""
    try:
        core = importlib.import_module("geomoe_kernels._cuda_core")
    except ImportError as exc:
        return None, f"not built ({exc}); this version ships no CUDA C++ kernels yet"
    archs = getattr(core, "architectures", lambda: "unknown")()
    return core, f"loaded from {core.__file__} for {archs}"
