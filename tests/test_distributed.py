"""Multi-process tests on gloo (CPU): expert parallelism equals one process; data-parallel pretraining
under torchrun; the loads summed over ranks drive the same bias update everywhere."""
import json
import os
import subprocess
import sys

import pytest
import torch
import torch.multiprocessing as mp

from dist_worker import ep_layer
from geomoe_kernels import MoEMLP

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _single_process_reference():
    torch.manual_seed(0)
    moe = MoEMLP(16, 12, 7, 1, 3).double()
    with torch.no_grad():
        moe.expert_bias.copy_(torch.tensor([0.0, 0.3, 0, 0, 0, -0.2, 0], dtype=torch.float64))
        for p in (moe.b1, moe.b2):
            p.normal_()
    x = torch.randn(40, 16, dtype=torch.float64, requires_grad=True)
    g = torch.randn(40, 16, dtype=torch.float64)
    y, aux, load = moe(x)
    (y * g).sum().backward()
    return moe, x, y, load


@pytest.mark.parametrize("empty_rank", [False, True])
def test_expert_parallel_equals_one_process(tmp_path, monkeypatch, empty_rank):
    if empty_rank:
        monkeypatch.setenv("GEOMOE_TEST_EMPTY_RANK", "1")
    mp.spawn(ep_layer, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2)
    moe, x, y, load = _single_process_reference()
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    assert ranks[0]["range"] == (0, 3) and ranks[1]["range"] == (3, 7)  # 7 experts: 3 + 4
    torch.testing.assert_close(torch.cat([r["y"] for r in ranks]), y.detach(), rtol=0, atol=1e-13)
    torch.testing.assert_close(torch.cat([r["x_grad"] for r in ranks]), x.grad, rtol=0, atol=1e-13)
    assert torch.equal(ranks[0]["load"] + ranks[1]["load"], load)
    for name in ("w1", "b1", "w2", "b2"):  # expert gradients arrive divided by the world size
        got = torch.cat([r["grads"][name] for r in ranks]) * 2
        torch.testing.assert_close(got, getattr(moe, name).grad, rtol=0, atol=1e-12)
    for name in ("gate.weight", "shared_w1", "shared_b2"):  # replicated: the sum over ranks
        got = ranks[0]["grads"][name] + ranks[1]["grads"][name]
        torch.testing.assert_close(got, dict(moe.named_parameters())[name].grad, rtol=0, atol=1e-12)
