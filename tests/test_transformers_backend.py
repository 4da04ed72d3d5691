"""The transformers experts backend "geomoe" (geomoe_kernels/integrations/transformers.py) against
transformers' own experts: tiny random models of six MoE architectures (built with
AutoConfig.for_model) give the same logits, every parameter gradient and the same greedy tokens as
"eager", in float64 (to 1e-10) and float32, in bf16 within twice eager's own error; under the
Triton interpreter (float32) and the emulated CUDA core (bf16) in those tests' processes; and every combination of the decorator's layout flags,
on a synthetic experts module, against transformers' "batched_mm" (a per-row bmm, independent of
ours), with the router's gradient too. Skipped where transformers is not installed."""

from __future__ import annotations

import copy
import inspect
import types

import pytest
import torch
from torch import nn

transformers = pytest.importorskip("transformers", minversion="5.0")
gt = pytest.importorskip("geomoe_kernels.integrations.transformers")

from transformers import AutoConfig, AutoModelForCausalLM  # noqa: E402
from transformers.activations import ACT2FN  # noqa: E402
from transformers.integrations.moe import ExpertsInterface, use_experts_implementation  # noqa: E402

VOCAB = 64
COMMON = dict(
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=VOCAB,
    max_position_embeddings=64,
    tie_word_embeddings=False,
)
# tiny versions of each architecture's MoE: several experts, top-k > 1, their own routers
MODELS = {
    "mixtral": dict(intermediate_size=48, num_local_experts=6, num_experts_per_tok=2),
    "qwen2_moe": dict(
        intermediate_size=48,
        moe_intermediate_size=24,
        shared_expert_intermediate_size=40,
        num_experts=6,
        num_experts_per_tok=3,
        decoder_sparse_step=1,
    ),
    "qwen3_moe": dict(intermediate_size=48, moe_intermediate_size=24, num_experts=8, num_experts_per_tok=3, head_dim=8),
    "olmoe": dict(intermediate_size=24, num_experts=8, num_experts_per_tok=2),
    "deepseek_v3": dict(
        num_key_value_heads=4,
        intermediate_size=48,
        moe_intermediate_size=24,
        n_routed_experts=8,
        n_shared_experts=1,
        num_experts_per_tok=3,
        n_group=2,
        topk_group=1,
        first_k_dense_replace=1,
        kv_lora_rank=16,
        q_lora_rank=16,
        qk_nope_head_dim=8,
        qk_rope_head_dim=8,
        v_head_dim=8,
        head_dim=8,
        routed_scaling_factor=2.5,
    ),
    "gpt_oss": dict(
        intermediate_size=24,
        num_local_experts=6,
        num_experts_per_tok=2,
        head_dim=8,
        layer_types=["full_attention", "sliding_attention"],
        sliding_window=8,
    ),
}
# the activation the backend fuses into the grouped GEMM for each (None: the module's own gate between two)
FUSED = {
    "mixtral": "swiglu",
    "qwen2_moe": "swiglu",
    "qwen3_moe": "swiglu",
    "olmoe": "swiglu",
    "deepseek_v3": "swiglu",
    "gpt_oss": None,
}


def _build(name: str, dtype: torch.dtype) -> nn.Module:
    """A tiny random model with every parameter (and the routers' bias buffers) drawn at a scale
    where each one matters to the logits."""
    torch.manual_seed(0)
    config = AutoConfig.for_model(name, **{**COMMON, **MODELS[name]})
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for n, p in model.named_parameters():
            p.copy_(
                torch.randn(p.shape, generator=g, dtype=p.dtype) * (0.3 if p.dim() > 1 else 0.1) + (1.0 if "norm" in n else 0.0)
            )
        for n, b in model.named_buffers():
            if "bias" in n and b.is_floating_point():
                b.copy_(torch.randn(b.shape, generator=g, dtype=b.dtype) * 0.1)
    return model


def _experts_modules(model: nn.Module):
    return [m for m in model.modules() if hasattr(m, "has_gate") and hasattr(m, "is_transposed")]


def _max_rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()


TOL = {torch.float64: 1e-10, torch.float32: 1e-5}


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["float64", "float32"])
@pytest.mark.parametrize("name", list(MODELS))
def test_model_matches_eager(name, dtype, monkeypatch):
    ref = _build(name, dtype)
    ref.set_experts_implementation("eager")
    ours = copy.deepcopy(ref)
    ours.set_experts_implementation("geomoe")
    experts = _experts_modules(ours)
    assert experts and all(gt.fused_activation(m) == FUSED[name] for m in experts)

    calls, weights_read = [], []
    real_mlp, real_mm = gt.expert_mlp, gt.grouped_mm
    monkeypatch.setattr(
        gt, "expert_mlp", lambda x, w1, b1, w2, *a, **k: weights_read.append((w1, w2)) or real_mlp(x, w1, b1, w2, *a, **k)
    )
    monkeypatch.setattr(gt, "grouped_mm", lambda x, w, *a, **k: weights_read.append((w,)) or real_mm(x, w, *a, **k))
    real_plan = gt._layer_plan.run_routed  # the eager path: the layer's plan, reading the same weights
    monkeypatch.setattr(
        gt._layer_plan,
        "run_routed",
        lambda o, wt, i, x, w1, b1, w2, *a: weights_read.append((w1, w2)) or real_plan(o, wt, i, x, w1, b1, w2, *a),
    )
    real_forward = gt.experts_forward
    monkeypatch.setattr(gt, "experts_forward", lambda *a, **k: calls.append(1) or real_forward(*a, **k))

    ids = torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(2))
    outs = []
    for model in (ref, ours):
        out = model(input_ids=ids, labels=ids)
        out.loss.backward()
        outs.append(out.logits.detach())
    assert len(calls) == len(experts), "the geomoe experts did not run in every MoE layer"
    tol = TOL[dtype]
    assert _max_rel(outs[1], outs[0]) <= tol
    for (n, p), q in zip(ref.named_parameters(), ours.parameters()):
        assert (p.grad is None) == (q.grad is None), n
        if p.grad is not None:
            assert _max_rel(q.grad, p.grad) <= tol, n
    # the expert weights were read in place: the ops got views of the parameters' own storage
    storages = {p.untyped_storage().data_ptr() for m in experts for p in m.parameters(recurse=False)}
    assert weights_read and all(
        w.untyped_storage().data_ptr() in storages and w.is_contiguous() for ws in weights_read for w in ws
    )


@pytest.mark.parametrize("name", list(MODELS))
def test_greedy_generation_matches_eager(name):
    ref = _build(name, torch.float32)
    ref.set_experts_implementation("eager")
    ours = copy.deepcopy(ref)
    ours.set_experts_implementation("geomoe")
    prompt = torch.randint(0, VOCAB, (2, 5), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        tokens = [m.generate(prompt, max_new_tokens=6, do_sample=False, pad_token_id=0) for m in (ref, ours)]
    assert torch.equal(tokens[0], tokens[1])


def test_relayout_once_keeps_the_parameters():
    """Non-transposed weights: one re-layout of the storage, same shape, values and Parameter
    objects; later calls copy nothing; prepare() does it up front."""
    model = _build("mixtral", torch.float32)
    experts = _experts_modules(model)[0]
    before = {n: (p, p.detach().clone()) for n, p in experts.named_parameters()}
    assert gt.prepare(model) == 2 * len(_experts_modules(model))
    assert gt.prepare(model) == 0
    for n, p in experts.named_parameters():
        assert p is before[n][0] and p.shape == before[n][1].shape and torch.equal(p, before[n][1])
        assert p.transpose(1, 2).is_contiguous()
    model.set_experts_implementation("geomoe")
    ptr = experts.gate_up_proj.data_ptr()
    model(input_ids=torch.randint(0, VOCAB, (1, 6)))
    assert experts.gate_up_proj.data_ptr() == ptr
    assert model.state_dict()["model.layers.0.mlp.experts.gate_up_proj"].shape == before["gate_up_proj"][1].shape


# ---- every layout flag combination, on a synthetic experts module -------------------------------

E, D, I, T, K = 5, 12, 8, 10, 2


# the decorator's post-expert norm came in a later transformers 5 release
HAS_POST_NORM_FLAG = "has_post_expert_norm" in inspect.signature(use_experts_implementation).parameters


def _experts_class(is_transposed, is_concatenated, has_bias, has_gate, has_post_expert_norm, act):
    flags = dict(is_transposed=is_transposed, is_concatenated=is_concatenated, has_bias=has_bias, has_gate=has_gate)
    if has_post_expert_norm:
        if not HAS_POST_NORM_FLAG:
            pytest.skip(f"transformers {transformers.__version__} has no has_post_expert_norm")
        flags["has_post_expert_norm"] = True

    @use_experts_implementation(**flags)
    class Experts(nn.Module):
        def __init__(self, config):
            super().__init__()
            self.num_experts = E
            up = 2 * I if has_gate else I
            name = "gate_up_proj" if has_gate else "up_proj"
            setattr(self, name, nn.Parameter(torch.randn((E, D, up) if is_transposed else (E, up, D)) * 0.3))
            self.down_proj = nn.Parameter(torch.randn((E, I, D) if is_transposed else (E, D, I)) * 0.3)
            if has_bias:
                setattr(self, name + "_bias", nn.Parameter(torch.randn(E, up) * 0.1))
                self.down_proj_bias = nn.Parameter(torch.randn(E, D) * 0.1)
            self.act_fn = ACT2FN[act]
            if has_post_expert_norm:
                self.post_expert_norm = nn.LayerNorm(D)

        if not is_concatenated:  # interleaved columns [g0, u0, g1, u1, ...]

            def _apply_gate(self, gate_up):
                return self.act_fn(gate_up[..., ::2]) * gate_up[..., 1::2]

        def forward(self, hidden_states, top_k_index, top_k_weights):
            raise AssertionError("the experts interface should have replaced this")

    return Experts


def _config(impl):
    return types.SimpleNamespace(_experts_implementation=impl)


def _run(module, impl, x, ids, w):
    module.config._experts_implementation = impl
    leaves = [x, w, *module.parameters()]
    for t in leaves:
        t.grad = None
    out = module(x, ids, w)
    torch.autograd.backward(out, torch.ones_like(out) * torch.linspace(-1, 1, out.shape[1], dtype=out.dtype))
    return [out.detach()] + [t.grad.clone() for t in leaves]


def _routing(dtype, num_experts=E):
    g = torch.Generator().manual_seed(4)
    x = torch.randn(T, D, generator=g, dtype=dtype, requires_grad=True)
    ids = torch.stack([torch.randperm(num_experts, generator=g)[:K] for _ in range(T)])
    ids[:3, 0] = 0  # an expert with several rows, and (with 5 experts, 20 routes) usually one with none
    w = torch.softmax(torch.randn(T, K, generator=g, dtype=dtype), -1).requires_grad_(True)
    return x, ids, w


LAYOUTS = [
    # (is_transposed, is_concatenated, has_bias, has_gate, has_post_expert_norm, act, fused)
    (False, True, False, True, False, "silu", "swiglu"),  # Mixtral, Qwen, DeepSeek, OLMoE
    (True, True, False, True, False, "silu", "swiglu"),
    (True, True, True, True, False, "silu", "swiglu"),
    (False, True, True, True, True, "silu", "swiglu"),
    (False, True, False, True, False, "gelu", None),  # GeGLU: the module's gate between two GEMMs
    (True, False, True, True, False, "silu", None),  # interleaved (GPT-OSS's layout)
    (False, False, False, True, True, "gelu_pytorch_tanh", None),
    (False, True, False, False, False, "relu2", None),  # NemotronH: no gate, relu^2
    (True, True, True, False, False, "gelu", "gelu"),
    (False, True, False, False, True, "silu", "silu"),
]


@pytest.mark.parametrize("layout", LAYOUTS, ids=lambda c: "-".join(f"{v}" for v in c[:6]))
def test_layouts_match_batched_mm(layout):
    *flags, act, fused = layout
    torch.manual_seed(5)
    module = _experts_class(*flags, act)(_config("batched_mm")).double()
    assert gt.fused_activation(module) == fused
    x, ids, w = _routing(torch.float64)
    ref = _run(module, "batched_mm", x, ids, w)
    got = _run(module, "geomoe", x, ids, w)
    for a, b in zip(got, ref):
        assert _max_rel(a, b) <= 1e-10


def _both_paths(module, x, ids, w, backend):
    """experts_forward through the ops and on its launch plan: output and every gradient of each."""
    g = torch.linspace(-1, 1, x.shape[1], dtype=x.dtype, device=x.device)
    runs = []
    gt._backend.PLANS.clear()  # a plan made here: the planned run is seen to run (plans_built)
    for use_plan in (False, True):
        leaves = [x, w, *module.parameters()]
        for t in leaves:
            t.grad = None
        built = gt._layer_plan.plans_built
        out = gt.experts_forward(module, x, ids, w, backend=backend, use_plan=use_plan)
        (out * g).sum().backward()
        assert (gt._layer_plan.plans_built > built) == use_plan
        runs.append([out.detach()] + [t.grad.clone() for t in leaves])
    return runs


# the fused SwiGLU ([E, out, in] and [E, in, out] with biases), GeGLU and the interleaved columns
# (the module's gate between two grouped GEMMs), relu^2 without a gate (its act_fn between them)
PLAN_LAYOUTS = [LAYOUTS[0], LAYOUTS[2], LAYOUTS[4], LAYOUTS[5], LAYOUTS[7], LAYOUTS[8]]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("layout", PLAN_LAYOUTS, ids=lambda c: "-".join(f"{v}" for v in c[:6]))
def test_planned_path_gives_the_ops_path_bits(layout, dtype):
    """Issue 28 item 4: the backend's eager path (route, the experts, the combine as one
    autograd.Function over a cached launch plan) gives the op path's output and gradients bit for
    bit (the float64 comparison with batched_mm above runs the planned path)."""
    *flags, act, _ = layout
    torch.manual_seed(7)
    module = _experts_class(*flags, act)(_config("geomoe")).to(dtype)
    x, ids, w = _routing(dtype)
    ops, planned = _both_paths(module, x, ids, w, "torch")
    for i, (a, b) in enumerate(zip(ops, planned)):
        assert a.dtype == b.dtype and torch.equal(a, b), (i, (a.double() - b.double()).abs().max())


@pytest.mark.parametrize("layout", [LAYOUTS[2], LAYOUTS[5]], ids=["swiglu", "interleaved"])
def test_planned_path_gives_the_ops_path_bits_on_a_kernel_backend(kernel_backend, layout):
    """The same on the Triton interpreter (float32) and the emulated CUDA core (bf16: its grouped
    GEMM takes no float32), in those tests' processes."""
    *flags, act, _ = layout
    torch.manual_seed(7)
    dtype = torch.float32 if kernel_backend.name == "triton" else torch.bfloat16
    module = _experts_class(*flags, act)(_config("geomoe")).to(dtype).to(kernel_backend.device)
    x, ids, w = (t.detach().to(kernel_backend.device).requires_grad_(t.requires_grad) for t in _routing(dtype))
    ops, planned = _both_paths(module, x, ids, w, kernel_backend.name)
    for i, (a, b) in enumerate(zip(ops, planned)):
        assert a.dtype == b.dtype and torch.equal(a, b), (i, (a.double() - b.double()).abs().max())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("layout", [LAYOUTS[0], LAYOUTS[5]], ids=["swiglu", "interleaved"])
def test_half_precision_within_twice_torch_error(layout, dtype):
    """The output and every gradient within twice the error of transformers' batched_mm in the
    same dtype, both against float64."""
    *flags, act, _ = layout
    torch.manual_seed(6)
    exact = _experts_class(*flags, act)(_config("batched_mm")).double()
    half = copy.deepcopy(exact).to(dtype)
    x, ids, w = _routing(torch.float64)
    ref = _run(exact, "batched_mm", x, ids, w)
    xh, wh = x.detach().to(dtype).requires_grad_(True), w.detach().to(dtype).requires_grad_(True)
    torch_err = [(a.double() - r).abs().max().item() for a, r in zip(_run(half, "batched_mm", xh, ids, wh), ref)]
    ours_err = [(a.double() - r).abs().max().item() for a, r in zip(_run(half, "geomoe", xh, ids, wh), ref)]
    scale = [r.abs().max().item() for r in ref]
    for ours, theirs, s in zip(ours_err, torch_err, scale):
        assert ours <= 2 * theirs + 1e-3 * s, (ours_err, torch_err)


def test_expert_parallel_sentinels_are_honoured():
    """Routes to other ranks' experts (id num_experts, weight 0) add nothing and get no gradient."""
    module = _experts_class(False, True, True, True, False, "silu")(_config("batched_mm")).double()
    module._is_expert_parallel = True
    x, ids, w = _routing(torch.float64)
    ids[::3, 1] = E
    with torch.no_grad():
        w[::3, 1] = 0.0
    ref = _run(module, "batched_mm", x, ids, w)
    got = _run(module, "geomoe", x, ids, w)
    off_rank = ids == E  # batched_mm masks the router's gradient there only in later transformers 5 releases
    assert torch.equal(got[2][off_rank], torch.zeros_like(got[2][off_rank]))
    ref[2] = ref[2].masked_fill(off_rank, 0.0)
    for a, b in zip(got, ref):
        assert _max_rel(a, b) <= 1e-10


def test_autocast_runs_in_the_autocast_dtype():
    module = _experts_class(False, True, False, True, False, "silu")(_config("geomoe"))
    x, ids, w = _routing(torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = module(x, ids, w)
    assert out.dtype == torch.float32
    module.config._experts_implementation = "batched_mm"
    ref = module(x, ids, w)
    assert (out - ref).abs().max() <= 3e-2 * ref.abs().max()


def test_registered_and_register_again():
    assert "geomoe" in ExpertsInterface._global_mapping
    fn = gt.register("geomoe_torch", backend="torch")
    assert ExpertsInterface._global_mapping["geomoe_torch"] is fn
    with pytest.raises(ValueError, match="argument 'backend'"):
        gt.register("geomoe_bad", backend="nope")
    with pytest.raises(ValueError, match="argument 'name'"):
        gt.register("eager")


def test_bad_layouts_say_which_flags():
    module = _experts_class(False, True, True, True, False, "silu")(_config("geomoe"))
    x, ids, w = _routing(torch.float32)
    module.down_proj_bias = None  # has_bias=True without the bias
    with pytest.raises(gt.UnsupportedExpertsLayout, match=r"down_proj_bias.*has_bias=True"):
        module(x, ids, w)
    module = _experts_class(False, True, False, True, False, "silu")(_config("geomoe"))
    module.down_proj = nn.Parameter(torch.randn(E, D + 1, I))
    with pytest.raises(gt.UnsupportedExpertsLayout, match=r"is_transposed=False.*has_gate=True"):
        module(x, ids, w)
    with pytest.raises(ValueError, match="argument 'top_k_weights'"):
        _experts_class(False, True, False, True, False, "silu")(_config("geomoe"))(x, ids, w[:, :1])


@pytest.mark.parametrize("name", list(MODELS))
def test_compiled_model_matches_eager(name):
    """torch.compile(fullgraph=True) over the whole model with the geomoe experts (after prepare():
    the one-time re-layout happens outside the trace): our ops stay whole in the graph, and the
    logits and every gradient match eager's."""
    ref = _build(name, torch.float32)
    ref.set_experts_implementation("eager")
    ours = copy.deepcopy(ref)
    ours.set_experts_implementation("geomoe")
    gt.prepare(ours)
    ids = torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(2))
    want = ref(input_ids=ids, labels=ids)
    want.loss.backward()
    torch._dynamo.reset()
    traced = []

    def backend(gm, example_inputs):  # aot_eager, noting which ops the graph calls
        traced.extend(str(n.target) for n in gm.graph.nodes if n.op == "call_function")
        return torch._dynamo.lookup_backend("aot_eager")(gm, example_inputs)

    got = torch.compile(ours, backend=backend, fullgraph=True)(input_ids=ids, labels=ids)
    got.loss.backward()
    assert any("geomoe" in t for t in traced), "our ops are not in the compiled graph"
    assert _max_rel(got.logits.detach(), want.logits.detach()) <= TOL[torch.float32]
    for (n, p), q in zip(ref.named_parameters(), ours.parameters()):
        assert (p.grad is None) == (q.grad is None), n
        if p.grad is not None:
            assert _max_rel(q.grad, p.grad) <= 1e-4, n


# ---- bf16 by the 2x-torch-error rule; the kernel backends (Triton interpreter, emulated CUDA core) ----


def _logits_and_grads(model, ids):
    model.zero_grad(set_to_none=True)
    out = model(input_ids=ids, labels=ids)
    out.loss.backward()
    return [out.logits.detach().double().cpu()] + [
        (p.grad.double().cpu() if p.grad is not None else torch.zeros(p.shape, dtype=torch.float64)) for p in model.parameters()
    ]


def _within_twice_eager_error(exact, eager, ours, names):
    """Each of ours (logits, then every parameter gradient) within twice the error of eager in the
    same dtype against the float64 model, plus 1e-3 of the exact value's scale (tests/helpers.py)."""
    for n, e, t, o in zip(["logits", *names], exact, eager, ours):
        err, ref_err, scale = (o - e).abs().max().item(), (t - e).abs().max().item(), e.abs().max().item()
        assert err <= 2 * ref_err + 1e-3 * max(scale, 1.0), (n, err, ref_err, scale)


@pytest.mark.parametrize("name", list(MODELS))
def test_bf16_model_within_twice_eager_error(name):
    exact = _build(name, torch.float64)
    exact.set_experts_implementation("eager")
    eager = _build(name, torch.bfloat16)
    eager.set_experts_implementation("eager")
    ours = copy.deepcopy(eager)
    ours.set_experts_implementation("geomoe")
    ids = torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(2))
    names = [n for n, _ in exact.named_parameters()]
    _within_twice_eager_error(*(_logits_and_grads(m, ids) for m in (exact, eager, ours)), names)


# the fused SwiGLU op (Mixtral), and the experts' own gate between two grouped GEMMs with biases (GPT-OSS)
KERNEL_MODELS = ["mixtral", "gpt_oss"]


@pytest.mark.parametrize("name", KERNEL_MODELS)
def test_kernel_backend_model_matches_eager(kernel_backend, name):
    """The "geomoe" experts on a kernel backend: under the Triton interpreter
    (tests/test_triton_interpreter.py's process) in float32, logits and every gradient as eager's and
    the same greedy tokens; through the emulated CUDA core (tests/test_cuda_emulated.py's) in bf16 by
    the 2x-torch-error rule, since its grouped GEMM takes no float32 (nor fuses SwiGLU: Mixtral's
    experts run as two grouped_mm there); on a GPU both."""
    dev = kernel_backend.device
    fn_name = f"geomoe_{kernel_backend.name}"
    gt.register(fn_name, backend=kernel_backend.name)
    ids = torch.randint(0, VOCAB, (2, 6), generator=torch.Generator().manual_seed(2)).to(dev)
    if kernel_backend.name == "triton":
        ref = _build(name, torch.float32).to(dev)
        ref.set_experts_implementation("eager")
        ours = copy.deepcopy(ref)
        ours.set_experts_implementation(fn_name)
        want, got = _logits_and_grads(ref, ids), _logits_and_grads(ours, ids)
        assert _max_rel(got[0], want[0]) <= 1e-5
        for (n, _), a, b in zip(ref.named_parameters(), got[1:], want[1:]):
            assert _max_rel(a, b) <= 1e-4, n
        if name == KERNEL_MODELS[0]:
            with torch.no_grad():
                tokens = [m.generate(ids[:, :3], max_new_tokens=2, do_sample=False, pad_token_id=0) for m in (ref, ours)]
            assert torch.equal(tokens[0], tokens[1])
    if kernel_backend.name == "cuda":
        exact = _build(name, torch.float64)
        exact.set_experts_implementation("eager")
        eager = _build(name, torch.bfloat16).to(dev)
        eager.set_experts_implementation("eager")
        ours = copy.deepcopy(eager)
        ours.set_experts_implementation(fn_name)
        names = [n for n, _ in exact.named_parameters()]
        runs = [_logits_and_grads(exact, ids.cpu()), _logits_and_grads(eager, ids), _logits_and_grads(ours, ids)]
        _within_twice_eager_error(*runs, names)
