"""The MoE layer's eager path: one autograd.Function over a launch plan (issue 28, step 1).

MoEMLP's routed path (gating -> route -> gathered up-projection + activation -> down-projection ->
weighted combine, the shared experts' output added) runs as the four torch.library ops gating,
route, expert_mlp and unpermute, each with autograd registered per op, and their backward as five
more: every call binds its arguments, checks them, looks its backend up and goes through the
custom-op dispatcher and torch._library.autograd, which is most of an eager step's host time.
`run` does the same work in one `MoELayerFunction`: its forward and backward call the very
implementations the ops would call (backend.select's choice for the same arguments), with the same
arguments, so the outputs and gradients are the same bits.

A `LayerPlan` is made on the first call of a key (the layer's options, the backend name, each
input's shape, dtype and device) and kept in backend.PLANS, which backend.forget() and every
(re)registration empty. The first call of a plan resolves each piece as it reaches it: the op's
metadata checks and backend.select (support checks, the self-check verdict) run then, once; the
backward's pieces are resolved on the first backward (gating's per pattern of the gradients that
reach it, as the op would choose). Later calls are a dict lookup and the implementations. Value
checks (the ones that read data: NaN logits, id ranges, the routing maps) run where they run for
the ops (CPU tensors by default, see _checks), decided once per call, the ops' own check functions;
the backward reads only maps its forward made and checked. No host sync, no environment read.

The layer's own shared experts (MoEMLP._shared_in_experts) come as S more experts in the same
grouped launches: each token's ids and weights get E..E+S-1 and 1 appended (the plan keeps those
[T, S] constants), the weights arrive stacked [E + S, ...], and the routing weights' gradient is
that of the first k columns. The rows are then T*(k+S); below, k stands for k + S.

What the Function saves for backward: the logits and the expert ids [T, k] (gating's backward), the
tokens [T, d], w1, w2, the offsets, the pre-activation [T*k, N1] and both routing maps (expert_mlp's),
the routing weights [T, k], and the expert outputs [T*k, d] when the routing weights need a gradient
(their gradient <dY_t, Y_row>). The same as the op path, which saves these per op."""

from __future__ import annotations

from typing import Any, Callable, Dict, Hashable, Optional, Tuple

import torch
from torch import Tensor

from .. import _checks
from .. import backend as _backend
from .. import kernel_recipes as _recipe
from ..ops._declare import Op
from ..ops.expert_mlp import expert_mlp_backward, expert_mlp_op
from ..ops.gating import topk_gating, topk_gating_backward
from ..ops.permute import permute_op, route, unpermute_op, unpermute_weight_grad

_MAX_PLANS = 1024  # distinct shapes are bounded: past this the cache starts over
plans_built = 0  # how many plans have been made (tests: a plan is made once per key)


def _resolve(op: Op, backend: str, named: Dict[str, Any]) -> Callable:
    """The implementation the op itself would run for these arguments (by name, `backend` not among
    them), after the op's metadata checks."""
    op._check(**named)
    device = next(v.device for v in named.values() if isinstance(v, Tensor))  # the first tensor's, as the op
    return _backend.select(op.name, backend, device, {n: named[n] for n in op._impl_names})


def _value_checks(op: Op, named: Dict[str, Any]) -> None:
    if op._value_checks is not None:
        op._value_checks(**named)


class LayerPlan:
    """The chosen implementations of one key's pieces (plain callables), filled in on first use."""

    def __init__(self, E: int, k: int, score_func: str, renormalize: bool, activation: str, scale: float, backend: str, S: int):
        self.E, self.k, self.score_func, self.renormalize = E, k, score_func, renormalize
        self.activation, self.scale, self.backend, self.S = activation, scale, backend, S
        self.impls: Dict[Hashable, Callable] = {}
        # with S shared experts among the grouped ones: each token's rows k + S, ids E..E+S-1 and
        # weight 1 appended to its routing (made on the first call: T is in the key)
        self.shared_routing: Optional[Tuple[Tensor, Tensor]] = None

    def impl(self, piece: Hashable, op: Op, named: Dict[str, Any]) -> Callable:
        """The implementation of `piece` (resolved now if this is its first call)."""
        f = self.impls.get(piece)
        if f is None:
            f = _resolve(op, self.backend, named)
            if _backend.choices_final():  # a provisional choice (a check running, a capture) is not kept
                self.impls[piece] = f
        return f


def _sig(t: Optional[Tensor]) -> Optional[Tuple]:
    return None if t is None else (t.shape, t.dtype, t.device)


def run(
    options: Tuple[int, int, str, bool, str, float, str, int],
    logits: Tensor,
    bias: Optional[Tensor],
    tokens: Tensor,
    w1: Tensor,
    b1: Optional[Tensor],
    w2: Tensor,
    b2: Optional[Tensor],
    shared: Optional[Tensor],
) -> Tuple[Tensor, Tensor, Tensor]:
    """(y [T, d], load [E], prob_mean [E]) of the routed experts combined with `shared`, for
    options (E, k, score_func, renormalize, activation, routed scaling, backend, S); every tensor
    but the weights contiguous; the weights [E, in, out] in the compute dtype (the tokens') or in the
    parameters' dtype and layout (cast here: their gradients then come back in that dtype and
    layout, written so by the kernel backends, with no cast or copy). S > 0: the weights hold the S shared
    experts after the E routed ones ([E + S, in, out]), every token routed to each at weight 1, and
    `shared` is None. Differentiable in logits, tokens, the expert weights and biases, shared (and
    prob_mean carries the aux loss's gradient)."""
    global plans_built
    key = (options, _sig(logits), _sig(bias), _sig(tokens), _sig(w1), _sig(b1), _sig(w2), _sig(b2), _sig(shared))
    plan = _backend.PLANS.get(key)
    fresh = plan is None
    if plan is None:
        plan = LayerPlan(*options)
    out = MoELayerFunction.apply(plan, logits, bias, tokens, w1, b1, w2, b2, shared)
    if fresh and _backend.choices_final():  # its forward pieces are resolved now
        if len(_backend.PLANS) >= _MAX_PLANS:
            _backend.PLANS.clear()
        _backend.PLANS[key] = plan
        plans_built += 1
    return out


def _contiguous(t: Optional[Tensor]) -> Optional[Tensor]:
    return None if t is None else t.contiguous()


def _compute(t: Optional[Tensor], dtype: torch.dtype) -> Optional[Tensor]:
    """t in `dtype`, contiguous: one cast-copy where either differs, none where neither does."""
    if t is None or (t.dtype == dtype and t.is_contiguous()):
        return t
    return t.to(dtype, memory_format=torch.contiguous_format)


class MoELayerFunction(torch.autograd.Function):
    """gating -> route -> expert_mlp -> unpermute forward, their backwards in reverse, on a plan."""

    @staticmethod
    def forward(ctx, plan: LayerPlan, logits, bias, tokens, w1, b1, w2, b2, shared):  # type: ignore[override]
        p = plan
        E, k = p.E, p.k
        checking = _checks.value_checks_enabled(logits)
        dev = logits.device.type
        autocast = torch.is_autocast_enabled(dev)  # off around the implementations, as the ops do it
        if autocast:
            torch.set_autocast_enabled(dev, False)
        try:
            impls = p.impls
            gating = impls.get("gating")
            if gating is None or checking:
                named = dict(logits=logits, bias=bias, top_k=k, score_func=p.score_func, renormalize=p.renormalize)
                if checking:
                    _value_checks(topk_gating, named)
                gating = p.impl("gating", topk_gating, named)
            weights, ids, load, prob_mean = gating(logits, bias, k, p.score_func, p.renormalize)
            if p.scale != 1.0:
                weights = weights * p.scale
            gate_ids = ids  # gating's backward reads these
            if p.S:
                if p.shared_routing is None:
                    T = ids.shape[0]
                    ones = weights.new_ones(1, 1).expand(T, p.S)
                    p.shared_routing = torch.arange(E, E + p.S, device=ids.device).expand(T, p.S), ones
                ids = torch.cat([ids, p.shared_routing[0]], 1)
                weights = torch.cat([weights, p.shared_routing[1]], 1)
                E, k = E + p.S, k + p.S

            routing = impls.get("route")
            if routing is None or checking:
                named = dict(expert_ids=ids, num_experts=E)
                if checking:
                    _value_checks(route, named)
                routing = p.impl("route", route, named)
            row_to_flat, flat_to_row, offsets = routing(ids, E)

            # the weights in the compute dtype (the tokens'): cast here, so that their gradients come
            # back in the parameters' dtype, written so by the kernels (docs/host_path.md, step 4)
            params = (w1, w2)
            w1, b1, w2, b2 = (_compute(t, tokens.dtype) for t in (w1, b1, w2, b2))
            experts = impls.get("experts")
            if experts is None or checking:
                named = dict(
                    x=tokens, w1=w1, b1=b1, w2=w2, b2=b2, offsets=offsets, activation=p.activation,
                    gather=row_to_flat, flat_to_row=flat_to_row, top_k=k,
                )  # fmt: skip
                if checking:
                    _value_checks(expert_mlp_op, named)
                experts = p.impl("experts", expert_mlp_op, named)
            rows_out, pre = experts(tokens, w1, b1, w2, b2, offsets, p.activation, row_to_flat, k)

            combine = impls.get("combine")
            if combine is None or checking:
                named = dict(
                    rows=rows_out, row_to_flat=row_to_flat, flat_to_row=flat_to_row, top_k=k, weights=weights, shared=shared
                )
                if checking:
                    _value_checks(unpermute_op, named)
                combine = p.impl("combine", unpermute_op, named)
            y = combine(rows_out, flat_to_row, k, weights, shared)
        finally:
            if autocast:
                torch.set_autocast_enabled(dev, True)
        ctx.set_materialize_grads(False)
        ctx.mark_non_differentiable(load)
        ctx.plan = p
        ctx.has = (b1 is not None, b2 is not None, shared is not None)
        # the parameters' dtype and layout, for their gradients (meta: no memory, nothing kept alive)
        ctx.grads_like = tuple(torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, device="meta") for t in params)
        keep_rows = ctx.needs_input_grad[1]  # the routing weights' gradient reads the expert outputs
        ctx.save_for_backward(
            logits, gate_ids, tokens, w1, w2, offsets, pre, row_to_flat, flat_to_row, weights, rows_out if keep_rows else None
        )
        return y, load, prob_mean

    @staticmethod
    def backward(ctx, dy, _dload, dprob_mean):  # type: ignore[override]
        p: LayerPlan = ctx.plan
        k, act = p.k + p.S, p.activation
        logits, ids, tokens, w1, w2, offsets, pre, row_to_flat, flat_to_row, weights, rows_out = ctx.saved_tensors
        _, need_logits, _, need_tokens, need_w1, need_b1, need_w2, need_b2, _ = ctx.needs_input_grad
        has_b1, has_b2, has_shared = ctx.has
        d_logits = d_tokens = dw1 = db1 = dw2 = db2 = d_shared = grad_weights = None
        dev = tokens.device.type
        autocast = torch.is_autocast_enabled(dev)
        create_graph = torch.is_grad_enabled()  # backward(create_graph=True): the kernels record no graph
        if autocast:
            torch.set_autocast_enabled(dev, False)
        torch.set_grad_enabled(False)
        try:
            impls = p.impls  # each piece resolved on its first call (the dict built only then)
            if dy is not None:
                g = dy.contiguous()
                if has_shared:
                    d_shared = g
                if need_tokens or need_w1 or need_b1 or need_w2 or need_b2:  # unpermute's backward, then expert_mlp's
                    permute = impls.get("permute") or p.impl(
                        "permute",
                        permute_op,
                        dict(x=g, row_to_flat=row_to_flat, flat_to_row=flat_to_row, top_k=k, weights=weights),
                    )
                    d_rows = permute(g, row_to_flat, k, weights).contiguous()
                    mlp_backward = impls.get("experts_backward") or p.impl(
                        "experts_backward",
                        expert_mlp_backward,
                        dict(
                            grad_out=d_rows, x=tokens, w1=w1, w2=w2, offsets=offsets, pre=pre, activation=act,
                            gather=row_to_flat, top_k=k,
                        ),
                    )  # fmt: skip
                    if getattr(mlp_backward, "func", None) is _recipe.expert_mlp_backward:  # the kernels write them so
                        d_x, dw1, db1, dw2, db2 = mlp_backward(
                            d_rows, tokens, w1, w2, offsets, pre, act, row_to_flat, k, grads_like=ctx.grads_like
                        )
                    else:  # the reference: in the compute dtype, converted to the parameters'
                        d_x, dw1, db1, dw2, db2 = mlp_backward(d_rows, tokens, w1, w2, offsets, pre, act, row_to_flat, k)
                        like1, like2 = ctx.grads_like
                        dw1, db1, dw2, db2 = dw1.to(like1.dtype), db1.to(like1.dtype), dw2.to(like2.dtype), db2.to(like2.dtype)
                    if need_tokens:  # the row gradients summed into their tokens (the combine, unweighted)
                        combine_rows = impls.get("combine_rows") or p.impl(
                            "combine_rows",
                            unpermute_op,
                            dict(rows=d_x, row_to_flat=row_to_flat, flat_to_row=flat_to_row, top_k=k, weights=None, shared=None),
                        )
                        d_tokens = combine_rows(d_x, flat_to_row, k, None, None)
                    db1 = db1 if has_b1 else None
                    db2 = db2 if has_b2 else None
                if need_logits:
                    weight_grad = impls.get("weight_grad") or p.impl(
                        "weight_grad", unpermute_weight_grad, dict(grad_out=g, rows=rows_out, flat_to_row=flat_to_row, top_k=k)
                    )
                    grad_weights = weight_grad(g, rows_out, flat_to_row, k).to(weights.dtype)
                    if p.S:  # the shared experts' weights are constants
                        grad_weights = grad_weights[:, : p.k]
                    if p.scale != 1.0:
                        grad_weights = grad_weights * p.scale
            if need_logits and (grad_weights is not None or dprob_mean is not None):
                gw, gp = _contiguous(grad_weights), _contiguous(dprob_mean)
                piece = ("gating_backward", gw is None, gp is None)  # chosen per pattern, as the op would
                gating_backward = impls.get(piece) or p.impl(
                    piece,
                    topk_gating_backward,
                    dict(
                        grad_weights=gw,
                        grad_prob_mean=gp,
                        logits=logits,
                        ids=ids,
                        score_func=p.score_func,
                        renormalize=p.renormalize,
                    ),
                )
                d_logits = gating_backward(gw, gp, logits, ids, p.score_func, p.renormalize)
        finally:
            torch.set_grad_enabled(create_graph)
            if autocast:
                torch.set_autocast_enabled(dev, True)
        grads = (d_logits, d_tokens, dw1, db1, dw2, db2, d_shared)
        if create_graph:  # first-order gradients as asked; a derivative of them is refused by name
            anchors = [t for t in (logits, tokens, w1, w2) if t.requires_grad]
            grads = tuple(None if g is None else _NoSecondDerivative.apply(g, *anchors) for g in grads)
        d_logits, d_tokens, dw1, db1, dw2, db2, d_shared = grads
        return None, d_logits, None, d_tokens, dw1, db1, dw2, db2, d_shared


class _NoSecondDerivative(torch.autograd.Function):
    """The layer's gradients under backward(create_graph=True), tied to the inputs they depend on: a
    second derivative through them raises instead of silently leaving out the layer's part (its
    kernels record no graph; the op path refuses the same, at topk_gating_backward)."""

    @staticmethod
    def forward(ctx, grad: Tensor, *anchors: Tensor) -> Tensor:  # type: ignore[override]
        return grad.view_as(grad)

    @staticmethod
    def backward(ctx, *_):  # type: ignore[override]
        raise RuntimeError(
            "MoEMLP has no second derivative: its backward runs kernels that record no graph (first-order "
            "gradients under create_graph=True are fine)"
        )
