"""`geomoe pretrain --cuda-graphs` (python/geomoe/cuda_graphs.py) without a GPU: the refusals, and
the preparation around the capture, with `emulated_capture` standing in for
torch.cuda.make_graphed_callables. The stand-in keeps what the real one does to the tensors: the
block runs on static input tensors its inputs are copied into, and the gradients come back as
detached views of static buffers (so .grad shares them). The capture itself and the replays run on
a GPU: tests/test_gpu.py (test_cuda_graphs_blocks_train_as_the_eager_model) and benchmarks/gpu_check.sh
(step graphs: a short pretraining beside the eager one)."""

from __future__ import annotations

import inspect

import pytest
import torch
from torch import nn

from geomoe import cli, cuda_graphs
from geomoe.cuda_graphs import BlockGraphs
from geomoe.model import GeoMoE
from geomoe.moevit import MoEViTMAE
from geomoe.speed import autocast, transformer_blocks
from geomoe_kernels import _checks
from geomoe_kernels import backend as _backend
from geomoe_kernels.nn import _layer_plan

SMALL = dict(img_size=32, num_heads=2, num_experts=4, num_shared_experts=1, top_k=2)
DECODER = dict(decoder_embed_dim=16, decoder_depth=1, decoder_num_heads=2)


def _model(kind: str, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    if kind == "geomoe":
        return GeoMoE(embed_dim=(8, 16, 32), depth=(1, 1, 2), **SMALL, **DECODER)
    return MoEViTMAE(embed_dim=32, depth=2, **SMALL, **DECODER)  # block 0 dense: (x, None, None)


class emulated_capture:
    """make_graphed_callables' contract on a CPU: each callable's forward replaced by one that
    copies the inputs into the sample tensors, runs the callable there and returns detached outputs,
    whose backward writes the gradients into buffers made at capture and returns them detached."""

    def __init__(self):
        self.calls = []  # (autocast on, its dtype, its cache on, the samples' signatures)
        self.capture_modes = []  # torch.cuda.graph's default capture_error_mode during the call
        self.plans = []  # the MoE layers' launch plans made by then (nn/_layer_plan.py)

    def __call__(self, callables, sample_args, num_warmup_iters=3, allow_unused_input=False):
        on = torch.is_autocast_enabled("cpu")
        self.capture_modes.append(inspect.signature(torch.cuda.graph).parameters["capture_error_mode"].default)
        self.plans.append(_layer_plan.plans_built)
        self.calls.append(
            (
                on,
                torch.get_autocast_dtype("cpu") if on else None,
                torch.is_autocast_cache_enabled(),
                [cuda_graphs.signature(s) for s in sample_args],
            )
        )
        for module, sample in zip(callables, sample_args):
            module.forward = self._graphed(module, module.forward, sample, allow_unused_input)
        return callables

    @staticmethod
    def _graphed(module, forward, static_in, allow_unused):
        params = tuple(module.parameters())
        surface = [t for t in tuple(static_in) + params if t.requires_grad]
        grads_out = {}

        class Graphed(torch.autograd.Function):
            @staticmethod
            def forward(ctx, *inputs):
                for s, x in zip(static_in, inputs):
                    s.copy_(x)
                with torch.enable_grad():
                    ctx.outs = forward(*static_in)
                return tuple(o.detach() for o in ctx.outs)

            @staticmethod
            def backward(ctx, *grads):
                live = [(o, g) for o, g in zip(ctx.outs, grads) if o.requires_grad]
                got = torch.autograd.grad([o for o, _ in live], surface, [g for _, g in live], allow_unused=allow_unused)
                for t, g in zip(surface, got):
                    if g is not None:
                        grads_out.setdefault(id(t), torch.empty_like(g)).copy_(g)
                back = [grads_out[id(t)].detach() if t.requires_grad and id(t) in grads_out else None for t in static_in + params]
                return tuple(back)

        return lambda *args: Graphed.apply(*(args + params))


def _step(model, imgs, noise, precision="fp32"):
    with autocast(precision, imgs.device, cache=False):
        loss, aux, loads = model(imgs, 0.75, 0.25, noise)
        total = loss + 1e-4 * aux.sum()
    total.backward()
    with torch.no_grad():
        for p in model.parameters():
            if p.grad is not None:
                p -= 0.1 * p.grad
    model.zero_grad(set_to_none=True)
    model.update_expert_biases(loads, 1e-2)
    return total.detach()


def _batch(step, n=2):
    g = torch.Generator().manual_seed(100 + step)
    return torch.randn(n, 3, 32, 32, generator=g), torch.rand(n, 4, generator=g)


@pytest.mark.parametrize("kind", ["geomoe", "moevit"])
def test_graphed_blocks_train_as_the_eager_model_and_capture_after_the_first_step(kind):
    """Each block records its inputs in the first step (eager), is captured after it with the
    cast cache off, and from then on every step, bias updates included, matches the eager model."""
    eager, graphed = _model(kind), _model(kind)
    _backend.PLANS.clear()  # the plans of this test's shapes are made in its first step
    before = _layer_plan.plans_built
    capture = emulated_capture()
    graphs = BlockGraphs(transformer_blocks(graphed), torch.device("cpu"), "bf16", capture_fn=capture)
    for step in range(3):
        imgs, noise = _batch(step)
        want, got = _step(eager, imgs, noise), _step(graphed, imgs, noise)
        assert torch.equal(want, got), (step, want, got)
        if step == 0:
            assert not capture.calls and graphs.ready()
            graphs.capture()
            assert graphs.captured and not graphs.ready()
    for a, b in zip(eager.state_dict().values(), graphed.state_dict().values()):
        assert torch.equal(a, b)
    ((on, dtype, cache, sigs),) = capture.calls
    # the warm-up step made the layers' plans before the capture, and no step made one after it
    assert capture.plans[0] > before and _layer_plan.plans_built == capture.plans[0], (before, capture.plans)
    assert on and dtype == torch.bfloat16 and not cache  # the run's autocast, its cast cache off
    # the pin-memory thread may allocate during the capture: thread-local mode, then torch's default again
    assert capture.capture_modes == ["thread_local"]
    assert inspect.signature(torch.cuda.graph).parameters["capture_error_mode"].default == "global"
    blocks = transformer_blocks(graphed)
    lk = 1 + 1 if kind == "moevit" else 1  # the cls token and the 1 kept token of 4 (mask ratio 0.75)
    assert sigs[0] == (((2, lk, 32), torch.float32, torch.device("cpu"), True),), sigs[0]
    assert [len(s) for s in sigs] == [1] * (len(blocks) - 1) + [2]  # the decoder block: (x, context)


def test_a_captured_block_refuses_another_shape_a_replaced_buffer_and_accumulated_gradients():
    model = _model("geomoe")
    graphs = BlockGraphs(transformer_blocks(model), torch.device("cpu"), "fp32", capture_fn=emulated_capture())
    _step(model, *_batch(0))
    graphs.capture()
    imgs, noise = _batch(1, n=3)
    with pytest.raises(
        RuntimeError, match=r"--cuda-graphs: transformer block 0 was captured for inputs \[2, 1, 32\].*got \[3, 1, 32\]"
    ):
        _step(model, imgs, noise)
    model.zero_grad(set_to_none=True)
    with graphs.eager():  # a short batch (unreadable images skipped) runs the blocks' eager forwards
        _step(model, imgs, noise)
    # two backwards into the same .grad: the graph's buffers would double the first
    loss = model(*_batch(2)[:1], 0.75, 0.25, _batch(2)[1])[0]
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="already hold gradients before its graphed backward"):
        loss.backward()
    model.zero_grad(set_to_none=True)
    moe = model.blocks3[1].mlp
    moe.expert_bias = torch.zeros_like(moe.expert_bias)  # replaced, not updated in place
    with pytest.raises(RuntimeError, match="block 1's tensor 'expert_bias' .MoEMLP. was replaced or moved"):
        _step(model, *_batch(3))


def test_capture_waits_for_every_block_and_refuses_tensors_it_cannot_hold():
    model = _model("geomoe")
    graphs = BlockGraphs(transformer_blocks(model), torch.device("cpu"), "fp32", capture_fn=emulated_capture())
    with torch.no_grad():  # evaluation records nothing: the capture needs a training step
        model(*_batch(0)[:1], 0.75, 0.25, _batch(0)[1])
    assert not graphs.ready()
    with pytest.raises(RuntimeError, match=r"--cuda-graphs: capture expected one eager training step .* blocks \[0, 1, 2\]"):
        graphs.capture()
    with pytest.raises(ValueError, match="'--cuda-graphs' expected transformer blocks called with tensors only"):
        model.blocks3[0](torch.zeros(1, 4, 32), 0.5)


@pytest.mark.parametrize(
    "extra, says",
    [
        (["--device", "cpu"], "'--cuda-graphs' expected a CUDA device"),
        (["--fsdp"], "'--cuda-graphs' and '--fsdp' expected one at most"),
        (["--ep", "2"], "'--cuda-graphs' expected no expert parallelism (--ep 1), got --ep 2"),
        (["--expert-parallel"], "got --expert-parallel"),
        (["--compile"], "'--cuda-graphs' and '--compile' expected one at most"),
        (["--activation-checkpointing"], "'--cuda-graphs' and '--activation-checkpointing' expected one at most"),
        (["--backend", "torch"], "'--cuda-graphs' and '--backend torch' expected one at most"),
    ],
)
def test_cuda_graphs_refusals_are_one_line_usage_errors(extra, says, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["pretrain", "--cuda-graphs", "--out", str(tmp_path / "run"), "--no-progress", *extra])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "Traceback" not in err, err
    assert says in err and "geomoe pretrain: error:" in err, err
    assert len([line for line in err.splitlines() if "error:" in line]) == 1, err
    assert not (tmp_path / "run").exists()  # refused before the run claims --out


def test_value_checks_on_the_gpu_are_refused_with_cuda_graphs():
    cuda = torch.device("cuda")
    assert cuda_graphs.refusal(cuda) is None  # the default: value checks on CPU tensors only
    with _checks.value_checks(True):
        why = cuda_graphs.refusal(cuda)
    assert why.startswith("environment variable GEOMOE_CHECK_VALUES=1") and "--cuda-graphs" in why, why
    assert cli.user_error(ValueError(why))
    assert "CUDA device" in cuda_graphs.refusal(torch.device("cpu"))


def test_pretrain_with_cuda_graphs_logs_the_eager_losses(tmp_path, monkeypatch, capsys):
    """The trainer's wiring (record in step 1, capture after it, autocast without its cache) on a
    CPU, the capture emulated: the same losses as the eager run, step by step."""
    from geomoe.data import SyntheticScenes
    from geomoe.train import PretrainArgs, pretrain

    capture = emulated_capture()
    monkeypatch.setattr(cuda_graphs, "refusal", lambda device, ep=1: None)
    monkeypatch.setattr(cuda_graphs, "_prime_tickets", lambda device: None)
    monkeypatch.setattr(torch.cuda, "make_graphed_callables", capture)
    scenes = SyntheticScenes(4, 96, 0)
    data = [scenes[i] for i in range(4)]
    runs = {}
    for graphs in (False, True):
        args = PretrainArgs(
            out=str(tmp_path / f"run{graphs}"),
            dataset=data,
            steps=2,
            batch_size=2,
            log_every=1,
            progress=False,
            device="cpu",
            tensorboard=False,
            cuda_graphs=graphs,
        )
        runs[graphs] = [r["loss"] for r in pretrain(args)["history"]]
    assert len(capture.calls) == 1 and runs[True] == runs[False], (capture.calls, runs)
    assert "CUDA graphs per block" in capsys.readouterr().out
