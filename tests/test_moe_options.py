"""MoEMLP's options for the MoE layers of LLMs (no biases, softmax-then-top-k with or without
renormalisation, a routed scaling factor, group-limited top-k, a sigmoid-gated shared expert,
interleaved SwiGLU, 256 experts at top-8), each against a naive per-token loop in float64: the output,
the aux loss, the load, and the gradient of the input and of every parameter."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from geomoe_kernels import MoEMLP


def _act(moe: MoEMLP, h: torch.Tensor) -> torch.Tensor:
    if moe.activation == "swiglu":
        gate, up = (h[..., ::2], h[..., 1::2]) if moe.swiglu_layout == "interleaved" else h.chunk(2, -1)
        return F.silu(gate) * up
    return F.gelu(h) if moe.activation == "gelu" else F.silu(h)


def _expert(moe: MoEMLP, x, w1, b1, w2, b2):
    h = x @ w1 + (0 if b1 is None else b1)
    return _act(moe, h) @ w2 + (0 if b2 is None else b2)


def naive(moe: MoEMLP, x: torch.Tensor):
    """One token at a time, selection with Python sorts (larger first, lower id first among ties)."""
    E, k, T = moe.num_experts, moe.top_k, x.shape[0]
    logits = x @ moe.gate.weight.t() + (0 if moe.gate.bias is None else moe.gate.bias)
    scores = torch.sigmoid(logits) if moe.score_func == "sigmoid" else torch.softmax(logits, -1)
    ys, load = [], torch.zeros(E, dtype=torch.int64)
    sd = scores.detach()
    for t in range(T):
        select = [float(sd[t, e]) + (float(moe.expert_bias[e]) if moe.score_func == "sigmoid" else 0.0) for e in range(E)]
        eligible = list(range(E))
        if moe.n_group > 1:
            size = E // moe.n_group
            group_score = [sum(sorted(select[g * size : (g + 1) * size], reverse=True)[:2]) for g in range(moe.n_group)]
            groups = sorted(range(moe.n_group), key=lambda g: (-group_score[g], g))[: moe.topk_group]
            eligible = [e for e in range(E) if e // size in groups]
        ids = sorted(eligible, key=lambda e: (-select[e], e))[:k]
        w = torch.stack([scores[t, e] for e in ids])
        if moe.renormalize:
            w = w / w.sum()
        w = w * moe.routed_scaling_factor
        y = sum(
            w[j]
            * _expert(
                moe, x[t], moe.w1[e], None if moe.b1 is None else moe.b1[e], moe.w2[e], None if moe.b2 is None else moe.b2[e]
            )
            for j, e in enumerate(ids)
        )
        if moe.num_shared_experts:
            sb1 = [None if moe.shared_b1 is None else moe.shared_b1[s] for s in range(moe.num_shared_experts)]
            sb2 = [None if moe.shared_b2 is None else moe.shared_b2[s] for s in range(moe.num_shared_experts)]
            shared = sum(
                _expert(moe, x[t], moe.shared_w1[s], sb1[s], moe.shared_w2[s], sb2[s]) for s in range(moe.num_shared_experts)
            )
            if moe.shared_gate is not None:
                shared = shared * torch.sigmoid(x[t] @ moe.shared_gate.weight[0])
            y = y + shared
        ys.append(y)
        for e in ids:
            load[e] += 1
    prob_mean = (scores / scores.sum(-1, keepdim=True)).mean(0)
    aux = (prob_mean * load.double() * (E / (k * T))).sum()
    return torch.stack(ys), aux, load


CASES = {
    # no biases anywhere, softmax then top-k, weights not renormalised (Qwen3-MoE's norm_topk_prob=False)
    "no-bias-softmax-topk": dict(
        num_experts=6,
        num_shared_experts=0,
        top_k=2,
        score_func="softmax",
        renormalize=False,
        activation="swiglu",
        bias=False,
        gate_bias=False,
    ),
    # softmax then top-k renormalised (Mixtral), GELU experts without bias
    "softmax-renorm-gelu": dict(
        num_experts=5, num_shared_experts=0, top_k=3, score_func="softmax", renormalize=True, activation="gelu", bias=False
    ),
    # DeepSeek-V3: sigmoid + bias selection, 4 groups of 4, 2 groups kept, top-4, scaling 2.5, one shared expert
    "deepseek-v3": dict(
        num_experts=16,
        num_shared_experts=1,
        top_k=4,
        score_func="sigmoid",
        renormalize=True,
        activation="swiglu",
        bias=False,
        gate_bias=False,
        n_group=4,
        topk_group=2,
        routed_scaling_factor=2.5,
    ),
    # Qwen2-MoE: softmax top-k without renormalisation, a shared expert behind a sigmoid gate
    "qwen2-moe-shared-gate": dict(
        num_experts=6,
        num_shared_experts=1,
        top_k=2,
        score_func="softmax",
        renormalize=False,
        activation="swiglu",
        bias=False,
        gate_bias=False,
        shared_gate=True,
    ),
    # GPT-OSS's column order for SwiGLU, with biases
    "interleaved-swiglu": dict(
        num_experts=6,
        num_shared_experts=1,
        top_k=2,
        score_func="softmax",
        renormalize=True,
        activation="swiglu",
        swiglu_layout="interleaved",
    ),
    # the LLM fast-path sizes: 256 experts at top-8
    "256-experts-top-8": dict(
        num_experts=256, num_shared_experts=0, top_k=8, score_func="softmax", renormalize=True, activation="swiglu", bias=False
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_option_matches_naive_loop(case):
    torch.manual_seed(0)
    moe = MoEMLP(8, 6, **CASES[case]).double()
    with torch.no_grad():  # every parameter and the bias buffer non-trivial
        for p in moe.parameters():
            p.copy_(torch.randn_like(p) * 0.5)
        moe.expert_bias.copy_(torch.randn_like(moe.expert_bias) * 0.1)
    x = torch.randn(2, 7, 8, dtype=torch.float64)
    xa, xb = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    y, aux, load = moe(xa)
    y_ref, aux_ref, load_ref = naive(moe, xb.reshape(-1, 8))
    assert torch.equal(load, load_ref)
    torch.testing.assert_close(y.reshape(-1, 8), y_ref, rtol=0, atol=1e-12)
    torch.testing.assert_close(aux, aux_ref, rtol=0, atol=1e-12)
    g = torch.randn_like(y_ref)
    ours = torch.autograd.grad((y.reshape(-1, 8) * g).sum() + aux, [xa, *moe.parameters()])
    ref = torch.autograd.grad((y_ref * g).sum() + aux_ref, [xb, *moe.parameters()], allow_unused=True)
    for (name, _), a, b in zip([("x", None), *moe.named_parameters()], ours, ref):
        torch.testing.assert_close(
            a, b if b is not None else torch.zeros_like(a), rtol=0, atol=1e-11, msg=lambda m: f"{name}: {m}"
        )


def test_no_bias_leaves_no_parameters():
    moe = MoEMLP(8, 6, num_experts=4, num_shared_experts=1, top_k=2, bias=False, gate_bias=False)
    names = {n for n, _ in moe.named_parameters()}
    assert names == {"gate.weight", "w1", "w2", "shared_w1", "shared_w2"}
    assert "bias=False" in repr(moe)


def test_defaults_stay_geomoe():
    moe = MoEMLP(8)
    assert moe.bias and moe.gate.bias is not None and moe.routed_scaling_factor == 1.0
    assert (moe.n_group, moe.topk_group, moe.shared_gate, moe.swiglu_layout) == (1, 1, None, "concat")


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(n_group=3), "argument 'n_group'"),
        (dict(n_group=2, topk_group=3), "argument 'topk_group'"),
        (dict(n_group=4, topk_group=1, top_k=4), "argument 'topk_group'"),
        (dict(swiglu_layout="zigzag"), "argument 'swiglu_layout'"),
        (dict(routed_scaling_factor=0.0), "argument 'routed_scaling_factor'"),
        (dict(shared_gate=True, num_shared_experts=0), "argument 'shared_gate'"),
    ],
)
def test_bad_options_are_named(kwargs, match):
    args = dict(num_experts=8, top_k=2)
    with pytest.raises(ValueError, match=match):
        MoEMLP(8, 6, **{**args, **kwargs})
