"""Top-k gating: the op, its fake, and its backward.

Scores are sigmoid (selection on score + bias buffer, weights from the score alone, renormalised) or
softmax (Switch/Mixtral; renormalisation optional). Everything is float32 (float64 passes through for
checks). Outputs: weights [T, k], expert ids [T, k] int64, per-expert counts [E] int64, and prob_mean
[E] = mean over tokens of s_i / sum_j s_j, the differentiable half of the auxiliary loss.

Selection, the same ids on every backend for any values (value checks off, or NaN logits inside
non_finite_passes()): a token's experts are ordered by the selection score (score + bias, in the
logits' dtype), larger first, NaN after every number (-inf included), equal values (NaN with NaN,
-0.0 with 0.0) to the lower expert id; the first k are taken. A chosen expert is excluded by a mark
of its own, never by overwriting its score (a finfo.min or -inf bias is a real value), so the k ids
are distinct and in [0, E) and counts sums to T * k. Weights come from the unbiased scores as
always: a chosen NaN score gives a NaN weight (every weight of the token when renormalised, as
does renormalising k zero scores), which the training step's non-finite check then skips. An all-NaN token (a NaN logit, or a +inf or all
-inf row under softmax) gets experts 0..k-1."""

from typing import Optional, Tuple

import torch
from torch import Tensor

from .._checks import OpInputError, check_choice, check_finite, check_tensor
from ..reference import gating as _ref
from . import _case
from ._declare import Verification, contiguous, declare

SCORE_FUNCS = ("sigmoid", "softmax")
_GATE_DTYPES = (torch.float32, torch.float64)


def _value_checks(logits, bias, **_):
    check_finite("topk_gating", "logits", logits)
    if bias is not None:  # a NaN here would silently route every token to the same experts
        check_finite("topk_gating", "bias", bias, data=False)


def _verify(c, be, dev, dt):
    """float32 logits whatever the model's dtype: one row in verify's table."""
    logits = c["logits"].to(dev, torch.float32 if dt in _case.HALF else dt).requires_grad_(True)
    w, ids, counts, p = topk_gating(logits, c["bias"].to(dev, logits.dtype), _case.K, backend=be)
    return [w, p, *_case.grads([w, p], [c["weights"], c["bias"]], [logits])], [ids, counts]


@declare(reference=_ref.topk_gating, value_checks=_value_checks, verification=Verification(_verify, dtypes=(torch.float32,)))
def topk_gating(
    logits: Tensor, bias: Optional[Tensor] = None, top_k: int = 3, score_func: str = "sigmoid", renormalize: bool = True
) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """(weights [T, k], expert ids [T, k], counts [E], prob_mean [E]); differentiable in logits. The
    ids follow the selection order in this module's docstring (NaN after every number, ties to the
    lower id): k distinct ids in [0, E) per token for any values."""
    op = "topk_gating"
    check_tensor(op, "logits", logits, dtypes=_GATE_DTYPES, dim=2)
    E = logits.shape[1]
    check_tensor(op, "bias", bias, dtypes=(logits.dtype,), shape=(E,), device=logits.device, optional=True)
    check_choice(op, "score_func", score_func, SCORE_FUNCS)
    if not 1 <= top_k <= E:
        raise OpInputError(f"{op}: argument 'top_k' expected 1 <= top_k <= {E} (the number of experts), got {top_k}")


@topk_gating.fake
def _(logits, top_k, **_):
    T, E = logits.shape
    return (
        logits.new_empty(T, top_k),
        logits.new_empty(T, top_k, dtype=torch.int64),
        logits.new_empty(E, dtype=torch.int64),
        logits.new_empty(E),
    )


@declare(reference=_ref.topk_gating_backward, backward_of="topk_gating", fake=lambda logits, **_: torch.empty_like(logits))
def topk_gating_backward(
    grad_weights: Optional[Tensor],
    grad_prob_mean: Optional[Tensor],
    logits: Tensor,
    ids: Tensor,
    score_func: str,
    renormalize: bool,
) -> Tensor:
    """d logits."""


def _setup_context(ctx, args, output):
    ctx.save_for_backward(args["logits"], output[1])
    ctx.config = (args["score_func"], args["renormalize"], args["backend"])


def _backward(ctx, grad_weights, _grad_ids, _grad_counts, grad_prob_mean):
    logits, ids = ctx.saved_tensors
    score_func, renormalize, backend = ctx.config
    grad = topk_gating_backward(
        contiguous(grad_weights), contiguous(grad_prob_mean), logits, ids, score_func, renormalize, backend
    )
    return {"logits": grad}


topk_gating.register_autograd(_setup_context, _backward)
