"""`geomoe detect`: object detection on either pretrained encoder as a run kind of the one trainer.

--boxes horizontal: Faster R-CNN with FPN (faster_rcnn.py), COCO JSON data (DIOR's layout: --data
with images/ and annotations/{trainval,test}.json), COCO AP / AP50 (pycocotools).
--boxes oriented: Oriented R-CNN le90 (oriented_rcnn.py), DIOR-R's layout, rotated mAP at IoU 0.5,
VOC07 11 points. Without --data: the embedded scenes with drawn objects.

--recipe published: AdamW (0.9, 0.999) lr 8e-5, weight decay 0.05 (none on biases and norms), layer
decay 0.8 with the published dense-task ids, 12 epochs, linear warm-up from 1e-6 of the lr over 500
iterations, x0.1 after epochs 8 and 11, batch 1 per process, images fit to 800 px.
--recipe short: the same method, small, on the embedded scenes. The loss is the detector's sum plus
the backbone's auxiliary loss (weight 1)."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, replace
from typing import Any, Dict, List, Optional, Tuple

import torch
from torch import nn

from ..config_cli import (
    backend_opt,
    check_fields,
    device_opt,
    floats,
    ints,
    keep_last_opt,
    max_bad_steps_opt,
    opt,
    precision_opt,
    progress_opt,
    resume_opt,
    seed_opt,
    timeout_opt,
    workers_opt,
)
from ..configs import CONFIGS, MODELS
from ..dense.segment import _Batches, _eval_model, _Window, place_and_optimise, resume_task, task_backbone, unsharded
from ..speed import autocast, resolve_precision
from ..trainer import Checkpointer, Placement, Task, launch, set_lr
from ..trainer.data import make_loader
from geomoe_kernels._checks import non_finite_passes

from .data import CocoDetection, DetectionDataError, SyntheticDetection, collate
from .faster_rcnn import DetectorConfig, FasterRCNN

PUBLISHED: Dict[str, Any] = dict(
    epochs=12, lr_steps="8,11", batch_size=1, lr=8e-5, layer_decay=0.8, weight_decay=0.05, warmup=500, size=800,
    fpn_channels=256, fc_channels=1024, drop_path=0.1, eval_every=None,
)  # fmt: skip
SHORT: Dict[str, Any] = dict(
    epochs=12, lr_steps="8,11", batch_size=4, lr=4e-4, layer_decay=0.8, weight_decay=0.05, warmup=20, size=128,
    fpn_channels=64, fc_channels=256, drop_path=0.0, eval_every=None,
)  # fmt: skip
RECIPES = {"short": SHORT, "published": PUBLISHED}


def _recipe_help(key: str) -> str:
    return f"(default: the --recipe's: short {SHORT[key]}, published {PUBLISHED[key]})"


def _steps_check(name: str, value: Any, optional: bool) -> None:
    if value is None and optional:
        return
    try:
        ok = all(int(v) >= 1 for v in str(value).split(","))
    except ValueError:
        ok = False
    if not ok:
        raise ValueError(f"argument '--lr-steps' expected epochs as 'A,B' (integers >= 1), got {value!r}")


@dataclass
class DetectArgs:
    """What `geomoe detect` takes: each field is its flag. Fields left None take the --recipe's value."""

    boxes: str = opt(
        "horizontal", "Faster R-CNN (COCO AP) or Oriented R-CNN le90 (rotated mAP)", choices=("horizontal", "oriented")
    )
    config: str = opt("tiny", "encoder preset", choices=tuple(sorted(CONFIGS)))
    model: str = opt("geomoe", "GeoMoE, or the plain-ViT MoE baseline", choices=MODELS)
    recipe: str = opt(
        "short",
        "defaults for every flag left unset: 'published' (AdamW lr 8e-5, layer decay 0.8, 12 epochs, 500 warm-up, "
        "x0.1 after epochs 8 and 11, batch 1 per process, 800 px); 'short' (default) small, on the embedded scenes",
        choices=tuple(RECIPES),
    )
    data: Optional[str] = opt(
        None,
        "horizontal: a folder with images/ and annotations/{trainval,test}.json (DIOR); oriented: a DIOR-R root "
        "(default: embedded scenes)",
    )
    weights: Optional[str] = opt(
        None,
        "pretrained backbone: released weights (original layout, or hf:OWNER/REPO/PATH[@REV]) or a geomoe checkpoint "
        "(default: from scratch)",
    )
    allow_partial_weights: bool = opt(False, "load what --weights has of the backbone, name what it lacks")
    epochs: Optional[int] = opt(None, f"training epochs {_recipe_help('epochs')}", check=ints(1))
    lr_steps: Optional[str] = opt(None, f"lr x0.1 after each of these epochs {_recipe_help('lr_steps')}", check=_steps_check)
    batch_size: Optional[int] = opt(None, f"images per process per iteration {_recipe_help('batch_size')}", check=ints(1))
    lr: Optional[float] = opt(None, f"peak learning rate {_recipe_help('lr')}", check=floats(0, low_open=True))
    layer_decay: Optional[float] = opt(
        None, f"layer-wise lr decay {_recipe_help('layer_decay')}", check=floats(0, 1, low_open=True)
    )
    weight_decay: Optional[float] = opt(None, f"AdamW weight decay {_recipe_help('weight_decay')}", check=floats(0))
    warmup: Optional[int] = opt(None, f"linear warm-up iterations from 1e-6 of the lr {_recipe_help('warmup')}", check=ints(0))
    size: Optional[int] = opt(
        None, f"images fit to size x size (embedded scenes: their side) {_recipe_help('size')}", check=ints(32)
    )
    fpn_channels: Optional[int] = opt(None, f"FPN channels {_recipe_help('fpn_channels')}", check=ints(1))
    fc_channels: Optional[int] = opt(None, f"the box head's two FC layers {_recipe_help('fc_channels')}", check=ints(1))
    drop_path: Optional[float] = opt(None, f"stochastic depth {_recipe_help('drop_path')}", check=floats(0, 1, high_open=True))
    eval_every: Optional[int] = opt(None, "evaluate every N iterations and at the end (default: at the end)", check=ints(1))
    save_every: Optional[int] = opt(None, "checkpoint every N iterations (default: every epoch)", check=ints(1))
    log_every: int = opt(10, "a training record in metrics.jsonl every N iterations", check=ints(1))
    scenes: int = opt(128, "embedded scenes for training (without --data)", check=ints(1))
    val_scenes: int = opt(16, "embedded scenes for evaluation (without --data)", check=ints(1))
    max_val: Optional[int] = opt(None, "evaluate on the first N test images only (default: all)", check=ints(1))
    out: str = opt("runs/detect", "run directory: checkpoints and metrics.jsonl")
    resume: Optional[str] = resume_opt()
    keep_last: int = keep_last_opt(2)
    device: str = device_opt()
    backend: str = backend_opt()
    seed: int = seed_opt("heads, augmentation, data order")
    workers: Optional[int] = workers_opt()
    precision: Optional[str] = precision_opt()
    progress: bool = progress_opt()
    max_bad_steps: int = max_bad_steps_opt()
    timeout: float = timeout_opt("a data-loader batch or a collective")
    fsdp: bool = opt(False, "under torchrun: FSDP2 instead of DDP (fully_shard per backbone transformer block, then the model)")

    def validate(self) -> None:
        check_fields(self)

    def resolved(self) -> "DetectArgs":
        self.validate()
        out = replace(self, **{k: v for k, v in RECIPES[self.recipe].items() if getattr(self, k) is None})
        if out.size % 32:
            raise ValueError(f"argument '--size' expected a multiple of 32, got {out.size}")
        return out


def det_lr(step: int, warmup: int, peak: float, epoch_iters: int, lr_steps: Tuple[int, ...]) -> float:
    """The published schedule at 0-based `step`: linear from 1e-6 x peak over `warmup` iterations,
    times 0.1 for each of `lr_steps` (epochs) that has ended."""
    f = 1e-6 + (1 - 1e-6) * step / warmup if step < warmup else 1.0
    return peak * f * 0.1 ** sum(step >= e * epoch_iters for e in lr_steps)


class _DataErrors(torch.utils.data.Dataset):
    """A dataset whose bad file is a usage error: "argument '--data': <file>: what is wrong"."""

    def __init__(self, dataset):
        self.dataset, self.classes = dataset, dataset.classes

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int):
        try:
            return self.dataset[i]
        except DetectionDataError as exc:
            raise DetectionDataError(f"argument '--data': {exc}") from None


def _datasets(args: DetectArgs):
    import os

    if args.data is None:
        if args.boxes == "horizontal":
            return SyntheticDetection(args.scenes, args.size, True, args.seed), SyntheticDetection(
                args.val_scenes, args.size, False, args.seed + 1
            )
        from .oriented_data import OrientedDetection

        return (
            OrientedDetection(None, True, args.seed, length=args.scenes, size=args.size),
            OrientedDetection(None, False, args.seed + 1, length=args.val_scenes, size=args.size),
        )
    scale = (args.size, args.size)
    try:
        if args.boxes == "horizontal":
            ann, img = os.path.join(args.data, "annotations"), os.path.join(args.data, "images")
            return (
                CocoDetection(os.path.join(ann, "trainval.json"), img, True, args.seed, scale),
                CocoDetection(os.path.join(ann, "test.json"), img, False, args.seed, scale),
            )
        from .oriented_data import OrientedDetection, load_dior_r

        return (
            OrientedDetection(load_dior_r(args.data, "train"), True, args.seed, scale=scale),
            OrientedDetection(load_dior_r(args.data, "test"), False, args.seed, scale=scale),
        )
    except DetectionDataError as exc:
        raise DetectionDataError(f"argument '--data': {exc}") from None


@torch.no_grad()
def evaluate(
    model: nn.Module, dataset, boxes: str, device, precision: str, limit: Optional[int] = None, env=None
) -> Optional[Dict[str, Any]]:
    """Detections on `dataset` (one image at a time; each process every world-th image, gathered on
    rank 0) scored as published: COCO bbox AP (horizontal) or rotated mAP at IoU 0.5, VOC07 11
    points (oriented). None on the other ranks. Horizontal: a dataset with `original(i)` (a COCO
    folder, its images resized) is scored in each image's own pixels against its own boxes."""
    net = _eval_model(model)
    was = net.training
    net.eval()
    dets, gts = [], []
    rank, world = (env.rank, env.world) if env is not None and env.enabled else (0, 1)
    n = len(dataset) if limit is None else min(limit, len(dataset))
    original = getattr(getattr(dataset, "dataset", dataset), "original", None) if boxes == "horizontal" else None
    for i in range(rank, n, world):
        img, gt_boxes, labels, size = dataset[i]
        image, sizes, _ = collate([(img, gt_boxes, labels, size)])
        with autocast(precision, device):
            (d,) = net(image.to(device), sizes)
        d = {k: v.float().cpu() for k, v in d.items()}
        if original is not None:  # scored in the image's own pixels, against its own annotation
            gt_boxes, labels, (sx, sy) = original(i)
            d["boxes"] = d["boxes"] / torch.tensor([sx, sy, sx, sy])
        dets.append(d)
        gts.append({"boxes": gt_boxes, "labels": labels})
    net.train(was)
    if world > 1:  # back in the dataset's order: image i came from rank i % world
        parts: List[Any] = [None] * world
        torch.distributed.all_gather_object(parts, (dets, gts))
        if rank:
            return None
        dets = [parts[i % world][0][i // world] for i in range(n)]
        gts = [parts[i % world][1][i // world] for i in range(n)]
    if boxes == "horizontal":
        from .coco_eval import coco_ap

        return coco_ap(dets, gts, dataset.classes)
    from .dota_eval import ImageBoxes, rotated_map

    m = rotated_map(
        [ImageBoxes(d["boxes"], d["labels"], d["scores"]) for d in dets],
        [ImageBoxes(g["boxes"], g["labels"]) for g in gts],
        len(dataset.classes),
    )
    return {"mAP": m["mAP"], **{f"AP50/{c}": a for c, a in zip(dataset.classes, m["AP"]) if a is not None}}


def _headline(m: Dict[str, Any]) -> str:
    if "bbox_mAP" in m:
        return f"bbox_mAP: {m['bbox_mAP']:.4f}  bbox_mAP_50: {m['bbox_mAP_50']:.4f}  bbox_mAP_75: {m['bbox_mAP_75']:.4f}"
    return f"mAP (rotated, IoU 0.5, VOC07): {m['mAP']:.4f}"


class DetectTask(Task):
    """Detection as a run kind of the one trainer: a record every --log-every steps, an evaluation
    every --eval-every and at the end, a checkpoint every --save-every (an epoch) and at the end."""

    kind = "detect"
    multi_process = True

    def __init__(self, args: DetectArgs):
        self.args = args  # resolved

    def setup(self, trainer) -> None:
        args, env = self.args, trainer.env
        self.env = env
        self.precision = resolve_precision(args.precision, None, env.device)
        self.workers = args.workers if args.workers is not None else (4 if env.device.type == "cuda" else 0)
        if args.boxes == "horizontal":
            try:
                import pycocotools.cocoeval  # noqa: F401
            except ImportError:
                raise ImportError(
                    "argument '--boxes horizontal' expected pycocotools (its COCO evaluation): pip install pycocotools"
                ) from None
        self.placement = Placement(env, fsdp=args.fsdp)
        self.checkpointer = Checkpointer(env, self, dcp=args.fsdp)
        self.checkpointer.refuse_fresh_run()
        train, val = _datasets(args)
        self.train_set, self.val_set = _DataErrors(train), _DataErrors(val)
        self.classes = tuple(train.classes)
        per_step = int(args.batch_size) * env.world
        if len(self.train_set) < per_step:
            raise ValueError(
                f"argument '--batch-size' expected at most the {len(self.train_set)} training images over "
                f"{env.world} process(es), got {args.batch_size}"
            )
        self.epoch_iters = math.ceil(len(self.train_set) / per_step)
        self.steps = self.epoch_iters * int(args.epochs)
        self.lr_steps = tuple(int(v) for v in str(args.lr_steps).split(","))
        torch.manual_seed(args.seed)
        backbone = task_backbone(self, float(args.drop_path or 0.0))
        if args.boxes == "horizontal":
            cfg: Any = DetectorConfig(
                num_classes=len(self.classes), fpn_channels=int(args.fpn_channels), fc_channels=int(args.fc_channels)
            )
            model: nn.Module = FasterRCNN(backbone, cfg)
        else:
            from .oriented_rcnn import OrientedConfig, OrientedRCNN

            cfg = OrientedConfig(
                num_classes=len(self.classes), fpn_channels=int(args.fpn_channels), fc_channels=int(args.fc_channels)
            )
            model = OrientedRCNN(backbone, cfg)
        place_and_optimise(self, model, backbone)
        self.window = _Window()
        self.last_eval: Optional[Dict[str, Any]] = None
        self.run_args = {k: getattr(args, k) for k in (
            "boxes", "config", "model", "recipe", "data", "weights", "epochs", "lr_steps", "batch_size", "lr",
            "layer_decay", "weight_decay", "warmup", "size", "fpn_channels", "fc_channels", "drop_path", "seed",
        )}  # fmt: skip
        resume_task(self, self.checkpointer.load(), f"--boxes {args.boxes}, --model {args.model}, --config {args.config}")

    def schedule(self, step: int) -> float:
        a = self.args
        return det_lr(step, int(a.warmup), float(a.lr), self.epoch_iters, self.lr_steps)

    def banner(self) -> str:
        a = self.args
        return (
            f"geomoe detect: {a.boxes} boxes, {a.model} config {a.config}, recipe {a.recipe}, data {a.data or 'embedded scenes'} "
            f"({len(self.classes)} classes; {len(self.train_set)} train / {len(self.val_set)} test images), {self.env.device} x "
            f"{self.env.world}, batch {a.batch_size} per process, {a.size} px, lr {a.lr:g}, {a.epochs} epochs = {self.steps} "
            f"iterations, {self.precision}; {self.note}"
        )

    def loader(self, start: int, end: int):
        a, env = self.args, self.env
        return _Batches(
            make_loader(
                self.train_set, int(a.batch_size), a.seed, start, end, self.workers, env.device, env.rank, env.world,
                collate_fn=collate, timeout=a.timeout,
            )
        )  # fmt: skip

    def train_step(self, batch: Tuple[Any, ...], lr: float, step: int) -> Optional[str]:
        device = self.env.device
        imgs, sizes, targets, _ = batch
        targets = [{k: v.to(device) for k, v in t.items()} for t in targets]
        set_lr(self.optimizer, lr)
        with autocast(self.precision, device), non_finite_passes():
            losses = self.wrapped(imgs.to(device, non_blocking=True), sizes, targets)
            aux = losses["aux"].float()
            loss = sum(v.float() for k, v in losses.items() if k != "aux")
            total = loss + aux
        self.optimizer.zero_grad(set_to_none=True)
        (bad,) = self.trainer.agree(not bool(torch.isfinite(total.detach())))
        if bad:
            return "non-finite loss"
        self.scaler.scale(total).backward()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        w = self.window
        w.loss_sum, w.aux_sum, w.good_steps = w.loss_sum + float(loss.detach()), w.aux_sum + float(aux.detach()), w.good_steps + 1
        w.seen += imgs.shape[0] * self.env.world
        return None

    def _eval_due(self, step: int) -> bool:
        return step == self.steps or (self.args.eval_every is not None and step % self.args.eval_every == 0)

    def log_due(self, step: int, end: int) -> bool:
        return step % self.args.log_every == 0 or self._eval_due(step)

    def save_due(self, step: int) -> bool:
        return step % int(self.args.save_every or self.epoch_iters) == 0

    def record(self, step: int, lr: float) -> Optional[Dict[str, Any]]:
        w = self.window
        n = w.good_steps
        rec: Dict[str, Any] = dict(
            step=step, loss=w.loss_sum / n if n else float("nan"), aux=w.aux_sum / n if n else float("nan"), lr=lr,
            images_per_s=w.seen / max(time.perf_counter() - w.t0, 1e-9), bad_steps=w.bad_steps,
        )  # fmt: skip
        w.reset()
        if self._eval_due(step):
            with unsharded(self.model):
                m = evaluate(
                    self.model, self.val_set, self.args.boxes, self.env.device, self.precision, self.args.max_val, self.env
                )
            if m is not None:
                self.last_eval = dict(step=step, **m)
                rec["eval"] = m
            w.start_clock()
        return rec

    def log_line(self, record: Dict[str, Any]) -> str:
        line = (
            f"iter {record['step']:>6}/{self.steps} | loss {record['loss']:.4f} | aux {record['aux']:.2e} | lr {record['lr']:.2e}"
        )
        line += f" | {record['images_per_s']:.1f} img/s"
        if "eval" in record:
            line += f"\nEpoch(test) [{record['step']}/{self.steps}] {_headline(record['eval'])}"
        return line

    def checkpoint_state(self, step: int) -> Dict[str, Any]:
        return dict(last_eval=self.last_eval)

    def result(self, history: List[Dict[str, Any]], checkpoint: Optional[str], step: int) -> Dict[str, Any]:
        if self.env.main and self.last_eval is not None and step == self.steps:
            print(f"result: {_headline(self.last_eval)} at iteration {step}")
        return {"metrics": self.last_eval, "history": history, "checkpoint": checkpoint, "model": self.model, "step": step}


def detect(args: DetectArgs) -> Dict[str, Any]:
    """Run (or resume) a detection. Returns {"metrics": the last evaluation, "history", "model", "step"}."""
    args = args.resolved()
    return launch(DetectTask(args), args.device, args.timeout)
