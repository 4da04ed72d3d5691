"""MoEMLP's planned path (one autograd.Function over a cached launch plan, nn/_layer_plan.py) against
its path through the torch.library ops: the same bits for the output, aux, load and every gradient,
on every backend this process runs (the reference here; the Triton interpreter and the emulated CUDA
core in their own processes: tests/test_triton_interpreter.py, tests/test_cuda_emulated.py), in fp32
and in half precision under autocast; against the float64 loop; a plan made once per key; the
compile path still through the ops."""

import pytest
import torch

from geomoe_kernels import MoEMLP, _checks
from geomoe_kernels import backend as _backend
from geomoe_kernels.nn import _layer_plan
from tests.helpers import HALF, skip_unavailable

# GeoMoE's layer (sigmoid top-3 with the selection bias, GELU, one shared expert) and an LLM's
# (softmax top-k, SwiGLU, no shared expert, no biases), at tiny widths; and the routed scaling
GEOMOE = dict(num_experts=6, num_shared_experts=1, top_k=3)
LLM = dict(num_experts=10, num_shared_experts=0, top_k=8, score_func="softmax", activation="swiglu", bias=False, gate_bias=False)
SCALED = dict(num_experts=6, num_shared_experts=2, top_k=2, activation="silu", routed_scaling_factor=2.5)
# the shared experts as batched matmuls (their gate reads the tokens too: the token gradient then has
# four parts, whose order of addition the planned path keeps)
GATED = dict(num_experts=6, num_shared_experts=2, top_k=2, shared_gate=True)
# the options whose routing or experts the gating op and expert_mlp do not compute (issue 28 item 4):
# DeepSeek-V3's group-limited sigmoid top-k with routed scaling and a shared expert among the grouped
# ones (the routing as torch ops, the rest planned); and GPT-OSS's interleaved SwiGLU columns (fused
# in expert_mlp as swiglu_interleaved, its shared expert among the grouped ones) with softmax top-k
GROUPS = dict(
    num_experts=8, num_shared_experts=1, top_k=3, activation="swiglu", bias=False, gate_bias=False, n_group=4, topk_group=2,
    routed_scaling_factor=2.5,
)  # fmt: skip
INTERLEAVED = dict(
    num_experts=6, num_shared_experts=1, top_k=2, score_func="softmax", activation="swiglu", swiglu_layout="interleaved"
)
OPTIONS = {"geomoe": GEOMOE, "llm": LLM, "scaled": SCALED, "shared_gate": GATED, "groups": GROUPS, "interleaved": INTERLEAVED}


def _layer(options, dim=16, hidden=12, device="cpu"):
    m = MoEMLP(dim, hidden, **options)
    with torch.no_grad():
        for p in m.parameters():
            p.normal_(0, 0.3)
        m.expert_bias.normal_(0, 0.1)
    return m.to(device)


def _step(m, x, use_plan, dtype, grad_y):
    """y, aux, load and the gradients of sum(y * grad_y) + aux w.r.t. x and every parameter."""
    m.use_plan = use_plan
    xi = x.clone().requires_grad_(True)
    with torch.autocast(x.device.type, dtype=dtype, enabled=dtype in HALF):
        y, aux, load = skip_unavailable(m, xi)
    grads = torch.autograd.grad((y.float() * grad_y).sum() + aux, [xi, *m.parameters()], allow_unused=True)
    return [y, aux, load, *grads]


def _same_bits(a, b, aux_ulps=0, rounded=(), dtype=None, skip=()):
    """a (the ops path) and b (the planned path) bit for bit, except: with aux_ulps, the aux loss
    (index 1) within that many ulps (the fused gating kernel sums it over the experts in a fixed order
    of its own, torch in its own); at the indices `rounded`, b's value rounded to `dtype` (the grouped
    experts' weight gradients, which a planned path may get unrounded in the parameters' float32);
    at the indices `skip`, the dtype and shape only."""
    assert len(a) == len(b)
    for i, (u, v) in enumerate(zip(a, b)):
        assert (u is None) == (v is None), i
        if u is not None and i in skip:
            assert u.dtype == v.dtype and u.shape == v.shape, i
        elif u is not None:
            assert u.dtype == v.dtype and u.shape == v.shape, i
            if i == 1 and aux_ulps:
                assert torch.allclose(u, v, rtol=aux_ulps * torch.finfo(u.dtype).eps, atol=0), (i, u.item(), v.item())
                continue
            w = v.to(dtype).to(v.dtype) if i in rounded else v
            assert torch.equal(u, w), (i, (u.double() - w.double()).abs().max())


def _grouped_weight_grads(m):
    """Indices in _step's list of the gradients of the parameters the grouped GEMMs read."""
    grouped = {"w1", "b1", "w2", "b2"} | (
        {"shared_w1", "shared_b1", "shared_w2", "shared_b2"} if m._shared_in_experts() else set()
    )
    return {4 + i for i, (n, _) in enumerate(m.named_parameters()) if n in grouped}


def _router_in_function(m) -> bool:
    """Whether the planned path runs the layer's router inside its Function (float32 router)."""
    return m._gating_in_plan() and m._expert_gate() is None and m._router_in_plan(torch.float32, int(m._shared_in_experts()))


def _fused_gate_route() -> bool:
    """Whether the plans made run gating and routing as the fused pair (kernel_recipes.gate_route)."""
    return any(p.fused for p in _backend.PLANS.values())


@pytest.mark.parametrize("options", list(OPTIONS), ids=list(OPTIONS))
def test_planned_path_gives_the_ops_path_bits(backend, dtype, options):
    """fp32 parameters and tokens, or half precision under autocast over fp32 parameters (trained so:
    the planned path's weight gradients are those rounded to the half dtype by the ops path, before
    rounding);
    the backend by name, and for the CUDA core "auto" too (each piece where it runs: the fp32 or SwiGLU
    expert GEMMs on another backend beside the core's gating, routing and combine)."""
    torch.manual_seed(0)
    m = _layer(OPTIONS[options], device=backend.device)
    x = torch.randn(3, 7, 16, device=backend.device)
    grad_y = torch.randn(3, 7, 16, device=backend.device)
    for name in (backend.name, "auto") if backend.name == "cuda" else (backend.name,):
        m.backend = name
        try:
            ops = _step(m, x, False, dtype, grad_y)
        except pytest.skip.Exception:
            continue  # the named backend cannot run the case (the CUDA grouped GEMM takes no fp32)
        built = _layer_plan.plans_built
        _backend.PLANS.clear()
        planned = _step(m, x, True, dtype, grad_y)
        assert _layer_plan.plans_built == built + 1  # the plan path ran
        ulps = 4 if _fused_gate_route() else 0
        rounded = _grouped_weight_grads(m) if dtype in HALF else ()
        # in half precision with the router in the Function, the token gradient is rounded once, not
        # twice: test_the_router_in_the_function_rounds_the_token_gradient_once
        skip = (3,) if dtype in HALF and _router_in_function(m) else ()
        _same_bits(ops, planned, ulps, rounded, dtype, skip)
        _same_bits(ops, _step(m, x, True, dtype, grad_y), ulps, rounded, dtype, skip)  # and from the cached plan


@pytest.mark.parametrize("options", ["geomoe", "llm", "scaled"])
def test_the_router_in_the_function_rounds_the_token_gradient_once(backend, dtype, options, monkeypatch):
    """Under autocast the planned path runs the float32 router inside its Function (issue 28: no
    cast and add of the router's token gradient): the token gradient is the experts' part e (half)
    plus the router's r = d_logits @ W_r (float32) rounded once, round(e + r), where autograd (the
    ops path, and the plan with the router outside its Function: the test above) rounds r first,
    round(round(r) + e). e and d_logits are taken from the plan with the router outside; every
    other output and gradient is the same bits."""
    if dtype not in HALF:
        pytest.skip("float32 tokens: the two orders of the sum are the same bits (the test above)")
    torch.manual_seed(0)
    m = _layer(OPTIONS[options], device=backend.device)
    m.backend = backend.name
    assert _router_in_function(m)
    x = torch.randn(3, 7, 16, device=backend.device)
    grad_y = torch.randn(3, 7, 16, device=backend.device)
    seen = {}
    real_run = _layer_plan.run

    def run(options, logits, bias, tokens, *args, **kwargs):
        logits.register_hook(lambda g: seen.__setitem__("d_logits", g))
        tokens.register_hook(lambda g: seen.__setitem__("e", g))
        return real_run(options, logits, bias, tokens, *args, **kwargs)

    with monkeypatch.context() as mp:
        mp.setattr(MoEMLP, "_router_in_plan", lambda self, gate_dtype, S: False)
        mp.setattr(_layer_plan, "run", run)
        outside = _step(m, x, True, dtype, grad_y)
    inside = _step(m, x, True, dtype, grad_y)
    r = seen["d_logits"].mm(m.gate.weight.detach())
    want = (seen["e"].float() + r).to(dtype).float().view_as(x)  # x float32: its gradient the cast's
    assert seen["e"].dtype == dtype and r.dtype == torch.float32
    assert torch.equal(inside[3], want), (inside[3] - want).abs().max()
    assert not torch.equal(outside[3], want)  # the two roundings differ somewhere at these sizes
    _same_bits(outside, inside, skip=(3,))


@pytest.mark.parametrize("options", ["geomoe", "llm"])
def test_planned_path_in_float64_matches_the_published_loop(options):
    """Output, aux, load and every gradient within 1e-12 of the published loop (float64 throughout)."""
    from geomoe import load_original_state_dict
    from tests.oracles import OriginalMoE
    from tests.test_moe_mlp import _compare

    o = {"score_func": "sigmoid", "activation": "gelu", **OPTIONS[options]}
    o.pop("bias", None), o.pop("gate_bias", None)  # the published layer has biases
    E, S, k = o["num_experts"], o["num_shared_experts"], o["top_k"]
    orig = OriginalMoE(12, 10, E, S, k, o["score_func"], True, o["activation"]).double()
    ours = MoEMLP(12, 10, E, S, k, o["score_func"], True, o["activation"]).double()
    load_original_state_dict(ours, orig.state_dict(), strict=True)
    orig.bias.copy_(0.1 * torch.randn(E))
    ours.expert_bias.copy_(orig.bias)
    built = _layer_plan.plans_built
    load = _compare(orig, ours, torch.randn(2, 9, 12, dtype=torch.float64))
    assert _layer_plan.plans_built == built + 1 and int(load.sum()) == 18 * k


def test_experts_without_tokens_get_exact_zero_gradients():
    m = _layer(GEOMOE).double()
    with torch.no_grad():
        m.expert_bias.copy_(torch.tensor([9.0, 9.0, 9.0, -9.0, -9.0, -9.0], dtype=torch.float64))  # experts 3-5 get none
    x = torch.randn(5, 16, dtype=torch.float64, requires_grad=True)
    y, aux, load = m(x)
    (y.square().sum() + aux).backward()
    assert load.tolist() == [5, 5, 5, 0, 0, 0]
    for g in (m.w1.grad, m.b1.grad, m.w2.grad, m.b2.grad):
        assert torch.equal(g[3:], torch.zeros_like(g[3:])) and g[:3].abs().sum() > 0


def test_experts_without_tokens_get_exact_zero_gradients_on_each_backend(backend, dtype):
    """The same on the fused gating + routing and the weight pack (the Triton interpreter, the
    emulated core): experts 3-5 get no rows, their offsets span nothing, their gradients are exact
    zeros; the shared expert's are not."""
    m = _layer(GEOMOE, device=backend.device)
    m.backend = backend.name
    with torch.no_grad():
        m.expert_bias.copy_(torch.tensor([9.0, 9.0, 9.0, -9.0, -9.0, -9.0]))
    x = torch.randn(11, 16, device=backend.device)
    with torch.autocast(x.device.type, dtype=dtype, enabled=dtype in HALF):
        y, aux, load = skip_unavailable(m, x)
    (y.float().square().sum() + aux).backward()
    assert load.tolist() == [11, 11, 11, 0, 0, 0]
    for g in (m.w1.grad, m.b1.grad, m.w2.grad, m.b2.grad):
        assert g.dtype == torch.float32 and torch.equal(g[3:], torch.zeros_like(g[3:])) and g[:3].abs().sum() > 0
    assert m.shared_w1.grad.abs().sum() > 0 and m.gate.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("options", ["geomoe", "llm"])
def test_weight_gradients_reach_the_parameters_without_a_cast(backend, options):
    """Half precision under autocast over float32 parameters (docs/host_path.md, step 4): on a kernel
    backend (Triton's wgrad writes any dtype; the CUDA core's float32 sums are already the
    parameters' dtype), the planned backward casts no weight
    gradient, neither inside expert_mlp's backward (to the compute dtype) nor through autograd (back
    to float32): the parameters' .grad come out of the kernels in float32, unrounded. The reference
    keeps its casts. Counted as aten._to_copy calls of a weight's or bias's shape during backward."""
    from torch.utils._python_dispatch import TorchDispatchMode

    dtype = torch.float16
    torch.manual_seed(0)
    m = _layer(OPTIONS[options], device=backend.device)
    m.backend = backend.name
    shapes = {tuple(p.shape) for n, p in m.named_parameters() if n in ("w1", "b1", "w2", "b2")}
    S = m.num_shared_experts if m._shared_in_experts() else 0
    shapes |= {(s[0] + S,) + s[1:] for s in shapes}  # the stacked routed + shared experts

    class Casts(TorchDispatchMode):
        found = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if func is torch.ops.aten._to_copy.default and tuple(out.shape) in shapes:
                Casts.found += 1
            return out

    x = torch.randn(3, 7, 16, device=backend.device)
    with torch.autocast(x.device.type, dtype=dtype):
        y, aux, _ = skip_unavailable(m, x)
    with Casts():
        (y.float().square().sum() + aux).backward()
    writes_in_place = backend.name != "torch"  # the CUDA core's float32 sums need no conversion either
    assert (Casts.found == 0) == writes_in_place, Casts.found
    assert all(p.grad.dtype == torch.float32 for p in m.parameters() if p.grad is not None)


def test_a_plan_is_made_once_per_key_and_a_new_shape_makes_another():
    m = _layer(GEOMOE)
    built = _layer_plan.plans_built
    for _ in range(3):
        m(torch.randn(5, 16))[0].sum().backward()
    assert _layer_plan.plans_built == built + 1
    m(torch.randn(6, 16))
    assert _layer_plan.plans_built == built + 2
    m(torch.randn(5, 16))  # the first shape again: its plan
    assert _layer_plan.plans_built == built + 2
    _backend.forget()  # a changed environment: the choices and the plans made from them go
    m(torch.randn(5, 16))
    assert _layer_plan.plans_built == built + 3


def test_planned_step_calls_no_custom_op_and_the_ops_path_six():
    from benchmarks import host_overhead as H

    m = _layer(GEOMOE)
    x = torch.randn(5, 16, requires_grad=True)

    def step():
        m.zero_grad(set_to_none=True)
        x.grad = None
        y, aux, _ = m(x)
        (y.sum() + aux).backward()

    with _checks.value_checks(False):  # as on a GPU: no value checks
        m.use_plan = False
        ops = H.count(step)
        m.use_plan = True
        step()  # the plan made
        planned = H.count(step)
    # gating, route, expert_mlp (the combine in it), its backward, the row-gradient combine, gating's
    # backward: unpermute's own call and its backward's permute and weight gradient are gone (step 5)
    assert ops["custom_op_calls"] == 6 and planned["custom_op_calls"] == 0
    # the same kernels less two, the shared expert's ids (arange) and weights (a fill of ones) that the
    # plan keeps: only the dispatch is gone. (Allocations and syncs are not compared: above autograd
    # the reference's argsort is seen as the sort it is, one allocation more, and its offsets.tolist()
    # as tolist and the item calls inside it.)
    assert planned["launches"] == ops["launches"] - 2


def test_value_checks_still_run_on_the_planned_path():
    m = _layer(GEOMOE)
    with torch.no_grad():
        m.gate.weight[0, 0] = float("nan")
    with pytest.raises(ValueError, match="topk_gating: argument 'logits' expected finite values"):
        m(torch.randn(4, 16))


def test_the_compiled_layer_goes_through_the_ops(monkeypatch):
    """torch.compile traces the per-op path (the ops are what it sees), with the plan path's bits."""
    m = _layer(GEOMOE)
    x = torch.randn(6, 16)
    seen = []
    real = MoEMLP._forward_ops

    def forward_ops(self, x):
        seen.append(torch.compiler.is_compiling())
        return real(self, x)

    monkeypatch.setattr(MoEMLP, "_forward_ops", forward_ops)
    got = torch.compile(m, backend="eager", fullgraph=True)(x)
    monkeypatch.undo()
    assert seen and all(seen)
    _same_bits(list(got), list(m(x)))


@pytest.mark.parametrize("use_plan", [True, False])
def test_shared_experts_run_inside_the_grouped_launches(use_plan):
    """Issue 28 step 2: the layer's shared experts are S more experts of expert_mlp (every token at
    weight 1), not batched matmuls of their own, on both paths; their values and gradients are the
    float64 sum of plain MLPs."""
    from benchmarks import host_overhead as H

    m = _layer(SCALED).double()  # two shared experts
    m.use_plan = use_plan
    x = torch.randn(7, 16, dtype=torch.float64, requires_grad=True)

    def step():
        y, aux, _ = m(x)
        (y.square().sum() + aux).backward()
        return y

    r = H.count(step)
    assert not {"bmm", "baddbmm"} & set(r["torch_ops"]), r["torch_ops"]  # the shared path's matmuls
    # the shared part against plain torch: y minus the routed experts (the layer without shared ones)
    routed = MoEMLP(16, 12, **dict(SCALED, num_shared_experts=0)).double()
    routed.load_state_dict({k: v for k, v in m.state_dict().items() if not k.startswith("shared")})
    m.zero_grad(set_to_none=True)
    y = step()
    want = routed(x.detach())[0]
    for s in range(2):
        h = torch.nn.functional.silu(x.detach() @ m.shared_w1[s] + m.shared_b1[s])
        want = want + h @ m.shared_w2[s] + m.shared_b2[s]
    torch.testing.assert_close(y, want, rtol=0, atol=1e-12)
    w1 = m.shared_w1.detach().requires_grad_(True)
    h = torch.nn.functional.silu(x.detach() @ w1 + m.shared_b1.detach()[:, None, :])
    # d/dw1 of sum(y^2) through the shared experts only: 2 y as the upstream gradient
    (g,) = torch.autograd.grad(((h @ m.shared_w2.detach()) * (2 * y.detach())).sum(), w1)
    torch.testing.assert_close(m.shared_w1.grad, g, rtol=0, atol=1e-10)


@pytest.mark.parametrize("options", ["geomoe", "llm"])
def test_create_graph_gives_first_order_gradients_and_refuses_a_second(options):
    """backward(create_graph=True): the planned path's first-order gradients are the op path's bits
    (its backward once ran the reference's out= matmuls under grad mode and failed), and a derivative
    of them is an error naming the layer, never a silent partial second derivative (which leaving
    the layer's part out gave)."""
    torch.manual_seed(0)
    m, x = _layer(OPTIONS[options]), torch.randn(10, 16)
    firsts = []
    for use_plan in (False, True):
        m.use_plan = use_plan
        xi = x.clone().requires_grad_(True)
        y, aux, _ = m(xi)
        firsts.append(torch.autograd.grad((y * y).sum() + aux, [xi, m.gate.weight, m.w1], create_graph=True))
    _same_bits(firsts[0], firsts[1])
    with pytest.raises(RuntimeError, match="MoEMLP has no second derivative"):
        torch.autograd.grad(firsts[1][0].sum(), [m.gate.weight])


def test_shared_experts_join_the_grouped_launches_only_where_routing_takes_them():
    """256 routed + 1 shared experts would push Triton's routing (256 at most) past its limit: such a
    layer keeps the batched shared path (it ran before the shared experts joined the launches)."""
    assert MoEMLP(16, 12, num_experts=23, num_shared_experts=1)._shared_in_experts()
    assert not MoEMLP(16, 12, num_experts=256, num_shared_experts=1)._shared_in_experts()
    assert MoEMLP(16, 12, num_experts=300, num_shared_experts=2)._shared_in_experts()  # CUDA's 4096 either way


def _function_node(y, name):
    """The first node of y's graph whose type is named `name`."""
    todo, seen = [y.grad_fn], set()
    while todo:
        node = todo.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        if type(node).__name__ == name:
            return node
        todo += [f for f, _ in node.next_functions]
    raise AssertionError(f"no {name} in the graph")


@pytest.mark.parametrize("options", ["geomoe", "llm"])
def test_the_expert_outputs_are_not_kept_for_backward(options):
    """Issue 28 step 5: the routing weights' gradient comes from the down-projection's dgrad
    (<dy W2^T, act(pre)> + <dy, b2>), so the layer keeps no [T * (k + S), d] expert outputs: what
    it keeps per routed row is the pre-activation and the maps. Its float64 gradients (the routing
    weights' through the logits included) are test_planned_path_in_float64_matches_the_published_loop's."""
    m = _layer(OPTIONS[options])
    T, dim = 5, 16
    rows = T * (m.top_k + (m.num_shared_experts if m._shared_in_experts() else 0))
    x = torch.randn(T, dim, requires_grad=True)
    y, _, _ = m(x)
    node = _function_node(y, "MoELayerFunctionBackward")
    shapes = [tuple(t.shape) for t in node.saved_tensors if t is not None]
    assert (rows, dim) not in shapes, shapes
    assert (rows, m.w1.shape[-1]) in shapes  # the pre-activation [rows, N1] is what it keeps instead
