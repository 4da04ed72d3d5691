"""The CUDA core (geomoe_kernels._cuda_core, built by setup.py with nvcc): loads it, says why when it
cannot, and registers its kernels as the 'cuda' backend. The wrappers pass data pointers, sizes
and the current stream, each argument by its name; the ops have already checked devices, dtypes,
shapes and contiguity.

The same kernels built by the host compiler into geomoe_kernels._cuda_emulated run on the CPU
(csrc/emulation/): with GEOMOE_CUDA_EMULATE=1 the 'cuda' backend takes CPU tensors through it, and
GEOMOE_CUDA_EMULATE=asan picks its AddressSanitizer build (which needs libasan preloaded)."""

from __future__ import annotations

import functools
import importlib
import os
from typing import Dict, Optional, Tuple

import torch
from torch import Tensor

from . import activations
from . import backend as _backend
from . import kernel_recipes as recipe

_DTYPE = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
ROUTE_BLOCK = 32  # ids per histogram block and per scatter warp (one id a lane; the core checks it)


def load() -> Tuple[Optional[object], str]:
    """(module or None, a line saying what was loaded or why not)."""
    try:
        core = importlib.import_module("geomoe_kernels._cuda_core")
    except ImportError as exc:
        return None, f"not built ({exc}); reinstall where nvcc is found (see setup.py)"
    return core, f"loaded from {core.__file__} for sm {core.architectures()}"


_core, _status = load()

EMULATED_MODULES = {"1": "_cuda_emulated", "asan": "_cuda_emulated_asan"}
_emulated: Dict[str, Tuple[Optional[object], str]] = {}


_ON = ("1", "true", "yes", "on")
_OFF = ("", "0", "false", "no", "off")


def emulation() -> Optional[str]:
    """The emulated build GEOMOE_CUDA_EMULATE asks for ('1' or 'asan'), or None when it is off. The
    usual words work (1/true/yes/on, 0/false/no/off, any case); anything else is an error naming the
    variable, never a silent off."""
    return _emulation_of(os.environ.get("GEOMOE_CUDA_EMULATE", "0"))


@functools.lru_cache(maxsize=8)
def _emulation_of(raw: str) -> Optional[str]:
    value = raw.strip().lower()
    if value in _ON:
        return "1"
    if value == "asan":
        return "asan"
    if value in _OFF:
        return None
    raise ValueError(
        f"environment variable GEOMOE_CUDA_EMULATE expected 1 (or true, yes, on), asan, or 0 (or false, no, off), got {raw!r}"
    )


def load_emulated(variant: str = "1") -> Tuple[Optional[object], str]:
    """(emulated module or None, a line saying what was loaded or why not). The ASan build is
    imported only when asked for: without libasan preloaded, its import ends the process."""
    if variant not in _emulated:
        name = EMULATED_MODULES[variant]
        try:
            core = importlib.import_module(f"geomoe_kernels.{name}")
            _emulated[variant] = core, f"the kernels run on the CPU, loaded from {core.__file__}"
        except ImportError as exc:
            _emulated[variant] = None, f"not built ({exc}); reinstall where a C++ compiler and the CUDA headers are"
    return _emulated[variant]


class _OnDevice:
    """The core's launchers, each called with the tensor's device current: the core launches on the
    current device (kernel attributes such as the dynamic shared-memory limit are per device too),
    and a launch into another device's stream is refused."""

    def __init__(self, core, index: int):
        self._core, self._index = core, index

    def __getattr__(self, name: str):
        launcher = getattr(self._core, name)

        def on_device(*args, **kwargs):
            with torch.cuda.device(self._index):
                return launcher(*args, **kwargs)

        return on_device


def _core_for(t: Tensor):
    """The real core for CUDA tensors (on their device when another is current), the emulated one
    for CPU tensors (the backend has checked that the one needed is there)."""
    if t.device.type != "cuda":
        return load_emulated(emulation() or "1")[0]
    index = t.device.index if t.device.index is not None else torch.cuda.current_device()
    return _core if index == torch.cuda.current_device() else _OnDevice(_core, index)


def _any_core():
    """For the launch constants (tile and block sizes), the same in both builds of the sources."""
    return _core if _core is not None else _core_for(torch.empty(0))


def runs_on(capability: Tuple[int, int], architectures: str) -> bool:
    """Whether a build for `architectures` ("80;90a", PTX as "compute_90") has code for a device of
    this compute capability: a cubin sm_XY runs on X.Y' for Y' >= Y, an arch-specific sm_XYa only on
    X.Y, PTX compute_XY (compiled by the driver at load) on anything from X.Y up."""
    major, minor = capability
    for arch in filter(None, architectures.replace(",", ";").split(";")):
        ptx = arch.startswith("compute_")
        digits = arch.removeprefix("compute_").removeprefix("sm_")
        specific = digits.endswith("a")
        digits = digits.rstrip("a")
        x, y = int(digits[:-1]), int(digits[-1])
        if (
            (specific and (major, minor) == (x, y))
            or (not specific and not ptx and major == x and minor >= y)
            or (ptx and (major, minor) >= (x, y))
        ):
            return True
    return False


@functools.lru_cache(maxsize=None)
def _architecture_reason(index: int) -> Optional[str]:
    major, minor = torch.cuda.get_device_capability(index)
    built = _core.architectures()
    if runs_on((major, minor), built):
        return None
    return (
        f"the CUDA core was built for {built}, which has no code for this device (sm_{major}{minor}); "
        f"rebuild with GEOMOE_CUDA_ARCHS including {major}{minor}"
    )


def device_reason(device: torch.device) -> Optional[str]:
    """Why the 'cuda' backend cannot run on `device` (None: it can): a CUDA device needs the real core
    with code for its architecture, CPU tensors GEOMOE_CUDA_EMULATE and the emulated core."""
    if device.type == "cuda":
        if _core is None:
            return f"the CUDA core is {_status}"
        if not torch.cuda.is_available():  # nothing to compare with (a CPU build of torch)
            return None
        return _architecture_reason(device.index if device.index is not None else torch.cuda.current_device())
    variant = emulation()
    if variant is None or device.type != "cpu":
        return (
            f"the CUDA core runs on CUDA tensors, got tensors on {device} "
            "(GEOMOE_CUDA_EMULATE=1 runs CPU tensors through its emulation)"
        )
    core, status = load_emulated(variant)
    return None if core is not None else f"the emulated CUDA core is {status}"


def _stream(t: Tensor) -> int:
    return torch.cuda.current_stream(t.device).cuda_stream if t.device.type == "cuda" else 0


def _p(t: Optional[Tensor]) -> int:
    return 0 if t is None else t.data_ptr()


class CudaGating:
    """The gating recipe's kernel (geomoe_kernels.kernel_recipes.topk_gating)."""

    def tokens_per_block(self, num_experts: int) -> int:
        return _any_core().gating_tokens_per_block()

    def gating(self, logits, bias, top_k, softmax, renormalize, w, ids, counts, partial) -> None:
        T, E = logits.shape
        _core_for(logits).topk_gating(
            logits=_p(logits),
            tokens=T,
            num_experts=E,
            bias=_p(bias),
            top_k=top_k,
            softmax=softmax,
            renormalize=renormalize,
            weights=_p(w),
            ids=_p(ids),
            counts=_p(counts),
            partial=_p(partial),
            stream=_stream(logits),
        )

    def fused_with(self, routing: object) -> Optional["CudaGateRoute"]:
        """The gating + routing pair for the layer plan when routing is the CUDA core's too."""
        return CudaGateRoute() if isinstance(routing, CudaRouting) else None


class CudaGateRoute:
    """kernel_recipes.gate_route's kernels: the core's gate_route and gate_scatter."""

    def tokens_per_block(self, num_experts: int, slots: int) -> int:
        return _any_core().gating_tokens_per_block()

    def gate(self, logits, bias, top_k, shared, softmax, renormalize, aux_coef, ticket, out) -> None:
        T, E = logits.shape
        _core_for(logits).gate_route(
            logits=_p(logits),
            tokens=T,
            num_experts=E,
            bias=_p(bias),
            top_k=top_k,
            shared=shared,
            softmax=softmax,
            renormalize=renormalize,
            has_aux=aux_coef is not None,
            aux_coef=aux_coef if aux_coef is not None else 0.0,
            weights=_p(out["weights"]),
            ids=_p(out["ids"]),
            hist=_p(out["hist"]),
            partial=_p(out["partial"]),
            load=_p(out["load"]),
            prob_mean=_p(out["prob_mean"]),
            offsets=_p(out["offsets"]),
            aux=_p(out.get("aux")),
            ticket=_p(ticket),
            stream=_stream(logits),
        )

    pack_dtypes = tuple(_DTYPE)
    max_shared = 32  # the core's gate_route takes at most 32 shared experts (its shared memory)

    def pack(self, sources, dtype):
        """The layer plan's weight pack (nn/_layer_plan._pack_views): one launch."""
        if not 1 <= len(sources) <= 8 or any(t.dtype != sources[0].dtype for t in sources) or dtype not in _DTYPE:
            raise ValueError(
                f"pack: expected 1 to 8 tensors of one of {list(_DTYPE)}, got {[t.dtype for t in sources]} -> {dtype}"
            )
        srcs = [t.contiguous() for t in sources]
        out = torch.empty(sum(t.numel() for t in srcs), dtype=dtype, device=srcs[0].device)
        _core_for(out).pack(
            src_dtype=_DTYPE[srcs[0].dtype],
            out_dtype=_DTYPE[dtype],
            srcs=[_p(t) for t in srcs],
            sizes=[t.numel() for t in srcs],
            out=_p(out),
            stream=_stream(out),
        )
        return out

    def scatter(self, ids, num_experts, tokens_per_block, out) -> None:
        _core_for(ids).gate_scatter(
            ids=_p(ids),
            n=ids.numel(),
            num_experts=num_experts,
            entries_per_block=tokens_per_block * ids.shape[1],
            blocks=out["hist"].shape[0],
            prefix=_p(out["hist"]),
            offsets=_p(out["offsets"]),
            row_to_flat=_p(out["row_to_flat"]),
            flat_to_row=_p(out["flat_to_row"]),
            stream=_stream(ids),
        )

    def gating_backward(self, grad_weights, logits, ids, top_k, load, grad_aux, aux_coef, score_func, renormalize):
        grad = torch.empty_like(logits)
        gw = None if grad_weights is None else grad_weights.float()
        if gw is not None and (gw.shape != ids.shape or gw.stride() != ids.stride()):
            raise ValueError(
                f"gate_route's backward: grad_weights expected ids' shape and strides {ids.stride()}, got {gw.stride()}"
            )
        ga = None if grad_aux is None else grad_aux.float()
        _core_for(logits).gate_route_backward(
            logits=_p(logits),
            tokens=logits.shape[0],
            num_experts=logits.shape[1],
            ids=_p(ids),
            top_k=top_k,
            ld=ids.stride(0),
            grad_weights=_p(gw),
            load=_p(load),
            grad_aux=_p(ga),
            aux_coef=aux_coef,
            softmax=score_func == "softmax",
            renormalize=renormalize,
            grad_logits=_p(grad),
            stream=_stream(logits),
        )
        return grad


topk_gating = functools.partial(recipe.topk_gating, CudaGating())


def topk_gating_backward(grad_weights, grad_prob_mean, logits, ids, score_func, renormalize):
    grad = torch.empty_like(logits)
    gw = None if grad_weights is None else grad_weights.float().contiguous()
    gp = None if grad_prob_mean is None else grad_prob_mean.float().contiguous()
    _core_for(logits).topk_gating_backward(
        logits=_p(logits),
        tokens=logits.shape[0],
        num_experts=logits.shape[1],
        ids=_p(ids),
        top_k=ids.shape[1],
        grad_weights=_p(gw),
        grad_prob_mean=_p(gp),
        softmax=score_func == "softmax",
        renormalize=renormalize,
        grad_logits=_p(grad),
        stream=_stream(logits),
    )
    return grad


class CudaRouting:
    """The routing recipe's kernels (geomoe_kernels.kernel_recipes.route)."""

    def block(self, num_experts: int) -> int:
        return ROUTE_BLOCK

    def histogram(self, flat, E, block, per_block) -> None:
        _core_for(flat).route_histogram(
            ids=_p(flat), n=flat.numel(), num_experts=E, block=block, per_block=_p(per_block), stream=_stream(flat)
        )

    def scatter(self, flat, E, block, base, row_to_flat, flat_to_row) -> None:
        _core_for(flat).route_scatter(
            ids=_p(flat),
            n=flat.numel(),
            num_experts=E,
            block=block,
            base=_p(base),
            row_to_flat=_p(row_to_flat),
            flat_to_row=_p(flat_to_row),
            stream=_stream(flat),
        )


route = functools.partial(recipe.route, CudaRouting())


def permute(x, row_to_flat, top_k, weights):
    out = x.new_empty(row_to_flat.numel(), x.shape[1])
    w = None if weights is None else weights.reshape(-1)
    _core_for(x).permute(
        dtype=_DTYPE[x.dtype],
        x=_p(x),
        ldx=x.stride(0),
        row_to_flat=_p(row_to_flat),
        weights=_p(w),
        rows=out.shape[0],
        d=x.shape[1],
        top_k=top_k,
        out=_p(out),
        ldo=out.stride(0),
        stream=_stream(x),
    )
    return out


def unpermute(rows, flat_to_row, top_k, weights, shared):
    T, d = flat_to_row.numel() // top_k, rows.shape[1]
    out = rows.new_empty(T, d)
    _core_for(rows).unpermute(
        dtype=_DTYPE[rows.dtype],
        rows=_p(rows),
        ldr=rows.stride(0),
        flat_to_row=_p(flat_to_row),
        weights=_p(weights),
        shared=_p(shared),
        lds=shared.stride(0) if shared is not None else 0,
        tokens=T,
        d=d,
        top_k=top_k,
        out=_p(out),
        ldo=out.stride(0),
        stream=_stream(rows),
    )
    return out


def unpermute_weight_grad(grad_out, rows, flat_to_row, top_k):
    out = torch.empty(grad_out.shape[0], top_k, dtype=torch.float32, device=rows.device)
    _core_for(rows).unpermute_weight_grad(
        dtype=_DTYPE[rows.dtype],
        grad_out=_p(grad_out),
        ldg=grad_out.stride(0),
        rows=_p(rows),
        ldr=rows.stride(0),
        flat_to_row=_p(flat_to_row),
        tokens=grad_out.shape[0],
        d=rows.shape[1],
        top_k=top_k,
        grad_w=_p(out),
        stream=_stream(rows),
    )
    return out


class CudaDepthwiseConv:
    """The masked depthwise conv recipe's kernels (geomoe_kernels.kernel_recipes)."""

    def wgrad_rows_per_block(self) -> int:
        return _any_core().dwconv_grad_rows_per_block()

    def conv(self, x, neighbors, weight, bias, flip, out) -> None:
        _core_for(x).masked_depthwise_conv(
            dtype=_DTYPE[x.dtype],
            x=_p(x),
            ldx=x.stride(0),
            neighbors=_p(neighbors),
            kk=neighbors.shape[1],
            weight=_p(weight),
            bias=_p(bias),
            rows=x.shape[0],
            channels=x.shape[1],
            flip=flip,
            out=_p(out),
            ldo=out.stride(0),
            stream=_stream(x),
        )

    def wgrad(self, x, grad_out, neighbors, dw, db) -> None:
        R, C = x.shape
        _core_for(x).masked_depthwise_conv_wgrad(
            dtype=_DTYPE[x.dtype],
            x=_p(x),
            ldx=x.stride(0),
            grad_out=_p(grad_out),
            ldg=grad_out.stride(0),
            neighbors=_p(neighbors),
            kk=neighbors.shape[1],
            rows=R,
            channels=C,
            dw_partial=_p(dw),
            db_partial=_p(db),
            stream=_stream(x),
        )


masked_depthwise_conv = functools.partial(recipe.masked_depthwise_conv, CudaDepthwiseConv())
masked_depthwise_conv_backward = functools.partial(recipe.masked_depthwise_conv_backward, CudaDepthwiseConv())


class CudaGroupedGemm:
    """The CUDA core's kernels of the grouped-GEMM recipe (geomoe_kernels.kernel_recipes).
    SwiGLU's pre-activation columns (W1's, b1's, pre's and d pre's) are [gate | up] halves for
    'swiglu' and pairs [g0, u0, g1, u1, ...] for 'swiglu_interleaved' (the kernels fuse both
    layouts: the core's kSwiglu with its interleaved flag); swiglu_interleaved=True reads 'swiglu'
    as interleaved too."""

    def __init__(self, swiglu_interleaved: bool = False):
        self.swiglu_interleaved = swiglu_interleaved

    def _act(self, activation: str) -> Tuple[int, bool]:
        """(the core's Activation code, its interleaved flag) for an activation name."""
        if activation == "swiglu_interleaved":
            return int(activations.Activation.SWIGLU), True
        return activations.code(activation), self.swiglu_interleaved

    def block_rows(self, dtype: torch.dtype) -> int:
        return _any_core().grouped_mm_block_rows()

    routing_chunk = 8  # the routing gradient's partials: one a thread's 8 epilogue columns

    def combine(self, rows, flat_to_row, top_k, weights, shared):
        """The combine of expert_mlp with routing weights: this backend's unpermute."""
        return unpermute(rows, flat_to_row, top_k, weights, shared)

    def weighted_rows(self, grad, gather, top_k, weights):
        """The weight gradient's G for rows combined with routing weights: the weighted permute
        (this core's weight-gradient kernel loads G asynchronously, with no place to weight it)."""
        return permute(grad, gather, top_k, weights)

    def dgrad_routed(self, grad, weight, bias, offsets, schedule, gather, top_k, weights, out, grad_act, pre, partial) -> None:
        """kernel_recipes.RoutesGradients.dgrad_routed (the core's RoutedDgrad, 8-column partials)."""
        K, N = weight.shape[1:]
        b2 = bias.contiguous() if bias is not None else None
        grad_code, interleaved = self._act(grad_act)
        _core_for(grad).grouped_mm(
            dtype=_DTYPE[grad.dtype],
            a=_p(grad),
            lda=grad.stride(0),
            gather=_p(gather),
            top_k=top_k,
            w=_p(weight),
            K=N,
            N=K,
            ldw=weight.stride(1),
            stride_we=weight.stride(0),
            trans_w=True,
            bias=0,
            blocks=schedule.blocks,
            offsets=_p(offsets),
            num_experts=schedule.experts,
            act=0,
            out=_p(out),
            ldo=out.stride(0),
            pre=_p(pre),
            ldp=pre.stride(0),
            grad_act=grad_code,
            rounds=0,
            stream=_stream(grad),
            swiglu_interleaved=interleaved,
            route_weights=_p(weights),
            partial=_p(partial),
            ldq=partial.stride(0),
            route_b2=_p(b2),
        )

    def forward(self, x, weight, offsets, schedule, bias, activation, gather, top_k, out, pre) -> None:
        E, K, N = weight.shape
        act, interleaved = self._act(activation)
        _core_for(x).grouped_mm(
            dtype=_DTYPE[x.dtype],
            a=_p(x),
            lda=x.stride(0),
            gather=_p(gather),
            top_k=top_k,
            w=_p(weight),
            K=K,
            N=N,
            ldw=weight.stride(1),
            stride_we=weight.stride(0),
            trans_w=False,
            bias=_p(bias),
            blocks=schedule.blocks,
            offsets=_p(offsets),
            num_experts=schedule.experts,
            act=act,
            out=_p(out),
            ldo=out.stride(0),
            pre=_p(pre),
            ldp=pre.stride(0) if pre is not None else 0,
            grad_act=0,
            rounds=recipe.interleave_rounds(gather is not None, weight, schedule),  # 0: expert order
            stream=_stream(x),
            swiglu_interleaved=interleaved,
            a_rows=x.shape[0],
        )

    def dgrad(self, grad, weight, offsets, schedule, out, grad_act, pre) -> None:
        """grad @ W[e]^T for each expert's rows; with grad_act, times act'(pre) in the epilogue."""
        K, N = weight.shape[1:]
        grad_code, interleaved = self._act(grad_act)
        _core_for(grad).grouped_mm(
            dtype=_DTYPE[grad.dtype],
            a=_p(grad),
            lda=grad.stride(0),
            gather=0,
            top_k=1,
            w=_p(weight),
            K=N,
            N=K,
            ldw=weight.stride(1),
            stride_we=weight.stride(0),
            trans_w=True,
            bias=0,
            blocks=schedule.blocks,
            offsets=_p(offsets),
            num_experts=schedule.experts,
            act=0,
            out=_p(out),
            ldo=out.stride(0),
            pre=_p(pre),
            ldp=pre.stride(0) if pre is not None else 0,
            grad_act=grad_code,
            rounds=0,
            stream=_stream(grad),
            swiglu_interleaved=interleaved,
            a_rows=grad.shape[0],
        )

    def wgrad(self, a, grad, offsets, gather, top_k, a_activation, partial, partial_db) -> None:
        """(dW, db) partials in float32: A_e^T G_e and G_e's row sums; A = act(a) with a_activation."""
        splits, E, K, N = partial.shape
        a_code, interleaved = self._act(a_activation)
        _core_for(a).grouped_mm_wgrad(
            dtype=_DTYPE[a.dtype],
            a=_p(a),
            lda=a.stride(0),
            a_rows=a.shape[0],
            gather=_p(gather),
            top_k=top_k,
            g=_p(grad),
            ldg=grad.stride(0),
            g_rows=grad.shape[0],
            offsets=_p(offsets),
            num_experts=E,
            K=K,
            N=N,
            splits=splits,
            a_act=a_code,
            partial=_p(partial),
            partial_db=_p(partial_db),
            stream=_stream(a),
            swiglu_interleaved=interleaved,
        )


_gemm_ops = recipe.grouped_gemm_ops(CudaGroupedGemm())
grouped_mm, grouped_mm_backward = _gemm_ops["grouped_mm"], _gemm_ops["grouped_mm_backward"]
expert_mlp, expert_mlp_backward = _gemm_ops["expert_mlp"], _gemm_ops["expert_mlp_backward"]
# the activations the CUDA grouped GEMM fuses (SwiGLU on [gate | up] or interleaved columns)
_FUSED = ("none", "gelu", "silu", "swiglu", "swiglu_interleaved")


def _gemm_ok(x, activation, weights=None, **_) -> Optional[str]:
    if x.dtype not in (torch.float16, torch.bfloat16):
        return f"the CUDA grouped GEMM takes float16 or bfloat16 (Triton serves float32), got {x.dtype}"
    if activation not in _FUSED:
        return f"the CUDA grouped GEMM fuses none, gelu, silu, swiglu or swiglu_interleaved, got {activation!r}"
    return _weights_ok(weights)  # expert_mlp's routing weights (its combine and routed dgrad read float32)


WHO = "the CUDA core"


def _rows_ok(t: Tensor) -> Optional[str]:
    return _backend.rows_reason(WHO, t)


def _weights_ok(w) -> Optional[str]:
    return _backend.weights_reason(WHO, w)


def _gating_ok(logits, top_k, **_) -> Optional[str]:
    return _backend.gating_reason(WHO, logits, top_k, max_experts=1024, max_k=8)


def register() -> None:
    if _core is None and load_emulated()[0] is None:
        _backend.set_unavailable_reason("cuda", f"the CUDA core is {_status}")
        return
    _backend.set_unavailable_reason("cuda", "the CUDA core has no kernel for it yet")  # the ops not registered below
    _backend.set_device_check("cuda", device_reason)
    r = _backend.register
    r("topk_gating", "cuda", topk_gating, _gating_ok)
    r("topk_gating_backward", "cuda", topk_gating_backward, lambda logits, ids, **_: _gating_ok(logits, ids.shape[1]))
    r(
        "route",
        "cuda",
        route,
        lambda num_experts, **_: (
            None
            if num_experts <= recipe.CUDA_ROUTE_MAX_EXPERTS
            else f"the CUDA histogram keeps E in shared memory: at most {recipe.CUDA_ROUTE_MAX_EXPERTS}, got {num_experts}"
        ),
    )
    r("permute", "cuda", permute, lambda x, weights, **_: _rows_ok(x) or _weights_ok(weights))
    r("unpermute", "cuda", unpermute, lambda rows, weights, **_: _rows_ok(rows) or _weights_ok(weights))
    r("unpermute_weight_grad", "cuda", unpermute_weight_grad, lambda rows, **_: _rows_ok(rows))
    # the 64x64 WMMA version was correct on an H200 but 3.4x slower than the Triton GEMMs at GeoMoE's
    # shape; its rewrite (issue 14: 128-row tiles, cp.async pipeline) is not timed on a GPU yet:
    # backend="auto" keeps Triton; ask for backend="cuda" to use it
    for op, impl in _gemm_ops.items():
        r(op, "cuda", impl, _gemm_ok, auto=False)
    r("masked_depthwise_conv", "cuda", masked_depthwise_conv, lambda x, **_: _rows_ok(x))
    r("masked_depthwise_conv_backward", "cuda", masked_depthwise_conv_backward, lambda x, **_: _rows_ok(x))
