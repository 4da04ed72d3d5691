"""The MoE layer plan's fused gating + routing (kernel_recipes.gate_route: the gating kernel writes the
per-block expert histograms and, in its last block, the load, prob_mean, aux loss, offsets and each
block's starts; the scatter places the entries from those), on each kernel backend (the Triton
interpreter, the emulated CUDA core) against the float64 reference gating and a per-entry routing
loop; its backward against autograd through the float64 reference."""

import pytest
import torch

from geomoe_kernels import kernel_recipes as recipe
from geomoe_kernels.reference import gating as ref
from tests.oracles import naive_route

# (T, E, k, S, score, renormalize): several blocks (8 tokens a block on both backends here) with a
# partial last one, a single token, more experts than the gating tile's columns (E + S past pow2(E)),
# the LLM's softmax without shared experts
CASES = [
    (37, 23, 3, 1, "sigmoid", True),
    (21, 10, 8, 0, "softmax", True),
    (19, 32, 2, 1, "sigmoid", False),
    (1, 1, 1, 0, "softmax", True),
    (26, 6, 2, 2, "softmax", False),
]


def _kernels(backend):
    if backend.name == "triton":
        from geomoe_kernels.triton.gating import TritonGateRoute

        return TritonGateRoute()
    from geomoe_kernels.cuda import CudaGateRoute

    return CudaGateRoute()


def _inputs(T, E, score):
    logits = 2 * torch.randn(T, E)
    bias = 0.3 * torch.randn(E) if score == "sigmoid" else None
    return logits, bias


def _reference(logits, bias, k, S, score, renorm, coef):
    T, E = logits.shape
    w, ids, load, pm = ref.topk_gating(logits.double(), None if bias is None else bias.double(), k, score, renorm)
    ids_all = torch.cat([ids, torch.arange(E, E + S).expand(T, S)], 1)
    w_all = torch.cat([w, torch.ones(T, S, dtype=w.dtype)], 1)
    return w_all, ids_all, load, pm, (pm * load.double() * coef).sum()


@pytest.mark.parametrize("T,E,k,S,score,renorm", CASES)
def test_gate_route_equals_the_reference(kernel_backend, T, E, k, S, score, renorm):
    dev = kernel_backend.device
    logits, bias = _inputs(T, E, score)
    coef = E / (k * max(T, 1))
    ticket = torch.zeros(1, dtype=torch.int32, device=dev)
    run = lambda: recipe.gate_route(  # noqa: E731
        _kernels(kernel_backend), logits.to(dev), None if bias is None else bias.to(dev), k, S, score, renorm, coef, ticket
    )
    out = run()
    w, ids, load, pm, aux = _reference(logits, bias, k, S, score, renorm, coef)
    assert torch.equal(out["ids"].cpu(), ids)
    torch.testing.assert_close(out["weights"].cpu().double(), w, rtol=1e-6, atol=1e-7)
    assert torch.equal(out["load"].cpu(), load)
    torch.testing.assert_close(out["prob_mean"].cpu().double(), pm, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(out["aux"].cpu().double(), aux, rtol=1e-6, atol=1e-7)
    for got, want in zip((out["row_to_flat"], out["flat_to_row"], out["offsets"]), naive_route(ids, E + S)):
        assert torch.equal(got.cpu(), want)
    assert int(ticket.item()) == 0  # the last block put the ticket back
    again = run()  # deterministic: the same bits, the ticket reused
    for name in ("weights", "ids", "load", "prob_mean", "aux", "row_to_flat", "flat_to_row", "offsets"):
        assert torch.equal(again[name], out[name]), name


def test_gate_route_without_tokens(kernel_backend):
    out = recipe.gate_route(
        _kernels(kernel_backend), torch.randn(0, 5, device=kernel_backend.device), None, 2, 1, "softmax", True, 0.5,
        torch.zeros(1, dtype=torch.int32, device=kernel_backend.device),
    )  # fmt: skip
    assert out["weights"].shape == (0, 3) and out["row_to_flat"].numel() == 0
    assert out["load"].tolist() == [0] * 5 and out["offsets"].tolist() == [0] * 7
    assert out["prob_mean"].tolist() == [0.0] * 5 and out["aux"].item() == 0.0


def test_gate_route_on_nonfinite_logits(kernel_backend):
    """NaN logits are chosen after every number, +-inf ordered as numbers (as the gating op): the
    routing maps stay a permutation and the counts whole."""
    T, E, k, S = 17, 7, 3, 1
    logits, bias = _inputs(T, E, "sigmoid")
    logits[0, :] = float("nan")
    logits[1, 2] = float("inf")
    logits[2, :4] = float("-inf")
    dev = kernel_backend.device
    out = recipe.gate_route(
        _kernels(kernel_backend), logits.to(dev), bias.to(dev), k, S, "sigmoid", False, 1.0,
        torch.zeros(1, dtype=torch.int32, device=dev),
    )  # fmt: skip
    _, ids, load, _ = ref.topk_gating(logits.double(), bias.double(), k, "sigmoid", False)
    ids_all = torch.cat([ids, torch.full((T, S), E)], 1)
    assert torch.equal(out["ids"].cpu(), ids_all) and torch.equal(out["load"].cpu(), load)
    for got, want in zip((out["row_to_flat"], out["flat_to_row"], out["offsets"]), naive_route(ids_all, E + S)):
        assert torch.equal(got.cpu(), want)


@pytest.mark.parametrize("T,E,k,S,score,renorm", CASES[:3] + CASES[4:])
@pytest.mark.parametrize("with_weights", [True, False])
def test_gate_route_backward_equals_autograd_of_the_reference(kernel_backend, T, E, k, S, score, renorm, with_weights):
    """d logits of <gw, weights> + g_aux * aux: the first k columns of the weights' gradient read
    (the shared experts' columns hold values that must not count), aux through prob_mean."""
    dev = kernel_backend.device
    logits, bias = _inputs(T, E, score)
    coef = E / (k * T)
    kernels = _kernels(kernel_backend)
    out = recipe.gate_route(
        kernels, logits.to(dev), None if bias is None else bias.to(dev), k, S, score, renorm, coef,
        torch.zeros(1, dtype=torch.int32, device=dev),
    )  # fmt: skip
    gw = torch.randn(T, k + S)
    g_aux = torch.tensor(0.7)
    got = kernels.gating_backward(
        gw.to(dev) if with_weights else None, logits.to(dev), out["ids"], k, out["load"], g_aux.to(dev), coef, score, renorm
    )
    x = logits.double().requires_grad_(True)
    w, ids, load, pm = ref.topk_gating(x, None if bias is None else bias.double(), k, score, renorm)
    loss = g_aux.double() * (pm * load.double() * coef).sum()
    if with_weights:
        loss = loss + (w * gw[:, :k].double()).sum()
    (want,) = torch.autograd.grad(loss, x)
    torch.testing.assert_close(got.cpu().double(), want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("shared", [True, False])
@pytest.mark.parametrize("biases", [True, False])
def test_weight_pack_gives_the_concatenation_and_cast_bits(kernel_backend, shared, biases):
    """nn/_layer_plan._pack_views on the backend's one-launch pack: the routed and shared w1, b1,
    w2, b2 (float32) stacked [E + S, ...] in half precision, the same bits as a concatenation and a
    cast each; absent biases stay None. (Their gradients come back from the layer's Function in
    float32 as views, no launch: tests/test_layer_plan.py.)"""
    from geomoe_kernels.nn._layer_plan import _pack_views

    dev, E, S, d, h = kernel_backend.device, 5, 2, 6, 4
    half = torch.bfloat16 if torch.bfloat16 in kernel_backend.dtypes else torch.float16
    torch.manual_seed(1)
    shapes = [(E, d, h), (S, d, h), (E, h), (S, h), (E, h, d), (S, h, d), (E, d), (S, d)]
    ps = [torch.randn(s, device=dev) for s in shapes]
    for i in range(len(ps)):
        if (not shared and i % 2) or (not biases and i in (2, 3, 6, 7)):
            ps[i] = None  # type: ignore[call-overload]
    packed = _pack_views(_kernels(kernel_backend).pack, half, *ps)
    pairs = [(ps[i], ps[i + 1]) for i in range(0, 8, 2)]
    want = [None if r is None else (r if s is None else torch.cat([r, s])).to(half) for r, s in pairs]
    for got, w in zip(packed, want):
        assert (got is None) == (w is None) and (w is None or torch.equal(got, w))


def test_scatter_and_pack_kernels_compile_for_a_gpu():
    """The fused pair's scatter and the weight pack lowered to an sm_90 cubin without a GPU (the
    gating kernel's own: tests/ops/test_topk_gating.py): the interpreter takes code ptxas refuses."""
    import os

    triton = pytest.importorskip("triton")
    if os.environ.get("TRITON_INTERPRET") == "1":
        pytest.skip("the interpreter's process: the kernels are not JIT functions here")
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from geomoe_kernels.triton import _pack, permute

    pack_types = {f"S{i}": "*fp32" for i in range(8)}
    pack_types.update({f"{c}{i}": "i64" for c in "onf" for i in range(8)}, Out="*bf16")
    for fn, types, const in (
        (permute._gate_scatter_kernel, dict(n="i64", EA="i32"), dict(NB=256, EAP=32, CH=256)),
        (_pack._pack_kernel, pack_types, dict(NSEG=8, BLOCK=1024)),
    ):
        signature = {n: "constexpr" if n in const else types.get(n, "*i64") for n in fn.arg_names}
        where = {(fn.arg_names.index(n),): v for n, v in const.items()}
        cubin = triton.compile(ASTSource(fn=fn, signature=signature, constexprs=where), target=GPUTarget("cuda", 90, 32))
        assert cubin.asm["cubin"]


def test_the_ticket_is_per_stream_outlives_the_plans_and_is_put_back_after_a_failed_launch():
    """The fused gating kernel's ticket: one per (device, stream), not per plan (layers of one
    configuration share a plan; a graph keeps the address after the plans are dropped), and zero
    again when a launch fails part-way (a leftover count would elect every later launch's last block
    early, and the scatter would then write through wrong offsets)."""
    from geomoe_kernels import backend
    from geomoe_kernels.nn import _layer_plan

    dev = torch.device("cpu")
    t = _layer_plan._ticket(dev)
    backend.forget()
    assert _layer_plan._ticket(dev) is t

    class Failing:
        def tokens_per_block(self, num_experts, slots):
            return 4

        def gate(self, logits, bias, top_k, shared, softmax, renormalize, aux_coef, ticket, out):
            ticket += 3  # blocks counted, then the launch fails
            raise RuntimeError("launch failed")

    with pytest.raises(RuntimeError, match="launch failed"):
        recipe.gate_route(Failing(), torch.randn(8, 4), None, 2, 0, "sigmoid", True, None, t)
    assert int(t) == 0
