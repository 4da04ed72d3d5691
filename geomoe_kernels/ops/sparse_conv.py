"""Masked sparse (submanifold) depthwise k x k convolution on the compact visible layout
(geomoe_kernels.layout): rows [R, C], neighbour table [R, k*k] (-1 = masked or outside, read as
zero), weight [C, k*k] (a depthwise Conv2d weight [C, 1, k, k] flattened), bias [C]."""

from typing import Optional, Tuple

import torch
from torch import Tensor

from .._checks import FLOAT_DTYPES, INDEX_DTYPES, OpInputError, check_same_dtype, check_tensor, value_checks_enabled
from ..reference import sparse_conv as _ref
from .. import layout
from . import _case
from ._declare import Verification, contiguous, declare


def _verify(c, be, dev, dt):
    nbr = layout.neighbor_table(c["kept"].to(dev), (4, 4), 2, 5)
    x, w, b = _case.leaves(c, ["conv_x", "conv_w", "conv_b"], dev, dt)
    y = masked_depthwise_conv(x, nbr, w, b, backend=be)
    return [y, *_case.grads([y], [c["g_conv"]], [x, w, b])], []


@declare(reference=_ref.masked_depthwise_conv, fake=lambda x, **_: torch.empty_like(x), verification=Verification(_verify))
def masked_depthwise_conv_op(x: Tensor, neighbors: Tensor, weight: Tensor, bias: Optional[Tensor]) -> Tensor:
    op = "masked_depthwise_conv"
    check_tensor(op, "x", x, dtypes=FLOAT_DTYPES, dim=2)
    R, C = x.shape
    check_tensor(op, "neighbors", neighbors, dtypes=INDEX_DTYPES, dim=2, device=x.device)
    kk = neighbors.shape[1]
    k = int(round(kk**0.5))
    if neighbors.shape[0] != R or k * k != kk or k % 2 == 0:
        raise OpInputError(
            f"{op}: argument 'neighbors' expected shape [{R}, k*k] with k odd (one row per row of x), got {list(neighbors.shape)}"
        )
    check_tensor(op, "weight", weight, shape=(C, kk), device=x.device)
    check_tensor(op, "bias", bias, shape=(C,), device=x.device, optional=True)
    check_same_dtype(op, ["x", "weight", "bias"], [x, weight, bias])


@masked_depthwise_conv_op.value_checks
def _(neighbors, **_):
    """Entries in [-1, R), and the table symmetric (backward relies on it: see the reference)."""
    if not value_checks_enabled(neighbors) or neighbors.numel() == 0:
        return
    R, kk = neighbors.shape
    lo, hi = int(neighbors.min()), int(neighbors.max())
    if lo < -1 or hi >= R:
        raise OpInputError(
            f"masked_depthwise_conv: argument 'neighbors' expected values in [-1, {R - 1}], got values in [{lo}, {hi}]"
        )
    valid = neighbors >= 0
    rows = torch.arange(R, device=neighbors.device)[:, None].expand(R, kk)
    # tap kk-1-j of the neighbour q = neighbors[r, j] must point back at r
    mirrored = neighbors.flip(1)[neighbors.clamp_min(0), torch.arange(kk, device=neighbors.device)]
    if bool((valid & (mirrored != rows)).any()):
        raise OpInputError(
            "masked_depthwise_conv: argument 'neighbors' expected a symmetric submanifold table "
            "(neighbors[r, j] = q implies neighbors[q, k*k-1-j] = r), as layout.neighbor_table builds; got one that is not"
        )


@declare(
    reference=_ref.masked_depthwise_conv_backward,
    backward_of="masked_depthwise_conv",
    fake=lambda x, weight, **_: (torch.empty_like(x), torch.empty_like(weight), weight.new_empty(weight.shape[0])),
)
def masked_depthwise_conv_backward(
    grad_out: Tensor, x: Tensor, neighbors: Tensor, weight: Tensor
) -> Tuple[Tensor, Tensor, Tensor]:
    """(dx, dweight, dbias)."""


def _setup_context(ctx, args, output):
    ctx.save_for_backward(args["x"], args["neighbors"], args["weight"])
    ctx.config = (args["backend"], args["bias"] is not None)


def _backward(ctx, grad_out):
    x, neighbors, weight = ctx.saved_tensors
    backend, has_bias = ctx.config
    dx, dw, db = masked_depthwise_conv_backward(grad_out.contiguous(), x, neighbors, weight, backend)
    return {"x": dx, "weight": dw, "bias": db} if has_bias else {"x": dx, "weight": dw}


masked_depthwise_conv_op.register_autograd(_setup_context, _backward)


def masked_depthwise_conv(
    x: Tensor, neighbors: Tensor, weight: Tensor, bias: Optional[Tensor] = None, backend: str = "auto"
) -> Tensor:
    """Depthwise conv at visible rows only; weight [C, k*k] or a Conv2d weight [C, 1, k, k]."""
    if weight.dim() == 4:
        weight = weight.reshape(weight.shape[0], -1)
    return masked_depthwise_conv_op(x.contiguous(), neighbors.contiguous(), weight.contiguous(), contiguous(bias), backend)
