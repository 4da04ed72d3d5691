"""geomoe: the GeoMoE remote-sensing MAE model and its pretraining, built on geomoe_kernels."""

import geomoe_kernels  # noqa: F401  (first: it sets torch's CPU huge-page switch before anything allocates)

from .masking import random_masking
from .backbone import GeoMoEBackbone
from .model import GeoMoE
from .finetune import GeoMoEClassifier
from .moevit import MoEViTBackbone, MoEViTClassifier, MoEViTEncoder, MoEViTMAE
from .original import LoadResult, load_original_state_dict, original_state_dict

__all__ = [
    "GeoMoE",
    "GeoMoEBackbone",
    "GeoMoEClassifier",
    "MoEViTBackbone",
    "MoEViTClassifier",
    "MoEViTEncoder",
    "MoEViTMAE",
    "LoadResult",
    "load_original_state_dict",
    "original_state_dict",
    "random_masking",
]
