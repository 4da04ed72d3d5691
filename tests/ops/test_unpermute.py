"""unpermute (the weighted, deterministic combine, shared experts added in the same pass) against
a per-token loop, on every backend; with permute, gradcheck and bitwise repeatability."""

import pytest
import torch

from geomoe_kernels import OpInputError, permute, route, unpermute
from geomoe_kernels.ops.permute import unpermute_op, unpermute_weight_grad
from tests.helpers import assert_runs_close, expert_ids, three_runs


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
def test_reference_matches_naive(k):
    T, E, d = 17, 5, 6
    r2f, f2r, _ = route(expert_ids(T, k, E), E)
    rows = permute(torch.randn(T, d, dtype=torch.float64), r2f, f2r, k)
    w = torch.rand(T, k, dtype=torch.float64)
    shared = torch.randn(T, d, dtype=torch.float64)
    torch.testing.assert_close(
        unpermute(rows, r2f, f2r, k, w, shared), _naive_unpermute(rows, f2r, k, w, shared), rtol=0, atol=1e-13
    )
    torch.testing.assert_close(unpermute(rows, r2f, f2r, k), _naive_unpermute(rows, f2r, k, None, None), rtol=0, atol=1e-13)


def test_backend_round_trip_matches_reference(backend, dtype):
    """permute, scale, unpermute with weights and shared rows: values and gradients against the
    float64 computation (a kernel in fp16 / bf16 within twice the reference's own error in that
    dtype), and the same bits on a second run."""
    T, k, E, d = 21, 3, 5, 20
    dev = backend.device
    r2f, f2r, _ = (t.to(dev) for t in route(expert_ids(T, k, E), E))
    x = torch.randn(T, d, device=dev).to(dtype).requires_grad_(True)
    wts = torch.rand(T, k, device=dev, requires_grad=True)
    shared = torch.randn(T, d, device=dev).to(dtype).requires_grad_(True)

    def run(name, x, wts, shared):
        return unpermute(permute(x, r2f, f2r, k, backend=name) * 1.5, r2f, f2r, k, wts, shared, backend=name)

    outs = three_runs(run, (x, wts, shared), backend.name)
    assert_runs_close(outs, dtype, backend.name)
    again = run(backend.name, x, wts, shared)
    assert torch.equal(again.double().cpu(), outs[0][0])  # bitwise repeatable


@pytest.mark.parametrize("weighted", [False, True])
def test_backend_combine_sums_in_float32_then_rounds_once(backend, dtype, weighted):
    """One large and three small contributions per token (slot 0 the large one): summed in float32
    and rounded once, the small ones add up to more than half a unit in the last place of the large
    one and move the result; added slot by slot in fp16 / bf16 each is rounded away. Every sum here
    is exact in float32, so the result must be the float64 sum rounded once, bit for bit."""
    if dtype not in (torch.float16, torch.bfloat16):
        pytest.skip("the half-precision accumulation check")
    T, k, E, d = 11, 4, 6, 20
    dev = backend.device
    r2f, f2r, _ = (t.to(dev) for t in route(expert_ids(T, k, E), E))
    large = 1024.0 if dtype == torch.float16 else 256.0  # 2^p: one unit in the last place is 1 (fp16) or 2 (bf16)
    ulp = large * torch.finfo(dtype).eps
    sign = torch.where(torch.rand(T, 1, d) < 0.5, -1.0, 1.0)
    vals = torch.empty(T, k, d)
    vals[:, 0], vals[:, 1:] = large, 0.375 * ulp  # 3 x 0.375 ulp = 1.125 ulp: rounds up to large + 1 ulp
    vals = (vals * sign).to(dev)
    w = None
    if weighted:  # powers of two: every product exact
        w = torch.full((T, k), 0.5, device=dev)
        vals = vals * 2
    rows = vals.reshape(T * k, d)[r2f].to(dtype)  # row r holds flat slot r2f[r]
    assert torch.equal(rows.double()[f2r].view(T, k, d), vals.double())  # every input exact in dtype
    shared = (torch.full((T, d), 0.25 * ulp, device=dev) * sign[:, 0]).to(dtype) if weighted else None
    got = unpermute(rows, r2f, f2r, k, w, shared, backend=backend.name)
    exact = (vals.double() * (1.0 if w is None else w.double()[..., None])).sum(1)
    if shared is not None:
        exact = exact + shared.double()
    want = exact.to(dtype)
    assert not torch.equal(want, vals[:, 0].to(dtype))  # the small ones do move the rounded sum
    assert torch.equal(got, want), (got[0, :4].tolist(), want[0, :4].tolist())


def test_gradcheck():
    T, k, E, d = 6, 2, 4, 3
    r2f, f2r, _ = route(expert_ids(T, k, E), E)
    x = torch.randn(T, d, dtype=torch.float64, requires_grad=True)
    w = torch.rand(T, k, dtype=torch.float64, requires_grad=True)
    shared = torch.randn(T, d, dtype=torch.float64, requires_grad=True)

    def f(x, w, shared):
        return unpermute(permute(x, r2f, f2r, k) * 1.5, r2f, f2r, k, w, shared)

    assert torch.autograd.gradcheck(f, (x, w, shared))


def test_is_bitwise_deterministic_in_half():
    T, k, E, d = 300, 3, 23, 64
    r2f, f2r, _ = route(expert_ids(T, k, E), E)
    rows = torch.randn(T * k, d).half()
    w = torch.rand(T, k)
    outs = [unpermute(rows, r2f, f2r, k, w) for _ in range(3)]
    assert all(torch.equal(outs[0], o) for o in outs[1:])
    assert outs[0].dtype == torch.float16


def test_stride_zero_gradient_is_handled():
    T, k, E, d = 5, 2, 3, 4
    r2f, f2r, _ = route(expert_ids(T, k, E), E)
    x = torch.randn(T, d, dtype=torch.float64, requires_grad=True)
    w = torch.rand(T, k, dtype=torch.float64)
    unpermute(permute(x, r2f, f2r, k), r2f, f2r, k, w).sum().backward()  # .sum() sends an expanded grad
    torch.testing.assert_close(x.grad, w.sum(1, keepdim=True).expand(T, d))


def test_opcheck():
    T, k, E, d = 10, 3, 4, 5
    r2f, f2r, _ = route(expert_ids(T, k, E), E)
    w = torch.rand(T, k)
    rows = torch.randn(T * k, d)
    torch.library.opcheck(unpermute_op.op, (rows, r2f, f2r, k, w, torch.randn(T, d)))
    torch.library.opcheck(unpermute_op.op, (rows, r2f, f2r, k, None, None))
    torch.library.opcheck(unpermute_weight_grad.op, (torch.randn(T, d), rows, f2r, k))


def test_bad_arguments():
    with pytest.raises(OpInputError, match=r"'weights' expected shape \[3, 2\], got \[3, 3\]"):
        unpermute_op(torch.randn(6, 4), torch.arange(6), torch.arange(6), 2, torch.rand(3, 3), None)
    with pytest.raises(OpInputError, match=r"'flat_to_row' expected values in \[0, 5\]"):
        unpermute_op(torch.randn(6, 4), torch.arange(6), torch.tensor([0, 1, 2, 3, 4, 9]), 2, None, None)
