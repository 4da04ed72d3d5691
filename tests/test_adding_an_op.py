"""Adding an op is its op file, its reference, its kernel file and its test, nothing else
(docs/library.md, "Adding an op"). A scratch op, a fused SwiGLU with a Triton kernel forward and
backward, is written into a copy of the package (its three files only; the backward deliberately
not named `*_backward`), and with no other edit it is listed by `info`, verified by `info --verify`
(Triton under the interpreter, forward and backward), checked by the self-check under its own
family, compiled by tools/triton_offline.py, and run by the per-op test helpers on every backend."""

import json
import os
import shutil
import subprocess
import sys
import textwrap

import pytest

pytest.importorskip("triton")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

OP = '''
"""scratch_swiglu: silu(gate) * up for x = [gate | up], [R, 2H] -> [R, H]."""

import torch
from torch import Tensor

from .._checks import FLOAT_DTYPES, OpInputError, check_tensor
from ..reference import scratch_swiglu as _ref
from . import _case
from ._declare import Verification, declare


def _verify(c, be, dev, dt):
    (x,) = _case.leaves(c, ["x"], dev, dt)
    y = scratch_swiglu(x, backend=be)
    return [y, *_case.grads([y], [c["g_out"][:, : y.shape[1]]], [x])], []


@declare(
    reference=_ref.scratch_swiglu,
    fake=lambda x, **_: x.new_empty(x.shape[0], x.shape[1] // 2),
    verification=Verification(_verify),
)
def scratch_swiglu(x: Tensor) -> Tensor:
    check_tensor("scratch_swiglu", "x", x, dtypes=FLOAT_DTYPES, dim=2)
    if x.shape[1] % 2:
        raise OpInputError(f"scratch_swiglu: argument 'x' expected an even number of columns, got {x.shape[1]}")


@declare(reference=_ref.scratch_swiglu_grad, backward_of="scratch_swiglu", fake=lambda x, **_: torch.empty_like(x))
def scratch_swiglu_grad(grad_out: Tensor, x: Tensor) -> Tensor:
    """d x."""


def _setup_context(ctx, args, output):
    ctx.save_for_backward(args["x"])
    ctx.backend = args["backend"]


def _backward(ctx, grad):
    (x,) = ctx.saved_tensors
    return {"x": scratch_swiglu_grad(grad.contiguous(), x, ctx.backend)}


scratch_swiglu.register_autograd(_setup_context, _backward)
'''

REFERENCE = """
import torch
import torch.nn.functional as F


def scratch_swiglu(x):
    gate, up = x.chunk(2, dim=1)
    return F.silu(gate) * up


def scratch_swiglu_grad(grad_out, x):
    gate, up = x.chunk(2, dim=1)
    s = torch.sigmoid(gate)
    return torch.cat([grad_out * up * s * (1 + gate * (1 - s)), grad_out * gate * s], dim=1)
"""

KERNEL = """
import torch
import triton
import triton.language as tl

from . import kernel, rows_reason


@triton.jit
def _scratch_swiglu_kernel(X, Out, H, stride_x, stride_o, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    m = cols < H
    g = tl.load(X + row * stride_x + cols, mask=m, other=0.0).to(tl.float32)
    u = tl.load(X + row * stride_x + H + cols, mask=m, other=0.0).to(tl.float32)
    tl.store(Out + row * stride_o + cols, (g * tl.sigmoid(g) * u).to(Out.dtype.element_ty), mask=m)


@triton.jit
def _scratch_swiglu_grad_kernel(G, X, DX, H, stride_g, stride_x, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    m = cols < H
    d = tl.load(G + row * stride_g + cols, mask=m, other=0.0).to(tl.float32)
    g = tl.load(X + row * stride_x + cols, mask=m, other=0.0).to(tl.float32)
    u = tl.load(X + row * stride_x + H + cols, mask=m, other=0.0).to(tl.float32)
    s = tl.sigmoid(g)
    tl.store(DX + row * stride_x + cols, (d * u * s * (1 + g * (1 - s))).to(DX.dtype.element_ty), mask=m)
    tl.store(DX + row * stride_x + H + cols, (d * g * s).to(DX.dtype.element_ty), mask=m)


def _example(dtype):
    x = torch.randn(64, 2 * 576, dtype=dtype)
    scratch_swiglu_grad(scratch_swiglu(x), x)


@kernel("scratch_swiglu", supports=lambda x, **_: rows_reason(x), example=_example)
def scratch_swiglu(x):
    R, H = x.shape[0], x.shape[1] // 2
    out = x.new_empty(R, H)
    if R:
        _scratch_swiglu_kernel[(R,)](x, out, H, x.stride(0), out.stride(0), BLOCK=triton.next_power_of_2(H))
    return out


@kernel("scratch_swiglu_grad", supports=lambda x, **_: rows_reason(x), example=_example)
def scratch_swiglu_grad(grad_out, x):
    dx = torch.empty_like(x)
    if x.shape[0]:
        H = x.shape[1] // 2
        _scratch_swiglu_grad_kernel[(x.shape[0],)](grad_out, x, dx, H, grad_out.stride(0), x.stride(0), BLOCK=triton.next_power_of_2(H))
    return dx
"""

# the per-op test helpers (tests/helpers.py) on every backend this process has, and the self-check's
# family of the backward (it has no `_backward` suffix to strip)
HELPERS = """
import torch
from geomoe_kernels import self_check
from geomoe_kernels.ops.scratch_swiglu import scratch_swiglu
from tests.helpers import assert_runs_close, backends_here, three_runs

assert self_check.family("scratch_swiglu_grad") == "scratch_swiglu"
for b in backends_here():
    for dt in b.dtypes:
        x = (torch.randn(13, 2 * 9, device=b.device) * 2).to(dt).requires_grad_(True)
        outs = three_runs(lambda name, x: scratch_swiglu(x, backend=name), [x], b.name)
        assert_runs_close(outs, dt, b.name)
        print("ran", b.name, str(dt))
"""

OFFLINE = """
import json
from tools.triton_offline import compile_all, problems
rows = compile_all(arch=90, first_config_only=True, ops=["scratch_swiglu", "scratch_swiglu_grad"])
print(json.dumps({"names": sorted({r.name for r in rows}), "problems": problems(rows, 90)}))
"""


@pytest.fixture(scope="module")
def package(tmp_path_factory):
    """A copy of geomoe_kernels (the CUDA builds left out) with the scratch op's three files added."""
    root = tmp_path_factory.mktemp("scratch")
    shutil.copytree(
        os.path.join(ROOT, "geomoe_kernels"), root / "geomoe_kernels", ignore=shutil.ignore_patterns("__pycache__", "*.so")
    )
    for rel, text in (("ops", OP), ("reference", REFERENCE), ("triton", KERNEL)):
        (root / "geomoe_kernels" / rel / "scratch_swiglu.py").write_text(textwrap.dedent(text).lstrip())
    return root


def _run(package, args, interpret=False, timeout=600):
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "GEOMOE_CUDA_EMULATE", "GEOMOE_SELF_CHECK")}
    env["PYTHONPATH"] = os.pathsep.join([str(package), ROOT])
    env["GEOMOE_CACHE_DIR"] = str(package / "cache")
    if interpret:
        env["TRITON_INTERPRET"] = "1"
    proc = subprocess.run([sys.executable, *args], env=env, cwd=str(package), capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    return proc.stdout


def test_the_scratch_op_is_listed_and_verified_forward_and_backward(package):
    out = _run(package, ["-m", "geomoe_kernels.info", "--verify", "--op", "scratch_swiglu"], interpret=True)
    assert "  scratch_swiglu " in out and "auto -> triton" in out.split("  scratch_swiglu ")[1].splitlines()[0], out
    verdicts = [line.split() for line in out.splitlines() if line.startswith("scratch_swiglu ")]
    got = {(v[1], v[2]): v[3] for v in verdicts}
    assert got[("torch", "float32")] == got[("triton", "float32")] == got[("triton", "float16")] == "verified", out
    assert "0 failed" in out


def test_the_per_op_helpers_run_it_on_every_backend_and_the_self_check_knows_its_backward(package):
    assert "ran torch torch.float32" in _run(package, ["-c", HELPERS])
    ran = _run(package, ["-c", HELPERS], interpret=True)
    assert "ran triton torch.float32" in ran and "ran triton torch.float16" in ran, ran


def test_the_offline_compiler_compiles_its_kernels(package):
    import triton

    if not os.path.exists(os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")):
        pytest.skip("this Triton has no bundled ptxas to compile with")
    found = json.loads(_run(package, ["-c", OFFLINE]).strip().splitlines()[-1])
    assert found == {"names": ["_scratch_swiglu_grad_kernel", "_scratch_swiglu_kernel"], "problems": []}, found
