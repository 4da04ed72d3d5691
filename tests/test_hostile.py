"""What a hostile-input sweep found (issue #20), one test per finding, and the two general rules: a
run never deletes a checkpoint it did not write or its newest readable one; a signal to the process
group at random moments always leaves a resumable run."""

import contextlib
import json
import os
import random
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
from PIL import Image

from geomoe import GeoMoE, checkpoint
from geomoe.backbone import GeoMoEBackbone
from geomoe.cli import main
from geomoe.configs import CONFIGS
from geomoe.data import ImageFolder, open_image
from geomoe.finetune import FinetuneArgs, GeoMoEClassifier, finetune, load_pretrained
from geomoe.report import write_report
from geomoe.runtime import load_resume_state
from geomoe.train import PretrainArgs, pretrain
from geomoe_kernels import MoEMLP, OpInputError, expert_mlp, grouped_mm

from tests.dist_worker import killed_peer, stalled_peer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FAST = dict(batch_size=8, progress=False, device="cpu", tensorboard=False)
ENC = {k: v for k, v in CONFIGS["tiny"]["model"].items() if not k.startswith("decoder")}


def _cli(out, *extra, env_extra=None, log=None):
    """`geomoe pretrain` in its own process group (what a scheduler or a shell's job control signals);
    its output to a pipe, or to the file `log` (then waiting for it does not wait for its workers)."""
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
    sink = subprocess.PIPE if log is None else open(log, "w")
    return subprocess.Popen(
        cmd,
        cwd=ROOT,
        env=dict(os.environ, OMP_NUM_THREADS="1", **(env_extra or {})),
        stdout=sink,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )


def _wait_for(path, proc, timeout=120):
    t0 = time.time()
    while not os.path.exists(path):
        if proc.poll() is not None:
            raise AssertionError(proc.stdout.read())
        assert time.time() - t0 < timeout, f"{path} never appeared"
        time.sleep(0.02)


def _names(out):
    return [os.path.basename(p) for p in checkpoint.list_checkpoints(str(out))]


def _snapshot(directory):
    return sorted(
        (os.path.relpath(os.path.join(d, f), directory), os.path.getsize(os.path.join(d, f)))
        for d, _, files in os.walk(directory)
        for f in files
        if f != ".lock"
    )


def _truncate(ckpt_dir):
    with open(os.path.join(ckpt_dir, checkpoint.MODEL_FILE), "r+b") as f:
        f.truncate(100)


@contextlib.contextmanager
def _deadline(seconds):
    """A hang becomes a failure (SIGALRM interrupts even a blocked open())."""

    def expired(signum, frame):
        raise TimeoutError(f"still blocked after {seconds} s")

    old = signal.signal(signal.SIGALRM, expired)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


# ---- 1. a run owns its directory -----------------------------------------------------------------


def test_1_a_run_owns_its_directory(tmp_path):
    out = tmp_path / "run"
    pretrain(PretrainArgs(out=str(out), steps=4, save_every=2, keep_last=0, **FAST))
    assert _names(out) == ["ckpt_00000002", "ckpt_00000004"]
    # a fresh run into it (the shared default --out) is refused, says what is there, and changes nothing
    before = _snapshot(out)
    with pytest.raises(RuntimeError, match=r"holds ckpt_00000002, ckpt_00000004 of an earlier run: pass --resume auto"):
        pretrain(PretrainArgs(out=str(out), steps=4, keep_last=1, **FAST))
    assert _snapshot(out) == before
    # resuming past a corrupt newest checkpoint with --keep-last 1 keeps what it wrote, and the corrupt one
    _truncate(out / "ckpt_00000004")
    with pytest.warns(UserWarning, match="ckpt_00000004 cannot be read"):
        pretrain(PretrainArgs(out=str(out), steps=4, stop_after=1, keep_last=1, resume="auto", **FAST))
    assert _names(out) == ["ckpt_00000003", "ckpt_00000004"]
    assert checkpoint.load(str(out / "ckpt_00000003"))["step"] == 3
    # the next resume starts from step 3; saving step 4 over the unreadable one keeps that one aside
    with pytest.warns(UserWarning, match="not written by this run or cannot be read: kept, renamed to ckpt_00000004.set-aside"):
        res = pretrain(PretrainArgs(out=str(out), steps=4, keep_last=1, resume="auto", **FAST))
    assert res["step"] == 4 and _names(out) == ["ckpt_00000004"]
    assert checkpoint.load(str(out / "ckpt_00000004"))["step"] == 4
    assert os.path.getsize(out / "ckpt_00000004.set-aside" / checkpoint.MODEL_FILE) == 100


def _fake_checkpoint(out, step, run_id, readable=True):
    state = {"step": step, "world": 1, "optimizer": {}}
    if run_id is not None:
        state["run"] = {"id": run_id}
    path = checkpoint.save(str(out), step, {"w": torch.full((4,), float(step))}, state)
    if not readable:
        _truncate(path)


@pytest.mark.parametrize("seed", range(6))
def test_rule_pruning_never_deletes_what_the_run_did_not_write_or_its_newest_readable(tmp_path, seed):
    """Random directories of this run's, another run's, legacy (no identity) and unreadable
    checkpoints, pruned with a random keep_last: only this run's verified older ones go."""
    rng = random.Random(seed)
    out = tmp_path / "run"
    out.mkdir()
    kinds = {}
    for step in rng.sample(range(1, 40), rng.randint(3, 9)):
        kind = rng.choice(["ours", "ours", "ours", "other", "legacy", "ours-unreadable", "other-unreadable"])
        _fake_checkpoint(
            out, step, {"other": "B", "legacy": None}.get(kind.split("-")[0], "A"), readable=not kind.endswith("unreadable")
        )
        kinds[step] = kind
    (out / ".ckpt_00000099.tmp").mkdir()  # a crash's leftover
    keep = rng.randint(1, 3)
    readable = sorted(s for s, k in kinds.items() if not k.endswith("unreadable"))
    removed = checkpoint.prune(str(out), keep, "A")
    left = {int(n.split("_")[1]) for n in _names(out)}
    gone = set(kinds) - left
    assert gone == {int(os.path.basename(p).split("_")[1]) for p in removed}
    assert all(kinds[s] == "ours" for s in gone), (kinds, gone)  # only this run's, only readable ones
    if readable:
        assert readable[-1] in left  # the newest that reads, whoever wrote it
    ours = sorted(s for s, k in kinds.items() if k == "ours")
    assert gone == set(ours[:-keep])  # and exactly this run's older ones
    assert not (out / ".ckpt_00000099.tmp").exists()


# ---- 2. SIGTERM to the process group, with loader workers ----------------------------------------


def test_2_sigterm_to_the_process_group_with_workers_saves_and_exits(tmp_path):
    out = tmp_path / "run"
    proc = _cli(out, "--steps", "500", "--log-every", "1", "--workers", "2")
    _wait_for(out / "metrics.jsonl", proc)
    os.killpg(proc.pid, signal.SIGTERM)  # the workers get it too
    text, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, text
    assert "killed by signal" not in text
    step = int(text.split("SIGTERM: stopped at step ")[1].split(";")[0])
    assert _names(out)[-1] == f"ckpt_{step:08d}"
    resumed = pretrain(PretrainArgs(out=str(out), steps=step + 1, resume="auto", workers=2, **FAST))
    assert resumed["step"] == step + 1


def test_2_a_second_signal_stops_at_once(tmp_path):
    out = tmp_path / "run"
    proc = _cli(
        out,
        "--steps",
        "500",
        "--log-every",
        "1",
        "--workers",
        "2",
        env_extra={"GEOMOE_FAULT_SLOW_SAVE": "30"},
        log=tmp_path / "log",
    )
    _wait_for(out / "metrics.jsonl", proc)
    os.killpg(proc.pid, signal.SIGINT)
    t0 = time.time()
    while not any(n.endswith(".tmp") for n in os.listdir(out)):  # the save it asked for has begun (and is slow)
        assert proc.poll() is None and time.time() - t0 < 60
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGINT)
    t0 = time.time()
    proc.wait(timeout=10)
    assert proc.returncode == -signal.SIGINT and time.time() - t0 < 5
    # nothing half-written counts, and the workers it left for a moment hold no lock: a resume starts at once
    res = pretrain(PretrainArgs(out=str(out), steps=1, resume="auto", **FAST))
    assert res["step"] == 1


def test_2_finetune_saves_and_stops_on_a_signal_too(tmp_path, monkeypatch):
    import geomoe.finetune as ft

    data = _class_folder(tmp_path / "d", bad=False)
    original, calls = ft.mix_batch, {"n": 0}

    def mix_batch(*args, **kwargs):  # the signal arrives during the second step
        calls["n"] += 1
        if calls["n"] == 2:
            os.kill(os.getpid(), signal.SIGTERM)
        return original(*args, **kwargs)

    monkeypatch.setattr(ft, "mix_batch", mix_batch)
    args = dict(data=str(data), out=str(tmp_path / "ft"), img_size=32, epochs=2, batch_size=4, progress=False, device="cpu")
    first = finetune(FinetuneArgs(**args))
    assert first["history"] == [] and _names(tmp_path / "ft") == ["ckpt_00000002"]  # mid-epoch, saved
    more = finetune(FinetuneArgs(resume="auto", **args))
    assert [h["epoch"] for h in more["history"]] == [1, 2] and _names(tmp_path / "ft")[-1] == "ckpt_00000008"


# ---- 3. re-saving a step is atomic ---------------------------------------------------------------


class _Killed(BaseException):
    """Stands for kill -9: nothing catches it, and nothing after it runs in the process."""


def test_3_a_kill_while_resaving_a_step_loses_nothing(tmp_path, monkeypatch):
    out = tmp_path / "run"
    pretrain(PretrainArgs(out=str(out), steps=2, **FAST))
    before = checkpoint.load(str(out / "ckpt_00000002"))

    def killed(name):  # the instant between setting the old step 2 aside and renaming the new one in
        if name == "SLOW_COMMIT":
            raise _Killed

    # step 2 saved again (as by a resumed run that passed a corrupt newer checkpoint), dying in that
    # instant (a resumed run that ends where it began no longer saves: it says the run is complete)
    monkeypatch.setattr(checkpoint, "_fault_pause", killed)
    train_state = {k: v for k, v in before.items() if k not in ("model", "path")}
    with pytest.raises(_Killed):
        checkpoint.save(str(out), 2, before["model"], train_state)
    monkeypatch.undo()
    assert _names(out) == [] and (out / ".ckpt_00000002.old").is_dir()  # step 2 exists only set aside
    with pytest.warns(UserWarning, match="restored .*ckpt_00000002"):
        res = pretrain(PretrainArgs(out=str(out), steps=3, resume="auto", **FAST))
    assert res["step"] == 3 and _names(out) == ["ckpt_00000002", "ckpt_00000003"]
    after = checkpoint.load(str(out / "ckpt_00000002"))
    assert all(torch.equal(before["model"][k], after["model"][k]) for k in before["model"])


# ---- 4. finetune --weights loads strictly --------------------------------------------------------


def test_4_finetune_weights_load_strictly_with_a_report(tmp_path):
    run = pretrain(PretrainArgs(out=str(tmp_path / "pre"), steps=1, **FAST))
    ckpt = run["checkpoint"]
    want = checkpoint.load(ckpt)["model"]
    for source in (ckpt, os.path.join(ckpt, checkpoint.MODEL_FILE)):  # the directory or its weights file
        bb = GeoMoEBackbone(**ENC)
        note = load_pretrained(bb, source)
        assert "loaded 81 of 81 backbone tensors" in note
        assert all(torch.equal(v, want[k]) for k, v in bb.state_dict().items())  # every expert included
    # a fine-tuning checkpoint directory: its backbone, all of it
    clf = GeoMoEClassifier(GeoMoEBackbone(**ENC), 4)
    checkpoint.save(str(tmp_path / "ft"), 3, clf.state_dict(), {"step": 3})
    bb = GeoMoEBackbone(**ENC)
    assert "loaded 81 of 81" in load_pretrained(bb, str(tmp_path / "ft" / "ckpt_00000003"))
    assert torch.equal(bb.blocks3[1].mlp.w1, clf.backbone.blocks3[1].mlp.w1)
    # an unrelated file, or one lacking tensors: an error naming the flag and what is missing
    torch.save({"conv.weight": torch.zeros(3, 3)}, tmp_path / "unrelated.pt")
    with pytest.raises(
        ValueError,
        match=r"'--weights' expected weights for every backbone tensor.* 0 of 81.*"
        r"--allow-partial-weights",
    ):
        load_pretrained(GeoMoEBackbone(**ENC), str(tmp_path / "unrelated.pt"))
    half = {k: v for i, (k, v) in enumerate(want.items()) if i % 2}
    torch.save(half, tmp_path / "half.pt")
    with pytest.raises(ValueError, match=r"missing: "):
        load_pretrained(GeoMoEBackbone(**ENC), str(tmp_path / "half.pt"))
    bb = GeoMoEBackbone(**ENC)
    note = load_pretrained(bb, str(tmp_path / "half.pt"), partial=True)
    n = sum(1 for k in half if k in bb.state_dict())
    assert f"loaded {n} of 81" in note and "NOT loaded" in note
    # the command line is strict by default too, before any training
    with pytest.raises(ValueError, match="--allow-partial-weights"):
        finetune(
            FinetuneArgs(
                out=str(tmp_path / "ftrun"),
                weights=str(tmp_path / "unrelated.pt"),
                img_size=32,
                epochs=1,
                progress=False,
                device="cpu",
            )
        )


# ---- 5. nothing hangs ----------------------------------------------------------------------------


def _image_folder(root, n=16, size=48):
    sub = root / "region"
    sub.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        Image.fromarray((rng.random((size, size, 3)) * 255).astype(np.uint8)).save(sub / f"{i}.png")
    return sub


def test_5_a_fifo_among_the_images_is_skipped_not_waited_on(tmp_path):
    sub = _image_folder(tmp_path / "data")
    os.mkfifo(sub / "pipe.png")
    with _deadline(60):
        with pytest.warns(UserWarning, match=r"pipe.png: not a regular file"):
            res = pretrain(PretrainArgs(out=str(tmp_path / "run"), data=str(tmp_path / "data"), steps=2, **FAST))
        assert res["step"] == 2
        with pytest.raises(OSError, match=r"not a regular file \(a FIFO\)"):  # one made after the listing
            open_image(str(sub / "pipe.png"))


def test_5_a_stopped_rank_ends_the_others_within_the_timeout(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(stalled_peer, args=(2, port, str(tmp_path)), nprocs=2)
    seconds, message = (tmp_path / "rank0.txt").read_text().split("\n", 1)
    assert float(seconds) < 15
    assert message.startswith(
        "rank 0: all_reduce failed or did not finish within --timeout 2 s: another rank has stopped, hung or died"
    ), message


def test_a_killed_rank_ends_the_others_with_the_runs_message(tmp_path):
    """A rank killed mid-step (DDP's own collectives, not a guarded one, see it go): the survivor's
    error says another rank stopped or died (the words of docs/pretraining.md), not gloo's "Connection reset by
    peer ... GLHF!"."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.start_processes(killed_peer, args=(2, port, str(tmp_path)), nprocs=2, join=False, start_method="spawn")
    ctx.processes[0].join(300)
    seconds, message = (tmp_path / "rank0.txt").read_text().split("\n", 1)
    for p in ctx.processes:
        p.join(10)
    assert message.startswith("RunFailure: rank 0: a collective between ranks failed or did not finish"), message
    assert "another rank has stopped, hung or died" in message and float(seconds) < 120, message


def test_only_a_lost_peer_is_called_one():
    from geomoe.distributed import DistEnv, peer_failure

    two, one = DistEnv(1, 2, 1, torch.device("cpu"), 5.0), DistEnv(0, 1, 0, torch.device("cpu"))
    gloo = RuntimeError("[gloo/transport/tcp/pair.cc:537] Read error [127.0.0.1]:1454: Connection reset by peer. GLHF!")
    assert str(peer_failure(two, gloo)).startswith("rank 1: a collective between ranks failed or did not finish within")
    assert peer_failure(one, gloo) is None  # one process: nothing to blame on a peer
    assert peer_failure(two, RuntimeError("DataLoader timed out after 5 seconds")) is None  # says so itself
    assert peer_failure(two, RuntimeError("mat1 and mat2 shapes cannot be multiplied")) is None


# ---- 6. 16-bit and float images ------------------------------------------------------------------


def test_6_16_bit_and_float_images_are_scaled_by_their_range(tmp_path):
    ramp = np.linspace(0, 1, 64 * 64).reshape(64, 64)
    Image.fromarray((ramp * 65535).astype(np.uint16)).save(tmp_path / "a16.png")  # mean ~32,768
    Image.fromarray(ramp.astype(np.float32)).save(tmp_path / "f01.tif")  # float in [0, 1]
    Image.fromarray((ramp * 3000 - 500).astype(np.float32)).save(tmp_path / "fwide.tif")  # reflectance-like range
    for name in ("a16.png", "f01.tif", "fwide.tif"):
        assert Image.open(tmp_path / name).mode in ("I;16", "I", "F")
        arr = np.asarray(open_image(str(tmp_path / name)), dtype=np.float64)[..., 0]
        np.testing.assert_allclose(arr, ramp * 255, atol=0.51, err_msg=name)  # neither near-white nor black
    nodata = ramp.astype(np.float32)
    nodata[0, 0] = np.nan
    Image.fromarray(nodata).save(tmp_path / "nan.tif")
    with pytest.raises(ValueError, match="1 NaN/Inf pixels"):
        open_image(str(tmp_path / "nan.tif"))
    # through the pretraining data path: the normalised crop spans the range, not a constant
    sub = tmp_path / "data" / "tiles"
    sub.mkdir(parents=True)
    os.replace(tmp_path / "a16.png", sub / "a16.png")
    x = ImageFolder(str(tmp_path / "data"), 32)[0]
    assert float(x.std()) > 0.2


# ---- 7. non-finite steps on the CPU --------------------------------------------------------------


def _nan_images(monkeypatch):
    """NaN in the images of the forward calls numbered in the returned set (counting from 1 again
    after `reset`): it reaches the router (topk_gating's CPU value check), not only the loss."""
    original = GeoMoE.forward
    bad, calls = set(), {"n": 0}

    def forward(self, imgs, *args, **kwargs):
        calls["n"] += 1
        return original(self, imgs * float("nan") if calls["n"] in bad else imgs, *args, **kwargs)

    def reset(numbers):
        bad.clear()
        bad.update(numbers)
        calls["n"] = 0

    monkeypatch.setattr(GeoMoE, "forward", forward)
    return reset


def test_7_non_finite_steps_on_the_cpu_are_skipped_and_counted(tmp_path, monkeypatch):
    nan_in_calls = _nan_images(monkeypatch)
    nan_in_calls({2, 3})
    with pytest.warns(UserWarning, match="non-finite loss"):
        res = pretrain(PretrainArgs(out=str(tmp_path / "a"), steps=6, log_every=6, **FAST))
    assert res["history"][-1]["bad_steps"] == 2
    assert all(torch.isfinite(p).all() for p in res["model"].parameters())
    # too many in a row stop the run with the message; resuming into the same bad data does it again
    nan_in_calls(range(3, 100))
    with pytest.raises(RuntimeError, match=r"stopping at step 5: 3 steps in a row had a non-finite loss"):
        with pytest.warns(UserWarning):
            pretrain(PretrainArgs(out=str(tmp_path / "b"), steps=8, save_every=2, max_bad_steps=3, **FAST))
    assert _names(tmp_path / "b") == ["ckpt_00000002", "ckpt_00000004"]
    nan_in_calls(range(1, 100))
    with pytest.raises(RuntimeError, match=r"stopping at step 7: 3 steps in a row"):
        with pytest.warns(UserWarning):
            pretrain(PretrainArgs(out=str(tmp_path / "b"), steps=8, save_every=2, max_bad_steps=3, resume="auto", **FAST))


# ---- 8. every number checked; resume says what changed -------------------------------------------

_BAD = [
    ("pretrain", ["--steps", "0"], "--steps"),
    ("pretrain", ["--steps", "-5"], "--steps"),
    ("pretrain", ["--batch-size", "0"], "--batch-size"),
    ("pretrain", ["--lr", "0"], "--lr"),
    ("pretrain", ["--lr", "nan"], "--lr"),
    ("pretrain", ["--log-every", "0"], "--log-every"),
    ("pretrain", ["--save-every", "-1"], "--save-every"),
    ("pretrain", ["--keep-last", "-1"], "--keep-last"),
    ("pretrain", ["--stop-after", "0"], "--stop-after"),
    ("pretrain", ["--seed", "-1"], "--seed"),
    ("pretrain", ["--workers", "-2"], "--workers"),
    ("pretrain", ["--max-bad-steps", "0"], "--max-bad-steps"),
    ("pretrain", ["--timeout", "0"], "--timeout"),
    ("finetune", ["--img-size", "0"], "--img-size"),
    ("finetune", ["--img-size", "100"], "--img-size"),
    ("finetune", ["--epochs", "0"], "--epochs"),
    ("finetune", ["--batch-size", "0"], "--batch-size"),
    ("finetune", ["--lr", "0"], "--lr"),
    ("finetune", ["--smoothing", "2.0"], "--smoothing"),
    ("finetune", ["--smoothing", "1"], "--smoothing"),
    ("finetune", ["--layer-decay", "0"], "--layer-decay"),
    ("finetune", ["--weight-decay", "-0.1"], "--weight-decay"),
    ("finetune", ["--warmup-epochs", "-1"], "--warmup-epochs"),
    ("finetune", ["--mixup", "-1"], "--mixup"),
    ("finetune", ["--cutmix", "inf"], "--cutmix"),
]


def test_8_every_number_is_checked_and_resume_names_changed_arguments(tmp_path, capsys):
    for command, extra, flag in _BAD:
        with pytest.raises(SystemExit) as exit_info:
            main([command, "--out", str(tmp_path / "never"), *extra])
        err = capsys.readouterr().err
        assert exit_info.value.code == 2 and f"argument '{flag}' expected" in err and f"got {extra[1]}" in err.replace("'", ""), (
            extra,
            err,
        )
    assert not (tmp_path / "never").exists()  # refused before anything was written
    pretrain(PretrainArgs(out=str(tmp_path / "run"), steps=2, **FAST))
    with pytest.warns(
        UserWarning,
        match=r"arguments changed since it was written: --seed 0 -> 1, global batch \(--batch-size x processes\) 8 -> 4",
    ):
        pretrain(PretrainArgs(out=str(tmp_path / "run"), steps=2, resume="auto", **dict(FAST, batch_size=4), seed=1))
    with pytest.raises(ValueError, match=r"written by a run with --config tiny; this run has --config base"):
        pretrain(PretrainArgs(out=str(tmp_path / "run"), config="base", steps=2, resume="auto", **FAST))


# ---- 9. fine-tuning skips unreadable images ------------------------------------------------------


def _class_folder(root, bad):
    """train/ and val/ with classes dark and light, 8 + 2 images each, 40 px; with `bad`, one
    training and one validation image truncated (train/dark/cut.jpg replacing one good one)."""
    rng = np.random.default_rng(0)
    for split, n in (("train", 8), ("val", 2)):
        for c, colour in (("dark", 40), ("light", 210)):
            (root / split / c).mkdir(parents=True)
            for i in range(n - (bad and split == "train" and c == "dark")):
                arr = np.clip(colour + rng.normal(0, 20, (40, 40, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(arr).save(root / split / c / f"{i}.jpg")
    if bad:
        good = (root / "train" / "dark" / "0.jpg").read_bytes()
        (root / "train" / "dark" / "cut.jpg").write_bytes(good[: len(good) // 2])  # truncated
        (root / "val" / "light" / "cut.jpg").write_bytes(good[: len(good) // 2])
    return root


def test_9_finetune_skips_unreadable_images_and_names_them(tmp_path):
    _class_folder(tmp_path / "d", bad=True)
    with pytest.warns(UserWarning, match="skipping unreadable image") as caught:
        res = finetune(
            FinetuneArgs(
                data=str(tmp_path / "d"),
                out=str(tmp_path / "ft"),
                img_size=32,
                epochs=1,
                batch_size=4,
                progress=False,
                device="cpu",
            )
        )
    named = " ".join(str(w.message) for w in caught)
    assert os.path.join("train", "dark", "cut.jpg") in named and os.path.join("val", "light", "cut.jpg") in named
    rec = res["history"][-1]
    assert rec["skipped_images"] == 1 and rec["val_skipped_images"] == 1
    assert rec["val_top1"] * 4 == round(rec["val_top1"] * 4)  # over the 4 readable validation images
    assert _names(tmp_path / "ft") == ["ckpt_00000004"]


# ---- 10. unclear errors made clear ---------------------------------------------------------------


def test_10_unclear_errors_are_clear(tmp_path, capsys):
    # 0-row backward (the stock grouped-GEMM path of 16-bit inputs): works, zero gradients
    for dtype in (torch.bfloat16, torch.float16):
        x = torch.zeros(0, 16, dtype=dtype, requires_grad=True)
        w1 = torch.randn(2, 16, 32, dtype=dtype, requires_grad=True)
        w2 = torch.randn(2, 32, 16, dtype=dtype, requires_grad=True)
        offsets = torch.tensor([0, 0, 0])
        (grouped_mm(x, w1, offsets).sum() + expert_mlp(x, w1, None, w2, None, offsets).sum()).backward()
        assert x.grad.shape == (0, 16) and not w1.grad.any() and not w2.grad.any()
    # zero sizes
    with pytest.raises(ValueError, match=r"MoEMLP: arguments 'dim' and 'hidden_dim' expected >= 1, got dim = 8, hidden_dim = 0"):
        MoEMLP(8, 0, num_experts=4, top_k=2)
    with pytest.raises(ValueError, match=r"got dim = 0, hidden_dim = 0 \(the default"):
        MoEMLP(0, num_experts=4, top_k=2)
    with pytest.raises(
        OpInputError, match=r"grouped_mm: argument 'weight' expected \[E, K, N\] with K >= 1 and N >= 1, got \[2, 3, 0\]"
    ):
        grouped_mm(torch.randn(4, 3), torch.randn(2, 3, 0), torch.tensor([0, 2, 4]))
    # images: an empty batch, float64, uint8
    model = GeoMoE(**CONFIGS["tiny"]["model"])
    with pytest.raises(ValueError, match=r"GeoMoE: argument 'imgs' expected at least one image, got a batch of 0"):
        model(torch.randn(0, 3, 96, 96))
    with pytest.raises(ValueError, match=r"'imgs' expected dtype torch.float32 \(the model's parameters'\), got torch.float64"):
        model(torch.randn(2, 3, 96, 96, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"'imgs' expected normalised floating-point images .* got dtype torch.uint8"):
        GeoMoEBackbone(**ENC)(torch.zeros(1, 3, 64, 64, dtype=torch.uint8))
    # the backbone at H or W = 16, which the README allows
    bb = GeoMoEBackbone(**ENC).eval()
    with torch.no_grad():
        feats = bb(torch.randn(1, 3, 16, 64)).features
    assert [tuple(f.shape[2:]) for f in feats] == [(4, 16), (2, 8), (1, 4), (1, 2)]
    # NaN in expert_bias: an error, not every token routed to one expert
    moe = MoEMLP(8, 4, num_experts=4, top_k=2)
    moe.expert_bias[1] = float("nan")
    with pytest.raises(OpInputError, match=r"topk_gating: argument 'bias' expected finite values, got 1 NaN/Inf"):
        moe(torch.randn(10, 8))
    # --device cuda without a GPU
    if not torch.cuda.is_available():
        with pytest.raises(SystemExit):
            main(["pretrain", "--device", "cuda", "--out", str(tmp_path / "never")])
        assert "argument '--device' expected a device this machine has, got 'cuda'" in capsys.readouterr().err
    # report on a truncated last metrics line
    pretrain(PretrainArgs(out=str(tmp_path / "run"), steps=2, log_every=1, **FAST))
    with open(tmp_path / "run" / "metrics.jsonl", "a") as f:
        f.write('{"step": 3, "loss": 0.5, "l')
    with pytest.warns(UserWarning, match=r"skipped line\(s\) 3: not a whole metrics record"):
        made = write_report(str(tmp_path / "run"))
    assert len(made) == 3
    # and a resumed run that appends to it starts a line of its own
    pretrain(PretrainArgs(out=str(tmp_path / "run"), steps=3, log_every=1, resume="auto", **FAST))
    lines = open(tmp_path / "run" / "metrics.jsonl").read().splitlines()
    assert json.loads(lines[-1])["step"] == 3 and lines[-2].endswith('"l')


# ---- a signal to the group at random moments -----------------------------------------------------


def test_rule_signals_to_the_group_at_random_moments_leave_a_resumable_run(tmp_path):
    rng = random.Random(20)
    out = tmp_path / "run"
    for trial in range(3):
        # slow saves widen the windows a signal can land in; workers share the process group
        log = tmp_path / f"log{trial}"
        proc = _cli(
            out,
            "--steps",
            "40",
            "--save-every",
            "2",
            "--keep-last",
            "2",
            "--workers",
            "2",
            "--resume",
            "auto",
            "--log-every",
            "1",
            env_extra={"GEOMOE_FAULT_SLOW_SAVE": "0.2"},
            log=log,
        )
        if trial == 0 or rng.random() < 0.3:  # during start-up
            time.sleep(rng.uniform(0.1, 3.0))
        else:  # while it trains and saves
            with contextlib.suppress(AssertionError):
                _wait_for(out / "metrics.jsonl", proc)
            time.sleep(rng.uniform(0.0, 1.5))
        sig = rng.choice([signal.SIGTERM, signal.SIGINT])
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, sig)
            if rng.random() < 0.5:
                time.sleep(rng.uniform(0.0, 0.5))
                os.killpg(proc.pid, sig)
        proc.wait(timeout=120)
        text = log.read_text()
        assert "killed by signal" not in text and "holds it" not in text, text
        if "geomoe pretrain:" in text:  # signalled once it ran: it saved and ended, or a second signal ended it
            assert proc.returncode in (0, -signal.SIGTERM, -signal.SIGINT), text
        # (a signal before the handlers are installed, during the imports, ends Python as Python ends)
        state = load_resume_state("auto", str(out))  # never raises: the newest checkpoint there reads
        if state is not None:
            assert state["step"] > 0
    start = 0 if state is None else state["step"]
    res = pretrain(PretrainArgs(out=str(out), steps=start + 1, resume="auto", **FAST))
    assert res["step"] == start + 1 and _names(out)[-1] == f"ckpt_{start + 1:08d}"
