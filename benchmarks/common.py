"""Shared by the benchmarks: sizes per mode, timing ceilings measured in the same run, and the
baseline MoE layers (the published loop and torch._grouped_mm with torch permutation)."""

from __future__ import annotations

import os
from functools import lru_cache
from typing import Callable, Dict

import torch
import torch.nn.functional as F

from benchmarks.published_geomoe import MoE as PublishedMoE
from geomoe.original import original_state_dict
from geomoe_kernels import MoEMLP

# GeoMoE's MoE layer: d = 768, expert hidden 576, 23 routed + 1 shared, top-3
DIM, HIDDEN, EXPERTS, TOP_K = 768, 576, 23, 3
PRETRAIN_TOKENS = 320 * 49  # 15,680: one GPU's pretraining batch
FINETUNE_TOKENS = 64 * 400  # 25,600: fine-tuning at 320 px
ROUTINGS = {"uniform": 0.0, "mild": 0.5, "heavy": 2.0}  # gate bias -gamma * log(rank): Zipf-like skew


def mode() -> str:
    """'smoke' (CI: every benchmark once, tiny shapes), 'cpu' or 'gpu'; GEOMOE_BENCH overrides."""
    return os.environ.get("GEOMOE_BENCH") or ("gpu" if torch.cuda.is_available() else "cpu")


def device() -> torch.device:
    return torch.device("cuda" if mode() == "gpu" else "cpu")


def dtype() -> torch.dtype:
    return torch.bfloat16 if mode() == "gpu" else torch.float32


def layer_shape() -> Dict[str, int]:
    if mode() == "smoke":
        return dict(dim=64, hidden=48, experts=8, top_k=3)
    return dict(dim=DIM, hidden=HIDDEN, experts=EXPERTS, top_k=TOP_K)


def token_sweep():
    return {
        "smoke": [256],
        "cpu": [1024, 4096],
        "gpu": [4096, 8192, PRETRAIN_TOKENS, FINETUNE_TOKENS, 32768, 65536],
    }[mode()]


def reference_tokens() -> int:
    """Where the speedups are read: 15,680 on a GPU, the largest size elsewhere."""
    return PRETRAIN_TOKENS if mode() == "gpu" else token_sweep()[-1]


def sync() -> None:
    if device().type == "cuda":
        torch.cuda.synchronize()


def run_pedantic(benchmark, fn: Callable[[], object]) -> None:
    """Time fn (synchronised) with a few warm-up rounds; rounds scale with the mode."""
    rounds = {"smoke": 1, "cpu": 3, "gpu": 20}[mode()]

    def timed():
        fn()
        sync()

    benchmark.pedantic(timed, rounds=rounds, warmup_rounds=0 if mode() == "smoke" else 1, iterations=1)


def _time(fn: Callable[[], object], repeats: int) -> float:
    fn()
    sync()
    if device().type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(repeats):
            fn()
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end) / 1e3 / repeats
    import time

    t0 = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - t0) / repeats


@lru_cache(maxsize=None)
def mm_tflops(m: int, k: int, n: int) -> float:
    """torch.mm on the same total rows, this device and dtype: the GEMM ceiling for this shape."""
    a = torch.randn(m, k, device=device(), dtype=dtype())
    b = torch.randn(k, n, device=device(), dtype=dtype())
    seconds = _time(lambda: torch.mm(a, b), 20 if device().type == "cuda" else 3)
    return 2 * m * k * n / seconds / 1e12


@lru_cache(maxsize=None)
def copy_gbps(nbytes: int) -> float:
    """A device-to-device copy of the same bytes: the bandwidth ceiling (read + write counted)."""
    src = torch.empty(max(nbytes // 4, 1), dtype=torch.float32, device=device())
    dst = torch.empty_like(src)
    seconds = _time(lambda: dst.copy_(src), 20 if device().type == "cuda" else 3)
    return 2 * src.numel() * 4 / seconds / 1e9


def skewed_layer(tokens: int, routing: str, seed: int = 0):
    """(MoEMLP on the device, input x, upstream grad g) with gate biases giving the routing skew."""
    shape = layer_shape()
    torch.manual_seed(seed)
    moe = MoEMLP(shape["dim"], shape["hidden"], shape["experts"], 1, shape["top_k"]).to(device())
    with torch.no_grad():
        rank = torch.arange(1, shape["experts"] + 1, dtype=torch.float32, device=device())
        moe.gate.bias.copy_(-ROUTINGS[routing] * torch.log(rank))
    x = torch.randn(tokens, shape["dim"], device=device(), dtype=dtype(), requires_grad=True)
    g = torch.randn_like(x)
    return moe, x, g


def published_layer(moe: MoEMLP) -> PublishedMoE:
    """The published loop MoE holding the same weights (through the original key layout)."""
    pub = PublishedMoE(moe.dim, moe.hidden_dim, moe.num_experts, moe.top_k).to(moe.w1.device)
    pub.load_state_dict(original_state_dict(moe))
    return pub


class TorchRoutedLayer(torch.nn.Module):
    """A baseline MoE layer sharing an MoEMLP's parameters: the same sigmoid + bias top-k router and
    shared expert in plain torch, and the routed experts by `experts(x, ids, weights)` (a subclass or
    a peer library). Returns (y, aux, load) like MoEMLP."""

    def __init__(self, moe: MoEMLP):
        super().__init__()
        self.moe = moe

    def experts(self, x, ids, w):
        raise NotImplementedError

    def forward(self, x):
        m = self.moe
        T, k, E = x.shape[0], m.top_k, m.num_experts
        with torch.autocast(device_type=x.device.type, enabled=False):
            scores = torch.sigmoid(F.linear(x.float(), m.gate.weight.float(), m.gate.bias.float()))
        ids = torch.topk(scores + m.expert_bias, k, dim=-1).indices
        w = scores.gather(1, ids)
        w = w / w.sum(-1, keepdim=True)
        load = torch.zeros(E, dtype=torch.int64, device=x.device).scatter_add_(
            0, ids.reshape(-1), torch.ones_like(ids.reshape(-1))
        )
        routed = self.experts(x, ids, w)
        P = (scores / scores.sum(-1, keepdim=True)).mean(0)
        aux = (P * E * load.float() / (k * T)).sum()
        return (routed.float() + m._shared(x, x.dtype).float()).to(x.dtype), aux, load


class GroupedMMLayer(TorchRoutedLayer):
    """torch._grouped_mm with torch permutation (argsort, gather, weighted sum in float32): the
    strongest stock-PyTorch baseline."""

    def experts(self, x, ids, w):
        m, (T, k) = self.moe, ids.shape
        flat = ids.reshape(-1)
        order = torch.argsort(flat, stable=True)
        counts = torch.zeros(m.num_experts, dtype=torch.int64, device=x.device).scatter_add_(0, flat, torch.ones_like(flat))
        offs = torch.cumsum(counts, 0).to(torch.int32)
        expert_of_row = flat[order]
        rows = x[order // k]
        h = torch._grouped_mm(rows, m.w1.to(x.dtype), offs=offs) + m.b1.to(x.dtype)[expert_of_row]
        h = F.gelu(h)
        out = torch._grouped_mm(h, m.w2.to(x.dtype), offs=offs) + m.b2.to(x.dtype)[expert_of_row]
        inverse = torch.empty_like(order)
        inverse[order] = torch.arange(order.numel(), device=x.device)
        return (out[inverse].view(T, k, -1).float() * w[..., None]).sum(1)


def moe_flops(tokens: int, backward: bool) -> float:
    """Expert GEMM FLOPs: k routed + 1 shared expert, two GEMMs each; backward doubles them."""
    s = layer_shape()
    fwd = 2 * 2 * tokens * (s["top_k"] + 1) * s["dim"] * s["hidden"]
    return fwd * (3 if backward else 1)


def load_imbalance(load: torch.Tensor) -> float:
    load = load.float()
    return float(load.max() / load.mean())
