"""The recipes the kernel backends share, once: how an op runs on a backend's kernels (what to
allocate, which kernels in which order, how their partial results are reduced), and the launch
heuristics. Triton (triton/) and the CUDA core (cuda.py) provide only kernels, through the
protocols here; `grouped_gemm_ops`, `route`, `topk_gating`, `masked_depthwise_conv` and its
backward bind a backend's kernels into its op implementations.

Grouped GEMM: the row blocks are scheduled on the device: expert e gets ceil(count_e / block)
blocks, and the grid is the static bound ceil(M / block) + min(E, M), surplus blocks exiting at
once. No host sync. The reference's tiled grouped GEMM lays its tiles out by the same schedule."""

from __future__ import annotations

import functools
from typing import Any, Callable, Dict, Optional, Protocol, Tuple

import torch
from torch import Tensor

from .activations import out_features
from .reference import activations as _act_math

# The most experts each routing histogram takes: Triton's keeps a program's counts in registers, the
# CUDA core's in shared memory. MoEMLP reads them to decide whether its shared experts can ride the
# routed ones' launches (E + S experts must route on the same backends as E).
TRITON_ROUTE_MAX_EXPERTS = 256
CUDA_ROUTE_MAX_EXPERTS = 4096


class BlockSchedule:
    """For kernels that give each program `block` rows of one expert: expert e owns
    ceil(count_e / block) consecutive blocks, and the grid is the static bound
    ceil(M / block) + min(E, M) (at most min(E, M) experts have rows, each with at most one partial
    block), surplus blocks exiting at once. No host sync. Bounding by min(E, M) rather than E keeps
    decode-sized launches small: 8 routed rows over 128 experts make 9 row blocks, not 129. The
    tensors are built on first use, on the device, by a dozen small torch ops, for the reference's
    tiles: the GEMM kernels (Triton and the CUDA core) find their block from the offsets themselves
    and never ask for them (each op call would otherwise pay those launches' host time, measured at
    194 us on an H200 host against a 170 us GEMM)."""

    def __init__(self, offsets: Tensor, M: int, block: int):
        self.offsets, self.block = offsets, block
        self.experts = offsets.numel() - 1
        self.row_blocks = -(-M // block)  # no expert has more
        self.blocks = self.row_blocks + min(self.experts, max(M, 1))  # the static bound

    @functools.cached_property
    def per_expert(self) -> Tensor:
        """[E] blocks of each expert."""
        counts = self.offsets[1:] - self.offsets[:-1]
        return torch.div(counts + self.block - 1, self.block, rounding_mode="floor")

    @functools.cached_property
    def first_block(self) -> Tensor:
        """[E] index of each expert's first block."""
        return torch.cumsum(self.per_expert, 0) - self.per_expert

    @functools.cached_property
    def _expert_and_row0(self) -> Tuple[Tensor, Tensor]:
        E, cum = self.experts, torch.cumsum(self.per_expert, 0)
        b = torch.arange(self.blocks, device=self.offsets.device)
        e = torch.searchsorted(cum, b, right=True)
        ec = e.clamp_max(E - 1)
        row0 = self.offsets.index_select(0, ec) + (b - self.first_block.index_select(0, ec)) * self.block
        return torch.where(e < E, ec, torch.full_like(ec, -1)), row0

    @property
    def expert(self) -> Tensor:
        """[blocks] owning expert, -1 for the surplus blocks."""
        return self._expert_and_row0[0]

    @property
    def row0(self) -> Tensor:
        """[blocks] first row of each block."""
        return self._expert_and_row0[1]


H100_L2_BYTES = 50 * 1024 * 1024


def interleaves_experts(gathered: bool, weight_bytes: int, l2_bytes: int) -> bool:
    """Whether a row-block GEMM runs its experts' blocks interleaved (token order across experts)
    rather than one expert after another. Interleaving pays when A is gathered from the tokens: each
    token is read by top_k experts, and in expert order the tokens leave L2 between them once they
    outgrow it (65,536 tokens x d 768 bf16 is 100 MB; the gathered rows are 302 MB). It costs W:
    every expert's weights are in use at once, so it is chosen only when all of them take at most
    half the L2 (GeoMoE's 20 MB of up-projection weights; not an LLM's 805 MB, where expert order
    reads each expert's W once)."""
    return gathered and 2 * weight_bytes <= l2_bytes


@functools.lru_cache(maxsize=None)
def l2_bytes(device: torch.device) -> int:
    """The device's L2 cache (cached: the launch path asks on every call); an H100's where there is
    none (the interpreter, the emulated CUDA core), so the CPU runs take the GPU's launch order."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).L2_cache_size
    return H100_L2_BYTES


def interleave_rounds(gathered: bool, weight: Tensor, schedule: BlockSchedule) -> int:
    """The rounds of the interleaved row-block order for a launch over `schedule` (ceil(M / block):
    no expert has more blocks), or 0 for expert order (interleaves_experts)."""
    weight_bytes = weight.numel() * weight.element_size()
    if schedule.row_blocks == 0 or not interleaves_experts(gathered, weight_bytes, l2_bytes(weight.device)):
        return 0  # no rows: nothing to order (and an empty gather has no address for the CUDA core)
    return schedule.row_blocks


def block_schedule(offsets: Tensor, M: int, block: int) -> BlockSchedule:
    return BlockSchedule(offsets, M, block)


@functools.lru_cache(maxsize=None)
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def weight_grad_splits(device: torch.device, experts: int, k: int, n: int) -> int:
    """How many ways to split each expert's rows in the weight gradient: enough programs of 128 x 128
    tiles (the Triton kernel's first config) for about 2 waves of the device's SMs when the groups
    are small, at most 8 (each split adds an [E, K, N] float32 partial, where one split writes
    straight into the destination). One on a CPU (the interpreter, an emulation): nothing to fill;
    one at GeoMoE's shapes (24 experts x 6 x 5 tiles) and an LLM's on an H100 or H200."""
    if device.type != "cuda":
        return 1
    index = device.index if device.index is not None else torch.cuda.current_device()
    tiles = experts * -(-k // 128) * -(-n // 128)
    return max(1, min(8, (2 * _sm_count(index)) // max(1, tiles)))


# ---- grouped GEMM: grouped_mm and expert_mlp, forward and backward ------------------------------


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


class RoutesGradients(Protocol):
    """A backend whose down-projection dgrad and weight gradient read the combined tokens' gradient
    through the routing map (docs/host_path.md, step 5): no permuted, weighted copy of it."""

    def combine(self, rows: Tensor, flat_to_row: Tensor, top_k: int, weights: Tensor, shared: Optional[Tensor]) -> Tensor:
        """The backend's unpermute: shared + sum_j weights[t, j] rows[flat_to_row[t * k + j]]."""

    def dgrad_routed(
        self,
        grad: Tensor,
        weight: Tensor,
        bias: Optional[Tensor],
        offsets: Tensor,
        schedule: BlockSchedule,
        gather: Tensor,
        top_k: int,
        weights: Tensor,
        out: Tensor,
        grad_act: str,
        pre: Tensor,
        partial: Tensor,
    ) -> None:
        """Row r reads g = grad[gather[r] // top_k]: acc = g @ W[e]^T, out[r] = w * acc * act'(pre[r])
        (w = weights.view(-1)[gather[r]]; SwiGLU: both halves) and partial[gather[r], c] the sum of
        acc * act(pre) over hidden columns [C c, C c + C), C the backend's routing_chunk (16 unless
        it says: the CUDA core's 8), act(pre) rounded to the compute dtype as the forward's hidden
        rows were; its last column <g, bias[e]> (0 without bias): every element written, each a
        fixed-order sum (the consumer sums the columns in order). The W2 weight gradient: where the
        backend's wgrad_routes(dtype) says so its wgrad takes g_routing (G read through the map,
        weighted as it loads); otherwise G is its weighted_rows(grad, gather, top_k, weights)."""


ROUTING_CHUNK = 16  # hidden columns per partial of the routing weights' gradient (a backend's routing_chunk)


class WritesGradientsInPlace(Protocol):
    """A backend whose weight-gradient kernel also writes its sums straight into a destination of
    any float dtype and strides, or adds them to what is there (kernel_recipes.weight_grad's `out`)."""

    def wgrad_into(
        self,
        a: Tensor,
        grad: Tensor,
        offsets: Tensor,
        gather: Optional[Tensor],
        top_k: int,
        a_activation: str,
        dw: Tensor,
        db: Optional[Tensor],
        accumulate: bool,
    ) -> None:
        """dw [splits, E, K, N] and db [splits, E, N] (None: no bias gradient): the float32 sums
        converted once as they are stored, or added to what is there with accumulate."""


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
    out: Optional[Tuple[Tensor, Optional[Tensor]]] = None,
    accumulate: bool = False,
    g_routing: Optional[Tuple[Tensor, int, Tensor]] = None,
) -> Tuple[Tensor, Optional[Tensor]]:
    """(dW [E, K, N], db [E, N]) in float32; A = act(a) with a_activation; the splits summed in a
    fixed order (deterministic, no atomics), experts without rows exact zeros. out = (dW, db): the
    destinations instead (db None: no bias gradient; any float dtype, e.g. the parameters' .grad),
    the result added to what they hold with accumulate, and returned. A backend with wgrad_into and
    one split writes them directly (the float32 sums converted once, as they are stored); otherwise
    the float32 partials are summed, then copied or added. g_routing = (gather, top_k, weights)
    (a RoutesGradients backend): G's row r is weights.view(-1)[gather[r]] * grad[gather[r] // top_k],
    grad the combined tokens' gradient, formed as it loads."""
    E, K, N = offsets.numel() - 1, out_features(a_activation, a.shape[1]), grad.shape[1]
    splits = splits if splits is not None else weight_grad_splits(a.device, E, K, N)
    routed = {} if g_routing is None else {"g_routing": g_routing}
    if out is not None:
        dw_out, db_out = out
        if splits == 1 and hasattr(kernels, "wgrad_into"):
            kernels.wgrad_into(  # type: ignore[attr-defined]
                a, grad, offsets, gather, top_k, a_activation, dw_out[None], None if db_out is None else db_out[None], accumulate,
                **routed,
            )  # fmt: skip
            return dw_out, db_out
        dw, db = _summed_partials(kernels, a, grad, offsets, gather, top_k, a_activation, splits, E, K, N, routed)
        for dest, value in ((dw_out, dw), (db_out, db)):
            if dest is not None:
                dest.add_(value) if accumulate else dest.copy_(value)
        return dw_out, db_out
    return _summed_partials(kernels, a, grad, offsets, gather, top_k, a_activation, splits, E, K, N, routed)


def _summed_partials(
    kernels: GroupedGemmKernels, a: Tensor, grad: Tensor, offsets: Tensor, gather: Optional[Tensor], top_k: int,
    a_activation: str, splits: int, E: int, K: int, N: int, routed: Dict[str, Any],
) -> Tuple[Tensor, Tensor]:  # fmt: skip
    partial = torch.empty(splits, E, K, N, dtype=torch.float32, device=a.device)
    partial_db = torch.empty(splits, E, N, dtype=torch.float32, device=a.device)
    kernels.wgrad(a, grad, offsets, gather, top_k, a_activation, partial, partial_db, **routed)
    if splits == 1:
        return partial[0], partial_db[0]
    return partial.sum(0), partial_db.sum(0)


def _weight_grad_as(
    kernels: GroupedGemmKernels, like: Tensor, has_bias: bool, *args: Any, **kwargs: Any
) -> Tuple[Tensor, Optional[Tensor]]:
    """weight_grad in the dtype and (dense) layout of `like` (the weight, or the parameter it came from):
    written so by a backend with wgrad_into (no float32 result, cast or copy), else computed in
    float32 and converted (nothing to convert for a float32 parameter)."""
    if hasattr(kernels, "wgrad_into"):
        device = args[0].device  # `like` may be a meta tensor: its shape, strides and dtype only
        dw = torch.empty_strided(like.shape, like.stride(), dtype=like.dtype, device=device)
        db = torch.empty(like.shape[0], like.shape[2], dtype=like.dtype, device=device) if has_bias else None
        return weight_grad(kernels, *args, out=(dw, db), **kwargs)  # type: ignore[misc]
    dw, db = weight_grad(kernels, *args, **kwargs)
    return dw.to(like.dtype), (db.to(like.dtype) if has_bias and db is not None else None)


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
    dw, db = _weight_grad_as(kernels, weight, True, x, dpre, offsets, gather, top_k)
    return d_rows, dw, db  # type: ignore[return-value]


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
    flat_to_row: Optional[Tensor] = None,
    top_k: int = 1,
    weights: Optional[Tensor] = None,
    shared: Optional[Tensor] = None,
) -> Tuple[Tensor, Tensor]:
    """(rows_out, pre): the hidden rows live only between the two GEMMs, which share one schedule.
    With weights: rows_out combined into the tokens by the backend's unpermute (its `combine`)."""
    schedule = schedule_for(kernels, offsets, _rows(x, gather), x.dtype)
    hidden, pre = forward(kernels, x, w1, offsets, b1, activation, gather, top_k, schedule)
    out, _ = forward(kernels, hidden, w2, offsets, b2, "none", schedule=schedule)
    if weights is not None:
        out = kernels.combine(out, flat_to_row, top_k, weights, shared)  # type: ignore[attr-defined]
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
    weights: Optional[Tensor] = None,
    b2: Optional[Tensor] = None,
    grads_like: Optional[Tuple[Tensor, Tensor]] = None,
) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Four kernels: d pre = (G @ W2^T) * act'(pre) in one (no d hidden tensor, no separate pass);
    dW2, db2 from act(pre) formed in the load (no kept hidden rows); the row gradients; dW1, db1.
    The weight gradients come in w1's and w2's dtype, or in that and the layout of grads_like (the
    float32 parameters w1 and w2 were cast from: their gradients written straight in the
    parameters' dtype, never rounded to the compute dtype, cast or copied).

    With routing weights, grad_out is the combined tokens' gradient [T, D]: on a backend with
    dgrad_routed the down-projection's dgrad reads it through gather and forms the routing
    weights' gradient in its epilogue (partials over fixed column chunks, summed here in order),
    and dW2, db2 read it through gather too, weighted as they load (no permuted copy, no kept
    expert outputs); elsewhere the same arithmetic from torch ops around the plain dgrad."""
    like1, like2 = grads_like if grads_like is not None else (w1, w2)
    M = pre.shape[0]
    schedule = schedule_for(kernels, offsets, M, grad_out.dtype)
    d_weights = grad_out.new_empty(0)
    if weights is None:
        d_pre = dgrad(kernels, grad_out, w2, offsets, schedule, activation, pre)
        dw2, db2 = _weight_grad_as(kernels, like2, True, pre, grad_out, offsets, a_activation=activation)
    elif hasattr(kernels, "dgrad_routed"):
        assert gather is not None
        weights = weights.contiguous()  # read by flat index
        acc_dt = torch.promote_types(grad_out.dtype, torch.float32)
        chunks = -(-w2.shape[1] // getattr(kernels, "routing_chunk", ROUTING_CHUNK)) + 1
        partial = torch.empty(M, chunks, dtype=acc_dt, device=grad_out.device)
        d_pre = grad_out.new_empty(M, pre.shape[1])
        kernels.dgrad_routed(  # type: ignore[attr-defined]
            grad_out, w2, b2, offsets, schedule, gather, top_k, weights, d_pre, activation, pre, partial
        )
        d_weights = partial.view(-1, top_k, chunks).sum(-1)
        routes = getattr(kernels, "wgrad_routes", None)
        if routes is None or not routes(grad_out.dtype):  # G formed by a weighted permute first
            g = kernels.weighted_rows(grad_out, gather, top_k, weights)  # type: ignore[attr-defined]
            dw2, db2 = _weight_grad_as(kernels, like2, True, pre, g, offsets, a_activation=activation)
        else:
            dw2, db2 = _weight_grad_as(
                kernels, like2, True, pre, grad_out, offsets, a_activation=activation, g_routing=(gather, top_k, weights)
            )
    else:
        d_pre, dw2, db2, d_weights = _routed_down_backward(
            kernels, grad_out, w2, b2, offsets, schedule, gather, top_k, weights, activation, pre, like2
        )
    d_rows = dgrad(kernels, d_pre, w1, offsets, schedule)
    dw1, db1 = _weight_grad_as(kernels, like1, True, x, d_pre, offsets, gather, top_k)
    return d_rows, dw1, db1, dw2, db2, d_weights  # type: ignore[return-value]


def _routed_down_backward(
    kernels: GroupedGemmKernels, grad_out: Tensor, w2: Tensor, b2: Optional[Tensor], offsets: Tensor,
    schedule: BlockSchedule, gather: Optional[Tensor], top_k: int, weights: Tensor, activation: str, pre: Tensor, like2: Tensor,
) -> Tuple[Tensor, Tensor, Optional[Tensor], Tensor]:  # fmt: skip
    """(d pre, dW2, db2, d weights) for a backend without dgrad_routed: its plain dgrad on the
    gathered rows, the routing weight and its gradient applied by torch ops (the reference's
    arithmetic: reference/expert_mlp.routed_down_backward)."""
    assert gather is not None
    acc_dt = torch.promote_types(grad_out.dtype, torch.float32)
    g = grad_out.index_select(0, torch.div(gather, top_k, rounding_mode="floor"))
    w_rows = weights.reshape(-1).to(acc_dt).index_select(0, gather)
    acc = dgrad(kernels, g, w2, offsets, schedule).to(acc_dt)
    hidden = _act_math.apply(activation, pre).to(grad_out.dtype).to(acc_dt)
    row_grad = (acc * hidden).sum(1)
    if b2 is not None and g.shape[0]:
        rows = torch.arange(g.shape[0], device=g.device)
        row_expert = torch.searchsorted(offsets[1:].contiguous(), rows, right=True).clamp_max(offsets.numel() - 2)
        row_grad = row_grad + (g.to(acc_dt) * b2.index_select(0, row_expert).to(acc_dt)).sum(1)
    d_weights = torch.empty_like(row_grad).index_copy_(0, gather, row_grad).view(-1, top_k)
    d_pre = _act_math.backward(activation, (acc * w_rows[:, None]).to(grad_out.dtype), pre).contiguous()
    scaled = (g.to(acc_dt) * w_rows[:, None]).to(grad_out.dtype)
    dw2, db2 = _weight_grad_as(kernels, like2, True, pre, scaled, offsets, a_activation=activation)
    return d_pre, dw2, db2, d_weights


def grouped_gemm_ops(kernels: GroupedGemmKernels) -> Dict[str, Callable]:
    """The four ops the grouped-GEMM recipe runs, as a backend registers them."""
    return {
        fn.__name__: functools.partial(fn, kernels) for fn in (grouped_mm, grouped_mm_backward, expert_mlp, expert_mlp_backward)
    }


# ---- routing ------------------------------------------------------------------------------------


class RoutingKernels(Protocol):
    """A sort-free routing permutation: per-block expert histograms, then a stable scatter."""

    def block(self, num_experts: int) -> int:
        """Expert ids per program."""

    def histogram(self, flat_ids: Tensor, num_experts: int, block: int, per_block: Tensor) -> None:
        """per_block [blocks, E]: how many of each block's ids go to each expert."""

    def scatter(
        self, flat_ids: Tensor, num_experts: int, block: int, base: Tensor, row_to_flat: Tensor, flat_to_row: Tensor
    ) -> None:
        """Entry f of block b with expert e goes to row base[b, e] + (earlier entries of e in b)."""


def route(kernels: RoutingKernels, expert_ids: Tensor, num_experts: int) -> Tuple[Tensor, Tensor, Tensor]:
    flat = expert_ids.reshape(-1)
    n, E = flat.numel(), num_experts
    block = kernels.block(E)
    # the histogram writes every block's whole row: zeros only where no kernel runs (no ids)
    per_block = (torch.empty if n else torch.zeros)(max(1, -(-n // block)), E, dtype=torch.int64, device=flat.device)
    if n:
        kernels.histogram(flat, E, block, per_block)
    counts = per_block.sum(0)
    offsets = counts.new_empty(E + 1)
    offsets[:1].zero_()
    torch.cumsum(counts, 0, out=offsets[1:])  # [0, running sum]: no concatenation
    # block b's rows of expert e start after every earlier block's rows of e. The running sum is taken
    # along the fast axis of an [E, blocks] copy: torch's scan along dim 0 of [blocks, E] runs one
    # thread per column (measured 242 us at 47k ids on an H200; the inner-axis scan takes a few us)
    base = (offsets[:-1][None, :] + per_block.t().contiguous().cumsum(1).t() - per_block).contiguous()
    row_to_flat = torch.empty(n, dtype=torch.int64, device=flat.device)
    flat_to_row = torch.empty_like(row_to_flat)
    if n:
        kernels.scatter(flat, E, block, base, row_to_flat, flat_to_row)
    return row_to_flat, flat_to_row, offsets


# ---- gating -------------------------------------------------------------------------------------


class GatingKernels(Protocol):
    def tokens_per_block(self, num_experts: int) -> int: ...

    def gating(
        self,
        logits: Tensor,
        bias: Optional[Tensor],
        top_k: int,
        softmax: bool,
        renormalize: bool,
        weights: Tensor,
        ids: Tensor,
        counts: Tensor,
        partial: Tensor,
    ) -> None:
        """weights and ids [T, k], counts [E] (added to), and partial [blocks, E]: each block's sum
        of the normalised scores s / sum(s)."""


def topk_gating(
    kernels: GatingKernels, logits: Tensor, bias: Optional[Tensor], top_k: int, score_func: str, renormalize: bool
) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    T, E = logits.shape
    w = torch.empty(T, top_k, dtype=torch.float32, device=logits.device)
    ids = torch.empty(T, top_k, dtype=torch.int64, device=logits.device)
    counts = torch.zeros(E, dtype=torch.int64, device=logits.device)
    # the kernel writes every block's whole row of partial sums: zeros only where none runs (no tokens)
    partial = (torch.empty if T else torch.zeros)(
        max(1, -(-T // kernels.tokens_per_block(E))), E, dtype=torch.float32, device=logits.device
    )
    if T:
        kernels.gating(logits, bias, top_k, score_func == "softmax", renormalize, w, ids, counts, partial)
    return w, ids, counts, partial.sum(0) / max(T, 1)  # the blocks summed in order: deterministic


class GateRouteKernels(Protocol):
    """Gating and routing as two launches, for the MoE layer's plan (nn/_layer_plan.py): the gating
    kernel also writes the expert histogram of each block of its tokens and, in its last block,
    reduces in a fixed order (load, prob_mean, the aux loss, the offsets and each block's starts);
    the scatter places each gating block's entries from those."""

    def tokens_per_block(self, num_experts: int, slots: int) -> int: ...

    def gate(
        self,
        logits: Tensor,
        bias: Optional[Tensor],
        top_k: int,
        shared: int,
        softmax: bool,
        renormalize: bool,
        aux_coef: Optional[float],
        ticket: Tensor,
        out: Dict[str, Tensor],
    ) -> None:
        """Writes out's weights, ids [T, k + S], hist [blocks, E + S] (then each block's exclusive
        running count per expert), partial [blocks, E], load, prob_mean [E], offsets [E + S + 1]
        and, with aux_coef, aux []. ticket: an int32 counter that is 0 before and after."""

    def scatter(self, ids: Tensor, num_experts: int, tokens_per_block: int, out: Dict[str, Tensor]) -> None:
        """Writes out's row_to_flat and flat_to_row from its hist and offsets."""

    def gating_backward(
        self,
        grad_weights: Optional[Tensor],
        logits: Tensor,
        ids: Tensor,
        top_k: int,
        load: Tensor,
        grad_aux: Tensor,
        aux_coef: float,
        score_func: str,
        renormalize: bool,
    ) -> Tensor:
        """d logits from the first top_k columns of grad_weights and ids (rows of any width) and
        the aux loss's gradient (d prob_mean_e = grad_aux * load_e * aux_coef)."""


def gate_route(
    kernels: GateRouteKernels,
    logits: Tensor,
    bias: Optional[Tensor],
    top_k: int,
    shared: int,
    score_func: str,
    renormalize: bool,
    aux_coef: Optional[float],
    ticket: Tensor,
) -> Dict[str, Tensor]:
    """topk_gating's and route's outputs in two launches: weights and ids [T, k + S] (each token's k
    routed experts, then E..E+S-1 at weight 1), load and prob_mean [E], aux [] (with aux_coef:
    sum_e prob_mean_e * load_e * aux_coef), row_to_flat, flat_to_row [T * (k + S)], offsets."""
    T, E = logits.shape
    K, EA = top_k + shared, E + shared
    dev = logits.device
    out = dict(
        weights=torch.empty(T, K, dtype=torch.float32, device=dev),
        ids=torch.empty(T, K, dtype=torch.int64, device=dev),
        row_to_flat=torch.empty(T * K, dtype=torch.int64, device=dev),
        flat_to_row=torch.empty(T * K, dtype=torch.int64, device=dev),
    )
    if T == 0:  # no kernel runs: the reductions of nothing
        out.update(
            load=torch.zeros(E, dtype=torch.int64, device=dev),
            prob_mean=torch.zeros(E, dtype=torch.float32, device=dev),
            offsets=torch.zeros(EA + 1, dtype=torch.int64, device=dev),
        )
        if aux_coef is not None:
            out["aux"] = torch.zeros((), dtype=torch.float32, device=dev)
        return out
    block = kernels.tokens_per_block(E, K)
    blocks = -(-T // block)
    out.update(
        hist=torch.empty(blocks, EA, dtype=torch.int64, device=dev),
        partial=torch.empty(blocks, E, dtype=torch.float32, device=dev),
        load=torch.empty(E, dtype=torch.int64, device=dev),
        prob_mean=torch.empty(E, dtype=torch.float32, device=dev),
        offsets=torch.empty(EA + 1, dtype=torch.int64, device=dev),
    )
    if aux_coef is not None:
        out["aux"] = torch.empty((), dtype=torch.float32, device=dev)
    try:
        kernels.gate(logits, bias, top_k, shared, score_func == "softmax", renormalize, aux_coef, ticket, out)
    except BaseException:
        # a launch cut short can leave the ticket counted part-way; every later launch would then
        # elect its last block early: put it back (where the device can still run anything)
        ticket.zero_()
        raise
    kernels.scatter(out["ids"], EA, block, out)
    return out


# ---- masked depthwise conv ----------------------------------------------------------------------


class DepthwiseConvKernels(Protocol):
    def wgrad_rows_per_block(self) -> int: ...

    def conv(self, x: Tensor, neighbors: Tensor, weight: Tensor, bias: Optional[Tensor], flip: bool, out: Tensor) -> None:
        """out = the conv of x's rows through the neighbour table; flip reads the kernel reversed."""

    def wgrad(self, x: Tensor, grad_out: Tensor, neighbors: Tensor, dw_partial: Tensor, db_partial: Tensor) -> None:
        """dw_partial [blocks, C, kk] and db_partial [blocks, C]: each run of wgrad_rows_per_block()
        rows' sums, every element written (the partials come uninitialised)."""


def masked_depthwise_conv(
    kernels: DepthwiseConvKernels, x: Tensor, neighbors: Tensor, weight: Tensor, bias: Optional[Tensor], flip: bool = False
) -> Tensor:
    out = torch.empty_like(x)
    if x.shape[0]:
        kernels.conv(x, neighbors, weight, bias, flip, out)
    return out


def masked_depthwise_conv_backward(
    kernels: DepthwiseConvKernels, grad_out: Tensor, x: Tensor, neighbors: Tensor, weight: Tensor
) -> Tuple[Tensor, Tensor, Tensor]:
    """dx is the conv of the gradient with the kernel flipped (the neighbour table is symmetric: see
    the reference); dweight and dbias are per-row-block partial sums reduced in a fixed order."""
    R, C = x.shape
    dx = masked_depthwise_conv(kernels, grad_out, neighbors, weight, None, flip=True)
    blocks = max(1, -(-R // kernels.wgrad_rows_per_block()))
    # both backends write every partial they are given: zeros (a fill the sum re-reads) only where
    # no kernel runs
    alloc = torch.empty if R else torch.zeros
    dw = alloc(blocks, C, neighbors.shape[1], dtype=torch.float32, device=x.device)
    db = alloc(blocks, C, dtype=torch.float32, device=x.device)
    if R:
        kernels.wgrad(x, grad_out, neighbors, dw, db)
    return dx, dw.sum(0).to(weight.dtype), db.sum(0).to(weight.dtype)
