"""Moved: the transformers adapters are geomoe_kernels/integrations/transformers_moe.py (one
TransformersMoEMLP subclass per family); these names stay importable from here."""

from ..integrations.transformers_moe import (  # noqa: F401
    FAMILIES,
    ROUTERS,
    TransformersMoEMLP,
    UnsupportedBlock,
    adapter_class,
    moe_from_transformers,
)
