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


# An LLM's MoE layer (Qwen3-30B-A3B-like): d 2048, expert hidden 768 SwiGLU, 128 experts, top-8,
# softmax routing renormalised over the top 8, no shared expert
LLM = dict(dim=2048, hidden=768, experts=128, top_k=8, shared=0, activation="swiglu", score_func="softmax")
GEOMOE = dict(dim=DIM, hidden=HIDDEN, experts=EXPERTS, top_k=TOP_K, shared=1, activation="gelu", score_func="sigmoid")
SHAPES = {"geomoe": GEOMOE, "llm": LLM}


def layer_shape(kind: str = "geomoe") -> Dict:
    """The layer's configuration: GeoMoE's, or the LLM shape; tiny in smoke mode."""
    if mode() == "smoke":
        tiny = dict(dim=64, hidden=48, experts=8, top_k=3) if kind == "geomoe" else dict(dim=64, hidden=32, experts=16, top_k=4)
        return {**SHAPES[kind], **tiny}
    return dict(SHAPES[kind])


# the GeoMoE config of the model-level benchmarks in smoke mode (CI): every part, tiny
SMOKE_MODEL = dict(
    img_size=64,
    embed_dim=(16, 24, 32),
    depth=(1, 1, 1),
    num_heads=2,
    num_experts=4,
    top_k=2,
    decoder_embed_dim=16,
    decoder_depth=1,
    decoder_num_heads=2,
)


def llm_tokens() -> int:
    """Tokens at the LLM shape: a 16k-token micro-batch on a GPU."""
    return {"smoke": 64, "cpu": 512, "gpu": 16384}[mode()]


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


UNSUPPORTED_ENV = "GEOMOE_BENCH_UNSUPPORTED"  # a file: benchmarks.run's record of the rows that cannot run


def record_unsupported(name: str, reason: str, info: Dict) -> None:
    """A benchmark that cannot run here (a peer not installed, a case it cannot take): appended as a
    JSON line to the file named by GEOMOE_BENCH_UNSUPPORTED (set by benchmarks.run), so the results
    list it with its reason; the benchmark itself is skipped, never timed."""
    path = os.environ.get(UNSUPPORTED_ENV)
    if path:
        import json

        with open(path, "a") as f:
            f.write(json.dumps({"name": name, "unsupported": reason, **info}) + "\n")


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


def skewed_layer(tokens: int, routing: str, seed: int = 0, kind: str = "geomoe"):
    """(MoEMLP on the device, input x, upstream grad g) with gate biases giving the routing skew."""
    shape = layer_shape(kind)
    torch.manual_seed(seed)
    moe = MoEMLP(
        shape["dim"],
        shape["hidden"],
        shape["experts"],
        shape["shared"],
        shape["top_k"],
        score_func=shape["score_func"],
        activation=shape["activation"],
    ).to(device())
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
            logits = F.linear(x.float(), m.gate.weight.float(), m.gate.bias.float())
        if m.score_func == "sigmoid":  # selection by score + bias, weights from the scores
            scores = torch.sigmoid(logits)
            ids = torch.topk(scores + m.expert_bias, k, dim=-1).indices
        else:
            scores = torch.softmax(logits, -1)
            ids = torch.topk(scores, k, dim=-1).indices
        w = scores.gather(1, ids)
        if m.renormalize:
            w = w / w.sum(-1, keepdim=True)
        load = torch.zeros(E, dtype=torch.int64, device=x.device).scatter_add_(
            0, ids.reshape(-1), torch.ones_like(ids.reshape(-1))
        )
        routed = self.experts(x, ids, w)
        P = (scores / scores.sum(-1, keepdim=True)).mean(0)
        aux = (P * E * load.float() / (k * T)).sum()
        shared = m._shared(x, x.dtype)
        return (routed.float() + (shared.float() if shared is not None else 0.0)).to(x.dtype), aux, load


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
        h = _activation(m.activation, h)
        out = torch._grouped_mm(h, m.w2.to(x.dtype), offs=offs) + m.b2.to(x.dtype)[expert_of_row]
        inverse = torch.empty_like(order)
        inverse[order] = torch.arange(order.numel(), device=x.device)
        return (out[inverse].view(T, k, -1).float() * w[..., None]).sum(1)


def _activation(name: str, h):
    if name == "swiglu":  # [gate | up] side by side
        gate, up = h.chunk(2, dim=-1)
        return F.silu(gate) * up
    return F.silu(h) if name == "silu" else F.gelu(h)


def moe_flops(tokens: int, backward: bool, kind: str = "geomoe") -> float:
    """Expert GEMM FLOPs: k routed + the shared experts, two GEMMs each (SwiGLU's first is twice as
    wide); backward doubles them."""
    s = layer_shape(kind)
    widths = 3 if s["activation"] == "swiglu" else 2  # d x (2)h up, h x d down
    fwd = 2 * widths * tokens * (s["top_k"] + s["shared"]) * s["dim"] * s["hidden"]
    return fwd * (3 if backward else 1)


def load_imbalance(load: torch.Tensor) -> float:
    load = load.float()
    return float(load.max() / load.mean())
