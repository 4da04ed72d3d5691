"""The original GeoMoE checkpoint layout (key names of the published code), both ways.

Our model keeps the original module names everywhere but in the MoE MLP, whose experts are stacked
for the grouped GEMM ([E, in, out]) instead of one nn.Linear ([out, in]) per expert. The map below
names, for every original key, where it lives here: (our key, expert index or None, transposed?)."""

from __future__ import annotations

import os
import re
from typing import Dict, List, NamedTuple, Optional, Tuple, Union

import torch
from torch import Tensor, nn

from geomoe_kernels import MoEMLP

_Target = Tuple[str, Optional[int], bool]


class LoadResult(NamedTuple):
    missing: List[str]  # original keys the model has and the file lacks
    unexpected: List[str]  # keys in the file the model does not have


def _moe_entries(prefix: str, moe: MoEMLP) -> Dict[str, _Target]:
    p = f"{prefix}." if prefix else ""
    out: Dict[str, _Target] = {
        f"{p}gate.weight": (f"{p}gate.weight", None, False),
        f"{p}gate.bias": (f"{p}gate.bias", None, False),
        f"{p}bias": (f"{p}expert_bias", None, False),
    }
    for e in range(moe.num_experts):
        for fc, (w, b) in (("fc1", ("w1", "b1")), ("fc2", ("w2", "b2"))):
            out[f"{p}unique_experts.{e}.{fc}.weight"] = (f"{p}{w}", e, True)
            out[f"{p}unique_experts.{e}.{fc}.bias"] = (f"{p}{b}", e, False)
    for s in range(moe.num_shared_experts):
        name = f"{p}share_experts" if moe.num_shared_experts == 1 else f"{p}share_experts.{s}"
        for fc, (w, b) in (("fc1", ("shared_w1", "shared_b1")), ("fc2", ("shared_w2", "shared_b2"))):
            out[f"{name}.{fc}.weight"] = (f"{p}{w}", s, True)
            out[f"{name}.{fc}.bias"] = (f"{p}{b}", s, False)
    return out


def key_map(model: nn.Module) -> Dict[str, _Target]:
    """original key -> (our state-dict key, expert index or None, transposed)."""
    moes = {name: m for name, m in model.named_modules() if isinstance(m, MoEMLP)}
    out: Dict[str, _Target] = {}
    for name, m in moes.items():
        out.update(_moe_entries(name, m))
    for key in model.state_dict():
        if not any(name == "" or key.startswith(name + ".") for name in moes):
            out[key] = (key, None, False)
    return out


def _value(sd: Dict[str, Tensor], target: _Target) -> Tensor:
    key, index, transposed = target
    t = sd[key] if index is None else sd[key][index]
    return t.t() if transposed else t


def original_state_dict(model: nn.Module) -> Dict[str, Tensor]:
    """The model's state in the original key layout (fresh contiguous tensors)."""
    sd = model.state_dict()
    return {orig: _value(sd, target).detach().clone().contiguous() for orig, target in key_map(model).items()}


def _read(source: Union[str, os.PathLike, Dict[str, Tensor]]) -> Dict[str, Tensor]:
    if isinstance(source, dict):
        data = source
    else:
        from . import hub

        path = os.fspath(source)
        if hub.is_hub_name(path):  # hf:OWNER/REPO/PATH[@REVISION]: fetched into the Hub cache, verified
            path = hub.resolve(path, "source")
        if path.endswith(".safetensors"):
            from safetensors.torch import load_file

            data = load_file(path)
        else:
            # weights_only: loading a file never runs code from it
            data = torch.load(path, map_location="cpu", weights_only=True)
    for wrapper in ("model", "state_dict"):
        if isinstance(data, dict) and wrapper in data and isinstance(data[wrapper], dict):
            data = data[wrapper]
            break
    if not isinstance(data, dict) or not all(isinstance(v, Tensor) for v in data.values()):
        raise ValueError("load_original_state_dict: expected a dict of tensors (bare, or under 'model' or 'state_dict')")
    # checkpoints saved from DistributedDataParallel carry a 'module.' prefix
    return {re.sub(r"^module\.", "", k): v for k, v in data.items()}


def load_original_state_dict(
    model: nn.Module, source: Union[str, os.PathLike, Dict[str, Tensor]], strict: bool = False
) -> LoadResult:
    """Load a checkpoint in the original layout: full, or encoder-only (the released weights have no
    decoder, stage*_output_decode or norm). `source`: a dict of tensors, a file, or a Hub name
    `hf:OWNER/REPO/PATH[@REVISION]` (hub.py). Returns the missing and unexpected keys; strict=True makes
    either an error. A shape that does not match is always an error naming the key."""
    data = _read(source)
    # tables the model recomputes from its configuration (the MoE-ViT's position table) are not read
    recomputed = set(getattr(model, "ORIGINAL_KEYS_RECOMPUTED", ()))
    data = {k: v for k, v in data.items() if k not in recomputed}
    mapping = key_map(model)
    unexpected = sorted(k for k in data if k not in mapping)
    missing = sorted(k for k in mapping if k not in data)
    if strict and (missing or unexpected):
        raise ValueError(f"load_original_state_dict: missing keys {missing}; unexpected keys {unexpected}")
    sd = model.state_dict()
    with torch.no_grad():
        for orig, tensor in data.items():
            if orig not in mapping:
                continue
            dest = _value(sd, mapping[orig])
            if tuple(dest.shape) != tuple(tensor.shape):
                raise ValueError(
                    f"load_original_state_dict: key '{orig}' expected shape {list(dest.shape)}, got {list(tensor.shape)}"
                )
            dest.copy_(tensor)  # dest views the model's own storage
    return LoadResult(missing, unexpected)
