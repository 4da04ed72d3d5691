"""Grouped GEMM: rows [M, K] grouped by offsets [E+1] times weights [E, K, N] (+ bias [E, N]),
with an optional activation (gelu, silu, or swiglu on columns [gate | up], which halves N;
swiglu_interleaved: the same on columns [g0, u0, g1, u1, ...], W's and the bias's columns alike).

With `gather` (the routing's row_to_flat, [M]) x holds tokens [M / top_k, K] and row r reads token
gather[r] // top_k: the permutation happens inside the GEMM's load, with no permuted copy; the
gradient of x then comes back through the combine (unpermute) of the row gradients, which reads
its inverse `flat_to_row`.

The op returns (out, pre): pre is the pre-activation that backward needs (empty for 'none'). The
backward op gives the row gradients, dweight and dbias (always computed: one reduction); experts
that own no rows get exactly zero dweight and dbias."""

from typing import Optional, Tuple

import torch
from torch import Tensor

from .. import activations
from .._checks import (
    FLOAT_DTYPES,
    INDEX_DTYPES,
    OpInputError,
    check_choice,
    check_index_range,
    check_inverse_permutations,
    check_same_dtype,
    check_tensor,
    value_checks_enabled,
)
from ..reference import grouped_gemm as _ref
from . import _case
from ._declare import Verification, contiguous, declare
from .permute import route, unpermute_op


def _rows(x: Tensor, gather: Optional[Tensor]) -> int:
    return x.shape[0] if gather is None else gather.numel()


def _check(
    x: Tensor,
    weight: Tensor,
    offsets: Tensor,
    bias: Optional[Tensor],
    activation: str,
    gather: Optional[Tensor] = None,
    flat_to_row: Optional[Tensor] = None,
    top_k: int = 1,
    op: str = "grouped_mm",
    names=("weight", "bias"),
) -> None:
    """names: what the op calls its weight and bias (expert_mlp: w1, b1)."""
    wname, bname = names
    check_tensor(op, "x", x, dtypes=FLOAT_DTYPES, dim=2)
    if (gather is None) != (flat_to_row is None):
        raise OpInputError(f"{op}: arguments 'gather' and 'flat_to_row' expected together (both from route), got one")
    if gather is not None:
        check_tensor(op, "gather", gather, dtypes=INDEX_DTYPES, dim=1, device=x.device)
        if top_k < 1 or gather.numel() != x.shape[0] * top_k:
            raise OpInputError(
                f"{op}: argument 'gather' expected T * top_k = {x.shape[0]} * {top_k} entries (x holds T tokens), got {gather.numel()}"
            )
        check_tensor(op, "flat_to_row", flat_to_row, dtypes=INDEX_DTYPES, shape=(gather.numel(),), device=x.device)
    check_tensor(op, wname, weight, dtypes=FLOAT_DTYPES, dim=3, device=x.device)
    check_same_dtype(op, ["x", wname], [x, weight])
    E, K, N = weight.shape
    if K == 0 or N == 0:
        raise OpInputError(f"{op}: argument '{wname}' expected [E, K, N] with K >= 1 and N >= 1, got {list(weight.shape)}")
    if x.shape[1] != K:
        raise OpInputError(
            f"{op}: argument 'x' expected {K} columns ({wname} is [E, K, N] = {list(weight.shape)}), got {x.shape[1]}"
        )
    check_tensor(op, "offsets", offsets, dtypes=INDEX_DTYPES, shape=(E + 1,), device=x.device)
    check_tensor(op, bname, bias, dtypes=(x.dtype,), shape=(E, N), device=x.device, optional=True)
    check_choice(op, "activation", activation, activations.ACTIVATIONS)
    if activation in activations.SWIGLUS and N % 2:
        cols = "[gate | up]" if activation == "swiglu" else "(gate, up) pairs of"
        raise OpInputError(f"{op}: activation {activation!r} expected an even N ({cols} columns), got N = {N}")


def _check_values(x: Tensor, offsets: Tensor, gather: Optional[Tensor], flat_to_row: Optional[Tensor], op: str) -> None:
    """offsets non-decreasing from 0 to the row count; gather a permutation of the T * top_k slots
    and flat_to_row (what the backward combines the row gradients through) its inverse."""
    M = _rows(x, gather)
    if value_checks_enabled(offsets):
        steps = offsets[1:] - offsets[:-1]
        if int(offsets[0]) != 0 or int(offsets[-1]) != M or bool((steps < 0).any()):
            raise OpInputError(
                f"{op}: argument 'offsets' expected non-decreasing values from 0 to {M} (the rows of x), "
                f"got {offsets.tolist() if offsets.numel() <= 16 else 'first ' + str(int(offsets[0])) + ', last ' + str(int(offsets[-1]))}"
            )
    if gather is not None:
        check_index_range(op, "gather", gather, 0, gather.numel())
        if flat_to_row is not None:
            check_inverse_permutations(op, "gather", gather, "flat_to_row", flat_to_row)


def combine_row_grads(
    d_rows: Tensor, gather: Optional[Tensor], flat_to_row: Optional[Tensor], top_k: int, backend: str
) -> Tensor:
    """d x from the row gradients: gathered rows sum into their token, its k rows in slot order
    (deterministic)."""
    return d_rows if gather is None else unpermute_op(d_rows, gather, flat_to_row, top_k, None, None, backend)


def _verify(c, be, dev, dt):
    r2f, f2r, off = route(c["ids"].to(dev), _case.E, backend="torch")
    x, w, b = _case.leaves(c, ["x", "w1", "b1"], dev, dt)
    y = grouped_mm(x, w, off, b, "gelu", backend=be, gather=r2f, flat_to_row=f2r, top_k=_case.K)
    return [y, *_case.grads([y], [c["g_hidden"]], [x, w, b])], []


@declare(
    reference=_ref.grouped_mm,
    verification=Verification(_verify),
    for_backward_only=("flat_to_row",),
    value_checks=lambda x, offsets, gather, flat_to_row, **_: _check_values(x, offsets, gather, flat_to_row, "grouped_mm"),
)
def grouped_mm_op(
    x: Tensor,
    weight: Tensor,
    offsets: Tensor,
    bias: Optional[Tensor],
    activation: str,
    gather: Optional[Tensor] = None,
    flat_to_row: Optional[Tensor] = None,
    top_k: int = 1,
) -> Tuple[Tensor, Tensor]:
    _check(x, weight, offsets, bias, activation, gather, flat_to_row, top_k)


@grouped_mm_op.fake
def _(x, weight, activation, gather, **_):
    M, N = _rows(x, gather), weight.shape[2]
    out = x.new_empty(M, activations.out_features(activation, N))
    pre = x.new_empty(0) if activation == "none" else x.new_empty(M, N)
    return out, pre


def _fake_backward(x, weight, gather, **_):
    return x.new_empty(_rows(x, gather), x.shape[1]), torch.empty_like(weight), weight.new_empty(weight.shape[0], weight.shape[2])


@declare(reference=_ref.grouped_mm_backward, backward_of="grouped_mm", fake=_fake_backward)
def grouped_mm_backward(
    grad_out: Tensor,
    x: Tensor,
    weight: Tensor,
    offsets: Tensor,
    pre: Optional[Tensor],
    activation: str,
    gather: Optional[Tensor] = None,
    top_k: int = 1,
) -> Tuple[Tensor, Tensor, Tensor]:
    """(d rows [M, K] in expert-major order, dweight, dbias)."""
    check_tensor("grouped_mm_backward", "grad_out", grad_out, dtypes=(x.dtype,), dim=2, device=x.device)


def _setup_context(ctx, args, output):
    activation = args["activation"]
    ctx.save_for_backward(
        args["x"],
        args["weight"],
        args["offsets"],
        output[1] if activation != "none" else None,
        args["gather"],
        args["flat_to_row"],
    )
    ctx.config = (activation, args["backend"], args["bias"] is not None, args["top_k"])


def _backward(ctx, grad_out, _grad_pre):
    if grad_out is None:  # only `pre` was used: nothing flows back through it
        return {}
    x, weight, offsets, pre, gather, flat_to_row = ctx.saved_tensors
    activation, backend, has_bias, top_k = ctx.config
    d_rows, dw, db = grouped_mm_backward(grad_out.contiguous(), x, weight, offsets, pre, activation, gather, top_k, backend)
    grads = {"x": combine_row_grads(d_rows, gather, flat_to_row, top_k, backend), "weight": dw}
    return {**grads, "bias": db} if has_bias else grads


grouped_mm_op.register_autograd(_setup_context, _backward)


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
    out, _ = grouped_mm_op(
        x.contiguous(), weight.contiguous(), offsets, contiguous(bias), activation, gather, flat_to_row, top_k, backend
    )
    return out
