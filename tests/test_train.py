import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from geomoe import GeoMoE
from geomoe.checkpoint import list_checkpoints, load_latest
from geomoe.configs import CONFIGS
from geomoe.trainer import Checkpointer, lr_at
from geomoe.train import PretrainArgs, pretrain

FAST = dict(steps=4, batch_size=8, log_every=2, progress=False, device="cpu")


def test_main_job_runs_from_the_command_line(tmp_path):
    out = tmp_path / "run"
    cmd = [
        sys.executable,
        "-m",
        "geomoe",
        "pretrain",
        "--config",
        "tiny",
        "--steps",
        "4",
        "--batch-size",
        "8",
        "--log-every",
        "2",
        "--out",
        str(out),
        "--no-progress",
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "img/s" in proc.stdout and "loss" in proc.stdout and "expert load" in proc.stdout
    rows = [json.loads(l) for l in open(out / "metrics.jsonl")]
    assert [r["step"] for r in rows] == [2, 4]
    assert all(math.isfinite(r["loss"]) and r["images_per_s"] > 0 for r in rows)
    assert [os.path.basename(p) for p in list_checkpoints(str(out))] == ["ckpt_00000004"]
    assert sorted(os.listdir(out / "ckpt_00000004")) == ["checksums.json", "dcp", "model.safetensors", "train_state.pt"]


def test_tiny_model_overfits_one_batch():
    torch.manual_seed(0)
    model = GeoMoE(**CONFIGS["tiny"]["model"])
    imgs = torch.randn(8, 3, 96, 96).cumsum(-1) / 10  # smooth, image-like rows
    noise = torch.rand(8, 36)
    opt = torch.optim.AdamW(model.parameters(), lr=4e-3, betas=(0.9, 0.95))
    losses = []
    for _ in range(50):
        loss, aux, loads = model(imgs, noise=noise)
        opt.zero_grad()
        (loss + 1e-4 * aux.sum()).backward()
        opt.step()
        model.update_expert_biases(loads)
        losses.append(float(loss.detach()))
    assert losses[-1] < 0.5 * losses[0], losses[::10]


def test_resume_is_exact(tmp_path):
    straight = pretrain(PretrainArgs(out=str(tmp_path / "a"), **FAST))
    first = pretrain(PretrainArgs(out=str(tmp_path / "b"), stop_after=2, **FAST))
    resumed = pretrain(PretrainArgs(out=str(tmp_path / "b"), resume="auto", **FAST))
    a = straight["model"].state_dict()
    b = resumed["model"].state_dict()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert straight["history"][-1]["loss"] == resumed["history"][-1]["loss"]
    assert first["history"][-1]["step"] == 2


def test_resume_restores_every_global_generator_it_saved(tmp_path, monkeypatch):
    """The run's own randomness (masking) is seeded by (seed, step); anything else that draws from
    the global generators (dropout, drop path, a library) continues on resume as in the straight run
    only if resume restores them. Each step here draws from them first, as such a consumer would;
    the generators' states at every step of the resumed run equal the straight run's, on the CPU
    and, where there is one, on every CUDA device."""
    from geomoe import train as T

    seen = {}
    real_step = T.PretrainTask.train_step

    def drawing_step(self, batch, lr, step):
        torch.rand(1)  # a consumer of the global CPU generator
        if torch.cuda.is_available():
            torch.rand(1, device="cuda")
        seen.setdefault(self.args.out, {})[step] = rng_states()
        return real_step(self, batch, lr, step)

    def rng_states():
        states = [torch.get_rng_state()]
        if torch.cuda.is_available():
            states += torch.cuda.get_rng_state_all()
        return states

    monkeypatch.setattr(T.PretrainTask, "train_step", drawing_step)
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    pretrain(PretrainArgs(out=a, **FAST))
    pretrain(PretrainArgs(out=b, stop_after=2, **FAST))
    torch.manual_seed(12345)  # what the process did in between does not matter
    pretrain(PretrainArgs(out=b, resume="auto", **FAST))
    assert sorted(seen[a]) == [0, 1, 2, 3] and sorted(seen[b]) == [0, 1, 2, 3]
    for step in (2, 3):  # the resumed steps
        for i, (x, y) in enumerate(zip(seen[a][step], seen[b][step])):
            assert torch.equal(x, y), f"step {step}: generator {'cpu' if i == 0 else f'cuda:{i - 1}'} differs"


def test_corrupt_newest_checkpoint_falls_back(tmp_path):
    out = tmp_path / "run"
    pretrain(PretrainArgs(out=str(out), save_every=2, **FAST))
    newest = list_checkpoints(str(out))[-1]
    with open(os.path.join(newest, "model.safetensors"), "r+b") as f:
        f.truncate(100)
    with pytest.warns(UserWarning, match="cannot be read"):
        state = load_latest(str(out))
    assert state["step"] == 2


def test_lr_schedule():
    peak, total, warm = 1.0, 100, 10
    assert lr_at(0, total, peak, warm, 1e-3) == pytest.approx(0.1)
    assert lr_at(9, total, peak, warm, 1e-3) == pytest.approx(1.0)
    assert lr_at(10, total, peak, warm, 1e-3) == pytest.approx(1.0)
    assert lr_at(100, total, peak, warm, 1e-3) == pytest.approx(1e-3)
    assert lr_at(55, total, peak, warm, 1e-3) == pytest.approx(1e-3 + (1 - 1e-3) * 0.5)


def test_image_folder_data(tmp_path):
    root = tmp_path / "data"
    for sub in ("scene_a", "scene_b"):
        (root / sub).mkdir(parents=True)
        for i in range(5):
            arr = (np.random.rand(120, 150, 3) * 255).astype(np.uint8)
            Image.fromarray(arr).save(root / sub / f"{i}.{'png' if i % 2 else 'jpg'}")
    (root / "notes.txt").write_text("not an image, not in a subfolder")
    res = pretrain(PretrainArgs(out=str(tmp_path / "run"), data=str(root), **FAST))
    assert math.isfinite(res["history"][-1]["loss"])


def test_bad_data_dir_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="--data"):
        pretrain(PretrainArgs(out=str(tmp_path / "r"), data=str(tmp_path / "nope"), **FAST))


def test_moevit_pretrains_with_the_same_loop_and_its_loss_falls(tmp_path):
    """geomoe pretrain --model moevit: the MoE-ViT on GeoMoE's objective; the loss falls over a short
    run and the checkpoint resumes exactly like GeoMoE's."""
    args = dict(FAST, steps=16, log_every=4, lr=3e-3, model="moevit")
    res = pretrain(PretrainArgs(out=str(tmp_path / "run"), **args))
    losses = [r["loss"] for r in res["history"]]
    assert len(losses) == 4 and losses[-1] < 0.9 * losses[0], losses
    assert type(res["model"]).__name__ == "MoEViTMAE"
    first = pretrain(PretrainArgs(out=str(tmp_path / "b"), **dict(args, stop_after=8)))
    resumed = pretrain(PretrainArgs(out=str(tmp_path / "b"), resume="auto", **args))
    assert first["history"][-1]["step"] == 8 and resumed["history"][-1]["loss"] == losses[-1]


def test_checkpoint_without_dcp_state_still_resumes(tmp_path, monkeypatch):
    """A checkpoint of the format before the DCP state (optimizer in train_state.pt) resumes exactly."""
    straight = pretrain(PretrainArgs(out=str(tmp_path / "a"), **FAST))
    with monkeypatch.context() as m:
        m.setattr(Checkpointer, "_uses_dcp", lambda self: False)
        pretrain(PretrainArgs(out=str(tmp_path / "b"), stop_after=2, **FAST))
    old = list_checkpoints(str(tmp_path / "b"))[-1]
    assert sorted(os.listdir(old)) == ["checksums.json", "model.safetensors", "train_state.pt"]
    state = torch.load(os.path.join(old, "train_state.pt"), weights_only=True)
    assert "format" not in state and "optimizer" in state  # as the earlier code wrote it
    resumed = pretrain(PretrainArgs(out=str(tmp_path / "b"), resume="auto", **FAST))
    a, b = straight["model"].state_dict(), resumed["model"].state_dict()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_optimizer_state_of_the_wrong_shape_is_refused_by_name(tmp_path, monkeypatch):
    """load_state_dict does not check moment shapes, and a fused AdamW step on a mismatched one reads
    out of bounds: a resume refuses it first, naming the parameter and both shapes."""
    with monkeypatch.context() as m:
        m.setattr(Checkpointer, "_uses_dcp", lambda self: False)
        pretrain(PretrainArgs(out=str(tmp_path / "b"), stop_after=2, **FAST))
    old = list_checkpoints(str(tmp_path / "b"))[-1]
    path = os.path.join(old, "train_state.pt")
    state = torch.load(path, weights_only=True)
    moments = next(v for v in state["optimizer"]["state"].values() if v["exp_avg"].dim() == 2)
    moments["exp_avg"] = moments["exp_avg"][:, :1].clone()
    torch.save(state, path)
    os.remove(os.path.join(old, "checksums.json"))  # else the changed file fails its checksum first
    with pytest.raises(
        ValueError, match=r"optimizer state 'exp_avg' of parameter \S+ has shape \[\d+, 1\], the parameter \[\d+, \d+\]"
    ):
        pretrain(PretrainArgs(out=str(tmp_path / "b"), resume="auto", **FAST))


def test_truncated_dcp_state_falls_back(tmp_path):
    out = tmp_path / "run"
    pretrain(PretrainArgs(out=str(out), save_every=2, **FAST))
    newest = list_checkpoints(str(out))[-1]
    data = [f for f in os.listdir(os.path.join(newest, "dcp")) if f.endswith(".distcp")]
    with open(os.path.join(newest, "dcp", data[0]), "r+b") as f:
        f.truncate(10)
    with pytest.warns(UserWarning, match="truncated"):
        state = load_latest(str(out))
    assert state["step"] == 2
