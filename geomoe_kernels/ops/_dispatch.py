"""Run an op's selected implementation with autocast off: inputs arrive already in the dtypes the
op was called with, and the implementation decides its own accumulation precision."""
from typing import Any, Tuple

import torch

from .. import backend as _backend


# Every geomoe op takes dense row-major inputs (its kernels index them so). Eager callers pass them
# that way; the tag makes torch.compile do the same instead of handing the op a padded layout
# (inductor pads a [T, 23] matrix to a row stride of 24 on a GPU, for example).
OP_TAGS = (getattr(torch.Tag, "needs_contiguous_strides", torch.Tag.needs_fixed_stride_order),)


def run(op: str, backend: str, device: torch.device, args: Tuple[Any, ...]):
    impl = _backend.select(op, backend, device, args)
    with torch.autocast(device_type=device.type, enabled=False):
        return impl(*args)
