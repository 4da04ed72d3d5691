import pytest
import torch

from geomoe import GeoMoE, original_state_dict
from geomoe.backbone import GeoMoEBackbone, interpolate_pos_embed
from geomoe.configs import CONFIGS
from geomoe.finetune import FinetuneArgs, GeoMoEClassifier, finetune, mix_batch
from geomoe.layer_decay import param_groups
from geomoe.pos_embed import sincos_2d
from geomoe.train import PretrainArgs, pretrain

ENC = {k: v for k, v in CONFIGS["tiny"]["model"].items() if not k.startswith("decoder")}


@pytest.mark.parametrize("size", [224, 320, 800])
def test_pyramid_shapes(size):
    bb = GeoMoEBackbone(**ENC).eval()
    with torch.no_grad():
        out = bb(torch.randn(1, 3, size, size))
    c1, c2, c3, c4 = out.features
    s = size
    assert c1.shape == (1, 32, s // 4, s // 4) and c2.shape == (1, 64, s // 8, s // 8)
    assert c3.shape == (1, 128, s // 16, s // 16) and c4.shape == (1, 128, s // 32, s // 32)
    assert out.pooled.shape == (1, 128) and out.aux.shape == (2,) and out.load.shape == (2, 8)
    assert int(out.load[0].sum()) == (s // 16) ** 2 * 2  # every token routed, top-2
    assert torch.equal(out.pooled, c3.flatten(2).mean(-1))


def test_non_square_input_and_features_only():
    bb = GeoMoEBackbone(**ENC, features_only=True)
    feats = bb(torch.randn(2, 3, 96, 160))
    assert isinstance(feats, tuple) and len(feats) == 4 and feats[2].shape == (2, 128, 6, 10)
    assert bb.aux_loss is not None and bb.aux_loss.requires_grad
    assert bb.out_channels == (32, 64, 128, 128)
    with pytest.raises(ValueError, match="multiples of 16"):
        bb(torch.randn(1, 3, 100, 96))


def test_position_table_interpolation():
    pos = sincos_2d(16, 14, 14)[None]
    assert interpolate_pos_embed(pos, (14, 14)) is pos
    big = interpolate_pos_embed(pos, (20, 20))
    assert big.shape == (1, 400, 16)
    # corners stay close to the table's corners
    torch.testing.assert_close(big[0, 0], pos[0, 0], atol=0.1, rtol=0)


def test_backbone_equals_the_pretraining_encoder_without_a_mask():
    full = GeoMoE(**CONFIGS["tiny"]["model"]).eval()
    bb = GeoMoEBackbone(**ENC).eval()
    bb.load_state_dict({k: v for k, v in full.state_dict().items() if k in bb.state_dict()})
    imgs = torch.randn(2, 3, 96, 96)
    with torch.no_grad():
        x1, x2, x = full._stages_dense(imgs, None, None)
        x, aux, load = full._moe_blocks(x + full.pos_embed)
        out = bb(imgs)
    torch.testing.assert_close(out.features[2].flatten(2).transpose(1, 2), x)
    assert torch.equal(out.load, load)


def test_released_encoder_file_loads(tmp_path):
    from geomoe import load_original_state_dict

    src = GeoMoE(**CONFIGS["tiny"]["model"])
    enc = {k: v for k, v in original_state_dict(src).items() if not k.startswith(("decoder", "stage", "norm.", "mask_token"))}
    path = tmp_path / "released.pth"
    torch.save({"model": enc}, path)
    bb = GeoMoEBackbone(**ENC)
    res = load_original_state_dict(bb, path, strict=True)
    assert res.missing == [] and res.unexpected == []
    assert torch.equal(bb.blocks3[1].mlp.w2, src.blocks3[1].mlp.w2)


def test_layer_wise_lr_decay_and_no_decay_sets():
    # the tiny config's ids by the published GeoMoE table: blocks3.i -> 8 + i, L = 8 + 2 + 1 = 11
    model = GeoMoEClassifier(GeoMoEBackbone(**ENC), 4)
    groups = param_groups(model, 1e-3, 0.05, 0.85)
    scale_of = {id(p): (g["lr_scale"], g["weight_decay"]) for g in groups for p in g["params"]}
    assert scale_of[id(model.head.weight)] == (1.0, 0.05)
    assert scale_of[id(model.head.bias)] == (1.0, 0.0)
    assert scale_of[id(model.backbone.blocks3[1].mlp.w1)] == pytest.approx((0.85 ** (11 - 1 - 9), 0.05))
    assert scale_of[id(model.backbone.blocks3[1].mlp.b1)][1] == 0.0  # per-expert biases: 1-d in the original layout
    assert scale_of[id(model.backbone.blocks3[1].mlp.shared_b2)][1] == 0.0
    assert scale_of[id(model.backbone.patch_embed1.proj.weight)] == pytest.approx((0.85**10, 0.05))
    assert scale_of[id(model.backbone.patch_embed2.proj.weight)] == pytest.approx((0.85 ** (10 - 3), 0.05))
    assert id(model.backbone.pos_embed) not in scale_of  # frozen sin-cos table


def test_mixing_keeps_targets_normalised():
    imgs, labels = torch.randn(6, 3, 32, 32), torch.tensor([0, 1, 2, 3, 0, 1])
    g = torch.Generator().manual_seed(0)
    for mixup, cutmix in ((0, 0), (0.8, 0), (0, 1.0), (0.8, 1.0)):
        x, t = mix_batch(imgs, labels, 4, 0.1, mixup, cutmix, g)
        assert x.shape == imgs.shape
        torch.testing.assert_close(t.sum(-1), torch.ones(6))
    _, t = mix_batch(imgs, labels, 4, 0.1, 0, 0, g)
    assert t[0].tolist() == pytest.approx([0.925, 0.025, 0.025, 0.025])


def test_finetune_reaches_90_percent_and_resumes(tmp_path):
    # the default recipe: drop path, RandAugment, random erasing, clipping, published layer decay
    args = dict(img_size=64, epochs=6, batch_size=32, progress=False, device="cpu")
    res = finetune(FinetuneArgs(out=str(tmp_path / "ft"), **args))
    assert res["top1"] > 0.9, res["history"]
    assert res["top1"] == res["history"][-1]["val_top1"]  # the result is the last epoch's top-1
    assert res["history"][-1]["val_top5"] is None  # 4 classes: no top-5 (it would be 100%)
    assert 0 < res["val_loss"] == res["history"][-1]["val_loss"] < 1.0
    for moe in res["model"].backbone.moe_layers():  # biases frozen
        assert torch.equal(moe.expert_bias, torch.zeros_like(moe.expert_bias))
    more = finetune(FinetuneArgs(out=str(tmp_path / "ft"), resume="auto", **dict(args, epochs=7)))
    assert [h["epoch"] for h in more["history"]] == [7]


def test_finetune_resumed_from_an_epoch_checkpoint_equals_the_straight_run(tmp_path):
    """A fine-tuning run that died after epoch 1 (its epoch-2 checkpoint removed) resumes to the
    straight run's weights and metrics, bit for bit: the augmentation, mixup and data order are
    restored with the optimizer."""
    import shutil

    from geomoe.checkpoint import list_checkpoints

    args = dict(img_size=64, epochs=2, batch_size=32, progress=False, device="cpu")
    straight = finetune(FinetuneArgs(out=str(tmp_path / "a"), **args))
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    shutil.rmtree(list_checkpoints(str(tmp_path / "b"))[-1])
    resumed = finetune(FinetuneArgs(out=str(tmp_path / "b"), resume="auto", **args))
    assert [h["epoch"] for h in resumed["history"]] == [2]
    for key in ("loss", "val_top1", "val_loss"):
        assert resumed["history"][-1][key] == straight["history"][-1][key], key
    a, b = straight["model"].state_dict(), resumed["model"].state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_finetune_from_a_pretraining_checkpoint(tmp_path):
    run = pretrain(PretrainArgs(out=str(tmp_path / "pre"), steps=2, batch_size=8, progress=False, device="cpu"))
    res = finetune(
        FinetuneArgs(
            out=str(tmp_path / "ft"),
            weights=run["checkpoint"],
            img_size=64,
            epochs=1,
            batch_size=32,
            progress=False,
            device="cpu",
            mixup=0.8,
            cutmix=1.0,
        )
    )
    pre = run["model"].state_dict()
    # the first step moved the weights, so compare to what the checkpoint held through a fresh load
    bb = GeoMoEBackbone(**ENC)
    from geomoe.finetune import load_pretrained

    note = load_pretrained(bb, run["checkpoint"])
    assert "loaded 81 of 81 backbone tensors" in note
    assert torch.equal(bb.blocks3[0].mlp.w1, pre["blocks3.0.mlp.w1"])
    assert len(res["history"]) == 1
