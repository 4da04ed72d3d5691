"""The peer libraries as MoE layers at our shape, for the side-by-side benchmark. Each shares an
MoEMLP's router and shared expert (benchmarks.common.TorchRoutedLayer) and runs the routed experts
its own way; a peer that is not installed, or cannot run a case, says why (the benchmark records
the reason and skips). ScatterMoE is not on the package registries: put its `scattermoe` package in
the ignored folder peers/ (benchmarks/prepare_peers.sh) and it is found there."""

from __future__ import annotations

import importlib.metadata
import os
import sys
from types import SimpleNamespace
from typing import Callable, Dict

import torch
import torch.nn.functional as F

from benchmarks.common import TorchRoutedLayer

PEERS_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "peers")


class PeerUnavailable(Exception):
    """The peer cannot run here, or cannot run this case; the message says why."""


def _version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


class HFExpertsLayer(TorchRoutedLayer):
    """transformers' experts functions (`grouped_mm`, `batched_mm`) on a module that declares our
    layout the way transformers' experts decorator would: not gated, biased, weights [E, in, out]."""

    def __init__(self, moe, kind: str):
        super().__init__(moe)
        try:
            from transformers.integrations import moe as hf_moe
        except ImportError as e:
            raise PeerUnavailable(f"transformers is not installed ({e})")
        fn = getattr(hf_moe, f"{kind}_experts_forward", None)
        if fn is None:
            raise PeerUnavailable(f"transformers {_version('transformers')} has no {kind} experts function")
        self.fn, self.version = fn, _version("transformers")

    def experts(self, x, ids, w):
        m = self.moe
        gated = m.activation == "swiglu"  # [gate | up] side by side: transformers' concatenated layout
        w1, b1 = m.w1.to(x.dtype), m.b1.to(x.dtype)
        view = SimpleNamespace(
            num_experts=m.num_experts,
            has_gate=gated,
            has_bias=True,
            is_transposed=True,
            is_concatenated=True,
            has_post_expert_norm=False,
            _is_expert_parallel=False,
            act_fn=F.silu if m.activation in ("swiglu", "silu") else F.gelu,
            _apply_gate=lambda out: F.silu(out.chunk(2, dim=-1)[0]) * out.chunk(2, dim=-1)[1],
            **({"gate_up_proj": w1, "gate_up_proj_bias": b1} if gated else {"up_proj": w1, "up_proj_bias": b1}),
            down_proj=m.w2.to(x.dtype),
            down_proj_bias=m.b2.to(x.dtype),
        )
        return self.fn(view, x, ids, w.to(x.dtype))


def import_hiding(module: str, hidden: str):
    """Import `module` with package `hidden` (and its submodules) unimportable for the duration.
    ScatterMoE's package, on import, replaces the forward of some transformers experts classes
    (GPT-OSS's, for its own use) process-wide, when it can import them; the suite measures its MLP
    only, and transformers must stay as it is for the rows (and tests) that run it after."""
    import importlib

    if module in sys.modules:
        return sys.modules[module]
    names = [n for n in sys.modules if n == hidden or n.startswith(hidden + ".")] or [hidden]
    saved = {n: sys.modules.get(n) for n in names}
    sys.modules.update({n: None for n in names})  # type: ignore[misc]  # None: "import of n halted"
    try:
        return importlib.import_module(module)
    finally:
        for n, m in saved.items():
            if m is None:
                sys.modules.pop(n, None)
            else:
                sys.modules[n] = m


class ScatterMoELayer(TorchRoutedLayer):
    """ScatterMoE's MLP (scatter2scatter Triton kernels), with its own copy of the expert weights
    (its layout is [E, out, in]); the combine weights in the activation dtype, as it takes them."""

    def __init__(self, moe):
        super().__init__(moe)
        if PEERS_DIR not in sys.path and os.path.isdir(os.path.join(PEERS_DIR, "scattermoe")):
            sys.path.insert(0, PEERS_DIR)
        try:
            MLP, GLUMLP = (getattr(import_hiding("scattermoe.mlp", "transformers"), n) for n in ("MLP", "GLUMLP"))
        except ImportError as e:
            raise PeerUnavailable(f"scattermoe not found (run benchmarks/prepare_peers.sh): {e}")
        if moe.activation == "swiglu":  # its gated MLP: silu(gates) * h
            self.mlp = GLUMLP(moe.dim, moe.hidden_dim, moe.num_experts, moe.top_k, bias=True, activation=torch.nn.SiLU())
        else:
            act = torch.nn.SiLU() if moe.activation == "silu" else torch.nn.GELU()
            self.mlp = MLP(moe.dim, moe.hidden_dim, moe.num_experts, moe.top_k, bias=True, activation=act)
        self.mlp.to(moe.w1.device)
        self.version = (
            "git " + open(os.path.join(PEERS_DIR, "scattermoe", "VERSION")).read().strip()
            if os.path.exists(os.path.join(PEERS_DIR, "scattermoe", "VERSION"))
            else "unknown"
        )

    def experts(self, x, ids, w):
        if x.device.type != "cuda":
            raise PeerUnavailable("ScatterMoE's Triton kernels run on CUDA tensors only")
        if next(self.mlp.parameters()).dtype != x.dtype:  # it takes weights in the activation dtype (no autocast)
            self.mlp.to(x.dtype)
        return self.mlp(x, w.to(x.dtype), ids)


def _not_in_suite(name: str, why: str) -> Callable:
    def make(moe):
        raise PeerUnavailable(f"{name} is not in this suite yet: {why}")

    return make


PEERS: Dict[str, Callable] = {
    "hf_grouped_mm": lambda moe: HFExpertsLayer(moe, "grouped_mm"),
    "hf_batched_mm": lambda moe: HFExpertsLayer(moe, "batched_mm"),
    "scattermoe": ScatterMoELayer,
    # recorded, not dropped: both need compiled GPU packages that benchmarks/prepare_peers.sh does
    # not build yet (the GPU machine has no network)
    "megablocks": _not_in_suite(
        "MegaBlocks", "its dropless MoE needs the grouped_gemm CUDA extension and stk, built for the GPU's Python"
    ),
    "sonicmoe": _not_in_suite(
        "SonicMoE", "its kernels need the CUTLASS Python DSL (quack, nvidia-cutlass-dsl) wheels for the GPU's Python"
    ),
}


def make(name: str, moe, tokens: int):
    """The peer's layer for this MoEMLP, or PeerUnavailable saying why."""
    if name == "hf_batched_mm" and tokens * moe.top_k * moe.dim * moe.hidden_dim * 2 > 2**31:
        raise PeerUnavailable(
            "transformers' batched_mm gathers one weight matrix per routed row "
            f"({tokens * moe.top_k} x {moe.dim} x {moe.hidden_dim}): a decode path, not for this many tokens"
        )
    return PEERS[name](moe)
