"""topk_gating: the reference against a per-token loop in float64; every backend against the
reference in float32 (ids and counts exactly); opcheck; argument errors."""

import os

import pytest
import torch

from geomoe_kernels import BackendUnavailable, OpInputError, topk_gating
from geomoe_kernels._checks import non_finite_passes, set_value_checks
from geomoe_kernels.ops.gating import topk_gating_backward
from tests.helpers import TOL
from tests.oracles import naive_gating


@pytest.mark.parametrize("score_func", ["sigmoid", "softmax"])
@pytest.mark.parametrize("renormalize", [True, False])
@pytest.mark.parametrize("k", [1, 2, 3])
@pytest.mark.parametrize("with_bias", [False, True])
def test_reference_matches_naive_loop(score_func, renormalize, k, with_bias):
    logits = torch.randn(37, 7, dtype=torch.float64)
    bias = 0.1 * torch.randn(7, dtype=torch.float64) if with_bias else None
    got = topk_gating(logits, bias, k, score_func, renormalize, backend="torch")
    want = naive_gating(logits, bias, k, score_func, renormalize)
    assert torch.equal(got[1], want[1])
    assert torch.equal(got[2], want[2])
    torch.testing.assert_close(got[0], want[0], rtol=0, atol=1e-14)
    torch.testing.assert_close(got[3], want[3], rtol=0, atol=1e-14)


@pytest.mark.parametrize("score_func", ["sigmoid", "softmax"])
@pytest.mark.parametrize("renormalize", [True, False])
@pytest.mark.parametrize("k", [1, 3])
def test_backend_matches_reference(backend, score_func, renormalize, k):
    dev = backend.device
    logits = torch.randn(37, 7, device=dev, requires_grad=True)
    bias = 0.1 * torch.randn(7, device=dev) if score_func == "sigmoid" else None
    got = topk_gating(logits, bias, k, score_func, renormalize, backend=backend.name)
    # against the float64 reference (itself checked against the loop above), not the float32 one:
    # where the reference is the only backend (the main CPU process) that is no self-comparison
    logits64 = logits.detach().double().requires_grad_(True)
    want = topk_gating(logits64, None if bias is None else bias.double(), k, score_func, renormalize, backend="torch")
    assert torch.equal(got[1], want[1]) and torch.equal(got[2], want[2])
    torch.testing.assert_close(got[0].double(), want[0], **TOL[torch.float32])
    torch.testing.assert_close(got[3].double(), want[3], **TOL[torch.float32])
    gw, gp = torch.randn(37, k, device=dev), torch.randn(7, device=dev)
    g_got = torch.autograd.grad((got[0] * gw).sum() + (got[3] * gp).sum(), logits)[0]
    g_want = torch.autograd.grad((want[0] * gw.double()).sum() + (want[3] * gp.double()).sum(), logits64)[0]
    torch.testing.assert_close(g_got.double(), g_want, **TOL[torch.float32])


def test_ties_pick_the_lower_expert(backend):
    _, ids, counts, _ = topk_gating(torch.zeros(5, 6, device=backend.device), None, 3, backend=backend.name)
    assert ids.tolist() == [[0, 1, 2]] * 5 and counts.tolist() == [5, 5, 5, 0, 0, 0]


def test_bias_changes_selection_not_weights():
    logits = torch.tensor([[2.0, 1.0, 0.0]], dtype=torch.float64)
    bias = torch.tensor([0.0, 0.0, 10.0], dtype=torch.float64)
    w, ids, counts, _ = topk_gating(logits, bias, 1, "sigmoid", False)
    assert ids.tolist() == [[2]]
    assert counts.tolist() == [0, 0, 1]
    torch.testing.assert_close(w, torch.sigmoid(torch.tensor([[0.0]], dtype=torch.float64)))


@pytest.mark.parametrize("score_func", ["sigmoid", "softmax"])
@pytest.mark.parametrize("renormalize", [True, False])
def test_gradcheck(score_func, renormalize):
    logits = torch.randn(9, 5, dtype=torch.float64, requires_grad=True)
    bias = 0.05 * torch.randn(5, dtype=torch.float64)

    def f(l):
        w, _, _, p = topk_gating(l, bias, 2, score_func, renormalize)
        return w, p

    assert torch.autograd.gradcheck(f, (logits,))


def test_weights_float32_under_float32_logits():
    w, ids, counts, p = topk_gating(torch.randn(5, 4), None, 2)
    assert (w.dtype, ids.dtype, counts.dtype, p.dtype) == (torch.float32, torch.int64, torch.int64, torch.float32)
    torch.testing.assert_close(w.sum(-1), torch.ones(5))


def test_opcheck():
    logits = torch.randn(11, 6)
    bias = torch.randn(6)
    for sf in ("sigmoid", "softmax"):
        torch.library.opcheck(topk_gating.op, (logits, bias, 3, sf, True))
        torch.library.opcheck(topk_gating.op, (logits, None, 1, sf, False))
    ids = topk_gating(logits, bias, 3, "sigmoid", True)[1]
    torch.library.opcheck(topk_gating_backward.op, (torch.randn(11, 3), torch.randn(6), logits, ids, "sigmoid", True))
    torch.library.opcheck(topk_gating_backward.op, (None, torch.randn(6), logits, ids, "softmax", False))


def test_k_larger_than_experts():
    with pytest.raises(OpInputError, match=r"topk_gating: argument 'top_k' expected 1 <= top_k <= 4.*got 5"):
        topk_gating(torch.randn(3, 4), None, 5)


def test_nan_scores():
    logits = torch.randn(6, 4)
    logits[2, 1] = float("nan")
    with pytest.raises(OpInputError, match=r"'logits' expected finite values, got 1 NaN/Inf"):
        topk_gating(logits, None, 2)


# ---- the selection contract under NaN, infinities and extreme biases ----------------------------------

NAN, INF = float("nan"), float("inf")
F32_MIN, F32_MAX = torch.finfo(torch.float32).min, torch.finfo(torch.float32).max


def _contract_case(name, E):
    """(logits [T, E], bias or None, score_func, top_k, ids the contract gives or None) for an input
    that is non-finite or extreme; random finite rows around the special ones. The expert indices
    reach past lane 0 of the CUDA kernel's warp (E - 1, E // 2) where E is larger than 32."""
    k = min(3, E)
    logits, bias = torch.randn(5, E), None
    last, mid = E - 1, E // 2
    if name == "all_nan":  # every score NaN: the k lowest ids, all weights NaN
        logits[1:4] = NAN
        want = {t: list(range(k)) for t in (1, 2, 3)}
        return logits, 0.1 * torch.randn(E), "sigmoid", k, want
    if name == "fewer_than_k_numbers":  # two numbers, then the lowest NaN experts
        logits[2] = NAN
        logits[2, last], logits[2, 1] = 1.0, 2.0
        return logits, None, "sigmoid", k, {2: [1, last, 0][:k]}
    if name == "softmax_inf":  # +inf (and all -inf) make the softmax row NaN; partly -inf is fine
        logits[0, mid] = INF
        logits[1] = -INF
        logits[3, : E - 1] = -INF
        return logits, None, "softmax", k, {0: list(range(k)), 1: list(range(k))}
    if name == "sigmoid_inf":  # scores 1 and 0 exactly: the ties go to the lower id
        logits[0] = -INF
        logits[0, last], logits[0, mid] = INF, INF
        logits[1] = -INF  # all scores 0: renormalised weights 0 / 0
        return logits, None, "sigmoid", k, {0: [mid, last, 0][:k], 1: list(range(k))}
    if name == "bias_f32_min_some":  # score + finfo.min == finfo.min: a tie among those experts
        bias = torch.full((E,), F32_MIN)
        bias[last], bias[mid] = 0.0, 0.0
        return logits, bias, "sigmoid", min(4, E), None
    if name == "bias_f32_min_all":
        return logits, torch.full((E,), F32_MIN), "sigmoid", k, {t: list(range(k)) for t in range(5)}
    if name == "bias_neg_inf_all_but_one":
        bias = torch.full((E,), -INF)
        bias[mid] = 0.0
        return logits, bias, "sigmoid", k, {t: [mid, 0, 1][:k] for t in range(5)}
    if name == "mixed":  # NaN, +-inf logits and NaN, +-inf, finfo.min/max biases together, k = E if it can
        logits[0, ::2] = NAN
        logits[1, 1::3] = INF
        logits[2, ::4] = -INF
        logits[3] = NAN
        bias = torch.zeros(E)
        for e, v in zip(range(0, E, max(1, E // 6)), (-INF, INF, F32_MIN, F32_MAX, NAN, -INF)):
            bias[e] = v
        return logits, bias, "sigmoid", min(E, 8), None
    raise AssertionError(name)


CONTRACT_CASES = [
    "all_nan",
    "fewer_than_k_numbers",
    "softmax_inf",
    "sigmoid_inf",
    "bias_f32_min_some",
    "bias_f32_min_all",
    "bias_neg_inf_all_but_one",
    "mixed",
]


def assert_gating_contract(got, logits, bias, k, score_func, renormalize, want_ids=None):
    """k distinct ids in [0, E) per token, counts their histogram, ids equal to the per-token oracle,
    and weights NaN exactly where it says (a chosen NaN score; all of the token's when renormalised)."""
    w, ids, counts, _ = (t.cpu() for t in got)
    T, E = logits.shape
    assert ids.shape == (T, k) and ids.dtype == torch.int64
    assert bool(((ids >= 0) & (ids < E)).all()), ids
    assert all(len(set(row)) == k for row in ids.tolist()), ids
    assert torch.equal(counts, torch.bincount(ids.reshape(-1), minlength=E))
    want_w, want, want_counts, _ = naive_gating(logits.cpu(), None if bias is None else bias.cpu(), k, score_func, renormalize)
    assert torch.equal(ids, want), (ids, want)
    assert torch.equal(counts, want_counts)
    for t, row in (want_ids or {}).items():
        assert ids[t].tolist() == row, (t, ids[t])
    assert torch.equal(torch.isnan(w), torch.isnan(want_w)), (w, want_w)
    torch.testing.assert_close(w, want_w.to(w.dtype), equal_nan=True)


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # the interpreter's inf - inf
@pytest.mark.parametrize("case", CONTRACT_CASES)
@pytest.mark.parametrize("E", [6, 40, 300])
def test_selection_contract_with_value_checks_off(backend, case, E):
    """With value checks off (a GPU's default) every input reaches the kernel: the ids stay distinct
    and in range on every backend, in the same order as the oracle's and the reference's (on the CPU
    here). E = 6, 40 and 300 take the CUDA kernel's 1, 2 and 16 experts per lane."""
    set_value_checks(False)  # undone by conftest's backend.forget()
    logits, bias, score_func, k, want_ids = _contract_case(case, E)
    for renormalize in (True, False):
        dev = backend.device
        got = topk_gating(
            logits.to(dev), None if bias is None else bias.to(dev), k, score_func, renormalize, backend=backend.name
        )
        assert_gating_contract(got, logits, bias, k, score_func, renormalize, want_ids)
        ref = topk_gating(logits, bias, k, score_func, renormalize, backend="torch")
        assert torch.equal(got[1].cpu(), ref[1]) and torch.equal(got[2].cpu(), ref[2])


def test_selection_contract_nan_weights():
    """The weights of a token with a chosen NaN score: that slot NaN, or every slot when renormalised
    (the step's non-finite check then skips the step); the other tokens' stay finite."""
    logits, bias, score_func, k, _ = _contract_case("fewer_than_k_numbers", 6)
    with non_finite_passes():
        w_renorm = topk_gating(logits, bias, k, score_func, True)[0]
        w_plain = topk_gating(logits, bias, k, score_func, False)[0]
    assert torch.isnan(w_renorm[2]).all() and torch.isfinite(w_renorm[[0, 1, 3, 4]]).all()
    assert torch.isnan(w_plain).nonzero().tolist() == [[2, 2]]


def test_selection_contract_with_value_checks_on(backend):
    """Where value checks run: finfo.min biases are finite and pass, NaN logits pass inside
    non_finite_passes(), and a -inf bias is refused, naming the argument."""
    set_value_checks(True)  # undone by conftest's backend.forget()
    dev = backend.device
    for case in ("bias_f32_min_some", "bias_f32_min_all", "all_nan"):
        logits, bias, score_func, k, want_ids = _contract_case(case, 6)
        with non_finite_passes():
            got = topk_gating(logits.to(dev), None if bias is None else bias.to(dev), k, score_func, backend=backend.name)
        assert_gating_contract(got, logits, bias, k, score_func, True, want_ids)
    logits, bias, _, k, _ = _contract_case("bias_neg_inf_all_but_one", 6)
    with pytest.raises(OpInputError, match=r"topk_gating: argument 'bias' expected finite values, got 5 NaN/Inf"):
        topk_gating(logits.to(dev), bias.to(dev), k, backend=backend.name)


def test_triton_gating_kernels_compile_for_a_gpu():
    """The Triton gating kernels (and the layer plan's fused one) lowered to an sm_90 cubin here, without a GPU (the ptxas that
    Triton ships): the interpreter runs them on the CPU, but takes code the GPU compiler refuses
    (a global annotated `: tl.constexpr` instead of made with tl.constexpr(...))."""
    triton = pytest.importorskip("triton")
    if os.environ.get("TRITON_INTERPRET") == "1":
        pytest.skip("the interpreter's process: the kernels are not JIT functions here")
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from geomoe_kernels.triton import gating

    types = dict(
        Ids="*i64", Counts="*i64", T="i32", E="i32", stride_l="i32", inv_T="fp32",
        Hist="*i64", Load="*i64", Offsets="*i64", Ticket="*i32", T_f="fp32", aux_coef="fp32", stride_k="i32",
    )  # the rest *fp32  # fmt: skip
    sizes = dict(TOP_K=3, KP=4, SOFTMAX=False, RENORM=True, EP=32, BT=gating.tokens_per_program(23))
    for fn, flags in (
        (gating._gating_kernel, dict(HAS_BIAS=True)),
        (gating._gating_backward_kernel, dict(HAS_GW=True, HAS_GP=True, GP_FROM_AUX=False)),
        (gating._gating_backward_kernel, dict(HAS_GW=True, HAS_GP=True, GP_FROM_AUX=True)),
        (gating._gate_route_kernel, dict(HAS_BIAS=True, S=1, HAS_AUX=True, EAP=32, BB=128)),
    ):
        const = dict(sizes, **flags)
        signature = {n: "constexpr" if n in const else types.get(n, "*fp32") for n in fn.arg_names}
        where = {(fn.arg_names.index(n),): v for n, v in const.items()}
        cubin = triton.compile(ASTSource(fn=fn, signature=signature, constexprs=where), target=GPUTarget("cuda", 90, 32))
        assert cubin.asm["cubin"]


def test_no_tokens(backend):
    dev = backend.device
    w, ids, counts, p = topk_gating(torch.empty(0, 5, device=dev), None, 2, backend=backend.name)
    assert w.shape == (0, 2) and ids.shape == (0, 2)
    assert counts.tolist() == [0] * 5 and p.tolist() == [0.0] * 5


def test_wrong_dtype_device_and_choice():
    with pytest.raises(OpInputError, match=r"'logits' expected dtype float32/float64, got torch.float16"):
        topk_gating(torch.randn(3, 4).half(), None, 2, "sigmoid", True)
    with pytest.raises(OpInputError, match=r"'bias' expected a tensor on cpu .*got one on meta"):
        topk_gating(torch.randn(3, 4), torch.zeros(4, device="meta"), 2, "sigmoid", True)
    with pytest.raises(OpInputError, match="score_func"):
        topk_gating(torch.randn(3, 4), None, 2, "tanh")


@pytest.mark.skipif(torch.cuda.is_available(), reason="Triton runs CPU tensors only under the interpreter")
def test_triton_on_cpu_tensors_says_why():
    with pytest.raises(BackendUnavailable, match=r"topk_gating: backend 'triton' cannot run here"):
        topk_gating(torch.randn(3, 4), None, 2, backend="triton")
