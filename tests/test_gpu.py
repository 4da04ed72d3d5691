"""GPU checks (skipped without CUDA): every op on the device against the float64 CPU oracle in fp32
(TF32 off), fp16 and bf16 with the tolerances of docs/testing.md; bitwise determinism; zero-token experts under
a poisoned allocator; CUDA-graph capture and torch.compile of the layer; the model's two front ends."""

import pytest
import torch

from geomoe import GeoMoE
from geomoe_kernels import (
    MoEMLP,
    SparseCBlock,
    expert_mlp,
    grouped_mm,
    layout,
    masked_depthwise_conv,
    norm_linear,
    permute,
    route,
    topk_gating,
    unpermute,
)
from tests.oracles import OriginalMoE

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]
CUDA = torch.device("cuda")
TOL = {
    torch.float32: dict(atol=1e-4, rtol=1e-4),
    torch.float16: dict(atol=1.4e-2, rtol=2e-2),
    torch.bfloat16: dict(atol=1.4e-2, rtol=2e-2),
}
GRAD_TOL = {
    torch.float32: dict(atol=1e-4, rtol=1e-4),
    torch.float16: dict(atol=2e-2, rtol=2e-2),
    torch.bfloat16: dict(atol=2e-2, rtol=2e-2),
}


@pytest.fixture(autouse=True)
def _no_tf32():
    old = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old


def _assert_within_torch_error(ours, same_dtype_torch, exact, dtype):
    """Output and gradients (lists, in float64) against the float64 computation: fp32 within 1e-4;
    fp16 / bf16 at most 2x the error of torch's own computation in that dtype (docs/testing.md), since
    chained half-precision GEMMs round differently in every implementation."""
    for a, t, e in zip(ours, same_dtype_torch, exact):
        if dtype == torch.float32:
            torch.testing.assert_close(a, e, **GRAD_TOL[dtype])
        else:
            err, torch_err = (a - e).abs().max(), (t - e).abs().max()
            assert err <= 2 * torch_err + 1e-3 * e.abs().max(), (float(err), float(torch_err))


def _poison_allocator():
    """Fill freed cached blocks with NaN so that uninitialised memory shows up as NaN."""
    free = torch.cuda.mem_get_info()[0]
    junk = torch.full((min(free // 8, 2**30) // 4,), float("nan"), device=CUDA)
    del junk


def _pair(E=23, k=3, dim=64, hidden=48):
    orig = OriginalMoE(dim, hidden, E, 1, k).double()
    ours = MoEMLP(dim, hidden, E, 1, k)
    from geomoe import load_original_state_dict

    load_original_state_dict(ours, orig.state_dict(), strict=True)
    return orig, ours.to(CUDA)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("tokens", [1, 511, 4096])
def test_moe_layer_against_float64_oracle(dtype, tokens):
    """The layer on the device (auto backends) against the float64 loop. The oracle gets the input
    rounded to the dtype, so both route every token alike (routing is float32 either way); half
    precision then may be at most 2x as far from float64 as the reference ops in the same dtype."""
    orig, ours = _pair()
    x = torch.randn(tokens, 64, dtype=torch.float64).to(dtype).double()
    xa = x.clone().requires_grad_(True)
    ya, aux_a, load_a = orig(xa)
    g = torch.randn_like(ya)
    (ya * g).sum().backward()
    got = {}
    for backend in ("auto", "torch"):
        ours.backend = backend
        xb = x.to(CUDA, dtype).requires_grad_(True)
        with torch.autocast("cuda", dtype=dtype, enabled=dtype != torch.float32):
            yb, aux_b, load_b = ours(xb)
        yb.backward(g.to(CUDA, yb.dtype))
        assert torch.equal(load_b.cpu(), load_a), backend
        got[backend] = [yb.double().cpu(), xb.grad.double().cpu()]
    _assert_within_torch_error(got["auto"], got["torch"], [ya.detach(), xa.grad], dtype)


def test_ops_on_device_match_cpu():
    T, k, E = 300, 3, 23
    logits = torch.randn(T, E, dtype=torch.float64)
    w, ids, counts, p = topk_gating(logits.to(CUDA), None, k)
    w0, ids0, counts0, p0 = topk_gating(logits, None, k)
    assert torch.equal(ids.cpu(), ids0) and torch.equal(counts.cpu(), counts0)
    torch.testing.assert_close(w.cpu(), w0)
    for a, b in zip(route(ids, E), route(ids0, E)):
        assert torch.equal(a.cpu(), b)
    kept = torch.stack([torch.randperm(196)[:49] for _ in range(4)])
    nbr = layout.neighbor_table(kept.to(CUDA), (14, 14), 4, 5)
    assert torch.equal(nbr.cpu(), layout.neighbor_table(kept, (14, 14), 4, 5))
    x = torch.randn(nbr.shape[0], 16, dtype=torch.float64)
    wt = torch.randn(16, 25, dtype=torch.float64)
    torch.testing.assert_close(masked_depthwise_conv(x.to(CUDA), nbr, wt.to(CUDA)).cpu(), masked_depthwise_conv(x, nbr.cpu(), wt))


def test_bitwise_deterministic_layer():
    _, m = _pair()
    x = torch.randn(15680, 64, device=CUDA, dtype=torch.bfloat16, requires_grad=True)
    runs = []
    for _ in range(3):
        m.zero_grad()
        x.grad = None
        with torch.autocast("cuda", dtype=torch.bfloat16):
            y, aux, _ = m(x)
        (y.float().square().mean() + aux).backward()
        runs.append([y.detach().clone(), x.grad.clone(), m.w1.grad.clone(), m.b2.grad.clone(), m.gate.weight.grad.clone()])
    for r in runs[1:]:
        assert all(torch.equal(a, b) for a, b in zip(runs[0], r))


def test_empty_experts_zero_grads_under_poisoned_allocator():
    _, m = _pair(E=8, k=1)
    with torch.no_grad():
        m.expert_bias.copy_(torch.tensor([0, 0, 50.0, 0, 0, 0, 0, 0]))
    _poison_allocator()
    x = torch.randn(1000, 64, device=CUDA, requires_grad=True)
    y, aux, load = m(x)
    y.square().sum().backward()
    assert load.tolist() == [0, 0, 1000, 0, 0, 0, 0, 0]
    for name in ("w1", "b1", "w2", "b2"):
        g = getattr(m, name).grad
        assert torch.isfinite(g).all(), name
        assert torch.count_nonzero(torch.cat([g[:2].flatten(), g[3:].flatten()])) == 0, name


@pytest.mark.skipif(
    not torch.cuda.is_available() or torch.cuda.get_device_capability()[0] < 9, reason="torch._grouped_mm runs bf16 on sm_90+"
)
def test_reference_stock_path_zero_fills_empty_experts_in_bfloat16():
    """The reference's torch._grouped_mm path (bf16 on sm_90+, the only device case it takes): the
    weight gradients of experts without rows come back undefined and are zero-filled; under a
    NaN-poisoned allocator they are exactly zero, the rest as the float64 loop's."""
    from geomoe_kernels.reference import grouped_gemm as ref
    from tests.helpers import offsets

    counts = [0, 40, 0, 24, 0]
    off = offsets(counts, CUDA)
    x = (torch.randn(64, 64, device=CUDA) / 2).bfloat16().requires_grad_(True)
    w = (torch.randn(5, 64, 32, device=CUDA) / 8).bfloat16().requires_grad_(True)
    assert ref.use_stock(x, w)
    _poison_allocator()
    g = torch.randn(64, 32, device=CUDA).bfloat16()
    dw = torch.autograd.grad(grouped_mm(x, w, off, None, "none", backend="torch"), w, g)[0]
    for e in (0, 2, 4):
        assert torch.equal(dw[e], torch.zeros_like(dw[e])), e
    x64, g64 = x.detach().double(), g.double()
    for e, lo, hi in ((1, 0, 40), (3, 40, 64)):
        torch.testing.assert_close(dw[e].double(), x64[lo:hi].t() @ g64[lo:hi], **GRAD_TOL[torch.bfloat16])


def test_cuda_graph_capture_of_the_layer():
    _, m = _pair()
    x = torch.randn(4096, 64, device=CUDA, requires_grad=True)
    g = torch.randn(4096, 64, device=CUDA)

    def step():
        y, aux, _ = m(x)
        torch.autograd.backward([y, aux], [g, torch.ones_like(aux)])
        return y

    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(2):
            step()
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    m.zero_grad(set_to_none=False)
    x.grad.zero_()
    with torch.cuda.graph(graph):
        y_static = step()
    m.zero_grad(set_to_none=False)
    x.grad.zero_()
    graph.replay()
    torch.cuda.synchronize()
    y_eager = m(x)[0]
    torch.testing.assert_close(y_static, y_eager)


def test_torch_compile_fullgraph_on_gpu():
    _, m = _pair()
    x = torch.randn(1024, 64, device=CUDA, requires_grad=True)
    compiled = torch.compile(m, fullgraph=True)
    y, aux, load = compiled(x)
    (y.sum() + aux).backward()
    g = x.grad.clone()
    x.grad = None
    y2, aux2, _ = m(x)
    (y2.sum() + aux2).backward()
    torch.testing.assert_close(y, y2, **TOL[torch.float32])
    torch.testing.assert_close(g, x.grad, **GRAD_TOL[torch.float32])


def test_model_front_ends_agree_on_gpu():
    cfg = dict(
        img_size=64,
        embed_dim=(16, 24, 32),
        depth=(1, 1, 2),
        num_heads=2,
        num_experts=5,
        top_k=2,
        decoder_embed_dim=16,
        decoder_depth=1,
        decoder_num_heads=2,
    )
    sparse = GeoMoE(**cfg).to(CUDA)
    dense = GeoMoE(**cfg, front_end="dense").to(CUDA)
    dense.load_state_dict(sparse.state_dict())
    imgs, noise = torch.randn(8, 3, 64, 64, device=CUDA), torch.rand(8, 16, device=CUDA)
    ls = sparse(imgs, noise=noise)[0]
    ld = dense(imgs, noise=noise)[0]
    torch.testing.assert_close(ls, ld, **TOL[torch.float32])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_cuda_core_ops_match_the_reference(dtype):
    from geomoe_kernels.cuda import _core

    if _core is None:
        pytest.skip("the CUDA core was not built")
    T, k, E, d = 1000, 3, 23, 96
    logits = torch.randn(T, E, device=CUDA, requires_grad=True)
    bias = 0.05 * torch.randn(E, device=CUDA)
    got = topk_gating(logits, bias, k, backend="cuda")
    want = topk_gating(logits, bias, k, backend="torch")
    assert torch.equal(got[1], want[1]) and torch.equal(got[2], want[2])
    torch.testing.assert_close(got[0], want[0])
    torch.testing.assert_close(got[3], want[3])
    gw, gp = torch.randn(T, k, device=CUDA), torch.randn(E, device=CUDA)
    g1 = torch.autograd.grad((got[0] * gw).sum() + (got[3] * gp).sum(), logits)[0]
    g2 = torch.autograd.grad((want[0] * gw).sum() + (want[3] * gp).sum(), logits)[0]
    torch.testing.assert_close(g1, g2)
    ids = got[1]
    for a, b in zip(route(ids, E, backend="cuda"), route(ids, E, backend="torch")):
        assert torch.equal(a, b)
    r2f, f2r, _ = route(ids, E)
    x = torch.randn(T, d, device=CUDA, dtype=dtype, requires_grad=True)
    w = torch.rand(T, k, device=CUDA, requires_grad=True)
    outs = []
    for backend in ("cuda", "torch"):
        y = unpermute(permute(x, r2f, f2r, k, backend=backend) * 2, r2f, f2r, k, w, x, backend=backend)
        outs.append((y, *torch.autograd.grad(y.float().square().sum(), (x, w))))
    for a, b in zip(*outs):
        torch.testing.assert_close(a.float(), b.float(), **GRAD_TOL[dtype])


@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_masked_depthwise_conv_kernels_match_the_reference(backend, dtype):
    if backend == "cuda":
        from geomoe_kernels.cuda import _core

        if _core is None:
            pytest.skip("the CUDA core was not built")
    kept = torch.stack([torch.randperm(196)[:49] for _ in range(8)]).to(CUDA)
    nbr = layout.neighbor_table(kept, (14, 14), 4, 5)
    x = torch.randn(nbr.shape[0], 256, device=CUDA, dtype=dtype, requires_grad=True)
    w = (torch.randn(256, 25, device=CUDA) / 5).to(dtype).requires_grad_(True)
    b = torch.randn(256, device=CUDA, dtype=dtype, requires_grad=True)
    outs = []
    for be in (backend, "torch"):
        y = masked_depthwise_conv(x, nbr, w, b, backend=be)
        outs.append((y, *torch.autograd.grad(y.float().square().mean(), (x, w, b))))
    for a, r in zip(*outs):
        torch.testing.assert_close(a.float(), r.float(), **GRAD_TOL[dtype])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("act", ["none", "gelu", "silu"])
@pytest.mark.parametrize("gathered", [False, True])
def test_cuda_grouped_gemm_matches_the_reference(dtype, act, gathered):
    """The WMMA grouped GEMM runs only when asked for (backend="cuda") until this passes on a GPU."""
    from geomoe_kernels.cuda import _core

    if _core is None:
        pytest.skip("the CUDA core was not built")
    T, k, E, K, N = 1500, 3, 23, 768, 576
    ids = torch.stack([torch.randperm(E)[:k] for _ in range(T)]).to(CUDA)
    ids[:200] = torch.tensor([0, 1, 2], device=CUDA)  # uneven groups; some experts may get none
    r2f, f2r, off = route(ids, E)
    x = (torch.randn(T, K, device=CUDA) / 4).to(dtype).requires_grad_(True)
    w = (torch.randn(E, K, N, device=CUDA) / K**0.5).to(dtype).requires_grad_(True)
    b = torch.randn(E, N, device=CUDA, dtype=dtype, requires_grad=True)
    outs = []
    for backend in ("cuda", "torch"):
        if gathered:
            y = grouped_mm(x, w, off, b, act, backend=backend, gather=r2f, flat_to_row=f2r, top_k=k)
        else:
            y = grouped_mm(permute(x, r2f, f2r, k), w, off, b, act, backend=backend)
        outs.append((y, *torch.autograd.grad(y.float().square().mean(), (x, w, b))))
    for a, r in zip(*outs):
        torch.testing.assert_close(a.float(), r.float(), **GRAD_TOL[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("act", ["none", "gelu"])
def test_triton_norm_linear_matches_the_reference(dtype, act):
    """Stage-1 shapes: 256 -> 1024 (fc1); float32 rows, the GEMM in dtype, as under autocast."""
    R, K, N = 8 * 49 * 16 + 5, 256, 1024
    x = (torch.randn(R, K, device=CUDA) * 2 + 3).requires_grad_(True)
    nw = (1 + torch.randn(K, device=CUDA) / 4).requires_grad_(True)
    nb = torch.randn(K, device=CUDA, requires_grad=True)
    w = (torch.randn(N, K, device=CUDA) / K**0.5).to(dtype).requires_grad_(True)
    b = torch.randn(N, device=CUDA, dtype=dtype, requires_grad=True)
    outs = []
    for backend, cast in (("triton", None), ("torch", None), ("torch", torch.float64)):
        leaves = [t if cast is None else t.detach().to(cast).requires_grad_(True) for t in (x, nw, nb, w, b)]
        y = norm_linear(*leaves, act, 1e-5, backend=backend)
        outs.append([t.double() for t in (y, *torch.autograd.grad(y.double().square().mean(), leaves))])
    _assert_within_torch_error(*outs, dtype)


def test_sparse_cblock_compiles_fullgraph_on_gpu():
    block = SparseCBlock(64).to(CUDA)
    kept = torch.stack([torch.randperm(16)[:4] for _ in range(2)]).to(CUDA)
    nbr = layout.neighbor_table(kept, (4, 4), 4, 5)
    x = torch.randn(nbr.shape[0], 64, device=CUDA, requires_grad=True)
    compiled = torch.compile(block, fullgraph=True)
    y = compiled(x, nbr)
    g = torch.autograd.grad(y.square().sum(), x)[0]
    y2 = block(x, nbr)
    g2 = torch.autograd.grad(y2.square().sum(), x)[0]
    torch.testing.assert_close(y, y2, **TOL[torch.float32])
    torch.testing.assert_close(g, g2, **GRAD_TOL[torch.float32])


@pytest.mark.parametrize("backend", ["triton", "cuda"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("act", ["gelu", "swiglu"])
def test_expert_mlp_matches_the_reference(backend, dtype, act):
    """Triton: d pre from the down-projection's dgrad epilogue, dW2 from act(pre) formed in the load;
    CUDA: the same fusions in its WMMA kernels. GeoMoE's shapes, uneven groups, maybe empty experts."""
    if backend == "cuda":
        from geomoe_kernels.cuda import _core

        if _core is None:
            pytest.skip("the CUDA core was not built")
        if dtype == torch.float32 or act == "swiglu":
            pytest.skip("the CUDA grouped GEMM takes fp16/bf16 with none/gelu/silu")
    T, k, E, K, H = 1500, 3, 23, 768, 576
    N1 = 2 * H if act == "swiglu" else H
    ids = torch.stack([torch.randperm(E)[:k] for _ in range(T)]).to(CUDA)
    ids[:200] = torch.tensor([0, 1, 2], device=CUDA)
    r2f, f2r, off = route(ids, E)
    x = (torch.randn(T, K, device=CUDA) / 4).to(dtype).requires_grad_(True)
    params = [
        (torch.randn(*shape, device=CUDA) / shape[-2] ** 0.5 if len(shape) == 3 else torch.randn(*shape, device=CUDA) / 4)
        .to(dtype)
        .requires_grad_(True)
        for shape in ((E, K, N1), (E, N1), (E, H, K), (E, K))
    ]
    outs = []
    for be, cast in ((backend, None), ("torch", None), ("torch", torch.float64)):
        leaves = [t if cast is None else t.detach().to(cast).requires_grad_(True) for t in (x, *params)]
        y = expert_mlp(leaves[0], *leaves[1:], off, act, backend=be, gather=r2f, flat_to_row=f2r, top_k=k)
        outs.append([t.double() for t in (y, *torch.autograd.grad(y.double().square().mean(), leaves))])
    _assert_within_torch_error(*outs, dtype)


def test_cuda_graphs_blocks_train_as_the_eager_model():
    """`geomoe pretrain --cuda-graphs`' BlockGraphs with the real make_graphed_callables: a small
    GeoMoE trained graphed (captured after the first, eager step) and eagerly, side by side: the
    same losses, weights and expert biases (updated in place, read by the replayed router)."""
    from geomoe.cuda_graphs import BlockGraphs
    from geomoe.speed import transformer_blocks

    models = []
    for _ in range(2):
        torch.manual_seed(0)
        kw = dict(num_heads=4, num_experts=8, num_shared_experts=1, top_k=2, decoder_embed_dim=32, decoder_depth=1)
        models.append(GeoMoE(img_size=64, embed_dim=(16, 32, 64), depth=(1, 1, 2), decoder_num_heads=4, **kw).to(CUDA))
    eager, graphed = models
    graphs = BlockGraphs(transformer_blocks(graphed), CUDA, "fp32")
    optims = [torch.optim.SGD(m.parameters(), lr=0.1) for m in models]
    for step in range(4):
        g = torch.Generator().manual_seed(step)
        imgs, noise = torch.randn(4, 3, 64, 64, generator=g).to(CUDA), torch.rand(4, 16, generator=g).to(CUDA)
        losses = []
        for m, opt in zip(models, optims):
            opt.zero_grad(set_to_none=True)
            loss, aux, loads = m(imgs, 0.75, 0.25, noise)
            (loss + 1e-4 * aux.sum()).backward()
            opt.step()
            m.update_expert_biases(loads, 1e-2)
            losses.append(loss.detach())
        torch.testing.assert_close(losses[1], losses[0], rtol=1e-4, atol=1e-5, msg=f"step {step}")
        if step == 0:
            assert graphs.ready()
            graphs.capture()
    assert graphs.captured
    for (name, a), b in zip(eager.state_dict().items(), graphed.state_dict().values()):
        torch.testing.assert_close(b, a, rtol=1e-3, atol=1e-4, msg=name)
