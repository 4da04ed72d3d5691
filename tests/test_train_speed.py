"""--precision, --compile and --activation-checkpointing (python/geomoe/speed.py)."""

import pytest
import torch

from geomoe import GeoMoE
from geomoe.configs import CONFIGS
from geomoe.data import SyntheticScenes
from geomoe.moevit import MoEViTMAE
from geomoe.speed import apply_activation_checkpointing, compile_blocks, resolve_precision, transformer_blocks
from geomoe.train import PretrainArgs, pretrain


def _fixed_images(n=8, size=96):
    scenes = SyntheticScenes(n, size, 0)
    return [scenes[i] for i in range(n)]  # a list of tensors is a Dataset


def _train(tmp_path, **kw):
    """6 steps on one fixed batch of 8 scenes: the loss must fall (fp32: 1.03 -> 0.80)."""
    args = dict(steps=6, batch_size=8, log_every=2, lr=3e-3, progress=False, device="cpu", tensorboard=False)
    args.update(kw)
    res = pretrain(PretrainArgs(out=str(tmp_path / "run"), dataset=_fixed_images(), **args))
    losses = [r["loss"] for r in res["history"]]
    assert len(losses) == 3 and losses[-1] < 0.9 * losses[0], losses
    return res


def test_precision_default_and_flags():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert resolve_precision(None, None, cpu) == "fp32" and resolve_precision(None, None, cuda) == "fp16"
    assert resolve_precision("bf16", None, cuda) == "bf16" and resolve_precision(None, True, cpu) == "fp16"
    with pytest.raises(ValueError, match="--precision.*--amp"):
        resolve_precision("bf16", True, cpu)
    with pytest.raises(ValueError, match="'--precision' expected one of"):
        PretrainArgs(precision="fp8").validate()


def test_bf16_run_trains_without_a_scaler(tmp_path, capsys):
    _train(tmp_path, precision="bf16")
    out = capsys.readouterr().out
    assert "precision bf16" in out and "GradScaler" not in out


def test_compiled_run_trains(tmp_path, capsys):
    _train(tmp_path, compile=True, compile_backend="aot_eager")
    assert "compiled blocks (aot_eager)" in capsys.readouterr().out


def test_compiled_block_keeps_the_fused_ops_whole():
    """fullgraph per block: no graph break, and the geomoe custom ops are single nodes in the graph."""
    torch._dynamo.reset()
    seen = []

    def record(gm, example_inputs):
        seen.extend(str(n.target) for n in gm.graph.nodes if n.op == "call_function")
        return gm.forward

    torch.manual_seed(0)
    model = GeoMoE(**CONFIGS["tiny"]["model"])
    assert compile_blocks(model, record) == 3  # 2 MoE blocks + 1 decoder block
    loss, aux, _ = model(torch.randn(2, 3, 96, 96))
    (loss + aux.sum()).backward()
    assert any(t.startswith("geomoe.") for t in seen), sorted(set(seen))[:20]
    assert all(k.startswith(("patch", "blocks", "pos", "stage", "norm", "mask", "decoder")) for k in model.state_dict())


@pytest.mark.parametrize("kind", ["geomoe", "moevit"])
def test_activation_checkpointing_gives_the_same_gradients(kind):
    def grads(checkpointing):
        torch.manual_seed(0)
        if kind == "geomoe":
            model = GeoMoE(**CONFIGS["tiny"]["model"]).double()
        else:
            model = MoEViTMAE(**CONFIGS["tiny"]["moevit"]).double()
        if checkpointing:
            assert apply_activation_checkpointing(model) == len(transformer_blocks(model)) > 0
        g = torch.Generator().manual_seed(1)
        imgs = torch.randn(3, 3, 96, 96, generator=g, dtype=torch.float64)
        noise = torch.rand(3, 36, generator=g)
        loss, aux, _ = model(imgs, noise=noise)
        (loss + 1e-4 * aux.sum()).backward()
        return loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None}

    loss0, g0 = grads(False)
    loss1, g1 = grads(True)
    assert torch.equal(loss0, loss1) and g0.keys() == g1.keys() and len(g0) > 20
    for name in g0:
        assert torch.equal(g0[name], g1[name]), name


def test_activation_checkpointing_run_resumes_like_a_plain_one(tmp_path):
    plain = pretrain(PretrainArgs(out=str(tmp_path / "a"), steps=2, batch_size=4, progress=False, device="cpu"))
    ckpt = pretrain(
        PretrainArgs(out=str(tmp_path / "b"), steps=2, batch_size=4, progress=False, device="cpu", activation_checkpointing=True)
    )
    a, b = plain["model"].state_dict(), ckpt["model"].state_dict()
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-6, msg=lambda m: f"{k}: {m}")
