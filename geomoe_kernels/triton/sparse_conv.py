"""Triton submanifold depthwise conv on the compact visible layout: each program takes a block of
rows and channels and walks the k*k taps, gathering neighbour rows through the table (-1 reads as
zero). Backward: dx is the same kernel with the kernel flipped (the table is symmetric: see the
reference), dweight and dbias are each program's sums over a fixed run of rows, kept in registers
and stored once, then added in a fixed order (the recipe of geomoe_kernels.kernel_recipes on these
kernels)."""

import functools
from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from .. import kernel_recipes as recipe
from . import kernel, rows_reason
from ._config import INTERPRET, autotune_options, configs, pow2

ROWS = 16 if INTERPRET else 64

_CONV_CONFIGS = configs([({"BC": 64}, 4, 2), ({"BC": 128}, 4, 2), ({"BC": 32}, 2, 2)], {"BC": 16})


@triton.autotune(configs=_CONV_CONFIGS, key=["C", "KK"], **autotune_options())
@triton.jit
def _dwconv_kernel(
    X,
    Nbr,
    W,
    Bias,
    Out,
    R,
    C,
    KK: tl.constexpr,
    stride_x,
    stride_o,
    FLIP: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    BR: tl.constexpr,
    BC: tl.constexpr,
):
    r = tl.program_id(0) * BR + tl.arange(0, BR)
    c = tl.program_id(1) * BC + tl.arange(0, BC)
    mr, mc = r < R, c < C
    acc = tl.zeros((BR, BC), dtype=tl.float32)
    # a loop, not unrolled: unrolled, the compiler hoists all k*k tile loads and runs out of registers
    # (255 registers and a 0.5-7 KB stack for 5 x 5 at sm_90, in the offline compile)
    for j in range(KK):
        nb = tl.load(Nbr + r.to(tl.int64) * KK + j, mask=mr, other=-1)
        tap = KK - 1 - j if FLIP else j
        w = tl.load(W + c * KK + tap, mask=mc, other=0.0).to(tl.float32)
        v = tl.load(X + nb[:, None] * stride_x + c[None, :], mask=(nb >= 0)[:, None] & mc[None, :], other=0.0)
        acc += v.to(tl.float32) * w[None, :]
    if HAS_BIAS:
        acc += tl.load(Bias + c, mask=mc, other=0.0).to(tl.float32)[None, :]
    tl.store(Out + r[:, None].to(tl.int64) * stride_o + c[None, :], acc.to(Out.dtype.element_ty), mask=mr[:, None] & mc[None, :])


# Rows loaded before they are added (independent gathers in flight); they are still added one
# after another, in row order.
_ROWS_IN_FLIGHT = 4
# Rows each weight-gradient program sums in registers, a fixed count (never from the SM count or the
# config), so the sums are grouped alike on every GPU; a multiple of _ROWS_IN_FLIGHT.
WGRAD_ROWS = 16 if INTERPRET else 128
_WGRAD_CONFIGS = configs([({"BC": 64}, 4, 1), ({"BC": 128}, 4, 1), ({"BC": 32}, 2, 1)], {"BC": 16})


@triton.autotune(configs=_WGRAD_CONFIGS, key=["C", "KK"], **autotune_options())
@triton.jit
def _dwconv_wgrad_kernel(
    X,
    G,
    Nbr,
    DW,
    DB,
    R,
    C,
    KK: tl.constexpr,
    stride_x,
    stride_g,
    ROWS: tl.constexpr,
    IN_FLIGHT: tl.constexpr,
    KK_POW2: tl.constexpr,
    BC: tl.constexpr,
):
    """DW [programs, C, KK] and DB [programs, C]: program p's sums over its ROWS rows, for BC
    channels. The [KK, BC] tap sums and the BC bias sums stay in registers over all of its rows and
    are stored once (no zero-filled partials to re-read). Each sum belongs to one thread and adds
    the rows one by one in row order, so neither BC nor the warp count (the autotuned config)
    changes a bit of it; the caller adds the programs' partials in a fixed order."""
    c = tl.program_id(1) * BC + tl.arange(0, BC)
    mc = c < C
    tap = tl.arange(0, KK_POW2)
    mt = tap < KK
    lo = tl.program_id(0).to(tl.int64) * ROWS
    hi = tl.minimum(lo + ROWS, R)
    acc = tl.zeros((KK_POW2, BC), dtype=tl.float32)  # taps x channels: the channels fastest (coalesced)
    db = tl.zeros((BC,), dtype=tl.float32)
    for r0 in range(lo, hi, IN_FLIGHT):
        for i in tl.static_range(IN_FLIGHT):
            r = r0 + i
            nb = tl.load(Nbr + r * KK + tap, mask=mt & (tap * 0 + r < hi), other=-1)
            g = tl.load(G + r * stride_g + c, mask=mc & (c * 0 + r < hi), other=0.0).to(tl.float32)
            v = tl.load(X + nb[:, None] * stride_x + c[None, :], mask=(nb >= 0)[:, None] & mc[None, :], other=0.0)
            acc += g[None, :] * v.to(tl.float32)
            db += g
    base = tl.program_id(0).to(tl.int64) * C
    tl.store(DW + (base + c)[None, :] * KK + tap[:, None], acc, mask=mt[:, None] & mc[None, :])
    tl.store(DB + base + c, db, mask=mc)


class TritonDepthwiseConv:
    """The masked depthwise conv recipe's kernels (geomoe_kernels.kernel_recipes)."""

    def wgrad_rows_per_block(self) -> int:
        return WGRAD_ROWS

    def conv(self, x: Tensor, neighbors: Tensor, weight: Tensor, bias: Optional[Tensor], flip: bool, out: Tensor) -> None:
        R, C = x.shape
        grid = lambda meta: (triton.cdiv(R, ROWS), triton.cdiv(C, meta["BC"]))
        _dwconv_kernel[grid](
            x,
            neighbors,
            weight,
            bias if bias is not None else weight,
            out,
            R,
            C,
            neighbors.shape[1],
            x.stride(0),
            out.stride(0),
            FLIP=flip,
            HAS_BIAS=bias is not None,
            BR=ROWS,
        )

    def wgrad(self, x: Tensor, grad_out: Tensor, neighbors: Tensor, dw_partial: Tensor, db_partial: Tensor) -> None:
        R, C = x.shape
        grid = lambda meta: (dw_partial.shape[0], triton.cdiv(C, meta["BC"]))
        kk = neighbors.shape[1]
        _dwconv_wgrad_kernel[grid](
            x,
            grad_out,
            neighbors,
            dw_partial,
            db_partial,
            R,
            C,
            kk,
            x.stride(0),
            grad_out.stride(0),
            ROWS=WGRAD_ROWS,
            IN_FLIGHT=_ROWS_IN_FLIGHT,
            KK_POW2=pow2(kk),
        )


_KERNELS = TritonDepthwiseConv()
masked_depthwise_conv = functools.partial(recipe.masked_depthwise_conv, _KERNELS)
masked_depthwise_conv_backward = functools.partial(recipe.masked_depthwise_conv_backward, _KERNELS)


def _example(dtype) -> None:
    """GeoMoE's stage-1 rows (4 images of 49 x 16 tokens, 256 channels), a 5 x 5 neighbourhood."""
    R = 4 * 49 * 16
    nbr = torch.randint(-1, R, (R, 25))
    h = torch.randn(R, 256, dtype=dtype)
    masked_depthwise_conv(h, nbr, torch.randn(256, 25, dtype=dtype), torch.randn(256, dtype=dtype))
    masked_depthwise_conv_backward(h, h, nbr, torch.randn(256, 25, dtype=dtype))


kernel("masked_depthwise_conv", lambda x, **_: rows_reason(x), _example)(masked_depthwise_conv)
kernel("masked_depthwise_conv_backward", lambda x, **_: rows_reason(x), _example)(masked_depthwise_conv_backward)
