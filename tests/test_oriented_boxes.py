"""Oriented detection's box arithmetic (python/geomoe/detection/rbox.py) and rotated mAP
(dota_eval.py): conversions against corners computed by hand, both coders' round trips and
hand-computed deltas, and AP on hand-made rankings whose values are worked out below."""

import math

import pytest
import torch

from geomoe.detection.dota_eval import ImageBoxes, average_precision, rotated_map
from geomoe.detection.rbox import (
    DeltaXYWHTCoder,
    MidpointOffsetCoder,
    norm_angle_le90,
    qbox_to_rbox,
    rbox_to_hbox,
    rbox_to_qbox,
)
from geomoe_kernels import box_iou_rotated


def _le90_boxes(n=50, seed=0):
    g = torch.Generator().manual_seed(seed)
    u = torch.rand(n, 5, generator=g, dtype=torch.float64)
    w, h = 2 + 40 * u[:, 2], 2 + 40 * u[:, 3]
    return torch.stack(
        [50 + 100 * u[:, 0], 50 + 100 * u[:, 1], torch.maximum(w, h), torch.minimum(w, h), (u[:, 4] - 0.5) * math.pi], 1
    )


def test_qbox_of_a_turned_rectangle_by_hand():
    a = math.radians(30)
    c, s = math.cos(a), math.sin(a)
    corners = [(10 + x * c - y * s, 20 + x * s + y * c) for x, y in ((-2, -1), (2, -1), (2, 1), (-2, 1))]
    q = torch.tensor([v for p in corners for v in p], dtype=torch.float64)
    torch.testing.assert_close(qbox_to_rbox(q), torch.tensor([10, 20, 4, 2, a], dtype=torch.float64))
    # starting from the short side: the long side still gives width and angle
    q2 = torch.cat([q[2:], q[:2]])
    torch.testing.assert_close(qbox_to_rbox(q2), torch.tensor([10, 20, 4, 2, a], dtype=torch.float64))
    torch.testing.assert_close(rbox_to_qbox(torch.tensor([10, 20, 4, 2, a], dtype=torch.float64)), q)


def test_conversions_round_trip_and_enclose():
    r = _le90_boxes()
    torch.testing.assert_close(qbox_to_rbox(rbox_to_qbox(r)), r)
    q = rbox_to_qbox(r).view(-1, 4, 2)
    hb = torch.stack([q[..., 0].min(1).values, q[..., 1].min(1).values, q[..., 0].max(1).values, q[..., 1].max(1).values], 1)
    torch.testing.assert_close(rbox_to_hbox(r), hb)
    assert torch.all(norm_angle_le90(torch.tensor([math.pi / 2, -math.pi / 2, 3.0])) < math.pi / 2)


def test_midpoint_offset_deltas_by_hand():
    """A 4 x 2 box at (10, 10), angle 0, from the anchor (8, 9, 12, 11): the top side's corners are
    x 8 and 12 (the rightmost: 12, da = (12 - 10) / 4 = 0.5), the right side's y 9 and 11 (gb 11,
    db = 0.5); divided by the stds 0.5: 1."""
    coder = MidpointOffsetCoder()
    d = coder.encode(
        torch.tensor([[8.0, 9, 12, 11]], dtype=torch.float64), torch.tensor([[10.0, 10, 4, 2, 0]], dtype=torch.float64)
    )
    torch.testing.assert_close(d, torch.tensor([[0.0, 0, 0, 0, 1, 1]], dtype=torch.float64))


def test_midpoint_offset_round_trip():
    """Boxes turned at least 10 degrees from the axes (nearer, the published rule's 0.1 px tolerance
    can take both corners of a nearly level side as "on top": see MidpointOffsetCoder)."""
    coder = MidpointOffsetCoder()
    gt = _le90_boxes(seed=1)
    a = gt[:, 4]
    gt[:, 4] = torch.sign(a) * (math.radians(10) + a.abs() * (70 / 90))  # |a| in [10, 80] degrees
    anchors = rbox_to_hbox(gt) + torch.randn(len(gt), 4, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    back = coder.decode(anchors, coder.encode(anchors, gt))
    iou = box_iou_rotated(back, gt).diag()
    torch.testing.assert_close(iou, torch.ones_like(iou), rtol=0, atol=1e-9)


def test_delta_xywht_round_trip_and_edge_swap():
    coder = DeltaXYWHTCoder()
    gt, props = _le90_boxes(seed=3), _le90_boxes(seed=4)
    torch.testing.assert_close(coder.decode(props, coder.encode(props, gt)), gt)
    # the proposal turned a quarter with its sides swapped is the same box: zero deltas
    p = torch.tensor([[30.0, 40, 20, 8, 0.2]], dtype=torch.float64)
    g = torch.tensor([[30.0, 40, 8, 20, 0.2 + math.pi / 2]], dtype=torch.float64)
    torch.testing.assert_close(coder.encode(p, g), torch.zeros(1, 5, dtype=torch.float64), rtol=0, atol=1e-12)
    # an offset along the proposal's own width axis is dx alone (times the std's inverse)
    g = torch.tensor([[30 + 2 * math.cos(0.2), 40 + 2 * math.sin(0.2), 20, 8, 0.2]], dtype=torch.float64)
    torch.testing.assert_close(coder.encode(p, g), torch.tensor([[0.1 / 0.1, 0, 0, 0, 0]], dtype=torch.float64))


def test_average_precision_by_hand():
    # ranked hits: TP FP TP, 2 ground truths -> recall .5 .5 1, precision 1 .5 .667
    recall = torch.tensor([0.5, 0.5, 1.0], dtype=torch.float64)
    precision = torch.tensor([1.0, 0.5, 2 / 3], dtype=torch.float64)
    # 11 points: t = 0..0.5 (6 points) best precision 1; t = 0.6..1 (5 points) 2/3
    assert average_precision(recall, precision, "11points") == pytest.approx((6 * 1 + 5 * 2 / 3) / 11)
    # area: 0.5 at precision 1, then 0.5 at 2/3
    assert average_precision(recall, precision, "area") == pytest.approx(0.5 + 0.5 * 2 / 3)
    with pytest.raises(ValueError, match="'11points' or 'area'"):
        average_precision(recall, precision, "voc")


def test_rotated_map_on_a_hand_made_case():
    """Class 0: image A has gts g1, g2; image B has g3 (difficult). Detections by score: 0.9 on g1
    (TP), 0.8 on g1 again (FP: already matched), 0.7 on g3 (neither: difficult), 0.6 on g2 turned
    a quarter of a degree (TP), 0.5 in empty space in B (FP). Ranked TP FP TP FP over 2 gts:
    recall .5 .5 1 1, precision 1 .5 .667 .5: 11-point AP (6 + 5 * 2/3) / 11. Class 1: a gt, no
    detection: AP 0. Class 2: nothing: excluded from the mean."""
    g1, g2, g3 = [10.0, 10, 8, 4, 0.3], [40.0, 40, 10, 6, -0.5], [20.0, 20, 6, 6, 0.0]
    gts = [
        ImageBoxes(
            torch.tensor([g1, g2, [70.0, 70, 5, 5, 0]]), torch.tensor([0, 0, 1]), difficult=torch.tensor([False, False, False])
        ),
        ImageBoxes(torch.tensor([g3]), torch.tensor([0]), difficult=torch.tensor([True])),
    ]
    g2_turned = [40.0, 40, 10, 6, -0.5 + math.radians(0.25)]
    dets = [
        ImageBoxes(torch.tensor([g1, g1, g2_turned]), torch.tensor([0, 0, 0]), scores=torch.tensor([0.9, 0.8, 0.6])),
        ImageBoxes(torch.tensor([g3, [90.0, 90, 4, 4, 0]]), torch.tensor([0, 0]), scores=torch.tensor([0.7, 0.5])),
    ]
    out = rotated_map(dets, gts, num_classes=3)
    ap0 = (6 + 5 * 2 / 3) / 11
    assert out["AP"][0] == pytest.approx(ap0) and out["AP"][1] == 0.0 and out["AP"][2] is None
    assert out["mAP"] == pytest.approx(ap0 / 2)
    assert out["recall"][0] == 1.0
