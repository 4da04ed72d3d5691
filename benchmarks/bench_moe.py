"""MoE ops and the MoE layer: ours against the published loop, torch._grouped_mm with torch
permutation, and the reference ops, with the ceilings (torch.mm on the same rows, a device copy)
measured in the same run. Each row records FLOPs or bytes; run.py turns times into TFLOP/s, GB/s
and fractions of the ceilings."""

import pytest
import torch

from benchmarks import common as C
from benchmarks import peers as P
from geomoe_kernels import grouped_mm, permute, route, topk_gating, unpermute

LAYER_IMPLS = ("geomoe", "geomoe_graph", "geomoe_cuda", "reference", "grouped_mm", "loop") + tuple(P.PEERS)
PEERS = ("grouped_mm", "loop") + tuple(P.PEERS)  # baselines for moe_layer_speedup_vs_best_peer


def _unsupported(benchmark, reason: str, **info) -> None:
    """A peer that cannot run a case is skipped with the reason, never timed; run.py keeps it as a
    row with the reason and no time (benchmarks.common.record_unsupported)."""
    C.record_unsupported(benchmark.name, reason, info)
    pytest.skip(reason)


def _routing_cases():
    cases = [(t, "uniform") for t in C.token_sweep()]
    cases += [(C.reference_tokens(), r) for r in ("mild", "heavy")]
    return cases


@pytest.mark.parametrize("impl", LAYER_IMPLS)
@pytest.mark.parametrize("tokens,routing", _routing_cases())
def test_moe_layer_fwdbwd(benchmark, impl, tokens, routing):
    _layer(benchmark, impl, tokens, routing, "geomoe", backward=True)


@pytest.mark.parametrize("impl", LAYER_IMPLS)
def test_moe_layer_fwd(benchmark, impl):
    """GeoMoE's layer forward only, under no_grad (inference, evaluation), at the reference size."""
    _layer(benchmark, impl, C.reference_tokens(), "uniform", "geomoe", backward=False)


@pytest.mark.parametrize("impl", LAYER_IMPLS)
@pytest.mark.parametrize("passes", ("fwd", "fwdbwd"))
def test_moe_layer_llm(benchmark, impl, passes):
    """The LLM shape (benchmarks.common.LLM: d 2048, SwiGLU 768, 128 experts, top-8, softmax)."""
    _layer(benchmark, impl, C.llm_tokens(), "uniform", "llm", backward=passes == "fwdbwd")


DECODE_IMPLS = ("geomoe", "geomoe_graph", "reference", "grouped_mm", "hf_grouped_mm", "hf_batched_mm", "scattermoe")


@pytest.mark.parametrize("impl", DECODE_IMPLS)
@pytest.mark.parametrize("tokens", (1, 8, 64))
def test_moe_layer_decode(benchmark, impl, tokens):
    """The LLM layer at decode sizes (a batch of 1-64 sequences, one new token each), forward only:
    where transformers' batched_mm is the path to beat."""
    _layer(benchmark, impl, tokens, "uniform", "llm", backward=False, group="moe_layer_decode")


def _layer(benchmark, impl, tokens, routing, kind, backward, group=None):
    group = group or {("geomoe", True): "moe_layer", ("geomoe", False): "moe_layer_fwd"}.get((kind, backward), "moe_layer_llm")
    info = dict(group=group, impl=impl, peer=impl in PEERS, tokens=tokens, routing=routing, shape=kind)
    info["passes"] = "fwdbwd" if backward else "fwd"
    moe, x, g = C.skewed_layer(tokens, routing, kind=kind)
    if impl == "reference":
        moe.backend = "torch"
    if impl in ("geomoe_cuda", "geomoe_graph") and C.device().type != "cuda":
        pytest.skip(f"{impl} runs on CUDA tensors")
    if impl == "geomoe_cuda":  # every op on the CUDA core, its grouped GEMM included
        moe.backend = "cuda"
    if impl == "grouped_mm":
        if C.mode() == "gpu" and torch.cuda.get_device_capability()[0] < 9:
            pytest.skip("torch._grouped_mm needs sm_90 or newer")
        layer = C.GroupedMMLayer(moe)
    elif impl == "loop":
        if kind != "geomoe":
            return _unsupported(
                benchmark, "the published loop is GeoMoE's layer (sigmoid routing, GELU, a shared expert)", **info
            )
        layer = C.published_layer(moe)
    elif impl in P.PEERS:
        try:
            layer = P.make(impl, moe, tokens)
            with torch.no_grad():
                layer(x[:8])  # a peer that cannot run here fails now, not inside the timing
        except P.PeerUnavailable as e:
            return _unsupported(benchmark, str(e), **info)
    else:
        layer = moe
    params = [p for p in layer.parameters() if p.requires_grad]
    x3 = x if impl != "loop" else x.view(1, tokens, -1)
    g3 = g if impl != "loop" else g.view(1, tokens, -1)

    def step(keep_grads=False):
        if not backward:  # inference: nothing saved for a backward
            with torch.no_grad(), torch.autocast(x.device.type, dtype=x.dtype, enabled=x.device.type == "cuda"):
                return layer(x3)[2]
        for t in params + [x]:
            if keep_grads:  # in place, for a CUDA graph's static buffers
                t.grad.zero_()
            else:
                t.grad = None
        with torch.autocast(x.device.type, dtype=x.dtype, enabled=x.device.type == "cuda"):
            y, aux, load = layer(x3)
        torch.autograd.backward([y, aux], [g3, torch.ones_like(aux)])
        return load

    load = step()
    if impl == "geomoe_graph":  # the same step replayed from a CUDA graph: the layer without host overhead
        step = _graphed(step)
    if C.device().type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    C.run_pedantic(benchmark, step)
    s = C.layer_shape(kind)
    up = 2 * s["hidden"] if s["activation"] == "swiglu" else s["hidden"]
    benchmark.extra_info.update(
        **info,
        version=getattr(layer, "version", None),
        flops=C.moe_flops(tokens, backward=backward, kind=kind),
        load_max_over_mean=C.load_imbalance(load),
        peak_memory_bytes=torch.cuda.max_memory_allocated() if C.device().type == "cuda" else None,
        mm_tflops=C.mm_tflops(tokens * (moe.top_k + moe.num_shared_experts), moe.dim, up),
    )


def _graphed(step):
    """step (forward + backward) captured in a CUDA graph, after warm-up on a side stream (autotuning
    must not happen inside a capture); the captured step zeroes and refills the same grad buffers."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        load = step(keep_grads=True)
    return lambda: (graph.replay(), load)[1]


@pytest.mark.parametrize("tokens", C.token_sweep())
def test_gating(benchmark, tokens):
    s = C.layer_shape()
    logits = torch.randn(tokens, s["experts"], device=C.device())
    bias = torch.zeros(s["experts"], device=C.device())
    C.run_pedantic(benchmark, lambda: topk_gating(logits, bias, s["top_k"]))
    nbytes = logits.numel() * 4 + tokens * s["top_k"] * 12
    benchmark.extra_info.update(group="gating", impl="geomoe", tokens=tokens, bytes=nbytes, copy_gbps=C.copy_gbps(nbytes))


def _routed(tokens):
    s = C.layer_shape()
    ids = torch.stack([torch.randperm(s["experts"], device=C.device())[: s["top_k"]] for _ in range(1)]).expand(tokens, -1)
    ids = (ids + torch.randint(0, s["experts"], (tokens, 1), device=C.device())) % s["experts"]
    x = torch.randn(tokens, s["dim"], device=C.device(), dtype=C.dtype())
    return s, ids.contiguous(), x


@pytest.mark.parametrize("tokens", C.token_sweep())
def test_permute(benchmark, tokens):
    s, ids, x = _routed(tokens)

    def run():
        r2f, f2r, offsets = route(ids, s["experts"])
        return permute(x, r2f, f2r, s["top_k"])

    C.run_pedantic(benchmark, run)
    nbytes = 2 * tokens * s["top_k"] * s["dim"] * x.element_size()  # rows read and written
    benchmark.extra_info.update(group="permute", impl="geomoe", tokens=tokens, bytes=nbytes, copy_gbps=C.copy_gbps(nbytes))


@pytest.mark.parametrize("tokens", C.token_sweep())
def test_unpermute(benchmark, tokens):
    s, ids, x = _routed(tokens)
    r2f, f2r, _ = route(ids, s["experts"])
    rows = permute(x, r2f, f2r, s["top_k"])
    w = torch.rand(tokens, s["top_k"], device=C.device())
    C.run_pedantic(benchmark, lambda: unpermute(rows, r2f, f2r, s["top_k"], w, x))
    nbytes = (tokens * s["top_k"] + 2 * tokens) * s["dim"] * x.element_size()
    benchmark.extra_info.update(group="unpermute", impl="geomoe", tokens=tokens, bytes=nbytes, copy_gbps=C.copy_gbps(nbytes))


@pytest.mark.parametrize("impl", ("geomoe", "geomoe_cuda", "grouped_mm", "loop"))
@pytest.mark.parametrize("tokens", C.token_sweep())
def test_grouped_gemm_up_projection(benchmark, impl, tokens):
    s, ids, x = _routed(tokens)
    r2f, f2r, offsets = route(ids, s["experts"])
    rows = permute(x, r2f, f2r, s["top_k"])
    w = torch.randn(s["experts"], s["dim"], s["hidden"], device=C.device(), dtype=C.dtype()) / s["dim"] ** 0.5
    b = torch.zeros(s["experts"], s["hidden"], device=C.device(), dtype=C.dtype())
    if impl == "geomoe":
        fn = lambda: grouped_mm(rows, w, offsets, b, "gelu")
    elif impl == "geomoe_cuda":
        if C.device().type != "cuda":
            pytest.skip("the CUDA core runs on CUDA tensors")
        fn = lambda: grouped_mm(rows, w, offsets, b, "gelu", backend="cuda")
    elif impl == "grouped_mm":
        if C.mode() == "gpu" and torch.cuda.get_device_capability()[0] < 9:
            pytest.skip("torch._grouped_mm needs sm_90 or newer")
        offs = offsets[1:].to(torch.int32)
        expert_of_row = torch.repeat_interleave(torch.arange(s["experts"], device=C.device()), offsets.diff())
        fn = lambda: torch.nn.functional.gelu(torch._grouped_mm(rows, w, offs=offs) + b[expert_of_row])
    else:
        bounds = offsets.tolist()
        fn = lambda: torch.cat(
            [torch.nn.functional.gelu(rows[bounds[e] : bounds[e + 1]] @ w[e] + b[e]) for e in range(s["experts"])]
        )
    C.run_pedantic(benchmark, fn)
    M = tokens * s["top_k"]
    benchmark.extra_info.update(
        group="grouped_gemm",
        impl=impl,
        tokens=tokens,
        flops=2 * M * s["dim"] * s["hidden"],
        mm_tflops=C.mm_tflops(M, s["dim"], s["hidden"]),
    )
