"""Oriented-detection data: DIOR-R's layout and XML (degenerate polygons dropped, errors naming the
file), DOTA label files, the published flips checked against the flipped corners and the flipped
pixels of drawn objects, and the embedded scenes."""

import math
import os

import numpy as np
import pytest
import torch
from PIL import Image

from geomoe.detection.data import DetectionDataError
from geomoe.detection.oriented_data import (
    DIOR_CLASSES,
    OrientedDetection,
    _fill_rotated,
    flip_rboxes,
    load_dior_r,
    parse_dior_xml,
    parse_dota_txt,
    synthetic_oriented_scene,
)
from geomoe.detection.rbox import rbox_to_qbox
from geomoe_kernels import box_iou_rotated


def _xml(objects):
    body = "".join(
        f"<object><name>{name}</name><robndbox>"
        + "".join(f"<{t}>{v}</{t}>" for t, v in zip(
            ("x_left_top", "y_left_top", "x_right_top", "y_right_top", "x_right_bottom", "y_right_bottom", "x_left_bottom", "y_left_bottom"), q))
        + "</robndbox></object>"
        for name, q in objects
    )  # fmt: skip
    return f"<annotation><size><width>64</width><height>64</height></size>{body}</annotation>"


def _dior_root(tmp_path, objects_by_id, lists):
    ann = tmp_path / "Annotations" / "Oriented Bounding Boxes"
    ann.mkdir(parents=True)
    (tmp_path / "Main").mkdir()
    for split, ids in lists.items():
        (tmp_path / "Main" / f"{split}.txt").write_text("\n".join(ids) + "\n")
    for i, objs in objects_by_id.items():
        (ann / f"{i}.xml").write_text(_xml(objs))
    return str(tmp_path)


def test_dior_xml_boxes_labels_and_dropped_degenerate_polygons(tmp_path):
    square = [10, 10, 30, 10, 30, 20, 10, 20]  # a 20 x 10 box at (20, 15)
    repeated = [10, 10, 10, 10, 30, 20, 10, 20]
    root = _dior_root(
        tmp_path, {"00001": [("Ship", square), ("vehicle", repeated)], "00002": []}, {"train": ["00001"], "val": ["00002"]}
    )
    r = parse_dior_xml(os.path.join(root, "Annotations", "Oriented Bounding Boxes", "00001.xml"), "x.jpg")
    torch.testing.assert_close(r.boxes, torch.tensor([[20.0, 15, 20, 10, 0]]))
    assert r.labels.tolist() == [DIOR_CLASSES.index("ship")]
    recs = load_dior_r(root, "train")  # 00002 has no object: left out of training
    assert [os.path.basename(x.file) for x in recs] == ["00001.jpg"] and "JPEGImages-trainval" in recs[0].file


def test_dior_errors_name_the_file(tmp_path):
    root = _dior_root(tmp_path, {"7": [("spaceship", [0, 0, 1, 0, 1, 1, 0, 1])]}, {"train": ["7"], "val": []})
    with pytest.raises(DetectionDataError, match=r"7\.xml: object 0 has class 'spaceship'"):
        load_dior_r(root, "train")
    with pytest.raises(DetectionDataError, match=r"Main/test\.txt: cannot read the image list"):
        load_dior_r(root, "test")


def test_dota_labels(tmp_path):
    p = tmp_path / "P0001.txt"
    p.write_text("imagesource:GoogleEarth\ngsd:0.5\n10 10 30 10 30 20 10 20 plane 0\n0 0 4 0 4 4 0 4 ship 1\n")
    r = parse_dota_txt(str(p), "P0001.png", ["plane", "ship"])
    assert r.labels.tolist() == [0, 1] and r.difficult.tolist() == [False, True]
    p.write_text("10 10 30 10 30 20 plane\n")
    with pytest.raises(DetectionDataError, match=r"P0001\.txt: line 1 expected"):
        parse_dota_txt(str(p), "P0001.png", ["plane"])


@pytest.mark.parametrize("direction", ["horizontal", "vertical", "diagonal"])
def test_flips_match_the_flipped_corners_and_pixels(direction):
    H, W = 48, 64
    box = torch.tensor([[20.0, 14.0, 18.0, 6.0, 0.5]], dtype=torch.float64)
    q = rbox_to_qbox(box).view(4, 2)
    if direction in ("horizontal", "diagonal"):
        q[:, 0] = W - q[:, 0]
    if direction in ("vertical", "diagonal"):
        q[:, 1] = H - q[:, 1]
    flipped = flip_rboxes(box, direction, H, W)
    assert -math.pi / 2 <= float(flipped[0, 4]) < math.pi / 2
    torch.testing.assert_close(rbox_to_qbox(flipped).view(4, 2).sort(0).values, q.sort(0).values)
    img = np.zeros((H, W, 3), np.uint8)
    _fill_rotated(img, box[0].tolist(), (255, 255, 255))
    dims = {"horizontal": [1], "vertical": [0], "diagonal": [0, 1]}[direction]
    img = np.flip(img, dims)
    again = np.zeros_like(img)
    _fill_rotated(again, flipped[0].tolist(), (255, 255, 255))
    assert (img != again).mean() < 0.01  # pixel centres on an edge may fall either way


def test_embedded_scenes_are_deterministic_and_inside():
    img, boxes, labels = synthetic_oriented_scene(128, np.random.default_rng(3))
    img2, boxes2, _ = synthetic_oriented_scene(128, np.random.default_rng(3))
    assert np.array_equal(img, img2) and torch.equal(boxes, boxes2) and len(boxes) >= 1
    q = rbox_to_qbox(boxes)
    assert q.min() >= 0 and q.max() <= 128
    iou = box_iou_rotated(boxes, boxes) - torch.eye(len(boxes))
    assert iou.max() == 0  # no overlaps
    ds = OrientedDetection(length=3, size=64, train=True, seed=1)
    x, b, lab, size = ds[2]
    assert x.shape == (3, 64, 64) and size == (64, 64) and b.shape[1] == 5 and len(lab) == len(b)
    with pytest.raises(ValueError, match="multiple of 32"):
        OrientedDetection(length=1, size=50)


def test_records_read_their_images(tmp_path):
    root = _dior_root(tmp_path, {"1": [("ship", [10, 10, 30, 10, 30, 20, 10, 20])]}, {"train": ["1"], "val": []})
    os.makedirs(os.path.join(root, "JPEGImages-trainval"))
    Image.fromarray(np.full((64, 64, 3), 128, np.uint8)).save(os.path.join(root, "JPEGImages-trainval", "1.jpg"))
    ds = OrientedDetection(load_dior_r(root, "train"), train=False)
    x, boxes, labels, size = ds[0]
    # 64 px fits 800 x 800 by a factor of 12.5
    assert size == (800, 800) and torch.allclose(boxes, torch.tensor([[250.0, 187.5, 250, 125, 0]]))


def test_loader_item_codes_are_epoch_times_length_plus_index(tmp_path):
    """The training loader asks for item codes epoch * len + index: each epoch the same images (and
    embedded scenes), their flips drawn anew (a record past the list was an IndexError in epoch 2)."""
    root = _dior_root(
        tmp_path,
        {"1": [("ship", [10, 10, 30, 10, 30, 20, 10, 20])], "2": [("vehicle", [40, 40, 50, 40, 50, 44, 40, 44])]},
        {"train": ["1", "2"], "val": []},
    )
    os.makedirs(os.path.join(root, "JPEGImages-trainval"))
    for i in ("1", "2"):
        Image.fromarray(np.full((64, 64, 3), 100 + int(i), np.uint8)).save(os.path.join(root, "JPEGImages-trainval", f"{i}.jpg"))
    for ds in (OrientedDetection(load_dior_r(root, "train"), train=False), OrientedDetection(length=2, size=64, train=False)):
        for i in range(2):
            a, b = ds[i], ds[i + 2 * 3]  # epoch 3
            assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) and torch.equal(a[2], b[2])
    flips = OrientedDetection(length=2, size=64, train=True, seed=4)
    firsts = {tuple(flips[2 * e][1].flatten().tolist()) for e in range(8)}  # scene 0 in 8 epochs
    assert len(firsts) > 1  # flipped anew
    scene = synthetic_oriented_scene(64, np.random.default_rng([4, 0]))[1]
    assert all(len(f) == scene.numel() for f in firsts)  # the same objects
