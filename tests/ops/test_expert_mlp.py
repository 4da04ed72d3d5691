"""expert_mlp (both expert GEMMs in one op, the hidden rows recomputed in backward): the reference
against a per-expert loop of nn.Linear-style matmuls in float64; every backend's fused backward
against that loop (half precision: within twice the reference's error); opcheck; errors."""

import pytest
import torch

from geomoe_kernels import OpInputError, expert_mlp, route
from geomoe_kernels.ops.expert_mlp import expert_mlp_backward, expert_mlp_op
from tests.helpers import assert_close, assert_runs_close, offsets, skip_unavailable
from tests.oracles import apply_act

SWIGLUS = ("swiglu", "swiglu_interleaved")  # [gate | up] and [g0, u0, g1, u1, ...]

CASES = {"uneven": [5, 0, 17, 1, 9], "all_to_one": [0, 0, 31, 0], "one_row": [0, 1, 0], "none": [0, 0, 0]}


def _params(E, K, H, D, act, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    N1 = 2 * H if act in SWIGLUS else H
    w1 = torch.randn(E, K, N1, generator=g, dtype=dtype) / K**0.5
    b1 = torch.randn(E, N1, generator=g, dtype=dtype)
    w2 = torch.randn(E, H, D, generator=g, dtype=dtype) / H**0.5
    b2 = torch.randn(E, D, generator=g, dtype=dtype)
    return [t.requires_grad_(True) for t in (w1, b1, w2, b2)]


def _same_layer(params, act):
    """(w1, b1, w2, b2) drawn for [gate | up], W1's and b1's columns paired for swiglu_interleaved:
    the same layer in either layout (whose half-precision errors the tolerances were set on)."""
    if act != "swiglu_interleaved":
        return params
    w1, b1, *rest = params
    return [_interleave(w1), _interleave(b1), *rest]


def _interleave(t: torch.Tensor) -> torch.Tensor:
    """[..., gate | up] -> [..., g0, u0, g1, u1, ...]."""
    gate, up = t.chunk(2, -1)
    return torch.stack([gate, up], -1).flatten(-2).contiguous()


def _loop(rows, w1, b1, w2, b2, offsets, act):
    outs = []
    for e in range(w1.shape[0]):
        lo, hi = int(offsets[e]), int(offsets[e + 1])
        h = apply_act(act, rows[lo:hi] @ w1[e] + b1[e])
        outs.append(h @ w2[e] + b2[e])
    return torch.cat(outs)


@pytest.mark.parametrize("host_loop", [True, False])
@pytest.mark.parametrize("act", ["gelu", "silu", *SWIGLUS])
@pytest.mark.parametrize("case", list(CASES))
def test_reference_matches_a_per_expert_loop_float64(act, case, host_loop, monkeypatch):
    from geomoe_kernels.reference import grouped_gemm as ref

    monkeypatch.setattr(ref, "host_loop", lambda x: host_loop)  # the CPU's loop and the other devices' paths
    counts = CASES[case]
    off = offsets(counts)
    x = torch.randn(sum(counts), 6, dtype=torch.float64, requires_grad=True)
    params = _params(len(counts), 6, 5, 7, act)
    got = expert_mlp(x, *params[:2], *params[2:], off, act)
    want = _loop(x, *params, off, act)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-12)
    g = torch.randn_like(want)
    for a, b in zip(
        torch.autograd.grad(got, [x, *params], g, allow_unused=True),
        torch.autograd.grad(want, [x, *params], g, allow_unused=True),
    ):
        torch.testing.assert_close(a, torch.zeros_like(a) if b is None else b, rtol=0, atol=1e-11)
    for e, n in enumerate(counts):  # experts without rows: exactly zero weight and bias gradients
        if n == 0:
            assert all(torch.count_nonzero(p.grad[e]) == 0 for p in params if p.grad is not None)


@pytest.mark.parametrize("act", ["gelu", "silu", *SWIGLUS])
def test_backend_fused_backward(backend, dtype, act):
    """d pre from the down-projection's dgrad epilogue and dW2 from act(pre) formed in the load
    (kernel backends), against the reference's two separate grouped GEMMs; tokens gathered, one
    expert without rows."""
    dev = backend.device
    T, k, E, K, H, D = 11, 2, 4, 20, 12, 20
    ids = torch.stack([torch.randperm(E - 1)[:k] for _ in range(T)])  # expert E-1 gets no rows
    r2f, f2r, off = (t.to(dev) for t in route(ids, E, backend="torch"))
    N1 = 2 * H if act in SWIGLUS else H
    x = torch.randn(T, K).to(dev, dtype).requires_grad_(True)
    params = [(torch.randn(*shape) / 3) for shape in ((E, K, N1), (E, N1), (E, H, D), (E, D))]
    params = [t.to(dev, dtype).requires_grad_(True) for t in _same_layer(params, act)]
    outs = []
    for name, cast in ((backend.name, None), ("torch", None), ("torch", torch.float64)):
        leaves = [t if cast is None else t.detach().to(cast).requires_grad_(True) for t in (x, *params)]
        y = skip_unavailable(expert_mlp, leaves[0], *leaves[1:], off, act, backend=name, gather=r2f, flat_to_row=f2r, top_k=k)
        outs.append([t.double() for t in (y, *torch.autograd.grad(y.float().square().sum(), leaves))])
    assert_runs_close(outs, dtype, backend.name)  # float32 and the reference: against float64
    for grad in outs[0][2:]:
        assert torch.count_nonzero(grad[E - 1]) == 0


def _combined_loop(x, w1, b1, w2, b2, ids, weights, shared, act):
    """shared + sum_j weights[t, j] * expert_{ids[t, j]}(x[t]), token by token (float64 oracle)."""
    outs = []
    for t in range(x.shape[0]):
        y = shared[t] if shared is not None else 0
        for j in range(ids.shape[1]):
            e = int(ids[t, j])
            y = y + weights[t, j] * (apply_act(act, x[t] @ w1[e] + b1[e]) @ w2[e] + b2[e])
        outs.append(y)
    return torch.stack(outs)


def _routing(T, k, E, seed=0):
    """ids [T, k] that leave expert E - 1 without rows, routing weights in (0.2, 1)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.stack([torch.randperm(E - 1, generator=g)[:k] for _ in range(T)])
    return ids, 0.2 + 0.8 * torch.rand(T, k, generator=g, dtype=torch.float64)


@pytest.mark.parametrize("act", ["gelu", *SWIGLUS])
def test_combined_with_routing_weights_float64_against_a_token_loop(act):
    """With routing weights the op combines its rows (shared added) and its backward gives the
    routing weights' gradient from <dy W2^T, act(pre)> + <dy, b2>: every gradient against autograd
    through a token-by-token loop; an expert without rows gets exact zeros."""
    T, k, E, K, H, D = 7, 3, 5, 6, 4, 5
    ids, w = _routing(T, k, E)
    r2f, f2r, off = route(ids, E)
    x = torch.randn(T, K, dtype=torch.float64, requires_grad=True)
    params = _params(E, K, H, D, act)
    w.requires_grad_(True)
    shared = torch.randn(T, D, dtype=torch.float64, requires_grad=True)
    got = expert_mlp(x, *params, off, act, gather=r2f, flat_to_row=f2r, top_k=k, weights=w, shared=shared)
    want = _combined_loop(x, *params, ids, w, shared, act)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-12)
    g = torch.randn_like(want)
    leaves = [x, *params, w, shared]
    for a, b in zip(
        torch.autograd.grad(got, leaves, g, retain_graph=True), torch.autograd.grad(want, leaves, g, allow_unused=True)
    ):
        torch.testing.assert_close(a, torch.zeros_like(a) if b is None else b, rtol=0, atol=1e-11)
    assert all(torch.count_nonzero(gp[E - 1]) == 0 for gp in torch.autograd.grad(got, params, g))
    assert torch.autograd.gradcheck(
        lambda x, w, s: expert_mlp(x, *params, off, act, gather=r2f, flat_to_row=f2r, top_k=k, weights=w, shared=s),
        (x, w, shared),
    )


@pytest.mark.parametrize("act", ["gelu", *SWIGLUS])
def test_backend_routing_weight_gradient_in_the_dgrad(backend, dtype, act):
    """The down-projection's dgrad reading dy through the routing map, the routing weight and its
    gradient in its epilogue (Triton), or the same arithmetic around the plain dgrad (the CUDA core,
    the reference): output and every gradient, the routing weights' included, against float64;
    an expert without rows, exact zeros."""
    dev = backend.device
    T, k, E, K, H, D = 11, 3, 5, 20, 12, 20
    ids, w = _routing(T, k, E, seed=1)
    r2f, f2r, off = (t.to(dev) for t in route(ids, E, backend="torch"))
    N1 = 2 * H if act in SWIGLUS else H
    wdt = torch.float64 if dtype == torch.float64 else torch.float32
    x = torch.randn(T, K).to(dev, dtype).requires_grad_(True)
    params = [(torch.randn(*shape) / 3) for shape in ((E, K, N1), (E, N1), (E, H, D), (E, D))]
    params = [t.to(dev, dtype).requires_grad_(True) for t in _same_layer(params, act)]
    w = w.to(dev, wdt).requires_grad_(True)
    shared = torch.randn(T, D).to(dev, dtype).requires_grad_(True)
    outs = []
    for name, cast in ((backend.name, None), ("torch", None), ("torch", torch.float64)):
        leaves = [t if cast is None else t.detach().to(cast).requires_grad_(True) for t in (x, *params, shared)]
        ws = w if cast is None else w.detach().double().requires_grad_(True)
        y = skip_unavailable(
            expert_mlp, leaves[0], *leaves[1:5], off, act, backend=name, gather=r2f, flat_to_row=f2r, top_k=k, weights=ws,
            shared=leaves[5],
        )  # fmt: skip
        grads = torch.autograd.grad(y.float().square().sum(), [*leaves, ws])
        outs.append([t.double() for t in (y, *grads)])
    assert_runs_close(outs, dtype, backend.name)  # float32 and the reference: against float64
    for grad in outs[0][2:6]:
        assert torch.count_nonzero(grad[E - 1]) == 0


@pytest.mark.parametrize("routed", [False, True])
def test_interleaved_swiglu_is_the_concat_layout_with_its_columns_paired(kernel_backend, dtype, routed):
    """swiglu_interleaved on W1 and b1 with the columns of [gate | up] paired is the same layer: on a
    kernel backend the output, pre (paired), dW1 and db1 (paired), dW2, db2 and the routing weights'
    gradient are the concat run's bits (every sum runs over the same terms in the same chunks: the
    forward's over K, the weight gradients' over the rows, the routing partials' over the same hidden
    columns); the row gradient sums d pre @ W1^T over pre's columns in another order: within the
    dtype's tolerance. Gathered rows, an expert without rows, H = 20 (a partial tile)."""
    dev = kernel_backend.device
    T, k, E, K, H, D = 11, 2, 4, 24, 20, 16
    ids, w = _routing(T, k, E, seed=2)
    r2f, f2r, off = (t.to(dev) for t in route(ids, E, backend="torch"))
    g = torch.Generator().manual_seed(3)
    x = torch.randn(T, K, generator=g).to(dev, dtype)
    w1, b1 = torch.randn(E, K, 2 * H, generator=g) / K**0.5, torch.randn(E, 2 * H, generator=g) / 4
    w2, b2 = torch.randn(E, H, D, generator=g) / H**0.5, torch.randn(E, D, generator=g) / 4
    concat = [t.to(dev, dtype) for t in (w1, b1, w2, b2)]
    paired = [_interleave(concat[0]), _interleave(concat[1]), *concat[2:]]
    wts = w.to(dev, torch.float32) if routed else None
    dy = torch.randn(T if routed else T * k, D, generator=g).to(dev, dtype)
    runs = []
    for act, params in (("swiglu", concat), ("swiglu_interleaved", paired)):
        leaves = [t.clone().requires_grad_(True) for t in (x, *params)] + ([wts.clone().requires_grad_(True)] if routed else [])
        y, pre = skip_unavailable(
            expert_mlp_op, leaves[0], *leaves[1:5], off, act, r2f, f2r, k, leaves[5] if routed else None, None,
            kernel_backend.name,
        )  # fmt: skip
        runs.append([y, pre, *torch.autograd.grad(y, leaves, dy)])
    (y_c, pre_c, dx_c, dw1_c, db1_c, *rest_c), (y_i, pre_i, dx_i, dw1_i, db1_i, *rest_i) = runs
    assert torch.equal(y_i, y_c) and torch.equal(pre_i, _interleave(pre_c))
    assert torch.equal(dw1_i, _interleave(dw1_c)) and torch.equal(db1_i, _interleave(db1_c))
    assert all(torch.equal(a, b) for a, b in zip(rest_i, rest_c))  # dW2, db2 (and d weights)
    assert_close(dx_i, dx_c.double(), dtype, grad=True)


def test_gathered_tokens_gradcheck_and_opcheck():
    T, k, E = 9, 2, 4
    ids = torch.stack([torch.randperm(E)[:k] for _ in range(T)])
    r2f, f2r, off = route(ids, E)
    x = torch.randn(T, 6, dtype=torch.float64, requires_grad=True)
    params = _params(E, 6, 4, 5, "gelu")
    got = expert_mlp(x, *params, off, "gelu", gather=r2f, flat_to_row=f2r, top_k=k)
    torch.testing.assert_close(got, _loop(x[r2f // k], *params, off, "gelu"), rtol=0, atol=1e-12)
    assert torch.autograd.gradcheck(
        lambda x, *p: expert_mlp(x, *p, off, "gelu", gather=r2f, flat_to_row=f2r, top_k=k), (x, *params)
    )
    xf, pf = x.detach().float(), [p.detach().float() for p in params]
    for act in ("gelu", *SWIGLUS):
        pa = [p.detach().float() for p in _params(E, 6, 4, 5, act)]
        torch.library.opcheck(expert_mlp_op.op, (xf, *pa, off, act, r2f, f2r, k))
        _, pre_a = expert_mlp_op(xf, *pa, off, act, r2f, f2r, k)
        torch.library.opcheck(expert_mlp_backward.op, (torch.randn(T * k, 5), xf, pa[0], pa[2], off, pre_a, act, r2f, k))
    torch.library.opcheck(expert_mlp_op.op, (xf, pf[0], None, pf[2], None, off, "silu", r2f, f2r, k))
    _, pre = expert_mlp_op(xf, *pf, off, "gelu", r2f, f2r, k)
    torch.library.opcheck(expert_mlp_backward.op, (torch.randn(T * k, 5), xf, pf[0], pf[2], off, pre, "gelu", r2f, k))
    # with routing weights: the combine in the op, the routing weights' gradient from its backward
    w, shared = torch.rand(T, k), torch.randn(T, 5)
    torch.library.opcheck(expert_mlp_op.op, (xf, *pf, off, "gelu", r2f, f2r, k, w, shared))
    torch.library.opcheck(expert_mlp_op.op, (xf, *pf, off, "gelu", r2f, f2r, k, w, None))
    args = (torch.randn(T, 5), xf, pf[0], pf[2], off, pre, "gelu", r2f, k, w, pf[3])
    torch.library.opcheck(expert_mlp_backward.op, args)


def test_keeps_only_the_pre_activation_for_backward():
    """The hidden rows are not among the saved tensors (they are recomputed)."""
    off = offsets([3, 4])
    x = torch.randn(7, 6, requires_grad=True)
    params = _params(2, 6, 5, 6, "gelu", dtype=torch.float32)
    y = expert_mlp(x, *params, off, "gelu")
    saved = [t for t in y.grad_fn.saved_tensors if t is not None]
    assert sorted(tuple(t.shape) for t in saved if t.dim() == 2) == [(7, 5), (7, 6)]  # pre and x, nothing else [M, *]


@pytest.mark.parametrize(
    "change,message",
    [
        (dict(act="none"), "argument 'activation' expected one of"),
        (dict(w2=torch.randn(2, 4, 6)), "argument 'w2' expected [2, 5, D]"),
        (dict(w1=torch.randn(2, 5, 5)), "argument 'x' expected 5 columns (w1 is"),
        (dict(b2=torch.randn(2, 5)), "argument 'b2'"),
        (dict(off=torch.tensor([0, 3, 8])), "argument 'offsets' expected non-decreasing values from 0 to 7"),
    ],
)
def test_bad_arguments_name_the_argument(change, message):
    w1, b1, w2, b2 = (p.detach().float() for p in _params(2, 6, 5, 6, "gelu"))
    args = dict(x=torch.randn(7, 6), w1=w1, b1=b1, w2=w2, b2=b2, off=offsets([3, 4]), act="gelu")
    args.update(change)
    with pytest.raises(OpInputError, match=message.replace("[", r"\[").replace("(", r"\(")):
        expert_mlp_op(args["x"], args["w1"], args["b1"], args["w2"], args["b2"], args["off"], args["act"])


def test_bad_routing_arguments_name_the_argument():
    T, k, E = 4, 2, 3
    r2f, f2r, off = route(torch.stack([torch.randperm(E)[:k] for _ in range(T)]), E)
    w1, b1, w2, b2 = (p.detach().float() for p in _params(E, 6, 5, 6, "gelu"))
    x, w = torch.randn(T, 6), torch.rand(T, k)
    cases = [
        (dict(weights=w), "argument 'weights' combines the rows into tokens: it expected 'gather'"),
        (dict(gather=r2f, flat_to_row=f2r, top_k=k, shared=torch.randn(T, 6)), "argument 'shared' is added in the combine"),
        (dict(gather=r2f, flat_to_row=f2r, top_k=k, weights=torch.rand(T, k + 1)), "argument 'weights'"),
        (dict(gather=r2f, flat_to_row=f2r, top_k=k, weights=w, shared=torch.randn(T, 5)), "argument 'shared'"),
    ]
    for kwargs, message in cases:
        with pytest.raises(OpInputError, match=message.replace("(", r"\(")):
            expert_mlp_op(x, w1, b1, w2, b2, off, "gelu", **kwargs)
    _, pre = expert_mlp_op(x, w1, b1, w2, b2, off, "gelu", r2f, f2r, k)
    with pytest.raises(OpInputError, match=r"argument 'grad_out'"):  # with weights: the tokens' gradient [T, D]
        expert_mlp_backward(torch.randn(T * k, 6), x, w1, w2, off, pre, "gelu", r2f, k, w, b2)
    with pytest.raises(OpInputError, match=r"argument 'weights' expected 'gather'"):
        expert_mlp_backward(torch.randn(T, 6), x, w1, w2, off, pre, "gelu", None, 1, w, b2)
