"""Triton grouped GEMM over expert-major rows: one kernel for the forward (bias and activation in
the epilogue, optionally gathering its A rows through an index inside the load) and for dgrad
(the same kernel reading the weights transposed), and a weight-gradient kernel over variable-size
groups, split over the rows of each expert so small groups still fill the GPU, which also sums the
bias gradient from the same loads; the splits are summed in a fixed order (deterministic, no
atomics), and experts without rows get exact zeros. The launches and the order of the kernels are
the shared recipe's (geomoe_kernels.kernel_recipes): this module provides only the kernels."""

from typing import Callable, List, Optional, Tuple

import torch
import triton
import triton.language as tl
from torch import Tensor

from .. import activations
from .. import kernel_recipes as recipe
from ..kernel_recipes import BlockSchedule
from ..reference.permute import route as _reference_route
from .. import backend as _backend
from . import WHO, kernel, rows_reason
from ._config import INTERPRET, accumulator_elements, autotune_options, configs, pow2
from .permute import permute as _permute
from .permute import unpermute as _unpermute

# the activation codes, as constants the kernels can compare against
_NONE: tl.constexpr = tl.constexpr(int(activations.Activation.NONE))
_GELU: tl.constexpr = tl.constexpr(int(activations.Activation.GELU))
_SILU: tl.constexpr = tl.constexpr(int(activations.Activation.SILU))
_SWIGLU: tl.constexpr = tl.constexpr(int(activations.Activation.SWIGLU))
_SWIGLU_IL: tl.constexpr = tl.constexpr(int(activations.Activation.SWIGLU_INTERLEAVED))


def block_m(dtype: torch.dtype) -> int:
    """Rows per program (fixed per dtype: the row-block schedule depends on it). fp32 tiles take twice
    the registers and shared memory: at 128 rows every fp32 config spilled in the offline compile."""
    return 16 if INTERPRET else (64 if dtype == torch.float32 else 128)


# Every config has the same BK: each output element's sum over K is then added up in the same
# chunks whatever the tile and warp count, so the autotuned choice (which can differ between
# processes and machines) never changes a bit of the result. BN, warps and stages vary.
# Which configs a launch may use is pruned by register budget (_config.autotune_options): SwiGLU keeps two
# accumulators (gate and up in the forward; in the dgrad, the product and the pre-activation
# halves), so at 128 rows only the 8-warp BN 64 and the BN 32 tiles fit; every config fits the
# other activations. Interleaved SwiGLU's forward keeps one (BN / 2 (gate, up) pairs, split in the
# epilogue), so it fits what GELU fits (128 x 128 on 8 warps); its dgrad counts two, as concat's.
_GEMM_CONFIGS = configs(
    [
        ({"BN": 64, "BK": 64}, 4, 4),
        ({"BN": 64, "BK": 64}, 8, 4),  # [gate | up] SwiGLU's first config (what GEOMOE_TRITON_AUTOTUNE=0 runs)
        ({"BN": 128, "BK": 64}, 8, 3),
        ({"BN": 64, "BK": 64}, 4, 5),
        ({"BN": 128, "BK": 64}, 8, 4),  # 4 warps: a 128 x 128 accumulator spills (offline compile)
        ({"BN": 32, "BK": 64}, 4, 4),
        ({"BN": 256, "BK": 64}, 8, 3),  # N = d (768, 2048): the down-projection forward, the up-projection dgrad
    ],
    {"BN": 16, "BK": 16},
)


def _gemm_footprint(args, num_warps):
    """The accumulators' float32 elements a thread; a bias-only epilogue (no activation, no act') with
    16-bit operands counts half: it keeps nothing beside the accumulator, and 128 x 256 on 8 warps
    (128 elements) compiled without spills there (254 registers), where the GELU, SiLU and SwiGLU
    epilogues spilled 0.5-1.6 KB a thread (offline compile, Triton 3.9). The routed dgrad epilogue
    (ROUTED: pre, act(pre), the weighted tile and the column folds beside the accumulator) counts
    as two: at 64 elements its GELU build spilled 32-48 bytes a thread (24-32 with float32
    operands at 32), at 32 (16) none did."""
    two = _SWIGLU.value in (args["ACT"], args["GRAD_ACT"]) or args["GRAD_ACT"] == _SWIGLU_IL.value or bool(args.get("ROUTED"))
    elements = accumulator_elements(args["BM"], args["BN"], num_warps, 2 if two else 1)
    plain = args["ACT"] == _NONE.value and args["GRAD_ACT"] == _NONE.value and not args.get("ROUTED")
    if plain and getattr(args.get("A"), "dtype", None) in (torch.float16, torch.bfloat16):
        return elements / 2
    return elements


def gemm_columns(activation: str, n: int) -> int:
    """The columns a forward's tiles cover for W's n: pre's for interleaved SwiGLU (each tile's
    pairs give half its width of output columns), else the output's (concat SwiGLU: each tile
    reads its gate and up halves N columns apart)."""
    return n if activation == "swiglu_interleaved" else activations.out_features(activation, n)


def lookup_lanes(num_experts: int) -> int:
    """Lanes of the in-kernel block lookup (_block_of_expert): a power of two, at least 16 (no
    one-lane scan at a single expert)."""
    return max(16, pow2(num_experts))


def fp32_ieee(dtype: torch.dtype) -> bool:
    """float32 GEMMs in full IEEE precision unless torch's matmul precision allows TF32 ("high" or
    "medium"), as torch.mm decides."""
    return dtype == torch.float32 and torch.get_float32_matmul_precision() == "highest"


@triton.jit
def _apply_act(x, ACT: tl.constexpr):
    if ACT == _GELU:  # GELU, erf form (nn.GELU's default)
        x = 0.5 * x * (1.0 + tl.math.erf(x * 0.7071067811865476))
    elif ACT == _SILU:
        x = x * tl.sigmoid(x)
    return x


@triton.jit
def _act_grad(x, ACT: tl.constexpr):
    """d act / d x for GELU (erf form) and SiLU, float32."""
    if ACT == _GELU:
        d = 0.5 * (1.0 + tl.math.erf(x * 0.7071067811865476)) + x * 0.3989422804014327 * tl.exp(-0.5 * x * x)
    else:
        s = tl.sigmoid(x)
        d = s * (1.0 + x * (1.0 - s))
    return d


@triton.jit
def _block_of_expert(offsets, E, blk, BM: tl.constexpr, E_POW2: tl.constexpr):
    """(expert, first row) of row block `blk` in the schedule where expert e owns ceil(count_e / BM)
    consecutive blocks (kernel_recipes.BlockSchedule), found from the offsets alone: E_POW2 lanes
    count each expert's blocks and scan them. expert == E for the surplus blocks past the last one.
    Every program recomputes this (E + 1 loads and a scan of E_POW2 lanes) instead of reading a
    schedule that a dozen small torch ops would build on the host side before each launch."""
    re = tl.arange(0, E_POW2)
    lo = tl.load(offsets + re, mask=re < E, other=0)
    hi = tl.load(offsets + re + 1, mask=re < E, other=0)
    per = ((hi - lo + BM - 1) // BM).to(tl.int32)  # block counts: bounded by the grid, below 2^31
    ends = tl.cumsum(per, 0)  # one past each expert's last block
    e = tl.sum(((ends <= blk) & (re < E)).to(tl.int32), 0)
    first = tl.sum(tl.where(re < e, per, 0), 0)
    row0 = tl.load(offsets + tl.minimum(e, E - 1)) + (blk - first).to(tl.int64) * BM
    return e, row0


@triton.jit
def _interleaved_block(offsets, E, slot, rounds, search_steps, BM: tl.constexpr, E_POW2: tl.constexpr):
    """(expert, first row) of the `slot`-th row block when the experts' blocks are interleaved by
    how far into its expert each block lies: round r (0 <= r < rounds) holds expert e's blocks j
    with ceil(r * n_e / rounds) <= j < ceil((r + 1) * n_e / rounds) (n_e its block count), the
    rounds in order and the experts in order within a round. Every expert's rows are in token order
    (the routing is stable), so the blocks that run together read nearby tokens whatever their
    expert: a token gathered by top_k experts comes from DRAM about once instead of once per
    expert. Any `rounds` >= 1 gives each block exactly one slot; the caller passes ceil(M / BM),
    never below an expert's block count, so a round holds at most one block of each expert. The
    round of `slot` is found by a binary search (search_steps = rounds.bit_length() halvings) on
    the blocks before round r, sum_e ceil(r * n_e / rounds); expert == E for a surplus slot."""
    re = tl.arange(0, E_POW2)
    valid = re < E
    lo_off = tl.load(offsets + re, mask=valid, other=0)
    n = (tl.load(offsets + re + 1, mask=valid, other=0) - lo_off + BM - 1) // BM  # int64: r * n_e can pass 2^31
    total = tl.sum(n, 0)
    slot = slot.to(tl.int64)
    lo = slot * 0  # the last round that starts at or before slot: rounds [lo, hi] remain
    hi = lo + rounds - 1
    for _ in range(search_steps):
        mid = (lo + hi + 1) // 2
        before = tl.sum((mid * n + rounds - 1) // rounds, 0)
        lo = tl.where(before <= slot, mid, lo)
        hi = tl.where(before <= slot, hi, mid - 1)
    first_j = (lo * n + rounds - 1) // rounds  # each expert's first block in round lo
    in_round = tl.where(valid, ((lo + 1) * n + rounds - 1) // rounds - first_j, 0)
    ends = tl.cumsum(in_round, 0)
    u = slot - tl.sum(first_j, 0)  # the slot's place within its round
    e = tl.sum(((ends <= u) & valid).to(tl.int32), 0)
    e = tl.where(slot < total, e, E)
    pick = re == e
    j = tl.sum(tl.where(pick, first_j + u - (ends - in_round), 0), 0)
    row0 = tl.sum(tl.where(pick, lo_off, 0), 0) + j * BM
    return e, row0


@triton.jit
def _mma(acc, a, b, IEEE: tl.constexpr):
    """acc + a @ b, in IEEE float32 where asked (full-precision float32), else the dtype's tensor cores."""
    if IEEE:
        acc += tl.dot(a, b, input_precision="ieee")
    else:
        acc += tl.dot(a, b)
    return acc


@triton.jit
def _a_rows(Gather, rm, mask_m, top_k, GATHER: tl.constexpr):
    """(flat, arow) for rows rm: with GATHER A's rows are tokens, row r reads token
    row_to_flat[r] // top_k (flat = row_to_flat[r]); else both are rm."""
    if GATHER:
        flat = tl.load(Gather + rm, mask=mask_m, other=0)
        arow = flat // top_k
    else:
        flat = rm
        arow = rm
    return flat, arow


@triton.jit
def _tile_start(rn):
    """The first column of a tile of columns rn = t * BN + [0, BN), as a multiple of BN that the
    compiler can see (so the loads and stores at columns derived from it vectorise)."""
    BN: tl.constexpr = rn.shape[0]
    return (tl.min(rn, 0) // BN) * BN


@triton.jit
def _pairs_of(Pre, rm, rn, mask_m, N, stride_pm):
    """(gate, up, columns, mask) of interleaved pre's pairs rn (a tile of hidden columns, N of them)
    on rows rm: the 2 BN contiguous columns [g, u, g, u, ...] read at once, split in registers."""
    BN: tl.constexpr = rn.shape[0]
    BM: tl.constexpr = rm.shape[0]
    cols = 2 * _tile_start(rn) + tl.arange(0, 2 * BN)
    mask2 = mask_m[:, None] & (cols < 2 * N)[None, :]
    pairs = tl.load(Pre + rm[:, None] * stride_pm + cols[None, :], mask=mask2, other=0.0).to(tl.float32)
    gate, up = tl.split(tl.reshape(pairs, (BM, BN, 2)))
    return gate, up, cols, mask2


@triton.jit
def _store_pairs(Out, rm, cols, mask2, stride_om, d_gate, d_up):
    """Store (d gate, d up) as interleaved pairs in the columns `cols` of _pairs_of."""
    BM: tl.constexpr = d_gate.shape[0]
    BN: tl.constexpr = d_gate.shape[1]
    d = tl.reshape(tl.join(d_gate, d_up), (BM, 2 * BN))
    tl.store(Out + rm[:, None] * stride_om + cols[None, :], d.to(Out.dtype.element_ty), mask=mask2)


@triton.jit
def _gmm_epilogue(
    acc,
    acc_up,
    Out,
    Pre,
    rm,
    rn,
    mask,
    N,
    stride_om,
    stride_pm,
    ACT: tl.constexpr,
    STORE_PRE: tl.constexpr,
    GRAD_ACT: tl.constexpr,
    mask_m=None,
):
    """_gmm_kernel's epilogue on its fp32 tile(s): with GRAD_ACT, d pre = d hidden * act'(pre) (both
    halves for SwiGLU); else pre stored where asked, then the activation and the output.
    Interleaved SwiGLU (ACT): acc holds BN pre columns as stored, BN / 2 (gate, up) pairs, rn their
    columns (N: pre's), and the output gets the BN / 2 columns rn // 2 of the pairs' gates; in the
    dgrad (GRAD_ACT) acc is d hidden as for the other activations and pre's pairs are read (and
    d pre's written) as 2 BN contiguous columns. mask_m: the rows' mask (only these two read it)."""
    if GRAD_ACT == _SWIGLU_IL:
        x, up, cols, mask2 = _pairs_of(Pre, rm, rn, mask_m, N, stride_pm)
        s = tl.sigmoid(x)
        _store_pairs(Out, rm, cols, mask2, stride_om, acc * up * s * (1.0 + x * (1.0 - s)), acc * x * s)
    elif GRAD_ACT != _NONE:
        p_ptr = Pre + rm[:, None] * stride_pm + rn[None, :]
        o_ptr = Out + rm[:, None] * stride_om + rn[None, :]
        x = tl.load(p_ptr, mask=mask, other=0.0).to(tl.float32)
        if GRAD_ACT == _SWIGLU:  # pre = [gate | up], hidden = silu(gate) * up
            up = tl.load(p_ptr + N, mask=mask, other=0.0).to(tl.float32)
            s = tl.sigmoid(x)
            tl.store(o_ptr, (acc * up * s * (1.0 + x * (1.0 - s))).to(Out.dtype.element_ty), mask=mask)
            tl.store(o_ptr + N, (acc * x * s).to(Out.dtype.element_ty), mask=mask)
        else:
            tl.store(o_ptr, (acc * _act_grad(x, GRAD_ACT)).to(Out.dtype.element_ty), mask=mask)
    else:
        if STORE_PRE:
            tl.store(Pre + rm[:, None] * stride_pm + rn[None, :], acc.to(Pre.dtype.element_ty), mask=mask)
            if ACT == _SWIGLU:
                tl.store(Pre + rm[:, None] * stride_pm + (rn + N)[None, :], acc_up.to(Pre.dtype.element_ty), mask=mask)
        if ACT == _SWIGLU_IL:  # the pairs split in registers (both columns of a pair sit in one thread)
            BM: tl.constexpr = acc.shape[0]
            BN: tl.constexpr = acc.shape[1]
            gate, up = tl.split(tl.reshape(acc, (BM, BN // 2, 2)))
            ro = _tile_start(rn) // 2 + tl.arange(0, BN // 2)  # the tile's output columns
            out = gate * tl.sigmoid(gate) * up
            mo = mask_m[:, None] & (ro < N // 2)[None, :]
            tl.store(Out + rm[:, None] * stride_om + ro[None, :], out.to(Out.dtype.element_ty), mask=mo)
        else:
            if ACT == _SWIGLU:
                out = acc * tl.sigmoid(acc) * acc_up
            else:
                out = _apply_act(acc, ACT)
            tl.store(Out + rm[:, None] * stride_om + rn[None, :], out.to(Out.dtype.element_ty), mask=mask)


@triton.jit
def _fold_cols(x, ROWS: tl.constexpr, COLS: tl.constexpr, CHUNK: tl.constexpr):
    """[ROWS, COLS] -> [ROWS, COLS // CHUNK]: each CHUNK consecutive columns summed by a fixed
    halving tree (column j + column j + CHUNK/2, then again), each level a sum over an axis of two,
    which is one addition: the same bits whatever layout the compiler gives x, and the same for a
    chunk whichever tile width it was computed in."""
    x = tl.reshape(x, (ROWS, COLS // CHUNK, CHUNK))
    for i in tl.static_range(12):  # chunks of up to 4,096 columns
        if (CHUNK >> i) > 1:
            x = tl.sum(tl.reshape(x, (ROWS, COLS // CHUNK, 2, CHUNK >> (i + 1))), axis=2)
    return tl.reshape(x, (ROWS, COLS // CHUNK))


@triton.jit
def _bias_dot(
    A, Bias, e, arow, mask_m, K, stride_am, stride_ak, stride_be, HAS_BIAS: tl.constexpr, BM: tl.constexpr, BK: tl.constexpr
):
    """<g, bias[e]> of the rows arow of A over K in BK steps, each step a fixed halving tree (0
    without a bias): the routed dgrad's last partial column."""
    bias_dot = tl.zeros((BM,), dtype=tl.float32)
    if HAS_BIAS:
        for k0 in range(0, K, BK):
            rk = k0 + tl.arange(0, BK)
            mask_k = rk < K
            g = tl.load(
                A + arow[:, None] * stride_am + rk[None, :] * stride_ak, mask=mask_m[:, None] & mask_k[None, :], other=0.0
            ).to(tl.float32)
            b = tl.load(Bias + e.to(tl.int64) * stride_be + rk, mask=mask_k, other=0.0).to(tl.float32)
            bias_dot += tl.reshape(_fold_cols(g * b[None, :], BM, BK, BK), (BM,))
    return bias_dot


@triton.jit
def _routed_dgrad_epilogue(
    acc,
    Out,
    Pre,
    Partial,
    RouteW,
    A,
    Bias,
    e,
    flat,
    arow,
    rm,
    rn,
    mask_m,
    mask_n,
    pid_n,
    N,
    K,
    stride_am,
    stride_ak,
    stride_be,
    stride_om,
    stride_pm,
    stride_qm,
    GRAD_ACT: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    BM: tl.constexpr,
    BN: tl.constexpr,
    BK: tl.constexpr,
    CHUNK: tl.constexpr,
    o_desc=None,
    o_up_desc=None,
    row0=None,
    TMA_OUT: tl.constexpr = False,
):
    """The down-projection's dgrad epilogue when its rows are combined with routing weights
    (docs/host_path.md, step 5), on the fp32 tile acc = g @ W2^T of the tokens' gradient g read
    through the routing map (unscaled): d pre = w * acc * act'(pre) (SwiGLU: both halves), w the
    row's routing weight; Partial[flat, c] the sum of acc * act(pre) over the hidden columns of
    chunk c (act(pre) rounded to the compute dtype, as the forward's hidden rows were), each a fixed
    halving tree; the column tile 0 also writes the last column, <g, bias[e]> over K in BK steps
    (0 without a bias). The consumer sums a row's partials in order: the routing weight's gradient
    <g, rows_out> without the expert outputs kept. flat: the rows' slots (t * top_k + j), arow
    their tokens. Self-contained (its pointers and strides in, nothing of the main loop but acc): a
    kernel with another main loop can end in it. TMA_OUT (a tile wholly inside its expert, from the
    sm_90 kernel): d pre written through its descriptors at row row0 (its _tma_epilogue's boxes)."""
    mask = mask_m[:, None] & mask_n[None, :]
    w = tl.load(RouteW + flat, mask=mask_m, other=0.0).to(tl.float32)
    p_ptr = Pre + rm[:, None] * stride_pm + rn[None, :]
    o_ptr = Out + rm[:, None] * stride_om + rn[None, :]
    ws = acc * w[:, None]
    if GRAD_ACT == _SWIGLU:  # pre = [gate | up], hidden = silu(gate) * up
        x = tl.load(p_ptr, mask=mask, other=0.0).to(tl.float32)
        up = tl.load(p_ptr + N, mask=mask, other=0.0).to(tl.float32)
        s = tl.sigmoid(x)
        h = (x * s * up).to(Out.dtype.element_ty).to(tl.float32)
        d_gate = (ws * up * s * (1.0 + x * (1.0 - s))).to(Out.dtype.element_ty)
        d_up = (ws * x * s).to(Out.dtype.element_ty)
        if TMA_OUT:
            o_desc.store([row0.to(tl.int32), pid_n * BN], d_gate)
            o_up_desc.store([row0.to(tl.int32), pid_n * BN], d_up)
        else:
            tl.store(o_ptr, d_gate, mask=mask)
            tl.store(o_ptr + N, d_up, mask=mask)
    elif GRAD_ACT == _SWIGLU_IL:  # pre = [g0, u0, g1, u1, ...]
        x, up, cols, mask2 = _pairs_of(Pre, rm, rn, mask_m, N, stride_pm)
        s = tl.sigmoid(x)
        h = (x * s * up).to(Out.dtype.element_ty).to(tl.float32)
        # the partials first: h is dead before d pre is formed (at 128 rows the other order spilled)
        parts = _fold_cols(tl.where(mask, acc * h, 0.0), BM, BN, CHUNK)
        if TMA_OUT:
            d = tl.reshape(tl.join(ws * up * s * (1.0 + x * (1.0 - s)), ws * x * s), (BM, 2 * BN))
            o_desc.store([row0.to(tl.int32), 2 * pid_n * BN], d.to(Out.dtype.element_ty))
        else:
            _store_pairs(Out, rm, cols, mask2, stride_om, ws * up * s * (1.0 + x * (1.0 - s)), ws * x * s)
    else:
        x = tl.load(p_ptr, mask=mask, other=0.0).to(tl.float32)
        h = _apply_act(x, GRAD_ACT).to(Out.dtype.element_ty).to(tl.float32)
        if GRAD_ACT == _NONE:  # act' = 1 (_act_grad is GELU's or SiLU's)
            d = ws.to(Out.dtype.element_ty)
        else:
            d = (ws * _act_grad(x, GRAD_ACT)).to(Out.dtype.element_ty)
        if TMA_OUT:
            o_desc.store([row0.to(tl.int32), pid_n * BN], d)
        else:
            tl.store(o_ptr, d, mask=mask)
    if GRAD_ACT != _SWIGLU_IL:
        parts = _fold_cols(tl.where(mask, acc * h, 0.0), BM, BN, CHUNK)
    rc = pid_n * (BN // CHUNK) + tl.arange(0, BN // CHUNK)
    n_chunks = tl.cdiv(N, CHUNK)
    q_row = Partial + flat * stride_qm
    tl.store(q_row[:, None] + rc[None, :], parts.to(Partial.dtype.element_ty), mask=mask_m[:, None] & (rc < n_chunks)[None, :])
    if pid_n == 0:
        bias_dot = _bias_dot(A, Bias, e, arow, mask_m, K, stride_am, stride_ak, stride_be, HAS_BIAS, BM, BK)
        tl.store(q_row + n_chunks, bias_dot.to(Partial.dtype.element_ty), mask=mask_m)


# TRANS_W (the dgrad reads W transposed) is in the key: the best tile differs for the two layouts
@triton.autotune(
    configs=_GEMM_CONFIGS,
    key=["N", "K", "ACT", "GATHER", "GRAD_ACT", "TRANS_W", "IEEE", "E_POW2", "INTERLEAVE", "ROUTED"],
    **autotune_options(_gemm_footprint, "A"),
)
@triton.jit
def _gmm_kernel(
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
    N,
    K,
    top_k,
    rounds,
    search_steps,
    stride_am,
    stride_ak,
    stride_we,
    stride_wk,
    stride_wn,
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
    IEEE: tl.constexpr,
    E_POW2: tl.constexpr,
    INTERLEAVE: tl.constexpr,
    ROUTED: tl.constexpr,
    ROUTE_BIAS: tl.constexpr,
    CHUNK: tl.constexpr,
    BM: tl.constexpr,
    BN: tl.constexpr,
    BK: tl.constexpr,
):
    """GRAD_ACT (the down-projection's dgrad): Pre is read, not written, and the epilogue turns the
    product (d hidden) into d pre = d hidden * act'(pre); for SwiGLU it writes both halves of d pre.
    ROUTED (with GATHER: A is the combined tokens' gradient): _routed_dgrad_epilogue, the routing
    weight applied there and its gradient's partials written to Partial (Bias: b2, for <g, b2>).
    One grid axis, the column tile fastest: the programs that start together share one row block of
    A (and one expert's W), so A streams from memory once instead of once per column tile, and the
    grid has no 65,535 limit on any axis. INTERLEAVE (a gathered A whose experts' weights all fit in
    L2 together, kernel_recipes.interleaves_experts): the row blocks run in _interleaved_block's
    order, so the tokens the programs gather at one time are few and shared across experts;
    otherwise each expert's blocks run consecutively (its W read once)."""
    n_tiles = tl.cdiv(N, BN)
    blk = tl.program_id(0) // n_tiles
    if INTERLEAVE:
        e, row0 = _interleaved_block(offsets, E, blk, rounds, search_steps, BM, E_POW2)
    else:
        e, row0 = _block_of_expert(offsets, E, blk, BM, E_POW2)
    if e < E:
        end = tl.load(offsets + e + 1)
        rm = row0 + tl.arange(0, BM).to(tl.int64)
        mask_m = rm < end
        flat, arow = _a_rows(Gather, rm, mask_m, top_k, GATHER)
        pid_n = tl.program_id(0) % n_tiles
        rn = pid_n * BN + tl.arange(0, BN)
        mask_n = rn < N
        w_base = W + e.to(tl.int64) * stride_we
        acc = tl.zeros((BM, BN), dtype=tl.float32)
        acc_up = tl.zeros((BM, BN), dtype=tl.float32)
        for k0 in range(0, K, BK):
            rk = k0 + tl.arange(0, BK)
            mask_k = rk < K
            a = tl.load(
                A + arow[:, None] * stride_am + rk[None, :] * stride_ak, mask=mask_m[:, None] & mask_k[None, :], other=0.0
            )
            w = tl.load(
                w_base + rk[:, None] * stride_wk + rn[None, :] * stride_wn, mask=mask_k[:, None] & mask_n[None, :], other=0.0
            )
            acc = _mma(acc, a, w, IEEE)
            if ACT == _SWIGLU:  # SwiGLU: the 'up' half sits N columns to the right
                wu = tl.load(
                    w_base + rk[:, None] * stride_wk + (rn + N)[None, :] * stride_wn,
                    mask=mask_k[:, None] & mask_n[None, :],
                    other=0.0,
                )
                acc_up = _mma(acc_up, a, wu, IEEE)
        if HAS_BIAS:
            b_base = Bias + e.to(tl.int64) * stride_be
            acc += tl.load(b_base + rn, mask=mask_n, other=0.0).to(tl.float32)[None, :]
            if ACT == _SWIGLU:
                acc_up += tl.load(b_base + rn + N, mask=mask_n, other=0.0).to(tl.float32)[None, :]
        if ROUTED:
            _routed_dgrad_epilogue(
                acc, Out, Pre, Partial, RouteW, A, Bias, e, flat, arow, rm, rn, mask_m, mask_n, pid_n, N, K, stride_am,
                stride_ak, stride_be, stride_om, stride_pm, stride_qm, GRAD_ACT, ROUTE_BIAS, BM, BN, BK, CHUNK,
            )  # fmt: skip
        else:
            mask = mask_m[:, None] & mask_n[None, :]
            _gmm_epilogue(acc, acc_up, Out, Pre, rm, rn, mask, N, stride_om, stride_pm, ACT, STORE_PRE, GRAD_ACT, mask_m)


# The weight gradient is a variable-K grouped GEMM: dW[e] = A_e^T G_e, each program one BK x BN
# tile of one expert's dW, reducing that expert's rows BM at a time through a multi-stage pipeline
# (the loads of the next steps in flight while wgmma runs on this one). Every config has the same
# BM (rows per step of the sum over each expert's rows, for dW and the bias gradient alike): the
# result is the same bits whichever config autotuning picks. BK, BN >= 64: the dW tile is wgmma's
# M and N (a 32-row tile lowers to mma.sync: tools/triton_offline's mma column). The first config
# (128 x 128 on 8 warps: 64 accumulator elements a thread) is what GEOMOE_TRITON_AUTOTUNE=0 runs.
_WGRAD_CONFIGS = configs(
    [
        ({"BK": 128, "BN": 128, "BM": 64}, 8, 3),
        ({"BK": 128, "BN": 128, "BM": 64}, 8, 4),
        ({"BK": 64, "BN": 128, "BM": 64}, 8, 3),  # float32 operands' first (32 elements a thread)
        ({"BK": 128, "BN": 64, "BM": 64}, 8, 4),  # 4 warps: SwiGLU formed in the load spilled
        ({"BK": 64, "BN": 128, "BM": 64}, 4, 4),
        ({"BK": 64, "BN": 64, "BM": 64}, 4, 3),
    ],
    {"BK": 16, "BN": 16, "BM": 16},
)


def _wgrad_footprint(args, num_warps):
    """The dW tile; with full-precision fp32 and SwiGLU formed in the load, also the second half of
    the A tile (FMA dots keep their operands in registers, and SwiGLU loads gate and up): Triton
    3.6 spilled 16 bytes a thread at 64 x 64 without it (3.9 did not); interleaved SwiGLU with the
    routed G on 4 warps, half of it."""
    elements = accumulator_elements(args["BK"], args["BN"], num_warps)
    fp32_operands = getattr(args.get("A"), "dtype", None) == torch.float32
    if args["IEEE"] and args["A_ACT"] in (_SWIGLU.value, _SWIGLU_IL.value):
        elements += accumulator_elements(args["BM"], args["BK"], num_warps)
    elif args["A_ACT"] == _SWIGLU_IL.value and args.get("G_ROUTED") and num_warps < 8 and fp32_operands:
        # TF32 with the pairs tile [BM, 2 BK] and the routed G on 4 warps: 8 bytes a thread spilled at
        # 64 x 64 (Triton 3.9): half the pairs' up tile counts
        elements += accumulator_elements(args["BM"], args["BK"], num_warps) / 2
    return elements


@triton.jit
def _fold_rows(x, ROWS: tl.constexpr, BN: tl.constexpr):
    """[ROWS, BN] -> [BN]: the column sums by a fixed halving tree (row i + row i + ROWS/2, then again),
    each level a sum over an axis of two, which is one addition: the same bits whatever layout the
    compiler gives x (a plain tl.sum's order follows the register layout, which BN and the warp
    count change)."""
    for i in tl.static_range(12):  # up to 4,096 rows
        if (ROWS >> i) > 1:
            x = tl.sum(tl.reshape(x, (2, ROWS >> (i + 1), BN)), axis=0)
    return tl.reshape(x, (BN,))


@triton.jit
def _store_dw_db(
    acc, col_sum, DW, DB, split, e, rk, rn, K, N, stride_ds, stride_de, stride_dk, stride_dn, stride_bs, stride_be,
    ACCUMULATE: tl.constexpr, sums,
):  # fmt: skip
    """A weight-gradient tile's results: the float32 dW tile (rows rk, columns rn of expert e's
    split) converted once as stored, or added to what is there with ACCUMULATE; where `sums`, the
    bias gradient's column sums likewise."""
    mask = (rk < K)[:, None] & (rn < N)[None, :]
    out = DW + split * stride_ds + e.to(tl.int64) * stride_de + rk[:, None].to(tl.int64) * stride_dk + rn[None, :] * stride_dn
    if ACCUMULATE:
        acc += tl.load(out, mask=mask, other=0.0).to(tl.float32)
    tl.store(out, acc.to(DW.dtype.element_ty), mask=mask)
    if sums:
        db = DB + split * stride_bs + e.to(tl.int64) * stride_be + rn
        if ACCUMULATE:
            col_sum += tl.load(db, mask=rn < N, other=0.0).to(tl.float32)
        tl.store(db, col_sum.to(DB.dtype.element_ty), mask=rn < N)


@triton.jit
def _routed_rows(a, G, GGather, GScale, rm, mask_m, g_top_k):
    """G_ROUTED weight gradients: (A's tile [BK, BM] times the routing weights of the routed rows rm,
    in G's dtype; G's rows, the combined tokens f // g_top_k of f = GGather[rm]; the weights, float32)."""
    gflat = tl.load(GGather + rm, mask=mask_m, other=0)
    gs = tl.load(GScale + gflat, mask=mask_m, other=0.0).to(tl.float32)
    return (a.to(tl.float32) * gs[None, :]).to(G.dtype.element_ty), gflat // g_top_k, gs


@triton.jit
def _hidden_tile(A, G, arow, rk, mask_m, K, stride_am, stride_ak, A_ACT: tl.constexpr, BM: tl.constexpr, BK: tl.constexpr):
    """_wgrad_kernel's A tile [BK, BM] (columns rk of the rows arow, masked by mask_m) in G's dtype:
    A as stored, or the hidden values act(A) formed as A loads (SwiGLU: A = [gate | up], 2K
    columns; interleaved, [g0, u0, g1, u1, ...], the rows' 2 BK columns read contiguously)."""
    a_ptr = A + arow[None, :] * stride_am + rk[:, None] * stride_ak
    a_mask = mask_m[None, :] & (rk < K)[:, None]
    if A_ACT == _SWIGLU_IL:
        r2 = 2 * _tile_start(rk) + tl.arange(0, 2 * BK)
        pairs = tl.load(
            A + arow[:, None] * stride_am + r2[None, :] * stride_ak,
            mask=mask_m[:, None] & (r2 < 2 * K)[None, :],
            other=0.0,
        ).to(tl.float32)
        gate, up = tl.split(tl.reshape(pairs, (BM, BK, 2)))  # each pair in one thread
        a = tl.trans((gate * tl.sigmoid(gate) * up).to(G.dtype.element_ty))
    else:
        a = tl.load(a_ptr, mask=a_mask, other=0.0)
    if A_ACT == _SWIGLU:
        af = a.to(tl.float32)
        up = tl.load(a_ptr + K * stride_ak, mask=a_mask, other=0.0).to(tl.float32)
        a = (af * tl.sigmoid(af) * up).to(G.dtype.element_ty)
    elif A_ACT != _NONE and A_ACT != _SWIGLU_IL:
        a = _apply_act(a.to(tl.float32), A_ACT).to(G.dtype.element_ty)
    return a


@triton.autotune(
    configs=_WGRAD_CONFIGS,
    key=["N", "K", "GATHER", "SPLITS", "A_ACT", "IEEE", "ACCUMULATE", "HAS_DB", "G_ROUTED"],
    **autotune_options(_wgrad_footprint, "A"),
    reset_to_zero=None,
    restore_value=["DW", "DB"],
)
@triton.jit
def _wgrad_kernel(
    A,
    G,
    DW,
    DB,
    Gather,
    offsets,
    GGather,
    GScale,
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
    IEEE: tl.constexpr,
    ACCUMULATE: tl.constexpr,
    HAS_DB: tl.constexpr,
    G_ROUTED: tl.constexpr,
    BM: tl.constexpr,
    BK: tl.constexpr,
    BN: tl.constexpr,
):
    """dW [SPLITS, E, K, N] (strides ds, de, dk, dn; any float dtype: the float32 sums are converted
    once as they are stored, or added to what is there with ACCUMULATE); the programs of the first
    K tile also sum G's rows into DB [SPLITS, E, N] (strides bs, be; the bias gradient, G read once
    for both). A_ACT: A holds the pre-activation and the hidden rows act(A) are formed as they load
    (SwiGLU: A = [gate | up], 2K columns; interleaved, [g0, u0, g1, u1, ...], its 2 BK columns of
    each row loaded contiguously and split in registers), so the hidden rows need not be kept from
    the forward.
    G_ROUTED: G holds the combined tokens' gradient, G's row r is G[f // g_top_k], f = GGather[r],
    and its routing weight GScale[f] multiplies A's row r as it loads (rounded to the dtype: A's tile
    is in registers anyway, G's goes to the dot as loaded; a weighted G tile spilled up to 5 KB a
    thread in the offline compile) and G's row in the bias gradient's float32 sum."""
    # the tile on axis 0 (fastest): the programs that start together read the same expert's rows
    # (A and G stream once per split from memory, not once per tile), and the K x N tiles of the
    # largest experts (d 6144, N 32,768: 12,288 tiles) fit on an axis without the 65,535 limit
    e = tl.program_id(1)
    n_tiles = tl.cdiv(N, BN)
    rk = (tl.program_id(0) // n_tiles) * BK + tl.arange(0, BK)
    rn = (tl.program_id(0) % n_tiles) * BN + tl.arange(0, BN)
    split = tl.program_id(2)
    start = tl.load(offsets + e)
    end = tl.load(offsets + e + 1)
    chunk = tl.cdiv(end - start, SPLITS)
    lo = start + split * chunk
    hi = tl.minimum(lo + chunk, end)
    acc = tl.zeros((BK, BN), dtype=tl.float32)
    col_sum = tl.zeros((BN,), dtype=tl.float32)
    sums = HAS_DB and tl.program_id(0) < n_tiles  # the first K tile's programs
    for m0 in range(lo, hi, BM):
        rm = m0 + tl.arange(0, BM).to(tl.int64)
        mask_m = rm < hi
        _, arow = _a_rows(Gather, rm, mask_m, top_k, GATHER)
        a = _hidden_tile(A, G, arow, rk, mask_m, K, stride_am, stride_ak, A_ACT, BM, BK)
        if G_ROUTED:  # the routing weight on A's tile (in registers already): G goes to the dot as loaded
            a, grow, gs = _routed_rows(a, G, GGather, GScale, rm, mask_m, g_top_k)
        else:
            grow = rm
        g = tl.load(G + grow[:, None] * stride_gm + rn[None, :] * stride_gn, mask=mask_m[:, None] & (rn < N)[None, :], other=0.0)
        acc = _mma(acc, a, g, IEEE)
        if sums:  # the bias gradient as a row sum of the G tile already loaded: no second pass
            if G_ROUTED:
                col_sum += _fold_rows(g.to(tl.float32) * gs[:, None], BM, BN)
            else:
                col_sum += _fold_rows(g.to(tl.float32), BM, BN)
    _store_dw_db(acc, col_sum, DW, DB, split, e, rk, rn, K, N, stride_ds, stride_de, stride_dk, stride_dn, stride_bs, stride_be, ACCUMULATE, sums)  # fmt: skip


def wgrad_arguments(a, grad, offsets, gather, top_k, a_activation, dw, db, accumulate, g_routing):
    """What both weight-gradient kernels (this module's, grouped_wgrad_sm90's) take from
    wgrad_into's arguments: (the tensors, the sizes and strides, the shared constexprs)."""
    g_gather, g_top_k, g_scale = g_routing if g_routing is not None else (offsets, 1, dw)
    operands = (a, grad, dw, db if db is not None else dw, gather if gather is not None else offsets, offsets, g_gather, g_scale)
    scalars = (dw.shape[2], dw.shape[3], top_k, g_top_k, a.stride(0), a.stride(1), grad.stride(0), grad.stride(1))
    scalars += tuple(dw.stride()) + ((db.stride(0), db.stride(1)) if db is not None else (0, 0))
    constexprs = dict(
        SPLITS=dw.shape[0],
        GATHER=gather is not None,
        A_ACT=activations.code(a_activation),
        ACCUMULATE=accumulate,
        HAS_DB=db is not None,
        G_ROUTED=g_routing is not None,
    )
    return operands, scalars, constexprs


def _no_persistent_kernel(*args) -> bool:
    return False


# grouped_gemm_sm90's launcher once that module is imported (geomoe_kernels.triton imports every
# kernel module): it runs a forward or dgrad on the persistent TMA kernel where the device and the
# operands take it, and says whether it did; the pointer kernel below runs the rest
persistent_launch: Callable[..., bool] = _no_persistent_kernel
# grouped_wgrad_sm90's launcher, likewise: the weight gradient with TMA descriptors (wgrad_into's arguments)
persistent_wgrad: Callable[..., bool] = _no_persistent_kernel


class TritonGroupedGemm:
    """The kernels of the grouped-GEMM recipe (geomoe_kernels.kernel_recipes)."""

    def block_rows(self, dtype: torch.dtype) -> int:
        return block_m(dtype)

    def combine(self, rows, flat_to_row, top_k, weights, shared):
        """The combine of expert_mlp with routing weights: this backend's unpermute."""
        return _unpermute(rows, flat_to_row, top_k, weights, shared)

    def wgrad_routes(self, dtype: torch.dtype) -> bool:
        """Whether the weight gradient reads G through the routing map (G_ROUTED): not with
        full-precision float32, whose FMA dots keep both tiles in registers (280-352 bytes a thread
        spilled there in the offline compile, at every config the budget could keep)."""
        return not fp32_ieee(dtype)

    def weighted_rows(self, grad, gather, top_k, weights):
        """G for the weight gradient where wgrad_routes is False: the weighted permute."""
        return _permute(grad, gather, top_k, weights)

    def _launch(
        self,
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
    ) -> None:
        """routed = (routing weights, partial): the dgrad of rows combined with those weights
        (dgrad_routed); `bias` is then b2, read for the routing weights' gradient, not added.
        The persistent TMA kernel (grouped_gemm_sm90) takes the launches whose operands TMA reads."""
        if persistent_launch(
            a, weight, offsets, schedule, out, pre, bias, activation, gather, top_k, transpose_weight, grad_act, routed
        ):
            return
        if transpose_weight:  # W[e] read as [N, K]
            E, N_w, K = weight.shape
            s_we, s_wk, s_wn = weight.stride(0), weight.stride(2), weight.stride(1)
        else:
            E, K, N_w = weight.shape
            s_we, s_wk, s_wn = weight.stride(0), weight.stride(1), weight.stride(2)
        N = gemm_columns(activation, N_w)
        grid = lambda meta: (schedule.blocks * triton.cdiv(N, meta["BN"]),)
        rounds = recipe.interleave_rounds(gather is not None, weight, schedule)  # 0: expert order
        route_w, partial = routed if routed is not None else (None, None)
        _gmm_kernel[grid](
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
            N,
            K,
            top_k,
            max(rounds, 1),
            rounds.bit_length(),
            a.stride(0),
            a.stride(1),
            s_we,
            s_wk,
            s_wn,
            bias.stride(0) if bias is not None else 0,
            out.stride(0),
            pre.stride(0) if pre is not None else 0,
            partial.stride(0) if partial is not None else 0,
            HAS_BIAS=bias is not None and routed is None,
            ACT=activations.code(activation),
            STORE_PRE=pre is not None and grad_act == "none",
            GATHER=gather is not None,
            GRAD_ACT=activations.code(grad_act),
            TRANS_W=transpose_weight,
            IEEE=fp32_ieee(a.dtype),
            E_POW2=lookup_lanes(E),
            INTERLEAVE=rounds > 0,
            ROUTED=routed is not None,
            ROUTE_BIAS=routed is not None and bias is not None,
            CHUNK=recipe.ROUTING_CHUNK,
            BM=schedule.block,
        )

    def forward(self, a, weight, offsets, schedule, bias, activation, gather, top_k, out, pre) -> None:
        self._launch(a, weight, offsets, schedule, out, pre, bias, activation, gather, top_k, False, "none")

    def dgrad(self, grad, weight, offsets, schedule, out, grad_act, pre) -> None:
        self._launch(grad, weight, offsets, schedule, out, pre, None, "none", None, 1, True, grad_act)

    def dgrad_routed(self, grad, weight, bias, offsets, schedule, gather, top_k, weights, out, grad_act, pre, partial) -> None:
        """kernel_recipes.RoutesGradients.dgrad_routed: _gmm_kernel with ROUTED."""
        self._launch(grad, weight, offsets, schedule, out, pre, bias, "none", gather, top_k, True, grad_act, (weights, partial))

    def wgrad(self, a, grad, offsets, gather, top_k, a_activation, partial, partial_db, g_routing=None) -> None:
        self.wgrad_into(a, grad, offsets, gather, top_k, a_activation, partial, partial_db, False, g_routing)

    def wgrad_into(self, a, grad, offsets, gather, top_k, a_activation, dw, db, accumulate, g_routing=None) -> None:
        """dw [splits, E, K, N] and db [splits, E, N] (or None: no bias gradient) of any float dtype
        and strides: the float32 sums converted once as they are stored, added to what is there
        with accumulate (the parameter's .grad: no partial, no cast, no add kernel). g_routing =
        (gather, top_k, weights): G read through the routing map, weighted (kernel_recipes.weight_grad)."""
        if persistent_wgrad(a, grad, offsets, gather, top_k, a_activation, dw, db, accumulate, g_routing):
            return
        splits, E, K, N = dw.shape
        operands, scalars, constexprs = wgrad_arguments(
            a, grad, offsets, gather, top_k, a_activation, dw, db, accumulate, g_routing
        )
        grid = lambda meta: (triton.cdiv(K, meta["BK"]) * triton.cdiv(N, meta["BN"]), E, splits)
        _wgrad_kernel[grid](*operands, *scalars, IEEE=fp32_ieee(a.dtype), **constexprs)


KERNELS = TritonGroupedGemm()
_ops = recipe.grouped_gemm_ops(KERNELS)
grouped_mm, grouped_mm_backward = _ops["grouped_mm"], _ops["grouped_mm_backward"]
expert_mlp, expert_mlp_backward = _ops["expert_mlp"], _ops["expert_mlp_backward"]


def _example(dtype: torch.dtype) -> None:
    """GeoMoE's expert MLP (23 experts, top-3, d 768, hidden 576) with GELU and SwiGLU (both column
    layouts), forward and backward, a grouped_mm weight gradient; in bfloat16 also the LLM shape
    (d 2048, SwiGLU 768, 128 experts, top-8)."""
    T, k, E, D, H = 64, 3, 23, 768, 576
    shapes: List[Tuple[int, int, int, int, Tuple[str, ...]]] = [(E, k, D, H, ("gelu", "swiglu", "swiglu_interleaved"))]
    shapes += [(128, 8, 2048, 768, ("swiglu",))] if dtype == torch.bfloat16 else []
    for E_, k_, D_, H_, acts in shapes:
        ids = torch.stack([torch.randperm(E_)[:k_] for _ in range(T)])
        r2f, _, off = _reference_route(ids, E_)
        x = torch.randn(T, D_, dtype=dtype)
        for act in acts:
            N1 = 2 * H_ if act in activations.SWIGLUS else H_
            w1, b1 = torch.randn(E_, D_, N1, dtype=dtype), torch.randn(E_, N1, dtype=dtype)
            w2, b2 = torch.randn(E_, H_, D_, dtype=dtype), torch.randn(E_, D_, dtype=dtype)
            out, pre = expert_mlp(x, w1, b1, w2, b2, off, act, r2f, None, k_)
            expert_mlp_backward(out, x, w1, w2, off, pre, act, r2f, k_)
            # with routing weights: the dgrad's routed epilogue, the weight gradient's routed G
            expert_mlp_backward(x, x, w1, w2, off, pre, act, r2f, k_, torch.rand(T, k_), b2)
    ids = torch.stack([torch.randperm(E)[:k] for _ in range(T)])
    _, _, off = _reference_route(ids, E)
    rows = torch.randn(T * k, D, dtype=dtype)
    grouped_mm_backward(
        rows[:, :H].contiguous(), rows, torch.randn(E, D, H, dtype=dtype), off, torch.randn(T * k, H, dtype=dtype), "silu"
    )


for _op, _fn in _ops.items():  # expert_mlp's routing weights: float32, as the combine (unpermute) takes them
    kernel(_op, lambda x, weights=None, **_: rows_reason(x) or _backend.weights_reason(WHO, weights), _example)(_fn)
