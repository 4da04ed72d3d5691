"""Moved: the transformers adapter is geomoe_kernels/integrations/transformers_moe.py
(TransformersMoEMLP); these names stay importable from here."""

from ..integrations.transformers_moe import (  # noqa: F401
    ROUTERS,
    SIGMOID_GROUP_ROUTERS,
    SOFTMAX_OF_TOPK_ROUTERS,
    SOFTMAX_TOPK_ROUTERS,
    TransformersMoEMLP,
    UnsupportedBlock,
    moe_from_transformers,
)
