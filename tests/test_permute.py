import pytest
import torch

from geomoe_kernels import permute, route, unpermute
from geomoe_kernels.ops.permute import permute_op, route_op, unpermute_op, unpermute_weight_grad_op
from oracles import naive_route


def _ids(T, k, E):
    return torch.stack([torch.randperm(E)[:k] for _ in range(T)])


@pytest.mark.parametrize("T,k,E", [(1, 1, 1), (13, 2, 5), (50, 3, 23), (7, 3, 3)])
def test_route_equals_naive(T, k, E):
    ids = _ids(T, k, E)
    got = route(ids, E)
    want = naive_route(ids, E)
    for g, w in zip(got, want):
        assert torch.equal(g, w)


def test_route_with_empty_experts_and_all_to_one():
    ids = torch.zeros(9, 1, dtype=torch.int64) + 3
    r2f, f2r, off = route(ids, 6)
    assert off.tolist() == [0, 0, 0, 0, 9, 9, 9]
    assert r2f.tolist() == list(range(9))  # stable


def _naive_permute(x, r2f, k):
    return torch.stack([x[int(f) // k] for f in r2f])


def _naive_unpermute(rows, f2r, k, w, shared):
    T = f2r.numel() // k
    out = torch.zeros(T, rows.shape[1], dtype=rows.dtype)
    for t in range(T):
        for j in range(k):
            out[t] += (1.0 if w is None else w[t, j]) * rows[f2r[t * k + j]]
        if shared is not None:
            out[t] += shared[t]
    return out


@pytest.mark.parametrize("k", [1, 2, 3])
def test_permute_unpermute_match_naive(k):
    T, E, d = 17, 5, 6
    ids = _ids(T, k, E)
    r2f, f2r, _ = route(ids, E)
    x = torch.randn(T, d, dtype=torch.float64)
    rows = permute(x, r2f, f2r, k)
    assert torch.equal(rows, _naive_permute(x, r2f, k))
    w = torch.rand(T, k, dtype=torch.float64)
    shared = torch.randn(T, d, dtype=torch.float64)
    torch.testing.assert_close(unpermute(rows, r2f, f2r, k, w, shared), _naive_unpermute(rows, f2r, k, w, shared), rtol=0, atol=1e-13)
    torch.testing.assert_close(unpermute(rows, r2f, f2r, k), _naive_unpermute(rows, f2r, k, None, None), rtol=0, atol=1e-13)


def test_gradcheck():
    T, k, E, d = 6, 2, 4, 3
    r2f, f2r, _ = route(_ids(T, k, E), E)
    x = torch.randn(T, d, dtype=torch.float64, requires_grad=True)
    w = torch.rand(T, k, dtype=torch.float64, requires_grad=True)
    shared = torch.randn(T, d, dtype=torch.float64, requires_grad=True)

    def f(x, w, shared):
        return unpermute(permute(x, r2f, f2r, k) * 1.5, r2f, f2r, k, w, shared)

    assert torch.autograd.gradcheck(f, (x, w, shared))


def test_unpermute_is_bitwise_deterministic_in_half():
    T, k, E, d = 300, 3, 23, 64
    r2f, f2r, _ = route(_ids(T, k, E), E)
    rows = torch.randn(T * k, d).half()
    w = torch.rand(T, k)
    outs = [unpermute(rows, r2f, f2r, k, w) for _ in range(3)]
    assert all(torch.equal(outs[0], o) for o in outs[1:])
    assert outs[0].dtype == torch.float16


def test_stride_zero_gradient_is_handled():
    T, k, E, d = 5, 2, 3, 4
    r2f, f2r, _ = route(_ids(T, k, E), E)
    x = torch.randn(T, d, dtype=torch.float64, requires_grad=True)
    w = torch.rand(T, k, dtype=torch.float64)
    unpermute(permute(x, r2f, f2r, k), r2f, f2r, k, w).sum().backward()  # .sum() sends an expanded grad
    torch.testing.assert_close(x.grad, w.sum(1, keepdim=True).expand(T, d))


def test_opcheck():
    T, k, E, d = 10, 3, 4, 5
    ids = _ids(T, k, E)
    torch.library.opcheck(route_op, (ids, E))
    r2f, f2r, _ = route_op(ids, E)
    x = torch.randn(T, d)
    w = torch.rand(T, k)
    torch.library.opcheck(permute_op, (x, r2f, k, None))
    torch.library.opcheck(permute_op, (x, r2f, k, w))
    rows = torch.randn(T * k, d)
    torch.library.opcheck(unpermute_op, (rows, f2r, k, w, torch.randn(T, d)))
    torch.library.opcheck(unpermute_op, (rows, f2r, k, None, None))
    torch.library.opcheck(unpermute_weight_grad_op, (torch.randn(T, d), rows, f2r, k))
