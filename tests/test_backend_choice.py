"""The per-call trims of the eager hot path (issue 28): the backend choice and its self-check verdict
are made once per (op, backend, device, argument signature) and cached; no op call reads
os.environ; the value-check setting is read at import and changed at run time by its setter."""

import os

import pytest
import torch

from geomoe_kernels import _checks, backend, route
from geomoe_kernels._checks import OpInputError


class _CountingEnviron(dict):
    def __init__(self, real):
        super().__init__(real)
        self.reads = 0

    def get(self, *a):
        self.reads += 1
        return super().get(*a)

    def __getitem__(self, k):
        self.reads += 1
        return super().__getitem__(k)

    def __contains__(self, k):
        self.reads += 1
        return super().__contains__(k)


def _ids():
    return torch.tensor([[0, 2], [1, 2], [2, 0]])


def test_no_op_call_reads_the_environment(monkeypatch):
    ids = _ids()
    route(ids, 3)  # the first call chooses (and may read the environment)
    env = _CountingEnviron(os.environ)
    monkeypatch.setattr(os, "environ", env)
    for _ in range(3):
        route(ids, 3)
    assert env.reads == 0


def test_the_choice_is_made_once_per_signature(monkeypatch):
    calls = []
    real = backend._why_not
    monkeypatch.setattr(backend, "_why_not", lambda *a: calls.append(a[:2]) or real(*a))
    ids = _ids()
    for _ in range(3):
        route(ids, 3)
    first = len(calls)
    assert first > 0
    route(ids, 4)  # another non-tensor argument: chosen again
    route(ids[:2], 3)  # another shape: chosen again
    assert len(calls) == 3 * first
    for _ in range(3):
        route(ids, 4)
    assert len(calls) == 3 * first


def test_a_swapped_implementation_and_forget_take_effect_at_once(monkeypatch):
    ids = _ids()
    want = route(ids, 3)
    swapped = []
    entry = backend._REGISTRY["route"]["torch"]
    monkeypatch.setitem(backend._REGISTRY["route"], "torch", (lambda *a: swapped.append(1) or entry[0](*a), None))
    route(ids, 3)
    assert swapped == [1]  # not the cached implementation it replaced
    monkeypatch.setitem(backend._REGISTRY["route"], "torch", entry)
    # the environment is read when a choice is made: after forget() the new value counts
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    backend.forget()
    assert (
        backend.select("route", "auto", ids.device, {"expert_ids": ids, "num_experts": 3})
        is backend._REGISTRY["route"]["triton"][0]
    )
    monkeypatch.delenv("TRITON_INTERPRET")
    backend.forget()
    for got, exp in zip(route(ids, 3), want):
        assert torch.equal(got, exp)


def test_a_choice_made_while_a_verdict_is_pending_is_not_kept(monkeypatch):
    from geomoe_kernels import self_check

    ids = _ids()
    args = {"expert_ids": ids, "num_experts": 3}
    monkeypatch.setattr(self_check, "_running", True)
    backend.select("route", "auto", ids.device, args)
    assert not backend._CHOICES
    monkeypatch.setattr(self_check, "_running", False)
    backend.select("route", "auto", ids.device, args)
    assert len(backend._CHOICES) == 1


def test_value_checks_are_set_at_run_time_not_per_call(monkeypatch):
    bad = torch.tensor([[0, 5]])
    with pytest.raises(OpInputError, match="expert_ids"):
        route(bad, 3)  # CPU tensors: checked by default
    monkeypatch.setenv("GEOMOE_CHECK_VALUES", "0")  # read at import, not on every call ...
    with pytest.raises(OpInputError, match="expert_ids"):
        route(bad, 3)
    backend.forget()  # ... and again by forget()
    assert not _checks.value_checks_enabled(bad)
    monkeypatch.delenv("GEOMOE_CHECK_VALUES")
    backend.forget()
    with _checks.value_checks(False):
        assert not _checks.value_checks_enabled(bad)
        with _checks.value_checks(True):
            assert _checks.value_checks_enabled(bad.to("meta"))
    assert _checks.value_checks_enabled(bad) and not _checks.value_checks_enabled(bad.to("meta"))
    with pytest.raises(ValueError, match="argument 'on'"):
        _checks.set_value_checks("no")


def test_an_op_runs_its_implementation_with_autocast_off_by_the_flag_alone(monkeypatch):
    ids = _ids()
    entry = backend._REGISTRY["route"]["torch"]
    seen = []

    def impl(*a):
        seen.append(torch.is_autocast_enabled("cpu"))
        if len(seen) == 2:
            raise RuntimeError("boom")
        return entry[0](*a)

    monkeypatch.setitem(backend._REGISTRY["route"], "torch", (impl, None))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        monkeypatch.setattr(torch, "autocast", None)  # the context manager costs host time: not entered per call
        route(ids, 3)
        with pytest.raises(RuntimeError, match="boom"):
            route(ids, 3)
        assert torch.is_autocast_enabled("cpu")  # back on, after an error too
        monkeypatch.undo()
    assert seen == [False, False] and not torch.is_autocast_enabled("cpu")


def test_an_output_without_gradient_reaches_backward_as_none_not_zeros(monkeypatch):
    """No zero fill per unused output (gating's ids and counts, the saved pre-activation)."""
    from geomoe_kernels import grouped_mm, topk_gating
    from geomoe_kernels.ops.grouped_gemm import grouped_mm_op

    seen = []
    entry = backend._REGISTRY["topk_gating_backward"]["torch"]
    monkeypatch.setitem(backend._REGISTRY["topk_gating_backward"], "torch", (lambda *a: seen.append(a[:2]) or entry[0](*a), None))
    logits = torch.randn(5, 4, dtype=torch.float64, requires_grad=True)
    w, ids, counts, prob_mean = topk_gating(logits, None, 2, "softmax")
    (g,) = torch.autograd.grad(w.sum(), logits, retain_graph=True)
    [(grad_weights, grad_prob_mean)] = seen
    assert grad_weights is not None and grad_prob_mean is None
    # the same gradient as with an explicit zero for prob_mean
    (want,) = torch.autograd.grad(w.sum() + 0 * prob_mean.sum(), logits)
    torch.testing.assert_close(g, want)
    # only the pre-activation used: no gradient flows back, and no error
    x = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    wt = torch.randn(2, 3, 5, dtype=torch.float64, requires_grad=True)
    out, pre = grouped_mm_op(x, wt, torch.tensor([0, 1, 4]), None, "gelu")
    pre.sum().backward()
    assert x.grad is None and wt.grad is None
    y = grouped_mm(x, wt, torch.tensor([0, 1, 4]), None, "gelu")
    y.sum().backward()
    assert x.grad is not None and wt.grad is not None
    # and an op whose only output then gets no gradient (x from permute, only pre used): no error
    from geomoe_kernels import permute

    x.grad = None
    r2f, f2r, offsets = route(torch.tensor([[0], [1], [1], [1]]), 2)
    rows = permute(x, r2f, f2r, 1)
    _, pre = grouped_mm_op(rows, wt, offsets, None, "gelu")
    pre.sum().backward()
    assert x.grad is None


@pytest.mark.parametrize("name", ["GEOMOE_CHECK_VALUES", "GEOMOE_SELF_CHECK"])
def test_switch_variables_take_the_usual_words_or_refuse(monkeypatch, name):
    """'yes' meant the default (GEOMOE_CHECK_VALUES) or 'on everywhere' for any word but '0'
    (GEOMOE_SELF_CHECK, so 'off' turned it on): the usual words now, anything else an error naming it."""
    from geomoe_kernels._checks import env_switch

    for raw, want in (("Yes", True), ("on", True), ("1", True), ("off", False), ("FALSE", False), ("0", False), ("", None)):
        monkeypatch.setenv(name, raw)
        assert env_switch(name) is want, raw
    monkeypatch.setenv(name, "maybe")
    with pytest.raises(ValueError, match=f"environment variable {name} expected 1 .* got 'maybe'"):
        env_switch(name)
    if name == "GEOMOE_SELF_CHECK":  # 'off' turned the check on for every device before
        from geomoe_kernels import self_check

        monkeypatch.setenv(name, "off")
        assert not self_check.enabled(torch.device("cpu"))
