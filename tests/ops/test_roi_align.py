"""roi_align: against a float64 loop over RoIs, bins and samples written here (torchvision's
rules: adaptive grids for sampling_ratio -1 and 0, a fixed one for 2, aligned and not, RoIs on and
over the borders, degenerate and empty), gradients by gradcheck and against the loop's, every
backend against the reference, a deterministic backward, opcheck, bad input."""

import math

import pytest
import torch

from geomoe_kernels import OpInputError
from geomoe_kernels.ops.roi_align import roi_align, roi_align_backward, roi_align_op
from tests.helpers import assert_runs_close, skip_unavailable, three_runs


def _bilinear(plane, H, W, y, x):
    if y < -1.0 or y > H or x < -1.0 or x > W:
        return plane.new_zeros(())
    y, x = max(y, 0.0), max(x, 0.0)
    yl, xl = int(math.floor(y)), int(math.floor(x))
    if yl >= H - 1:
        yl = yh = H - 1
        y = float(yl)
    else:
        yh = yl + 1
    if xl >= W - 1:
        xl = xh = W - 1
        x = float(xl)
    else:
        xh = xl + 1
    ly, lx = y - yl, x - xl
    hy, hx = 1 - ly, 1 - lx
    return hy * hx * plane[yl, xl] + hy * lx * plane[yl, xh] + ly * hx * plane[yh, xl] + ly * lx * plane[yh, xh]


def _loop(x, rois, ph_n, pw_n, scale, sampling, aligned):
    """Per RoI, channel, bin and sample, in Python floats (the input stays a tensor for autograd)."""
    B, C, H, W = x.shape
    out = []
    for roi in rois.double().tolist():
        b = int(roi[0])
        off = 0.5 if aligned else 0.0
        x1, y1, x2, y2 = (v * scale - off for v in roi[1:])
        rw, rh = x2 - x1, y2 - y1
        if not aligned:
            rw, rh = max(rw, 1.0), max(rh, 1.0)
        bh, bw = rh / ph_n, rw / pw_n
        gh = sampling if sampling > 0 else math.ceil(rh / ph_n)
        gw = sampling if sampling > 0 else math.ceil(rw / pw_n)
        count = max(gh * gw, 1)
        chans = []
        for c in range(C):
            bins = []
            for ph in range(ph_n):
                for pw in range(pw_n):
                    acc = x.new_zeros(())
                    for iy in range(gh):
                        yy = y1 + ph * bh + (iy + 0.5) * bh / gh
                        for ix in range(gw):
                            xx = x1 + pw * bw + (ix + 0.5) * bw / gw
                            acc = acc + _bilinear(x[b, c], H, W, yy, xx)
                    bins.append(acc / count)
            chans.append(torch.stack(bins).reshape(ph_n, pw_n))
        out.append(torch.stack(chans))
    return torch.stack(out) if out else x.new_zeros(0, C, ph_n, pw_n)


ROIS = torch.tensor(
    [
        [0, 1.0, 1.0, 15.0, 12.0],  # inside
        [1, 0.0, 0.0, 21.0, 17.0],  # the whole map, on its borders (scale 0.5)
        [1, -3.0, 4.0, 6.0, 25.0],  # over the left and bottom edges
        [0, 10.0, 10.0, 10.0, 10.0],  # a point
        [1, 20.0, 2.0, 30.0, 9.0],  # mostly outside on the right
        [0, 3.5, 7.25, 9.75, 8.5],  # fractional, thin
        [1, 6.0, 6.0, 7.0, 7.0],  # smaller than a bin
        [1, 14.0, 16.0, 4.0, 6.0],  # inverted (x2 < x1): aligned with a fixed grid, samples run back
        [0, -40.0, -40.0, -30.0, -30.0],  # entirely outside: zeros
    ],
    dtype=torch.float64,
)


@pytest.mark.parametrize("sampling", [-1, 0, 2])
@pytest.mark.parametrize("aligned", [False, True])
@pytest.mark.parametrize("size", [(3, 2), 2])
def test_reference_matches_loop_forward_and_backward(sampling, aligned, size):
    x = torch.randn(2, 3, 9, 11, dtype=torch.float64, requires_grad=True)
    got = roi_align(x, ROIS, size, 0.5, sampling, aligned)
    ph, pw = (size, size) if isinstance(size, int) else size
    want = _loop(x, ROIS, ph, pw, 0.5, sampling, aligned)
    assert got.shape == (9, 3, ph, pw)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-12)
    assert got[-1].abs().max() == 0
    up = torch.randn_like(got)
    (g_got,) = torch.autograd.grad(got, x, up)
    (g_want,) = torch.autograd.grad(want, x, up)
    torch.testing.assert_close(g_got, g_want, rtol=0, atol=1e-12)


def test_many_rois_of_many_grid_sizes_in_small_chunks(monkeypatch):
    """The reference groups RoIs by their adaptive grid and pools each group in chunks: RoIs of
    every size, both images, in chunks of a few RoIs, against the loop, forward and backward."""
    from geomoe_kernels.reference import roi_align as ref

    monkeypatch.setattr(ref, "_CHUNK_SAMPLES", 200)
    g = torch.Generator().manual_seed(5)
    xy = torch.rand(30, 2, generator=g, dtype=torch.float64) * 24 - 4
    wh = torch.rand(30, 2, generator=g, dtype=torch.float64) * 26
    rois = torch.cat([torch.randint(0, 2, (30, 1), generator=g).double(), xy, xy + wh], 1)
    x = torch.randn(2, 2, 9, 11, dtype=torch.float64, requires_grad=True)
    for sampling, aligned in [(0, True), (-1, False)]:
        got = roi_align(x, rois, (2, 3), 0.5, sampling, aligned)
        want = _loop(x, rois, 2, 3, 0.5, sampling, aligned)
        torch.testing.assert_close(got, want, rtol=0, atol=1e-12)
        up = torch.randn_like(got)
        torch.testing.assert_close(torch.autograd.grad(got, x, up)[0], torch.autograd.grad(want, x, up)[0], rtol=0, atol=1e-12)


def test_empty_rois_and_an_empty_aligned_grid():
    x = torch.randn(1, 2, 4, 4, dtype=torch.float64, requires_grad=True)
    out = roi_align(x, torch.zeros(0, 5, dtype=torch.float64), 7, 1.0, 0, True)
    assert out.shape == (0, 2, 7, 7)
    (g,) = torch.autograd.grad(out.sum(), x, allow_unused=True) if out.requires_grad else (torch.zeros_like(x),)
    assert g.abs().max() == 0
    # aligned, a zero-size RoI has an adaptive grid of 0 x 0 samples: zeros (torchvision: count clamped to 1)
    point = torch.tensor([[0, 2.0, 2.0, 2.0, 2.0]], dtype=torch.float64)
    assert roi_align(x, point, 2, 1.0, 0, True).abs().max() == 0
    assert roi_align(x, point, 2, 1.0, 0, False).abs().max() > 0  # not aligned: at least 1 x 1


def test_gradcheck():
    x = torch.randn(2, 2, 5, 6, dtype=torch.float64, requires_grad=True)
    rois = torch.tensor([[0, 0.3, 0.7, 7.9, 9.2], [1, -1.2, 2.1, 4.4, 5.3], [1, 2.6, 1.1, 11.5, 8.7]], dtype=torch.float64)
    for sampling, aligned in [(-1, False), (0, True), (2, True)]:
        assert torch.autograd.gradcheck(lambda t: roi_align(t, rois, (2, 3), 0.5, sampling, aligned), (x,))


@pytest.mark.parametrize("sampling, aligned", [(0, True), (2, True), (2, False)])
def test_backend_matches_reference(backend, dtype, aligned, sampling):
    x = torch.randn(2, 5, 9, 11).to(backend.device, dtype).requires_grad_(True)
    rois = ROIS.float().to(backend.device)
    outs = three_runs(
        lambda name, x: skip_unavailable(roi_align, x, rois, (3, 2), 0.5, sampling, aligned, backend=name), [x], backend.name
    )
    assert_runs_close(outs, dtype, backend.name)


def test_backward_has_the_same_bits_every_run(backend):
    """Overlapping RoIs add into the same pixels: the order is fixed (no float atomics)."""
    x = torch.randn(2, 3, 9, 11, device=backend.device)
    rois = torch.cat([ROIS[:3], ROIS[:3]]).float().to(backend.device)
    g = torch.randn(6, 3, 3, 3, device=backend.device)
    runs = [skip_unavailable(roi_align_backward, g, x, rois, 3, 3, 0.5, 0, True, backend=backend.name) for _ in range(2)]
    assert all(torch.equal(r, runs[0]) for r in runs[1:])


def test_a_batch_index_out_of_range_reads_nothing_where_values_are_not_checked(kernel_backend):
    """On a GPU value checks are off by default: the kernel must not read outside the input."""
    from geomoe_kernels import _checks

    x = torch.randn(1, 3, 5, 5, device=kernel_backend.device)
    rois = torch.tensor([[0, 0, 0, 4, 4.0], [5, 0, 0, 4, 4.0], [-1, 0, 0, 4, 4.0]], device=kernel_backend.device)
    with _checks.value_checks(False):
        y = skip_unavailable(roi_align, x, rois, 2, 1.0, 2, True, backend=kernel_backend.name)
    assert y[1:].abs().max() == 0
    torch.testing.assert_close(y[:1], roi_align(x, rois[:1], 2, 1.0, 2, True, backend="torch"))


def test_opcheck():
    x = torch.randn(2, 3, 5, 6, requires_grad=True)
    rois = ROIS[:4].float()
    torch.library.opcheck(roi_align_op.op, (x, rois, 2, 3, 0.5, 0, True))
    torch.library.opcheck(roi_align_op.op, (x, rois, 2, 2, 0.5, 2, False))
    torch.library.opcheck(roi_align_backward.op, (torch.randn(4, 3, 2, 3), x.detach(), rois, 2, 3, 0.5, 0, True))


def test_bad_input_names_the_argument():
    x = torch.randn(2, 3, 5, 6)
    with pytest.raises(OpInputError, match=r"'rois' expected shape \[K, 5\]"):
        roi_align(x, torch.zeros(2, 4), 7)
    with pytest.raises(OpInputError, match="'input' expected a 4-d tensor"):
        roi_align(x[0], torch.zeros(2, 5), 7)
    with pytest.raises(OpInputError, match=r"'rois\[:, 0\] \(batch index\)' expected values in \[0, 1\], got values in \[0, 2\]"):
        roi_align(x, torch.tensor([[0, 1, 1, 3, 3], [2, 1, 1, 3, 3.0]]), 7)
    with pytest.raises(OpInputError, match="integral batch indices"):
        roi_align(x, torch.tensor([[0.5, 1, 1, 3, 3]]), 7)
    with pytest.raises(OpInputError, match="'output_size' expected an int or"):
        roi_align(x, torch.zeros(1, 5), (7, 7, 7))
    with pytest.raises(OpInputError, match="'output_size' expected positive sizes"):
        roi_align(x, torch.zeros(1, 5), 0)
