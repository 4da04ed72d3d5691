"""LayerNorm followed by a linear layer (and an activation): act(LN(x) @ weight.T + bias).

The ConvMAE block's 1 x 1 convs on rows: conv1 after norm1, and fc1 (+ GELU) after norm2. The
statistics and the normalisation run in float32 (float64 for float64 x) whatever x's dtype; the
normalised rows are cast to weight's dtype for the GEMM, as autocast does for nn.Linear.

Forward returns (out, pre, mean, rstd): pre is the pre-activation backward needs (empty for
'none'); mean and rstd [R] let backward recompute LN(x) instead of keeping it (one [R, K] tensor
fewer per call). Backward: cuBLAS/BLAS GEMMs and torch's fused LayerNorm backward."""

from typing import Tuple

import torch
from torch import Tensor

from . import activations


def stats_dtype(x: Tensor) -> torch.dtype:
    return torch.promote_types(x.dtype, torch.float32)


def _layer_norm(x: Tensor, norm_weight: Tensor, norm_bias: Tensor, eps: float) -> Tuple[Tensor, Tensor, Tensor]:
    acc = stats_dtype(x)
    return torch.native_layer_norm(x.to(acc), [x.shape[1]], norm_weight.to(acc), norm_bias.to(acc), eps)


def norm_linear(
    x: Tensor, norm_weight: Tensor, norm_bias: Tensor, weight: Tensor, bias, activation: str, eps: float
) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    normed, mean, rstd = _layer_norm(x, norm_weight, norm_bias, eps)
    pre = torch.nn.functional.linear(normed.to(weight.dtype), weight, bias)
    out = activations.apply(activation, pre)
    return out, (pre if activation != "none" else pre.new_empty(0)), mean.view(-1), rstd.view(-1)


def norm_linear_backward(
    grad_out: Tensor,
    x: Tensor,
    norm_weight: Tensor,
    norm_bias: Tensor,
    weight: Tensor,
    pre: Tensor,
    mean: Tensor,
    rstd: Tensor,
    activation: str,
    eps: float,
) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(dx, dnorm_weight, dnorm_bias, dweight, dbias)."""
    acc = stats_dtype(x)
    K = x.shape[1]
    dpre = grad_out if activation == "none" else activations.backward(activation, grad_out, pre)
    # the normalised rows, recomputed (one fused pass) rather than kept from the forward; x in the
    # statistics' dtype made once for both LayerNorm calls (one cast kernel, not two)
    xa = x.to(acc)
    a = torch.native_layer_norm(xa, [K], norm_weight.to(acc), norm_bias.to(acc), eps)[0].to(weight.dtype)
    dweight = dpre.t().mm(a)
    dbias = dpre.sum(0, dtype=stats_dtype(dpre)).to(weight.dtype)
    da = dpre.mm(weight).to(acc)
    dx, dnw, dnb = torch.ops.aten.native_layer_norm_backward(
        da,
        xa,
        [K],
        mean.view(-1, 1),
        rstd.view(-1, 1),
        norm_weight.to(acc),
        norm_bias.to(acc),
        [True, True, True],
    )
    return dx.to(x.dtype), dnw.to(norm_weight.dtype), dnb.to(norm_bias.dtype), dweight, dbias
