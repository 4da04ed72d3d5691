"""Routing permutation, permute (gather into expert-major rows) and unpermute (the weighted,
deterministic combine back to tokens, with the shared experts' output added in the same pass).

route:     expert ids [T, k]            -> row_to_flat [T*k], flat_to_row [T*k], offsets [E+1] (int64)
permute:   x [T, d]                     -> rows [T*k, d]  (optionally scaled by the routing weights)
unpermute: rows [T*k, d], weights [T, k] -> out [T, d] = shared + sum_k w_k * rows[flat_to_row[t*k+k]]"""
from typing import Optional, Tuple

import torch
from torch import Tensor

from .. import backend as _backend
from .._checks import (
    FLOAT_DTYPES,
    INDEX_DTYPES,
    OpInputError,
    check_index_range,
    check_same_dtype,
    check_tensor,
)
from ..reference import permute as _ref
from ._dispatch import OP_TAGS, run

_WEIGHT_DTYPES = (torch.float32, torch.float64)


def _check_map(op: str, name: str, index: Tensor, device: torch.device, top_k: int) -> None:
    check_tensor(op, name, index, dtypes=INDEX_DTYPES, dim=1, device=device)
    if top_k < 1 or index.numel() % top_k:
        raise OpInputError(
            f"{op}: argument '{name}' expected T * top_k entries with top_k = {top_k}, got {index.numel()}"
        )


def _check_weights(op: str, weights: Optional[Tensor], T: int, top_k: int, device) -> None:
    check_tensor(op, "weights", weights, dtypes=_WEIGHT_DTYPES, shape=(T, top_k), device=device, optional=True)


# ---- route ---------------------------------------------------------------------------------------


def _check_route(expert_ids: Tensor, num_experts: int) -> None:
    check_tensor("route", "expert_ids", expert_ids, dtypes=INDEX_DTYPES, dim=2)
    if num_experts < 1:
        raise OpInputError(f"route: argument 'num_experts' expected >= 1, got {num_experts}")


@torch.library.custom_op("geomoe::route", mutates_args=(), tags=OP_TAGS)
def route_op(expert_ids: Tensor, num_experts: int, backend: str = "auto") -> Tuple[Tensor, Tensor, Tensor]:
    _check_route(expert_ids, num_experts)
    check_index_range("route", "expert_ids", expert_ids, 0, num_experts)
    return run("route", backend, expert_ids.device, (expert_ids, num_experts))


@route_op.register_fake
def _(expert_ids, num_experts, backend="auto"):
    _check_route(expert_ids, num_experts)
    n = expert_ids.numel()
    return expert_ids.new_empty(n), expert_ids.new_empty(n), expert_ids.new_empty(num_experts + 1)


# ---- permute -------------------------------------------------------------------------------------


def _check_permute(x: Tensor, row_to_flat: Tensor, top_k: int, weights: Optional[Tensor]) -> None:
    check_tensor("permute", "x", x, dtypes=FLOAT_DTYPES, dim=2)
    _check_map("permute", "row_to_flat", row_to_flat, x.device, top_k)
    if row_to_flat.numel() != x.shape[0] * top_k:
        raise OpInputError(
            f"permute: argument 'row_to_flat' expected {x.shape[0] * top_k} entries (T * top_k), got {row_to_flat.numel()}"
        )
    _check_weights("permute", weights, x.shape[0], top_k, x.device)


@torch.library.custom_op("geomoe::permute", mutates_args=(), tags=OP_TAGS)
def permute_op(x: Tensor, row_to_flat: Tensor, top_k: int, weights: Optional[Tensor], backend: str = "auto") -> Tensor:
    _check_permute(x, row_to_flat, top_k, weights)
    check_index_range("permute", "row_to_flat", row_to_flat, 0, row_to_flat.numel())
    return run("permute", backend, x.device, (x, row_to_flat, top_k, weights))


@permute_op.register_fake
def _(x, row_to_flat, top_k, weights, backend="auto"):
    _check_permute(x, row_to_flat, top_k, weights)
    return x.new_empty(row_to_flat.numel(), x.shape[1])


# ---- unpermute -----------------------------------------------------------------------------------


def _check_unpermute(rows: Tensor, flat_to_row: Tensor, top_k: int, weights, shared) -> None:
    op = "unpermute"
    check_tensor(op, "rows", rows, dtypes=FLOAT_DTYPES, dim=2)
    _check_map(op, "flat_to_row", flat_to_row, rows.device, top_k)
    T = flat_to_row.numel() // top_k
    _check_weights(op, weights, T, top_k, rows.device)
    check_tensor(op, "shared", shared, shape=(T, rows.shape[1]), device=rows.device, optional=True)
    check_same_dtype(op, ["rows", "shared"], [rows, shared])


@torch.library.custom_op("geomoe::unpermute", mutates_args=(), tags=OP_TAGS)
def unpermute_op(
    rows: Tensor, flat_to_row: Tensor, top_k: int, weights: Optional[Tensor], shared: Optional[Tensor], backend: str = "auto"
) -> Tensor:
    _check_unpermute(rows, flat_to_row, top_k, weights, shared)
    check_index_range("unpermute", "flat_to_row", flat_to_row, 0, rows.shape[0])
    return run("unpermute", backend, rows.device, (rows, flat_to_row, top_k, weights, shared))


@unpermute_op.register_fake
def _(rows, flat_to_row, top_k, weights, shared, backend="auto"):
    _check_unpermute(rows, flat_to_row, top_k, weights, shared)
    return rows.new_empty(flat_to_row.numel() // top_k, rows.shape[1])


@torch.library.custom_op("geomoe::unpermute_weight_grad", mutates_args=(), tags=OP_TAGS)
def unpermute_weight_grad_op(
    grad_out: Tensor, rows: Tensor, flat_to_row: Tensor, top_k: int, backend: str = "auto"
) -> Tensor:
    return run("unpermute_weight_grad", backend, rows.device, (grad_out, rows, flat_to_row, top_k))


@unpermute_weight_grad_op.register_fake
def _(grad_out, rows, flat_to_row, top_k, backend="auto"):
    acc = torch.promote_types(rows.dtype, torch.float32)
    return rows.new_empty(flat_to_row.numel() // top_k, top_k, dtype=acc)


for _name, _fn in (
    ("route", _ref.route),
    ("permute", _ref.permute),
    ("unpermute", _ref.unpermute),
    ("unpermute_weight_grad", _ref.unpermute_weight_grad),
):
    _backend.register(_name, "torch", _fn)


# ---- autograd ------------------------------------------------------------------------------------


class Permute(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, row_to_flat, flat_to_row, top_k, backend):
        ctx.save_for_backward(flat_to_row)
        ctx.config = (top_k, backend)
        return permute_op(x, row_to_flat, top_k, None, backend)

    @staticmethod
    def backward(ctx, grad_rows):
        (flat_to_row,) = ctx.saved_tensors
        top_k, backend = ctx.config
        grad_x = unpermute_op(grad_rows.contiguous(), flat_to_row, top_k, None, None, backend)
        return grad_x, None, None, None, None


class Unpermute(torch.autograd.Function):
    @staticmethod
    def forward(ctx, rows, row_to_flat, flat_to_row, top_k, weights, shared, backend):
        ctx.save_for_backward(rows, row_to_flat, flat_to_row, weights)
        ctx.config = (top_k, backend, shared is not None)
        return unpermute_op(rows, flat_to_row, top_k, weights, shared, backend)

    @staticmethod
    def backward(ctx, grad_out):
        rows, row_to_flat, flat_to_row, weights = ctx.saved_tensors
        top_k, backend, has_shared = ctx.config
        g = grad_out.contiguous()
        grad_rows = grad_weights = None
        if ctx.needs_input_grad[0]:
            grad_rows = permute_op(g, row_to_flat, top_k, weights, backend)
        if weights is not None and ctx.needs_input_grad[4]:
            grad_weights = unpermute_weight_grad_op(g, rows, flat_to_row, top_k, backend).to(weights.dtype)
        grad_shared = g if has_shared else None
        return grad_rows, None, None, None, grad_weights, grad_shared, None


def route(expert_ids: Tensor, num_experts: int, backend: str = "auto") -> Tuple[Tensor, Tensor, Tensor]:
    """(row_to_flat [T*k], flat_to_row [T*k], offsets [E+1]) for expert ids [T, k]; all on the device."""
    return route_op(expert_ids, num_experts, backend)


def permute(x: Tensor, row_to_flat: Tensor, flat_to_row: Tensor, top_k: int, backend: str = "auto") -> Tensor:
    """Rows of x in expert-major order [T*k, d]; differentiable in x."""
    return Permute.apply(x.contiguous(), row_to_flat, flat_to_row, top_k, backend)


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
    shared = None if shared is None else shared.contiguous()
    weights = None if weights is None else weights.contiguous()
    return Unpermute.apply(rows.contiguous(), row_to_flat, flat_to_row, top_k, weights, shared, backend)
