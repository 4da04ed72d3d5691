"""Check every kernel backend that runs here against the reference, on one small fixed case per op.

`python -m geomoe_kernels.info --verify` prints the table (op x backend x dtype -> verified, failed
with the error, or unavailable with the reason) and exits non-zero on any failure.

The case is small and ragged on purpose: 300 tokens, 7 experts of which one receives no token, top-3,
feature sizes that are not multiples of any tile (40, 36), a masked-image layout with masked
neighbours. Each op runs forward and backward through its public function; its outputs and input
gradients are compared with the reference computed in float64 on the CPU:
- float32: max |error| <= 1e-4 * max(1, max |exact|);
- float16 / bfloat16: at most twice the error of the reference backend run in the same dtype on the
  same device, plus 1e-3 * max |exact| (chained half-precision arithmetic rounds differently in
  every implementation, so a fixed bound would either fail correct kernels or pass wrong ones);
- integer outputs (expert ids, counts, routing maps) must equal the same-dtype reference exactly.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, cast

import torch
from torch import Tensor

from . import backend as _backend
from . import layout
from .ops import expert_mlp, grouped_mm, masked_depthwise_conv, norm_linear, permute, route, topk_gating, unpermute

HALF = (torch.float16, torch.bfloat16)
T, E, K, D, H, EMPTY = 300, 7, 3, 40, 36, 3  # tokens, experts, top-k, model dim, hidden, the expert with no rows


@dataclass
class Verdict:
    op: str
    backend: str
    dtype: torch.dtype
    status: str  # "verified", "failed" or "unavailable"
    detail: str = ""


def _case() -> Dict[str, Tensor]:
    """The fixed float64 inputs (CPU), the same on every machine."""
    g = torch.Generator().manual_seed(1234)
    r = lambda *shape, scale=1.0: torch.randn(*shape, generator=g, dtype=torch.float64) * scale
    others = torch.tensor([e for e in range(E) if e != EMPTY])
    ids = torch.stack([others[torch.randperm(E - 1, generator=g)[:K]] for _ in range(T)])
    ids[:60] = others[:K]  # uneven groups: the first experts get many more rows
    kept = torch.stack([torch.randperm(16, generator=g)[:6] for _ in range(2)])  # 2 images, 6 of 16 tokens kept
    return dict(
        logits=r(T, E),
        bias=r(E, scale=0.1),
        ids=ids,
        x=r(T, D),
        rows=r(T * K, D),
        weights=torch.rand(T, K, generator=g, dtype=torch.float64),
        shared=r(T, D),
        w1=r(E, D, H, scale=D**-0.5),
        b1=r(E, H, scale=0.1),
        w2=r(E, H, D, scale=H**-0.5),
        b2=r(E, D, scale=0.1),
        kept=kept,
        conv_x=r(2 * 6 * 4, 24),
        conv_w=r(24, 25, scale=0.2),
        conv_b=r(24, scale=0.1),
        ln_w=1 + r(D, scale=0.1),
        ln_b=r(D, scale=0.1),
        lin_w=r(H, D, scale=D**-0.5),
        lin_b=r(H, scale=0.1),
        g_out=r(T, D),
        g_rows=r(T * K, D),
        g_hidden=r(T * K, H),
        g_conv=r(2 * 6 * 4, 24),
        g_lin=r(T, H),
    )


def _grads(outs: Sequence[Tensor], upstream: Sequence[Tensor], inputs: Sequence[Tensor]) -> List[Tensor]:
    loss = sum((o.double() * u.to(o.device)).sum() for o, u in zip(outs, upstream))
    return list(torch.autograd.grad(cast(Tensor, loss), inputs))


def _leaves(c, names, device, dtype):
    return [c[n].to(device, dtype).requires_grad_(True) for n in names]


# Each check: (case, backend, device, dtype) -> (float outputs and gradients, integer outputs)
def _gating(c, be, dev, dt):
    logits = c["logits"].to(dev, torch.float32 if dt in HALF else dt).requires_grad_(True)
    w, ids, counts, p = topk_gating(logits, c["bias"].to(dev, logits.dtype), K, backend=be)
    return [w, p, *_grads([w, p], [c["weights"], c["bias"]], [logits])], [ids, counts]


def _route(c, be, dev, dt):
    return [], list(route(c["ids"].to(dev), E, backend=be))


def _permute(c, be, dev, dt):
    r2f, f2r, _ = route(c["ids"].to(dev), E, backend="torch")
    (x,) = _leaves(c, ["x"], dev, dt)
    y = permute(x, r2f, f2r, K, backend=be)
    return [y, *_grads([y], [c["g_rows"]], [x])], []


def _unpermute(c, be, dev, dt):
    r2f, f2r, _ = route(c["ids"].to(dev), E, backend="torch")
    rows, shared = _leaves(c, ["rows", "shared"], dev, dt)
    w = c["weights"].to(dev, torch.float32 if dt in HALF else dt).requires_grad_(True)
    y = unpermute(rows, r2f, f2r, K, w, shared, backend=be)
    return [y, *_grads([y], [c["g_out"]], [rows, w, shared])], []


def _grouped_mm(c, be, dev, dt):
    r2f, f2r, off = route(c["ids"].to(dev), E, backend="torch")
    x, w, b = _leaves(c, ["x", "w1", "b1"], dev, dt)
    y = grouped_mm(x, w, off, b, "gelu", backend=be, gather=r2f, flat_to_row=f2r, top_k=K)
    return [y, *_grads([y], [c["g_hidden"]], [x, w, b])], []


def _expert_mlp(c, be, dev, dt):
    r2f, f2r, off = route(c["ids"].to(dev), E, backend="torch")
    x, w1, b1, w2, b2 = _leaves(c, ["x", "w1", "b1", "w2", "b2"], dev, dt)
    y = expert_mlp(x, w1, b1, w2, b2, off, "gelu", backend=be, gather=r2f, flat_to_row=f2r, top_k=K)
    return [y, *_grads([y], [c["g_rows"]], [x, w1, b1, w2, b2])], []


def _conv(c, be, dev, dt):
    nbr = layout.neighbor_table(c["kept"].to(dev), (4, 4), 2, 5)
    x, w, b = _leaves(c, ["conv_x", "conv_w", "conv_b"], dev, dt)
    y = masked_depthwise_conv(x, nbr, w, b, backend=be)
    return [y, *_grads([y], [c["g_conv"]], [x, w, b])], []


def _norm_linear(c, be, dev, dt):
    x, nw, nb, w, b = _leaves(c, ["x", "ln_w", "ln_b", "lin_w", "lin_b"], dev, dt)
    y = norm_linear(x, nw, nb, w, b, "gelu", backend=be)
    return [y, *_grads([y], [c["g_lin"]], [x, nw, nb, w, b])], []


CHECKS: Dict[str, Callable] = {
    "topk_gating": _gating,
    "route": _route,
    "permute": _permute,
    "unpermute": _unpermute,
    "grouped_mm": _grouped_mm,
    "expert_mlp": _expert_mlp,
    "masked_depthwise_conv": _conv,
    "norm_linear": _norm_linear,
}
# gating and routing take float32 logits and integer ids whatever the model's dtype: one row each
DTYPES = {"topk_gating": (torch.float32,), "route": (torch.float32,)}


def _max_err(a: Tensor, b: Tensor) -> float:
    return float((a.detach().double().cpu() - b.detach().double().cpu()).abs().max()) if a.numel() else 0.0


def _compare(ours, same_dtype_ref, exact, dtype) -> Optional[str]:
    (of, oi), (rf, ri), (ef, _) = ours, same_dtype_ref, exact
    for n, (a, r) in enumerate(zip(oi, ri)):
        if not torch.equal(a.cpu(), r.cpu()):
            return f"integer output {n} differs from the reference"
    for n, (a, r, e) in enumerate(zip(of, rf, ef)):
        if not torch.isfinite(a.detach()).all():
            return f"output {n} has non-finite values"
        scale = float(e.detach().abs().max()) if e.numel() else 0.0
        err = _max_err(a, e)
        bound = 1e-4 * max(1.0, scale) if dtype not in HALF else 2 * _max_err(r, e) + 1e-3 * scale
        if err > bound:
            return f"output {n}: max error {err:.3g} > bound {bound:.3g}"
    return None


def verify(
    device: Optional[torch.device] = None,
    ops: Optional[Sequence[str]] = None,
    backends: Sequence[str] = ("torch", "triton", "cuda"),
    dtypes: Sequence[torch.dtype] = (torch.float32, torch.float16, torch.bfloat16),
    on_verdict: Optional[Callable[[Verdict], None]] = None,
) -> List[Verdict]:
    """Every (op, backend, dtype) that can run on `device` (default: the GPU if any, else the CPU);
    on_verdict sees each verdict as it is reached (a run cut short still says what it found)."""
    device = device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
    case = _case()
    verdicts: List[Verdict] = []

    def add(v: Verdict) -> None:
        verdicts.append(v)
        if on_verdict is not None:
            on_verdict(v)

    for op in ops or _backend.ops():
        check = CHECKS.get(op)
        if check is None:  # a new op verifies once it has a case here
            add(Verdict(op, "-", torch.float32, "unavailable", "no verification case in geomoe_kernels.verify.CHECKS"))
            continue
        exact = check(case, "torch", torch.device("cpu"), torch.float64)
        for dt in DTYPES.get(op, dtypes):
            same_dtype_ref = None
            for be in backends:
                why = _backend.available(op, device).get(be)
                if why is None and be == "triton" and dt == torch.bfloat16 and _backend.triton_interpreting():
                    why = "the Triton interpreter computes bfloat16 products wrongly (numpy has no bfloat16)"
                if why is not None:
                    add(Verdict(op, be, dt, "unavailable", why))
                    continue
                try:
                    if same_dtype_ref is None:
                        same_dtype_ref = check(case, "torch", device, dt)
                    ours = check(case, be, device, dt)
                except _backend.BackendUnavailable as e:
                    add(Verdict(op, be, dt, "unavailable", str(e)))
                    continue
                except Exception as e:  # a kernel that crashes has failed its check
                    add(Verdict(op, be, dt, "failed", f"{type(e).__name__}: {e}"))
                    continue
                problem = _compare(ours, same_dtype_ref, exact, dt)
                add(Verdict(op, be, dt, "failed" if problem else "verified", problem or ""))
    return verdicts


HEADER = f"{'op':<22} {'backend':<7} {'dtype':<9} verdict"


def line(v: Verdict) -> str:
    dtype = str(v.dtype).replace("torch.", "")
    return f"{v.op:<22} {v.backend:<7} {dtype:<9} {v.status}{': ' + v.detail if v.detail else ''}"


def totals(verdicts: Sequence[Verdict]) -> str:
    failed = sum(v.status == "failed" for v in verdicts)
    ok = sum(v.status == "verified" for v in verdicts)
    return f"{ok} verified, {failed} failed, {len(verdicts) - ok - failed} unavailable"


def table(verdicts: Sequence[Verdict]) -> str:
    return "\n".join([HEADER, *map(line, verdicts), totals(verdicts)])


def main() -> int:
    """Print the table line by line as the checks run; non-zero if any check failed."""
    print(HEADER, flush=True)
    verdicts = verify(on_verdict=lambda v: print(line(v), flush=True))
    print(totals(verdicts), flush=True)
    return int(any(v.status == "failed" for v in verdicts))
