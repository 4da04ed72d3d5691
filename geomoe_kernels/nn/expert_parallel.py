"""Expert parallelism for MoEMLP: the routed experts sharded over the ranks of a process group (an
expert-parallel group: the whole world, or one dimension of a DeviceMesh), the routed rows exchanged
with all_to_all_single (uneven splits), everything else as it was.

Per rank: gate and route the local tokens over all E experts (expert-major rows), send each rank
the rows of the experts it owns, regroup what arrives by local expert, run the grouped GEMMs, send
the results back, and combine as usual. Both exchanges are differentiable. The split sizes must be
known on the host (all_to_all_single takes lists), so each forward has one host sync: the price of
expert parallelism, not of the single-device path.

Rank r of the group owns experts [r*B, min((r+1)*B, E)) with B = ceil(E/W), so 23 experts on 2
ranks is 12 + 11 and on 8 ranks 7 x 3 + 2: torch.chunk's blocks, the ones DTensor's Shard(0) gives,
so a rank's experts are its shard of the global tensor (what checkpoints save). Every rank must get
at least one expert (23 on 16 ranks would leave the last none: an error). The rank's experts live in a
child module, `experts` (w1, b1, w2, b2 as the MoEMLP has them, cut to the rank's rows), so that a
data-parallel wrapper can treat them apart from the replicated rest: FSDP2 shards them over the
data-parallel ranks that hold the same experts, the rest over all. Their names are then
`<layer>.experts.w1` etc.; `canonical_name` maps them back to the unsharded model's `<layer>.w1`.

Gradients: the per-expert gradients a rank computes sum over the tokens of every rank of its group;
the forward scales them by 1/W in the backward (an identity with a scaled gradient, whatever wraps
the module), so that averaging over the data-parallel ranks afterwards gives the average over all
ranks: what a single process computes on the whole batch. Uses only public torch.distributed APIs.

Every MoEMLP option runs here as on one device: experts without biases, softmax or sigmoid top-k with
or without renormalisation, group-limited top-k and the routed scaling factor (the gating is local
to each rank's tokens), the shared experts with their sigmoid gate (replicated), SwiGLU side by side
or interleaved (the layer's own expert path runs on the rank's shard). A MoEMLP built by
from_transformers is refused: it shares the block's whole expert tensors, which a shard cannot.

Eagerly the layer runs on a launch plan split where the exchanges are (issue 28 item 4): the
dispatch (gating, route, permute), the rank's experts and the combine, one autograd.Function each,
each piece the implementation its op would run (the same bits as the op path, which use_plan =
False and torch.compile take)."""

from __future__ import annotations

from typing import Dict, List, Optional, Tuple

import torch
import torch.distributed as dist
from torch import Tensor, nn

from .. import _checks
from .. import backend as _backend
from ..ops import permute, route, unpermute
from ..ops.expert_mlp import expert_mlp_backward, expert_mlp_op
from ..ops.gating import topk_gating, topk_gating_backward
from ..ops.permute import permute_op, unpermute_op, unpermute_weight_grad
from . import _layer_plan as _lp
from .moe import MoEMLP

EXPERT_PARAMS = ("w1", "b1", "w2", "b2")


def expert_range(num_experts: int, rank: int, world: int) -> Tuple[int, int]:
    """Rank `rank`'s experts [start, end): blocks of ceil(E / W), the last one shorter (torch.chunk's
    and DTensor Shard(0)'s split, so a rank's experts are its shard of the global [E, ...] tensor)."""
    block = -(-num_experts // world)
    return min(rank * block, num_experts), min((rank + 1) * block, num_experts)


def check_split(num_experts: int, world: int) -> None:
    """Every rank of the group must get at least one expert."""
    if world < 1 or expert_range(num_experts, world - 1, world)[0] >= num_experts:
        raise ValueError(
            f"expert parallelism over {world} ranks expected every rank to get at least one of the {num_experts} "
            f"routed experts (blocks of ceil({num_experts}/{world})), got a group size that leaves the last rank none"
        )


# all_gather_single replaces all_gather_into_tensor in newer torch; older ones have only the latter
_all_gather_flat = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


class _AllToAll(torch.autograd.Function):
    """all_to_all_single with uneven splits; the backward is the exchange the other way."""

    @staticmethod
    def forward(ctx, rows: Tensor, out_splits: List[int], in_splits: List[int], group) -> Tensor:
        ctx.out_splits, ctx.in_splits, ctx.group = out_splits, in_splits, group
        rows = rows.contiguous()
        out = rows.new_empty((sum(out_splits),) + tuple(rows.shape[1:]))
        dist.all_to_all_single(out, rows, out_splits, in_splits, group=group)
        return out

    @staticmethod
    def backward(ctx, grad: Tensor):
        grad = grad.contiguous()
        out = grad.new_empty((sum(ctx.in_splits),) + tuple(grad.shape[1:]))
        dist.all_to_all_single(out, grad, ctx.in_splits, ctx.out_splits, group=ctx.group)
        return out, None, None, None


def _all_to_all(rows: Tensor, out_splits: List[int], in_splits: List[int], group) -> Tensor:
    """Differentiable all_to_all_single with uneven splits."""
    return _AllToAll.apply(rows, out_splits, in_splits, group if group is not None else dist.group.WORLD)


class _ScaleGrad(torch.autograd.Function):
    """The identity, its gradient times `scale`."""

    @staticmethod
    def forward(ctx, x: Tensor, scale: float) -> Tensor:
        ctx.scale = scale
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: Tensor):
        return grad * ctx.scale, None


class LocalExperts(nn.Module):
    """This rank's routed experts: w1 [E_local, dim, up], b1, w2, b2 (b1 and b2 may be absent). Its
    forward runs them (so that a wrapper's hooks, FSDP2's gathering of the shards, run first)."""

    w1: Tensor
    b1: Optional[Tensor]
    w2: Tensor
    b2: Optional[Tensor]

    def __init__(self, params: Dict[str, Optional[nn.Parameter]]):
        super().__init__()
        for name, p in params.items():
            self.register_parameter(name, p)

    def forward(self, rows: Tensor, offsets: Tensor, layer: MoEMLP, grad_scale: float, planned: bool = False) -> Tensor:
        """`layer`'s expert path (its activation, SwiGLU layout, gate) on expert-major `rows` with this
        rank's weights; the weights' gradients times `grad_scale`. planned: on a launch plan (one
        autograd.Function, the implementations the ops would run) rather than through the ops."""
        scale = lambda p: _ScaleGrad.apply(p, grad_scale)
        maybe = lambda p: None if p is None else scale(p)
        weights = (scale(self.w1), maybe(self.b1), scale(self.w2), maybe(self.b2))
        if not planned:
            return layer._experts(rows, rows.dtype, offsets, None, None, weights=weights)
        dtype = rows.dtype
        w1, w2 = weights[0].to(dtype).contiguous(), weights[2].to(dtype).contiguous()
        b1, b2 = (None if b is None else b.to(dtype).contiguous() for b in (weights[1], weights[3]))
        gate = layer._expert_gate()
        act = layer._expert_activation()
        options = ("ep-experts", w1.shape[0], act, layer.backend, gate is None)
        key = (options, *(_lp._sig(t) for t in (rows, offsets, w1, b1, w2, b2)))
        plan, fresh = _plan(key, lambda: _lp.RoutedPlan(w1.shape[0], 1, act, layer.backend))
        out = _Experts.apply(plan, gate, rows.contiguous(), offsets, w1, b1, w2, b2)
        _keep(key, plan, fresh)
        return out


class ExpertParallelMoEMLP(MoEMLP):
    """An MoEMLP holding only this rank's routed experts (in `experts`). Build it with `from_dense`,
    on every rank of the group from identically initialised (or loaded) MoEMLPs."""

    group: Optional[dist.ProcessGroup]
    world: int
    expert_start: int
    expert_end: int

    @classmethod
    def from_dense(cls, moe: MoEMLP, group: Optional[dist.ProcessGroup] = None) -> "ExpertParallelMoEMLP":
        if moe.shares_expert_tensors:
            raise ValueError(
                "ExpertParallelMoEMLP.from_dense: argument 'moe' expected a MoEMLP of its own, got one built by "
                "MoEMLP.from_transformers (it shares the transformers block's whole expert tensors; shard the block's "
                "model with transformers' own expert parallelism, or build a MoEMLP with the same options and load its weights)"
            )
        world = dist.get_world_size(group)
        rank = dist.get_rank(group)
        check_split(moe.num_experts, world)
        ep = cls.__new__(cls)
        ep.__dict__.update(moe.__dict__)  # same modules, parameters and settings
        ep._parameters = {k: v for k, v in moe._parameters.items() if k not in EXPERT_PARAMS}
        ep._buffers = dict(moe._buffers)
        ep._modules = dict(moe._modules)
        ep.group, ep.world = group, world
        ep.expert_start, ep.expert_end = expert_range(moe.num_experts, rank, world)
        local: Dict[str, Optional[nn.Parameter]] = {}
        for name in EXPERT_PARAMS:
            full = getattr(moe, name)
            local[name] = None if full is None else nn.Parameter(full.detach()[ep.expert_start : ep.expert_end].clone())
        ep._modules["experts"] = LocalExperts(local)
        return ep

    experts: LocalExperts

    # the rank's expert tensors under the MoEMLP's names (read-only views of `experts`)
    w1 = property(lambda self: self.experts.w1)
    b1 = property(lambda self: self.experts.b1)
    w2 = property(lambda self: self.experts.w2)
    b2 = property(lambda self: self.experts.b2)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", experts {self.expert_start}..{self.expert_end - 1} of {self.num_experts} here"

    def _forward_ops(self, x: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
        """forward through the torch.library ops (what torch.compile traces, and use_plan = False)."""
        tokens, dtype = self._tokens(x)
        T, E, k, be = tokens.shape[0], self.num_experts, self.top_k, self.backend
        weights, ids, load, prob_mean = self._gate(tokens, x.dtype)
        row_to_flat, flat_to_row, offsets = route(ids, E, be)
        rows = permute(tokens, row_to_flat, flat_to_row, k, be)
        returned = self._exchange(rows, offsets, planned=False)
        y = unpermute(returned, row_to_flat, flat_to_row, k, weights, self._shared(tokens, dtype), be)
        return y.reshape(x.shape[:-1] + (self.dim,)), self._aux(load, prob_mean, T), load

    def _forward_planned(self, x: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
        """The same steps on a launch plan, the exchanges between its pieces: the dispatch (gating
        where the gating op computes the routing, route, the rows' permutation) as one
        autograd.Function, the rank's experts as one (in `experts`' forward, so a wrapper's hooks run
        around it), the weighted combine as one; each piece the implementation its op would run, so
        the bits are the op path's."""
        tokens, dtype = self._tokens(x)
        T, E, k = tokens.shape[0], self.num_experts, self.top_k
        gate_dtype = torch.promote_types(x.dtype, torch.float32)
        act = self._expert_activation()
        options = ("ep", E, k, self.score_func, self.renormalize, act, self.routed_scaling_factor, self.backend)
        if self._gating_in_plan():
            logits, bias = self._logits(tokens, gate_dtype)
            a, b = logits.contiguous(), bias
        else:
            weights, ids, load, prob_mean = self._gate(tokens, x.dtype)
            a, b = None, ids.contiguous()
        key = (options, _lp._sig(a), _lp._sig(b), _lp._sig(tokens))
        plan, fresh = _plan(key, lambda: _lp.LayerPlan(*options[1:], 0, aux=False))
        rows, gate_weights, gate_load, gate_prob_mean, row_to_flat, flat_to_row, offsets = _Dispatch.apply(
            plan, a, b, tokens.contiguous()
        )
        if a is not None:
            weights, load, prob_mean = gate_weights, gate_load, gate_prob_mean
        returned = self._exchange(rows, offsets, planned=True)
        shared = self._shared(tokens, dtype)
        y = _Combine.apply(plan, returned, row_to_flat, flat_to_row, weights.contiguous(), _contiguous(shared))
        _keep(key, plan, fresh)
        return y.reshape(x.shape[:-1] + (self.dim,)), self._aux(load, prob_mean, T), load

    def _exchange(self, rows: Tensor, offsets: Tensor, planned: bool) -> Tensor:
        """Each expert's rows (expert-major, by `offsets`) sent to the rank that owns it, run there
        and sent back, in the order they came."""
        E, W = self.num_experts, self.world
        # who gets what: every rank's per-expert counts, then the split sizes on the host
        counts = (offsets[1:] - offsets[:-1]).contiguous()
        all_counts = torch.empty(W * E, dtype=counts.dtype, device=counts.device)
        _all_gather_flat(all_counts, counts, group=self.group)
        all_counts = all_counts.view(W, E)
        bounds = [expert_range(E, j, W) for j in range(W)]
        send = torch.stack([counts[a:b].sum() for a, b in bounds])
        mine = all_counts[:, self.expert_start : self.expert_end]  # [source rank, local expert]
        send_l, recv_l, mine_l = send.tolist(), mine.sum(1).tolist(), mine.tolist()  # the one host sync
        arrived = _all_to_all(rows, recv_l, send_l, self.group)

        # regroup from (source, local expert) blocks to (local expert, source): expert-major
        to_expert_major = _block_transpose(mine_l, arrived.device)
        expert_rows = arrived.index_select(0, to_expert_major)
        local_counts = mine.sum(0)
        local_offsets = torch.cat([local_counts.new_zeros(1), torch.cumsum(local_counts, 0)])
        out = self.experts(expert_rows, local_offsets, self, 1.0 / W, planned)
        back_order = torch.empty_like(to_expert_major)
        back_order[to_expert_major] = torch.arange(to_expert_major.numel(), device=out.device)
        return _all_to_all(out.index_select(0, back_order), send_l, recv_l, self.group)


# ---- the planned pieces (nn/_layer_plan.py's LayerPlan, split where the exchanges are) -----------


def _contiguous(t: Optional[Tensor]) -> Optional[Tensor]:
    return None if t is None else t.contiguous()


def _plan(key, make):
    """(the plan kept for `key`, or a new one; whether it is new)."""
    plan = _backend.PLANS.get(key)
    return (make(), True) if plan is None else (plan, False)


def _keep(key, plan, fresh: bool) -> None:
    """Keep a new plan once its pieces are resolved (as _layer_plan.run does)."""
    if fresh and _backend.choices_final():
        if len(_backend.PLANS) >= _lp._MAX_PLANS:
            _backend.PLANS.clear()
        _backend.PLANS[key] = plan
        _lp.plans_built += 1


class _NoAutocast:
    """Autocast off around the implementations, as the ops do it."""

    def __init__(self, t: Tensor):
        self.dev = t.device.type

    def __enter__(self):
        self.on = torch.is_autocast_enabled(self.dev)
        if self.on:
            torch.set_autocast_enabled(self.dev, False)
        return self.on

    def __exit__(self, *exc):
        if self.on:
            torch.set_autocast_enabled(self.dev, True)


class _Dispatch(torch.autograd.Function):
    """gating (with logits given; with ids given, none) -> route -> the tokens' rows in expert-major
    order: (rows, weights, load, prob_mean, row_to_flat, flat_to_row, offsets); weights, load and
    prob_mean None with ids given."""

    @staticmethod
    def forward(ctx, plan, logits, bias_or_ids, tokens):  # type: ignore[override]
        p = plan
        checking = _checks.value_checks_enabled(tokens)
        weights = load = prob_mean = None
        with _NoAutocast(tokens):
            if logits is not None:
                bias = bias_or_ids
                named = dict(logits=logits, bias=bias, top_k=p.k, score_func=p.score_func, renormalize=p.renormalize)
                gating = _lp._piece(p, "gating", topk_gating, checking, **named)
                weights, ids, load, prob_mean = gating(logits, bias, p.k, p.score_func, p.renormalize)
                if p.scale != 1.0:
                    weights = weights * p.scale
            else:
                ids = bias_or_ids
            routing = _lp._piece(p, "route", route, checking, expert_ids=ids, num_experts=p.E)
            row_to_flat, flat_to_row, offsets = routing(ids, p.E)
            named = dict(x=tokens, row_to_flat=row_to_flat, flat_to_row=flat_to_row, top_k=p.k, weights=None)
            rows = _lp._piece(p, "permute", permute_op, checking, **named)(tokens, row_to_flat, p.k, None)
        ctx.set_materialize_grads(False)
        ctx.plan = p
        ctx.save_for_backward(logits, ids if logits is not None else None, row_to_flat, flat_to_row)
        ctx.mark_non_differentiable(*(t for t in (load, row_to_flat, flat_to_row, offsets) if t is not None))
        return rows, weights, load, prob_mean, row_to_flat, flat_to_row, offsets

    @staticmethod
    def backward(ctx, d_rows, d_weights, _dload, d_prob_mean, *_):  # type: ignore[override]
        p = ctx.plan
        logits, ids, row_to_flat, flat_to_row = ctx.saved_tensors
        _, need_logits, _, need_tokens = ctx.needs_input_grad
        d_logits = d_tokens = None
        with _NoAutocast(row_to_flat), torch.no_grad():
            if need_tokens and d_rows is not None:  # permute's backward: each token's rows summed (unweighted)
                g = d_rows.contiguous()
                named = dict(rows=g, row_to_flat=row_to_flat, flat_to_row=flat_to_row, top_k=p.k, weights=None, shared=None)
                d_tokens = _lp._piece(p, "combine_rows", unpermute_op, False, **named)(g, flat_to_row, p.k, None, None)
            if need_logits and (d_weights is not None or d_prob_mean is not None):
                gw = None if d_weights is None else (d_weights * p.scale if p.scale != 1.0 else d_weights).contiguous()
                gp = _contiguous(d_prob_mean)
                named = dict(
                    grad_weights=gw, grad_prob_mean=gp, logits=logits, ids=ids, score_func=p.score_func, renormalize=p.renormalize
                )
                piece = ("gating_backward", gw is None, gp is None)
                d_logits = _lp._piece(p, piece, topk_gating_backward, False, **named)(
                    gw, gp, logits, ids, p.score_func, p.renormalize
                )
        return None, d_logits, None, d_tokens


class _Combine(torch.autograd.Function):
    """The weighted combine of the rows that came back (unpermute), `shared` added."""

    @staticmethod
    def forward(ctx, plan, rows, row_to_flat, flat_to_row, weights, shared):  # type: ignore[override]
        p = plan
        checking = _checks.value_checks_enabled(rows)
        with _NoAutocast(rows):
            named = dict(rows=rows, row_to_flat=row_to_flat, flat_to_row=flat_to_row, top_k=p.k, weights=weights, shared=shared)
            y = _lp._piece(p, "combine", unpermute_op, checking, **named)(rows, flat_to_row, p.k, weights, shared)
        ctx.set_materialize_grads(False)
        ctx.plan, ctx.has_shared = p, shared is not None
        ctx.save_for_backward(rows if ctx.needs_input_grad[4] else None, row_to_flat, flat_to_row, weights)
        return y

    @staticmethod
    def backward(ctx, dy):  # type: ignore[override]
        p = ctx.plan
        rows, row_to_flat, flat_to_row, weights = ctx.saved_tensors
        _, need_rows, _, _, need_weights, _ = ctx.needs_input_grad
        d_rows = grad_weights = None
        if dy is None:
            return None, None, None, None, None, None
        with _NoAutocast(dy), torch.no_grad():
            g = dy.contiguous()
            if need_rows:
                named = dict(x=g, row_to_flat=row_to_flat, flat_to_row=flat_to_row, top_k=p.k, weights=weights)
                d_rows = _lp._piece(p, "combine_backward", permute_op, False, **named)(g, row_to_flat, p.k, weights)
            if need_weights:
                named = dict(grad_out=g, rows=rows, flat_to_row=flat_to_row, top_k=p.k)
                weight_grad = _lp._piece(p, "weight_grad", unpermute_weight_grad, False, **named)
                grad_weights = weight_grad(g, rows, flat_to_row, p.k).to(weights.dtype)
        return None, d_rows, None, None, grad_weights, g if ctx.has_shared else None


class _Experts(torch.autograd.Function):
    """The rank's experts on rows already grouped by expert: expert_mlp, or two grouped GEMMs with
    the gate between them (RoutedLayerFunction's experts with no permutation)."""

    @staticmethod
    def forward(ctx, plan, gate, rows, offsets, w1, b1, w2, b2):  # type: ignore[override]
        p = plan
        checking = _checks.value_checks_enabled(rows)
        hidden = None
        with _NoAutocast(rows) as autocast:
            if gate is None:
                named = dict(
                    x=rows, w1=w1, b1=b1, w2=w2, b2=b2, offsets=offsets, activation=p.activation, gather=None, flat_to_row=None,
                    top_k=1, weights=None, shared=None,
                )  # fmt: skip
                out, pre = _lp._piece(p, "experts", expert_mlp_op, checking, **named)(
                    rows, w1, b1, w2, b2, offsets, p.activation, None, None, 1
                )
            else:
                named = dict(
                    x=rows, weight=w1, offsets=offsets, bias=b1, activation="none", gather=None, flat_to_row=None, top_k=1
                )
                pre, _ = _lp._piece(p, "up", _lp.grouped_mm_op, checking, **named)(rows, w1, offsets, b1, "none", None, 1)
                keep = any(ctx.needs_input_grad[2:])
                hidden, ctx.gate_graph = _lp.gate_forward(gate, pre, w2.shape[1], rows.dtype, autocast, keep)
                named = dict(
                    x=hidden, weight=w2, offsets=offsets, bias=b2, activation="none", gather=None, flat_to_row=None, top_k=1
                )
                out, _ = _lp._piece(p, "down", _lp.grouped_mm_op, checking, **named)(hidden, w2, offsets, b2, "none", None, 1)
        ctx.set_materialize_grads(False)
        ctx.plan, ctx.gate, ctx.autocast, ctx.has = p, gate, autocast, (b1 is not None, b2 is not None)
        ctx.save_for_backward(rows, offsets, w1, w2, pre, hidden)
        return out

    @staticmethod
    def backward(ctx, d_out):  # type: ignore[override]
        if d_out is None:
            return (None,) * 8
        p, gate = ctx.plan, ctx.gate
        rows, offsets, w1, w2, pre, hidden = ctx.saved_tensors
        g = d_out.contiguous()
        with _NoAutocast(rows), torch.no_grad():
            if gate is None:
                named = dict(
                    grad_out=g, x=rows, w1=w1, w2=w2, offsets=offsets, pre=pre, activation=p.activation, gather=None, top_k=1,
                    weights=None, b2=None,
                )  # fmt: skip
                backward = _lp._piece(p, "experts_backward", expert_mlp_backward, False, **named)
                d_rows, dw1, db1, dw2, db2, _ = backward(g, rows, w1, w2, offsets, pre, p.activation, None, 1)
            else:
                d_rows, dw1, db1, dw2, db2 = _lp._gated_backward(p, ctx.gate_graph, g, rows, w1, w2, offsets, hidden, None, 1)
        has_b1, has_b2 = ctx.has
        return None, None, d_rows, None, dw1, db1 if has_b1 else None, dw2, db2 if has_b2 else None


def _block_transpose(counts: List[List[int]], device) -> Tensor:
    """Row indices that reorder blocks laid out (source s, expert e) into (expert e, source s)."""
    S, n = len(counts), len(counts[0]) if counts else 0
    start, pos = [[0] * n for _ in range(S)], 0
    for s in range(S):
        for e in range(n):
            start[s][e] = pos
            pos += counts[s][e]
    order = [torch.arange(start[s][e], start[s][e] + counts[s][e]) for e in range(n) for s in range(S)]
    return (torch.cat(order) if order else torch.zeros(0, dtype=torch.int64)).to(device)


def shard_experts(model: torch.nn.Module, group: Optional[dist.ProcessGroup] = None) -> List[str]:
    """Replace every MoEMLP in `model` by its expert-parallel shard over `group` (default: the whole
    world); returns the names of the sharded (rank-local) parameters as `model` now names them."""
    local: List[str] = []
    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            if isinstance(child, MoEMLP) and not isinstance(child, ExpertParallelMoEMLP):
                ep = ExpertParallelMoEMLP.from_dense(child, group)
                setattr(module, child_name, ep)
                prefix = f"{name}.{child_name}" if name else child_name
                local += [f"{prefix}.experts.{p}" for p, v in ep.experts.named_parameters(recurse=False) if v is not None]
    return local


def sharded_layers(model: torch.nn.Module) -> List[Tuple[str, ExpertParallelMoEMLP]]:
    """(name, layer) of every expert-parallel layer in `model`."""
    return [(name, m) for name, m in model.named_modules() if isinstance(m, ExpertParallelMoEMLP)]


def expert_names(model: torch.nn.Module) -> Dict[str, Tuple[str, ExpertParallelMoEMLP]]:
    """{name in `model` ('<layer>.experts.w1'): (the unsharded model's name '<layer>.w1', layer)}."""
    out: Dict[str, Tuple[str, ExpertParallelMoEMLP]] = {}
    for name, m in sharded_layers(model):
        prefix = f"{name}." if name else ""
        for p, v in m.experts.named_parameters(recurse=False):
            out[f"{prefix}experts.{p}"] = (f"{prefix}{p}", m)
    return out


def canonical_name(key: str, names: Dict[str, Tuple[str, ExpertParallelMoEMLP]]) -> str:
    """A state-dict key of the sharded model as the unsharded model names it."""
    return names[key][0] if key in names else key


def full_state_dict(model: torch.nn.Module, sd: Optional[dict] = None) -> dict:
    """The whole model's state (default: model.state_dict(); or `sd`, a state dict of `model` whose
    expert tensors are the rank's whole shard) with every routed expert gathered from the ranks of its
    group (a collective: call on every rank). Keys and shapes are those of the unsharded model."""
    sd = dict(model.state_dict() if sd is None else sd)
    for key, (canon, m) in expert_names(model).items():
        parts: List[Optional[Tensor]] = [None] * m.world
        dist.all_gather_object(parts, sd.pop(key).detach().cpu(), group=m.group)
        sd[canon] = torch.cat([p for p in parts if p is not None])  # every rank sends its part
    return sd


def local_state_dict(model: torch.nn.Module, full: dict) -> dict:
    """An unsharded state dict cut down to this rank's experts and named as `model` names them, for
    load_state_dict."""
    sd = dict(full)
    for key, (canon, m) in expert_names(model).items():
        sd[key] = sd.pop(canon)[m.expert_start : m.expert_end]
    return sd
