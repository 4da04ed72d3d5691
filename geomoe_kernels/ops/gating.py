"""Top-k gating: the op, its fake, and the autograd Function.

Scores are sigmoid (selection on score + bias buffer, weights from the score alone, renormalised) or
softmax (Switch/Mixtral; renormalisation optional). Everything is float32 (float64 passes through for
checks). Outputs: weights [T, k], expert ids [T, k] int64, per-expert counts [E] int64, and prob_mean
[E] = mean over tokens of s_i / sum_j s_j, the differentiable half of the auxiliary loss."""
from typing import Optional, Tuple

import torch
from torch import Tensor

from .. import backend as _backend
from .._checks import OpInputError, check_choice, check_finite, check_tensor
from ..reference import gating as _ref
from ._dispatch import OP_TAGS, run

SCORE_FUNCS = ("sigmoid", "softmax")
_GATE_DTYPES = (torch.float32, torch.float64)


def _check(logits: Tensor, bias: Optional[Tensor], top_k: int, score_func: str) -> None:
    op = "topk_gating"
    check_tensor(op, "logits", logits, dtypes=_GATE_DTYPES, dim=2)
    E = logits.shape[1]
    check_tensor(op, "bias", bias, dtypes=(logits.dtype,), shape=(E,), device=logits.device, optional=True)
    check_choice(op, "score_func", score_func, SCORE_FUNCS)
    if not 1 <= top_k <= E:
        raise OpInputError(f"{op}: argument 'top_k' expected 1 <= top_k <= {E} (the number of experts), got {top_k}")


@torch.library.custom_op("geomoe::topk_gating", mutates_args=(), tags=OP_TAGS)
def topk_gating_op(
    logits: Tensor, bias: Optional[Tensor], top_k: int, score_func: str, renormalize: bool, backend: str = "auto"
) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    _check(logits, bias, top_k, score_func)
    check_finite("topk_gating", "logits", logits)
    if bias is not None:  # a NaN here would silently route every token to the same experts
        check_finite("topk_gating", "bias", bias, data=False)
    return run("topk_gating", backend, logits.device, (logits, bias, top_k, score_func, renormalize))


@topk_gating_op.register_fake
def _(logits, bias, top_k, score_func, renormalize, backend="auto"):
    _check(logits, bias, top_k, score_func)
    T, E = logits.shape
    return (
        logits.new_empty(T, top_k),
        logits.new_empty(T, top_k, dtype=torch.int64),
        logits.new_empty(E, dtype=torch.int64),
        logits.new_empty(E),
    )


@torch.library.custom_op("geomoe::topk_gating_backward", mutates_args=(), tags=OP_TAGS)
def topk_gating_backward_op(
    grad_weights: Optional[Tensor],
    grad_prob_mean: Optional[Tensor],
    logits: Tensor,
    ids: Tensor,
    score_func: str,
    renormalize: bool,
    backend: str = "auto",
) -> Tensor:
    args = (grad_weights, grad_prob_mean, logits, ids, score_func, renormalize)
    return run("topk_gating_backward", backend, logits.device, args)


@topk_gating_backward_op.register_fake
def _(grad_weights, grad_prob_mean, logits, ids, score_func, renormalize, backend="auto"):
    return torch.empty_like(logits)


_backend.register("topk_gating", "torch", _ref.topk_gating)
_backend.register("topk_gating_backward", "torch", _ref.topk_gating_backward)


class TopKGating(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, bias, top_k, score_func, renormalize, backend):
        weights, ids, counts, prob_mean = topk_gating_op(logits, bias, top_k, score_func, renormalize, backend)
        ctx.save_for_backward(logits, ids)
        ctx.config = (score_func, renormalize, backend)
        ctx.mark_non_differentiable(ids, counts)
        return weights, ids, counts, prob_mean

    @staticmethod
    def backward(ctx, grad_weights, _grad_ids, _grad_counts, grad_prob_mean):
        logits, ids = ctx.saved_tensors
        score_func, renormalize, backend = ctx.config
        gw = None if grad_weights is None else grad_weights.contiguous()
        gp = None if grad_prob_mean is None else grad_prob_mean.contiguous()
        grad_logits = topk_gating_backward_op(gw, gp, logits, ids, score_func, renormalize, backend)
        return grad_logits, None, None, None, None, None


def topk_gating(
    logits: Tensor,
    bias: Optional[Tensor] = None,
    top_k: int = 3,
    score_func: str = "sigmoid",
    renormalize: bool = True,
    backend: str = "auto",
) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """(weights [T, k], expert ids [T, k], counts [E], prob_mean [E]); differentiable in logits."""
    return TopKGating.apply(logits, bias, top_k, score_func, renormalize, backend)
