"""MoEMLP: a drop-in mixture-of-experts MLP on the geomoe ops.

Defaults follow GeoMoE: 23 routed experts and 1 shared, top-3, sigmoid scores with a bias buffer
used only for selection, renormalised weights, GELU experts of hidden int(0.75 * dim). Also Mixtral
style (softmax, SwiGLU, no shared) and DeepSeek style (sigmoid + bias, shared experts, SwiGLU).

forward(x [..., dim]) -> (y [..., dim], aux, load [E]):
    aux = sum_i P_i * F_i, P_i = mean_t s_ti / sum_j s_tj (carries gradient),
    F_i = E * load_i / (k * T) (does not).
update_bias(load, rate) is the bias-based load balancing rule, applied after an optimizer step."""

from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
from torch import Tensor, nn

from .. import backend as _backend
from ..ops import SCORE_FUNCS, expert_mlp, route, topk_gating, unpermute
from ..reference import activations

EXPERT_ACTIVATIONS = ("gelu", "silu", "swiglu")


class MoEMLP(nn.Module):
    expert_bias: Tensor  # a buffer
    # None without shared experts, and then never read
    shared_w1: Tensor
    shared_b1: Tensor
    shared_w2: Tensor
    shared_b2: Tensor

    def __init__(
        self,
        dim: int,
        hidden_dim: Optional[int] = None,
        num_experts: int = 23,
        num_shared_experts: int = 1,
        top_k: int = 3,
        score_func: str = "sigmoid",
        renormalize: bool = True,
        activation: str = "gelu",
        backend: str = "auto",
    ):
        super().__init__()
        if score_func not in SCORE_FUNCS:
            raise ValueError(f"MoEMLP: argument 'score_func' expected one of {list(SCORE_FUNCS)}, got {score_func!r}")
        if activation not in EXPERT_ACTIVATIONS:
            raise ValueError(f"MoEMLP: argument 'activation' expected one of {list(EXPERT_ACTIVATIONS)}, got {activation!r}")
        if not 1 <= top_k <= num_experts:
            raise ValueError(f"MoEMLP: argument 'top_k' expected 1 <= top_k <= num_experts = {num_experts}, got {top_k}")
        hidden = hidden_dim if hidden_dim is not None else int(0.75 * dim)
        if dim < 1 or hidden < 1:
            default = " (the default, int(0.75 * dim))" if hidden_dim is None else ""
            raise ValueError(
                f"MoEMLP: arguments 'dim' and 'hidden_dim' expected >= 1, got dim = {dim}, hidden_dim = {hidden}{default}"
            )
        if num_shared_experts < 0:
            raise ValueError(f"MoEMLP: argument 'num_shared_experts' expected >= 0, got {num_shared_experts}")
        _backend.check_backend_name(backend)
        self.dim = dim
        self.hidden_dim = hidden_dim if hidden_dim is not None else int(0.75 * dim)
        self.num_experts = num_experts
        self.num_shared_experts = num_shared_experts
        self.top_k = top_k
        self.score_func = score_func
        self.renormalize = renormalize
        self.activation = activation
        self.backend = backend
        # SwiGLU's first projection holds [gate | up] side by side.
        up = 2 * self.hidden_dim if activation == "swiglu" else self.hidden_dim
        self.gate = nn.Linear(dim, num_experts)
        self.register_buffer("expert_bias", torch.zeros(num_experts))
        # Stacked [E, in, out] for the grouped GEMM (x @ w), not nn.Linear's [out, in].
        self.w1 = nn.Parameter(torch.empty(num_experts, dim, up))
        self.b1 = nn.Parameter(torch.empty(num_experts, up))
        self.w2 = nn.Parameter(torch.empty(num_experts, self.hidden_dim, dim))
        self.b2 = nn.Parameter(torch.empty(num_experts, dim))
        S = num_shared_experts
        shapes = {"shared_w1": (S, dim, up), "shared_b1": (S, up), "shared_w2": (S, self.hidden_dim, dim), "shared_b2": (S, dim)}
        for name, shape in shapes.items():
            self.register_parameter(name, nn.Parameter(torch.empty(shape)) if S else None)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Xavier-uniform weights and zero biases, per expert, as MAE-style initialisation gives nn.Linear."""
        for w in (self.w1, self.w2, self.shared_w1, self.shared_w2, self.gate.weight):
            if w is not None:
                bound = math.sqrt(6.0 / (w.shape[-2] + w.shape[-1]))
                nn.init.uniform_(w, -bound, bound)
        for b in (self.b1, self.b2, self.shared_b1, self.shared_b2, self.gate.bias):
            if b is not None:
                nn.init.zeros_(b)

    def extra_repr(self) -> str:
        return (
            f"dim={self.dim}, hidden_dim={self.hidden_dim}, experts={self.num_experts}, shared={self.num_shared_experts}, "
            f"top_k={self.top_k}, score={self.score_func}, activation={self.activation}, backend={self.backend!r}"
        )

    def _compute_dtype(self, x: Tensor) -> torch.dtype:
        if torch.is_autocast_enabled(x.device.type):
            return torch.get_autocast_dtype(x.device.type)
        return x.dtype

    def _shared(self, x: Tensor, dtype: torch.dtype) -> Optional[Tensor]:
        """Sum of the shared experts (weight 1 each), as batched matmuls over the S experts so that
        every weight gradient comes out contiguous (what DDP's buckets expect)."""
        S = self.num_shared_experts
        if S == 0:
            return None
        T = x.shape[0]
        h = torch.baddbmm(self.shared_b1.to(dtype)[:, None, :], x.expand(S, T, self.dim), self.shared_w1.to(dtype))
        h = activations.apply(self.activation, h)
        y = torch.baddbmm(self.shared_b2.to(dtype)[:, None, :], h, self.shared_w2.to(dtype))
        return y[0] if S == 1 else y.sum(0)

    def _tokens(self, x: Tensor) -> Tuple[Tensor, torch.dtype]:
        if x.shape[-1] != self.dim:
            raise ValueError(f"MoEMLP: argument 'x' expected last dimension {self.dim}, got shape {list(x.shape)}")
        dtype = self._compute_dtype(x)
        return x.reshape(-1, self.dim).to(dtype), dtype

    def _gate(self, tokens: Tensor, x_dtype: torch.dtype):
        """(weights, ids, load, prob_mean) for the tokens; the router in float32 whatever the compute
        dtype (float64 when checking)."""
        gate_dtype = torch.promote_types(x_dtype, torch.float32)
        with torch.autocast(device_type=tokens.device.type, enabled=False):
            logits = nn.functional.linear(tokens.to(gate_dtype), self.gate.weight.to(gate_dtype), self.gate.bias.to(gate_dtype))
        bias = self.expert_bias.to(gate_dtype) if self.score_func == "sigmoid" else None
        return topk_gating(logits.contiguous(), bias, self.top_k, self.score_func, self.renormalize, self.backend)

    def _aux(self, load: Tensor, prob_mean: Tensor, T: int) -> Tensor:
        fraction = load.to(prob_mean.dtype) * (self.num_experts / (self.top_k * max(T, 1)))
        return (prob_mean * fraction).sum()

    def forward(self, x: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
        tokens, dtype = self._tokens(x)
        T, E, k, be = tokens.shape[0], self.num_experts, self.top_k, self.backend
        weights, ids, load, prob_mean = self._gate(tokens, x.dtype)
        row_to_flat, flat_to_row, offsets = route(ids, E, be)
        # both GEMMs in one op: the first reads its rows straight from the tokens through the
        # permutation, and only the pre-activation is kept for backward
        rows_out = expert_mlp(
            tokens,
            self.w1.to(dtype),
            self.b1.to(dtype),
            self.w2.to(dtype),
            self.b2.to(dtype),
            offsets,
            self.activation,
            be,
            gather=row_to_flat,
            flat_to_row=flat_to_row,
            top_k=k,
        )
        y = unpermute(rows_out, row_to_flat, flat_to_row, k, weights, self._shared(tokens, dtype), be)
        return y.reshape(x.shape[:-1] + (self.dim,)), self._aux(load, prob_mean, T), load

    @torch.no_grad()
    def update_bias(self, load: Tensor, rate: float = 1e-3) -> None:
        """b_i += rate where load_i is below the mean load, -= rate where above (load summed over ranks)."""
        load = load.to(self.expert_bias.device, torch.float32)
        self.expert_bias += rate * torch.sign(load.mean() - load)
