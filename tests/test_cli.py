"""The command line as a new user meets it: every user error one clean line and exit code 2 naming
the flag (or variable), every default shown by --help and equal to the code's, a second run of the
same command that says what it did, checkpoints that bound what a crash loses, the environment
variables checked, `info` that says which backend runs each op here."""

import argparse
import dataclasses
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from geomoe import checkpoint
from geomoe import train as train_module
from geomoe.trainer import loop as trainer_loop
from geomoe.cli import build_parser, main
from geomoe.dense.segment import SegmentArgs
from geomoe.finetune import RECIPES, FinetuneArgs, finetune
from geomoe.report import write_report
from geomoe.train import PretrainArgs, pretrain

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FAST = dict(batch_size=8, progress=False, device="cpu", tensorboard=False)


def _class_folder(root, per_class=2, size=40):
    for split in ("train", "val"):
        for c, colour in (("dark", 40), ("light", 210)):
            (root / split / c).mkdir(parents=True)
            for i in range(per_class):
                Image.fromarray(np.full((size, size, 3), colour + i, np.uint8)).save(root / split / c / f"{i}.png")
    return root


# ---- --help ----------------------------------------------------------------------------------------


def _help_of(parser: argparse.ArgumentParser, action: argparse.Action) -> str:
    return parser._get_formatter()._expand_help(action) if action.help else ""


@pytest.mark.parametrize(
    "command, args_class", [("pretrain", PretrainArgs), ("finetune", FinetuneArgs), ("segment", SegmentArgs)]
)
def test_help_shows_every_default_and_it_is_the_codes(command, args_class):
    _, parsers = build_parser()
    parser = parsers[command]
    fields = {f.name: f.default for f in dataclasses.fields(args_class)}
    for action in parser._actions:
        if action.dest == "help":
            continue
        flag = action.option_strings[0]
        assert action.dest in fields, flag
        assert action.default == fields[action.dest], (flag, action.default, fields[action.dest])
        if action.nargs == 0 and not isinstance(action, argparse.BooleanOptionalAction):
            continue  # a switch: off unless given
        text = " ".join(_help_of(parser, action).split())
        assert "default" in text, (flag, text)
        if isinstance(action.default, (int, float)) and not isinstance(action.default, bool):
            written = (f"default {action.default:g}", f"default {action.default}", f"default {action.default:,}")
            assert any(w in text for w in written), (flag, text)
        elif isinstance(action.default, str):
            assert f"default {action.default}" in text or "(default)" in text, (flag, text)
        if command == "finetune" and action.dest in RECIPES["short"] and action.dest != "precision":
            for name, recipe in RECIPES.items():  # the recipes' values, as finetune applies them
                value = recipe[action.dest]
                assert f"{name} {value}" in text or (value is None and f"{name} the config's size" in text), (flag, text)


@pytest.mark.parametrize(
    "command, args_class", [("pretrain", PretrainArgs), ("finetune", FinetuneArgs), ("segment", SegmentArgs)]
)
def test_the_command_line_is_generated_from_the_dataclass(command, args_class):
    """Every field is written once, with its help; the subcommand's options are exactly the fields
    with a flag: same default, help (with its default), choices, and type as the annotation says."""
    from geomoe.config_cli import cli_fields, flag_of, help_of

    _, parsers = build_parser()
    actions = [a for a in parsers[command]._actions if a.dest != "help"]
    fields = {f.name: f for f in dataclasses.fields(args_class)}
    for f in fields.values():
        assert len(f.metadata.get("help") or "") > 5, f"{args_class.__name__}.{f.name} has no help"
    for action in actions:
        f = fields[action.dest]
        assert f.metadata["cli"], action.option_strings
        assert action.default == f.default, (action.option_strings, action.default, f.default)
        switches = f.metadata["switches"]
        if switches:
            const, text = switches[action.option_strings[0]]
            assert (action.const, action.help) == (const, text)
            continue
        assert action.option_strings[0] == flag_of(f)
        assert action.help == help_of(f, switch=action.nargs == 0 and not isinstance(action, argparse.BooleanOptionalAction))
        assert action.choices == f.metadata["choices"] and action.metavar == f.metadata["metavar"]
        if isinstance(f.default, bool):  # a switch that turns the default around
            assert action.nargs == 0 and action.const is (not f.default), action.option_strings
        elif action.nargs is None:
            value = {"int": "7", "float": "0.5"}.get(getattr(action.type, "__name__", ""), "x")
            value = action.choices[-1] if action.choices else value
            assert parsers[command].parse_args([flag_of(f), value]).__dict__[f.name] == (action.type or str)(value)
    # every field with a flag has its option, the switch pair one per switch
    wanted = sum(len(f.metadata["switches"] or [None]) for f in cli_fields(args_class))
    assert len(actions) == wanted and {a.dest for a in actions} == {f.name for f in cli_fields(args_class)}


@pytest.mark.parametrize(
    "command, flag, value",
    [
        ("pretrain", "--keep-last", "-1"),
        ("pretrain", "--ep", "0"),
        ("pretrain", "--max-raster-pixels", "0"),
        ("pretrain", "--seed", str(2**32)),
        ("finetune", "--img-size", "40"),
        ("finetune", "--layer-decay", "0"),
        ("finetune", "--randaug", "rand-x"),
        ("finetune", "--timeout", "0"),
    ],
)
def test_a_value_the_fields_check_refuses_is_a_one_line_usage_error_naming_the_flag(command, flag, value, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([command, flag, value, "--out", str(tmp_path / "run"), "--no-progress"])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "Traceback" not in err, err
    assert err.strip().splitlines()[-1].startswith(f"geomoe {command}: error: argument '{flag}' expected"), err
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("args_class", [PretrainArgs, FinetuneArgs])
def test_the_dataclass_checks_choices_in_code_too(args_class):
    for name, flag in (("backend", "--backend"), ("config", "--config"), ("precision", "--precision"), ("alpha", "--alpha-as")):
        with pytest.raises(ValueError, match=f"argument '{flag}.*' expected one of .*, got 'nope'"):
            args_class(**{name: "nope"}).validate()


def test_the_model_presets_are_written_once():
    """The constructors' defaults are the base preset of configs.py, and the --ep help reads its expert count."""
    import inspect

    from geomoe.backbone import GeoMoEBackbone
    from geomoe.configs import BASE_EXPERTS, CONFIGS, DECODER_BASE, GEOMOE_BASE, MOEVIT_BASE
    from geomoe.model import GeoMoE
    from geomoe.moevit import MoEViTMAE
    from geomoe.moevit_encoder import MoEViTEncoder

    def defaults(cls):
        return {k: p.default for k, p in inspect.signature(cls.__init__).parameters.items()}

    for cls, preset in ((GeoMoE, {**GEOMOE_BASE, **DECODER_BASE}), (GeoMoEBackbone, GEOMOE_BASE), (MoEViTEncoder, MOEVIT_BASE)):
        assert {k: defaults(cls)[k] for k in preset} == preset, cls
    assert {k: defaults(MoEViTMAE)[k] for k in DECODER_BASE} == DECODER_BASE
    assert CONFIGS["base"]["model"] == {**GEOMOE_BASE, **DECODER_BASE} and GEOMOE_BASE["num_experts"] == BASE_EXPERTS
    _, parsers = build_parser()
    assert f"{BASE_EXPERTS} experts on 8 ranks is fine" in " ".join(parsers["pretrain"].format_help().split())


def test_help_texts_agree_with_the_code():
    parser, parsers = build_parser()
    assert "fine-tuning" in parser.description  # not "GeoMoE pretraining" alone
    pre = " ".join(parsers["pretrain"].format_help().split())
    # --ep: a divisor of the processes that leaves every rank an expert (23 experts on 8 ranks is fine)
    assert "N divides the number of processes and of experts" not in pre
    from geomoe.parallel import check_ep

    check_ep(8, 8, 23)  # what the help promises
    assert "23 experts on 8 ranks is fine" in pre
    from geomoe.configs import CONFIGS

    assert f"base {CONFIGS['base']['steps']}" in pre and f"tiny {CONFIGS['tiny']['batch_size']}" in pre


# ---- user errors -----------------------------------------------------------------------------------


def _bad_inputs(tmp_path):
    cls = _class_folder(tmp_path / "cls")
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty_run").mkdir()
    (tmp_path / "empty_run" / "metrics.jsonl").write_text("")
    run = tmp_path / "a_run"
    (run / "ckpt_00000300").mkdir(parents=True)  # looks like a run directory
    return [
        # command, extra arguments, what the one line must name
        ("finetune", ["--data", str(tmp_path / "empty")], "--data"),  # no train/
        ("finetune", ["--data", str(cls), "--weights", str(run), "--batch-size", "2"], "--weights"),
        ("finetune", ["--data", str(cls), "--batch-size", "100", "--img-size", "32"], "--batch-size"),
        ("finetune", ["--data", str(cls), "--split", str(tmp_path / "none.json")], "--split"),
        ("finetune", ["--data", str(cls), "--band-stats", str(tmp_path / "none.json")], "--band-stats"),
        ("finetune", ["--epochs", "0"], "--epochs"),
        ("pretrain", ["--data", str(tmp_path / "none")], "--data"),
        ("pretrain", ["--data", str(tmp_path / "empty"), "--steps", "1"], "--data"),  # no images in it
        ("pretrain", ["--init-weights", str(tmp_path / "none"), "--steps", "1"], "--init-weights"),
        ("pretrain", ["--data", str(cls / "train"), "--batch-size", "5000", "--steps", "1"], "--batch-size"),
        ("pretrain", ["--save-minutes", "-1"], "--save-minutes"),
        ("pretrain", ["--steps", "x"], "--steps"),  # argparse's own
        ("pretrain", ["--resume", str(tmp_path / "none")], "--resume"),
        ("finetune", ["--resume", str(tmp_path / "none")], "--resume"),
        ("report", [str(tmp_path / "none")], "RUN_DIR"),
        ("stats", [str(tmp_path / "none")], "argument 'DIR'"),
        ("report", [str(tmp_path / "empty_run")], "RUN_DIR"),  # no records yet
    ]


def test_every_user_error_is_one_line_and_exit_code_2(tmp_path, capsys):
    for command, extra, named in _bad_inputs(tmp_path):
        out = (
            []
            if command in ("report", "stats")
            else ["--out", str(tmp_path / f"out_{len(extra)}_{extra[-1][-6:]}"), "--no-progress"]
        )
        with pytest.raises(SystemExit) as exit_info:
            main([command, *extra, *out])
        err = capsys.readouterr().err
        last = err.strip().splitlines()[-1]
        assert exit_info.value.code == 2, (command, extra, err)
        assert last.startswith(f"geomoe {command}: error: ") and named in last, (command, extra, err)
        assert "Traceback" not in err


def test_a_run_directory_as_weights_names_a_checkpoint_in_it(tmp_path, capsys):
    run = tmp_path / "a_run"
    (run / "ckpt_00000300").mkdir(parents=True)
    with pytest.raises(ValueError, match=r"a run directory\? name one of its checkpoints, e.g. .*ckpt_00000300"):
        checkpoint.read_weights(str(run), "--weights")


def test_environment_variables_are_checked(tmp_path, monkeypatch):
    from geomoe_kernels import cuda

    for word in ("1", "yes", "True", "ON"):
        monkeypatch.setenv("GEOMOE_CUDA_EMULATE", word)
        assert cuda.emulation() == "1", word
    for word in ("0", "no", "off", "False", ""):
        monkeypatch.setenv("GEOMOE_CUDA_EMULATE", word)
        assert cuda.emulation() is None, word
    monkeypatch.setenv("GEOMOE_CUDA_EMULATE", "maybe")
    with pytest.raises(ValueError, match=r"environment variable GEOMOE_CUDA_EMULATE expected 1 .* got 'maybe'"):
        cuda.emulation()
    monkeypatch.delenv("GEOMOE_CUDA_EMULATE")
    # the fault-injection variables: a clear error, not float()'s
    monkeypatch.setenv("GEOMOE_FAULT_SLOW_DCP", "abc")
    with pytest.raises(ValueError, match=r"environment variable GEOMOE_FAULT_SLOW_DCP expected a finite number >= 0, got 'abc'"):
        pretrain(PretrainArgs(out=str(tmp_path / "f"), steps=1, **FAST))
    monkeypatch.delenv("GEOMOE_FAULT_SLOW_DCP")
    monkeypatch.setenv("GEOMOE_FAULT_ASYNC_HOLD_FROM", "1.5")
    with pytest.raises(ValueError, match=r"GEOMOE_FAULT_ASYNC_HOLD_FROM expected an integer >= 0, got '1.5'"):
        pretrain(PretrainArgs(out=str(tmp_path / "g"), steps=1, async_save=True, **FAST))
    monkeypatch.delenv("GEOMOE_FAULT_ASYNC_HOLD_FROM")
    # WORLD_SIZE from a broken launcher: one line, exit 2, from the real command
    proc = subprocess.run(
        [sys.executable, "-m", "geomoe", "pretrain", "--out", str(tmp_path / "w")],
        cwd=ROOT,
        env=dict(os.environ, WORLD_SIZE="abc"),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert proc.stderr.strip() == "geomoe pretrain: error: environment variable WORLD_SIZE expected an integer >= 1, got 'abc'"


def test_report_reads_metrics_lines_without_lr(tmp_path):
    (tmp_path / "metrics.jsonl").write_text(
        "\n".join(json.dumps({"step": s, "loss": 1.0 / s, "images_per_s": 10.0}) for s in (1, 2, 3)) + "\n"
    )
    made = write_report(str(tmp_path))
    assert [os.path.basename(p) for p in made] == ["loss.png", "throughput.png"]


# ---- runs: a second run, checkpoints by time, the lock -------------------------------------------


def test_a_finished_run_resumed_says_it_is_complete_and_leaves_no_lock(tmp_path, capsys):
    out = tmp_path / "run"
    pretrain(PretrainArgs(out=str(out), steps=2, **FAST))
    assert not (out / ".lock").exists()  # the run's claim goes with it
    before = sorted(os.listdir(out)), os.path.getmtime(out / "ckpt_00000002")
    capsys.readouterr()
    res = pretrain(PretrainArgs(out=str(out), steps=2, resume="auto", **FAST))  # what a second `make pretrain` does
    said = capsys.readouterr().out
    assert res["step"] == 2 and "is complete" in said and "ckpt_00000002 is at step 2 of 2" in said, said
    assert (sorted(os.listdir(out)), os.path.getmtime(out / "ckpt_00000002")) == before  # nothing rewritten
    # --resume auto in an empty directory starts the run
    res = pretrain(PretrainArgs(out=str(tmp_path / "fresh"), steps=1, resume="auto", **FAST))
    assert res["step"] == 1 and checkpoint.list_checkpoints(str(tmp_path / "fresh"))


def test_checkpoints_come_every_save_minutes_by_default(tmp_path, monkeypatch, capsys):
    assert PretrainArgs().save_minutes == 30  # a `--config base` run loses at most half an hour
    clock = iter(range(0, 10_000, 11 * 60))  # every reading 11 minutes after the last

    class Clock:
        perf_counter = staticmethod(__import__("time").perf_counter)
        monotonic = staticmethod(lambda: float(next(clock)))

    monkeypatch.setattr(trainer_loop, "time", Clock)  # the loop's clock decides when a save is due
    out = tmp_path / "run"
    pretrain(PretrainArgs(out=str(out), steps=7, keep_last=0, **FAST))
    assert "checkpoints every 30 min and at the end" in capsys.readouterr().out
    # readings: start 0; steps 1, 2 at 11, 22 min; step 3 at 33 (saved, then 44); 4, 5 at 55, 66; 6 at 77 ...
    assert [os.path.basename(p) for p in checkpoint.list_checkpoints(str(out))] == [
        "ckpt_00000003",
        "ckpt_00000006",
        "ckpt_00000007",
    ]


# ---- fine-tuning: the last partial batch, top-k ----------------------------------------------------


def test_finetune_says_it_drops_the_last_partial_batch_and_reports_no_top5_for_few_classes(tmp_path, capsys):
    data = _class_folder(tmp_path / "cls", per_class=3)  # 6 training images, batch 4: 2 dropped per epoch
    res = finetune(
        FinetuneArgs(data=str(data), out=str(tmp_path / "ft"), img_size=32, epochs=1, batch_size=4, progress=False, device="cpu")
    )
    said = capsys.readouterr().out
    assert "1 epoch of 1 steps" in said and "1 epochs" not in said, said
    assert "the last partial batch dropped: 2 of the 6 training images" in said, said
    assert "top-5" not in said and res["top5"] is None and res["history"][-1]["val_top5"] is None
    assert res["history"][-1]["val_top1"] * 6 == round(res["history"][-1]["val_top1"] * 6)  # every val image


# ---- info --------------------------------------------------------------------------------------------


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only report")
def test_info_says_which_backend_auto_takes_for_each_op_and_each_reason_once():
    from geomoe_kernels import backend

    env = {k: v for k, v in os.environ.items() if k not in ("GEOMOE_CUDA_EMULATE", "TRITON_INTERPRET")}
    out = subprocess.run(
        [sys.executable, "-m", "geomoe_kernels.info"], capture_output=True, text=True, timeout=120, env=env, cwd=ROOT
    )
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    core = next(line for line in lines if line.startswith("CUDA core:"))
    assert "no GPU here" in core or "not built" in core, core
    assert "sm 80" not in core
    for op in backend.ops():
        mine = [line for line in lines if line.split()[:1] == [op]]
        assert len(mine) == 1 and f"auto -> {backend.auto_choice(op, torch.device('cpu'))[0]}" in mine[0], mine
        assert "auto -> torch" in mine[0]  # on a CPU without the emulation or the interpreter
    reasons = [line for line in lines if line.startswith("  triton: ") or line.startswith("  cuda: ")]
    assert len(reasons) == len(set(reasons)) and sum("Triton runs on CUDA tensors" in r for r in reasons) == 1


# ---- torch's inductor: untouched unless compiling, its error never swallowed ---------------------


def test_a_bad_inductor_cache_dir_is_named_and_inductor_is_left_alone_unless_compiling(tmp_path, monkeypatch):
    (tmp_path / "a_file").write_text("")
    env = dict(os.environ, TORCHINDUCTOR_CACHE_DIR=str(tmp_path / "a_file" / "cache"), OMP_NUM_THREADS="1")
    # torch's optimizers import dynamo, which makes that directory: the run says so up front, in one line
    for extra in ([], ["--compile"]):
        proc = subprocess.run(
            [
                sys.executable,
                "-m",
                "geomoe",
                "pretrain",
                "--steps",
                "1",
                "--batch-size",
                "4",
                "--out",
                str(tmp_path / "c"),
                *extra,
            ],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
        assert "environment variable TORCHINDUCTOR_CACHE_DIR expected a directory" in proc.stderr, proc.stderr
        assert "NotADirectoryError" in proc.stderr and "already registered" not in proc.stderr, proc.stderr
    # choosing a compile backend loads inductor: never its error swallowed (it was, and torch's next
    # import then failed with "Artifact of type=precompile already registered")
    script = (
        "import torch\nfrom geomoe.speed import default_compile_backend\n"
        "try:\n    default_compile_backend(torch.device('cpu'))\nexcept RuntimeError as exc:\n    print(exc)\n"
    )
    proc = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert "--compile: torch's inductor cannot load (NotADirectoryError" in proc.stdout, proc.stdout + proc.stderr
    # and a run without --compile never asks
    monkeypatch.setattr(train_module, "default_compile_backend", lambda device: pytest.fail("loaded inductor"))
    assert pretrain(PretrainArgs(out=str(tmp_path / "run"), steps=1, **FAST))["step"] == 1


# ---- the Makefile (dry runs: nothing is built) -----------------------------------------------------


def _make_n(target, venv):
    proc = subprocess.run(["make", "-n", "-C", ROOT, target, f"VENV={venv}"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


@pytest.mark.skipif(subprocess.run(["which", "make"], capture_output=True).returncode != 0, reason="no make")
def test_make_pretrain_builds_only_what_training_needs_and_says_each_step(tmp_path):
    venv = tmp_path / "venv"
    pre = _make_n("pretrain", venv)
    assert "emulated" not in pre and "asan" not in pre.lower(), pre  # make test's builds
    steps = [line for line in pre.splitlines() if line.startswith("echo") and "==>" in line]
    assert any("building the CUDA core for sm_80, sm_90a" in line for line in steps), pre
    assert "--resume auto" in pre  # a second run goes on from, or reports on, runs/tiny
    test = _make_n("test", venv)
    assert "GEOMOE_EXTENSIONS=emulated,asan" in test and "building the emulated CUDA core" in test, test
    # after make pretrain's stamps, make test builds only the emulated cores
    venv.mkdir()
    for stamp in (".geomoe-torch", ".geomoe-installed"):
        (venv / stamp).touch()
    later = _make_n("test", venv)
    assert "GEOMOE_EXTENSIONS=emulated,asan" in later and "GEOMOE_EXTENSIONS=core" not in later, later
    assert str(venv) not in _make_n("clean", venv) and f"rm -rf {venv}" in _make_n("distclean", venv)


def test_the_readme_shows_the_banner_make_pretrain_prints(tmp_path, capsys):
    import re

    readme = open(os.path.join(ROOT, "README.md")).read()
    shown = next(line for line in readme.splitlines() if line.startswith("geomoe pretrain: "))
    pretrain(PretrainArgs(config="tiny", out=str(tmp_path / "tiny"), steps=1, progress=False, device="cpu", tensorboard=False))
    printed = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("geomoe pretrain: "))
    # what differs between the two runs: the step range and the directory
    same = lambda s: re.sub(r"into \S+$", "into OUT", re.sub(r"steps \d+\.\.\d+", "steps A..B", s))  # noqa: E731
    assert same(printed) == same(shown), (printed, shown)
