"""norm_linear: act(LayerNorm(x) @ weight.T + bias) in one op, for the 1 x 1 convs of the ConvMAE
block on visible rows (conv1 after norm1; fc1 + GELU after norm2).

On a GPU the forward is one Triton kernel: the LayerNorm runs in the GEMM's prologue (row statistics,
then each A tile normalised as it is loaded) and bias + activation in its epilogue, so neither the
normalised rows nor the pre-GELU tensor make an extra round trip through memory. The op keeps mean
and rstd [R] instead of the normalised rows; backward recomputes them. Backward is cuBLAS GEMMs and
torch's fused LayerNorm backward on every backend: a Triton copy of those would gain nothing.

x [R, K] (any float dtype; statistics in float32), norm_weight / norm_bias [K], weight [N, K]
(nn.Linear's layout; the output takes its dtype), bias [N] or None, activation none / gelu / silu."""

from typing import Optional, Tuple

import torch
from torch import Tensor

from .._checks import FLOAT_DTYPES, OpInputError, check_choice, check_tensor
from ..reference import norm_linear as _ref
from . import _case
from ._declare import Verification, contiguous, declare

ACTIVATIONS = ("none", "gelu", "silu")


def _verify(c, be, dev, dt):
    x, nw, nb, w, b = _case.leaves(c, ["x", "ln_w", "ln_b", "lin_w", "lin_b"], dev, dt)
    y = norm_linear(x, nw, nb, w, b, "gelu", backend=be)
    return [y, *_case.grads([y], [c["g_lin"]], [x, nw, nb, w, b])], []


@declare(reference=_ref.norm_linear, verification=Verification(_verify))
def norm_linear_op(
    x: Tensor, norm_weight: Tensor, norm_bias: Tensor, weight: Tensor, bias: Optional[Tensor], activation: str, eps: float = 1e-6
) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """(out [R, N], pre [R, N] or empty for 'none', mean [R], rstd [R])."""
    op = "norm_linear"
    check_tensor(op, "x", x, dtypes=FLOAT_DTYPES, dim=2)
    K = x.shape[1]
    check_tensor(op, "norm_weight", norm_weight, dtypes=FLOAT_DTYPES, shape=(K,), device=x.device)
    check_tensor(op, "norm_bias", norm_bias, dtypes=(norm_weight.dtype,), shape=(K,), device=x.device)
    check_tensor(op, "weight", weight, dtypes=FLOAT_DTYPES, dim=2, device=x.device)
    if weight.shape[1] != K:
        raise OpInputError(f"{op}: argument 'weight' expected [N, {K}] (x has {K} columns), got {list(weight.shape)}")
    check_tensor(op, "bias", bias, dtypes=(weight.dtype,), shape=(weight.shape[0],), device=x.device, optional=True)
    check_choice(op, "activation", activation, ACTIVATIONS)
    if not eps > 0:
        raise OpInputError(f"{op}: argument 'eps' expected a positive number, got {eps}")


@norm_linear_op.fake
def _(x, weight, activation, **_):
    R, N = x.shape[0], weight.shape[0]
    stats = x.new_empty(R, dtype=_ref.stats_dtype(x))
    pre = weight.new_empty(0) if activation == "none" else weight.new_empty(R, N)
    return weight.new_empty(R, N), pre, stats, torch.empty_like(stats)


def _fake_backward(x, norm_weight, norm_bias, weight, **_):
    return (
        torch.empty_like(x),
        torch.empty_like(norm_weight),
        torch.empty_like(norm_bias),
        torch.empty_like(weight),
        weight.new_empty(weight.shape[0]),
    )


@declare(reference=_ref.norm_linear_backward, backward_of="norm_linear", fake=_fake_backward)
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
    eps: float = 1e-6,
) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(dx, dnorm_weight, dnorm_bias, dweight, dbias)."""
    check_tensor(
        "norm_linear_backward", "grad_out", grad_out, dtypes=(weight.dtype,), shape=(x.shape[0], weight.shape[0]), device=x.device
    )


def _setup_context(ctx, args, output):
    _, pre, mean, rstd = output
    ctx.save_for_backward(args["x"], args["norm_weight"], args["norm_bias"], args["weight"], pre, mean, rstd)
    ctx.config = (args["activation"], args["eps"], args["backend"], args["bias"] is not None)


def _backward(ctx, grad_out, *_grad_saved):
    if grad_out is None:  # only the saved statistics were used: nothing flows back through them
        return {}
    x, norm_weight, norm_bias, weight, pre, mean, rstd = ctx.saved_tensors
    activation, eps, backend, has_bias = ctx.config
    dx, dnw, dnb, dw, db = norm_linear_backward(
        grad_out.contiguous(), x, norm_weight, norm_bias, weight, pre, mean, rstd, activation, eps, backend
    )
    grads = {"x": dx, "norm_weight": dnw, "norm_bias": dnb, "weight": dw}
    return {**grads, "bias": db} if has_bias else grads


norm_linear_op.register_autograd(_setup_context, _backward)


def norm_linear(
    x: Tensor,
    norm_weight: Optional[Tensor],
    norm_bias: Optional[Tensor],
    weight: Tensor,
    bias: Optional[Tensor] = None,
    activation: str = "none",
    eps: float = 1e-6,
    backend: str = "auto",
) -> Tensor:
    """act(layer_norm(x, [K], norm_weight, norm_bias, eps) @ weight.T + bias); differentiable in all
    tensors. A LayerNorm without affine parameters: pass None for norm_weight and norm_bias."""
    K = x.shape[-1]
    if norm_weight is None:
        norm_weight = torch.ones(K, dtype=x.dtype, device=x.device)
    if norm_bias is None:
        norm_bias = torch.zeros(K, dtype=norm_weight.dtype, device=x.device)
    out, _, _, _ = norm_linear_op(
        x.contiguous(),
        norm_weight.contiguous(),
        norm_bias.contiguous(),
        weight.contiguous(),
        contiguous(bias),
        activation,
        float(eps),
        backend,
    )
    return out
