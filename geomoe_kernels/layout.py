"""The compact visible layout for block-masked feature maps.

A map of H x W tokens, each token s x s cells (s a power of two), is stored as rows [R, C], channels
last, holding only the cells of kept tokens, ordered by (image, kept token in kept order, cell in
Z-order inside the token). Z-order makes every kernel = stride convolution with s' dividing s a
reshape plus one GEMM (consecutive groups of s'^2 rows are one output cell), with no gather.

Everything here is built on the device from the kept token ids, with no host sync and no dense map
of cells: the only dense table is [N, H*W] at token level."""

from __future__ import annotations

from typing import Optional, Tuple

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


def gather_cells(x: Tensor, kept: Tensor, s: int) -> Tensor:
    """Dense map [N, C, H*s, W*s] -> rows [N*L*s*s, C] of the kept tokens' cells (L = kept.shape[1])."""
    N, C, Hs, Ws = x.shape
    H, W = Hs // s, Ws // s
    cells = zorder_cells(s, x.device)
    tok = x.reshape(N, C, H, s, W, s).permute(0, 2, 4, 3, 5, 1).reshape(N, H * W, s * s, C)
    tok = tok.index_select(2, cells[:, 0] * s + cells[:, 1])
    picked = torch.gather(tok, 1, kept[:, :, None, None].expand(-1, -1, s * s, C))
    return picked.reshape(-1, C)


def scatter_cells(rows: Tensor, kept: Tensor, s: int, grid: Tuple[int, int]) -> Tensor:
    """Rows [N*L*s*s, C] -> dense map [N, C, H*s, W*s], zero at cells of tokens not kept."""
    N, L = kept.shape
    H, W = grid
    C = rows.shape[1]
    cells = zorder_cells(s, rows.device)
    tok = rows.new_zeros(N, H * W, s * s, C)
    tok.scatter_(1, kept[:, :, None, None].expand(-1, -1, s * s, C), rows.view(N, L, s * s, C))
    inv = torch.empty_like(cells[:, 0])
    inv[cells[:, 0] * s + cells[:, 1]] = torch.arange(s * s, device=rows.device)
    tok = tok.index_select(2, inv)
    return tok.view(N, H, W, s, s, C).permute(0, 5, 1, 3, 2, 4).reshape(N, C, H * s, W * s)


def neighbor_table(kept: Tensor, grid: Tuple[int, int], s: int, kernel_size: int) -> Tensor:
    """[N*L*s*s, k*k] int64: for each visible cell and kernel tap (dy, dx row-major, centred), the row
    of the neighbour cell, or -1 where it is outside the image or in a token that was not kept.
    Neighbours are found at token level first (a [N, H*W] slot table), then the cell within."""
    if kernel_size % 2 != 1:
        raise ValueError(f"argument 'kernel_size' expected an odd size, got {kernel_size}")
    _check_power_of_two("cells_per_side", s)
    N, L = kept.shape
    H, W = grid
    dev = kept.device
    slot = torch.full((N, H * W), -1, dtype=torch.int64, device=dev)
    slot.scatter_(1, kept, torch.arange(L, device=dev).expand(N, L).contiguous())
    cells = zorder_cells(s, dev)
    zidx = zorder_index(s, dev)
    p = kernel_size // 2
    d = torch.arange(-p, p + 1, device=dev)
    dy = d.repeat_interleave(kernel_size)
    dx = d.repeat(kernel_size)
    # absolute cell coordinates of every (image, kept token, cell, tap): [N, L, s*s, k*k]
    y = ((kept // W) * s)[:, :, None, None] + cells[None, None, :, 0, None] + dy
    x = ((kept % W) * s)[:, :, None, None] + cells[None, None, :, 1, None] + dx
    inside = (y >= 0) & (y < H * s) & (x >= 0) & (x < W * s)
    yc, xc = y.clamp(0, H * s - 1), x.clamp(0, W * s - 1)
    token = (yc // s) * W + (xc // s)
    nslot = torch.gather(slot, 1, token.view(N, -1)).view_as(token)
    valid = inside & (nslot >= 0)
    image = torch.arange(N, device=dev)[:, None, None, None]
    row = (image * L + nslot) * (s * s) + zidx[yc % s, xc % s]
    return torch.where(valid, row, torch.full_like(row, -1)).view(N * L * s * s, kernel_size * kernel_size)


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
