"""nms: against a greedy float64 loop written here (ties, classes, empty input, degenerate boxes,
boxes on the borders of each other), every backend against it, opcheck, bad input."""

import pytest
import torch

from tests.helpers import skip_unavailable

from geomoe_kernels import OpInputError
from geomoe_kernels.ops.nms import nms, nms_op


def _iou(a, b):
    iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = iw * ih
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def _greedy(boxes, scores, thr, classes=None):
    """Python floats: visit by decreasing score, equal scores by increasing index."""
    boxes, scores = boxes.double().tolist(), scores.double().tolist()
    order = sorted(range(len(scores)), key=lambda i: (-scores[i], i))
    kept = []
    for i in order:
        if all(_iou(boxes[i], boxes[j]) <= thr or (classes is not None and int(classes[i]) != int(classes[j])) for j in kept):
            kept.append(i)
    return torch.tensor(kept, dtype=torch.int64)


def _clustered(n, classes=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    centres = torch.rand(5, 2, generator=g) * 40
    xy = centres[torch.randint(0, 5, (n,), generator=g)] + torch.randn(n, 2, generator=g) * 3
    wh = 4 + torch.rand(n, 2, generator=g) * 10
    boxes = torch.cat([xy, xy + wh], 1).round().double()  # integral corners: exact in every dtype
    scores = (torch.rand(n, generator=g) * 64).round().double() / 64  # many ties, exact in float16
    return boxes, scores, torch.randint(0, classes, (n,), generator=g)


@pytest.mark.parametrize("thr", [0.0, 0.3, 0.5, 0.7, 1.0])
@pytest.mark.parametrize("per_class", [False, True])
def test_reference_matches_greedy_loop(thr, per_class):
    boxes, scores, cls = _clustered(60)
    got = nms(boxes, scores, thr, cls if per_class else None)
    assert got.dtype == torch.int64
    assert torch.equal(got, _greedy(boxes, scores, thr, cls if per_class else None))


@pytest.mark.parametrize("block, split", [(7, 64), (7, 1), (256, 1)])
@pytest.mark.parametrize("per_class", [False, True])
def test_the_blocked_scan_matches_the_greedy_loop_across_blocks(monkeypatch, block, split, per_class):
    """The reference scans blocks of the visiting order against the boxes kept so far and splits by
    class: small blocks (many block boundaries, ties across them) and both class paths."""
    from geomoe_kernels.reference import nms as ref

    monkeypatch.setattr(ref, "_BLOCK", block)
    monkeypatch.setattr(ref, "_SPLIT_CLASSES", split)
    boxes, scores, cls = _clustered(90, classes=4, seed=3)
    for thr in (0.0, 0.3, 0.7):
        want = _greedy(boxes, scores, thr, cls if per_class else None)
        assert torch.equal(nms(boxes, scores, thr, cls if per_class else None), want)
    # a chain: each box suppresses the next one only (the longest fixed-point iteration in a block)
    x = torch.arange(40, dtype=torch.float64) * 3
    chain = torch.stack([x, torch.zeros_like(x), x + 10, torch.full_like(x, 10)], 1)  # IoU of neighbours 7/13
    s = torch.linspace(1, 0.5, 40, dtype=torch.float64)
    assert nms(chain, s, 0.5).tolist() == list(range(0, 40, 2)) == _greedy(chain, s, 0.5).tolist()


def test_ties_keep_the_lower_index_first():
    boxes = torch.tensor([[0, 0, 10, 10], [0, 0, 10, 10], [1, 1, 11, 11], [50, 50, 60, 60]], dtype=torch.float64)
    scores = torch.tensor([0.5, 0.5, 0.9, 0.5], dtype=torch.float64)
    assert nms(boxes, scores, 0.5).tolist() == [2, 3]  # 2 suppresses 0 and 1; 3 kept
    assert nms(boxes, scores, 0.95).tolist() == [2, 0, 3]  # 0 beats its twin 1 (IoU 1 > 0.95), 0 and 3 in index order
    assert nms(boxes, scores, 1.0).tolist() == [2, 0, 1, 3]  # IoU 1 is not > 1: nothing suppressed


def test_empty_degenerate_and_touching_boxes():
    empty = nms(torch.zeros(0, 4), torch.zeros(0), 0.5)
    assert empty.shape == (0,) and empty.dtype == torch.int64
    assert nms(torch.zeros(0, 4), torch.zeros(0), 0.5, torch.zeros(0, dtype=torch.int64)).shape == (0,)
    # degenerate boxes (zero width or height, or a point) overlap nothing: all kept, even twins
    boxes = torch.tensor([[5, 5, 5, 9], [5, 5, 5, 9], [3, 3, 3, 3], [0, 0, 8, 0]], dtype=torch.float64)
    assert nms(boxes, torch.tensor([0.1, 0.2, 0.3, 0.4], dtype=torch.float64), 0.0).tolist() == [3, 2, 1, 0]
    # boxes sharing an edge have IoU 0: kept at threshold 0; one box inside another, IoU = area ratio 0.25
    boxes = torch.tensor([[0, 0, 4, 4], [4, 0, 8, 4], [0, 4, 4, 8], [1, 1, 3, 3]], dtype=torch.float64)
    scores = torch.tensor([0.9, 0.8, 0.7, 0.6], dtype=torch.float64)
    assert nms(boxes, scores, 0.0).tolist() == [0, 1, 2]
    assert nms(boxes, scores, 0.25).tolist() == [0, 1, 2, 3]
    assert nms(boxes, scores, 0.2499).tolist() == [0, 1, 2]
    # a single box
    assert nms(boxes[:1], scores[:1], 0.5).tolist() == [0]


@pytest.mark.parametrize("n", [0, 1, 33, 70])
@pytest.mark.parametrize("per_class", [False, True])
def test_backend_matches_greedy_loop(backend, dtype, n, per_class):
    boxes, scores, cls = _clustered(n, seed=n)
    want = _greedy(boxes, scores, 0.45, cls if per_class else None)
    got = skip_unavailable(
        nms,
        boxes.to(backend.device, dtype),
        scores.to(backend.device, dtype),
        0.45,
        cls.to(backend.device) if per_class else None,
        backend=backend.name,
    )
    assert got.dtype == torch.int64 and torch.equal(got.cpu(), want), (got, want)


def test_opcheck():
    boxes, scores, cls = _clustered(12)
    torch.library.opcheck(nms_op.op, (boxes.float(), scores.float(), 0.5, None))
    torch.library.opcheck(nms_op.op, (boxes.float(), scores.float(), 0.5, cls))


def test_bad_input_names_the_argument():
    b, s = torch.rand(3, 4), torch.rand(3)
    b[:, 2:] += 1
    with pytest.raises(OpInputError, match=r"'boxes' expected shape \[N, 4\]"):
        nms(torch.rand(3, 5), s, 0.5)
    with pytest.raises(OpInputError, match=r"'scores' expected shape \[3\]"):
        nms(b, torch.rand(4), 0.5)
    with pytest.raises(OpInputError, match="'idxs' expected dtype int64"):
        nms(b, s, 0.5, torch.zeros(3))
    with pytest.raises(OpInputError, match=r"'iou_threshold' expected a number in \[0, 1\], got 1.5"):
        nms(b, s, 1.5)
    flipped = b.clone()
    flipped[1, 0] = flipped[1, 2] + 1
    with pytest.raises(OpInputError, match="'boxes' expected x1 <= x2 and y1 <= y2 .*box 1"):
        nms(flipped, s, 0.5)
    s[2] = float("nan")
    with pytest.raises(OpInputError, match="'scores' expected finite values"):
        nms(b, s, 0.5)
