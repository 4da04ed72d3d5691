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

from . import backend as _backend

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

EMULATED_MODULES = {"1": "_cuda_emulated", "asan": "_cuda_emulated_asan"}
_emulated: Dict[str, Tuple[Optional[object], str]] = {}


def emulation() -> Optional[str]:
    """The emulated build GEOMOE_CUDA_EMULATE asks for ('1' or 'asan'), or None when it is off."""
    value = os.environ.get("GEOMOE_CUDA_EMULATE", "0")
    return value if value in EMULATED_MODULES else None


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


def _core_for(t: Tensor):
    """The real core for CUDA tensors, the emulated one for CPU tensors (the backend has checked
    that the one needed is there)."""
    return _core if t.device.type == "cuda" else load_emulated(emulation() or "1")[0]


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
def _architecture_reason(index: int) -> Optional[str]:
    major, minor = torch.cuda.get_device_capability(index)
    built = _core.architectures()
    if runs_on((major, minor), built):
        return None
    return (f"the CUDA core was built for {built}, which has no code for this device (sm_{major}{minor}); "
            f"rebuild with GEOMOE_CUDA_ARCHS including {major}{minor}")


def device_reason(device: torch.device) -> Optional[str]:
    """Why the 'cuda' backend cannot run on `device` (None: it can): a CUDA device needs the real core
    with code for its architecture, CPU tensors GEOMOE_CUDA_EMULATE and the emulated core."""
    if device.type == "cuda":
        if _core is None:
            return f"the CUDA core is {_status}"
        return _architecture_reason(device.index if device.index is not None else torch.cuda.current_device())
    variant = emulation()
    if variant is None or device.type != "cpu":
        return (f"the CUDA core runs on CUDA tensors, got tensors on {device} "
                "(GEOMOE_CUDA_EMULATE=1 runs CPU tensors through its emulation)")
    core, status = load_emulated(variant)
    return None if core is not None else f"the emulated CUDA core is {status}"


def _stream(t: Tensor) -> int:
    return torch.cuda.current_stream(t.device).cuda_stream if t.device.type == "cuda" else 0


def _p(t: Optional[Tensor]) -> int:
    return 0 if t is None else t.data_ptr()


def topk_gating(logits, bias, top_k, score_func, renormalize):
    T, E = logits.shape
    core = _core_for(logits)
    per = core.gating_tokens_per_block()
    w = torch.empty(T, top_k, dtype=torch.float32, device=logits.device)
    ids = torch.empty(T, top_k, dtype=torch.int64, device=logits.device)
    counts = torch.zeros(E, dtype=torch.int64, device=logits.device)
    partial = torch.empty(max(1, -(-T // per)), E, dtype=torch.float32, device=logits.device)
    if T == 0:
        partial.zero_()
    core.topk_gating(logits=_p(logits), tokens=T, num_experts=E, bias=_p(bias), top_k=top_k,
                     softmax=score_func == "softmax", renormalize=renormalize, weights=_p(w), ids=_p(ids),
                     counts=_p(counts), partial=_p(partial), stream=_stream(logits))
    return w, ids, counts, partial.sum(0) / max(T, 1)


def topk_gating_backward(grad_weights, grad_prob_mean, logits, ids, score_func, renormalize):
    grad = torch.empty_like(logits)
    gw = None if grad_weights is None else grad_weights.float().contiguous()
    gp = None if grad_prob_mean is None else grad_prob_mean.float().contiguous()
    _core_for(logits).topk_gating_backward(
        logits=_p(logits), tokens=logits.shape[0], num_experts=logits.shape[1], ids=_p(ids), top_k=ids.shape[1],
        grad_weights=_p(gw), grad_prob_mean=_p(gp), softmax=score_func == "softmax", renormalize=renormalize,
        grad_logits=_p(grad), stream=_stream(logits))
    return grad


def route(expert_ids, num_experts):
    flat = expert_ids.reshape(-1)
    n, E = flat.numel(), num_experts
    blocks = max(1, -(-n // ROUTE_BLOCK))
    per_block = torch.zeros(blocks, E, dtype=torch.int64, device=flat.device)
    core = _core_for(flat)
    core.route_histogram(ids=_p(flat), n=n, num_experts=E, block=ROUTE_BLOCK, per_block=_p(per_block),
                         stream=_stream(flat))
    counts = per_block.sum(0)
    offsets = torch.cat([counts.new_zeros(1), torch.cumsum(counts, 0)])
    # the running sum over blocks along the fast axis (see the Triton launcher: dim-0 scans are slow)
    base = (offsets[:-1][None, :] + per_block.t().contiguous().cumsum(1).t() - per_block).contiguous()
    row_to_flat = torch.empty(n, dtype=torch.int64, device=flat.device)
    flat_to_row = torch.empty_like(row_to_flat)
    core.route_scatter(ids=_p(flat), n=n, num_experts=E, block=ROUTE_BLOCK, base=_p(base), row_to_flat=_p(row_to_flat),
                       flat_to_row=_p(flat_to_row), stream=_stream(flat))
    return row_to_flat, flat_to_row, offsets


def permute(x, row_to_flat, top_k, weights):
    out = x.new_empty(row_to_flat.numel(), x.shape[1])
    w = None if weights is None else weights.reshape(-1)
    _core_for(x).permute(dtype=_DTYPE[x.dtype], x=_p(x), ldx=x.stride(0), row_to_flat=_p(row_to_flat), weights=_p(w),
                         rows=out.shape[0], d=x.shape[1], top_k=top_k, out=_p(out), ldo=out.stride(0),
                         stream=_stream(x))
    return out


def unpermute(rows, flat_to_row, top_k, weights, shared):
    T, d = flat_to_row.numel() // top_k, rows.shape[1]
    out = rows.new_empty(T, d)
    _core_for(rows).unpermute(dtype=_DTYPE[rows.dtype], rows=_p(rows), ldr=rows.stride(0), flat_to_row=_p(flat_to_row),
                              weights=_p(weights), shared=_p(shared), lds=shared.stride(0) if shared is not None else 0,
                              tokens=T, d=d, top_k=top_k, out=_p(out), ldo=out.stride(0), stream=_stream(rows))
    return out


def unpermute_weight_grad(grad_out, rows, flat_to_row, top_k):
    out = torch.empty(grad_out.shape[0], top_k, dtype=torch.float32, device=rows.device)
    _core_for(rows).unpermute_weight_grad(
        dtype=_DTYPE[rows.dtype], grad_out=_p(grad_out), ldg=grad_out.stride(0), rows=_p(rows), ldr=rows.stride(0),
        flat_to_row=_p(flat_to_row), tokens=grad_out.shape[0], d=rows.shape[1], top_k=top_k, grad_w=_p(out),
        stream=_stream(rows))
    return out


def masked_depthwise_conv(x, neighbors, weight, bias, flip: bool = False):
    out = torch.empty_like(x)
    _core_for(x).masked_depthwise_conv(
        dtype=_DTYPE[x.dtype], x=_p(x), ldx=x.stride(0), neighbors=_p(neighbors), kk=neighbors.shape[1],
        weight=_p(weight), bias=_p(bias), rows=x.shape[0], channels=x.shape[1], flip=flip, out=_p(out),
        ldo=out.stride(0), stream=_stream(x))
    return out


def masked_depthwise_conv_backward(grad_out, x, neighbors, weight):
    R, C = x.shape
    kk = neighbors.shape[1]
    dx = masked_depthwise_conv(grad_out, neighbors, weight, None, flip=True)
    core = _core_for(x)
    blocks = max(1, -(-R // core.dwconv_grad_rows_per_block()))
    dw = torch.zeros(blocks, C, kk, dtype=torch.float32, device=x.device)
    db = torch.zeros(blocks, C, dtype=torch.float32, device=x.device)
    core.masked_depthwise_conv_wgrad(dtype=_DTYPE[x.dtype], x=_p(x), ldx=x.stride(0), grad_out=_p(grad_out),
                                     ldg=grad_out.stride(0), neighbors=_p(neighbors), kk=kk, rows=R, channels=C,
                                     dw_partial=_p(dw), db_partial=_p(db), stream=_stream(x))
    return dx, dw.sum(0).to(weight.dtype), db.sum(0).to(weight.dtype)  # blocks summed in order


_ACT = {"none": 0, "gelu": 1, "silu": 2}


def _schedule(offsets, M):
    from .reference.grouped_gemm import block_schedule

    return block_schedule(offsets, M, _core_for(offsets).grouped_mm_block_rows())


def _dgrad(grad, weight, offsets, schedule, grad_act: str = "none", pre=None):
    """grad @ W[e]^T for each expert's rows; with grad_act, times act'(pre) in the epilogue."""
    M, (K, N) = grad.shape[0], weight.shape[1:]
    blk_expert, blk_row0, blocks = schedule
    out = grad.new_empty(M, K)
    _core_for(grad).grouped_mm(
        dtype=_DTYPE[grad.dtype], a=_p(grad), lda=grad.stride(0), gather=0, top_k=1, w=_p(weight), K=N, N=K,
        ldw=weight.stride(1), stride_we=weight.stride(0), trans_w=True, bias=0, blk_expert=_p(blk_expert),
        blk_row0=_p(blk_row0), blocks=blocks, offsets=_p(offsets), act=0, out=_p(out), ldo=out.stride(0), pre=_p(pre),
        ldp=pre.stride(0) if pre is not None else 0, grad_act=_ACT[grad_act], stream=_stream(grad))
    return out


def _wgrad(a, grad, offsets, gather=None, top_k=1, a_act: str = "none"):
    """(dW, db) in float32: A_e^T G_e and G_e's row sums; A = act(a) with a_act."""
    E, K, N = offsets.numel() - 1, a.shape[1], grad.shape[1]
    splits = max(1, min(8, 528 // max(1, E * -(-K // 64) * -(-N // 64))))  # ~4 waves of 132 SMs when groups are small
    partial = torch.empty(splits, E, K, N, dtype=torch.float32, device=a.device)
    partial_db = torch.empty(splits, E, N, dtype=torch.float32, device=a.device)
    _core_for(a).grouped_mm_wgrad(
        dtype=_DTYPE[a.dtype], a=_p(a), lda=a.stride(0), gather=_p(gather), top_k=top_k, g=_p(grad), ldg=grad.stride(0),
        offsets=_p(offsets), num_experts=E, K=K, N=N, splits=splits, a_act=_ACT[a_act], partial=_p(partial),
        partial_db=_p(partial_db), stream=_stream(a))
    return partial.sum(0), partial_db.sum(0)  # splits summed in order


def grouped_mm(x, weight, offsets, bias, activation, gather=None, top_k=1, schedule=None):
    M = x.shape[0] if gather is None else gather.numel()
    E, K, N = weight.shape
    blk_expert, blk_row0, blocks = schedule if schedule is not None else _schedule(offsets, M)
    out = x.new_empty(M, N)
    pre = x.new_empty(M, N) if activation != "none" else None
    _core_for(x).grouped_mm(
        dtype=_DTYPE[x.dtype], a=_p(x), lda=x.stride(0), gather=_p(gather), top_k=top_k, w=_p(weight), K=K, N=N,
        ldw=weight.stride(1), stride_we=weight.stride(0), trans_w=False, bias=_p(bias), blk_expert=_p(blk_expert),
        blk_row0=_p(blk_row0), blocks=blocks, offsets=_p(offsets), act=_ACT[activation], out=_p(out), ldo=out.stride(0),
        pre=_p(pre), ldp=pre.stride(0) if pre is not None else 0, grad_act=0, stream=_stream(x))
    return out, (pre if pre is not None else x.new_empty(0))


def grouped_mm_backward(grad_out, x, weight, offsets, pre, activation, gather=None, top_k=1):
    from .reference import activations

    dpre = (grad_out if activation == "none" else activations.backward(activation, grad_out, pre)).contiguous()
    d_rows = _dgrad(dpre, weight, offsets, _schedule(offsets, dpre.shape[0]))
    dw, db = _wgrad(x, dpre, offsets, gather, top_k)
    return d_rows, dw.to(weight.dtype), db.to(weight.dtype)


def expert_mlp(x, w1, b1, w2, b2, offsets, activation, gather=None, top_k=1):
    M = x.shape[0] if gather is None else gather.numel()
    schedule = _schedule(offsets, M)
    hidden, pre = grouped_mm(x, w1, offsets, b1, activation, gather, top_k, schedule)
    out, _ = grouped_mm(hidden, w2, offsets, b2, "none", schedule=schedule)
    return out, pre


def expert_mlp_backward(grad_out, x, w1, w2, offsets, pre, activation, gather=None, top_k=1):
    """As the Triton one: d pre from the down-projection's dgrad with act'(pre) in its epilogue; dW2
    and db2 from act(pre) formed as it loads; then the row gradients, dW1 and db1."""
    schedule = _schedule(offsets, grad_out.shape[0])
    d_pre = _dgrad(grad_out, w2, offsets, schedule, activation, pre)
    dw2, db2 = _wgrad(pre, grad_out, offsets, a_act=activation)
    d_rows = _dgrad(d_pre, w1, offsets, schedule)
    dw1, db1 = _wgrad(x, d_pre, offsets, gather, top_k)
    return d_rows, dw1.to(w1.dtype), db1.to(w1.dtype), dw2.to(w2.dtype), db2.to(w2.dtype)


def _gemm_ok(x, weight, offsets, bias, activation, *rest) -> Optional[str]:
    if x.dtype not in (torch.float16, torch.bfloat16):
        return f"the CUDA grouped GEMM takes float16 or bfloat16 (Triton serves float32), got {x.dtype}"
    return None if activation in _ACT else f"the CUDA grouped GEMM fuses none, gelu or silu, got {activation!r}"


WHO = "the CUDA core"


def _rows_ok(t: Tensor) -> Optional[str]:
    return _backend.rows_reason(WHO, t)


def _weights_ok(w) -> Optional[str]:
    return _backend.weights_reason(WHO, w)


def _gating_ok(logits, bias=None, top_k=1, *rest) -> Optional[str]:
    return _backend.gating_reason(WHO, logits, top_k, max_experts=1024, max_k=8)


def register() -> None:
    _backend._UNAVAILABLE_REASON["cuda"] = "the CUDA core has no kernel for it yet"
    _backend.set_device_check("cuda", device_reason)
    r = _backend.register
    r("topk_gating", "cuda", topk_gating, _gating_ok)
    r("topk_gating_backward", "cuda", topk_gating_backward, lambda gw, gp, logits, ids, *rest: _gating_ok(logits, None, ids.shape[1]))
    r("route", "cuda", route, lambda ids, E, *rest: None if E <= 4096 else f"the CUDA histogram keeps E in shared memory: at most 4096, got {E}")
    r("permute", "cuda", permute, lambda x, r2f, k, w: _rows_ok(x) or _weights_ok(w))
    r("unpermute", "cuda", unpermute, lambda rows, f2r, k, w, s: _rows_ok(rows) or _weights_ok(w))
    r("unpermute_weight_grad", "cuda", unpermute_weight_grad, lambda g, rows, *rest: _rows_ok(rows))
    # correct on an H200 (every GPU test passed) but 3.4x slower than the Triton GEMMs at GeoMoE's
    # shape (plain WMMA tiles): backend="auto" keeps Triton; ask for backend="cuda" to use it
    r("grouped_mm", "cuda", grouped_mm, _gemm_ok, auto=False)
    r("grouped_mm_backward", "cuda", grouped_mm_backward,
      lambda g, x, w, off, pre, act, *rest: _gemm_ok(x, w, off, None, act), auto=False)
    r("expert_mlp", "cuda", expert_mlp, lambda x, w1, b1, w2, b2, off, act, *rest: _gemm_ok(x, w1, off, None, act),
      auto=False)
    r("expert_mlp_backward", "cuda", expert_mlp_backward,
      lambda g, x, w1, w2, off, pre, act, *rest: _gemm_ok(x, w1, off, None, act), auto=False)
    r("masked_depthwise_conv", "cuda", masked_depthwise_conv, lambda x, *rest: _rows_ok(x))
    r("masked_depthwise_conv_backward", "cuda", masked_depthwise_conv_backward, lambda g, x, *rest: _rows_ok(x))
