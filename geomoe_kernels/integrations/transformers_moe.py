"""The transformers adapter: `TransformersMoEMLP(block)` (what `MoEMLP.from_transformers(block)`
returns), a MoEMLP subclass built from a transformers sparse-MoE block, sharing its parameters (the
same Parameter objects: a step of either's optimizer is seen by both, and the block's state_dict and
save_pretrained are unchanged). What is transformers' own lives here, in the subclass's methods
(weights stored [E, out, in], the block's router, the experts' gate between the GEMMs, the block's
shared-expert module); MoEMLP keeps GeoMoE's and the general MoE options. It runs on the same
launch plan as MoEMLP (nn/_layer_plan.py): with router="geomoe" and the fused SwiGLU the gating op
inside the plan, otherwise the routing first and the rest of the layer planned. Importing this
module imports no transformers; building an adapter does.

What is read from the block (by attribute, so any block built the same way is served):
- the experts: `block.experts`, a module carrying transformers' `@use_experts_implementation` layout
  flags with a gate (has_gate: `gate_up_proj`, `down_proj`, their biases with has_bias). Its weights
  become w1, w2 (b1, b2). Stored [E, out, in] (is_transposed=False) they are re-laid out once, in
  place, to row-major [E, in, out] storage with the same shape, values and identity (as the
  "geomoe" experts backend does), so the grouped GEMMs read them without a copy per call. The gate:
  fused SwiGLU when the experts use transformers' default gate on [gate | up] with SiLU, else the
  experts' own `_apply_gate` between the two grouped GEMMs (GPT-OSS's clamped SwiGLU on
  interleaved columns, GeGLU, ...).
- the router: `block.gate` or `block.router`, a module with `weight` [E, dim] (and `bias` when it
  has one) and `top_k`. router="block" (the default) calls it: the same experts and weights as the
  block, in its own dtypes (most routers compute the softmax in float32). router="geomoe" runs
  MoEMLP's gating on its weight with the options read from it: softmax then top-k, renormalised
  unless `norm_topk_prob` is False (GPT-OSS's softmax over the top-k logits is the renormalised
  form); with an `e_score_correction_bias` buffer, DeepSeek-V3's sigmoid selection with that bias
  (shared: update_bias moves the router's buffer), group-limited top-k (`num_group`, `topk_group`)
  and `routed_scaling_factor`. Only routers of the known types are mapped.
- the shared expert: `block.shared_expert` or `block.shared_experts`, any module (called as is),
  and `block.shared_expert_gate` (a Linear to 1 output, Qwen2-MoE's sigmoid gate).

Refused with an error naming the block type and the experts' layout flags: experts without a gate
(up_proj only), a post-expert norm, expert-parallel or DTensor expert weights, a Mixtral router
with jitter noise, a router="geomoe" request for a router type whose arithmetic is not mapped."""

from __future__ import annotations

from typing import Any, Callable, Optional, Tuple

import torch
from torch import Tensor, nn

from ..nn import moe as _moe
from ..nn.moe import MoEMLP

ROUTERS = ("block", "geomoe")
# routers whose arithmetic MoEMLP's own gating reproduces (router="geomoe")
SOFTMAX_TOPK_ROUTERS = ("MixtralTopKRouter", "Qwen2MoeTopKRouter", "Qwen3MoeTopKRouter", "OlmoeTopKRouter")
SOFTMAX_OF_TOPK_ROUTERS = ("GptOssTopKRouter",)
SIGMOID_GROUP_ROUTERS = ("DeepseekV3TopkRouter",)
_FLAGS = ("is_transposed", "is_concatenated", "has_bias", "has_gate", "has_post_expert_norm", "_is_expert_parallel")


class UnsupportedBlock(ValueError):
    """The transformers block cannot be served by MoEMLP.from_transformers."""


def _describe(block: nn.Module) -> str:
    experts = getattr(block, "experts", None)
    if experts is None:
        return f"{type(block).__name__} (no 'experts')"
    flags = ", ".join(f"{f}={getattr(experts, f, '<missing>')}" for f in _FLAGS)
    return f"{type(block).__name__} with {type(experts).__name__}({flags})"


def _refuse(block: nn.Module, what: str) -> UnsupportedBlock:
    return UnsupportedBlock(f"MoEMLP.from_transformers: {what}; block {_describe(block)}")


def _first(block: nn.Module, names) -> Optional[Any]:
    for n in names:
        m = getattr(block, n, None)
        if m is not None:
            return m
    return None


def _is_dtensor(t: Tensor) -> bool:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover
        return False
    return isinstance(t, DTensor)


def _relayout_out_in(param: nn.Parameter) -> None:
    """Make param.transpose(1, 2) row-major, once, keeping param's shape, values and identity."""
    if not param.transpose(1, 2).is_contiguous():
        with torch.no_grad():
            param.data = param.data.transpose(1, 2).contiguous().transpose(1, 2)


def _read_block(block: nn.Module, router: str) -> dict:
    """What the adapter takes from the block (checked; what it cannot serve is refused by name)."""
    if router not in ROUTERS:
        raise ValueError(f"MoEMLP.from_transformers: argument 'router' expected one of {list(ROUTERS)}, got {router!r}")
    if not isinstance(block, nn.Module):
        raise TypeError(f"MoEMLP.from_transformers: argument 'block' expected an nn.Module, got {type(block).__name__}")
    experts = getattr(block, "experts", None)
    if experts is None or not all(hasattr(experts, f) for f in ("has_gate", "is_transposed", "has_bias", "num_experts")):
        raise _refuse(
            block,
            f"argument 'block' expected an 'experts' module decorated with transformers' @use_experts_implementation "
            f"(its layout flags), got {type(experts).__name__ if experts is not None else 'none'}",
        )
    if not experts.has_gate:
        raise _refuse(block, "expected experts with a gate (has_gate=True, gate_up_proj), got has_gate=False (up_proj only)")
    if getattr(experts, "has_post_expert_norm", False):
        raise _refuse(block, "expected no post-expert norm, got has_post_expert_norm=True")
    if getattr(experts, "_is_expert_parallel", False):
        raise _refuse(
            block, "expected unsharded experts, got _is_expert_parallel=True (a rank's shard); build from the unsharded block"
        )
    w1: Any = getattr(experts, "gate_up_proj", None)
    w2: Any = getattr(experts, "down_proj", None)
    b1, b2 = (
        (getattr(experts, "gate_up_proj_bias", None), getattr(experts, "down_proj_bias", None))
        if experts.has_bias
        else (None, None)
    )
    for name, p in (("gate_up_proj", w1), ("down_proj", w2), ("gate_up_proj_bias", b1), ("down_proj_bias", b2)):
        if experts.has_bias or "bias" not in name:
            if not isinstance(p, nn.Parameter) or p.dim() != (2 if "bias" in name else 3):
                raise _refuse(
                    block, f"expected experts.{name} a {2 if 'bias' in name else 3}-d Parameter, got {type(p).__name__}"
                )
            if _is_dtensor(p):
                raise _refuse(block, f"experts.{name} is a DTensor (sharded); only local expert weights are served")
    transposed = bool(experts.is_transposed)
    E = int(experts.num_experts)
    if transposed:
        (_, D, up), (_, hidden, D2) = w1.shape, w2.shape
    else:
        (_, up, D), (_, D2, hidden) = w1.shape, w2.shape
    if w1.shape[0] != E or w2.shape[0] != E or D2 != D or up != 2 * hidden:
        raise _refuse(
            block,
            f"expected gate_up_proj and down_proj of {E} experts, [gate, up] twice down_proj's input; got {list(w1.shape)}, {list(w2.shape)}",
        )

    gate = _first(block, ("gate", "router"))
    if gate is None or not isinstance(getattr(gate, "weight", None), nn.Parameter) or gate.weight.shape != (E, D):
        got = (
            "none"
            if gate is None
            else f"{type(gate).__name__} with weight {list(getattr(getattr(gate, 'weight', None), 'shape', []))}"
        )
        raise _refuse(block, f"expected a router 'gate' or 'router' with a weight Parameter [{E}, {D}], got {got}")
    top_k = int(getattr(gate, "top_k", getattr(block, "top_k", 0)))
    if getattr(block, "jitter_noise", 0):
        raise _refuse(block, f"expected router jitter noise 0, got {block.jitter_noise}")
    correction = getattr(gate, "e_score_correction_bias", None)
    gate_bias = getattr(gate, "bias", None)
    rtype = type(gate).__name__
    known = SOFTMAX_TOPK_ROUTERS + SOFTMAX_OF_TOPK_ROUTERS + SIGMOID_GROUP_ROUTERS
    if router == "geomoe" and rtype not in known:
        raise _refuse(block, f"router='geomoe' maps only the routers {list(known)}, got {rtype} (router='block' calls it)")
    sigmoid = correction is not None
    opts = dict(
        score_func="sigmoid" if sigmoid else "softmax",
        renormalize=bool(getattr(gate, "norm_topk_prob", True)),
        routed_scaling_factor=float(getattr(gate, "routed_scaling_factor", 1.0)) if sigmoid else 1.0,
        n_group=int(getattr(gate, "num_group", 1)) if sigmoid else 1,
        topk_group=int(getattr(gate, "topk_group", 1)) if sigmoid else None,
    )

    shared = _first(block, ("shared_expert", "shared_experts"))
    shared_gate = getattr(block, "shared_expert_gate", None)
    if shared_gate is not None and (
        not isinstance(shared_gate, nn.Linear) or shared_gate.bias is not None or shared_gate.out_features != 1
    ):
        raise _refuse(block, f"expected shared_expert_gate a Linear({D}, 1, bias=False), got {shared_gate}")

    return dict(
        experts=experts, weights=(w1, b1, w2, b2), transposed=transposed, D=D, hidden=hidden, E=E, top_k=top_k, gate=gate,
        gate_bias=gate_bias, correction=correction, opts=opts, shared=shared, shared_gate=shared_gate,
    )  # fmt: skip


class TransformersMoEMLP(MoEMLP):
    """A MoEMLP over a transformers sparse-MoE block's own parameters and modules (the module
    docstring says what is read). forward(x) -> (y, aux, load) as MoEMLP's; update_bias moves the
    router's correction bias where it has one. Its state, set here and nowhere else:
    - weights_out_in: the experts' weights are stored [E, out, in] (read as transposed views);
    - block_router: `gate` is the block's router, called for (logits, weights, ids);
    - expert_gate_fn: the experts' own gate between the two grouped GEMMs, or None (fused SwiGLU);
    - shared_expert: the block's shared-expert module (its own hidden size), or None; shared_gate
      its sigmoid gate (Qwen2-MoE's shared_expert_gate), or None."""

    shares_expert_tensors = True  # the block's whole expert tensors: expert parallelism cannot shard them

    def __init__(self, block: nn.Module, router: str = "block", backend: str = "auto"):
        parts = _read_block(block, router)
        experts, (w1, b1, w2, b2), transposed = parts["experts"], parts["weights"], parts["transposed"]
        D, hidden, E, top_k, gate, gate_bias = (
            parts["D"],
            parts["hidden"],
            parts["E"],
            parts["top_k"],
            parts["gate"],
            parts["gate_bias"],
        )
        correction, shared, shared_gate = parts["correction"], parts["shared"], parts["shared_gate"]
        from .transformers import fused_activation

        fused = fused_activation(experts) == "swiglu"
        with torch.device("meta"):
            super().__init__(
                D,
                hidden,
                E,
                0,
                top_k,
                activation="swiglu",
                backend=backend,
                bias=experts.has_bias,
                gate_bias=gate_bias is not None,
                swiglu_layout="concat" if experts.is_concatenated else "interleaved",
                **parts["opts"],
            )
        # the block's own tensors, by identity
        if not transposed:
            for p in (w1, w2):
                _relayout_out_in(p)
        self.weights_out_in = not transposed
        self.w1, self.w2 = w1, w2
        if experts.has_bias:
            self.b1, self.b2 = b1, b2
        self.expert_gate_fn: Optional[Callable[[Tensor], Tensor]] = None if fused else experts._apply_gate
        self.block_router = router == "block"
        if self.block_router:
            self.gate = gate
        else:
            linear = nn.Linear(D, E, bias=gate_bias is not None, device="meta")
            linear.weight = gate.weight
            if gate_bias is not None:
                linear.bias = gate_bias
            self.gate = linear
        self.expert_bias = correction if correction is not None else torch.zeros(E, device=w1.device)
        self.shared_expert: Optional[nn.Module] = shared
        self.shared_gate = shared_gate if shared is not None else None
        left = [n for n, t in list(self.named_parameters()) + list(self.named_buffers()) if t.is_meta]
        if left:  # pragma: no cover - every tensor above comes from the block
            raise _refuse(block, f"internal: {left} not taken from the block")

    def extra_repr(self) -> str:
        return (
            super().extra_repr()
            + (", router=block's" if self.block_router else "")
            + ("" if self.expert_gate_fn is None else ", expert gate=the experts' own")
            + ("" if self.shared_expert is None else ", shared expert=the block's")
        )

    def _kn(self, w: Tensor) -> Tensor:
        """An expert weight as [E, in, out] (a view when the block stores it [E, out, in])."""
        return w.transpose(1, 2) if self.weights_out_in else w

    def _expert_gate(self) -> Optional[Callable[[Tensor], Tensor]]:
        return self.expert_gate_fn

    def _gating_in_plan(self) -> bool:
        return not self.block_router and super()._gating_in_plan()

    def _shared_in_experts(self) -> bool:
        return False  # the block's shared expert is a module of its own

    def _shared(self, x: Tensor, dtype: torch.dtype) -> Optional[Tensor]:
        if self.shared_expert is None:
            return None
        y = self.shared_expert(x)
        if self.shared_gate is not None:
            y = y * torch.sigmoid(nn.functional.linear(x, self.shared_gate.weight.to(dtype)))
        return y

    def _gate(self, tokens: Tensor, x_dtype: torch.dtype) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
        if not self.block_router:
            return super()._gate(tokens, x_dtype)
        return self._block_gate(tokens.to(x_dtype), torch.promote_types(x_dtype, torch.float32))

    def _block_gate(self, tokens: Tensor, gate_dtype: torch.dtype):
        """The block's own router: its weights (routed scaling included) and ids as it computes them;
        the load, and the mean normalised score (for the aux loss) from its logits."""
        logits, weights, ids = self.gate(tokens)
        ids = ids.to(torch.int64)
        scores = logits.to(gate_dtype)
        scores = torch.sigmoid(scores) if self.score_func == "sigmoid" else torch.softmax(scores, -1)
        T = scores.shape[0]
        prob_mean = (scores / scores.sum(-1, keepdim=True)).mean(0) if T else scores.new_zeros(self.num_experts)
        load = torch.bincount(ids.reshape(-1), minlength=self.num_experts)
        return weights.to(gate_dtype), ids, load, prob_mean


def moe_from_transformers(cls: Any, block: nn.Module, router: str = "block", backend: str = "auto") -> TransformersMoEMLP:
    """TransformersMoEMLP(block, router, backend) (the entry point's old signature; `cls` unused)."""
    return TransformersMoEMLP(block, router, backend)


_moe.set_transformers_adapter(TransformersMoEMLP)
