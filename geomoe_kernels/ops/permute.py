"""Routing permutation, permute (gather into expert-major rows) and unpermute (the weighted,
deterministic combine back to tokens, with the shared experts' output added in the same pass).

route:     expert ids [T, k]            -> row_to_flat [T*k], flat_to_row [T*k], offsets [E+1] (int64)
permute:   x [T, d]                     -> rows [T*k, d]  (optionally scaled by the routing weights)
unpermute: rows [T*k, d], weights [T, k] -> out [T, d] = shared + sum_k w_k * rows[flat_to_row[t*k+k]]

permute and unpermute are each other's backward, so each carries both maps."""

from typing import Optional, Tuple

import torch
from torch import Tensor

from .._checks import (
    FLOAT_DTYPES,
    INDEX_DTYPES,
    OpInputError,
    check_index_range,
    check_inverse_permutations,
    check_same_dtype,
    check_tensor,
)
from ..reference import permute as _ref
from . import _case
from ._declare import Verification, contiguous, declare

_WEIGHT_DTYPES = (torch.float32, torch.float64)


def _check_map(op: str, name: str, index: Tensor, device: torch.device, top_k: int) -> None:
    check_tensor(op, name, index, dtypes=INDEX_DTYPES, dim=1, device=device)
    if top_k < 1 or index.numel() % top_k:
        raise OpInputError(f"{op}: argument '{name}' expected T * top_k entries with top_k = {top_k}, got {index.numel()}")


def _check_inverse(op: str, name: str, index: Tensor, other: Tensor) -> None:
    check_tensor(op, name, index, dtypes=INDEX_DTYPES, shape=(other.numel(),), device=other.device)


def _check_maps_values(op: str, name: str, index: Tensor, high: int, inverse_name: str, inverse: Tensor) -> None:
    """`index` (the map the forward reads) in range, a permutation, and `inverse` (the map its
    backward reads) its inverse: the forward and the backward then agree."""
    check_index_range(op, name, index, 0, high)
    check_inverse_permutations(op, name, index, inverse_name, inverse)


def _check_weights(op: str, weights: Optional[Tensor], T: int, top_k: int, device) -> None:
    check_tensor(op, "weights", weights, dtypes=_WEIGHT_DTYPES, shape=(T, top_k), device=device, optional=True)


# ---- route ---------------------------------------------------------------------------------------


def _verify_route(c, be, dev, dt):
    """integer outputs only: one row in verify's table."""
    return [], list(route(c["ids"].to(dev), _case.E, backend=be))


def _verify_permute(c, be, dev, dt):
    r2f, f2r, _ = route(c["ids"].to(dev), _case.E, backend="torch")
    (x,) = _case.leaves(c, ["x"], dev, dt)
    y = permute(x, r2f, f2r, _case.K, backend=be)
    return [y, *_case.grads([y], [c["g_rows"]], [x])], []


def _verify_unpermute(c, be, dev, dt):
    r2f, f2r, _ = route(c["ids"].to(dev), _case.E, backend="torch")
    rows, shared = _case.leaves(c, ["rows", "shared"], dev, dt)
    w = c["weights"].to(dev, torch.float32 if dt in _case.HALF else dt).requires_grad_(True)
    y = unpermute(rows, r2f, f2r, _case.K, w, shared, backend=be)
    return [y, *_case.grads([y], [c["g_out"]], [rows, w, shared])], []


@declare(
    reference=_ref.route,
    verification=Verification(_verify_route, dtypes=(torch.float32,)),
    value_checks=lambda expert_ids, num_experts: check_index_range("route", "expert_ids", expert_ids, 0, num_experts),
)
def route(expert_ids: Tensor, num_experts: int) -> Tuple[Tensor, Tensor, Tensor]:
    """(row_to_flat [T*k], flat_to_row [T*k], offsets [E+1]) for expert ids [T, k]; all on the device."""
    check_tensor("route", "expert_ids", expert_ids, dtypes=INDEX_DTYPES, dim=2)
    if num_experts < 1:
        raise OpInputError(f"route: argument 'num_experts' expected >= 1, got {num_experts}")


@route.fake
def _(expert_ids, num_experts):
    n = expert_ids.numel()
    return expert_ids.new_empty(n), expert_ids.new_empty(n), expert_ids.new_empty(num_experts + 1)


# ---- permute -------------------------------------------------------------------------------------


@declare(
    reference=_ref.permute,
    verification=Verification(_verify_permute),
    for_backward_only=("flat_to_row",),
    fake=lambda x, row_to_flat, **_: x.new_empty(row_to_flat.numel(), x.shape[1]),
    value_checks=lambda row_to_flat, flat_to_row, **_: _check_maps_values(
        "permute", "row_to_flat", row_to_flat, row_to_flat.numel(), "flat_to_row", flat_to_row
    ),
)
def permute_op(x: Tensor, row_to_flat: Tensor, flat_to_row: Tensor, top_k: int, weights: Optional[Tensor]) -> Tensor:
    check_tensor("permute", "x", x, dtypes=FLOAT_DTYPES, dim=2)
    _check_map("permute", "row_to_flat", row_to_flat, x.device, top_k)
    if row_to_flat.numel() != x.shape[0] * top_k:
        raise OpInputError(
            f"permute: argument 'row_to_flat' expected {x.shape[0] * top_k} entries (T * top_k), got {row_to_flat.numel()}"
        )
    _check_inverse("permute", "flat_to_row", flat_to_row, row_to_flat)
    _check_weights("permute", weights, x.shape[0], top_k, x.device)


# ---- unpermute -----------------------------------------------------------------------------------


@declare(
    reference=_ref.unpermute,
    verification=Verification(_verify_unpermute),
    for_backward_only=("row_to_flat",),
    fake=lambda rows, flat_to_row, top_k, **_: rows.new_empty(flat_to_row.numel() // top_k, rows.shape[1]),
    value_checks=lambda rows, row_to_flat, flat_to_row, **_: _check_maps_values(
        "unpermute", "flat_to_row", flat_to_row, rows.shape[0], "row_to_flat", row_to_flat
    ),
)
def unpermute_op(
    rows: Tensor, row_to_flat: Tensor, flat_to_row: Tensor, top_k: int, weights: Optional[Tensor], shared: Optional[Tensor]
) -> Tensor:
    op = "unpermute"
    check_tensor(op, "rows", rows, dtypes=FLOAT_DTYPES, dim=2)
    _check_map(op, "flat_to_row", flat_to_row, rows.device, top_k)
    _check_inverse(op, "row_to_flat", row_to_flat, flat_to_row)
    T = flat_to_row.numel() // top_k
    _check_weights(op, weights, T, top_k, rows.device)
    check_tensor(op, "shared", shared, shape=(T, rows.shape[1]), device=rows.device, optional=True)
    check_same_dtype(op, ["rows", "shared"], [rows, shared])


@declare(reference=_ref.unpermute_weight_grad, backward_of="unpermute")
def unpermute_weight_grad(grad_out: Tensor, rows: Tensor, flat_to_row: Tensor, top_k: int) -> Tensor:
    """[T, k]: <grad_out[t], rows[flat_to_row[t * k + j]]>, the combine's routing-weight gradient."""


@unpermute_weight_grad.fake
def _(rows, flat_to_row, top_k, **_):
    acc = torch.promote_types(rows.dtype, torch.float32)
    return rows.new_empty(flat_to_row.numel() // top_k, top_k, dtype=acc)


# ---- autograd: permute and unpermute are each other's backward -----------------------------------


def _save_maps(ctx, args, output):
    weights = args["weights"]
    rows_in = args["x"] if "x" in args else args["rows"]  # read only by the routing weights' gradient
    ctx.save_for_backward(rows_in if weights is not None else None, args["row_to_flat"], args["flat_to_row"], weights)
    ctx.config = (args["top_k"], args["backend"], args.get("shared") is not None)


def _permute_backward(ctx, grad_rows):
    x, row_to_flat, flat_to_row, weights = ctx.saved_tensors
    top_k, backend, _ = ctx.config
    g = grad_rows.contiguous()
    grads = {"x": unpermute_op(g, row_to_flat, flat_to_row, top_k, weights, None, backend)}
    if weights is not None and ctx.needs_grad["weights"]:  # d w[f] = <g[row of f], x[f // k]>
        grads["weights"] = unpermute_weight_grad(x, g, flat_to_row, top_k, backend).to(weights.dtype)
    return grads


def _unpermute_backward(ctx, grad_out):
    rows, row_to_flat, flat_to_row, weights = ctx.saved_tensors
    top_k, backend, has_shared = ctx.config
    g = grad_out.contiguous()
    grads = {"shared": g} if has_shared else {}
    if ctx.needs_grad["rows"]:
        grads["rows"] = permute_op(g, row_to_flat, flat_to_row, top_k, weights, backend)
    if weights is not None and ctx.needs_grad["weights"]:
        grads["weights"] = unpermute_weight_grad(g, rows, flat_to_row, top_k, backend).to(weights.dtype)
    return grads


permute_op.register_autograd(_save_maps, _permute_backward)
unpermute_op.register_autograd(_save_maps, _unpermute_backward)


def permute(x: Tensor, row_to_flat: Tensor, flat_to_row: Tensor, top_k: int, backend: str = "auto") -> Tensor:
    """Rows of x in expert-major order [T*k, d]; differentiable in x."""
    return permute_op(x.contiguous(), row_to_flat, flat_to_row, top_k, None, backend)


def unpermute(
    rows: Tensor,
    row_to_flat: Tensor,
    flat_to_row: Tensor,
    top_k: int,
    weights: Optional[Tensor] = None,
    shared: Optional[Tensor] = None,
    backend: str = "auto",
) -> Tensor:
    """[T, d] = shared + sum over each token's k rows weighted by `weights` (float32 accumulation)."""
    return unpermute_op(rows.contiguous(), row_to_flat, flat_to_row, top_k, contiguous(weights), contiguous(shared), backend)
