"""MoEMLP.from_transformers (geomoe_kernels/integrations/transformers_moe.py): the sparse-MoE block of
a tiny random transformers model (AutoConfig.for_model) of each family gets its family's adapter
class, which shares the block's parameters (the same objects, storage kept) and gives the block's
output (run on transformers' "eager" experts) and every gradient in float64 to 1e-10; with MoEMLP's
own gating (router="geomoe") the same experts and weights up to the block router's float32 softmax.
A block of a family without a class of its own (dots1, Qwen3-Next) gets the fallback adapter, as
exact with the block's router and refusing router="geomoe". A block whose experts lack transformers'
layout, or whose layout is not its family's, is refused by name. Skipped without transformers."""

from __future__ import annotations

import pytest
import torch
from torch import nn

pytest.importorskip("transformers", minversion="5.0")
pytest.importorskip("geomoe_kernels.integrations.transformers")

from geomoe_kernels import MoEMLP  # noqa: E402
from geomoe_kernels.integrations import transformers_moe as tm  # noqa: E402
from geomoe_kernels.nn import _layer_plan  # noqa: E402
from geomoe_kernels.nn.hf_blocks import UnsupportedBlock  # noqa: E402
from tests.test_transformers_backend import MODELS, _build  # noqa: E402

FUSED = {"gpt_oss": False}  # GPT-OSS's clamped SwiGLU runs as the experts' own gate between two GEMMs
ADAPTER = {
    "mixtral": tm.MixtralAdapter,
    "qwen2_moe": tm.Qwen2MoeAdapter,
    "qwen3_moe": tm.Qwen3MoeAdapter,
    "olmoe": tm.OlmoeAdapter,
    "deepseek_v3": tm.DeepseekV3Adapter,
    "gpt_oss": tm.GptOssAdapter,
}


def _block(name: str) -> nn.Module:
    model = _build(name, torch.float64)
    model.set_experts_implementation("eager")
    return model.model.layers[-1].mlp  # DeepSeek-V3's first layer is dense


def _max_rel(a, b) -> float:
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()


# tiny sparse-MoE blocks of families the transformers backend's model tests do not build, alone
LONE_BLOCKS = {
    "glm4_moe": ("glm4_moe", "Glm4MoeMoE", dict(n_routed_experts=4, n_shared_experts=1, n_group=2, topk_group=1)),
    "dots1": ("dots1", "Dots1MoE", dict(n_routed_experts=4, n_shared_experts=1, n_group=2, topk_group=1)),
    "qwen3_next": ("qwen3_next", "Qwen3NextSparseMoeBlock", dict(num_experts=4, shared_expert_intermediate_size=12)),
}


def _lone_block(name: str) -> nn.Module:
    """The block alone, in float64, every parameter and the router's bias buffer drawn at a scale
    where each one matters (as tests/test_transformers_backend.py's _build draws a model's)."""
    import importlib

    from transformers import AutoConfig

    module, cls, extra = LONE_BLOCKS[name]
    config = AutoConfig.for_model(
        name, hidden_size=16, moe_intermediate_size=8, num_experts_per_tok=2, routed_scaling_factor=2.5, **extra
    )
    config._experts_implementation = "eager"
    block = getattr(importlib.import_module(f"transformers.models.{module}.modeling_{module}"), cls)(config)
    block = block.to(torch.float64)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in block.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.3)
        for b in block.buffers():
            b.copy_(torch.randn(b.shape, generator=g, dtype=b.dtype) * 0.1)
    return block


def _assert_same_as_block(block: nn.Module, moe: MoEMLP):
    """The adapter shares the block's parameters and gives its output and every gradient in float64;
    (x, the block's output, the load) for more checks."""
    assert {id(p) for p in moe.parameters()} == {id(p) for p in block.parameters()}
    x = torch.randn(2, 5, moe.dim, dtype=torch.float64)
    xa, xb = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    params = list(block.parameters())
    want = block(xa)
    g = torch.randn_like(want)
    want_grads = torch.autograd.grad((want * g).sum(), [xa, *params])
    got, aux, load = moe(xb)
    got_grads = torch.autograd.grad((got * g).sum(), [xb, *params])
    assert got.shape == want.shape and load.sum() == 10 * moe.top_k and aux.isfinite()
    assert _max_rel(got, want) <= 1e-10
    for (n, _), a, b in zip([("x", None), *block.named_parameters()], got_grads, want_grads):
        assert _max_rel(a, b) <= 1e-10, n
    return x, want.detach(), load


@pytest.mark.parametrize("name", list(MODELS))
def test_block_equals_its_moe_mlp(name, monkeypatch):
    block = _block(name)
    plans = []  # which launch plan each forward ran on (the adapters share MoEMLP's)
    for fn in ("run", "run_routed"):
        real = getattr(_layer_plan, fn)
        monkeypatch.setattr(_layer_plan, fn, lambda *a, _real=real, _fn=fn, **k: plans.append(_fn) or _real(*a, **k))
    storage = {n: p.untyped_storage().data_ptr() for n, p in block.named_parameters()}
    moe = MoEMLP.from_transformers(block, backend="torch")
    assert type(moe) is ADAPTER[name] and tm.adapter_class(block) is ADAPTER[name]  # the family's own class
    assert {id(p) for p in moe.parameters()} == {id(p) for p in block.parameters()}  # shared, not copied
    assert moe.expert_gate_fn is None if FUSED.get(name, True) else moe.expert_gate_fn is not None
    assert (moe._kn(moe.w1).is_contiguous(), moe._kn(moe.w2).is_contiguous()) == (True, True)  # read in place
    x = torch.randn(2, 7, moe.dim, dtype=torch.float64)
    xa, xb = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    params = list(block.parameters())
    want = block(xa)
    want = want[0] if isinstance(want, tuple) else want  # GPT-OSS returns (hidden, router scores)
    g = torch.randn_like(want)
    want_grads = torch.autograd.grad((want * g).sum(), [xa, *params])
    got, aux, load = moe(xb)
    assert plans == ["run_routed"]  # the block's router first, the rest of the layer on the plan
    got_grads = torch.autograd.grad((got * g).sum(), [xb, *params])
    assert got.shape == want.shape and load.sum() == 14 * moe.top_k and aux.isfinite()
    assert _max_rel(got, want) <= 1e-10
    for (n, _), a, b in zip([("x", None), *block.named_parameters()], got_grads, want_grads):
        assert _max_rel(a, b) <= 1e-10, n
    # the re-layout kept each parameter's storage where it was only if it was [E, in, out] already
    for n, p in block.named_parameters():
        if not n.startswith("experts.") or block.experts.is_transposed:
            assert p.untyped_storage().data_ptr() == storage[n], n

    own = MoEMLP.from_transformers(block, router="geomoe", backend="torch")
    assert type(own) is ADAPTER[name]
    got_own, _, load_own = own(x)
    gating_in_plan = own.expert_gate_fn is None and own.n_group == 1  # else the routing first (groups, own gate)
    assert plans == ["run_routed", "run" if gating_in_plan else "run_routed"]
    assert torch.equal(load_own, load)
    assert _max_rel(got_own, want) <= 1e-6  # the block's router takes its softmax / sigmoid in float32


def test_deepseek_bias_update_moves_the_routers_buffer():
    block = _block("deepseek_v3")
    moe = MoEMLP.from_transformers(block, router="geomoe")
    assert (moe.score_func, moe.n_group, moe.topk_group, moe.routed_scaling_factor) == ("sigmoid", 2, 1, 2.5)
    before = block.gate.e_score_correction_bias.clone()
    moe.update_bias(torch.arange(8), rate=0.5)
    step = 0.5 * torch.sign(3.5 - torch.arange(8.0)).to(before.dtype)
    assert moe.expert_bias is block.gate.e_score_correction_bias and torch.equal(
        block.gate.e_score_correction_bias, before + step
    )


def test_refusals_name_the_block():
    block = _block("mixtral")
    with pytest.raises(ValueError, match="argument 'router'"):
        MoEMLP.from_transformers(block, router="fast")
    block.jitter_noise = 0.1
    with pytest.raises(UnsupportedBlock, match=r"jitter noise.*MixtralSparseMoeBlock with MixtralExperts\(is_transposed=False"):
        MoEMLP.from_transformers(block)
    block.jitter_noise = 0.0
    block.experts.has_post_expert_norm = True
    with pytest.raises(UnsupportedBlock, match=r"post-expert norm.*has_post_expert_norm=True"):
        MoEMLP.from_transformers(block)
    block.experts.has_post_expert_norm = False

    class MyRouter(nn.Module):
        def __init__(self, gate):
            super().__init__()
            self.weight, self.top_k = gate.weight, gate.top_k

        def forward(self, x):  # pragma: no cover - not called
            raise AssertionError

    block.gate = MyRouter(block.gate)
    with pytest.raises(UnsupportedBlock, match=r"router='geomoe' maps only.*got MyRouter"):
        MoEMLP.from_transformers(block, router="geomoe")
    with pytest.raises(UnsupportedBlock, match="argument 'block' expected an 'experts' module.*got none"):
        MoEMLP.from_transformers(nn.Linear(2, 2))
    block.experts._is_expert_parallel = True
    with pytest.raises(UnsupportedBlock, match=r"expected unsharded experts, got _is_expert_parallel=True"):
        MoEMLP.from_transformers(block)
    block.experts._is_expert_parallel = False
    block.experts.has_gate = False
    with pytest.raises(UnsupportedBlock, match=r"expected experts with a gate.*has_gate=False"):
        MoEMLP.from_transformers(block)
    block.experts.has_gate = True
    del block.gate
    with pytest.raises(UnsupportedBlock, match=r"expected the router 'gate' with a weight Parameter \[6, 32\], got none"):
        MoEMLP.from_transformers(block)


def test_the_family_is_chosen_by_the_block_class_and_a_block_without_the_layout_is_refused():
    from transformers import AutoConfig
    from transformers.models.glm4_moe.modeling_glm4_moe import Glm4MoeMoE
    from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock

    block = _block("mixtral")
    block.__class__ = type("MyMixtralBlock", (MixtralSparseMoeBlock,), {})  # a subclass: still Mixtral's
    assert type(MoEMLP.from_transformers(block)) is tm.MixtralAdapter
    config = AutoConfig.for_model(
        "glm4_moe", hidden_size=16, moe_intermediate_size=8, n_routed_experts=4, n_shared_experts=1, num_experts_per_tok=2
    )
    assert type(MoEMLP.from_transformers(Glm4MoeMoE(config))) is tm.Glm4MoeAdapter
    assert tm.adapter_class(_lone_block("dots1")) is tm.FallbackAdapter  # no class of its own

    class ListOfExperts(nn.Module):  # the layout before transformers' @use_experts_implementation
        def __init__(self):
            super().__init__()
            self.gate = nn.Linear(16, 4, bias=False)
            self.experts = nn.ModuleList(nn.Linear(16, 16) for _ in range(4))

    with pytest.raises(
        UnsupportedBlock, match=r"expected an 'experts' module decorated with .*@use_experts_implementation.*got ModuleList"
    ):
        MoEMLP.from_transformers(ListOfExperts())


def test_glm4_moe_block_equals_its_moe_mlp():
    block = _lone_block("glm4_moe")
    moe = MoEMLP.from_transformers(block, backend="torch")
    assert type(moe) is tm.Glm4MoeAdapter
    x, want, load = _assert_same_as_block(block, moe)
    own = MoEMLP.from_transformers(block, router="geomoe", backend="torch")
    assert (own.score_func, own.n_group, own.topk_group, own.routed_scaling_factor) == ("sigmoid", 2, 1, 2.5)
    assert own.expert_bias is block.gate.e_score_correction_bias
    got_own, _, load_own = own(x)
    assert torch.equal(load_own, load) and _max_rel(got_own, want) <= 1e-6  # the router's float32 sigmoid


@pytest.mark.parametrize("name", ["dots1", "qwen3_next"])
def test_a_family_without_its_class_is_served_by_the_fallback(name, monkeypatch):
    """dots1 (DeepSeek-V3's router with its correction bias, ungated shared experts) and Qwen3-Next
    (softmax top-k, a sigmoid-gated shared expert): the fallback reads them and calls their router."""
    block = _lone_block(name)
    plans = []
    real = _layer_plan.run_routed
    monkeypatch.setattr(_layer_plan, "run_routed", lambda *a, **k: plans.append("run_routed") or real(*a, **k))
    moe = MoEMLP.from_transformers(block, backend="torch")
    assert type(moe) is tm.FallbackAdapter and moe.block_router and moe.family == type(block).__name__
    assert moe.expert_gate_fn is None  # the fused SwiGLU, as the families with transformers' default gate
    if name == "dots1":
        assert moe.score_func == "sigmoid" and moe.expert_bias is block.gate.e_score_correction_bias
        assert moe.shared_expert is block.shared_experts and moe.shared_gate is None
    else:
        assert moe.score_func == "softmax" and moe.shared_gate is block.shared_expert_gate
    _assert_same_as_block(block, moe)
    assert plans == ["run_routed"]
    families = r"Mixtral \(MixtralSparseMoeBlock\), Qwen2-MoE .*GLM-4-MoE \(Glm4MoeMoE\)"
    with pytest.raises(
        UnsupportedBlock,
        match=rf"router='geomoe' maps the router of a family with an adapter class of its own \({families}\); "
        rf"{type(block).__name__} \(model_type '{name}'\) has none.*use router='block'",
    ):
        MoEMLP.from_transformers(block, router="geomoe")


def test_the_fallback_refuses_what_it_cannot_read():
    block = _lone_block("dots1")
    block.jitter_noise = 0.1
    with pytest.raises(UnsupportedBlock, match=r"jitter noise.*Dots1MoE with Dots1Experts\(is_transposed=False"):
        MoEMLP.from_transformers(block)
    del block.jitter_noise
    block.shared_mlp = nn.Linear(16, 16)  # a module of the block's own (as HunYuan-MoE's): not left out
    with pytest.raises(UnsupportedBlock, match=r"got also \['shared_mlp'\] \(the adapter would leave them out\)"):
        MoEMLP.from_transformers(block)
    del block.shared_mlp
    block.shared_expert = nn.Linear(16, 16)  # two shared experts: the fallback reads one
    with pytest.raises(UnsupportedBlock, match=r"got also \['shared_experts'\]"):
        MoEMLP.from_transformers(block)
    del block.shared_expert
    block.experts.has_post_expert_norm = True
    with pytest.raises(UnsupportedBlock, match=r"post-expert norm"):
        MoEMLP.from_transformers(block)
    block.experts.has_post_expert_norm = False
    router = block.gate
    del block.gate
    block.router = nn.Linear(16, 3, bias=False)  # read as the router when there is no 'gate'
    with pytest.raises(UnsupportedBlock, match=r"expected the router 'router' with a weight Parameter \[4, 16\], got Linear"):
        MoEMLP.from_transformers(block)
    del block.router
    block.gate = router
    assert type(MoEMLP.from_transformers(block)) is tm.FallbackAdapter


def test_a_block_unlike_its_family_is_refused():
    block = _block("mixtral")
    with pytest.raises(UnsupportedBlock, match=r"GptOssAdapter serves GPT-OSS's GptOssMLP, got MixtralSparseMoeBlock"):
        tm.GptOssAdapter(block)
    with pytest.raises(TypeError, match=r"base of the per-family adapters.*MixtralAdapter"):
        tm.TransformersMoEMLP(block)
    block.experts.is_transposed = True
    with pytest.raises(UnsupportedBlock, match=r"Mixtral's experts expected is_transposed=False .*got is_transposed=True"):
        MoEMLP.from_transformers(block)
    block.experts.is_transposed = False
    block.shared_expert = nn.Linear(32, 32)  # a shared expert Mixtral has not: refused, not left out
    with pytest.raises(UnsupportedBlock, match=r"Mixtral's block expected no \['shared_expert'\]"):
        MoEMLP.from_transformers(block)
    del block.shared_expert
    assert type(tm.MixtralAdapter(block)) is tm.MixtralAdapter


@pytest.mark.parametrize("name", ["qwen2_moe", "gpt_oss"])
def test_block_moe_mlp_on_a_kernel_backend(kernel_backend, name):
    """Under the Triton interpreter (tests/test_triton_interpreter.py's process) in float32: the fused
    SwiGLU on the block's re-laid-out [E, out, in] weights with a gated shared expert (Qwen2-MoE),
    and the experts' own gate between two grouped GEMMs with biases (GPT-OSS), output and every
    gradient as the block's."""
    if kernel_backend.name != "triton":
        pytest.skip("float32: the CUDA core's grouped GEMM takes fp16/bf16 (its layer test is in test_cuda_emulated.py)")
    block = _block(name).float().to(kernel_backend.device)
    moe = MoEMLP.from_transformers(block, backend=kernel_backend.name)
    x = torch.randn(2, 5, moe.dim, device=kernel_backend.device)
    params = list(block.parameters())
    runs = []
    for layer in (block, moe):
        xi = x.clone().requires_grad_(True)
        y = layer(xi)
        y = y[0] if isinstance(y, tuple) else y  # MoEMLP's (y, aux, load), GPT-OSS's (y, router scores)
        runs.append([y.detach(), *torch.autograd.grad(y.square().sum(), [xi, *params])])
    for a, b in zip(runs[1], runs[0]):
        assert _max_rel(a, b) <= 1e-4
