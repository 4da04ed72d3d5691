"""Grouped GEMM over expert-major rows: out[r] = act(x[r] @ W[e(r)] + b[e(r)]) for offsets[e] <= r < offsets[e+1].

On CPU tensors, where reading the offsets costs nothing, one GEMM per expert that has rows (the
work each expert has, nothing more: no padded tiles, no zero-filled [E, K, N] product for empty
experts). On other devices two vectorised paths, neither with a loop over experts or a host sync:
- stock: torch._grouped_mm, where it runs the case (CPU in float32/16, bfloat16; sm_90+ GPUs in
  bfloat16; rows 16-byte aligned). Fast, but it leaves empty groups undefined: we mask them.
- tiled (everything else, float64 included): the rows are laid into fixed tiles of B rows, each tile
  owned by one expert (every expert padded to a multiple of B), then one batched matmul runs over
  the tiles. With B = ceil(M / E) there are at most ceil(M / B) + E <= 2E + 1 tiles, so the padded
  copy and the per-tile weights stay within about 2x of the inputs, and every size is known from
  shapes. The per-tile weight copy makes it slow when M is small against E * K * N."""

from typing import NamedTuple, Optional, Tuple

import torch
from torch import Tensor

from ..kernel_recipes import block_schedule
from . import activations


class Tiling(NamedTuple):
    block: int
    tiles: int
    pad_pos: Tensor  # [M] padded row of each input row; rows past offsets[-1] go to a spare row at the end
    tile_expert: Tensor  # [tiles] owning expert (tiles past the last one hold only zero rows)
    segment_lengths: Tensor  # [E] tiles per expert, the spare zero tiles counted to the last expert


def tiling(offsets: Tensor, M: int) -> Tiling:
    """The tiles are the kernels' row blocks (kernel_recipes.block_schedule) at B = ceil(M / E)."""
    E = offsets.numel() - 1
    block = max(8, -(-M // max(E, 1)))
    block = -(-block // 8) * 8
    schedule = block_schedule(offsets, M, block)
    tiles = schedule.blocks
    padded_start = schedule.first_block * block
    row = torch.arange(M, device=offsets.device)
    row_expert = torch.searchsorted(offsets[1:].contiguous(), row, right=True)
    valid = row_expert < E
    row_expert = row_expert.clamp_max(E - 1)
    pad_pos = row - offsets.index_select(0, row_expert) + padded_start.index_select(0, row_expert)
    pad_pos = torch.where(valid, pad_pos, torch.full_like(pad_pos, tiles * block))
    lengths = schedule.per_expert.clone()
    lengths[-1:] += tiles - (schedule.first_block[-1:] + schedule.per_expert[-1:])
    return Tiling(block, tiles, pad_pos, torch.where(schedule.expert >= 0, schedule.expert, E - 1), lengths)


def _sum_per_expert(per_tile: Tensor, t: Tiling) -> Tensor:
    """[tiles, ...] -> [E, ...]: each expert's tiles summed in order, zero for an expert with none.
    A segmented reduction, not index_add_: deterministic on the GPU too (no float atomics)."""
    return torch.segment_reduce(per_tile, "sum", lengths=t.segment_lengths, axis=0, unsafe=True)


def _to_tiles(rows: Tensor, t: Tiling) -> Tensor:
    padded = rows.new_zeros(t.tiles * t.block + 1, rows.shape[1])
    padded.index_copy_(0, t.pad_pos, rows)
    return padded[:-1].view(t.tiles, t.block, rows.shape[1])


def _from_tiles(tiles: Tensor, t: Tiling) -> Tensor:
    flat = tiles.reshape(-1, tiles.shape[-1])
    flat = torch.cat([flat, flat.new_zeros(1, flat.shape[1])])  # the spare row reads as zero
    return flat.index_select(0, t.pad_pos)


_STOCK_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def use_stock(x: Tensor, weight: Tensor) -> bool:
    """Whether torch._grouped_mm runs this case (decided from metadata only)."""
    if not hasattr(torch, "_grouped_mm") or x.dtype not in _STOCK_DTYPES:
        return False
    if x.shape[0] == 0:  # no rows: torch._grouped_mm rejects the empty gradient's strides; the tiled path is exact
        return False
    if x.device.type == "cuda":
        if x.dtype != torch.bfloat16 or torch.cuda.get_device_capability(x.device)[0] < 9:
            return False
    elif x.device.type != "cpu":
        return False
    elt = x.element_size()
    return (weight.shape[1] * elt) % 16 == 0 and (weight.shape[2] * elt) % 16 == 0


def _ends(offsets: Tensor) -> Tensor:
    return offsets[1:].to(torch.int32)


def _row_expert(offsets: Tensor, M: int) -> Tensor:
    E = offsets.numel() - 1
    rows = torch.arange(M, device=offsets.device)
    return torch.searchsorted(offsets[1:].contiguous(), rows, right=True).clamp_max(E - 1)


def _sum_rows_per_expert(rows: Tensor, offsets: Tensor) -> Tensor:
    """[M, N] -> [E, N], each expert's rows summed in order; zero for an expert with none."""
    return torch.segment_reduce(rows, "sum", lengths=offsets[1:] - offsets[:-1], axis=0, unsafe=True)


def _empty(offsets: Tensor) -> Tensor:
    return (offsets[1:] == offsets[:-1])[:, None, None]


def _gathered(x: Tensor, gather: Optional[Tensor], top_k: int) -> Tensor:
    return x if gather is None else x.index_select(0, torch.div(gather, top_k, rounding_mode="floor"))


def host_loop(x: Tensor) -> bool:
    """CPU tensors: loop over the experts with rows, offsets read on the host (free there)."""
    return x.device.type == "cpu"


def _spans(offsets: Tensor):
    """(expert, first row, end row) of every expert with rows, in expert order."""
    bounds = offsets.tolist()
    return [(e, bounds[e], bounds[e + 1]) for e in range(len(bounds) - 1) if bounds[e + 1] > bounds[e]]


def _loop_forward(x: Tensor, weight: Tensor, offsets: Tensor, bias: Optional[Tensor]) -> Tensor:
    pre = x.new_empty(x.shape[0], weight.shape[2])
    for e, lo, hi in _spans(offsets):
        if bias is None:
            torch.mm(x[lo:hi], weight[e], out=pre[lo:hi])
        else:
            torch.addmm(bias[e], x[lo:hi], weight[e], out=pre[lo:hi])
    pre[int(offsets[-1]) :].zero_()  # rows past the last expert's (none in a routed layout)
    return pre


def _loop_backward(dpre: Tensor, x: Tensor, weight: Tensor, offsets: Tensor, acc: torch.dtype):
    """Each GEMM writes its expert's slice in place (no product copied in, no [E, K, N] zero-fill that
    the GEMMs then overwrite): on the CPU a fresh weight-sized buffer costs most of its time in first
    touch, so every byte is written once. Experts without rows, and rows past the last expert's, are
    zeroed explicitly."""
    spans = _spans(offsets)
    dx = dpre.new_empty(dpre.shape[0], weight.shape[1])
    dx[int(offsets[-1]) :].zero_()  # rows past the last expert's (none in a routed layout)
    dw = torch.empty(weight.shape, dtype=acc)
    db = torch.empty(weight.shape[0], weight.shape[2], dtype=acc)
    in_place = acc == dpre.dtype  # float32/64: the GEMM accumulates in acc already
    has_rows = set()
    for e, lo, hi in spans:
        g = dpre[lo:hi]
        torch.mm(g, weight[e].t(), out=dx[lo:hi])
        if in_place:
            torch.mm(x[lo:hi].t(), g, out=dw[e])
            torch.sum(g, 0, out=db[e])
        else:
            dw[e] = (x[lo:hi].t() @ g).to(acc)
            db[e] = g.to(acc).sum(0)
        has_rows.add(e)
    for e in range(weight.shape[0]):
        if e not in has_rows:  # exact zeros for an expert that saw no rows
            dw[e].zero_()
            db[e].zero_()
    return dx, dw, db


def grouped_mm(
    x: Tensor,
    weight: Tensor,
    offsets: Tensor,
    bias: Optional[Tensor],
    activation: str,
    gather: Optional[Tensor] = None,
    top_k: int = 1,
) -> Tuple[Tensor, Tensor]:
    """Returns (out, pre): pre is the pre-activation kept for backward, empty when activation is 'none'.
    With `gather` the rows are x[gather // top_k] (materialised here: the reference favours clarity)."""
    x = _gathered(x, gather, top_k)
    if host_loop(x):
        pre = _loop_forward(x, weight, offsets, bias)
    elif use_stock(x, weight):
        pre = torch._grouped_mm(x, weight, offs=_ends(offsets))
        if bias is not None:
            pre = pre + bias.index_select(0, _row_expert(offsets, x.shape[0]))
    else:
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
    gather: Optional[Tensor] = None,
    top_k: int = 1,
) -> Tuple[Tensor, Tensor, Tensor]:
    """(d rows, dweight, dbias). Experts with no rows get exact zeros; weight gradients are summed
    over tiles in float32 (or float64) whatever the input dtype."""
    x = _gathered(x, gather, top_k)
    acc = torch.promote_types(weight.dtype, torch.float32)
    dpre = grad_out if activation == "none" else activations.backward(activation, grad_out, pre)
    if host_loop(x):
        dx, dw, db = _loop_backward(dpre, x, weight, offsets, acc)
        return dx, dw.to(weight.dtype), db.to(weight.dtype)
    if use_stock(x, weight):
        ends = _ends(offsets)
        dx = torch._grouped_mm(dpre, weight.transpose(1, 2), offs=ends)
        # empty groups come back undefined (NaN in a poisoned allocator): fill, not a multiply
        dw = torch._grouped_mm(x.t(), dpre, offs=ends).masked_fill_(_empty(offsets), 0)
        db = _sum_rows_per_expert(dpre.to(acc), offsets)
        return dx, dw.to(weight.dtype), db.to(weight.dtype)
    t = tiling(offsets, x.shape[0])
    w = weight.index_select(0, t.tile_expert)
    dpre_tiles = _to_tiles(dpre, t)
    dx = _from_tiles(torch.bmm(dpre_tiles, w.transpose(1, 2)), t)
    dw = _sum_per_expert(torch.bmm(_to_tiles(x, t).transpose(1, 2), dpre_tiles).to(acc), t)
    db = _sum_per_expert(dpre_tiles.to(acc).sum(dim=1), t)
    return dx, dw.to(weight.dtype), db.to(weight.dtype)
