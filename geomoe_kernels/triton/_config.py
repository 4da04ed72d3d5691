"""Launch configurations: autotuned on a GPU, exactly one pinned config under TRITON_INTERPRET=1
(the interpreter cannot autotune, and is slow, so it gets tiny tiles). GEOMOE_TRITON_AUTOTUNE=0
keeps only the first config that a kernel's register budget admits, and times nothing: one compile
per kernel (quick correctness runs on a GPU; not for speed).

Register budgets. A config whose tiles need more registers than a thread has spills them to local
memory, and the autotuner may still pick it (it only skips configs that fail to compile or exceed
shared memory). Each GEMM kernel therefore declares the float32 accumulator elements one thread
holds in a config, as a function of the launch's arguments, and the configs over the budget are
pruned before autotuning. The budgets come from ptxas's report for sm_90 (tools/triton_offline.py,
tests/test_triton_offline.py): with bf16/fp16 operands, 64 elements per thread compiled without
spills with every epilogue, and 128 (SwiGLU's two accumulators at 64 each, or one 128 x 128 tile
on 4 warps) spilled; with float32 operands (full precision or TF32) the operand tiles take twice
the registers, and 64 spilled in the weight gradient and norm_linear: the budget is 32 for every
GEMM kernel with float32 operands (the grouped GEMM's 64-row fp32 tiles fit it too)."""

import os
from typing import Any, Callable, Dict, List, Optional

import torch
import triton

from ..backend import triton_interpreting

INTERPRET = triton_interpreting()

# float32 accumulator elements per thread that compile without spills (see the module docstring)
BUDGET = 64
BUDGET_FP32_OPERANDS = 32

Footprint = Callable[[Dict[str, Any], int], float]  # (launch arguments + config meta, num_warps) -> elements per thread


def configs(gpu_configs, pinned):
    """gpu_configs: list of (meta dict, num_warps, num_stages); pinned: the meta dict for the interpreter."""
    if INTERPRET:
        return [triton.Config(pinned, num_warps=1, num_stages=1)]
    return [triton.Config(meta, num_warps=w, num_stages=s) for meta, w, s in gpu_configs]


def first_config_only() -> bool:
    return os.environ.get("GEOMOE_TRITON_AUTOTUNE", "1") == "0"


def _untimed(kernel_call: Callable, quantiles=None, **_: Any) -> List[float]:
    """The autotuner's timing under GEOMOE_TRITON_AUTOTUNE=0, where one config is left: nothing to
    compare, so nothing is launched (Triton before 3.7 times even a single pruned config)."""
    return [0.0] * (len(quantiles) if quantiles else 1)


def autotune_options(footprint: Optional[Footprint] = None, operand: Optional[str] = None) -> Dict[str, Any]:
    """triton.autotune's keyword arguments: prune_configs_by keeps the configs whose footprint is
    within the budget (BUDGET_FP32_OPERANDS where the tensor argument `operand` is float32), never
    none (the smallest footprint stays if all are over), then only the first under
    GEOMOE_TRITON_AUTOTUNE=0, whose timing (read at import) launches nothing."""

    def prune(configs: List[triton.Config], named_args: Dict[str, Any], **kwargs: Any) -> List[triton.Config]:
        return admitted(configs, {**named_args, **kwargs}, footprint, operand)

    return {"prune_configs_by": {"early_config_prune": prune}, "do_bench": _untimed if first_config_only() else None}


def admitted(
    configs: List[triton.Config], args: Dict[str, Any], footprint: Optional[Footprint], operand: Optional[str]
) -> List[triton.Config]:
    """The configs a launch with `args` (its arguments by name) may run, in list order."""
    keep = list(configs)
    if footprint is not None:
        fp32 = operand is not None and getattr(args.get(operand), "dtype", None) == torch.float32
        budget = BUDGET_FP32_OPERANDS if fp32 else BUDGET
        size = {id(c): footprint({**args, **c.kwargs}, c.num_warps) for c in configs}
        keep = [c for c in configs if size[id(c)] <= budget] or [min(configs, key=lambda c: size[id(c)])]
    if first_config_only():
        keep = keep[:1]
    return keep


def accumulator_elements(rows: int, cols: int, num_warps: int, tiles: int = 1) -> float:
    """float32 elements per thread of `tiles` accumulators of rows x cols spread over the warps."""
    return rows * cols * tiles / (32 * num_warps)


def pow2(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())
