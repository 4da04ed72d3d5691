"""The weight gradient with TMA descriptors (geomoe_kernels/triton/grouped_wgrad_sm90.py) against the
pointer kernel (grouped_gemm._wgrad_kernel), bit for bit (both sum each expert's rows in the same BM
steps), and against float64: contiguous and gathered A, each activation formed in A's load, G
through the routing map, splits, accumulation into the destination, experts without rows (exact
zeros), and rows past an expert's end that hold Inf and NaN (the next expert's: they must add
nothing). Under the interpreter (TRITON_INTERPRET=1, tests/test_triton_interpreter.py's process)
the descriptors are the interpreter's (numpy loads with TMA's bounds, zero fill and 16-byte checks);
the hardware's TMA and wgmma are the offline compile's (tools/triton_offline) and the GPU's. Which
kernel takes a launch (layouts, dtypes, activations) is checked in the main process too."""

import pytest
import torch

from geomoe_kernels import kernel_recipes
from tests.helpers import assert_close, offsets, pointer_then_persistent


def _modules():
    from geomoe_kernels.triton import grouped_gemm as tg
    from geomoe_kernels.triton import grouped_gemm_sm90 as sm90
    from geomoe_kernels.triton import grouped_wgrad_sm90 as wg

    return tg, sm90, wg


@pytest.fixture
def launches(kernel_backend, monkeypatch):
    """The TMA weight gradient's launches that ran (True) or went to the pointer kernel (False)."""
    if kernel_backend.name != "triton":
        pytest.skip("the Triton kernels")
    if kernel_backend.device.type == "cuda" and torch.cuda.get_device_capability(kernel_backend.device) < (9, 0):
        pytest.skip("no TMA on this GPU: the pointer kernel runs every weight gradient")
    tg, _, wg = _modules()
    assert tg.persistent_wgrad is wg.launch
    ran = []
    monkeypatch.setattr(tg, "persistent_wgrad", lambda *a: ran.append(wg.launch(*a)) or ran[-1])
    return ran


def _both(fn, programs, monkeypatch):
    """fn() with the pointer kernel, then with the TMA kernel on `programs` persistent programs."""
    _, sm90, _ = _modules()
    return pointer_then_persistent(sm90, fn, programs, monkeypatch)


def _act(a, act):
    if act == "swiglu":
        gate, up = a.chunk(2, dim=1)
        return torch.nn.functional.silu(gate) * up
    return {"none": lambda x: x, "gelu": torch.nn.functional.gelu, "silu": torch.nn.functional.silu}[act](a)


def _exact(a, g, off, act, rows=None, scale=None):
    """float64 (dW [E, K, N], db [E, N]): A's rows (through `rows`), act, G's rows times `scale`."""
    a, g = a.double().cpu(), g.double().cpu()
    x = _act(a if rows is None else a[rows.cpu()], act)
    if scale is not None:
        g = g * scale.double().cpu()[:, None]
    bounds = off.tolist()
    dw = torch.stack([x[lo:hi].t() @ g[lo:hi] for lo, hi in zip(bounds[:-1], bounds[1:])])
    db = torch.stack([g[lo:hi].sum(0) for lo, hi in zip(bounds[:-1], bounds[1:])])
    return dw, db


CASES = {"uneven": [5, 0, 17, 1, 9], "empty_first_last": [0, 12, 7, 0], "no_rows": [0, 0, 0]}


# K 24 and N 40: tails past the interpreter's 16 x 16 dW tiles; 17 rows end one row into a BM step
@pytest.mark.parametrize("case, splits, programs", [("uneven", 1, 3), ("uneven", 2, 3), ("uneven", 1, 64), ("empty_first_last", 1, 1), ("no_rows", 2, 3)])  # fmt: skip
@pytest.mark.parametrize("act", ["none", "gelu", "silu", "swiglu"])
def test_tma_wgrad_is_the_pointer_kernels_bits(kernel_backend, launches, monkeypatch, case, splits, programs, act):
    tg, _, _ = _modules()
    dev, dt, counts = kernel_backend.device, torch.float16, CASES[case]
    M, K, N = sum(counts), 24, 40
    off = offsets(counts, dev)
    a = (torch.randn(M, 2 * K if act == "swiglu" else K) / 2).to(dev, dt)
    g = torch.randn(M, N).to(dev, dt)
    run = lambda: kernel_recipes.weight_grad(tg.KERNELS, a, g, off, a_activation=act, splits=splits)  # noqa: E731
    (dw, db), (dw_p, db_p) = _both(run, programs, monkeypatch)
    assert launches == [False, True]
    assert torch.equal(dw, dw_p) and torch.equal(db, db_p)
    exact_dw, exact_db = _exact(a, g, off, act)
    assert_close(dw, exact_dw, dt, grad=True)
    assert_close(db, exact_db, dt, grad=True)
    for e in (i for i, c in enumerate(counts) if c == 0):  # experts without rows: exact zeros
        assert not dw[e].any() and not db[e].any()


@pytest.mark.parametrize("act", ["gelu", "swiglu"])
@pytest.mark.parametrize("routed", ["gather_a", "route_g"])
def test_tma_wgrad_through_the_routing_map_is_the_pointer_kernels_bits(kernel_backend, launches, monkeypatch, act, routed):
    """gather_a: the up-projection's A rows are tokens through the routing map (pointer loads of A,
    G by descriptor); route_g: the down-projection's G is the combined tokens' gradient through the
    map, weighted by the routing weights (A by descriptor, G by pointer loads)."""
    from geomoe_kernels import route
    from tests.helpers import expert_ids

    tg, _, _ = _modules()
    dev, dt = kernel_backend.device, torch.float16
    T, k, E, K, N = 11, 3, 5, 24, 40
    r2f, _, off = (t.to(dev) for t in route(expert_ids(T, k, E), E, backend="torch"))
    width = 2 * K if act == "swiglu" else K
    if routed == "gather_a":
        a, g = (torch.randn(T, width) / 2).to(dev, dt), torch.randn(T * k, N).to(dev, dt)
        run = lambda: kernel_recipes.weight_grad(tg.KERNELS, a, g, off, r2f, k, act)  # noqa: E731
        exact = _exact(a, g, off, act, rows=r2f // k)
    else:
        a, g = (torch.randn(T * k, width) / 2).to(dev, dt), torch.randn(T, N).to(dev, dt)
        w = torch.rand(T, k, device=dev)
        run = lambda: kernel_recipes.weight_grad(tg.KERNELS, a, g, off, a_activation=act, g_routing=(r2f, k, w))  # noqa: E731
        exact = _exact(a, g[(r2f // k).cpu()], off, act, scale=w.view(-1)[r2f].cpu())
    got, want = _both(run, 3, monkeypatch)
    assert launches == [False, True]
    for x, y, z in zip(got, want, exact):
        assert torch.equal(x, y)
        assert_close(x, z, dt, grad=True)


@pytest.mark.parametrize("act", ["none", "swiglu"])
@pytest.mark.parametrize("splits", [1, 2])
def test_rows_past_an_experts_end_add_nothing(kernel_backend, launches, monkeypatch, act, splits):
    """Expert 0 ends 5 rows into a row step; the next expert's rows hold Inf in A and NaN in G (0 *
    Inf is NaN: zeroing one operand would not do). Expert 0's and expert 2's gradients stay finite
    and right, the same bits as the pointer kernel's (expert 1's own are NaN in both)."""
    tg, _, _ = _modules()
    dev, dt, counts = kernel_backend.device, torch.float16, [5, 6, 21]
    M, K, N = 32, 24, 40
    off = offsets(counts, dev)
    a = (torch.randn(M, 2 * K if act == "swiglu" else K) / 2).to(dt)
    g = torch.randn(M, N).to(dt)
    a[5:11], g[5:11] = float("inf"), float("nan")
    a, g = a.to(dev), g.to(dev)
    run = lambda: kernel_recipes.weight_grad(tg.KERNELS, a, g, off, a_activation=act, splits=splits)  # noqa: E731
    (dw, db), (dw_p, db_p) = _both(run, 3, monkeypatch)
    assert launches == [False, True]
    for x, y in ((dw, dw_p), (db, db_p)):  # the same bits, NaN where the pointer kernel's are
        torch.testing.assert_close(x, y, rtol=0, atol=0, equal_nan=True)
    exact_dw, exact_db = _exact(a, g, off, act)
    for e in (0, 2):
        assert dw[e].isfinite().all() and db[e].isfinite().all()
        assert_close(dw[e], exact_dw[e], dt, grad=True)
        assert_close(db[e], exact_db[e], dt, grad=True)
    assert dw[1].isnan().any()


def test_tma_wgrad_accumulates_into_the_parameters_grad(kernel_backend, launches, monkeypatch):
    """wgrad_into with accumulate: the float32 sums added to what a bfloat16 destination holds (float16
    operands: the interpreter's dot of bfloat16 tiles is not right, in either kernel),
    converted once; an expert without rows keeps exactly what it held."""
    tg, _, _ = _modules()
    dev, dt, counts = kernel_backend.device, torch.float16, [9, 0, 14]
    E, M, K, N = 3, 23, 24, 40
    off = offsets(counts, dev)
    a, g = (torch.randn(M, K) / 2).to(dev, dt), torch.randn(M, N).to(dev, dt)
    dw0, db0 = torch.randn(E, K, N).to(dev, torch.bfloat16), torch.randn(E, N).to(dev, torch.bfloat16)

    def run():
        dw, db = dw0.clone(), db0.clone()
        return kernel_recipes.weight_grad(tg.KERNELS, a, g, off, out=(dw, db), accumulate=True, splits=1)

    (dw, db), (dw_p, db_p) = _both(run, 3, monkeypatch)
    assert launches == [False, True]
    assert torch.equal(dw, dw_p) and torch.equal(db, db_p)
    assert torch.equal(dw[1], dw0[1]) and torch.equal(db[1], db0[1])
    exact_dw, exact_db = _exact(a, g, off, "none")
    assert_close(dw, exact_dw + dw0.double().cpu(), torch.bfloat16, grad=True)
    assert_close(db, exact_db + db0.double().cpu(), torch.bfloat16, grad=True)


def test_tma_wgrad_configs_give_the_same_bits(kernel_backend, launches, monkeypatch):
    """Two dW tiles and program counts that share the pointer kernel's BM: the same bits."""
    import triton

    tg, sm90, wg = _modules()
    dev, dt, counts = kernel_backend.device, torch.float16, [5, 0, 37, 1, 21]
    off = offsets(counts, dev)
    a, g = (torch.randn(64, 48) / 2).to(dev, dt), torch.randn(64, 40).to(dev, dt)
    bm = wg._CONFIGS[0].kwargs["BM"]
    assert {c.kwargs["BM"] for c in wg._CONFIGS} == {bm} == {c.kwargs["BM"] for c in tg._WGRAD_CONFIGS}
    outs = []
    with sm90.forced("persistent"):
        for bk, bn, occ in ((16, 16, 1), (32, 16, 2)):
            config = triton.Config({"BK": bk, "BN": bn, "BM": bm, "OCC": occ}, num_warps=4)
            monkeypatch.setattr(wg._wgrad_tma_kernel, "configs", [config])
            monkeypatch.setattr(wg._wgrad_tma_kernel, "cache", {})
            outs.append(kernel_recipes.weight_grad(tg.KERNELS, a, g, off, a_activation="silu"))
    assert launches == [True, True]
    for first, second in zip(*outs):
        assert torch.equal(first, second)


def test_tma_wgrad_addresses_past_2_31_elements(kernel_backend, launches, monkeypatch):
    """A's rows 2^30 elements apart: expert 1's descriptor is based at row 2, element 2^31 (its
    offsets int32, as a caller may pass them). One 4 GiB fp16 storage, untouched but for the rows
    used (a view, no copy)."""
    tg, sm90, _ = _modules()
    dev, dt, K, N = kernel_backend.device, torch.float16, 16, 24
    big = torch.empty(2**31 + 4096, dtype=dt, device=dev)
    a = big.as_strided((3, K), (2**30, 1))
    a.copy_((torch.randn(3, K) / 2).to(dt))
    g = torch.randn(3, N).to(dev, dt)
    off = offsets([2, 1], dev).int()
    with sm90.forced("persistent"):
        dw, db = kernel_recipes.weight_grad(tg.KERNELS, a, g, off)
    assert launches == [True]
    exact_dw, exact_db = _exact(a, g, off, "none")
    assert_close(dw, exact_dw, dt, grad=True)
    assert_close(db, exact_db, dt, grad=True)


# ---- the choice (main process) ----------------------------------------------------------------------


def test_operands_tma_cannot_read_go_to_the_pointer_wgrad():
    pytest.importorskip("triton")
    _, sm90, wg = _modules()
    a, g, r2f = torch.randn(8, 32).half(), torch.randn(8, 16).half(), torch.zeros(8, dtype=torch.long)
    with sm90.forced("persistent"):
        assert wg.takes(a, g, None, False, "gelu") and wg.takes(a, g, r2f, False, "swiglu")
        assert wg.takes(a, g, None, True, "silu")  # G through the routing map: A by descriptor
        assert not wg.takes(a, g, r2f, True, "none")  # both gathered: nothing for TMA
        assert not wg.takes(a.float(), g.float(), None, False, "none")  # float32: the pointer kernel's
        assert not wg.takes(a, g.bfloat16(), None, False, "none")  # two dtypes
        assert not wg.takes(a, g, None, False, "relu")  # an activation it does not know
        assert not wg.takes(torch.randn(8, 33).half()[:, :32], g, None, False, "none")  # A rows 66 bytes apart
        assert wg.takes(torch.randn(8, 33).half()[:, :32], g, r2f, False, "none")  # gathered A: pointer loads
        assert not wg.takes(a, torch.randn(8, 17).half()[:, :16], None, False, "none")  # G rows 34 bytes apart
        assert wg.takes(a, torch.randn(8, 17).half()[:, :16], None, True, "none")  # routed G: pointer loads
        assert not wg.takes(torch.randn(8 * 32 + 1).half()[1:].view(8, 32), g, None, False, "none")  # base off 16 B
        assert not wg.takes(a.t().contiguous().t(), g, None, False, "none")  # strided columns
        assert not wg.takes(torch.randn(8, 2 * 12).half(), g, None, False, "swiglu")  # 'up' at 24 bytes
    with sm90.forced("pointer"):
        assert not wg.takes(a, g, None, False, "gelu")
