"""The op boundaries: each a torch.library op (namespace `geomoe`) with a fake implementation,
dispatching through geomoe_kernels.backend, behind a thin autograd Function."""
from .expert_mlp import expert_mlp
from .gating import SCORE_FUNCS, topk_gating
from .grouped_gemm import grouped_mm
from .norm_linear import norm_linear
from .permute import permute, route, unpermute
from .sparse_conv import masked_depthwise_conv

__all__ = ["SCORE_FUNCS", "topk_gating", "grouped_mm", "permute", "route", "unpermute", "masked_depthwise_conv", "norm_linear",
           "expert_mlp"]

from .. import triton as _triton_kernels  # noqa: E402  (registers the Triton backend, lazily)

_triton_kernels.register()

from .. import cuda as _cuda_core  # noqa: E402  (registers the CUDA core's kernels, if it was built)

_cuda_core.register()
