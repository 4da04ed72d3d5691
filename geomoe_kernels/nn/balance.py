"""Load balancing for MoEMLP layers used outside GeoMoE's training loop, so it cannot be forgotten:

    balancer = MoEBalancer(model, optimizer, rate=1e-3)   # hooks every MoEMLP in model
    loss = task_loss + aux_weight * balancer.aux_loss()   # the aux losses of the forwards since the last call
    loss.backward(); optimizer.step()                     # the step's post-hook applies update_bias

The forward hooks record each layer's aux loss and expert load while it is training; after each
optimizer step the loads accumulated since the previous step (gradient accumulation included) are
summed over the data-parallel ranks (one all_reduce for all layers, when torch.distributed is
initialised) and each layer's `update_bias(load, rate)` runs. `MoETensorMLP` wraps an MoEMLP for MLP
slots that expect a tensor back (timm-style blocks): it keeps the last aux and load on itself, and
the balancer still sees the layer inside."""

from __future__ import annotations

from typing import Any, Dict, List, Optional

import torch
from torch import Tensor, nn

from .moe import MoEMLP, check_load


class MoETensorMLP(nn.Module):
    """y = moe(x)[0]; the layer's aux loss and load of the last call kept as `.aux` and `.load`."""

    def __init__(self, moe: MoEMLP):
        super().__init__()
        if not isinstance(moe, MoEMLP):
            raise TypeError(f"MoETensorMLP: argument 'moe' expected an MoEMLP, got {type(moe).__name__}")
        self.moe = moe
        self.aux: Optional[Tensor] = None
        self.load: Optional[Tensor] = None

    def forward(self, x: Tensor) -> Tensor:
        y, self.aux, self.load = self.moe(x)
        return y


class MoEBalancer:
    """Collects the aux losses and loads of every MoEMLP in `model`; with an optimizer, applies the
    bias update after each of its steps (else call `step()` yourself after the optimizer's)."""

    def __init__(
        self,
        model: nn.Module,
        optimizer: Optional[torch.optim.Optimizer] = None,
        rate: float = 1e-3,
        process_group: Any = None,
    ):
        self.layers: Dict[str, MoEMLP] = {n: m for n, m in model.named_modules() if isinstance(m, MoEMLP)}
        if not self.layers:
            raise ValueError(
                f"MoEBalancer: argument 'model' expected a module containing MoEMLP layers, got {type(model).__name__} with none"
            )
        if not rate >= 0:
            raise ValueError(f"MoEBalancer: argument 'rate' expected >= 0, got {rate}")
        self.rate, self.process_group = rate, process_group
        self._aux: List[Tensor] = []
        self._load: Dict[str, Tensor] = {}
        self.last_loads: Dict[str, Tensor] = {}  # the (rank-summed) loads the last step() applied
        self._handles = [m.register_forward_hook(self._record(n)) for n, m in self.layers.items()]
        if optimizer is not None:
            self._handles.append(optimizer.register_step_post_hook(lambda *_: self.step()))

    def _record(self, name: str):
        def hook(module: MoEMLP, _inputs, output) -> None:
            if not module.training:
                return
            _, aux, load = output
            self._aux.append(aux)
            load = load.detach()
            self._load[name] = self._load[name] + load if name in self._load else load.clone()

        return hook

    def aux_loss(self) -> Tensor:
        """The sum of the aux losses recorded since the last call (with their graph), then forgotten."""
        if not self._aux:
            p = next(iter(self.layers.values())).gate.weight
            return p.new_zeros(())
        total = torch.stack([a.float() for a in self._aux]).sum()
        self._aux = []
        return total

    def loads(self) -> Dict[str, Tensor]:
        """Each layer's load accumulated since the last step (this rank's)."""
        return dict(self._load)

    @torch.no_grad()
    def step(self) -> None:
        """Sum the accumulated loads over the data-parallel ranks and apply each layer's bias update."""
        if not self._load:
            return
        names = list(self._load)
        # counts (integers, exact in float64): check_load reads no values of those (no host sync)
        counts = not any(self._load[n].is_floating_point() for n in names)
        flat = torch.cat([self._load[n].to(torch.float64) for n in names])  # one collective for every layer
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(flat, group=self.process_group)
        loads = dict(zip(names, flat.split([self._load[n].numel() for n in names])))
        for n, load in loads.items():  # every layer's load checked before any bias moves
            load = load.to(torch.int64) if counts else load
            check_load("MoEBalancer.step", load, self.layers[n].num_experts, self.rate, f"loads()[{n!r}]")
        for n, load in loads.items():
            self.layers[n]._apply_bias_update(load, self.rate)
            self.last_loads[n] = load
        self._load = {}
        self._aux = []

    def remove(self) -> None:
        """Detach the hooks."""
        for h in self._handles:
            h.remove()
        self._handles = []
