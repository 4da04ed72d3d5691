"""expert_mlp: the routed experts' whole MLP in one op, rows_out = act(A @ W1 + b1) @ W2 + b2 on the
expert-major rows, A = x or, with `gather`, the token rows read through the routing permutation.

One op instead of two grouped_mm calls so that backward can fuse across the two GEMMs: it keeps
only the pre-activation [M, N1] (not the hidden rows act(pre), which it recomputes where it needs
them), and on the kernel backends the down-projection's dgrad applies act' in its epilogue and
writes d pre directly, and its weight gradient applies act to pre as it loads it. Per MoE layer
that is one [M, hidden] tensor fewer kept for backward and no separate activation-backward pass.

x [T or M, K], w1 [E, K, N1], b1 [E, N1], w2 [E, H, D], b2 [E, D] with H = N1 (N1 / 2 for swiglu,
whose W1 holds [gate | up], and for swiglu_interleaved, whose W1 holds pairs [g0, u0, g1, u1,
...]). Returns (rows_out [M, D], pre [M, N1]); backward gives the row gradients [M, K] in
expert-major order, dw1, db1, dw2, db2 (experts without rows: exact zeros).

With routing `weights` [T, top_k] (and `shared` [T, D]) the rows are combined into their tokens in
the op: it returns (y [T, D] = shared + sum_j weights[t, j] rows_out[row of (t, j)], pre), as
unpermute would, and its backward takes the tokens' gradient dy itself: the down-projection's dgrad
reads dy through the routing map (no permuted copy), applies the routing weight in its epilogue and
reduces the routing weights' gradient <dy_t W2^T, act(pre)> + <dy_t, b2> per row there, so the
expert outputs are not kept for backward (docs/host_path.md, step 5)."""

from typing import Optional, Tuple

import torch
from torch import Tensor

from .. import activations
from .._checks import OpInputError, check_choice, check_same_dtype, check_tensor
from ..reference import expert_mlp as _ref
from . import _case
from ._declare import Verification, contiguous, declare
from .grouped_gemm import _check as _check_gemm
from .grouped_gemm import _check_values, _rows, combine_row_grads
from .permute import _check_weights, route

ACTIVATIONS = ("gelu", "silu", "swiglu", "swiglu_interleaved")


def _verify(c, be, dev, dt):
    r2f, f2r, off = route(c["ids"].to(dev), _case.E, backend="torch")
    x, w1, b1, w2, b2 = _case.leaves(c, ["x", "w1", "b1", "w2", "b2"], dev, dt)
    y = expert_mlp(x, w1, b1, w2, b2, off, "gelu", backend=be, gather=r2f, flat_to_row=f2r, top_k=_case.K)
    return [y, *_case.grads([y], [c["g_rows"]], [x, w1, b1, w2, b2])], []


@declare(
    reference=_ref.expert_mlp,
    verification=Verification(_verify),
    value_checks=lambda x, offsets, gather, flat_to_row, **_: _check_values(x, offsets, gather, flat_to_row, "expert_mlp"),
)
def expert_mlp_op(
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
    op = "expert_mlp"
    check_choice(op, "activation", activation, ACTIVATIONS)
    _check_gemm(x, w1, offsets, b1, activation, gather, flat_to_row, top_k, op=op, names=("w1", "b1"))
    E, _, N1 = w1.shape
    H = activations.out_features(activation, N1)
    check_tensor(op, "w2", w2, dim=3, device=x.device)
    check_same_dtype(op, ["x", "w2", "b2"], [x, w2, b2])
    if w2.shape[0] != E or w2.shape[1] != H:
        raise OpInputError(
            f"{op}: argument 'w2' expected [{E}, {H}, D] (w1 is {list(w1.shape)}, activation {activation!r}), "
            f"got {list(w2.shape)}"
        )
    check_tensor(op, "b2", b2, shape=(E, w2.shape[2]), device=x.device, optional=True)
    _check_combine(op, x, w2, gather, top_k, weights, shared)


def _check_combine(op, x, w2, gather, top_k, weights, shared) -> None:
    if weights is None:
        if shared is not None:
            raise OpInputError(f"{op}: argument 'shared' is added in the combine: it expected 'weights' too, got none")
        return
    if gather is None:
        raise OpInputError(f"{op}: argument 'weights' combines the rows into tokens: it expected 'gather' and 'flat_to_row'")
    _check_weights(op, weights, x.shape[0], top_k, x.device)
    check_tensor(op, "shared", shared, shape=(x.shape[0], w2.shape[2]), device=x.device, optional=True)
    check_same_dtype(op, ["x", "shared"], [x, shared])


@expert_mlp_op.fake
def _(x, w1, w2, gather, weights, **_):
    M = _rows(x, gather)
    return x.new_empty(x.shape[0] if weights is not None else M, w2.shape[2]), x.new_empty(M, w1.shape[2])


@declare(reference=_ref.expert_mlp_backward, backward_of="expert_mlp")
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
    """(d rows [M, K] in expert-major order, dw1, db1, dw2, db2, d weights): with routing `weights`
    grad_out is the combined tokens' gradient [T, D], read through `gather`, and d weights [T, top_k]
    (float32, float64 for float64) the routing weights' gradient (b2: the forward's, for its part
    <dy, b2>); without, grad_out holds the rows' gradients [M, D] and d weights is empty."""
    op = "expert_mlp_backward"
    if weights is None:
        check_tensor(op, "grad_out", grad_out, dtypes=(x.dtype,), shape=(pre.shape[0], w2.shape[2]), device=x.device)
    elif gather is None:
        raise OpInputError(f"{op}: argument 'weights' expected 'gather' too (the rows are read through it)")
    else:
        T = gather.numel() // max(top_k, 1)
        check_tensor(op, "grad_out", grad_out, dtypes=(x.dtype,), shape=(T, w2.shape[2]), device=x.device)
        _check_weights(op, weights, T, top_k, x.device)
        check_tensor(op, "b2", b2, dtypes=(x.dtype,), shape=(w2.shape[0], w2.shape[2]), device=x.device, optional=True)


@expert_mlp_backward.fake
def _(x, w1, w2, pre, weights, top_k, **_):
    acc = torch.promote_types(x.dtype, torch.float32)
    return (
        x.new_empty(pre.shape[0], x.shape[1]),
        torch.empty_like(w1),
        w1.new_empty(w1.shape[0], w1.shape[2]),
        torch.empty_like(w2),
        w2.new_empty(w2.shape[0], w2.shape[2]),
        x.new_empty(0) if weights is None else x.new_empty(weights.shape[0], top_k, dtype=acc),
    )


def _setup_context(ctx, args, output):
    weights = args["weights"]
    ctx.save_for_backward(
        args["x"], args["w1"], args["w2"], args["offsets"], output[1], args["gather"], args["flat_to_row"], weights,
        args["b2"] if weights is not None else None,
    )  # fmt: skip
    ctx.config = (
        args["activation"], args["backend"], args["b1"] is not None, args["b2"] is not None, args["top_k"],
        args["shared"] is not None,
    )  # fmt: skip


def _backward(ctx, grad_out, _grad_pre):
    if grad_out is None:  # only `pre` was used: nothing flows back through it
        return {}
    x, w1, w2, offsets, pre, gather, flat_to_row, weights, b2 = ctx.saved_tensors
    activation, backend, has_b1, has_b2, top_k, has_shared = ctx.config
    g = grad_out.contiguous()
    d_rows, dw1, db1, dw2, db2, d_weights = expert_mlp_backward(
        g, x, w1, w2, offsets, pre, activation, gather, top_k, weights, b2, backend
    )
    grads = {"x": combine_row_grads(d_rows, gather, flat_to_row, top_k, backend), "w1": dw1, "w2": dw2}
    if has_b1:
        grads["b1"] = db1
    if has_b2:
        grads["b2"] = db2
    if weights is not None and ctx.needs_grad["weights"]:
        grads["weights"] = d_weights.to(weights.dtype)
    if has_shared:
        grads["shared"] = g
    return grads


expert_mlp_op.register_autograd(_setup_context, _backward)


def expert_mlp(
    x: Tensor,
    w1: Tensor,
    b1: Optional[Tensor],
    w2: Tensor,
    b2: Optional[Tensor],
    offsets: Tensor,
    activation: str = "gelu",
    backend: str = "auto",
    gather: Optional[Tensor] = None,
    flat_to_row: Optional[Tensor] = None,
    top_k: int = 1,
    weights: Optional[Tensor] = None,
    shared: Optional[Tensor] = None,
) -> Tensor:
    """act(A[r] @ w1[e] + b1[e]) @ w2[e] + b2[e] for the rows r of each expert e; A = x, or with
    `gather` and `flat_to_row` (from route) A[r] = x[gather[r] // top_k]. With routing `weights`
    [T, top_k] the rows combined into their tokens: shared + sum_j weights[t, j] row(t, j) [T, D]
    (unpermute's result, the routing weights' gradient formed in the experts' backward).
    Differentiable in x, the weights and biases, `weights` and `shared`."""
    out, _ = expert_mlp_op(
        x.contiguous(),
        w1.contiguous(),
        contiguous(b1),
        w2.contiguous(),
        contiguous(b2),
        offsets,
        activation,
        gather,
        flat_to_row,
        top_k,
        contiguous(weights),
        contiguous(shared),
        backend,
    )
    return out
