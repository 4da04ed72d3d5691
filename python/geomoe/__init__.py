"""geomoe: the GeoMoE remote-sensing MAE model and its pretraining, built on geomoe_kernels."""
from .masking import random_masking
from .model import GeoMoE
from .original import LoadResult, load_original_state_dict, original_state_dict

__all__ = ["GeoMoE", "LoadResult", "load_original_state_dict", "original_state_dict", "random_masking"]
