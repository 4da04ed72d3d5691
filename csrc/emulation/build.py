"""How kernel sources become the emulated build: the one source rewrite, the compiler flags and where
the CUDA headers are. setup.py builds the emulated core with it, and the tests build the kernels
they break on purpose with it (both load this file by its path: it imports nothing of the package)."""

from __future__ import annotations

import glob
import os
import re
import shutil
from typing import List, Optional

HERE = os.path.dirname(os.path.abspath(__file__))
CSRC = os.path.dirname(HERE)

# `extern __shared__ T name[];` has no meaning to a host compiler: the emulated copy of a kernel
# source reads the launch's dynamic shared memory from the emulator instead. Nothing else changes.
DYNAMIC_SHARED = re.compile(r"\bextern\s+__shared__\s+(?:__align__\(\s*\d+\s*\)\s+)?([A-Za-z_][\w:<>, ]*?)\s+(\w+)\s*\[\s*\]\s*;")

# -fno-ipa-icf keeps identical kernels apart, so that an error names the kernel that failed;
# -fvisibility=hidden gives every library its own emulator (the C++ runtime would otherwise make one
# copy of its inline state serve every library in the process); #pragma unroll is nvcc's; the
# kernels compare blockDim (unsigned) with ints as CUDA code does.
FLAGS = [
    "-std=c++17",
    "-O2",
    "-fno-ipa-icf",
    "-fvisibility=hidden",
    "-Wno-unknown-pragmas",
    "-Wno-sign-compare",
    "-DGEOMOE_EMULATION=1",
]
ASAN_FLAGS = ["-fsanitize=address", "-fno-omit-frame-pointer", "-g"]


def host_source(path: str) -> str:
    """The text the host compiler compiles for the kernel source at `path` (its own line numbers)."""
    text = DYNAMIC_SHARED.sub(r"\1* const \2 = ::geomoe_emu::dynamic_shared<\1>();", open(path).read())
    if "extern __shared__" in text:
        raise RuntimeError(f"{os.path.basename(path)}: a dynamic shared memory declaration the emulation cannot read")
    return f'#line 1 "{path}"\n{text}'


def include_dirs(cuda_include: str) -> List[str]:
    """The emulated runtime first (it is <cuda_runtime.h> and <mma.h> here), then csrc/, then the
    toolkit's headers for __half and __nv_bfloat16."""
    return [HERE, CSRC, cuda_include]


def cuda_headers(nvcc: Optional[str] = None) -> Optional[str]:
    """The CUDA toolkit's include directory, or None. Only the host halves of cuda_fp16.h and
    cuda_bf16.h (and the types they need) are used: no GPU, driver or nvcc run."""
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    nvcc = nvcc or shutil.which("nvcc")
    candidates = [os.path.dirname(os.path.dirname(os.path.realpath(nvcc)))] if nvcc else []
    candidates += ([home] if home else []) + ["/usr/local/cuda"] + sorted(glob.glob("/usr/local/cuda-*"))[::-1]
    for c in candidates:
        if os.path.exists(os.path.join(c, "include", "cuda_fp16.h")):
            return os.path.join(c, "include")
    return None
