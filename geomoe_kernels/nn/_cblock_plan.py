"""SparseCBlock's eager path on visible rows: one autograd.Function per block over a cached plan
(issue 28, item 6: the sparse front end was host-bound the way the MoE layer was).

Through the ops, a block's forward on rows is norm_linear (LN1 + conv1), masked_depthwise_conv, a
linear (conv2) and the residual add, norm_linear (LN2 + fc1 + GELU), a linear (fc2) and the add;
autocast casts each weight and bias on the way. Each of the three torch.library calls binds and
checks its arguments, looks its backend up and runs through the custom-op dispatcher and
torch._library.autograd, forward and backward: six custom-op dispatches and about 40 autograd nodes
a block. `run` does the same work in one `CBlockFunction`: its forward and backward call the very
implementations the ops would call (backend.select's choice for the same arguments) and the same
torch ops autograd would run for the linears, the casts and the adds, in the same order, so the
output and every gradient are the same bits (tests/test_cblock_plan.py).

A `BlockPlan` is made on the first call of a key (the backends, the dtypes, each input's shape,
dtype and device) and kept in backend.PLANS, which backend.forget() and every (re)registration
empty: the ops' metadata checks and backend.select (support checks, the self-check verdict) run on
its first call, once per piece. Later calls are a dict lookup and the implementations. The
neighbour table's value check (entries in range, the table symmetric) runs where the op's runs (CPU
tensors by default, see _checks). No host sync, no environment read.

What a block keeps for backward, as on the op path: the input rows, the normalised-conv output h1
(the depthwise conv's input), the depthwise output h2 (conv2's input), the rows after the first
residual, fc1's pre-activation and GELU output, the two LayerNorms' mean and rstd [R] and the
weights in the compute dtype. The neighbour table is the stage's, shared by its blocks."""

from __future__ import annotations

from typing import Any, Callable, Dict, Hashable, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable

from .. import _checks
from .. import backend as _backend
from ..ops._declare import Op
from ..ops.norm_linear import norm_linear_backward, norm_linear_op
from ..ops.sparse_conv import masked_depthwise_conv_backward, masked_depthwise_conv_op

_MAX_PLANS = 1024
plans_built = 0  # how many plans have been made (tests: a plan is made once per key)


class BlockPlan:
    """The chosen implementations of one key's pieces (plain callables), filled in on first use."""

    def __init__(self, backend: str, norm_backend: str, dtype: torch.dtype, eps1: float, eps2: float):
        self.backend, self.norm_backend, self.dtype, self.eps1, self.eps2 = backend, norm_backend, dtype, eps1, eps2
        self.impls: Dict[Hashable, Callable] = {}

    def impl(self, piece: Hashable, op: Op, backend: str, named: Dict[str, Any]) -> Callable:
        f = self.impls.get(piece)
        if f is None:
            op._check(**named)
            device = next(v.device for v in named.values() if isinstance(v, Tensor))
            f = _backend.select(op.name, backend, device, {n: named[n] for n in op._impl_names})
            if _backend.choices_final():  # a provisional choice (a check running, a capture) is not kept
                self.impls[piece] = f
        return f


def _sig(t: Optional[Tensor]) -> Optional[Tuple]:
    return None if t is None else (t.shape, t.dtype, t.device)


def compute_dtype(x: Tensor) -> torch.dtype:
    dev = x.device.type
    return torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else x.dtype


def run(block, x: Tensor, neighbors: Tensor) -> Tensor:
    """block.forward_rows(x, neighbors) as one CBlockFunction (block: a SparseCBlock)."""
    global plans_built
    dtype = compute_dtype(x)
    params = (
        block.norm1.weight, block.norm1.bias, block.conv1.weight, block.conv1.bias, block.attn.weight, block.attn.bias,
        block.conv2.weight, block.conv2.bias, block.norm2.weight, block.norm2.bias, block.mlp.fc1.weight, block.mlp.fc1.bias,
        block.mlp.fc2.weight, block.mlp.fc2.bias,
    )  # fmt: skip
    norm_backend = "torch" if block.backend == "cuda" else block.backend
    key = ("cblock", block.backend, dtype, block.norm1.eps, block.norm2.eps, _sig(x), _sig(neighbors), *map(_sig, params))
    plan = _backend.PLANS.get(key)
    fresh = plan is None
    if plan is None:
        plan = BlockPlan(block.backend, norm_backend, dtype, block.norm1.eps, block.norm2.eps)
    out = CBlockFunction.apply(plan, x.contiguous(), neighbors.contiguous(), *params)
    if fresh and _backend.choices_final():
        if len(_backend.PLANS) >= _MAX_PLANS:
            _backend.PLANS.clear()
        _backend.PLANS[key] = plan
        plans_built += 1
    return out


def _one_buffer(ts: Sequence[Tensor], dtype: torch.dtype) -> Optional[List[Tensor]]:
    """ts converted to dtype through one flat buffer, as views of their shapes: one cat and one cast
    (two kernels where a cast a tensor is one each; the same rounding). Not a cat into a buffer of
    the other dtype: CUDA's cat copies input by input unless every input has the output's dtype.
    None where they cannot share one buffer (devices or dtypes apart)."""
    if len({(t.device, t.dtype) for t in ts}) != 1:
        return None
    flat = torch.cat([t.reshape(-1) for t in ts]).to(dtype)
    return [v.view(t.shape) for v, t in zip(flat.split([t.numel() for t in ts]), ts)]


def _flat(w: Optional[Tensor]) -> Tensor:
    assert w is not None
    return w.flatten(1)


def _cast_all(params: Sequence[Optional[Tensor]], dtype: torch.dtype) -> List[Optional[Tensor]]:
    """The block's weights and biases in the compute dtype (autocast's casts, in one kernel)."""
    present = [t for t in params if t is not None]
    if all(t.dtype == dtype for t in present):
        return list(params)
    cast = _one_buffer(present, dtype) or [t.to(dtype) for t in present]
    it = iter(cast)
    return [None if t is None else next(it) for t in params]


def _uncast_all(grads: Sequence[Optional[Tensor]], params: Sequence[Optional[Tensor]]) -> List[Optional[Tensor]]:
    """Gradients computed for the cast copies, in the parameters' dtypes and shapes (autograd's cast
    and view backward, the casts in one kernel): views of one buffer, which autograd hands to .grad."""
    pairs = [(g, p) for g, p in zip(grads, params) if g is not None and p is not None]
    if all(g.dtype == p.dtype for g, p in pairs):
        return [None if g is None or p is None else g.view(p.shape) for g, p in zip(grads, params)]
    gs = [g.reshape(p.shape) for g, p in pairs]
    back = _one_buffer(gs, pairs[0][1].dtype) if len({p.dtype for _, p in pairs}) == 1 else None
    back = back or [g.to(p.dtype) for g, (_, p) in zip(gs, pairs)]
    it = iter(back)
    return [None if g is None or p is None else next(it) for g, p in zip(grads, params)]


def _linear_backward(g: Tensor, inp: Tensor, w: Tensor, has_bias: bool) -> Tuple[Tensor, Tensor, Optional[Tensor]]:
    """addmm's backward as autograd runs it for F.linear on rows (mm_mat1_backward, mm_mat2_backward
    on the transposed weight, the bias's broadcast summed away): (d input, d weight, d bias)."""
    return g.mm(w), g.t().mm(inp), g.sum(0) if has_bias else None


class CBlockFunction(torch.autograd.Function):
    """norm_linear -> masked_depthwise_conv -> linear + residual -> norm_linear (GELU) -> linear +
    residual, and their backwards in reverse, on a plan."""

    @staticmethod
    def forward(ctx, plan: BlockPlan, x, nbr, n1w, n1b, c1w, c1b, aw, ab, c2w, c2b, n2w, n2b, f1w, f1b, f2w, f2b):  # type: ignore[override]
        p, dt = plan, plan.dtype
        dev = x.device.type
        autocast = torch.is_autocast_enabled(dev)  # off around the implementations, as the ops do it
        if autocast:
            torch.set_autocast_enabled(dev, False)
        try:
            c1w_, c1b_, aw_, ab_, c2w_, c2b_, f1w_, f1b_, f2w_, f2b_ = _cast_all(
                (c1w, c1b, aw, ab, c2w, c2b, f1w, f1b, f2w, f2b), dt
            )
            c1w_, aw_, c2w_, f1w_, f2w_ = (_flat(w) for w in (c1w_, aw_, c2w_, f1w_, f2w_))  # the weights are never None
            impls = p.impls
            nl1 = impls.get("norm1") or p.impl(
                "norm1", norm_linear_op, p.norm_backend,
                dict(x=x, norm_weight=n1w, norm_bias=n1b, weight=c1w_, bias=c1b_, activation="none", eps=p.eps1),
            )  # fmt: skip
            h1, _, m1, r1 = nl1(x, n1w, n1b, c1w_, c1b_, "none", p.eps1)
            named = None
            if _checks.value_checks_enabled(nbr):
                named = dict(x=h1, neighbors=nbr, weight=aw_, bias=ab_)
                masked_depthwise_conv_op._value_checks(**named)  # type: ignore[misc]
            conv = impls.get("conv") or p.impl(
                "conv", masked_depthwise_conv_op, p.backend, named or dict(x=h1, neighbors=nbr, weight=aw_, bias=ab_)
            )
            h2 = conv(h1, nbr, aw_, ab_)
            x1 = x + F.linear(h2, c2w_, c2b_)
            nl2 = impls.get("norm2") or p.impl(
                "norm2", norm_linear_op, p.norm_backend,
                dict(x=x1, norm_weight=n2w, norm_bias=n2b, weight=f1w_, bias=f1b_, activation="gelu", eps=p.eps2),
            )  # fmt: skip
            h3, pre3, m3, r3 = nl2(x1, n2w, n2b, f1w_, f1b_, "gelu", p.eps2)
            out = x1 + F.linear(h3, f2w_, f2b_)
        finally:
            if autocast:
                torch.set_autocast_enabled(dev, True)
        ctx.plan = p
        ctx.residual_dtypes = (h2.dtype, h3.dtype)  # the linears' outputs' (their gradients are cast to it)
        ctx.save_for_backward(
            x, nbr, h1, h2, x1, h3, pre3, m1, r1, m3, r3, n1w, n1b, c1w_, c1b, aw_, ab, c2w_, c2b, n2w, n2b, f1w_, f1b,
            f2w_, f2b, c1w, aw, c2w, f1w, f2w,
        )  # fmt: skip
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, g):  # type: ignore[override]
        p: BlockPlan = ctx.plan
        (x, nbr, h1, h2, x1, h3, pre3, m1, r1, m3, r3, n1w, n1b, c1w_, c1b, aw_, ab, c2w_, c2b, n2w, n2b, f1w_, f1b,
         f2w_, f2b, c1w, aw, c2w, f1w, f2w) = ctx.saved_tensors  # fmt: skip
        dt2, dt4 = ctx.residual_dtypes
        dev = x.device.type
        autocast = torch.is_autocast_enabled(dev)
        if autocast:
            torch.set_autocast_enabled(dev, False)
        try:
            impls = p.impls
            # out (g as autograd hands it to the add, an expanded one included: the linear's
            # backward reads it in place, as on the ops' path) = x1 + fc2(h3): the add's gradient to the linear in its dtype, then addmm's backward
            g4 = g.to(dt4)
            dh3, df2w, df2b = _linear_backward(g4, h3, f2w_, f2b is not None)
            dh3 = dh3.contiguous()
            nl2_back = impls.get("norm2_backward") or p.impl(
                "norm2_backward", norm_linear_backward, p.norm_backend,
                dict(grad_out=dh3, x=x1, norm_weight=n2w, norm_bias=n2b, weight=f1w_, pre=pre3, mean=m3, rstd=r3,
                     activation="gelu", eps=p.eps2),
            )  # fmt: skip
            dx1, dn2w, dn2b, df1w, df1b = nl2_back(dh3, x1, n2w, n2b, f1w_, pre3, m3, r3, "gelu", p.eps2)
            g1 = g + dx1  # x1's two uses, summed as autograd sums them
            g2 = g1.to(dt2)
            dh2, dc2w, dc2b = _linear_backward(g2, h2, c2w_, c2b is not None)
            dh2 = dh2.contiguous()
            conv_back = impls.get("conv_backward") or p.impl(
                "conv_backward", masked_depthwise_conv_backward, p.backend, dict(grad_out=dh2, x=h1, neighbors=nbr, weight=aw_)
            )
            dh1, daw, dab = conv_back(dh2, h1, nbr, aw_)
            dh1 = dh1.contiguous()
            empty = h1.new_empty(0)
            nl1_back = impls.get("norm1_backward") or p.impl(
                "norm1_backward", norm_linear_backward, p.norm_backend,
                dict(grad_out=dh1, x=x, norm_weight=n1w, norm_bias=n1b, weight=c1w_, pre=empty, mean=m1, rstd=r1,
                     activation="none", eps=p.eps1),
            )  # fmt: skip
            dx0, dn1w, dn1b, dc1w, dc1b = nl1_back(dh1, x, n1w, n1b, c1w_, empty, m1, r1, "none", p.eps1)
            dx = g1 + dx0
        finally:
            if autocast:
                torch.set_autocast_enabled(dev, True)
        dc1w, dc1b, daw, dab, dc2w, dc2b, df1w, df1b, df2w, df2b = _uncast_all(
            (dc1w, dc1b, daw, dab, dc2w, dc2b, df1w, df1b, df2w, df2b), (c1w, c1b, aw, ab, c2w, c2b, f1w, f1b, f2w, f2b)
        )
        return None, dx, None, dn1w, dn1b, dc1w, dc1b, daw, dab, dc2w, dc2b, dn2w, dn2b, df1w, df1b, df2w, df2b
