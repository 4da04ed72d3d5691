"""Oriented-detection data: DIOR-R's published layout, DOTA-style label files, embedded scenes with
drawn rotated objects, and the published augmentation. Boxes are le90 rboxes (geomoe.detection.rbox).

DIOR-R (as the published dataset class reads it): root/Main/{train,val,test}.txt list image ids;
images are JPEGImages-trainval/<id>.jpg (train, val) and JPEGImages-test/<id>.jpg (test); each id
has `Annotations/Oriented Bounding Boxes/<id>.xml` whose objects carry a lowercase class name and a
`robndbox` of 8 corner coordinates (x_left_top, y_left_top, x_right_top, ..., y_left_bottom). An
object whose polygon repeats a corner (two consecutive corners equal) is dropped, as published.
Training uses train + val, images without objects left out (filter_empty_gt).

DOTA: one `<image stem>.txt` per image in labelTxt/, lines "x1 y1 x2 y2 x3 y3 x4 y4 class
difficult" (optional "imagesource:" / "gsd:" header lines); images in images/ (.png, .jpg, .tif).

Augmentation as published: keep-ratio resize to fit 800 x 800 (DIOR-R's 800 px images unchanged),
then with probability 0.75 one flip chosen uniformly among horizontal, vertical and diagonal (both),
normalised with the ImageNet mean / std, padded to multiples of 32 (detection.data.collate)."""

from __future__ import annotations

import math
import os
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from .data import MEAN, SCALE, STD, DetectionDataError, resize_scale
from .rbox import norm_angle_le90, qbox_to_rbox

DIOR_CLASSES = (
    "airplane",
    "airport",
    "baseballfield",
    "basketballcourt",
    "bridge",
    "chimney",
    "expressway-service-area",
    "expressway-toll-station",
    "dam",
    "golffield",
    "groundtrackfield",
    "harbor",
    "overpass",
    "ship",
    "stadium",
    "storagetank",
    "tenniscourt",
    "trainstation",
    "vehicle",
    "windmill",
)  # fmt: skip  (the published dataset's order: labels 0..19)
_CORNERS = (
    "x_left_top",
    "y_left_top",
    "x_right_top",
    "y_right_top",
    "x_right_bottom",
    "y_right_bottom",
    "x_left_bottom",
    "y_left_bottom",
)


@dataclass
class OrientedRecord:
    file: str  # the image's path
    boxes: Tensor  # [G, 5] float32 le90 rboxes
    labels: Tensor  # [G] int64
    difficult: Tensor  # [G] bool


def _repeats_a_corner(q: Sequence[float]) -> bool:
    return any(q[2 * i] == q[2 * ((i + 1) % 4)] and q[2 * i + 1] == q[2 * ((i + 1) % 4) + 1] for i in range(4))


def _record(image: str, polygons: List[List[float]], labels: List[int], difficult: List[bool]) -> OrientedRecord:
    q = torch.tensor(polygons, dtype=torch.float64).reshape(-1, 8)
    return OrientedRecord(
        image,
        qbox_to_rbox(q).float(),
        torch.tensor(labels, dtype=torch.int64),
        torch.tensor(difficult, dtype=torch.bool).reshape(-1),
    )


def parse_dior_xml(path: str, image: str, classes: Sequence[str] = DIOR_CLASSES) -> OrientedRecord:
    """One DIOR-R annotation file; errors name the file and the object."""
    try:
        root = ET.parse(path).getroot()
    except OSError as exc:
        raise DetectionDataError(f"{path}: cannot read the annotation ({exc.strerror or exc})") from None
    except ET.ParseError as exc:
        raise DetectionDataError(f"{path}: not valid XML ({exc})") from None
    label_of = {c: i for i, c in enumerate(classes)}
    polygons, labels = [], []
    for n, obj in enumerate(root.findall("object")):
        name = (obj.findtext("name") or "").strip().lower()
        if name not in label_of:
            raise DetectionDataError(f"{path}: object {n} has class {name!r}, expected one of {list(classes)}")
        box = obj.find("robndbox")
        try:
            q = [float(box.findtext(tag)) for tag in _CORNERS]  # type: ignore[union-attr, arg-type]
        except (AttributeError, TypeError, ValueError):
            raise DetectionDataError(
                f"{path}: object {n} ({name}) lacks a robndbox with the 8 corner fields {list(_CORNERS)}"
            ) from None
        if not all(math.isfinite(v) for v in q):
            raise DetectionDataError(f"{path}: object {n} ({name}) has a non-finite corner {q}")
        if _repeats_a_corner(q):
            continue  # a degenerate polygon, dropped as published
        polygons.append(q)
        labels.append(label_of[name])
    return _record(image, polygons, labels, [False] * len(labels))


def load_dior_r(root: str, split: str) -> List[OrientedRecord]:
    """DIOR-R's split 'train' (train + val, images with objects) or 'test' (every image)."""
    if split not in ("train", "test"):
        raise ValueError(f"split expected 'train' or 'test', got {split!r}")
    lists = ("train", "val") if split == "train" else ("test",)
    image_dir = os.path.join(root, "JPEGImages-trainval" if split == "train" else "JPEGImages-test")
    records = []
    for name in lists:
        path = os.path.join(root, "Main", f"{name}.txt")
        try:
            with open(path) as f:
                ids = [line.strip() for line in f if line.strip()]
        except OSError as exc:
            raise DetectionDataError(
                f"{path}: cannot read the image list ({exc.strerror or exc}); expected DIOR-R's Main/{name}.txt"
            ) from None
        for i in ids:
            xml = os.path.join(root, "Annotations", "Oriented Bounding Boxes", f"{i}.xml")
            records.append(parse_dior_xml(xml, os.path.join(image_dir, f"{i}.jpg")))
    if split == "train":
        records = [r for r in records if r.boxes.shape[0]]
        if not records:
            raise DetectionDataError(f"{root}: no training image has an object")
    return records


def parse_dota_txt(path: str, image: str, classes: Sequence[str]) -> OrientedRecord:
    """One DOTA label file; errors name the file and the line."""
    label_of = {c: i for i, c in enumerate(classes)}
    polygons, labels, difficult = [], [], []
    try:
        with open(path) as f:
            lines = f.read().splitlines()
    except OSError as exc:
        raise DetectionDataError(f"{path}: cannot read the labels ({exc.strerror or exc})") from None
    for n, line in enumerate(lines, 1):
        parts = line.split()
        if not parts or line.startswith(("imagesource:", "gsd:")):
            continue
        try:
            q = [float(v) for v in parts[:8]]
            name = parts[8].lower()
            hard = len(parts) > 9 and int(parts[9]) != 0
        except (IndexError, ValueError):
            raise DetectionDataError(
                f"{path}: line {n} expected 'x1 y1 x2 y2 x3 y3 x4 y4 class [difficult]', got {line!r}"
            ) from None
        if name not in label_of:
            raise DetectionDataError(f"{path}: line {n} has class {name!r}, expected one of {list(classes)}")
        if _repeats_a_corner(q):
            continue
        polygons.append(q)
        labels.append(label_of[name])
        difficult.append(hard)
    return _record(image, polygons, labels, difficult)


def flip_rboxes(boxes: Tensor, direction: str, height: int, width: int) -> Tensor:
    """le90 boxes of an image flipped horizontally, vertically or diagonally (both)."""
    cx, cy, w, h, a = boxes.unbind(1)
    if direction in ("horizontal", "diagonal"):
        cx = width - cx
    if direction in ("vertical", "diagonal"):
        cy = height - cy
    if direction != "diagonal":  # a mirror turns the other way; both mirrors are a half turn
        a = -a
    return torch.stack([cx, cy, w, h, norm_angle_le90(a)], 1)


def prepare_oriented(
    image: np.ndarray, boxes: Tensor, train: bool, rng: Optional[np.random.Generator] = None, scale: Tuple[int, int] = SCALE
) -> Tuple[Tensor, Tensor, Tuple[int, int]]:
    """uint8 [H, W, 3] RGB -> (normalised float image [3, h, w], boxes resized / flipped, (h, w))."""
    H, W = image.shape[:2]
    img = torch.from_numpy(np.array(image, dtype=np.float32)).permute(2, 0, 1)
    f = resize_scale(H, W, scale)
    h, w = int(H * f + 0.5), int(W * f + 0.5)
    boxes = boxes.clone()
    if (h, w) != (H, W):
        img = F.interpolate(img[None], size=(h, w), mode="bilinear", align_corners=False)[0]
        boxes[:, :4] *= f  # keep-ratio: one factor (up to rounding of the size)
    if train and rng is not None and rng.random() < 0.75:
        direction = ("horizontal", "vertical", "diagonal")[int(rng.integers(0, 3))]
        dims = {"horizontal": [-1], "vertical": [-2], "diagonal": [-2, -1]}[direction]
        img = img.flip(dims)
        boxes = flip_rboxes(boxes, direction, h, w)
    img = (img - torch.tensor(MEAN)[:, None, None]) / torch.tensor(STD)[:, None, None]
    return img, boxes, (h, w)


# ---- embedded data: scenes with drawn rotated objects ----------------------------------------------

SYNTHETIC_ORIENTED_CLASSES = ("ship", "vehicle", "runway")
_PAINT = (((235, 235, 240), (120, 120, 130)), ((200, 40, 40), (40, 40, 40)), ((70, 70, 75), None))  # (colour, bow)


def _fill_rotated(img: np.ndarray, box: Sequence[float], colour, shade=None) -> None:
    """Paint the pixels whose centres lie inside the rotated box (and a darker bow band if shade)."""
    cx, cy, w, h, a = box
    H, W = img.shape[:2]
    yy, xx = np.mgrid[0:H, 0:W] + 0.5
    u = (xx - cx) * math.cos(a) + (yy - cy) * math.sin(a)  # along the width
    v = -(xx - cx) * math.sin(a) + (yy - cy) * math.cos(a)
    inside = (np.abs(u) <= w / 2) & (np.abs(v) <= h / 2)
    img[inside] = colour
    if shade is not None:
        img[inside & (u > w / 4)] = shade  # the front quarter: which way the object points


def synthetic_oriented_scene(size: int, rng: np.random.Generator, max_objects: int = 5) -> Tuple[np.ndarray, Tensor, Tensor]:
    """(uint8 [size, size, 3], le90 boxes [G, 5], labels [G]): an aerial-like scene with 1 to
    max_objects long thin objects at random angles, far enough apart not to overlap. Objects are
    20 px long and up (a quarter to three fifths of the scene by class): the smallest published
    anchor is 32 px and an anchor needs IoU 0.3 with an object's enclosing box to learn it."""
    from ..data import synthetic_scene

    img = synthetic_scene(size, rng).copy()
    boxes: List[List[float]] = []
    labels: List[int] = []
    for _ in range(int(rng.integers(1, max_objects + 1))):
        for _try in range(30):
            cls = int(rng.integers(0, len(SYNTHETIC_ORIENTED_CLASSES)))
            length = max(20.0, size * rng.uniform(*((0.25, 0.4), (0.18, 0.26), (0.4, 0.6))[cls]))
            width = length * rng.uniform(*((0.28, 0.38), (0.5, 0.65), (0.16, 0.22))[cls])
            a = float(rng.uniform(-math.pi / 2, math.pi / 2))
            reach = length / 2 + 2
            cx, cy = rng.uniform(reach, size - reach), rng.uniform(reach, size - reach)
            if all(math.hypot(cx - b[0], cy - b[1]) > (b[2] + length) / 2 + 2 for b in boxes):
                box = [float(cx), float(cy), float(length), float(width), a]
                _fill_rotated(img, box, *_PAINT[cls])
                boxes.append(box)
                labels.append(cls)
                break
    return img, torch.tensor(boxes, dtype=torch.float32).reshape(-1, 5), torch.tensor(labels, dtype=torch.int64)


class OrientedDetection(torch.utils.data.Dataset):
    """Records (DIOR-R, DOTA) or `length` embedded scenes; item i -> (image, boxes, labels, (h, w))."""

    def __init__(
        self,
        records: Optional[List[OrientedRecord]] = None,
        train: bool = True,
        seed: int = 0,
        length: int = 0,
        size: int = 128,
        scale: Tuple[int, int] = SCALE,
    ):
        if records is None and size % 32:
            raise ValueError(f"OrientedDetection: size expected a multiple of 32, got {size}")
        self.records, self.train, self.seed, self.length, self.size, self.scale = records, train, seed, length, size, scale
        self.classes = DIOR_CLASSES if records is not None else SYNTHETIC_ORIENTED_CLASSES

    def __len__(self) -> int:
        return len(self.records) if self.records is not None else self.length

    def __getitem__(self, code: int):
        """Item `code` = epoch * len + index (the training loader's codes; evaluation's plain indices
        are epoch 0): image (or scene) `index`, its flip drawn from (seed, epoch, index)."""
        epoch, i = divmod(int(code), len(self))
        rng = np.random.default_rng([self.seed, epoch, i, 1])
        if self.records is None:
            img, boxes, labels = synthetic_oriented_scene(self.size, np.random.default_rng([self.seed, i]))
            image, boxes, size = prepare_oriented(img, boxes, self.train, rng, scale=(self.size, self.size))
            return image, boxes, labels, size
        from ..data import open_image

        r = self.records[i]
        try:
            img = np.asarray(open_image(r.file))
        except (OSError, ValueError, SyntaxError) as exc:
            raise DetectionDataError(f"{r.file}: cannot read the image ({exc})") from None
        image, boxes, size = prepare_oriented(img, r.boxes, self.train, rng, self.scale)
        return image, boxes, r.labels, size
