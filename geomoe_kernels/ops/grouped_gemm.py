"""Grouped GEMM: rows [M, K] grouped by offsets [E+1] times weights [E, K, N] (+ bias [E, N]),
with an optional activation (gelu, silu, or swiglu on columns [gate | up], which halves N).

With `gather` (the routing's row_to_flat, [M]) x holds tokens [M / top_k, K] and row r reads token
gather[r] // top_k: the permutation happens inside the GEMM's load, with no permuted copy; the
gradient of x then comes back through the combine (unpermute) of the row gradients.

The op returns (out, pre): pre is the pre-activation that backward needs (empty for 'none'). The
backward op gives the row gradients, dweight and dbias (always computed: one reduction); experts
that own no rows get exactly zero dweight and dbias."""
from typing import Optional, Tuple

import torch
from torch import Tensor

from .. import backend as _backend
from .._checks import (
    FLOAT_DTYPES,
    INDEX_DTYPES,
    OpInputError,
    check_choice,
    check_index_range,
    check_same_dtype,
    check_tensor,
    value_checks_enabled,
)
from ..reference import activations
from ..reference import grouped_gemm as _ref
from ._dispatch import OP_TAGS, run
from .permute import unpermute_op


def _rows(x: Tensor, gather: Optional[Tensor]) -> int:
    return x.shape[0] if gather is None else gather.numel()


def _check(x: Tensor, weight: Tensor, offsets: Tensor, bias: Optional[Tensor], activation: str,
           gather: Optional[Tensor] = None, top_k: int = 1, op: str = "grouped_mm", names=("weight", "bias")) -> None:
    """names: what the op calls its weight and bias (expert_mlp: w1, b1)."""
    wname, bname = names
    check_tensor(op, "x", x, dtypes=FLOAT_DTYPES, dim=2)
    if gather is not None:
        check_tensor(op, "gather", gather, dtypes=INDEX_DTYPES, dim=1, device=x.device)
        if top_k < 1 or gather.numel() != x.shape[0] * top_k:
            raise OpInputError(
                f"{op}: argument 'gather' expected T * top_k = {x.shape[0]} * {top_k} entries (x holds T tokens), got {gather.numel()}"
            )
    check_tensor(op, wname, weight, dtypes=FLOAT_DTYPES, dim=3, device=x.device)
    check_same_dtype(op, ["x", wname], [x, weight])
    E, K, N = weight.shape
    if K == 0 or N == 0:
        raise OpInputError(f"{op}: argument '{wname}' expected [E, K, N] with K >= 1 and N >= 1, got {list(weight.shape)}")
    if x.shape[1] != K:
        raise OpInputError(f"{op}: argument 'x' expected {K} columns ({wname} is [E, K, N] = {list(weight.shape)}), got {x.shape[1]}")
    check_tensor(op, "offsets", offsets, dtypes=INDEX_DTYPES, shape=(E + 1,), device=x.device)
    check_tensor(op, bname, bias, dtypes=(x.dtype,), shape=(E, N), device=x.device, optional=True)
    check_choice(op, "activation", activation, activations.ACTIVATIONS)
    if activation == "swiglu" and N % 2:
        raise OpInputError(f"{op}: activation 'swiglu' expected an even N ([gate | up] columns), got N = {N}")


def _check_offset_values(offsets: Tensor, M: int, op: str = "grouped_mm") -> None:
    if not value_checks_enabled(offsets):
        return
    steps = offsets[1:] - offsets[:-1]
    if int(offsets[0]) != 0 or int(offsets[-1]) != M or bool((steps < 0).any()):
        raise OpInputError(
            f"{op}: argument 'offsets' expected non-decreasing values from 0 to {M} (the rows of x), "
            f"got {offsets.tolist() if offsets.numel() <= 16 else 'first ' + str(int(offsets[0])) + ', last ' + str(int(offsets[-1]))}"
        )


@torch.library.custom_op("geomoe::grouped_mm", mutates_args=(), tags=OP_TAGS)
def grouped_mm_op(
    x: Tensor, weight: Tensor, offsets: Tensor, bias: Optional[Tensor], activation: str,
    gather: Optional[Tensor] = None, top_k: int = 1, backend: str = "auto",
) -> Tuple[Tensor, Tensor]:
    _check(x, weight, offsets, bias, activation, gather, top_k)
    _check_offset_values(offsets, _rows(x, gather))
    if gather is not None:
        check_index_range("grouped_mm", "gather", gather, 0, gather.numel())
    return run("grouped_mm", backend, x.device, (x, weight, offsets, bias, activation, gather, top_k))


@grouped_mm_op.register_fake
def _(x, weight, offsets, bias, activation, gather=None, top_k=1, backend="auto"):
    _check(x, weight, offsets, bias, activation, gather, top_k)
    M, N = _rows(x, gather), weight.shape[2]
    out = x.new_empty(M, activations.out_features(activation, N))
    pre = x.new_empty(0) if activation == "none" else x.new_empty(M, N)
    return out, pre


@torch.library.custom_op("geomoe::grouped_mm_backward", mutates_args=(), tags=OP_TAGS)
def grouped_mm_backward_op(
    grad_out: Tensor,
    x: Tensor,
    weight: Tensor,
    offsets: Tensor,
    pre: Optional[Tensor],
    activation: str,
    gather: Optional[Tensor] = None,
    top_k: int = 1,
    backend: str = "auto",
) -> Tuple[Tensor, Tensor, Tensor]:
    """(d rows [M, K] in expert-major order, dweight, dbias)."""
    check_tensor("grouped_mm_backward", "grad_out", grad_out, dtypes=(x.dtype,), dim=2, device=x.device)
    return run("grouped_mm_backward", backend, x.device, (grad_out, x, weight, offsets, pre, activation, gather, top_k))


@grouped_mm_backward_op.register_fake
def _(grad_out, x, weight, offsets, pre, activation, gather=None, top_k=1, backend="auto"):
    return x.new_empty(_rows(x, gather), x.shape[1]), torch.empty_like(weight), weight.new_empty(weight.shape[0], weight.shape[2])


_backend.register("grouped_mm", "torch", _ref.grouped_mm)
_backend.register("grouped_mm_backward", "torch", _ref.grouped_mm_backward)


class GroupedMM(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, offsets, bias, activation, gather, flat_to_row, top_k, backend):
        out, pre = grouped_mm_op(x, weight, offsets, bias, activation, gather, top_k, backend)
        ctx.save_for_backward(x, weight, offsets, pre if activation != "none" else None, gather, flat_to_row)
        ctx.config = (activation, backend, bias is not None, top_k)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        x, weight, offsets, pre, gather, flat_to_row = ctx.saved_tensors
        activation, backend, has_bias, top_k = ctx.config
        d_rows, dw, db = grouped_mm_backward_op(grad_out.contiguous(), x, weight, offsets, pre, activation, gather, top_k, backend)
        # gathered: each token's k row gradients summed in slot order (deterministic)
        dx = d_rows if gather is None else unpermute_op(d_rows, flat_to_row, top_k, None, None, backend)
        return dx, dw, None, (db if has_bias else None), None, None, None, None, None


def grouped_mm(
    x: Tensor,
    weight: Tensor,
    offsets: Tensor,
    bias: Optional[Tensor] = None,
    activation: str = "none",
    backend: str = "auto",
    gather: Optional[Tensor] = None,
    flat_to_row: Optional[Tensor] = None,
    top_k: int = 1,
) -> Tensor:
    """act(A[r] @ weight[e] + bias[e]) for the rows r of each expert e, A = x, or with `gather` (and
    its inverse `flat_to_row`, from route) A[r] = x[gather[r] // top_k]; differentiable in x, weight, bias."""
    if (gather is None) != (flat_to_row is None):
        raise OpInputError("grouped_mm: arguments 'gather' and 'flat_to_row' expected together (both from route), got one")
    bias = None if bias is None else bias.contiguous()
    return GroupedMM.apply(x.contiguous(), weight.contiguous(), offsets, bias, activation, gather, flat_to_row, top_k, backend)
