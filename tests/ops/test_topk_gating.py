"""topk_gating: the reference against a per-token loop in float64; every backend against the
reference in float32 (ids and counts exactly); opcheck; argument errors."""

import pytest
import torch

from geomoe_kernels import BackendUnavailable, OpInputError, topk_gating
from geomoe_kernels.ops.gating import topk_gating_backward
from tests.helpers import TOL
from tests.oracles import naive_gating


@pytest.mark.parametrize("score_func", ["sigmoid", "softmax"])
@pytest.mark.parametrize("renormalize", [True, False])
@pytest.mark.parametrize("k", [1, 2, 3])
@pytest.mark.parametrize("with_bias", [False, True])
def test_reference_matches_naive_loop(score_func, renormalize, k, with_bias):
    logits = torch.randn(37, 7, dtype=torch.float64)
    bias = 0.1 * torch.randn(7, dtype=torch.float64) if with_bias else None
    got = topk_gating(logits, bias, k, score_func, renormalize, backend="torch")
    want = naive_gating(logits, bias, k, score_func, renormalize)
    assert torch.equal(got[1], want[1])
    assert torch.equal(got[2], want[2])
    torch.testing.assert_close(got[0], want[0], rtol=0, atol=1e-14)
    torch.testing.assert_close(got[3], want[3], rtol=0, atol=1e-14)


@pytest.mark.parametrize("score_func", ["sigmoid", "softmax"])
@pytest.mark.parametrize("renormalize", [True, False])
@pytest.mark.parametrize("k", [1, 3])
def test_backend_matches_reference(backend, score_func, renormalize, k):
    dev = backend.device
    logits = torch.randn(37, 7, device=dev, requires_grad=True)
    bias = 0.1 * torch.randn(7, device=dev) if score_func == "sigmoid" else None
    got = topk_gating(logits, bias, k, score_func, renormalize, backend=backend.name)
    # against the float64 reference (itself checked against the loop above), not the float32 one:
    # where the reference is the only backend (the main CPU process) that is no self-comparison
    logits64 = logits.detach().double().requires_grad_(True)
    want = topk_gating(logits64, None if bias is None else bias.double(), k, score_func, renormalize, backend="torch")
    assert torch.equal(got[1], want[1]) and torch.equal(got[2], want[2])
    torch.testing.assert_close(got[0].double(), want[0], **TOL[torch.float32])
    torch.testing.assert_close(got[3].double(), want[3], **TOL[torch.float32])
    gw, gp = torch.randn(37, k, device=dev), torch.randn(7, device=dev)
    g_got = torch.autograd.grad((got[0] * gw).sum() + (got[3] * gp).sum(), logits)[0]
    g_want = torch.autograd.grad((want[0] * gw.double()).sum() + (want[3] * gp.double()).sum(), logits64)[0]
    torch.testing.assert_close(g_got.double(), g_want, **TOL[torch.float32])


def test_ties_pick_the_lower_expert(backend):
    _, ids, counts, _ = topk_gating(torch.zeros(5, 6, device=backend.device), None, 3, backend=backend.name)
    assert ids.tolist() == [[0, 1, 2]] * 5 and counts.tolist() == [5, 5, 5, 0, 0, 0]


def test_bias_changes_selection_not_weights():
    logits = torch.tensor([[2.0, 1.0, 0.0]], dtype=torch.float64)
    bias = torch.tensor([0.0, 0.0, 10.0], dtype=torch.float64)
    w, ids, counts, _ = topk_gating(logits, bias, 1, "sigmoid", False)
    assert ids.tolist() == [[2]]
    assert counts.tolist() == [0, 0, 1]
    torch.testing.assert_close(w, torch.sigmoid(torch.tensor([[0.0]], dtype=torch.float64)))


@pytest.mark.parametrize("score_func", ["sigmoid", "softmax"])
@pytest.mark.parametrize("renormalize", [True, False])
def test_gradcheck(score_func, renormalize):
    logits = torch.randn(9, 5, dtype=torch.float64, requires_grad=True)
    bias = 0.05 * torch.randn(5, dtype=torch.float64)

    def f(l):
        w, _, _, p = topk_gating(l, bias, 2, score_func, renormalize)
        return w, p

    assert torch.autograd.gradcheck(f, (logits,))


def test_weights_float32_under_float32_logits():
    w, ids, counts, p = topk_gating(torch.randn(5, 4), None, 2)
    assert (w.dtype, ids.dtype, counts.dtype, p.dtype) == (torch.float32, torch.int64, torch.int64, torch.float32)
    torch.testing.assert_close(w.sum(-1), torch.ones(5))


def test_opcheck():
    logits = torch.randn(11, 6)
    bias = torch.randn(6)
    for sf in ("sigmoid", "softmax"):
        torch.library.opcheck(topk_gating.op, (logits, bias, 3, sf, True))
        torch.library.opcheck(topk_gating.op, (logits, None, 1, sf, False))
    ids = topk_gating(logits, bias, 3, "sigmoid", True)[1]
    torch.library.opcheck(topk_gating_backward.op, (torch.randn(11, 3), torch.randn(6), logits, ids, "sigmoid", True))
    torch.library.opcheck(topk_gating_backward.op, (None, torch.randn(6), logits, ids, "softmax", False))


def test_k_larger_than_experts():
    with pytest.raises(OpInputError, match=r"topk_gating: argument 'top_k' expected 1 <= top_k <= 4.*got 5"):
        topk_gating(torch.randn(3, 4), None, 5)


def test_nan_scores():
    logits = torch.randn(6, 4)
    logits[2, 1] = float("nan")
    with pytest.raises(OpInputError, match=r"'logits' expected finite values, got 1 NaN/Inf"):
        topk_gating(logits, None, 2)


def test_wrong_dtype_device_and_choice():
    with pytest.raises(OpInputError, match=r"'logits' expected dtype float32/float64, got torch.float16"):
        topk_gating(torch.randn(3, 4).half(), None, 2, "sigmoid", True)
    with pytest.raises(OpInputError, match=r"'bias' expected a tensor on cpu .*got one on meta"):
        topk_gating(torch.randn(3, 4), torch.zeros(4, device="meta"), 2, "sigmoid", True)
    with pytest.raises(OpInputError, match="score_func"):
        topk_gating(torch.randn(3, 4), None, 2, "tanh")


@pytest.mark.skipif(torch.cuda.is_available(), reason="Triton runs CPU tensors only under the interpreter")
def test_triton_on_cpu_tensors_says_why():
    with pytest.raises(BackendUnavailable, match=r"topk_gating: backend 'triton' cannot run here"):
        topk_gating(torch.randn(3, 4), None, 2, backend="triton")
