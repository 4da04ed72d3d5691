"""Triton LayerNorm + linear (+ bias + activation): a row-statistics kernel (mean, rstd: one read of
x), then a GEMM whose prologue normalises each A tile as it loads it and whose epilogue adds the
bias and applies the activation. The normalised rows and the pre-activation never make an extra
round trip through memory (pre is written once, for backward, only when there is an activation)."""

from typing import Optional, Tuple

import torch
import triton
import triton.language as tl
from torch import Tensor

from .. import activations
from ._config import INTERPRET, accumulator_elements, autotune_options, configs, pow2
from ..reference.norm_linear import norm_linear_backward as _reference_norm_linear_backward
from . import kernel, rows_reason
from .grouped_gemm import _apply_act, fp32_ieee

STAT_ROWS = 4 if INTERPRET else 16


@triton.jit
def _row_stats_kernel(X, Mean, Rstd, R, K, eps, stride_x, BR: tl.constexpr, BK: tl.constexpr):
    """Two passes over each row (the second from cache): mean, then the centred variance, which
    unlike E[x^2] - mean^2 does not cancel when |mean| >> std."""
    rm = tl.program_id(0) * BR + tl.arange(0, BR).to(tl.int64)
    mask_m = rm < R
    total = tl.zeros((BR,), dtype=tl.float32)
    for k0 in range(0, K, BK):
        rk = k0 + tl.arange(0, BK)
        x = tl.load(X + rm[:, None] * stride_x + rk[None, :], mask=mask_m[:, None] & (rk < K)[None, :], other=0.0)
        total += tl.sum(x.to(tl.float32), axis=1)
    mean = total / K
    sq = tl.zeros((BR,), dtype=tl.float32)
    for k0 in range(0, K, BK):
        rk = k0 + tl.arange(0, BK)
        mask = mask_m[:, None] & (rk < K)[None, :]
        x = tl.load(X + rm[:, None] * stride_x + rk[None, :], mask=mask, other=0.0).to(tl.float32)
        d = tl.where(mask, x - mean[:, None], 0.0)
        sq += tl.sum(d * d, axis=1)
    rstd = 1.0 / tl.sqrt(sq / K + eps)
    tl.store(Mean + rm, mean, mask=mask_m)
    tl.store(Rstd + rm, rstd, mask=mask_m)


_CONFIGS = configs(
    [
        ({"BM": 128, "BN": 128, "BK": 64}, 8, 3),
        ({"BM": 128, "BN": 64, "BK": 64}, 4, 4),
        ({"BM": 64, "BN": 128, "BK": 64}, 4, 4),
        ({"BM": 64, "BN": 64, "BK": 64}, 4, 5),
        ({"BM": 64, "BN": 128, "BK": 64}, 8, 4),  # with the one above, what float32 operands keep
    ],  # one BK for all: the sum over K in the same chunks whichever config autotuning picks
    {"BM": 16, "BN": 16, "BK": 16},
)


@triton.autotune(
    configs=_CONFIGS,
    key=["N", "K", "ACT", "IEEE"],
    **autotune_options(lambda args, warps: accumulator_elements(args["BM"], args["BN"], warps), "W"),
)
@triton.jit
def _norm_linear_kernel(
    X,
    NW,
    NB,
    W,
    Bias,
    Mean,
    Rstd,
    Out,
    Pre,
    R,
    N,
    K,
    stride_x,
    stride_wn,
    stride_wk,
    stride_o,
    stride_p,
    HAS_BIAS: tl.constexpr,
    ACT: tl.constexpr,
    STORE_PRE: tl.constexpr,
    IEEE: tl.constexpr,
    BM: tl.constexpr,
    BN: tl.constexpr,
    BK: tl.constexpr,
):
    rm = tl.program_id(0) * BM + tl.arange(0, BM).to(tl.int64)
    rn = tl.program_id(1) * BN + tl.arange(0, BN)
    mask_m, mask_n = rm < R, rn < N
    mean = tl.load(Mean + rm, mask=mask_m, other=0.0)
    rstd = tl.load(Rstd + rm, mask=mask_m, other=0.0)
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    for k0 in range(0, K, BK):
        rk = k0 + tl.arange(0, BK)
        mask_k = rk < K
        x = tl.load(X + rm[:, None] * stride_x + rk[None, :], mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        g = tl.load(NW + rk, mask=mask_k, other=0.0).to(tl.float32)
        b = tl.load(NB + rk, mask=mask_k, other=0.0).to(tl.float32)
        # the LayerNorm, in the prologue; columns past K come out 0 (g = b = 0 there)
        a = ((x.to(tl.float32) - mean[:, None]) * rstd[:, None] * g[None, :] + b[None, :]).to(W.dtype.element_ty)
        w = tl.load(W + rn[None, :] * stride_wn + rk[:, None] * stride_wk, mask=mask_k[:, None] & mask_n[None, :], other=0.0)
        if IEEE:
            acc += tl.dot(a, w, input_precision="ieee")
        else:
            acc += tl.dot(a, w)
    if HAS_BIAS:
        acc += tl.load(Bias + rn, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    mask = mask_m[:, None] & mask_n[None, :]
    if STORE_PRE:
        tl.store(Pre + rm[:, None] * stride_p + rn[None, :], acc.to(Pre.dtype.element_ty), mask=mask)
    out = _apply_act(acc, ACT)
    tl.store(Out + rm[:, None] * stride_o + rn[None, :], out.to(Out.dtype.element_ty), mask=mask)


def norm_linear(
    x: Tensor, norm_weight: Tensor, norm_bias: Tensor, weight: Tensor, bias: Optional[Tensor], activation: str, eps: float
) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    R, K = x.shape
    N = weight.shape[0]
    mean = torch.empty(R, dtype=torch.float32, device=x.device)
    rstd = torch.empty_like(mean)
    out = weight.new_empty(R, N)
    store_pre = activation != "none"
    pre = weight.new_empty(R, N) if store_pre else weight.new_empty(0)
    if R == 0:
        return out, pre, mean, rstd
    _row_stats_kernel[(triton.cdiv(R, STAT_ROWS),)](
        x, mean, rstd, R, K, eps, x.stride(0), BR=STAT_ROWS, BK=min(pow2(K), 16 if INTERPRET else 256)
    )
    grid = lambda meta: (triton.cdiv(R, meta["BM"]), triton.cdiv(N, meta["BN"]))
    _norm_linear_kernel[grid](
        x,
        norm_weight,
        norm_bias,
        weight,
        bias if bias is not None else weight,
        mean,
        rstd,
        out,
        pre if store_pre else out,
        R,
        N,
        K,
        x.stride(0),
        weight.stride(0),
        weight.stride(1),
        out.stride(0),
        pre.stride(0) if store_pre else 0,
        HAS_BIAS=bias is not None,
        ACT=activations.code(activation),
        STORE_PRE=store_pre,
        IEEE=fp32_ieee(weight.dtype),
    )
    return out, pre, mean, rstd


def _example(dtype: torch.dtype) -> None:
    """GeoMoE's stage-1 rows (4 images of 49 x 16 tokens, width 256): float32 rows, weights in dtype,
    with and without bias and activation."""
    R = 4 * 49 * 16
    xr = torch.randn(R, 256)
    norm_linear(
        xr, torch.ones(256), torch.zeros(256), torch.randn(1024, 256, dtype=dtype), torch.zeros(1024, dtype=dtype), "gelu", 1e-6
    )
    norm_linear(xr, torch.ones(256), torch.zeros(256), torch.randn(256, 256, dtype=dtype), None, "none", 1e-6)


kernel("norm_linear", lambda x, weight, **_: rows_reason(x) or rows_reason(weight), _example)(norm_linear)
# the same cuBLAS GEMMs and fused LayerNorm backward as the reference (see ops/norm_linear.py): no Triton kernel
kernel("norm_linear_backward")(_reference_norm_linear_backward)
