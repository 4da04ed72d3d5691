"""Submanifold depthwise k x k convolution on compact rows.

x [R, C] holds only visible cells; neighbors [R, k*k] gives, for each row and each kernel tap
(row-major over (dy, dx)), the row of that neighbour or -1 where it is masked or outside the image
(read as zero). out[r, c] = bias[c] + sum_j weight[c, j] * x[neighbors[r, j], c], i.e. PyTorch's
cross-correlation. The loop runs over the k*k taps, each a gather of [R, C]: memory stays O(R*C)."""

from typing import Optional, Tuple

import torch
from torch import Tensor


def _with_zero_row(x: Tensor, acc: torch.dtype) -> Tuple[Tensor, int]:
    R = x.shape[0]
    return torch.cat([x.to(acc), x.new_zeros(1, x.shape[1], dtype=acc)]), R


def _taps(neighbors: Tensor, zero_row: int) -> Tensor:
    return torch.where(neighbors < 0, torch.full_like(neighbors, zero_row), neighbors)


def masked_depthwise_conv(x: Tensor, neighbors: Tensor, weight: Tensor, bias: Optional[Tensor]) -> Tensor:
    acc = torch.promote_types(x.dtype, torch.float32)
    xz, R = _with_zero_row(x, acc)
    taps = _taps(neighbors, R).t().contiguous()  # one contiguous index row per tap
    w = weight.to(acc).t().contiguous()
    out = torch.zeros(R, x.shape[1], dtype=acc, device=x.device)
    gathered = torch.empty_like(out)  # reused by every tap: no allocation in the loop
    for j in range(taps.shape[0]):
        torch.index_select(xz, 0, taps[j], out=gathered)
        out.addcmul_(gathered, w[j])
    if bias is not None:
        out += bias.to(acc)
    return out.to(x.dtype)


def masked_depthwise_conv_backward(
    grad_out: Tensor, x: Tensor, neighbors: Tensor, weight: Tensor
) -> Tuple[Tensor, Tensor, Tensor]:
    """(dx, dweight, dbias). dx gathers instead of scattering: a submanifold table is symmetric
    (neighbors[r, j] = q  <=>  neighbors[q, kk-1-j] = r), so dx is the same conv with the kernel
    flipped, deterministic and free of atomics."""
    acc = torch.promote_types(x.dtype, torch.float32)
    kk = neighbors.shape[1]
    gz, R = _with_zero_row(grad_out, acc)
    xz, _ = _with_zero_row(x, acc)
    taps = _taps(neighbors, R).t().contiguous()
    w = weight.to(acc).t().contiguous()
    g = gz[:R]
    dx = torch.zeros(R, x.shape[1], dtype=acc, device=x.device)
    dw = torch.empty(kk, weight.shape[0], dtype=acc, device=x.device)
    gathered = torch.empty_like(dx)
    for j in range(kk):
        torch.index_select(gz, 0, taps[j], out=gathered)
        dx.addcmul_(gathered, w[kk - 1 - j])
        torch.index_select(xz, 0, taps[j], out=gathered)
        torch.sum(gathered.mul_(g), dim=0, out=dw[j])
    db = g.sum(dim=0).to(weight.dtype)
    return dx.to(x.dtype), dw.t().contiguous().to(weight.dtype), db
