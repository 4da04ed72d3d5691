"""The op boundaries: each declared once (ops/_declare.py) as a torch.library op (namespace
`geomoe`) with a fake, an autograd registration and dispatch through geomoe_kernels.backend.
Importing a module declares its ops; every module in this package is imported here, so a new op
needs no line in this file. The names below are the public functions, in the order
`python -m geomoe_kernels.info` lists the ops."""

import importlib
import pkgutil

from .gating import SCORE_FUNCS, topk_gating
from .permute import permute, route, unpermute
from .grouped_gemm import grouped_mm
from .expert_mlp import expert_mlp
from .sparse_conv import masked_depthwise_conv
from .norm_linear import norm_linear

__all__ = [
    "SCORE_FUNCS",
    "topk_gating",
    "grouped_mm",
    "permute",
    "route",
    "unpermute",
    "masked_depthwise_conv",
    "norm_linear",
    "expert_mlp",
]

for _module in pkgutil.iter_modules(__path__):
    if not _module.name.startswith("_"):
        importlib.import_module(f"{__name__}.{_module.name}")

from .. import triton as _triton_kernels  # noqa: E402  (imports the Triton kernel modules: each registers itself)

_triton_kernels.register()

from .. import cuda as _cuda_core  # noqa: E402  (registers the CUDA core's kernels, if it was built)

_cuda_core.register()
