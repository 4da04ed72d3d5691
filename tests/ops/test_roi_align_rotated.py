"""roi_align_rotated: the reference against a per-sample float64 loop of mmcv's semantics (every
option: sampling ratio fixed or adaptive, aligned, clockwise, scale; rois past the border, empty,
turned a quarter), gradcheck, every backend against the reference (forward and input gradient),
the deterministic backward, NaN for unusable rois, errors."""

import math

import pytest
import torch

from geomoe_kernels import OpInputError
from geomoe_kernels._checks import value_checks
from geomoe_kernels.ops.roi_align_rotated import roi_align_rotated
from tests.helpers import assert_runs_close, skip_unavailable, three_runs
from tests.ops import rotated_oracles as oracle

ROIS = [
    [0, 5, 4, 6, 3, 0.3],
    [1, 2, 2, 4, 8, -1.2],
    [0, 10, 8, 3, 3, math.pi / 2],
    [1, -1, -1, 2, 2, 0.1],  # mostly outside the map
    [0, 5, 5, 0, 0, 0],  # empty
    [1, 5.5, 4.5, 20, 15, 2.0],  # larger than the map
]


def _inputs(dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(2, 3, 9, 11, generator=g, dtype=dtype), torch.tensor(ROIS, dtype=dtype)


@pytest.mark.parametrize("sampling_ratio", [-1, 0, 2])
@pytest.mark.parametrize("aligned", [True, False])
@pytest.mark.parametrize("clockwise", [True, False])
def test_reference_matches_per_sample_loop_float64(sampling_ratio, aligned, clockwise):
    x, rois = _inputs()
    for scale in (1.0, 0.5):
        got = roi_align_rotated(x, rois, (3, 2), scale, sampling_ratio, aligned, clockwise, backend="torch")
        want = oracle.roi_align_rotated(x, rois, (3, 2), scale, sampling_ratio, aligned, clockwise)
        torch.testing.assert_close(got, want, rtol=0, atol=1e-12)


def test_clockwise_samples_along_the_le90_width():
    """A 1-pixel-high roi along a diagonal ramp: clockwise, its bins follow the box's width axis
    (cos a, sin a) in image coordinates, so they read the ramp's values at those points."""
    H = W = 32
    ys, xs = torch.meshgrid(torch.arange(H, dtype=torch.float64), torch.arange(W, dtype=torch.float64), indexing="ij")
    ramp = (xs + 100 * ys)[None, None]
    a = 0.5
    out = roi_align_rotated(ramp, torch.tensor([[0, 16.5, 16.5, 8, 1, a]], dtype=torch.float64), (1, 4), 1.0, 1, True, True)
    t = torch.tensor([-3.0, -1.0, 1.0, 3.0], dtype=torch.float64)  # the bin centres along the width
    want = (16 + t * math.cos(a)) + 100 * (16 + t * math.sin(a))
    torch.testing.assert_close(out.view(4), want, rtol=0, atol=1e-9)


def test_gradcheck():
    x, rois = _inputs()
    x = x[:, :2, :6, :7].contiguous().requires_grad_(True)
    rois = rois * torch.tensor([1, 0.6, 0.6, 0.6, 0.6, 1], dtype=rois.dtype)  # fit the smaller map
    for sr, aligned, cw in ((2, True, True), (0, False, False)):
        assert torch.autograd.gradcheck(lambda t: roi_align_rotated(t, rois[:4], (2, 2), 1.0, sr, aligned, cw), (x,))


def test_backend_matches_reference(backend, dtype):
    x, rois = _inputs(torch.float32, seed=1)
    x = x.to(backend.device, dtype).requires_grad_(True)
    rois = rois.to(backend.device)

    def run(name, t):
        return skip_unavailable(roi_align_rotated, t, rois.to(t.dtype), (3, 2), 0.5, 2, True, True, backend=name)

    assert_runs_close(three_runs(run, (x,), backend.name), dtype, backend.name)


def test_deterministic_backward_takes_the_fixed_order_path(backend):
    x, rois = _inputs(torch.float32, seed=2)
    x = x.to(backend.device).requires_grad_(True)
    before = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        y = skip_unavailable(roi_align_rotated, x, rois.to(backend.device), 3, 0.5, 2, True, True, backend=backend.name)
        (a,) = torch.autograd.grad(y.square().sum(), x)
        y = roi_align_rotated(x, rois.to(backend.device), 3, 0.5, 2, True, True, backend=backend.name)
        (b,) = torch.autograd.grad(y.square().sum(), x)
    finally:
        torch.use_deterministic_algorithms(before)
    assert torch.equal(a, b)


def test_unusable_rois_give_nan_and_no_gradient():
    x, rois = _inputs()
    x.requires_grad_(True)
    rois[1, 2] = float("nan")
    with value_checks(False):
        rois_bad_batch = rois.clone()
        rois_bad_batch[0, 0] = 7
        y = roi_align_rotated(x, rois_bad_batch, 2, 1.0, 2, True, True)
    assert y[[0, 1]].isnan().all() and not y[2:].isnan().any()
    (g,) = torch.autograd.grad(y[2:].sum(), x)
    assert torch.isfinite(g).all()


def test_bad_input_names_the_argument():
    x, rois = _inputs()
    with pytest.raises(OpInputError, match="'rois' expected shape"):
        roi_align_rotated(x, rois[:, :5], 2)
    with pytest.raises(OpInputError, match="'output_size' expected two positive ints"):
        roi_align_rotated(x, rois, (0, 2))
    bad = rois.clone()
    bad[2, 0] = 2
    with value_checks(True), pytest.raises(OpInputError, match=r"batch indices \(column 0\) in 0..1, got 2.0 in row 2"):
        roi_align_rotated(x, bad, 2)


def test_opcheck():
    from geomoe_kernels.ops.roi_align_rotated import roi_align_rotated_op

    x, rois = _inputs(torch.float32)
    torch.library.opcheck(roi_align_rotated_op.op, (x.requires_grad_(True), rois, [2, 3], 0.5, 2, True, True, "torch"))


def test_float64_maps_are_refused_by_the_float32_kernels(backend):
    """The Triton kernels sample and sum in float32: a float64 map goes to the reference under auto,
    and naming the kernel backend says why it cannot."""
    from geomoe_kernels import BackendUnavailable

    if backend.name != "triton":
        pytest.skip("the Triton kernels' rule (the reference takes float64; the CUDA core has no kernel)")
    x, rois = _inputs(torch.float64)
    with pytest.raises(BackendUnavailable, match="float64"):
        roi_align_rotated(x.to(backend.device), rois.to(backend.device), 2, backend=backend.name)


def _huge_rois():
    """A ramp map and rois whose adaptive grid (ceil(side / bins) a bin side) is far above the bound
    of 64: 300 / 1 and 1e5 / 2 (5e9 samples a bin unbounded), 1e30 (all outside but the count)."""
    H = W = 24
    ys, xs = torch.meshgrid(torch.arange(H, dtype=torch.float64), torch.arange(W, dtype=torch.float64), indexing="ij")
    x = torch.stack([xs + 100 * ys, (xs - 12).abs() * ys])[None]
    rois = torch.tensor(
        [[0, 12, 12, 1e5, 300, 0.3], [0, 10, 13, 40, 300, -1.0], [0, 12, 12, 1e30, 1e30, 0.2]], dtype=torch.float64
    )
    return x, rois


def test_huge_rois_take_at_most_64_adaptive_samples_a_bin_side():
    x, rois = _huge_rois()
    x.requires_grad_(True)
    got = roi_align_rotated(x, rois, (1, 2), 1.0, 0, True, True, backend="torch")
    torch.testing.assert_close(got, oracle.roi_align_rotated(x.detach(), rois, (1, 2), 1.0, 0, True, True), rtol=0, atol=1e-9)
    (g,) = torch.autograd.grad(got.sum(), x)  # the backward bounded alike: all weights of a bin sum to <= 1
    assert torch.isfinite(g).all() and 0 < float(g.sum()) <= 2 * 3 * 2 + 1e-9


def test_huge_rois_are_bounded_on_every_backend(backend):
    x, _ = _huge_rois()
    # one bound side each (64 x 2 and 1 x 64 samples a bin: the interpreter's loop stays short); unbounded
    # the second would loop 5e4 times a bin
    rois = torch.tensor([[0, 12, 12, 3, 300, 0.3], [0, 10, 13, 1e5, 1, -1.0]], dtype=torch.float64)
    x, rois = x.float().to(backend.device), rois.float().to(backend.device)
    want = roi_align_rotated(x.double(), rois.double(), (1, 2), 1.0, 0, True, True, backend="torch")
    got = skip_unavailable(roi_align_rotated, x, rois, (1, 2), 1.0, 0, True, True, backend=backend.name)
    torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-3)


def test_a_sampling_ratio_above_the_bound_is_refused():
    x, rois = _inputs()
    with pytest.raises(OpInputError, match=r"'sampling_ratio' expected at most 64 samples a bin side .* got 65"):
        roi_align_rotated(x, rois, 2, 1.0, 65)
    assert roi_align_rotated(x, rois[:1], (1, 1), 1.0, 64).shape == (1, 3, 1, 1)
