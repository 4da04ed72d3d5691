"""The published fine-tuning recipe: augmentations, split files, the recipe's values, drop path,
the layer-decay groups for dense-prediction models, non-finite steps, and the MoE-ViT learning."""

import json
import math
import os

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

import geomoe.finetune as ft
from geomoe import GeoMoEBackbone, MoEViTBackbone
from geomoe.augment import INCREASING_OPS, OPS, FILL, parse_randaug, random_erasing
from geomoe.cli import main
from geomoe.configs import CONFIGS
from geomoe.data import (
    ClassFolder,
    LabelledImages,
    Split,
    eval_transform,
    read_split,
    split_from_folder,
    write_scene_classes,
    write_split,
)
from geomoe.finetune import FinetuneArgs, finetune, peak_learning_rate
from geomoe.layer_decay import param_groups

ENC = {k: v for k, v in CONFIGS["tiny"]["model"].items() if not k.startswith("decoder")}
SMALL_VIT = dict(embed_dim=32, num_heads=4, num_experts=4, top_k=2)


def _images(folder, n=4, size=48):
    os.makedirs(folder, exist_ok=True)
    rng = np.random.default_rng(0)
    paths = []
    for i in range(n):
        arr = rng.integers(0, 256, (size, size + 8, 3), dtype=np.uint8)  # not square: the crop has work to do
        paths.append(os.path.join(folder, f"{i}.png"))
        Image.fromarray(arr).save(paths[-1])
    return paths


# ---- RandAugment and random erasing --------------------------------------------------------------


def test_randaug_spec_parses_to_the_published_form_and_bad_specs_name_the_flag():
    ra = parse_randaug("rand-m9-mstd0.5-inc1")
    assert (ra.magnitude, ra.num_ops, ra.magnitude_std, ra.prob) == (9, 2, 0.5, 0.5)
    assert list(ra.ops) == INCREASING_OPS and len(ra.ops) == 15
    assert parse_randaug("none") is None and parse_randaug(None) is None
    for bad in ("rand-m11", "auto-m9", "rand-m9-foo1", "rand-m9-inc2", "rand-n0"):
        with pytest.raises(ValueError, match=rf"argument '--randaug' expected .* got '{bad}'"):
            parse_randaug(bad)


def test_operation_levels_at_magnitude_9():
    rng = np.random.default_rng(0)
    assert OPS["PosterizeIncreasing"][1](9.0, rng) == 1  # keep 4 - int(3.6) bits
    assert OPS["SolarizeIncreasing"][1](9.0, rng) == 256 - 230
    assert OPS["SolarizeAdd"][1](9.0, rng) == 99
    assert abs(OPS["Rotate"][1](9.0, rng)) == pytest.approx(27.0)
    assert abs(OPS["ShearX"][1](9.0, rng)) == pytest.approx(0.27)
    assert abs(OPS["TranslateXRel"][1](9.0, rng)) == pytest.approx(0.405)
    assert {round(OPS["ColorIncreasing"][1](9.0, np.random.default_rng(s)), 6) for s in range(20)} == {0.19, 1.81}


def test_point_operations_against_numpy():
    arr = np.random.default_rng(1).integers(0, 256, (8, 8, 3), dtype=np.uint8)
    img = Image.fromarray(arr)
    a = arr.astype(np.int64)
    assert np.array_equal(np.asarray(OPS["PosterizeIncreasing"][0](img, 1)), arr & 0x80)
    assert not np.asarray(OPS["PosterizeIncreasing"][0](img, 0)).any()  # 0 bits: black (magnitude 10)
    assert np.array_equal(np.asarray(OPS["SolarizeIncreasing"][0](img, 26)), np.where(a >= 26, 255 - a, a))
    assert np.array_equal(np.asarray(OPS["SolarizeAdd"][0](img, 99)), np.where(a < 128, np.minimum(a + 99, 255), a))
    assert np.array_equal(np.asarray(OPS["Invert"][0](img, None)), 255 - a)
    bright = np.asarray(OPS["BrightnessIncreasing"][0](img, 0.5)).astype(np.int64)
    assert np.abs(bright - a * 0.5).max() <= 1


def test_translation_moves_pixels_and_fills_with_the_mean_colour():
    arr = np.random.default_rng(2).integers(0, 256, (10, 20, 3), dtype=np.uint8)
    out = np.asarray(OPS["TranslateXRel"][0](Image.fromarray(arr), 0.25))  # 5 pixels: output x reads input x + 5
    assert np.array_equal(out[:, :15], arr[:, 5:])
    assert (out[:, 15:] == np.array(FILL, dtype=np.uint8)).all()


def test_erasing_replaces_one_box_with_noise():
    img = torch.zeros(3, 40, 40)
    boxes = 0
    for s in range(400):
        out = random_erasing(img, np.random.default_rng(s), 0.25)
        changed = (out != 0).any(0)
        if not changed.any():
            assert out is img  # no box: the image itself, untouched
            continue
        boxes += 1
        ys, xs = torch.nonzero(changed, as_tuple=True)
        h, w = int(ys.max() - ys.min() + 1), int(xs.max() - xs.min() + 1)
        assert int(changed.sum()) == h * w  # one filled rectangle
        assert 0.02 * 1600 * 0.8 <= h * w <= 1600 / 3 * 1.2 and 0.3 / 1.5 <= h / w <= 1.5 / 0.3
    assert 0.18 < boxes / 400 < 0.32  # p = 0.25
    out = random_erasing(img, np.random.default_rng(0), 1.0)
    box = out[(out != 0)]
    assert abs(float(box.mean())) < 0.3 and 0.7 < float(box.std()) < 1.3  # per-pixel N(0, 1)
    assert torch.equal(out, random_erasing(img, np.random.default_rng(0), 1.0))


def test_training_images_are_a_pure_function_of_seed_epoch_and_index(tmp_path):
    paths = _images(tmp_path / "imgs")
    samples = [(p, i % 2) for i, p in enumerate(paths)]
    ra = parse_randaug("rand-m9-mstd0.5-inc1")
    aug = LabelledImages(samples, ["a", "b"], 32, train=True, seed=3, randaug=ra, reprob=0.25)
    again = LabelledImages(samples, ["a", "b"], 32, train=True, seed=3, randaug=ra, reprob=0.25)
    plain = LabelledImages(samples, ["a", "b"], 32, train=True, seed=3)
    other_seed = LabelledImages(samples, ["a", "b"], 32, train=True, seed=4, randaug=ra, reprob=0.25)
    codes = range(4 * len(samples))  # 4 epochs of every image
    changed = 0
    for code in codes:
        x, label = aug[code]
        assert x.shape == (3, 32, 32) and label == samples[code % 4][1]
        assert torch.equal(x, aug[code][0]) and torch.equal(x, again[code][0])  # same (seed, epoch, index): same image
        assert not torch.equal(x, other_seed[code][0])
        changed += not torch.equal(x, plain[code][0])  # same crop and flip, without RandAugment and erasing
    assert changed >= 10, changed  # 2 ops at p 0.5 and erasing at 0.25 leave about 1 in 5 images as they were
    for index in range(4):  # each epoch augments the same file differently
        assert not torch.equal(aug[index][0], aug[index + 4][0])


def test_validation_resizes_the_short_side_and_crops_the_centre():
    arr = np.random.default_rng(0).integers(0, 256, (40, 80, 3), dtype=np.uint8)
    x = eval_transform(Image.fromarray(arr), 32)
    ref = np.asarray(Image.fromarray(arr).resize((64, 32), Image.BICUBIC), dtype=np.float32)[:, 16:48] / 255.0
    ref = (ref - np.array([0.485, 0.456, 0.406], dtype=np.float32)) / np.array([0.229, 0.224, 0.225], dtype=np.float32)
    torch.testing.assert_close(x, torch.from_numpy(ref.transpose(2, 0, 1).copy()))


# ---- split files ---------------------------------------------------------------------------------


def test_split_file_round_trip_and_clear_errors(tmp_path):
    root = tmp_path / "scenes"
    write_scene_classes(str(root), per_class_train=5, per_class_val=0, size=16)
    split = split_from_folder(str(root / "train"), 0.4, seed=1)
    assert split.classes == ["farmland", "forest", "river", "urban"]
    assert len(split.train) == 4 * 2 and len(split.val) == 4 * 3  # 40 % of each class for training, the rest for val
    path = tmp_path / "scenes" / "split_40.json"
    write_split(str(path), split, str(root))
    data = json.loads(path.read_text())
    assert data["categories"] == {"farmland": 0, "forest": 1, "river": 2, "urban": 3}
    assert set(data["train"][0]) == {"image", "label"} and not os.path.isabs(data["train"][0]["image"])
    for back in (read_split(str(path), str(root)), read_split(str(path))):  # relative to --data, or to the file
        assert back.classes == split.classes
        assert [(os.path.realpath(p), y) for p, y in back.train] == [(os.path.realpath(p), y) for p, y in split.train]
        assert [(os.path.realpath(p), y) for p, y in back.val] == [(os.path.realpath(p), y) for p, y in split.val]

    def broken(change, match):
        bad = json.loads(path.read_text())
        change(bad)
        (tmp_path / "bad.json").write_text(json.dumps(bad))
        with pytest.raises(ValueError, match=match):
            read_split(str(tmp_path / "bad.json"), str(root))

    broken(lambda d: d.pop("categories"), r"argument '--split' expected .*'categories'.* it has \['train', 'val'\]")
    broken(lambda d: d["val"].append({"image": "train/forest/nope.png", "label": 1}), r"1 'val' images not found .*nope\.png")
    broken(lambda d: d["train"].append({"image": d["train"][0]["image"], "label": 9}), r"label 9, not one of the 4")
    broken(lambda d: d["val"].append(d["train"][0]), r"1 images are in both 'train' and 'val'")
    broken(lambda d: d.update(categories={"a": 0, "b": 2}), r"category ids must be 0\.\.1")
    with pytest.raises(ValueError, match=r"argument '--split' expected .*JSONDecodeError"):
        (tmp_path / "not.json").write_text("{")
        read_split(str(tmp_path / "not.json"))


# ---- the recipe ----------------------------------------------------------------------------------


def test_recipe_published_sets_every_published_value(monkeypatch):
    got = {}
    monkeypatch.setattr(ft, "finetune", lambda args: got.setdefault("args", args))
    assert main(["finetune", "--recipe", "published", "--model", "moevit"]) == 0
    args = got["args"].resolved()
    want = dict(
        model="moevit",
        epochs=200,
        batch_size=64,
        img_size=320,
        blr=1e-3,
        lr=None,
        layer_decay=0.85,
        weight_decay=0.05,
        warmup_ratio=0.025,
        min_lr_ratio=1e-3,
        smoothing=0.1,
        mixup=0.8,
        cutmix=1.0,
        drop_path=0.1,
        clip_grad=1.0,
        randaug="rand-m9-mstd0.5-inc1",
        reprob=0.25,
        precision="fp32",
    )
    assert {k: getattr(args, k) for k in want} == want
    assert peak_learning_rate(args) == pytest.approx(2.5e-4)
    # a flag given beside the recipe wins; an absolute --lr replaces blr
    got.clear()
    main(["finetune", "--recipe", "published", "--epochs", "3", "--lr", "1e-4", "--randaug", "none"])
    args = got["args"].resolved()
    assert (args.epochs, args.lr, args.blr, args.batch_size, args.randaug) == (3, 1e-4, None, 64, "none")
    assert peak_learning_rate(args) == 1e-4


def test_the_readme_results_commands_run_the_published_recipe(monkeypatch):
    import re
    import shlex

    readme = open(os.path.join(os.path.dirname(__file__), "..", "README.md")).read()
    commands = re.findall(r"^\| (?:AID|RESISC-45) .*`(geomoe finetune [^`]*)` \|$", readme, flags=re.M)
    assert len(commands) == 4
    got = []
    monkeypatch.setattr(ft, "finetune", lambda args: got.append(args.resolved()))
    for command in commands:
        for model in ("geomoe", "moevit"):
            main(shlex.split(command.replace("MODEL", model).replace("ENCODER", "encoder.pth"))[1:])
    assert [(a.model, a.recipe, a.config, a.epochs, a.img_size) for a in got[:2]] == [
        ("geomoe", "published", "base", 200, 320),
        ("moevit", "published", "base", 200, 320),
    ]
    assert all(a.split.endswith(".json") and a.weights == "encoder.pth" for a in got)


def test_bad_recipe_arguments_are_usage_errors(capsys):
    with pytest.raises(ValueError, match=r"argument '--recipe' expected one of \['short', 'published'\], got 'paper'"):
        FinetuneArgs(recipe="paper").resolved()
    with pytest.raises(ValueError, match=r"argument '--model' expected one of \['geomoe', 'moevit'\], got 'vit'"):
        FinetuneArgs(model="vit").resolved()
    for extra, words in (
        (["--recipe", "paper"], "argument --recipe: invalid choice: 'paper'"),
        (["--lr", "1e-3", "--blr", "1e-3"], "arguments '--lr' and '--blr' expected one at most"),
        (["--warmup-ratio", "0.1", "--warmup-epochs", "1"], "'--warmup-ratio' and '--warmup-epochs' expected one at most"),
        (["--drop-path", "1"], "argument '--drop-path' expected a finite number in [0, 1), got 1"),
        (["--reprob", "-0.5"], "argument '--reprob' expected a finite number in [0, 1], got -0.5"),
        (["--clip-grad", "nan"], "argument '--clip-grad' expected"),
        (["--randaug", "rand-m99"], "argument '--randaug' expected"),
    ):
        with pytest.raises(SystemExit):
            main(["finetune", *extra])
        assert words in capsys.readouterr().err, extra


# ---- drop path -----------------------------------------------------------------------------------


def test_drop_path_rises_linearly_over_every_block():
    bb = GeoMoEBackbone(**ENC, drop_path_rate=0.3)  # depths 1 + 1 + 2
    rates = [bb.blocks1[0].drop_path.p, bb.blocks2[0].drop_path.p] + [b.drop_path.p for b in bb.blocks3]
    assert rates == pytest.approx([0.0, 0.1, 0.2, 0.3])
    assert [b.drop_path.p for b in MoEViTBackbone(32, (0, 1, 2, 4), 0.2, **SMALL_VIT, depth=5).blocks] == pytest.approx(
        [0.0, 0.05, 0.1, 0.15, 0.2]
    )
    # in eval mode drop path is off: the same outputs as the model without it
    plain = GeoMoEBackbone(**ENC)
    plain.load_state_dict(bb.state_dict())
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(bb.eval()(x).pooled, plain.eval()(x).pooled, rtol=0, atol=0)
        bb.train()
        torch.manual_seed(0)
        outs = [bb(x).pooled for _ in range(4)]
    assert any(not torch.equal(o, outs[0]) for o in outs[1:])  # stochastic in training


# ---- layer decay for detection and segmentation models ----------------------------------------------


class _Detector(nn.Module):
    """A backbone, and a neck whose names could pass for encoder modules."""

    def __init__(self, backbone):
        super().__init__()
        self.backbone = backbone
        self.neck = nn.Module()
        self.neck.blocks = nn.ModuleList([nn.Linear(4, 4)])
        self.neck.patch_embed1 = nn.Linear(4, 4)


def test_dense_prediction_groups_take_ids_from_the_backbone_alone():
    det = _Detector(MoEViTBackbone(32, **SMALL_VIT))
    groups = det.backbone.param_groups(det, base_lr=1e-3, layer_decay=0.8)
    lid = {n: g["layer_id"] for g in groups for n in g["names"]}
    assert sorted(lid) == sorted(n for n, _ in det.named_parameters())  # every parameter once
    assert lid["backbone.patch_embed.proj.weight"] == 0 and lid["backbone.cls_token"] == 0
    assert lid["backbone.blocks.2.attn.qkv.weight"] == 3 and lid["backbone.blocks.11.mlp.w1"] == 12
    assert lid["backbone.fpn1.0.weight"] == 12 and lid["neck.blocks.0.weight"] == 12  # not an encoder block
    scale = {n: g["lr"] for g in groups for n in g["names"]}
    assert scale["backbone.blocks.2.attn.qkv.weight"] == pytest.approx(1e-3 * 0.8 ** (12 - 3))

    det = _Detector(GeoMoEBackbone(**ENC))
    groups = det.backbone.param_groups(det, base_lr=1e-3)
    lid = {n: g["layer_id"] for g in groups for n in g["names"]}
    decay = {n: g["weight_decay"] for g in groups for n in g["names"]}
    assert lid["backbone.patch_embed1.proj.weight"] == 0 and lid["backbone.blocks3.1.mlp.w2"] == 9
    assert lid["neck.patch_embed1.weight"] == 10 == lid["neck.blocks.0.bias"]  # L - 1 with L = 11
    assert decay["backbone.blocks3.1.mlp.w2"] == 0.05 and decay["backbone.blocks3.1.mlp.b2"] == 0.0
    with pytest.raises(ValueError, match="argument 'backbone' expected a module inside 'model'"):
        param_groups(det, 1e-3, backbone=GeoMoEBackbone(**ENC))


# ---- the loop ------------------------------------------------------------------------------------


def test_non_finite_steps_are_skipped_and_too_many_stop_the_run(tmp_path, monkeypatch):
    write_scene_classes(str(tmp_path / "d"), per_class_train=2, per_class_val=1, size=32)
    original, calls = ft.mix_batch, {"n": 0}

    def mix_batch(imgs, *args):  # the second step's images are NaN
        calls["n"] += 1
        out = original(imgs, *args)
        return (out[0] * float("nan"), out[1]) if calls["n"] == 2 else out

    monkeypatch.setattr(ft, "mix_batch", mix_batch)
    args = dict(data=str(tmp_path / "d"), img_size=32, epochs=1, batch_size=2, progress=False, device="cpu")
    with pytest.warns(UserWarning, match="step 2: non-finite loss, step skipped"):
        res = finetune(FinetuneArgs(out=str(tmp_path / "a"), **args))
    assert res["history"][0]["bad_steps"] == 1
    assert all(torch.isfinite(p).all() for p in res["model"].parameters())
    calls["n"] = 0
    with (
        pytest.raises(RuntimeError, match=r"stopping at step 2: 1 steps in a row had a non-finite loss"),
        pytest.warns(UserWarning),
    ):
        finetune(FinetuneArgs(out=str(tmp_path / "b"), max_bad_steps=1, **args))


def test_moevit_weights_load_from_its_pretraining_checkpoint_and_the_original_layout(tmp_path):
    from geomoe import MoEViTClassifier, original_state_dict
    from geomoe.train import PretrainArgs, pretrain

    run = pretrain(PretrainArgs(model="moevit", out=str(tmp_path / "pre"), steps=1, batch_size=4, progress=False, device="cpu"))
    cfg = {k: v for k, v in CONFIGS["tiny"]["moevit"].items() if not k.startswith("decoder")}
    clf = MoEViTClassifier(4, **cfg)
    note = ft.load_pretrained(clf, run["checkpoint"])
    n = len([k for k in clf.state_dict() if not k.startswith(("fc_norm", "head"))])
    assert f"loaded {n} of {n} backbone tensors" in note and "ignored" in note  # the decoder and final norm
    pre = run["model"].state_dict()
    assert torch.equal(clf.blocks[1].mlp.w1, pre["blocks.1.mlp.w1"]) and torch.equal(clf.cls_token, pre["cls_token"])
    # the released encoder-only file: original keys, one tensor per expert, a position table to ignore
    enc = {k: v for k, v in original_state_dict(run["model"]).items() if not k.startswith(("decoder", "mask_token", "norm."))}
    enc["pos_embed"] = torch.zeros(1, 37, cfg["embed_dim"])
    torch.save({"model": enc}, tmp_path / "released.pth")
    clf = MoEViTClassifier(4, **cfg)
    assert "original layout" in ft.load_pretrained(clf, str(tmp_path / "released.pth"))
    assert torch.equal(clf.blocks[2].mlp.b2, pre["blocks.2.mlp.b2"])


def test_moevit_finetunes_from_a_split_file_above_90_percent(tmp_path):
    root = tmp_path / "scenes"
    write_scene_classes(str(root), per_class_train=64, per_class_val=16, size=64)
    # the generated train/ and val/ folders (64 and 16 images per class) as a published split file
    train, val = ClassFolder(str(root / "train"), 64, True), ClassFolder(str(root / "val"), 64, False)
    split = Split(train.classes, train.samples, val.samples)
    write_split(str(tmp_path / "split.json"), split, str(root))
    res = finetune(
        FinetuneArgs(
            model="moevit",
            data=str(root),
            split=str(tmp_path / "split.json"),
            out=str(tmp_path / "ft"),
            img_size=64,
            epochs=4,
            progress=False,
            device="cpu",
        )
    )
    assert [h["epoch"] for h in res["history"]] == [1, 2, 3, 4]
    assert res["top1"] == res["history"][-1]["val_top1"] > 0.9, res["history"]
    assert math.isfinite(res["val_loss"]) and res["top5"] is None  # 4 classes: no top-5
    assert isinstance(res["model"], ft.MoEViTClassifier)
    for moe in res["model"].moe_layers():  # biases frozen
        assert torch.equal(moe.expert_bias, torch.zeros_like(moe.expert_bias))
