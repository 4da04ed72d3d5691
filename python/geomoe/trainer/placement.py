"""Where a model's parameters live: one process, DDP, FSDP2, or expert parallel (the routed experts
sharded over groups of `ep` ranks of a (dp, ep) DeviceMesh, with FSDP2 or gradient all-reduces over
the mesh's groups; geomoe.parallel). The whole model's weights, this rank's DCP state and the
gradient norm clipping, whatever the placement."""

from __future__ import annotations

from typing import Any, Dict, List, Optional

import torch
from torch import nn

from geomoe_kernels.nn.expert_parallel import canonical_name, expert_names, full_state_dict, local_state_dict

from .. import parallel
from ..distributed import DistEnv


class Placement:
    """`shard(model)` before the model moves to the device (expert parallelism), `wrap(model,
    blocks)` after (DDP, or FSDP2 per block of `blocks`); then `wrapped` is what runs."""

    def __init__(self, env: DistEnv, ep: int = 1, fsdp: bool = False):
        self.env, self.ep, self.fsdp = env, ep, fsdp
        self.mesh = None
        self.grad_sync: Optional[parallel.GradientSync] = None
        self.model: Optional[nn.Module] = None
        self.wrapped: Optional[nn.Module] = None
        self.dense_order: List[str] = []

    def shard(self, model: nn.Module, ep_flag: str = "--ep") -> None:
        """Expert parallel (ep > 1): the mesh, and each rank's block of every layer's experts."""
        self.model = model
        # the parameters' order before sharding: format-1 expert-parallel optimizer files follow it
        self.dense_order = [name for name, _ in model.named_parameters()]
        if self.ep > 1:
            parallel.check_ep(self.ep, self.env.world, model.moe_layers()[0].num_experts, ep_flag)
            self.mesh = parallel.build_mesh(self.env.device.type, self.env.world, self.ep)
            parallel.shard_model_experts(model, self.mesh)

    def rank_file(self) -> Optional[str]:
        """Expert parallelism keeps each rank's optimizer state in a file of its own (format 1); it
        is also how FSDP runs saved it before the DCP state (read only)."""
        return f"optimizer_rank{self.env.rank}.pt" if (self.ep > 1 or self.fsdp) else None

    def wrap(self, model: nn.Module, blocks: List[nn.Module]) -> nn.Module:
        """The module the step runs: the model (one process, or expert parallel with gradient
        all-reduces), DDP, or FSDP2 sharding each of `blocks`, then the model."""
        env = self.env
        self.model, self.wrapped = model, model
        if not env.enabled:
            return model
        if self.fsdp:
            from torch.distributed.fsdp import fully_shard

            if self.mesh is not None:  # experts over dp, the rest over the (dp, ep) mesh
                self.wrapped = parallel.apply_fsdp(model, blocks, self.mesh)
                return self.wrapped
            for blk in blocks:
                fully_shard(blk)
            self.wrapped = fully_shard(model)
            return self.wrapped
        if self.mesh is not None:  # the experts are not replicas: gradients averaged on the mesh's groups
            self.grad_sync = parallel.GradientSync(model, self.mesh)
            return model
        from torch.nn.parallel import DistributedDataParallel as DDP

        self.wrapped = DDP(model, device_ids=[env.device.index] if env.device.type == "cuda" else None)
        return self.wrapped

    def full_state(self) -> Dict[str, torch.Tensor]:
        """The whole model's weights (a collective under FSDP and expert parallelism)."""
        if self.fsdp and self.env.enabled:
            from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

            if self.mesh is not None:  # every rank its group's experts whole, then gathered over ep
                sd = get_model_state_dict(self.wrapped, options=StateDictOptions(full_state_dict=True))
                return full_state_dict(self.model, {k: v.cpu() for k, v in sd.items()})
            return get_model_state_dict(self.wrapped, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if self.mesh is not None:
            return full_state_dict(self.model)
        return self.model.state_dict()

    def load_weights(self, full: Dict[str, torch.Tensor]) -> None:
        """The whole model's weights into this rank's (possibly expert-sharded) model."""
        self.model.load_state_dict(local_state_dict(self.model, full) if self.mesh is not None else full)

    def dcp_state(self, optimizer: torch.optim.Optimizer) -> Dict[str, Any]:
        """This rank's view of the model and optimizer state (plain tensors, or FSDP2's DTensor shards)."""
        from torch.distributed.checkpoint.state_dict import get_state_dict

        if self.mesh is not None:  # the experts under the unsharded names, as DTensors over ep
            return parallel.dcp_state(self.wrapped, optimizer, self.mesh)
        model_sd, optim_sd = get_state_dict(self.wrapped, optimizer)
        return {"model": model_sd, "optim": optim_sd}

    def clip_grad_norm(self, max_norm: float) -> torch.Tensor:
        """Clip the gradients to `max_norm` in total; returns the norm before clipping."""
        if self.mesh is not None:  # parameters on several meshes (or not replicated): one norm over all
            return parallel.clip_grad_norm(self.model, self.mesh, self.fsdp, max_norm)
        return torch.nn.utils.clip_grad_norm_(self.wrapped.parameters(), max_norm)

    def reorder_format1(self, optimizer: torch.optim.Optimizer, osd: Dict[str, Any], path: str) -> Dict[str, Any]:
        """A format-1 expert-parallel optimizer file numbers the parameters in the unsharded model's
        order (dense_order); the optimizer now holds each layer's experts after the rest of it.
        load_state_dict pairs the file's group lists with the optimizer's groups by position, so
        each group lists, in the optimizer's own order, the file's number for that parameter."""
        names = expert_names(self.model)
        in_file = {n: i for i, n in enumerate(self.dense_order)}
        canonical = {id(p): canonical_name(n, names) for n, p in self.model.named_parameters()}
        groups = optimizer.param_groups
        if [len(g["params"]) for g in groups] != [len(g["params"]) for g in osd["param_groups"]]:
            raise ValueError(
                f"checkpoint {path}: its per-rank optimizer state has groups of "
                f"{[len(g['params']) for g in osd['param_groups']]} parameters, this model's optimizer "
                f"{[len(g['params']) for g in groups]}; start a new run from its weights with --init-weights"
            )
        out_groups = [
            dict(saved, params=[in_file[canonical[id(p)]] for p in g["params"]]) for g, saved in zip(groups, osd["param_groups"])
        ]
        return dict(osd, param_groups=out_groups)
