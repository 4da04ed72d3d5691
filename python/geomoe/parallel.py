"""Expert x data parallelism on one DeviceMesh (public torch.distributed APIs only).

The mesh is 2-D, `("dp", "ep")` of shape (world / ep, ep), built with `init_device_mesh`: ranks
r = d * ep + e, so an expert-parallel group (one `dp` index: ranks d*ep .. d*ep + ep - 1) is made of
neighbouring ranks (one node's GPUs, where the all-to-all is cheapest).

- The routed experts of every MoE layer are sharded over `ep` (`shard_experts` on the mesh's `ep`
  process group): the all-to-all runs there.
- With FSDP2 (`fully_shard`), the experts of each layer (their own module) are sharded over `dp`,
  the data-parallel ranks that hold the same experts; everything else (replicated over all ranks in
  the model) is sharded over `ep` and replicated over `dp` (FSDP2's hybrid mode on the 2-D mesh),
  so every parameter is sharded and every gradient averaged over all the ranks that hold it.
- Without FSDP2, the gradients are averaged after the backward with all-reduces on the mesh's
  groups (`GradientSync`): the experts' over `dp`, everything else's over the world. (DDP cannot
  leave the experts out without a private method.)

The experts' gradients come out of the layer already divided by the `ep` size (see
geomoe_kernels.nn.expert_parallel), so averaging over `dp` gives the average over all ranks.
Gradient clipping over parameters that live on different meshes: `clip_grad_norm` (one all-reduce).

Checkpoints (`dcp_state`, `restore_from_dcp`): each rank's expert shard goes to
torch.distributed.checkpoint as a DTensor over `ep` with the global shape [E, ...] under the
unsharded model's name, so a DCP checkpoint of an expert-parallel run reads into any layout (one
process, DDP, FSDP, another --ep) and the other way round. The ranks' blocks of experts are
torch.chunk's (ceil(E / ep) each, the last shorter), as DTensor's Shard(0) lays them out."""

from __future__ import annotations

import math
from typing import Any, Dict, List, Optional, Tuple

import torch
import torch.distributed as dist
from torch import nn

from geomoe_kernels.nn.expert_parallel import canonical_name, expert_names, shard_experts

MESH_DIMS = ("dp", "ep")


def check_ep(ep: int, world: int, num_experts: int, flag: str = "--ep") -> None:
    """--ep N: a positive integer dividing the world size that gives every rank of an expert-parallel
    group at least one expert (blocks of ceil(E / N))."""
    if isinstance(ep, bool) or not isinstance(ep, int) or ep < 1:
        raise ValueError(f"argument '{flag}' expected an integer >= 1, got {ep!r}")
    if world % ep:
        raise ValueError(
            f"argument '{flag}' expected a divisor of the number of processes ({world}), got {ep}: "
            f"the mesh is (data parallel {world} / {ep}) x (expert parallel {ep})"
        )
    block = -(-num_experts // ep)
    if block * (ep - 1) >= num_experts:
        raise ValueError(
            f"argument '{flag}' expected a size that leaves every expert-parallel rank at least one of the model's "
            f"{num_experts} routed experts (blocks of ceil({num_experts}/N)), got {ep}: the last rank would have none"
        )


def build_mesh(device_type: str, world: int, ep: int):
    """The (dp, ep) DeviceMesh over all ranks."""
    from torch.distributed.device_mesh import init_device_mesh

    return init_device_mesh(device_type, (world // ep, ep), mesh_dim_names=MESH_DIMS)


def shard_model_experts(model: nn.Module, mesh) -> List[str]:
    """The routed experts of every MoE layer sharded over the mesh's `ep` dimension."""
    return shard_experts(model, mesh.get_group("ep"))


def apply_fsdp(model: nn.Module, blocks: List[nn.Module], mesh) -> nn.Module:
    """FSDP2 on the mesh: each expert-parallel layer's experts over `dp`; each block in `blocks`,
    then the root, over (`dp` replicated, `ep` sharded). Returns the model (now an FSDPModule)."""
    from torch.distributed.fsdp import fully_shard

    names = expert_names(model)
    layers = {id(m): m for _, m in names.values()}
    for m in layers.values():
        fully_shard(m.experts, mesh=mesh["dp"])
    for blk in blocks:
        fully_shard(blk, mesh=mesh)
    return fully_shard(model, mesh=mesh)


def _expert_param_ids(model: nn.Module) -> set:
    return {id(getattr(m.experts, key.rsplit(".", 1)[1])) for key, (_, m) in expert_names(model).items()}


# elements per all-reduce: a flat copy of every gradient at once would double the gradients' memory
# (1.2 GB for the base model in float32); 32M elements (128 MB in float32) keeps the copy bounded and
# each all-reduce large enough to run at the network's bandwidth
BUCKET_ELEMENTS = 32 * 2**20


def _buckets(params: List[nn.Parameter], limit: int) -> List[List[nn.Parameter]]:
    """Consecutive runs of `params` of at most `limit` elements each (a larger one alone)."""
    out: List[List[nn.Parameter]] = []
    size = 0
    for p in params:
        if not out or size + p.numel() > limit:
            out.append([])
            size = 0
        out[-1].append(p)
        size += p.numel()
    return out


class GradientSync:
    """Without FSDP: after the backward, every gradient averaged over the ranks that hold its
    parameter (experts: the mesh's `dp` group; the rest: the world), one flat all-reduce per group
    and dtype. A parameter without a gradient on a rank counts as zero there (every rank sends the
    same sizes)."""

    def __init__(self, model: nn.Module, mesh):
        experts = _expert_param_ids(model)
        params = [p for p in model.parameters() if p.requires_grad]
        groups: List[Tuple[Optional[dist.ProcessGroup], int, List[nn.Parameter]]] = []
        dp = mesh["dp"].size()
        if dp > 1:
            groups.append((mesh.get_group("dp"), dp, [p for p in params if id(p) in experts]))
        groups.append((None, dist.get_world_size(), [p for p in params if id(p) not in experts]))
        # the buckets, once: (group, its size, parameters of one dtype, consecutive, within the limit)
        self.buckets: List[Tuple[Optional[dist.ProcessGroup], int, List[nn.Parameter]]] = []
        for group, size, members in groups:
            by_dtype: Dict[torch.dtype, List[nn.Parameter]] = {}
            for p in members:
                by_dtype.setdefault(p.dtype, []).append(p)
            self.buckets += [(group, size, b) for same in by_dtype.values() for b in _buckets(same, BUCKET_ELEMENTS)]

    def __call__(self) -> None:
        for group, size, bucket in self.buckets:
            for p in bucket:
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
            flat = torch.cat([p.grad.reshape(-1) for p in bucket])
            dist.all_reduce(flat, group=group)
            flat /= size
            pos = 0
            for p in bucket:
                n = p.grad.numel()
                p.grad.copy_(flat[pos : pos + n].view_as(p.grad))
                pos += n


def _local(t: torch.Tensor) -> torch.Tensor:
    from torch.distributed.tensor import DTensor

    return t.to_local() if isinstance(t, DTensor) else t


def clip_grad_norm(model: nn.Module, mesh, fsdp: bool, max_norm: float) -> torch.Tensor:
    """torch.nn.utils.clip_grad_norm_ for a model whose parameters live on different meshes: the
    norm of the whole (unsharded) gradient, from each rank's local part weighted by 1 / (the number
    of ranks holding that part), summed in one all-reduce; every gradient then scaled alike."""
    world, dp = dist.get_world_size(), mesh["dp"].size()
    experts = _expert_param_ids(model)
    grads: List[Tuple[torch.Tensor, float]] = []
    for p in model.parameters():
        if p.grad is None:
            continue
        if id(p) in experts:
            copies = 1 if fsdp else dp  # FSDP: one copy of each element; else replicated over dp
        else:
            copies = dp if fsdp else world  # FSDP: replicated over dp, sharded over ep
        grads.append((_local(p.grad), 1.0 / copies))
    dev = grads[0][0].device if grads else torch.device("cpu")
    total = torch.zeros((), dtype=torch.float64, device=dev)
    for g, w in grads:
        total += g.detach().double().pow(2).sum() * w
    dist.all_reduce(total)
    norm = total.sqrt()
    coef = torch.clamp(max_norm / (norm + 1e-6), max=1.0)
    for g, _ in grads:
        g.detach().mul_(coef.to(g.dtype))
    return norm.to(grads[0][0].dtype if grads else torch.float32)


# ---- checkpoints -----------------------------------------------------------------------------------


def _rename(sd: Dict[str, Any], rename) -> Dict[str, Any]:
    return {rename(k): v for k, v in sd.items()}


def _rename_optim(osd: Dict[str, Any], rename) -> Dict[str, Any]:
    out = dict(osd)
    out["state"] = {rename(k): v for k, v in osd.get("state", {}).items()}
    out["param_groups"] = [dict(g, params=[rename(p) for p in g["params"]]) for g in osd.get("param_groups", [])]
    return out


def _to_global(t: torch.Tensor, layer, mesh) -> torch.Tensor:
    """A rank's expert tensor (plain, or an FSDP2 DTensor over `dp`) as a DTensor over `ep` with the
    global shape [E, ...]."""
    from torch.distributed.tensor import DTensor, Shard

    whole = t.full_tensor() if isinstance(t, DTensor) else t
    shape = torch.Size((layer.num_experts,) + tuple(whole.shape[1:]))
    stride = tuple(math.prod(shape[i + 1 :]) for i in range(len(shape)))
    return DTensor.from_local(whole.contiguous(), mesh["ep"], [Shard(0)], run_check=False, shape=shape, stride=stride)


def _from_global(g: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """The inverse of `_to_global`, in the form of `like` (plain, or a DTensor over `dp`)."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    whole = g.to_local()
    if isinstance(like, DTensor):
        return distribute_tensor(whole, like.device_mesh, like.placements, src_data_rank=None)
    return whole


def dcp_state(model: nn.Module, optimizer, mesh) -> Dict[str, Any]:
    """This rank's model and optimizer state for torch.distributed.checkpoint, named and shaped as
    the unsharded model's (the experts as DTensors over `ep`; the rest as get_state_dict gives it)."""
    from torch.distributed.checkpoint.state_dict import get_state_dict

    names = expert_names(model)
    model_sd, optim_sd = get_state_dict(model, optimizer)
    # new dicts all the way down: get_state_dict's per-parameter dicts may be the optimizer's own
    optim_sd = dict(optim_sd, state={k: dict(v) for k, v in optim_sd.get("state", {}).items()})
    for key, (_, layer) in names.items():
        model_sd[key] = _to_global(model_sd[key], layer, mesh)
        for name, value in list(optim_sd.get("state", {}).get(key, {}).items()):
            if isinstance(value, torch.Tensor) and value.dim() > 0:
                optim_sd["state"][key][name] = _to_global(value, layer, mesh)
    rename = lambda k: canonical_name(k, names)
    return {"model": _rename(model_sd, rename), "optim": _rename_optim(optim_sd, rename)}


def restore_from_dcp(model: nn.Module, optimizer, mesh, read) -> None:
    """Fill `model` and `optimizer` from a DCP checkpoint: `read(state)` loads it into the state
    `dcp_state` describes (in place); the experts then go back to this rank's layout."""
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    names = expert_names(model)
    canon = {c: k for k, (c, _) in names.items()}
    like_model, like_optim = get_state_dict(model, optimizer)
    state = dcp_state(model, optimizer, mesh)
    read(state)
    back = lambda k: canon.get(k, k)
    model_sd, optim_sd = _rename(state["model"], back), _rename_optim(state["optim"], back)
    for key in names:
        model_sd[key] = _from_global(model_sd[key], like_model[key])
        for name, value in list(optim_sd.get("state", {}).get(key, {}).items()):
            if isinstance(value, torch.Tensor) and value.dim() > 0:
                optim_sd["state"][key][name] = _from_global(value, like_optim["state"][key][name])
    set_state_dict(model, optimizer, model_state_dict=model_sd, optim_state_dict=optim_sd)
