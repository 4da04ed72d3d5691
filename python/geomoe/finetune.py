"""Scene-classification fine-tuning of either pretrained encoder (`--model geomoe|moevit`) with the
published recipe (docs/recipe.md): mean-pooled tokens -> LayerNorm -> linear head; AdamW (0.9,
0.999) with the published layer-wise lr decay ids (layer_decay.py) and no weight decay on biases and
norms; lr = blr * batch / 256 (or an absolute --lr); linear warm-up over a ratio of the steps, then
cosine to 1e-3 of the peak, per step; drop path rising linearly over the blocks; RandAugment and
random erasing on the training images (augment.py), a pure function of (seed, epoch, index); label
smoothing with optional mixup/cutmix; gradient clipping; auxiliary loss weight 5e-6; MoE biases
frozen; a step whose loss is not finite is skipped (the run stops after --max-bad-steps in a row).
Every epoch ends with top-1, top-5 (for more than 5 classes) and the loss on the validation images;
the result is the last epoch's top-1. The last partial training batch of an epoch is dropped (the
published recipe's drop_last; the banner says how many images); validation sees every image. `--recipe published` sets every published value; flags given beside it win.

Checkpoints and resume as in pretraining (the run owns its --out; SIGTERM or SIGINT saves and
stops; unreadable images are skipped and named). --weights loads strictly: every encoder tensor
must come from the file, unless --allow-partial-weights.

Multispectral data: with --in-chans other than 3 (or --data-format raster, or band statistics
given or found) --data/train/<class>/ and val/<class>/ hold rasters read through rasterio
(geodata.RasterClassFolder: per-band normalisation, no-data at 0); RGB --weights get the first
patch embedding adapted to the band count (geodata.adapt_in_chans)."""

from __future__ import annotations

import os
import time
import warnings
from dataclasses import dataclass, replace
from typing import Any, Dict, List, Optional, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from geomoe_kernels._checks import non_finite_passes

from . import checkpoint, layer_decay
from .augment import parse_randaug
from .backbone import GeoMoEBackbone
from .config_cli import (
    DATA_FORMATS,
    alpha_opt,
    amp_opt,
    backend_opt,
    check_fields,
    device_opt,
    floats,
    in_chans_opt,
    ints,
    keep_last_opt,
    max_bad_steps_opt,
    max_raster_pixels_opt,
    opt,
    precision_opt,
    progress_opt,
    resume_opt,
    seed_opt,
    timeout_opt,
    workers_opt,
)
from .configs import CONFIGS, MODELS
from .data import (
    ClassFolder,
    LabelledImages,
    check_classification_data,
    check_readable,
    folder_classes,
    read_split,
    skip_unreadable_labelled,
    write_scene_classes,
)
from .geodata import (
    BAND_STATS_FILE,
    RasterClassFolder,
    adapt_state_dict_in_chans,
    load_band_stats,
)
from .moevit import MoEViTClassifier
from .original import key_map, load_original_state_dict
from .speed import autocast, grad_scaler, resolve_precision
from .trainer import Checkpointer, Placement, Schedule, Task, Trainer, Window, launch, set_lr
from .trainer.checkpointing import check_checkpoint_fits
from .trainer.data import make_loader
from .trainer.rundir import run_identity, warn_changed_run_arguments

AUX_WEIGHT = 5e-6

# The published scene-classification recipe (both models). Flags left unset take these values.
PUBLISHED: Dict[str, Any] = dict(
    epochs=200,
    batch_size=64,
    img_size=320,
    blr=1e-3,  # lr = blr * batch / 256: 2.5e-4 at batch 64
    layer_decay=0.85,
    weight_decay=0.05,
    warmup_ratio=0.025,  # of all steps (5 of 200 epochs)
    min_lr_ratio=1e-3,  # cosine to 1e-3 of the peak
    smoothing=0.1,
    mixup=0.8,
    cutmix=1.0,
    drop_path=0.1,
    clip_grad=1.0,
    randaug="rand-m9-mstd0.5-inc1",
    reprob=0.25,
    precision="fp32",
)
# The default: the published method on a short schedule for the tiny config trained from scratch on
# the generated classes: 10 epochs of batch 32 at the config's pretraining size, peak lr 2e-3 (blr
# 1.6e-2), no mixup or cutmix; fp16 autocast on a GPU. Real data wants --recipe published.
SHORT: Dict[str, Any] = dict(
    PUBLISHED, epochs=10, batch_size=32, img_size=None, blr=1.6e-2, mixup=0.0, cutmix=0.0, precision=None
)
RECIPES: Dict[str, Dict[str, Any]] = {"short": SHORT, "published": PUBLISHED}


class GeoMoEClassifier(nn.Module):
    """GeoMoE for scene classification: the backbone run dense, its stage-3 tokens mean-pooled,
    fc_norm (LayerNorm eps 1e-6), a linear head (truncated-normal std 2e-5, bias 0).
    forward(imgs) -> (logits [N, classes], summed auxiliary loss)."""

    def __init__(self, backbone: GeoMoEBackbone, num_classes: int):
        super().__init__()
        self.backbone = backbone
        dim = backbone.embed_dims[2]
        self.fc_norm = nn.LayerNorm(dim, eps=1e-6)
        self.head = nn.Linear(dim, num_classes)
        nn.init.trunc_normal_(self.head.weight, std=2e-5)
        nn.init.zeros_(self.head.bias)

    def forward(self, imgs: Tensor) -> Tuple[Tensor, Tensor]:
        out = self.backbone.forward_features(imgs)
        return self.head(self.fc_norm(out.pooled)), out.aux.sum()

    def moe_layers(self):
        return self.backbone.moe_layers()


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
def evaluate(model: nn.Module, dataset: LabelledImages, device: torch.device, batch: int, precision: str) -> Dict[str, float]:
    """Top-1, top-5 and the mean cross-entropy over the validation images that decode (unreadable
    ones are skipped with a warning naming them; `dataset.unreadable` counts them); NaN where none
    does. Top-5 only for more than 5 classes (None otherwise: with 5 or fewer it is always 100%)."""
    model.eval()
    top1 = top5 = seen = 0
    loss_sum = 0.0
    k = min(5, len(dataset.classes))
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch, shuffle=False, collate_fn=skip_unreadable_labelled)
    for imgs, labels, _ in loader:
        if imgs is None:
            continue
        with autocast(precision, device):
            logits, _ = model(imgs.to(device))
        logits, labels = logits.float().cpu(), labels
        loss_sum += float(F.cross_entropy(logits, labels, reduction="sum"))
        best = logits.topk(k, dim=-1).indices
        top1 += int((best[:, 0] == labels).sum())
        top5 += int((best == labels[:, None]).any(dim=-1).sum())
        seen += labels.numel()
    model.train()
    nan = float("nan")
    top5_value = None if len(dataset.classes) <= 5 else (top5 / seen if seen else nan)
    return {"top1": top1 / seen if seen else nan, "top5": top5_value, "loss": loss_sum / seen if seen else nan}


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


def load_pretrained(backbone: nn.Module, path: str, partial: bool = False) -> str:
    """Load --weights into the encoder and say what loaded: `backbone` is a GeoMoEBackbone, or a
    MoE-ViT module (its fc_norm and head, if any, are not the file's to fill). Accepted: a `geomoe pretrain` or
    `geomoe finetune` checkpoint directory, its model.safetensors, or a file in the original layout
    (full or encoder-only; .pth/.pt/.safetensors). The decoder side of a pretraining model and a
    fine-tuned head are expected extras and ignored. Strict (the default): every backbone tensor
    must be in the file with its shape and nothing else unexpected, or a ValueError says what is
    missing; partial=True (--allow-partial-weights) loads what matches and names the rest, which
    keeps its initial values."""
    path, tensors = checkpoint.read_weights(path, "--weights")
    # a fine-tuning checkpoint holds the backbone under 'backbone.'
    if any(k.startswith("backbone.") for k in tensors):
        tensors = {k[len("backbone.") :] if k.startswith("backbone.") else k: v for k, v in tensors.items()}
    # RGB weights into a model with another band count: the first patch embedding adapted (geodata)
    adapted = adapt_state_dict_in_chans(tensors, getattr(backbone, "in_chans", 3))
    # tables the model recomputes (the MoE-ViT's position table) are never read
    recomputed = set(getattr(backbone, "ORIGINAL_KEYS_RECOMPUTED", ()))
    tensors = {k: v for k, v in tensors.items() if k not in recomputed}
    own = {k: v for k, v in backbone.state_dict().items() if not _expected_extra(k)}
    original = {k: v for k, v in key_map(backbone).items() if not _expected_extra(k)}
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
        backbone.load_state_dict({k: v for k, v in wanted.items() if k in own}, strict=False)  # only what is named
    else:
        load_original_state_dict(backbone, {k: v for k, v in wanted.items() if k in original})
    note = f"loaded {n_loaded} of {n_total} backbone tensors from {path} ({layout})"
    if adapted:
        note += "; " + "; ".join(a for a in adapted if not a.startswith("decoder_pred"))
    if extras:
        note += f"; ignored {len(extras)} tensors of the decoder or a head"
    if missing:
        note += f"; NOT loaded, left at their initial values: {_names(missing)}"
    if unexpected:
        note += f"; not used: {_names(unexpected)}"
    return note


def _recipe_help(key: str) -> str:
    """A flag left unset takes the --recipe's value: both recipes' values, for its help."""
    size = "the config's size"  # the short recipe's img_size (None)
    shown = ", ".join(f"{name} {size if r[key] is None else r[key]}" for name, r in sorted(RECIPES.items(), reverse=True))
    return f"(default: the --recipe's: {shown})"


def _img_size(name: str, value: Any, optional: bool) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 16 or value % 16:
        raise ValueError(f"argument '--img-size' expected a positive multiple of 16, got {value!r}")


def _randaug(name: str, value: Any, optional: bool) -> None:
    parse_randaug(value)


@dataclass
class FinetuneArgs:
    """What `geomoe finetune` takes: each field is its flag (config_cli.add_fields). Fields left None
    take the --recipe's value (`resolved()`)."""

    config: str = opt("tiny", "encoder preset", choices=tuple(sorted(CONFIGS)))
    model: str = opt("geomoe", "GeoMoE, or the plain-ViT MoE baseline", choices=MODELS)
    recipe: str = opt(
        "short",
        "defaults for every flag below left unset: 'published' is the published recipe (200 epochs, batch 64, "
        "320 px, blr 1e-3, mixup 0.8, cutmix 1.0, ...); 'short' (default) the same method for 10 epochs of batch 32 "
        "at the config's size, blr 1.6e-2, no mixup or cutmix (for the tiny config from scratch)",
        choices=tuple(RECIPES),
    )
    data: Optional[str] = opt(
        None,
        "folder with train/<class>/ and val/<class>/, or with --split the folder its paths are relative to; "
        "default: generated scene classes",
    )
    split: Optional[str] = opt(
        None,
        "a published split file: train and val image lists (default: --data's train/ and val/ folders)",
        metavar="FILE.json",
    )
    in_chans: Optional[int] = in_chans_opt("")
    data_format: str = opt(
        "auto",
        "raster: --data/train/<class>/ and val/<class>/ GeoTIFFs (rasterio, the [geo] extra); auto: rasters when "
        "--in-chans is not 3 or band statistics are given or found",
        choices=DATA_FORMATS,
    )
    band_stats: Optional[str] = opt(
        None,
        'raster per-band {"mean": [...], "std": [...]} JSON (default: <data>/train/band_stats.json, written by '
        "`geomoe stats DATA/train`, else <data>/band_stats.json)",
    )
    alpha: str = alpha_opt()
    max_raster_pixels: int = max_raster_pixels_opt()
    weights: Optional[str] = opt(
        None,
        "pretrained weights: a geomoe checkpoint (directory or its model.safetensors), an original-layout "
        "file or hf:OWNER/REPO/PATH[@REV]; every encoder tensor must be in it (default: none, from scratch)",
    )
    allow_partial_weights: bool = opt(
        False, "load what --weights has of the encoder and name what it lacks (kept at initial values)"
    )
    img_size: Optional[int] = opt(
        None, f"input size, a multiple of 16 (position table interpolated) {_recipe_help('img_size')}", check=_img_size
    )
    epochs: Optional[int] = opt(None, f"training epochs {_recipe_help('epochs')}", check=ints(1))
    batch_size: Optional[int] = opt(
        None,
        "training batch; the last partial batch of an epoch is dropped, as the published recipe does "
        f"(validation sees every image) {_recipe_help('batch_size')}",
        check=ints(1),
    )
    blr: Optional[float] = opt(
        None, f"base learning rate: peak lr = blr * batch / 256 {_recipe_help('blr')}", check=floats(0, low_open=True)
    )
    lr: Optional[float] = opt(
        None, "absolute peak learning rate (instead of --blr) (default: from --blr)", check=floats(0, low_open=True)
    )
    layer_decay: Optional[float] = opt(
        None, f"layer-wise lr decay {_recipe_help('layer_decay')}", check=floats(0, 1, low_open=True)
    )
    weight_decay: Optional[float] = opt(None, f"AdamW weight decay {_recipe_help('weight_decay')}", check=floats(0))
    warmup_ratio: Optional[float] = opt(
        None, f"linear warm-up over this fraction of all steps {_recipe_help('warmup_ratio')}", check=floats(0, 1)
    )
    warmup_epochs: Optional[float] = opt(
        None, "warm-up length in epochs (instead of --warmup-ratio) (default: from --warmup-ratio)", check=floats(0)
    )
    smoothing: Optional[float] = opt(None, f"label smoothing {_recipe_help('smoothing')}", check=floats(0, 1, high_open=True))
    mixup: Optional[float] = opt(None, f"mixup alpha (0: off) {_recipe_help('mixup')}", check=floats(0))
    cutmix: Optional[float] = opt(None, f"cutmix alpha (0: off) {_recipe_help('cutmix')}", check=floats(0))
    drop_path: Optional[float] = opt(
        None,
        f"stochastic depth of the last block (linear from 0) {_recipe_help('drop_path')}",
        check=floats(0, 1, high_open=True),
    )
    clip_grad: Optional[float] = opt(None, f"gradient norm clipping (0: off) {_recipe_help('clip_grad')}", check=floats(0))
    randaug: Optional[str] = opt(
        None,
        f"RandAugment, e.g. rand-m9-mstd0.5-inc1, or none {_recipe_help('randaug')}",
        check=_randaug,
    )
    reprob: Optional[float] = opt(
        None, f"random erasing probability (per-pixel noise) {_recipe_help('reprob')}", check=floats(0, 1)
    )
    out: str = opt("runs/finetune", "run directory: checkpoints and metrics.jsonl")
    resume: Optional[str] = resume_opt()
    keep_last: int = keep_last_opt(2)
    device: str = device_opt()
    backend: str = backend_opt()
    seed: int = seed_opt("head, augmentation, data order")
    workers: Optional[int] = workers_opt()
    precision: Optional[str] = precision_opt()
    amp: Optional[bool] = amp_opt()
    progress: bool = progress_opt()
    max_bad_steps: int = max_bad_steps_opt()
    timeout: float = timeout_opt("a data-loader batch")
    min_lr_ratio: Optional[float] = opt(
        None, f"cosine to this fraction of the peak lr {_recipe_help('min_lr_ratio')}", check=floats(0, 1), cli=False
    )

    def validate(self) -> None:
        """Every name and number in range, with an error naming the flag (the CLI shows it as a usage error)."""
        if self.lr is not None and self.blr is not None:
            raise ValueError(f"arguments '--lr' and '--blr' expected one at most, got --lr {self.lr} and --blr {self.blr}")
        if self.warmup_ratio is not None and self.warmup_epochs is not None:
            raise ValueError(
                f"arguments '--warmup-ratio' and '--warmup-epochs' expected one at most, got {self.warmup_ratio} and {self.warmup_epochs}"
            )
        check_fields(self)
        if self.data_format == "raster" and not self.data:
            raise ValueError("argument '--data-format raster' expected --data DIR too, got no --data")
        if self.data_format == "raster" and self.split is not None:
            raise ValueError(
                f"argument '--split' expected image files (--data-format image or auto), got --split {self.split} with raster"
            )
        if (self.in_chans or 3) != 3 and not self.data:
            raise ValueError(
                f"argument '--in-chans' {self.in_chans} expected --data DIR (multispectral rasters): the embedded scenes are RGB"
            )

    def resolved(self) -> "FinetuneArgs":
        """A copy with every field left None set from the recipe (an absolute --lr keeps blr unset,
        --warmup-epochs keeps warmup_ratio unset); img_size stays None for the short recipe (the
        config's pretraining size)."""
        self.validate()
        values = {}
        for key, value in RECIPES[self.recipe].items():
            if getattr(self, key) is not None:
                continue
            if (key == "blr" and self.lr is not None) or (key == "warmup_ratio" and self.warmup_epochs is not None):
                continue
            if key == "precision" and self.amp is not None:  # the legacy --amp / --no-amp decides
                continue
            values[key] = value
        return replace(self, **values)


def peak_learning_rate(args: FinetuneArgs) -> float:
    """--lr, or blr * batch / 256 (of resolved arguments)."""
    if args.lr is not None:
        return float(args.lr)
    assert args.blr is not None and args.batch_size is not None, "resolve the arguments first"
    return float(args.blr) * args.batch_size / 256


def _encoder_config(args: FinetuneArgs) -> Dict[str, Any]:
    preset = CONFIGS[args.config]["moevit" if args.model == "moevit" else "model"]
    return {k: v for k, v in preset.items() if not k.startswith("decoder")}


def build_classifier(args: FinetuneArgs, num_classes: int) -> Tuple[nn.Module, nn.Module]:
    """(classifier, the module --weights loads into) for --model and --config, with the recipe's
    drop path and --in-chans bands. Both are built at the pretraining size: other input sizes
    interpolate the position table bicubically."""
    cfg = dict(_encoder_config(args), in_chans=args.in_chans or 3)
    drop_path = args.drop_path if args.drop_path is not None else 0.0
    if args.model == "moevit":
        clf = MoEViTClassifier(num_classes, drop_path_rate=drop_path, backend=args.backend, **cfg)
        return clf, clf
    backbone = GeoMoEBackbone(**cfg, backend=args.backend, drop_path_rate=drop_path)
    return GeoMoEClassifier(backbone, num_classes), backbone


def finetune(args: FinetuneArgs) -> Dict[str, Any]:
    """Run (or resume) a fine-tuning. Returns {"top1": the last epoch's top-1 (the result), "top5",
    "val_loss", "best_top1", "history": one record per epoch run, "model"}."""
    args = args.resolved()
    return launch(FinetuneTask(args), args.device, args.timeout)


def _raster_data(args: FinetuneArgs) -> bool:
    """Whether --data holds rasters: --data-format raster, or auto with --in-chans other than 3, a
    --band-stats file, or band statistics in the folder."""
    if args.data_format != "auto" or not args.data:
        return args.data_format == "raster"
    return (
        (args.in_chans or 3) != 3
        or args.band_stats is not None
        or any(os.path.isfile(os.path.join(args.data, *p, BAND_STATS_FILE)) for p in (("train",), ()))
    )


def _raster_datasets(args: FinetuneArgs, img_size: int) -> Tuple[LabelledImages, LabelledImages]:
    """--data/train/<class>/ and --data/val/<class>/ rasters; the band statistics from --band-stats,
    else --data/train/band_stats.json (`geomoe stats DATA/train`: the training pixels), else
    --data/band_stats.json."""
    assert args.data is not None
    in_chans = args.in_chans or 3
    stats_file = args.band_stats
    if stats_file is None:
        found = [
            f
            for f in (os.path.join(args.data, "train", BAND_STATS_FILE), os.path.join(args.data, BAND_STATS_FILE))
            if os.path.isfile(f)
        ]
        stats_file = found[0] if found else os.path.join(args.data, "train", BAND_STATS_FILE)
    stats = load_band_stats(stats_file, in_chans)
    reprob = float(args.reprob or 0.0)
    kw = dict(alpha=args.alpha, max_pixels=args.max_raster_pixels)
    train = RasterClassFolder(os.path.join(args.data, "train"), img_size, True, in_chans, stats, args.seed, reprob=reprob, **kw)
    _check_class_folders(train, args.data)
    val = RasterClassFolder(os.path.join(args.data, "val"), img_size, False, in_chans, stats, classes=train.classes, **kw)
    return train, val


def _check_class_folders(train: LabelledImages, data: str) -> None:
    """`check_classification_data` for DATA/train/<class>/ and DATA/val/<class>/, before the
    validation folder is read with training's classes."""
    val_root = os.path.join(data, "val")
    val_classes = folder_classes(val_root) if os.path.isdir(val_root) else None
    check_classification_data("--data", train.classes, train.samples, [], os.path.join(data, "train"), val_root, val_classes)


def _datasets(args: FinetuneArgs, img_size: int) -> Tuple[LabelledImages, LabelledImages]:
    if _raster_data(args):
        return _raster_datasets(args, img_size)
    if (args.in_chans or 3) != 3:
        raise ValueError(f"argument '--in-chans' {args.in_chans} expected --data-format raster or auto, got image (RGB)")
    randaug = parse_randaug(args.randaug)
    reprob = float(args.reprob or 0.0)
    if args.split is not None:
        sp = read_split(args.split, args.data)
        check_classification_data("--split", sp.classes, sp.train, sp.val, f"{args.split} 'train'", f"{args.split} 'val'")
        train = LabelledImages(sp.train, sp.classes, img_size, True, args.seed, randaug, reprob)
        return train, LabelledImages(sp.val, sp.classes, img_size, False)
    data = args.data
    if data is None:
        data = os.path.join(args.out, "scene_classes")
        if not os.path.isdir(os.path.join(data, "val")):
            write_scene_classes(data, per_class_train=64, per_class_val=16, size=max(img_size, 64), seed=args.seed)
    train_set = ClassFolder(os.path.join(data, "train"), img_size, True, args.seed, randaug=randaug, reprob=reprob)
    _check_class_folders(train_set, data)
    return train_set, ClassFolder(os.path.join(data, "val"), img_size, False, classes=train_set.classes)


def _dropped(images: int, batch: int) -> str:
    """The banner's word on the last partial batch: dropped each epoch, as the published recipe's
    training loader does (drop_last); validation sees every image."""
    left = images % batch
    if not left:
        return "every training image each epoch"
    return (
        f"the last partial batch dropped: {left} of the {images} training images, a different {left} each epoch, "
        "as the published recipe does; validation sees every image"
    )


def _top5(value: Optional[float]) -> str:
    return "" if value is None else f" top-5 {100 * value:.2f}%"


class _EpochWindow(Window):
    """An epoch's sums: the mean training loss over the steps that trained, images per second."""

    def reset(self) -> None:
        super().reset()
        self.loss_sum, self.good_steps, self.seen = 0.0, 0, 0

    def sums(self) -> Dict[str, Any]:
        """What a mid-epoch checkpoint carries, so the resumed epoch's logged mean covers it all."""
        return dict(
            loss_sum=self.loss_sum, good_steps=self.good_steps, bad_steps=self.bad_steps, skipped_images=self.skipped_images
        )

    def restore(self, sums: Dict[str, Any]) -> None:
        self.loss_sum, self.good_steps = float(sums["loss_sum"]), int(sums["good_steps"])
        self.bad_steps, self.skipped_images = int(sums["bad_steps"]), int(sums["skipped_images"])


class FinetuneTask(Task):
    """Scene-classification fine-tuning as a run kind of the one trainer (geomoe.trainer): one
    process; an epoch ends with the validation and a checkpoint."""

    kind = "finetune"

    def __init__(self, args: FinetuneArgs):
        self.args = args  # resolved

    def setup(self, trainer: Trainer) -> None:
        args, env = self.args, trainer.env
        self.env, device = env, env.device
        self.precision = resolve_precision(args.precision, args.amp, device)
        self.workers = args.workers if args.workers is not None else (4 if device.type == "cuda" else 0)
        self.img_size = args.img_size if args.img_size is not None else _encoder_config(args).get("img_size", 224)
        assert args.epochs is not None and args.batch_size is not None and args.min_lr_ratio is not None
        self.placement = Placement(env)
        self.checkpointer = Checkpointer(env, self)
        self.checkpointer.refuse_fresh_run()
        self._data()
        torch.manual_seed(args.seed)
        model, encoder = build_classifier(args, len(self.train_set.classes))
        self.note = (
            load_pretrained(encoder, args.weights, args.allow_partial_weights) if args.weights else "from scratch (no --weights)"
        )
        self.model = model.to(device)
        self.placement.shard(self.model)
        self.wrapped = self.placement.wrap(self.model, [])
        self.peak_lr = peak_learning_rate(args)
        groups = layer_decay.param_groups(self.model, self.peak_lr, float(args.weight_decay), float(args.layer_decay))
        self.optimizer = torch.optim.AdamW(groups, lr=self.peak_lr, betas=(0.9, 0.999), fused=True)
        self.scaler = grad_scaler(self.precision, device)
        self.per_epoch = len(self.train_set) // args.batch_size
        self.steps = self.per_epoch * args.epochs
        if args.warmup_epochs is not None:
            warmup = max(1, int(self.per_epoch * args.warmup_epochs))
        else:
            warmup = max(1, int(round(self.steps * float(args.warmup_ratio))))
        self.schedule = Schedule(self.steps, self.peak_lr, warmup, args.min_lr_ratio)
        self.window = _EpochWindow()
        self.best, self.last_eval = 0.0, None
        self.run_args = self._run_args(warmup)
        self.mix_gen = torch.Generator().manual_seed(args.seed)
        self._resume(self.checkpointer.load())

    def _data(self) -> None:
        """The training and validation sets, checked: readable, at least a batch of training images."""
        args = self.args
        self.train_set, self.val_set = _datasets(args, self.img_size)
        train_root = os.path.join(args.data or os.path.join(args.out, "scene_classes"), "train")
        where = f"in the 'train' list of {args.split}" if args.split else f"under {train_root}/<class>/"
        check_readable([p for p, _ in self.train_set.samples], self.train_set.read, where, "--split" if args.split else "--data")
        if len(self.train_set) < args.batch_size:
            raise ValueError(
                f"argument '--batch-size' expected at most the {len(self.train_set)} training images, got {args.batch_size}"
            )

    def _run_args(self, warmup: int) -> Dict[str, Any]:
        """What makes this run this run: a resume with any of these changed gets a warning."""
        args = self.args
        keys = ("config", "model", "recipe", "data", "split", "weights")
        later = ("layer_decay", "weight_decay")
        regularisation = ("smoothing", "mixup", "cutmix", "drop_path", "clip_grad", "randaug", "reprob", "seed")
        return dict(
            **{k: getattr(args, k) for k in keys},
            img_size=self.img_size,
            epochs=args.epochs,
            batch_size=args.batch_size,
            lr=self.peak_lr,
            **{k: getattr(args, k) for k in later},
            warmup_steps=warmup,
            **{k: getattr(args, k) for k in regularisation},
            in_chans=args.in_chans or 3,
        )

    def _resume(self, state: Optional[Dict[str, Any]]) -> None:
        args = self.args
        self.run_id = run_identity(state)
        if state is None:
            return
        warn_changed_run_arguments(state, self.run_args)
        head = state["model"].get("head.weight")
        check_checkpoint_fits(
            state,
            self.model.state_dict(),
            f"--model {args.model}, --config {args.config}, {args.in_chans or 3} bands, {len(self.train_set.classes)} classes",
            f", {head.shape[0]} classes" if head is not None and head.dim() == 2 else "",
        )
        self.placement.load_weights(state["model"])
        self.best = float(state.get("best_top1", 0.0))
        self.last_eval = state.get("last_eval")
        self.checkpointer.restore(state)
        if self.start % self.per_epoch:  # resumed mid-epoch: the epoch's sums so far
            sums = state.get("epoch_sums")
            if isinstance(sums, dict):
                self.window.restore(sums)
            else:
                warnings.warn(
                    f"checkpoint {state['path']} (step {self.start}, mid-epoch) holds no sums of its epoch (an earlier "
                    f"version): epoch {self.start // self.per_epoch + 1}'s logged train loss covers only the steps after "
                    "the resume"
                )

    def banner(self) -> str:
        args, n = self.args, len(self.train_set)
        return (
            f"geomoe finetune: {args.model} config {args.config}, recipe {args.recipe}, {self.img_size} px, "
            f"{len(self.train_set.classes)} classes ({n} train / {len(self.val_set)} val images), {self.env.device}, "
            f"batch {args.batch_size}, peak lr {self.peak_lr:.3g}, {args.epochs} epoch{'' if args.epochs == 1 else 's'} of "
            f"{self.per_epoch} steps ({_dropped(n, args.batch_size)}), {self.note}"
        )

    def loader(self, start: int, end: int):
        args = self.args
        return make_loader(
            self.train_set,
            args.batch_size,
            args.seed,
            start,
            end,
            self.workers,
            self.env.device,
            collate_fn=skip_unreadable_labelled,
            timeout=args.timeout,
        )

    def train_step(self, batch: Tuple[Any, ...], lr: float, step: int) -> Optional[str]:
        args, device, (imgs, labels, _) = self.args, self.env.device, batch
        if imgs is None:  # no image of the batch decoded: the step passes without an update
            return "no readable image in the batch"
        imgs, labels = imgs.to(device, non_blocking=True), labels.to(device, non_blocking=True)
        self.mix_gen.manual_seed(args.seed * 1_000_003 + step)  # mixing depends on the step alone: resumable
        num_classes = len(self.train_set.classes)
        imgs, target = mix_batch(
            imgs, labels, num_classes, float(args.smoothing), float(args.mixup), float(args.cutmix), self.mix_gen
        )
        set_lr(self.optimizer, lr)
        # NaN/Inf router scores flow on to the loss check, as on a GPU, instead of raising in the CPU value check
        with autocast(self.precision, device), non_finite_passes():
            logits, aux = self.model(imgs)
            loss = torch.sum(-target * F.log_softmax(logits.float(), dim=-1), dim=-1).mean()
            total_loss = loss + AUX_WEIGHT * aux.sum()
        self.optimizer.zero_grad(set_to_none=True)
        if not bool(torch.isfinite(total_loss.detach())):
            return "non-finite loss"
        self.scaler.scale(total_loss).backward()
        clip = float(args.clip_grad or 0.0)
        if clip > 0:
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        w = self.window
        w.seen, w.loss_sum, w.good_steps = w.seen + imgs.shape[0], w.loss_sum + float(loss.detach()), w.good_steps + 1
        return None

    def log_due(self, step: int, end: int) -> bool:
        return step % self.per_epoch == 0

    def save_due(self, step: int) -> bool:
        return step % self.per_epoch == 0  # each epoch ends with a checkpoint

    def record(self, step: int, lr: float) -> Optional[Dict[str, Any]]:
        """The epoch's record: the validation, the mean training loss."""
        args, w = self.args, self.window
        if not self.trainer.counters.read_any:
            raise RuntimeError(
                f"argument '{'--split' if args.split else '--data'}' expected training images that can be read, got none "
                f"among the {w.skipped_images} this run drew: no step trained; stopped at step {step}, nothing was saved"
            )
        epoch = step // self.per_epoch
        ev = evaluate(self.model, self.val_set, self.env.device, args.batch_size, self.precision)
        self.best = max(self.best, ev["top1"]) if ev["top1"] == ev["top1"] else self.best
        record = {
            "epoch": epoch,
            "step": step,
            "loss": w.loss_sum / w.good_steps if w.good_steps else float("nan"),
            "lr": lr,
            "val_top1": ev["top1"],
            "val_top5": ev["top5"],
            "val_loss": ev["loss"],
            "images_per_s": w.seen / (time.perf_counter() - w.t0),
            "bad_steps": w.bad_steps,
            "skipped_images": w.skipped_images,
            "val_skipped_images": self.val_set.unreadable,
        }
        w.reset()
        self.last_eval = {"epoch": epoch, "top1": ev["top1"], "top5": ev["top5"], "loss": ev["loss"]}
        return record

    def log_line(self, record: Dict[str, Any]) -> str:
        skipped = ""
        if record["skipped_images"] or record["val_skipped_images"]:
            skipped = f" | skipped {record['skipped_images']} + {record['val_skipped_images']} val images"
        return (
            f"epoch {record['epoch']:>3}/{self.args.epochs} | loss {record['loss']:.4f} | lr {record['lr']:.2e} | "
            f"val top-1 {100 * record['val_top1']:.2f}%{_top5(record['val_top5'])} loss {record['val_loss']:.4f} "
            f"(best top-1 {100 * self.best:.2f}%) | {record['images_per_s']:.1f} img/s"
            + (f" | skipped {record['bad_steps']} steps" if record["bad_steps"] else "")
            + skipped
        )

    def checkpoint_state(self, step: int) -> Dict[str, Any]:
        state: Dict[str, Any] = dict(best_top1=self.best, last_eval=self.last_eval)
        if step % self.per_epoch:  # mid-epoch (a stop): the epoch's sums so far go with it
            state["epoch_sums"] = self.window.sums()
        return state

    def result(self, history: List[Dict[str, Any]], checkpoint: Optional[str], step: int) -> Dict[str, Any]:
        nan, last = float("nan"), self.last_eval
        if step == self.steps and last is not None:
            print(
                f"result: top-1 {100 * last['top1']:.2f}% at the last epoch ({last['epoch']}),"
                f"{_top5(last.get('top5'))} val loss {last['loss']:.4f}"
            )
        result = last or {}
        return {
            "history": history,
            "top1": result.get("top1", nan),
            "top5": result.get("top5", nan),
            "val_loss": result.get("loss", nan),
            "best_top1": self.best,
            "model": self.model,
        }
