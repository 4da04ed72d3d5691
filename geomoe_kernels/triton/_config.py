"""Launch configurations: autotuned on a GPU, exactly one pinned config under TRITON_INTERPRET=1
(the interpreter cannot autotune, and is slow, so it gets tiny tiles). GEOMOE_TRITON_AUTOTUNE=0
keeps only the first GPU config of each kernel: no autotuning, one compile per kernel (quick
correctness runs on a GPU; not for speed)."""

import os

import triton

from ..backend import triton_interpreting

INTERPRET = triton_interpreting()


def configs(gpu_configs, pinned):
    """gpu_configs: list of (meta dict, num_warps, num_stages); pinned: the meta dict for the interpreter."""
    if INTERPRET:
        return [triton.Config(pinned, num_warps=1, num_stages=1)]
    if os.environ.get("GEOMOE_TRITON_AUTOTUNE", "1") == "0":
        gpu_configs = gpu_configs[:1]
    return [triton.Config(meta, num_warps=w, num_stages=s) for meta, w, s in gpu_configs]


def pow2(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())
