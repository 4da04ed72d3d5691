"""Triton kernels beside their launchers, one file per op family. Registered with the backend
registry lazily: nothing imports triton until a Triton kernel is first called, so that
TRITON_INTERPRET (read when a kernel is defined) can be set by then, and so that machines without
triton import geomoe_kernels at all."""

import importlib
import importlib.util
from typing import Callable, Dict, Optional, Tuple, Union

from .. import backend as _backend
from ..reference.norm_linear import norm_linear_backward as _reference_norm_linear_backward

WHO = "the Triton kernels"


def _lazy(module: str, name: str) -> Callable:
    def call(*args):
        return getattr(importlib.import_module(f"{__name__}.{module}"), name)(*args)

    call.__name__ = f"triton_{name}"
    return call


def _rows(t) -> Optional[str]:
    return _backend.rows_reason(WHO, t)


def _gating(logits, top_k: int) -> Optional[str]:
    return _backend.gating_reason(WHO, logits, top_k, max_experts=1024, max_k=64)


# op -> (module, launcher) or a function, and the support check (the op's arguments by name)
KERNELS: Dict[str, Tuple[Union[Tuple[str, str], Callable], Optional[Callable[..., Optional[str]]]]] = {
    "topk_gating": (("gating", "topk_gating"), lambda logits, top_k, **_: _gating(logits, top_k)),
    "topk_gating_backward": (("gating", "topk_gating_backward"), lambda logits, ids, **_: _gating(logits, ids.shape[1])),
    "route": (
        ("permute", "route"),
        lambda num_experts, **_: (
            None if num_experts <= 256 else f"the Triton routing histogram takes at most 256 experts, got {num_experts}"
        ),
    ),
    "permute": (("permute", "permute"), lambda x, weights, **_: _rows(x) or _backend.weights_reason(WHO, weights)),
    "unpermute": (("permute", "unpermute"), lambda rows, weights, **_: _rows(rows) or _backend.weights_reason(WHO, weights)),
    "unpermute_weight_grad": (("permute", "unpermute_weight_grad"), lambda rows, **_: _rows(rows)),
    "grouped_mm": (("grouped_gemm", "grouped_mm"), lambda x, **_: _rows(x)),
    "grouped_mm_backward": (("grouped_gemm", "grouped_mm_backward"), lambda x, **_: _rows(x)),
    "expert_mlp": (("grouped_gemm", "expert_mlp"), lambda x, **_: _rows(x)),
    "expert_mlp_backward": (("grouped_gemm", "expert_mlp_backward"), lambda x, **_: _rows(x)),
    "masked_depthwise_conv": (("sparse_conv", "masked_depthwise_conv"), lambda x, **_: _rows(x)),
    "masked_depthwise_conv_backward": (("sparse_conv", "masked_depthwise_conv_backward"), lambda x, **_: _rows(x)),
    "norm_linear": (("norm_linear", "norm_linear"), lambda x, weight, **_: _rows(x) or _rows(weight)),
    # the same cuBLAS GEMMs and fused LayerNorm backward as the reference (see ops/norm_linear.py)
    "norm_linear_backward": (_reference_norm_linear_backward, None),
}


def register() -> None:
    if importlib.util.find_spec("triton") is None:
        _backend.set_unavailable_reason("triton", "triton is not installed")
        return
    for op, (impl, supports) in KERNELS.items():
        _backend.register(op, "triton", _lazy(*impl) if isinstance(impl, tuple) else impl, supports)
