"""Triton fused top-k gating: float32 logits -> score (sigmoid or softmax) -> + bias -> top-k by k
rounds of max over integer order keys (NaN after every number, ties to the lower expert, like the
reference's sorts and the CUDA kernel) -> renormalised
weights, per-expert counts (integer atomics: exact) and per-block sums of the normalised scores
(summed afterwards in a fixed order: deterministic). Its backward recomputes the scores."""

import functools
from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from .. import kernel_recipes as recipe
from . import gating_reason, kernel
from ._config import INTERPRET, pow2


def tokens_per_program(num_experts: int) -> int:
    """Tokens per program: the kernels hold a few [tokens, pow2(E)] float32 tiles, so the tile is
    sized from E (64 x 32 at GeoMoE's 23 experts; 8 x 256 at DeepSeek's 256), about 2048 elements,
    instead of a fixed 64 rows that would spill at E >= 128."""
    if INTERPRET:
        return 8
    return max(4, min(64, 2048 // pow2(num_experts)))


@triton.jit
def _scores(L, B, t, T, E, stride_l, SOFTMAX: tl.constexpr, HAS_BIAS: tl.constexpr, EP: tl.constexpr):
    cols = tl.arange(0, EP)
    valid = (t < T)[:, None] & (cols < E)[None, :]
    # rows past T read as 0 (finite: no NaN to mask later), padding experts as -inf (never chosen)
    logit = tl.load(L + t[:, None].to(tl.int64) * stride_l + cols[None, :], mask=valid, other=0.0).to(tl.float32)
    logit = tl.where((cols < E)[None, :], logit, float("-inf"))
    if SOFTMAX:
        z = tl.exp(logit - tl.max(logit, axis=1)[:, None])
        s = z / tl.sum(z, axis=1)[:, None]
    else:
        s = tl.sigmoid(logit)
    s = tl.where(valid, s, 0.0)
    if HAS_BIAS:
        sel = s + tl.load(B + cols, mask=cols < E, other=0.0)[None, :]
    else:
        sel = s
    return s, tl.where(valid, sel, float("-inf")), valid


# Order keys below every float's (-0x7F800000 for -inf up to 0x7F800000 for +inf): NaN, an expert
# already chosen, a padding column past E. A chosen expert is marked by its key, never by a score
# such as -inf, which a real bias can have too.
_NAN_KEY = tl.constexpr(-0x7F800001)
_CHOSEN_KEY = tl.constexpr(-0x7F800002)
_PAD_KEY = tl.constexpr(-0x7F800003)


@triton.jit
def _order_key(sel, valid):
    """int32 keys in the selection order: the float order with -0.0 equal to 0.0 and NaN below -inf
    (integer compares only: the same on every device, unlike argmax over NaN)."""
    bits = sel.to(tl.int32, bitcast=True)
    mag = bits & 0x7FFFFFFF
    key = tl.where(bits < 0, -mag, mag)
    key = tl.where(mag > 0x7F800000, _NAN_KEY, key)
    return tl.where(valid, key, _PAD_KEY)


@triton.jit
def _gating_kernel(
    L,
    B,
    W,
    Ids,
    Counts,
    Partial,
    T,
    E,
    stride_l,
    TOP_K: tl.constexpr,
    KP: tl.constexpr,
    SOFTMAX: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    RENORM: tl.constexpr,
    EP: tl.constexpr,
    BT: tl.constexpr,
):
    t = tl.program_id(0) * BT + tl.arange(0, BT)
    mt = t < T
    cols = tl.arange(0, EP)
    s, sel, valid = _scores(L, B, t, T, E, stride_l, SOFTMAX, HAS_BIAS, EP)
    key = _order_key(sel, valid)
    slots = tl.arange(0, KP)
    w = tl.zeros((BT, KP), dtype=tl.float32)
    ids = tl.zeros((BT, KP), dtype=tl.int64)
    for j in tl.static_range(TOP_K):
        # the largest key, then the lowest column holding it: an expert (key >= _CHOSEN_KEY) outranks
        # every padding column, so best < E in every row of a valid token (k <= E)
        top = tl.max(key, axis=1)
        best = tl.min(tl.where(key == top[:, None], cols[None, :], EP), axis=1)
        hit = cols[None, :] == best[:, None]
        wj = tl.sum(tl.where(hit, s, 0.0), axis=1)
        w = tl.where(slots[None, :] == j, wj[:, None], w)
        ids = tl.where(slots[None, :] == j, best[:, None].to(tl.int64), ids)
        key = tl.where(hit, _CHOSEN_KEY, key)
        # integer counts: exact in any order, so no ordering is asked of the atomic
        tl.atomic_add(Counts + best, tl.full((BT,), 1, tl.int64), mask=mt, sem="relaxed")
    if RENORM:
        w = w / tl.where(mt, tl.sum(w, axis=1), 1.0)[:, None]
    out_mask = mt[:, None] & (slots < TOP_K)[None, :]
    out = t[:, None].to(tl.int64) * TOP_K + slots[None, :]  # int64: T * k may pass 2^31
    tl.store(W + out, w, mask=out_mask)
    tl.store(Ids + out, ids, mask=out_mask)
    q = s / tl.where(mt, tl.sum(s, axis=1), 1.0)[:, None]
    row = tl.program_id(0).to(tl.int64) * E  # programs * E reaches T * E / 4 (E = 1024: 2^31 at 8.6e9 scores)
    tl.store(Partial + row + cols, tl.sum(tl.where(valid, q, 0.0), axis=0), mask=cols < E)


@triton.jit
def _reduce_blocks(
    Hist,
    Partial,
    Load,
    ProbMean,
    Offsets,
    Aux,
    Ticket,
    nb,
    E,
    EA,
    T_f,
    aux_coef,
    HAS_AUX: tl.constexpr,
    EAP: tl.constexpr,
    BB: tl.constexpr,
):
    """_gate_route_kernel's last program: the blocks' rows reduced in a fixed order (chunks of BB,
    each a fixed tree), each block's running counts written over its histogram row, and the ticket
    put back to 0."""
    ac = tl.arange(0, EAP)
    carry = tl.zeros((EAP,), dtype=tl.int64)
    psum = tl.zeros((EAP,), dtype=tl.float32)
    for b0 in range(0, nb, BB):
        b = b0 + tl.arange(0, BB)
        m2 = (b < nb)[:, None] & (ac < EA)[None, :]
        at = b[:, None].to(tl.int64) * EA + ac[None, :]
        h = tl.load(Hist + at, mask=m2, other=0, cache_modifier=".cg")
        tl.store(Hist + at, tl.cumsum(h, axis=0) - h + carry[None, :], mask=m2)
        carry += tl.sum(h, axis=0)
        mp = (b < nb)[:, None] & (ac < E)[None, :]
        p = tl.load(Partial + b[:, None].to(tl.int64) * E + ac[None, :], mask=mp, other=0.0, cache_modifier=".cg")
        psum += tl.sum(p, axis=0)
    tl.store(Offsets + ac + 1, tl.cumsum(carry, axis=0), mask=ac < EA)
    tl.store(Offsets, tl.zeros((), dtype=tl.int64))
    tl.store(Load + ac, carry, mask=ac < E)
    pm = psum / T_f
    tl.store(ProbMean + ac, pm, mask=ac < E)
    if HAS_AUX:
        fraction = carry.to(tl.float32) * aux_coef
        tl.store(Aux, tl.sum(tl.where(ac < E, pm * fraction, 0.0), axis=0))
    tl.store(Ticket, tl.zeros((), dtype=tl.int32))


@triton.jit
def _gate_route_kernel(
    L,
    B,
    W,
    Ids,
    Hist,
    Partial,
    Load,
    ProbMean,
    Offsets,
    Aux,
    Ticket,
    T,
    E,
    stride_l,
    T_f,
    aux_coef,
    TOP_K: tl.constexpr,
    KP: tl.constexpr,
    S: tl.constexpr,
    SOFTMAX: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    RENORM: tl.constexpr,
    HAS_AUX: tl.constexpr,
    EP: tl.constexpr,
    EAP: tl.constexpr,
    BT: tl.constexpr,
    BB: tl.constexpr,
):
    """_gating_kernel for the layer plan, with routing's first half and the reductions fused in.
    Each program: its tokens' weights and ids [T, k + S] (the S shared experts E..E+S-1 at weight
    1 appended), its row of the expert histogram Hist [blocks, E + S] (int64) and of the normalised
    scores' sums Partial [blocks, E]. The program that finishes last (a ticket on Ticket, a counter
    that is 0 between launches: that program puts it back) then reduces in a fixed order (blocks in
    chunks of BB, each chunk a fixed tree): Load [E] (routed counts), Offsets [E + S + 1], Hist
    overwritten by each block's exclusive running count per expert (the scatter's starts less the
    offsets), ProbMean [E] (sum / T) and, with HAS_AUX, Aux = sum_e ProbMean_e * Load_e * aux_coef."""
    pid = tl.program_id(0)
    nb = tl.num_programs(0)
    t = pid * BT + tl.arange(0, BT)
    mt = t < T
    cols = tl.arange(0, EP)
    s, sel, valid = _scores(L, B, t, T, E, stride_l, SOFTMAX, HAS_BIAS, EP)
    key = _order_key(sel, valid)
    slots = tl.arange(0, KP)
    w = tl.zeros((BT, KP), dtype=tl.float32)
    ids = tl.zeros((BT, KP), dtype=tl.int64)
    hist = tl.zeros((EP,), dtype=tl.int64)
    for j in tl.static_range(TOP_K):
        top = tl.max(key, axis=1)
        best = tl.min(tl.where(key == top[:, None], cols[None, :], EP), axis=1)
        hit = cols[None, :] == best[:, None]
        wj = tl.sum(tl.where(hit, s, 0.0), axis=1)
        w = tl.where(slots[None, :] == j, wj[:, None], w)
        ids = tl.where(slots[None, :] == j, best[:, None].to(tl.int64), ids)
        key = tl.where(hit, _CHOSEN_KEY, key)
        hist += tl.sum((hit & mt[:, None]).to(tl.int64), axis=0)
    if RENORM:
        w = w / tl.where(mt, tl.sum(w, axis=1), 1.0)[:, None]
    K = TOP_K + S
    EA = E + S
    tk = t.to(tl.int64) * K
    out_mask = mt[:, None] & (slots < TOP_K)[None, :]
    out = tk[:, None] + slots[None, :]  # int64: T * k may pass 2^31
    tl.store(W + out, w, mask=out_mask)
    tl.store(Ids + out, ids, mask=out_mask)
    hrow = pid.to(tl.int64) * EA
    tl.store(Hist + hrow + cols, hist, mask=cols < E)
    n_valid = tl.sum(mt.to(tl.int64), axis=0)
    for j in tl.static_range(S):
        tl.store(W + tk + TOP_K + j, tl.full((BT,), 1.0, tl.float32), mask=mt)
        tl.store(Ids + tk + TOP_K + j, tl.full((BT,), j, tl.int64) + E, mask=mt)
        tl.store(Hist + hrow + E + j, n_valid)
    q = s / tl.where(mt, tl.sum(s, axis=1), 1.0)[:, None]
    tl.store(Partial + pid.to(tl.int64) * E + cols, tl.sum(tl.where(valid, q, 0.0), axis=0), mask=cols < E)
    # every program's rows are stored (the barrier: all of its threads' stores) before its ticket,
    # taken with release and acquire semantics; the last program reads the others' rows through L2
    tl.debug_barrier()
    ticket = tl.atomic_add(Ticket, 1, sem="acq_rel")
    if ticket == nb - 1:
        _reduce_blocks(Hist, Partial, Load, ProbMean, Offsets, Aux, Ticket, nb, E, EA, T_f, aux_coef, HAS_AUX, EAP, BB)


@triton.jit
def _gating_backward_kernel(
    L,
    GW,
    GP,
    Ids,
    GL,
    Load,
    DAux,
    T,
    E,
    stride_l,
    stride_k,
    inv_T,
    aux_coef,
    TOP_K: tl.constexpr,
    KP: tl.constexpr,
    SOFTMAX: tl.constexpr,
    RENORM: tl.constexpr,
    HAS_GW: tl.constexpr,
    HAS_GP: tl.constexpr,
    GP_FROM_AUX: tl.constexpr,
    EP: tl.constexpr,
    BT: tl.constexpr,
):
    """d logits from the routing weights' gradient GW (the first TOP_K of stride_k columns, as Ids)
    and prob_mean's GP; with GP_FROM_AUX, GP is the aux loss's (d aux * Load_e * aux_coef)."""
    t = tl.program_id(0) * BT + tl.arange(0, BT)
    mt = t < T
    cols = tl.arange(0, EP)
    s, _, valid = _scores(L, L, t, T, E, stride_l, SOFTMAX, False, EP)
    g_s = tl.zeros((BT, EP), dtype=tl.float32)
    if HAS_GW:
        slots = tl.arange(0, KP)
        m = mt[:, None] & (slots < TOP_K)[None, :]
        at = t[:, None].to(tl.int64) * stride_k + slots[None, :]
        ids = tl.load(Ids + at, mask=m, other=-1)
        gw = tl.load(GW + at, mask=m, other=0.0).to(tl.float32)
        if RENORM:  # w = s_sel / S: d/ds_m = (gw_m - sum_j gw_j w_j) / S
            sel = tl.zeros((BT, KP), dtype=tl.float32)
            for j in tl.static_range(TOP_K):
                id_j = tl.sum(tl.where(slots[None, :] == j, ids, 0), axis=1)
                s_j = tl.sum(tl.where(cols[None, :] == id_j[:, None], s, 0.0), axis=1)
                sel = tl.where(slots[None, :] == j, s_j[:, None], sel)
            total = tl.sum(sel, axis=1)
            total = tl.where(mt, total, 1.0)
            wts = sel / total[:, None]
            gw = (gw - tl.sum(gw * wts, axis=1)[:, None]) / total[:, None]
        for j in tl.static_range(TOP_K):
            id_j = tl.sum(tl.where(slots[None, :] == j, ids, 0), axis=1)
            g_j = tl.sum(tl.where(slots[None, :] == j, gw, 0.0), axis=1)
            g_s += tl.where(cols[None, :] == id_j[:, None], g_j[:, None], 0.0)
    if HAS_GP:  # prob_mean = mean_t s / sum(s)
        z = tl.where(mt, tl.sum(s, axis=1), 1.0)
        q = s / z[:, None]
        if GP_FROM_AUX:  # d prob_mean of aux = sum(prob_mean * load * aux_coef): d aux times each fraction
            fraction = tl.load(Load + cols, mask=cols < E, other=0).to(tl.float32) * aux_coef
            gp = fraction * tl.load(DAux).to(tl.float32)
        else:
            gp = tl.load(GP + cols, mask=cols < E, other=0.0).to(tl.float32)
        gq = gp[None, :] * inv_T
        g_s += tl.where(valid, (gq - tl.sum(gq * q, axis=1)[:, None]) / z[:, None], 0.0)
    if SOFTMAX:
        g_l = s * (g_s - tl.sum(g_s * s, axis=1)[:, None])
    else:
        g_l = g_s * s * (1.0 - s)
    tl.store(GL + t[:, None].to(tl.int64) * stride_l + cols[None, :], g_l, mask=valid)


class TritonGating:
    """The gating recipe's kernel (geomoe_kernels.kernel_recipes.topk_gating)."""

    def tokens_per_block(self, num_experts: int) -> int:
        return tokens_per_program(num_experts)

    def gating(
        self,
        logits: Tensor,
        bias: Optional[Tensor],
        top_k: int,
        softmax: bool,
        renormalize: bool,
        w: Tensor,
        ids: Tensor,
        counts: Tensor,
        partial: Tensor,
    ) -> None:
        T, E = logits.shape
        _gating_kernel[(partial.shape[0],)](
            logits,
            bias if bias is not None else logits,
            w,
            ids,
            counts,
            partial,
            T,
            E,
            logits.stride(0),
            TOP_K=top_k,
            KP=pow2(top_k),
            SOFTMAX=softmax,
            HAS_BIAS=bias is not None,
            RENORM=renormalize,
            EP=pow2(E),
            BT=tokens_per_program(E),
        )

    def fused_with(self, routing: object) -> Optional["TritonGateRoute"]:
        """The gating + routing pair for the layer plan when routing is Triton's too."""
        from .permute import TritonRouting

        return TritonGateRoute() if isinstance(routing, TritonRouting) else None


class TritonGateRoute:
    """kernel_recipes.gate_route's kernels: _gate_route_kernel, then permute's _gate_scatter_kernel."""

    # the weight pack's sources: float64 would be cast once where torch casts through float32
    pack_dtypes = (torch.float32, torch.float16, torch.bfloat16)

    def tokens_per_block(self, num_experts: int, slots: int) -> int:
        return tokens_per_program(num_experts)

    def gate(self, logits, bias, top_k, shared, softmax, renormalize, aux_coef, ticket, out) -> None:
        T, E = logits.shape
        EAP = pow2(E + shared)
        _gate_route_kernel[(out["hist"].shape[0],)](
            logits,
            bias if bias is not None else logits,
            out["weights"],
            out["ids"],
            out["hist"],
            out["partial"],
            out["load"],
            out["prob_mean"],
            out["offsets"],
            out.get("aux", logits),
            ticket,
            T,
            E,
            logits.stride(0),
            float(T),
            aux_coef if aux_coef is not None else 0.0,
            TOP_K=top_k,
            KP=pow2(top_k),
            S=shared,
            SOFTMAX=softmax,
            HAS_BIAS=bias is not None,
            RENORM=renormalize,
            HAS_AUX=aux_coef is not None,
            EP=pow2(E),
            EAP=EAP,
            BT=tokens_per_program(E),
            BB=max(1, min(128, 4096 // EAP)),
        )

    def pack(self, sources, dtype):
        """The layer plan's weight pack (nn/_layer_plan._pack_views): one launch."""
        from ._pack import pack

        return pack(sources, dtype)

    def scatter(self, ids, num_experts, tokens_per_block, out) -> None:
        from .permute import gate_scatter

        gate_scatter(ids, num_experts, tokens_per_block, out["hist"], out["offsets"], out["row_to_flat"], out["flat_to_row"])

    def gating_backward(self, grad_weights, logits, ids, top_k, load, grad_aux, aux_coef, score_func, renormalize):
        T, E = logits.shape
        grad = torch.empty_like(logits)
        if grad_weights is not None and (grad_weights.shape != ids.shape or grad_weights.stride() != ids.stride()):
            raise ValueError(
                f"gate_route's backward: grad_weights expected ids' shape and strides {ids.stride()}, got {grad_weights.stride()}"
            )
        if T:
            _gating_backward_kernel[(triton.cdiv(T, tokens_per_program(E)),)](
                logits,
                grad_weights if grad_weights is not None else logits,
                logits,
                ids,
                grad,
                load,
                grad_aux if grad_aux is not None else logits,
                T,
                E,
                logits.stride(0),
                ids.stride(0),
                1.0 / max(T, 1),
                aux_coef,
                TOP_K=top_k,
                KP=pow2(top_k),
                SOFTMAX=score_func == "softmax",
                RENORM=renormalize,
                HAS_GW=grad_weights is not None,
                HAS_GP=grad_aux is not None,
                GP_FROM_AUX=grad_aux is not None,
                EP=pow2(E),
                BT=tokens_per_program(E),
            )
        return grad


topk_gating = functools.partial(recipe.topk_gating, TritonGating())


def topk_gating_backward(
    grad_weights: Optional[Tensor],
    grad_prob_mean: Optional[Tensor],
    logits: Tensor,
    ids: Tensor,
    score_func: str,
    renormalize: bool,
) -> Tensor:
    T, E = logits.shape
    top_k = ids.shape[1]
    grad = torch.empty_like(logits)
    if T:
        _gating_backward_kernel[(triton.cdiv(T, tokens_per_program(E)),)](
            logits,
            grad_weights if grad_weights is not None else logits,
            grad_prob_mean if grad_prob_mean is not None else logits,
            ids,
            grad,
            logits,
            logits,
            T,
            E,
            logits.stride(0),
            top_k,
            1.0 / max(T, 1),
            0.0,
            TOP_K=top_k,
            KP=pow2(top_k),
            SOFTMAX=score_func == "softmax",
            RENORM=renormalize,
            HAS_GW=grad_weights is not None,
            HAS_GP=grad_prob_mean is not None,
            GP_FROM_AUX=False,
            EP=pow2(E),
            BT=tokens_per_program(E),
        )
    return grad


def _example(dtype: torch.dtype) -> None:
    """Both score functions at GeoMoE's 23 experts, and the LLM routers (64, 128, 256 experts, top-8):
    the gating tile is sized from E. Float32 logits whatever the model's dtype."""
    T = 64
    for E, k, scores in ((23, 3, ("sigmoid", "softmax")), (64, 8, ("softmax",)), (128, 8, ("softmax",)), (256, 8, ("softmax",))):
        for score in scores:
            logits = torch.randn(T, E)
            bias = torch.zeros(E) if E == 23 else None
            _, ids, _, _ = topk_gating(logits, bias, k, score, True)
            topk_gating_backward(torch.randn(T, k), torch.randn(E), logits, ids, score, True)


kernel("topk_gating", lambda logits, top_k, **_: gating_reason(logits, top_k), _example)(topk_gating)
kernel("topk_gating_backward", lambda logits, ids, **_: gating_reason(logits, ids.shape[1]), _example)(topk_gating_backward)
