"""One configuration per run kind: a dataclass whose fields carry their command line.

Each field of a run's arguments (train.PretrainArgs, finetune.FinetuneArgs) is written once, with
`opt(default, help, ...)`: its default, its help, its flag (the field name with dashes, unless
given), its choices and its check. `add_fields` turns the fields into the subcommand's argparse
options and `check_fields` runs every field's check in `validate()`, so the command line, the
dataclass and its validation cannot disagree. What the parser gets:

- the type from the annotation (Optional[int] -> int; str and Optional[str] take the text as is);
- a bool defaulting to False: a switch `--x` (store_true); to True: `--no-x` (store_false);
  Optional[bool] (default None): `--x/--no-x` (argparse.BooleanOptionalAction);
- `switches={"--a": (const, help), ...}`: a mutually exclusive group of store_const switches;
- the help ends with "(default X)" unless it says its default in its own words, the default is
  None (the help then says what it falls back to) or the option is a switch.

A value out of range is refused by `check_fields` with an error naming the flag; the CLI shows it
as a one-line usage error (exit code 2)."""

from __future__ import annotations

import argparse
import dataclasses
import math
import typing
from typing import Any, Callable, Dict, Iterable, Mapping, Optional, Sequence, Tuple

from geomoe_kernels.backend import BACKENDS

from .distributed import DEFAULT_TIMEOUT
from .geodata import MAX_RASTER_PIXELS
from .checks import check_float, check_int
from .speed import PRECISIONS

DATA_FORMATS = ("auto", "image", "raster")
"""--data-format: image (8-bit RGB through PIL), raster (rasterio), auto."""

Check = Callable[[str, Any, bool], None]
"""check(field name, value, optional): raises a ValueError naming the flag; `optional`: None is allowed."""


def opt(
    default: Any,
    help: str,
    *,
    flag: Optional[str] = None,
    metavar: Optional[str] = None,
    choices: Optional[Sequence[Any]] = None,
    check: Optional[Check] = None,
    switches: Optional[Mapping[str, Tuple[Any, str]]] = None,
    cli: bool = True,
) -> Any:
    """A dataclass field with its command line (see the module's docstring); `cli=False`: an
    argument for code only (no flag), documented all the same."""
    meta = dict(help=help, flag=flag, metavar=metavar, choices=choices, check=check, switches=switches, cli=cli)
    return dataclasses.field(default=default, metadata=meta)


def ints(minimum: int, maximum: Optional[int] = None) -> Check:
    """An integer >= minimum (<= maximum)."""
    return lambda name, value, optional: check_int(name, value, minimum, optional, maximum)


def floats(low: float, high: float = math.inf, low_open: bool = False, high_open: bool = False) -> Check:
    """A finite number in [low, high], the ends open as asked."""
    return lambda name, value, optional: check_float(name, value, low, high, low_open, high_open, optional)


def flag_of(f: dataclasses.Field) -> str:
    """The field's flag as errors name it (a switch pair: both, e.g. '--alpha-as-data/--alpha-as-mask')."""
    if f.metadata.get("switches"):
        return "/".join(sorted(f.metadata["switches"]))
    if f.metadata.get("flag"):
        return f.metadata["flag"]
    return ("--no-" if f.default is True else "--") + f.name.replace("_", "-")  # a default True turns off


def cli_fields(cls: type) -> Iterable[dataclasses.Field]:
    """The fields of `cls` that have a flag."""
    return (f for f in dataclasses.fields(cls) if f.metadata.get("cli"))


def _value_type(cls: type, f: dataclasses.Field) -> Any:
    """The annotation without Optional: int, float, str or bool."""
    hint = typing.get_type_hints(cls)[f.name]
    args = typing.get_args(hint)  # Optional[X] and X | None alike: (X, NoneType)
    return args[0] if len(args) == 2 and args[1] is type(None) else hint


def _format_default(value: Any) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def help_of(f: dataclasses.Field, switch: bool = False) -> str:
    """The field's help as --help shows it: the text, then "(default X)" unless the text says its
    default, the default is None or the option is a switch."""
    text = f.metadata["help"]
    if "default" in text or switch or f.default is None:
        return text
    return f"{text} (default {_format_default(f.default)})"


def add_fields(parser: argparse.ArgumentParser, cls: type, only: Optional[Sequence[str]] = None) -> None:
    """An option for every field of the dataclass `cls` that has a flag (or for the ones named in `only`)."""
    for f in cli_fields(cls):
        if only is not None and f.name not in only:
            continue
        meta = f.metadata
        if meta["switches"]:
            group = parser.add_mutually_exclusive_group()
            for switch, (const, text) in meta["switches"].items():
                # every switch of the group carries the default, so every action states it
                group.add_argument(switch, dest=f.name, action="store_const", const=const, default=f.default, help=text)
            continue
        kind = _value_type(cls, f)
        kw: Dict[str, Any] = dict(dest=f.name, default=f.default)
        flag = flag_of(f)
        if kind is bool and f.default is None:
            kw.update(action=argparse.BooleanOptionalAction, help=help_of(f))
        elif kind is bool:
            kw.update(action="store_false" if f.default else "store_true", help=help_of(f, switch=True))
        else:
            kw.update(help=help_of(f), type=None if kind is str else kind)
            if meta["choices"] is not None:
                kw.update(choices=meta["choices"])
            if meta["metavar"] is not None:
                kw.update(metavar=meta["metavar"])
        parser.add_argument(flag, **kw)


def check_fields(args: Any) -> None:
    """Every field's choices and check, each error naming the flag (the CLI shows it as a usage error)."""
    for f in dataclasses.fields(args):
        value, meta = getattr(args, f.name), f.metadata
        optional = f.default is None
        if value is None and optional:
            continue
        choices = meta.get("choices") or [const for const, _ in (meta.get("switches") or {}).values()]
        if choices and value not in choices:
            raise ValueError(f"argument '{flag_of(f)}' expected one of {list(dict.fromkeys(choices))}, got {value!r}")
        if meta.get("check") is not None:
            meta["check"](f.name, value, optional)


# ---- options every run kind takes, written once -----------------------------------------------------


def resume_opt() -> Any:
    return opt(
        None,
        "'auto' (newest valid checkpoint in --out; a new run where it has none) or a checkpoint path (default: a new run)",
    )


def keep_last_opt(default: int) -> Any:
    return opt(default, "this run's newest checkpoints kept (0: all)", check=ints(0))


def device_opt() -> Any:
    return opt("auto", "auto, cpu, cuda, cuda:N")


def backend_opt() -> Any:
    return opt("auto", "kernels of the fused ops; auto picks per op (`make info` says which here)", choices=BACKENDS)


def seed_opt(what: str) -> Any:
    return opt(0, f"random seed ({what})", check=ints(0, 2**32 - 1))


def workers_opt() -> Any:
    return opt(None, "data loader workers (default 4 on GPU, 0 on CPU)", check=ints(0))


def precision_opt() -> Any:
    return opt(
        None,
        "bf16: bfloat16 autocast, no grad scaler; fp16: float16 autocast with a GradScaler (the published "
        "recipe); fp32: no autocast (default: fp16 on CUDA, fp32 on a CPU)",
        choices=PRECISIONS,
    )


def amp_opt() -> Any:
    return opt(None, "legacy: --precision fp16 / fp32 (default: --precision's)")


def progress_opt() -> Any:
    return opt(True, "no progress bar")


def max_bad_steps_opt() -> Any:
    return opt(5, "stop after this many skipped (non-finite) steps in a row", check=ints(1))


def timeout_opt(what: str) -> Any:
    return opt(DEFAULT_TIMEOUT, f"seconds {what} may take before the run stops with an error", check=floats(0, low_open=True))


def in_chans_opt(more: str) -> Any:
    return opt(None, f"image bands (default 3); another count reads --data as rasters{more}", check=ints(1))


def alpha_opt() -> Any:
    return opt(
        "mask",
        "a raster band declared alpha: the no-data mask of the other bands ('mask') or a band ('data')",
        switches={
            "--alpha-as-mask": (
                "mask",
                "a raster band declared alpha (colour interpretation; GDAL and rasterio write a 4-band uint8 GeoTIFF "
                "with band 4 as alpha) is the no-data mask of the other bands, not a band (default)",
            ),
            "--alpha-as-data": (
                "data",
                "a raster band declared alpha is a band like the others (e.g. near-infrared written with the defaults) "
                "and masks nothing",
            ),
        },
    )


def max_raster_pixels_opt() -> Any:
    return opt(
        MAX_RASTER_PIXELS,
        f"refuse a raster whose header declares more than N values, bands x height x width (default {MAX_RASTER_PIXELS:,}: "
        "4 bands of 5792 x 5792), before reading it",
        metavar="N",
        check=ints(1),
    )
