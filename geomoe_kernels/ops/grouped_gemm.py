"""Grouped GEMM: rows [M, K] grouped by offsets [E+1] times weights [E, K, N] (+ bias [E, N]),
with an optional activation (gelu, silu, or swiglu on columns [gate | up], which halves N).

The op returns (out, pre): pre is the pre-activation that backward needs (empty for 'none').
Backward gives dx, dweight, dbias (always computed: it is one reduction); experts that own no rows get exactly zero dweight and dbias."""
from typing import Optional, Tuple

import torch
from torch import Tensor

from .. import backend as _backend
from .._checks import (
    FLOAT_DTYPES,
    INDEX_DTYPES,
    OpInputError,
    check_choice,
    check_same_dtype,
    check_tensor,
    value_checks_enabled,
)
from ..reference import activations
from ..reference import grouped_gemm as _ref
from ._dispatch import run


def _check(x: Tensor, weight: Tensor, offsets: Tensor, bias: Optional[Tensor], activation: str) -> None:
    op = "grouped_mm"
    check_tensor(op, "x", x, dtypes=FLOAT_DTYPES, dim=2)
    check_tensor(op, "weight", weight, dtypes=FLOAT_DTYPES, dim=3, device=x.device)
    check_same_dtype(op, ["x", "weight"], [x, weight])
    E, K, N = weight.shape
    if x.shape[1] != K:
        raise OpInputError(f"{op}: argument 'x' expected {K} columns (weight is [E, K, N] = {list(weight.shape)}), got {x.shape[1]}")
    check_tensor(op, "offsets", offsets, dtypes=INDEX_DTYPES, shape=(E + 1,), device=x.device)
    check_tensor(op, "bias", bias, dtypes=(x.dtype,), shape=(E, N), device=x.device, optional=True)
    check_choice(op, "activation", activation, activations.ACTIVATIONS)
    if activation == "swiglu" and N % 2:
        raise OpInputError(f"{op}: activation 'swiglu' expected an even N ([gate | up] columns), got N = {N}")


def _check_offset_values(offsets: Tensor, M: int) -> None:
    if not value_checks_enabled(offsets):
        return
    steps = offsets[1:] - offsets[:-1]
    if int(offsets[0]) != 0 or int(offsets[-1]) != M or bool((steps < 0).any()):
        raise OpInputError(
            f"grouped_mm: argument 'offsets' expected non-decreasing values from 0 to {M} (the rows of x), "
            f"got {offsets.tolist() if offsets.numel() <= 16 else 'first ' + str(int(offsets[0])) + ', last ' + str(int(offsets[-1]))}"
        )


@torch.library.custom_op("geomoe::grouped_mm", mutates_args=())
def grouped_mm_op(
    x: Tensor, weight: Tensor, offsets: Tensor, bias: Optional[Tensor], activation: str, backend: str = "auto"
) -> Tuple[Tensor, Tensor]:
    _check(x, weight, offsets, bias, activation)
    _check_offset_values(offsets, x.shape[0])
    return run("grouped_mm", backend, x.device, (x, weight, offsets, bias, activation))


@grouped_mm_op.register_fake
def _(x, weight, offsets, bias, activation, backend="auto"):
    _check(x, weight, offsets, bias, activation)
    M, N = x.shape[0], weight.shape[2]
    out = x.new_empty(M, activations.out_features(activation, N))
    pre = x.new_empty(0) if activation == "none" else x.new_empty(M, N)
    return out, pre


@torch.library.custom_op("geomoe::grouped_mm_backward", mutates_args=())
def grouped_mm_backward_op(
    grad_out: Tensor,
    x: Tensor,
    weight: Tensor,
    offsets: Tensor,
    pre: Optional[Tensor],
    activation: str,
    backend: str = "auto",
) -> Tuple[Tensor, Tensor, Tensor]:
    check_tensor("grouped_mm_backward", "grad_out", grad_out, dtypes=(x.dtype,), dim=2, device=x.device)
    return run("grouped_mm_backward", backend, x.device, (grad_out, x, weight, offsets, pre, activation))


@grouped_mm_backward_op.register_fake
def _(grad_out, x, weight, offsets, pre, activation, backend="auto"):
    return torch.empty_like(x), torch.empty_like(weight), weight.new_empty(weight.shape[0], weight.shape[2])


_backend.register("grouped_mm", "torch", _ref.grouped_mm)
_backend.register("grouped_mm_backward", "torch", _ref.grouped_mm_backward)


class GroupedMM(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, offsets, bias, activation, backend):
        out, pre = grouped_mm_op(x, weight, offsets, bias, activation, backend)
        ctx.save_for_backward(x, weight, offsets, pre if activation != "none" else None)
        ctx.config = (activation, backend, bias is not None)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        x, weight, offsets, pre = ctx.saved_tensors
        activation, backend, has_bias = ctx.config
        dx, dw, db = grouped_mm_backward_op(grad_out.contiguous(), x, weight, offsets, pre, activation, backend)
        return dx, dw, None, (db if has_bias else None), None, None


def grouped_mm(
    x: Tensor,
    weight: Tensor,
    offsets: Tensor,
    bias: Optional[Tensor] = None,
    activation: str = "none",
    backend: str = "auto",
) -> Tensor:
    """act(x[r] @ weight[e] + bias[e]) for the rows r of each expert e; differentiable in x, weight, bias."""
    bias = None if bias is None else bias.contiguous()
    return GroupedMM.apply(x.contiguous(), weight.contiguous(), offsets, bias, activation, backend)
