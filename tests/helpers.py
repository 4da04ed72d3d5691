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

ACTIVATIONS = ["none", "gelu", "silu", "swiglu", "swiglu_interleaved"]
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
    """Half precision: at most twice the error of the reference run in the same dtype, against the
    float32/float64 computation `exact`, both in the largest error and in the root-mean-square one,
    plus a floor of 1e-3 (largest) and 1e-4 (RMS) of the exact values' magnitude: for exact zeros,
    which the reference may get exactly. Every implementation rounds chained half-precision arithmetic
    differently, so a fixed bound would either fail correct kernels or pass wrong ones; the RMS term
    catches an error spread over every element (a uniform 1 % passes any fixed bf16 tolerance)."""
    a, r, e = (t.detach().double().cpu() for t in (ours, same_dtype_reference, exact))
    assert a.shape == e.shape == r.shape, (a.shape, r.shape, e.shape)
    if not e.numel():
        return
    err, ref_err = (a - e).abs().max(), (r - e).abs().max()
    assert err <= 2 * ref_err + 1e-3 * e.abs().max(), f"largest error {float(err):.3g}, the reference's {float(ref_err):.3g}"
    rms = lambda t: t.square().mean().sqrt()
    err, ref_err = rms(a - e), rms(r - e)
    assert err <= 2 * ref_err + 1e-4 * rms(e), f"RMS error {float(err):.3g}, the reference's {float(ref_err):.3g}"


def three_runs(run, leaves: Sequence[torch.Tensor], backend: str) -> List[List[torch.Tensor]]:
    """run(backend_name, *leaves) -> output. Runs it on `backend`, on the reference in the leaves'
    dtype, and on the reference in float64; each gives [output, *grads of sum(output^2) w.r.t. the
    leaves that require grad], in float64 on the CPU."""
    outs = []
    for name, cast in ((backend, None), ("torch", None), ("torch", torch.float64)):
        ls = [
            t if cast is None or not t.is_floating_point() else t.detach().to(cast).requires_grad_(t.requires_grad)
            for t in leaves
        ]
        y = run(name, *ls)
        wrt = [t for t in ls if t.requires_grad]
        grads = torch.autograd.grad(y.double().square().sum(), wrt) if wrt else ()
        outs.append([t.detach().double().cpu() for t in (y, *grads)])
    return outs


def assert_backend_close(ours, same_dtype_reference, exact, dtype: torch.dtype, backend: str, grad: bool = False) -> None:
    """A backend's output (or gradient) computed in `dtype` against the float64 computation: a kernel
    in fp16 / bf16 at most twice the reference's own error in that dtype
    (assert_within_twice_reference_error); the reference itself, and every backend in float32/64,
    within the fixed bound of TOL (GRAD_TOL)."""
    if dtype in HALF and backend != "torch":
        assert_within_twice_reference_error(ours, same_dtype_reference, exact)
    else:
        assert_close(ours, exact, dtype, grad=grad)


def assert_runs_close(outs: Sequence[Sequence[torch.Tensor]], dtype: torch.dtype, backend: str) -> None:
    """three_runs' result: the output and every gradient by assert_backend_close."""
    for i, (a, r, e) in enumerate(zip(*outs)):
        assert_backend_close(a, r, e, dtype, backend, grad=i > 0)


def pointer_then_persistent(sm90, fn, programs, monkeypatch):
    """(fn() on the persistent sm_90 kernels with `programs` programs, fn() on the pointer kernels):
    sm90 is geomoe_kernels.triton.grouped_gemm_sm90, imported by the caller (the interpreter's)."""
    with sm90.forced("pointer"):
        want = fn()
    monkeypatch.setattr(sm90, "PROGRAMS_WITHOUT_SMS", programs)
    sm90._sms.cache_clear()
    try:
        with sm90.forced("persistent"):
            got = fn()
    finally:
        sm90._sms.cache_clear()
    return got, want
