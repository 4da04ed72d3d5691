"""MoEBalancer (the aux losses and loads of every MoEMLP in a model, and the bias update after each
optimizer step, loads summed over the data-parallel ranks) and MoETensorMLP (the tensor-returning
adapter for timm-style MLP slots)."""

import pytest
import torch
from torch import nn

from geomoe_kernels.nn import MoEBalancer, MoEMLP, MoETensorMLP


class Blocks(nn.Module):
    """One layer used as the tuple-returning MoEMLP, one through the tensor adapter."""

    def __init__(self):
        super().__init__()
        self.a = MoEMLP(8, 6, num_experts=4, top_k=2)
        self.b = MoETensorMLP(MoEMLP(8, 6, num_experts=5, top_k=2))

    def forward(self, x):
        y, aux, load = self.a(x)
        return self.b(y), aux


def test_collects_every_layer_and_updates_after_the_step():
    model = Blocks()
    opt = torch.optim.SGD(model.parameters(), lr=0.0)  # the parameters stay: the same input routes the same way
    balancer = MoEBalancer(model, opt, rate=0.5)
    assert set(balancer.layers) == {"a", "b.moe"}
    x = torch.randn(2, 9, 8)
    load_b = torch.zeros(5, dtype=torch.float64)
    for _ in range(2):  # gradient accumulation: two forwards per step
        y, aux_a = model(x)
        assert isinstance(y, torch.Tensor) and y.shape == x.shape and model.b.load.shape == (5,)
        aux = balancer.aux_loss()
        torch.testing.assert_close(aux, aux_a + model.b.aux)
        load_b += model.b.load.double()
        (y.sum() + aux).backward()
    want = {"a": 3 * model.a(x)[2].double(), "b.moe": load_b}  # this third forward of `a` is recorded too
    before = {n: m.expert_bias.clone() for n, m in balancer.layers.items()}
    opt.step()
    for n, m in balancer.layers.items():
        torch.testing.assert_close(balancer.last_loads[n], want[n])
        torch.testing.assert_close(m.expert_bias, before[n] + 0.5 * torch.sign(want[n].mean() - want[n]).float())
    assert balancer.loads() == {} and float(balancer.aux_loss()) == 0.0
    balancer.remove()
    model(x)
    assert balancer.loads() == {}


def test_eval_forwards_are_not_recorded():
    model = Blocks().eval()
    balancer = MoEBalancer(model)
    model(torch.randn(5, 8))
    assert balancer.loads() == {}
    balancer.step()  # nothing to apply


def test_loads_summed_over_ranks(monkeypatch):
    """With torch.distributed initialised, one all_reduce (sum) of every layer's load before the update."""
    calls = []

    def fake_all_reduce(t, group=None):
        calls.append(group)
        t.mul_(3)  # three ranks with the same loads

    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.distributed, "all_reduce", fake_all_reduce)
    model = Blocks()
    balancer = MoEBalancer(model, process_group="pg")
    model(torch.randn(6, 8))
    local = {n: l.double() for n, l in balancer.loads().items()}
    balancer.step()
    assert calls == ["pg"]
    for n in local:
        torch.testing.assert_close(balancer.last_loads[n], 3 * local[n])


def test_bad_arguments():
    with pytest.raises(ValueError, match="argument 'model'"):
        MoEBalancer(nn.Linear(2, 2))
    with pytest.raises(ValueError, match="argument 'rate'"):
        MoEBalancer(Blocks(), rate=-1.0)
    with pytest.raises(TypeError, match="argument 'moe'"):
        MoETensorMLP(nn.Linear(2, 2))


def test_a_non_finite_load_is_an_error_before_any_bias_moves():
    """A layer's load that is not finite (a float load: MoEMLP's own are integer counts, which are not
    read) stops the step with the layer named, before any layer's bias moves."""
    model = Blocks()
    balancer = MoEBalancer(model)
    model(torch.randn(6, 8))
    balancer._load["b.moe"] = torch.tensor([1.0, float("nan"), 2.0, 3.0, 4.0])
    before = {n: m.expert_bias.clone() for n, m in balancer.layers.items()}
    with pytest.raises(
        ValueError, match=r"MoEBalancer.step: argument 'loads\(\)\['b.moe'\]' expected finite values, got .*\[1\] = nan"
    ):
        balancer.step()
    for n, m in balancer.layers.items():
        assert torch.equal(m.expert_bias, before[n])
