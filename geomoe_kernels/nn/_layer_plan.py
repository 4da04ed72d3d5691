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
tokens [T, d], w1, w2, b2, the offsets, the pre-activation [T*k, N1], both routing maps and the routing
weights [T, k] (expert_mlp's, which combines its rows with the weights): no expert outputs, since the
routing weights' gradient <dY_t, Y_row> = <dY_t W2^T, act(pre)> + <dY_t, b2> comes from the
down-projection's dgrad, which reads dY through the routing maps (docs/host_path.md, step 5). The
same as the op path, which saves these per op. (With a gate between the two GEMMs, run_routed keeps
the expert outputs and unpermute's weight gradient.)

With the router given (run's router=, MoEMLP's own where nothing else reads the tokens) the Function
computes the logits itself, with the ops MoEMLP._logits runs (the same bits), saves the router's
input and weight as autograd would, and adds the router's part of the tokens' gradient to the
experts' part in place: no cast back and no separate add (issue 28 item 2)."""

from __future__ import annotations

import functools
from typing import Any, Callable, Dict, Hashable, List, Optional, Tuple

import torch
from torch import Tensor

from .. import _checks
from .. import backend as _backend
from .. import kernel_recipes as _recipe
from ..ops._declare import Op
from ..ops.expert_mlp import expert_mlp_backward, expert_mlp_op
from ..ops.grouped_gemm import grouped_mm_backward, grouped_mm_op
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

    def __init__(
        self, E: int, k: int, score_func: str, renormalize: bool, activation: str, scale: float, backend: str, S: int, aux: bool
    ):
        self.E, self.k, self.score_func, self.renormalize = E, k, score_func, renormalize
        self.activation, self.scale, self.backend, self.S = activation, scale, backend, S
        self.aux = aux  # the Function's third output: the aux loss (True) or prob_mean
        self.impls: Dict[Hashable, Callable] = {}
        # gating and routing in two launches (kernel_recipes.gate_route) where the backend chosen
        # for both has them: its kernels, False where not, None until the first call decides
        self.fused: Any = None
        self.scale_row: Optional[Tensor] = None  # the routing weights' scale with shared experts: [k + S]
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


def _gate_route_kernels(plan: LayerPlan, logits: Tensor, bias: Optional[Tensor]) -> Any:
    """The fused gating + routing kernels of the backend chosen for both ops (each resolved as the
    op would resolve it), or False."""
    T, K, EA = logits.shape[0], plan.k + plan.S, plan.E + plan.S
    gating = plan.impl(
        "gating",
        topk_gating,
        dict(logits=logits, bias=bias, top_k=plan.k, score_func=plan.score_func, renormalize=plan.renormalize),
    )
    ids = torch.empty(T, K, dtype=torch.int64, device=logits.device)  # what route will be given: its shape and dtype
    routing = plan.impl("route", route, dict(expert_ids=ids, num_experts=EA))
    if not (isinstance(gating, functools.partial) and gating.func is _recipe.topk_gating):
        return False
    if not (isinstance(routing, functools.partial) and routing.func is _recipe.route):
        return False
    fused_with = getattr(gating.args[0], "fused_with", None)
    fused = fused_with(routing.args[0]) if fused_with is not None else None
    if fused is None or plan.S > getattr(fused, "max_shared", plan.S):
        return False
    return fused


def _sig(t: Optional[Tensor]) -> Optional[Tuple]:
    return None if t is None else (t.shape, t.dtype, t.device)


def run(
    options: Tuple[int, int, str, bool, str, float, str, int],
    logits: Optional[Tensor],
    bias: Optional[Tensor],
    tokens: Tensor,
    w1: Any,  # a tensor, or with pack_dtype a (routed, shared) pair of them
    b1: Any,
    w2: Any,
    b2: Any,
    shared: Optional[Tensor],
    aux: bool = False,
    pack_dtype: Optional[torch.dtype] = None,
    router: Optional[Tuple[Tensor, Optional[Tensor], torch.dtype]] = None,
) -> Tuple[Tensor, Tensor, Tensor]:
    """(y [T, d], load [E], prob_mean [E]) of the routed experts combined with `shared` (with aux:
    (y, load, the aux loss sum_e prob_mean_e * load_e * E / (k * T)), as MoEMLP's), for
    options (E, k, score_func, renormalize, activation, routed scaling, backend, S); every tensor
    but the weights contiguous; the weights [E, in, out] in the compute dtype (the tokens') or in the
    parameters' dtype and layout (cast here: their gradients then come back in that dtype and
    layout, written so by the kernel backends, with no cast or copy). S > 0: the weights hold the S shared
    experts after the E routed ones ([E + S, in, out]), every token routed to each at weight 1, and
    `shared` is None. Differentiable in logits, tokens, the expert weights and biases, shared (and
    prob_mean carries the aux loss's gradient).

    With pack_dtype, w1, b1, w2 and b2 are each a pair (routed, shared or None) of parameters, or
    None: they are stacked [E + S, ...] and cast to pack_dtype here, in one launch where the plan's
    backend has the pack kernel (_pack_views), else a concatenation and a cast each (the same bits), and
    the gradients go to the parameters themselves, in their dtype.

    With router (weight [E, d], bias [E] or None, both in gate_dtype; gate_dtype) and logits None, the
    router runs in the Function: logits = tokens in gate_dtype @ weight.T + bias, as MoEMLP._logits
    computes them (the same ops, the same bits), and its backward adds the router's part of the
    tokens' gradient to the experts' part in the Function, in place: one kernel where autograd would
    cast it to the tokens' dtype and add (in half precision it is then rounded once, not twice).
    Only where nothing else reads the tokens (`shared` None): the order the parts add in is kept."""
    global plans_built
    rsig = None if router is None else (_sig(router[0]), _sig(router[1]), router[2])
    if router is not None and (logits is not None or shared is not None):
        raise ValueError("_layer_plan.run: router= takes logits None and shared None")
    if pack_dtype is not None:
        pairs = (w1, b1, w2, b2)
        psig = tuple(None if q is None else (_sig(q[0]), _sig(q[1])) for q in pairs)  # type: ignore[index]
        key: Tuple = (options, aux, pack_dtype, _sig(logits), rsig, _sig(bias), _sig(tokens), psig, _sig(shared))
    else:
        key = (
            options, aux, _sig(logits), rsig, _sig(bias), _sig(tokens), _sig(w1), _sig(b1), _sig(w2), _sig(b2), _sig(shared)
        )  # fmt: skip
    plan = _backend.PLANS.get(key)
    fresh = plan is None
    if plan is None:
        plan = LayerPlan(*options, aux)
    params: Tuple = ()
    if pack_dtype is not None:  # the Function differentiates the parameters; the packed copies are its own
        params = tuple(t for q in pairs for t in (q if q is not None else (None, None)))  # type: ignore[union-attr]
        with torch.no_grad():
            w1, b1, w2, b2 = _packed(plan, pack_dtype, pairs)  # type: ignore[arg-type]
    rw, rb, gate_dtype = router if router is not None else (None, None, None)
    out = MoELayerFunction.apply(plan, gate_dtype, logits, bias, tokens, w1, b1, w2, b2, shared, rw, rb, *params)
    if fresh and _backend.choices_final():  # its forward pieces are resolved now
        if len(_backend.PLANS) >= _MAX_PLANS:
            _backend.PLANS.clear()
        _backend.PLANS[key] = plan
        plans_built += 1
    return out


def _packed(plan: LayerPlan, dtype: torch.dtype, pairs) -> Tuple[Optional[Tensor], ...]:
    """(w1, b1, w2, b2) [E + S, ...] in dtype from their (routed, shared or None) parameter pairs."""
    params = [t for q in pairs for t in (q if q is not None else (None, None))]
    pack = getattr(plan.fused, "pack", None) if plan.fused else None
    present = [t for t in params if t is not None]
    dtypes = getattr(plan.fused, "pack_dtypes", None)
    if dtypes is not None and (dtype not in dtypes or present[0].dtype not in dtypes):
        pack = None  # a dtype the backend's pack kernel does not take
    if pack is not None and all(t.dtype == present[0].dtype and t.is_contiguous() for t in present):
        return _pack_views(pack, dtype, *params)
    return tuple(None if q is None else (q[0] if q[1] is None else torch.cat([q[0], q[1]])).to(dtype).contiguous() for q in pairs)


def _pack_views(pack, dtype: torch.dtype, *params: Optional[Tensor]) -> Tuple[Optional[Tensor], ...]:
    """The layer's expert weights for its grouped GEMMs in one launch: each (routed, shared) pair of
    parameters (w1, b1, w2, b2; shared or both None where absent) stacked [E + S, ...] in the compute
    dtype, views of one flat buffer. Replaces a concatenation and a cast per tensor; the gradients
    come back without a launch (MoELayerFunction writes them in the parameters' dtype, as views)."""
    groups = [(params[i], params[i + 1]) for i in range(0, len(params), 2)]
    flat = pack([t for g in groups for t in g if t is not None], dtype)
    outs: list = []
    at = 0
    for r, sh in groups:
        if r is None:
            outs.append(None)
            continue
        shape = (r.shape[0] + (sh.shape[0] if sh is not None else 0),) + tuple(r.shape[1:])
        n = r.numel() + (sh.numel() if sh is not None else 0)
        outs.append(flat[at : at + n].view(shape))
        at += n
    return tuple(outs)


def _contiguous(t: Optional[Tensor]) -> Optional[Tensor]:
    return None if t is None else t.contiguous()


# The fused gating kernel's tickets: an int32 counter per (device, stream), 0 between launches (the
# launch's last block puts it back). Per stream, not per plan: every layer of one configuration
# shares a plan, and launches on two streams must not count each other's blocks. Never freed: a
# CUDA graph captured with one keeps its address (as it keeps _KEPT's constants').
_TICKETS: Dict[Tuple[torch.device, int], Tensor] = {}
_KEPT: List[Tensor] = []  # the plans' constant tensors, alive after their plan is dropped


def _ticket(device: torch.device) -> Tensor:
    stream = torch.cuda.current_stream(device).stream_id if device.type == "cuda" else 0
    t = _TICKETS.get((device, stream))
    if t is None:
        t = _TICKETS[(device, stream)] = torch.zeros(1, dtype=torch.int32, device=device)
    return t


def _kept(t: Tensor) -> Tensor:
    _KEPT.append(t)
    return t


def _gate_and_route(p: LayerPlan, logits: Tensor, bias: Optional[Tensor], checking: bool, aux_coef: float):
    """MoELayerFunction's gating and routing: (the fused kernels or False, (weights [T, k + S], the
    ids gating's backward reads, load, the third output, the aux loss's fraction (unfused), row_to_flat,
    flat_to_row, offsets)); the shared experts' columns appended to the routing."""
    E, k, T = p.E, p.k, logits.shape[0]
    if p.fused is None:
        fused = _gate_route_kernels(p, logits, bias)
        if _backend.choices_final():
            p.fused = fused
    else:
        fused = p.fused
    gating_args = dict(logits=logits, bias=bias, top_k=k, score_func=p.score_func, renormalize=p.renormalize)
    if fused:  # gating and routing in two launches, the reductions and the aux loss in them
        if checking:
            _value_checks(topk_gating, gating_args)
        r = _recipe.gate_route(
            fused, logits, bias, k, p.S, p.score_func, p.renormalize, aux_coef if p.aux else None, _ticket(logits.device)
        )
        weights, ids = r["weights"], r["ids"]
        if p.scale != 1.0:
            weights = weights * _scale_row(p, weights)
        if checking:
            _value_checks(route, dict(expert_ids=ids, num_experts=E + p.S))
        third = r["aux"] if p.aux else r["prob_mean"]
        return fused, (weights, ids, r["load"], third, None, r["row_to_flat"], r["flat_to_row"], r["offsets"])
    gating = p.impls.get("gating")
    if gating is None or checking:
        if checking:
            _value_checks(topk_gating, gating_args)
        gating = p.impl("gating", topk_gating, gating_args)
    weights, ids, load, prob_mean = gating(logits, bias, k, p.score_func, p.renormalize)
    fraction = None
    if p.aux:  # MoEMLP._aux's arithmetic
        fraction = load.to(prob_mean.dtype) * aux_coef
        third = (prob_mean * fraction).sum()
    else:
        third = prob_mean
    if p.scale != 1.0:
        weights = weights * p.scale
    gate_ids = ids  # gating's backward reads these
    if p.S:
        if p.shared_routing is None:
            ones = weights.new_ones(1, 1).expand(T, p.S)
            p.shared_routing = _kept(torch.arange(E, E + p.S, device=ids.device)).expand(T, p.S), _kept(ones)
        ids = torch.cat([ids, p.shared_routing[0]], 1)
        weights = torch.cat([weights, p.shared_routing[1]], 1)
    routing = p.impls.get("route")
    if routing is None or checking:
        named = dict(expert_ids=ids, num_experts=E + p.S)
        if checking:
            _value_checks(route, named)
        routing = p.impl("route", route, named)
    row_to_flat, flat_to_row, offsets = routing(ids, E + p.S)
    return False, (weights, gate_ids, load, third, fraction, row_to_flat, flat_to_row, offsets)


def _compute(t: Optional[Tensor], dtype: torch.dtype) -> Optional[Tensor]:
    """t in `dtype`, contiguous: one cast-copy where either differs, none where neither does."""
    if t is None or (t.dtype == dtype and t.is_contiguous()):
        return t
    return t.to(dtype, memory_format=torch.contiguous_format)


def _combine_rows(p: LayerPlan, d_x: Tensor, row_to_flat: Tensor, flat_to_row: Tensor, k: int) -> Tensor:
    """The row gradients summed into their tokens (the combine, unweighted)."""
    combine_rows = p.impls.get("combine_rows") or p.impl(
        "combine_rows",
        unpermute_op,
        dict(rows=d_x, row_to_flat=row_to_flat, flat_to_row=flat_to_row, top_k=k, weights=None, shared=None),
    )
    return combine_rows(d_x, flat_to_row, k, None, None)


def _experts_backward(
    p: LayerPlan, g: Tensor, tokens: Tensor, w1: Tensor, w2: Tensor, b2: Optional[Tensor], offsets: Tensor, pre: Tensor,
    act: str, row_to_flat: Tensor, k: int, weights: Tensor, grads_like: Optional[Tuple[Tensor, Tensor]],
):  # fmt: skip
    """expert_mlp_backward with routing weights on the combined tokens' gradient g [T, d]: (the row
    gradients, dw1, db1, dw2, db2, d weights [T, k]); with grads_like the weight gradients in those
    tensors' dtype (the kernel backends write them so; the reference's are converted)."""
    mlp_backward = p.impls.get("experts_backward") or p.impl(
        "experts_backward",
        expert_mlp_backward,
        dict(
            grad_out=g, x=tokens, w1=w1, w2=w2, offsets=offsets, pre=pre, activation=act, gather=row_to_flat, top_k=k,
            weights=weights, b2=b2,
        ),
    )  # fmt: skip
    if grads_like is None:
        return mlp_backward(g, tokens, w1, w2, offsets, pre, act, row_to_flat, k, weights, b2)
    if getattr(mlp_backward, "func", None) is _recipe.expert_mlp_backward:  # the kernels write them so
        return mlp_backward(g, tokens, w1, w2, offsets, pre, act, row_to_flat, k, weights, b2, grads_like=grads_like)
    # the reference: in the compute dtype, converted to the parameters'
    d_x, dw1, db1, dw2, db2, d_weights = mlp_backward(g, tokens, w1, w2, offsets, pre, act, row_to_flat, k, weights, b2)
    like1, like2 = grads_like
    return d_x, dw1.to(like1.dtype), db1.to(like1.dtype), dw2.to(like2.dtype), db2.to(like2.dtype), d_weights


def _routing_weight_grad(p: LayerPlan, g: Tensor, rows_out: Tensor, flat_to_row: Tensor, k: int) -> Tensor:
    """d weights [T, k] = <g_t, expert output row> (unpermute's weight gradient: the experts with a
    gate between their GEMMs)."""
    weight_grad = p.impls.get("weight_grad") or p.impl(
        "weight_grad", unpermute_weight_grad, dict(grad_out=g, rows=rows_out, flat_to_row=flat_to_row, top_k=k)
    )
    return weight_grad(g, rows_out, flat_to_row, k)


def _split(rows, *grads: Optional[Tensor]) -> list:
    """The stacked gradients [E + S, ...] as (routed, shared) views, per MoELayerFunction's ctx.rows."""
    out: list = []
    for g, r in zip(grads, rows):
        if r is None or g is None:
            out += [None, None]
        else:
            out += [g[: r[0]], g[r[0] :]] if r[1] else [g, None]
    return out


class MoELayerFunction(torch.autograd.Function):
    """gating -> route -> expert_mlp -> unpermute forward, their backwards in reverse, on a plan."""

    @staticmethod
    def forward(ctx, plan: LayerPlan, gate_dtype, logits, bias, tokens, w1, b1, w2, b2, shared, rw, rb, *params):  # type: ignore[override]
        """params: with packed weights (w1 ... b2 stacked routed + shared, in the compute dtype), the
        parameters they were packed from, (routed, shared) for each of w1, b1, w2, b2 (None where
        absent): the gradients go to those, written in their dtype, split by views. rw, rb: the
        router's weight and bias (logits None), in gate_dtype."""
        p = plan
        E, k = p.E, p.k
        checking = _checks.value_checks_enabled(tokens)
        dev = tokens.device.type
        autocast = torch.is_autocast_enabled(dev)  # off around the implementations, as the ops do it
        if autocast:
            torch.set_autocast_enabled(dev, False)
        T = tokens.shape[0]
        aux_coef = E / (k * max(T, 1))  # MoEMLP's aux loss: sum_e prob_mean_e * load_e * aux_coef
        router_in = None
        try:
            if rw is not None:  # MoEMLP._logits's ops: the tokens in gate_dtype, a linear
                router_in = tokens.to(gate_dtype)
                logits = torch.nn.functional.linear(router_in, rw, rb)
            impls = p.impls
            fused, routed = _gate_and_route(p, logits, bias, checking, aux_coef)
            weights, gate_ids, load, third, fraction, row_to_flat, flat_to_row, offsets = routed
            E, k = E + p.S, k + p.S

            # the weights in the compute dtype (the tokens'): cast here, so that their gradients come
            # back in the parameters' dtype, written so by the kernels (docs/host_path.md, step 4)
            sources, params = params, (w1, w2)
            w1, b1, w2, b2 = (_compute(t, tokens.dtype) for t in (w1, b1, w2, b2))
            experts = impls.get("experts")
            if experts is None or checking:
                named = dict(
                    x=tokens, w1=w1, b1=b1, w2=w2, b2=b2, offsets=offsets, activation=p.activation,
                    gather=row_to_flat, flat_to_row=flat_to_row, top_k=k, weights=weights, shared=shared,
                )  # fmt: skip
                if checking:
                    _value_checks(expert_mlp_op, named)
                experts = p.impl("experts", expert_mlp_op, named)
            # the rows combined into the tokens in the same call (the backend's unpermute): its
            # backward reads dy through the routing maps and forms the routing weights' gradient
            y, pre = experts(tokens, w1, b1, w2, b2, offsets, p.activation, row_to_flat, flat_to_row, k, weights, shared)
        finally:
            if autocast:
                torch.set_autocast_enabled(dev, True)
        ctx.set_materialize_grads(False)
        ctx.mark_non_differentiable(load)
        ctx.plan = p
        ctx.has = (b1 is not None, b2 is not None, shared is not None)
        ctx.fused, ctx.aux_coef = fused, aux_coef
        ctx.router = rw is not None
        # the parameters' dtype and layout, for their gradients (meta: no memory, nothing kept alive)
        if sources:  # the stacked gradients in the parameters' dtype, contiguous: split by views
            ctx.rows = [None if r is None else (r.shape[0], sh is not None) for r, sh in zip(sources[0::2], sources[1::2])]
            like = ((w1, sources[0]), (w2, sources[4]))
            ctx.grads_like = tuple(torch.empty(t.shape, dtype=src.dtype, device="meta") for t, src in like)
        else:
            ctx.rows = None
            ctx.grads_like = tuple(torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, device="meta") for t in params)
        ctx.save_for_backward(
            logits, gate_ids, tokens, w1, w2, b2, offsets, pre, row_to_flat, flat_to_row, weights,
            load if fused else fraction, router_in, rw,
        )  # fmt: skip
        return y, load, third

    @staticmethod
    def backward(ctx, dy, _dload, d_third):  # type: ignore[override]
        p: LayerPlan = ctx.plan
        k, act = p.k + p.S, p.activation
        saved = ctx.saved_tensors
        logits, ids, tokens, w1, w2, b2, offsets, pre, row_to_flat, flat_to_row, weights, load_or_fraction = saved[:12]
        router_in, rw = saved[12:]
        fused = ctx.fused
        _, _, need_logits, _, need_tokens, need_w1, need_b1, need_w2, need_b2, _, need_rw, need_rb = ctx.needs_input_grad[:12]
        d_rw = d_rb = None
        if ctx.router:  # the router's gradients come from the logits'
            need_logits = need_tokens or need_rw or need_rb
        if ctx.rows is not None:  # the packed copies take no gradient: their parameters do
            src = ctx.needs_input_grad[12:]
            need_w1, need_b1, need_w2, need_b2 = src[0] or src[1], src[2] or src[3], src[4] or src[5], src[6] or src[7]
        has_b1, has_b2, has_shared = ctx.has
        d_logits = d_tokens = dw1 = db1 = dw2 = db2 = d_shared = grad_weights = None
        dev = tokens.device.type
        autocast = torch.is_autocast_enabled(dev)
        create_graph = torch.is_grad_enabled()  # backward(create_graph=True): the kernels record no graph
        if autocast:
            torch.set_autocast_enabled(dev, False)
        torch.set_grad_enabled(False)
        try:
            if dy is not None:
                g = dy.contiguous()
                if has_shared:
                    d_shared = g
                if need_tokens or need_w1 or need_b1 or need_w2 or need_b2 or need_logits:
                    # expert_mlp's backward on dy itself (read through the routing maps), the routing
                    # weights' gradient formed in its down-projection's dgrad (docs/host_path.md, step 5)
                    d_x, dw1, db1, dw2, db2, d_weights = _experts_backward(
                        p, g, tokens, w1, w2, b2, offsets, pre, act, row_to_flat, k, weights, ctx.grads_like
                    )
                    if need_tokens:  # the row gradients summed into their tokens (the combine, unweighted)
                        d_tokens = _combine_rows(p, d_x, row_to_flat, flat_to_row, k)
                    db1 = db1 if has_b1 else None
                    db2 = db2 if has_b2 else None
                if need_logits:
                    grad_weights = d_weights.to(weights.dtype)
                    if fused:  # gating's backward reads the first p.k columns (the shared experts' are constants)
                        if p.scale != 1.0:
                            grad_weights = grad_weights * _scale_row(p, grad_weights)
                    else:
                        if p.S:  # the shared experts' weights are constants
                            grad_weights = grad_weights[:, : p.k]
                        if p.scale != 1.0:
                            grad_weights = grad_weights * p.scale
            dprob_mean = d_third
            if p.aux and not fused and d_third is not None:  # the aux loss's backward: d prob_mean = d aux * fraction
                dprob_mean = load_or_fraction * d_third
            if need_logits and (grad_weights is not None or dprob_mean is not None):
                if fused and p.aux:  # the first p.k columns of the weights' gradient and ids; the aux loss's
                    d_logits = fused.gating_backward(
                        grad_weights, logits, ids, p.k, load_or_fraction, d_third, ctx.aux_coef, p.score_func, p.renormalize
                    )
                elif fused:  # prob_mean's gradient as given: the op's kernel on the k routed columns
                    gw = None if grad_weights is None else grad_weights[:, : p.k]
                    d_logits = _gating_backward(p, gw, dprob_mean, logits, ids[:, : p.k])
                else:
                    d_logits = _gating_backward(p, grad_weights, dprob_mean, logits, ids)
            if ctx.router and d_logits is not None:  # the linear's backward, as autograd's AddmmBackward0 runs it
                if need_rw:
                    d_rw = d_logits.t().mm(router_in)
                if need_rb:
                    d_rb = d_logits.sum(0)
                if need_tokens:  # added to the experts' part in place (one rounding to the tokens' dtype)
                    r = d_logits.mm(rw)
                    d_tokens = r.to(tokens.dtype) if d_tokens is None else d_tokens.add_(r)
        finally:
            torch.set_grad_enabled(create_graph)
            if autocast:
                torch.set_autocast_enabled(dev, True)
        if ctx.router:
            d_logits = None  # the logits are the Function's own
        grads = (d_logits, d_tokens, dw1, db1, dw2, db2, d_shared, d_rw, d_rb)
        if create_graph:  # first-order gradients as asked; a derivative of them is refused by name
            anchors = [t for t in (logits, tokens, w1, w2, rw) if t is not None and t.requires_grad]
            grads = tuple(None if g is None else _NoSecondDerivative.apply(g, *anchors) for g in grads)
        d_logits, d_tokens, dw1, db1, dw2, db2, d_shared, d_rw, d_rb = grads
        if ctx.rows is None:
            return None, None, d_logits, None, d_tokens, dw1, db1, dw2, db2, d_shared, d_rw, d_rb
        return (
            None, None, d_logits, None, d_tokens, None, None, None, None, d_shared, d_rw, d_rb,
            *_split(ctx.rows, dw1, db1, dw2, db2),
        )  # fmt: skip


def _gating_backward(p: LayerPlan, grad_weights, grad_prob_mean, logits: Tensor, ids: Tensor) -> Tensor:
    """topk_gating_backward's implementation for this pattern of gradients, chosen as the op would."""
    gw, gp, ids = _contiguous(grad_weights), _contiguous(grad_prob_mean), ids.contiguous()
    piece = ("gating_backward", gw is None, gp is None)  # chosen per pattern, as the op would
    gating_backward = p.impls.get(piece) or p.impl(
        piece,
        topk_gating_backward,
        dict(grad_weights=gw, grad_prob_mean=gp, logits=logits, ids=ids, score_func=p.score_func, renormalize=p.renormalize),
    )
    return gating_backward(gw, gp, logits, ids, p.score_func, p.renormalize)


def _scale_row(p: LayerPlan, like: Tensor):
    """The routed scaling factor for weights [T, k + S]: the scale itself without shared experts,
    else [k + S] of it then 1 (made once per plan)."""
    if not p.S:
        return p.scale
    if p.scale_row is None or p.scale_row.dtype != like.dtype:
        p.scale_row = _kept(torch.tensor([p.scale] * p.k + [1.0] * p.S, dtype=like.dtype, device=like.device))
    return p.scale_row


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


# ---- the routing given (issue 28 item 4) ----------------------------------------------------------
# The layers whose routing the gating op does not compute (group-limited top-k, a transformers
# block's own router, the transformers experts backend, which gets the model's routing result) and
# the experts with a gate of their own between the two GEMMs (GPT-OSS's clamped SwiGLU, GeGLU, ...)
# run the rest of the layer on the same kind of plan: route -> the experts -> the weighted combine
# in one Function, each piece the implementation its op would run.


class RoutedPlan(LayerPlan):
    """A LayerPlan for `run_routed`: E experts (shared ones included), k rows per token, the fused
    activation (with no expert gate), the backend."""

    def __init__(self, E: int, k: int, activation: str, backend: str):
        super().__init__(E, k, "softmax", False, activation, 1.0, backend, 0, aux=False)


def run_routed(
    options: Tuple[int, int, str, str],
    weights: Tensor,
    ids: Tensor,
    tokens: Tensor,
    w1: Tensor,
    b1: Optional[Tensor],
    w2: Tensor,
    b2: Optional[Tensor],
    shared: Optional[Tensor],
    gate: Optional[Callable[[Tensor], Tensor]] = None,
) -> Tensor:
    """y [T, d] = shared + sum_j weights[t, j] * expert_{ids[t, j]}(tokens[t]), for options (E, k,
    activation, backend): with `gate` None the experts are expert_mlp's (activation fused into the
    first GEMM), else two grouped GEMMs with gate(pre) between them (what the op path runs: its
    gradient by autograd through `gate`, recomputed in backward). Every tensor contiguous, ids int64
    [T, k], weights [T, k] float32 (float64 for float64 tokens), the expert weights [E, in, out] in
    the tokens' dtype. Differentiable in weights, tokens, the expert weights and biases, shared."""
    global plans_built
    key = ("routed", options, gate is None, *(_sig(t) for t in (weights, ids, tokens, w1, b1, w2, b2, shared)))
    plan = _backend.PLANS.get(key)
    fresh = plan is None
    if plan is None:
        plan = RoutedPlan(*options)
    y = RoutedLayerFunction.apply(plan, gate, weights, ids, tokens, w1, b1, w2, b2, shared)
    if fresh and _backend.choices_final():
        if len(_backend.PLANS) >= _MAX_PLANS:
            _backend.PLANS.clear()
        _backend.PLANS[key] = plan
        plans_built += 1
    return y


def _piece(p: LayerPlan, piece: Hashable, op: Op, checking: bool, **named: Any) -> Callable:
    """The implementation of `piece`; with value checks on, the op's value checks first."""
    f = p.impls.get(piece)
    if f is None or checking:
        if checking:
            _value_checks(op, named)
        f = p.impl(piece, op, named)
    return f


def gate_forward(
    gate: Callable[[Tensor], Tensor], pre: Tensor, width: int, dtype: torch.dtype, autocast: bool, keep_graph: bool
) -> Tuple[Tensor, Optional[Tuple[Tensor, Tensor]]]:
    """(hidden = gate(pre) in `dtype`, contiguous; with keep_graph, (pre's leaf, gate(leaf)): the
    gate's own autograd graph, which the backward differentiates, as the op path's autograd does)."""
    graph = None
    if keep_graph:
        with torch.enable_grad():
            leaf = pre.detach().requires_grad_(True)
            out = _run_gate(gate, leaf, dtype, autocast)
        graph, hidden = (leaf, out), out.detach()
    else:
        hidden = _run_gate(gate, pre, dtype, autocast)
    if hidden.dim() != 2 or hidden.shape != (pre.shape[0], width):
        raise ValueError(
            f"the experts' gate gave rows of shape {list(hidden.shape)}, expected [{pre.shape[0]}, {width}] "
            f"(the down-projection's input size)"
        )
    return hidden.contiguous(), graph


def _run_gate(gate: Callable[[Tensor], Tensor], pre: Tensor, dtype: torch.dtype, autocast: bool) -> Tensor:
    """gate(pre) in `dtype`, under autocast as the caller had it (as the op path runs it)."""
    if not autocast:
        return gate(pre).to(dtype)
    dev = pre.device.type
    torch.set_autocast_enabled(dev, True)
    try:
        return gate(pre).to(dtype)
    finally:
        torch.set_autocast_enabled(dev, False)


class RoutedLayerFunction(torch.autograd.Function):
    """route -> expert_mlp (or grouped GEMM, gate, grouped GEMM) -> unpermute, their backwards in
    reverse, on a plan; the routing (weights, ids) given."""

    @staticmethod
    def forward(ctx, plan: LayerPlan, gate, weights, ids, tokens, w1, b1, w2, b2, shared):  # type: ignore[override]
        p = plan
        E, k = p.E, p.k
        checking = _checks.value_checks_enabled(tokens)
        dev = tokens.device.type
        autocast = torch.is_autocast_enabled(dev)
        if autocast:
            torch.set_autocast_enabled(dev, False)
        try:
            routing = _piece(p, "route", route, checking, expert_ids=ids, num_experts=E)
            row_to_flat, flat_to_row, offsets = routing(ids, E)
            hidden = rows_out = None
            if gate is None:  # the combine in the same call: its backward forms the routing weights' gradient
                experts = _piece(
                    p, "experts", expert_mlp_op, checking, x=tokens, w1=w1, b1=b1, w2=w2, b2=b2, offsets=offsets,
                    activation=p.activation, gather=row_to_flat, flat_to_row=flat_to_row, top_k=k, weights=weights,
                    shared=shared,
                )  # fmt: skip
                y, pre = experts(tokens, w1, b1, w2, b2, offsets, p.activation, row_to_flat, flat_to_row, k, weights, shared)
            else:
                up = _piece(
                    p, "up", grouped_mm_op, checking, x=tokens, weight=w1, offsets=offsets, bias=b1, activation="none",
                    gather=row_to_flat, flat_to_row=flat_to_row, top_k=k,
                )  # fmt: skip
                pre, _ = up(tokens, w1, offsets, b1, "none", row_to_flat, k)
                hidden, gate_graph = gate_forward(gate, pre, w2.shape[1], tokens.dtype, autocast, any(ctx.needs_input_grad[4:9]))
                down = _piece(
                    p, "down", grouped_mm_op, checking, x=hidden, weight=w2, offsets=offsets, bias=b2, activation="none",
                    gather=None, flat_to_row=None, top_k=1,
                )  # fmt: skip
                rows_out, _ = down(hidden, w2, offsets, b2, "none", None, 1)
                combine = _piece(
                    p, "combine", unpermute_op, checking, rows=rows_out, row_to_flat=row_to_flat, flat_to_row=flat_to_row,
                    top_k=k, weights=weights, shared=shared,
                )  # fmt: skip
                y = combine(rows_out, flat_to_row, k, weights, shared)
        finally:
            if autocast:
                torch.set_autocast_enabled(dev, True)
        ctx.set_materialize_grads(False)
        ctx.plan, ctx.gate, ctx.autocast = p, gate, autocast
        ctx.gate_graph = gate_graph if gate is not None else None
        ctx.has = (b1 is not None, b2 is not None, shared is not None)
        # with a gate the routing weights' gradient reads the expert outputs (unpermute's weight gradient)
        keep_rows = ctx.needs_input_grad[2] and gate is not None
        ctx.save_for_backward(
            tokens, w1, w2, b2, offsets, pre, hidden, row_to_flat, flat_to_row, weights, rows_out if keep_rows else None
        )
        return y

    @staticmethod
    def backward(ctx, dy):  # type: ignore[override]
        p: LayerPlan = ctx.plan
        k, act, gate = p.k, p.activation, ctx.gate
        tokens, w1, w2, b2, offsets, pre, hidden, row_to_flat, flat_to_row, weights, rows_out = ctx.saved_tensors
        _, _, need_weights, _, need_tokens, need_w1, need_b1, need_w2, need_b2, _ = ctx.needs_input_grad
        has_b1, has_b2, has_shared = ctx.has
        d_tokens = dw1 = db1 = dw2 = db2 = d_shared = grad_weights = d_x = None
        dev = tokens.device.type
        autocast = torch.is_autocast_enabled(dev)
        create_graph = torch.is_grad_enabled()
        if autocast:
            torch.set_autocast_enabled(dev, False)
        torch.set_grad_enabled(False)
        impls = p.impls
        try:
            if dy is not None:
                g = dy.contiguous()
                if has_shared:
                    d_shared = g
                d_weights = None
                if gate is None and (need_tokens or need_w1 or need_b1 or need_w2 or need_b2 or need_weights):
                    d_x, dw1, db1, dw2, db2, d_weights = _experts_backward(
                        p, g, tokens, w1, w2, b2, offsets, pre, act, row_to_flat, k, weights, None
                    )
                elif need_tokens or need_w1 or need_b1 or need_w2 or need_b2:
                    permute = impls.get("permute") or p.impl(
                        "permute",
                        permute_op,
                        dict(x=g, row_to_flat=row_to_flat, flat_to_row=flat_to_row, top_k=k, weights=weights),
                    )
                    d_rows = permute(g, row_to_flat, k, weights).contiguous()
                    d_x, dw1, db1, dw2, db2 = _gated_backward(
                        p, ctx.gate_graph, d_rows, tokens, w1, w2, offsets, hidden, row_to_flat, k
                    )
                if d_x is not None:
                    if need_tokens:
                        d_tokens = _combine_rows(p, d_x, row_to_flat, flat_to_row, k)
                    db1 = db1 if has_b1 else None
                    db2 = db2 if has_b2 else None
                if need_weights:
                    if d_weights is None:  # a gate between the GEMMs: unpermute's weight gradient
                        d_weights = _routing_weight_grad(p, g, rows_out, flat_to_row, k)
                    grad_weights = d_weights.to(weights.dtype)
        finally:
            torch.set_grad_enabled(create_graph)
            if autocast:
                torch.set_autocast_enabled(dev, True)
        grads = (grad_weights, d_tokens, dw1, db1, dw2, db2, d_shared)
        if create_graph:
            anchors = [t for t in (weights, tokens, w1, w2) if t.requires_grad]
            grads = tuple(None if g is None else _NoSecondDerivative.apply(g, *anchors) for g in grads)
        grad_weights, d_tokens, dw1, db1, dw2, db2, d_shared = grads
        return None, None, grad_weights, None, d_tokens, dw1, db1, dw2, db2, d_shared


def _gated_backward(
    p: LayerPlan, gate_graph: Tuple[Tensor, Tensor], d_rows: Tensor, tokens: Tensor, w1: Tensor, w2: Tensor, offsets: Tensor,
    hidden: Tensor, row_to_flat: Optional[Tensor], k: int,
):  # fmt: skip
    """The two grouped GEMMs' backward with the gate's between them (autograd through the gate's
    graph kept by gate_forward): (the up-projection's row gradients, dw1, db1, dw2, db2); the
    up-projection read its rows through `row_to_flat` from tokens of k rows each, or (None, k 1) the
    rows themselves."""
    down_backward = p.impls.get("down_backward") or p.impl(
        "down_backward",
        grouped_mm_backward,
        dict(grad_out=d_rows, x=hidden, weight=w2, offsets=offsets, pre=None, activation="none", gather=None, top_k=1),
    )
    d_hidden, dw2, db2 = down_backward(d_rows, hidden, w2, offsets, None, "none", None, 1)
    leaf, out = gate_graph
    with torch.enable_grad():  # retain_graph: a backward run again (retain_graph=True outside) finds it
        (d_pre,) = torch.autograd.grad(out, leaf, d_hidden, retain_graph=True)
    d_pre = d_pre.contiguous()
    up_backward = p.impls.get("up_backward") or p.impl(
        "up_backward",
        grouped_mm_backward,
        dict(grad_out=d_pre, x=tokens, weight=w1, offsets=offsets, pre=None, activation="none", gather=row_to_flat, top_k=k),
    )
    d_x, dw1, db1 = up_backward(d_pre, tokens, w1, offsets, None, "none", row_to_flat, k)
    return d_x, dw1, db1, dw2, db2
