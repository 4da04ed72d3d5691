"""A checkpoint is never lost or silently wrong: an --async-save in flight is committed (or removed)
on every way a run ends, every file's checksum is recorded at the save and checked at resume, and a
resume or a start from weights that do not fit the run says so."""

import glob
import os
import signal

import pytest
import torch

from geomoe import checkpoint
from geomoe.checkpoint import list_checkpoints, load, load_latest
from geomoe.runtime import load_resume_state
from geomoe.train import PretrainArgs, pretrain

FAST = dict(batch_size=8, progress=False, device="cpu", tensorboard=False)


def _names(out):
    return [os.path.basename(p) for p in list_checkpoints(str(out))]


def _tmps(out):
    return sorted(p for p in os.listdir(out) if p.endswith(".tmp"))


def _same_weights(a, b):
    a, b = a.state_dict(), b.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


class _Killed(BaseException):
    """Stands for kill -9: nothing catches it, and nothing after it runs in the process."""


def _fail_at(monkeypatch, at_step, action):
    """Run `action()` as the training step `at_step` (0-based) begins."""
    from geomoe import train

    original = train.PretrainTask.train_step

    def step(self, batch, lr, step):
        if step == at_step:
            action()
        return original(self, batch, lr, step)

    monkeypatch.setattr(train.PretrainTask, "train_step", step)


# ---- 1. an --async-save in flight on every way out -------------------------------------------------


def test_async_save_in_flight_is_committed_when_a_step_raises(tmp_path, monkeypatch):
    """Step 2's save is in flight when step 3 raises (an unreadable raster, say): the save is
    finished and committed before the error propagates, and --resume auto continues from it to the
    straight run's weights."""
    out = tmp_path / "run"
    args = dict(steps=6, save_every=2, log_every=1, async_save=True, **FAST)
    straight = pretrain(PretrainArgs(out=str(tmp_path / "straight"), **args))

    def bad_raster():
        raise OSError("a raster that cannot be read")

    with monkeypatch.context() as m:
        _fail_at(m, 2, bad_raster)
        with pytest.raises(OSError, match="raster"):
            pretrain(PretrainArgs(out=str(out), **args))
    assert _names(out) == ["ckpt_00000002"] and _tmps(out) == []
    assert load(str(out / "ckpt_00000002"))["step"] == 2
    resumed = pretrain(PretrainArgs(out=str(out), resume="auto", **args))
    assert [r["step"] for r in resumed["history"]] == [3, 4, 5, 6]
    assert [r["loss"] for r in resumed["history"]] == [r["loss"] for r in straight["history"][2:]]
    _same_weights(straight["model"], resumed["model"])


def test_async_save_in_flight_is_committed_on_sigterm_and_at_the_end(tmp_path, monkeypatch):
    out = tmp_path / "run"
    with monkeypatch.context() as m:
        _fail_at(m, 2, lambda: os.kill(os.getpid(), signal.SIGTERM))  # step 2's save in flight
        res = pretrain(PretrainArgs(out=str(out), steps=6, save_every=2, keep_last=0, async_save=True, **FAST))
    assert res["step"] == 3 and _names(out) == ["ckpt_00000002", "ckpt_00000003"] and _tmps(out) == []
    res = pretrain(PretrainArgs(out=str(out), steps=6, save_every=2, keep_last=0, resume="auto", async_save=True, **FAST))
    assert _names(out) == ["ckpt_00000002", "ckpt_00000003", "ckpt_00000004", "ckpt_00000006"] and _tmps(out) == []
    for name in _names(out):
        assert checkpoint.verify_checksums(str(out / name)).endswith("checksums verified")


def test_a_save_that_finished_writing_before_a_kill_is_committed_at_resume(tmp_path, monkeypatch):
    """kill -9 after step 2's asynchronous save was written (and sealed) but before it was moved
    into place: the resume commits it (it verifies) instead of deleting it and starting over."""
    out = tmp_path / "run"
    args = dict(steps=4, save_every=2, log_every=1, async_save=True, **FAST)
    straight = pretrain(PretrainArgs(out=str(tmp_path / "straight"), **args))

    def killed(*a, **k):
        raise _Killed

    with monkeypatch.context() as m:
        m.setattr(checkpoint, "commit", killed)
        with pytest.raises(_Killed):
            pretrain(PretrainArgs(out=str(out), **args))
    assert _names(out) == [] and _tmps(out) == [".ckpt_00000002.tmp"]
    with pytest.warns(UserWarning, match=r"committed .*ckpt_00000002: its save had finished writing"):
        resumed = pretrain(PretrainArgs(out=str(out), resume="auto", **args))
    assert [r["step"] for r in resumed["history"]] == [3, 4]
    _same_weights(straight["model"], resumed["model"])


def test_an_unfinished_save_is_not_committed_at_resume(tmp_path):
    """A .tmp without its checksums (the writes never finished) is never committed; one whose
    checksums no longer match is not either."""
    out = tmp_path / "run"
    pretrain(PretrainArgs(out=str(out), steps=4, save_every=2, keep_last=0, **FAST))
    os.replace(out / "ckpt_00000004", out / ".ckpt_00000004.tmp")
    os.remove(out / ".ckpt_00000004.tmp" / checkpoint.CHECKSUM_FILE)
    checkpoint.recover(str(out))
    assert _names(out) == ["ckpt_00000002"]
    checkpoint.seal(str(out / ".ckpt_00000004.tmp"))
    with open(out / ".ckpt_00000004.tmp" / checkpoint.MODEL_FILE, "r+b") as f:
        f.seek(-64, os.SEEK_END)
        f.write(bytes(64))
    with pytest.warns(UserWarning, match="does not verify"):
        checkpoint.recover(str(out))
    assert _names(out) == ["ckpt_00000002"]


# ---- 2. checksums ------------------------------------------------------------------------------------


def _overwrite_middle(path, n=4096):
    size = os.path.getsize(path)
    with open(path, "r+b") as f:
        f.seek(size // 2 - n // 2)
        old = f.read(n)
        f.seek(size // 2 - n // 2)
        f.write(bytes((b + 1) % 256 for b in old))
    assert os.path.getsize(path) == size


def test_a_checkpoint_corrupted_in_place_is_skipped_with_its_file_named(tmp_path):
    out = tmp_path / "run"
    straight = pretrain(PretrainArgs(out=str(out), steps=4, save_every=2, keep_last=0, log_every=1, **FAST))
    newest = str(out / "ckpt_00000004")
    shard = sorted(glob.glob(os.path.join(newest, "dcp", "*.distcp")))[0]
    _overwrite_middle(shard)  # 4 KB inside the DCP shard, the size unchanged
    with pytest.warns(
        UserWarning, match=r"skipped checkpoint .*ckpt_00000004 cannot be read \(.*distcp has CRC-32 .*checksum"
    ) as caught:
        state = load_latest(str(out))
    assert state["step"] == 2 and shard in str(caught[0].message)
    # named explicitly: an error naming the file
    with pytest.raises(RuntimeError, match=r"ckpt_00000004 cannot be read \(.*distcp has CRC-32"):
        load_resume_state(newest, str(out))
    # --resume auto continues from step 2 to the uncorrupted run's weights
    with pytest.warns(UserWarning, match="skipped checkpoint"):
        resumed = pretrain(PretrainArgs(out=str(out), steps=4, save_every=2, keep_last=0, resume="auto", log_every=1, **FAST))
    assert [r["step"] for r in resumed["history"]] == [3, 4]
    _same_weights(straight["model"], resumed["model"])
    assert checkpoint.verify_checksums(newest).endswith("checksums verified")  # step 4 written again


def test_a_checkpoint_without_checksums_still_resumes_and_says_so(tmp_path):
    out = tmp_path / "run"
    pretrain(PretrainArgs(out=str(out), steps=2, **FAST))
    os.remove(out / "ckpt_00000002" / checkpoint.CHECKSUM_FILE)  # as checkpoints of earlier versions
    with pytest.warns(UserWarning, match=r"ckpt_00000002: no checksum recorded"):
        res = pretrain(PretrainArgs(out=str(out), steps=3, resume="auto", **FAST))
    assert res["step"] == 3


# ---- 8. fine-tuning resumed mid-epoch logs the whole epoch's mean ------------------------------------


def test_finetune_resumed_mid_epoch_logs_the_straight_runs_epoch_mean(tmp_path, monkeypatch):
    import geomoe.finetune as ft

    from tests.test_hostile import _class_folder

    data = _class_folder(tmp_path / "d", bad=False)  # 16 training images: 4 steps of 4 per epoch
    args = dict(data=str(data), img_size=32, epochs=2, batch_size=4, progress=False, device="cpu")
    straight = ft.finetune(ft.FinetuneArgs(out=str(tmp_path / "a"), **args))
    original, calls = ft.mix_batch, {"n": 0}

    def mix_batch(*a, **k):  # SIGTERM during the third step of epoch 1: saved at step 3
        calls["n"] += 1
        if calls["n"] == 3:
            os.kill(os.getpid(), signal.SIGTERM)
        return original(*a, **k)

    with monkeypatch.context() as m:
        m.setattr(ft, "mix_batch", mix_batch)
        first = ft.finetune(ft.FinetuneArgs(out=str(tmp_path / "b"), **args))
    assert first["history"] == [] and _names(tmp_path / "b") == ["ckpt_00000003"]
    resumed = ft.finetune(ft.FinetuneArgs(out=str(tmp_path / "b"), resume="auto", **args))
    assert [h["epoch"] for h in resumed["history"]] == [1, 2]
    for got, want in zip(resumed["history"], straight["history"]):
        for key in ("loss", "val_top1", "val_loss", "bad_steps", "skipped_images"):
            assert got[key] == want[key], (got["epoch"], key)
    _same_weights(straight["model"], resumed["model"])


# ---- 7. --init-weights of another model is refused unless partial loads are allowed ----------------


def test_init_weights_of_another_model_is_refused_unless_partial_is_allowed(tmp_path, capsys):
    from geomoe import GeoMoE, original_state_dict
    from geomoe.configs import CONFIGS

    vit = pretrain(PretrainArgs(out=str(tmp_path / "vit"), model="moevit", steps=1, **FAST))["checkpoint"]
    with pytest.raises(
        ValueError,
        match=r"argument '--init-weights' expected weights for every encoder tensor of this GeoMoE .* got \S+ with \d+ of "
        r"its \d+ tensors; missing: .*--allow-partial-init",
    ):
        pretrain(PretrainArgs(out=str(tmp_path / "a"), init_weights=vit, steps=1, **FAST))
    assert not list_checkpoints(str(tmp_path / "a"))  # refused before any step
    res = pretrain(PretrainArgs(out=str(tmp_path / "a"), init_weights=vit, allow_partial_init=True, steps=1, **FAST))
    assert "left at their initial values" in capsys.readouterr().out and res["step"] == 1
    # the released weights are encoder-only: the decoder side may be missing, and is named
    src = GeoMoE(**CONFIGS["tiny"]["model"])
    enc = {k: v for k, v in original_state_dict(src).items() if not k.startswith(("decoder", "stage", "norm.", "mask_token"))}
    torch.save({"model": enc}, tmp_path / "released.pth")
    res = pretrain(PretrainArgs(out=str(tmp_path / "b"), init_weights=str(tmp_path / "released.pth"), steps=1, lr=1e-12, **FAST))
    out = capsys.readouterr().out
    assert "left at their initial values (decoder" in out
    torch.testing.assert_close(res["model"].blocks3[1].mlp.w1, src.blocks3[1].mlp.w1, rtol=0, atol=1e-6)


# ---- 14. a resume with another model or class count says what the checkpoint holds -----------------


def test_resuming_with_another_model_or_class_count_says_what_the_checkpoint_holds(tmp_path):
    import shutil

    from geomoe.configs import CONFIGS
    from geomoe.finetune import FinetuneArgs, finetune
    from geomoe.moevit import MoEViTMAE

    from tests.test_hostile import _class_folder

    ckpt = pretrain(PretrainArgs(out=str(tmp_path / "pre"), steps=1, **FAST))["checkpoint"]
    with pytest.raises(
        ValueError, match=r"written by a run with --model geomoe; this run has --model moevit: resume it with --model geomoe"
    ):
        pretrain(PretrainArgs(out=str(tmp_path / "pre"), model="moevit", steps=2, resume="auto", **FAST))
    # a checkpoint without the run record (earlier versions): its tensors against the run's model
    from geomoe.runtime import check_checkpoint_fits

    state = load(ckpt)
    del state["run"]
    with pytest.raises(
        ValueError,
        match=r"holds the weights of --model geomoe, --config tiny; this run asked for --model moevit, --config tiny, 3 "
        r"bands: \d+ of this run's \d+ tensors are not in it \(.* more\); \d+ of its \d+ tensors are not in this run's "
        r"model \(.* more\)(; \d+ have another shape \(.*\))?\. Resume it with the arguments it was written with",
    ):
        check_checkpoint_fits(
            state, MoEViTMAE(**CONFIGS["tiny"]["moevit"]).state_dict(), "--model moevit, --config tiny, 3 bands"
        )
    # fine-tuning resumed on data with another class count
    two = _class_folder(tmp_path / "two", bad=False)
    three = tmp_path / "three"
    shutil.copytree(two, three)
    for split in ("train", "val"):
        shutil.copytree(three / split / "dark", three / split / "mid")
    args = dict(out=str(tmp_path / "ft"), img_size=32, epochs=1, batch_size=4, progress=False, device="cpu")
    finetune(FinetuneArgs(data=str(two), **args))
    with pytest.raises(
        ValueError,
        match=r"holds the weights of --model geomoe, --config tiny, 3 bands, 2 classes; this run asked for --model geomoe, "
        r"--config tiny, 3 bands, 3 classes: 2 have another shape \(head.weight: checkpoint \[2, 128\], this run \[3, 128\], "
        r"head.bias: checkpoint \[2\], this run \[3\]\)",
    ):
        with pytest.warns(UserWarning, match="--data"):
            finetune(FinetuneArgs(data=str(three), resume="auto", **args))
