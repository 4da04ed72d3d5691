"""MoEMLP: a drop-in mixture-of-experts MLP on the geomoe ops.

Defaults follow GeoMoE: 23 routed experts and 1 shared, top-3, sigmoid scores with a bias buffer
used only for selection, renormalised weights, GELU experts of hidden int(0.75 * dim). Also Mixtral
style (softmax, SwiGLU, no shared) and DeepSeek style (sigmoid + bias, shared experts, SwiGLU).

forward(x [..., dim]) -> (y [..., dim], aux, load [E]):
    aux = sum_i P_i * F_i, P_i = mean_t s_ti / sum_j s_tj (carries gradient),
    F_i = E * load_i / (k * T) (does not).
update_bias(load, rate) is the bias-based load balancing rule, applied after an optimizer step.

Options for the MoE layers of LLMs (keyword-only; the defaults are GeoMoE's):
- bias=False: experts (and shared experts) without biases; gate_bias=False: a router without one.
- routed_scaling_factor: the routed experts' combine weights times this (DeepSeek-V3: 2.5).
- n_group, topk_group: group-limited top-k (DeepSeek-V3): the experts in n_group equal groups, each
  group scored by the sum of its two best selection scores (score + expert_bias for sigmoid), only
  the topk_group best groups eligible. The router then runs as torch ops (the gating op has no groups).
- shared_gate=True: the shared experts' output times sigmoid(x @ w) (Qwen2-MoE's shared_expert_gate).
- swiglu_layout="interleaved": SwiGLU's first projection holds columns [g0, u0, g1, u1, ...] instead
  of [gate | up]; the expert GEMMs fuse it as they fuse [gate | up] (the ops' activation
  "swiglu_interleaved").
Softmax-then-top-k with or without renormalisation is score_func="softmax" with renormalize.

Every option runs as one autograd.Function over a cached launch plan (nn/_layer_plan.py): with the
gating op inside it, or (group-limited top-k, an adapter's own expert gate) the routing computed
first and the rest of the layer planned.

MoEMLP.from_transformers(block) builds the transformers adapter of the block's family, a MoEMLP
subclass of its own that shares the block's parameters (geomoe_kernels/integrations/transformers_moe.py:
the families, what each maps and what is refused)."""

from __future__ import annotations

import math
import numbers
from typing import Callable, Optional, Tuple

import torch
from torch import Tensor, nn

from .. import backend as _backend
from .. import kernel_recipes as recipe
from ..ops import SCORE_FUNCS, expert_mlp, grouped_mm, route, topk_gating, unpermute
from ..reference import activations
from . import _layer_plan

EXPERT_ACTIVATIONS = ("gelu", "silu", "swiglu")
SWIGLU_LAYOUTS = ("concat", "interleaved")


# The transformers adapters (integrations/transformers_moe.py) subclass MoEMLP, so this module
# cannot import them: that module hands its builder in when it is imported (the package's __init__).
_transformers_adapter: Optional[Callable[..., "MoEMLP"]] = None


def set_transformers_adapter(adapter: Callable[..., "MoEMLP"]) -> None:
    global _transformers_adapter
    _transformers_adapter = adapter


class MoEMLP(nn.Module):
    expert_bias: Tensor  # a buffer
    # None without shared experts, and then never read
    shared_w1: Tensor
    shared_b1: Tensor
    shared_w2: Tensor
    shared_b2: Tensor
    # None with bias=False
    b1: Tensor
    b2: Tensor
    # True for a layer whose expert tensors belong to another module (the transformers adapter,
    # integrations/transformers_moe.py): a shard of them cannot be cut (expert parallelism refuses it)
    shares_expert_tensors: bool = False
    # forward as one autograd.Function over a cached launch plan where the options allow (False: the
    # path through the torch.library ops, one per step; torch.compile always traces that one)
    use_plan: bool = True

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
        *,
        bias: bool = True,
        gate_bias: bool = True,
        routed_scaling_factor: float = 1.0,
        n_group: int = 1,
        topk_group: Optional[int] = None,
        shared_gate: bool = False,
        swiglu_layout: str = "concat",
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
        topk_group = n_group if topk_group is None else topk_group
        if n_group < 1 or num_experts % n_group:
            raise ValueError(f"MoEMLP: argument 'n_group' expected >= 1 and dividing num_experts = {num_experts}, got {n_group}")
        if not 1 <= topk_group <= n_group or top_k > topk_group * (num_experts // n_group):
            raise ValueError(
                f"MoEMLP: argument 'topk_group' expected 1 <= topk_group <= n_group = {n_group} with top_k = {top_k} <= "
                f"topk_group * {num_experts // n_group} (experts per group), got {topk_group}"
            )
        if n_group > 1 and num_experts // n_group < 2:
            raise ValueError(
                f"MoEMLP: argument 'n_group' expected groups of >= 2 experts (scored by their best two), got {n_group}"
            )
        if swiglu_layout not in SWIGLU_LAYOUTS:
            raise ValueError(f"MoEMLP: argument 'swiglu_layout' expected one of {list(SWIGLU_LAYOUTS)}, got {swiglu_layout!r}")
        if not math.isfinite(routed_scaling_factor) or routed_scaling_factor <= 0:
            raise ValueError(f"MoEMLP: argument 'routed_scaling_factor' expected a finite value > 0, got {routed_scaling_factor}")
        if shared_gate and num_shared_experts == 0:
            raise ValueError(
                "MoEMLP: argument 'shared_gate' expected False without shared experts (num_shared_experts = 0), got True"
            )
        self.bias = bias
        self.routed_scaling_factor = float(routed_scaling_factor)
        self.n_group, self.topk_group = n_group, topk_group
        self.swiglu_layout = swiglu_layout
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
        self.gate = nn.Linear(dim, num_experts, bias=gate_bias)
        self.shared_gate = nn.Linear(dim, 1, bias=False) if shared_gate else None
        self.register_buffer("expert_bias", torch.zeros(num_experts))
        # Stacked [E, in, out] for the grouped GEMM (x @ w), not nn.Linear's [out, in].
        self.w1 = nn.Parameter(torch.empty(num_experts, dim, up))
        self.register_parameter("b1", nn.Parameter(torch.empty(num_experts, up)) if bias else None)
        self.w2 = nn.Parameter(torch.empty(num_experts, self.hidden_dim, dim))
        self.register_parameter("b2", nn.Parameter(torch.empty(num_experts, dim)) if bias else None)
        S = num_shared_experts
        shapes = {"shared_w1": (S, dim, up), "shared_b1": (S, up), "shared_w2": (S, self.hidden_dim, dim), "shared_b2": (S, dim)}
        for name, shape in shapes.items():
            keep = S and (bias or not name.startswith("shared_b"))
            self.register_parameter(name, nn.Parameter(torch.empty(shape)) if keep else None)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Xavier-uniform weights and zero biases, per expert, as MAE-style initialisation gives nn.Linear."""
        for w in (self.w1, self.w2, self.shared_w1, self.shared_w2, self.gate.weight, getattr(self.shared_gate, "weight", None)):
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
            + ("" if self.bias else ", bias=False")
            + ("" if self.routed_scaling_factor == 1.0 else f", routed_scaling_factor={self.routed_scaling_factor}")
            + ("" if self.n_group == 1 else f", n_group={self.n_group}, topk_group={self.topk_group}")
            + ("" if self.shared_gate is None else ", shared_gate=True")
            + ("" if self.swiglu_layout == "concat" else f", swiglu_layout={self.swiglu_layout!r}")
        )

    @classmethod
    def from_transformers(cls, block: nn.Module, router: str = "block", backend: str = "auto") -> "MoEMLP":
        """A MoEMLP sharing the parameters of a transformers sparse-MoE block of a supported family
        (Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE, DeepSeek-V3, GPT-OSS, GLM-4-MoE): the family's adapter
        class, a TransformersMoEMLP (geomoe_kernels/integrations/transformers_moe.py), chosen by the
        block's class; another family's block with transformers' experts layout gets FallbackAdapter
        (its facts read from the block, router="block" only). router="block" calls the block's own
        router (its exact arithmetic and dtypes), router="geomoe" runs MoEMLP's gating on the
        router's weights with the family's options."""
        if _transformers_adapter is None:  # only where geomoe_kernels.nn was imported without the package
            raise RuntimeError("MoEMLP.from_transformers: import geomoe_kernels (it registers the transformers adapter)")
        return _transformers_adapter(block, router, backend)

    # ---- what a subclass (an adapter of another library's block) may change ----

    def _kn(self, w: Tensor) -> Tensor:
        """An expert weight as [E, in, out] (the layer's own are stored so)."""
        return w

    def _expert_gate(self) -> Optional[Callable[[Tensor], Tensor]]:
        """The gate between the two expert GEMMs (hidden = gate(pre)), or None where expert_mlp fuses
        the activation (the layer's own: every activation and SwiGLU layout is fused)."""
        return None

    def _expert_activation(self) -> str:
        """The activation the expert ops fuse: 'swiglu_interleaved' for SwiGLU's interleaved columns."""
        return "swiglu_interleaved" if self.activation == "swiglu" and self.swiglu_layout == "interleaved" else self.activation

    def _gating_in_plan(self) -> bool:
        """Whether the gating op computes the routing (inside the layer's plan); else `_gate` does it
        first as torch ops (group-limited top-k) and the rest of the layer is planned."""
        return self.n_group == 1

    def _expert_weights(self, dtype: torch.dtype) -> Tuple[Tensor, Optional[Tensor], Tensor, Optional[Tensor]]:
        """(w1, b1, w2, b2) of the routed experts, [E, in, out], in `dtype`, contiguous."""
        w1, w2 = self._kn(self.w1).to(dtype).contiguous(), self._kn(self.w2).to(dtype).contiguous()
        b1 = self.b1.to(dtype).contiguous() if self.b1 is not None else None
        b2 = self.b2.to(dtype).contiguous() if self.b2 is not None else None
        return w1, b1, w2, b2

    def _act(self, h: Tensor) -> Tensor:
        return activations.apply(self._expert_activation(), h)

    @staticmethod
    def _linear(x: Tensor, w: Tensor, b: Optional[Tensor], dtype: torch.dtype) -> Tensor:
        return torch.bmm(x, w.to(dtype)) if b is None else torch.baddbmm(b.to(dtype)[:, None, :], x, w.to(dtype))

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
        h = self._act(self._linear(x.expand(S, T, self.dim), self.shared_w1, self.shared_b1, dtype))
        y = self._linear(h, self.shared_w2, self.shared_b2, dtype)
        y = y[0] if S == 1 else y.sum(0)
        if self.shared_gate is not None:
            y = y * torch.sigmoid(nn.functional.linear(x, self.shared_gate.weight.to(dtype)))
        return y

    def _tokens(self, x: Tensor) -> Tuple[Tensor, torch.dtype]:
        if x.shape[-1] != self.dim:
            raise ValueError(f"MoEMLP: argument 'x' expected last dimension {self.dim}, got shape {list(x.shape)}")
        dtype = self._compute_dtype(x)
        return x.reshape(-1, self.dim).to(dtype), dtype

    def _gate(self, tokens: Tensor, x_dtype: torch.dtype):
        """(weights, ids, load, prob_mean) for the tokens; the router in float32 whatever the compute
        dtype (float64 when checking)."""
        gate_dtype = torch.promote_types(x_dtype, torch.float32)
        logits, bias = self._logits(tokens, gate_dtype)
        if self.n_group > 1:
            weights, ids, load, prob_mean = self._group_limited_gate(logits, bias)
        else:
            weights, ids, load, prob_mean = topk_gating(
                logits.contiguous(), bias, self.top_k, self.score_func, self.renormalize, self.backend
            )
        if self.routed_scaling_factor != 1.0:
            weights = weights * self.routed_scaling_factor
        return weights, ids, load, prob_mean

    def _logits(self, tokens: Tensor, gate_dtype: torch.dtype) -> Tuple[Tensor, Optional[Tensor]]:
        """(the router's logits, the selection bias or None) in gate_dtype."""
        with torch.autocast(device_type=tokens.device.type, enabled=False):
            gate_b = self.gate.bias.to(gate_dtype) if self.gate.bias is not None else None
            logits = nn.functional.linear(tokens.to(gate_dtype), self.gate.weight.to(gate_dtype), gate_b)
        return logits, self._selection_bias(gate_dtype)

    def _selection_bias(self, gate_dtype: torch.dtype) -> Optional[Tensor]:
        return self.expert_bias.to(gate_dtype) if self.score_func == "sigmoid" else None

    def _router_in_plan(self, gate_dtype: torch.dtype, S: int) -> bool:
        """Whether the planned path may run `_logits`'s linear inside its Function (its backward then
        adds the router's part of the token gradient in place, issue 28): nothing but the Function reads
        the tokens (the shared experts, if any, among the grouped ones: S > 0), and the layer's own
        `_logits` over an nn.Linear whose parameters are in gate_dtype already (no cast to differentiate)."""
        g = self.gate
        return (
            (S > 0 or (self.num_shared_experts == 0 and type(self)._shared is MoEMLP._shared))
            and type(self)._logits is MoEMLP._logits
            and type(g) is nn.Linear
            and g.weight.dtype == gate_dtype
            and (g.bias is None or g.bias.dtype == gate_dtype)
        )

    def _group_limited_gate(self, logits: Tensor, bias: Optional[Tensor]):
        """DeepSeek-V3's routing as torch ops: experts of the topk_group best groups (a group's score:
        the sum of its best two selection scores) are eligible; the top_k of them by selection score."""
        T, E = logits.shape
        scores = torch.sigmoid(logits) if self.score_func == "sigmoid" else torch.softmax(logits, -1)
        with torch.no_grad():
            select = scores if bias is None else scores + bias
            group_scores = select.view(T, self.n_group, E // self.n_group).topk(2, dim=-1).values.sum(-1)
            groups = group_scores.topk(self.topk_group, dim=-1).indices
            keep = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, groups, True)
            keep = keep[:, :, None].expand(T, self.n_group, E // self.n_group).reshape(T, E)
            ids = select.masked_fill(~keep, float("-inf")).topk(self.top_k, dim=-1).indices
        weights = scores.gather(1, ids)
        if self.renormalize:
            weights = weights / weights.sum(-1, keepdim=True)
        flat = ids.reshape(-1)  # bincount would wait for the device (its output size depends on the ids' max)
        load = torch.zeros(E, dtype=torch.int64, device=ids.device).scatter_add_(0, flat, torch.ones_like(flat))
        prob_mean = (scores / scores.sum(-1, keepdim=True)).mean(0) if T else scores.new_zeros(E)
        return weights.to(torch.promote_types(logits.dtype, torch.float32)), ids, load, prob_mean

    def _aux(self, load: Tensor, prob_mean: Tensor, T: int) -> Tensor:
        fraction = load.to(prob_mean.dtype) * (self.num_experts / (self.top_k * max(T, 1)))
        return (prob_mean * fraction).sum()

    def _shared_in_experts(self) -> bool:
        """The shared experts run as S more experts in the routed experts' grouped launches (every
        token routed to each with weight 1), not as batched matmuls of their own: the layer's own
        shared experts (not a block's module, no gate) beside experts whose two GEMMs are expert_mlp,
        where E + S experts route on the same backends as E (256 routed + 1 shared would push Triton's
        routing past its limit: those layers keep the batched shared path)."""
        E, S = self.num_experts, self.num_shared_experts
        limits = (recipe.TRITON_ROUTE_MAX_EXPERTS, recipe.CUDA_ROUTE_MAX_EXPERTS)
        return (
            S > 0
            and all((E <= limit) == (E + S <= limit) for limit in limits)
            and self.shared_gate is None
            and self._expert_gate() is None
        )

    def _stacked(self, dtype: Optional[torch.dtype]) -> Tuple[Tensor, Optional[Tensor], Tensor, Optional[Tensor]]:
        """(w1, b1, w2, b2) of the routed experts followed by the shared ones ([E + S, ...], in
        `dtype`, None: the parameters'): one concatenation and one cast each, the cast's backward one
        for both."""
        stack = [
            (torch.cat([r, s]) if dtype is None else torch.cat([r, s]).to(dtype)) if r is not None else None
            for r, s in self._pairs()
        ]
        return stack[0], stack[1], stack[2], stack[3]  # type: ignore[return-value]

    def _pairs(self):
        return (self.w1, self.shared_w1), (self.b1, self.shared_b1), (self.w2, self.shared_w2), (self.b2, self.shared_b2)

    def _route_shared(self, ids: Tensor, weights: Tensor) -> Tuple[Tensor, Tensor]:
        """ids and weights [T, k + S]: each token's k routed experts, then the S shared experts
        E..E+S-1 at weight 1."""
        T, E, S = ids.shape[0], self.num_experts, self.num_shared_experts
        shared_ids = torch.arange(E, E + S, device=ids.device).expand(T, S)
        return torch.cat([ids, shared_ids], 1), torch.cat([weights, weights.new_ones(1, 1).expand(T, S)], 1)

    def forward(self, x: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
        if self.use_plan and not torch.compiler.is_compiling():
            return self._forward_planned(x)
        return self._forward_ops(x)

    def _forward_planned(self, x: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
        """forward as one autograd.Function over a cached launch plan: the same implementations, the
        same bits as _forward_ops, without a custom-op dispatch per op (issue 28's host time)."""
        tokens, dtype = self._tokens(x)
        gate = self._expert_gate()
        if gate is not None or not self._gating_in_plan():
            return self._forward_routed(x, tokens, dtype, gate)
        gate_dtype = torch.promote_types(x.dtype, torch.float32)
        S = self.num_shared_experts if self._shared_in_experts() else 0
        # the router in the plan's Function where nothing else reads the tokens (see _layer_plan.run),
        # else its logits here
        router = None
        if self._router_in_plan(gate_dtype, S):
            router, logits, bias = (self.gate.weight, self.gate.bias, gate_dtype), None, self._selection_bias(gate_dtype)
        else:
            logits, bias = self._logits(tokens, gate_dtype)
        # the routed experts read the tokens through an alias made here, before the shared experts'
        # nodes: its backward then runs where expert_mlp's runs on the ops' path, after the shared
        # experts', so the token gradient adds its parts in the same order (the same bits)
        routed_tokens = tokens.view_as(tokens)
        # the expert weights as (routed, shared) parameter pairs: the plan stacks and casts them (one
        # launch where its backend has the pack kernel)
        if S:
            pairs = self._pairs()
            shared = None
        else:
            pairs = ((self._kn(self.w1), None), (self.b1, None), (self._kn(self.w2), None), (self.b2, None))
            shared = self._shared(tokens, dtype)
            shared = shared.contiguous() if shared is not None else None
        w1, b1, w2, b2 = (None if q[0] is None else q for q in pairs)
        options = (
            self.num_experts, self.top_k, self.score_func, self.renormalize, self._expert_activation(),
            self.routed_scaling_factor, self.backend, S,
        )  # fmt: skip
        logits = None if logits is None else logits.contiguous()
        y, load, aux = _layer_plan.run(
            options, logits, bias, routed_tokens.contiguous(), w1, b1, w2, b2, shared, aux=True, pack_dtype=dtype, router=router
        )  # the aux loss as _aux forms it, in the Function (in the gating kernel where it is fused)
        return y.reshape(x.shape[:-1] + (self.dim,)), aux, load

    def _forward_routed(
        self, x: Tensor, tokens: Tensor, dtype: torch.dtype, gate: Optional[Callable[[Tensor], Tensor]]
    ) -> Tuple[Tensor, Tensor, Tensor]:
        """The routing from `_gate` (torch ops, or the gating op), the rest of the layer on a plan
        (_layer_plan.run_routed): group-limited top-k, an expert gate between the GEMMs."""
        T = tokens.shape[0]
        weights, ids, load, prob_mean = self._gate(tokens, x.dtype)
        routed_tokens = tokens.view_as(tokens)  # made where the ops' path makes its first expert node
        E, k = self.num_experts, self.top_k
        if self._shared_in_experts():  # the shared experts as S more experts, weight 1
            ids, weights = self._route_shared(ids, weights)
            E, k = E + self.num_shared_experts, ids.shape[1]
            w1, b1, w2, b2 = self._stacked(dtype)
            shared = None
        else:
            w1, b1, w2, b2 = self._expert_weights(dtype)
            shared = self._shared(tokens, dtype)
            shared = shared.contiguous() if shared is not None else None
        y = _layer_plan.run_routed(
            (E, k, self._expert_activation(), self.backend), weights.contiguous(), ids.contiguous(), routed_tokens.contiguous(),
            w1, b1, w2, b2, shared, gate,
        )  # fmt: skip
        return y.reshape(x.shape[:-1] + (self.dim,)), self._aux(load, prob_mean, T), load

    def _forward_ops(self, x: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
        """forward through the torch.library ops, one per step (what torch.compile traces)."""
        tokens, dtype = self._tokens(x)
        T, E, k, be = tokens.shape[0], self.num_experts, self.top_k, self.backend
        weights, ids, load, prob_mean = self._gate(tokens, x.dtype)
        if self._shared_in_experts():  # the shared experts as S more experts, weight 1
            ids, weights = self._route_shared(ids, weights)
            k_all = ids.shape[1]
            row_to_flat, flat_to_row, offsets = route(ids, E + self.num_shared_experts, be)
            w1, b1, w2, b2 = self._stacked(dtype)
            y = expert_mlp(
                tokens, w1, b1, w2, b2, offsets, self._expert_activation(), be, gather=row_to_flat, flat_to_row=flat_to_row, top_k=k_all,
                weights=weights,
            )  # fmt: skip
            return y.reshape(x.shape[:-1] + (self.dim,)), self._aux(load, prob_mean, T), load
        row_to_flat, flat_to_row, offsets = route(ids, E, be)
        if self._expert_gate() is None:  # the combine in expert_mlp: its backward forms the weights' gradient
            # the experts read the tokens through an alias made before the shared experts' nodes (as
            # the planned path does): the token gradient adds its parts in the same order
            routed_tokens = tokens.view_as(tokens)
            shared = self._shared(tokens, dtype)
            y = self._experts(routed_tokens, dtype, offsets, row_to_flat, flat_to_row, combine=(weights, shared))
            return y.reshape(x.shape[:-1] + (self.dim,)), self._aux(load, prob_mean, T), load
        rows_out = self._experts(tokens, dtype, offsets, row_to_flat, flat_to_row)
        y = unpermute(rows_out, row_to_flat, flat_to_row, k, weights, self._shared(tokens, dtype), be)
        return y.reshape(x.shape[:-1] + (self.dim,)), self._aux(load, prob_mean, T), load

    def _experts(
        self,
        tokens: Tensor,
        dtype: torch.dtype,
        offsets: Tensor,
        gather: Optional[Tensor],
        flat_to_row: Optional[Tensor],
        weights: Optional[Tuple[Tensor, Optional[Tensor], Tensor, Optional[Tensor]]] = None,
        combine: Optional[Tuple[Tensor, Optional[Tensor]]] = None,
    ) -> Tensor:
        """The routed experts on their rows (expert-major), read from `tokens` through `gather` when
        given (rows already grouped by expert otherwise). `weights` (w1, b1, w2, b2) replace the
        layer's own: expert parallelism passes its rank's shard. combine = (routing weights, shared
        or None), with gather and no expert gate: the rows combined into the tokens by expert_mlp."""
        k, be = self.top_k, self.backend
        w1, b1, w2, b2 = weights if weights is not None else (self.w1, self.b1, self.w2, self.b2)
        w1, w2 = self._kn(w1).to(dtype), self._kn(w2).to(dtype)
        b1 = b1.to(dtype) if b1 is not None else None
        b2 = b2.to(dtype) if b2 is not None else None
        k = k if gather is not None else 1
        gate = self._expert_gate()
        if gate is not None:  # the gate between two grouped GEMMs
            pre = grouped_mm(tokens, w1, offsets, b1, "none", be, gather=gather, flat_to_row=flat_to_row, top_k=k)
            hidden = gate(pre)
            return grouped_mm(hidden.to(dtype), w2, offsets, b2, "none", be)
        # both GEMMs in one op: the first reads its rows straight from the tokens through the
        # permutation, and only the pre-activation is kept for backward
        routing, shared = combine if combine is not None else (None, None)
        return expert_mlp(
            tokens, w1, b1, w2, b2, offsets, self._expert_activation(), be, gather=gather, flat_to_row=flat_to_row, top_k=k,
            weights=routing, shared=shared,
        )  # fmt: skip

    @torch.no_grad()
    def update_bias(self, load: Tensor, rate: float = 1e-3) -> None:
        """b_i += rate where load_i is below the mean load, -= rate where above (load summed over ranks).
        `load` [num_experts]: the counts forward returns, or any finite per-expert load."""
        check_load("MoEMLP.update_bias", load, self.num_experts, rate)
        self._apply_bias_update(load, rate)

    @torch.no_grad()
    def _apply_bias_update(self, load: Tensor, rate: float) -> None:
        """update_bias without the checks, for callers that checked every layer's load first."""
        load = load.to(self.expert_bias.device, torch.float32)
        self.expert_bias += rate * torch.sign(load.mean() - load)


def check_load(owner: str, load: Tensor, num_experts: int, rate: float, name: str = "load") -> None:
    """update_bias's arguments: `load` one finite value per expert, `rate` finite and >= 0. A wrong
    length used to broadcast or fail inside the update, and a NaN made sign(mean - load) zero for every
    expert: the biases silently stayed as they were.

    The finiteness check reads the values, a host sync on a GPU. Integer loads (the counts forward
    returns, which is what MoEBalancer and GeoMoE's training loop pass) cannot hold NaN or Inf, so
    they are not read: the per-step path gains no sync. A floating-point load comes from the
    caller's own arithmetic (a mean over steps, a float reduction) and is always read, value checks
    on or off: once per layer per optimizer step, never per token, and the one way a NaN there can
    be an error rather than a silently skipped update on a GPU. `name`: what the caller calls it."""
    if not isinstance(load, Tensor):
        raise ValueError(f"{owner}: argument '{name}' expected a tensor [{num_experts}], got {type(load).__name__}")
    if tuple(load.shape) != (num_experts,):
        raise ValueError(
            f"{owner}: argument '{name}' expected shape [{num_experts}] (one value per expert), got shape {list(load.shape)}"
        )
    if isinstance(rate, numbers.Real) and not (math.isfinite(rate) and rate >= 0):
        raise ValueError(f"{owner}: argument 'rate' expected a finite number >= 0, got {rate!r}")
    if load.is_floating_point():
        bad = ~torch.isfinite(load)
        if bool(bad.any()):
            where = bad.nonzero().flatten().tolist()
            values = load[bad].tolist()
            shown = ", ".join(f"{name}[{i}] = {v}" for i, v in zip(where[:8], values[:8]))
            more = f" and {len(where) - 8} more" if len(where) > 8 else ""
            raise ValueError(f"{owner}: argument '{name}' expected finite values, got {shown}{more}")
