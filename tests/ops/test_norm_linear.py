"""norm_linear (LayerNorm + linear + bias + activation): the reference against torch's own
layer_norm, linear and activations composed by autograd, in float64; every backend against the
reference; opcheck; errors."""

import pytest
import torch
import torch.nn.functional as F

from geomoe_kernels import OpInputError, norm_linear
from geomoe_kernels.ops.norm_linear import norm_linear_backward, norm_linear_op
from tests.helpers import assert_runs_close, skip_unavailable, three_runs

ACT = {"none": lambda t: t, "gelu": F.gelu, "silu": F.silu}


def _inputs(R=11, K=12, N=7, dtype=torch.float64, offset=0.0):
    g = torch.Generator().manual_seed(R * 100 + K)
    x = torch.randn(R, K, generator=g, dtype=dtype) * 3 + offset
    nw = torch.randn(K, generator=g, dtype=dtype)
    nb = torch.randn(K, generator=g, dtype=dtype)
    w = torch.randn(N, K, generator=g, dtype=dtype) / K**0.5
    b = torch.randn(N, generator=g, dtype=dtype)
    return x, nw, nb, w, b


def _composed(x, nw, nb, w, b, act, eps):
    return ACT[act](F.linear(F.layer_norm(x, [x.shape[1]], nw, nb, eps), w, b))


@pytest.mark.parametrize("act", list(ACT))
@pytest.mark.parametrize("with_bias", [True, False])
def test_forward_and_gradients_match_composed_torch_ops_float64(act, with_bias):
    leaves = [t.requires_grad_(True) for t in _inputs()]
    x, nw, nb, w, b = leaves
    b = b if with_bias else None
    got = norm_linear(x, nw, nb, w, b, act, eps=1e-5)
    want = _composed(x, nw, nb, w, b, act, 1e-5)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    g = torch.randn_like(want)
    used = [t for t in (x, nw, nb, w, b) if t is not None]
    for a, r in zip(torch.autograd.grad(got, used, g), torch.autograd.grad(want, used, g)):
        torch.testing.assert_close(a, r, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("act", ["none", "gelu", "silu"])
def test_backend_matches_reference(backend, dtype, act):
    """LayerNorm in the prologue, bias + activation in the epilogue (Triton); rows with a large
    mean, a column count that is not a multiple of the tile, and statistics that stay float32."""
    dev = backend.device
    x = (torch.randn(37, 20, device=dev) * 2 + 50).requires_grad_(True)  # float32 rows, as in the residual stream
    nw = (1 + torch.randn(20, device=dev) / 4).requires_grad_(True)
    nb = torch.randn(20, device=dev).requires_grad_(True)
    w = (torch.randn(27, 20, device=dev) / 5).to(dtype).requires_grad_(True)
    b = torch.randn(27, device=dev).to(dtype).requires_grad_(True)

    def run(name, *leaves):
        y = skip_unavailable(norm_linear, *leaves, act, 1e-5, backend=name)  # the CUDA core has none
        assert y.dtype == leaves[3].dtype
        return y

    assert_runs_close(three_runs(run, (x, nw, nb, w, b), backend.name), dtype, backend.name)


def test_gradcheck():
    x, nw, nb, w, b = (t.requires_grad_(True) for t in _inputs(R=5, K=6, N=4))
    assert torch.autograd.gradcheck(lambda *a: norm_linear(*a, activation="gelu", eps=1e-5), (x, nw, nb, w, b))


def test_layernorm_without_affine_parameters():
    x, _, _, w, b = _inputs()
    torch.testing.assert_close(norm_linear(x, None, None, w, b), F.linear(F.layer_norm(x, [x.shape[1]], eps=1e-6), w, b))


def test_rows_with_a_large_mean_keep_their_variance():
    """float32 rows around 1e4 with unit spread: the statistics must not cancel."""
    x64, nw, nb, w, b = _inputs(offset=1e4)
    got = norm_linear(x64.float(), nw.float(), nb.float(), w.float(), b.float(), "none", 1e-5)
    torch.testing.assert_close(got.double(), _composed(x64, nw, nb, w, b, "none", 1e-5), rtol=1e-3, atol=1e-3)


def test_mixed_precision_rows_float32_weights_bfloat16():
    """As under autocast: float32 rows and LayerNorm, the GEMM in bfloat16, the output bfloat16."""
    x, nw, nb, w, b = (t.float() for t in _inputs(R=64, K=32, N=16))
    got = norm_linear(x, nw, nb, w.bfloat16(), b.bfloat16(), "gelu", 1e-5)
    assert got.dtype == torch.bfloat16
    want = _composed(x.double(), nw.double(), nb.double(), w.bfloat16().double(), b.bfloat16().double(), "gelu", 1e-5)
    torch.testing.assert_close(got.double(), want, rtol=2e-2, atol=2e-2)


def test_no_rows():
    x, nw, nb, w, b = (t.requires_grad_(True) for t in _inputs(R=0))
    y = norm_linear(x, nw, nb, w, b, "gelu")
    assert y.shape == (0, w.shape[0])
    y.sum().backward()
    assert torch.equal(w.grad, torch.zeros_like(w)) and torch.equal(nw.grad, torch.zeros_like(nw))


def test_opcheck():
    x, nw, nb, w, b = (t.float() for t in _inputs(R=6, K=8, N=5))
    for act in ("none", "gelu"):
        torch.library.opcheck(norm_linear_op.op, (x, nw, nb, w, b, act, 1e-5))
    torch.library.opcheck(norm_linear_op.op, (x, nw, nb, w, None, "silu", 1e-5))
    out, pre, mean, rstd = norm_linear_op(x, nw, nb, w, b, "gelu", 1e-5)
    torch.library.opcheck(norm_linear_backward.op, (torch.randn_like(out), x, nw, nb, w, pre, mean, rstd, "gelu", 1e-5))


@pytest.mark.parametrize(
    "change,message",
    [
        (dict(w=torch.randn(5, 9)), "argument 'weight' expected [N, 8]"),
        (dict(nb=torch.randn(8, dtype=torch.float64)), "argument 'norm_bias' expected dtype"),
        (dict(nw=torch.randn(7)), "argument 'norm_weight'"),
        (dict(b=torch.randn(4)), "argument 'bias'"),
        (dict(act="swiglu"), "argument 'activation' expected one of"),
        (dict(eps=0.0), "argument 'eps' expected a positive number"),
        (dict(x=torch.randn(8, 6).t()), "argument 'x' expected contiguous memory"),
    ],
)
def test_bad_arguments_name_the_argument(change, message):
    args = dict(zip(("x", "nw", "nb", "w", "b"), (t.float() for t in _inputs(R=6, K=8, N=5))), act="gelu", eps=1e-5)
    args.update(change)
    with pytest.raises(OpInputError, match=message.replace("[", r"\[")):
        norm_linear_op(args["x"], args["nw"], args["nb"], args["w"], args["b"], args["act"], args["eps"])
