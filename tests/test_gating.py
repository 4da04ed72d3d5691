import pytest
import torch

from geomoe_kernels import topk_gating
from geomoe_kernels.ops.gating import topk_gating_backward_op, topk_gating_op
from oracles import naive_gating


@pytest.mark.parametrize("score_func", ["sigmoid", "softmax"])
@pytest.mark.parametrize("renormalize", [True, False])
@pytest.mark.parametrize("k", [1, 2, 3])
@pytest.mark.parametrize("with_bias", [False, True])
def test_matches_naive_loop(score_func, renormalize, k, with_bias):
    logits = torch.randn(37, 7, dtype=torch.float64)
    bias = 0.1 * torch.randn(7, dtype=torch.float64) if with_bias else None
    got = topk_gating(logits, bias, k, score_func, renormalize, backend="torch")
    want = naive_gating(logits, bias, k, score_func, renormalize)
    assert torch.equal(got[1], want[1])
    assert torch.equal(got[2], want[2])
    torch.testing.assert_close(got[0], want[0], rtol=0, atol=1e-14)
    torch.testing.assert_close(got[3], want[3], rtol=0, atol=1e-14)


def test_bias_changes_selection_not_weights():
    logits = torch.tensor([[2.0, 1.0, 0.0]], dtype=torch.float64)
    bias = torch.tensor([0.0, 0.0, 10.0], dtype=torch.float64)
    w, ids, counts, _ = topk_gating(logits, bias, 1, "sigmoid", False)
    assert ids.tolist() == [[2]]
    assert counts.tolist() == [0, 0, 1]
    torch.testing.assert_close(w, torch.sigmoid(torch.tensor([[0.0]], dtype=torch.float64)))


def test_ties_pick_the_lower_expert():
    logits = torch.zeros(4, 6)
    _, ids, _, _ = topk_gating(logits, None, 3)
    assert ids.tolist() == [[0, 1, 2]] * 4


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
        torch.library.opcheck(topk_gating_op, (logits, bias, 3, sf, True))
        torch.library.opcheck(topk_gating_op, (logits, None, 1, sf, False))
    ids = topk_gating_op(logits, bias, 3, "sigmoid", True)[1]
    torch.library.opcheck(topk_gating_backward_op, (torch.randn(11, 3), torch.randn(6), logits, ids, "sigmoid", True))
    torch.library.opcheck(topk_gating_backward_op, (None, torch.randn(6), logits, ids, "softmax", False))
