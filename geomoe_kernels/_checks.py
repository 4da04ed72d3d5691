"""Argument checks shared by every op: each error names the op, the argument, what was expected and
what came. Metadata checks (device, dtype, shape, layout) cost nothing and always run. Value checks
(NaN, id ranges, offsets) need to read the data, which is a host sync on a GPU, so by default they run
only for CPU tensors; GEOMOE_CHECK_VALUES=1 turns them on everywhere, =0 off everywhere. The variable
is read at import (not on every op call); set_value_checks() or the value_checks() context manager
change the setting at run time, and geomoe_kernels.backend.forget() reads the variable again."""

from __future__ import annotations

import contextlib
import os
import threading
from typing import Iterable, Iterator, Optional, Sequence

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
INDEX_DTYPES = (torch.int64,)


class OpInputError(ValueError):
    """Raised for a bad argument to a geomoe_kernels op."""


def _fmt_dtypes(dtypes: Iterable[torch.dtype]) -> str:
    return "/".join(str(d).replace("torch.", "") for d in dtypes)


def check_tensor(
    op: str,
    name: str,
    t: Optional[torch.Tensor],
    *,
    dtypes: Sequence[torch.dtype] | None = None,
    dim: int | None = None,
    shape: Sequence[int | None] | None = None,
    device: torch.device | None = None,
    contiguous: bool = True,
    optional: bool = False,
) -> None:
    if t is None:
        if optional:
            return
        raise OpInputError(f"{op}: argument '{name}' expected a tensor, got None")
    if not isinstance(t, torch.Tensor):
        raise OpInputError(f"{op}: argument '{name}' expected a tensor, got {type(t).__name__}")
    if device is not None and t.device != device:
        raise OpInputError(
            f"{op}: argument '{name}' expected a tensor on {device} (the device of the first input), got one on {t.device}"
        )
    if dtypes is not None and t.dtype not in dtypes:
        raise OpInputError(f"{op}: argument '{name}' expected dtype {_fmt_dtypes(dtypes)}, got {t.dtype}")
    if dim is not None and t.dim() != dim:
        raise OpInputError(f"{op}: argument '{name}' expected a {dim}-d tensor, got shape {tuple(t.shape)}")
    if shape is not None:
        if t.dim() != len(shape) or any(s is not None and s != d for s, d in zip(shape, t.shape)):
            want = "[" + ", ".join("*" if s is None else str(s) for s in shape) + "]"
            raise OpInputError(f"{op}: argument '{name}' expected shape {want}, got {list(t.shape)}")
    if contiguous and not t.is_contiguous():
        overlap = any(st == 0 and sz > 1 for st, sz in zip(t.stride(), t.shape))
        what = "overlapping memory (a stride of 0, as from expand())" if overlap else "a non-contiguous tensor"
        raise OpInputError(
            f"{op}: argument '{name}' expected contiguous memory, got {what} with strides "
            f"{tuple(t.stride())} for shape {tuple(t.shape)}; call .contiguous() first"
        )


def check_same_dtype(op: str, names: Sequence[str], tensors: Sequence[Optional[torch.Tensor]]) -> None:
    ref_name, ref = names[0], tensors[0]
    assert ref is not None, "the first tensor sets the dtype"
    for n, t in zip(names[1:], tensors[1:]):
        if t is not None and t.dtype != ref.dtype:
            raise OpInputError(f"{op}: argument '{n}' expected dtype {ref.dtype} (the dtype of '{ref_name}'), got {t.dtype}")


def check_choice(op: str, name: str, value: str, choices: Sequence[str]) -> None:
    if value not in choices:
        raise OpInputError(f"{op}: argument '{name}' expected one of {list(choices)}, got {value!r}")


_ON_WORDS, _OFF_WORDS = ("1", "true", "yes", "on"), ("0", "false", "no", "off")


def env_switch(name: str) -> Optional[bool]:
    """An on/off environment variable: True for 1/true/yes/on, False for 0/false/no/off (any case),
    None when unset or empty (the default applies); any other value is an error naming the variable,
    never a silent default."""
    raw = os.environ.get(name, "")
    value = raw.strip().lower()
    if value in _ON_WORDS:
        return True
    if value in _OFF_WORDS:
        return False
    if value == "":
        return None
    raise ValueError(f"environment variable {name} expected 1 (or true, yes, on) or 0 (or false, no, off), got {raw!r}")


def _from_environment() -> Optional[bool]:
    return env_switch("GEOMOE_CHECK_VALUES")


# True: value checks everywhere, False: nowhere, None: for CPU tensors only (the default)
_value_checks: Optional[bool] = _from_environment()


def read_environment() -> None:
    """Take the setting from GEOMOE_CHECK_VALUES again (geomoe_kernels.backend.forget calls this)."""
    global _value_checks
    _value_checks = _from_environment()


def set_value_checks(on: Optional[bool]) -> Optional[bool]:
    """Value checks on every device (True), on none (False), or for CPU tensors only (None, the
    default); returns the setting it replaces. Process-wide, like the variable."""
    global _value_checks
    if on not in (True, False, None):
        raise ValueError(f"set_value_checks: argument 'on' expected True, False or None, got {on!r}")
    before, _value_checks = _value_checks, on
    return before


@contextlib.contextmanager
def value_checks(on: Optional[bool]) -> Iterator[None]:
    """set_value_checks(on) inside the block, the previous setting after it."""
    before = set_value_checks(on)
    try:
        yield
    finally:
        set_value_checks(before)


def value_checks_enabled(t: torch.Tensor) -> bool:
    on = _value_checks
    return t.device.type == "cpu" if on is None else on


_passing = threading.local()


@contextlib.contextmanager
def non_finite_passes() -> Iterator[None]:
    """Inside this block NaN/Inf in the data an op reads (router logits) pass through, as they do on
    a GPU where value checks are off, instead of raising: a training loop that checks its loss then
    skips a non-finite step the same way on every device. Parameters and buffers (expert_bias) are
    still checked."""
    before = getattr(_passing, "on", False)
    _passing.on = True
    try:
        yield
    finally:
        _passing.on = before


def check_finite(op: str, name: str, t: torch.Tensor, data: bool = True) -> None:
    """NaN/Inf in `t` is an error where value checks run; `data` tensors pass inside non_finite_passes()."""
    if data and getattr(_passing, "on", False):
        return
    if value_checks_enabled(t) and not bool(torch.isfinite(t).all()):
        bad = (~torch.isfinite(t)).sum()
        raise OpInputError(f"{op}: argument '{name}' expected finite values, got {int(bad)} NaN/Inf entries")


def check_index_range(op: str, name: str, t: torch.Tensor, low: int, high: int) -> None:
    """Every entry of t in [low, high)."""
    if value_checks_enabled(t) and t.numel() > 0:
        lo, hi = int(t.min()), int(t.max())
        if lo < low or hi >= high:
            raise OpInputError(f"{op}: argument '{name}' expected values in [{low}, {high - 1}], got values in [{lo}, {hi}]")


def check_inverse_permutations(op: str, name: str, index: torch.Tensor, inverse_name: str, inverse: torch.Tensor) -> None:
    """`index` [N] a permutation of 0..N-1 and `inverse` its inverse (inverse[index[i]] == i): the
    routing maps an op reads in its forward and hands its backward. A map with a repeated value
    passes a range check, and then the forward and the backward (which reads the other map)
    disagree. Reads every entry: only where value checks run."""
    n = index.numel()
    if n == 0 or not value_checks_enabled(index):
        return
    lo, hi = int(index.min()), int(index.max())
    if lo < 0 or hi >= n:
        bad = lo if lo < 0 else hi
        raise OpInputError(f"{op}: argument '{name}' is not a permutation of 0..{n - 1}: value {bad} is out of range")
    counts = torch.bincount(index, minlength=n)
    if int(counts.max()) > 1:
        value = int(torch.argmax((counts > 1).to(torch.uint8)))  # the smallest repeated value
        missing = int(torch.argmax((counts == 0).to(torch.uint8)))
        times = int(counts[value])
        raise OpInputError(
            f"{op}: argument '{name}' is not a permutation of 0..{n - 1}: value {value} appears "
            f"{'twice' if times == 2 else f'{times} times'} (and {missing} not at all)"
        )
    lo, hi = int(inverse.min()), int(inverse.max())
    if lo < 0 or hi >= n:
        raise OpInputError(
            f"{op}: argument '{inverse_name}' expected the inverse of '{name}', values in [0, {n - 1}], got values in [{lo}, {hi}]"
        )
    wrong = inverse.index_select(0, index) != torch.arange(n, device=index.device)
    if bool(wrong.any()):
        i = int(torch.argmax(wrong.to(torch.uint8)))
        j = int(index[i])
        raise OpInputError(
            f"{op}: argument '{inverse_name}' is not the inverse of '{name}': {name}[{i}] = {j} but "
            f"{inverse_name}[{j}] = {int(inverse[j])}, expected {i}"
        )
