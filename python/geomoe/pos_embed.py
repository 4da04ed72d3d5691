"""The fixed 2D sin-cos position tables of MAE: rows in row-major token order, the first half of the
channels encodes the column index, the second half the row index, each [sin(p w_i), cos(p w_i)] with
w_i = 1 / 10000^(i / (d/4)), i < d/4."""

from typing import Tuple

import torch
import torch.nn.functional as F
from torch import Tensor


def sincos_1d(dim: int, pos: torch.Tensor) -> torch.Tensor:
    omega = 1.0 / 10000 ** (torch.arange(dim // 2, dtype=torch.float64) / (dim / 2.0))
    out = pos.reshape(-1, 1).double() * omega[None, :]
    return torch.cat([torch.sin(out), torch.cos(out)], dim=1)


def sincos_2d(dim: int, grid_h: int, grid_w: int) -> torch.Tensor:
    """[grid_h * grid_w, dim] float32."""
    if dim % 4:
        raise ValueError(f"argument 'dim' expected a multiple of 4 for a 2D sin-cos table, got {dim}")
    rows, cols = torch.meshgrid(torch.arange(grid_h), torch.arange(grid_w), indexing="ij")
    return torch.cat([sincos_1d(dim // 2, cols), sincos_1d(dim // 2, rows)], dim=1).float()


def interpolate_pos_embed(pos: Tensor, grid: Tuple[int, int]) -> Tensor:
    """[1, g*g, C] table for a square g x g grid -> [1, h*w, C], bicubic (exact copy when equal)."""
    n, C = pos.shape[1], pos.shape[2]
    g = int(round(n**0.5))
    if (g, g) == tuple(grid):
        return pos
    table = pos.reshape(1, g, g, C).permute(0, 3, 1, 2).float()
    table = F.interpolate(table, size=grid, mode="bicubic", align_corners=False)
    return table.permute(0, 2, 3, 1).reshape(1, grid[0] * grid[1], C).to(pos.dtype)
