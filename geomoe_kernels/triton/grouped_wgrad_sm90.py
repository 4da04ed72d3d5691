"""The grouped GEMM's weight gradient for Hopper (sm_90) and later: dW[e] = A_e^T G_e (and the bias
gradient, G_e's column sums, from the same G tiles) with the contiguous operands read through
tensor descriptors (TMA), the same sums as grouped_gemm._wgrad_kernel (the pointer-load kernel),
bit for bit, whose @triton.jit helpers it calls.

The work: one item per (dW tile, expert, split), in the pointer kernel's grid order (the K x N tile
fastest, then the expert, then the split), each reducing its rows [lo, hi) BM at a time in the
pointer kernel's steps (lo, lo + BM, ...; `SPLITS` cuts an expert's rows as the pointer kernel does)
into one float32 accumulator, converted and written (or added to the destination, ACCUMULATE) once.
Persistent: one program per SM (OCC per SM where a config leaves room for two), walking the items
pid, pid + G, ... (G programs), so the descriptors' global scratch is a few KB whatever the number
of items (a grid of one program per item would need 128 bytes a descriptor for every program).

The rows past an expert's (or split's) end must add exactly nothing: they are the next expert's,
and zeroing one operand only is not enough (0 * Inf = NaN). Each item makes its descriptors on the
device (tl.make_tensor_descriptor, as the persistent forward's, the same scratch allocator) over
its own rows only: base = the operand + lo rows, shape [hi - lo, columns] (a runtime extent, int32,
which both Triton 3.6 and 3.9 take), so TMA zero-fills every row past hi, as the pointer kernel's
masked loads do (other=0.0), and every column past K or N. The base stays 16-byte aligned: the
row stride is a multiple of 16 bytes (checked on the host with the base's, `takes`). An item
without rows makes no descriptor (its tile is written as zeros, as the pointer kernel writes it).
SwiGLU's pre-activation [gate | up] takes two descriptors, the 'up' one based K columns to the
right (K * element size a multiple of 16 bytes), so the gate tile's K tail is zero-filled, not read
from 'up'.

What TMA cannot read keeps the pointer kernel's loads, in the same kernel: gathered A rows (the
up-projection's tokens through the routing map: TMA's row gather is sm_100's, not Hopper's) and a
G read through the routing map (G_ROUTED, the routing weight scaling A's tile as it loads). An
activation formed in A's load (GELU, SiLU, SwiGLU: A holds the pre-activation) is applied to the
descriptor's tile in registers, as the pointer kernel applies it to its loaded tile; the offline
compile (tools/triton_offline) checks every shipped build still issues HGMMA and UTMALDG. With
both operands gathered there is nothing for TMA: the pointer kernel runs it.

Which kernel runs is grouped_gemm_sm90's decision (persistent_for: the device's capability and the
GEOMOE_TRITON_GEMM override), for 16-bit operands of one dtype whose layouts TMA reads (host
metadata only, no sync); else the pointer kernel. Every config has the pointer kernel's BM (the
rows of one step of the sum), so the bits are the same whichever kernel and config run
(tests/ops/test_grouped_wgrad_sm90.py, on the interpreter)."""

from __future__ import annotations

from typing import Optional, Tuple

import triton
import triton.language as tl
from torch import Tensor

from .. import activations
from ._config import INTERPRET, accumulator_elements, autotune_options, configs
from . import grouped_gemm as _pointer
from . import grouped_gemm_sm90 as _sm90
from .grouped_gemm import _NONE, _SWIGLU, _a_rows, _apply_act, _fold_rows, _hidden_tile, _routed_rows, _store_dw_db

# the activations formed in A's load that this kernel knows (others: the pointer kernel)
A_ACTIVATIONS = ("none", "gelu", "silu", "swiglu")

# BM is the pointer kernel's (every config of _wgrad_kernel has 64): the rows of one step of each
# expert's sum. OCC: programs per SM (tools/triton_offline flags a config whose CTAs per SM fall
# short of it).
_CONFIGS = configs(
    [
        ({"BK": 128, "BN": 128, "BM": 64, "OCC": 1}, 8, 3),
        ({"BK": 128, "BN": 128, "BM": 64, "OCC": 1}, 8, 4),
        ({"BK": 128, "BN": 64, "BM": 64, "OCC": 1}, 8, 4),
        ({"BK": 64, "BN": 128, "BM": 64, "OCC": 1}, 8, 3),  # 4 warps: 230-255 registers, GELU with routed G spilled (3.6)
        ({"BK": 64, "BN": 64, "BM": 64, "OCC": 2}, 4, 3),
    ],
    {"BK": 16, "BN": 16, "BM": 16, "OCC": 1},
)


def _footprint(args, num_warps):
    """The dW tile's float32 elements a thread (16-bit operands only: the budget of 64); SwiGLU
    formed in a descriptor-loaded A with G through the routing map also keeps A's BM x BK tile in
    registers (gate and up, weighted): 128 x 128 on 8 warps spilled 16 bytes a thread without it,
    128 x 64 on 8 and 64 x 64 on 4 did not (offline compile, Triton 3.9)."""
    elements = accumulator_elements(args["BK"], args["BN"], num_warps)
    if args["A_ACT"] == _SWIGLU.value and args["G_ROUTED"] and not args["GATHER"]:
        elements += accumulator_elements(args["BM"], args["BK"], num_warps)
    return elements


def _tma_rows(t: Tensor) -> bool:
    """A 2-D operand read by rows through a descriptor based at any of its rows: unit column stride,
    16-byte aligned base and row stride."""
    return t.dim() == 2 and _sm90._tma_ready(t, 1)


def takes(a: Tensor, grad: Tensor, gather: Optional[Tensor], g_routed: bool, a_activation: str) -> bool:
    """Whether this weight gradient runs here: the device's choice (grouped_gemm_sm90), 16-bit
    operands of one dtype, an A activation it knows, at least one operand read by rows in place,
    and TMA's 16-byte rules for the operands it reads so (host metadata only)."""
    if not _sm90.persistent_for(a.device) or a.dtype not in _sm90.SIXTEEN_BIT or grad.dtype != a.dtype:
        return False
    if a_activation not in A_ACTIVATIONS or (gather is not None and g_routed):
        return False
    if gather is None:
        k = activations.out_features(a_activation, a.shape[1])
        if not _tma_rows(a) or (a_activation == "swiglu" and (k * a.element_size()) % 16):
            return False  # the 'up' descriptor's base K columns to the right: 16-byte aligned
    return g_routed or _tma_rows(grad)


@triton.autotune(
    configs=_CONFIGS,
    key=["N", "K", "GATHER", "SPLITS", "A_ACT", "ACCUMULATE", "HAS_DB", "G_ROUTED"],
    **autotune_options(_footprint, "A"),
    reset_to_zero=None,
    restore_value=["DW", "DB"],
)
@triton.jit
def _wgrad_tma_kernel(
    A,
    G,
    DW,
    DB,
    Gather,
    offsets,
    GGather,
    GScale,
    E,
    K,
    N,
    top_k,
    g_top_k,
    stride_am,
    stride_ak,
    stride_gm,
    stride_gn,
    stride_ds,
    stride_de,
    stride_dk,
    stride_dn,
    stride_bs,
    stride_be,
    SPLITS: tl.constexpr,
    GATHER: tl.constexpr,
    A_ACT: tl.constexpr,
    ACCUMULATE: tl.constexpr,
    HAS_DB: tl.constexpr,
    G_ROUTED: tl.constexpr,
    BM: tl.constexpr,
    BK: tl.constexpr,
    BN: tl.constexpr,
    OCC: tl.constexpr,
):
    """_wgrad_kernel's arguments and results (its docstring), E experts, persistent: item t is the
    pointer kernel's program (t % tiles, t // tiles % E, t // tiles // E). A by descriptor unless
    GATHER (then stride_ak is its column stride), G by descriptor unless G_ROUTED (then stride_gn
    is); a descriptor's operand has unit column stride. OCC is the grid's business."""
    pid = tl.program_id(0)
    programs = tl.num_programs(0)
    n_tiles = tl.cdiv(N, BN)
    tiles = tl.cdiv(K, BK) * n_tiles
    for t in range(pid, tiles * E * SPLITS, programs):
        tile = t % tiles
        e = (t // tiles) % E
        split = t // tiles // E
        k0 = (tile // n_tiles) * BK
        n0 = (tile % n_tiles) * BN
        rk = k0 + tl.arange(0, BK)
        rn = n0 + tl.arange(0, BN)
        start = tl.load(offsets + e).to(tl.int64)  # lo * stride_am: element offsets past 2^31
        end = tl.load(offsets + e + 1).to(tl.int64)
        chunk = tl.cdiv(end - start, SPLITS)
        lo = start + split * chunk
        hi = tl.minimum(lo + chunk, end)
        acc = tl.zeros((BK, BN), dtype=tl.float32)
        col_sum = tl.zeros((BN,), dtype=tl.float32)
        sums = HAS_DB and tile < n_tiles  # the first K tile's items
        if lo < hi:
            rows = (hi - lo).to(tl.int32)
            if not GATHER:  # this item's rows only: TMA zero-fills the rows past hi
                a_base = A + lo * stride_am
                a_desc = tl.make_tensor_descriptor(a_base, [rows, K], [stride_am, 1], [BM, BK])
                if A_ACT == _SWIGLU:  # 'up' K columns to the right: the gate tile's K tail is zeros
                    up_desc = tl.make_tensor_descriptor(a_base + K, [rows, K], [stride_am, 1], [BM, BK])
            if not G_ROUTED:
                g_desc = tl.make_tensor_descriptor(G + lo * stride_gm, [rows, N], [stride_gm, 1], [BM, BN])
            for m0 in range(lo, hi, BM):
                rm = m0 + tl.arange(0, BM).to(tl.int64)
                mask_m = rm < hi
                r0 = (m0 - lo).to(tl.int32)
                if GATHER:  # the pointer kernel's loads
                    _, arow = _a_rows(Gather, rm, mask_m, top_k, GATHER)
                    a = _hidden_tile(A, G, arow, rk, mask_m, K, stride_am, stride_ak, A_ACT, BM, BK)
                else:
                    a = tl.trans(a_desc.load([r0, k0]))  # [BK, BM]
                    if A_ACT == _SWIGLU:
                        af = a.to(tl.float32)
                        up = tl.trans(up_desc.load([r0, k0])).to(tl.float32)
                        a = (af * tl.sigmoid(af) * up).to(G.dtype.element_ty)
                    elif A_ACT != _NONE:
                        a = _apply_act(a.to(tl.float32), A_ACT).to(G.dtype.element_ty)
                if G_ROUTED:  # the routing weight on A's tile (in registers): G to the dot as loaded
                    a, grow, gs = _routed_rows(a, G, GGather, GScale, rm, mask_m, g_top_k)
                    g = tl.load(
                        G + grow[:, None] * stride_gm + rn[None, :] * stride_gn,
                        mask=mask_m[:, None] & (rn < N)[None, :],
                        other=0.0,
                    )
                else:
                    g = g_desc.load([r0, n0])  # [BM, BN]
                acc += tl.dot(a, g)
                if sums:  # the bias gradient: the G tile's row sums, as the pointer kernel's
                    if G_ROUTED:
                        col_sum += _fold_rows(g.to(tl.float32) * gs[:, None], BM, BN)
                    else:
                        col_sum += _fold_rows(g.to(tl.float32), BM, BN)
        _store_dw_db(acc, col_sum, DW, DB, split, e, rk, rn, K, N, stride_ds, stride_de, stride_dk, stride_dn, stride_bs, stride_be, ACCUMULATE, sums)  # fmt: skip


def launch(
    a: Tensor,
    grad: Tensor,
    offsets: Tensor,
    gather: Optional[Tensor],
    top_k: int,
    a_activation: str,
    dw: Tensor,
    db: Optional[Tensor],
    accumulate: bool,
    g_routing: Optional[Tuple[Tensor, int, Tensor]] = None,
) -> bool:
    """Run TritonGroupedGemm.wgrad_into here if `takes` it (its arguments, the same meaning); False,
    nothing launched, where the pointer kernel is to run it."""
    if not takes(a, grad, gather, g_routing is not None, a_activation):
        return False
    splits, E, K, N = dw.shape
    if dw.numel() == 0:
        return True
    if not INTERPRET and a.device.type == "cuda":
        _sm90._ensure_allocator()
    operands, scalars, constexprs = _pointer.wgrad_arguments(
        a, grad, offsets, gather, top_k, a_activation, dw, db, accumulate, g_routing
    )
    items = E * splits
    programs = _sm90._sms(a.device)
    grid = lambda meta: (max(1, min(items * triton.cdiv(K, meta["BK"]) * triton.cdiv(N, meta["BN"]), programs * meta["OCC"])),)
    _wgrad_tma_kernel[grid](*operands, E, *scalars, **constexprs)
    return True


_pointer.persistent_wgrad = launch  # TritonGroupedGemm.wgrad_into asks this first
