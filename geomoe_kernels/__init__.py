"""geomoe_kernels: fused kernels and drop-in layers for sparse mixture-of-experts vision models.

Ops: each a torch.library op in namespace `geomoe` with its backward registered, declared once in
ops/<op>.py (`python -m geomoe_kernels.info` lists them). Layers: MoEMLP, SparseCBlock. The visible
layout for block-masked maps: geomoe_kernels.layout."""

from . import cpu_memory  # noqa: F401  (first: it sets torch's huge-page switch before anything allocates)
from . import backend as _backend
from . import layout
from . import self_check as _self_check
from ._version import __version__  # noqa: F401  (public)
from .backend import BACKENDS, BackendUnavailable
from ._checks import OpInputError
from .nn import MoEMLP, SparseCBlock
from .integrations import transformers_moe as _transformers_moe  # noqa: F401  (registers MoEMLP.from_transformers' adapter)
from .ops import expert_mlp, grouped_mm, masked_depthwise_conv, norm_linear, permute, route, topk_gating, unpermute
from .ops.box_iou_rotated import box_iou_rotated
from .ops.nms_rotated import nms_rotated
from .ops.roi_align_rotated import roi_align_rotated

# The dispatch registry asks the self-check before a kernel backend's first use on a device; handed
# in here so that the registry (and every op's run path) never imports the verifier.
_backend.set_first_use_check(_self_check.failed_reason, _self_check.pending)

__all__ = [
    "BACKENDS",
    "BackendUnavailable",
    "OpInputError",
    "box_iou_rotated",
    "expert_mlp",
    "MoEMLP",
    "SparseCBlock",
    "grouped_mm",
    "layout",
    "masked_depthwise_conv",
    "nms_rotated",
    "norm_linear",
    "permute",
    "roi_align_rotated",
    "route",
    "topk_gating",
    "unpermute",
]
