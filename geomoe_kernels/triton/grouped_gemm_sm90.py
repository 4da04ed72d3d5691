"""The grouped GEMM's forward and dgrad for Hopper (sm_90) and later: persistent, the weights and
contiguous activation rows read through tensor descriptors (TMA), the same epilogues as the
pointer-load kernel of grouped_gemm.py (bias, GELU / SiLU / SwiGLU on [gate | up] or interleaved
columns, act' in the dgrad, the output's dtype), whose @triton.jit helpers it calls. The routed
dgrad too (ROUTED: the down-projection's dgrad of the combined tokens' gradient, its rows gathered
through the routing map, W2 read transposed): it ends in the pointer kernel's
_routed_dgrad_epilogue (d pre, the routing weights' gradient as float32 partials over fixed
16-column chunks, <g, b2>), so its bits are the pointer kernel's whatever config either picks; only
d pre's whole tiles leave by TMA there (the partials' rows are the routing map's slots). Its tile
is 128 x 32 on 8 warps: at 128 x 64 Triton 3.6 spilled (_persistent_footprint).

Persistent: one program per SM (OCC per SM where the config's tiles leave room for two), each
walking the tiles pid, pid + G, pid + 2G, ... (G programs) of the row-block schedule
(kernel_recipes.BlockSchedule: expert e owns ceil(count_e / BM) consecutive row blocks; the column
tile fastest). A program's tiles come in increasing order, so it finds each tile's expert by
advancing a cursor over the device-side offsets (one load per expert passed, at most E + 1 in the
program's life): no per-tile search, no tile table built on the host, no host sync. Gathered rows
whose experts' weights fit in L2 run in the pointer kernel's interleaved token order instead
(kernel_recipes.interleaves_experts), each tile's block found by that order's search.

Tensor descriptors are made on the device (tl.make_tensor_descriptor), once per program; they need
a small global scratch (128 bytes a descriptor a program), which Triton asks of the allocator set by
triton.set_allocator at each launch (a context variable in Triton 3.6 and 3.9: a thread that never
set one, such as autograd's device thread, has none, so each launch sets ours where none is set).
The weights: a 3-D descriptor [E, K, N] (the dgrad's [E, N, K], its tile transposed in shared
memory for wgmma), so the K tail of one expert is zero-filled rather than read from the next. A's
rows: a 2-D descriptor when they are contiguous; the rows past an expert's end (or past M,
zero-filled) only reach output rows that are never stored. Gathered rows (token indices) keep
pointer loads: TMA's row gather is Blackwell's (sm_100), not Hopper's.

The output (and the stored pre-activation) leave through [rows, N] descriptors (SwiGLU's 'up' half
through a second, N columns in) where the tile is wholly its expert's (row0 + BM <= hi) or reaches
past M (clipped there, as is the N tail); a tile whose expert ends mid-tile keeps masked pointer
stores: its rows past hi are the next expert's tile, another program's. Interleaved SwiGLU's
boxes: the forward's output BN / 2 columns at n0 / 2 (its BN pairs' gates), the dgrad's d pre 2 BN
interleaved columns at 2 n0. Layouts TMA cannot write keep pointer stores (`stores_by_tma`, TMA_STORE). Triton pipelines these stores on the tile loop
(offline TTGIR, 3.9): one BM x BN buffer outside it, waited on just before the next tile's epilogue
refills it, so a tile's UTMASTG drains during the next tile's k-loop.

No warp specialisation: Triton 3.6 and 3.9 document tl.range(warp_specialize=True) as Blackwell-only.
No flatten: tl.range(flatten=True) on the tile loop left the cursor's builds unchanged (the scf.while
in its body stops the fusion) and fused the interleaved builds' loop with the block search's, not
with the k-loop under `if e < E` (twice the code, no earlier loads); so the next tile's loads wait
for this tile's epilogue math, which the OCC=2 configs hide behind the other CTA's k-loop. No
epilogue subtiling: with the whole-tile buffer every config still holds its OCC in shared memory.

Every config has BK = 64, the pointer kernel's: each output element's sum over K is added up in the
same chunks in both kernels and in every config, so the result is the same bits whichever kernel
and config runs (tests/ops/test_grouped_mm_sm90.py, on the interpreter).

Which kernel runs is decided once per device (cached at its first launch): `persistent_for(device)`,
capability >= 9 and a Triton with tensor descriptors, 16-bit operands; GEOMOE_TRITON_GEMM, read once
at import, overrides it (`pointer`, `persistent`; default `auto`) so benchmarks can compare the two.
Each launch then checks only the operands' layout (host metadata, TMA's 16-byte rules) and leaves
the rest to the pointer kernel. float32 operands (full-precision FMA or TF32) keep the pointer
kernel."""

from __future__ import annotations

import contextlib
import functools
import os
from typing import Iterator, Optional

import torch
import triton
import triton.language as tl
from torch import Tensor
from triton.runtime import _allocation

from .. import activations
from .. import kernel_recipes as recipe
from ..kernel_recipes import BlockSchedule
from ._config import INTERPRET, accumulator_elements, autotune_options, configs
from . import grouped_gemm as _pointer
from .grouped_gemm import (
    _NONE,
    _SWIGLU,
    _SWIGLU_IL,
    _act_grad,
    _apply_act,
    _gemm_footprint,
    _gmm_epilogue,
    _interleaved_block,
    _pairs_of,
    _routed_dgrad_epilogue,
    gemm_columns,
    lookup_lanes,
)

MODES = ("auto", "pointer", "persistent")
ENV = "GEOMOE_TRITON_GEMM"
MODE = os.environ.get(ENV, "auto")  # read once, here
if MODE not in MODES:
    raise ValueError(f"{ENV} must be one of {', '.join(MODES)}; got {MODE!r}")

HAS_DESCRIPTORS = hasattr(tl, "make_tensor_descriptor")  # device-side tensor descriptors (Triton >= 3.3)
SIXTEEN_BIT = (torch.float16, torch.bfloat16)
MAX_TMA_EXTENT = 2**31 - 1  # a descriptor's dimension (int32 in Triton's make_tensor_descriptor)
PROGRAMS_WITHOUT_SMS = 3  # the grid on a machine without SMs (the interpreter, the offline compile)

# BN fits the shapes: N = 576 (GeoMoE's hidden) in 9 x 64 or 5 x 128 (Triton's tiles are powers of
# two: no 192), N = 768 (d) in 6 x 128 or 3 x 256, N = 2048 in 8 x 256; [gate | up] SwiGLU's two
# accumulators keep 128 x 64 on 8 warps (the register budget, _config.py, prunes the rest), where
# interleaved SwiGLU's one (its tile (gate, up) pairs of W's columns as stored) takes 128 x 128: one
# wgmma n128 a k-step instead of two n64, A read from shared memory once. OCC: programs per SM
# (two where two CTAs fit, by the offline compile's report: one's epilogue overlaps the other's
# loads; tools/triton_offline flags a config whose CTAs per SM fall short of its OCC). BK is every
# config's.
_CONFIGS = configs(
    [
        ({"BN": 128, "BK": 64, "OCC": 1}, 8, 4),
        ({"BN": 64, "BK": 64, "OCC": 1}, 8, 4),  # [gate | up] SwiGLU's first (two 128 x 64 accumulators)
        ({"BN": 64, "BK": 64, "OCC": 2}, 4, 4),
        ({"BN": 128, "BK": 64, "OCC": 1}, 8, 3),  # two CTAs did not fit (218-255 registers at 8 warps)
        ({"BN": 256, "BK": 64, "OCC": 1}, 8, 3),  # the bias-only epilogue (N = 768, 2048)
        ({"BN": 32, "BK": 64, "OCC": 1}, 8, 4),  # the routed dgrad's only (_persistent_footprint)
    ],
    {"BN": 16, "BK": 16, "OCC": 1},
)


def _persistent_footprint(args, num_warps):
    """_gemm_footprint, but over any budget where the config's OCC CTAs would not fit an SM:
    interleaved SwiGLU's forward with TMA stores keeps a BM x BN / 2 output buffer beside pre's
    (its box is another shape), which took the 4-warp BN 64 config to 122,912 bytes of shared
    memory, one CTA per SM for its OCC of two (offline compile, Triton 3.9). The routed dgrad
    counts three accumulators (the routed epilogue beside the persistent loop's state): at 128 x 64
    on 8 warps Triton 3.6 spilled 24 bytes a thread ([gate | up] SwiGLU) and 80 (interleaved), 3.9
    8 (interleaved, d pre by TMA); 128 x 32 on 8 warps spilled none in either (179-194 registers).
    That config is the routed dgrad's only: every other launch counts it over the budget."""
    if args["ACT"] == _SWIGLU_IL.value and args.get("TMA_STORE") and args["OCC"] > 1:
        return float("inf")
    if args.get("ROUTED"):
        return accumulator_elements(args["BM"], args["BN"], num_warps, 3)
    if args["BN"] < 64 and args["BM"] >= 64:
        return float("inf")
    return _gemm_footprint(args, num_warps)


def persistent_chosen(mode: str, capability: Optional[tuple], has_descriptors: bool) -> bool:
    """Whether the persistent kernel runs a device's 16-bit GEMMs: `auto` on capability >= 9 (Hopper
    and later: TMA) with descriptors in this Triton; `pointer` never; `persistent` also without a
    GPU (capability None: the interpreter), never on a GPU without TMA."""
    if mode == "pointer" or not has_descriptors:
        return False
    if capability is None:
        return mode == "persistent"
    return capability >= (9, 0)


@functools.lru_cache(maxsize=None)
def persistent_for(device: torch.device) -> bool:
    """The choice for `device` (cached: made at its first launch)."""
    capability = torch.cuda.get_device_capability(device) if device.type == "cuda" else None
    return persistent_chosen(MODE, capability, HAS_DESCRIPTORS)


def describe() -> str:
    """Which kernels run the 16-bit forward, dgrad and weight gradient here (python -m geomoe_kernels.info)."""
    cuda = torch.cuda.is_available()
    device = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
    which = "persistent TMA kernels" if persistent_for(device) else "pointer-load kernels"
    return f"Triton grouped GEMM: the {which} on {device} for 16-bit operands, wgrad included ({ENV}={MODE})"


@contextlib.contextmanager
def forced(mode: str) -> Iterator[None]:
    """Run with another mode (tests, tools/triton_offline's sm_90 pass), the choices made again."""
    global MODE
    saved = MODE
    MODE = mode
    persistent_for.cache_clear()
    try:
        yield
    finally:
        MODE = saved
        persistent_for.cache_clear()


@functools.lru_cache(maxsize=None)
def _sms(device: torch.device) -> int:
    if device.type != "cuda":
        return PROGRAMS_WITHOUT_SMS
    return torch.cuda.get_device_properties(device).multi_processor_count


def _scratch(size: int, alignment: int, stream: Optional[int]) -> Tensor:
    """The descriptors' global scratch (a few KB a launch, from torch's caching allocator)."""
    return torch.empty(size, dtype=torch.int8, device="cuda")


def _current_allocator_unset() -> bool:
    """Whether this thread's context has no allocator (Triton 3.6 and 3.9: a context variable whose
    default is a NullAllocator); True where Triton keeps it otherwise (then ours is set each launch)."""
    try:
        return isinstance(_allocation._allocator.get(), _allocation.NullAllocator)
    except AttributeError:
        return True


def _ensure_allocator() -> None:
    """Set our scratch allocator in this thread's context unless one is set there."""
    if _current_allocator_unset():
        triton.set_allocator(_scratch)


def _tma_ready(t: Tensor, contiguous_dim: int) -> bool:
    """TMA's rules for a tensor read or written through a descriptor: 16-byte aligned base and
    strides (none zero: no broadcast view), the last dimension contiguous, and every extent within
    MAX_TMA_EXTENT (the descriptors' shapes and box coordinates are int32: Triton truncates larger
    ones without a word, where the pointer kernel addresses in int64)."""
    size = t.element_size()
    return (
        t.stride(contiguous_dim) == 1
        and t.data_ptr() % 16 == 0
        and all(n <= MAX_TMA_EXTENT for n in t.shape)
        and all(
            (t.stride(d) * size) % 16 == 0 and (t.stride(d) > 0 or t.shape[d] == 1) for d in range(t.dim()) if d != contiguous_dim
        )
    )


def stores_by_tma(out: Tensor, pre: Optional[Tensor], halves: bool, n_out: int) -> bool:
    """Whether the output (and the stored pre-activation) can be written through TMA descriptors:
    both TMA-ready, and with `halves` (SwiGLU's [gate | up], each n_out columns wide) the second
    half's base n_out columns in on a 16-byte boundary; else the epilogue keeps pointer stores."""
    tensors = [out] + ([pre] if pre is not None else [])
    if halves and any((n_out * t.element_size()) % 16 for t in tensors):
        return False
    return all(_tma_ready(t, 1) for t in tensors)


def takes(a: Tensor, weight: Tensor, activation: str, gather: Optional[Tensor], n_out: int) -> bool:
    """Whether this launch runs here: the device's choice, 16-bit operands of one dtype, and the
    layouts TMA reads (else the pointer kernel runs it)."""
    if not persistent_for(a.device) or a.dtype not in SIXTEEN_BIT or weight.dtype != a.dtype:
        return False
    if activation == "swiglu" and (n_out * a.element_size()) % 16:
        return False  # the 'up' half's tile starts at column N: a 16-byte aligned box start
    # (interleaved SwiGLU's tiles start at multiples of BN of W's columns, as every other activation's)
    return _tma_ready(weight, 2) and (_tma_ready(a, 1) if gather is None else a.stride(1) == 1)


@triton.jit
def _w_tile(w_desc, e, k0, n0, TRANS_W: tl.constexpr, BK: tl.constexpr, BN: tl.constexpr):
    """W[e][k0:k0+BK, n0:n0+BN] as a [BK, BN] tile (the dgrad's W[e] is [N, K]: its tile transposed)."""
    if TRANS_W:
        return tl.trans(tl.reshape(w_desc.load([e, n0, k0]), (BN, BK)))
    return tl.reshape(w_desc.load([e, k0, n0]), (BK, BN))


@triton.jit
def _tma_epilogue(
    acc,
    acc_up,
    Out,
    Pre,
    o_desc,
    o_up_desc,
    p_desc,
    p_up_desc,
    row0,
    n0,
    rm,
    rn,
    mask,
    mask_m,
    N,
    stride_pm,
    ACT: tl.constexpr,
    STORE_PRE: tl.constexpr,
    GRAD_ACT: tl.constexpr,
):
    """_gmm_epilogue's values for a tile wholly inside its expert (or reaching past the last row),
    written through the [rows, N] descriptors of the output and the pre-activation (the *_up_desc:
    the SwiGLU 'up' halves, N columns in), whose bounds clip the N tail and the rows past M. The
    same expressions as _gmm_epilogue, so the same bits; Pre is still read by pointer (dgrad).
    Interleaved SwiGLU: the forward's output box is the BN / 2 columns n0 / 2 of [rows, N / 2]
    (pre's the BN columns n0 of [rows, N]); the dgrad's d pre box the 2 BN interleaved columns
    2 n0 of [rows, 2 N] (the pairs joined in registers as _store_pairs joins them)."""
    r0 = row0.to(tl.int32)
    BM: tl.constexpr = acc.shape[0]
    BN: tl.constexpr = acc.shape[1]
    if GRAD_ACT == _SWIGLU_IL:
        x, up, cols, mask2 = _pairs_of(Pre, rm, rn, mask_m, N, stride_pm)
        s = tl.sigmoid(x)
        d = tl.reshape(tl.join(acc * up * s * (1.0 + x * (1.0 - s)), acc * x * s), (BM, 2 * BN))
        o_desc.store([r0, 2 * n0], d.to(Out.dtype.element_ty))
    elif GRAD_ACT != _NONE:
        p_ptr = Pre + rm[:, None] * stride_pm + rn[None, :]
        x = tl.load(p_ptr, mask=mask, other=0.0).to(tl.float32)
        if GRAD_ACT == _SWIGLU:  # pre = [gate | up], hidden = silu(gate) * up
            up = tl.load(p_ptr + N, mask=mask, other=0.0).to(tl.float32)
            s = tl.sigmoid(x)
            o_desc.store([r0, n0], (acc * up * s * (1.0 + x * (1.0 - s))).to(Out.dtype.element_ty))
            o_up_desc.store([r0, n0], (acc * x * s).to(Out.dtype.element_ty))
        else:
            o_desc.store([r0, n0], (acc * _act_grad(x, GRAD_ACT)).to(Out.dtype.element_ty))
    else:
        if STORE_PRE:
            p_desc.store([r0, n0], acc.to(Pre.dtype.element_ty))
            if ACT == _SWIGLU:
                p_up_desc.store([r0, n0], acc_up.to(Pre.dtype.element_ty))
        if ACT == _SWIGLU_IL:  # the pairs split in registers, as _gmm_epilogue splits them
            gate, up = tl.split(tl.reshape(acc, (BM, BN // 2, 2)))
            o_desc.store([r0, n0 // 2], (gate * tl.sigmoid(gate) * up).to(Out.dtype.element_ty))
        else:
            if ACT == _SWIGLU:
                out = acc * tl.sigmoid(acc) * acc_up
            else:
                out = _apply_act(acc, ACT)
            o_desc.store([r0, n0], out.to(Out.dtype.element_ty))


@triton.jit
def _block_at(
    offsets, E, blk, e, first, lo, hi, nb, rounds, search_steps, INTERLEAVE: tl.constexpr, BM: tl.constexpr,
    E_POW2: tl.constexpr,
):  # fmt: skip
    """Row block `blk`'s (e, first, lo, hi, nb, row0): in expert order the cursor (expert e owns the
    row blocks [first, first + nb), its rows [lo, hi)) moved forward to it, a program's tiles coming
    in increasing order; INTERLEAVE: _interleaved_block's search (hi its expert's end)."""
    if INTERLEAVE:
        e, row0 = _interleaved_block(offsets, E, blk, rounds, search_steps, BM, E_POW2)
        hi = tl.load(offsets + tl.minimum(e + 1, E))
    else:
        while (blk >= first + nb) & (e < E):  # move forward only
            first += nb
            e += 1
            lo = hi
            hi = tl.load(offsets + tl.minimum(e + 1, E))
            nb = ((hi - lo + BM - 1) // BM).to(tl.int32)
        row0 = lo + (blk - first).to(tl.int64) * BM
    return e, first, lo, hi, nb, row0


@triton.jit
def _out_descriptors(
    Out, Pre, M_OUT, N, stride_om, stride_pm, ACT: tl.constexpr, STORE_PRE: tl.constexpr, GRAD_ACT: tl.constexpr,
    TMA_STORE: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
):  # fmt: skip
    """The TMA store descriptors (output, its SwiGLU 'up' half N columns in, pre, pre's 'up' half) of
    M_OUT rows: the output's N columns (interleaved SwiGLU: N // 2 of the forward's, 2 N of the
    dgrad's d pre); without TMA_STORE, or where a descriptor is not used, Out stands in."""
    if not TMA_STORE:
        return Out, Out, Out, Out
    if ACT == _SWIGLU_IL:  # half of pre's N: BN / 2 of the tile's BN pairs' columns
        o_desc = tl.make_tensor_descriptor(Out, [M_OUT, N // 2], [stride_om, 1], [BM, BN // 2])
    elif GRAD_ACT == _SWIGLU_IL:  # d pre's 2 N interleaved columns, 2 BN a tile
        tl.static_assert(2 * BN <= 256, "a TMA box is at most 256 elements a side")
        o_desc = tl.make_tensor_descriptor(Out, [M_OUT, 2 * N], [stride_om, 1], [BM, 2 * BN])
    else:
        o_desc = tl.make_tensor_descriptor(Out, [M_OUT, N], [stride_om, 1], [BM, BN])
    o_up_desc = o_desc
    p_desc = o_desc
    p_up_desc = o_desc
    if GRAD_ACT == _SWIGLU:
        o_up_desc = tl.make_tensor_descriptor(Out + N, [M_OUT, N], [stride_om, 1], [BM, BN])
    if STORE_PRE:
        p_desc = tl.make_tensor_descriptor(Pre, [M_OUT, N], [stride_pm, 1], [BM, BN])
        if ACT == _SWIGLU:
            p_up_desc = tl.make_tensor_descriptor(Pre + N, [M_OUT, N], [stride_pm, 1], [BM, BN])
    return o_desc, o_up_desc, p_desc, p_up_desc


@triton.jit
def _tile_sums(
    A, a_desc, w_desc, Bias, arow, row0, rn, mask_m, mask_n, e, n0, N, K, stride_am, stride_be,
    HAS_BIAS: tl.constexpr, ACT: tl.constexpr, GATHER: tl.constexpr, TRANS_W: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
):  # fmt: skip
    """(acc, acc_up): the tile's fp32 sums over K in BK steps, A's rows gathered (arow, pointer
    loads) or through a_desc at row0, W's tile through w_desc; acc_up SwiGLU's 'up' half (N columns
    to the right; zeros otherwise); the bias added."""
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    acc_up = tl.zeros((BM, BN), dtype=tl.float32)
    for k0 in range(0, K, BK):
        if GATHER:
            rk = k0 + tl.arange(0, BK)
            a = tl.load(A + arow[:, None] * stride_am + rk[None, :], mask=mask_m[:, None] & (rk < K)[None, :], other=0.0)
        else:
            a = a_desc.load([row0.to(tl.int32), k0])
        acc += tl.dot(a, _w_tile(w_desc, e, k0, n0, TRANS_W, BK, BN))
        if ACT == _SWIGLU:  # the 'up' half sits N columns to the right
            acc_up += tl.dot(a, _w_tile(w_desc, e, k0, n0 + N, TRANS_W, BK, BN))
    if HAS_BIAS:
        b_base = Bias + e.to(tl.int64) * stride_be
        acc += tl.load(b_base + rn, mask=mask_n, other=0.0).to(tl.float32)[None, :]
        if ACT == _SWIGLU:
            acc_up += tl.load(b_base + rn + N, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    return acc, acc_up


@triton.jit
def _persistent_epilogue(
    acc, acc_up, Out, Pre, Partial, RouteW, A, Bias, o_desc, o_up_desc, p_desc, p_up_desc, e, flat, arow,
    row0, hi, n0, rm, rn, mask_m, mask_n, pid_n, M_OUT, N, K, stride_am, stride_be, stride_om,
    stride_pm, stride_qm, ACT: tl.constexpr, STORE_PRE: tl.constexpr, GRAD_ACT: tl.constexpr,
    TMA_STORE: tl.constexpr, ROUTED: tl.constexpr, ROUTE_BIAS: tl.constexpr, CHUNK: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
):  # fmt: skip
    """The persistent kernel's tile epilogue: the routed dgrad's, _tma_epilogue or _gmm_epilogue,
    by TMA stores where the tile is wholly its expert's (row0 + BM <= hi) or reaches past M_OUT."""
    mask = mask_m[:, None] & mask_n[None, :]
    if ROUTED:  # d pre through the descriptors where the tile is whole (as below), the partials by pointer
        if TMA_STORE:
            if (row0 + BM <= hi) | (hi >= M_OUT):
                _routed_dgrad_epilogue(
                    acc, Out, Pre, Partial, RouteW, A, Bias, e, flat, arow, rm, rn, mask_m, mask_n, pid_n, N, K,
                    stride_am, 1, stride_be, stride_om, stride_pm, stride_qm, GRAD_ACT, ROUTE_BIAS, BM, BN, BK, CHUNK,
                    o_desc, o_up_desc, row0, True,
                )  # fmt: skip
            else:
                _routed_dgrad_epilogue(
                    acc, Out, Pre, Partial, RouteW, A, Bias, e, flat, arow, rm, rn, mask_m, mask_n, pid_n, N, K,
                    stride_am, 1, stride_be, stride_om, stride_pm, stride_qm, GRAD_ACT, ROUTE_BIAS, BM, BN, BK, CHUNK,
                )  # fmt: skip
        else:
            _routed_dgrad_epilogue(
                acc, Out, Pre, Partial, RouteW, A, Bias, e, flat, arow, rm, rn, mask_m, mask_n, pid_n, N, K,
                stride_am, 1, stride_be, stride_om, stride_pm, stride_qm, GRAD_ACT, ROUTE_BIAS, BM, BN, BK, CHUNK,
            )  # fmt: skip
    elif TMA_STORE:
        # the whole box is this tile's only where no row of it is the next expert's (another
        # tile's, maybe another program's); past M the descriptor clips. Else pointer stores.
        if (row0 + BM <= hi) | (hi >= M_OUT):
            _tma_epilogue(
                acc,
                acc_up,
                Out,
                Pre,
                o_desc,
                o_up_desc,
                p_desc,
                p_up_desc,
                row0,
                n0,
                rm,
                rn,
                mask,
                mask_m,
                N,
                stride_pm,
                ACT,
                STORE_PRE,
                GRAD_ACT,
            )
        else:
            _gmm_epilogue(acc, acc_up, Out, Pre, rm, rn, mask, N, stride_om, stride_pm, ACT, STORE_PRE, GRAD_ACT, mask_m)
    else:
        _gmm_epilogue(acc, acc_up, Out, Pre, rm, rn, mask, N, stride_om, stride_pm, ACT, STORE_PRE, GRAD_ACT, mask_m)


@triton.autotune(
    configs=_CONFIGS,
    key=["N", "K", "ACT", "GATHER", "GRAD_ACT", "TRANS_W", "INTERLEAVE", "ROUTED", "TMA_STORE", "STORE_PRE", "HAS_BIAS"],
    **autotune_options(_persistent_footprint, "A"),
)
@triton.jit
def _gmm_persistent_kernel(
    A,
    W,
    Bias,
    Out,
    Pre,
    Gather,
    offsets,
    Partial,
    RouteW,
    E,
    M_A,
    M_OUT,
    N,
    K,
    W_ROWS,
    W_COLS,
    top_k,
    blocks,
    rounds,
    search_steps,
    stride_am,
    stride_we,
    stride_wr,
    stride_be,
    stride_om,
    stride_pm,
    stride_qm,
    HAS_BIAS: tl.constexpr,
    ACT: tl.constexpr,
    STORE_PRE: tl.constexpr,
    GATHER: tl.constexpr,
    GRAD_ACT: tl.constexpr,
    TRANS_W: tl.constexpr,
    INTERLEAVE: tl.constexpr,
    TMA_STORE: tl.constexpr,
    ROUTED: tl.constexpr,
    ROUTE_BIAS: tl.constexpr,
    CHUNK: tl.constexpr,
    E_POW2: tl.constexpr,
    BM: tl.constexpr,
    BN: tl.constexpr,
    BK: tl.constexpr,
    OCC: tl.constexpr,
):
    """out[r] = epilogue(A[r] @ W[e]) for the rows r of each expert e, as _gmm_kernel computes it.
    W is [E, W_ROWS, W_COLS] with unit column stride (row stride stride_wr): [E, K, N] (times two
    for SwiGLU's [gate | up]) or, with TRANS_W, [E, N, K]. A: M_A rows of K, unit column stride.
    blocks: the schedule's static bound of row blocks (E >= 1); the tiles past the last expert's
    blocks are skipped. OCC is the grid's business (programs per SM). INTERLEAVE (gathered rows
    whose experts' weights all fit in L2, as the pointer kernel): the row blocks in
    _interleaved_block's token order, each tile's block found by its search (the order is not
    monotone in the expert, so no cursor); otherwise expert order and the cursor.
    ROUTED (the down-projection's dgrad of the combined tokens' gradient A, rows gathered, W read
    transposed): the pointer kernel's _routed_dgrad_epilogue, the same arguments (Partial, RouteW,
    stride_qm, ROUTE_BIAS: Bias is b2, read for <g, b2>, not added; CHUNK), so the same bits."""
    pid = tl.program_id(0)
    programs = tl.num_programs(0)
    n_tiles = tl.cdiv(N, BN)
    if TRANS_W:
        w_desc = tl.make_tensor_descriptor(W, [E, W_ROWS, W_COLS], [stride_we, stride_wr, 1], [1, BN, BK])
    else:
        w_desc = tl.make_tensor_descriptor(W, [E, W_ROWS, W_COLS], [stride_we, stride_wr, 1], [1, BK, BN])
    a_desc = w_desc  # stands in where A's rows are gathered (never read then)
    if not GATHER:
        a_desc = tl.make_tensor_descriptor(A, [M_A, K], [stride_am, 1], [BM, BK])
    o_desc, o_up_desc, p_desc, p_up_desc = _out_descriptors(Out, Pre, M_OUT, N, stride_om, stride_pm, ACT, STORE_PRE, GRAD_ACT, TMA_STORE, BM, BN)  # fmt: skip
    # the cursor: expert e owns the row blocks [first, first + nb), its rows [lo, hi)
    e = pid * 0
    first = pid * 0
    lo = tl.load(offsets)
    hi = tl.load(offsets + 1)
    nb = ((hi - lo + BM - 1) // BM).to(tl.int32)
    for t in range(pid, blocks * n_tiles, programs):
        e, first, lo, hi, nb, row0 = _block_at(offsets, E, t // n_tiles, e, first, lo, hi, nb, rounds, search_steps, INTERLEAVE, BM, E_POW2)  # fmt: skip
        if e < E:
            n0 = (t % n_tiles) * BN
            rm = row0 + tl.arange(0, BM).to(tl.int64)
            mask_m = rm < hi
            rn = n0 + tl.arange(0, BN)
            mask_n = rn < N
            flat = rm  # the rows' slots and A's rows where A is not gathered
            arow = rm
            if GATHER:  # A rows are tokens: row r reads token row_to_flat[r] // top_k
                flat = tl.load(Gather + rm, mask=mask_m, other=0)
                arow = flat // top_k
            acc, acc_up = _tile_sums(
                A, a_desc, w_desc, Bias, arow, row0, rn, mask_m, mask_n, e, n0, N, K, stride_am, stride_be,
                HAS_BIAS, ACT, GATHER, TRANS_W, BM, BN, BK,
            )  # fmt: skip
            _persistent_epilogue(
                acc, acc_up, Out, Pre, Partial, RouteW, A, Bias, o_desc, o_up_desc, p_desc, p_up_desc, e, flat, arow,
                row0, hi, n0, rm, rn, mask_m, mask_n, t % n_tiles, M_OUT, N, K, stride_am, stride_be, stride_om,
                stride_pm, stride_qm, ACT, STORE_PRE, GRAD_ACT, TMA_STORE, ROUTED, ROUTE_BIAS, CHUNK, BM, BN, BK,
            )  # fmt: skip


def launch(
    a: Tensor,
    weight: Tensor,
    offsets: Tensor,
    schedule: BlockSchedule,
    out: Tensor,
    pre: Optional[Tensor],
    bias: Optional[Tensor],
    activation: str,
    gather: Optional[Tensor],
    top_k: int,
    transpose_weight: bool,
    grad_act: str,
    routed: Optional[tuple] = None,
) -> bool:
    """Run TritonGroupedGemm._launch's GEMM here if `takes` it (its arguments, the same meaning:
    routed = (routing weights, partial) for the routed dgrad, `bias` then b2); False, nothing
    launched, where the pointer kernel is to run it."""
    E, W_ROWS, W_COLS = weight.shape
    K = W_COLS if transpose_weight else W_ROWS
    N = gemm_columns(activation, W_ROWS if transpose_weight else W_COLS)
    if not takes(a, weight, activation, gather, N):
        return False
    if out.shape[0] == 0:
        return True  # no rows: nothing to write (and no descriptor over an empty A)
    if not INTERPRET and a.device.type == "cuda":
        _ensure_allocator()
    programs = _sms(a.device)
    store_pre = pre if pre is not None and grad_act == "none" and routed is None else None  # a dgrad reads pre
    tma_store = stores_by_tma(out, store_pre, "swiglu" in (activation, grad_act), N)
    rounds = recipe.interleave_rounds(gather is not None, weight, schedule)  # 0: expert order
    route_w, partial = routed if routed is not None else (None, None)
    grid = lambda meta: (max(1, min(schedule.blocks * triton.cdiv(N, meta["BN"]), programs * meta["OCC"])),)
    _gmm_persistent_kernel[grid](
        a,
        weight,
        bias if bias is not None else weight,
        out,
        pre if pre is not None else out,
        gather if gather is not None else offsets,
        offsets,
        partial if partial is not None else out,
        route_w if route_w is not None else out,
        E,
        a.shape[0],
        out.shape[0],
        N,
        K,
        W_ROWS,
        W_COLS,
        top_k,
        schedule.blocks,
        max(rounds, 1),
        rounds.bit_length(),
        a.stride(0),
        weight.stride(0),
        weight.stride(1),
        bias.stride(0) if bias is not None else 0,
        out.stride(0),
        pre.stride(0) if pre is not None else 0,
        partial.stride(0) if partial is not None else 0,
        HAS_BIAS=bias is not None and routed is None,
        ACT=activations.code(activation),
        STORE_PRE=store_pre is not None,
        GATHER=gather is not None,
        GRAD_ACT=activations.code(grad_act),
        TRANS_W=transpose_weight,
        INTERLEAVE=rounds > 0,
        TMA_STORE=tma_store,
        ROUTED=routed is not None,
        ROUTE_BIAS=routed is not None and bias is not None,
        CHUNK=recipe.ROUTING_CHUNK,
        E_POW2=lookup_lanes(E),
        BM=schedule.block,
    )
    return True


_pointer.persistent_launch = launch  # TritonGroupedGemm._launch asks this first
