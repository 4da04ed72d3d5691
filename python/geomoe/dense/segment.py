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

import math
import os
import re
import time
import warnings
from dataclasses import dataclass, replace
from typing import Any, Dict, List, Optional, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor, nn
from tqdm import tqdm

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
from ..data import ResumableBatchSampler
from ..runtime import (
    RunDirectory,
    StopSignals,
    append_jsonl,
    check_checkpoint_fits,
    check_torch_cache_dir,
    config_of,
    load_resume_state,
    refuse_fresh_run_into_used_directory,
    rng_state,
    run_identity,
    set_rng_state,
    start_batches,
    warn_changed_run_arguments,
)
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
    slide_stride=None,  # by dataset: 384 LoveDA, 256 SpaceNet / folder
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
    slide_stride=48,
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
        None, "pretrained backbone: released weights (original layout) or a geomoe checkpoint (default: from scratch)"
    )
    allow_partial_weights: bool = opt(False, "load what --weights has of the backbone, name what it lacks")
    iters: Optional[int] = opt(None, "training iterations (PUBLISHED 20000, short 240)", check=ints(1))
    batch_size: Optional[int] = opt(None, "images per process per iteration (published 1, short 8)", check=ints(1))
    lr: Optional[float] = opt(None, "peak learning rate (published 6e-5, short 2e-3)", check=floats(0, low_open=True))
    layer_decay: Optional[float] = opt(None, "layer-wise lr decay (0.85)", check=floats(0, 1, low_open=True))
    weight_decay: Optional[float] = opt(None, "AdamW weight decay (0.05)", check=floats(0))
    warmup: Optional[int] = opt(None, "linear warm-up iterations from 1e-6 of the lr (published 400)", check=ints(0))
    crop: Optional[int] = opt(None, "training crop and slide window (published: 512 LoveDA, 384 SpaceNet)", check=_crop_check)
    slide_stride: Optional[int] = opt(None, "slide inference stride (published: 384 LoveDA, 256 SpaceNet)", check=ints(1))
    drop_path: Optional[float] = opt(
        None, "stochastic depth of the last block (published: 0.2 LoveDA, 0.1 SpaceNet)", check=floats(0, 1, high_open=True)
    )
    head_channels: Optional[int] = opt(None, "UPerHead channels (published 512)", check=ints(1))
    eval_every: Optional[int] = opt(None, "evaluate every N iterations and at the end (published 2000)", check=ints(1))
    save_every: Optional[int] = opt(None, "checkpoint every N iterations (default: --eval-every)", check=ints(1))
    log_every: int = opt(10, "a training record in metrics.jsonl every N iterations", check=ints(1))
    scenes: int = opt(256, "embedded scenes for training (without --data)", check=ints(2))
    val_scenes: int = opt(32, "embedded scenes for evaluation (without --data)", check=ints(1))
    scene_size: int = opt(64, "embedded scene side in pixels", check=ints(32))
    max_val: Optional[int] = opt(None, "evaluate on the first N validation images only (default: all)", check=ints(1))
    submission: Optional[str] = opt(
        None, "after training, write LoveDA Test predictions as PNGs (labels 1-7, the dataset's own) into this folder"
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

    def validate(self) -> None:
        check_fields(self)
        if self.submission and not self.data:
            raise ValueError("argument '--submission' expected --data (a LoveDA root with Test/), got no --data")

    def resolved(self, kind: str) -> "SegmentArgs":
        """Unset fields from the recipe; the dataset-dependent ones from the published configs."""
        self.validate()
        values = {k: v for k, v in RECIPES[self.recipe].items() if getattr(self, k) is None}
        crop, stride, dp = BY_DATASET[kind]
        if self.recipe == "published":
            for k, v in (("crop", crop), ("slide_stride", stride), ("drop_path", dp)):
                if getattr(self, k) is None:
                    values[k] = v
        if values.get("head_channels", 1) is None:
            values["head_channels"] = 64 if self.config == "tiny" else 512
        out = replace(self, **values)
        if out.slide_stride is None:
            out = replace(out, slide_stride=out.crop)
        if out.save_every is None:
            out = replace(out, save_every=out.eval_every)
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


def _unwrap_worker_error(exc: BaseException) -> BaseException:
    """A SegDataError raised in a loader worker comes back with the worker's traceback in its
    message: the original one line again."""
    m = re.findall(r"SegDataError: (.*)", str(exc))
    return SegDataError(m[-1]) if m else exc


def _collate(batch):
    return torch.stack([b[0] for b in batch]), torch.stack([b[1] for b in batch])


def segment(args: SegmentArgs) -> Dict[str, Any]:
    """Run (or resume) a segmentation. Returns {"metrics": the last evaluation, "history", "model"}."""
    args.validate()
    check_torch_cache_dir()
    env = distributed.setup(args.device, args.timeout)
    try:
        with StopSignals() as stop, RunDirectory(args.out) if env.main else _Null():
            return _segment(args, env, stop)
    finally:
        distributed.teardown(env)


class _Null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return None


def _segment(args: SegmentArgs, env: distributed.DistEnv, stop: StopSignals) -> Dict[str, Any]:
    device = env.device
    if args.data:
        src = discover(args.data, args.dataset, args.num_classes)
        kind = src.kind
    else:
        src, kind = None, "scenes"
    args = args.resolved(kind)
    assert args.iters and args.batch_size and args.crop and args.eval_every and args.save_every
    precision = resolve_precision(args.precision, None, device)
    workers = args.workers if args.workers is not None else (4 if device.type == "cuda" else 0)
    if args.batch_size * env.world < 2:
        raise ValueError(
            f"argument '--batch-size' expected at least 2 images per iteration over all processes (BatchNorm of the "
            f"pyramid pooling's 1x1 cell needs two), got {args.batch_size} x {env.world} process(es): run with "
            "--batch-size 2 or under torchrun (the published runs: 1 per GPU on 8 GPUs)"
        )
    if env.main:
        refuse_fresh_run_into_used_directory(args.out, args.resume)
    if src is None:
        classes: Tuple[str, ...] = SCENE_CLASSES
        head_classes = args.num_classes or len(classes)
        train_set = SceneTrain(args.scenes, args.scene_size, args.crop, args.seed)
        val_set = SceneEval(args.val_scenes, args.scene_size, args.seed)
        reduce = False
    else:
        classes, head_classes, reduce = src.classes, src.head_classes, src.reduce_zero_label
        train_set = SegTrain(src.train, len(classes), reduce, args.crop, args.seed)
        val_set = SegEval(src.val, len(classes), reduce)
    if head_classes < len(classes):
        raise ValueError(f"argument '--num-classes' expected at least the dataset's {len(classes)} classes, got {head_classes}")

    torch.manual_seed(args.seed)
    backbone = build_backbone(args.model, args.config, float(args.drop_path or 0.0), args.backend)
    note = "from scratch (no --weights)"
    if args.weights:
        report = load_backbone_weights(backbone, args.weights, strict=not args.allow_partial_weights)
        note = report.describe()
    model: nn.Module = Segmentor(backbone, head_classes, int(args.head_channels or 512)).to(device)
    groups = dense_param_groups(model, backbone, float(args.lr), float(args.weight_decay), float(args.layer_decay))
    opt = torch.optim.AdamW(groups, lr=float(args.lr), betas=(0.9, 0.999))
    scaler = grad_scaler(precision, device)

    run_args = dict(
        config=args.config, model=args.model, recipe=args.recipe, data=args.data, dataset=kind, weights=args.weights,
        iters=args.iters, batch_size=args.batch_size, lr=args.lr, layer_decay=args.layer_decay,
        weight_decay=args.weight_decay, warmup=args.warmup, crop=args.crop, drop_path=args.drop_path,
        head_channels=args.head_channels, seed=args.seed, world=env.world,
    )  # fmt: skip
    state = load_resume_state(args.resume, args.out, None)
    run = dict(id=run_identity(state), **run_args)
    start = 0
    history: List[Dict[str, Any]] = []
    last_eval: Optional[Dict[str, Any]] = None
    if state is not None:
        warn_changed_run_arguments(state, run_args, warn=env.main)
        check_checkpoint_fits(state, model.state_dict(), f"--model {args.model}, --config {args.config}, {head_classes} classes")
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        scaler.load_state_dict(state["scaler"])
        rngs = state["rng"]
        set_rng_state(rngs[env.rank] if env.rank < len(rngs) else rngs[0])
        start = int(state["step"])
        last_eval = state.get("last_eval")
        if env.main:
            print(f"resumed from {state['path']} at step {start}")
    if env.enabled:
        if device.type == "cuda":
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        elif env.main:
            warnings.warn("DDP on CPUs: BatchNorm statistics are per process (SyncBatchNorm needs GPUs)")
        model = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    if env.main:
        print(
            f"geomoe segment: {args.model} config {args.config}, recipe {args.recipe}, data {args.data or 'embedded scenes'} "
            f"({kind}, {len(classes)} classes, head {head_classes}; {len(train_set)} train / {len(val_set)} val images), "
            f"{device} x {env.world}, batch {args.batch_size} per process, crop {args.crop}, lr {args.lr:g}, "
            f"{args.iters} iterations, {precision}; {note}"
        )
    loader = torch.utils.data.DataLoader(
        train_set,
        batch_sampler=ResumableBatchSampler(len(train_set), args.batch_size, args.seed, start, args.iters, env.rank, env.world),
        num_workers=workers,
        collate_fn=_collate,
        pin_memory=device.type == "cuda",
        timeout=args.timeout if workers else 0,
    )
    metrics_file = os.path.join(args.out, "metrics.jsonl")
    bar = tqdm(total=args.iters, initial=start, disable=not (args.progress and env.main), dynamic_ncols=True, leave=False)
    step, t0, seen, loss_sum, aux_sum, n_sum, bad_in_row = start, time.perf_counter(), 0, 0.0, 0.0, 0, 0
    model.train()
    final = None

    def save() -> str:
        rngs = distributed.all_gather_objects(env, rng_state()) if env.enabled else [rng_state()]
        path = ""
        if env.main:
            train_state = dict(
                optimizer=opt.state_dict(), scaler=scaler.state_dict(), step=step, rng=rngs, config=config_of(args),
                world=env.world, run=run, last_eval=last_eval,
            )  # fmt: skip
            path = checkpoint.save(args.out, step, _eval_model(model).state_dict(), train_state)
            checkpoint.prune(args.out, args.keep_last, run["id"])
        if env.enabled:
            distributed.barrier(env)
        return path

    batches = start_batches(loader)
    while step < args.iters:
        try:
            imgs, labels = next(batches)
        except StopIteration:
            break
        except SegDataError:
            raise
        except Exception as exc:
            err = _unwrap_worker_error(exc)
            if err is exc:
                raise
            raise err from None
        imgs, labels = imgs.to(device, non_blocking=True), labels.to(device, non_blocking=True)
        lr = seg_lr(step, args.iters, int(args.warmup or 0), float(args.lr))
        for g in opt.param_groups:
            g["lr"] = lr * g["lr_scale"]
        with autocast(precision, device):
            logits, aux = model(imgs)
            loss = seg_loss(logits, labels)
            total = loss + aux.float()
        finite = torch.isfinite(total.detach()).float()
        if env.enabled:
            distributed.all_reduce(env, finite, op=torch.distributed.ReduceOp.MIN)
        opt.zero_grad(set_to_none=True)
        if bool(finite):
            scaler.scale(total).backward()
            scaler.step(opt)
            scaler.update()
            bad_in_row = 0
            loss_sum, aux_sum, n_sum = loss_sum + float(loss.detach()), aux_sum + float(aux.detach()), n_sum + 1
            seen += imgs.shape[0] * env.world
        else:
            bad_in_row += 1
            warnings.warn(f"step {step + 1}: non-finite loss, step skipped ({bad_in_row} in a row)")
            if bad_in_row >= args.max_bad_steps:
                raise distributed.RunFailure(
                    f"stopping at step {step + 1}: {bad_in_row} steps in a row had a non-finite loss "
                    f"(--max-bad-steps {args.max_bad_steps}); the last checkpoint in {args.out} is intact"
                )
        step += 1
        bar.update(1)
        if step % args.log_every == 0 and env.main and n_sum:
            now = time.perf_counter()
            rec = dict(step=step, loss=loss_sum / n_sum, aux=aux_sum / n_sum, lr=lr, images_per_s=seen / (now - t0))
            append_jsonl(metrics_file, rec)
            history.append(rec)
            t0, seen, loss_sum, aux_sum, n_sum = now, 0, 0.0, 0.0, 0
        if step % args.eval_every == 0 or step == args.iters:
            m = evaluate(
                model, val_set, len(classes), head_classes, args.crop, int(args.slide_stride or args.crop), device,
                precision, env, classes, args.max_val,
            )  # fmt: skip
            last_eval = dict(step=step, **m)
            if env.main:
                append_jsonl(metrics_file, dict(step=step, eval=m))
                tqdm.write(f"Iter(val) [{step}/{args.iters}] {metrics_line(m)}")
        if step % args.save_every == 0 or step == args.iters or stop.requested:
            final = save()
        if stop.requested:
            if env.main:
                print(f"{stop.received}: stopped at step {step}; checkpoint {final}")
            break
    bar.close()
    if args.submission and src is not None and step == args.iters:
        if not src.test:
            raise ValueError(f"argument '--submission' expected Test images under {args.data} (LoveDA), found none")
        if env.main:
            n = write_submission(
                model, SegEval(src.test, len(classes), reduce), args.submission, head_classes, args.crop,
                int(args.slide_stride or args.crop), device, precision,
            )  # fmt: skip
            print(f"wrote {n} LoveDA submission PNGs to {args.submission}")
    if env.main and last_eval is not None and step == args.iters:
        print(f"result: {metrics_line(last_eval)} at iteration {step}")
    return {"metrics": last_eval, "history": history, "model": _eval_model(model), "step": step}
