"""ops/_declare.py: one declaration gives a working op (dispatch, fake, autograd, support checks by
name, the registry's op list). Run in a fresh process: a declared op stays in torch.library."""

import subprocess
import sys
import textwrap

TOY_OP = textwrap.dedent(
    """
    import torch
    from torch import Tensor

    from geomoe_kernels import backend, ops  # noqa: F401  (declares the real ops first)
    from geomoe_kernels._checks import check_tensor
    from geomoe_kernels.ops._declare import declare


    def reference_scale(x, factor):
        return x * factor


    @declare(reference=reference_scale)
    def toy_scale(x: Tensor, factor: float = 2.0) -> Tensor:
        check_tensor("toy_scale", "x", x, dim=1)


    @toy_scale.fake
    def _(x, **_):
        return torch.empty_like(x)


    def setup_context(ctx, args, output):
        ctx.factor = args["factor"]


    toy_scale.register_autograd(setup_context, lambda ctx, grad: {"x": grad * ctx.factor})

    x = torch.randn(5, dtype=torch.float64, requires_grad=True)
    y = toy_scale(x, 3.0)
    assert torch.equal(y, x * 3.0)
    assert torch.equal(torch.autograd.grad(y.sum(), x)[0], torch.full((5,), 3.0, dtype=torch.float64))
    torch.library.opcheck(toy_scale.op, (torch.randn(4), 0.5))
    assert backend.ops()[-1] == "toy_scale"

    # a kernel backend's support check gets the arguments by name
    backend.register("toy_scale", "cuda", reference_scale, lambda x, factor: f"factor {factor} is not 1" if factor != 1 else None)
    try:
        backend.select("toy_scale", "cuda", torch.device("cuda"), {"x": x, "factor": 3.0})
    except backend.BackendUnavailable as exc:
        assert str(exc) == "toy_scale: backend 'cuda' cannot run here: factor 3.0 is not 1", exc
    else:
        raise AssertionError("the support check did not run")
    assert backend.select("toy_scale", "cuda", torch.device("cuda"), {"x": x, "factor": 1.0}) is reference_scale
    try:
        toy_scale(torch.zeros(2, 2))
    except ValueError as exc:
        assert "toy_scale: argument 'x' expected a 1-d tensor" in str(exc)
    else:
        raise AssertionError("the declaration's checks did not run")
    print("ok")
    """
)


def test_a_declared_op_dispatches_checks_and_differentiates():
    proc = subprocess.run([sys.executable, "-c", TOY_OP], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stdout + proc.stderr


def test_implementations_are_checked_against_the_op_signature_when_registered():
    """Implementations are called with the op's arguments in order: one that names them otherwise is
    refused when it registers (not found by a wrong answer later), and every registered one binds
    them by name too (a caller may pass them by keyword)."""
    import inspect

    import pytest

    from geomoe_kernels import backend

    def swapped(row_to_flat, x, top_k, weights):
        return x

    with pytest.raises(TypeError, match=r"expected the op's arguments in order: \(x, row_to_flat, top_k, weights\)"):
        backend.register("permute", "triton", swapped)
    with pytest.raises(TypeError, match="only parameters with defaults"):
        backend.register("permute", "triton", lambda x, row_to_flat, top_k, weights, extra: x)
    assert backend._REGISTRY["permute"].get("triton", (None,))[0] is not swapped
    for op, impls in backend._REGISTRY.items():
        for name, (impl, _) in impls.items():
            inspect.signature(impl).bind(**{n: None for n in backend.impl_args(op)})  # raises if a name is wrong
