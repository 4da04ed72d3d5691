"""The experts' MLP on expert-major rows, as two grouped GEMMs: rows_out = act(A @ W1 + b1) @ W2 + b2.

Only the pre-activation is kept for backward; the hidden rows act(pre) are recomputed there (one
[M, hidden] tensor fewer per layer)."""

from typing import Optional, Tuple

from torch import Tensor

from . import activations
from .grouped_gemm import grouped_mm, grouped_mm_backward


def expert_mlp(
    x: Tensor,
    w1: Tensor,
    b1: Optional[Tensor],
    w2: Tensor,
    b2: Optional[Tensor],
    offsets: Tensor,
    activation: str,
    gather: Optional[Tensor] = None,
    top_k: int = 1,
) -> Tuple[Tensor, Tensor]:
    hidden, pre = grouped_mm(x, w1, offsets, b1, activation, gather, top_k)
    out, _ = grouped_mm(hidden, w2, offsets, b2, "none")
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
) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    hidden = activations.apply(activation, pre)
    d_hidden, dw2, db2 = grouped_mm_backward(grad_out, hidden, w2, offsets, None, "none")
    d_rows, dw1, db1 = grouped_mm_backward(d_hidden, x, w1, offsets, pre, activation, gather, top_k)
    return d_rows, dw1, db1, dw2, db2
