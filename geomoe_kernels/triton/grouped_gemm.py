"""Triton grouped GEMM over expert-major rows: one kernel for the forward (bias and activation in
the epilogue, optionally gathering its A rows through an index inside the load) and for dgrad
(the same kernel reading the weights transposed), and a weight-gradient kernel over variable-size
groups, split over the rows of each expert so small groups still fill the GPU, which also sums the
bias gradient from the same loads; the splits are summed in a fixed order (deterministic, no
atomics), and experts without rows get exact zeros.

The row blocks are scheduled on the device: expert e gets ceil(count_e / BM) blocks, and the grid
is the static bound ceil(M / BM) + E, surplus programs exiting at once. No host sync."""
from typing import Optional, Tuple

import torch
import triton
import triton.language as tl
from torch import Tensor

from ..reference import activations
from ..reference.grouped_gemm import block_schedule
from ._config import INTERPRET, configs

ACT_CODES = {"none": 0, "gelu": 1, "silu": 2, "swiglu": 3}


def block_m(dtype: torch.dtype) -> int:
    """Rows per program (fixed per dtype: the row-block schedule depends on it). fp32 tiles take twice
    the registers and shared memory: at 128 rows every fp32 config spilled in the offline compile."""
    return 16 if INTERPRET else (64 if dtype == torch.float32 else 128)


_GEMM_CONFIGS = configs(
    [
        ({"BN": 64, "BK": 64}, 4, 4),
        ({"BN": 128, "BK": 64}, 8, 3),
        ({"BN": 64, "BK": 32}, 4, 5),
        ({"BN": 128, "BK": 32}, 8, 4),  # 4 warps: a 128 x 128 accumulator spills (offline compile)
        ({"BN": 32, "BK": 64}, 4, 4),  # SwiGLU keeps two accumulators: the narrow tile avoids spills
    ],
    {"BN": 16, "BK": 16},
)


@triton.jit
def _apply_act(x, ACT: tl.constexpr):
    if ACT == 1:  # GELU, erf form (nn.GELU's default)
        x = 0.5 * x * (1.0 + tl.math.erf(x * 0.7071067811865476))
    elif ACT == 2:
        x = x * tl.sigmoid(x)
    return x


@triton.jit
def _act_grad(x, ACT: tl.constexpr):
    """d act / d x for GELU (erf form) and SiLU, float32."""
    if ACT == 1:
        d = 0.5 * (1.0 + tl.math.erf(x * 0.7071067811865476)) + x * 0.3989422804014327 * tl.exp(-0.5 * x * x)
    else:
        s = tl.sigmoid(x)
        d = s * (1.0 + x * (1.0 - s))
    return d


@triton.autotune(configs=_GEMM_CONFIGS, key=["N", "K", "ACT", "GATHER", "GRAD_ACT"])
@triton.jit
def _gmm_kernel(
    A, W, Bias, Out, Pre, Gather, blk_expert, blk_row0, offsets,
    N, K, top_k,
    stride_am, stride_ak, stride_we, stride_wk, stride_wn, stride_be, stride_om, stride_pm,
    HAS_BIAS: tl.constexpr, ACT: tl.constexpr, STORE_PRE: tl.constexpr, GATHER: tl.constexpr, GRAD_ACT: tl.constexpr,
    IEEE: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
):
    """GRAD_ACT (the down-projection's dgrad): Pre is read, not written, and the epilogue turns the
    product (d hidden) into d pre = d hidden * act'(pre); for SwiGLU it writes both halves of d pre."""
    e = tl.load(blk_expert + tl.program_id(0))
    if e >= 0:
        row0 = tl.load(blk_row0 + tl.program_id(0))
        end = tl.load(offsets + e + 1)
        rm = row0 + tl.arange(0, BM).to(tl.int64)
        mask_m = rm < end
        if GATHER:  # A rows are tokens: row r reads token row_to_flat[r] // top_k
            arow = tl.load(Gather + rm, mask=mask_m, other=0) // top_k
        else:
            arow = rm
        rn = tl.program_id(1) * BN + tl.arange(0, BN)
        mask_n = rn < N
        w_base = W + e.to(tl.int64) * stride_we
        acc = tl.zeros((BM, BN), dtype=tl.float32)
        acc_up = tl.zeros((BM, BN), dtype=tl.float32)
        for k0 in range(0, K, BK):
            rk = k0 + tl.arange(0, BK)
            mask_k = rk < K
            a = tl.load(A + arow[:, None] * stride_am + rk[None, :] * stride_ak, mask=mask_m[:, None] & mask_k[None, :], other=0.0)
            w = tl.load(w_base + rk[:, None] * stride_wk + rn[None, :] * stride_wn, mask=mask_k[:, None] & mask_n[None, :], other=0.0)
            if IEEE:
                acc += tl.dot(a, w, input_precision="ieee")
            else:
                acc += tl.dot(a, w)
            if ACT == 3:  # SwiGLU: the 'up' half sits N columns to the right
                wu = tl.load(w_base + rk[:, None] * stride_wk + (rn + N)[None, :] * stride_wn, mask=mask_k[:, None] & mask_n[None, :], other=0.0)
                if IEEE:
                    acc_up += tl.dot(a, wu, input_precision="ieee")
                else:
                    acc_up += tl.dot(a, wu)
        if HAS_BIAS:
            b_base = Bias + e.to(tl.int64) * stride_be
            acc += tl.load(b_base + rn, mask=mask_n, other=0.0).to(tl.float32)[None, :]
            if ACT == 3:
                acc_up += tl.load(b_base + rn + N, mask=mask_n, other=0.0).to(tl.float32)[None, :]
        mask = mask_m[:, None] & mask_n[None, :]
        if GRAD_ACT != 0:
            p_ptr = Pre + rm[:, None] * stride_pm + rn[None, :]
            o_ptr = Out + rm[:, None] * stride_om + rn[None, :]
            x = tl.load(p_ptr, mask=mask, other=0.0).to(tl.float32)
            if GRAD_ACT == 3:  # pre = [gate | up], hidden = silu(gate) * up
                up = tl.load(p_ptr + N, mask=mask, other=0.0).to(tl.float32)
                s = tl.sigmoid(x)
                tl.store(o_ptr, (acc * up * s * (1.0 + x * (1.0 - s))).to(Out.dtype.element_ty), mask=mask)
                tl.store(o_ptr + N, (acc * x * s).to(Out.dtype.element_ty), mask=mask)
            else:
                tl.store(o_ptr, (acc * _act_grad(x, GRAD_ACT)).to(Out.dtype.element_ty), mask=mask)
        else:
            if STORE_PRE:
                tl.store(Pre + rm[:, None] * stride_pm + rn[None, :], acc.to(Pre.dtype.element_ty), mask=mask)
                if ACT == 3:
                    tl.store(Pre + rm[:, None] * stride_pm + (rn + N)[None, :], acc_up.to(Pre.dtype.element_ty), mask=mask)
            if ACT == 3:
                out = acc * tl.sigmoid(acc) * acc_up
            else:
                out = _apply_act(acc, ACT)
            tl.store(Out + rm[:, None] * stride_om + rn[None, :], out.to(Out.dtype.element_ty), mask=mask)


_WGRAD_CONFIGS = configs(
    [({"BK": 64, "BN": 64, "BM": 64}, 4, 3), ({"BK": 128, "BN": 64, "BM": 32}, 4, 4), ({"BK": 64, "BN": 128, "BM": 32}, 4, 4),
     ({"BK": 32, "BN": 64, "BM": 32}, 4, 3)],  # fp32 with the activation in the load spilled in all three on sm_80
    {"BK": 16, "BN": 16, "BM": 16},
)


@triton.autotune(configs=_WGRAD_CONFIGS, key=["N", "K", "GATHER", "SPLITS", "A_ACT"])
@triton.jit
def _wgrad_kernel(
    A, G, DW, DB, Gather, offsets, K, N, top_k,
    stride_am, stride_ak, stride_gm, stride_gn, stride_ds, stride_de, stride_dk,
    SPLITS: tl.constexpr, GATHER: tl.constexpr, A_ACT: tl.constexpr, IEEE: tl.constexpr,
    BM: tl.constexpr, BK: tl.constexpr, BN: tl.constexpr,
):
    """dW partials [SPLITS, E, K, N]; the programs of the first K tile also sum G's columns: the
    bias gradient partials DB [SPLITS, E, N] (G is read once for both). A_ACT: A holds the
    pre-activation and the hidden rows act(A) are formed as they load (SwiGLU: A = [gate | up],
    2K columns), so the hidden rows need not be kept from the forward."""
    e = tl.program_id(0)
    n_tiles = tl.cdiv(N, BN)
    rk = (tl.program_id(1) // n_tiles) * BK + tl.arange(0, BK)
    rn = (tl.program_id(1) % n_tiles) * BN + tl.arange(0, BN)
    split = tl.program_id(2)
    start = tl.load(offsets + e)
    end = tl.load(offsets + e + 1)
    chunk = tl.cdiv(end - start, SPLITS)
    lo = start + split * chunk
    hi = tl.minimum(lo + chunk, end)
    acc = tl.zeros((BK, BN), dtype=tl.float32)
    col_sum = tl.zeros((BN,), dtype=tl.float32)
    first_k_tile = tl.program_id(1) < n_tiles
    for m0 in range(lo, hi, BM):
        rm = m0 + tl.arange(0, BM).to(tl.int64)
        mask_m = rm < hi
        if GATHER:
            arow = tl.load(Gather + rm, mask=mask_m, other=0) // top_k
        else:
            arow = rm
        a_ptr = A + arow[None, :] * stride_am + rk[:, None] * stride_ak
        a_mask = mask_m[None, :] & (rk < K)[:, None]
        a = tl.load(a_ptr, mask=a_mask, other=0.0)
        if A_ACT == 3:
            af = a.to(tl.float32)
            up = tl.load(a_ptr + K * stride_ak, mask=a_mask, other=0.0).to(tl.float32)
            a = (af * tl.sigmoid(af) * up).to(G.dtype.element_ty)
        elif A_ACT != 0:
            a = _apply_act(a.to(tl.float32), A_ACT).to(G.dtype.element_ty)
        g = tl.load(G + rm[:, None] * stride_gm + rn[None, :] * stride_gn, mask=mask_m[:, None] & (rn < N)[None, :], other=0.0)
        if IEEE:
            acc += tl.dot(a, g, input_precision="ieee")
        else:
            acc += tl.dot(a, g)
        if first_k_tile:
            col_sum += tl.sum(g.to(tl.float32), axis=0)
    out = DW + split * stride_ds + e.to(tl.int64) * stride_de + rk[:, None] * stride_dk + rn[None, :]
    tl.store(out, acc, mask=(rk < K)[:, None] & (rn < N)[None, :])
    if first_k_tile:
        tl.store(DB + (split * tl.num_programs(0) + e).to(tl.int64) * N + rn, col_sum, mask=rn < N)


def grouped_mm_rows(a: Tensor, weight: Tensor, offsets: Tensor, bias: Optional[Tensor], activation: str,
                    gather: Optional[Tensor] = None, top_k: int = 1, n_rows: Optional[int] = None,
                    transpose_weight: bool = False, grad_of: Optional[Tuple[str, Tensor]] = None,
                    schedule: Optional[Tuple[Tensor, Tensor, int]] = None) -> Tuple[Tensor, Tensor]:
    """out[r] = act(A[r] @ W[e(r)] + b[e(r)]) for the expert-major rows r; A[r] = a[gather[r] // top_k]
    when gather is given. transpose_weight reads W[e] as [N, K] (dgrad). Returns (out, pre).
    grad_of = (activation, pre) instead returns (d pre, empty): the product is d act(pre), and the
    epilogue applies act'(pre) (the down-projection's dgrad in expert_mlp_backward). schedule: a
    block_schedule(offsets, M, block_m(a.dtype)) to reuse across calls on the same rows."""
    M = n_rows if n_rows is not None else a.shape[0]
    if transpose_weight:
        E, N_w, K = weight.shape
        s_we, s_wk, s_wn = weight.stride(0), weight.stride(2), weight.stride(1)
    else:
        E, K, N_w = weight.shape
        s_we, s_wk, s_wn = weight.stride(0), weight.stride(1), weight.stride(2)
    N = activations.out_features(activation, N_w)
    store_pre = activation != "none"
    if grad_of is not None:
        grad_act, pre = grad_of
        out = a.new_empty(M, pre.shape[1])  # d pre: both halves for SwiGLU
    else:
        grad_act = "none"
        out = a.new_empty(M, N)
        pre = a.new_empty(M, N_w) if store_pre else a.new_empty(0)
    bm = block_m(a.dtype)
    blk_expert, blk_row0, blocks = schedule if schedule is not None else block_schedule(offsets, M, bm)
    grid = lambda meta: (blocks, triton.cdiv(N, meta["BN"]))
    _gmm_kernel[grid](
        a, weight, bias if bias is not None else weight, out, pre if pre.numel() else out,
        gather if gather is not None else offsets, blk_expert, blk_row0, offsets,
        N, K, top_k,
        a.stride(0), a.stride(1), s_we, s_wk, s_wn, bias.stride(0) if bias is not None else 0,
        out.stride(0), pre.stride(0) if pre.numel() else 0,
        HAS_BIAS=bias is not None, ACT=ACT_CODES[activation], STORE_PRE=store_pre, GATHER=gather is not None,
        GRAD_ACT=ACT_CODES[grad_act], IEEE=a.dtype == torch.float32, BM=bm,
    )
    return (out, a.new_empty(0)) if grad_of is not None else (out, pre)


def weight_grad(a: Tensor, grad: Tensor, offsets: Tensor, gather: Optional[Tensor] = None, top_k: int = 1,
                splits: Optional[int] = None, a_activation: str = "none") -> Tuple[Tensor, Tensor]:
    """(dW, db) in float32: dW[e] = A_e^T @ G_e [E, K, N], db[e] = the sum of G_e's rows [E, N];
    A rows gathered like grouped_mm_rows; with a_activation, A = act(a) formed in the load."""
    E = offsets.numel() - 1
    K, N = activations.out_features(a_activation, a.shape[1]), grad.shape[1]
    if splits is None:  # enough programs for ~4 waves of 132 SMs when groups are small
        splits = 1 if INTERPRET else max(1, min(8, (4 * 132) // max(1, E * triton.cdiv(K, 64) * triton.cdiv(N, 64))))
    partial = torch.empty(splits, E, K, N, dtype=torch.float32, device=a.device)
    partial_db = torch.empty(splits, E, N, dtype=torch.float32, device=a.device)
    grid = lambda meta: (E, triton.cdiv(K, meta["BK"]) * triton.cdiv(N, meta["BN"]), splits)
    _wgrad_kernel[grid](
        a, grad, partial, partial_db, gather if gather is not None else offsets, offsets, K, N, top_k,
        a.stride(0), a.stride(1), grad.stride(0), grad.stride(1), partial.stride(0), partial.stride(1), partial.stride(2),
        SPLITS=splits, GATHER=gather is not None, A_ACT=ACT_CODES[a_activation], IEEE=a.dtype == torch.float32,
    )
    if splits == 1:
        return partial[0], partial_db[0]
    return partial.sum(0), partial_db.sum(0)  # fixed-order sums: deterministic


def grouped_mm(x: Tensor, weight: Tensor, offsets: Tensor, bias: Optional[Tensor], activation: str,
               gather: Optional[Tensor] = None, top_k: int = 1) -> Tuple[Tensor, Tensor]:
    n_rows = x.shape[0] if gather is None else gather.numel()
    return grouped_mm_rows(x, weight, offsets, bias, activation, gather, top_k, n_rows)


def grouped_mm_backward(grad_out: Tensor, x: Tensor, weight: Tensor, offsets: Tensor, pre: Optional[Tensor],
                        activation: str, gather: Optional[Tensor] = None, top_k: int = 1) -> Tuple[Tensor, Tensor, Tensor]:
    dpre = grad_out if activation == "none" else activations.backward(activation, grad_out, pre)
    dpre = dpre.contiguous()
    dx, _ = grouped_mm_rows(dpre, weight, offsets, None, "none", transpose_weight=True)  # row gradients
    dw, db = weight_grad(x, dpre, offsets, gather, top_k)
    return dx, dw.to(weight.dtype), db.to(weight.dtype)


def expert_mlp(x: Tensor, w1: Tensor, b1: Optional[Tensor], w2: Tensor, b2: Optional[Tensor], offsets: Tensor,
               activation: str, gather: Optional[Tensor] = None, top_k: int = 1) -> Tuple[Tensor, Tensor]:
    """(rows_out, pre): the hidden rows live only between the two GEMMs."""
    M = x.shape[0] if gather is None else gather.numel()
    schedule = block_schedule(offsets, M, block_m(x.dtype))  # one row-block schedule for both GEMMs
    hidden, pre = grouped_mm_rows(x, w1, offsets, b1, activation, gather, top_k, M, schedule=schedule)
    out, _ = grouped_mm_rows(hidden, w2, offsets, b2, "none", schedule=schedule)
    return out, pre


def expert_mlp_backward(grad_out: Tensor, x: Tensor, w1: Tensor, w2: Tensor, offsets: Tensor, pre: Tensor,
                        activation: str, gather: Optional[Tensor] = None, top_k: int = 1):
    """Four kernels: d pre = (G @ W2^T) * act'(pre) in one (no d hidden tensor, no separate pass);
    dW2, db2 from act(pre) formed in the load (no kept hidden rows); the row gradients; dW1, db1."""
    schedule = block_schedule(offsets, grad_out.shape[0], block_m(grad_out.dtype))
    d_pre, _ = grouped_mm_rows(grad_out, w2, offsets, None, "none", transpose_weight=True, grad_of=(activation, pre),
                               schedule=schedule)
    dw2, db2 = weight_grad(pre, grad_out, offsets, a_activation=activation)
    d_rows, _ = grouped_mm_rows(d_pre, w1, offsets, None, "none", transpose_weight=True, schedule=schedule)
    dw1, db1 = weight_grad(x, d_pre, offsets, gather, top_k)
    return d_rows, dw1.to(w1.dtype), db1.to(w1.dtype), dw2.to(w2.dtype), db2.to(w2.dtype)
