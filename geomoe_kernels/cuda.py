"""The CUDA core (geomoe_kernels._cuda_core, built by setup.py with nvcc): loads it, says why when it
cannot, and registers its kernels as the 'cuda' backend. The wrappers pass data pointers, sizes
and the current stream; the ops have already checked devices, dtypes, shapes and contiguity."""
from __future__ import annotations

import functools
import importlib
from typing import Optional, Tuple

import torch
from torch import Tensor

from . import activations
from . import backend as _backend
from . import kernel_recipes as recipe

_DTYPE = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
ROUTE_BLOCK = 32  # ids per scatter thread: the in-block rank is a short walk


def load() -> Tuple[Optional[object], str]:
    """(module or None, a line saying what was loaded or why not)."""
    try:
        core = importlib.import_module("geomoe_kernels._cuda_core")
    except ImportError as exc:
        return None, f"not built ({exc}); reinstall where nvcc is found (see setup.py)"
    return core, f"loaded from {core.__file__} for sm {core.architectures()}"


_core, _status = load()


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
        if (specific and (major, minor) == (x, y)) or (not specific and not ptx and major == x and minor >= y) \
                or (ptx and (major, minor) >= (x, y)):
            return True
    return False


@functools.lru_cache(maxsize=None)
def _device_reason(index: int) -> Optional[str]:
    major, minor = torch.cuda.get_device_capability(index)
    built = _core.architectures()
    if runs_on((major, minor), built):
        return None
    return (f"the CUDA core was built for {built}, which has no code for this device (sm_{major}{minor}); "
            f"rebuild with GEOMOE_CUDA_ARCHS including {major}{minor}")


def device_reason(device: torch.device) -> Optional[str]:
    if device.type != "cuda" or not torch.cuda.is_available():  # nothing to compare with (a CPU build of torch)
        return None
    return _device_reason(device.index if device.index is not None else torch.cuda.current_device())


def _stream(t: Tensor) -> int:
    return torch.cuda.current_stream(t.device).cuda_stream


def _p(t: Optional[Tensor]) -> int:
    return 0 if t is None else t.data_ptr()


class CudaGating:
    """The gating recipe's kernel (geomoe_kernels.kernel_recipes.topk_gating)."""

    def tokens_per_block(self) -> int:
        return _core.gating_tokens_per_block()

    def gating(self, logits, bias, top_k, softmax, renormalize, w, ids, counts, partial) -> None:
        T, E = logits.shape
        _core.topk_gating(_p(logits), T, E, _p(bias), top_k, softmax, renormalize, _p(w), _p(ids), _p(counts),
                          _p(partial), _stream(logits))


topk_gating = functools.partial(recipe.topk_gating, CudaGating())


def topk_gating_backward(grad_weights, grad_prob_mean, logits, ids, score_func, renormalize):
    grad = torch.empty_like(logits)
    gw = None if grad_weights is None else grad_weights.float().contiguous()
    gp = None if grad_prob_mean is None else grad_prob_mean.float().contiguous()
    _core.topk_gating_backward(_p(logits), logits.shape[0], logits.shape[1], _p(ids), ids.shape[1], _p(gw), _p(gp),
                               score_func == "softmax", renormalize, _p(grad), _stream(logits))
    return grad


class CudaRouting:
    """The routing recipe's kernels (geomoe_kernels.kernel_recipes.route)."""

    def block(self, num_experts: int) -> int:
        return ROUTE_BLOCK

    def histogram(self, flat, E, block, per_block) -> None:
        n = flat.numel()
        _core.route_histogram(_p(flat), n, E, block, _p(per_block), _stream(flat))

    def scatter(self, flat, E, block, base, row_to_flat, flat_to_row) -> None:
        n = flat.numel()
        _core.route_scatter(_p(flat), n, E, block, _p(base), _p(row_to_flat), _p(flat_to_row), _stream(flat))


route = functools.partial(recipe.route, CudaRouting())


def permute(x, row_to_flat, top_k, weights):
    out = x.new_empty(row_to_flat.numel(), x.shape[1])
    w = None if weights is None else weights.reshape(-1)
    _core.permute(_DTYPE[x.dtype], _p(x), x.stride(0), _p(row_to_flat), _p(w), out.shape[0], x.shape[1], top_k, _p(out),
                  out.stride(0), _stream(x))
    return out


def unpermute(rows, flat_to_row, top_k, weights, shared):
    T, d = flat_to_row.numel() // top_k, rows.shape[1]
    out = rows.new_empty(T, d)
    _core.unpermute(_DTYPE[rows.dtype], _p(rows), rows.stride(0), _p(flat_to_row), _p(weights), _p(shared),
                    shared.stride(0) if shared is not None else 0, T, d, top_k, _p(out), out.stride(0), _stream(rows))
    return out


def unpermute_weight_grad(grad_out, rows, flat_to_row, top_k):
    out = torch.empty(grad_out.shape[0], top_k, dtype=torch.float32, device=rows.device)
    _core.unpermute_weight_grad(_DTYPE[rows.dtype], _p(grad_out), grad_out.stride(0), _p(rows), rows.stride(0),
                                _p(flat_to_row), grad_out.shape[0], rows.shape[1], top_k, _p(out), _stream(rows))
    return out


class CudaDepthwiseConv:
    """The masked depthwise conv recipe's kernels (geomoe_kernels.kernel_recipes)."""

    def wgrad_rows_per_block(self) -> int:
        return _core.dwconv_grad_rows_per_block()

    def conv(self, x, neighbors, weight, bias, flip, out) -> None:
        _core.masked_depthwise_conv(_DTYPE[x.dtype], _p(x), x.stride(0), _p(neighbors), neighbors.shape[1], _p(weight), _p(bias),
                                    x.shape[0], x.shape[1], flip, _p(out), out.stride(0), _stream(x))

    def wgrad(self, x, grad_out, neighbors, dw, db) -> None:
        R, C = x.shape
        kk = neighbors.shape[1]
        _core.masked_depthwise_conv_wgrad(_DTYPE[x.dtype], _p(x), x.stride(0), _p(grad_out), grad_out.stride(0), _p(neighbors),
                                          kk, R, C, _p(dw), _p(db), _stream(x))


masked_depthwise_conv = functools.partial(recipe.masked_depthwise_conv, CudaDepthwiseConv())
masked_depthwise_conv_backward = functools.partial(recipe.masked_depthwise_conv_backward, CudaDepthwiseConv())


class CudaGroupedGemm:
    """The CUDA core's kernels of the grouped-GEMM recipe (geomoe_kernels.kernel_recipes)."""

    def block_rows(self, dtype: torch.dtype) -> int:
        return _core.grouped_mm_block_rows()

    def forward(self, x, weight, offsets, schedule, bias, activation, gather, top_k, out, pre) -> None:
        E, K, N = weight.shape
        blk_expert, blk_row0, blocks = schedule.expert, schedule.row0, schedule.blocks
        _core.grouped_mm(_DTYPE[x.dtype], _p(x), x.stride(0), _p(gather), top_k, _p(weight), K, N, weight.stride(1),
                         weight.stride(0), False, _p(bias), _p(blk_expert), _p(blk_row0), blocks, _p(offsets), activations.code(activation),
                         _p(out), out.stride(0), _p(pre), pre.stride(0) if pre is not None else 0, 0, _stream(x))

    def dgrad(self, grad, weight, offsets, schedule, out, grad_act, pre) -> None:
        """grad @ W[e]^T for each expert's rows; with grad_act, times act'(pre) in the epilogue."""
        K, N = weight.shape[1:]
        blk_expert, blk_row0, blocks = schedule.expert, schedule.row0, schedule.blocks
        _core.grouped_mm(_DTYPE[grad.dtype], _p(grad), grad.stride(0), 0, 1, _p(weight), N, K, weight.stride(1), weight.stride(0),
                         True, 0, _p(blk_expert), _p(blk_row0), blocks, _p(offsets), 0, _p(out), out.stride(0), _p(pre),
                         pre.stride(0) if pre is not None else 0, activations.code(grad_act), _stream(grad))

    def wgrad(self, a, grad, offsets, gather, top_k, a_activation, partial, partial_db) -> None:
        """(dW, db) partials in float32: A_e^T G_e and G_e's row sums; A = act(a) with a_activation."""
        splits, E, K, N = partial.shape
        _core.grouped_mm_wgrad(_DTYPE[a.dtype], _p(a), a.stride(0), _p(gather), top_k, _p(grad), grad.stride(0), _p(offsets),
                               E, K, N, splits, activations.code(a_activation), _p(partial), _p(partial_db), _stream(a))


_gemm_ops = recipe.grouped_gemm_ops(CudaGroupedGemm())
grouped_mm, grouped_mm_backward = _gemm_ops["grouped_mm"], _gemm_ops["grouped_mm_backward"]
expert_mlp, expert_mlp_backward = _gemm_ops["expert_mlp"], _gemm_ops["expert_mlp_backward"]
# the activations the CUDA grouped GEMM fuses (no SwiGLU yet)
_FUSED = ("none", "gelu", "silu")


def _gemm_ok(x, activation, **_) -> Optional[str]:
    if x.dtype not in (torch.float16, torch.bfloat16):
        return f"the CUDA grouped GEMM takes float16 or bfloat16 (Triton serves float32), got {x.dtype}"
    return None if activation in _FUSED else f"the CUDA grouped GEMM fuses none, gelu or silu, got {activation!r}"


WHO = "the CUDA core"


def _rows_ok(t: Tensor) -> Optional[str]:
    return _backend.rows_reason(WHO, t)


def _weights_ok(w) -> Optional[str]:
    return _backend.weights_reason(WHO, w)


def _gating_ok(logits, top_k, **_) -> Optional[str]:
    return _backend.gating_reason(WHO, logits, top_k, max_experts=1024, max_k=8)


def register() -> None:
    if _core is None:
        _backend.set_unavailable_reason("cuda", f"the CUDA core is {_status}")
        return
    _backend.set_unavailable_reason("cuda", "the CUDA core has no kernel for it yet")  # the ops not registered below
    _backend.set_device_check("cuda", device_reason)
    r = _backend.register
    r("topk_gating", "cuda", topk_gating, _gating_ok)
    r("topk_gating_backward", "cuda", topk_gating_backward, lambda logits, ids, **_: _gating_ok(logits, ids.shape[1]))
    r("route", "cuda", route, lambda num_experts, **_: None if num_experts <= 4096 else
      f"the CUDA histogram keeps E in shared memory: at most 4096, got {num_experts}")
    r("permute", "cuda", permute, lambda x, weights, **_: _rows_ok(x) or _weights_ok(weights))
    r("unpermute", "cuda", unpermute, lambda rows, weights, **_: _rows_ok(rows) or _weights_ok(weights))
    r("unpermute_weight_grad", "cuda", unpermute_weight_grad, lambda rows, **_: _rows_ok(rows))
    # correct on an H200 (every GPU test passed) but 3.4x slower than the Triton GEMMs at GeoMoE's
    # shape (plain WMMA tiles): backend="auto" keeps Triton; ask for backend="cuda" to use it
    for op, impl in _gemm_ops.items():
        r(op, "cuda", impl, _gemm_ok, auto=False)
    r("masked_depthwise_conv", "cuda", masked_depthwise_conv, lambda x, **_: _rows_ok(x))
    r("masked_depthwise_conv_backward", "cuda", masked_depthwise_conv_backward, lambda x, **_: _rows_ok(x))
