"""geomoe command line: `geomoe pretrain ...` and `geomoe finetune ...` (also `python -m geomoe ...`)."""

from __future__ import annotations

import argparse
import os
import re
import sys
from typing import Dict, List, Optional, Tuple

from geomoe_kernels.backend import BACKENDS

from .configs import CONFIGS
from .distributed import DEFAULT_TIMEOUT
from .geodata import MAX_RASTER_PIXELS
from .model import FRONT_ENDS
from .speed import PRECISIONS


_BACKEND_HELP = "kernels of the fused ops; auto picks per op (`make info` says which here)"


class _DefaultsFormatter(argparse.HelpFormatter):
    """Every option's help ends with its default, unless the text already says it ("default ...");
    an option without a default (None) says in its own words what it falls back to."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        switch = action.nargs == 0 and not isinstance(action, argparse.BooleanOptionalAction)  # store_true/false
        if "default" in text or switch or action.default in (None, argparse.SUPPRESS) or not action.option_strings:
            return text
        return f"{text} (default {action.default})" if text else f"(default {action.default})"


def _preset_defaults(p: argparse.ArgumentParser) -> None:
    """--steps, --batch-size, --lr: their help names each preset's value (configs.CONFIGS)."""
    shown = {
        "steps": {name: c["steps"] for name, c in CONFIGS.items()},
        "batch_size": {name: c["batch_size"] for name, c in CONFIGS.items()},
        "lr": {
            name: f"{c['lr']:g}" if c.get("lr") else f"{c['base_lr']:.3g} x global batch / 256" for name, c in CONFIGS.items()
        },
    }
    for action in p._actions:
        if action.dest in shown:
            values = ", ".join(f"{name} {v}" for name, v in sorted(shown[action.dest].items()))
            action.help = (action.help or "").replace("(default: the preset's)", f"(default: the preset's: {values})")


def _recipe_defaults(p: argparse.ArgumentParser) -> None:
    """A fine-tuning flag left unset takes the --recipe's value: its help says both recipes' values
    (finetune.RECIPES), so the two cannot disagree."""
    from .finetune import RECIPES

    size = "the config's size"  # the short recipe's img_size (None)
    for action in p._actions:
        if action.dest in RECIPES["short"] and action.dest not in ("precision",):
            values = ", ".join(
                f"{name} {size if r[action.dest] is None else r[action.dest]}"
                for name, r in sorted(RECIPES.items(), reverse=True)
            )
            action.help = f"{action.help + ' ' if action.help else ''}(default: the --recipe's: {values})"


def _pretrain_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "pretrain", help="MAE pretraining (the published recipe: docs/recipe.md)", formatter_class=_DefaultsFormatter
    )
    p.add_argument("--config", choices=sorted(CONFIGS), default="tiny", help="model and recipe preset (default tiny)")
    p.add_argument(
        "--model",
        choices=("geomoe", "moevit"),
        default="geomoe",
        help="GeoMoE, or the plain-ViT MoE baseline (MoE-ViT; its pretraining recipe is assumed to be GeoMoE's)",
    )
    p.add_argument("--data", default=None, help="image folder root/<subfolder>/...; default: the embedded procedural scenes")
    p.add_argument("--steps", type=int, default=None, help="optimizer steps (default: the preset's)")
    p.add_argument("--batch-size", type=int, default=None, help="images per process (default: the preset's)")
    p.add_argument("--lr", type=float, default=None, help="peak learning rate (default: the preset's)")
    p.add_argument(
        "--out",
        default="runs/pretrain",
        help="run directory: checkpoints and metrics.jsonl; a new run needs one without checkpoints",
    )
    p.add_argument("--save-every", type=int, default=0, help="also checkpoint every N steps (0: by --save-minutes only)")
    p.add_argument(
        "--save-minutes",
        type=float,
        default=30.0,
        help="checkpoint at the first step after this many minutes since the last checkpoint (0: off); the end of "
        "the run always saves",
    )
    p.add_argument("--keep-last", type=int, default=3, help="this run's newest checkpoints kept (0: all)")
    p.add_argument(
        "--resume",
        default=None,
        help="'auto' (newest valid checkpoint in --out; a new run where it has none) or a checkpoint path (default: a new run)",
    )
    p.add_argument(
        "--stop-after",
        type=int,
        default=None,
        help="end this run after N steps with a checkpoint, to resume later (default: run to --steps)",
    )
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    p.add_argument("--backend", choices=BACKENDS, default="auto", help=_BACKEND_HELP)
    p.add_argument("--front-end", choices=FRONT_ENDS, default="sparse", help="GeoMoE's convolutional front end")
    p.add_argument("--seed", type=int, default=0, help="random seed (weights, masks, data order)")
    p.add_argument(
        "--in-chans",
        type=int,
        default=None,
        help="image bands (default 3); another count reads --data as rasters (GeoTIFF, needs the 'geo' extra)",
    )
    p.add_argument(
        "--data-format",
        choices=("auto", "image", "raster"),
        default="auto",
        help="image: 8-bit RGB files through PIL; raster: any bands and bit depth through rasterio, per-band "
        "normalisation, no-data at 0; auto (default): raster when --in-chans is not 3, --band-stats is given or "
        "--data holds band_stats.json",
    )
    p.add_argument(
        "--band-stats",
        default=None,
        help='raster per-band {"mean": [...], "std": [...]} JSON (default: <data>/band_stats.json, written by '
        "`geomoe stats DATA`)",
    )
    _raster_flags(p)
    p.add_argument(
        "--init-weights",
        default=None,
        help="start a new run from these weights (a checkpoint or an original-layout file); RGB weights get the "
        "first patch embedding adapted to --in-chans (each band: the mean RGB kernel x 3/bands) (default: random "
        "initial weights)",
    )
    p.add_argument(
        "--allow-partial-init",
        action="store_true",
        help="load what --init-weights has of the encoder and name what it lacks (kept at initial values)",
    )
    p.add_argument("--log-every", type=int, default=10, help="a metrics line every N steps")
    p.add_argument("--workers", type=int, default=None, help="data loader workers (default 4 on GPU, 0 on CPU)")
    _speed_flags(p)
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    p.add_argument(
        "--ep",
        type=int,
        default=None,
        metavar="N",
        help="expert-parallel size: the routed experts sharded over groups of N ranks in blocks of ceil(experts / N), "
        "data parallel over the world / N groups (one (dp, ep) device mesh; N divides the number of processes and "
        "leaves every rank of a group at least one expert: 23 experts on 8 ranks is fine) (default 1)",
    )
    p.add_argument("--expert-parallel", action="store_true", help="legacy: --ep <number of processes>")
    p.add_argument(
        "--fsdp", action="store_true", help="shard parameters and optimizer state with FSDP2 (fully_shard; with --ep on the mesh)"
    )
    p.add_argument(
        "--async-save",
        action="store_true",
        help="write checkpoints in the background: a step waits only for a CPU copy; a checkpoint becomes "
        "ckpt_<step> once every rank has written it (at the next save or the end of the run)",
    )
    p.add_argument("--max-bad-steps", type=int, default=5, help="stop after this many skipped (non-finite) steps in a row")
    p.add_argument("--no-tensorboard", dest="tensorboard", action="store_false", help="no TensorBoard events even if installed")
    p.add_argument(
        "--timeout",
        type=float,
        default=DEFAULT_TIMEOUT,
        help=f"seconds a collective between ranks or a data-loader batch may take before the run stops with an "
        f"error (default {DEFAULT_TIMEOUT:g})",
    )
    _preset_defaults(p)
    return p


def _raster_flags(p: argparse.ArgumentParser) -> None:
    alpha = p.add_mutually_exclusive_group()
    alpha.add_argument(
        "--alpha-as-mask",
        dest="alpha",
        action="store_const",
        const="mask",
        default="mask",
        help="a raster band declared alpha (colour interpretation; GDAL and rasterio write a 4-band uint8 GeoTIFF "
        "with band 4 as alpha) is the no-data mask of the other bands, not a band (default)",
    )
    alpha.add_argument(
        "--alpha-as-data",
        dest="alpha",
        action="store_const",
        const="data",
        default="mask",  # both switches of the pair carry the default, so every action states it
        help="a raster band declared alpha is a band like the others (e.g. near-infrared written with the defaults) "
        "and masks nothing",
    )
    p.add_argument(
        "--max-raster-pixels",
        type=int,
        default=MAX_RASTER_PIXELS,
        metavar="N",
        help=f"refuse a raster whose header declares more than N values, bands x height x width (default {MAX_RASTER_PIXELS:,}: "
        "4 bands of 5792 x 5792), before reading it",
    )


def _speed_flags(p: argparse.ArgumentParser, blocks: bool = True) -> None:
    p.add_argument(
        "--precision",
        choices=PRECISIONS,
        default=None,
        help="bf16: bfloat16 autocast, no grad scaler; fp16: float16 autocast with a GradScaler (the published "
        "recipe); fp32: no autocast (default: fp16 on CUDA, fp32 on a CPU)",
    )
    p.add_argument(
        "--amp",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="legacy: --precision fp16 / fp32 (default: --precision's)",
    )
    if not blocks:
        return
    p.add_argument(
        "--compile",
        action="store_true",
        help="torch.compile each transformer block (fullgraph: the fused ops stay whole in its graph); backend "
        "inductor on CUDA and on a CPU with a C++ compiler, else aot_eager",
    )
    p.add_argument(
        "--compile-backend",
        default=None,
        help="torch.compile backend for --compile (inductor, aot_eager, ...) (default: inductor where it can build "
        "kernels, else aot_eager)",
    )
    p.add_argument(
        "--activation-checkpointing",
        action="store_true",
        help="recompute each transformer block's activations in the backward (less memory, about one more forward)",
    )


def _finetune_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "finetune",
        help="scene-classification fine-tuning of either pretrained encoder (the published recipe: docs/recipe.md)",
        formatter_class=_DefaultsFormatter,
    )
    p.add_argument("--config", choices=sorted(CONFIGS), default="tiny", help="encoder preset (default tiny)")
    p.add_argument("--model", choices=("geomoe", "moevit"), default="geomoe", help="GeoMoE, or the plain-ViT MoE baseline")
    p.add_argument(
        "--recipe",
        choices=("short", "published"),
        default="short",
        help="defaults for every flag below left unset: 'published' is the published recipe (200 epochs, batch 64, "
        "320 px, blr 1e-3, mixup 0.8, cutmix 1.0, ...); 'short' (default) the same method for 10 epochs of batch 32 "
        "at the config's size, blr 1.6e-2, no mixup or cutmix (for the tiny config from scratch)",
    )
    p.add_argument(
        "--data",
        default=None,
        help="folder with train/<class>/ and val/<class>/, or with --split the folder its paths are relative to; "
        "default: generated scene classes",
    )
    p.add_argument(
        "--split",
        default=None,
        metavar="FILE.json",
        help="a published split file: train and val image lists (default: --data's train/ and val/ folders)",
    )
    p.add_argument("--in-chans", type=int, default=None, help="image bands (default 3); another count reads --data as rasters")
    p.add_argument(
        "--data-format",
        choices=("auto", "image", "raster"),
        default="auto",
        help="raster: --data/train/<class>/ and val/<class>/ GeoTIFFs (rasterio, the [geo] extra); auto: rasters when "
        "--in-chans is not 3 or band statistics are given or found",
    )
    p.add_argument(
        "--band-stats",
        default=None,
        help='raster per-band {"mean": [...], "std": [...]} JSON (default: <data>/train/band_stats.json, written by '
        "`geomoe stats DATA/train`, else <data>/band_stats.json)",
    )
    _raster_flags(p)
    p.add_argument(
        "--weights",
        default=None,
        help="pretrained weights: a geomoe checkpoint (directory or its model.safetensors) or an original-layout "
        "file; every encoder tensor must be in it (default: none, from scratch)",
    )
    p.add_argument(
        "--allow-partial-weights",
        action="store_true",
        help="load what --weights has of the encoder and name what it lacks (kept at initial values)",
    )
    p.add_argument("--img-size", type=int, default=None, help="input size, a multiple of 16 (position table interpolated)")
    p.add_argument("--epochs", type=int, default=None, help="training epochs")
    p.add_argument(
        "--batch-size",
        type=int,
        default=None,
        help="training batch; the last partial batch of an epoch is dropped, as the published recipe does "
        "(validation sees every image)",
    )
    p.add_argument("--blr", type=float, default=None, help="base learning rate: peak lr = blr * batch / 256")
    p.add_argument("--lr", type=float, default=None, help="absolute peak learning rate (instead of --blr) (default: from --blr)")
    p.add_argument("--layer-decay", type=float, default=None, help="layer-wise lr decay")
    p.add_argument("--weight-decay", type=float, default=None, help="AdamW weight decay")
    p.add_argument("--warmup-ratio", type=float, default=None, help="linear warm-up over this fraction of all steps")
    p.add_argument(
        "--warmup-epochs",
        type=float,
        default=None,
        help="warm-up length in epochs (instead of --warmup-ratio) (default: from --warmup-ratio)",
    )
    p.add_argument("--smoothing", type=float, default=None, help="label smoothing")
    p.add_argument("--mixup", type=float, default=None, help="mixup alpha (0: off)")
    p.add_argument("--cutmix", type=float, default=None, help="cutmix alpha (0: off)")
    p.add_argument("--drop-path", type=float, default=None, help="stochastic depth of the last block (linear from 0)")
    p.add_argument("--clip-grad", type=float, default=None, help="gradient norm clipping (0: off)")
    p.add_argument("--randaug", default=None, help="RandAugment, e.g. rand-m9-mstd0.5-inc1, or none")
    p.add_argument("--reprob", type=float, default=None, help="random erasing probability (per-pixel noise)")
    p.add_argument("--out", default="runs/finetune", help="run directory: checkpoints and metrics.jsonl")
    p.add_argument(
        "--resume",
        default=None,
        help="'auto' (newest valid checkpoint in --out; a new run where it has none) or a checkpoint path (default: a new run)",
    )
    p.add_argument("--keep-last", type=int, default=2, help="this run's newest checkpoints kept (0: all)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    p.add_argument("--backend", choices=BACKENDS, default="auto", help=_BACKEND_HELP)
    p.add_argument("--seed", type=int, default=0, help="random seed (head, augmentation, data order)")
    p.add_argument("--workers", type=int, default=None, help="data loader workers (default 4 on GPU, 0 on CPU)")
    _speed_flags(p, blocks=False)
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    p.add_argument("--max-bad-steps", type=int, default=5, help="stop after this many skipped (non-finite) steps in a row")
    p.add_argument(
        "--timeout",
        type=float,
        default=DEFAULT_TIMEOUT,
        help=f"seconds a data-loader batch may take before the run stops with an error (default {DEFAULT_TIMEOUT:g})",
    )
    _recipe_defaults(p)
    return p


def build_parser() -> Tuple[argparse.ArgumentParser, Dict[str, argparse.ArgumentParser]]:
    """The `geomoe` parser and its subcommands' parsers by name."""
    parser = argparse.ArgumentParser(
        prog="geomoe",
        description="GeoMoE on geomoe_kernels: pretraining, scene-classification fine-tuning, raster band "
        "statistics and run reports",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    parsers = {"pretrain": _pretrain_parser(sub), "finetune": _finetune_parser(sub)}
    st = sub.add_parser("stats", help="per-band mean and std of a raster folder, written to DIR/band_stats.json")
    st.add_argument("data_dir", metavar="DIR", help="raster folder DIR/<subfolder>/...")
    st.add_argument("--out", default=None, help="the JSON file to write (default DIR/band_stats.json)")
    _raster_flags(st)
    rep = sub.add_parser("report", help="PNG plots of a run: loss, throughput, expert load")
    rep.add_argument("run_dir", metavar="RUN_DIR")
    parsers.update(stats=st, report=rep)
    return parser, parsers


def main(argv: Optional[List[str]] = None) -> int:
    parser, parsers = build_parser()
    ns = parser.parse_args(argv)
    try:
        return _run(ns, parsers)
    except (ValueError, OSError, RuntimeError, ImportError) as exc:
        from .distributed import RunFailure

        if not user_error(exc):
            raise
        # a usage error exits 2 as argparse's own do; a run that failed on a fault exits 1
        parsers[ns.command].exit(1 if isinstance(exc, RunFailure) else 2, f"geomoe {ns.command}: error: {exc}\n")


def user_error(exc: BaseException) -> bool:
    """An error about what the user gave: its message names the flag, argument, variable or
    checkpoint ("argument '--x' expected ...", "--resume auto: ...", "checkpoint ... was written by
    ..."); an op's argument error ("grouped_mm: argument 'weight' ...") is not one. A
    run that ends on a fault (a rank died, too many bad steps) says so in one line too. Anything
    else is a bug: its traceback stands."""
    from .distributed import RunFailure

    text = str(exc)
    return (
        isinstance(exc, RunFailure)
        or text.startswith(("--", "checkpoint ", "environment variable "))
        or re.search(r"\barguments? '(--[a-z]|RUN_DIR'|DIR')", text) is not None  # an op's 'x' is not the user's
    )


def _run(ns: argparse.Namespace, parsers) -> int:
    fields = {k: v for k, v in vars(ns).items() if k != "command"}
    if ns.command == "pretrain":
        from .train import PretrainArgs, pretrain

        args = PretrainArgs(**fields)
        _validate(parsers["pretrain"], args)
        pretrain(args)
    elif ns.command == "finetune":
        from .finetune import FinetuneArgs, finetune

        args = FinetuneArgs(**fields)
        _validate(parsers["finetune"], args)
        finetune(args)
    elif ns.command == "stats":
        from .geodata import band_stats

        if not os.path.isdir(ns.data_dir):
            parsers["stats"].exit(2, f"geomoe stats: error: argument 'DIR' expected a directory, got {ns.data_dir!r}\n")
        try:
            stats = band_stats(ns.data_dir, ns.out, ns.alpha, ns.max_raster_pixels)
        except (OSError, ValueError, ImportError) as exc:
            parsers["stats"].exit(2, f"geomoe stats: error: {exc}\n")
        alpha = ""
        if stats["alpha_bands"]:
            which = ", ".join(str(b) for b in stats["alpha_bands"])
            alpha = f" (band {which} declared alpha in {stats['alpha_files']} files: " + (
                "read as the no-data mask, not as a band; --alpha-as-data reads it as one)"
                if stats["alpha"] == "mask"
                else "read as a band, --alpha-as-data)"
            )
        print(
            f"{stats['files']} rasters ({stats['skipped']} unreadable skipped), {stats['bands']} bands{alpha}: "
            f"mean {[round(m, 4) for m in stats['mean']]}, std {[round(v, 4) for v in stats['std']]}; wrote "
            f"{ns.out or os.path.join(ns.data_dir, 'band_stats.json')}"
        )
    elif ns.command == "report":
        from .report import write_report

        for path in write_report(ns.run_dir):
            print(f"wrote {path}")
    return 0


def _validate(parser: argparse.ArgumentParser, args) -> None:
    """A number out of range (or a device this machine lacks) is a usage error naming the flag."""
    from .runtime import resolve_device

    try:
        args.validate()
        if args.device != "auto":
            resolve_device(args.device)
    except ValueError as exc:
        parser.error(str(exc))


if __name__ == "__main__":
    sys.exit(main())
