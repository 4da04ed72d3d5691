"""permute (gather into expert-major rows): against a per-row loop, on every backend; its
backward is unpermute (and, for the routing weights, unpermute_weight_grad)."""

import pytest
import torch

from geomoe_kernels import OpInputError, permute, route
from geomoe_kernels._checks import set_value_checks
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


def _map_users(x, r2f, f2r, k):
    """Every op that reads one routing map in its forward and hands the other to its backward."""
    from geomoe_kernels import expert_mlp, grouped_mm, unpermute

    E, d, h = 2, x.shape[1], 3
    off = torch.tensor([0, x.shape[0] * k // 2, x.shape[0] * k])
    w1, w2 = torch.randn(E, d, h), torch.randn(E, h, d)
    rows = torch.randn(x.shape[0] * k, d)
    return {
        "permute": (lambda r2f, f2r: permute(x, r2f, f2r, k), "row_to_flat", "flat_to_row"),
        "unpermute": (lambda r2f, f2r: unpermute(rows, r2f, f2r, k), "flat_to_row", "row_to_flat"),
        "grouped_mm": (lambda r2f, f2r: grouped_mm(x, w1, off, gather=r2f, flat_to_row=f2r, top_k=k), "gather", "flat_to_row"),
        "expert_mlp": (
            lambda r2f, f2r: expert_mlp(x, w1, None, w2, None, off, "gelu", gather=r2f, flat_to_row=f2r, top_k=k),
            "gather",
            "flat_to_row",
        ),
    }


@pytest.mark.parametrize("op", ["permute", "unpermute", "grouped_mm", "expert_mlp"])
def test_maps_that_are_not_inverse_permutations_are_errors_where_values_are_checked(op):
    """A map with a repeated entry passes the range check, and then the op's backward (which reads
    the other map) disagrees with its forward: with value checks on, the maps must be a permutation
    of 0..N-1 and its inverse. With them off (a GPU's default) nothing reads the maps (no sync)."""
    T, k = 3, 2
    x = torch.randn(T, 4)
    r2f, f2r, _ = route(torch.tensor([[1, 0], [0, 1], [1, 0]]), 2)
    run, name, inverse_name = _map_users(x, r2f, f2r, k)[op]
    fwd, inv = (r2f, f2r) if name != "flat_to_row" else (f2r, r2f)
    as_args = (lambda a, b: (a, b)) if name != "flat_to_row" else (lambda a, b: (b, a))
    repeated = fwd.clone()
    repeated[1] = fwd[0]  # fwd[1] no longer appears
    with pytest.raises(
        OpInputError,
        match=rf"{op}: argument '{name}' is not a permutation of 0\.\.5: value {int(fwd[0])} appears twice "
        rf"\(and {int(fwd[1])} not at all\)",
    ):
        run(*as_args(repeated, inv))
    shifted = inv.roll(1)  # a permutation, not the inverse
    i = int(torch.nonzero(shifted[fwd] != torch.arange(T * k))[0])
    with pytest.raises(
        OpInputError,
        match=rf"{op}: argument '{inverse_name}' is not the inverse of '{name}': {name}\[{i}\] = {int(fwd[i])} but "
        rf"{inverse_name}\[{int(fwd[i])}\] = {int(shifted[fwd[i]])}, expected {i}",
    ):
        run(*as_args(fwd, shifted))
    run(*as_args(fwd, inv))  # the maps route made
    set_value_checks(False)  # undone by conftest's backend.forget()
    run(*as_args(repeated, inv))  # unchecked: the caller's promise
