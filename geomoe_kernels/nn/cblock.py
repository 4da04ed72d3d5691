"""SparseCBlock: the ConvMAE convolution block, run either dense on maps or on visible rows only.

    x = x + conv2(dw(vis * conv1(LN1(x))))      dw: depthwise k x k, padding k // 2
    x = x + fc2(GELU(fc1(LN2(x))))              conv1, conv2, fc1, fc2: 1 x 1

Dense (forward_dense) is the published masked computation on [N, C, H, W]. Sparse (forward_rows)
computes the same values at visible cells only, on rows [R, C] of the compact layout with a
neighbour table (geomoe_kernels.layout): the depthwise conv is the only op that mixes positions, and
masked neighbours are exact zeros there, so both agree at every visible cell and in every gradient.
Parameters are stored as the original Conv2d / LayerNorm modules, so checkpoints load unchanged.

On rows, LN1 + conv1 and LN2 + fc1 + GELU are each one norm_linear op (the LayerNorm in the GEMM's
prologue, bias and GELU in its epilogue). The mask needs no fusing there: masked cells have no rows.
The CUDA core has no LayerNorm GEMM, so backend="cuda" runs those two through cuBLAS ("torch").
Eagerly a block on rows runs as one autograd.Function over a plan cached per shape
(nn/_cblock_plan.py: the same implementations, the same bits, no custom-op dispatch);
torch.compile, and `use_plan = False`, take the ops."""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn

from .. import backend as _backend
from ..ops import masked_depthwise_conv, norm_linear
from . import _cblock_plan


class _ConvMlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Conv2d(dim, hidden, 1)
        self.act = nn.GELU()
        self.fc2 = nn.Conv2d(hidden, dim, 1)


def _pointwise(conv: nn.Conv2d, rows: Tensor) -> Tensor:
    return nn.functional.linear(rows, conv.weight.flatten(1), conv.bias)


class SparseCBlock(nn.Module):
    # forward_rows as one autograd.Function over a cached plan (nn/_cblock_plan.py); False: through the ops
    use_plan: bool = True

    def __init__(self, dim: int, mlp_ratio: float = 4.0, kernel_size: int = 5, backend: str = "auto"):
        super().__init__()
        _backend.check_backend_name(backend)
        self.backend = backend
        self.norm1 = nn.LayerNorm(dim)
        self.conv1 = nn.Conv2d(dim, dim, 1)
        self.attn = nn.Conv2d(dim, dim, kernel_size, padding=kernel_size // 2, groups=dim)
        self.conv2 = nn.Conv2d(dim, dim, 1)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = _ConvMlp(dim, int(dim * mlp_ratio))

    @staticmethod
    def _channels_last_norm(norm: nn.LayerNorm, x: Tensor) -> Tensor:
        return norm(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)

    def forward_dense(self, x: Tensor, vis: Optional[Tensor] = None) -> Tensor:
        """x [N, C, H, W]; vis [N, 1, H, W] with 1 at visible cells (None: no mask, fine-tuning)."""
        h = self.conv1(self._channels_last_norm(self.norm1, x))
        if vis is not None:
            h = vis * h
        x = x + self.conv2(self.attn(h))
        h = self.mlp.fc1(self._channels_last_norm(self.norm2, x))
        return x + self.mlp.fc2(self.mlp.act(h))

    def _norm_pointwise(self, norm: nn.LayerNorm, conv: nn.Conv2d, x: Tensor, activation: str) -> Tensor:
        """act(conv(norm(x))) on rows, in the autocast dtype when autocast is on (as nn.Linear would)."""
        dtype = torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type) else x.dtype
        bias = None if conv.bias is None else conv.bias.to(dtype)
        backend = "torch" if self.backend == "cuda" else self.backend
        return norm_linear(x, norm.weight, norm.bias, conv.weight.flatten(1).to(dtype), bias, activation, norm.eps, backend)

    def forward_rows(self, x: Tensor, neighbors: Tensor) -> Tensor:
        """x [R, C] visible rows; neighbors [R, k*k] from layout.neighbor_table."""
        if self.use_plan and not torch.compiler.is_compiling() and self._plan_covers(x):
            return _cblock_plan.run(self, x, neighbors)
        return self._forward_rows_ops(x, neighbors)

    def _plan_covers(self, x: Tensor) -> bool:
        """Without autocast the planned path computes in x's dtype, which the parameters must share
        (the ops' path raises its own error otherwise)."""
        return torch.is_autocast_enabled(x.device.type) or self.conv2.weight.dtype == x.dtype

    def _forward_rows_ops(self, x: Tensor, neighbors: Tensor) -> Tensor:
        """forward_rows through the torch.library ops (what torch.compile traces)."""
        h = self._norm_pointwise(self.norm1, self.conv1, x, "none")
        # under autocast h is half precision while the parameters stay float32
        bias = None if self.attn.bias is None else self.attn.bias.to(h.dtype)
        h = masked_depthwise_conv(h, neighbors, self.attn.weight.to(h.dtype), bias, self.backend)
        x = x + _pointwise(self.conv2, h)
        h = self._norm_pointwise(self.norm2, self.mlp.fc1, x, "gelu")
        return x + _pointwise(self.mlp.fc2, h)

    def forward(self, x: Tensor, mask_or_neighbors: Optional[Tensor] = None) -> Tensor:
        """Dense for a 4-d x (the second argument a visibility map or None), sparse for 2-d rows."""
        if x.dim() == 4:
            return self.forward_dense(x, mask_or_neighbors)
        if x.dim() == 2 and mask_or_neighbors is not None:
            return self.forward_rows(x, mask_or_neighbors)
        raise ValueError(
            f"SparseCBlock: argument 'x' expected a map [N, C, H, W] or rows [R, C] with a neighbour table, got shape {list(x.shape)}"
        )
