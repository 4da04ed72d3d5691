"""Triton submanifold depthwise conv on the compact visible layout: each program takes a block of
rows and channels and walks the k*k taps, gathering neighbour rows through the table (-1 reads as
zero). Backward: dx is the same kernel with the kernel flipped (the table is symmetric: see the
reference), dweight and dbias are per-row-block partial sums reduced in a fixed order (the recipe
of geomoe_kernels.kernel_recipes on these kernels)."""

import functools
from typing import Optional

import triton
import triton.language as tl
from torch import Tensor

from .. import kernel_recipes as recipe
from ._config import INTERPRET, configs

ROWS = 16 if INTERPRET else 64

_CONV_CONFIGS = configs([({"BC": 64}, 4, 2), ({"BC": 128}, 4, 2), ({"BC": 32}, 2, 2)], {"BC": 16})


@triton.autotune(configs=_CONV_CONFIGS, key=["C", "KK"])
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


@triton.autotune(configs=_CONV_CONFIGS, key=["C", "KK"])
@triton.jit
def _dwconv_wgrad_kernel(X, G, Nbr, DW, DB, R, C, KK: tl.constexpr, stride_x, stride_g, BR: tl.constexpr, BC: tl.constexpr):
    """Partial sums over this program's rows: DW [blocks, C, KK], DB [blocks, C]."""
    r = tl.program_id(0) * BR + tl.arange(0, BR)
    c = tl.program_id(1) * BC + tl.arange(0, BC)
    mr, mc = r < R, c < C
    g = tl.load(G + r[:, None].to(tl.int64) * stride_g + c[None, :], mask=mr[:, None] & mc[None, :], other=0.0).to(tl.float32)
    base = tl.program_id(0).to(tl.int64) * C
    tl.store(DB + base + c, tl.sum(g, axis=0), mask=mc)
    for j in tl.static_range(KK):
        nb = tl.load(Nbr + r.to(tl.int64) * KK + j, mask=mr, other=-1)
        v = tl.load(X + nb[:, None] * stride_x + c[None, :], mask=(nb >= 0)[:, None] & mc[None, :], other=0.0).to(tl.float32)
        tl.store(DW + (base + c) * KK + j, tl.sum(g * v, axis=0), mask=mc)


class TritonDepthwiseConv:
    """The masked depthwise conv recipe's kernels (geomoe_kernels.kernel_recipes)."""

    def wgrad_rows_per_block(self) -> int:
        return ROWS

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
        _dwconv_wgrad_kernel[grid](
            x, grad_out, neighbors, dw_partial, db_partial, R, C, neighbors.shape[1], x.stride(0), grad_out.stride(0), BR=ROWS
        )


_KERNELS = TritonDepthwiseConv()
masked_depthwise_conv = functools.partial(recipe.masked_depthwise_conv, _KERNELS)
masked_depthwise_conv_backward = functools.partial(recipe.masked_depthwise_conv_backward, _KERNELS)
