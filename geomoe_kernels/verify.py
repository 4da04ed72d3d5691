"""Check every kernel backend that runs here against the reference, on one small fixed case per op.

`python -m geomoe_kernels.info --verify` prints the table (op x backend x dtype -> verified, failed
with the error, or unavailable with the reason) and exits non-zero on any failure.

Each op's case is part of its declaration (`verification=` in ops/, built from the small ragged
inputs of ops/_case.py: 300 tokens, 7 experts of which one receives no token, top-3, feature sizes
that are not multiples of any tile, a masked-image layout with masked neighbours). Each op runs
forward and backward through its public function; its outputs and input gradients are compared
with the reference computed in float64 on the CPU:
- float32: max |error| <= tolerance (1e-4 unless the op's case says otherwise) * max(1, max |exact|);
- float16 / bfloat16: at most twice the error of the reference backend run in the same dtype on the
  same device, plus 1e-3 * max |exact| (chained half-precision arithmetic rounds differently in
  every implementation, so a fixed bound would either fail correct kernels or pass wrong ones);
- integer outputs (expert ids, counts, routing maps) must equal the same-dtype reference exactly.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor

from . import backend as _backend
from . import ops as _ops  # noqa: F401  (importing the package declares every op)
from .ops._case import HALF, case
from .ops._declare import DECLARED, Verification

ALL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@dataclass
class Verdict:
    op: str
    backend: str
    dtype: torch.dtype
    status: str  # "verified", "failed" or "unavailable"
    detail: str = ""


def cases() -> Dict[str, Verification]:
    """op -> its verification, for every op users call that declares one, in declaration order."""
    return {op: v for op in _backend.ops() if (v := getattr(DECLARED.get(op), "verification", None)) is not None}


def checks() -> Dict[str, Callable]:
    """op -> its check (case, backend, device, dtype) -> (float outputs and gradients, integer outputs)."""
    return {op: v.check for op, v in cases().items()}


def dtypes_of(op: str) -> Tuple[torch.dtype, ...]:
    """The dtype rows of `op`'s table (all float dtypes unless its case names fewer)."""
    v = cases().get(_backend.forward_of(op))
    return (v.dtypes if v is not None and v.dtypes is not None else None) or ALL_DTYPES


def _max_err(a: Tensor, b: Tensor) -> float:
    return float((a.detach().double().cpu() - b.detach().double().cpu()).abs().max()) if a.numel() else 0.0


def _compare(ours, same_dtype_ref, exact, dtype, tolerance: float = 1e-4) -> Optional[str]:
    (of, oi), (rf, ri), (ef, _) = ours, same_dtype_ref, exact
    for n, (a, r) in enumerate(zip(oi, ri)):
        if not torch.equal(a.cpu(), r.cpu()):
            return f"integer output {n} differs from the reference"
    for n, (a, r, e) in enumerate(zip(of, rf, ef)):
        if not torch.isfinite(a.detach()).all():
            return f"output {n} has non-finite values"
        scale = float(e.detach().abs().max()) if e.numel() else 0.0
        err = _max_err(a, e)
        bound = tolerance * max(1.0, scale) if dtype not in HALF else 2 * _max_err(r, e) + 1e-3 * scale
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
    inputs = case()
    found = cases()
    verdicts: List[Verdict] = []

    def add(v: Verdict) -> None:
        verdicts.append(v)
        if on_verdict is not None:
            on_verdict(v)

    for op in ops or _backend.ops():
        v = found.get(op)
        if v is None:  # a new op verifies once its declaration carries a case
            add(Verdict(op, "-", torch.float32, "unavailable", "its declaration has no verification= case"))
            continue
        check = v.check
        exact = check(inputs, "torch", torch.device("cpu"), torch.float64)
        for dt in v.dtypes or dtypes:
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
                        same_dtype_ref = check(inputs, "torch", device, dt)
                    ours = check(inputs, be, device, dt)
                except _backend.BackendUnavailable as e:
                    add(Verdict(op, be, dt, "unavailable", str(e)))
                    continue
                except Exception as e:  # a kernel that crashes has failed its check
                    add(Verdict(op, be, dt, "failed", f"{type(e).__name__}: {e}"))
                    continue
                problem = _compare(ours, same_dtype_ref, exact, dt, v.tolerance)
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


def main(ops: Optional[Sequence[str]] = None) -> int:
    """Print the table (of `ops`, default every op) line by line as the checks run; non-zero if any
    check failed."""
    print(HEADER, flush=True)
    verdicts = verify(ops=ops, on_verdict=lambda v: print(line(v), flush=True))
    print(totals(verdicts), flush=True)
    return int(any(v.status == "failed" for v in verdicts))
