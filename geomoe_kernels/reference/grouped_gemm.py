"""Grouped GEMM over expert-major rows: out[r] = act(x[r] @ W[e(r)] + b[e(r)]) for offsets[e] <= r < offsets[e+1].

Vectorised without a loop over experts or a host sync: the rows are laid into fixed tiles of B rows,
each tile owned by one expert (every expert padded to a multiple of B), then one batched matmul runs
over the tiles. With B = ceil(M / E) there are at most ceil(M / B) + E <= 2E + 1 tiles, so the padded
copy and the per-tile weights stay within about 2x of the inputs, and every size is known from shapes."""
from typing import NamedTuple, Optional, Tuple

import torch
from torch import Tensor

from . import activations


class Tiling(NamedTuple):
    block: int
    tiles: int
    pad_pos: Tensor  # [M] padded row of each input row; rows past offsets[-1] go to a spare row at the end
    tile_expert: Tensor  # [tiles] owning expert (tiles past the last one hold only zero rows)


def tiling(offsets: Tensor, M: int) -> Tiling:
    E = offsets.numel() - 1
    block = max(8, -(-M // max(E, 1)))
    block = -(-block // 8) * 8
    tiles = -(-M // block) + E
    counts = offsets[1:] - offsets[:-1]
    tiles_per = torch.div(counts + block - 1, block, rounding_mode="floor")
    tile_end = torch.cumsum(tiles_per, 0)
    padded_start = (tile_end - tiles_per) * block
    row = torch.arange(M, device=offsets.device)
    row_expert = torch.searchsorted(offsets[1:].contiguous(), row, right=True)
    valid = row_expert < E
    row_expert = row_expert.clamp_max(E - 1)
    pad_pos = row - offsets.index_select(0, row_expert) + padded_start.index_select(0, row_expert)
    pad_pos = torch.where(valid, pad_pos, torch.full_like(pad_pos, tiles * block))
    tile_expert = torch.searchsorted(tile_end, torch.arange(tiles, device=offsets.device), right=True)
    return Tiling(block, tiles, pad_pos, tile_expert.clamp_max(E - 1))


def _to_tiles(rows: Tensor, t: Tiling) -> Tensor:
    padded = rows.new_zeros(t.tiles * t.block + 1, rows.shape[1])
    padded.index_copy_(0, t.pad_pos, rows)
    return padded[:-1].view(t.tiles, t.block, rows.shape[1])


def _from_tiles(tiles: Tensor, t: Tiling) -> Tensor:
    flat = tiles.reshape(-1, tiles.shape[-1])
    flat = torch.cat([flat, flat.new_zeros(1, flat.shape[1])])  # the spare row reads as zero
    return flat.index_select(0, t.pad_pos)


def grouped_mm(
    x: Tensor, weight: Tensor, offsets: Tensor, bias: Optional[Tensor], activation: str
) -> Tuple[Tensor, Tensor]:
    """Returns (out, pre): pre is the pre-activation kept for backward, empty when activation is 'none'."""
    t = tiling(offsets, x.shape[0])
    w = weight.index_select(0, t.tile_expert)
    pre_tiles = torch.bmm(_to_tiles(x, t), w)
    if bias is not None:
        pre_tiles = pre_tiles + bias.index_select(0, t.tile_expert)[:, None, :]
    pre = _from_tiles(pre_tiles, t)
    if activation == "none":
        return pre, pre.new_empty(0)
    return activations.apply(activation, pre), pre


def grouped_mm_backward(
    grad_out: Tensor,
    x: Tensor,
    weight: Tensor,
    offsets: Tensor,
    pre: Optional[Tensor],
    activation: str,
) -> Tuple[Tensor, Tensor, Tensor]:
    """(dx, dweight, dbias). Experts with no rows get exact zeros; weight gradients are summed over
    tiles in float32 (or float64) whatever the input dtype."""
    E = weight.shape[0]
    acc = torch.promote_types(weight.dtype, torch.float32)
    dpre = grad_out if activation == "none" else activations.backward(activation, grad_out, pre)
    t = tiling(offsets, x.shape[0])
    w = weight.index_select(0, t.tile_expert)
    dpre_tiles = _to_tiles(dpre, t)
    dx = _from_tiles(torch.bmm(dpre_tiles, w.transpose(1, 2)), t)
    dw_tiles = torch.bmm(_to_tiles(x, t).transpose(1, 2), dpre_tiles).to(acc)
    dw = torch.zeros(weight.shape, dtype=acc, device=weight.device).index_add_(0, t.tile_expert, dw_tiles)
    db_tiles = dpre_tiles.to(acc).sum(dim=1)
    db = torch.zeros(E, weight.shape[2], dtype=acc, device=weight.device).index_add_(0, t.tile_expert, db_tiles)
    return dx, dw.to(weight.dtype), db.to(weight.dtype)
