from .balance import MoEBalancer, MoETensorMLP
from .cblock import SparseCBlock
from .moe import MoEMLP

__all__ = ["MoEBalancer", "MoEMLP", "MoETensorMLP", "SparseCBlock"]
