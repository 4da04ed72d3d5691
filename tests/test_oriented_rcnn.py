"""Oriented R-CNN (geomoe.detection.oriented_rcnn): the smooth L1, the RoI level mapping, the
oriented RPN's losses against a float64 computation written here (anchors outside the image left
out), and the detector end to end on a tiny stand-in backbone."""

import math

import torch
from geomoe.detection.boxes import AnchorGenerator
from geomoe.detection.oriented_rcnn import OrientedConfig, OrientedRCNN, rotated_roi_levels, smooth_l1
from geomoe.detection.rbox import MidpointOffsetCoder, rbox_to_hbox
from tests.test_detection import _Tiny  # the same stand-in backbone


def _hiou(a, b):
    iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = iw * ih
    return inter / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter)


def test_smooth_l1_and_levels_by_hand():
    x = torch.tensor([0.05, -0.2, 2.0], dtype=torch.float64)
    beta = 1 / 9
    want = 0.5 * 0.05**2 / beta + (0.2 - 0.5 * beta) + (2.0 - 0.5 * beta)
    assert float(smooth_l1(x, beta)) == want
    rois = torch.tensor(
        [[0, 0, 0, 56, 56, 0.3], [0, 0, 0, 112, 112, 1.0], [0, 0, 0, 500, 500, 0], [0, 0, 0, 10, 4, 0]], dtype=torch.float64
    )
    assert rotated_roi_levels(rois).tolist() == [0, 1, 3, 0]


def test_rpn_losses_match_a_float64_computation():
    """One 64 x 64 image, one level (stride 16, 3 x 3 x 3 anchors of 32 px): every anchor whose box
    lies inside the image is assigned by the loop below (fewer than 256: all sampled)."""
    torch.manual_seed(0)
    cfg = OrientedConfig(num_classes=2, fpn_channels=8, fc_channels=16, strides=(16,), anchor_scales=(2.0,))
    model = OrientedRCNN(_Tiny(), cfg).double()
    anchors = AnchorGenerator((16,), (2.0,))([(4, 4)], dtype=torch.float64)[0]
    A = anchors.shape[0]
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(1, A, generator=g, dtype=torch.float64)
    deltas = torch.randn(1, A, 6, generator=g, dtype=torch.float64) * 0.1
    gt = torch.tensor([[30.0, 28.0, 36.0, 14.0, 0.4]], dtype=torch.float64)
    got = model._rpn_losses(anchors, logits, deltas, [{"boxes": gt, "labels": torch.tensor([0])}], [(64, 64)])
    hb = rbox_to_hbox(gt)[0].tolist()
    ious = [_hiou(a, hb) for a in anchors.tolist()]
    best = max(ious)
    cls = reg = 0.0
    n = 0
    coder = MidpointOffsetCoder()
    for j, a in enumerate(anchors.tolist()):
        if a[0] < 0 or a[1] < 0 or a[2] > 64 or a[3] > 64:
            continue
        positive = ious[j] >= 0.7 or (ious[j] == best and best >= 0.3)
        if not positive and ious[j] >= 0.3:
            continue  # ignored
        n += 1
        x = float(logits[0, j])
        cls += math.log(1 + math.exp(-x)) if positive else math.log(1 + math.exp(x))
        if positive:
            t = coder.encode(anchors[j : j + 1], gt)[0]
            for d in (deltas[0, j] - t).tolist():
                reg += 0.5 * d * d * 9 if abs(d) < 1 / 9 else abs(d) - 0.5 / 9
    assert n > 3
    torch.testing.assert_close(got["loss_rpn_cls"], torch.tensor(cls / n, dtype=torch.float64), rtol=1e-12, atol=0)
    torch.testing.assert_close(got["loss_rpn_bbox"], torch.tensor(reg / n, dtype=torch.float64), rtol=1e-12, atol=0)


def test_detector_trains_and_detects_end_to_end():
    torch.manual_seed(0)
    cfg = OrientedConfig(num_classes=3, fpn_channels=16, fc_channels=32, rpn_proposals=(200, 0.8, 200))
    model = OrientedRCNN(_Tiny(), cfg)
    model.generator = torch.Generator().manual_seed(0)
    images = torch.randn(2, 3, 64, 96)
    targets = [
        {"boxes": torch.tensor([[20.0, 30.0, 30.0, 10.0, 0.5], [70.0, 30.0, 40.0, 12.0, -1.2]]), "labels": torch.tensor([0, 2])},
        {"boxes": torch.zeros(0, 5), "labels": torch.zeros(0, dtype=torch.int64)},
    ]
    losses = model(images, [(64, 96), (60, 90)], targets)
    assert set(losses) == {"loss_rpn_cls", "loss_rpn_bbox", "loss_cls", "loss_bbox", "aux"}
    assert all(torch.isfinite(v) for v in losses.values())
    assert abs(float(losses["loss_rpn_cls"].detach()) - math.log(2)) < 0.01  # std 0.01 init: logits near 0
    assert abs(float(losses["loss_cls"].detach()) - math.log(4)) < 0.05
    sum(losses.values()).backward()
    assert model.backbone.convs[0].weight.grad.abs().sum() > 0 and model.roi_head.fc_reg.weight.grad.abs().sum() > 0
    model.eval()
    dets = model(images, [(64, 96), (60, 90)])
    for d in dets:
        assert d["boxes"].shape[1] == 5 and d["boxes"].shape[0] == d["scores"].shape[0] == d["labels"].shape[0]
        assert (d["scores"] > cfg.score_thr).all() and (d["scores"][:-1] >= d["scores"][1:]).all()
        assert (d["boxes"][:, 2] >= d["boxes"][:, 3]).all()  # le90: w >= h
        assert (d["boxes"][:, 4] >= -math.pi / 2).all() and (d["boxes"][:, 4] < math.pi / 2).all()
