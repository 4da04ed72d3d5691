import copy

import pytest
import torch

from geomoe import load_original_state_dict
from geomoe_kernels import MoEMLP
from tests.helpers import HALF, TOL, assert_close, assert_within_twice_reference_error, skip_unavailable
from tests.oracles import OriginalMoE


def _pair(dim=12, hidden=10, E=6, S=1, k=3, score_func="sigmoid", renormalize=True, act="gelu"):
    orig = OriginalMoE(dim, hidden, E, S, k, score_func, renormalize, act).double()
    ours = MoEMLP(dim, hidden, E, S, k, score_func, renormalize, act).double()
    res = load_original_state_dict(ours, orig.state_dict(), strict=True)
    assert res.missing == [] and res.unexpected == []
    return orig, ours


def _compare(orig, ours, x, atol=1e-12):
    xa = x.clone().requires_grad_(True)
    xb = x.clone().requires_grad_(True)
    ya, aux_a, load_a = orig(xa)
    yb, aux_b, load_b = ours(xb)
    assert torch.equal(load_a, load_b)
    torch.testing.assert_close(yb, ya, rtol=0, atol=atol)
    torch.testing.assert_close(aux_b, aux_a, rtol=0, atol=atol)
    g = torch.randn_like(ya)
    (ya * g).sum().add(aux_a).backward()
    (yb * g).sum().add(aux_b).backward()
    torch.testing.assert_close(xb.grad, xa.grad, rtol=0, atol=atol)
    # every parameter gradient, through the original layout
    from geomoe.original import key_map

    grads = {n: p.grad for n, p in ours.named_parameters()}
    for orig_key, (our_key, idx, transposed) in key_map(ours).items():
        p = dict(orig.named_parameters()).get(orig_key)
        if p is None:
            continue  # the bias buffer
        g_ours = grads[our_key] if idx is None else grads[our_key][idx]
        g_ours = g_ours.t() if transposed else g_ours
        want = p.grad if p.grad is not None else torch.zeros_like(p)
        torch.testing.assert_close(g_ours, want, rtol=0, atol=atol, msg=lambda m: f"{orig_key}: {m}")
    return load_b


@pytest.mark.parametrize("k", [1, 2, 3])
@pytest.mark.parametrize("S", [0, 1])
def test_matches_published_loop(k, S):
    orig, ours = _pair(S=S, k=k)
    orig.bias.copy_(0.1 * torch.randn(6))
    ours.expert_bias.copy_(orig.bias)
    _compare(orig, ours, torch.randn(2, 19, 12, dtype=torch.float64))


@pytest.mark.parametrize("T", [1, 100, 511, 600])
def test_odd_sizes(T):
    orig, ours = _pair(dim=8, hidden=6, E=5, k=3)
    _compare(orig, ours, torch.randn(T, 8, dtype=torch.float64))


@pytest.mark.parametrize("act", ["silu", "swiglu"])
@pytest.mark.parametrize("score_func,renormalize", [("softmax", False), ("softmax", True), ("sigmoid", False)])
def test_variants(act, score_func, renormalize):
    orig, ours = _pair(act=act, score_func=score_func, renormalize=renormalize, k=2)
    _compare(orig, ours, torch.randn(23, 12, dtype=torch.float64))


def test_all_tokens_to_one_expert_and_empty_experts():
    orig, ours = _pair(E=6, k=1)
    ours.expert_bias.copy_(torch.tensor([0, 0, 0, 0, 50.0, 0]))
    orig.bias.copy_(ours.expert_bias)
    load = _compare(orig, ours, torch.randn(40, 12, dtype=torch.float64))
    assert load.tolist() == [0, 0, 0, 0, 40, 0]
    for name in ("w1", "b1", "w2", "b2"):
        grad = getattr(ours, name).grad
        for e in (0, 1, 2, 3, 5):
            assert torch.equal(grad[e], torch.zeros_like(grad[e])), name


def test_non_contiguous_input():
    orig, ours = _pair()
    x = torch.randn(12, 30, dtype=torch.float64).t()  # [30, 12], strides (1, 30)
    assert not x.is_contiguous()
    _compare(orig, ours, x)


def test_bitwise_repeatable():
    m = MoEMLP(32, 24, 7, 1, 3)
    x = torch.randn(200, 32, requires_grad=True)
    runs = []
    for _ in range(3):
        m.zero_grad()
        x.grad = None
        y, aux, load = m(x)
        (y.square().sum() + aux).backward()
        runs.append((y.detach(), x.grad.clone(), m.w1.grad.clone(), m.gate.weight.grad.clone()))
    for r in runs[1:]:
        assert all(torch.equal(a, b) for a, b in zip(runs[0], r))


def test_shapes_dtypes_and_defaults():
    m = MoEMLP(768)
    assert (m.num_experts, m.num_shared_experts, m.top_k, m.hidden_dim, m.score_func) == (23, 1, 3, 576, "sigmoid")
    n_expert = sum(p.numel() for name, p in m.named_parameters() if name in ("w1", "b1", "w2", "b2")) // 23
    assert n_expert == 886_080
    y, aux, load = MoEMLP(16, num_experts=4, top_k=2)(torch.randn(3, 5, 16))
    assert y.shape == (3, 5, 16) and aux.dim() == 0 and load.dtype == torch.int64 and int(load.sum()) == 30


def test_update_bias_rule():
    m = MoEMLP(8, num_experts=4, top_k=1)
    m.update_bias(torch.tensor([1, 5, 3, 3]))
    torch.testing.assert_close(m.expert_bias, torch.tensor([1e-3, -1e-3, 0.0, 0.0]))
    m.update_bias(torch.tensor([1, 5, 3, 3]), rate=0.5)
    torch.testing.assert_close(m.expert_bias, torch.tensor([0.501, -0.501, 0.0, 0.0]))


@pytest.mark.parametrize(
    "load, message",
    [
        ([1.0, float("nan"), 3.0, 3.0], r"argument 'load' expected finite values, got load\[1\] = nan$"),
        (
            [float("inf"), 5.0, 3.0, float("-inf")],
            r"argument 'load' expected finite values, got load\[0\] = inf, load\[3\] = -inf$",
        ),
        ([1, 5, 3], r"argument 'load' expected shape \[4\] \(one value per expert\), got shape \[3\]"),
        ([4], r"argument 'load' expected shape \[4\] \(one value per expert\), got shape \[1\]"),  # broadcast before
        ([[1, 5, 3, 3]], r"argument 'load' expected shape \[4\] \(one value per expert\), got shape \[1, 4\]"),
    ],
)
def test_update_bias_bad_load_is_an_error_and_moves_no_bias(load, message):
    """A NaN load made sign(mean - load) zero for every expert (the biases silently unchanged); a load
    of the wrong length broadcast or failed inside the update."""
    m = MoEMLP(8, num_experts=4, top_k=1)
    m.expert_bias.copy_(torch.tensor([0.1, -0.2, 0.3, 0.0]))
    with pytest.raises(ValueError, match=r"^MoEMLP.update_bias: " + message):
        m.update_bias(torch.tensor(load))
    assert m.expert_bias.tolist() == pytest.approx([0.1, -0.2, 0.3, 0.0])
    with pytest.raises(ValueError, match=r"argument 'rate' expected a finite number >= 0, got nan"):
        m.update_bias(torch.tensor([1, 5, 3, 3]), rate=float("nan"))


def test_update_bias_reads_no_values_of_integer_counts(monkeypatch):
    """The counts forward returns cannot be NaN: they are not read (no host sync on a GPU); a float
    load is."""
    m = MoEMLP(8, num_experts=4, top_k=1)
    load = m(torch.randn(6, 8))[2]
    calls = []
    isfinite = torch.isfinite
    monkeypatch.setattr(torch, "isfinite", lambda t: calls.append(t.dtype) or isfinite(t))
    m.update_bias(load)
    assert calls == []
    m.update_bias(torch.tensor([1.0, 5.0, 3.0, 3.0]))
    assert calls == [torch.float32]


@pytest.mark.parametrize("kw", [{}, dict(activation="swiglu", swiglu_layout="interleaved")], ids=["gelu", "interleaved"])
def test_torch_compile_fullgraph_forward_backward(kw):
    m = MoEMLP(16, 12, 5, 1, 2, **kw)
    x = torch.randn(33, 16, requires_grad=True)
    compiled = torch.compile(m, fullgraph=True, backend="aot_eager")
    y, aux, load = compiled(x)
    (y.sum() + aux).backward()
    g_compiled = x.grad.clone()
    x.grad = None
    y2, aux2, load2 = m(x)
    (y2.sum() + aux2).backward()
    torch.testing.assert_close(y, y2)
    torch.testing.assert_close(g_compiled, x.grad)
    assert torch.equal(load, load2)


def test_two_shared_experts_add_up():
    m = MoEMLP(10, 8, 4, num_shared_experts=2, top_k=2).double()
    with torch.no_grad():
        for p in (m.shared_b1, m.shared_b2):
            p.normal_()
    x = torch.randn(9, 10, dtype=torch.float64)
    y, _, _ = m(x)
    routed = MoEMLP(10, 8, 4, num_shared_experts=0, top_k=2).double()
    routed.load_state_dict({k: v for k, v in m.state_dict().items() if not k.startswith("shared")})
    want = routed(x)[0]
    for s in range(2):
        h = torch.nn.functional.gelu(x @ m.shared_w1[s] + m.shared_b1[s])
        want = want + h @ m.shared_w2[s] + m.shared_b2[s]
    torch.testing.assert_close(y, want, rtol=0, atol=1e-12)


def test_keeps_no_more_for_backward_than_the_published_layer():
    """ISSUE goal: peak activation memory no higher than the published loop's. The routed experts keep
    only the tokens and the pre-activation [T*k, hidden] (the hidden rows are recomputed)."""
    from benchmarks.common import published_layer
    from tests.saved_bytes import bytes_saved_for_backward

    torch.manual_seed(0)
    m = MoEMLP(64, 48, 8, 1, 3)
    pub = published_layer(m)
    x = torch.randn(512, 64, requires_grad=True)
    ours = bytes_saved_for_backward(lambda: m(x), m.parameters())
    published = bytes_saved_for_backward(lambda: pub(x.view(1, 512, 64)), pub.parameters())
    assert ours <= published, (ours, published)


@pytest.mark.parametrize("activation", ["gelu", "swiglu"])
def test_layer_on_kernel_backend_equals_torch(kernel_backend, activation):
    torch.manual_seed(0)
    m = MoEMLP(16, 12, 6, 1, 2, activation=activation).to(kernel_backend.device)
    x = torch.randn(45, 16, device=kernel_backend.device, requires_grad=True)
    results = []
    for backend in (kernel_backend.name, "torch"):
        m.backend = backend
        m.zero_grad()
        x.grad = None
        y, aux, load = skip_unavailable(m, x)  # the CUDA grouped GEMM takes no float32
        (y.square().sum() + aux).backward()
        results.append(
            (y.detach(), aux.detach(), load, x.grad.clone(), m.w1.grad.clone(), m.b2.grad.clone(), m.gate.weight.grad.clone())
        )
    assert torch.equal(results[0][2], results[1][2])
    for a, b in zip(results[0], results[1]):
        torch.testing.assert_close(a.double(), b.double(), **TOL[torch.float32])


def _rounded_layer(dtype, activation, shared, k, dim=32, hidden=24, E=6, T=64, seed=0, layout="concat"):
    """A layer with non-zero biases, its parameters and tokens [T, dim] rounded to `dtype` (so runs
    in that dtype and in float64 see the same values and route the same way), and an upstream
    gradient for y."""
    torch.manual_seed(seed)
    m = MoEMLP(dim, hidden, E, shared, k, activation=activation, swiglu_layout=layout)
    with torch.no_grad():
        for name, p in m.named_parameters():
            if p.dim() < 2 and name != "gate.bias":
                p.normal_(0, 0.1)
            p.copy_(p.to(dtype).float())
    return m, torch.randn(T, dim).to(dtype).float(), torch.randn(T, dim, dtype=torch.float64)


def _layer_run(m, x, g, backend, dtype, device):
    """y, aux and the gradient of sum(y * g) + aux w.r.t. x and every parameter, by name (float64 on
    the CPU), and the load; in half precision under autocast over float32 parameters (as trained)."""
    layer = copy.deepcopy(m).to(device, torch.float64 if dtype == torch.float64 else torch.float32)
    layer.backend = backend
    xi = x.to(device, layer.w1.dtype).requires_grad_(True)
    with torch.autocast(device.type, dtype=dtype, enabled=dtype in HALF):
        y, aux, load = skip_unavailable(layer, xi)  # the CUDA grouped GEMM takes no float32
    names = [n for n, _ in layer.named_parameters()]
    grads = torch.autograd.grad((y.double() * g.to(device)).sum() + aux.double(), [xi, *layer.parameters()])
    out = {"y": y, "aux": aux, "x.grad": grads[0], **{f"{n}.grad": t for n, t in zip(names, grads[1:])}}
    return {n: t.detach().double().cpu() for n, t in out.items()}, load.cpu()


@pytest.mark.parametrize(
    "activation, shared, k, layout",
    [("silu", 2, 1, "concat"), ("gelu", 2, 1, "concat"), ("swiglu", 1, 2, "concat"), ("swiglu", 1, 2, "interleaved")],
)
def test_layer_every_output_and_gradient_within_twice_torch_error(kernel_backend, dtype, activation, shared, k, layout):
    """The layer on a kernel backend (the emulated CUDA core and the Triton interpreter in their own
    processes, the GPU where there is one): y, aux and the gradient of x and of every parameter
    against the layer in float64; in fp16 / bf16 at most twice the error of backend="torch" in the
    same dtype, in float32 within TOL. Two shared experts at top-1 with SiLU and with GELU among the
    cases (the shared path's gradients beside the routed experts'); SwiGLU in both column layouts."""
    m, x, g = _rounded_layer(dtype, activation, shared, k, layout=layout)
    ours, load = _layer_run(m, x, g, kernel_backend.name, dtype, kernel_backend.device)
    same_dtype, load_ref = _layer_run(m, x, g, "torch", dtype, kernel_backend.device)
    exact, load_exact = _layer_run(m, x, g, "torch", torch.float64, torch.device("cpu"))
    assert torch.equal(load, load_exact) and torch.equal(load_ref, load_exact)  # the same routing: comparable
    assert set(ours) == set(exact) and len(exact) == 3 + sum(1 for _ in m.parameters())
    for name in exact:
        try:
            if dtype in HALF:
                assert_within_twice_reference_error(ours[name], same_dtype[name], exact[name])
            else:
                assert_close(ours[name], exact[name], dtype, grad=name.endswith(".grad"))
        except AssertionError as e:
            raise AssertionError(f"{name}: {e}") from None


@pytest.mark.parametrize("dtype, activation", [(torch.float16, "silu"), (torch.bfloat16, "gelu")])
def test_shared_experts_gradients_within_twice_a_plain_torch_computation(dtype, activation):
    """The shared experts run as torch ops on every backend (batched over the S experts, summed, added
    in the combine), so the kernel backends' test cannot see an extra rounding there: their gradients
    from the whole layer against a plain per-expert torch computation in the same dtype
    (F.linear, activation, F.linear, summed), at most twice its error against float64: 2 shared
    experts at top-1, fp16 SiLU and bf16 GELU. (Summing dW2 over the tokens in fp16 gives 4x
    torch's error here, and fails.)"""
    from geomoe_kernels.reference import activations

    m, x, g = _rounded_layer(dtype, activation, 2, 1)
    names = ["shared_w1", "shared_b1", "shared_w2", "shared_b2"]
    ours, _ = _layer_run(m, x, g, "torch", dtype, torch.device("cpu"))
    exact, _ = _layer_run(m, x, g, "torch", torch.float64, torch.device("cpu"))

    def plain(run_dtype):
        p = {n: getattr(m, n).detach().to(torch.float64 if run_dtype == torch.float64 else torch.float32) for n in names}
        p = {n: t.requires_grad_(True) for n, t in p.items()}
        with torch.autocast("cpu", dtype=run_dtype, enabled=run_dtype in HALF):
            xi = x.to(p["shared_w1"].dtype)
            y = sum(
                torch.nn.functional.linear(
                    activations.apply(activation, torch.nn.functional.linear(xi, p["shared_w1"][s].t(), p["shared_b1"][s])),
                    p["shared_w2"][s].t(),
                    p["shared_b2"][s],
                )
                for s in range(2)
            )
        grads = torch.autograd.grad((y.double() * g).sum(), [p[n] for n in names])
        return {f"{n}.grad": t.double() for n, t in zip(names, grads)}

    plain_same, plain_exact = plain(dtype), plain(torch.float64)
    for name in plain_same:
        torch.testing.assert_close(plain_exact[name], exact[name], rtol=0, atol=1e-12)  # the same computation
        try:
            assert_within_twice_reference_error(ours[name], plain_same[name], exact[name])
        except AssertionError as e:
            raise AssertionError(f"{name}: {e}") from None


def test_interleaved_swiglu_is_fused_in_the_expert_op(monkeypatch):
    """MoEMLP(swiglu_layout="interleaved") runs its experts as one expert_mlp with the activation
    'swiglu_interleaved' (pre kept, the hidden rows recomputed in backward), not as two grouped_mm with
    the gate between them (the ops' path, what torch.compile traces; the planned path runs the same
    implementations with no expert gate); its shared expert joins the grouped launches, as with
    [gate | up]. The float64 values against the per-token loop: tests/test_moe_options.py."""
    from geomoe_kernels.nn import moe

    seen = []
    for name in ("expert_mlp", "grouped_mm"):
        real = getattr(moe, name)
        monkeypatch.setattr(
            moe, name, lambda *a, _f=real, _n=name, **kw: seen.append((_n, a[6] if _n == "expert_mlp" else a[4])) or _f(*a, **kw)
        )
    torch.manual_seed(0)
    m = MoEMLP(16, 12, 6, 1, 2, score_func="softmax", activation="swiglu", swiglu_layout="interleaved")
    assert m._expert_gate() is None and m._shared_in_experts()
    m.use_plan = False
    x = torch.randn(9, 16, requires_grad=True)
    y, aux, _ = m(x)
    (y.square().sum() + aux).backward()
    assert seen == [("expert_mlp", "swiglu_interleaved")], seen
