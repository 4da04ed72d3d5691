"""Expert parallelism for MoEMLP: the routed experts sharded over the ranks of a process group, the
routed rows exchanged with all_to_all_single (uneven splits), everything else replicated.

Per rank: gate and route the local tokens over all E experts (expert-major rows), send each rank
the rows of the experts it owns, regroup what arrives by local expert, run the grouped GEMMs, send
the results back, and combine as usual. Both exchanges are differentiable. The split sizes must be
known on the host (all_to_all_single takes lists), so each forward has one host sync: the price of
expert parallelism, not of the single-device path.

Rank r owns experts [r*E//W, (r+1)*E//W), so 23 experts on 2 ranks is 11 + 12. The per-expert
gradients a rank computes sum over the tokens of every rank; a hook divides them by W so they match
the data-parallel average of the replicated parameters (and a single process on the whole batch).

Every MoEMLP option runs here as on one device: experts without biases, softmax or sigmoid top-k with
or without renormalisation, group-limited top-k and the routed scaling factor (the gating is local
to each rank's tokens), the shared experts with their sigmoid gate (replicated), SwiGLU side by side
or interleaved. A MoEMLP built by from_transformers is refused: it shares the block's whole expert
tensors, which a shard cannot."""

from __future__ import annotations

from typing import List, Optional, Tuple

import torch
import torch.distributed as dist
from torch import Tensor

from ..ops import permute, route, unpermute
from .moe import MoEMLP

EXPERT_PARAMS = ("w1", "b1", "w2", "b2")


def expert_range(num_experts: int, rank: int, world: int) -> Tuple[int, int]:
    return rank * num_experts // world, (rank + 1) * num_experts // world


# all_gather_single replaces all_gather_into_tensor in newer torch; older ones have only the latter
_all_gather_flat = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


def _all_to_all(rows: Tensor, out_splits: List[int], in_splits: List[int], group) -> Tensor:
    """Differentiable all_to_all_single with uneven splits."""
    from torch.distributed._functional_collectives import all_to_all_single_autograd, wait_tensor

    group = group if group is not None else dist.group.WORLD
    return wait_tensor(all_to_all_single_autograd(rows, out_splits, in_splits, group))


class ExpertParallelMoEMLP(MoEMLP):
    """An MoEMLP holding only this rank's routed experts. Build it with `from_dense`, on every rank
    from identically initialised (or loaded) MoEMLPs."""

    group: Optional[dist.ProcessGroup]
    world: int
    expert_start: int
    expert_end: int

    @classmethod
    def from_dense(cls, moe: MoEMLP, group: Optional[dist.ProcessGroup] = None) -> "ExpertParallelMoEMLP":
        if moe.weights_out_in or moe.block_router or moe.shared_expert is not None or moe.expert_gate_fn is not None:
            raise ValueError(
                "ExpertParallelMoEMLP.from_dense: argument 'moe' expected a MoEMLP of its own, got one built by "
                "MoEMLP.from_transformers (it shares the transformers block's whole expert tensors; shard the block's "
                "model with transformers' own expert parallelism, or build a MoEMLP with the same options and load its weights)"
            )
        world = dist.get_world_size(group)
        rank = dist.get_rank(group)
        ep = cls.__new__(cls)
        ep.__dict__.update(moe.__dict__)  # same modules, parameters and settings
        ep._parameters = dict(moe._parameters)
        ep._buffers = dict(moe._buffers)
        ep._modules = dict(moe._modules)
        ep.group, ep.world = group, world
        ep.expert_start, ep.expert_end = expert_range(moe.num_experts, rank, world)
        for name in EXPERT_PARAMS:
            full = getattr(moe, name)
            if full is None:  # bias=False
                continue
            local = torch.nn.Parameter(full.detach()[ep.expert_start : ep.expert_end].clone())
            local.register_hook(lambda g, w=world: g / w)
            ep._parameters[name] = local
        return ep

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
        out = self._experts(expert_rows, dtype, local_offsets, None, None)
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
    """Replace every MoEMLP in `model` by its expert-parallel shard; returns the names of the sharded
    (rank-local) parameters, for DistributedDataParallel to leave alone."""
    local: List[str] = []
    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            if isinstance(child, MoEMLP) and not isinstance(child, ExpertParallelMoEMLP):
                setattr(module, child_name, ExpertParallelMoEMLP.from_dense(child, group))
                prefix = f"{name}.{child_name}" if name else child_name
                local += [f"{prefix}.{p}" for p in EXPERT_PARAMS if getattr(child, p) is not None]
    return local


def _sharded(model: torch.nn.Module):
    return [(name, m) for name, m in model.named_modules() if isinstance(m, ExpertParallelMoEMLP)]


def full_state_dict(model: torch.nn.Module) -> dict:
    """The whole model's state with every routed expert gathered from its rank (a collective: call
    on every rank). Keys and shapes are those of the unsharded model."""
    sd = dict(model.state_dict())
    for name, m in _sharded(model):
        for p in EXPERT_PARAMS:
            key = f"{name}.{p}" if name else p
            if key not in sd:  # bias=False
                continue
            parts: List[Optional[Tensor]] = [None] * m.world
            dist.all_gather_object(parts, sd[key].detach().cpu(), group=m.group)
            sd[key] = torch.cat([p for p in parts if p is not None])  # every rank sends its part
    return sd


def local_state_dict(model: torch.nn.Module, full: dict) -> dict:
    """An unsharded state dict cut down to this rank's experts, for load_state_dict."""
    sd = dict(full)
    for name, m in _sharded(model):
        for p in EXPERT_PARAMS:
            key = f"{name}.{p}" if name else p
            if key in sd:  # absent with bias=False
                sd[key] = sd[key][m.expert_start : m.expert_end]
    return sd
