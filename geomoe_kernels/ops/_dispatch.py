"""Run an op's selected implementation with autocast off: inputs arrive already in the dtypes the
op was called with, and the implementation decides its own accumulation precision."""
from typing import Any, Tuple

import torch

from .. import backend as _backend


def run(op: str, backend: str, device: torch.device, args: Tuple[Any, ...]):
    impl = _backend.select(op, backend, device, args)
    with torch.autocast(device_type=device.type, enabled=False):
        return impl(*args)
