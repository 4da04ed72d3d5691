"""The transformers experts backend "geomoe": importing this module registers it with
`transformers.integrations.moe.ExpertsInterface` (`register()` does it again, under another name or
backend if asked). Then any model whose experts class carries `@use_experts_implementation` runs its
experts on the geomoe ops:

    import geomoe_kernels.integrations.transformers  # registers "geomoe"
    model = AutoModelForCausalLM.from_pretrained(name, experts_implementation="geomoe")

What runs, per call: `route` (the sort-free permutation of the model's own routing result), the
up-projection reading the tokens through the permutation (no permuted copy), the gate, the
down-projection, the optional post-expert norm, and `unpermute` (the weighted, deterministic combine
in float32). Eagerly (no post-expert norm) all of it is one autograd.Function over a cached launch
plan (geomoe_kernels/nn/_layer_plan.py's run_routed: the implementations the ops would run, the same
bits, without a custom-op dispatch each); under torch.compile, and with a post-expert norm, the ops. The gate is fused into the first grouped GEMM when it is a standard one:
- has_gate with the decorator's default `_apply_gate` (act_fn(gate) * up on [gate | up]) and act_fn
  SiLU: one `expert_mlp` op with SwiGLU (backward keeps only the pre-activation);
- has_gate=False with act_fn SiLU or erf-GELU: one `expert_mlp` op with that activation;
- anything else (GeGLU, GPT-OSS's clamped SwiGLU on interleaved columns, relu2, ...): two
  `grouped_mm` ops with the module's own `_apply_gate` / `act_fn` between them (autograd through it).
  Every backend fuses the same set (the CUDA core's grouped GEMM fuses SwiGLU too).

Layouts. The decorator's flags: is_transposed (weights [E, in, out] rather than [E, out, in]),
is_concatenated (gate and up side by side, or interleaved: only the module's `_apply_gate` reads
that), has_bias, has_gate (gate_up_proj, else up_proj), has_post_expert_norm. The geomoe ops read
[E, in, out] row-major weights. Transposed weights are that already, and are read in place. The
non-transposed layout [E, out, in] is read as a transposed view, which is row-major only if the
parameter's storage is: so on the first call (outside torch.compile tracing) each such parameter's
storage is re-laid out ONCE, in place, to the [E, in, out] order, keeping its shape, values and
identity (`param.data` is replaced by a strided view of the same shape). That is a one-time copy of
the expert weights, instead of one per call; everything else reading the parameter (eager,
state_dict, save_pretrained, optimizers) sees the same tensor. `prepare(model)` does it up front
(call it before wrapping the model in DDP/FSDP, building an optimizer or compiling); with
`register(relayout=False)` the parameters are left alone and each call copies the transposed
weights (the op's contiguity) instead.

Dtypes: float64 (the reference, for checking), float32, bfloat16, float16; under autocast the
experts run in the autocast dtype, as eager's linears do. The routing weights are applied in float32
(float64 for float64 inputs), and gradients reach them (the router's gradient).

Expert parallelism: with `_is_expert_parallel` (transformers' MoEParamShard), ids >= num_experts mark
routes to other ranks' experts with zero weight. They are honoured: they run on the last local
expert with weight zero, adding nothing and receiving no gradient (wasted rows, as transformers'
batched_mm does). Versions of transformers before the flag existed may send such sentinels to any
experts module, so there they are honoured always. Expert weights that are DTensors (sharded but not turned into local tensors) are
refused with an error naming the layout flags."""

from __future__ import annotations

import functools
import logging
from typing import Any, Callable, Optional

import torch
from torch import Tensor, nn

from .. import backend as _backend
from ..nn import _layer_plan
from ..ops import expert_mlp, grouped_mm, route, unpermute

try:
    from transformers.activations import GELUActivation, SiLUActivation
    from transformers.integrations import moe as _hf_moe
except ImportError as exc:  # pragma: no cover - the message is the point
    raise ImportError(
        "geomoe_kernels.integrations.transformers needs transformers >= 5 (pip install 'geomoe-kernels[hf]')"
    ) from exc

if not hasattr(_hf_moe, "ExpertsInterface"):  # pragma: no cover
    raise ImportError(
        "geomoe_kernels.integrations.transformers needs transformers >= 5 (transformers.integrations.moe.ExpertsInterface); "
        "pip install 'geomoe-kernels[hf]'"
    )

NAME = "geomoe"
_log = logging.getLogger(__name__)
_LAYOUT_FLAGS = ("is_transposed", "is_concatenated", "has_bias", "has_gate", "has_post_expert_norm", "_is_expert_parallel")
# what every transformers 5 decorator sets; the last two came later (absent: no norm, and EP sentinels
# possible on any experts module, as those versions' experts functions assume)
_REQUIRED_FLAGS = _LAYOUT_FLAGS[:4]


class UnsupportedExpertsLayout(ValueError):
    """The experts module's layout cannot be served by the geomoe experts backend."""


def layout_flags(module: nn.Module) -> str:
    """The decorator's layout flags of an experts module, as the errors quote them."""
    flags = ", ".join(f"{f}={getattr(module, f, '<missing>')}" for f in _LAYOUT_FLAGS)
    return f"{type(module).__name__}({flags})"


def _refuse(module: nn.Module, what: str) -> UnsupportedExpertsLayout:
    return UnsupportedExpertsLayout(f"geomoe experts: {what}; layout {layout_flags(module)}")


def _is_dtensor(t: Tensor) -> bool:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover - torch without distributed
        return False
    return isinstance(t, DTensor)


# ---- the activation: fused or the module's own ---------------------------------------------------


def _activation_name(act: object) -> Optional[str]:
    """'silu' or 'gelu' (erf form) when `act` is exactly that function, else None. Exact types only:
    a subclass may compute something else."""
    t = type(act)
    if t in (nn.SiLU, SiLUActivation):
        return "silu"
    if t is nn.GELU and getattr(act, "approximate", "none") == "none":
        return "gelu"
    if t is GELUActivation and getattr(act, "act", None) is nn.functional.gelu:
        return "gelu"
    return None


def fused_activation(module: nn.Module) -> Optional[str]:
    """The activation the grouped GEMM fuses for this module ('swiglu', 'silu', 'gelu'), or None
    when the module's own gate/activation runs between two grouped GEMMs."""
    act = _activation_name(getattr(module, "act_fn", None))
    if not module.has_gate:
        return act
    default_gate = getattr(type(module), "_apply_gate", None) is _hf_moe._default_apply_gate
    if default_gate and "_apply_gate" not in vars(module) and module.is_concatenated and act == "silu":
        return "swiglu"
    return None


# ---- the weights, read in place -----------------------------------------------------------------


def _kn(w: Tensor, transposed: bool) -> Tensor:
    """[E, in, out] view of a weight stored [E, in, out] (transposed) or [E, out, in]."""
    return w if transposed else w.transpose(1, 2)


def _relayout(param: nn.Parameter, transposed: bool) -> None:
    """Make the [E, in, out] view of `param` row-major, once, keeping its shape and values."""
    with torch.no_grad():
        kn = _kn(param.data, transposed).contiguous()
        param.data = _kn(kn, transposed)


def _weight(module: nn.Module, name: str, relayout: bool) -> Tensor:
    w = getattr(module, name, None)
    if not isinstance(w, Tensor) or w.dim() != 3:
        got = "missing" if w is None else f"{type(w).__name__} of shape {list(getattr(w, 'shape', []))}"
        raise _refuse(module, f"expected a 3-d expert weight '{name}', got {got}")
    if _is_dtensor(w):
        raise _refuse(module, f"'{name}' is a DTensor (sharded expert weights); only local expert weights are served")
    transposed = bool(module.is_transposed)
    kn = _kn(w, transposed)
    if not kn.is_contiguous() and relayout and isinstance(w, nn.Parameter) and not torch.compiler.is_compiling():
        _relayout(w, transposed)
        _log.info("geomoe experts: re-laid out %s.%s once to [E, in, out] row-major storage", type(module).__name__, name)
        kn = _kn(w, transposed)
    return kn


def _bias(module: nn.Module, name: str) -> Optional[Tensor]:
    if not module.has_bias:
        return None
    b = getattr(module, name, None)
    if not isinstance(b, Tensor) or b.dim() != 2:
        got = "missing" if b is None else f"{type(b).__name__} of shape {list(getattr(b, 'shape', []))}"
        raise _refuse(module, f"expected a 2-d expert bias '{name}' (has_bias=True), got {got}")
    if _is_dtensor(b):
        raise _refuse(module, f"'{name}' is a DTensor (sharded expert weights); only local expert weights are served")
    return b


def prepare(model: nn.Module) -> int:
    """Re-lay out, once and in place, the non-transposed expert weights of every experts module in
    `model` (what the first call does otherwise). Returns how many parameters it changed."""
    changed = 0
    for module in model.modules():
        if not all(hasattr(module, f) for f in ("has_gate", "is_transposed", "down_proj")):
            continue
        for name in ("gate_up_proj" if module.has_gate else "up_proj", "down_proj"):
            w = getattr(module, name, None)
            if isinstance(w, nn.Parameter) and w.dim() == 3 and not _is_dtensor(w):
                if not _kn(w, bool(module.is_transposed)).is_contiguous():
                    _relayout(w, bool(module.is_transposed))
                    changed += 1
    return changed


# ---- the experts forward ------------------------------------------------------------------------


def _check_module(module: nn.Module, hidden_states: Tensor, top_k_index: Tensor, top_k_weights: Tensor) -> None:
    missing = [f for f in _REQUIRED_FLAGS + ("num_experts",) if not hasattr(module, f)]
    if missing:
        raise _refuse(module, f"missing {missing} (is the class decorated with @use_experts_implementation?)")
    if hidden_states.dim() != 2:
        raise ValueError(
            f"geomoe experts: argument 'hidden_states' expected [tokens, hidden], got shape {list(hidden_states.shape)}"
        )
    T = hidden_states.shape[0]
    if top_k_index.dim() != 2 or top_k_index.shape[0] != T:
        raise ValueError(f"geomoe experts: argument 'top_k_index' expected [{T}, top_k], got shape {list(top_k_index.shape)}")
    if top_k_weights.shape != top_k_index.shape:
        raise ValueError(
            f"geomoe experts: argument 'top_k_weights' expected shape {list(top_k_index.shape)} (as top_k_index), "
            f"got {list(top_k_weights.shape)}"
        )


def _compute_dtype(x: Tensor) -> torch.dtype:
    if x.dtype in (torch.float32, torch.float64) and torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return x.dtype


def _contiguous(t: Optional[Tensor]) -> Optional[Tensor]:
    return None if t is None else t.contiguous()


class _ModuleGate:
    """The experts module's own gate (has_gate: `_apply_gate`) or activation (`act_fn`) between the
    two grouped GEMMs, its output's shape checked against down_proj's input."""

    def __init__(self, module: nn.Module, width: int):
        self.module, self.width = module, width

    def __call__(self, pre: Tensor) -> Tensor:
        m: Any = self.module
        hidden = m._apply_gate(pre) if m.has_gate else m.act_fn(pre)
        if hidden.dim() != 2 or hidden.shape[1] != self.width:
            raise _refuse(
                m,
                f"the gate/activation gave rows of shape {list(hidden.shape)}, expected [{pre.shape[0]}, {self.width}] "
                f"(down_proj's input size)",
            )
        return hidden


def experts_forward(
    module: Any,
    hidden_states: Tensor,
    top_k_index: Tensor,
    top_k_weights: Tensor,
    backend: str = "auto",
    relayout: bool = True,
    use_plan: bool = True,
) -> Tensor:
    """The experts of a transformers MoE block on the geomoe ops: [T, hidden] from the tokens and
    the model's routing result (expert ids [T, k] and their weights [T, k]). use_plan: eagerly, one
    autograd.Function over a launch plan (the same bits); False: through the ops, one per step."""
    _check_module(module, hidden_states, top_k_index, top_k_weights)
    dtype = _compute_dtype(hidden_states)
    x = hidden_states.to(dtype)
    T, D = x.shape
    k, E = top_k_index.shape[1], int(module.num_experts)
    w1 = _weight(module, "gate_up_proj" if module.has_gate else "up_proj", relayout)
    w2 = _weight(module, "down_proj", relayout)
    b1 = _bias(module, "gate_up_proj_bias" if module.has_gate else "up_proj_bias")
    b2 = _bias(module, "down_proj_bias")
    if w1.shape[0] != E or w2.shape[0] != E or w1.shape[1] != D or w2.shape[2] != D:
        order = "[E, in, out]" if module.is_transposed else "[E, out, in]"
        raise _refuse(
            module,
            f"expected expert weights {order} with E = num_experts = {E} and hidden size {D} (the tokens'), "
            f"got {'gate_up_proj' if module.has_gate else 'up_proj'} {list(getattr(module, 'gate_up_proj' if module.has_gate else 'up_proj').shape)} "
            f"and down_proj {list(module.down_proj.shape)}",
        )
    w1, w2 = w1.to(dtype), w2.to(dtype)
    b1 = b1.to(dtype) if b1 is not None else None
    b2 = b2.to(dtype) if b2 is not None else None

    ids = top_k_index.to(torch.int64)
    weights = top_k_weights.to(torch.promote_types(dtype, torch.float32))
    if getattr(
        module, "_is_expert_parallel", True
    ):  # off-rank routes (id >= E, weight 0): run on the last expert, weight exactly 0
        off_rank = ids >= E
        ids = ids.clamp_max(E - 1)
        weights = weights.masked_fill(off_rank, 0.0)
    activation = fused_activation(module)
    if use_plan and not getattr(module, "has_post_expert_norm", False) and not torch.compiler.is_compiling():
        # one autograd.Function over a cached launch plan (route, the experts, the combine): the
        # implementations the ops below would run, the same bits, without an op dispatch each
        out = _layer_plan.run_routed(
            (E, k, activation or "none", backend), weights.contiguous(), ids.contiguous(), x.contiguous(),
            w1.contiguous(), _contiguous(b1), w2.contiguous(), _contiguous(b2), None,
            None if activation is not None else _ModuleGate(module, w2.shape[1]),
        )  # fmt: skip
        return out.to(hidden_states.dtype)
    row_to_flat, flat_to_row, offsets = route(ids.contiguous(), E, backend)
    if activation is not None and not getattr(module, "has_post_expert_norm", False):
        # the combine in expert_mlp: its backward forms the routing weights' gradient (as the plan)
        out = expert_mlp(
            x, w1, b1, w2, b2, offsets, activation, backend, gather=row_to_flat, flat_to_row=flat_to_row, top_k=k,
            weights=weights.contiguous(),
        )  # fmt: skip
        return out.to(hidden_states.dtype)
    if activation is not None:
        rows = expert_mlp(x, w1, b1, w2, b2, offsets, activation, backend, gather=row_to_flat, flat_to_row=flat_to_row, top_k=k)
    else:
        pre = grouped_mm(x, w1, offsets, b1, "none", backend, gather=row_to_flat, flat_to_row=flat_to_row, top_k=k)
        hidden = _ModuleGate(module, w2.shape[1])(pre)
        rows = grouped_mm(hidden.to(dtype), w2, offsets, b2, "none", backend)
    if getattr(module, "has_post_expert_norm", False):
        rows = module.post_expert_norm(rows).to(dtype)
    out = unpermute(rows, row_to_flat, flat_to_row, k, weights, None, backend)
    return out.to(hidden_states.dtype)


def register(name: str = NAME, backend: str = "auto", relayout: bool = True) -> Callable:
    """Register the geomoe experts under `name` with transformers' ExpertsInterface (global: every
    model sees it), running the ops on `backend` ('auto', 'torch', 'triton', 'cuda'). relayout:
    whether non-transposed expert weights are re-laid out once in place (see the module docstring).
    Returns the registered function."""
    _backend.check_backend_name(backend)
    if not isinstance(name, str) or not name or name == "eager":
        raise ValueError(f"register: argument 'name' expected a non-empty name other than 'eager', got {name!r}")

    @functools.wraps(experts_forward)
    def geomoe_experts_forward(self: nn.Module, hidden_states: Tensor, top_k_index: Tensor, top_k_weights: Tensor) -> Tensor:
        return experts_forward(self, hidden_states, top_k_index, top_k_weights, backend=backend, relayout=relayout)

    _hf_moe.ExpertsInterface.register(name, geomoe_experts_forward)
    return geomoe_experts_forward


register()
