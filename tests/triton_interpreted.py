"""Cases for the Triton kernels on the CPU under TRITON_INTERPRET=1 (fp32 and fp16, tiny shapes),
against the reference ops and the naive loops. Triton reads TRITON_INTERPRET once per process, so
test_triton.py runs this file in its own pytest process with the variable set."""
import os

import pytest
import torch

pytest.importorskip("triton")
assert os.environ.get("TRITON_INTERPRET") == "1", "run through tests/test_triton.py"

from geomoe_kernels import MoEMLP, grouped_mm, permute, route, topk_gating, unpermute  # noqa: E402
from oracles import naive_grouped_mm, naive_route  # noqa: E402

ACTS = ["none", "gelu", "silu", "swiglu"]
TOL = {torch.float32: dict(rtol=1e-4, atol=1e-4), torch.float16: dict(rtol=2e-2, atol=1.4e-2)}


def _offsets(counts):
    return torch.tensor([0] + torch.tensor(counts).cumsum(0).tolist())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("act", ACTS)
def test_grouped_mm_forward_and_backward(act, dtype):
    counts = [5, 0, 19, 1, 0, 9]
    off = _offsets(counts)
    x = (torch.randn(sum(counts), 24) / 2).to(dtype).requires_grad_(True)
    w = (torch.randn(6, 24, 40) / 5).to(dtype).requires_grad_(True)
    b = torch.randn(6, 40).to(dtype).requires_grad_(True)
    got = grouped_mm(x, w, off, b, act, backend="triton")
    want = naive_grouped_mm(x.double(), w.double(), off, b.double(), act)
    torch.testing.assert_close(got.double(), want, **TOL[dtype])
    g = torch.randn_like(want)
    gt = torch.autograd.grad(got, (x, w, b), g.to(dtype))
    gw = torch.autograd.grad(want, (x, w, b), g, allow_unused=True)
    for a, r in zip(gt, gw):
        torch.testing.assert_close(a.double(), r.double(), **TOL[dtype])
    for e in (1, 4):  # experts without rows: exact zeros
        assert torch.count_nonzero(gt[1][e]) == 0 and torch.count_nonzero(gt[2][e]) == 0


def test_grouped_mm_gathers_rows_inside_the_load():
    from geomoe_kernels.triton.grouped_gemm import grouped_mm_rows, weight_grad

    T, k, E = 13, 2, 4
    ids = torch.stack([torch.randperm(E)[:k] for _ in range(T)])
    r2f, f2r, off = route(ids, E, backend="torch")
    x = torch.randn(T, 16)
    w = torch.randn(E, 16, 24)
    out, _ = grouped_mm_rows(x, w, off, None, "none", gather=r2f, top_k=k, n_rows=T * k)
    rows = x[r2f // k]
    torch.testing.assert_close(out, naive_grouped_mm(rows, w, off, None, "none"), **TOL[torch.float32])
    g = torch.randn(T * k, 24)
    want = torch.stack([rows[int(off[e]):int(off[e + 1])].t() @ g[int(off[e]):int(off[e + 1])] for e in range(E)])
    want_db = torch.stack([g[int(off[e]):int(off[e + 1])].sum(0) for e in range(E)])
    for dw, db in (weight_grad(x, g, off, gather=r2f, top_k=k), weight_grad(rows, g, off, splits=3)):
        torch.testing.assert_close(dw, want, **TOL[torch.float32])
        torch.testing.assert_close(db, want_db, **TOL[torch.float32])


@pytest.mark.parametrize("score_func", ["sigmoid", "softmax"])
@pytest.mark.parametrize("renormalize", [True, False])
@pytest.mark.parametrize("k", [1, 3])
def test_gating_matches_reference(score_func, renormalize, k):
    logits = torch.randn(37, 7, requires_grad=True)
    bias = 0.1 * torch.randn(7) if score_func == "sigmoid" else None
    got = topk_gating(logits, bias, k, score_func, renormalize, backend="triton")
    want = topk_gating(logits, bias, k, score_func, renormalize, backend="torch")
    assert torch.equal(got[1], want[1]) and torch.equal(got[2], want[2])
    torch.testing.assert_close(got[0], want[0])
    torch.testing.assert_close(got[3], want[3])
    gw, gp = torch.randn(37, k), torch.randn(7)
    g_got = torch.autograd.grad((got[0] * gw).sum() + (got[3] * gp).sum(), logits)[0]
    g_want = torch.autograd.grad((want[0] * gw).sum() + (want[3] * gp).sum(), logits)[0]
    torch.testing.assert_close(g_got, g_want)


def test_gating_ties_pick_the_lower_expert():
    _, ids, counts, _ = topk_gating(torch.zeros(5, 6), None, 3, backend="triton")
    assert ids.tolist() == [[0, 1, 2]] * 5 and counts.tolist() == [5, 5, 5, 0, 0, 0]


@pytest.mark.parametrize("T,k,E", [(1, 1, 1), (50, 3, 7), (70, 2, 23)])
def test_route_is_exactly_the_stable_permutation(T, k, E):
    ids = torch.stack([torch.randperm(E)[:k] for _ in range(T)])
    for got, want in zip(route(ids, E, backend="triton"), naive_route(ids, E)):
        assert torch.equal(got, want)
    ids = torch.full((33, 1), 2)  # all to one expert
    for got, want in zip(route(ids, 5, backend="triton"), naive_route(ids, 5)):
        assert torch.equal(got, want)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_permute_and_combine(dtype):
    T, k, E, d = 21, 3, 5, 20
    ids = torch.stack([torch.randperm(E)[:k] for _ in range(T)])
    r2f, f2r, _ = route(ids, E)
    x = torch.randn(T, d).to(dtype).requires_grad_(True)
    wts = torch.rand(T, k, requires_grad=True)
    shared = torch.randn(T, d).to(dtype).requires_grad_(True)
    outs = []
    for backend in ("triton", "torch"):
        rows = permute(x, r2f, f2r, k, backend=backend)
        y = unpermute(rows * 1.5, r2f, f2r, k, wts, shared, backend=backend)
        grads = torch.autograd.grad((y.float() ** 2).sum(), (x, wts, shared))
        outs.append((y, *grads))
    for a, b in zip(*outs):
        torch.testing.assert_close(a.double(), b.double(), **TOL[dtype])
    again = unpermute(permute(x, r2f, f2r, k, backend="triton") * 1.5, r2f, f2r, k, wts, shared, backend="triton")
    assert torch.equal(again, outs[0][0])  # bitwise repeatable


@pytest.mark.parametrize("activation", ["gelu", "swiglu"])
def test_moe_layer_triton_equals_torch(activation):
    torch.manual_seed(0)
    m = MoEMLP(16, 12, 6, 1, 2, activation=activation)
    x = torch.randn(45, 16, requires_grad=True)
    results = []
    for backend in ("triton", "torch"):
        m.backend = backend
        m.zero_grad()
        x.grad = None
        y, aux, load = m(x)
        (y.square().sum() + aux).backward()
        results.append((y.detach(), aux.detach(), load, x.grad.clone(), m.w1.grad.clone(), m.b2.grad.clone(), m.gate.weight.grad.clone()))
    assert torch.equal(results[0][2], results[1][2])
    for a, b in zip(results[0], results[1]):
        torch.testing.assert_close(a.double(), b.double(), **TOL[torch.float32])


def test_model_loss_and_gradients_with_triton_kernels():
    from geomoe import GeoMoE

    cfg = dict(img_size=32, embed_dim=(8, 8, 16), depth=(1, 1, 1), num_heads=2, num_experts=4, top_k=2,
               decoder_embed_dim=16, decoder_depth=1, decoder_num_heads=2)
    imgs, noise = torch.randn(2, 3, 32, 32), torch.rand(2, 4)
    runs = []
    for backend in ("auto", "torch"):  # auto: Triton where it has a kernel (under the interpreter)
        torch.manual_seed(0)
        model = GeoMoE(**cfg, backend=backend)
        loss, aux, load = model(imgs, mask_ratio=0.5, kept_mask_ratio=0.5, noise=noise)
        (loss + 1e-4 * aux.sum()).backward()
        runs.append((loss.detach(), load, {n: p.grad for n, p in model.named_parameters() if p.grad is not None}))
    torch.testing.assert_close(runs[0][0], runs[1][0], **TOL[torch.float32])
    assert torch.equal(runs[0][1], runs[1][1])
    for name, g in runs[1][2].items():
        torch.testing.assert_close(runs[0][2][name], g, **TOL[torch.float32], msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("k", [3, 5])
def test_masked_depthwise_conv(dtype, k):
    from geomoe_kernels import layout, masked_depthwise_conv

    kept = torch.stack([torch.randperm(16)[:5] for _ in range(2)])
    kept[1, 0] = 0  # a corner token
    nbr = layout.neighbor_table(kept, (4, 4), 4, k)
    x = torch.randn(nbr.shape[0], 20).to(dtype).requires_grad_(True)
    w = (torch.randn(20, k * k) / k).to(dtype).requires_grad_(True)
    b = torch.randn(20).to(dtype).requires_grad_(True)
    outs = []
    for backend in ("triton", "torch"):
        y = masked_depthwise_conv(x, nbr, w, b, backend=backend)
        outs.append((y, *torch.autograd.grad(y.float().square().sum(), (x, w, b))))
    for a, r in zip(*outs):
        torch.testing.assert_close(a.double(), r.double(), **TOL[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("act", ["none", "gelu", "silu"])
def test_norm_linear(dtype, act):
    """LayerNorm in the prologue, bias + activation in the epilogue; rows with a large mean, a
    column count that is not a multiple of the tile, and statistics that stay float32."""
    from geomoe_kernels import norm_linear

    x = (torch.randn(37, 20) * 2 + 50).requires_grad_(True)  # float32 rows, as in the residual stream
    nw = (1 + torch.randn(20) / 4).requires_grad_(True)
    nb = torch.randn(20).requires_grad_(True)
    w = (torch.randn(27, 20) / 5).to(dtype).requires_grad_(True)
    b = torch.randn(27).to(dtype).requires_grad_(True)
    outs = []
    for backend in ("triton", "torch"):
        y = norm_linear(x, nw, nb, w, b, act, 1e-5, backend=backend)
        assert y.dtype == dtype
        outs.append((y, *torch.autograd.grad(y.float().square().sum(), (x, nw, nb, w, b))))
    for a, r in zip(*outs):
        torch.testing.assert_close(a.double(), r.double(), **TOL[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("act", ["gelu", "silu", "swiglu"])
def test_expert_mlp_fused_backward(dtype, act):
    """d pre from the down-projection's dgrad epilogue and dW2 from act(pre) formed in the load,
    against the reference's two separate grouped GEMMs; tokens gathered, one expert without rows."""
    from geomoe_kernels import expert_mlp

    T, k, E, K, H, D = 11, 2, 4, 20, 12, 20
    ids = torch.stack([torch.randperm(E - 1)[:k] for _ in range(T)])  # expert E-1 gets no rows
    r2f, f2r, off = route(ids, E, backend="torch")
    N1 = 2 * H if act == "swiglu" else H
    x = torch.randn(T, K).to(dtype).requires_grad_(True)
    params = [(torch.randn(*shape) / 3).to(dtype).requires_grad_(True)
              for shape in ((E, K, N1), (E, N1), (E, H, D), (E, D))]
    outs = []
    for backend, cast in (("triton", None), ("torch", None), ("torch", torch.float64)):
        leaves = [t if cast is None else t.detach().to(cast).requires_grad_(True) for t in (x, *params)]
        y = expert_mlp(leaves[0], *leaves[1:], off, act, backend=backend, gather=r2f, flat_to_row=f2r, top_k=k)
        outs.append([t.double() for t in (y, *torch.autograd.grad(y.float().square().sum(), leaves))])
    ours, same_dtype_torch, exact = outs
    for a, r, e in zip(ours, same_dtype_torch, exact):
        if dtype == torch.float32:
            torch.testing.assert_close(a, r, **TOL[dtype])
        else:  # two chained half-precision GEMMs: at most 2x the error of torch in the same dtype
            scale = e.abs().max().clamp_min(1.0)
            assert (a - e).abs().max() <= 2 * (r - e).abs().max() + 1e-3 * scale, ((a - e).abs().max(), (r - e).abs().max())
    for grad in ours[2:]:
        assert torch.count_nonzero(grad[E - 1]) == 0
