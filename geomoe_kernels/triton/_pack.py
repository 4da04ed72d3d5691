"""One launch that copies up to 8 contiguous tensors, cast to one dtype, into consecutive segments of
one flat buffer: the MoE layer plan's weight pack (the routed and shared experts' w1, b1, w2, b2,
float32 master weights -> the compute dtype, [E + S, ...] each) and its backward (the packed
gradients -> each parameter's float32 gradient). Each program copies BLOCK elements of one segment."""

from typing import List, Sequence

import torch
import triton
import triton.language as tl
from torch import Tensor

from ._config import INTERPRET

BLOCK = 64 if INTERPRET else 1024
MAX_SEGMENTS = 8


@triton.jit
def _segment(Src, Out, out_offset, n, first_block, pid, BLOCK: tl.constexpr):
    b = pid - first_block
    if (b >= 0) & (b.to(tl.int64) * BLOCK < n):
        i = b.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        m = i < n
        x = tl.load(Src + i, mask=m)
        tl.store(Out + out_offset + i, x.to(Out.dtype.element_ty), mask=m)


@triton.jit
def _pack_kernel(
    Out,
    S0, S1, S2, S3, S4, S5, S6, S7,
    o0, o1, o2, o3, o4, o5, o6, o7,
    n0, n1, n2, n3, n4, n5, n6, n7,
    f0, f1, f2, f3, f4, f5, f6, f7,
    NSEG: tl.constexpr,
    BLOCK: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0)
    _segment(S0, Out, o0, n0, f0, pid, BLOCK)
    if NSEG > 1:
        _segment(S1, Out, o1, n1, f1, pid, BLOCK)
    if NSEG > 2:
        _segment(S2, Out, o2, n2, f2, pid, BLOCK)
    if NSEG > 3:
        _segment(S3, Out, o3, n3, f3, pid, BLOCK)
    if NSEG > 4:
        _segment(S4, Out, o4, n4, f4, pid, BLOCK)
    if NSEG > 5:
        _segment(S5, Out, o5, n5, f5, pid, BLOCK)
    if NSEG > 6:
        _segment(S6, Out, o6, n6, f6, pid, BLOCK)
    if NSEG > 7:
        _segment(S7, Out, o7, n7, f7, pid, BLOCK)


def pack(sources: Sequence[Tensor], dtype: torch.dtype) -> Tensor:
    """The sources (contiguous, at most 8), each cast to dtype, one after another in one flat tensor."""
    if not 1 <= len(sources) <= MAX_SEGMENTS:
        raise ValueError(f"pack: expected 1 to {MAX_SEGMENTS} tensors, got {len(sources)}")
    sizes = [s.numel() for s in sources]
    out = torch.empty(sum(sizes), dtype=dtype, device=sources[0].device)
    offsets: List[int] = []
    firsts: List[int] = []
    at = block = 0
    for n in sizes:
        offsets.append(at)
        firsts.append(block)
        at += n
        block += triton.cdiv(n, BLOCK)
    if block == 0:
        return out
    pad = MAX_SEGMENTS - len(sources)
    srcs = [s.contiguous() for s in sources] + [out] * pad
    _pack_kernel[(block,)](
        out, *srcs, *(offsets + [0] * pad), *(sizes + [0] * pad), *(firsts + [block] * pad), NSEG=len(sources), BLOCK=BLOCK
    )
    return out
