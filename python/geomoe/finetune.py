"""Scene-classification fine-tuning of the pretrained encoder: mean-pooled tokens -> LayerNorm ->
linear head, layer-wise lr decay, AdamW, warm-up + cosine, label smoothing, optional mixup/cutmix,
auxiliary loss weight 5e-6, MoE biases frozen, top-1 on a validation folder every epoch,
checkpoints and resume like pretraining (the run owns its --out; SIGTERM or SIGINT saves and stops;
unreadable images are skipped and named). --weights loads strictly: every backbone tensor must come
from the file, unless --allow-partial-weights."""

from __future__ import annotations

import os
import time
import warnings
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm import tqdm

from . import checkpoint
from .backbone import GeoMoEBackbone
from .configs import CONFIGS
from .data import ClassFolder, skip_unreadable_labelled, write_scene_classes
from .distributed import DEFAULT_TIMEOUT
from .original import _read, key_map, load_original_state_dict
from .speed import PRECISIONS, autocast, grad_scaler, resolve_precision
from .runtime import (
    RunDirectory,
    StopSignals,
    append_jsonl,
    check_float,
    check_int,
    load_resume_state,
    lr_at,
    make_loader,
    refuse_fresh_run_into_used_directory,
    resolve_device,
    restore_single,
    run_identity,
    save_single,
    start_batches,
    warn_changed_run_arguments,
)

AUX_WEIGHT = 5e-6
_BIAS_NAMES = {"b1", "b2", "shared_b1", "shared_b2"}  # stacked expert biases: 2-d, but biases


class GeoMoEClassifier(nn.Module):
    def __init__(self, backbone: GeoMoEBackbone, num_classes: int):
        super().__init__()
        self.backbone = backbone
        dim = backbone.embed_dims[2]
        self.fc_norm = nn.LayerNorm(dim, eps=1e-6)
        self.head = nn.Linear(dim, num_classes)
        nn.init.trunc_normal_(self.head.weight, std=2e-5)
        nn.init.zeros_(self.head.bias)

    def forward(self, imgs: Tensor) -> Tuple[Tensor, Tensor]:
        """(logits [N, classes], summed auxiliary loss)."""
        out = self.backbone.forward_features(imgs)
        return self.head(self.fc_norm(out.pooled)), out.aux.sum()


def layer_id(name: str, num_layers: int) -> int:
    """0 for everything before the MoE blocks, i + 1 for MoE block i, num_layers for the head."""
    if name.startswith("backbone.blocks3."):
        return int(name.split(".")[2]) + 1
    if name.startswith("backbone."):
        return 0
    return num_layers


def param_groups(model: GeoMoEClassifier, weight_decay: float, layer_decay: float) -> List[Dict[str, Any]]:
    """One group per (layer, decay or not): lr scale layer_decay^(num_layers - layer); no weight decay
    on biases, norms and the position table."""
    num_layers = len(model.backbone.blocks3) + 1
    groups: Dict[Tuple[int, bool], Dict[str, Any]] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        no_decay = p.ndim <= 1 or name.rsplit(".", 1)[-1] in _BIAS_NAMES or name.endswith("pos_embed")
        lid = layer_id(name, num_layers)
        g = groups.setdefault(
            (lid, no_decay),
            {"params": [], "weight_decay": 0.0 if no_decay else weight_decay, "lr_scale": layer_decay ** (num_layers - lid)},
        )
        g["params"].append(p)
    return list(groups.values())


def mix_batch(
    imgs: Tensor, labels: Tensor, num_classes: int, smoothing: float, mixup: float, cutmix: float, gen: torch.Generator
) -> Tuple[Tensor, Tensor]:
    """Soft targets with label smoothing; with mixup/cutmix alphas > 0, one of them (even odds when
    both) mixes the batch with its reverse."""
    off = smoothing / num_classes
    target = torch.full((labels.shape[0], num_classes), off, device=imgs.device)
    target.scatter_(1, labels[:, None], 1.0 - smoothing + off)
    if mixup <= 0 and cutmix <= 0:
        return imgs, target
    use_cutmix = cutmix > 0 and (mixup <= 0 or torch.rand(1, generator=gen).item() < 0.5)
    alpha = cutmix if use_cutmix else mixup
    lam = float(np.random.default_rng(int(torch.randint(0, 2**31, (1,), generator=gen))).beta(alpha, alpha))
    flipped = imgs.flip(0)
    if use_cutmix:
        H, W = imgs.shape[2:]
        ch, cw = int(H * (1 - lam) ** 0.5), int(W * (1 - lam) ** 0.5)
        cy, cx = int(torch.randint(0, H, (1,), generator=gen)), int(torch.randint(0, W, (1,), generator=gen))
        y0, y1 = max(cy - ch // 2, 0), min(cy + ch // 2, H)
        x0, x1 = max(cx - cw // 2, 0), min(cx + cw // 2, W)
        imgs = imgs.clone()
        imgs[:, :, y0:y1, x0:x1] = flipped[:, :, y0:y1, x0:x1]
        lam = 1 - (y1 - y0) * (x1 - x0) / (H * W)
    else:
        imgs = lam * imgs + (1 - lam) * flipped
    return imgs, lam * target + (1 - lam) * target.flip(0)


@torch.no_grad()
def evaluate(model: GeoMoEClassifier, dataset: ClassFolder, device: torch.device, batch: int, precision: str) -> float:
    """Top-1 over the validation images that decode (unreadable ones are skipped with a warning
    naming them; `dataset.unreadable` counts them); NaN if none does."""
    model.eval()
    correct = seen = 0
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch, shuffle=False, collate_fn=skip_unreadable_labelled)
    for imgs, labels, _ in loader:
        if imgs is None:
            continue
        with autocast(precision, device):
            logits, _ = model(imgs.to(device))
        correct += int((logits.argmax(-1).cpu() == labels).sum())
        seen += labels.numel()
    model.train()
    return correct / seen if seen else float("nan")


# Tensors of the pretraining model that the backbone does not have (the decoder side), and of a
# fine-tuned classifier's head: expected extras in a --weights file, ignored.
_PRETRAIN_ONLY = (
    "decoder_blocks",
    "decoder_norm",
    "decoder_pred",
    "decoder_pos_embed",
    "decoder_embed",
    "mask_token",
    "norm",
    "stage1_output_decode",
    "stage2_output_decode",
)
_HEAD = ("head", "fc_norm")


def _expected_extra(key: str) -> bool:
    return key.split(".", 1)[0] in _PRETRAIN_ONLY + _HEAD


def _names(keys: List[str], n: int = 4) -> str:
    return ", ".join(keys[:n]) + (f" and {len(keys) - n} more" if len(keys) > n else "")


def load_pretrained(backbone: GeoMoEBackbone, path: str, partial: bool = False) -> str:
    """Load --weights into the backbone and say what loaded. Accepted: a `geomoe pretrain` or
    `geomoe finetune` checkpoint directory, its model.safetensors, or a file in the original layout
    (full or encoder-only; .pth/.pt/.safetensors). The decoder side of a pretraining model and a
    fine-tuned head are expected extras and ignored. Strict (the default): every backbone tensor
    must be in the file with its shape and nothing else unexpected, or a ValueError says what is
    missing; partial=True (--allow-partial-weights) loads what matches and names the rest, which
    keeps its initial values."""
    if os.path.isdir(path):
        if not os.path.isfile(os.path.join(path, checkpoint.MODEL_FILE)):
            raise ValueError(
                f"argument '--weights' expected a checkpoint directory holding {checkpoint.MODEL_FILE} "
                f"or a weights file, got the directory {path!r} without it"
            )
        path = os.path.join(path, checkpoint.MODEL_FILE)
    try:
        tensors = _read(path)
    except Exception as exc:
        raise ValueError(
            f"argument '--weights' expected a weights file (a dict of tensors), got {path!r} ({type(exc).__name__}: {exc})"
        ) from exc
    # a fine-tuning checkpoint holds the backbone under 'backbone.'
    if any(k.startswith("backbone.") for k in tensors):
        tensors = {k[len("backbone.") :] if k.startswith("backbone.") else k: v for k, v in tensors.items()}
    own = backbone.state_dict()
    original = key_map(backbone)
    # the original layout keeps one tensor per expert (unique_experts.<e>, share_experts); this
    # project's stacks them ([E, ...]); without expert tensors the two layouts agree
    ours = not any(k in original and k not in own for k in tensors)
    extras = [k for k in tensors if _expected_extra(k)]
    wanted = {k: v for k, v in tensors.items() if not _expected_extra(k)}
    if ours:
        layout = "geomoe layout"
        missing = sorted(k for k in own if k not in wanted)
        unexpected = sorted(k for k in wanted if k not in own)
        for k in sorted(set(own) & set(wanted)):
            if tuple(own[k].shape) != tuple(wanted[k].shape):
                raise ValueError(
                    f"argument '--weights': tensor '{k}' in {path} expected shape {list(own[k].shape)} "
                    f"(this --config), got {list(wanted[k].shape)}"
                )
        n_total, n_loaded = len(own), len(own) - len(missing)
    else:
        layout = "original layout"
        missing = sorted(k for k in original if k not in wanted)
        unexpected = sorted(k for k in wanted if k not in original)
        n_total, n_loaded = len(original), len(original) - len(missing)  # counted in the file's own (per-expert) keys
    if (missing or unexpected) and not partial:
        raise ValueError(
            f"argument '--weights' expected weights for every backbone tensor, got {path} ({layout}) with {n_loaded} of "
            f"{n_total}"
            + (f"; missing: {_names(missing)}" if missing else "")
            + (f"; unexpected: {_names(unexpected)}" if unexpected else "")
            + ". Pass --allow-partial-weights to load only what matches"
        )
    if ours:
        backbone.load_state_dict({k: v for k, v in wanted.items() if k in own}, strict=False)
    else:
        load_original_state_dict(backbone, {k: v for k, v in wanted.items() if k in original})
    note = f"loaded {n_loaded} of {n_total} backbone tensors from {path} ({layout})"
    if extras:
        note += f"; ignored {len(extras)} tensors of the decoder or a head"
    if missing:
        note += f"; NOT loaded, left at their initial values: {_names(missing)}"
    if unexpected:
        note += f"; not used: {_names(unexpected)}"
    return note


@dataclass
class FinetuneArgs:
    config: str = "tiny"
    data: Optional[str] = None  # folder with train/ and val/ class folders; None: the embedded scene classes
    weights: Optional[str] = None
    img_size: Optional[int] = None
    epochs: int = 10
    batch_size: int = 32
    lr: float = 1e-3
    layer_decay: float = 0.85
    weight_decay: float = 0.05
    warmup_epochs: float = 1.0
    smoothing: float = 0.1
    mixup: float = 0.0
    cutmix: float = 0.0
    out: str = "runs/finetune"
    resume: Optional[str] = None
    keep_last: int = 2
    device: str = "auto"
    backend: str = "auto"
    seed: int = 0
    workers: Optional[int] = None
    amp: Optional[bool] = None  # legacy: --amp is --precision fp16, --no-amp fp32
    precision: Optional[str] = None  # bf16, fp16 or fp32 (default: fp16 on CUDA, fp32 on a CPU)
    progress: bool = True
    allow_partial_weights: bool = False  # --weights may lack backbone tensors (they keep their initial values)
    timeout: float = DEFAULT_TIMEOUT  # seconds a data-loader batch may take (with workers)

    def validate(self) -> None:
        """Every number in range, with an error naming the flag (the CLI shows it as a usage error)."""
        if self.config not in CONFIGS:
            raise ValueError(f"argument '--config' expected one of {list(CONFIGS)}, got {self.config!r}")
        if self.img_size is not None and (
            isinstance(self.img_size, bool) or not isinstance(self.img_size, int) or self.img_size < 16 or self.img_size % 16
        ):
            raise ValueError(f"argument '--img-size' expected a positive multiple of 16, got {self.img_size!r}")
        check_int("epochs", self.epochs, 1)
        check_int("batch_size", self.batch_size, 1)
        check_float("lr", self.lr, 0, low_open=True)
        check_float("layer_decay", self.layer_decay, 0, 1, low_open=True)
        check_float("weight_decay", self.weight_decay, 0)
        check_float("warmup_epochs", self.warmup_epochs, 0)
        check_float("smoothing", self.smoothing, 0, 1, high_open=True)
        check_float("mixup", self.mixup, 0)
        check_float("cutmix", self.cutmix, 0)
        check_int("keep_last", self.keep_last, 0)
        check_int("seed", self.seed, 0, maximum=2**32 - 1)
        check_int("workers", self.workers, 0, optional=True)
        check_float("timeout", self.timeout, 0, low_open=True)
        if self.precision is not None and self.precision not in PRECISIONS:
            raise ValueError(f"argument '--precision' expected one of {list(PRECISIONS)}, got {self.precision!r}")


def finetune(args: FinetuneArgs) -> Dict[str, Any]:
    args.validate()
    device = resolve_device(args.device)
    with StopSignals() as stop, RunDirectory(args.out):
        return _finetune(args, device, stop)


def _finetune(args: FinetuneArgs, device: torch.device, stop: StopSignals) -> Dict[str, Any]:
    precision = resolve_precision(args.precision, args.amp, device)
    workers = args.workers if args.workers is not None else (4 if device.type == "cuda" else 0)
    model_cfg = {k: v for k, v in CONFIGS[args.config]["model"].items() if not k.startswith("decoder")}
    img_size = args.img_size if args.img_size is not None else model_cfg.get("img_size", 224)
    refuse_fresh_run_into_used_directory(args.out, args.resume)
    data = args.data
    if data is None:
        data = os.path.join(args.out, "scene_classes")
        if not os.path.isdir(os.path.join(data, "val")):
            write_scene_classes(data, per_class_train=64, per_class_val=16, size=max(img_size, 64), seed=args.seed)
    train_set = ClassFolder(os.path.join(data, "train"), img_size, train=True, seed=args.seed)
    val_set = ClassFolder(os.path.join(data, "val"), img_size, train=False, classes=train_set.classes)

    torch.manual_seed(args.seed)
    backbone = GeoMoEBackbone(**model_cfg, backend=args.backend)
    note = load_pretrained(backbone, args.weights, args.allow_partial_weights) if args.weights else "from scratch (no --weights)"
    model = GeoMoEClassifier(backbone, len(train_set.classes)).to(device)
    groups = param_groups(model, args.weight_decay, args.layer_decay)
    opt = torch.optim.AdamW(groups, lr=args.lr, betas=(0.9, 0.999), fused=True)
    scaler = grad_scaler(precision, device)
    per_epoch = len(train_set) // args.batch_size
    total = per_epoch * args.epochs
    warmup = max(1, int(per_epoch * args.warmup_epochs))

    start, best = 0, 0.0
    run_args = dict(
        config=args.config,
        data=args.data,
        weights=args.weights,
        img_size=img_size,
        epochs=args.epochs,
        batch_size=args.batch_size,
        lr=args.lr,
        layer_decay=args.layer_decay,
        weight_decay=args.weight_decay,
        warmup_epochs=args.warmup_epochs,
        smoothing=args.smoothing,
        mixup=args.mixup,
        cutmix=args.cutmix,
        seed=args.seed,
    )
    state = load_resume_state(args.resume, args.out)
    run = dict(id=run_identity(state), **run_args)
    if state is not None:
        warn_changed_run_arguments(state, run_args)
        start = restore_single(state, model, opt, scaler)
        best = float(state.get("best_top1", 0.0))
        print(f"resumed from {state['path']} at step {start}")
    print(
        f"geomoe finetune: config {args.config}, {img_size} px, {len(train_set.classes)} classes "
        f"({len(train_set)} train / {len(val_set)} val images), {device}, {note}"
    )
    loader = make_loader(
        train_set,
        args.batch_size,
        args.seed,
        start,
        total,
        workers,
        device,
        collate_fn=skip_unreadable_labelled,
        timeout=args.timeout,
    )
    mix_gen = torch.Generator().manual_seed(args.seed)
    bar = tqdm(total=total, initial=start, disable=not args.progress, dynamic_ncols=True, leave=False)
    history, step, t0, seen, skipped_images = [], start, time.perf_counter(), 0, 0
    loss = torch.tensor(float("nan"))
    model.train()
    for imgs, labels, skipped in start_batches(loader):
        lr = lr_at(step, total, args.lr, warmup, 1e-3)
        skipped_images += skipped
        if imgs is None:  # no image of the batch decoded: the step passes without an update
            warnings.warn(f"step {step + 1}: no readable image in the batch, step skipped")
        else:
            imgs, labels = imgs.to(device, non_blocking=True), labels.to(device, non_blocking=True)
            mix_gen.manual_seed(args.seed * 1_000_003 + step)  # mixing depends on the step alone: resumable
            imgs, target = mix_batch(imgs, labels, len(train_set.classes), args.smoothing, args.mixup, args.cutmix, mix_gen)
            for g in opt.param_groups:
                g["lr"] = lr * g["lr_scale"]
            with autocast(precision, device):
                logits, aux = model(imgs)
                loss = torch.sum(-target * F.log_softmax(logits.float(), dim=-1), dim=-1).mean()
                total_loss = loss + AUX_WEIGHT * aux
            opt.zero_grad(set_to_none=True)
            scaler.scale(total_loss).backward()
            scaler.step(opt)
            scaler.update()
            seen += imgs.shape[0]
        step += 1
        bar.update(1)
        if step % per_epoch == 0:
            epoch = step // per_epoch
            top1 = evaluate(model, val_set, device, args.batch_size, precision)
            best = max(best, top1) if top1 == top1 else best
            now = time.perf_counter()
            record = {
                "epoch": epoch,
                "step": step,
                "loss": float(loss.detach()),
                "lr": lr,
                "val_top1": top1,
                "images_per_s": seen / (now - t0),
                "skipped_images": skipped_images,
                "val_skipped_images": val_set.unreadable,
            }
            t0, seen, skipped_images = now, 0, 0
            history.append(record)
            append_jsonl(os.path.join(args.out, "metrics.jsonl"), record)
            tqdm.write(
                f"epoch {epoch:>3}/{args.epochs} | loss {record['loss']:.4f} | lr {lr:.2e} | "
                f"val top-1 {100 * top1:.1f}% (best {100 * best:.1f}%) | {record['images_per_s']:.1f} img/s"
                + (
                    f" | skipped {record['skipped_images']} + {record['val_skipped_images']} val images"
                    if record["skipped_images"] or record["val_skipped_images"]
                    else ""
                )
            )
            final = save_single(args.out, step, args.keep_last, model, opt, scaler, args, run, best_top1=best)
        elif stop.requested:
            final = save_single(args.out, step, args.keep_last, model, opt, scaler, args, run, best_top1=best)
        if stop.requested:
            print(f"{stop.received}: stopped at step {step}; checkpoint {final}")
            break
    bar.close()
    return {"history": history, "best_top1": best, "model": model}
