"""Triton kernels beside their launchers, one file per op family. Registered with the backend
registry lazily: nothing imports triton until a Triton kernel is first called, so that
TRITON_INTERPRET (read when a kernel is defined) can be set by then, and so that machines without
triton import geomoe_kernels at all."""
import importlib
import importlib.util
from typing import Callable, Optional

import torch

from .. import backend as _backend



def _lazy(module: str, name: str) -> Callable:
    def call(*args):
        return getattr(importlib.import_module(f"{__name__}.{module}"), name)(*args)

    call.__name__ = f"triton_{name}"
    return call


WHO = "the Triton kernels"


def _rows_dtype(t: torch.Tensor) -> Optional[str]:
    return _backend.rows_reason(WHO, t)


def _weights_ok(w) -> Optional[str]:
    return _backend.weights_reason(WHO, w)


def _gating_ok(logits, bias=None, top_k=1, *rest) -> Optional[str]:
    return _backend.gating_reason(WHO, logits, top_k, max_experts=1024, max_k=64)


def _route_ok(ids, num_experts, *rest) -> Optional[str]:
    return None if num_experts <= 256 else f"the Triton routing histogram takes at most 256 experts, got {num_experts}"


def register() -> None:
    if importlib.util.find_spec("triton") is None:
        _backend._UNAVAILABLE_REASON["triton"] = "triton is not installed"
        return
    r = _backend.register
    r("topk_gating", "triton", _lazy("gating", "topk_gating"), _gating_ok)
    r("topk_gating_backward", "triton", _lazy("gating", "topk_gating_backward"),
      lambda gw, gp, logits, ids, *rest: _gating_ok(logits, None, ids.shape[1]))
    r("route", "triton", _lazy("permute", "route"), _route_ok)
    r("permute", "triton", _lazy("permute", "permute"), lambda x, r2f, k, w: _rows_dtype(x) or _weights_ok(w))
    r("unpermute", "triton", _lazy("permute", "unpermute"), lambda rows, f2r, k, w, s: _rows_dtype(rows) or _weights_ok(w))
    r("unpermute_weight_grad", "triton", _lazy("permute", "unpermute_weight_grad"), lambda g, rows, *rest: _rows_dtype(rows))
    r("grouped_mm", "triton", _lazy("grouped_gemm", "grouped_mm"), lambda x, *rest: _rows_dtype(x))
    r("grouped_mm_backward", "triton", _lazy("grouped_gemm", "grouped_mm_backward"), lambda g, x, *rest: _rows_dtype(x))
    r("expert_mlp", "triton", _lazy("grouped_gemm", "expert_mlp"), lambda x, *rest: _rows_dtype(x))
    r("expert_mlp_backward", "triton", _lazy("grouped_gemm", "expert_mlp_backward"), lambda g, x, *rest: _rows_dtype(x))
    r("masked_depthwise_conv", "triton", _lazy("sparse_conv", "masked_depthwise_conv"), lambda x, *rest: _rows_dtype(x))
    r("masked_depthwise_conv_backward", "triton", _lazy("sparse_conv", "masked_depthwise_conv_backward"),
      lambda g, x, *rest: _rows_dtype(x))
    r("norm_linear", "triton", _lazy("norm_linear", "norm_linear"),
      lambda x, nw, nb, w, *rest: _rows_dtype(x) or _rows_dtype(w))
