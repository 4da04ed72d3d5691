"""Precision and speed switches shared by pretraining and fine-tuning: --precision, --compile and
--activation-checkpointing.

- precision: "bf16" autocast (no grad scaler: bfloat16 has float32's exponent range), "fp16"
  autocast with a GradScaler (the published recipe), "fp32" (no autocast). The default is the
  published fp16 on CUDA and fp32 on a CPU.
- compile: each transformer block (the MoE blocks of the encoder and the decoder's cross-attention
  blocks) goes through torch.compile on its own, with fullgraph=True, so the fused geomoe_kernels
  ops (torch.library custom ops with fake implementations) stay whole, one node each, in every
  block's graph; a graph break is an error instead of a silent slow path. The backend is inductor
  where it can build its kernels (CUDA, or a CPU with a C++ compiler), else aot_eager.
- activation checkpointing: each transformer block's activations are recomputed in the backward
  (torch.utils.checkpoint, use_reentrant=False) instead of kept; the gradients are the same.
"""

from __future__ import annotations

import os
import shutil
from contextlib import nullcontext
from typing import Callable, List, Optional

import torch
from torch import nn

PRECISIONS = ("bf16", "fp16", "fp32")
_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}


def resolve_precision(precision: Optional[str], amp: Optional[bool], device: torch.device) -> str:
    """--precision, or the legacy --amp/--no-amp (fp16/fp32), or the default: fp16 on CUDA (the
    published recipe), fp32 on a CPU."""
    if precision is not None and precision not in PRECISIONS:
        raise ValueError(f"argument '--precision' expected one of {list(PRECISIONS)}, got {precision!r}")
    if precision is not None and amp is not None and (precision == "fp16") != amp:
        raise ValueError(
            f"arguments '--precision' and '--amp' expected to agree (--amp is --precision fp16, --no-amp is fp32), "
            f"got --precision {precision} with --{'' if amp else 'no-'}amp"
        )
    if precision is not None:
        return precision
    if amp is not None:
        return "fp16" if amp else "fp32"
    return "fp16" if device.type == "cuda" else "fp32"


def autocast(precision: str, device: torch.device, cache: bool = True):
    """The forward's autocast context for `precision` (none for fp32); cache=False: no cast cache
    (CUDA graphs: a cast cached during a capture must not outlive it)."""
    dtype = _DTYPES[precision]
    return nullcontext() if dtype is None else torch.autocast(device.type, dtype=dtype, cache_enabled=cache)


def grad_scaler(precision: str, device: torch.device) -> torch.amp.GradScaler:
    """A GradScaler, enabled for fp16 only (a disabled one passes step() and backward() through)."""
    return torch.amp.GradScaler(device.type, enabled=precision == "fp16")


def transformer_blocks(model: nn.Module) -> List[nn.Module]:
    """The model's transformer blocks: GeoMoE's MoE blocks (blocks3) or the MoE-ViT's blocks, and
    the decoder's blocks where the model has a decoder."""
    blocks: List[nn.Module] = []
    for name in ("blocks3", "blocks", "decoder_blocks"):
        blocks += list(getattr(model, name, []) or [])
    return blocks


def default_compile_backend(device: torch.device) -> str:
    """inductor where it can build kernels (CUDA; a CPU with a C++ compiler), else aot_eager. It loads
    inductor: call it only for --compile (a run without it never touches inductor or its cache)."""
    try:
        from torch._inductor import config
    except ImportError:  # pragma: no cover - inductor missing from this build
        return "aot_eager"
    except Exception as exc:  # e.g. a TORCHINDUCTOR_CACHE_DIR that is not a directory: its own error, named
        raise RuntimeError(
            f"--compile: torch's inductor cannot load ({type(exc).__name__}: {exc}); check TORCHINDUCTOR_CACHE_DIR "
            f"(now {os.environ.get('TORCHINDUCTOR_CACHE_DIR', 'unset')!r}) and the torch install"
        ) from exc
    if device.type == "cuda":
        return "inductor"
    cxx = config.cpp.cxx[-1] if isinstance(config.cpp.cxx, tuple) else config.cpp.cxx
    return "inductor" if cxx and shutil.which(str(cxx)) or shutil.which("g++") or shutil.which("clang++") else "aot_eager"


def _checkpointed(forward: Callable) -> Callable:
    from torch.utils.checkpoint import checkpoint

    def run(*args, **kwargs):
        if torch.is_grad_enabled():
            return checkpoint(forward, *args, use_reentrant=False, **kwargs)
        return forward(*args, **kwargs)

    return run


def apply_activation_checkpointing(model: nn.Module) -> int:
    """Recompute each transformer block's activations in the backward; returns how many blocks.
    The state dict's keys do not change (the block's forward is wrapped in place)."""
    blocks = transformer_blocks(model)
    for blk in blocks:
        blk.forward = _checkpointed(blk.forward)  # type: ignore[method-assign]
    return len(blocks)


def compile_blocks(model: nn.Module, backend: str) -> int:
    """torch.compile each transformer block in place (nn.Module.compile: the keys do not change),
    fullgraph so the fused ops stay whole in one graph per block; returns how many blocks."""
    blocks = transformer_blocks(model)
    for blk in blocks:
        blk.compile(backend=backend, fullgraph=True)
    return len(blocks)
