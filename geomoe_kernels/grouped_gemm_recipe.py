"""The grouped-GEMM recipe, once for every kernel backend: the row-block schedule, the
weight-gradient split, and how grouped_mm and expert_mlp run forward and backward on a backend's
kernels. Triton (triton/grouped_gemm.py) and the CUDA core (cuda.py) provide only the kernels (the
GroupedGemmKernels protocol); `implementations(kernels)` gives their ops.

The row blocks are scheduled on the device: expert e gets ceil(count_e / block) blocks, and the
grid is the static bound ceil(M / block) + E, surplus blocks exiting at once. No host sync. The
reference's tiled grouped GEMM lays its tiles out by the same schedule."""

from __future__ import annotations

import functools
from typing import Callable, Dict, NamedTuple, Optional, Protocol, Tuple

import torch
from torch import Tensor

from .activations import out_features
from .reference import activations as _act_math


class BlockSchedule(NamedTuple):
    block: int  # rows per block
    blocks: int  # the static bound ceil(M / block) + E
    expert: Tensor  # [blocks] owning expert, -1 for the surplus blocks
    row0: Tensor  # [blocks] first row of each block
    per_expert: Tensor  # [E] blocks of each expert
    first_block: Tensor  # [E] index of each expert's first block


def block_schedule(offsets: Tensor, M: int, block: int) -> BlockSchedule:
    """For kernels that give each program `block` rows of one expert, computed on the device."""
    E = offsets.numel() - 1
    counts = offsets[1:] - offsets[:-1]
    per = torch.div(counts + block - 1, block, rounding_mode="floor")
    cum = torch.cumsum(per, 0)
    blocks = -(-M // block) + E
    b = torch.arange(blocks, device=offsets.device)
    e = torch.searchsorted(cum, b, right=True)
    ec = e.clamp_max(E - 1)
    first = cum - per
    row0 = offsets.index_select(0, ec) + (b - first.index_select(0, ec)) * block
    return BlockSchedule(block, blocks, torch.where(e < E, ec, torch.full_like(ec, -1)), row0, per, first)


@functools.lru_cache(maxsize=None)
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def weight_grad_splits(device: torch.device, experts: int, k: int, n: int) -> int:
    """How many ways to split each expert's rows in the weight gradient: enough programs of 64 x 64
    tiles for about 4 waves of the device's SMs when the groups are small, at most 8 (each split
    adds an [E, K, N] float32 partial). One on a CPU (the interpreter, an emulation): nothing to fill."""
    if device.type != "cuda":
        return 1
    index = device.index if device.index is not None else torch.cuda.current_device()
    tiles = experts * -(-k // 64) * -(-n // 64)
    return max(1, min(8, (4 * _sm_count(index)) // max(1, tiles)))


class GroupedGemmKernels(Protocol):
    """What a backend provides; the recipe allocates every output and passes it in."""

    def block_rows(self, dtype: torch.dtype) -> int:
        """Rows per program of forward and dgrad (the schedule's block)."""

    def forward(
        self,
        a: Tensor,
        weight: Tensor,
        offsets: Tensor,
        schedule: BlockSchedule,
        bias: Optional[Tensor],
        activation: str,
        gather: Optional[Tensor],
        top_k: int,
        out: Tensor,
        pre: Optional[Tensor],
    ) -> None:
        """out[r] = act(A[r] @ W[e] + b[e]), pre[r] the pre-activation (when not None); A[r] =
        a[gather[r] // top_k] with gather."""

    def dgrad(
        self,
        grad: Tensor,
        weight: Tensor,
        offsets: Tensor,
        schedule: BlockSchedule,
        out: Tensor,
        grad_act: str,
        pre: Optional[Tensor],
    ) -> None:
        """out[r] = grad[r] @ W[e]^T, times act'(pre[r]) in the epilogue unless grad_act is 'none'
        (SwiGLU: both halves of d pre)."""

    def wgrad(
        self,
        a: Tensor,
        grad: Tensor,
        offsets: Tensor,
        gather: Optional[Tensor],
        top_k: int,
        a_activation: str,
        partial: Tensor,
        partial_db: Tensor,
    ) -> None:
        """partial [splits, E, K, N] of A_e^T G_e over each split of expert e's rows and partial_db
        [splits, E, N] of G_e's row sums, every element written; A = act(a) formed as it loads."""


def _rows(x: Tensor, gather: Optional[Tensor]) -> int:
    return x.shape[0] if gather is None else gather.numel()


def schedule_for(kernels: GroupedGemmKernels, offsets: Tensor, M: int, dtype: torch.dtype) -> BlockSchedule:
    return block_schedule(offsets, M, kernels.block_rows(dtype))


def forward(
    kernels: GroupedGemmKernels,
    a: Tensor,
    weight: Tensor,
    offsets: Tensor,
    bias: Optional[Tensor],
    activation: str,
    gather: Optional[Tensor] = None,
    top_k: int = 1,
    schedule: Optional[BlockSchedule] = None,
) -> Tuple[Tensor, Tensor]:
    """(out, pre): pre is empty for 'none'."""
    M, N = _rows(a, gather), weight.shape[2]
    schedule = schedule if schedule is not None else schedule_for(kernels, offsets, M, a.dtype)
    out = a.new_empty(M, out_features(activation, N))
    pre = a.new_empty(M, N) if activation != "none" else None
    kernels.forward(a, weight, offsets, schedule, bias, activation, gather, top_k, out, pre)
    return out, (pre if pre is not None else a.new_empty(0))


def dgrad(
    kernels: GroupedGemmKernels,
    grad: Tensor,
    weight: Tensor,
    offsets: Tensor,
    schedule: Optional[BlockSchedule] = None,
    grad_act: str = "none",
    pre: Optional[Tensor] = None,
) -> Tensor:
    """grad @ W[e]^T for each expert's rows; with grad_act, d pre = that times act'(pre)."""
    M = grad.shape[0]
    schedule = schedule if schedule is not None else schedule_for(kernels, offsets, M, grad.dtype)
    if grad_act == "none":
        pre = None
    elif pre is None:
        raise ValueError(f"dgrad with act' of {grad_act!r} reads the pre-activation: pass pre")
    out = grad.new_empty(M, pre.shape[1] if pre is not None else weight.shape[1])  # d pre: both SwiGLU halves
    kernels.dgrad(grad, weight, offsets, schedule, out, grad_act, pre)
    return out


def weight_grad(
    kernels: GroupedGemmKernels,
    a: Tensor,
    grad: Tensor,
    offsets: Tensor,
    gather: Optional[Tensor] = None,
    top_k: int = 1,
    a_activation: str = "none",
    splits: Optional[int] = None,
) -> Tuple[Tensor, Tensor]:
    """(dW [E, K, N], db [E, N]) in float32; A = act(a) with a_activation; the splits summed in a
    fixed order (deterministic, no atomics), experts without rows exact zeros."""
    E, K, N = offsets.numel() - 1, out_features(a_activation, a.shape[1]), grad.shape[1]
    splits = splits if splits is not None else weight_grad_splits(a.device, E, K, N)
    partial = torch.empty(splits, E, K, N, dtype=torch.float32, device=a.device)
    partial_db = torch.empty(splits, E, N, dtype=torch.float32, device=a.device)
    kernels.wgrad(a, grad, offsets, gather, top_k, a_activation, partial, partial_db)
    if splits == 1:
        return partial[0], partial_db[0]
    return partial.sum(0), partial_db.sum(0)


def grouped_mm(
    kernels: GroupedGemmKernels,
    x: Tensor,
    weight: Tensor,
    offsets: Tensor,
    bias: Optional[Tensor],
    activation: str,
    gather: Optional[Tensor] = None,
    top_k: int = 1,
) -> Tuple[Tensor, Tensor]:
    return forward(kernels, x, weight, offsets, bias, activation, gather, top_k)


def grouped_mm_backward(
    kernels: GroupedGemmKernels,
    grad_out: Tensor,
    x: Tensor,
    weight: Tensor,
    offsets: Tensor,
    pre: Optional[Tensor],
    activation: str,
    gather: Optional[Tensor] = None,
    top_k: int = 1,
) -> Tuple[Tensor, Tensor, Tensor]:
    dpre = (grad_out if activation == "none" else _act_math.backward(activation, grad_out, pre)).contiguous()
    d_rows = dgrad(kernels, dpre, weight, offsets)
    dw, db = weight_grad(kernels, x, dpre, offsets, gather, top_k)
    return d_rows, dw.to(weight.dtype), db.to(weight.dtype)


def expert_mlp(
    kernels: GroupedGemmKernels,
    x: Tensor,
    w1: Tensor,
    b1: Optional[Tensor],
    w2: Tensor,
    b2: Optional[Tensor],
    offsets: Tensor,
    activation: str,
    gather: Optional[Tensor] = None,
    top_k: int = 1,
) -> Tuple[Tensor, Tensor]:
    """(rows_out, pre): the hidden rows live only between the two GEMMs, which share one schedule."""
    schedule = schedule_for(kernels, offsets, _rows(x, gather), x.dtype)
    hidden, pre = forward(kernels, x, w1, offsets, b1, activation, gather, top_k, schedule)
    out, _ = forward(kernels, hidden, w2, offsets, b2, "none", schedule=schedule)
    return out, pre


def expert_mlp_backward(
    kernels: GroupedGemmKernels,
    grad_out: Tensor,
    x: Tensor,
    w1: Tensor,
    w2: Tensor,
    offsets: Tensor,
    pre: Tensor,
    activation: str,
    gather: Optional[Tensor] = None,
    top_k: int = 1,
) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Four kernels: d pre = (G @ W2^T) * act'(pre) in one (no d hidden tensor, no separate pass);
    dW2, db2 from act(pre) formed in the load (no kept hidden rows); the row gradients; dW1, db1."""
    schedule = schedule_for(kernels, offsets, grad_out.shape[0], grad_out.dtype)
    d_pre = dgrad(kernels, grad_out, w2, offsets, schedule, activation, pre)
    dw2, db2 = weight_grad(kernels, pre, grad_out, offsets, a_activation=activation)
    d_rows = dgrad(kernels, d_pre, w1, offsets, schedule)
    dw1, db1 = weight_grad(kernels, x, d_pre, offsets, gather, top_k)
    return d_rows, dw1.to(w1.dtype), db1.to(w1.dtype), dw2.to(w2.dtype), db2.to(w2.dtype)


def implementations(kernels: GroupedGemmKernels) -> Dict[str, Callable]:
    """The four ops this recipe runs, as a backend registers them."""
    return {
        fn.__name__: functools.partial(fn, kernels) for fn in (grouped_mm, grouped_mm_backward, expert_mlp, expert_mlp_backward)
    }
