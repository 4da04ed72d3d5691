"""box_iou_rotated: the reference against shapely's polygon intersection in float64 (random pairs,
identical boxes, shared sides, touching boxes, angle wrap-around, tiny, huge and far-away boxes,
empty boxes), every backend against it, NaN for non-finite boxes, errors."""

import math

import pytest
import torch

from geomoe_kernels import OpInputError
from geomoe_kernels.ops.box_iou_rotated import box_iou_rotated, random_boxes
from tests.helpers import skip_unavailable
from tests.ops import rotated_oracles as oracle

PI = math.pi


def _special_boxes() -> torch.Tensor:
    return torch.tensor(
        [
            [0, 0, 2, 2, 0],
            [2, 0, 2, 2, 0],  # shares a side with the first
            [1, 0, 2, 2, 0],  # half over the first
            [0, 0, 2, 2, PI / 2],  # the first, turned a quarter
            [0, 0, 2, 2, PI / 4],
            [0, 0, 4, 1, PI / 2 - 1e-9],  # angle just inside the wrap
            [0, 0, 4, 1, -PI / 2],  # the same box at the other end of the range
            [0, 0, 4, 1, PI / 2 + PI],  # and a turn further
            [3, 0, 4, 1, 0.3],
            [5, 5, 1e-3, 2e-3, 0.7],  # tiny
            [5, 5, 1.5e-3, 1e-3, 0.1],
            [0, 0, 1e5, 3e5, 0.2],  # huge
            [1e4, 1e4, 3, 2, 0.4],  # far from the origin
            [1e4 + 1, 1e4, 3, 2, 0.4],
            [0, 0, 0, 2, 0],  # empty
            [0, 0, 2, -1, 0],
        ],
        dtype=torch.float64,
    )


def test_reference_matches_polygon_clipping_float64():
    g = torch.Generator().manual_seed(0)
    b1 = torch.cat([random_boxes(30, g, extent=15.0), _special_boxes()])
    b2 = torch.cat([b1[:10], random_boxes(20, g, extent=15.0), _special_boxes()])
    got = box_iou_rotated(b1, b2, backend="torch")
    torch.testing.assert_close(got, oracle.iou_matrix(b1, b2), rtol=0, atol=1e-9)


def test_identical_and_wrapped_boxes_have_iou_one_and_shared_sides_zero():
    s = _special_boxes()
    iou = box_iou_rotated(s, s, backend="torch")
    torch.testing.assert_close(iou.diag()[:14], torch.ones(14, dtype=torch.float64), rtol=0, atol=1e-9)
    assert iou[0, 1] == 0 and iou[0, 3] == pytest.approx(1.0, abs=1e-12)
    assert iou[5, 6] == pytest.approx(1.0, abs=1e-8) and iou[6, 7] == pytest.approx(1.0, abs=1e-9)  # 1e-9 rad apart
    assert iou[0, 2] == pytest.approx(1 / 3, abs=1e-12)
    assert torch.all(iou[14:] == 0) and torch.all(iou[:, 14:] == 0)


def test_non_finite_boxes_give_nan_rows():
    b = random_boxes(4, torch.Generator().manual_seed(1))
    b[1, 0], b[2, 4] = float("nan"), float("inf")
    iou = box_iou_rotated(b, b, backend="torch")
    assert iou[[1, 2]].isnan().all() and iou[:, [1, 2]].isnan().all() and not iou[[0, 3]][:, [0, 3]].isnan().any()


def test_backend_matches_reference(backend, dtype):
    if dtype != torch.float32:
        pytest.skip("boxes are float32 or float64 whatever the model's dtype: one row")
    g = torch.Generator().manual_seed(2)
    b1 = torch.cat([random_boxes(41, g, extent=20.0), _special_boxes()[:14]]).to(backend.device)
    b2 = torch.cat([b1[:7], random_boxes(19, g, extent=20.0).to(backend.device)])
    exact = box_iou_rotated(b1, b2, backend="torch")
    for dt in (torch.float32, torch.float64):
        got = skip_unavailable(box_iou_rotated, b1.to(dt), b2.to(dt), backend=backend.name)
        assert got.dtype == dt
        torch.testing.assert_close(got.double(), exact, rtol=0, atol=2e-5 if dt == torch.float32 else 1e-9)


def test_empty_inputs():
    b = random_boxes(3, torch.Generator().manual_seed(3))
    assert box_iou_rotated(b[:0], b).shape == (0, 3) and box_iou_rotated(b, b[:0]).shape == (3, 0)


def test_bad_input_names_the_argument():
    b = torch.zeros(3, 5)
    with pytest.raises(OpInputError, match="'boxes1' expected shape"):
        box_iou_rotated(torch.zeros(3, 4), b)
    with pytest.raises(OpInputError, match="'boxes2' expected dtype"):
        box_iou_rotated(b, b.double())


def test_opcheck():
    from geomoe_kernels.ops.box_iou_rotated import box_iou_rotated_op

    b = random_boxes(5, torch.Generator().manual_seed(4)).float()
    torch.library.opcheck(box_iou_rotated_op.op, (b, b[:3].contiguous(), "torch"))


def _slid_pairs(n=40, seed=5):
    """Rotated boxes and copies slid along their own width by w (touching from outside: IoU 0) and by
    w / 2 (sharing two sides' lines, half over: IoU 1/3): rounding puts the shared lines within
    ~1e-16 of each other, on either side."""
    g = torch.Generator().manual_seed(seed)
    a = random_boxes(n, g, extent=40.0)
    step = torch.stack([a[:, 2] * torch.cos(a[:, 4]), a[:, 2] * torch.sin(a[:, 4])], 1)
    touching, half = a.clone(), a.clone()
    touching[:, :2] += step
    half[:, :2] += step / 2
    return a, touching, half


def test_touching_and_half_slid_boxes_on_the_reference_float64():
    a, touching, half = _slid_pairs()
    got_t = torch.stack([box_iou_rotated(a[i : i + 1], touching[i : i + 1], backend="torch")[0, 0] for i in range(len(a))])
    got_h = torch.stack([box_iou_rotated(a[i : i + 1], half[i : i + 1], backend="torch")[0, 0] for i in range(len(a))])
    torch.testing.assert_close(got_t, torch.zeros_like(got_t), rtol=0, atol=1e-9)
    torch.testing.assert_close(got_h, torch.full_like(got_h, 1 / 3), rtol=0, atol=1e-9)


def test_touching_and_half_slid_boxes_on_every_backend(backend, dtype):
    if dtype != torch.float32:
        pytest.skip("boxes are float32 or float64 whatever the model's dtype: one row")
    a, touching, half = (t.to(backend.device) for t in _slid_pairs(n=24))
    for dt in (torch.float32, torch.float64):
        for other, want in ((touching, 0.0), (half, 1 / 3)):
            iou = skip_unavailable(box_iou_rotated, a.to(dt), other.to(dt), backend=backend.name).diag().double()
            torch.testing.assert_close(iou, torch.full_like(iou, want), rtol=0, atol=1e-5 if dt == torch.float32 else 1e-9)


def test_identical_boxes_far_out_and_huge_keep_iou_one(backend, dtype):
    if dtype != torch.float32:
        pytest.skip("boxes are float32 or float64 whatever the model's dtype: one row")
    b = torch.tensor([[2e38, 0.0, 2, 2, 0.3], [0.0, 0.0, 1e15, 3e15, 0.3]], device=backend.device)
    iou = skip_unavailable(box_iou_rotated, b, b, backend=backend.name).diag()
    torch.testing.assert_close(iou.double().cpu(), torch.ones(2, dtype=torch.float64), rtol=0, atol=1e-6)


def _huge_and_tiny_pairs(s: float):
    """Pairs of boxes of side about s (w h overflows float32 above ~1.8e19, underflows below ~1e-23)
    with their IoU from shapely on the same boxes divided by s (IoU does not change with the scale)."""
    unit = torch.tensor(
        [
            [[0, 0, 2, 1, 0.3], [0, 0, 2, 1, 0.3]],  # identical: 1
            [[0, 0, 2, 1, 0.3], [0.5, 0.3, 2, 1, -0.4]],
            [[0, 0, 1, 1, 0], [0, 0, 1, 1, math.pi / 2]],  # a square turned a quarter: 1
            [[0, 0, 3, 2, 0.2], [1, -0.5, 1.5, 0.7, 1.1]],
            [[0, 0, 1, 1, 0], [5, 0, 1, 1, 0]],  # apart: 0
        ],
        dtype=torch.float64,
    )
    want = torch.tensor([oracle.iou(a, b) for a, b in unit.tolist()], dtype=torch.float64)
    scaled = unit.clone()
    scaled[..., :4] *= s
    return scaled[:, 0], scaled[:, 1], want


@pytest.mark.parametrize("s", [1e19, 3e30, 1e37, 1e-22, 1e-30])
def test_huge_and_tiny_float32_boxes_keep_their_iou(backend, dtype, s):
    """w h overflows (or underflows) float32: the IoU still comes out of the pair's own scale."""
    if dtype != torch.float32:
        pytest.skip("boxes are float32 or float64 whatever the model's dtype: one row")
    b1, b2, want = _huge_and_tiny_pairs(s)
    got = skip_unavailable(box_iou_rotated, b1.float().to(backend.device), b2.float().to(backend.device), backend=backend.name)
    torch.testing.assert_close(got.diag().double().cpu(), want, rtol=0, atol=2e-5)


@pytest.mark.parametrize("s", [1e160, 1e300, 1e-160, 1e-300])
def test_huge_and_tiny_float64_boxes_keep_their_iou(backend, dtype, s):
    if dtype != torch.float32:
        pytest.skip("boxes are float32 or float64 whatever the model's dtype: one row")
    b1, b2, want = _huge_and_tiny_pairs(s)
    got = skip_unavailable(box_iou_rotated, b1.to(backend.device), b2.to(backend.device), backend=backend.name)
    torch.testing.assert_close(got.diag().cpu(), want, rtol=0, atol=1e-9)


def test_far_apart_boxes_at_the_float32_range_are_zero_not_nan(backend, dtype):
    """Centres 6e38 apart: their difference overflows float32 to inf (inf - inf would be NaN)."""
    if dtype != torch.float32:
        pytest.skip("boxes are float32 or float64 whatever the model's dtype: one row")
    b = torch.tensor([[3e38, 0, 2, 1, 0.3], [-3e38, 0, 2, 1, 0.3], [3e38, 3e38, 1e38, 1e38, 0.5]], device=backend.device)
    iou = skip_unavailable(box_iou_rotated, b, b, backend=backend.name).double().cpu()
    torch.testing.assert_close(iou, torch.eye(3, dtype=torch.float64), rtol=0, atol=1e-6)
