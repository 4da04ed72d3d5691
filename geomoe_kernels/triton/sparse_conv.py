"""Triton submanifold depthwise conv on the compact visible layout: each program takes a block of
rows and channels and walks the k*k taps, gathering neighbour rows through the table (-1 reads as
zero). Backward: dx is the same kernel with the kernel flipped (the table is symmetric: see the
reference), dweight and dbias are per-row-block partial sums reduced in a fixed order."""
from typing import Optional, Tuple

import torch
import triton
import triton.language as tl
from torch import Tensor

from ._config import INTERPRET, configs

ROWS = 16 if INTERPRET else 64

_CONV_CONFIGS = configs([({"BC": 64}, 4, 2), ({"BC": 128}, 4, 2), ({"BC": 32}, 2, 2)], {"BC": 16})


@triton.autotune(configs=_CONV_CONFIGS, key=["C", "KK"])
@triton.jit
def _dwconv_kernel(X, Nbr, W, Bias, Out, R, C, KK: tl.constexpr, stride_x, stride_o,
                   FLIP: tl.constexpr, HAS_BIAS: tl.constexpr, BR: tl.constexpr, BC: tl.constexpr):
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
def _dwconv_wgrad_kernel(X, G, Nbr, DW, DB, R, C, KK: tl.constexpr, stride_x, stride_g,
                         BR: tl.constexpr, BC: tl.constexpr):
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


def _launch(x: Tensor, neighbors: Tensor, weight: Tensor, bias: Optional[Tensor], flip: bool) -> Tensor:
    R, C = x.shape
    out = torch.empty_like(x)
    if R:
        grid = lambda meta: (triton.cdiv(R, ROWS), triton.cdiv(C, meta["BC"]))
        _dwconv_kernel[grid](x, neighbors, weight, bias if bias is not None else weight, out, R, C, neighbors.shape[1],
                             x.stride(0), out.stride(0), FLIP=flip, HAS_BIAS=bias is not None, BR=ROWS)
    return out


def masked_depthwise_conv(x: Tensor, neighbors: Tensor, weight: Tensor, bias: Optional[Tensor]) -> Tensor:
    return _launch(x, neighbors, weight, bias, flip=False)


def masked_depthwise_conv_backward(grad_out: Tensor, x: Tensor, neighbors: Tensor, weight: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
    R, C = x.shape
    kk = neighbors.shape[1]
    dx = _launch(grad_out, neighbors, weight, None, flip=True)
    blocks = max(1, triton.cdiv(R, ROWS))
    dw = torch.zeros(blocks, C, kk, dtype=torch.float32, device=x.device)
    db = torch.zeros(blocks, C, dtype=torch.float32, device=x.device)
    if R:
        grid = lambda meta: (blocks, triton.cdiv(C, meta["BC"]))
        _dwconv_wgrad_kernel[grid](x, grad_out, neighbors, dw, db, R, C, kk, x.stride(0), grad_out.stride(0), BR=ROWS)
    return dx, dw.sum(0).to(weight.dtype), db.sum(0).to(weight.dtype)
