"""Triton routing permutation (no device-wide sort: a per-block histogram, a prefix sum over the
small [blocks, E] table on the device, and a stable scatter: the routing recipe of
geomoe_kernels.kernel_recipes on these kernels), and the row gather / weighted combine. The
combine reads each token's k rows and sums them in slot order in float32: no atomics, the same
bits every run."""

import functools
from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from .. import kernel_recipes as recipe
from .. import backend as _backend
from ..reference.permute import route as _reference_route
from . import WHO, kernel, rows_reason
from ._config import INTERPRET, pow2

ROWS, COLS = (8, 16) if INTERPRET else (32, 128)


def route_block(ep: int) -> int:
    """Entries per routing program: the [block, EP] one-hot and its cumsum go through shared memory,
    so block * EP stays at 8192 int32 (32 KB; 1024 x 32 int64 needed 256 KB, more than an H100 has)."""
    return 32 if INTERPRET else max(16, min(512, 8192 // ep))


@triton.jit
def _histogram_kernel(ids, counts, n, E, EP: tl.constexpr, BLOCK: tl.constexpr):
    f = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    e = tl.load(ids + f, mask=f < n, other=-1)
    onehot = (e[:, None] == tl.arange(0, EP)[None, :]).to(tl.int32)
    row = tl.program_id(0).to(tl.int64) * E  # int64: blocks x E passes 2^31 near 2.7e8 ids at 256 experts
    tl.store(counts + row + tl.arange(0, EP), tl.sum(onehot, axis=0).to(tl.int64), mask=tl.arange(0, EP) < E)


@triton.jit
def _scatter_kernel(ids, base, row_to_flat, flat_to_row, n, E, EP: tl.constexpr, BLOCK: tl.constexpr):
    f = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    valid = f < n
    e = tl.load(ids + f, mask=valid, other=-1)
    onehot = (e[:, None] == tl.arange(0, EP)[None, :]).to(tl.int32)
    rank = tl.sum(tl.cumsum(onehot, axis=0) * onehot, axis=1) - 1  # earlier entries of the same expert in this block
    start = tl.load(base + tl.program_id(0).to(tl.int64) * E + e, mask=valid, other=0)
    row = start + rank
    tl.store(row_to_flat + row, f.to(tl.int64), mask=valid)
    tl.store(flat_to_row + f, row, mask=valid)


@triton.jit
def _gate_scatter_kernel(
    ids, prefix, offsets, row_to_flat, flat_to_row, n, EA, NB: tl.constexpr, EAP: tl.constexpr, CH: tl.constexpr
):
    """The routing scatter over the gating blocks' histograms (_gate_route_kernel): program b places
    the NB entries of its block, in chunks of CH, entry f of expert e at row offsets[e] + prefix[b, e]
    + (earlier entries of e in the block): stable, as the reference."""
    pid = tl.program_id(0)
    ac = tl.arange(0, EAP)
    row0 = pid.to(tl.int64) * EA
    carry = tl.load(prefix + row0 + ac, mask=ac < EA, other=0) + tl.load(offsets + ac, mask=ac < EA, other=0)
    for c0 in tl.static_range(0, NB, CH):
        i = c0 + tl.arange(0, CH)
        f = pid.to(tl.int64) * NB + i
        valid = (i < NB) & (f < n)
        e = tl.load(ids + f, mask=valid, other=-1)
        onehot = (e[:, None] == ac[None, :]).to(tl.int32)
        rank = tl.sum(tl.cumsum(onehot, axis=0) * onehot, axis=1) - 1
        row = tl.sum(onehot.to(tl.int64) * carry[None, :], axis=1) + rank
        tl.store(row_to_flat + row, f, mask=valid)
        tl.store(flat_to_row + f, row, mask=valid)
        carry += tl.sum(onehot, axis=0).to(tl.int64)


def gate_scatter(
    ids: Tensor,
    num_experts: int,
    tokens_per_block: int,
    prefix: Tensor,
    offsets: Tensor,
    row_to_flat: Tensor,
    flat_to_row: Tensor,
) -> None:
    """row_to_flat and flat_to_row of ids [T, K] from _gate_route_kernel's prefix and offsets."""
    T, K = ids.shape
    NB = tokens_per_block * K
    EAP = pow2(num_experts)
    _gate_scatter_kernel[(prefix.shape[0],)](
        ids, prefix, offsets, row_to_flat, flat_to_row, T * K, num_experts, NB=NB, EAP=EAP,
        CH=min(pow2(NB), max(1, route_block(EAP))),
    )  # fmt: skip


class TritonRouting:
    """The routing recipe's kernels (geomoe_kernels.kernel_recipes.route)."""

    def block(self, num_experts: int) -> int:
        return route_block(pow2(num_experts))

    def histogram(self, flat_ids: Tensor, num_experts: int, block: int, per_block: Tensor) -> None:
        _histogram_kernel[(per_block.shape[0],)](
            flat_ids, per_block, flat_ids.numel(), num_experts, EP=pow2(num_experts), BLOCK=block
        )

    def scatter(
        self, flat_ids: Tensor, num_experts: int, block: int, base: Tensor, row_to_flat: Tensor, flat_to_row: Tensor
    ) -> None:
        _scatter_kernel[(base.shape[0],)](
            flat_ids, base, row_to_flat, flat_to_row, flat_ids.numel(), num_experts, EP=pow2(num_experts), BLOCK=block
        )


route = functools.partial(recipe.route, TritonRouting())


@triton.jit
def _permute_kernel(
    X, R2F, Wts, Out, n_rows, d, top_k, stride_x, stride_o, WEIGHTED: tl.constexpr, BR: tl.constexpr, BD: tl.constexpr
):
    r = tl.program_id(0) * BR + tl.arange(0, BR)
    c = tl.program_id(1) * BD + tl.arange(0, BD)
    mr = r < n_rows
    mask = mr[:, None] & (c < d)[None, :]
    f = tl.load(R2F + r, mask=mr, other=0)
    x = tl.load(X + (f // top_k)[:, None] * stride_x + c[None, :], mask=mask, other=0.0)
    if WEIGHTED:
        w = tl.load(Wts + f, mask=mr, other=0.0)
        x = (x.to(tl.float32) * w[:, None]).to(Out.dtype.element_ty)
    tl.store(Out + r[:, None].to(tl.int64) * stride_o + c[None, :], x, mask=mask)


@triton.jit
def _unpermute_kernel(
    Rows,
    F2R,
    Wts,
    Shared,
    Out,
    T,
    d,
    stride_r,
    stride_s,
    stride_o,
    TOP_K: tl.constexpr,
    WEIGHTED: tl.constexpr,
    HAS_SHARED: tl.constexpr,
    BT: tl.constexpr,
    BD: tl.constexpr,
):
    t = tl.program_id(0) * BT + tl.arange(0, BT)
    c = tl.program_id(1) * BD + tl.arange(0, BD)
    mt = t < T
    mask = mt[:, None] & (c < d)[None, :]
    acc = tl.zeros((BT, BD), dtype=tl.float32)
    for j in tl.static_range(TOP_K):  # slot order: a fixed summation order
        row = tl.load(F2R + t * TOP_K + j, mask=mt, other=0)
        v = tl.load(Rows + row[:, None] * stride_r + c[None, :], mask=mask, other=0.0).to(acc.dtype)
        if WEIGHTED:
            v = v * tl.load(Wts + t * TOP_K + j, mask=mt, other=0.0)[:, None]
        acc += v
    if HAS_SHARED:
        acc += tl.load(Shared + t[:, None].to(tl.int64) * stride_s + c[None, :], mask=mask, other=0.0).to(acc.dtype)
    tl.store(Out + t[:, None].to(tl.int64) * stride_o + c[None, :], acc.to(Out.dtype.element_ty), mask=mask)


@triton.jit
def _weight_grad_kernel(G, Rows, F2R, Out, T, d, stride_g, stride_r, TOP_K: tl.constexpr, BT: tl.constexpr, BD: tl.constexpr):
    t = tl.program_id(0) * BT + tl.arange(0, BT)
    mt = t < T
    for j in tl.static_range(TOP_K):
        row = tl.load(F2R + t * TOP_K + j, mask=mt, other=0)
        acc = tl.zeros((BT,), dtype=Out.dtype.element_ty)
        for c0 in range(0, d, BD):
            c = c0 + tl.arange(0, BD)
            mask = mt[:, None] & (c < d)[None, :]
            g = tl.load(G + t[:, None].to(tl.int64) * stride_g + c[None, :], mask=mask, other=0.0).to(acc.dtype)
            v = tl.load(Rows + row[:, None] * stride_r + c[None, :], mask=mask, other=0.0).to(acc.dtype)
            acc += tl.sum(g * v, axis=1)
        tl.store(Out + t * TOP_K + j, acc, mask=mt)


def permute(x: Tensor, row_to_flat: Tensor, top_k: int, weights: Optional[Tensor]) -> Tensor:
    n, d = row_to_flat.numel(), x.shape[1]
    out = x.new_empty(n, d)
    if n:
        grid = (triton.cdiv(n, ROWS), triton.cdiv(d, COLS))
        wflat = weights.reshape(-1) if weights is not None else x
        _permute_kernel[grid](
            x, row_to_flat, wflat, out, n, d, top_k, x.stride(0), out.stride(0), WEIGHTED=weights is not None, BR=ROWS, BD=COLS
        )
    return out


def unpermute(rows: Tensor, flat_to_row: Tensor, top_k: int, weights: Optional[Tensor], shared: Optional[Tensor]) -> Tensor:
    T, d = flat_to_row.numel() // top_k, rows.shape[1]
    out = rows.new_empty(T, d)
    if T:
        grid = (triton.cdiv(T, ROWS), triton.cdiv(d, COLS))
        _unpermute_kernel[grid](
            rows,
            flat_to_row,
            weights if weights is not None else rows,
            shared if shared is not None else rows,
            out,
            T,
            d,
            rows.stride(0),
            shared.stride(0) if shared is not None else 0,
            out.stride(0),
            TOP_K=top_k,
            WEIGHTED=weights is not None,
            HAS_SHARED=shared is not None,
            BT=ROWS,
            BD=COLS,
        )
    return out


def unpermute_weight_grad(grad_out: Tensor, rows: Tensor, flat_to_row: Tensor, top_k: int) -> Tensor:
    T, d = grad_out.shape
    acc = torch.promote_types(rows.dtype, torch.float32)
    out = torch.empty(T, top_k, dtype=acc, device=rows.device)
    if T:
        _weight_grad_kernel[(triton.cdiv(T, ROWS),)](
            grad_out, rows, flat_to_row, out, T, d, grad_out.stride(0), rows.stride(0), TOP_K=top_k, BT=ROWS, BD=COLS
        )
    return out


def _example(dtype: torch.dtype) -> None:
    """GeoMoE's routing (64 tokens, top-3 of 23 experts) and its permutation of d-768 rows."""
    T, k, E, D = 64, 3, 23, 768
    ids = torch.stack([torch.randperm(E)[:k] for _ in range(T)])
    route(ids, E)
    r2f, f2r, _ = _reference_route(ids, E)
    x = torch.randn(T, D, dtype=dtype)
    rows = permute(x, r2f, k, None)
    permute(x, r2f, k, torch.rand(T, k))
    unpermute(rows, f2r, k, torch.rand(T, k), x)
    unpermute_weight_grad(x, rows, f2r, k)


kernel(
    "route",
    lambda num_experts, **_: (
        None
        if num_experts <= recipe.TRITON_ROUTE_MAX_EXPERTS
        else f"the Triton routing histogram takes at most {recipe.TRITON_ROUTE_MAX_EXPERTS} experts, got {num_experts}"
    ),
    _example,
)(route)
kernel("permute", lambda x, weights, **_: rows_reason(x) or _backend.weights_reason(WHO, weights), _example)(permute)
kernel("unpermute", lambda rows, weights, **_: rows_reason(rows) or _backend.weights_reason(WHO, weights), _example)(unpermute)
kernel("unpermute_weight_grad", lambda rows, **_: rows_reason(rows), _example)(unpermute_weight_grad)
