from .cblock import SparseCBlock
from .moe import MoEMLP

__all__ = ["MoEMLP", "SparseCBlock"]
