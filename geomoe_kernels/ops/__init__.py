"""The op boundaries: each declared once (ops/_declare.py) as a torch.library op (namespace
`geomoe`) with a fake, an autograd registration and dispatch through geomoe_kernels.backend. The
modules are imported in the order `python -m geomoe_kernels.info` lists the ops."""
from .gating import SCORE_FUNCS, topk_gating
from .permute import permute, route, unpermute
from .grouped_gemm import grouped_mm
from .expert_mlp import expert_mlp
from .sparse_conv import masked_depthwise_conv
from .norm_linear import norm_linear

__all__ = ["SCORE_FUNCS", "topk_gating", "grouped_mm", "permute", "route", "unpermute", "masked_depthwise_conv", "norm_linear",
           "expert_mlp"]

from .. import triton as _triton_kernels  # noqa: E402  (registers the Triton backend, lazily)

_triton_kernels.register()

from .. import cuda as _cuda_core  # noqa: E402  (registers the CUDA core's kernels, if it was built)

_cuda_core.register()
