"""The experts' MLP on expert-major rows, as two grouped GEMMs: rows_out = act(A @ W1 + b1) @ W2 + b2.

Only the pre-activation is kept for backward; the hidden rows act(pre) are recomputed there (one
[M, hidden] tensor fewer per layer). With routing weights the rows are combined into their tokens
(y = shared + sum_j w_j rows_j, as unpermute), and the backward takes the tokens' gradient: row r's
gradient is g = dy[t(r)] read through the routing map, the routing weight's gradient
<g W2^T, act(pre)> + <g, b2> (= <g, rows_out[r]>, without keeping rows_out), d hidden w * g W2^T."""

from typing import Optional, Tuple

import torch
from torch import Tensor

from . import activations
from .grouped_gemm import _row_expert, grouped_mm, grouped_mm_backward
from .permute import accumulate_dtype, unpermute


def expert_mlp(
    x: Tensor,
    w1: Tensor,
    b1: Optional[Tensor],
    w2: Tensor,
    b2: Optional[Tensor],
    offsets: Tensor,
    activation: str,
    gather: Optional[Tensor] = None,
    flat_to_row: Optional[Tensor] = None,
    top_k: int = 1,
    weights: Optional[Tensor] = None,
    shared: Optional[Tensor] = None,
) -> Tuple[Tensor, Tensor]:
    hidden, pre = grouped_mm(x, w1, offsets, b1, activation, gather, top_k)
    out, _ = grouped_mm(hidden, w2, offsets, b2, "none")
    if weights is not None:  # combined into the tokens
        assert flat_to_row is not None, "the combine reads flat_to_row"
        out = unpermute(out, flat_to_row, top_k, weights, shared)
    return out, pre


def expert_mlp_backward(
    grad_out: Tensor,
    x: Tensor,
    w1: Tensor,
    w2: Tensor,
    offsets: Tensor,
    pre: Tensor,
    activation: str,
    gather: Optional[Tensor] = None,
    top_k: int = 1,
    weights: Optional[Tensor] = None,
    b2: Optional[Tensor] = None,
) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    hidden = activations.apply(activation, pre)
    if weights is None:
        d_hidden, dw2, db2 = grouped_mm_backward(grad_out, hidden, w2, offsets, None, "none")
        d_weights = grad_out.new_empty(0)
    else:  # grad_out: the tokens' gradient [T, D]
        d_hidden, dw2, db2, d_weights = routed_down_backward(grad_out, hidden, w2, b2, offsets, gather, top_k, weights)
    d_rows, dw1, db1 = grouped_mm_backward(d_hidden, x, w1, offsets, pre, activation, gather, top_k)
    return d_rows, dw1, db1, dw2, db2, d_weights


def routed_down_backward(
    grad_out: Tensor,
    hidden: Tensor,
    w2: Tensor,
    b2: Optional[Tensor],
    offsets: Tensor,
    gather: Optional[Tensor],
    top_k: int,
    weights: Tensor,
) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """(d hidden, dw2, db2, d weights [T, k]) of the down-projection whose rows are combined with
    `weights`: g_r = grad_out[gather[r] // k], acc_r = g_r W2^T, d hidden_r = w_r acc_r, d w_r =
    <acc_r, hidden_r> + <g_r, b2[e]>; dw2 and db2 from the weighted rows w_r g_r."""
    assert gather is not None, "the routing weights' gradient reads the rows through gather"
    acc_dt = accumulate_dtype(grad_out.dtype)
    g = grad_out.index_select(0, torch.div(gather, top_k, rounding_mode="floor"))
    w_rows = weights.reshape(-1).to(acc_dt).index_select(0, gather)
    acc, _ = grouped_mm(g, w2.transpose(1, 2), offsets, None, "none")
    row_grad = (acc.to(acc_dt) * hidden.to(acc_dt)).sum(1)
    if b2 is not None and g.shape[0]:
        row_grad = row_grad + (g.to(acc_dt) * b2.index_select(0, _row_expert(offsets, g.shape[0])).to(acc_dt)).sum(1)
    d_weights = torch.empty_like(row_grad).index_copy_(0, gather, row_grad).view(-1, top_k)
    d_hidden = (acc.to(acc_dt) * w_rows[:, None]).to(grad_out.dtype)
    scaled = (g.to(acc_dt) * w_rows[:, None]).to(grad_out.dtype)
    _, dw2, db2 = grouped_mm_backward(scaled, hidden, w2, offsets, None, "none")
    return d_hidden, dw2, db2, d_weights
