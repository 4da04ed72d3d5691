"""geomoe command line: `geomoe pretrain ...`, `geomoe finetune ...` and `geomoe segment ...` (also `python -m geomoe ...`).

The pretrain and finetune options are generated from their dataclasses (train.PretrainArgs,
finetune.FinetuneArgs; config_cli.add_fields): a flag is added, or changed, at its field."""

from __future__ import annotations

import argparse
import os
import re
import sys
from typing import Dict, List, Optional, Tuple

from .config_cli import add_fields
from .finetune import FinetuneArgs
from .train import PretrainArgs


def _pretrain_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("pretrain", help="MAE pretraining (the published recipe: docs/recipe.md)")
    add_fields(p, PretrainArgs)
    return p


def _finetune_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "finetune", help="scene-classification fine-tuning of either pretrained encoder (the published recipe: docs/recipe.md)"
    )
    add_fields(p, FinetuneArgs)
    return p


def _segment_parser(sub) -> argparse.ArgumentParser:
    from .dense.segment import SegmentArgs

    p = sub.add_parser(
        "segment",
        help="semantic segmentation (UPerHead) on either pretrained encoder (the published recipe: docs/segmentation.md)",
    )
    add_fields(p, SegmentArgs)
    return p


def _detect_parser(sub) -> argparse.ArgumentParser:
    from .detection.detect import DetectArgs

    p = sub.add_parser(
        "detect", help="object detection (Faster R-CNN / Oriented R-CNN) on either pretrained encoder (docs/detection.md)"
    )
    add_fields(p, DetectArgs)
    return p


def build_parser() -> Tuple[argparse.ArgumentParser, Dict[str, argparse.ArgumentParser]]:
    """The `geomoe` parser and its subcommands' parsers by name."""
    parser = argparse.ArgumentParser(
        prog="geomoe",
        description="GeoMoE on geomoe_kernels: pretraining, scene-classification fine-tuning, raster band "
        "statistics and run reports",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    parsers = {"pretrain": _pretrain_parser(sub), "finetune": _finetune_parser(sub), "segment": _segment_parser(sub)}
    parsers["detect"] = _detect_parser(sub)
    st = sub.add_parser("stats", help="per-band mean and std of a raster folder, written to DIR/band_stats.json")
    st.add_argument("data_dir", metavar="DIR", help="raster folder DIR/<subfolder>/...")
    st.add_argument("--out", default=None, help="the JSON file to write (default DIR/band_stats.json)")
    add_fields(st, PretrainArgs, only=("alpha", "max_raster_pixels"))
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
        from .train import pretrain

        args = PretrainArgs(**fields)
        _validate(parsers["pretrain"], args)
        pretrain(args)
    elif ns.command == "finetune":
        from .finetune import finetune

        args = FinetuneArgs(**fields)
        _validate(parsers["finetune"], args)
        finetune(args)
    elif ns.command == "segment":
        from .dense.segment import SegmentArgs, segment

        sargs = SegmentArgs(**fields)
        _validate(parsers["segment"], sargs)
        segment(sargs)
    elif ns.command == "detect":
        from .detection.detect import DetectArgs, detect

        dargs = DetectArgs(**fields)
        _validate(parsers["detect"], dargs)
        detect(dargs)
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
    from .checks import resolve_device

    try:
        args.validate()
        if args.device != "auto":
            resolve_device(args.device)
    except ValueError as exc:
        parser.error(str(exc))


if __name__ == "__main__":
    sys.exit(main())
