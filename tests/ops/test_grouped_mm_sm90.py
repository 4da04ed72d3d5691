"""The persistent TMA grouped GEMM (geomoe_kernels/triton/grouped_gemm_sm90.py) against the pointer
kernel, bit for bit (both sum K in the same BK chunks), and against the float64 per-expert loop:
forward with each epilogue, gathered and contiguous rows, dgrad with act'; experts without rows,
tiles that leave a K and an N tail, fewer and more programs than tiles (the cursor over the
offsets), element offsets past 2^31, the same bits from two configs, and the output's TMA stores
(only tiles wholly inside their expert; the rest by pointer). Under the interpreter
(TRITON_INTERPRET=1, tests/test_triton_interpreter.py's process) the tensor descriptors are the
interpreter's (numpy loads with TMA's bounds, zero fill and 16-byte checks), so this covers the
schedule, the descriptors' coordinates and the epilogues; what the hardware's TMA and wgmma do is
the offline compile's (tests/test_triton_offline.py: HGMMA and TMA in the SASS) and the GPU's.
The choice of kernel (device, Triton, override, layouts) is checked in the main process."""

import importlib.util
import os

import pytest
import torch

from geomoe_kernels import kernel_recipes
from tests.helpers import assert_close, offsets, pointer_then_persistent
from tests.oracles import apply_act, naive_grouped_mm

SWIGLUS = ("swiglu", "swiglu_interleaved")

CASES = {
    "uneven": [5, 0, 17, 1, 9],
    "empty_first_last": [0, 12, 7, 0],
    "all_to_one": [0, 0, 31, 0],
    "decode": [0, 1, 0, 0, 0, 2, 0, 1],
    "no_rows": [0, 0, 0],
}


def _modules():
    from geomoe_kernels.triton import grouped_gemm as tg
    from geomoe_kernels.triton import grouped_gemm_sm90 as sm90

    return tg, sm90


@pytest.fixture
def launches(kernel_backend, monkeypatch):
    """The persistent kernel's launches that ran (True) or went to the pointer kernel (False)."""
    if kernel_backend.name != "triton":
        pytest.skip("the Triton kernels")
    if kernel_backend.device.type == "cuda" and torch.cuda.get_device_capability(kernel_backend.device) < (9, 0):
        pytest.skip("no TMA on this GPU: the pointer kernel runs every GEMM")
    tg, sm90 = _modules()
    assert tg.persistent_launch is sm90.launch
    ran = []
    monkeypatch.setattr(tg, "persistent_launch", lambda *a: ran.append(sm90.launch(*a)) or ran[-1])
    return ran


class _Spy:
    """A kernel whose launches note their INTERLEAVE (or another constexpr, `key`)."""

    def __init__(self, kernel, seen, key="INTERLEAVE"):
        self.kernel, self.seen, self.key = kernel, seen, key

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.seen.append(kwargs[self.key])
            return self.kernel[grid](*args, **kwargs)

        return launch


def _both(fn, programs, monkeypatch):
    """fn() with the pointer kernel, then with the persistent one on `programs` programs."""
    _, sm90 = _modules()
    return pointer_then_persistent(sm90, fn, programs, monkeypatch)


# each case on 3 programs (fewer than the tiles), the first also on one and on more than the tiles
@pytest.mark.parametrize("case, programs", [(c, 3) for c in CASES] + [("uneven", 1), ("uneven", 64)])
@pytest.mark.parametrize("act", ["none", "gelu", "swiglu", "swiglu_interleaved"])
def test_persistent_forward_is_the_pointer_kernels_bits(kernel_backend, launches, monkeypatch, case, act, programs):
    tg, _ = _modules()
    dev, dt, counts = kernel_backend.device, torch.float16, CASES[case]
    E, M, K, N = len(counts), sum(counts), 24, 40  # K and N tails past the interpreter's 16 x 16 tiles
    off = offsets(counts, dev)
    n_w = 2 * N if act in SWIGLUS else N
    w = (torch.randn(E, K, n_w) / 4).to(dev, dt)
    b = torch.randn(E, n_w).to(dev, dt)
    x = (torch.randn(M, K) / 2).to(dev, dt)
    got, want = _both(lambda: kernel_recipes.forward(tg.KERNELS, x, w, off, b, act), programs, monkeypatch)
    assert launches == [False, True]
    for g, p in zip(got, want):
        assert torch.equal(g, p)
    exact = naive_grouped_mm(x.double(), w.double(), off, b.double(), act)
    assert_close(got[0].double(), exact, dt)


@pytest.mark.parametrize("act", ["gelu", "swiglu", "swiglu_interleaved"])
@pytest.mark.parametrize("interleaved", [True, False])
def test_persistent_gathered_forward_is_the_pointer_kernels_bits(kernel_backend, launches, monkeypatch, act, interleaved):
    """Token rows gathered through the routing map: pointer loads of A, descriptors for W; the row
    blocks in the interleaved token order (the weights fit half the L2) or in expert order (the
    cursor: an L2 of 0 bytes here)."""
    from geomoe_kernels import route
    from tests.helpers import expert_ids

    if not interleaved:
        monkeypatch.setattr(kernel_recipes, "l2_bytes", lambda device: 0)
    tg, sm90 = _modules()
    ran = []
    real = sm90._gmm_persistent_kernel
    monkeypatch.setattr(sm90, "_gmm_persistent_kernel", _Spy(real, ran))
    dev, dt = kernel_backend.device, torch.float16
    T, k, E, K, N = 11, 3, 5, 32, 24
    r2f, _, off = (t.to(dev) for t in route(expert_ids(T, k, E), E, backend="torch"))
    n_w = 2 * N if act in SWIGLUS else N
    w = (torch.randn(E, K, n_w) / 4).to(dev, dt)
    x = (torch.randn(T, K) / 2).to(dev, dt)
    got, want = _both(lambda: kernel_recipes.forward(tg.KERNELS, x, w, off, None, act, gather=r2f, top_k=k), 3, monkeypatch)
    assert launches == [False, True] and ran == [interleaved]
    for g, p in zip(got, want):
        assert torch.equal(g, p)


@pytest.mark.parametrize("grad_act", ["none", "gelu", "swiglu", "swiglu_interleaved"])
def test_persistent_dgrad_is_the_pointer_kernels_bits(kernel_backend, launches, monkeypatch, grad_act):
    """grad @ W[e]^T through the transposed descriptor tile, act' (both SwiGLU halves) in the
    epilogue, against the pointer kernel and the float64 loop."""
    tg, _ = _modules()
    dev, dt, counts = kernel_backend.device, torch.float16, [6, 0, 19, 3]
    E, M, D, H = len(counts), sum(counts), 24, 40
    off = offsets(counts, dev)
    n_pre = 2 * H if grad_act in SWIGLUS else H
    w = (torch.randn(E, H, D) / 4).to(dev, dt)  # the down-projection's W [E, H, D], read as W[e]^T
    g = torch.randn(M, D).to(dev, dt)
    pre = torch.randn(M, n_pre).to(dev, dt) if grad_act != "none" else None
    got, want = _both(lambda: kernel_recipes.dgrad(tg.KERNELS, g, w, off, grad_act=grad_act, pre=pre), 3, monkeypatch)
    assert launches == [False, True] and torch.equal(got, want)
    d_hidden = torch.cat([g[lo:hi].double() @ w[e].double().t() for e, (lo, hi) in enumerate(zip(off[:-1], off[1:]))])
    if grad_act == "gelu":
        p = pre.double()
        cdf = 0.5 * (1 + torch.erf(p / 2**0.5))
        d_hidden = d_hidden * (cdf + p * torch.exp(-0.5 * p * p) / (2 * torch.pi) ** 0.5)
    if grad_act in SWIGLUS:  # d pre: the float64 loop's d hidden back through the activation (autograd)
        p = pre.double().requires_grad_(True)
        d_hidden = torch.autograd.grad(apply_act(grad_act, p), p, d_hidden)[0]
    assert_close(got.double(), d_hidden, dt, grad=True)


# the routed dgrad's rows: experts without rows (1, 4), ending mid-tile (0, 2, 3), the last past M
ROUTED_COUNTS = [5, 0, 20, 3, 0, 11]


def _routed_dgrad(dev, dt, grad_act, with_bias, counts=ROUTED_COUNTS, top_k=3, D=24, H=40, g=None):
    """The operands of dgrad_routed (tokens T = M / top_k, each row a random slot of the routing map)
    and a function running it: (d pre, partial)."""
    tg, _ = _modules()
    E, M = len(counts), sum(counts)
    T = M // top_k
    off = offsets(counts, dev)
    gather = torch.randperm(M).to(dev)
    n_pre = 2 * H if grad_act in SWIGLUS else H
    w2 = (torch.randn(E, H, D) / 4).to(dev, dt)
    b2 = torch.randn(E, D).to(dev, dt) if with_bias else None
    g = torch.randn(T, D).to(dev, dt) if g is None else g
    pre = torch.randn(M, n_pre).to(dev, dt)
    weights = torch.rand(T, top_k, device=dev)
    schedule = kernel_recipes.schedule_for(tg.KERNELS, off, M, dt)
    chunks = -(-H // kernel_recipes.ROUTING_CHUNK) + 1

    def run():
        d_pre = torch.full((M, n_pre), 7.0, dtype=dt, device=dev)
        partial = torch.full((M, chunks), 7.0, dtype=torch.float32, device=dev)
        tg.KERNELS.dgrad_routed(g, w2, b2, off, schedule, gather, top_k, weights, d_pre, grad_act, pre, partial)
        return d_pre, partial

    return run, (g, w2, b2, off, gather, top_k, weights, pre)


def _routed_dgrad_exact(grad_act, g, w2, b2, off, gather, top_k, weights, pre):
    """float64: d pre = w * (g[token] @ W2[e]^T) back through act, and each slot's <g, act(pre) W2[e] + b2[e]>."""
    d_pre, d_w = torch.zeros(pre.shape, dtype=torch.float64), torch.zeros(weights.numel(), dtype=torch.float64)
    for e, (lo, hi) in enumerate(zip(off.tolist()[:-1], off.tolist()[1:])):
        flat = gather[lo:hi].cpu()
        gt = g.cpu().double()[flat // top_k]
        p = pre[lo:hi].cpu().double().requires_grad_(True)
        h = apply_act(grad_act, p)
        d_h = gt @ w2[e].cpu().double().t()
        d_pre[lo:hi] = weights.cpu().double().view(-1)[flat][:, None] * torch.autograd.grad(h, p, d_h)[0]
        y = h.detach() @ w2[e].cpu().double() + (b2[e].cpu().double() if b2 is not None else 0)
        d_w[flat] = (gt * y).sum(-1)
    return d_pre, d_w.view(weights.shape)


@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("grad_act", ["none", "gelu", "silu", "swiglu", "swiglu_interleaved"])
def test_persistent_routed_dgrad_is_the_pointer_kernels_bits(kernel_backend, launches, monkeypatch, grad_act, with_bias):
    """The down-projection's dgrad through the routing map (the rows' token gradients gathered by
    pointer loads, W2 through the transposed descriptor) with the routing weights' gradient in the
    pointer kernel's epilogue: d pre and every partial the pointer kernel's bits (the partials' last
    column <g, b2>), every element written, and the float64 loop's values. d pre's tiles wholly
    inside their expert leave through the TMA store descriptors (the others by pointer: experts 0, 2
    and 3 end mid-tile, so a whole box there would overwrite the next expert's rows)."""
    tg, sm90 = _modules()
    ran, tma = [], []
    spy = _Spy(_Spy(sm90._gmm_persistent_kernel, tma, "TMA_STORE"), ran, "ROUTED")
    monkeypatch.setattr(sm90, "_gmm_persistent_kernel", spy)
    dev, dt = kernel_backend.device, torch.float16
    run, operands = _routed_dgrad(dev, dt, grad_act, with_bias)
    got, want = _both(run, 3, monkeypatch)
    assert launches == [False, True] and ran == [True] and tma == [True]
    for x, y in zip(got, want):
        assert torch.equal(x, y)
    d_pre, d_w = _routed_dgrad_exact(grad_act, *operands)
    assert_close(got[0].double(), d_pre, dt, grad=True)
    top_k = operands[5]
    assert_close(got[1].view(-1, top_k, got[1].shape[1]).sum(-1).double(), d_w, dt, grad=True)


@pytest.mark.parametrize("grad_act", ["gelu", "swiglu"])
def test_persistent_routed_dgrad_in_expert_order(kernel_backend, launches, monkeypatch, grad_act):
    """The same with the row blocks in expert order (the cursor; an L2 of 0 bytes here) on one
    program and on more programs than tiles."""
    monkeypatch.setattr(kernel_recipes, "l2_bytes", lambda device: 0)
    _, sm90 = _modules()
    ran = []
    monkeypatch.setattr(sm90, "_gmm_persistent_kernel", _Spy(sm90._gmm_persistent_kernel, ran))
    run, operands = _routed_dgrad(kernel_backend.device, torch.float16, grad_act, True)
    for programs in (1, 64):
        got, want = _both(run, programs, monkeypatch)
        for x, y in zip(got, want):
            assert torch.equal(x, y)
    assert launches == [False, True] * 2 and ran == [False, False]


def test_persistent_routed_dgrad_addresses_past_2_31_elements(kernel_backend, launches, monkeypatch):
    """The tokens' gradient rows 2^30 elements apart (token 2 at 2^31), gathered by pointer in the
    k-loop and in the <g, b2> sum: the pointer kernel's bits and the float64 values."""
    dev, dt, D = kernel_backend.device, torch.float16, 16
    big = torch.empty(2**31 + 4096, dtype=dt, device=dev)
    g = big.as_strided((3, D), (2**30, 1))
    g.copy_(torch.randn(3, D).to(dt))
    run, operands = _routed_dgrad(dev, dt, "gelu", True, counts=[2, 4], top_k=2, D=D, H=16, g=g)
    got, want = _both(run, 3, monkeypatch)
    assert launches == [False, True]
    for x, y in zip(got, want):
        assert torch.equal(x, y)
    d_pre, d_w = _routed_dgrad_exact("gelu", *operands)
    assert_close(got[0].double(), d_pre, dt, grad=True)
    assert_close(got[1].view(3, 2, -1).sum(-1).double(), d_w, dt, grad=True)


# expert 0 ends mid-tile (its tile's rows 5-15 are expert 1's), expert 1 has a full tile and ends
# mid-tile, expert 3 fills one tile exactly, the last expert's tile reaches past M (the interpreter's
# BM is 16). N = 24: two column tiles on three programs, so a tile's row block below is often
# written by a program that runs before it (the interpreter runs programs one after another): a
# boundary tile stored as a whole box would overwrite the next expert's finished rows.
TMA_COUNTS = [5, 20, 3, 16, 9]


@pytest.mark.parametrize("act", ["none", "gelu", "swiglu", "swiglu_interleaved"])
def test_persistent_tma_stores_keep_the_next_experts_rows(kernel_backend, launches, monkeypatch, act):
    """Tiles wholly inside their expert (or reaching past M) written through the Out and Pre
    descriptors, the boundary tiles by masked pointer stores: the pointer kernel's bits, out and pre,
    and the float64 loop's values. Interleaved SwiGLU: the output box BN / 2 columns at n0 / 2."""
    tg, sm90 = _modules()
    if kernel_backend.device.type == "cpu":
        assert tg.block_m(torch.float16) == 16  # the tiles the counts above are drawn for
    ran = []
    monkeypatch.setattr(sm90, "_gmm_persistent_kernel", _Spy(sm90._gmm_persistent_kernel, ran, "TMA_STORE"))
    dev, dt, counts = kernel_backend.device, torch.float16, TMA_COUNTS
    E, M, K, N = len(counts), sum(counts), 24, 24
    off = offsets(counts, dev)
    n_w = 2 * N if act in SWIGLUS else N
    w = (torch.randn(E, K, n_w) / 4).to(dev, dt)
    b = torch.randn(E, n_w).to(dev, dt)
    x = (torch.randn(M, K) / 2).to(dev, dt)
    got, want = _both(lambda: kernel_recipes.forward(tg.KERNELS, x, w, off, b, act), 3, monkeypatch)
    assert launches == [False, True] and ran == [True]
    for g, p in zip(got, want):
        assert torch.equal(g, p)
    if act != "swiglu":
        exact = naive_grouped_mm(x.double(), w.double(), off, b.double(), act)
        assert_close(got[0].double(), exact, dt)


@pytest.mark.parametrize("grad_act", ["none", "gelu", "swiglu", "swiglu_interleaved"])
def test_persistent_tma_stores_keep_the_next_experts_rows_in_the_dgrad(kernel_backend, launches, monkeypatch, grad_act):
    """The dgrad's d pre through the Out descriptors (both SwiGLU halves; interleaved, one box of 2 BN
    columns at 2 n0), pre read by pointer."""
    tg, sm90 = _modules()
    ran = []
    monkeypatch.setattr(sm90, "_gmm_persistent_kernel", _Spy(sm90._gmm_persistent_kernel, ran, "TMA_STORE"))
    dev, dt, counts = kernel_backend.device, torch.float16, TMA_COUNTS
    E, M, D, H = len(counts), sum(counts), 24, 24
    off = offsets(counts, dev)
    w = (torch.randn(E, H, D) / 4).to(dev, dt)
    g = torch.randn(M, D).to(dev, dt)
    pre = torch.randn(M, 2 * H if grad_act in SWIGLUS else H).to(dev, dt) if grad_act != "none" else None
    got, want = _both(lambda: kernel_recipes.dgrad(tg.KERNELS, g, w, off, grad_act=grad_act, pre=pre), 3, monkeypatch)
    assert launches == [False, True] and ran == [True] and torch.equal(got, want)
    if grad_act == "none":
        exact = torch.cat([g[lo:hi].double() @ w[e].double().t() for e, (lo, hi) in enumerate(zip(off[:-1], off[1:]))])
        assert_close(got.double(), exact, dt, grad=True)


@pytest.mark.parametrize("act", ["gelu", "swiglu", "swiglu_interleaved"])
def test_persistent_tma_stores_stay_inside_the_output_view(kernel_backend, launches, monkeypatch, act):
    """out and pre as views of larger sentinel-filled buffers (rows past M, columns past N): the
    descriptors' bounds are the views', so the last tile (past M) and the N tail write nothing
    outside them; inside, the pointer kernel's bits."""
    tg, sm90 = _modules()
    dev, dt, counts = kernel_backend.device, torch.float16, TMA_COUNTS
    E, M, K, N = len(counts), sum(counts), 24, 24
    off = offsets(counts, dev)
    n_w = 2 * N if act in SWIGLUS else N
    w = (torch.randn(E, K, n_w) / 4).to(dev, dt)
    x = (torch.randn(M, K) / 2).to(dev, dt)
    schedule = kernel_recipes.schedule_for(tg.KERNELS, off, M, dt)
    ran = []
    monkeypatch.setattr(sm90, "_gmm_persistent_kernel", _Spy(sm90._gmm_persistent_kernel, ran, "TMA_STORE"))

    def run():
        big_out = torch.full((M + 16, N + 8), 7.0, dtype=dt, device=dev)
        big_pre = torch.full((M + 16, n_w + 8), 7.0, dtype=dt, device=dev)
        out, pre = big_out[:M, :N], big_pre[:M, :n_w]
        tg.KERNELS.forward(x, w, off, schedule, None, act, None, 1, out, pre)
        return big_out, big_pre

    got, want = _both(run, 3, monkeypatch)
    assert launches == [False, True] and ran == [True]
    for g, p, cols in zip(got, want, (N, n_w)):
        assert torch.equal(g, p)
        assert (g[M:] == 7).all() and (g[:, cols:] == 7).all()


def test_outputs_tma_cannot_write_keep_pointer_stores(kernel_backend, launches, monkeypatch):
    """N = 12 half-precision columns (24-byte rows): the output keeps the masked pointer stores
    (TMA_STORE off) while W and A still come through descriptors; the same bits."""
    tg, sm90 = _modules()
    ran = []
    monkeypatch.setattr(sm90, "_gmm_persistent_kernel", _Spy(sm90._gmm_persistent_kernel, ran, "TMA_STORE"))
    dev, dt, counts = kernel_backend.device, torch.float16, TMA_COUNTS
    E, M, K, N = len(counts), sum(counts), 16, 12
    off = offsets(counts, dev)
    w = (torch.randn(E, K, 16) / 4).to(dev, dt)[:, :, :N]  # rows 32 bytes apart: W's descriptor takes it
    x = (torch.randn(M, K) / 2).to(dev, dt)
    got, want = _both(lambda: kernel_recipes.forward(tg.KERNELS, x, w, off, None, "gelu"), 3, monkeypatch)
    assert launches == [False, True] and ran == [False]
    for g, p in zip(got, want):
        assert torch.equal(g, p)


def test_persistent_configs_give_the_same_bits(kernel_backend, launches, monkeypatch):
    """Two tiles that share the summation chunk BK: the same bits (autotuning may pick either)."""
    import triton

    tg, sm90 = _modules()
    dev, dt, counts = kernel_backend.device, torch.float16, [5, 0, 37, 1, 0, 21]
    off = offsets(counts, dev)
    x = (torch.randn(sum(counts), 48) / 2).to(dev, dt)
    w = (torch.randn(6, 48, 40) / 5).to(dev, dt)
    b = torch.randn(6, 40).to(dev, dt)
    chunk = sm90._CONFIGS[0].kwargs["BK"]
    assert {c.kwargs["BK"] for c in sm90._CONFIGS} == {chunk} == {c.kwargs["BK"] for c in tg._GEMM_CONFIGS}
    outs = []
    with sm90.forced("persistent"):
        for bn, occ in ((16, 1), (32, 2)):
            config = triton.Config({"BN": bn, "BK": chunk, "OCC": occ}, num_warps=4)
            monkeypatch.setattr(sm90._gmm_persistent_kernel, "configs", [config])
            monkeypatch.setattr(sm90._gmm_persistent_kernel, "cache", {})
            outs.append(kernel_recipes.forward(tg.KERNELS, x, w, off, b, "gelu"))
    assert launches == [True, True]
    for first, second in zip(*outs):
        assert torch.equal(first, second)


def test_persistent_kernel_addresses_past_2_31_elements(kernel_backend, launches, monkeypatch):
    """A's rows 2^30 elements apart (row 2 at 2^31) read through the A descriptor, and expert 1's
    weights from 2^31 + 512 through the W descriptor, forward and dgrad. One 4 GiB fp16 storage,
    untouched but for the few rows used (views, no copy)."""
    tg, sm90 = _modules()
    dev, dt, K, N = kernel_backend.device, torch.float16, 16, 24
    big = torch.empty(2**31 + 4096, dtype=dt, device=dev)
    a = big.as_strided((3, K), (2**30, 1))
    a.copy_((torch.randn(3, K) / 2).to(dt))
    w = big.as_strided((2, K, N), (2**31 + 512 - 2048, N, 1), 2048)
    w.copy_((torch.randn(2, K, N) / 4).to(dt))
    off = offsets([2, 1], dev)
    with sm90.forced("persistent"):
        out, _ = kernel_recipes.forward(tg.KERNELS, a, w, off, None, "none")
        g = (torch.randn(3, N) / 2).to(dev, dt)
        d = kernel_recipes.dgrad(tg.KERNELS, g, w, off)
    assert launches == [True, True]
    ad, wd, gd = a.cpu().double(), w.cpu().double(), g.cpu().double()
    tol = dict(rtol=2e-3, atol=4e-3)
    torch.testing.assert_close(out.cpu().double(), torch.cat([ad[:2] @ wd[0], ad[2:] @ wd[1]]), **tol)
    torch.testing.assert_close(d.cpu().double(), torch.cat([gd[:2] @ wd[0].t(), gd[2:] @ wd[1].t()]), **tol)


# ---- the choice (main process) ----------------------------------------------------------------------


def test_the_kernel_is_chosen_by_capability_triton_and_override():
    pytest.importorskip("triton")
    _, sm90 = _modules()
    chosen = sm90.persistent_chosen
    assert chosen("auto", (9, 0), True) and chosen("auto", (10, 0), True)
    assert not chosen("auto", (8, 0), True) and not chosen("auto", None, True)  # A100, CPU: the pointer kernel
    assert not chosen("auto", (9, 0), False)  # a Triton without tensor descriptors
    assert not chosen("pointer", (9, 0), True) and not chosen("persistent", (9, 0), False)
    assert chosen("persistent", None, True) and not chosen("persistent", (8, 6), True)  # the interpreter; no TMA
    if not torch.cuda.is_available():  # what python -m geomoe_kernels.info says of it on a CPU
        with sm90.forced("pointer"):
            assert "the pointer-load kernels on cpu" in sm90.describe() and "GEOMOE_TRITON_GEMM=pointer" in sm90.describe()
        with sm90.forced("persistent"):
            assert "the persistent TMA kernels on cpu" in sm90.describe()


def test_extents_past_int32_and_broadcast_views_go_to_the_pointer_kernels(monkeypatch):
    """Triton's descriptors take int32 shapes and coordinates (a larger one is truncated without a
    word) and a zero stride is no TMA layout: such operands and outputs keep the pointer kernels.
    The extent limit lowered to 40 stands in for 2^31."""
    pytest.importorskip("triton")
    _, sm90 = _modules()
    x, w, out = torch.randn(48, 32).half(), torch.randn(2, 32, 16).half(), torch.empty(48, 16).half()
    with sm90.forced("persistent"):
        assert sm90.takes(x, w, "gelu", None, 16) and sm90.stores_by_tma(out, None, False, 16)
        assert not sm90.takes(x, w[:1].expand(2, 32, 16), "gelu", None, 16)  # experts share one weight
        monkeypatch.setattr(sm90, "MAX_TMA_EXTENT", 40)
        assert not sm90.takes(x, w, "gelu", None, 16)  # A's 48 rows
        assert sm90.takes(x[:40], w, "gelu", None, 16)
        assert not sm90.stores_by_tma(out, None, False, 16)  # the output's 48 rows
        assert sm90.stores_by_tma(out[:40], None, False, 16)
        assert not sm90.takes(x[:40], torch.randn(48, 32, 16).half(), "gelu", None, 16)  # 48 experts


def test_operands_tma_cannot_read_go_to_the_pointer_kernel():
    pytest.importorskip("triton")
    _, sm90 = _modules()
    x, w = torch.randn(8, 32).half(), torch.randn(2, 32, 16).half()
    with sm90.forced("persistent"):
        assert sm90.takes(x, w, "gelu", None, 16)
        assert not sm90.takes(x.float(), w.float(), "gelu", None, 16)  # float32: the pointer kernel's
        assert not sm90.takes(x, w.transpose(1, 2).contiguous().transpose(1, 2), "none", None, 16)  # columns strided
        assert not sm90.takes(torch.randn(8, 33).half()[:, :32], w, "none", None, 16)  # rows 66 bytes apart
        assert sm90.takes(torch.randn(8, 33).half()[:, :32], w, "none", torch.zeros(8, dtype=torch.long), 16)  # gathered
        assert not sm90.takes(torch.randn(8 * 32 + 1).half()[1:].view(8, 32), w, "none", None, 16)  # base off 16 B
        assert not sm90.takes(x.t().contiguous().t(), w, "none", torch.zeros(8, dtype=torch.long), 16)  # strided columns
        assert not sm90.takes(x, torch.randn(2, 32, 2 * 12).half(), "swiglu", None, 12)  # 'up' box at 24 bytes
        assert sm90.takes(x, torch.randn(2, 32, 2 * 12).half(), "swiglu_interleaved", None, 24)  # pairs: no 'up' box
    with sm90.forced("pointer"):
        assert not sm90.takes(x, w, "gelu", None, 16)
    # the output and the stored pre-activation through descriptors: TMA's 16-byte rules, else pointer stores
    out, pre = torch.empty(8, 16).half(), torch.empty(8, 32).half()
    assert sm90.stores_by_tma(out, pre, True, 16) and sm90.stores_by_tma(out, None, False, 16)
    assert not sm90.stores_by_tma(torch.empty(8, 12).half(), None, False, 12)  # rows 24 bytes apart
    assert not sm90.stores_by_tma(torch.empty(8, 24).half(), None, True, 12)  # the 'up' half's base at 24 bytes
    assert not sm90.stores_by_tma(out, torch.empty(8, 24).half(), True, 12)  # pre's 'up' half at 24 bytes
    assert not sm90.stores_by_tma(torch.empty(8 * 16 + 1).half()[1:].view(8, 16), None, False, 16)  # base off 16 B
    assert not sm90.stores_by_tma(out, torch.empty(16, 8).half().t(), False, 16)  # pre's columns strided


def test_each_thread_gets_the_scratch_allocator_unless_it_has_one():
    """Triton keeps the allocator in a context variable: a thread that never set one (autograd's
    device thread runs the dgrad) gets ours at its first launch, one that set its own keeps it."""
    import threading

    pytest.importorskip("triton")
    import triton
    from triton.runtime import _allocation

    _, sm90 = _modules()
    seen = {}

    def fresh():
        seen["before"] = sm90._current_allocator_unset()
        sm90._ensure_allocator()
        seen["after"] = _allocation._allocator.get()

    def own():
        mine = lambda size, alignment, stream: None  # noqa: E731
        triton.set_allocator(mine)
        sm90._ensure_allocator()
        seen["own"] = _allocation._allocator.get() is mine

    for fn in (fresh, own):
        t = threading.Thread(target=fn)
        t.start()
        t.join()
    assert seen == {"before": True, "after": sm90._scratch, "own": True}


def test_a_bad_override_is_refused_naming_the_variable(monkeypatch):
    pytest.importorskip("triton")
    _, sm90 = _modules()
    monkeypatch.setenv("GEOMOE_TRITON_GEMM", "tma")
    spec = importlib.util.spec_from_file_location("geomoe_kernels.triton._sm90_copy", sm90.__file__)
    with pytest.raises(ValueError, match="GEOMOE_TRITON_GEMM must be one of auto, pointer, persistent; got 'tma'"):
        spec.loader.exec_module(importlib.util.module_from_spec(spec))
    assert os.environ["GEOMOE_TRITON_GEMM"] == "tma"
