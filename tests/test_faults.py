"""Faults a multi-day run meets: kill -9 during a save, SIGTERM, non-finite losses, unreadable images."""

import json
import os
import signal
import subprocess
import sys
import time
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from geomoe import GeoMoE
from geomoe.checkpoint import list_checkpoints, load
from geomoe.report import write_report
from geomoe.train import PretrainArgs, pretrain

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FAST = dict(batch_size=8, progress=False, device="cpu", tensorboard=False)


def _cli(out, *extra, env_extra=None):
    cmd = [
        sys.executable,
        "-m",
        "geomoe",
        "pretrain",
        "--config",
        "tiny",
        "--batch-size",
        "8",
        "--out",
        str(out),
        "--no-progress",
        "--no-tensorboard",
        *extra,
    ]
    return subprocess.Popen(
        cmd, cwd=ROOT, env=dict(os.environ, **(env_extra or {})), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )


def _wait_for(path, proc, timeout=120):
    t0 = time.time()
    while not os.path.exists(path):
        assert proc.poll() is None, proc.stdout.read()
        assert time.time() - t0 < timeout, f"{path} never appeared"
        time.sleep(0.05)


def test_kill_during_save_loses_only_unsaved_steps(tmp_path):
    out = tmp_path / "run"
    proc = _cli(out, "--steps", "6", "--save-every", "2", "--log-every", "1", env_extra={"GEOMOE_FAULT_SLOW_SAVE": "2"})
    _wait_for(out / ".ckpt_00000004.tmp" / "model.safetensors", proc)  # step 4's save has begun
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    names = [os.path.basename(p) for p in list_checkpoints(str(out))]
    assert names == ["ckpt_00000002"]  # the half-written step 4 never counts
    assert load(str(out / "ckpt_00000002"))["step"] == 2
    resumed = pretrain(PretrainArgs(out=str(out), steps=6, resume="auto", log_every=1, **FAST))
    straight = pretrain(PretrainArgs(out=str(tmp_path / "straight"), steps=6, log_every=1, **FAST))
    assert not os.path.exists(out / ".ckpt_00000004.tmp")  # cleaned up by the next save
    a, b = straight["model"].state_dict(), resumed["model"].state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_sigterm_writes_a_checkpoint_and_exits(tmp_path):
    out = tmp_path / "run"
    proc = _cli(out, "--steps", "500", "--log-every", "1")
    _wait_for(out / "metrics.jsonl", proc)
    proc.send_signal(signal.SIGTERM)
    text, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, text
    assert "SIGTERM: stopped at step" in text
    step = int(text.split("SIGTERM: stopped at step ")[1].split(";")[0])
    assert 1 <= step < 500
    assert os.path.basename(list_checkpoints(str(out))[-1]) == f"ckpt_{step:08d}"
    resumed = pretrain(PretrainArgs(out=str(out), steps=step + 1, resume="auto", **FAST))
    assert resumed["step"] == step + 1


def _inject_nan(monkeypatch, bad_calls):
    original = GeoMoE.forward
    calls = {"n": 0}

    def forward(self, *args, **kwargs):
        loss, aux, load = original(self, *args, **kwargs)
        calls["n"] += 1
        return (loss * float("nan") if calls["n"] in bad_calls else loss), aux, load

    monkeypatch.setattr(GeoMoE, "forward", forward)


def test_non_finite_loss_skips_the_step(tmp_path, monkeypatch):
    _inject_nan(monkeypatch, {2, 3})
    with pytest.warns(UserWarning, match="non-finite loss"):
        res = pretrain(PretrainArgs(out=str(tmp_path / "run"), steps=6, log_every=6, **FAST))
    assert res["history"][-1]["bad_steps"] == 2
    assert all(torch.isfinite(p).all() for p in res["model"].parameters())


def test_too_many_non_finite_losses_stop_the_run(tmp_path, monkeypatch):
    _inject_nan(monkeypatch, {3, 4, 5})
    with pytest.raises(RuntimeError, match=r"stopping at step 5: 3 steps in a row had a non-finite loss"):
        with pytest.warns(UserWarning):
            pretrain(PretrainArgs(out=str(tmp_path / "run"), steps=8, save_every=2, max_bad_steps=3, **FAST))
    assert [os.path.basename(p) for p in list_checkpoints(str(tmp_path / "run"))] == ["ckpt_00000002", "ckpt_00000004"]


def test_unreadable_images_are_skipped_and_counted(tmp_path):
    root = tmp_path / "data" / "region"
    root.mkdir(parents=True)
    for i in range(14):
        Image.fromarray((np.random.rand(80, 80, 3) * 255).astype(np.uint8)).save(root / f"{i}.png")
    (root / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    (root / "empty.tif").write_bytes(b"")
    with pytest.warns(UserWarning, match="skipping unreadable image") as caught:
        res = pretrain(
            PretrainArgs(
                out=str(tmp_path / "run"),
                data=str(tmp_path / "data"),
                steps=4,
                batch_size=4,
                log_every=4,
                **{k: v for k, v in FAST.items() if k != "batch_size"},
            )
        )
    named = " ".join(str(w.message) for w in caught)
    assert "broken.jpg" in named and "empty.tif" in named
    rec = res["history"][-1]
    assert rec["skipped_images"] >= 1  # the 16 files are all drawn in 4 steps of 4: both broken ones
    assert rec["skipped_images"] == 2


def test_report_plots_a_run(tmp_path):
    pretrain(PretrainArgs(out=str(tmp_path / "run"), steps=4, log_every=1, **FAST))
    rows = [json.loads(l) for l in open(tmp_path / "run" / "metrics.jsonl")]
    for key in (
        "loss",
        "lr",
        "images_per_s",
        "tokens_per_s",
        "aux_per_layer",
        "load_per_layer",
        "expert_bias_per_layer",
        "grad_norm",
        "memory_bytes",
    ):
        assert key in rows[0], key
    made = write_report(str(tmp_path / "run"))
    assert sorted(os.path.basename(p) for p in made) == ["expert_load.png", "loss.png", "throughput.png"]
    assert all(os.path.getsize(p) > 1000 for p in made)


def _dcp_contents(ckpt, tmp_path):
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    dest = tmp_path / f"{os.path.basename(os.path.dirname(ckpt))}_{os.path.basename(ckpt)}.pt"
    with warnings.catch_warnings():  # one process: DCP says it assumes so
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp_to_torch_save(os.path.join(ckpt, "dcp"), dest)
    return torch.load(dest, weights_only=False)


def _assert_same(a, b, where=""):
    if isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for k in a:
            _assert_same(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, torch.Tensor):
        assert torch.equal(a, b), where
    else:
        assert a == b, where


def test_async_save_writes_what_a_synchronous_save_writes(tmp_path):
    """--async-save: every checkpoint (weights, DCP model and optimizer state, train state) equals the
    synchronous run's, although training changed the parameters while the files were written."""
    from safetensors.torch import load_file

    common = dict(steps=3, save_every=1, keep_last=0, log_every=1, **FAST)
    sync = pretrain(PretrainArgs(out=str(tmp_path / "sync"), **common))
    background = pretrain(PretrainArgs(out=str(tmp_path / "async"), async_save=True, **common))
    assert [r["loss"] for r in background["history"]] == [r["loss"] for r in sync["history"]]
    for step in (1, 2, 3):
        a, b = (str(tmp_path / run / f"ckpt_{step:08d}") for run in ("sync", "async"))
        _assert_same(load_file(os.path.join(a, "model.safetensors")), load_file(os.path.join(b, "model.safetensors")))
        _assert_same(_dcp_contents(a, tmp_path), _dcp_contents(b, tmp_path), f"step {step} dcp")
        sa, sb = load(a), load(b)
        assert sa["step"] == sb["step"] == step and sa["data"] == sb["data"]
    assert not [p for p in os.listdir(tmp_path / "async") if p.endswith(".tmp")]


def test_kill_during_async_save_keeps_the_previous_checkpoint(tmp_path):
    """The steps go on while an asynchronous save is written (step 5 runs while step 4's writer is
    held); a kill -9 then leaves step 4 a .tmp directory that never counts, and step 2 resumes."""
    out = tmp_path / "run"
    proc = _cli(
        out,
        "--steps",
        "6",
        "--save-every",
        "2",
        "--log-every",
        "1",
        "--async-save",
        env_extra={"GEOMOE_FAULT_ASYNC_HOLD_FROM": "4"},
    )
    _wait_for(out / ".ckpt_00000004.tmp", proc)  # step 2 is committed by then, step 4's writes in flight
    t0 = time.time()
    while '"step": 5' not in (open(out / "metrics.jsonl").read() if os.path.exists(out / "metrics.jsonl") else ""):
        assert proc.poll() is None and time.time() - t0 < 60, "step 5 never ran"
        time.sleep(0.05)
    assert not os.path.exists(out / ".ckpt_00000004.tmp" / "model.safetensors")  # its writer is held
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    assert [os.path.basename(p) for p in list_checkpoints(str(out))] == ["ckpt_00000002"]
    assert load(str(out / "ckpt_00000002"))["step"] == 2
    resumed = pretrain(PretrainArgs(out=str(out), steps=6, resume="auto", log_every=1, async_save=True, **FAST))
    assert resumed["step"] == 6 and resumed["checkpoint"].endswith("ckpt_00000006")
    assert [os.path.basename(p) for p in list_checkpoints(str(out))] == ["ckpt_00000002", "ckpt_00000006"]
