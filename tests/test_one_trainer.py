"""One trainer serves every run kind (docs/trainer.md, issue 29): pretraining and fine-tuning each
supply only a Task, and both run on geomoe.trainer's one loop (`Trainer.run`); no other module of
the application defines a training loop of its own (the only Trainer class and loop are
trainer/loop.py's, read from the source)."""

from __future__ import annotations

import ast
import os

from geomoe.finetune import FinetuneArgs, FinetuneTask, finetune
from geomoe.train import PretrainArgs, PretrainTask, pretrain
from geomoe.trainer import Task
from geomoe.trainer import loop as trainer_loop
from tests.test_cli import _class_folder

APP = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "python", "geomoe")


def test_pretraining_and_finetuning_run_on_the_one_trainer(tmp_path, monkeypatch):
    ran = []
    real_run = trainer_loop.Trainer.run

    def run(self):
        ran.append(type(self.task))
        return real_run(self)

    monkeypatch.setattr(trainer_loop.Trainer, "run", run)
    pre = pretrain(
        PretrainArgs(out=str(tmp_path / "pre"), steps=2, batch_size=4, progress=False, device="cpu", tensorboard=False)
    )
    data = _class_folder(tmp_path / "cls", per_class=2, size=32)
    fine = finetune(
        FinetuneArgs(data=str(data), out=str(tmp_path / "ft"), img_size=32, epochs=1, batch_size=4, progress=False, device="cpu")
    )
    assert ran == [PretrainTask, FinetuneTask] and issubclass(PretrainTask, Task) and issubclass(FinetuneTask, Task)
    assert pre["step"] == 2 and len(fine["history"]) == 1  # each ran its steps through that loop


def test_the_training_loop_is_defined_once():
    trainers, loops = [], []
    for folder, dirs, files in os.walk(APP):
        dirs[:] = sorted(d for d in dirs if d != "__pycache__")
        for name in sorted(f for f in files if f.endswith(".py")):
            path = os.path.join(folder, name)
            rel = os.path.relpath(path, APP)
            for node in ast.walk(ast.parse(open(path).read(), path)):
                if isinstance(node, ast.ClassDef) and node.name.endswith("Trainer"):
                    trainers.append((rel, node.name))
                if isinstance(node, ast.FunctionDef) and node.name == "_loop":
                    loops.append(rel)
    assert trainers == [(os.path.join("trainer", "loop.py"), "Trainer")] and loops == [os.path.join("trainer", "loop.py")]
