"""nms_rotated: against a greedy NMS written with shapely's IoU (float64), class-wise, tied scores,
empty input, every backend against the reference, errors."""

import pytest
import torch

from geomoe_kernels import OpInputError
from geomoe_kernels._checks import value_checks
from geomoe_kernels.ops.box_iou_rotated import random_boxes
from geomoe_kernels.ops.nms_rotated import nms_rotated
from tests.helpers import skip_unavailable
from tests.ops import rotated_oracles as oracle


def _case(n=60, seed=0):
    g = torch.Generator().manual_seed(seed)
    boxes = torch.cat([random_boxes(n - 8, g, extent=25.0), random_boxes(4, g, extent=25.0).repeat(2, 1)])
    scores = torch.rand(n, generator=g, dtype=torch.float64)
    scores[n - 4 :] = scores[n - 8 : n - 4]  # identical boxes with tied scores: the lower index wins
    classes = torch.randint(0, 3, (n,), generator=g)
    return boxes, scores, classes


@pytest.mark.parametrize("threshold", [0.0, 0.1, 0.5, 0.9])
def test_reference_matches_greedy_with_polygon_iou(threshold):
    boxes, scores, classes = _case()
    assert nms_rotated(boxes, scores, threshold, backend="torch").tolist() == oracle.nms(boxes, scores, threshold)
    got = nms_rotated(boxes, scores, threshold, classes, backend="torch").tolist()
    assert got == oracle.nms(boxes, scores, threshold, classes)


def test_ties_keep_the_lower_index():
    boxes, scores, _ = _case()
    kept = nms_rotated(boxes, scores, 0.5, backend="torch").tolist()
    assert 52 in kept and 56 not in kept


def test_backend_matches_reference(backend, dtype):
    if dtype != torch.float32:
        pytest.skip("boxes are float32 or float64 whatever the model's dtype: one row")
    for seed in range(2):
        boxes, scores, classes = (t.to(backend.device) for t in _case(n=50, seed=seed))
        for thr in (0.1, 0.7):
            want = nms_rotated(boxes, scores, thr, backend="torch")
            got = skip_unavailable(nms_rotated, boxes.float(), scores.float(), thr, backend=backend.name)
            assert got.dtype == torch.int64 and got.tolist() == want.tolist()
            want = nms_rotated(boxes, scores, thr, classes, backend="torch")
            got = skip_unavailable(nms_rotated, boxes.float(), scores.float(), thr, classes, backend=backend.name)
            assert got.tolist() == want.tolist()


def test_empty_and_single():
    b = random_boxes(1, torch.Generator().manual_seed(1))
    assert nms_rotated(b[:0], torch.zeros(0, dtype=torch.float64), 0.5).shape == (0,)
    assert nms_rotated(b, torch.ones(1, dtype=torch.float64), 0.5).tolist() == [0]


def test_bad_input_names_the_argument():
    boxes, scores, _ = _case(n=10)
    with pytest.raises(OpInputError, match="'scores' expected shape"):
        nms_rotated(boxes, scores[:5], 0.5)
    with pytest.raises(OpInputError, match="'iou_threshold' expected a number in"):
        nms_rotated(boxes, scores, 1.5)
    bad = scores.clone()
    bad[3] = float("nan")
    with value_checks(True), pytest.raises(OpInputError, match="'scores' expected finite values"):
        nms_rotated(boxes, bad, 0.5)


def test_opcheck():
    from geomoe_kernels.ops.nms_rotated import nms_rotated_op

    boxes, scores, classes = _case(n=12)
    torch.library.opcheck(nms_rotated_op.op, (boxes.float(), scores.float(), 0.3, classes, "torch"))


@pytest.mark.parametrize("block", [1, 5, 16])
def test_reference_in_blocks_matches_greedy_with_polygon_iou(monkeypatch, block):
    """The reference checks each block of boxes against those kept before it: blocks smaller than
    the input (and one box a block) give the greedy result all the same."""
    from geomoe_kernels.reference import nms_rotated as ref

    monkeypatch.setattr(ref, "BLOCK", block)
    boxes, scores, classes = _case(seed=3)
    for threshold in (0.0, 0.1, 0.5):
        assert nms_rotated(boxes, scores, threshold, backend="torch").tolist() == oracle.nms(boxes, scores, threshold)
        got = nms_rotated(boxes, scores, threshold, classes, backend="torch").tolist()
        assert got == oracle.nms(boxes, scores, threshold, classes)
