"""The transformers adapters: `MoEMLP.from_transformers(block)` picks the class of the block's
family (by the block's class: `adapter_class`) and builds it, a MoEMLP subclass sharing the block's
parameters (the same Parameter objects: a step of either's optimizer is seen by both, and the
block's state_dict and save_pretrained are unchanged). What is transformers' own lives here, in
`TransformersMoEMLP` (the base, on the same launch plan as MoEMLP, nn/_layer_plan.py: with
router="geomoe" and the fused SwiGLU the gating op inside the plan, otherwise the routing first and
the rest of the layer planned) and in one small class per family, which states in its class body,
and nowhere else, the family's facts:
- block_class: transformers' sparse-MoE block class it serves (or a subclass of it);
- the experts' layout: weights stored [E, out, in] (weights_out_in, transformers' is_transposed
  False) or [E, in, out], their biases, gate_up_proj's columns ([gate | up] or interleaved);
- the gate between the GEMMs: transformers' default act_fn(gate) * up (the fused SwiGLU when act_fn
  is SiLU, else the experts' own `_apply_gate` between the two grouped GEMMs), or always the
  experts' own (GPT-OSS's clamped SwiGLU on interleaved columns);
- the router: the block's attribute holding it, its class (the one router="geomoe" maps), the
  MoEMLP gating options that reproduce it (`routing`), and its selection-bias buffer (DeepSeek-V3's
  e_score_correction_bias, shared: update_bias moves it);
- the shared expert: the block's attribute holding it (called as is), and its sigmoid gate
  (Qwen2-MoE's shared_expert_gate).
The block's experts' layout flags are checked against the family's facts; a mismatch is refused
naming the flag. A block of a family without a class of its own gets `FallbackAdapter`, whose facts
are read from the block (its experts' flags, `gate` or `router`, `shared_expert(s)`,
`shared_expert_gate`) and which serves router="block" only. router="block" (the default) calls
the block's router: the same experts and weights as the block, in its own dtypes (most routers
compute the softmax in float32). router="geomoe" runs MoEMLP's gating on its weight with the
family's options.

Refused with an error naming the block type and the experts' layout flags: a block whose experts
lack transformers' layout flags, experts without a gate, a post-expert norm, expert-parallel or
DTensor expert weights, router jitter noise, a router="geomoe" request for a router of another
class than the family's or for a block without a family class (the error lists the families).
Importing this module imports no transformers; building an adapter does."""

from __future__ import annotations

from typing import Any, Callable, ClassVar, Dict, Optional, Tuple, Type

import torch
from torch import Tensor, nn

from ..nn import moe as _moe
from ..nn.moe import MoEMLP

ROUTERS = ("block", "geomoe")
_FLAGS = ("is_transposed", "is_concatenated", "has_bias", "has_gate", "has_post_expert_norm", "_is_expert_parallel")
_SHARED_ATTRS = ("shared_expert", "shared_experts", "shared_expert_gate")


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


def _check_router_arg(router: str, block: Any) -> None:
    if router not in ROUTERS:
        raise ValueError(f"MoEMLP.from_transformers: argument 'router' expected one of {list(ROUTERS)}, got {router!r}")
    if not isinstance(block, nn.Module):
        raise TypeError(f"MoEMLP.from_transformers: argument 'block' expected an nn.Module, got {type(block).__name__}")


def _experts_of(block: nn.Module) -> Any:
    """The block's experts module, checked for what every adapter needs of it (transformers'
    @use_experts_implementation flags, a gate, no post-expert norm, not a rank's shard)."""
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
    return experts


def _expert_tensors(block: nn.Module, experts: Any) -> Tuple[Any, Any, Any, Any]:
    """(gate_up_proj, its bias, down_proj, its bias): local Parameters of the right rank."""
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
    return w1, b1, w2, b2


class TransformersMoEMLP(MoEMLP):
    """The base of the per-family adapters: a MoEMLP over a transformers sparse-MoE block's own
    parameters and modules. forward(x) -> (y, aux, load) as MoEMLP's; update_bias moves the router's
    selection bias where the family has one. Build one with MoEMLP.from_transformers(block) (which
    picks the family's class) or with the family's class itself. Its state, set in __init__ and
    nowhere else: `gate` the block's router (router="block", called for (logits, weights, ids)) or
    a Linear on the router's own weight (router="geomoe"); `expert_gate_fn` the experts' own gate
    between the two grouped GEMMs, or None (fused SwiGLU); `shared_expert` the block's shared-expert
    module or None, `shared_gate` its sigmoid gate or None."""

    shares_expert_tensors = True  # the block's whole expert tensors: expert parallelism cannot shard them

    # ---- the family's facts: each family's class states them in its body (the module docstring) ----
    family: ClassVar[str] = ""
    block_class: ClassVar[str] = ""
    weights_out_in: ClassVar[bool] = True  # experts' weights stored [E, out, in] (is_transposed=False)
    expert_biases: ClassVar[bool] = False  # gate_up_proj_bias and down_proj_bias (has_bias)
    swiglu_columns: ClassVar[str] = "concat"  # gate_up_proj's columns: [gate | up], or "interleaved"
    own_expert_gate: ClassVar[bool] = False  # always the experts' _apply_gate (else transformers' default gate)
    router_attr: ClassVar[str] = "gate"
    router_class: ClassVar[str] = ""
    selection_bias: ClassVar[Optional[str]] = None  # the router's buffer added to the scores for selection
    shared_attr: ClassVar[Optional[str]] = None
    shared_gate_attr: ClassVar[Optional[str]] = None

    @classmethod
    def routing(cls, router: nn.Module) -> Dict[str, Any]:
        """MoEMLP's gating options that reproduce the family's router (router="geomoe")."""
        raise NotImplementedError  # pragma: no cover - every family states its own

    @classmethod
    def check_block(cls, block: nn.Module) -> None:
        """The family's own refusals, beyond the layout (none unless the family states some)."""

    def __init__(self, block: nn.Module, router: str = "block", backend: str = "auto"):
        if not self.family:
            raise TypeError(
                "TransformersMoEMLP is the base of the per-family adapters: build one with MoEMLP.from_transformers(block) "
                f"or a family's class ({', '.join(f.__name__ for f in FAMILIES)})"
            )
        parts = self._read_block(block, router)
        experts, (w1, b1, w2, b2), gate = parts["experts"], parts["weights"], parts["gate"]
        D, E, gate_bias = parts["D"], parts["E"], getattr(gate, "bias", None)
        from .transformers import fused_activation

        fused = not self.own_expert_gate and fused_activation(experts) == "swiglu"
        with torch.device("meta"):
            super().__init__(
                D, parts["hidden"], E, 0, int(getattr(gate, "top_k", getattr(block, "top_k", 0))), activation="swiglu",
                backend=backend, bias=self.expert_biases, gate_bias=gate_bias is not None,
                swiglu_layout=self.swiglu_columns, **self.routing(gate),
            )  # fmt: skip
        # the block's own tensors, by identity
        if self.weights_out_in:
            for p in (w1, w2):
                _relayout_out_in(p)
        self.w1, self.w2 = w1, w2
        if self.expert_biases:
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
        correction = getattr(gate, self.selection_bias, None) if self.selection_bias else None
        self.expert_bias = correction if correction is not None else torch.zeros(E, device=w1.device)
        self.shared_expert: Optional[nn.Module] = parts["shared"]
        self.shared_gate = parts["shared_gate"]
        left = [n for n, t in list(self.named_parameters()) + list(self.named_buffers()) if t.is_meta]
        if left:  # pragma: no cover - every tensor above comes from the block
            raise _refuse(block, f"internal: {left} not taken from the block")

    @classmethod
    def serves(cls, block: nn.Module) -> bool:
        """Whether `block` is of the family's block class (or a subclass of it)."""
        return any(t.__name__ == cls.block_class for t in type(block).__mro__)

    def _read_block(self, block: nn.Module, router: str) -> dict:
        """What the adapter takes from the block, checked against the family's facts (what it cannot
        serve is refused by name)."""
        _check_router_arg(router, block)
        experts = _experts_of(block)
        if not self.serves(block):
            raise _refuse(block, f"{type(self).__name__} serves {self.family}'s {self.block_class}, got {type(block).__name__}")
        self._check_layout(block, experts)
        self.check_block(block)
        w1, b1, w2, b2 = _expert_tensors(block, experts)
        E = int(experts.num_experts)
        if self.weights_out_in:
            (_, up, D), (_, D2, hidden) = w1.shape, w2.shape
        else:
            (_, D, up), (_, hidden, D2) = w1.shape, w2.shape
        if w1.shape[0] != E or w2.shape[0] != E or D2 != D or up != 2 * hidden:
            raise _refuse(
                block,
                f"expected gate_up_proj and down_proj of {E} experts, [gate, up] twice down_proj's input; got {list(w1.shape)}, {list(w2.shape)}",
            )
        gate = self._router(block, router, E, D)
        shared, shared_gate = self._shared_modules(block, D)
        return dict(experts=experts, weights=(w1, b1, w2, b2), D=D, hidden=hidden, E=E, gate=gate, shared=shared, shared_gate=shared_gate)  # fmt: skip

    def _check_layout(self, block: nn.Module, experts: Any) -> None:
        """The experts' layout flags against the family's facts."""
        want = {
            "is_transposed": not self.weights_out_in,
            "has_bias": self.expert_biases,
            "is_concatenated": self.swiglu_columns == "concat",
        }
        for flag, value in want.items():
            got = getattr(experts, flag, None)
            if got is None or bool(got) != value:
                raise _refuse(block, f"{self.family}'s experts expected {flag}={value} (the family's layout), got {flag}={got}")

    def _router(self, block: nn.Module, router: str, E: int, D: int) -> nn.Module:
        gate = getattr(block, self.router_attr, None)
        if gate is None or not isinstance(getattr(gate, "weight", None), nn.Parameter) or gate.weight.shape != (E, D):
            got = (
                "none"
                if gate is None
                else f"{type(gate).__name__} with weight {list(getattr(getattr(gate, 'weight', None), 'shape', []))}"
            )
            raise _refuse(block, f"expected the router '{self.router_attr}' with a weight Parameter [{E}, {D}], got {got}")
        if router == "geomoe" and type(gate).__name__ != self.router_class:
            raise _refuse(
                block,
                f"router='geomoe' maps only {self.family}'s router {self.router_class}, got {type(gate).__name__} "
                "(router='block' calls it)",
            )
        return gate

    def _shared_modules(self, block: nn.Module, D: int) -> Tuple[Optional[nn.Module], Optional[nn.Module]]:
        """(the shared expert, its gate) as the family holds them; a shared expert the family has
        not is refused rather than left out of the output."""
        declared = (self.shared_attr, self.shared_gate_attr)
        extra = [n for n in _SHARED_ATTRS if n not in declared and getattr(block, n, None) is not None]
        if extra:
            raise _refuse(block, f"{self.family}'s block expected no {extra} (the adapter would leave them out), got them")
        shared = getattr(block, self.shared_attr, None) if self.shared_attr else None
        if self.shared_attr and not isinstance(shared, nn.Module):
            raise _refuse(block, f"expected the shared expert '{self.shared_attr}' a module, got {type(shared).__name__}")
        shared_gate = getattr(block, self.shared_gate_attr, None) if self.shared_gate_attr else None
        if self.shared_gate_attr and (
            not isinstance(shared_gate, nn.Linear) or shared_gate.bias is not None or shared_gate.out_features != 1
        ):
            raise _refuse(block, f"expected {self.shared_gate_attr} a Linear({D}, 1, bias=False), got {shared_gate}")
        return shared, shared_gate

    def extra_repr(self) -> str:
        return (
            f"{self.family}: "
            + super().extra_repr()
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


def _softmax_topk(router: nn.Module, renormalize: Optional[bool] = None) -> Dict[str, Any]:
    """Softmax over the experts, then the top-k, renormalised as the router's norm_topk_prob says."""
    return dict(
        score_func="softmax", renormalize=bool(getattr(router, "norm_topk_prob", True)) if renormalize is None else renormalize
    )


class MixtralAdapter(TransformersMoEMLP):
    """Mixtral: [E, out, in] experts with transformers' default SwiGLU on [gate | up]; the router
    `gate` (softmax, top-k, always renormalised); no shared expert; router jitter refused."""

    family = "Mixtral"
    block_class = "MixtralSparseMoeBlock"
    weights_out_in = True  # [E, out, in]
    expert_biases = False
    swiglu_columns = "concat"  # [gate | up]
    own_expert_gate = False  # transformers' default gate
    router_attr = "gate"
    router_class = "MixtralTopKRouter"

    @classmethod
    def routing(cls, router: nn.Module) -> Dict[str, Any]:
        return _softmax_topk(router, renormalize=True)

    @classmethod
    def check_block(cls, block: nn.Module) -> None:
        if getattr(block, "jitter_noise", 0):
            raise _refuse(block, f"expected router jitter noise 0, got {block.jitter_noise}")


class Qwen2MoeAdapter(TransformersMoEMLP):
    """Qwen2-MoE: [E, out, in] experts with the default SwiGLU; the router `gate` (softmax, top-k,
    renormalised when norm_topk_prob); the shared expert `shared_expert` times
    sigmoid(shared_expert_gate(x))."""

    family = "Qwen2-MoE"
    block_class = "Qwen2MoeSparseMoeBlock"
    weights_out_in = True  # [E, out, in]
    expert_biases = False
    swiglu_columns = "concat"  # [gate | up]
    own_expert_gate = False  # transformers' default gate
    router_attr = "gate"
    router_class = "Qwen2MoeTopKRouter"
    shared_attr = "shared_expert"
    shared_gate_attr = "shared_expert_gate"

    @classmethod
    def routing(cls, router: nn.Module) -> Dict[str, Any]:
        return _softmax_topk(router)


class Qwen3MoeAdapter(TransformersMoEMLP):
    """Qwen3-MoE: [E, out, in] experts with the default SwiGLU; the router `gate` (softmax, top-k,
    renormalised when norm_topk_prob); no shared expert."""

    family = "Qwen3-MoE"
    block_class = "Qwen3MoeSparseMoeBlock"
    weights_out_in = True  # [E, out, in]
    expert_biases = False
    swiglu_columns = "concat"  # [gate | up]
    own_expert_gate = False  # transformers' default gate
    router_attr = "gate"
    router_class = "Qwen3MoeTopKRouter"

    @classmethod
    def routing(cls, router: nn.Module) -> Dict[str, Any]:
        return _softmax_topk(router)


class OlmoeAdapter(TransformersMoEMLP):
    """OLMoE: [E, out, in] experts with the default SwiGLU; the router `gate` (softmax, top-k,
    renormalised when norm_topk_prob); no shared expert."""

    family = "OLMoE"
    block_class = "OlmoeSparseMoeBlock"
    weights_out_in = True  # [E, out, in]
    expert_biases = False
    swiglu_columns = "concat"  # [gate | up]
    own_expert_gate = False  # transformers' default gate
    router_attr = "gate"
    router_class = "OlmoeTopKRouter"

    @classmethod
    def routing(cls, router: nn.Module) -> Dict[str, Any]:
        return _softmax_topk(router)


class DeepseekV3Adapter(TransformersMoEMLP):
    """DeepSeek-V3: [E, out, in] experts with the default SwiGLU; the router `gate` (sigmoid scores,
    selection by score + e_score_correction_bias within the topk_group best of num_group groups,
    renormalised when norm_topk_prob, times routed_scaling_factor); the shared experts
    `shared_experts` (one module), ungated."""

    family = "DeepSeek-V3"
    block_class = "DeepseekV3MoE"
    weights_out_in = True  # [E, out, in]
    expert_biases = False
    swiglu_columns = "concat"  # [gate | up]
    own_expert_gate = False  # transformers' default gate
    router_attr = "gate"
    router_class = "DeepseekV3TopkRouter"
    selection_bias = "e_score_correction_bias"
    shared_attr = "shared_experts"

    @classmethod
    def routing(cls, router: nn.Module) -> Dict[str, Any]:
        return dict(
            score_func="sigmoid",
            renormalize=bool(getattr(router, "norm_topk_prob", True)),
            routed_scaling_factor=float(getattr(router, "routed_scaling_factor", 1.0)),
            n_group=int(getattr(router, "num_group", 1)),
            topk_group=int(getattr(router, "topk_group", 1)),
        )


class GptOssAdapter(TransformersMoEMLP):
    """GPT-OSS: [E, in, out] experts with biases and interleaved gate/up columns, always the experts'
    own gate (a clamped SwiGLU) between the two grouped GEMMs; the router `router` with a bias
    (top-k of the logits, then a softmax over those k: softmax then top-k, renormalised); no shared
    expert."""

    family = "GPT-OSS"
    block_class = "GptOssMLP"
    weights_out_in = False  # [E, in, out]
    expert_biases = True
    swiglu_columns = "interleaved"  # [g0, u0, g1, u1, ...]
    own_expert_gate = True  # the clamped SwiGLU, GptOssExperts._apply_gate
    router_attr = "router"
    router_class = "GptOssTopKRouter"

    @classmethod
    def routing(cls, router: nn.Module) -> Dict[str, Any]:
        return _softmax_topk(router, renormalize=True)


class Glm4MoeAdapter(TransformersMoEMLP):
    """GLM-4-MoE: DeepSeek-V3's block under other names: [E, out, in] experts with the default
    SwiGLU; the router `gate` with DeepSeek-V3's arithmetic (its e_score_correction_bias, groups and
    routed scaling); the shared experts `shared_experts` (one module), ungated."""

    family = "GLM-4-MoE"
    block_class = "Glm4MoeMoE"
    weights_out_in = True  # [E, out, in]
    expert_biases = False
    swiglu_columns = "concat"  # [gate | up]
    own_expert_gate = False  # transformers' default gate
    router_attr = "gate"
    router_class = "Glm4MoeTopkRouter"
    selection_bias = "e_score_correction_bias"
    shared_attr = "shared_experts"

    @classmethod
    def routing(cls, router: nn.Module) -> Dict[str, Any]:
        return DeepseekV3Adapter.routing(router)


FAMILIES: Tuple[Type[TransformersMoEMLP], ...] = (
    MixtralAdapter, Qwen2MoeAdapter, Qwen3MoeAdapter, OlmoeAdapter, DeepseekV3Adapter, GptOssAdapter, Glm4MoeAdapter,
)  # fmt: skip


class FallbackAdapter(TransformersMoEMLP):
    """The adapter of a block whose family has no class of its own (adapter_class's fallback: dots1,
    Qwen3-Next and the other families whose experts carry transformers' @use_experts_implementation
    layout), served with router="block" only: it calls the block's own
    router, so it needs none of the router's arithmetic. Its facts are not stated but read from the
    block, once, in __init__ (the duck typing the single adapter had before the per-family classes):
    the layout from the experts' flags (is_transposed, has_bias, is_concatenated); the router
    `gate`, else `router` (a weight [E, dim], `top_k`), its e_score_correction_bias as the selection
    bias (sigmoid scores for the aux loss; update_bias moves it); the shared expert `shared_expert` or
    `shared_experts` and its sigmoid gate `shared_expert_gate`. What the block holds beyond those (a
    module, parameter or buffer of its own) is refused rather than left out of the output, as are
    router jitter noise and router="geomoe" (no family facts to map the router's arithmetic)."""

    family = "a block read as the fallback"  # replaced by the block's class name in __init__

    def __init__(self, block: nn.Module, router: str = "block", backend: str = "auto"):
        _check_router_arg(router, block)
        if router == "geomoe":
            supported = ", ".join(f"{f.family} ({f.block_class})" for f in FAMILIES)
            raise _refuse(
                block,
                f"router='geomoe' maps the router of a family with an adapter class of its own ({supported}); "
                f"{type(block).__name__}{_model_type(block)} has none, so its router's arithmetic is not known: "
                "use router='block' (the default), which calls the block's own router",
            )
        experts = _experts_of(block)

        def has(name: str) -> bool:
            return getattr(block, name, None) is not None

        gate = getattr(block, "gate", None) if has("gate") else getattr(block, "router", None)
        facts = dict(
            family=type(block).__name__,
            block_class=type(block).__name__,
            weights_out_in=not bool(experts.is_transposed),
            expert_biases=bool(experts.has_bias),
            swiglu_columns="interleaved" if getattr(experts, "is_concatenated", True) is False else "concat",
            router_attr="router" if not has("gate") and has("router") else "gate",
            router_class=type(gate).__name__,
            selection_bias="e_score_correction_bias" if getattr(gate, "e_score_correction_bias", None) is not None else None,
            shared_attr=next((n for n in ("shared_expert", "shared_experts") if has(n)), None),
            shared_gate_attr="shared_expert_gate" if has("shared_expert_gate") else None,
        )
        for fact, value in facts.items():  # the block's facts, as a family's class body states its own
            setattr(self, fact, value)
        super().__init__(block, router, backend)

    @classmethod
    def serves(cls, block: nn.Module) -> bool:
        return True  # any block: what it cannot serve is refused as its facts are read

    @classmethod
    def routing(cls, router: nn.Module) -> Dict[str, Any]:
        """The options read from the router, for the aux loss's scores: sigmoid with a correction bias
        (DeepSeek-V3's kind, its groups and routed scaling), else softmax."""
        if getattr(router, "e_score_correction_bias", None) is None:
            return _softmax_topk(router)
        return DeepseekV3Adapter.routing(router)

    def check_block(self, block: nn.Module) -> None:  # type: ignore[override]
        if getattr(block, "jitter_noise", 0):
            raise _refuse(block, f"expected router jitter noise 0, got {block.jitter_noise}")
        known = {"experts", self.router_attr, self.shared_attr, self.shared_gate_attr}
        own = [n for n, _ in block.named_children() if n not in known]
        own += [n for n, _ in list(block.named_parameters(recurse=False)) + list(block.named_buffers(recurse=False))]
        if own:
            raise _refuse(
                block,
                f"expected only 'experts', the router, the shared expert and its gate (a block without an adapter "
                f"class is read by those), got also {own} (the adapter would leave them out)",
            )


def _model_type(block: nn.Module) -> str:
    config = getattr(getattr(block, "experts", None), "config", None) or getattr(block, "config", None)
    model_type = getattr(config, "model_type", None)
    return f" (model_type {model_type!r})" if model_type else ""


def adapter_class(block: nn.Module) -> Type[TransformersMoEMLP]:
    """The adapter class of the block's family, by the block's class (the most derived one that a
    family serves); FallbackAdapter (router="block" only, its facts read from the block) else."""
    for t in type(block).__mro__:
        for family in FAMILIES:
            if t.__name__ == family.block_class:
                return family
    return FallbackAdapter


def from_block(block: nn.Module, router: str = "block", backend: str = "auto") -> TransformersMoEMLP:
    """The adapter of the block's family over its parameters (what MoEMLP.from_transformers returns)."""
    _check_router_arg(router, block)
    _experts_of(block)
    return adapter_class(block)(block, router, backend)


def moe_from_transformers(cls: Any, block: nn.Module, router: str = "block", backend: str = "auto") -> TransformersMoEMLP:
    """from_block(block, router, backend) (the entry point's old signature; `cls` unused)."""
    return from_block(block, router, backend)


_moe.set_transformers_adapter(from_block)
