"""Layer-wise learning-rate decay as published for both models: parameter p of layer id i gets the
lr scale decay^(L - 1 - i), and weight decay except on parameters with one dimension (biases and
norms). The routed and shared experts' biases count as one-dimensional: the original layout keeps one
bias vector per expert, which this project stacks into [E, hidden] (MoEMLP's b1, b2, shared_b1,
shared_b2); they get no weight decay, as in the published code.

GeoMoE (L = 20): patch_embed1 and pos_embed -> 0; blocks1.i -> 1 + i; patch_embed2 -> 3; blocks2.i
-> 4 + i; patch_embed3 -> 6; patch_embed4 -> 7; blocks3.i -> 8 + i; everything else (fc_norm, head,
a detection or segmentation neck) -> 19.
MoE-ViT (L = 13): patch_embed, pos_embed, cls_token -> 0; blocks.i -> 1 + i; everything else -> 12.

Names may carry a wrapper's prefix (`backbone.`, `module.`): only the part from the first known
module name on counts. Detection and segmentation users call `param_groups(model, lr,
backbone=model.backbone)` (or the backbone's own `param_groups` method): the ids then come from the
names inside the backbone alone, so a neck or head module that happens to be called `blocks` is not
mistaken for an encoder block; everything outside the backbone takes the last id."""

from __future__ import annotations

import re
from typing import Any, Dict, List, Optional, Tuple

from torch import nn

from geomoe_kernels import MoEMLP

from .moevit_encoder import MoEViTEncoder

_GEOMOE_RULES = (
    (r"(?:^|\.)(?:patch_embed1|pos_embed)(?:\.|$)", lambda m: 0),
    (r"(?:^|\.)blocks1\.(\d+)\.", lambda m: 1 + int(m.group(1))),
    (r"(?:^|\.)patch_embed2\.", lambda m: 3),
    (r"(?:^|\.)blocks2\.(\d+)\.", lambda m: 4 + int(m.group(1))),
    (r"(?:^|\.)patch_embed3\.", lambda m: 6),
    (r"(?:^|\.)patch_embed4\.", lambda m: 7),
    (r"(?:^|\.)blocks3\.(\d+)\.", lambda m: 8 + int(m.group(1))),
)
_MOEVIT_RULES = (
    (r"(?:^|\.)(?:patch_embed|pos_embed|cls_token)(?:\.|$)", lambda m: 0),
    (r"(?:^|\.)blocks\.(\d+)\.", lambda m: 1 + int(m.group(1))),
)


def _is_moevit(model: nn.Module) -> bool:
    return any(isinstance(m, MoEViTEncoder) for m in model.modules())


def num_layers(model: nn.Module) -> int:
    """L: 13 for the MoE-ViT (12 blocks), 20 for GeoMoE's published depths (2 + 2 + 11 blocks)."""
    if _is_moevit(model):
        enc = next(m for m in model.modules() if isinstance(m, MoEViTEncoder))
        return len(enc.blocks) + 1
    blocks3 = next((m for n, m in model.named_modules() if n.endswith("blocks3") or n == "blocks3"), None)
    return 8 + (len(blocks3) if blocks3 is not None else 11) + 1


def layer_id(name: str, model: nn.Module) -> int:
    """The published layer id of a parameter name."""
    rules = _MOEVIT_RULES if _is_moevit(model) else _GEOMOE_RULES
    for pattern, rule in rules:
        m = re.search(pattern, name)
        if m:
            return rule(m)
    return num_layers(model) - 1


_STACKED_BIASES = ("b1", "b2", "shared_b1", "shared_b2")


def _one_dimensional_in_original(model: nn.Module) -> set:
    """ids of the stacked expert biases: 2-d here, one 1-d tensor per expert in the original layout."""
    return {
        id(getattr(m, n))
        for m in model.modules()
        if isinstance(m, MoEMLP)
        for n in _STACKED_BIASES
        if getattr(m, n, None) is not None
    }


def param_groups(
    model: nn.Module,
    base_lr: float,
    weight_decay: float = 0.05,
    layer_decay: float = 0.85,
    backbone: Optional[nn.Module] = None,
) -> List[Dict[str, Any]]:
    """AdamW groups: one per (layer id, decayed or not), each with its `lr` (base_lr times the
    layer's scale, also kept as `lr_scale` for schedulers) and `weight_decay`.

    backbone: the GeoMoE or MoE-ViT module inside `model` (a detector's or segmenter's backbone).
    Its parameters take the published ids from their names inside it; every other parameter of
    `model` takes the last id, L - 1. None: ids from the names in `model` itself (a classifier)."""
    inside: Dict[int, str] = {}
    if backbone is not None:
        if not any(m is backbone for m in model.modules()):
            raise ValueError(
                f"argument 'backbone' expected a module inside 'model', got a {type(backbone).__name__} that "
                f"{type(model).__name__} does not hold"
            )
        inside = {id(p): n for n, p in backbone.named_parameters()}
    ruler = backbone if backbone is not None else model
    L = num_layers(ruler)
    biases = _one_dimensional_in_original(model)
    groups: Dict[Tuple[int, bool], Dict[str, Any]] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if backbone is None:
            lid = layer_id(name, model)
        else:
            lid = layer_id(inside[id(p)], backbone) if id(p) in inside else L - 1
        decay = p.ndim > 1 and id(p) not in biases
        scale = layer_decay ** (L - 1 - lid)
        g = groups.setdefault(
            (lid, decay),
            {
                "params": [],
                "names": [],
                "layer_id": lid,
                "lr_scale": scale,
                "lr": base_lr * scale,
                "weight_decay": weight_decay if decay else 0.0,
            },
        )
        g["params"].append(p)
        g["names"].append(name)
    return [groups[k] for k in sorted(groups)]
