"""Self-verification on first use (geomoe_kernels.self_check): a kernel made wrong for the test is
caught, cached, skipped by auto with one warning, re-checked after a library upgrade; the cache
survives a corrupt file and concurrent writers; GEOMOE_SELF_CHECK=0 turns it off."""

import json
import subprocess
import sys
import warnings

import pytest
import torch

import geomoe_kernels
from geomoe_kernels import backend as B
from geomoe_kernels import permute, route, self_check


@pytest.fixture
def wrong_triton_permute(monkeypatch, tmp_path):
    """ "triton" permute 1 % off on CPU tensors (its backward stands in by the reference: no Triton
    runs), self-check on for the CPU, a fresh cache."""
    right = B._REGISTRY["permute"]["torch"][0]
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setenv("GEOMOE_SELF_CHECK", "1")
    monkeypatch.setenv("GEOMOE_CACHE_DIR", str(tmp_path))
    monkeypatch.setitem(B._REGISTRY["permute"], "triton", (lambda x, *rest: right(x, *rest) * 1.01, None))
    monkeypatch.setitem(B._REGISTRY["unpermute"], "triton", B._REGISTRY["unpermute"]["torch"])
    self_check.forget()
    yield tmp_path / "self_check.json"
    self_check.forget()


def _call(backend="auto"):
    ids = torch.tensor([[0, 2], [1, 2], [2, 0]])
    r2f, f2r, _ = route(ids, 3, backend="torch")
    x = torch.arange(12.0).reshape(3, 4)
    return x, permute(x, r2f, f2r, 2, backend=backend), permute(x, r2f, f2r, 2, backend="torch")


def test_a_wrong_kernel_is_caught_cached_and_skipped_with_one_warning(wrong_triton_permute):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(3):
            _, got, want = _call()
            assert torch.equal(got, want)  # auto ran the reference instead
    msgs = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
    assert len(msgs) == 1 and "permute: backend 'triton' failed its self-check" in msgs[0] and "float32" in msgs[0]
    cache = json.load(open(wrong_triton_permute))
    [(k, v)] = cache.items()
    assert v["status"] == "failed" and "|permute|triton|float32" in k and "max error" in v["detail"]
    self_check.forget()  # a new process reads the verdict from the file: no second check
    calls = []
    real_verify = geomoe_kernels.verify.verify
    geomoe_kernels.verify.verify = lambda *a, **kw: calls.append(a) or real_verify(*a, **kw)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            _call()
    finally:
        geomoe_kernels.verify.verify = real_verify
    assert calls == []


def test_asked_for_by_name_a_failed_kernel_runs_and_warns(wrong_triton_permute):
    with pytest.warns(RuntimeWarning, match="failed its self-check"):
        _, got, want = _call(backend="triton")
    torch.testing.assert_close(got, want * 1.01)


def test_a_library_upgrade_checks_again(wrong_triton_permute, monkeypatch):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _call()
    monkeypatch.setitem(B._REGISTRY["permute"], "triton", B._REGISTRY["permute"]["torch"])  # the fixed kernel
    monkeypatch.setattr(geomoe_kernels._version, "__version__", geomoe_kernels.__version__ + "+fixed")
    self_check._device_id_cached.cache_clear()
    self_check.forget()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _call()
    statuses = sorted(v["status"] for v in json.load(open(wrong_triton_permute)).values())
    assert statuses == ["failed", "verified"]
    self_check._device_id_cached.cache_clear()


def test_off_switch_runs_the_kernel_unchecked(wrong_triton_permute, monkeypatch):
    monkeypatch.setenv("GEOMOE_SELF_CHECK", "0")
    _, got, want = _call()
    torch.testing.assert_close(got, want * 1.01)
    assert not wrong_triton_permute.exists()


def test_a_corrupt_cache_is_checked_again_and_rewritten(wrong_triton_permute):
    wrong_triton_permute.write_text("{not json")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _call()
    assert [v["status"] for v in json.load(open(wrong_triton_permute)).values()] == ["failed"]


def test_concurrent_writers_keep_every_verdict(tmp_path):
    code = (
        "import sys; from geomoe_kernels import self_check as s\n"
        "for i in range(25): s._store(f'{sys.argv[1]}-{i}', {'status': 'verified', 'detail': ''})"
    )
    env = {**__import__("os").environ, "GEOMOE_CACHE_DIR": str(tmp_path)}
    procs = [subprocess.Popen([sys.executable, "-c", code, str(n)], env=env) for n in range(4)]
    assert all(p.wait(timeout=120) == 0 for p in procs)
    assert len(json.load(open(tmp_path / "self_check.json"))) == 100
