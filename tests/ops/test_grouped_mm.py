"""grouped_mm: the reference against a per-expert loop in float64 (both of its paths in float32),
every backend against the loop in its dtypes, the kernels' gathered load and split weight
gradient; experts without rows get exact zeros; opcheck; argument errors."""

import pytest
import torch

from geomoe_kernels import OpInputError, activations, kernel_recipes, grouped_mm, route
from geomoe_kernels.ops.grouped_gemm import grouped_mm_backward, grouped_mm_op
from tests.helpers import (
    ACTIVATIONS,
    TOL,
    assert_backend_close,
    assert_close,
    assert_runs_close,
    assert_within_twice_reference_error,
    expert_ids,
    offsets,
    skip_unavailable,
)
from tests.oracles import naive_grouped_mm


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


@pytest.mark.parametrize("act", ACTIVATIONS)
@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("with_bias", [True, False])
def test_reference_matches_per_expert_loop(act, case, with_bias, path):
    counts = CASES[case]
    E, K, N = len(counts), 6, 8
    M = sum(counts)
    off = offsets(counts)
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


def _backend_against_loop(backend, dtype, counts, K, N, act):
    """grouped_mm on `backend` in `dtype` against the float64 loop, forward and every gradient (a
    kernel in fp16 / bf16 within twice the reference's own error in that dtype); the experts without
    rows get exact zeros."""
    E = len(counts)
    off = offsets(counts, backend.device)
    x = (torch.randn(sum(counts), K) / 2).to(backend.device, dtype).requires_grad_(True)
    w = (torch.randn(E, K, N) / 5).to(backend.device, dtype).requires_grad_(True)
    b = torch.randn(E, N).to(backend.device, dtype).requires_grad_(True)
    g = torch.randn(sum(counts), activations.out_features(act, N), dtype=torch.float64)
    outs = []
    for name, leaves in ((backend.name, (x, w, b)), ("torch", (x, w, b)), (None, (x, w, b))):
        if name is None:  # the independent float64 loop
            leaves = [t.detach().double().cpu().requires_grad_(True) for t in leaves]
            y = naive_grouped_mm(*leaves[:2], off.cpu(), leaves[2], act)
        else:
            y = skip_unavailable(grouped_mm, leaves[0], leaves[1], off, leaves[2], act, backend=name)
        grads = torch.autograd.grad(y, leaves, g.to(y.device, y.dtype))
        outs.append([t.detach().double().cpu() for t in (y, *grads)])
    assert_runs_close(outs, dtype, backend.name)
    idle = [e for e in range(E) if counts[e] == 0]
    dw, db = outs[0][2], outs[0][3]
    assert torch.count_nonzero(dw[idle]) == 0 and torch.count_nonzero(db[idle]) == 0


@pytest.mark.parametrize("act", ACTIVATIONS)
def test_backend_matches_per_expert_loop(backend, dtype, act):
    _backend_against_loop(backend, dtype, [5, 0, 19, 1, 0, 9], 24, 40, act)


def test_decode_sized_launch_matches_per_expert_loop(backend, dtype):
    """Fewer rows than experts (a decode step): the grid is ceil(M / B) + M blocks, every row its
    own expert's partial block."""
    counts = [0] * 40
    for e, c in ((3, 1), (17, 2), (18, 1), (39, 1)):
        counts[e] = c
    _backend_against_loop(backend, dtype, counts, 24, 16, "gelu")


def _kernels(backend):
    if backend.name == "triton":
        from geomoe_kernels.triton.grouped_gemm import KERNELS

        return KERNELS
    from geomoe_kernels.cuda import CudaGroupedGemm

    return CudaGroupedGemm()


def test_kernels_gather_rows_inside_the_load_and_split_the_weight_gradient(kernel_backend):
    """The recipe's pieces on the backend's kernels: a forward that reads token rows through the
    routing map, and weight gradients gathered alike or split three ways."""
    dev = kernel_backend.device
    dtype = torch.float32 if kernel_backend.name == "triton" else torch.float16
    T, k, E = 13, 2, 4
    r2f, f2r, off = (t.to(dev) for t in route(expert_ids(T, k, E), E, backend="torch"))
    x = torch.randn(T, 16, device=dev).to(dtype)
    w = torch.randn(E, 16, 24, device=dev).to(dtype)
    kernels = _kernels(kernel_backend)
    out, _ = kernel_recipes.forward(kernels, x, w, off, None, "none", gather=r2f, top_k=k)
    rows = x[r2f // k]
    per_expert = lambda fn: torch.stack([fn(int(off[e]), int(off[e + 1])) for e in range(E)])
    # the float64 computation, and torch's own in the kernels' dtype (a fp16 kernel's yardstick)
    assert_backend_close(
        out,
        naive_grouped_mm(rows, w, off, None, "none"),
        naive_grouped_mm(rows.double(), w.double(), off, None, "none"),
        dtype,
        "kernels",
    )
    g = torch.randn(T * k, 24, device=dev).to(dtype)
    r64, g64 = rows.double(), g.double()
    want = per_expert(lambda lo, hi: r64[lo:hi].t() @ g64[lo:hi])
    want_db = per_expert(lambda lo, hi: g64[lo:hi].sum(0))
    same_dtype = per_expert(lambda lo, hi: rows[lo:hi].t() @ g[lo:hi])
    same_dtype_db = per_expert(lambda lo, hi: g[lo:hi].sum(0))
    for dw, db in (
        kernel_recipes.weight_grad(kernels, x, g, off, gather=r2f, top_k=k),
        kernel_recipes.weight_grad(kernels, rows, g, off, splits=3),
    ):
        assert_backend_close(dw, same_dtype, want, dtype, "kernels")
        assert_backend_close(db, same_dtype_db, want_db, dtype, "kernels")


def test_empty_experts_get_exact_zero_gradients(path):
    off = offsets([4, 0, 6, 0])
    x = torch.randn(10, 5, requires_grad=True)
    w = torch.randn(4, 5, 6, requires_grad=True)
    b = torch.randn(4, 6, requires_grad=True)
    grouped_mm(x, w, off, b, "gelu").pow(2).sum().backward()
    for e in (1, 3):
        assert torch.equal(w.grad[e], torch.zeros(5, 6))
        assert torch.equal(b.grad[e], torch.zeros(6))
    assert w.grad[0].abs().sum() > 0 and w.grad[2].abs().sum() > 0


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_host_loop_writes_every_byte_of_its_uninitialised_outputs(monkeypatch, dtype):
    """The CPU loop fills its gradients in place in torch.empty buffers: with every fresh buffer
    NaN-poisoned, empty experts still come out exactly zero and the rest equals the fused path."""
    off = offsets([4, 0, 6, 0, 3])
    x = torch.randn(13, 8, dtype=dtype)
    w = torch.randn(5, 8, 16, dtype=dtype)
    g = torch.randn(13, 16, dtype=dtype)
    clean = grouped_mm_backward(g, x, w, off, None, "none")
    real_empty, real_new_empty = torch.empty, torch.Tensor.new_empty
    monkeypatch.setattr(torch, "empty", lambda *a, **k: real_empty(*a, **k).fill_(float("nan")))
    monkeypatch.setattr(torch.Tensor, "new_empty", lambda t, *a, **k: real_new_empty(t, *a, **k).fill_(float("nan")))
    poisoned = grouped_mm_backward(g, x, w, off, None, "none")
    for a, b in zip(poisoned, clean):
        assert torch.equal(a, b)
    assert torch.equal(poisoned[1][1], torch.zeros(8, 16, dtype=dtype)) and torch.equal(
        poisoned[2][3], torch.zeros(16, dtype=dtype)
    )


def test_gradcheck_each_activation():
    off = offsets([2, 0, 3])
    for act in ACTIVATIONS:
        x = torch.randn(5, 3, dtype=torch.float64, requires_grad=True)
        w = torch.randn(3, 3, 4, dtype=torch.float64, requires_grad=True)
        b = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
        assert torch.autograd.gradcheck(lambda x, w, b: grouped_mm(x, w, off, b, act), (x, w, b))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_half_precision_rule_catches_a_one_percent_error(dtype):
    """The rule kernels are judged by in fp16 / bf16 (twice the reference's own error against
    float64) passes a result as accurate as the reference and fails one 1 % off everywhere, which the
    fixed one-rounding tolerance lets through: a wrong kernel it would not catch."""
    counts = [30, 0, 50, 20]
    off = offsets(counts)
    x, w = torch.randn(100, 32) / 2, torch.randn(4, 32, 48) / 5
    exact = naive_grouped_mm(x.to(dtype).double(), w.to(dtype).double(), off, None, "gelu")
    same_dtype = grouped_mm(x.to(dtype), w.to(dtype), off, None, "gelu", backend="torch")
    assert_within_twice_reference_error(exact.to(dtype), same_dtype, exact)  # one rounding: passes
    wrong = (exact * 1.01).to(dtype)
    torch.testing.assert_close(wrong.double(), exact, **TOL[dtype])  # the fixed bound passes it
    with pytest.raises(AssertionError, match="error"):
        assert_within_twice_reference_error(wrong, same_dtype, exact)


def test_half_precision_close_to_float64():
    off = offsets([30, 0, 50, 20])
    x = torch.randn(100, 16)
    w = torch.randn(4, 16, 24) / 4
    got = grouped_mm(x.half(), w.half(), off, None, "gelu").double()
    want = naive_grouped_mm(x.double(), w.double(), off, None, "gelu")
    torch.testing.assert_close(got, want, rtol=2e-2, atol=1.4e-2)  # docs/testing.md: one half-precision rounding


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_stock_path_zero_fills_the_groups_grouped_mm_leaves_undefined(monkeypatch, dtype):
    """torch._grouped_mm leaves the weight gradient of an empty group undefined (on a GPU it is
    whatever the allocator held; the CPU's happens to be zeros). A stand-in that poisons those groups
    with NaN drives the stock path's fill on the CPU, in every dtype it takes (bf16 is the sm_90
    GPU's): empty experts get exact zeros, the rest the float64 loop's gradients."""
    from geomoe_kernels.reference import grouped_gemm as ref

    real = torch._grouped_mm
    poisoned = []

    def leaves_empty_groups_poisoned(a, b, offs=None, **kw):
        out = real(a, b, offs=offs, **kw)
        if a.dim() == 2 and b.dim() == 2:  # the weight gradient: one [K, N] block per group
            ends = offs.tolist()
            for e, (lo, hi) in enumerate(zip([0] + ends[:-1], ends)):
                if hi == lo:
                    out[e] = float("nan")
                    poisoned.append(e)
        return out

    monkeypatch.setattr(ref, "host_loop", lambda x: False)
    monkeypatch.setattr(torch, "_grouped_mm", leaves_empty_groups_poisoned)
    counts = [0, 9, 0, 23, 0]
    off = offsets(counts)
    x = (torch.randn(sum(counts), 16) / 2).to(dtype).requires_grad_(True)
    w = (torch.randn(5, 16, 24) / 4).to(dtype).requires_grad_(True)
    b = torch.randn(5, 24).to(dtype).requires_grad_(True)
    assert ref.use_stock(x, w)
    g = torch.randn(sum(counts), 24).to(dtype)
    dw, db = torch.autograd.grad(grouped_mm(x, w, off, b, "none"), (w, b), g)
    assert sorted(set(poisoned)) == [0, 2, 4]  # the stand-in did run, and did poison
    for e in (0, 2, 4):
        assert torch.equal(dw[e], torch.zeros(16, 24, dtype=dtype)), (
            f"expert {e} (no rows): weight gradient not zero: {dw[e].flatten()[:3].tolist()}"
        )
        assert torch.equal(db[e], torch.zeros(24, dtype=dtype)), e
    x64, g64 = x.detach().double(), g.double()
    for e, lo, hi in ((1, 0, 9), (3, 9, 32)):
        assert_close(dw[e], x64[lo:hi].t() @ g64[lo:hi], dtype, grad=True)


@pytest.mark.parametrize("stock", [True, False])
@pytest.mark.parametrize("act", ACTIVATIONS)
def test_reference_float32_both_paths_match_float64_loop(monkeypatch, stock, act):
    """Off the CPU's host loop, float32 runs torch._grouped_mm (aligned rows) or the tiled batched
    matmul; both match the loop."""
    from geomoe_kernels.reference import grouped_gemm as ref

    monkeypatch.setattr(ref, "host_loop", lambda x: False)
    counts = [9, 0, 30, 1, 0, 12]
    off = offsets(counts)
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


def _decode_counts(experts, rows, gen):
    """`rows` routed rows over `experts`, at most one per expert where they fit (decode: few tokens,
    many experts, every row its own partial block)."""
    counts = [0] * experts
    for e in torch.randperm(experts, generator=gen)[:rows].tolist():
        counts[e] += 1
    for e in torch.randint(experts, (max(0, rows - experts),), generator=gen).tolist():
        counts[e] += 1
    return counts


def test_block_schedule_covers_every_row_once():
    """The kernels' row blocks (and the reference's tiles): each expert's rows in blocks of its own,
    surplus blocks marked -1, nothing read back to the host; the static grid ceil(M / B) + min(E, M)
    is enough for any counts, the decode-sized ones (fewer rows than experts) included."""
    gen = torch.Generator().manual_seed(0)
    cases = [([5, 0, 17, 1, 9], 4), ([0, 0, 0, 33], 4), ([1, 1, 1, 1, 1, 1], 4), ([0, 0, 0], 4)]
    cases += [(_decode_counts(128, rows, gen), 128) for rows in (1, 8, 64, 127, 128, 512)]
    cases += [(_decode_counts(23, rows, gen), 4) for rows in (3, 22, 24, 95)]
    for counts, block in cases:
        off, M, E = offsets(counts), sum(counts), len(counts)
        s = kernel_recipes.block_schedule(off, M, block)
        assert s.blocks == -(-M // block) + min(E, max(M, 1)), counts
        assert s.per_expert.tolist() == [-(-c // block) for c in counts]
        covered = []
        for e, r0 in zip(s.expert.tolist(), s.row0.tolist()):
            if e >= 0:
                covered += [r for r in range(r0, min(r0 + block, int(off[e + 1])))]
                assert int(off[e]) <= r0 < int(off[e + 1])
        assert covered == list(range(M)), counts
    # one row on each of 8 of 128 experts: 9 row blocks, not 129
    assert kernel_recipes.block_schedule(offsets(_decode_counts(128, 8, gen)), 8, 128).blocks == 9


@pytest.mark.parametrize("counts", [[5, 0, 17, 1, 9], [0, 0, 0, 33], [7], [3, 0, 0, 0, 0, 0, 0, 0, 0, 4, 1, 16]])
def test_triton_kernels_find_their_block_like_the_schedule(kernel_backend, counts):
    """The Triton GEMM finds its (expert, first row) from the offsets inside the kernel: every block
    of the static grid, surplus ones included, agrees with kernel_recipes.BlockSchedule."""
    if kernel_backend.name != "triton":
        pytest.skip("the in-kernel lookup is the Triton kernels'")
    from geomoe_kernels.triton.grouped_gemm import lookup_lanes
    from tests.ops.triton_probes import block_lookup

    off = offsets(counts, kernel_backend.device)
    E, block = len(counts), 4
    s = kernel_recipes.block_schedule(off, sum(counts), block)
    got_e = torch.empty(s.blocks, dtype=torch.int32, device=off.device)
    got_row0 = torch.empty(s.blocks, dtype=torch.int64, device=off.device)
    block_lookup[(s.blocks,)](off, E, got_e, got_row0, BM=block, E_POW2=lookup_lanes(E))
    want_e = s.expert.to(torch.int32)
    live = want_e >= 0
    assert torch.equal(torch.where(live, got_e, -1), want_e)  # the kernel says E for a surplus block
    assert bool((got_e[~live] == E).all())
    assert torch.equal(got_row0[live], s.row0[live])


@pytest.mark.parametrize(
    "counts", [[5, 0, 17, 1, 9], [0, 0, 0, 33], [7], [3], [3, 0, 0, 0, 0, 0, 0, 0, 0, 4, 1, 16], [8] * 5 + [1, 40, 0]]
)
def test_triton_interleaved_order_visits_every_block_once_round_by_round(kernel_backend, counts):
    """The gathered forward's interleaved launch order (INTERLEAVE): slot s gets the s-th block of
    the rounds listed in Python below (round r holds expert e's blocks ceil(r n_e / R) ..
    ceil((r + 1) n_e / R) - 1, experts in order), so every block of the schedule runs exactly once,
    the blocks at the same fraction of their experts run together, and the surplus slots exit."""
    if kernel_backend.name != "triton":
        pytest.skip("the in-kernel lookup is the Triton kernels'")
    from geomoe_kernels.triton.grouped_gemm import lookup_lanes
    from tests.ops.triton_probes import interleaved_lookup

    off = offsets(counts, kernel_backend.device)
    E, block = len(counts), 4
    s = kernel_recipes.block_schedule(off, sum(counts), block)
    rounds = max(1, s.row_blocks)  # as the launch passes it
    n = [-(-c // block) for c in counts]
    ceil = lambda a, b: -(-a // b)
    want = [
        (e, int(off[e]) + j * block)
        for r in range(rounds)
        for e in range(E)
        for j in range(ceil(r * n[e], rounds), ceil((r + 1) * n[e], rounds))
    ]
    assert sorted(want) == sorted(zip(s.expert[s.expert >= 0].tolist(), s.row0[s.expert >= 0].tolist()))
    got_e = torch.empty(s.blocks, dtype=torch.int32, device=off.device)
    got_row0 = torch.empty(s.blocks, dtype=torch.int64, device=off.device)
    interleaved_lookup[(s.blocks,)](off, E, rounds, rounds.bit_length(), got_e, got_row0, BM=block, E_POW2=lookup_lanes(E))
    live = len(want)
    assert list(zip(got_e[:live].tolist(), got_row0[:live].tolist())) == want
    assert bool((got_e[live:] == E).all())


def test_interleaving_is_chosen_for_gathered_rows_whose_weights_fit_half_the_l2():
    from geomoe_kernels.kernel_recipes import interleaves_experts

    mb = 1 << 20
    assert interleaves_experts(True, 20 * mb, 50 * mb)  # GeoMoE's up-projection on an H100
    assert not interleaves_experts(True, 805 * mb, 50 * mb)  # an LLM's 128 experts: expert order
    assert not interleaves_experts(False, 1 * mb, 50 * mb)  # contiguous rows gain nothing


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_triton_gradients_are_the_same_bits_whichever_config_runs(kernel_backend, dtype, monkeypatch):
    """Autotuning may pick another tile on another run or machine: the forward and every gradient
    are bitwise equal across configs that differ in everything but the summation chunk (BK for the
    row GEMMs, BM for the weight gradient), which every shipped config shares."""
    if kernel_backend.name != "triton":
        pytest.skip("the Triton kernels' configs")
    import triton

    from geomoe_kernels.triton import grouped_gemm as tg

    device = kernel_backend.device
    interpreting = device.type == "cpu"
    if interpreting and dtype == torch.bfloat16:
        pytest.skip("the interpreter's bf16 dot is not the GPU's")
    assert len({c.kwargs["BK"] for c in tg._GEMM_CONFIGS}) == 1 and len({c.kwargs["BM"] for c in tg._WGRAD_CONFIGS}) == 1
    chunk, wgrad_rows = tg._GEMM_CONFIGS[0].kwargs["BK"], tg._WGRAD_CONFIGS[0].kwargs["BM"]
    tiles = [(16, 32), (32, 16)] if interpreting else [(64, 128), (128, 64)]
    counts = [5, 0, 37, 1, 0, 21]
    off = offsets(counts, device)
    x = (torch.randn(sum(counts), 48) / 2).to(device, dtype).requires_grad_(True)
    w = (torch.randn(6, 48, 40) / 5).to(device, dtype).requires_grad_(True)
    b = torch.randn(6, 40).to(device, dtype).requires_grad_(True)
    g = torch.randn(sum(counts), 40).to(device, dtype)
    results = []
    for bn, bk in tiles:
        monkeypatch.setattr(tg._gmm_kernel, "configs", [triton.Config({"BN": bn, "BK": chunk}, num_warps=4 if bn < 128 else 8)])
        monkeypatch.setattr(tg._wgrad_kernel, "configs", [triton.Config({"BK": bk, "BN": bn, "BM": wgrad_rows}, num_warps=4)])
        for kernel in (tg._gmm_kernel, tg._wgrad_kernel):
            monkeypatch.setattr(kernel, "cache", {})
        y = grouped_mm(x, w, off, b, "gelu", backend="triton")
        results.append((y.detach(),) + torch.autograd.grad(y, (x, w, b), g))
    for first, second in zip(*results):
        assert torch.equal(first, second)


def test_gathered_rows_equal_a_permuted_copy_and_opcheck():
    T, k, E = 9, 2, 4
    r2f, f2r, off = route(expert_ids(T, k, E), E)
    x = torch.randn(T, 6, dtype=torch.float64, requires_grad=True)
    w = torch.randn(E, 6, 8, dtype=torch.float64, requires_grad=True)
    b = torch.randn(E, 8, dtype=torch.float64, requires_grad=True)
    got = grouped_mm(x, w, off, b, "silu", gather=r2f, flat_to_row=f2r, top_k=k)
    want = naive_grouped_mm(x[r2f // k], w, off, b, "silu")
    torch.testing.assert_close(got, want, rtol=0, atol=1e-12)
    assert torch.autograd.gradcheck(
        lambda x, w, b: grouped_mm(x, w, off, b, "silu", gather=r2f, flat_to_row=f2r, top_k=k), (x, w, b)
    )
    xf = x.detach().float()
    torch.library.opcheck(grouped_mm_op.op, (xf, w.detach().float(), off, None, "gelu", r2f, f2r, k))
    _, pre = grouped_mm_op(xf, w.detach().float(), off, None, "gelu", r2f, f2r, k)
    torch.library.opcheck(grouped_mm_backward.op, (torch.randn(T * k, 8), xf, w.detach().float(), off, pre, "gelu", r2f, k))


def test_opcheck():
    off = offsets([3, 0, 4])
    x = torch.randn(7, 4)
    w = torch.randn(3, 4, 6)
    b = torch.randn(3, 6)
    for act in ACTIVATIONS:
        torch.library.opcheck(grouped_mm_op.op, (x, w, off, b, act))
    torch.library.opcheck(grouped_mm_op.op, (x, w, off, None, "none"))
    out, pre = grouped_mm_op(x, w, off, b, "swiglu")
    torch.library.opcheck(grouped_mm_backward.op, (torch.randn(7, 3), x, w, off, pre, "swiglu"))
    torch.library.opcheck(grouped_mm_backward.op, (torch.randn(7, 6), x, w, off, None, "none"))


def test_bad_arguments():
    with pytest.raises(OpInputError, match=r"'weight' expected dtype torch.float32 \(the dtype of 'x'\), got torch.float64"):
        grouped_mm(torch.randn(4, 3), torch.randn(2, 3, 5).double(), torch.tensor([0, 2, 4]))
    with pytest.raises(OpInputError, match=r"'weight' expected a tensor on cpu"):
        grouped_mm(torch.randn(4, 3), torch.randn(2, 3, 5, device="meta"), torch.tensor([0, 2, 4]))
    with pytest.raises(OpInputError, match=r"'x' expected 3 columns .* got 7"):
        grouped_mm(torch.randn(4, 7), torch.randn(2, 3, 5), torch.tensor([0, 2, 4]))
    with pytest.raises(OpInputError, match=r"'offsets' expected shape \[3\], got \[2\]"):
        grouped_mm(torch.randn(4, 3), torch.randn(2, 3, 5), torch.tensor([0, 4]))
    with pytest.raises(OpInputError, match=r"'bias' expected shape \[2, 5\], got \[5\]"):
        grouped_mm(torch.randn(4, 3), torch.randn(2, 3, 5), torch.tensor([0, 2, 4]), torch.randn(5))
    with pytest.raises(OpInputError, match=r"'offsets' expected non-decreasing values from 0 to 4"):
        grouped_mm(torch.randn(4, 3), torch.randn(2, 3, 5), torch.tensor([0, 3, 2]))
    with pytest.raises(
        OpInputError, match=r"'activation' expected one of \['none', 'gelu', 'silu', 'swiglu', 'swiglu_interleaved'\], got 'relu'"
    ):
        grouped_mm(torch.randn(4, 3), torch.randn(2, 3, 5), torch.tensor([0, 2, 4]), activation="relu")
    with pytest.raises(OpInputError, match=r"activation 'swiglu_interleaved' expected an even N \(\(gate, up\) pairs of"):
        grouped_mm(torch.randn(4, 3), torch.randn(2, 3, 5), torch.tensor([0, 2, 4]), activation="swiglu_interleaved")
    with pytest.raises(OpInputError, match="'gather' and 'flat_to_row' expected together"):
        grouped_mm(torch.randn(4, 3), torch.randn(2, 3, 5), torch.tensor([0, 4, 8]), gather=torch.arange(8), top_k=2)


def test_the_public_function_makes_its_inputs_contiguous():
    """Transposed x, weight and bias views: the same values as the float64 loop on their contiguous
    copies (a kernel reading the views' storage as if contiguous would get other ones)."""
    x = torch.randn(3, 4, dtype=torch.float64).t()
    w = torch.randn(2, 2, 3, dtype=torch.float64).transpose(1, 2)
    b = torch.randn(2, 2, dtype=torch.float64).t()
    assert not (x.is_contiguous() or w.is_contiguous() or b.is_contiguous())
    off = torch.tensor([0, 1, 4])
    out = grouped_mm(x, w, off, b, "gelu")
    torch.testing.assert_close(
        out, naive_grouped_mm(x.contiguous(), w.contiguous(), off, b.contiguous(), "gelu"), rtol=0, atol=1e-12
    )


def test_weight_grad_writes_into_any_float_destination_and_adds_to_what_is_there(kernel_backend):
    """kernel_recipes.weight_grad(out=...): the gradient written into destinations of the parameter's
    dtype and layout (a transposed float32 one, a half one: the float32 sums converted once, the
    same bits as casting the float32 result; float16 here), added to what they hold with accumulate (an experts'
    .grad over micro-batches), db None for no bias; one split (written by the kernel where the
    backend has wgrad_into) and three (the partials summed, then copied or added); experts without
    rows exact zeros, or unchanged when accumulating."""
    dev = kernel_backend.device
    dtype = torch.float32 if kernel_backend.name == "triton" else torch.float16
    counts, K, N = [5, 0, 9, 3], 20, 24
    off, M, E = offsets(counts, dev), sum(counts), len(counts)
    a = (torch.randn(M, K) / 2).to(dev, dtype)
    g = torch.randn(M, N).to(dev, dtype)
    kernels = _kernels(kernel_backend)
    want = torch.stack([a[lo:hi].double().t() @ g[lo:hi].double() for lo, hi in zip(off[:-1].tolist(), off[1:].tolist())])
    want_db = torch.stack([g[lo:hi].double().sum(0) for lo, hi in zip(off[:-1].tolist(), off[1:].tolist())])
    dw32, db32 = kernel_recipes.weight_grad(kernels, a, g, off, splits=1)
    tol = dict(rtol=1e-4, atol=1e-4) if dtype == torch.float32 else dict(rtol=2e-3, atol=4e-3)
    torch.testing.assert_close(dw32.double(), want, **tol)
    torch.testing.assert_close(db32.double(), want_db, **tol)
    for splits in (1, 3):
        dw_t = torch.full((E, N, K), float("nan"), device=dev).transpose(1, 2)  # [E, K, N], K fastest
        db = torch.full((E, N), float("nan"), device=dev)
        got = kernel_recipes.weight_grad(kernels, a, g, off, splits=splits, out=(dw_t, db))
        assert got[0] is dw_t and got[1] is db
        torch.testing.assert_close(dw_t.double(), want, **tol)
        torch.testing.assert_close(db.double(), want_db, **tol)
        assert torch.count_nonzero(dw_t[1]) == 0 and torch.count_nonzero(db[1]) == 0
        if splits == 1:
            assert torch.equal(dw_t, dw32) and torch.equal(db, db32)
            # (float16: the interpreter rounds float32 to bfloat16 toward zero, a GPU to nearest)
            dw16 = torch.full((E, K, N), float("nan"), dtype=torch.float16, device=dev)
            kernel_recipes.weight_grad(kernels, a, g, off, splits=1, out=(dw16, None))
            assert torch.equal(dw16, dw32.to(torch.float16))
        held, held_db = torch.randn(E, K, N, device=dev), torch.randn(E, N, device=dev)
        dw_acc, db_acc = held.clone(), held_db.clone()
        kernel_recipes.weight_grad(kernels, a, g, off, splits=splits, out=(dw_acc, db_acc), accumulate=True)
        if splits == 1:
            assert torch.equal(dw_acc, held + dw32) and torch.equal(db_acc, held_db + db32)
        torch.testing.assert_close(dw_acc.double(), held.double() + want, **tol)
        torch.testing.assert_close(db_acc.double(), held_db.double() + want_db, **tol)
        assert torch.equal(dw_acc[1], held[1]) and torch.equal(db_acc[1], held_db[1])


def test_triton_gemms_address_past_2_31_elements(kernel_backend):
    """Element offsets past 2^31 (int32 would wrap): A's rows 2^30 elements apart (row 2 at 2^31),
    read gathered by the forward and by the weight gradient, which writes expert 1's dW past 2^31
    too. One 4 GiB fp16 storage, untouched but for the few rows used (views, no copy)."""
    if kernel_backend.name != "triton":
        pytest.skip("the Triton kernels' addressing")
    dev, dt, K, N = kernel_backend.device, torch.float16, 16, 24
    big = torch.empty(2**31 + 4096, dtype=dt, device=dev)
    step = 2**30
    a = big.as_strided((3, K), (step, 1))
    a.copy_((torch.randn(3, K) / 2).to(dt))
    dw = big.as_strided((2, K, N), (2**31 + 512 - 2048, N, 1), 2048)  # expert 1 from 2^31 + 512
    gather = torch.tensor([4, 1, 2, 3, 0, 5], device=dev)  # rows -> flat slots of 3 tokens x top-2
    off = offsets([4, 2], dev)
    w = (torch.randn(2, K, N) / 4).to(dev, dt)
    kernels = _kernels(kernel_backend)
    out, _ = kernel_recipes.forward(kernels, a, w, off, None, "none", gather=gather, top_k=2)
    rows = a.cpu().double()[gather.cpu() // 2]
    want = torch.cat([rows[:4] @ w[0].cpu().double(), rows[4:] @ w[1].cpu().double()])
    torch.testing.assert_close(out.cpu().double(), want, rtol=2e-3, atol=4e-3)
    g = torch.randn(6, N).to(dev, dt)
    kernel_recipes.weight_grad(kernels, a, g, off, gather=gather, top_k=2, splits=1, out=(dw, None))
    gd = g.cpu().double()
    for e, (lo, hi) in enumerate(((0, 4), (4, 6))):
        torch.testing.assert_close(dw[e].cpu().double(), rows[lo:hi].t() @ gd[lo:hi], rtol=2e-3, atol=4e-3)
