"""The CUDA core's kernels executed on the CPU through the emulated core (csrc/emulation/), on every
CI run: each kernel forward and backward against the float64 reference (fp32 where the kernel takes
it; fp16 and bf16 within 2x torch's own error in that dtype), the edge cases, the MoE layer and the
model on backend="cuda" against backend="torch"; then each of the emulator's detectors, fed a launch
or kernel (tests/emulation/broken_kernels.cu) that breaks its rule; and this file once more in a
process of its own against the AddressSanitizer build, so that an out-of-bounds access fails."""

import ctypes
import importlib.util
import os
import re
import shutil
import subprocess
import sys

import pytest
import torch

from geomoe_kernels import (
    BackendUnavailable,
    MoEMLP,
    backend,
    cuda,
    expert_mlp,
    grouped_mm,
    layout,
    masked_depthwise_conv,
    permute,
    route,
    topk_gating,
    unpermute,
)
from tests.helpers import GRAD_TOL, assert_close, assert_within_twice_reference_error
from tests.oracles import naive_gating, naive_route

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
REQUIRED = os.environ.get("GEOMOE_REQUIRE_CUDA") == "1"  # CI: the emulated core must have been built
VARIANT = cuda.emulation() or "1"  # "asan" in the AddressSanitizer run below
CORE, STATUS = cuda.load_emulated(VARIANT)
HALF = [torch.float16, torch.bfloat16]
ALL = [torch.float32, *HALF]

pytestmark = pytest.mark.skipif(CORE is None and not REQUIRED, reason=f"the emulated CUDA core is {STATUS}")


@pytest.fixture(autouse=True)
def _emulate(monkeypatch):
    assert CORE is not None, STATUS
    monkeypatch.setenv("GEOMOE_CUDA_EMULATE", VARIANT)


def _within_reference(run, leaves, dtype):
    """run(backend, *leaves) -> output. Output and the gradients of mean(output^2) from the emulated
    kernels against float64: within 1e-4 in float32; in fp16 and bf16 at most twice the error of
    torch's own run in that dtype."""
    outs = []
    for be, cast in (("cuda", None), ("torch", None), ("torch", torch.float64)):
        ls = [t if cast is None else t.detach().to(cast).requires_grad_(True) for t in leaves]
        y = run(be, *ls)
        outs.append([t.double() for t in (y, *torch.autograd.grad(y.double().square().mean(), ls))])
    for ours, same_dtype, exact in zip(*outs):
        if dtype == torch.float32:
            assert_close(ours, exact, dtype, grad=True)
        else:
            assert_within_twice_reference_error(ours, same_dtype, exact)
    return outs[0]


def _ids(T, E, k, empty=()):
    """[T, k] distinct expert ids per token; the experts in `empty` get no token."""
    allowed = torch.tensor([e for e in range(E) if e not in empty])
    return torch.stack([allowed[torch.randperm(len(allowed))[:k]] for _ in range(T)])


# ---- which core runs -------------------------------------------------------------------------------


def test_cuda_backend_runs_cpu_tensors_through_the_emulated_core(monkeypatch):
    x = torch.randn(4, 8)
    r2f = torch.arange(4)
    args = dict(x=x, row_to_flat=r2f, flat_to_row=r2f, top_k=1, weights=None)
    assert cuda._core_for(x) is CORE and CORE.architectures() == "emulated"
    assert CORE.__name__.endswith("_asan") == (VARIANT == "asan")
    assert backend.select("permute", "auto", x.device, args) is cuda.permute
    # opt-in on a GPU (slower than Triton there), so here too
    assert backend.select("grouped_mm", "auto", x.device, None) is not cuda.grouped_mm
    from geomoe_kernels.info import report

    assert "auto -> cuda (the emulated core)" in report()
    monkeypatch.delenv("GEOMOE_CUDA_EMULATE")
    assert backend.select("permute", "auto", x.device, args) is cuda.permute  # the choice is cached ...
    backend.forget()  # ... until the environment is read again
    assert backend.select("permute", "auto", x.device, args) is not cuda.permute
    with pytest.raises(BackendUnavailable, match="GEOMOE_CUDA_EMULATE=1"):
        permute(x, r2f, r2f, 1, backend="cuda")


# ---- every kernel against the reference ------------------------------------------------------------


@pytest.mark.parametrize(
    "T, E, k, score_func, renormalize",
    [
        (1, 7, 1, "sigmoid", True),
        (100, 23, 3, "sigmoid", True),
        (511, 23, 8, "softmax", False),
        (37, 64, 5, "softmax", True),
        (20, 1024, 8, "sigmoid", False),
        (9, 1000, 2, "softmax", True),
    ],
)
def test_gating_forward_and_backward(T, E, k, score_func, renormalize):
    """One warp per token, E up to the kernel's 1024 (32 per lane), k up to 8, a partial last block."""
    logits = torch.randn(T, E, requires_grad=True)
    bias = 0.1 * torch.randn(E) if score_func == "sigmoid" else None
    got = topk_gating(logits, bias, k, score_func, renormalize, backend="cuda")
    l64 = logits.detach().double().requires_grad_(True)
    want = topk_gating(l64, None if bias is None else bias.double(), k, score_func, renormalize, backend="torch")
    assert torch.equal(got[1], want[1]) and torch.equal(got[2], want[2])
    for a, b in ((got[0], want[0]), (got[3], want[3])):
        torch.testing.assert_close(a.double(), b, **GRAD_TOL[torch.float32])
    gw, gp = torch.randn(T, k, dtype=torch.float64), torch.randn(E, dtype=torch.float64)
    g_got = torch.autograd.grad((got[0] * gw.float()).sum() + (got[3] * gp.float()).sum(), logits)[0]
    g_want = torch.autograd.grad((want[0] * gw).sum() + (want[3] * gp).sum(), l64)[0]
    torch.testing.assert_close(g_got.double(), g_want, **GRAD_TOL[torch.float32])


def test_gating_matches_the_naive_loops_and_breaks_ties_to_the_lower_expert():
    logits = torch.randn(13, 9)
    got = topk_gating(logits, None, 3, "softmax", True, backend="cuda")
    want = naive_gating(logits.double(), None, 3, "softmax", True)
    assert torch.equal(got[1], want[1]) and torch.equal(got[2], want[2])
    torch.testing.assert_close(got[0].double(), want[0], **GRAD_TOL[torch.float32])
    _, ids, counts, _ = topk_gating(torch.zeros(5, 6), None, 3, backend="cuda")
    assert ids.tolist() == [[0, 1, 2]] * 5 and counts.tolist() == [5, 5, 5, 0, 0, 0]


@pytest.mark.parametrize("E, k", [(2, 3), (5, 0), (0, 1), (1025, 1), (16, 9)])
def test_gating_launcher_refuses_what_the_kernel_cannot_fill(E, k):
    """The core's launcher called directly, without the op's checks: k distinct experts need
    1 <= k <= E (and E <= 1024, k <= 8, the kernel's maxima). Anything else is refused before a
    launch, never run into a duplicate id or a count written past the end."""
    T = 3
    logits, w = torch.randn(T, max(E, 1)), torch.zeros(T, max(k, 1))
    ids, counts = torch.zeros(T, max(k, 1), dtype=torch.int64), torch.zeros(max(E, 1), dtype=torch.int64)
    partial = torch.zeros(1, max(E, 1))
    with pytest.raises(RuntimeError, match=r"emulated CUDA core: topk_gating: invalid argument"):
        CORE.topk_gating(
            logits=logits.data_ptr(),
            tokens=T,
            num_experts=E,
            bias=0,
            top_k=k,
            softmax=False,
            renormalize=True,
            weights=w.data_ptr(),
            ids=ids.data_ptr(),
            counts=counts.data_ptr(),
            partial=partial.data_ptr(),
            stream=0,
        )
    assert counts.sum() == 0 and ids.sum() == 0


@pytest.mark.parametrize("T, k, E", [(1, 1, 4), (100, 3, 7), (75, 8, 23), (600, 1, 5), (64, 8, 4096), (1000, 3, 2), (257, 1, 1)])
def test_route(T, k, E):
    """Histogram per block of 32 ids (E up to the 4096 that fit in shared memory) and the stable
    scatter, ranked by a warp's match: several thread blocks of 8 warps (3,000 ids), a tail warp with
    lanes past the last id (24 of 3,000 and 1 of 257 ids), and one expert taking all 32 lanes."""
    ids = _ids(T, E, k, empty=(1,) if E > k + 1 else ())
    got = route(ids, E, backend="cuda")
    want = naive_route(ids, E) if E <= 23 else route(ids, E, backend="torch")
    for a, b in zip(got, want):
        assert torch.equal(a, b)


@pytest.mark.parametrize("dtype", ALL)
@pytest.mark.parametrize("T, k, d", [(1, 1, 8), (100, 3, 72), (511, 2, 40), (40, 4, 64), (33, 2, 37), (9, 3, 300)])
def test_permute_and_weighted_unpermute(dtype, T, k, d):
    """permute, unpermute with routing weights and the shared experts' rows, and their backward
    (unpermute_weight_grad: one warp per token and a fixed shuffle tree). d a multiple of 8 takes the
    16-byte path (d = 300 in float32 too, more than one chunk per lane), d = 37 the scalar one."""
    E = 5
    r2f, f2r, _ = route(_ids(T, E, k), E, backend="torch")
    x = torch.randn(T, d).to(dtype).requires_grad_(True)
    z = torch.randn(T * k, d).to(dtype).requires_grad_(True)  # each slot's row its own
    w = torch.rand(T, k, requires_grad=True)
    shared = torch.randn(T, d).to(dtype).requires_grad_(True)

    def run(be, x, z, w, shared):
        rows = permute(x, r2f, f2r, k, backend=be) * 2 + z
        return unpermute(rows, r2f, f2r, k, w, shared, backend=be)

    _within_reference(run, [x, z, w, shared], dtype)


@pytest.mark.parametrize("dtype", ALL)
@pytest.mark.parametrize("shift, extra", [(1, 0), (0, 1)])
def test_permute_kernels_fall_back_to_scalar_on_unaligned_rows(dtype, shift, extra):
    """Rows that start off 16 bytes (a shifted base, or a leading dimension of 65) with d = 64 take the
    scalar path and give the aligned path's results: permute and unpermute bit for bit (the same
    float32 sum per element), the weight gradient within rounding (another order of the dot product)."""
    T, k, d, E = 21, 3, 64, 6
    r2f, f2r, _ = route(_ids(T, E, k), E, backend="torch")

    def odd(t):  # the same values, at a base `shift` elements on and rows d + extra apart
        buf = torch.zeros(t.shape[0] * (d + extra) + shift, dtype=dtype)
        v = buf[shift:].view(t.shape[0], d + extra)[:, :d]
        v.copy_(t)
        return v

    x, shared = torch.randn(T, d).to(dtype), torch.randn(T, d).to(dtype)
    w = torch.rand(T, k)
    rows = cuda.permute(x, r2f, k, w)
    assert torch.equal(cuda.permute(odd(x), r2f, k, w), rows)
    assert torch.equal(cuda.permute(odd(x), r2f, k, None), cuda.permute(x, r2f, k, None))
    out = cuda.unpermute(rows, f2r, k, w, shared)
    assert torch.equal(cuda.unpermute(odd(rows), f2r, k, w, odd(shared)), out)
    assert torch.equal(cuda.unpermute(rows, f2r, k, w, odd(shared)), out)
    g = torch.randn(T, d).to(dtype)
    gw = cuda.unpermute_weight_grad(g, rows, f2r, k)
    torch.testing.assert_close(cuda.unpermute_weight_grad(odd(g), odd(rows), f2r, k), gw, rtol=1e-5, atol=1e-5)
    want = (g.double()[:, None, :] * rows.double()[f2r.view(T, k)]).sum(-1)
    torch.testing.assert_close(gw.double(), want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("k", range(1, 9))
def test_every_k_from_gating_to_combine(k):
    """Each k the kernels take, through gating, routing and the weighted combine, in float32."""
    T, E, d = 17, 11, 24
    logits = torch.randn(T, E)
    w, ids, _, _ = topk_gating(logits, None, k, backend="cuda")
    _, want_ids, _, _ = topk_gating(logits.double(), None, k, backend="torch")
    assert torch.equal(ids, want_ids)
    r2f, f2r, off = route(ids, E, backend="cuda")
    for a, b in zip((r2f, f2r, off), naive_route(ids, E)):
        assert torch.equal(a, b)
    x, z = torch.randn(T, d, requires_grad=True), torch.randn(T * k, d, requires_grad=True)

    def run(be, x, z, w):
        return unpermute(permute(x, r2f, f2r, k, backend=be) + z, r2f, f2r, k, w, None, backend=be)

    _within_reference(run, [x, z, w.detach().requires_grad_(True)], torch.float32)


@pytest.mark.parametrize("dtype", ALL)
@pytest.mark.parametrize("s, kernel, channels", [(4, 5, 72), (2, 3, 130)])
def test_masked_depthwise_conv(dtype, s, kernel, channels):
    """Forward, dx (the flipped kernel) and the per-block weight and bias gradients; rows and
    channels that fill no block exactly."""
    kept = torch.stack([torch.randperm(30)[:7] for _ in range(2)])
    nbr = layout.neighbor_table(kept, (5, 6), s, kernel)
    x = torch.randn(nbr.shape[0], channels).to(dtype).requires_grad_(True)
    w = (torch.randn(channels, kernel * kernel) / kernel).to(dtype).requires_grad_(True)
    b = torch.randn(channels).to(dtype).requires_grad_(True)
    _within_reference(lambda be, x, w, b: masked_depthwise_conv(x, nbr, w, b, be), [x, w, b], dtype)


@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("act", ["none", "gelu", "silu"])
@pytest.mark.parametrize("gathered", [False, True])
def test_grouped_mm(dtype, act, gathered):
    """The WMMA grouped GEMM forward, its dgrad and wgrad; K and N not multiples of the tiles,
    experts 1 and 4 without rows: their weight and bias gradients are exact zeros."""
    T, k, E, K, N = 67, 3, 6, 72, 40
    r2f, f2r, off = route(_ids(T, E, k, empty=(1, 4)), E, backend="torch")
    x = (torch.randn(T, K) / 2).to(dtype).requires_grad_(True)
    w = (torch.randn(E, K, N) / K**0.5).to(dtype).requires_grad_(True)
    b = torch.randn(E, N).to(dtype).requires_grad_(True)

    def run(be, x, w, b):
        if gathered:
            return grouped_mm(x, w, off, b, act, backend=be, gather=r2f, flat_to_row=f2r, top_k=k)
        return grouped_mm(permute(x, r2f, f2r, k, backend=be), w, off, b, act, backend=be)

    _, _, dw, db = _within_reference(run, [x, w, b], dtype)
    for e in (1, 4):
        assert torch.count_nonzero(dw[e]) == 0 and torch.count_nonzero(db[e]) == 0


@pytest.mark.parametrize("E,empty", [(5, (2,)), (70, (0, 33, 69))])
def test_gathered_forward_interleaved_across_experts_equals_expert_order(monkeypatch, E, empty):
    """The gathered forward runs its row blocks interleaved across experts (token order; the
    weights fit in L2): every block of the schedule exactly once, surplus slots exiting, the same
    bits as one expert after another. 1,200 rows make 10 rounds: over 5 experts, one empty, several
    blocks per expert; over 70, three empty, the first warp's search holds 3 experts a lane and
    leaves its last lanes without any."""
    from geomoe_kernels import kernel_recipes

    T, k, K, N = 400, 3, 64, 40
    r2f, f2r, off = route(_ids(T, E, k, empty=empty), E, backend="torch")
    x = torch.randn(T, K).half()
    w = (torch.randn(E, K, N) / K**0.5).half()
    b = torch.randn(E, N).half()
    schedule = kernel_recipes.block_schedule(off, T * k, cuda._any_core().grouped_mm_block_rows())
    assert kernel_recipes.interleave_rounds(True, w, schedule) == 10
    interleaved = grouped_mm(x, w, off, b, "gelu", backend="cuda", gather=r2f, flat_to_row=f2r, top_k=k)
    monkeypatch.setattr(kernel_recipes, "interleave_rounds", lambda gathered, weight, schedule: 0)
    expert_order = grouped_mm(x, w, off, b, "gelu", backend="cuda", gather=r2f, flat_to_row=f2r, top_k=k)
    assert torch.equal(interleaved, expert_order)
    want = grouped_mm(x.double(), w.double(), off, b.double(), "gelu", backend="torch", gather=r2f, flat_to_row=f2r, top_k=k)
    assert_close(interleaved, want, torch.float16)


def test_gathered_forward_of_no_tokens():
    """No routed rows (an empty batch, or an expert-parallel rank that received none): the gathered
    forward returns [0, N] and the backward zeros, with no launch that needs the empty gather."""
    E, k, K, N = 4, 2, 16, 8
    r2f, f2r, off = route(torch.empty(0, k, dtype=torch.int64), E, backend="torch")
    x = torch.randn(0, K).half().requires_grad_(True)
    w = torch.randn(E, K, N).half().requires_grad_(True)
    b = torch.randn(E, N).half().requires_grad_(True)
    y = grouped_mm(x, w, off, b, "gelu", backend="cuda", gather=r2f, flat_to_row=f2r, top_k=k)
    assert y.shape == (0, N)
    dx, dw, db = torch.autograd.grad(y.float().sum(), (x, w, b))
    assert dx.shape == (0, K) and torch.count_nonzero(dw) == 0 and torch.count_nonzero(db) == 0


@pytest.mark.parametrize("dtype", HALF)
def test_grouped_mm_rows_not_16_byte_aligned(dtype):
    """K = 37 and N = 21: no row of x, W or the gradients starts on 16 bytes, so every tile takes the
    scalar copies instead of the asynchronous 16-byte ones (forward gathered, dgrad, wgrad)."""
    T, k, E = 30, 2, 3
    _gathered_gelu_within_reference(_ids(T, E, k), E, K=37, N=21, dtype=dtype)


@pytest.mark.parametrize("dtype", HALF)
def test_grouped_mm_pipeline_in_its_steady_state(dtype):
    """K = 200 (7 K tiles of 32 through 3 stages) and one expert with 160 rows (5 row steps of the
    weight gradient): every stage is refilled after it was read, so a refill issued before the
    barrier that ends the reads is a race (GEOMOE_EMULATE_COPIES=eager makes it show)."""
    T, k = 160, 2
    ids = torch.zeros(T, k, dtype=torch.int64)  # slot 0: expert 0, all 160 rows
    ids[:, 1] = torch.arange(T) % 2 + 1  # slot 1: experts 1 and 2, 80 rows each
    _gathered_gelu_within_reference(ids, 3, K=200, N=40, dtype=dtype)


def test_grouped_mm_stage_ring_wraps_forward_dgrad_and_wgrad():
    """Every kernel's 3-stage ring wrapped several times, against the float64 loop over experts: the
    forward's reduction K = 456 and the dgrad's N = 456 (8 K steps of the wgmma kernels' 64, 15 of
    the mma.sync kernels' 32: each stage refilled twice, each TMA mbarrier through phases 0, 1, 0),
    and the weight gradient of an expert with 456 rows (8 row steps of the wgmma kernel's 64); W by
    TMA on an emulated H100 (rows on 16 bytes). A stage refilled early, a wrong barrier parity or a
    wgmma operand changed before its wait shows here. Expert 1 has no rows, expert 2 nine."""
    from geomoe_kernels import kernel_recipes as recipe

    E, big, dtype = 3, 456, torch.float16
    off = torch.tensor([0, 456, 456, 465])
    M, core = int(off[-1]), cuda.CudaGroupedGemm()
    experts = [(int(off[e]), int(off[e + 1])) for e in range(E)]

    a = (torch.randn(M, big) / 2).to(dtype)  # forward: [M, 456] @ [456, 72]
    w = (torch.randn(E, big, 72) / big**0.5).to(dtype)
    b = torch.randn(E, 72).to(dtype)
    out, _ = recipe.forward(core, a, w, off, b, "gelu")
    pre = torch.cat([a[lo:hi].double() @ w[e].double() + b[e].double() for e, (lo, hi) in enumerate(experts)])
    torch.testing.assert_close(out.double(), torch.nn.functional.gelu(pre), rtol=4e-3, atol=4e-3)

    g = torch.randn(M, big).to(dtype)  # dgrad: [M, 456] @ W[e]^T, W[e] [72, 456]
    wt = (torch.randn(E, 72, big) / big**0.5).to(dtype)
    da = recipe.dgrad(core, g, wt, off)
    exact = torch.cat([g[lo:hi].double() @ wt[e].double().T for e, (lo, hi) in enumerate(experts)])
    torch.testing.assert_close(da.double(), exact, rtol=4e-3, atol=4e-3)

    x, gy = torch.randn(M, 72).to(dtype), torch.randn(M, 72).to(dtype)  # wgrad over 456 rows of expert 0
    dw, db = recipe.weight_grad(core, x, gy, off, splits=1)
    for e, (lo, hi) in enumerate(experts):
        torch.testing.assert_close(dw[e].double(), x[lo:hi].double().T @ gy[lo:hi].double(), rtol=1e-4, atol=1e-3)
        torch.testing.assert_close(db[e].double(), gy[lo:hi].double().sum(0), rtol=1e-4, atol=1e-3)
    assert torch.count_nonzero(dw[1]) == 0 and torch.count_nonzero(db[1]) == 0


def _gathered_gelu_within_reference(ids, E, K, N, dtype):
    """The gathered GELU grouped GEMM on routing `ids` [T, k], forward and every gradient, within
    the reference's error."""
    T, k = ids.shape
    r2f, f2r, off = route(ids, E, backend="torch")
    x = (torch.randn(T, K) / 2).to(dtype).requires_grad_(True)
    w = (torch.randn(E, K, N) / K**0.5).to(dtype).requires_grad_(True)
    b = torch.randn(E, N).to(dtype).requires_grad_(True)

    def run(be, x, w, b):
        return grouped_mm(x, w, off, b, "gelu", backend=be, gather=r2f, flat_to_row=f2r, top_k=k)

    _within_reference(run, [x, w, b], dtype)


@pytest.mark.parametrize(
    "K, N, a_act, gathered, splits",
    [(264, 300, "none", True, 4), (37, 21, "silu", False, 2)],
)
def test_weight_grad_of_a_large_weight_from_few_rows(K, N, a_act, gathered, splits):
    """The weight-gradient kernel alone, with the splits a GPU would use: a K x N of several 128 x 128
    tiles from 3 rows per expert (one expert empty, one split of each empty), and odd K and N (the
    scalar copies, act(A) formed in shared memory); every element of dW and db checked against
    float64, the empty expert's exactly zero."""
    from geomoe_kernels import kernel_recipes

    T, k, E, dtype = 3, 2 if gathered else 1, 3, torch.float16
    r2f, _, off = route(_ids(T, E, k, empty=(1,)), E, backend="torch")
    rows = r2f.numel()
    a = torch.randn(T if gathered else rows, K).to(dtype)
    g = torch.randn(rows, N).to(dtype)
    dw, db = kernel_recipes.weight_grad(cuda.CudaGroupedGemm(), a, g, off, r2f if gathered else None, k, a_act, splits=splits)
    A = (a[r2f // k] if gathered else a).float()
    A = {"none": A, "silu": torch.nn.functional.silu(A)}[a_act].to(dtype).double()
    for e in range(E):
        lo, hi = int(off[e]), int(off[e + 1])
        torch.testing.assert_close(dw[e].double(), A[lo:hi].T @ g[lo:hi].double(), rtol=1e-3, atol=2e-3)
        torch.testing.assert_close(db[e].double(), g[lo:hi].double().sum(0), rtol=1e-3, atol=2e-3)
    assert torch.count_nonzero(dw[1]) == 0 and torch.count_nonzero(db[1]) == 0


def _misaligned(t):
    """t's values in a copy whose data starts 2 bytes past a 16-byte boundary (no TMA, no 16-byte copies)."""
    flat = torch.empty(t.numel() + 8, dtype=t.dtype)
    view = flat[1 : 1 + t.numel()].view(t.shape)
    view.copy_(t)
    assert view.data_ptr() % 16 != 0
    return view


@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("gathered, splits", [(False, 1), (False, 3), (True, 2)])
def test_grouped_mm_weight_grad_of_experts_ending_mid_step_by_tma(dtype, gathered, splits):
    """The wgmma weight gradient reads G (and A where it is taken as stored: not gathered, no
    activation) by TMA on an emulated H100, the exact number of 64 x 64 boxes counted; experts end
    mid-step (70 and 130 rows), one has none, and the rows of expert 2 right after expert 0 hold
    Inf, -Inf and NaN in A and G: a box reads them, and only zeroing them in shared memory keeps
    expert 0 finite; the last expert's box runs past M (TMA's zeros; an address past the tensors
    fails under ASan). K = 136 and N = 72: tails of both tiles. Every checked expert against float64,
    and the bits equal to the cp.async path's (the same tensors 2 bytes off 16-byte alignment, which
    TMA cannot address: no box issued)."""
    from geomoe_kernels import kernel_recipes as recipe

    K, N, k = 136, 72, 2 if gathered else 1
    off = torch.tensor([0, 70, 70, 79, 209, 212])  # expert 1 empty, expert 2 non-finite
    M, E = int(off[-1]), off.numel() - 1
    bad = slice(int(off[2]), int(off[3]))
    g = torch.randn(M, N).to(dtype)
    g[bad, ::3], g[bad, 1::3], g[bad, 2::3] = float("inf"), float("-inf"), float("nan")
    if gathered:  # rows of tokens (T = M, two slots each): routed row r reads token gather[r] // 2
        tokens = torch.randperm(M)
        gather = tokens * k + torch.randint(0, k, (M,))
        x = torch.randn(M, K).to(dtype)
        x[tokens[bad]] = float("inf")
        a = x[gather // k]
    else:
        gather, x = None, torch.randn(M, K).to(dtype)
        x[bad, ::2], x[bad, 1::2] = float("nan"), float("-inf")
        a = x
    core = cuda.CudaGroupedGemm()
    before = CORE.emulated_tma_boxes()
    dw, db = recipe.weight_grad(core, x, g, off, gather, k, splits=splits)
    boxes = CORE.emulated_tma_boxes() - before
    tiles = -(-K // 128) * -(-N // 128)
    steps = 0
    for e in range(E):
        rows = int(off[e + 1] - off[e])
        chunk = -(-rows // splits)
        steps += sum(-(-max(0, min(chunk, rows - s * chunk)) // 64) for s in range(splits))
    per_step = 2 if gathered else 4  # G's two 64-column boxes, and A's two 64-row (K) boxes
    assert boxes == (steps * tiles * per_step if os.environ.get("GEOMOE_EMULATE_SM") == "90" else 0)
    for e in (0, 1, 3, 4):
        lo, hi = int(off[e]), int(off[e + 1])
        assert torch.isfinite(dw[e]).all() and torch.isfinite(db[e]).all()
        torch.testing.assert_close(dw[e].double(), a[lo:hi].double().T @ g[lo:hi].double(), rtol=1e-3, atol=2e-3)
        torch.testing.assert_close(db[e].double(), g[lo:hi].double().sum(0), rtol=1e-3, atol=2e-3)
    assert torch.count_nonzero(dw[1]) == 0 and torch.count_nonzero(db[1]) == 0
    before = CORE.emulated_tma_boxes()
    dw2, db2 = recipe.weight_grad(core, _misaligned(x), _misaligned(g), off, gather, k, splits=splits)
    assert CORE.emulated_tma_boxes() == before
    for ours, theirs in ((dw, dw2), (db, db2)):
        assert torch.equal(ours.view(torch.int32), theirs.view(torch.int32))


@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("act", ["none", "gelu", "swiglu"])
def test_grouped_mm_of_experts_ending_mid_tile_with_a_by_tma(dtype, act):
    """The wgmma forward and dgrad read A by TMA where it is taken as stored (not gathered) on an
    emulated H100, the exact number of 64 x 64 boxes counted (A's two and W's two a step): experts
    end mid-tile (70 and 130 rows), one has none, and the rows of expert 2 right after expert 0 hold
    Inf, -Inf and NaN: expert 0's boxes read them into tile rows whose outputs are never stored, so
    every other expert's out (and pre, and the dgrad's act'(pre) product) stays finite and right
    against float64; the last expert's boxes run past M (TMA's zeros; past the tensor fails under
    ASan). K = 136 and N = 72: tails of both. The bits equal to the cp.async path's (A 2 bytes off
    16-byte alignment, which TMA cannot address: only W's boxes issued), and to A's boxes beside
    W by cp.async (W misaligned)."""
    from geomoe_kernels import kernel_recipes as recipe

    K, N = 136, 72
    off = torch.tensor([0, 70, 70, 79, 209, 212])  # expert 1 empty, expert 2 non-finite
    M, E = int(off[-1]), off.numel() - 1
    bad = slice(int(off[2]), int(off[3]))
    good = torch.cat([torch.arange(int(off[e]), int(off[e + 1])) for e in (0, 3, 4)])
    x = torch.randn(M, K).to(dtype)
    x[bad, ::3], x[bad, 1::3], x[bad, 2::3] = float("inf"), float("-inf"), float("nan")
    w = (torch.randn(E, K, N) / K**0.5).to(dtype)
    b = torch.randn(E, N).to(dtype)
    core = cuda.CudaGroupedGemm()
    h90 = os.environ.get("GEOMOE_EMULATE_SM") == "90"
    blocks = sum(-(-int(off[e + 1] - off[e]) // 128) for e in range(E))  # 5 row blocks
    n_out = N // 2 if act == "swiglu" else N

    def run(a, want_boxes, weight=w):
        before = CORE.emulated_tma_boxes()
        out, pre = recipe.forward(core, a, weight, off, b, act)
        assert CORE.emulated_tma_boxes() - before == (want_boxes if h90 else 0)
        return out, pre

    steps = -(-K // 64)  # one column tile (SwiGLU: 36 of 64 hidden columns, gates and ups)
    out, pre = run(x, blocks * steps * 4)
    exact = torch.cat([x[off[e] : off[e + 1]].double() @ w[e].double() + b[e].double() for e in range(E)])
    if act == "swiglu":
        gate, up = exact.chunk(2, dim=1)
        want = torch.nn.functional.silu(gate) * up
    else:
        want = {"none": exact, "gelu": torch.nn.functional.gelu(exact)}[act]
    assert torch.isfinite(out[good]).all()
    torch.testing.assert_close(out[good].double(), want[good], **GRAD_TOL[dtype])
    if act != "none":
        assert torch.isfinite(pre[good]).all()
        torch.testing.assert_close(pre[good].double(), exact[good], **GRAD_TOL[dtype])
    for ref in (run(_misaligned(x), blocks * steps * 2), run(x, blocks * steps * 2, _misaligned(w))):
        for ours, theirs in zip((out, pre), ref):
            assert torch.equal(ours.view(torch.int16), theirs.view(torch.int16))

    # the down projection's dgrad: A = its output gradient [M, K] as stored, W2 [E, hidden, K] read
    # as W2^T; d pre = (g @ W2^T) * act'(pre) read for the rows stored
    w2 = (torch.randn(E, n_out, K) / K**0.5).to(dtype)
    g = torch.randn(M, K).to(dtype)
    g[bad] = float("nan")

    def dgrad(gr, want_boxes, weight=w2):
        before = CORE.emulated_tma_boxes()
        d = recipe.dgrad(core, gr, weight, off, grad_act=act, pre=pre if act != "none" else None)
        assert CORE.emulated_tma_boxes() - before == (want_boxes if h90 else 0)
        return d

    d = dgrad(g, blocks * steps * 4)
    dh = torch.cat([g[off[e] : off[e + 1]].double() @ w2[e].double().T for e in range(E)])
    if act != "none":
        p = pre.double().requires_grad_(True)
        if act == "swiglu":
            gate, up = p.chunk(2, dim=1)
            hidden = torch.nn.functional.silu(gate) * up
        else:
            hidden = torch.nn.functional.gelu(p)
        dh = torch.autograd.grad(hidden, p, dh)[0]
    assert torch.isfinite(d[good]).all()
    torch.testing.assert_close(d[good].double(), dh[good], **GRAD_TOL[dtype])
    for d2 in (dgrad(_misaligned(g), blocks * steps * 2), dgrad(g, blocks * steps * 2, _misaligned(w2))):
        assert torch.equal(d.view(torch.int16), d2.view(torch.int16))


@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("T, k, act", [(1, 1, "gelu"), (100, 1, "silu"), (511, 1, "gelu"), (200, 3, "silu")])
def test_expert_mlp(dtype, T, k, act):
    """Both GEMMs, the backward's act'(pre) in the dgrad epilogue and act(pre) formed in the wgrad
    load: 1, 100, 511 and 600 rows; an expert without rows gets exact-zero gradients."""
    E, K, H = 5, 40, 72
    r2f, f2r, off = route(_ids(T, E, k, empty=(2,)), E, backend="torch")
    x = (torch.randn(T, K) / 2).to(dtype).requires_grad_(True)
    params = [torch.randn(E, K, H) / K**0.5, torch.randn(E, H) / 4, torch.randn(E, H, K) / H**0.5, torch.randn(E, K) / 4]
    params = [p.to(dtype).requires_grad_(True) for p in params]

    def run(be, x, *ps):
        return expert_mlp(x, *ps, off, act, backend=be, gather=r2f, flat_to_row=f2r, top_k=k)

    _, _, dw1, db1, dw2, db2 = _within_reference(run, [x, *params], dtype)
    for g in (dw1, db1, dw2, db2):
        assert torch.count_nonzero(g[2]) == 0


@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("act", ["gelu", "swiglu"])
def test_expert_mlp_routing_weight_gradient_in_the_dgrad_epilogue(dtype, act):
    """expert_mlp with routing weights (docs/host_path.md, step 5): the down-projection's dgrad reads
    dy through the routing map, scales d hidden by the routing weight and writes the routing weights'
    gradient's 8-column partials and <dy, b2> in its epilogue (RoutedDgrad), the recipe sums them:
    output and every gradient (the routing weights' and shared's included) against float64; 150
    tokens top-3 (several row blocks, H 72: a partial column group), an expert without rows; the
    same bits twice."""
    E, K, H, T, k = 5, 40, 72, 150, 3
    r2f, f2r, off = route(_ids(T, E, k, empty=(2,)), E, backend="torch")
    N1 = 2 * H if act == "swiglu" else H
    x = (torch.randn(T, K) / 2).to(dtype).requires_grad_(True)
    params = [torch.randn(E, K, N1) / K**0.5, torch.randn(E, N1) / 4, torch.randn(E, H, K) / H**0.5, torch.randn(E, K) / 4]
    params = [p.to(dtype).requires_grad_(True) for p in params]
    w = (0.2 + 0.8 * torch.rand(T, k)).requires_grad_(True)
    shared = torch.randn(T, K).to(dtype).requires_grad_(True)

    def run(be, x, w1, b1, w2, b2, w, shared):
        return expert_mlp(x, w1, b1, w2, b2, off, act, backend=be, gather=r2f, flat_to_row=f2r, top_k=k, weights=w, shared=shared)

    first = _within_reference(run, [x, *params, w, shared], dtype)
    for g in first[2:6]:
        assert torch.count_nonzero(g[2]) == 0
    y = run("cuda", x, *params, w, shared)
    again = torch.autograd.grad(y.double().square().mean(), [x, *params, w, shared])
    assert all(torch.equal(a, b.double()) for a, b in zip(first[1:], again))


def _swiglu_expert_mlp(x, w1, b1, w2, b2, off, interleaved):
    """The expert MLP with SwiGLU, one expert at a time in x's dtype: pre = x W1 + b1 with columns
    [gate | up] or pairs [g0, u0, ...] (interleaved), hidden = silu(gate) * up, out = hidden W2 + b2."""
    outs = []
    for e in range(w1.shape[0]):
        lo, hi = int(off[e]), int(off[e + 1])
        pre = x[lo:hi] @ w1[e] + b1[e]
        gate, up = (pre[:, 0::2], pre[:, 1::2]) if interleaved else pre.chunk(2, dim=1)
        outs.append((torch.nn.functional.silu(gate) * up) @ w2[e] + b2[e])
    return torch.cat(outs)


@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("layout", ["concat", "interleaved", "swiglu_interleaved"])
@pytest.mark.parametrize("H", [72, 20])
def test_swiglu_expert_mlp_both_layouts(dtype, layout, H):
    """SwiGLU fused in the CUDA grouped GEMM, [gate | up] and interleaved columns (asked for by the
    core's flag, or per call by the ops' activation 'swiglu_interleaved'): the forward's
    epilogue (one accumulator holds both halves of a tile), the dgrad's d gate / d up from pre and the
    weight gradient's hidden rows formed from pre's halves, against the float64 loop; gathered rows
    (top-2), an expert without rows (exact-zero gradients), H = 20 (the up half off 16 bytes, the scalar
    paths) and H = 72 (several 8-column groups, a partial tile)."""
    from geomoe_kernels import kernel_recipes as recipe

    T, k, E, K = 37, 2, 4, 24
    interleaved = layout != "concat"
    kernels = cuda.CudaGroupedGemm(swiglu_interleaved=layout == "interleaved")
    act = "swiglu_interleaved" if layout == "swiglu_interleaved" else "swiglu"
    r2f, _, off = route(_ids(T, E, k, empty=(2,)), E, backend="torch")
    x = (torch.randn(T, K) / 2).to(dtype)
    leaves = [torch.randn(E, K, 2 * H) / K**0.5, torch.randn(E, 2 * H) / 4, torch.randn(E, H, K) / H**0.5, torch.randn(E, K) / 4]
    leaves = [t.to(dtype) for t in leaves]
    rows = x[r2f // k]
    g = torch.randn(rows.shape[0], K).to(dtype)

    out, pre = recipe.expert_mlp(kernels, x, *leaves, off, act, r2f, None, k)
    grads = recipe.expert_mlp_backward(kernels, g, x, leaves[0], leaves[2], off, pre, act, r2f, k)
    d_rows, dw1, db1, dw2, db2, _ = grads
    refs = []
    for cast in (dtype, torch.float64):
        ls = [t.to(cast).requires_grad_(True) for t in (rows, *leaves)]
        y = _swiglu_expert_mlp(*ls[:1], *ls[1:], off, interleaved)
        refs.append([y, *torch.autograd.grad(y, ls, g.to(cast))])
    for ours, same, exact in zip([out, d_rows, dw1, db1, dw2, db2], *refs):
        assert_within_twice_reference_error(ours, same, exact)
    for t in (dw1, db1, dw2, db2):
        assert torch.count_nonzero(t[2]) == 0
    # pre keeps W1's layout: its columns are the float64 pre-activation's
    exact_pre = torch.cat(
        [rows[int(off[e]) : int(off[e + 1])].double() @ leaves[0][e].double() + leaves[1][e].double() for e in range(E)]
    )
    torch.testing.assert_close(pre.double(), exact_pre, **GRAD_TOL[dtype])


@pytest.mark.parametrize("dtype", HALF)
def test_swiglu_layer_runs_on_the_cuda_core(dtype):
    """MoEMLP(activation="swiglu", backend="cuda") (an LLM-style layer: softmax top-2, no shared
    expert, no biases) runs on the CUDA core, fused, and matches backend="torch"."""
    torch.manual_seed(3)
    kw = dict(score_func="softmax", activation="swiglu", bias=False)
    ours = MoEMLP(32, 24, 6, 0, 2, backend="cuda", **kw)
    ref = MoEMLP(32, 24, 6, 0, 2, backend="torch", **kw)
    ref.load_state_dict(ours.state_dict())
    x = torch.randn(90, 32)
    outs = []
    for m in (ours, ref):
        xi = x.clone().requires_grad_(True)
        with torch.autocast("cpu", dtype=dtype):
            y, aux, load = m(xi)
        grads = torch.autograd.grad((y.float().square().mean() + aux), [xi, m.w1, m.w2])
        outs.append((y.float(), *grads))
    for a, b in zip(*outs):
        torch.testing.assert_close(a.float(), b.float(), **GRAD_TOL[dtype])


# ---- the sm_90a kernels (wgmma, TMA, mbarriers) on an emulated H100 ---------------------------------


def test_wgmma_kernels_chosen_where_the_device_is_9_0():
    """The launchers take the sm_90a kernels where the (emulated) device is 9.0: GEOMOE_EMULATE_SM=90,
    which the test below sets for the grouped-GEMM tests' second run; mma.sync elsewhere."""
    want = "wgmma" if os.environ.get("GEOMOE_EMULATE_SM") == "90" else "mma.sync"
    assert CORE.grouped_mm_kernels() == want


@pytest.mark.skipif(VARIANT == "asan", reason="4 GB of address space, mostly untouched, is more than ASan's shadow should map")
@pytest.mark.parametrize("act", ["gelu", "swiglu"])
def test_gathered_rows_past_2_31_elements(act):
    """int64 addressing: token rows whose first element lies past 2^31 elements (a [2,100, 2^20 + 64]
    bf16 view of 4.4 GB, only the rows read ever touched), read through the gather by the forward and
    the weight gradient, against float64; one expert without rows."""
    from geomoe_kernels import kernel_recipes as recipe

    T, LD, K, N, E, k = 2100, 2**20 + 64, 24, 40, 3, 2
    storage = torch.empty(T * LD, dtype=torch.bfloat16)
    x = storage.view(T, LD)[:, :K]
    tokens = torch.tensor([T - 1, 5, T - 7, 2047, T - 3])  # 5 and 2047 stay below 2^31 elements
    for t in tokens.tolist():
        x[t] = torch.randn(K).to(torch.bfloat16)
    assert int(tokens.max()) * LD > 2**31
    flat = torch.stack([tokens * k, tokens * k + 1], 1).reshape(-1)  # both slots of every token
    experts = torch.tensor([0, 2, 2, 0, 0, 2, 2, 2, 0, 0])  # expert 1: no rows
    order = torch.sort(experts, stable=True).indices
    gather = flat[order].contiguous()
    off = torch.tensor([0, int((experts == 0).sum()), int((experts == 0).sum()), experts.numel()])
    w = (torch.randn(E, K, N) / K**0.5).to(torch.bfloat16)
    b = torch.randn(E, N).to(torch.bfloat16)
    out, pre = recipe.forward(cuda.CudaGroupedGemm(), x, w, off, b, act, gather, k)
    A = x[gather // k].double()
    exact = torch.cat([A[off[e] : off[e + 1]] @ w[e].double() + b[e].double() for e in range(E)])
    torch.testing.assert_close(pre.double(), exact, **GRAD_TOL[torch.bfloat16])
    g = torch.randn(gather.numel(), N).to(torch.bfloat16)
    dw, db = recipe.weight_grad(cuda.CudaGroupedGemm(), x, g, off, gather, k, splits=1)
    for e in range(E):
        lo, hi = int(off[e]), int(off[e + 1])
        torch.testing.assert_close(dw[e].double(), A[lo:hi].T @ g[lo:hi].double(), rtol=1e-3, atol=2e-3)
        torch.testing.assert_close(db[e].double(), g[lo:hi].double().sum(0), rtol=1e-3, atol=2e-3)
    assert torch.count_nonzero(dw[1]) == 0 and torch.count_nonzero(db[1]) == 0


def test_wgmma_kernels_only_where_the_device_loaded_the_sm90a_code():
    """The launchers' choice from the probe kernel's maxThreadsPerBlock on the device (its
    __launch_bounds__: 64 in the sm_90a cubin, where the mma.sync kernels compile to a trap; 32 in
    every other code, where the wgmma kernels do): wgmma exactly for the sm_90a cubin, so a plain
    sm_90 cubin that the driver picks beside it (GEOMOE_CUDA_ARCHS=80;90;90a), a newer device
    running the compute_90 PTX, or a failed query (0) all get the mma.sync kernels, and a 9.0 device
    that loaded the sm_90a code gets the wgmma ones whatever else its queries say."""
    assert CORE.grouped_mm_kernels_for(64) == "wgmma"
    for probe in (32, 0, 1024, -1):
        assert CORE.grouped_mm_kernels_for(probe) == "mma.sync"


GEMM_TESTS = "grouped_mm or weight_grad or expert_mlp or swiglu or wgmma_kernels or past_2_31"


@pytest.mark.skipif(os.environ.get("GEOMOE_EMULATE_SM") == "90", reason="this is that run")
def test_gemm_tests_again_on_an_emulated_h100():
    """Every grouped-GEMM test of this file (forward, dgrad, wgrad, SwiGLU in both layouts, experts
    without rows, rows not 16-byte aligned, the pipeline's steady state, int64 addressing) again in a
    process whose emulated device is 9.0, so that the sm_90a kernels run: wgmma.mma_async on swizzled
    shared-memory descriptors, W by TMA completing on mbarriers (by cp.async where its rows are not
    16-byte aligned), carried out by csrc/emulation/sm90_ptx.cuh; then the GEMM and SwiGLU tests once
    more with every copy (cp.async and TMA) landing at issue, where a stage refilled before the
    barrier that ends its reads shows (moving the refill above that barrier fails the pipeline test),
    and the dynamic shared memory at another window address (3,712: another swizzle phase).
    Under ASan, the forward / dgrad / wgrad / SwiGLU subset."""
    env = dict(os.environ, GEOMOE_EMULATE_SM="90")
    if VARIANT == "asan":  # the AddressSanitizer run: forward, dgrad, wgrad and SwiGLU's paths
        _pytest(env, [__file__], "not (test_grouped_mm or swiglu_expert_mlp or weight_grad_of)")
        return
    _pytest(env, [__file__], f"not ({GEMM_TESTS})")
    eager = dict(env, GEOMOE_EMULATE_COPIES="eager", GEOMOE_EMULATE_SMEM_BASE="3712")  # swizzle phase 5, not 1
    _pytest(eager, [__file__], "not (test_grouped_mm or swiglu_expert_mlp)")


# ---- the layer and the model -----------------------------------------------------------------------


@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("shared, k", [(0, 2), (1, 3), (2, 1)])
def test_moe_layer_on_cuda_matches_torch(dtype, shared, k):
    torch.manual_seed(1)
    ours = MoEMLP(48, 40, 9, shared, k, backend="cuda")
    ref = MoEMLP(48, 40, 9, shared, k, backend="torch")
    ref.load_state_dict(ours.state_dict())
    x = torch.randn(150, 48)
    outs = []
    for m in (ours, ref):
        xi = x.clone().requires_grad_(True)
        with torch.autocast("cpu", dtype=dtype):
            y, aux, load = m(xi)
        grads = torch.autograd.grad((y.float().square().mean() + aux), [xi, m.w1, m.b2, m.gate.weight])
        outs.append((y.float(), aux, load, *grads))
    assert torch.equal(outs[0][2], outs[1][2])
    for a, b in zip(outs[0], outs[1]):
        torch.testing.assert_close(a.float(), b.float(), **GRAD_TOL[dtype])


@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("tokens", [1, 150])
def test_moe_layer_against_float64_oracle(dtype, tokens):
    """tests/test_gpu.py's check of the layer on the CPU: backend="cuda" (the emulated kernels)
    under autocast against the published loop in float64 (tests/oracles.py), output and input
    gradient at most 2x as far from float64 as backend="torch" in the same dtype. The oracle gets
    the input rounded to the dtype, so both route every token alike."""
    from geomoe import load_original_state_dict
    from tests.oracles import OriginalMoE

    torch.manual_seed(2)
    orig = OriginalMoE(48, 40, 9, 1, 3).double()
    ours = MoEMLP(48, 40, 9, 1, 3)
    load_original_state_dict(ours, orig.state_dict(), strict=True)
    x = torch.randn(tokens, 48, dtype=torch.float64).to(dtype).double()
    xa = x.clone().requires_grad_(True)
    ya, _, load_a = orig(xa)
    g = torch.randn_like(ya)
    (ya * g).sum().backward()
    got = {}
    for be in ("cuda", "torch"):
        ours.backend = be
        xb = x.to(dtype).requires_grad_(True)
        with torch.autocast("cpu", dtype=dtype):
            yb, _, load_b = ours(xb)
        yb.backward(g.to(yb.dtype))
        assert torch.equal(load_b, load_a), be
        got[be] = [yb.double(), xb.grad.double()]
    for ours_t, torch_t, exact in zip(got["cuda"], got["torch"], [ya.detach(), xa.grad]):
        assert_within_twice_reference_error(ours_t, torch_t, exact)


def test_model_on_cuda_matches_torch():
    from geomoe import GeoMoE

    cfg = dict(
        img_size=32,
        embed_dim=(16, 24, 32),
        depth=(1, 1, 1),
        num_heads=2,
        num_experts=5,
        top_k=2,
        decoder_embed_dim=16,
        decoder_depth=1,
        decoder_num_heads=2,
    )
    ours = GeoMoE(**cfg, backend="cuda")
    ref = GeoMoE(**cfg, backend="torch")
    ref.load_state_dict(ours.state_dict())
    imgs, noise = torch.randn(2, 3, 32, 32), torch.rand(2, 4)
    outs = []
    for m in (ours, ref):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = m(imgs, noise=noise)[0]
        outs.append([loss.float(), *torch.autograd.grad(loss, [p for p in m.parameters() if p.requires_grad][:6])])
    for a, b in zip(*outs):
        torch.testing.assert_close(a.float(), b.float(), **GRAD_TOL[torch.bfloat16])


# ---- the detectors, each fed a launch or kernel that breaks its rule -----------------------------------


def _compiler():
    return shutil.which("c++") or shutil.which("g++")


def _missing(why):
    """A tool this machine lacks: CI has them all, elsewhere the test says what it needs."""
    pytest.fail(why) if REQUIRED else pytest.skip(why)


def _recipe():
    path = os.path.join(REPO, "csrc", "emulation", "build.py")
    spec = importlib.util.spec_from_file_location("geomoe_emulation_build", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _build_cases(out_dir, flags=()):
    """tests/emulation/broken_kernels.cu built as the emulated core is (and with `flags`)."""
    recipe = _recipe()
    headers = recipe.cuda_headers()
    if _compiler() is None or headers is None:
        _missing("no C++ compiler or CUDA headers")
    src = os.path.join(out_dir, "broken_kernels.cpp")
    with open(src, "w") as f:
        f.write(recipe.host_source(os.path.join(HERE, "emulation", "broken_kernels.cu")))
    lib = os.path.join(out_dir, "broken_kernels.so")
    includes = [f"-I{d}" for d in recipe.include_dirs(headers)]
    cmd = [_compiler(), "-shared", "-fPIC", *recipe.FLAGS, *flags, *includes, src, "-o", lib]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return lib


class Cases:
    def __init__(self, path):
        self.lib = ctypes.CDLL(path)
        self.lib.run_case.restype = ctypes.c_char_p
        self.lib.run_case.argtypes = [ctypes.c_char_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p]

    def __call__(self, name, a=None, b=None, out=None):
        out = torch.zeros(64) if out is None else out
        a = torch.zeros(1024, dtype=torch.float16) if a is None else a
        b = None if b is None else b.data_ptr()
        return self.lib.run_case(name.encode(), a.data_ptr(), b, out.data_ptr()).decode()


@pytest.fixture(scope="module", params=["fibers", "ucontext"])
def cases(request, tmp_path_factory):
    """The cases built with the x86-64 fiber switch and with the portable ucontext one."""
    flags = ["-DGEOMOE_EMU_UCONTEXT"] if request.param == "ucontext" else []
    return Cases(_build_cases(str(tmp_path_factory.mktemp(request.param)), flags))


def test_detector_controls_correct_kernels_run(cases):
    x, out = torch.randn(96), torch.zeros(64)
    assert cases("block_sum", x, out=out) == "no error"
    torch.testing.assert_close(out[0], x.sum())
    a, b, c = torch.randn(16, 16).half(), torch.randn(16, 16).half(), torch.randn(16, 16)
    cd = c.t().contiguous().reshape(-1)  # column-major
    assert cases("wmma_layouts", a.t().contiguous(), b, out=cd) == "no error"  # a column-major
    torch.testing.assert_close(cd.reshape(16, 16).t(), a.float() @ b.float() + c)


def test_detector_controls_warp_match_ranks_equal_values_in_lane_order(cases):
    """__match_any_sync as the routing scatter ranks with it: the lanes holding the same value, the
    tail lanes (-1) included in the full mask; a lane's rank counts its peers on lower lanes."""
    vals = torch.tensor([3, 1, 3, 3, 0, 1, 7, 3, 0, 0, 2, 3, 1, 1, 5, 3, 3, 0, 9, 3], dtype=torch.float32)
    out = torch.zeros(64)
    assert cases("match_rank", vals, out=out) == "no error"
    want = [sum(int(v == vals[i]) for v in vals[:i]) for i in range(20)] + [-1] * 12
    assert out[:32].tolist() == want


def test_detector_controls_a_missing_barrier_shows_in_one_of_the_thread_orders(cases):
    """Not a detector: without the barrier, thread 0 of the block that runs its threads in index
    order sums the other warps' partials before they are written (it reads the other block's)."""
    x, out = torch.randn(192), torch.zeros(64)
    assert cases("block_sums_without_barrier", x, out=out) == "no error"
    want = x.reshape(2, 96).sum(1)
    assert torch.allclose(out[1], want[1]) and not torch.allclose(out[0], want[0])


@pytest.mark.parametrize(
    "case, message",
    [
        (
            "grid_y_too_large",
            r"kernel broken::touch \(launched at broken_kernels.cu:\d+\): grid y dimension 65536 is "
            r"outside 1..65535",
        ),
        ("grid_z_too_large", r"broken::touch .*grid z dimension 65536 is outside 1..65535"),
        ("too_many_threads", r"broken::touch .*1056 threads per block \(32x33x1\), more than 1024"),
        ("too_much_shared", r"broken::uses_dynamic_shared .*49156 bytes of dynamic shared memory, more than the 49152"),
    ],
)
def test_detector_launch_limits(cases, case, message):
    assert cases("shared_opted_in") == "no error"  # above 48 KiB once cudaFuncSetAttribute allows it
    assert re.search(message, cases(case)), cases(case)


@pytest.mark.parametrize(
    "case, message",
    [
        (
            "barrier_in_branch",
            r"broken::barrier_in_branch .*thread \(16,0,0\): __syncthreads at broken_kernels.cu:\d+ is not "
            r"reached by every thread of the block: threads 0-15 wait there",
        ),
        (
            "barriers_at_two_places",
            r"broken::barriers_at_two_places .*wait at different __syncthreads: threads 0-15 at "
            r"broken_kernels.cu:\d+; threads 16-63 at broken_kernels.cu:\d+",
        ),
    ],
)
def test_detector_barrier_not_reached_by_every_thread(cases, case, message):
    assert re.search(message, cases(case)), cases(case)


@pytest.mark.parametrize(
    "case, message",
    [
        (
            "full_mask_shuffle",
            r"broken::full_mask_shuffle .*thread \(32,0,0\): __shfl_xor_sync at broken_kernels.cu:\d+: mask "
            r"0xffffffff names lanes 16-31, which warp 1 of this 48-thread block does not have",
        ),
        ("shuffle_after_exit", r"broken::shuffle_after_exit .*lane 16 exits while lanes 0-15 wait for it in __shfl_xor_sync"),
        ("match_after_exit", r"broken::match_after_exit .*lane 20 exits while lanes 0-19 wait for it in __match_any_sync"),
        (
            "shuffle_from_outside_mask",
            r"broken::shuffle_from_outside_mask .*__shfl_sync at broken_kernels.cu:\d+: lane 0 reads "
            r"lane 20, which is not in the mask 0x0000ffff",
        ),
        (
            "shuffle_against_barrier",
            r"broken::shuffle_against_barrier .*deadlock: no thread can go on: threads 16-31 wait at "
            r"__syncthreads .* threads 0-15 wait in __shfl_xor_sync \(mask 0xffffffff\)",
        ),
    ],
)
def test_detector_warp_collective_names_an_absent_lane(cases, case, message):
    assert re.search(message, cases(case)), cases(case)


@pytest.mark.parametrize(
    "case, message",
    [
        (
            "wmma_misaligned",
            r"broken::wmma_misaligned .*wmma::load_matrix_sync at broken_kernels.cu:\d+: pointer 0x[0-9a-f]+ "
            r"is not 32-byte aligned",
        ),
        ("wmma_lanes_disagree", r"broken::wmma_lanes_disagree .*lanes 0 and 16 pass different arguments"),
        (
            "wmma_half_warp",
            r"broken::wmma_half_warp .*wmma::load_matrix_sync .*names lanes 16-31, which warp 0 of this "
            r"16-thread block does not have",
        ),
    ],
)
def test_detector_wmma_misuse(cases, case, message):
    assert re.search(message, cases(case)), cases(case)


def test_detector_controls_sm90_wgmma_and_tma_ring(cases):
    """The emulated sm_90a instructions on a shared window whose dynamic shared memory starts at
    1,152 (not 1,024-byte aligned): one wgmma from swizzled tiles the kernel aligned in the window,
    against A @ B; a 3-stage TMA ring of 6 steps (each mbarrier through phases 0, 1) delivering
    every step's box."""
    a, b, out = torch.randn(64, 16).half(), torch.randn(16, 64).half(), torch.zeros(64 * 64)
    assert cases("wgmma_tile", a, b, out=out) == "no error"
    torch.testing.assert_close(out.reshape(64, 64).double(), a.double() @ b.double(), rtol=1e-6, atol=1e-5)
    x, out = torch.arange(384.0).repeat_interleave(64).half(), torch.zeros(64)
    assert cases("tma_ring", x, out=out) == "no error"
    assert out[:6].tolist() == [0.0, 64.0, 128.0, 192.0, 256.0, 320.0]


def test_emulated_wgmma_m64n128k16_reads_b_where_its_descriptor_says(cases):
    """m64n128k16 against A @ B with B (16 x 128) K-major (128 rows: 16 8-row groups SBO apart, over
    two 64-row tiles) and MN-major (two 64-column swizzle atoms 16 KB apart, the LBO field saying so:
    the emulator takes the atoms' distance from the descriptor, not from an assumed layout); with
    LBO left at the K-major convention the second atom is read from the wrong place, the first 64
    columns right."""
    a, b = torch.randn(64, 16).half(), torch.randn(16, 128).half()
    exact = a.double() @ b.double()
    for case in ("wgmma_n128_k_major", "wgmma_n128_mn_major", "wgmma_n128_lbo_unset"):
        out = torch.zeros(64 * 128)
        assert cases(case, a, b, out=out) == "no error"
        d = out.reshape(64, 128).double()
        torch.testing.assert_close(d[:, :64], exact[:, :64], rtol=1e-6, atol=1e-5)
        if case == "wgmma_n128_lbo_unset":
            assert (d[:, 64:] - exact[:, 64:]).abs().max() > 0.1
        else:
            torch.testing.assert_close(d[:, 64:], exact[:, 64:], rtol=1e-6, atol=1e-5)


def test_detector_tma_wait_with_a_wrong_parity_reads_the_stage_s_old_data(cases):
    """try_wait.parity(0) on a barrier whose phase 0 has completed returns at once, the refill of the
    stage still in flight: steps 3-5 read steps 0-2's boxes (as a GPU may)."""
    x, out = torch.arange(384.0).repeat_interleave(64).half(), torch.zeros(64)
    assert cases("tma_ring_wrong_parity", x, out=out) == "no error"
    assert out[:6].tolist() == [0.0, 64.0, 128.0, 0.0, 64.0, 128.0]


@pytest.mark.parametrize(
    "case, message",
    [
        (
            "wgmma_tile_not_1024_aligned",
            r"broken::wgmma_tile<1> .*wgmma.mma_async at broken_kernels.cu:\d+: wgmma descriptor of A "
            r"0x[0-9a-f]+: start address 0x480 is in row 1 of its 1,024-byte swizzle atom, but the base offset "
            r"field is 0",
        ),
        (
            "wgmma_operand_overwritten",
            r"broken::wgmma_tile<2> .*thread \(3,0,0\): wgmma.mma_async issued at broken_kernels.cu:\d+: its "
            r"operand B changed before the wgmma.wait_group at broken_kernels.cu:\d+ that completes it",
        ),
    ],
)
def test_detector_sm90_misuse(cases, case, message):
    a, b = torch.randn(64, 16).half(), torch.randn(16, 64).half()
    got = cases(case, a, b, out=torch.zeros(64 * 64))
    assert re.search(message, got), got


def test_emulated_shared_window_base_not_a_multiple_of_128_fails_every_launch_naming_it():
    script = (
        "import torch; from geomoe_kernels import grouped_mm\n"
        "try:\n"
        "    grouped_mm(torch.randn(4, 8).half(), torch.randn(1, 8, 8).half(), torch.tensor([0, 4]), None, 'none', backend='cuda')\n"
        "except RuntimeError as e:\n"
        "    print(e)\n"
    )
    env = dict(os.environ, GEOMOE_EMULATE_SMEM_BASE="1100")
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300, cwd=REPO)
    assert "GEOMOE_EMULATE_SMEM_BASE expected a multiple of 128 below 65536 (bytes), got '1100'" in proc.stdout, (
        proc.stdout + proc.stderr[-3000:]
    )


def test_grouped_mm_finds_its_blocks_among_many_experts():
    """E = 700 (three experts per thread in the kernel's block lookup), most without rows, one with
    300 (three row blocks), against the per-expert reference."""
    E, K, N = 700, 16, 24
    counts = torch.zeros(E, dtype=torch.int64)
    counts[[3, 255, 256, 511, 699]] = torch.tensor([5, 300, 1, 129, 7])
    off = torch.cat([torch.zeros(1, dtype=torch.int64), counts.cumsum(0)])
    x = torch.randn(int(off[-1]), K).half()
    w = (torch.randn(E, K, N) / K**0.5).half()
    got = grouped_mm(x, w, off, None, "none", backend="cuda")
    want = torch.cat([x[off[e] : off[e + 1]].double() @ w[e].double() for e in range(E)])
    assert_within_twice_reference_error(got.double(), grouped_mm(x, w, off, None, "none", backend="torch").double(), want)


def test_detector_launch_limits_in_the_core_itself():
    """The production launcher: 65,536 row blocks x 32,768 tiles of 128 columns make a 1-D grid of
    2^31 blocks, one more than the card takes. Nothing is read (the launch is refused first), so the
    pointers may be anything."""
    with pytest.raises(
        RuntimeError,
        match=r"geomoe emulated CUDA core: grouped_mm: kernel geomoe::gmm_kernel<__half, 128, 0, "
        r"false, 0> \(launched at grouped_gemm.cu:\d+\): grid x dimension 2147483648",
    ):
        CORE.grouped_mm(
            dtype=1,
            a=64,
            lda=8,
            gather=0,
            top_k=1,
            w=64,
            K=8,
            N=32768 * 128,
            ldw=32768 * 128,
            stride_we=0,
            trans_w=False,
            bias=0,
            blocks=65536,
            offsets=64,
            num_experts=1,
            act=0,
            out=64,
            ldo=8,
            pre=0,
            ldp=0,
            grad_act=0,
            rounds=0,
            stream=0,
        )


def _asan_env(**extra):
    """The environment of a process that loads ASan-built libraries: python is not built with ASan,
    so libasan is preloaded, and libstdc++ with it (its C++ exceptions pass through ASan's hooks,
    which must find libstdc++ when they start)."""
    paths = (
        [
            subprocess.run([_compiler(), f"-print-file-name={lib}"], capture_output=True, text=True).stdout.strip()
            for lib in ("libasan.so", "libstdc++.so")
        ]
        if _compiler()
        else []
    )
    if not paths or not all(os.path.isabs(p) and os.path.exists(p) for p in paths):
        _missing("no compiler with AddressSanitizer")
    return dict(os.environ, LD_PRELOAD=" ".join(paths), ASAN_OPTIONS="detect_leaks=0", **extra)


@pytest.fixture(scope="module")
def asan_cases(tmp_path_factory):
    """(the cases built with AddressSanitizer, the environment to load them in)"""
    env = _asan_env()
    return _build_cases(str(tmp_path_factory.mktemp("asan")), _recipe().ASAN_FLAGS), env


@pytest.mark.skipif(VARIANT == "asan", reason="runs the ASan build itself")
@pytest.mark.parametrize(
    "case, kind",
    [
        ("read_past_end", "heap-buffer-overflow"),  # one float past a torch tensor
        ("static_shared_past_end", "global-buffer-overflow"),
        ("dynamic_shared_past_end", "heap-buffer-overflow"),
    ],
)
def test_detector_address_sanitizer_catches_out_of_bounds(asan_cases, case, kind):
    lib, env = asan_cases
    script = (
        f"import ctypes, torch; lib = ctypes.CDLL({lib!r}); "
        "lib.run_case.argtypes = [ctypes.c_char_p] + [ctypes.c_void_p] * 3; "
        "x, out = torch.randn(64), torch.zeros(64); "
        f"lib.run_case({case.encode()!r}, x.data_ptr(), None, out.data_ptr())"
    )
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0, proc.stderr[-3000:]
    assert f"AddressSanitizer: {kind}" in proc.stderr and f"in broken::{case}(" in proc.stderr, proc.stderr[-3000:]


# ---- the backend-parametrised tests, and all of it under AddressSanitizer --------------------------------

BACKEND_TESTS = [
    os.path.join(HERE, t) for t in ("ops", "test_moe_mlp.py", "test_layer_plan.py", "test_cblock_plan.py", "test_model.py")
]
# the transformers models on the emulated core (bf16): in the plain emulated run only, not again under ASan
HF_TESTS = [os.path.join(HERE, "test_transformers_backend.py")]


def _pytest(env, paths, deselect=None):
    """pytest on `paths` in a process of its own with `env`; every test that runs must pass."""
    cmd = [
        sys.executable,
        "-m",
        "pytest",
        "-q",
        "-p",
        "no:cacheprovider",
        *(["-k", f"not ({deselect})"] if deselect else []),
        *paths,
    ]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1200, cwd=REPO)
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-6000:]
    last = proc.stdout.strip().splitlines()[-1]
    assert " passed" in last and "failed" not in last and "error" not in last, last


@pytest.mark.skipif(VARIANT == "asan", reason="runs in the ASan run's own list")
def test_backend_tests_through_the_emulated_core():
    """tests/ops/ and the MoE layer's and the model's backend-parametrised tests, in a process where
    the emulated "cuda" is the backend they check (tests/helpers.backends_here), as the Triton
    interpreter's process does for "triton"."""
    _pytest(dict(os.environ, GEOMOE_CUDA_EMULATE="1"), BACKEND_TESTS + HF_TESTS)


@pytest.mark.skipif(VARIANT == "asan", reason="runs in the ASan run's own list")
def test_grouped_gemm_with_copies_landing_as_they_are_issued():
    """The grouped GEMM's async-copy pipeline with every copy landing at issue, the earliest a GPU
    may land it (the default lands it at the wait, the latest): a stage refilled while other threads
    still read it gives wrong results here."""
    only_gemm = "not (grouped_mm or weight_grad or expert_mlp)"  # deselects all but the grouped-GEMM tests
    _pytest(dict(os.environ, GEOMOE_EMULATE_COPIES="eager"), [__file__], only_gemm)


@pytest.mark.skipif(VARIANT == "asan", reason="this is the ASan run")
def test_emulated_kernels_under_address_sanitizer():
    """The backend-parametrised tests and every test above but the detectors' (which build kernels of
    their own), in a process where the cuda backend is the AddressSanitizer build: an out-of-bounds
    read or write in any CUDA kernel ends that process with ASan's report."""
    if importlib.util.find_spec("geomoe_kernels._cuda_emulated_asan") is None:
        _missing("the ASan build of the emulated core was not built (make test builds it: GEOMOE_EXTENSIONS=emulated,asan)")
    deselect = "detector or under_address_sanitizer or backend_tests_through"
    _pytest(_asan_env(GEOMOE_CUDA_EMULATE="asan"), [*BACKEND_TESTS, __file__], deselect)
