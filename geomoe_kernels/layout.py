"""The compact visible layout for block-masked feature maps.

A map of H x W tokens, each token s x s cells (s a power of two), is stored as rows [R, C], channels
last, holding only the cells of kept tokens, ordered by (image, kept token in kept order, cell in
Z-order inside the token). Z-order makes every kernel = stride convolution with s' dividing s a
reshape plus one GEMM (consecutive groups of s'^2 rows are one output cell), with no gather.

Everything here is built on the device from the kept token ids, with no host sync and no dense map
of cells: the only dense table is [N, H*W] at token level."""

from __future__ import annotations

from typing import Any, Callable, Dict, Hashable, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor


def _check_power_of_two(name: str, s: int) -> None:
    if s < 1 or s & (s - 1):
        raise ValueError(f"argument '{name}' expected a power of two, got {s}")


def zorder_cells(s: int, device=None) -> Tensor:
    """[s*s, 2] (cy, cx) of each Z-order index: bits of cy and cx interleaved, cy's bit first."""
    _check_power_of_two("cells_per_side", s)
    z = torch.arange(s * s, device=device)
    cy = torch.zeros_like(z)
    cx = torch.zeros_like(z)
    for bit in range(max(s.bit_length() - 1, 0)):
        cx |= ((z >> (2 * bit)) & 1) << bit
        cy |= ((z >> (2 * bit + 1)) & 1) << bit
    return torch.stack([cy, cx], dim=1)


def zorder_index(s: int, device=None) -> Tensor:
    """[s, s]: the Z-order index of cell (cy, cx)."""
    cells = zorder_cells(s, device)
    idx = torch.empty(s, s, dtype=torch.int64, device=device)
    idx[cells[:, 0], cells[:, 1]] = torch.arange(s * s, device=device)
    return idx


def _zorder_order(s: int, device) -> Tensor:
    """[s*s]: the row-major cell (cy * s + cx) of each Z-order index (kept per (s, device))."""

    def make() -> Tensor:
        cells = zorder_cells(s, device)
        return cells[:, 0] * s + cells[:, 1]

    return _constant(("zorder", s, torch.device(device)), make)


def gather_cells(x: Tensor, kept: Tensor, s: int) -> Tensor:
    """Dense map [N, C, H*s, W*s] -> rows [N*L*s*s, C] of the kept tokens' cells (L = kept.shape[1])."""
    N, C, Hs, Ws = x.shape
    H, W = Hs // s, Ws // s
    tok = x.reshape(N, C, H, s, W, s).permute(0, 2, 4, 3, 5, 1).reshape(N, H * W, s * s, C)
    tok = tok.index_select(2, _zorder_order(s, x.device))
    picked = torch.gather(tok, 1, kept[:, :, None, None].expand(-1, -1, s * s, C))
    return picked.reshape(-1, C)


def scatter_cells(rows: Tensor, kept: Tensor, s: int, grid: Tuple[int, int]) -> Tensor:
    """Rows [N*L*s*s, C] -> dense map [N, C, H*s, W*s], zero at cells of tokens not kept."""
    N, L = kept.shape
    H, W = grid
    C = rows.shape[1]
    tok = rows.new_zeros(N, H * W, s * s, C)
    tok.scatter_(1, kept[:, :, None, None].expand(-1, -1, s * s, C), rows.view(N, L, s * s, C))
    tok = tok.index_select(2, _constant(("zindex", s, torch.device(rows.device)), lambda: zorder_index(s, rows.device).view(-1)))
    return tok.view(N, H, W, s, s, C).permute(0, 5, 1, 3, 2, 4).reshape(N, C, H * s, W * s)


def neighbor_table(kept: Tensor, grid: Tuple[int, int], s: int, kernel_size: int) -> Tensor:
    """[N*L*s*s, k*k] int64: for each visible cell and kernel tap (dy, dx row-major, centred), the row
    of the neighbour cell, or -1 where it is outside the image or in a token that was not kept.
    Neighbours are found at token level first (a [N, H*W] slot table), then the cell within."""
    return neighbor_tables(kept, grid, [(s, kernel_size)])[0]


# Each slot of the token table holds its first row's index / (s*s) (image * L + kept position), or
# _ABSENT where the token was not kept (or lies in the border): times s*s plus a cell index that stays
# far below -1, which a clamp then makes -1. 2**48 * (s*s) fits int64 for any s up to 2**7.
_ABSENT = -(2**48)


def neighbor_tables(kept: Tensor, grid: Tuple[int, int], stages: Sequence[Tuple[int, int]]) -> List[Tensor]:
    """neighbor_table(kept, grid, s, k) for each (s, k) of `stages`, the token-level bookkeeping done
    once for all of them (the masked front end builds one table per stage from the same mask, once a
    step: every block of the stage and its backward read it).

    Everything that depends only on the shapes (Z-order, each (cell, tap)'s neighbour token offset and
    cell within it, the slot numbers) is made once per (N, L, grid, s, k, device) and kept; a step then
    runs 5 small ops for the slot table (a padded [N, H+2P, W+2P] grid of kept-token slots, so taps
    past the image edge read the border's "absent" instead of being tested) and 4 per table: the
    neighbour tokens' positions, one gather, the row arithmetic and a clamp. No host sync."""
    for s, k in stages:
        if k % 2 != 1:
            raise ValueError(f"argument 'kernel_size' expected an odd size, got {k}")
        _check_power_of_two("cells_per_side", s)
    N, L = kept.shape
    H, W = grid
    P = max([-(-(k // 2) // s) for s, k in stages], default=0)  # border, in tokens, the widest tap reaches
    Wp = W + 2 * P
    dev = kept.device
    slots = _constant(("slots", N, L, dev), lambda: torch.arange(N * L, device=dev).view(N, L))
    base = torch.add(kept, torch.div(kept, W, rounding_mode="floor"), alpha=2 * P) if P else kept
    base = base + (P * Wp + P)  # each kept token's position in the padded grid
    slot = torch.full((N, (H + 2 * P) * Wp), _ABSENT, dtype=torch.int64, device=dev)
    slot.scatter_(1, base, slots)
    tables = []
    for s, k in stages:
        offset, cell = _tap_constants(s, k, Wp, dev)  # [s*s*k*k] each
        nslot = torch.gather(slot, 1, (base[:, :, None] + offset).view(N, -1))
        row = torch.add(cell, nslot.view(N * L, s * s * k * k), alpha=s * s)
        tables.append(row.clamp_min_(-1).view(N * L * s * s, k * k))
    return tables


def _tap_constants(s: int, k: int, Wp: int, device) -> Tuple[Tensor, Tensor]:
    """For every (cell in Z-order, tap): the neighbour's token offset in a padded grid of width Wp,
    and its cell's Z-order index within that token, each [s*s*k*k] int64."""

    def make() -> Tuple[Tensor, Tensor]:
        cells = zorder_cells(s)
        p = k // 2
        d = torch.arange(-p, p + 1)
        y = cells[:, 0, None] + d.repeat_interleave(k)[None, :]  # [s*s, k*k]
        x = cells[:, 1, None] + d.repeat(k)[None, :]
        ty, cy = torch.div(y, s, rounding_mode="floor"), torch.remainder(y, s)
        tx, cx = torch.div(x, s, rounding_mode="floor"), torch.remainder(x, s)
        offset = (ty * Wp + tx).reshape(-1)
        cell = zorder_index(s)[cy, cx].reshape(-1)
        return offset.to(device), cell.to(device)

    return _constant(("taps", s, k, Wp, torch.device(device)), make)


_CONSTANTS: Dict[Hashable, Any] = {}
_MAX_CONSTANTS = 256


def _constant(key: Hashable, make: Callable[[], Any]) -> Any:
    """A shape's index constants, made once per key and kept (never while torch.compile traces or a
    CUDA graph captures: a traced or captured tensor must not outlive its trace)."""
    if torch.compiler.is_compiling():
        return make()
    value = _CONSTANTS.get(key)
    if value is None:
        with torch.inference_mode(False):  # a normal tensor even when first made under inference_mode
            value = make()
        if any(t.is_cuda for t in (value if isinstance(value, tuple) else (value,))) and torch.cuda.is_current_stream_capturing():
            return value
        if len(_CONSTANTS) >= _MAX_CONSTANTS:
            _CONSTANTS.clear()
        _CONSTANTS[key] = value
    return value


def conv_weight_as_matrix(weight: Tensor) -> Tensor:
    """A kernel = stride conv weight [Cout, Cin, s, s] as a [s*s*Cin, Cout] matrix for rows grouped
    s*s at a time in Z-order. Z-order interleaves the bits of (cy, cx), so this is a reshape into
    bits and a permute (no gather: its backward is a copy, not a scatter)."""
    Cout, Cin, s, s2 = weight.shape
    if s != s2:
        raise ValueError(f"argument 'weight' expected a square kernel, got {s}x{s2}")
    _check_power_of_two("kernel size", s)
    b = s.bit_length() - 1
    w = weight.reshape(Cout, Cin, *([2] * (2 * b)))  # dims: Cout, Cin, y bits (high first), x bits (high first)
    order = [d for i in range(b) for d in (2 + i, 2 + b + i)]  # (y, x) bit pairs, most significant first
    return w.permute(*order, 1, 0).reshape(s * s * Cin, Cout)


def _rows_in_weight_order(grouped: Tensor, Cin: int, s: int) -> Tensor:
    """[R', s*s*Cin] grouped Z-ordered rows -> [R', Cin*s*s] in the weight's (Cin, y, x) order: the
    inverse of conv_weight_as_matrix's permute, applied to the activations instead of the weight."""
    b = s.bit_length() - 1
    v = grouped.reshape(grouped.shape[0], *([2] * (2 * b)), Cin)  # dims: R', (y, x) bit pairs high first, Cin
    ys = [1 + 2 * i for i in range(b)]
    xs = [2 + 2 * i for i in range(b)]
    return v.permute(0, 1 + 2 * b, *ys, *xs).reshape(grouped.shape[0], Cin * s * s)


def strided_conv_rows(rows: Tensor, weight: Tensor, bias: Optional[Tensor]) -> Tensor:
    """A kernel = stride conv on Z-ordered rows: [R, Cin] -> [R / s^2, Cout], one GEMM, no gather.
    The GEMM needs the rows and the weight in one tap order; whichever of the two is smaller is
    permuted (a strided copy, in the forward and again in the backward): the weight at large batches,
    the activations at small ones, where re-laying a [Cout, Cin, 4, 4] weight would cost more than the
    GEMM (CPU, batch 2)."""
    Cout, Cin, s, _ = weight.shape
    grouped = rows.reshape(-1, s * s * Cin)
    if grouped.shape[0] < Cout:
        conv_weight_as_matrix(weight.new_empty(0, Cin, *weight.shape[2:]))  # the same shape checks, no copy
        out = F.linear(_rows_in_weight_order(grouped, Cin, s), weight.flatten(1).to(rows.dtype))
    else:
        out = grouped @ conv_weight_as_matrix(weight).to(rows.dtype)
    return out if bias is None else out + bias.to(rows.dtype)
