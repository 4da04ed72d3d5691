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
