"""Numbers read from environment variables, checked: apart from geomoe.runtime so that the modules
runtime imports (geomoe.checkpoint) can read them too without importing runtime back."""

import math
import os


def env_number(name: str, default: str, kind=int, minimum: float = 0):
    """The environment variable `name` read as a number (`kind`) >= minimum (`default` where unset
    or empty); anything else is an error naming the variable."""
    raw = os.environ.get(name, "").strip() or default
    try:
        value = kind(raw)
    except ValueError:
        value = None
    if value is None or value < minimum or (kind is float and not math.isfinite(value)):
        what = "an integer" if kind is int else "a finite number"
        raise ValueError(f"environment variable {name} expected {what} >= {minimum:g}, got {raw!r}")
    return value
