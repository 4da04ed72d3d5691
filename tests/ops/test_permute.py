"""permute (gather into expert-major rows): against a per-row loop, on every backend; its
backward is unpermute (and, for the routing weights, unpermute_weight_grad)."""

import pytest
import torch

from geomoe_kernels import OpInputError, permute, route
from geomoe_kernels.ops.permute import permute_op
from tests.helpers import assert_backend_close, assert_close, expert_ids


def _naive_permute(x, r2f, k, w=None):
    return torch.stack([x[int(f) // k] * (1.0 if w is None else w.reshape(-1)[int(f)]) for f in r2f])


@pytest.mark.parametrize("k", [1, 2, 3])
def test_reference_matches_naive(k):
    T, E, d = 17, 5, 6
    r2f, f2r, _ = route(expert_ids(T, k, E), E)
    x = torch.randn(T, d, dtype=torch.float64)
    assert torch.equal(permute(x, r2f, f2r, k), _naive_permute(x, r2f, k))


def test_backend_matches_naive(backend, dtype):
    T, k, E, d = 21, 3, 5, 20
    r2f, f2r, _ = (t.to(backend.device) for t in route(expert_ids(T, k, E), E))
    x = torch.randn(T, d, device=backend.device).to(dtype).requires_grad_(True)
    rows = permute(x, r2f, f2r, k, backend=backend.name)
    assert torch.equal(rows, _naive_permute(x.detach(), r2f, k))  # a copy: exact
    g = torch.randn_like(rows)
    got = torch.autograd.grad(rows, x, g)[0]
    same_dtype = torch.autograd.grad(permute(x, r2f, f2r, k, backend="torch"), x, g)[0]
    want = torch.zeros(T, d, dtype=torch.float64, device=backend.device).index_add_(0, r2f // k, g.double())
    assert_backend_close(got, same_dtype, want, dtype, backend.name, grad=True)


def test_weighted_rows_and_their_gradients(backend):
    """With routing weights (the op's own argument; unpermute's backward uses it): d x combines the
    weighted row gradients, d weights are the row gradients' dot products with x."""
    T, k, E, d = 9, 2, 4, 5
    r2f, f2r, _ = (t.to(backend.device) for t in route(expert_ids(T, k, E), E))
    x = torch.randn(T, d, device=backend.device, requires_grad=True)
    w = torch.rand(T, k, device=backend.device, requires_grad=True)
    rows = permute_op(x, r2f, f2r, k, w, backend.name)
    x64, w64 = (t.detach().double().requires_grad_(True) for t in (x, w))
    want = _naive_permute(x64, r2f, k, w64)
    assert_close(rows, want, torch.float32)
    g = torch.randn_like(rows)
    for got, exact in zip(torch.autograd.grad(rows, (x, w), g), torch.autograd.grad(want, (x64, w64), g.double())):
        assert_close(got, exact, torch.float32, grad=True)


def test_opcheck():
    T, k, E, d = 10, 3, 4, 5
    r2f, f2r, _ = route(expert_ids(T, k, E), E)
    x = torch.randn(T, d)
    torch.library.opcheck(permute_op.op, (x, r2f, f2r, k, None))
    torch.library.opcheck(permute_op.op, (x, r2f, f2r, k, torch.rand(T, k)))


def test_non_contiguous_and_overlapping_memory():
    x = torch.randn(8, 6).t()
    with pytest.raises(OpInputError, match=r"'x' expected contiguous memory, got a non-contiguous tensor"):
        permute_op(x, torch.arange(6), torch.arange(6), 1, None)
    expanded = torch.randn(1, 6).expand(4, 6)
    with pytest.raises(OpInputError, match=r"overlapping memory \(a stride of 0"):
        permute_op(expanded, torch.arange(8), torch.arange(8), 2, None)
