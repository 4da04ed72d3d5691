"""Expert activations and their derivatives, called directly so backward never re-enters autograd."""

from typing import Optional

import torch

from ..activations import ACTIVATIONS, out_features  # noqa: F401  (the names and shapes live there)


def apply(activation: str, pre: torch.Tensor) -> torch.Tensor:
    if activation == "none":
        return pre
    if activation == "gelu":
        return torch.nn.functional.gelu(pre)
    if activation == "silu":
        return torch.nn.functional.silu(pre)
    if activation == "swiglu":  # columns [gate | up]
        gate, up = pre.chunk(2, dim=-1)
        return torch.nn.functional.silu(gate) * up
    if activation == "swiglu_interleaved":  # columns [g0, u0, g1, u1, ...]
        return torch.nn.functional.silu(pre[..., 0::2]) * pre[..., 1::2]
    raise ValueError(f"unknown activation {activation!r}")


def _dsilu(x: torch.Tensor) -> torch.Tensor:
    s = torch.sigmoid(x)
    return s * (1 + x * (1 - s))


def backward(activation: str, grad: torch.Tensor, pre: Optional[torch.Tensor]) -> torch.Tensor:
    """d loss / d pre, given d loss / d out; computed in pre's dtype promoted to at least float32."""
    if activation == "none":
        return grad
    assert pre is not None, "an activation's backward reads its pre-activation"
    if activation in ("gelu", "silu"):  # torch's fused kernels: one pass, float32 math for half inputs
        fused = torch.ops.aten.gelu_backward if activation == "gelu" else torch.ops.aten.silu_backward
        return fused(grad.to(pre.dtype), pre)
    acc = torch.promote_types(pre.dtype, torch.float32)
    g, x = grad.to(acc), pre.to(acc)
    if activation == "swiglu":
        gate, up = x.chunk(2, dim=-1)
        out = torch.cat([g * up * _dsilu(gate), g * torch.nn.functional.silu(gate)], dim=-1)
    elif activation == "swiglu_interleaved":  # d gate, d up back in their pairs
        gate, up = x[..., 0::2], x[..., 1::2]
        out = torch.stack([g * up * _dsilu(gate), g * torch.nn.functional.silu(gate)], dim=-1).flatten(-2)
    else:
        raise ValueError(f"unknown activation {activation!r}")
    return out.to(pre.dtype)
