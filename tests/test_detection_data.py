"""Detection data: COCO JSON records and their errors (each naming the file), the batch layout,
the embedded scenes with drawn objects."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from geomoe.detection.data import (
    MEAN,
    STD,
    CocoDetection,
    DetectionDataError,
    SyntheticDetection,
    collate,
    load_coco,
    prepare,
    synthetic_detection_scene,
)


def _coco(tmp_path, annotations, images=None, categories=None):
    images = images or [
        {"id": 1, "file_name": "a.png", "width": 40, "height": 30},
        {"id": 2, "file_name": "b.png", "width": 40, "height": 30},
    ]
    categories = categories or [{"id": 7, "name": "tank"}, {"id": 3, "name": "ship"}]
    path = tmp_path / "ann.json"
    path.write_text(json.dumps({"images": images, "annotations": annotations, "categories": categories}))
    for im in images:
        Image.fromarray(np.full((im["height"], im["width"], 3), 100, np.uint8)).save(tmp_path / im["file_name"])
    return str(path)


def _ann(i, img, cat, bbox, **kw):
    return {"id": i, "image_id": img, "category_id": cat, "bbox": bbox, "area": bbox[2] * bbox[3], "iscrowd": 0, **kw}


def test_coco_records_labels_by_category_id_and_skips_crowd_and_tiny(tmp_path):
    path = _coco(
        tmp_path,
        [
            _ann(1, 1, 7, [2, 3, 10, 5]),
            _ann(2, 1, 3, [0, 0, 40, 30]),
            _ann(3, 1, 3, [5, 5, 0.5, 4]),  # w < 1: left out
            _ann(4, 1, 7, [5, 5, 4, 4], iscrowd=1),  # crowd: left out
            _ann(5, 1, 7, [39.5, 0, 1.2, 4]),  # 0.7 px outside: clipped
        ],
    )
    records, names = load_coco(path, str(tmp_path))
    assert names == ["ship", "tank"]  # sorted by category id: 3, 7
    assert [r.boxes.shape[0] for r in records] == [3, 0]
    assert records[0].labels.tolist() == [1, 0, 1]
    assert records[0].boxes.tolist() == [[2, 3, 12, 8], [0, 0, 40, 30], [39.5, 0, 40, 4]]
    assert len(CocoDetection(path, str(tmp_path), train=True)) == 1  # the image without boxes is not trained on
    img, boxes, labels, size = CocoDetection(path, str(tmp_path), train=False, scale=(40, 30))[0]  # no resize
    assert img.shape == (3, 30, 40) and size == (30, 40) and boxes.tolist() == records[0].boxes.tolist()
    torch.testing.assert_close(img[:, 0, 0], (100 - torch.tensor(MEAN)) / torch.tensor(STD))
    img, boxes, _, size = CocoDetection(path, str(tmp_path), train=False)[0]  # the published scale: x 20
    assert size == (600, 800) and img.shape == (3, 600, 800) and boxes[0].tolist() == [40, 60, 240, 160]


@pytest.mark.parametrize(
    "annotations, images, match",
    [
        ([], None, "no annotations at all"),
        ([_ann(1, 1, 99, [1, 1, 4, 4])], None, r"annotation 1 has category_id 99, expected one of the categories \[3, 7\]"),
        ([_ann(1, 1, 7, [30, 1, 14, 4])], None, r"annotation 1 box .* lies outside image a.png \(40 x 30\)"),
        ([_ann(1, 5, 7, [1, 1, 4, 4])], None, "annotation 1 refers to image 5"),
        ([{"id": 1, "image_id": 1, "category_id": 7}], None, "an annotation lacks a field"),
        ([_ann(1, 1, 7, [-3, 1, 14, 4])], None, r"annotation 1 box \[x -3, .* lies outside image a.png"),
        ([_ann(1, 1, 7, [1, 1, 14, 34])], None, r"annotation 1 box .* lies outside image a.png \(40 x 30\)"),
    ],
)
def test_bad_coco_files_name_the_file(tmp_path, annotations, images, match):
    path = _coco(tmp_path, annotations, images)
    with pytest.raises(DetectionDataError, match=match) as err:
        load_coco(path, str(tmp_path))
    assert str(err.value).startswith(path)


def test_unreadable_json_and_an_image_of_the_wrong_size_name_the_file(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(DetectionDataError, match=f"{bad}: not valid JSON"):
        load_coco(str(bad), str(tmp_path))
    path = _coco(tmp_path, [_ann(1, 1, 7, [1, 1, 4, 4])])
    Image.fromarray(np.zeros((31, 40, 3), np.uint8)).save(tmp_path / "a.png")
    with pytest.raises(DetectionDataError, match=r"a.png: the image is 40 x 31, its record in .*ann.json says 40 x 30"):
        CocoDetection(path, str(tmp_path), train=False)[0]


def test_prepare_resizes_flips_and_collate_pads():
    img = np.zeros((400, 300, 3), np.uint8)
    boxes = torch.tensor([[10.0, 20.0, 110.0, 220.0]])
    out, b, size = prepare(img, boxes, train=False)
    # keep ratio to fit (800, 800): min(800 / 400, 800 / 300) = 2
    assert size == (800, 600) and out.shape == (3, 800, 600) and b.tolist() == [[20, 40, 220, 440]]

    class Always:
        def random(self):
            return 0.0

    _, flipped, _ = prepare(img, boxes, train=True, rng=Always())
    assert flipped.tolist() == [[600 - 220, 40, 600 - 20, 440]]
    x, sizes, targets = collate(
        [(torch.ones(3, 50, 70), boxes, torch.tensor([1]), (50, 70)), (torch.ones(3, 64, 33), boxes, torch.tensor([0]), (64, 33))]
    )
    assert x.shape == (2, 3, 64, 96) and sizes == [(50, 70), (64, 33)]
    assert x[0, :, 50:].abs().sum() == 0 and x[0, :, :50, :70].min() == 1 and x[1, :, :, 33:].abs().sum() == 0
    assert targets[1]["labels"].tolist() == [0]


def test_synthetic_scenes_are_reproducible_with_boxes_inside():
    a = synthetic_detection_scene(96, np.random.default_rng(3))
    b = synthetic_detection_scene(96, np.random.default_rng(3))
    assert np.array_equal(a[0], b[0]) and torch.equal(a[1], b[1]) and torch.equal(a[2], b[2])
    ds = SyntheticDetection(8, size=96, train=False)
    for i in range(8):
        img, boxes, labels, size = ds[i]
        assert img.shape == (3, 96, 96) and size == (96, 96) and 1 <= boxes.shape[0] <= 6
        assert (boxes[:, :2] >= 0).all() and (boxes[:, 2:] <= 96).all() and (boxes[:, 2:] > boxes[:, :2]).all()
        assert labels.min() >= 0 and labels.max() < len(ds.classes)
        # the drawn object differs from the scene around it: its box is not empty of contrast
        x0, y0, x1, y1 = boxes[0].int().tolist()
        assert img[:, y0:y1, x0:x1].std() > 0.1


def test_items_by_epoch_code_are_the_same_images_flipped_anew_each_epoch(tmp_path):
    """The training loader asks for codes epoch * len + index: the same image (scene) every epoch,
    its flip drawn again for each epoch (the same flips every epoch before, and codes past the end
    were new scenes, or an IndexError for a COCO folder)."""
    from geomoe.data import ResumableBatchSampler

    codes = [c for batch in ResumableBatchSampler(3, 1, 0, 0, 6) for c in batch]
    assert sorted(codes) == list(range(6))  # epoch 1 asks for 3, 4, 5
    path = _coco(tmp_path, [_ann(1, 1, 7, [2, 3, 10, 5]), _ann(2, 2, 3, [20, 1, 6, 9])])
    for ds, n in [
        (SyntheticDetection(3, size=64, train=True, seed=1), 3),
        (CocoDetection(path, str(tmp_path), True, 1, (40, 30)), 2),
    ]:
        for i in range(n):
            first = ds[i][1]
            w = ds[i][3][1]
            flips = []
            for epoch in range(8):
                img, boxes, labels, size = ds[epoch * n + i]
                mirrored = torch.stack([w - boxes[:, 2], boxes[:, 1], w - boxes[:, 0], boxes[:, 3]], 1)
                same, flipped = torch.equal(boxes, first), torch.equal(mirrored, first)
                assert same or flipped, (type(ds).__name__, i, epoch)
                flips.append(flipped and not same)
                torch.testing.assert_close(labels, ds[i][2])
            assert 0 < sum(flips) < 8, (type(ds).__name__, i, flips)  # P(all alike by chance) = 2 / 2**8


def test_detections_on_resized_images_are_scored_in_the_images_own_pixels(tmp_path, monkeypatch):
    """A COCO image of 41 x 30 fit to (100, 100) is 100 x 73 (x 2.439 in x, 2.433 in y): evaluation
    maps the detections back by those factors and scores them against the file's own boxes."""
    from torch import nn

    from geomoe.detection import coco_eval
    from geomoe.detection.detect import _DataErrors, evaluate

    images = [{"id": 1, "file_name": "a.png", "width": 41, "height": 30}]
    path = _coco(tmp_path, [_ann(1, 1, 7, [2, 3, 10, 5]), _ann(2, 1, 3, [20, 1, 6, 9])], images)
    ds = CocoDetection(path, str(tmp_path), False, 0, (100, 100))
    img, resized, labels, size = ds[0]
    assert size == (73, 100)
    boxes, _, (sx, sy) = ds.original(0)
    assert (sx, sy) == (100 / 41, 73 / 30) and boxes.tolist() == [[2, 3, 12, 8], [20, 1, 26, 10]]
    torch.testing.assert_close(resized, boxes * torch.tensor([sx, sy, sx, sy]))

    class Oracle(nn.Module):  # detects the item's (resized) boxes exactly
        def forward(self, image, sizes):
            assert list(sizes) == [(73, 100)] and image.shape[-2:] == (96, 128)
            return [{"boxes": resized.clone(), "scores": torch.tensor([0.9, 0.8]), "labels": labels.clone()}]

    seen = []
    real = coco_eval.coco_ap
    monkeypatch.setattr(coco_eval, "coco_ap", lambda d, g, c: seen.append((d, g)) or real(d, g, c))
    m = evaluate(Oracle(), _DataErrors(ds), "horizontal", torch.device("cpu"), "fp32")
    (dets,), (gts,) = seen[0]
    torch.testing.assert_close(dets["boxes"], boxes, rtol=0, atol=1e-5)  # in the image's own pixels
    assert torch.equal(gts["boxes"], boxes) and gts["labels"].tolist() == labels.tolist()
    assert m["bbox_mAP"] == pytest.approx(1.0) and m["bbox_mAP_50"] == pytest.approx(1.0)


def test_a_training_file_whose_every_box_is_left_out_names_the_file(tmp_path):
    """Annotations, but none to train on (crowd or sub-pixel only): an error naming the file; for
    evaluation the images are kept (no boxes)."""
    path = _coco(tmp_path, [_ann(1, 1, 7, [1, 1, 4, 4], iscrowd=1), _ann(2, 2, 3, [1, 1, 0.5, 4])])
    with pytest.raises(DetectionDataError, match=f"{path}: no image has a box to train on"):
        CocoDetection(path, str(tmp_path), train=True)
    evaluation = CocoDetection(path, str(tmp_path), train=False)
    assert [evaluation[i][1].shape[0] for i in range(2)] == [0, 0]
