"""The Faster R-CNN of geomoe.detection against independent float64 computations written here:
anchors, the box coder, the assigner and sampler, the RoI level mapping and pooling, the RPN and
RoI losses; the detector end to end on a tiny stand-in backbone; COCO AP (pycocotools) against a
count by hand."""

import math

import pytest
import torch
from torch import nn

from geomoe.detection import (
    AnchorGenerator,
    DeltaXYWHCoder,
    DetectorConfig,
    FasterRCNN,
    RandomSampler,
    roi_levels,
    roi_loss,
    rpn_loss,
)
from geomoe_kernels.ops.roi_align import roi_align


def _iou(a, b):
    iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = iw * ih
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def _encode(p, g, stds=(1, 1, 1, 1)):
    pw, ph, gw, gh = p[2] - p[0], p[3] - p[1], g[2] - g[0], g[3] - g[1]
    d = [
        ((g[0] + g[2]) / 2 - (p[0] + p[2]) / 2) / pw,
        ((g[1] + g[3]) / 2 - (p[1] + p[3]) / 2) / ph,
        math.log(gw / pw),
        math.log(gh / ph),
    ]
    return [v / s for v, s in zip(d, stds)]


def test_anchors_match_a_loop_over_cells_and_ratios():
    got = AnchorGenerator()([(3, 5), (2, 3), (1, 2), (1, 1), (1, 1)], dtype=torch.float64)
    assert [a.shape[0] for a in got] == [45, 18, 6, 3, 3]
    for stride, level, (H, W) in zip((4, 8, 16, 32, 64), got, [(3, 5), (2, 3), (1, 2), (1, 1), (1, 1)]):
        want = []
        for y in range(H):
            for x in range(W):
                for r in (0.5, 1.0, 2.0):  # h / w = r, area (8 * stride)^2
                    w, h = 8 * stride / math.sqrt(r), 8 * stride * math.sqrt(r)
                    want.append([x * stride - w / 2, y * stride - h / 2, x * stride + w / 2, y * stride + h / 2])
        torch.testing.assert_close(level, torch.tensor(want, dtype=torch.float64), rtol=0, atol=1e-12)
    # the published sizes: 32 .. 512, the first anchor of level 0 a wide one
    torch.testing.assert_close(got[0][0], torch.tensor([-16 * 2**0.5, -8 * 2**0.5, 16 * 2**0.5, 8 * 2**0.5], dtype=torch.float64))
    assert got[4][1].tolist() == [-256.0, -256.0, 256.0, 256.0]


def test_box_coder_encodes_decodes_clamps_and_clips():
    g = torch.Generator().manual_seed(0)
    xy = torch.rand(20, 2, generator=g, dtype=torch.float64) * 50
    p = torch.cat([xy, xy + 1 + torch.rand(20, 2, generator=g, dtype=torch.float64) * 30], 1)
    xy = torch.rand(20, 2, generator=g, dtype=torch.float64) * 50
    t = torch.cat([xy, xy + 1 + torch.rand(20, 2, generator=g, dtype=torch.float64) * 30], 1)
    coder = DeltaXYWHCoder(stds=(0.1, 0.1, 0.2, 0.2))
    d = coder.encode(p, t)
    want = torch.tensor([_encode(a, b, (0.1, 0.1, 0.2, 0.2)) for a, b in zip(p.tolist(), t.tolist())], dtype=torch.float64)
    torch.testing.assert_close(d, want, rtol=0, atol=1e-12)
    torch.testing.assert_close(coder.decode(p, d), t, rtol=0, atol=1e-12)
    # class-specific deltas [N, 4k] decode per class; dw beyond log(1000 / 16) is clamped; clipping
    prior = torch.tensor([[10.0, 10.0, 20.0, 30.0]], dtype=torch.float64)
    deltas = torch.tensor([[0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 5.0, -5.0]], dtype=torch.float64)
    out = DeltaXYWHCoder().decode(prior, deltas)
    assert out.shape == (1, 8)
    torch.testing.assert_close(out[0, :4], prior[0])
    w, h = 10 * 1000 / 16, 20 * 16 / 1000  # both clamped to a factor 1000 / 16
    torch.testing.assert_close(out[0, 4:], torch.tensor([15 - w / 2, 20 - h / 2, 15 + w / 2, 20 + h / 2], dtype=torch.float64))
    clipped = DeltaXYWHCoder().decode(prior, deltas, max_shape=(25, 40))
    torch.testing.assert_close(clipped[0, 4:], torch.tensor([0, 20 - h / 2, 40, 20 + h / 2], dtype=torch.float64))


def _assign_loop(priors, gts, pos_thr, neg_thr, min_pos, low_quality):
    P, G = priors.tolist(), gts.tolist()
    ious = [[_iou(p, g) for p in P] for g in G]
    out = []
    for j in range(len(P)):
        if not G:
            out.append(0)
            continue
        best = max(range(len(G)), key=lambda i: (ious[i][j], -i))  # the first gt among equals
        m = ious[best][j]
        out.append(best + 1 if m >= pos_thr else (0 if m < neg_thr else -1))
    if low_quality:
        for i in range(len(G)):
            top = max(ious[i]) if P else 0
            if top >= min_pos:
                for j in range(len(P)):
                    if ious[i][j] == top:
                        out[j] = i + 1
    return torch.tensor(out, dtype=torch.int64)


@pytest.mark.parametrize("published", ["rpn", "rcnn"])
def test_assigner_matches_a_loop(published):
    cfg = DetectorConfig()
    assigner = cfg.rpn_assigner if published == "rpn" else cfg.roi_assigner
    assert (assigner.pos_iou_thr, assigner.neg_iou_thr, assigner.min_pos_iou, assigner.match_low_quality) == (
        (0.7, 0.3, 0.3, True) if published == "rpn" else (0.5, 0.5, 0.5, False)
    )
    priors = torch.tensor(
        [
            [0, 0, 10, 10],  # IoU 1 with gt 0
            [0, 0, 10, 11],  # 0.91 with gt 0
            [5, 0, 15, 10],  # 0.33 with gt 0: ignored by the RPN, negative for the RoI head
            [20, 30, 30, 40],  # nothing
            [22, 20, 32, 30],  # 0.82 with gt 1
            [40, 40, 50, 50],  # 0.43 with gt 2, its best (tied): a low-quality match
            [48, 40, 58, 50],  # 0.43 with gt 2 too
            [60, 60, 62, 62],  # 0.04 with gt 3, its best, below min_pos_iou: negative
            [100, 100, 110, 110],
        ],
        dtype=torch.float64,
    )
    gts = torch.tensor([[0, 0, 10, 10], [21, 20, 31, 30], [44, 40, 54, 50], [60, 60, 70, 70]], dtype=torch.float64)
    got, _ = assigner(priors, gts)
    want = _assign_loop(priors, gts, assigner.pos_iou_thr, assigner.neg_iou_thr, assigner.min_pos_iou, assigner.match_low_quality)
    assert torch.equal(got, want)
    assert got.tolist() == ([1, 1, -1, 0, 2, 3, 3, 0, 0] if published == "rpn" else [1, 1, 0, 0, 2, 0, 0, 0, 0])
    g = torch.Generator().manual_seed(1)
    xy = (torch.rand(60, 2, generator=g) * 40).round().double()
    priors = torch.cat([xy, xy + 4 + (torch.rand(60, 2, generator=g) * 12).round().double()], 1)
    got, _ = assigner(priors, gts)
    assert torch.equal(
        got,
        _assign_loop(priors, gts, assigner.pos_iou_thr, assigner.neg_iou_thr, assigner.min_pos_iou, assigner.match_low_quality),
    )
    empty, _ = assigner(priors, gts[:0])
    assert (empty == 0).all()


def test_sampler_counts_and_takes_all_when_few():
    assigned = torch.tensor([0] * 300 + [1] * 200 + [-1] * 50 + [2] * 10)
    pos, neg = RandomSampler(256, 0.5)(assigned, torch.Generator().manual_seed(0))
    assert pos.numel() == 128 and neg.numel() == 128
    assert (assigned[pos] > 0).all() and (assigned[neg] == 0).all() and pos.unique().numel() == 128
    few = torch.tensor([0] * 5 + [3] * 2 + [-1] * 4)
    pos, neg = RandomSampler(512, 0.25)(few)
    assert sorted(pos.tolist()) == [5, 6] and sorted(neg.tolist()) == [0, 1, 2, 3, 4]
    pos, neg = RandomSampler(8, 0.25)(torch.tensor([1] * 6 + [0] * 3))
    assert pos.numel() == 2 and neg.numel() == 3  # the negatives fill up to what there is


def test_roi_levels_and_pooling_on_every_level():
    sides = [10.0, 55.9, 56.0, 111.9, 112.0, 224.0, 447.0, 448.0, 2000.0]
    rois = torch.tensor([[0, 3.0, 5.0, 3.0 + s, 5.0 + s] for s in sides], dtype=torch.float64)
    want = [max(0, min(3, math.floor(math.log2(s / 56 + 1e-6)))) for s in sides]
    assert roi_levels(rois).tolist() == want == [0, 0, 0, 0, 1, 2, 2, 3, 3]
    torch.manual_seed(0)
    cfg = DetectorConfig(num_classes=2, fpn_channels=4, fc_channels=8)
    model = FasterRCNN(_Tiny(4), cfg).double()
    feats = [torch.randn(1, 4, 128 // s, 128 // s, dtype=torch.float64) for s in (4, 8, 16, 32, 64)]
    got = model.roi_features(feats, rois)
    for k, lvl in enumerate(want):
        one = roi_align(feats[lvl], rois[k : k + 1], 7, 1.0 / (4 * 2**lvl), 0, True)
        torch.testing.assert_close(got[k : k + 1], one, rtol=0, atol=1e-12)


def test_rpn_loss_matches_an_independent_computation():
    g = torch.Generator().manual_seed(2)
    anchors = AnchorGenerator(strides=(16,), scales=(2.0,))([(3, 3)], dtype=torch.float64)[0]  # 27 anchors of 32 px
    gts = [
        torch.tensor([[2.0, 3.0, 30.0, 28.0], [10.0, 12.0, 44.0, 30.0]], dtype=torch.float64),
        torch.zeros(0, 4, dtype=torch.float64),
    ]
    logits = torch.randn(2, 27, generator=g, dtype=torch.float64)
    deltas = torch.randn(2, 27, 4, generator=g, dtype=torch.float64) * 0.1
    cfg = DetectorConfig()
    got = rpn_loss(anchors, logits, deltas, gts, cfg.rpn_assigner, cfg.rpn_sampler, DeltaXYWHCoder())
    cls, reg, n = 0.0, 0.0, 0
    for b, gt in enumerate(gts):
        assigned = _assign_loop(anchors, gt, 0.7, 0.3, 0.3, True).tolist()  # fewer than 128 / 256: all sampled
        for j, a in enumerate(assigned):
            if a < 0:
                continue
            n += 1
            x = float(logits[b, j])
            y = 1.0 if a > 0 else 0.0
            cls += math.log(1 + math.exp(-x)) if y else math.log(1 + math.exp(x))
            if a > 0:
                t = _encode(anchors[j].tolist(), gt[a - 1].tolist())
                reg += sum(abs(float(deltas[b, j, i]) - t[i]) for i in range(4))
    assert n > 27  # both images' anchors, the second all negatives
    torch.testing.assert_close(got["loss_rpn_cls"], torch.tensor(cls / n, dtype=torch.float64), rtol=1e-12, atol=0)
    torch.testing.assert_close(got["loss_rpn_bbox"], torch.tensor(reg / n, dtype=torch.float64), rtol=1e-12, atol=0)


def test_roi_loss_matches_an_independent_computation():
    g = torch.Generator().manual_seed(3)
    C, R = 3, 7
    scores = torch.randn(R, C + 1, generator=g, dtype=torch.float64)
    deltas = torch.randn(R, 4 * C, generator=g, dtype=torch.float64)
    labels = torch.tensor([2, 0, 3, 1, 3, 3, 2])  # 3: background
    targets = torch.randn(R, 4, generator=g, dtype=torch.float64)
    got = roi_loss(scores, deltas, labels, targets, C)
    ce = sum(math.log(sum(math.exp(v) for v in scores[r].tolist())) - float(scores[r, labels[r]]) for r in range(R)) / R
    l1 = (
        sum(
            abs(float(deltas[r, 4 * int(labels[r]) + i]) - float(targets[r, i]))
            for r in range(R)
            if labels[r] < C
            for i in range(4)
        )
        / R
    )  # divided by all sampled RoIs, not the positives (the published avg_factor)
    torch.testing.assert_close(got["loss_cls"], torch.tensor(ce, dtype=torch.float64), rtol=1e-12, atol=0)
    torch.testing.assert_close(got["loss_bbox"], torch.tensor(l1, dtype=torch.float64), rtol=1e-12, atol=0)


def test_roi_targets_match_an_independent_computation():
    """Ground truths join the proposals (each its own match, a duplicate too), the 0.5 / 0.5
    assignment, positives first, class-specific targets with stds 0.1, 0.1, 0.2, 0.2."""
    model = FasterRCNN(_Tiny(4), DetectorConfig(num_classes=3, fpn_channels=4, fc_channels=8)).double()
    gt = torch.tensor([[10.0, 10.0, 40.0, 30.0], [10.0, 10.0, 40.0, 30.0], [50.0, 5.0, 70.0, 45.0]], dtype=torch.float64)
    gl = torch.tensor([2, 0, 1])
    props = torch.tensor(
        [[12.0, 11.0, 41.0, 32.0], [48.0, 8.0, 69.0, 44.0], [0.0, 0.0, 8.0, 8.0], [30.0, 20.0, 60.0, 40.0]], dtype=torch.float64
    )
    rois, labels, targets = model.roi_targets([props], [{"boxes": gt, "labels": gl}])
    boxes = torch.cat([gt, props])
    assigned = _assign_loop(boxes, gt, 0.5, 0.5, 0.5, False).tolist()
    assigned[:3] = [1, 2, 3]
    pos = [i for i, a in enumerate(assigned) if a > 0]
    neg = [i for i, a in enumerate(assigned) if a == 0]
    assert pos == [0, 1, 2, 3, 4] and neg == [5, 6]  # the duplicate gt keeps its own label
    order = pos + neg  # fewer than the sampler draws: all of them, in index order
    assert rois[:, 0].tolist() == [0] * 7
    torch.testing.assert_close(rois[:, 1:], boxes[order], rtol=0, atol=0)
    for r, i in enumerate(order):
        a = assigned[i]
        assert int(labels[r]) == (int(gl[a - 1]) if a > 0 else 3)
        if a > 0:
            want = _encode(boxes[i].tolist(), gt[a - 1].tolist(), (0.1, 0.1, 0.2, 0.2))
            torch.testing.assert_close(targets[r], torch.tensor(want, dtype=torch.float64), rtol=0, atol=1e-12)
    assert labels.tolist() == [2, 0, 1, 2, 1, 3, 3]


class _Tiny(nn.Module):
    """A stand-in backbone: 4 strided convs (strides 4, 8, 16, 32) and an aux loss of 1e-3 x the mean."""

    def __init__(self, ch=8):
        super().__init__()
        self.out_channels = (ch,) * 4
        self.convs = nn.ModuleList(nn.Conv2d(3 if i == 0 else ch, ch, 3, stride=4 if i == 0 else 2, padding=1) for i in range(4))

    def forward(self, x):
        feats = []
        for conv in self.convs:
            x = conv(x)
            feats.append(x)
        return feats, 1e-3 * x.mean()


def test_detector_trains_and_detects_end_to_end():
    torch.manual_seed(0)
    cfg = DetectorConfig(num_classes=3, fpn_channels=16, fc_channels=32)
    model = FasterRCNN(_Tiny(), cfg)
    model.generator = torch.Generator().manual_seed(0)
    images = torch.randn(2, 3, 64, 96)
    targets = [
        {"boxes": torch.tensor([[4.0, 5.0, 30.0, 40.0], [50.0, 10.0, 90.0, 60.0]]), "labels": torch.tensor([0, 2])},
        {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64)},  # an image without objects
    ]
    losses = model(images, [(64, 96), (60, 90)], targets)
    assert set(losses) == {"loss_rpn_cls", "loss_rpn_bbox", "loss_cls", "loss_bbox", "aux"}
    assert all(torch.isfinite(v) for v in losses.values())
    assert abs(float(losses["loss_rpn_cls"].detach()) - math.log(2)) < 0.01  # std 0.01 init: logits near 0
    assert abs(float(losses["loss_cls"].detach()) - math.log(4)) < 0.05
    sum(losses.values()).backward()
    assert model.backbone.convs[0].weight.grad.abs().sum() > 0 and model.roi_head.fc_reg.weight.grad.abs().sum() > 0
    model.eval()
    with torch.no_grad():
        dets = model(images, [(64, 96), (60, 90)])
    for d, (h, w) in zip(dets, [(64, 96), (60, 90)]):
        assert d["boxes"].shape[0] == d["scores"].shape[0] == d["labels"].shape[0] <= cfg.max_per_img
        assert (d["scores"] > cfg.score_thr).all() and (d["scores"][:-1] >= d["scores"][1:]).all()
        assert d["labels"].min() >= 0 and d["labels"].max() < 3
        assert (d["boxes"][:, 0] >= 0).all() and (d["boxes"][:, 2] <= w).all() and (d["boxes"][:, 3] <= h).all()
    with pytest.raises(ValueError, match="'images' expected .* multiples of 32"):
        model(torch.randn(1, 3, 60, 64))
    model.train()
    with pytest.raises(ValueError, match=r"""'targets\[1\]\["labels"\]' expected classes in 0..2, got 3..3"""):
        model(images, None, [targets[0], {"boxes": torch.ones(1, 4).cumsum(1), "labels": torch.tensor([3])}])
    with pytest.raises(ValueError, match=r"""'targets\[0\]\["boxes"\]' expected a tensor \[G, 4\]"""):
        model(images, None, [{"boxes": torch.zeros(2, 5), "labels": torch.zeros(2, dtype=torch.int64)}, targets[1]])
    with pytest.raises(ValueError, match=r"""'targets\[0\]\["boxes"\]' expected x2 > x1"""):
        model(images, None, [{"boxes": torch.tensor([[5.0, 5, 5, 9]]), "labels": torch.zeros(1, dtype=torch.int64)}, targets[1]])
    with pytest.raises(ValueError, match=r"""'targets' expected one dict per image \(2\), got none"""):
        model(images)


def _ap_by_hand(dets, gts, thr):
    """One class: greedy matching by decreasing score at IoU >= thr, then COCO's 101-point
    interpolated precision (the envelope, sampled at recall 0, 0.01, ..., 1)."""
    order = sorted(range(len(dets)), key=lambda i: -dets[i][2])
    used, tp = set(), []
    for i in order:
        img, box, _ = dets[i]
        best, best_iou = None, thr
        for j, (gimg, gbox) in enumerate(gts):
            if gimg == img and j not in used:
                v = _iou(box, gbox)
                if v >= best_iou:
                    best, best_iou = j, v
        tp.append(best is not None)
        if best is not None:
            used.add(best)
    prec, rec, hits = [], [], 0
    for k, t in enumerate(tp):
        hits += t
        prec.append(hits / (k + 1))
        rec.append(hits / len(gts))
    env = [max(prec[k:]) for k in range(len(prec))]
    total = 0.0
    for r in [i / 100 for i in range(101)]:
        ks = [k for k in range(len(rec)) if rec[k] >= r - 1e-12]
        total += env[ks[0]] if ks else 0.0
    return total / 101


def test_coco_ap_matches_a_count_by_hand():
    import pycocotools  # noqa: F401  (a test dependency: this test runs wherever the suite does)
    from geomoe.detection.coco_eval import coco_ap

    gts = [(0, [10.0, 10.0, 50.0, 50.0]), (0, [60.0, 60.0, 100.0, 90.0]), (1, [0.0, 0.0, 30.0, 30.0])]
    dets = [
        (0, [12.0, 12.0, 50.0, 52.0], 0.9),  # a hit (IoU 0.86)
        (0, [10.0, 10.0, 50.0, 50.0], 0.8),  # a duplicate: a false positive
        (1, [5.0, 5.0, 35.0, 35.0], 0.7),  # IoU 0.53: a hit at 0.5, a miss at 0.75
        (0, [200.0, 200.0, 220.0, 220.0], 0.6),  # nothing there
        (0, [60.0, 62.0, 100.0, 95.0], 0.3),  # IoU 0.78
    ]
    per_image = lambda items, with_score: [
        {
            "boxes": torch.tensor([d[1] for d in items if d[0] == i]).reshape(-1, 4),
            "labels": torch.zeros(sum(d[0] == i for d in items), dtype=torch.int64),
            **({"scores": torch.tensor([d[2] for d in items if d[0] == i])} if with_score else {}),
        }
        for i in range(2)
    ]
    got = coco_ap(per_image(dets, True), per_image(gts, False), ["thing"])
    ap50 = _ap_by_hand(dets, gts, 0.5)
    assert got["bbox_mAP_50"] == pytest.approx(ap50, abs=1e-9)
    assert got["AP50/thing"] == pytest.approx(ap50, abs=1e-9)
    thresholds = [0.5 + 0.05 * i for i in range(10)]
    assert got["bbox_mAP"] == pytest.approx(sum(_ap_by_hand(dets, gts, t) for t in thresholds) / 10, abs=1e-9)
    assert 0.5 < ap50 < 1
