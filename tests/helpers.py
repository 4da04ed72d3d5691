"""What the op tests share: the backends that can run here, case builders (offsets, expert ids),
the activations, and the tolerance rules.

Backends: this process runs the reference on the CPU, plus Triton and the CUDA core on a GPU when
there is one. Triton on the CPU needs TRITON_INTERPRET=1 from the start of the process, so
tests/test_triton_interpreter.py runs the backend-parametrised tests again in a process of their
own with it set, where "triton" is then the only backend. tests/test_cuda_emulated.py does the same
with GEOMOE_CUDA_EMULATE set, where "cuda" on the CPU (the CUDA core's kernels executed by its
emulation, csrc/emulation/) is the only backend."""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Sequence, Tuple

import pytest
import torch

from geomoe_kernels import BackendUnavailable
from geomoe_kernels.backend import triton_interpreting
from geomoe_kernels.cuda import emulation

ACTIVATIONS = ["none", "gelu", "silu", "swiglu"]
HALF = (torch.float16, torch.bfloat16)

# max |error| bounds against a float64 computation, by the dtype the op ran in
TOL = {
    torch.float64: dict(rtol=0, atol=1e-12),
    torch.float32: dict(rtol=1e-4, atol=1e-4),
    torch.float16: dict(rtol=2e-2, atol=1.4e-2),  # one half-precision rounding of the output
    torch.bfloat16: dict(rtol=2e-2, atol=1.4e-2),
}
# gradients sum more half-precision products: as tests/test_gpu.py's
GRAD_TOL = {
    **TOL,
    torch.float64: dict(rtol=0, atol=1e-11),
    torch.float16: dict(rtol=2e-2, atol=2e-2),
    torch.bfloat16: dict(rtol=2e-2, atol=2e-2),
}


@dataclass(frozen=True)
class Backend:
    name: str  # the op's `backend` argument
    device: torch.device
    dtypes: Tuple[torch.dtype, ...]  # the float dtypes its kernels are checked in

    def __str__(self) -> str:
        return f"{self.name}-{self.device.type}"


def backends_here() -> List[Backend]:
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    if triton_interpreting():  # bfloat16: the interpreter computes its products wrongly (numpy has none)
        return [Backend("triton", cpu, (torch.float32, torch.float16))]
    if emulation():
        return [Backend("cuda", cpu, (torch.float32, torch.float16, torch.bfloat16))]
    found = [Backend("torch", cpu, (torch.float32, torch.float16))]
    if torch.cuda.is_available():
        found += [
            Backend("triton", cuda, (torch.float32, torch.float16, torch.bfloat16)),
            Backend("cuda", cuda, (torch.float32, torch.float16, torch.bfloat16)),
        ]
    return found


def kernel_backends_here() -> List[Backend]:
    """The backends other than the reference (checked against it)."""
    return [b for b in backends_here() if b.name != "torch"]


def skip_unavailable(fn, *args, **kwargs):
    """fn(*args, **kwargs), or skip the test where the backend does not run the case (the CUDA
    grouped GEMM takes no float32, for example)."""
    try:
        return fn(*args, **kwargs)
    except BackendUnavailable as exc:
        pytest.skip(str(exc))


def offsets(counts: Sequence[int], device="cpu") -> torch.Tensor:
    return torch.tensor([0] + torch.tensor(list(counts)).cumsum(0).tolist(), dtype=torch.int64, device=device)


def expert_ids(T: int, k: int, E: int) -> torch.Tensor:
    """[T, k] distinct experts per token, uniformly."""
    return torch.stack([torch.randperm(E)[:k] for _ in range(T)])


def assert_close(got: torch.Tensor, want: torch.Tensor, dtype: torch.dtype, grad: bool = False, **kw) -> None:
    """got (run in dtype) against want (float64) within that dtype's bound."""
    tol = (GRAD_TOL if grad else TOL)[dtype]
    torch.testing.assert_close(got.detach().double().cpu(), want.detach().double().cpu(), **tol, **kw)


def assert_within_twice_reference_error(ours: torch.Tensor, same_dtype_reference: torch.Tensor, exact: torch.Tensor) -> None:
    """Half precision through chained GEMMs: at most twice the error of the reference run in the
    same dtype, plus 1e-3 of the largest exact value (every implementation rounds differently, so a
    fixed bound would either fail correct kernels or pass wrong ones)."""
    a, r, e = (t.detach().double().cpu() for t in (ours, same_dtype_reference, exact))
    scale = e.abs().max().clamp_min(1.0) if e.numel() else 1.0
    err, ref_err = ((a - e).abs().max(), (r - e).abs().max()) if e.numel() else (0.0, 0.0)
    assert err <= 2 * ref_err + 1e-3 * scale, (float(err), float(ref_err))
