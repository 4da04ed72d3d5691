import pytest
import torch

from geomoe_kernels import grouped_mm
from geomoe_kernels.ops.grouped_gemm import grouped_mm_backward_op, grouped_mm_op
from oracles import naive_grouped_mm

ACTS = ["none", "gelu", "silu", "swiglu"]


def _offsets(counts):
    return torch.tensor([0] + torch.tensor(counts).cumsum(0).tolist(), dtype=torch.int64)


@pytest.fixture(params=["host_loop", "vectorised"])
def path(request, monkeypatch):
    """The reference's two ways on CPU tensors: the per-expert loop on host-read offsets (what the
    CPU runs) and the vectorised sync-free paths (what other devices run), forced here."""
    from geomoe_kernels.reference import grouped_gemm as ref

    if request.param == "vectorised":
        monkeypatch.setattr(ref, "host_loop", lambda x: False)
    return request.param


CASES = {
    "uneven": [5, 0, 17, 1, 9],
    "all_to_one": [0, 0, 31, 0],
    "one_row": [0, 1, 0],
    "empty_first_last": [0, 12, 7, 0],
    "odd_100": [13, 40, 0, 47],
}


@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("with_bias", [True, False])
def test_forward_and_grads_match_per_expert_loop(act, case, with_bias, path):
    counts = CASES[case]
    E, K, N = len(counts), 6, 8
    M = sum(counts)
    off = _offsets(counts)
    x = torch.randn(M, K, dtype=torch.float64, requires_grad=True)
    w = torch.randn(E, K, N, dtype=torch.float64, requires_grad=True)
    b = torch.randn(E, N, dtype=torch.float64, requires_grad=True) if with_bias else None
    got = grouped_mm(x, w, off, b, act)
    want = naive_grouped_mm(x, w, off, b, act)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-12)
    g = torch.randn_like(want)
    params = [x, w] + ([b] if with_bias else [])
    g_got = torch.autograd.grad(got, params, g)
    g_want = torch.autograd.grad(want, params, g, allow_unused=True)
    for a, bb in zip(g_got, g_want):
        torch.testing.assert_close(a, torch.zeros_like(a) if bb is None else bb, rtol=0, atol=1e-11)


def test_empty_experts_get_exact_zero_gradients(path):
    counts = [4, 0, 6, 0]
    off = _offsets(counts)
    x = torch.randn(10, 5, requires_grad=True)
    w = torch.randn(4, 5, 6, requires_grad=True)
    b = torch.randn(4, 6, requires_grad=True)
    grouped_mm(x, w, off, b, "gelu").pow(2).sum().backward()
    for e in (1, 3):
        assert torch.equal(w.grad[e], torch.zeros(5, 6))
        assert torch.equal(b.grad[e], torch.zeros(6))
    assert w.grad[0].abs().sum() > 0 and w.grad[2].abs().sum() > 0


def test_gradcheck_each_activation():
    off = _offsets([2, 0, 3])
    for act in ACTS:
        x = torch.randn(5, 3, dtype=torch.float64, requires_grad=True)
        w = torch.randn(3, 3, 4, dtype=torch.float64, requires_grad=True)
        b = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
        assert torch.autograd.gradcheck(lambda x, w, b: grouped_mm(x, w, off, b, act), (x, w, b))


def test_half_precision_close_to_float64():
    off = _offsets([30, 0, 50, 20])
    x = torch.randn(100, 16)
    w = torch.randn(4, 16, 24) / 4
    got = grouped_mm(x.half(), w.half(), off, None, "gelu").double()
    want = naive_grouped_mm(x.double(), w.double(), off, None, "gelu")
    torch.testing.assert_close(got, want, rtol=2e-2, atol=1.4e-2)  # ANCHORS: low-precision forward


def test_opcheck():
    off = _offsets([3, 0, 4])
    x = torch.randn(7, 4)
    w = torch.randn(3, 4, 6)
    b = torch.randn(3, 6)
    for act in ACTS:
        torch.library.opcheck(grouped_mm_op, (x, w, off, b, act))
    torch.library.opcheck(grouped_mm_op, (x, w, off, None, "none"))
    out, pre = grouped_mm_op(x, w, off, b, "swiglu")
    torch.library.opcheck(grouped_mm_backward_op, (torch.randn(7, 3), x, w, off, pre, "swiglu"))
    torch.library.opcheck(grouped_mm_backward_op, (torch.randn(7, 6), x, w, off, None, "none"))


@pytest.mark.parametrize("stock", [True, False])
@pytest.mark.parametrize("act", ACTS)
def test_float32_both_paths_match_float64_loop(monkeypatch, stock, act):
    """Off the CPU's host loop, float32 runs torch._grouped_mm (aligned rows) or the tiled batched
    matmul; both match the loop."""
    from geomoe_kernels.reference import grouped_gemm as ref

    monkeypatch.setattr(ref, "host_loop", lambda x: False)
    counts = [9, 0, 30, 1, 0, 12]
    off = _offsets(counts)
    x = torch.randn(sum(counts), 16, requires_grad=True)
    w = torch.randn(6, 16, 24, requires_grad=True)
    b = torch.randn(6, 24, requires_grad=True)
    assert ref.use_stock(x, w)
    if not stock:
        monkeypatch.setattr(ref, "use_stock", lambda *_: False)
    got = grouped_mm(x, w, off, b, act)
    want = naive_grouped_mm(x.double(), w.double(), off, b.double(), act)
    torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-4)
    g = torch.randn_like(want)
    grads = torch.autograd.grad(got, (x, w, b), g.float())
    grads_want = torch.autograd.grad(want, (x, w, b), g, allow_unused=True)
    for a, bb in zip(grads, grads_want):
        torch.testing.assert_close(a.double(), bb.double(), rtol=1e-4, atol=1e-4)
    for e in (1, 4):  # empty experts: exactly zero, whichever path
        assert torch.equal(grads[1][e], torch.zeros(16, 24)) and torch.equal(grads[2][e], torch.zeros(24))


def test_gathered_rows_equal_a_permuted_copy_and_opcheck():
    from geomoe_kernels import route

    T, k, E = 9, 2, 4
    ids = torch.stack([torch.randperm(E)[:k] for _ in range(T)])
    r2f, f2r, off = route(ids, E)
    x = torch.randn(T, 6, dtype=torch.float64, requires_grad=True)
    w = torch.randn(E, 6, 8, dtype=torch.float64, requires_grad=True)
    b = torch.randn(E, 8, dtype=torch.float64, requires_grad=True)
    got = grouped_mm(x, w, off, b, "silu", gather=r2f, flat_to_row=f2r, top_k=k)
    want = naive_grouped_mm(x[r2f // k], w, off, b, "silu")
    torch.testing.assert_close(got, want, rtol=0, atol=1e-12)
    assert torch.autograd.gradcheck(lambda x, w, b: grouped_mm(x, w, off, b, "silu", gather=r2f, flat_to_row=f2r, top_k=k), (x, w, b))
    xf = x.detach().float()
    torch.library.opcheck(grouped_mm_op, (xf, w.detach().float(), off, None, "gelu", r2f, k))
    _, pre = grouped_mm_op(xf, w.detach().float(), off, None, "gelu", r2f, k)
    torch.library.opcheck(grouped_mm_backward_op, (torch.randn(T * k, 8), xf, w.detach().float(), off, pre, "gelu", r2f, k))
