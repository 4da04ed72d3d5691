"""expert_mlp: the routed experts' whole MLP in one op, rows_out = act(A @ W1 + b1) @ W2 + b2 on the
expert-major rows, A = x or, with `gather`, the token rows read through the routing permutation.

One op instead of two grouped_mm calls so that backward can fuse across the two GEMMs: it keeps
only the pre-activation [M, N1] (not the hidden rows act(pre), which it recomputes where it needs
them), and on Triton the down-projection's dgrad applies act' in its epilogue and writes d pre
directly, and its weight gradient applies act to pre as it loads it. Per MoE layer that is one
[M, hidden] tensor fewer kept for backward and no separate activation-backward pass.

x [T or M, K], w1 [E, K, N1], b1 [E, N1], w2 [E, H, D], b2 [E, D] with H = N1 (N1 / 2 for swiglu,
whose W1 holds [gate | up]). Returns (rows_out [M, D], pre [M, N1]); backward gives the row
gradients [M, K] in expert-major order, dw1, db1, dw2, db2 (experts without rows: exact zeros)."""
from typing import Optional, Tuple

import torch
from torch import Tensor

from .. import backend as _backend
from .._checks import OpInputError, check_choice, check_index_range, check_same_dtype, check_tensor
from ..reference import activations
from ..reference import expert_mlp as _ref
from ._dispatch import OP_TAGS, run
from .grouped_gemm import _check as _check_gemm
from .grouped_gemm import _check_offset_values, _rows
from .permute import unpermute_op

ACTIVATIONS = ("gelu", "silu", "swiglu")


def _check(x, w1, b1, w2, b2, offsets, activation, gather, top_k) -> None:
    op = "expert_mlp"
    check_choice(op, "activation", activation, ACTIVATIONS)
    _check_gemm(x, w1, offsets, b1, activation, gather, top_k, op=op, names=("w1", "b1"))
    E, _, N1 = w1.shape
    H = activations.out_features(activation, N1)
    check_tensor(op, "w2", w2, dim=3, device=x.device)
    check_same_dtype(op, ["x", "w2", "b2"], [x, w2, b2])
    if w2.shape[0] != E or w2.shape[1] != H:
        raise OpInputError(f"{op}: argument 'w2' expected [{E}, {H}, D] (w1 is {list(w1.shape)}, activation {activation!r}), "
                           f"got {list(w2.shape)}")
    check_tensor(op, "b2", b2, shape=(E, w2.shape[2]), device=x.device, optional=True)


@torch.library.custom_op("geomoe::expert_mlp", mutates_args=(), tags=OP_TAGS)
def expert_mlp_op(
    x: Tensor, w1: Tensor, b1: Optional[Tensor], w2: Tensor, b2: Optional[Tensor], offsets: Tensor, activation: str,
    gather: Optional[Tensor] = None, top_k: int = 1, backend: str = "auto",
) -> Tuple[Tensor, Tensor]:
    _check(x, w1, b1, w2, b2, offsets, activation, gather, top_k)
    _check_offset_values(offsets, _rows(x, gather), "expert_mlp")
    if gather is not None:
        check_index_range("expert_mlp", "gather", gather, 0, gather.numel())
    return run("expert_mlp", backend, x.device, (x, w1, b1, w2, b2, offsets, activation, gather, top_k))


@expert_mlp_op.register_fake
def _(x, w1, b1, w2, b2, offsets, activation, gather=None, top_k=1, backend="auto"):
    _check(x, w1, b1, w2, b2, offsets, activation, gather, top_k)
    M = _rows(x, gather)
    return x.new_empty(M, w2.shape[2]), x.new_empty(M, w1.shape[2])


@torch.library.custom_op("geomoe::expert_mlp_backward", mutates_args=(), tags=OP_TAGS)
def expert_mlp_backward_op(
    grad_out: Tensor, x: Tensor, w1: Tensor, w2: Tensor, offsets: Tensor, pre: Tensor, activation: str,
    gather: Optional[Tensor] = None, top_k: int = 1, backend: str = "auto",
) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(d rows [M, K] in expert-major order, dw1, db1, dw2, db2)."""
    check_tensor("expert_mlp_backward", "grad_out", grad_out, dtypes=(x.dtype,), shape=(pre.shape[0], w2.shape[2]),
                 device=x.device)
    return run("expert_mlp_backward", backend, x.device, (grad_out, x, w1, w2, offsets, pre, activation, gather, top_k))


@expert_mlp_backward_op.register_fake
def _(grad_out, x, w1, w2, offsets, pre, activation, gather=None, top_k=1, backend="auto"):
    return (x.new_empty(pre.shape[0], x.shape[1]), torch.empty_like(w1), w1.new_empty(w1.shape[0], w1.shape[2]),
            torch.empty_like(w2), w2.new_empty(w2.shape[0], w2.shape[2]))


_backend.register("expert_mlp", "torch", _ref.expert_mlp)
_backend.register("expert_mlp_backward", "torch", _ref.expert_mlp_backward)


class ExpertMLP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w1, b1, w2, b2, offsets, activation, gather, flat_to_row, top_k, backend):
        out, pre = expert_mlp_op(x, w1, b1, w2, b2, offsets, activation, gather, top_k, backend)
        ctx.save_for_backward(x, w1, w2, offsets, pre, gather, flat_to_row)
        ctx.config = (activation, backend, b1 is not None, b2 is not None, top_k)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        x, w1, w2, offsets, pre, gather, flat_to_row = ctx.saved_tensors
        activation, backend, has_b1, has_b2, top_k = ctx.config
        d_rows, dw1, db1, dw2, db2 = expert_mlp_backward_op(grad_out.contiguous(), x, w1, w2, offsets, pre, activation,
                                                            gather, top_k, backend)
        # gathered: each token's k row gradients summed in slot order (deterministic)
        dx = d_rows if gather is None else unpermute_op(d_rows, flat_to_row, top_k, None, None, backend)
        return dx, dw1, (db1 if has_b1 else None), dw2, (db2 if has_b2 else None), None, None, None, None, None, None


def expert_mlp(
    x: Tensor, w1: Tensor, b1: Optional[Tensor], w2: Tensor, b2: Optional[Tensor], offsets: Tensor,
    activation: str = "gelu", backend: str = "auto", gather: Optional[Tensor] = None,
    flat_to_row: Optional[Tensor] = None, top_k: int = 1,
) -> Tensor:
    """act(A[r] @ w1[e] + b1[e]) @ w2[e] + b2[e] for the rows r of each expert e; A = x, or with
    `gather` and `flat_to_row` (from route) A[r] = x[gather[r] // top_k]. Differentiable in x and
    the weights and biases."""
    if (gather is None) != (flat_to_row is None):
        raise OpInputError("expert_mlp: arguments 'gather' and 'flat_to_row' expected together (both from route), got one")
    b1 = None if b1 is None else b1.contiguous()
    b2 = None if b2 is None else b2.contiguous()
    return ExpertMLP.apply(x.contiguous(), w1.contiguous(), b1, w2.contiguous(), b2, offsets, activation, gather,
                           flat_to_row, top_k, backend)
