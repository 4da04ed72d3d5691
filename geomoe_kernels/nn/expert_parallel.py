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
from_transformers is refused: it shares the block's whole expert tensors, which a shard cannot."""

from __future__ import annotations

from typing import Dict, List, Optional, Tuple

import torch
import torch.distributed as dist
from torch import Tensor, nn

from ..ops import permute, route, unpermute
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

    def forward(self, rows: Tensor, offsets: Tensor, layer: MoEMLP, grad_scale: float) -> Tensor:
        """`layer`'s expert path (its activation, SwiGLU layout, gate) on expert-major `rows` with this
        rank's weights; the weights' gradients times `grad_scale`."""
        scale = lambda p: _ScaleGrad.apply(p, grad_scale)
        maybe = lambda p: None if p is None else scale(p)
        weights = (scale(self.w1), maybe(self.b1), scale(self.w2), maybe(self.b2))
        return layer._experts(rows, rows.dtype, offsets, None, None, weights=weights)


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

    def forward(self, x: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
        tokens, dtype = self._tokens(x)
        T, E, k, be, W = tokens.shape[0], self.num_experts, self.top_k, self.backend, self.world
        weights, ids, load, prob_mean = self._gate(tokens, x.dtype)
        row_to_flat, flat_to_row, offsets = route(ids, E, be)
        rows = permute(tokens, row_to_flat, flat_to_row, k, be)

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
        out = self.experts(expert_rows, local_offsets, self, 1.0 / W)
        back_order = torch.empty_like(to_expert_major)
        back_order[to_expert_major] = torch.arange(to_expert_major.numel(), device=out.device)
        returned = _all_to_all(out.index_select(0, back_order), send_l, recv_l, self.group)

        y = unpermute(returned, row_to_flat, flat_to_row, k, weights, self._shared(tokens, dtype), be)
        return y.reshape(x.shape[:-1] + (self.dim,)), self._aux(load, prob_mean, T), load


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
