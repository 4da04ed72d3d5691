"""`geomoe segment`: semantic segmentation with either pretrained encoder (`--model geomoe|moevit`)
as the published backbone (backbones.py), UPerHead (uperhead.py), the published data pipeline
(segdata.py), slide inference and the published metrics (metrics.py).

--recipe published: AdamW (0.9, 0.999), lr 6e-5, weight decay 0.05 (none on biases and norms),
layer decay 0.85 with the published dense-task ids, 20k iterations, linear warm-up from 1e-6 of the
lr over 400 iterations then cosine to 0, batch 1 per process (the published runs: 8 processes,
SyncBN), fp32, crop 512 / slide 512 stride 384 and drop path 0.2 for LoveDA, crop 384 / slide 384
stride 256 and drop path 0.1 for SpaceNet (and a folder), evaluation every 2000 iterations.
--recipe short: the same method on the embedded scenes for the tiny config on a CPU.

The loss is the head's cross-entropy (mean over all pixels, 255 ignored) plus the backbone's
auxiliary loss (5e-6 x the MoE layers' sum). Checkpoints are atomic (ckpt_<step>/), every
--save-every iterations, at the end and on SIGTERM / SIGINT; --resume auto continues bit for bit
(the data order and augmentation are pure functions of (seed, step), the RNG states are saved per
process). metrics.jsonl holds the training records and the evaluations (aAcc, mIoU, mAcc, mFscore
and per class). Under torchrun: DDP, SyncBatchNorm on GPUs, the confusion matrix summed over the
processes."""

from __future__ import annotations

import contextlib
import math
import os
import re
import time
import warnings
from dataclasses import dataclass, replace
from typing import Any, Dict, Iterator, List, Optional, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor, nn

from .. import checkpoint, distributed
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
from ..trainer import Checkpointer, Placement, Task, Window, launch, set_lr
from ..trainer.checkpointing import check_checkpoint_fits
from ..trainer.data import make_loader
from ..trainer.rundir import run_identity, warn_changed_run_arguments
from geomoe_kernels._checks import non_finite_passes

from ..speed import autocast, grad_scaler, resolve_precision
from .backbones import build_backbone, dense_param_groups, load_backbone_weights
from .metrics import ConfusionMatrix, metrics_line
from .segdata import (
    DATASETS,
    SCENE_CLASSES,
    SceneEval,
    SceneTrain,
    SegDataError,
    SegEval,
    SegTrain,
    discover,
)
from .uperhead import Segmentor, seg_loss

STRIDE = 32  # the backbone's coarsest stride: slide windows are padded up to a multiple of it

PUBLISHED: Dict[str, Any] = dict(
    iters=20000,
    batch_size=1,  # per process; the published runs: 8 processes (SpaceNet), SyncBN
    lr=6e-5,
    layer_decay=0.85,
    weight_decay=0.05,
    warmup=400,
    crop=None,  # by dataset: 512 LoveDA, 384 SpaceNet / folder
    slide_stride=None,  # by dataset at its crop: 384 LoveDA, 256 SpaceNet / folder; else 3/4 of the crop
    drop_path=None,  # by dataset: 0.2 LoveDA, 0.1 otherwise
    head_channels=512,
    eval_every=2000,
    precision="fp32",
)
SHORT: Dict[str, Any] = dict(
    iters=240,
    batch_size=8,
    lr=2e-3,
    layer_decay=0.85,
    weight_decay=0.05,
    warmup=20,
    crop=64,
    slide_stride=None,  # 3/4 of the crop
    drop_path=0.0,
    head_channels=None,  # 64 for the tiny config, 512 otherwise
    eval_every=120,
    precision=None,
)
RECIPES = {"short": SHORT, "published": PUBLISHED}
BY_DATASET = {  # (crop, slide stride, drop path) of the published configs
    "loveda": (512, 384, 0.2),
    "spacenet": (384, 256, 0.1),
    "folder": (384, 256, 0.1),
    "scenes": (64, 48, 0.1),
}


def _recipe_help(key: str, by_dataset: str = "") -> str:
    """A flag left unset takes the --recipe's value: both recipes' values, for its help."""
    shown = []
    for name, r in (("short", SHORT), ("published", PUBLISHED)):
        v = r[key]
        shown.append(
            f"{name} {by_dataset if v is None and name == 'published' else ('64 for the tiny config, 512 otherwise' if v is None else v)}"
        )
    return f"(default: the --recipe's: {', '.join(shown)})"


def _crop_check(name: str, value: Any, optional: bool) -> None:
    if value is None and optional:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < 2 * 16 or value % 16:
        raise ValueError(f"argument '--crop' expected a multiple of 16, at least 32, got {value!r}")


@dataclass
class SegmentArgs:
    """What `geomoe segment` takes: each field is its flag. Fields left None take the --recipe's value."""

    config: str = opt("tiny", "encoder preset", choices=tuple(sorted(CONFIGS)))
    model: str = opt("geomoe", "GeoMoE, or the plain-ViT MoE baseline", choices=MODELS)
    recipe: str = opt(
        "short",
        "defaults for every flag left unset: 'published' (AdamW lr 6e-5, layer decay 0.85, 20k iterations, 400 "
        "warm-up, cosine, batch 1 per process, the dataset's crop and slide window); 'short' (default) 240 "
        "iterations of batch 8 on 64 px crops for the tiny config",
        choices=tuple(RECIPES),
    )
    data: Optional[str] = opt(
        None, "LoveDA root, SpaceNetv1 root, or a folder with train|val/images|masks (default: embedded scenes)"
    )
    dataset: str = opt("auto", "the layout of --data (auto: by what is found)", choices=DATASETS)
    num_classes: Optional[int] = opt(
        None, "head outputs (default: 7 for LoveDA and SpaceNet as published, the folder's classes.txt)", check=ints(1, 254)
    )
    weights: Optional[str] = opt(
        None,
        "pretrained backbone: released weights (original layout, or hf:OWNER/REPO/PATH[@REV]) or a geomoe checkpoint "
        "(default: from scratch)",
    )
    allow_partial_weights: bool = opt(False, "load what --weights has of the backbone, name what it lacks")
    iters: Optional[int] = opt(None, f"training iterations {_recipe_help('iters')}", check=ints(1))
    batch_size: Optional[int] = opt(None, f"images per process per iteration {_recipe_help('batch_size')}", check=ints(1))
    lr: Optional[float] = opt(None, f"peak learning rate {_recipe_help('lr')}", check=floats(0, low_open=True))
    layer_decay: Optional[float] = opt(
        None, f"layer-wise lr decay {_recipe_help('layer_decay')}", check=floats(0, 1, low_open=True)
    )
    weight_decay: Optional[float] = opt(None, f"AdamW weight decay {_recipe_help('weight_decay')}", check=floats(0))
    warmup: Optional[int] = opt(None, f"linear warm-up iterations from 1e-6 of the lr {_recipe_help('warmup')}", check=ints(0))
    crop: Optional[int] = opt(
        None, f"training crop and slide window {_recipe_help('crop', '512 LoveDA, 384 SpaceNet')}", check=_crop_check
    )
    slide_stride: Optional[int] = opt(
        None,
        "slide inference stride (default: 3/4 of --crop; the published recipe at its crop: 384 LoveDA, 256 SpaceNet)",
        check=ints(1),
    )

    drop_path: Optional[float] = opt(
        None,
        f"stochastic depth of the last block {_recipe_help('drop_path', '0.2 LoveDA, 0.1 SpaceNet')}",
        check=floats(0, 1, high_open=True),
    )
    head_channels: Optional[int] = opt(None, f"UPerHead channels {_recipe_help('head_channels')}", check=ints(1))
    eval_every: Optional[int] = opt(
        None, f"evaluate every N iterations and at the end {_recipe_help('eval_every')}", check=ints(1)
    )
    save_every: Optional[int] = opt(None, "checkpoint every N iterations (default: --eval-every)", check=ints(1))
    log_every: int = opt(10, "a training record in metrics.jsonl every N iterations", check=ints(1))
    scenes: int = opt(256, "embedded scenes for training (without --data)", check=ints(2))
    val_scenes: int = opt(32, "embedded scenes for evaluation (without --data)", check=ints(1))
    scene_size: int = opt(64, "embedded scene side in pixels", check=ints(32))
    max_val: Optional[int] = opt(None, "evaluate on the first N validation images only (default: all)", check=ints(1))
    submission: Optional[str] = opt(
        None,
        "after training, write LoveDA Test predictions as PNGs (labels 1-7, the dataset's own) into this folder (default: none)",
    )
    out: str = opt("runs/segment", "run directory: checkpoints and metrics.jsonl")
    resume: Optional[str] = resume_opt()
    keep_last: int = keep_last_opt(2)
    device: str = device_opt()
    backend: str = backend_opt()
    seed: int = seed_opt("head, augmentation, data order")
    workers: Optional[int] = workers_opt()
    precision: Optional[str] = precision_opt()
    progress: bool = progress_opt()
    max_bad_steps: int = max_bad_steps_opt()
    timeout: float = timeout_opt("a data-loader batch or a collective")
    fsdp: bool = opt(False, "under torchrun: FSDP2 instead of DDP (fully_shard per backbone transformer block, then the model)")

    def validate(self) -> None:
        check_fields(self)
        if self.submission and not self.data:
            raise ValueError("argument '--submission' expected --data (a LoveDA root with Test/), got no --data")
        if self.submission and self.fsdp:
            raise ValueError(
                "argument '--fsdp' cannot be combined with --submission (rank 0 alone writes the submission: its "
                "forward would wait on FSDP2's all-gathers in the other ranks); run with DDP (without --fsdp)"
            )

    def resolved(self, kind: str) -> "SegmentArgs":
        """Unset fields from the recipe; the dataset-dependent ones from the published configs."""
        self.validate()
        values = {k: v for k, v in RECIPES[self.recipe].items() if getattr(self, k) is None}
        crop, stride, dp = BY_DATASET[kind]
        if self.recipe == "published":
            for k, v in (("crop", crop), ("drop_path", dp)):
                if getattr(self, k) is None:
                    values[k] = v
            if self.slide_stride is None and values.get("crop", self.crop) == crop:
                values["slide_stride"] = stride
        if values.get("head_channels", 1) is None:
            values["head_channels"] = 64 if self.config == "tiny" else 512
        out = replace(self, **values)
        if out.slide_stride is None:
            out = replace(out, slide_stride=max(1, out.crop * 3 // 4))
        if out.save_every is None:
            out = replace(out, save_every=out.eval_every)
        if out.slide_stride > out.crop:  # windows would leave pixels unseen
            raise ValueError(f"argument '--slide-stride' expected at most --crop {out.crop}, got {out.slide_stride}")
        return out


def seg_lr(step: int, total: int, warmup: int, peak: float) -> float:
    """The published schedule: linear from 1e-6 x peak to peak over `warmup` iterations (the
    factor at iteration t is 1e-6 + (1 - 1e-6) t / warmup), then cosine from the peak at `warmup` to
    0 at `total`."""
    if step < warmup:
        return peak * (1e-6 + (1 - 1e-6) * step / warmup)
    return peak * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


# ---- inference -----------------------------------------------------------------------------------


@torch.no_grad()
def slide_logits(model: nn.Module, img: Tensor, num_classes: int, crop: int, stride: int) -> Tensor:
    """The published slide inference of one image [1, 3, H, W]: windows of crop x crop every
    `stride` pixels (the last flush with the border), each window's logits resized to the window,
    summed, divided by how many windows covered each pixel. A window smaller than the crop (an
    image smaller than it) is zero-padded to a multiple of 32 and its logits cut back."""
    _, _, H, W = img.shape
    gh = max(H - crop + stride - 1, 0) // stride + 1
    gw = max(W - crop + stride - 1, 0) // stride + 1
    preds = img.new_zeros((1, num_classes, H, W), dtype=torch.float32)
    count = img.new_zeros((1, 1, H, W), dtype=torch.float32)
    for i in range(gh):
        for j in range(gw):
            y2, x2 = min(i * stride + crop, H), min(j * stride + crop, W)
            y1, x1 = max(y2 - crop, 0), max(x2 - crop, 0)
            window = img[:, :, y1:y2, x1:x2]
            h, w = window.shape[2:]
            ph, pw = (-h) % STRIDE if h < crop else (-h) % 16, (-w) % STRIDE if w < crop else (-w) % 16
            if ph or pw:
                window = F.pad(window, (0, pw, 0, ph))
            logits = model.predict(window).float()[:, :, :h, :w]
            preds[:, :, y1:y2, x1:x2] += logits
            count[:, :, y1:y2, x1:x2] += 1
    return preds / count


def _eval_model(model: nn.Module) -> nn.Module:
    return model.module if hasattr(model, "module") else model


@contextlib.contextmanager
def unsharded(model: nn.Module) -> Iterator[None]:
    """FSDP2 (--fsdp): the whole weights on every rank for an evaluation, sharded again after. Each
    rank evaluates its own images, possibly fewer than another's: a forward that all-gathered its
    blocks would then wait on a collective the other ranks never start."""
    from torch.distributed.fsdp import FSDPModule

    mods = [m for m in model.modules() if isinstance(m, FSDPModule)]
    for m in mods:
        m.set_reshard_after_forward(False, recurse=False)
        m.unshard()
    try:
        yield
    finally:
        for m in mods:
            m.reshard()
            # as fully_shard leaves them: the blocks resharded after their forward, the root not
            m.set_reshard_after_forward(m is not model, recurse=False)


@torch.no_grad()
def evaluate(
    model: nn.Module,
    dataset,
    num_classes: int,
    head_classes: int,
    crop: int,
    stride: int,
    device: torch.device,
    precision: str,
    env: Optional[distributed.DistEnv] = None,
    class_names=None,
    limit: Optional[int] = None,
) -> Dict[str, Any]:
    """Slide inference over `dataset` (this process takes every world-th image), the confusion
    matrix summed over the processes, the published metrics."""
    net = _eval_model(model)
    was = net.training
    net.eval()
    cm = ConfusionMatrix(num_classes, device=device)
    n = len(dataset) if limit is None else min(limit, len(dataset))
    rank, world = (env.rank, env.world) if env is not None else (0, 1)
    for i in range(rank, n, world):
        img, label, _ = dataset[i]
        with autocast(precision, device):
            logits = slide_logits(net, img[None].to(device), head_classes, crop, stride)
        cm.update(logits.argmax(1)[0], label.to(device))
    if env is not None and env.enabled:
        distributed.all_reduce(env, cm.counts)
    net.train(was)
    return cm.compute(class_names)


@torch.no_grad()
def write_submission(
    model: nn.Module, dataset: SegEval, folder: str, head_classes: int, crop: int, stride: int, device, precision: str
) -> int:
    """LoveDA's server format: one PNG per Test image, same file name, the predicted class + 1 (the
    dataset's own labels 1..7; the published code adds 1 back to reduced labels the same way)."""
    os.makedirs(folder, exist_ok=True)
    net = _eval_model(model)
    net.eval()
    for i in range(len(dataset)):
        img, _, name = dataset[i]
        with autocast(precision, device):
            pred = slide_logits(net, img[None].to(device), head_classes, crop, stride).argmax(1)[0]
        png = os.path.splitext(name)[0] + ".png"
        Image.fromarray((pred.cpu().numpy() + 1).astype(np.uint8)).save(os.path.join(folder, png))
    return len(dataset)


# ---- the run -------------------------------------------------------------------------------------


class SegSchedule:
    """seg_lr with a run's numbers: schedule(step) is the lr of 0-based `step`."""

    def __init__(self, total: int, warmup: int, peak: float):
        self.total, self.warmup, self.peak = total, warmup, peak

    def __call__(self, step: int) -> float:
        return seg_lr(step, self.total, self.warmup, self.peak)


class _Window(Window):
    def reset(self) -> None:
        super().reset()
        self.loss_sum, self.aux_sum, self.good_steps, self.seen = 0.0, 0.0, 0, 0


def _unwrap_worker_error(exc: BaseException) -> BaseException:
    """A SegDataError raised in a loader worker comes back with the worker's traceback in its
    message: the original one line again."""
    text = str(exc)
    m = re.findall(r"(?:SegDataError|DetectionDataError): (.*)", text)
    return SegDataError(m[-1]) if m and "Traceback" in text else exc


class _Batches:
    """The loader's batches as (*the collated batch, 0 skipped); a bad file's error in one line. The
    loader's iterator is made at iter() (its workers then inherit start_batches' signal mask)."""

    def __init__(self, loader):
        self.loader, self.num_workers = loader, loader.num_workers

    def __iter__(self):
        return self._unwrapped(iter(self.loader))

    @staticmethod
    def _unwrapped(it):
        while True:
            try:
                batch = next(it)
            except StopIteration:
                return
            except Exception as exc:
                # the workers stop now: a persistent worker left waiting would hold the exit (atexit joins it)
                shutdown = getattr(it, "_shutdown_workers", None)
                if shutdown is not None:
                    shutdown()
                err = _unwrap_worker_error(exc)
                if err is exc:
                    raise
                raise err from None
            yield (*batch, 0)


def _collate(batch):
    return torch.stack([b[0] for b in batch]), torch.stack([b[1] for b in batch])


def task_backbone(task: Task, drop_path: float) -> nn.Module:
    """The run's backbone (--model, --config, --backend), --weights loaded into it; task.note says how."""
    args = task.args
    backbone = build_backbone(args.model, args.config, drop_path, args.backend)
    task.note = "from scratch (no --weights)"
    if args.weights:
        task.note = load_backbone_weights(backbone, args.weights, strict=not args.allow_partial_weights).describe()
    return backbone


def place_and_optimise(task: Task, model: nn.Module, backbone: nn.Module) -> None:
    """task.model on the device, placed (task.wrapped), AdamW (0.9, 0.999) over the published dense
    groups (layer decay, no decay on biases and norms), task.scaler."""
    args, device = task.args, task.env.device
    task.model = model.to(device)
    task.placement.shard(task.model)
    # --fsdp: FSDP2 shards each transformer block of the backbone, then the root (the names stay)
    blocks = [b for name in ("blocks1", "blocks2", "blocks3", "blocks") for b in getattr(backbone, name, [])]
    task.wrapped = task.placement.wrap(task.model, blocks)
    groups = dense_param_groups(task.model, backbone, float(args.lr), float(args.weight_decay), float(args.layer_decay))
    task.optimizer = torch.optim.AdamW(groups, lr=float(args.lr), betas=(0.9, 0.999))
    task.scaler = grad_scaler(task.precision, device)


def resume_task(task: Task, state: Optional[Dict[str, Any]], what: str) -> None:
    """task.run_id; on a resume the changed arguments warned, the checkpoint checked against the
    model (`what` names it), the weights, task.last_eval and the trainer's state restored."""
    task.run_id = run_identity(state)
    if state is None:
        return
    warn_changed_run_arguments(state, task.run_args, warn=task.env.main)
    if task.placement.fsdp and task.env.enabled and not checkpoint.is_dcp(state):
        raise ValueError(
            f"checkpoint {state['path']} holds no sharded (DCP) training state: resume it without --fsdp, as it was written"
        )
    check_checkpoint_fits(state, task.model.state_dict(), what)
    if not (task.placement.fsdp and task.env.enabled):  # FSDP2: the weights come with the DCP state (restore)
        task.placement.load_weights(state["model"])
    task.last_eval = state.get("last_eval")
    task.checkpointer.restore(state)


class SegmentTask(Task):
    """Semantic segmentation as a run kind of the one trainer (geomoe.trainer): torchrun joins
    (DDP, SyncBatchNorm on GPUs); a record every --log-every steps, an evaluation every
    --eval-every and at the end, a checkpoint every --save-every and at the end."""

    kind = "segment"
    multi_process = True

    def __init__(self, args: SegmentArgs, src, kind: str):
        self.args, self.src, self.data_kind = args, src, kind  # args resolved

    def setup(self, trainer) -> None:
        args, env = self.args, trainer.env
        self.env, device = env, env.device
        assert args.iters and args.batch_size and args.crop and args.eval_every
        self.precision = resolve_precision(args.precision, None, device)
        self.workers = args.workers if args.workers is not None else (4 if device.type == "cuda" else 0)
        synced = env.world if env.enabled and device.type == "cuda" else 1  # SyncBatchNorm: statistics over processes
        if args.batch_size * synced < 2:
            raise ValueError(
                f"argument '--batch-size' expected at least 2 images per BatchNorm (the pyramid pooling's 1x1 cell needs "
                f"two), got {args.batch_size} per process x {synced} synchronised process(es): run with --batch-size 2, "
                "or 1 per GPU under torchrun on 2 or more GPUs (the published runs: 8)"
            )
        self.placement = Placement(env, fsdp=args.fsdp)
        self.checkpointer = Checkpointer(env, self, dcp=args.fsdp)
        self.checkpointer.refuse_fresh_run()
        self._data()
        torch.manual_seed(args.seed)
        self._model()
        self.steps = int(args.iters)
        self.schedule = SegSchedule(self.steps, int(args.warmup or 0), float(args.lr))
        self.window = _Window()
        self.last_eval: Optional[Dict[str, Any]] = None
        self.run_args = dict(
            config=args.config, model=args.model, recipe=args.recipe, data=args.data, dataset=self.data_kind,
            weights=args.weights, iters=args.iters, batch_size=args.batch_size, lr=args.lr, layer_decay=args.layer_decay,
            weight_decay=args.weight_decay, warmup=args.warmup, crop=args.crop, drop_path=args.drop_path,
            head_channels=args.head_channels, seed=args.seed,
        )  # fmt: skip
        resume_task(self, self.checkpointer.load(), f"--model {args.model}, --config {args.config}, {self.head_classes} classes")

    def _data(self) -> None:
        args, src = self.args, self.src
        if src is None:
            self.classes: Tuple[str, ...] = SCENE_CLASSES
            self.head_classes = args.num_classes or len(self.classes)
            self.train_set = SceneTrain(args.scenes, args.scene_size, args.crop, args.seed)
            self.val_set = SceneEval(args.val_scenes, args.scene_size, args.seed)
            self.reduce = False
        else:
            self.classes, self.head_classes, self.reduce = src.classes, src.head_classes, src.reduce_zero_label
            self.train_set = SegTrain(src.train, len(self.classes), self.reduce, args.crop, args.seed)
            self.val_set = SegEval(src.val, len(self.classes), self.reduce)
        if self.head_classes < len(self.classes):
            raise ValueError(
                f"argument '--num-classes' expected at least the dataset's {len(self.classes)} classes, got {self.head_classes}"
            )
        if len(self.train_set) < args.batch_size * self.env.world:
            raise ValueError(
                f"argument '--batch-size' expected at most the {len(self.train_set)} training images over "
                f"{self.env.world} process(es), got {args.batch_size}"
            )

    def _model(self) -> None:
        args, device = self.args, self.env.device
        backbone = task_backbone(self, float(args.drop_path or 0.0))
        model: nn.Module = Segmentor(backbone, self.head_classes, int(args.head_channels or 512))
        if self.env.enabled and device.type == "cuda":
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        elif self.env.enabled and self.env.main:
            warnings.warn("DDP on CPUs: BatchNorm statistics are per process (SyncBatchNorm needs GPUs)")
        place_and_optimise(self, model, backbone)

    def banner(self) -> str:
        args = self.args
        return (
            f"geomoe segment: {args.model} config {args.config}, recipe {args.recipe}, data {args.data or 'embedded scenes'} "
            f"({self.data_kind}, {len(self.classes)} classes, head {self.head_classes}; {len(self.train_set)} train / "
            f"{len(self.val_set)} val images), {self.env.device} x {self.env.world}, batch {args.batch_size} per process, "
            f"crop {args.crop}, lr {args.lr:g}, {args.iters} iterations, {self.precision}; {self.note}"
        )

    def loader(self, start: int, end: int):
        args, env = self.args, self.env
        loader = make_loader(
            self.train_set, args.batch_size, args.seed, start, end, self.workers, env.device, env.rank, env.world,
            collate_fn=_collate, timeout=args.timeout,
        )  # fmt: skip
        return _Batches(loader)

    def train_step(self, batch: Tuple[Any, ...], lr: float, step: int) -> Optional[str]:
        device, (imgs, labels, _) = self.env.device, batch
        imgs, labels = imgs.to(device, non_blocking=True), labels.to(device, non_blocking=True)
        set_lr(self.optimizer, lr)
        with autocast(self.precision, device), non_finite_passes():
            logits, aux = self.wrapped(imgs)
            loss = seg_loss(logits, labels)
            total = loss + aux.float()
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
        return step % int(self.args.eval_every) == 0 or step == self.steps

    def log_due(self, step: int, end: int) -> bool:
        return step % self.args.log_every == 0 or self._eval_due(step)

    def record(self, step: int, lr: float) -> Optional[Dict[str, Any]]:
        w = self.window
        rec: Dict[str, Any] = dict(
            step=step,
            loss=w.loss_sum / w.good_steps if w.good_steps else float("nan"),
            aux=w.aux_sum / w.good_steps if w.good_steps else float("nan"),
            lr=lr,
            images_per_s=w.seen / max(time.perf_counter() - w.t0, 1e-9),
            bad_steps=w.bad_steps,
        )
        w.reset()
        if self._eval_due(step):
            args = self.args
            if self.env.enabled:  # every process evaluates rank 0's model (its BatchNorm statistics): the one saved
                for buf in self.model.buffers():
                    torch.distributed.broadcast(buf, 0)
            with unsharded(self.model):
                m = evaluate(
                    self.model, self.val_set, len(self.classes), self.head_classes, int(args.crop),
                    int(args.slide_stride or args.crop), self.env.device, self.precision, self.env, self.classes, args.max_val,
                )  # fmt: skip
            self.last_eval = dict(step=step, **m)
            rec["eval"] = m
            w.start_clock()  # the evaluation's time is not the training's
        return rec

    def log_line(self, record: Dict[str, Any]) -> str:
        line = (
            f"iter {record['step']:>6}/{self.steps} | loss {record['loss']:.4f} | aux {record['aux']:.2e} | lr {record['lr']:.2e}"
        )
        line += f" | {record['images_per_s']:.1f} img/s" + (
            f" | skipped {record['bad_steps']} steps" if record["bad_steps"] else ""
        )
        if "eval" in record:
            line += f"\nIter(val) [{record['step']}/{self.steps}] {metrics_line(record['eval'])}"
        return line

    def checkpoint_state(self, step: int) -> Dict[str, Any]:
        return dict(last_eval=self.last_eval)

    def result(self, history: List[Dict[str, Any]], checkpoint: Optional[str], step: int) -> Dict[str, Any]:
        args, src = self.args, self.src
        if args.submission and src is not None and step == self.steps and self.env.main:
            if not src.test:
                raise ValueError(f"argument '--submission' expected Test images under {args.data} (LoveDA), found none")
            n = write_submission(
                self.model, SegEval(src.test, len(self.classes), self.reduce), args.submission, self.head_classes,
                int(args.crop), int(args.slide_stride or args.crop), self.env.device, self.precision,
            )  # fmt: skip
            print(f"wrote {n} LoveDA submission PNGs to {args.submission}")
        if self.env.main and self.last_eval is not None and step == self.steps:
            print(f"result: {metrics_line(self.last_eval)} at iteration {step}")
        return {"metrics": self.last_eval, "history": history, "checkpoint": checkpoint, "model": self.model, "step": step}


def segment(args: SegmentArgs) -> Dict[str, Any]:
    """Run (or resume) a segmentation. Returns {"metrics": the last evaluation, "history", "model", "step"}."""
    args.validate()
    src = discover(args.data, args.dataset, args.num_classes) if args.data else None
    kind = src.kind if src is not None else "scenes"
    args = args.resolved(kind)
    return launch(SegmentTask(args, src, kind), args.device, args.timeout)
