"""Detection data: COCO-format JSON (DIOR's published trainval.json / test.json, or any COCO folder),
embedded scenes with drawn objects and their boxes, and the batch layout the detector takes.

COCO: categories sorted by id become labels 0..C-1 (DIOR: ids 1..20 in the config's order);
annotations with iscrowd set are left out, as are boxes with w or h < 1 or area <= 0 (OpenMMLab's
CocoDataset does the same). Every other problem is an error naming the file (and the image or
annotation): JSON that does not parse or lacks a field, a category id not among the categories, a
box outside its image (by more than 1 pixel; within it, clipped), an annotation file with no
annotations at all, an image whose size differs from its record. Images without boxes are kept
for evaluation and dropped for training (OpenMMLab's filter_empty_gt).

Batches: images resized keeping their ratio so that they fit (800, 800) as published (scale =
min(800 / long side, 800 / short side): DIOR's 800 x 800 images are unchanged), flipped
horizontally with probability 0.5 in training (a new draw each epoch: the training loader asks
for item codes epoch * len + index), normalised with the published mean / std (RGB
0-255), padded with zeros to multiples of 32."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

MEAN = (123.675, 116.28, 103.53)
STD = (58.395, 57.12, 57.375)
SCALE = (800, 800)


class DetectionDataError(ValueError):
    """Bad detection data: the message names the file."""


@dataclass
class Record:
    file: str  # the image's path
    width: int
    height: int
    boxes: Tensor  # [G, 4] float32 xyxy
    labels: Tensor  # [G] int64 in 0..C-1


def load_coco(ann_file: str, image_dir: str) -> Tuple[List[Record], List[str]]:
    """(one record per image, in the file's order; the class names)."""
    try:
        with open(ann_file) as f:
            data = json.load(f)
    except OSError as exc:
        raise DetectionDataError(f"{ann_file}: cannot read the annotation file ({exc.strerror or exc})") from None
    except json.JSONDecodeError as exc:
        raise DetectionDataError(f"{ann_file}: not valid JSON ({exc.msg} at line {exc.lineno})") from None
    for key in ("images", "annotations", "categories"):
        if not isinstance(data, dict) or not isinstance(data.get(key), list):
            raise DetectionDataError(f"{ann_file}: expected a COCO object with a list '{key}'")
    if not data["annotations"]:
        raise DetectionDataError(f"{ann_file}: no annotations at all (an empty or wrong annotation file?)")
    try:
        cats = sorted(data["categories"], key=lambda c: c["id"])
        label_of = {c["id"]: i for i, c in enumerate(cats)}
        names = [str(c["name"]) for c in cats]
        images = {im["id"]: (im["file_name"], int(im["width"]), int(im["height"])) for im in data["images"]}
    except (KeyError, TypeError, ValueError) as exc:
        raise DetectionDataError(f"{ann_file}: an image or category lacks a field ({exc})") from None
    per_image: Dict[int, List[Tuple[List[float], int]]] = {i: [] for i in images}
    for ann in data["annotations"]:
        try:
            aid, img, cat, (x, y, w, h) = ann["id"], ann["image_id"], ann["category_id"], ann["bbox"]
        except (KeyError, TypeError, ValueError) as exc:
            raise DetectionDataError(f"{ann_file}: an annotation lacks a field or its bbox is not [x, y, w, h] ({exc})") from None
        if img not in images:
            raise DetectionDataError(f"{ann_file}: annotation {aid} refers to image {img}, which is not in 'images'")
        if cat not in label_of:
            raise DetectionDataError(
                f"{ann_file}: annotation {aid} has category_id {cat}, expected one of the categories {sorted(label_of)}"
            )
        if ann.get("iscrowd", 0) or w < 1 or h < 1 or ann.get("area", w * h) <= 0:
            continue
        name, W, H = images[img]
        if x < -1 or y < -1 or x + w > W + 1 or y + h > H + 1:
            raise DetectionDataError(
                f"{ann_file}: annotation {aid} box [x {x}, y {y}, w {w}, h {h}] lies outside image {name} ({W} x {H})"
            )
        per_image[img].append(([max(x, 0.0), max(y, 0.0), min(x + w, W), min(y + h, H)], label_of[cat]))
    records = []
    for img, (name, W, H) in images.items():
        anns = per_image[img]
        boxes = torch.tensor([a[0] for a in anns], dtype=torch.float32).reshape(-1, 4)
        labels = torch.tensor([a[1] for a in anns], dtype=torch.int64)
        records.append(Record(os.path.join(image_dir, name), W, H, boxes, labels))
    return records, names


def resize_scale(height: int, width: int, scale: Tuple[int, int] = SCALE) -> float:
    """OpenMMLab's keep-ratio rescale factor to fit `scale` (long, short)."""
    long_edge, short_edge = max(scale), min(scale)
    return min(long_edge / max(height, width), short_edge / min(height, width))


def prepare(
    image: np.ndarray, boxes: Tensor, train: bool, rng: Optional[np.random.Generator] = None, scale: Tuple[int, int] = SCALE
) -> Tuple[Tensor, Tensor, Tuple[int, int]]:
    """uint8 [H, W, 3] RGB -> (float image [3, h, w] normalised, boxes rescaled / flipped, (h, w))."""
    H, W = image.shape[:2]
    img = torch.from_numpy(np.array(image, dtype=np.float32)).permute(2, 0, 1)
    f = resize_scale(H, W, scale)
    h, w = int(H * f + 0.5), int(W * f + 0.5)
    if (h, w) != (H, W):
        img = F.interpolate(img[None], size=(h, w), mode="bilinear", align_corners=False)[0]
        boxes = boxes * torch.tensor([w / W, h / H, w / W, h / H])
    if train and rng is not None and rng.random() < 0.5:
        img = img.flip(-1)
        boxes = torch.stack([w - boxes[:, 2], boxes[:, 1], w - boxes[:, 0], boxes[:, 3]], 1)
    img = (img - torch.tensor(MEAN)[:, None, None]) / torch.tensor(STD)[:, None, None]
    return img, boxes, (h, w)


def collate(
    items: Sequence[Tuple[Tensor, Tensor, Tensor, Tuple[int, int]]],
) -> Tuple[Tensor, List[Tuple[int, int]], List[Dict[str, Tensor]]]:
    """[(image, boxes, labels, (h, w))] -> (images [B, 3, H, W] zero-padded to multiples of 32, sizes, targets)."""
    H = max(-(-it[0].shape[1] // 32) * 32 for it in items)
    W = max(-(-it[0].shape[2] // 32) * 32 for it in items)
    out = torch.zeros(len(items), 3, H, W)
    for i, it in enumerate(items):
        out[i, :, : it[0].shape[1], : it[0].shape[2]] = it[0]
    return out, [it[3] for it in items], [{"boxes": it[1], "labels": it[2]} for it in items]


class CocoDetection(torch.utils.data.Dataset):
    """A COCO annotation file and its image folder; item i -> (image, boxes, labels, (h, w))."""

    def __init__(self, ann_file: str, image_dir: str, train: bool, seed: int = 0, scale: Tuple[int, int] = SCALE):
        self.records, self.classes = load_coco(ann_file, image_dir)
        if train:
            self.records = [r for r in self.records if r.boxes.shape[0]]
            if not self.records:
                raise DetectionDataError(f"{ann_file}: no image has a box to train on")
        self.ann_file, self.train, self.seed, self.scale = ann_file, train, seed, scale

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, code: int):
        """Item `code` = epoch * len + index (the ResumableBatchSampler's codes; evaluation's plain
        indices are epoch 0): image `index`, its random flip drawn from (seed, epoch, index)."""
        from ..data import open_image

        epoch, i = divmod(int(code), len(self.records))
        r = self.records[i]
        try:
            img = np.asarray(open_image(r.file))
        except (OSError, ValueError, SyntaxError) as exc:
            raise DetectionDataError(f"{r.file}: cannot read the image ({exc})") from None
        if img.shape[:2] != (r.height, r.width):
            raise DetectionDataError(
                f"{r.file}: the image is {img.shape[1]} x {img.shape[0]}, its record in {self.ann_file} says {r.width} x {r.height}"
            )
        rng = np.random.default_rng([self.seed, epoch, i])
        image, boxes, size = prepare(img, r.boxes, self.train, rng, self.scale)
        return image, boxes, r.labels, size

    def original(self, i: int) -> Tuple[Tensor, Tensor, Tuple[float, float]]:
        """Image i's own annotation: (boxes [G, 4] in its pixels, labels, (sx, sy)), sx and sy the
        factors item i's image and boxes were resized by (w / W, h / H): detections on the item map
        back to the image by dividing x by sx and y by sy (as OpenMMLab's rescale)."""
        r = self.records[i]
        f = resize_scale(r.height, r.width, self.scale)
        h, w = int(r.height * f + 0.5), int(r.width * f + 0.5)
        return r.boxes, r.labels, (w / r.width, h / r.height)


# ---- embedded data: scenes with drawn objects ------------------------------------------------------

SYNTHETIC_CLASSES = ("storagetank", "building", "vehicle", "pool")


def _draw(img: np.ndarray, cls: int, x0: int, y0: int, w: int, h: int, rng: np.random.Generator) -> None:
    yy, xx = np.mgrid[0:h, 0:w]
    region = img[y0 : y0 + h, x0 : x0 + w]
    if cls == 0:  # a light disc with a dark rim
        r = ((yy - (h - 1) / 2) / (h / 2)) ** 2 + ((xx - (w - 1) / 2) / (w / 2)) ** 2
        region[r <= 1] = (200, 200, 195)
        region[(r > 0.7) & (r <= 1)] = (90, 90, 90)
    elif cls == 1:  # a red roof with a ridge
        region[:] = (150, 60, 50)
        region[h // 2 - max(1, h // 10) : h // 2 + max(1, h // 10)] = (100, 40, 35)
    elif cls == 2:  # a bright car-like blob
        region[:] = (40, 40, 200) if rng.random() < 0.5 else (230, 230, 60)
        region[: max(1, h // 4)] = (20, 20, 20)
    else:  # blue water in a white border
        region[:] = (240, 240, 240)
        b = max(1, min(h, w) // 6)
        region[b : h - b, b : w - b] = (40, 140, 220)


def synthetic_detection_scene(size: int, rng: np.random.Generator, max_objects: int = 6) -> Tuple[np.ndarray, Tensor, Tensor]:
    """(uint8 [size, size, 3], boxes [G, 4] xyxy, labels [G]): an aerial-like scene with 1 to
    max_objects drawn objects of the SYNTHETIC_CLASSES, each in its own spot (no overlaps)."""
    from ..data import synthetic_scene

    img = synthetic_scene(size, rng).copy()
    boxes, labels = [], []
    for _ in range(int(rng.integers(1, max_objects + 1))):
        for _try in range(20):
            cls = int(rng.integers(0, len(SYNTHETIC_CLASSES)))
            # 16 px and up whatever the scene's size: the smallest anchors are 32 px (stride 4 x scale 8)
            w = int(rng.integers(max(16, size // 8), max(17, size // 3)))
            h = w if cls in (0, 3) else int(w * rng.uniform(0.5, 0.8))
            if cls == 2:
                w, h = max(16, w * 2 // 3), max(10, h * 2 // 3)
            x0, y0 = int(rng.integers(0, size - w)), int(rng.integers(0, size - h))
            box = [x0, y0, x0 + w, y0 + h]
            if all(box[2] <= b[0] or b[2] <= box[0] or box[3] <= b[1] or b[3] <= box[1] for b in boxes):
                _draw(img, cls, x0, y0, w, h, rng)
                boxes.append(box)
                labels.append(cls)
                break
    return img, torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4), torch.tensor(labels, dtype=torch.int64)


class SyntheticDetection(torch.utils.data.Dataset):
    """`length` embedded scenes of `size` px (item i the same on every run), prepared like COCO items
    (no resize: the scale is the scene's own)."""

    classes = SYNTHETIC_CLASSES

    def __init__(self, length: int, size: int = 128, train: bool = True, seed: int = 0):
        if size % 32:
            raise ValueError(f"SyntheticDetection: size expected a multiple of 32, got {size}")
        self.length, self.size, self.train, self.seed = length, size, train, seed

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, code: int):
        """Item `code` = epoch * len + index, as CocoDetection's: scene `index`, flipped by (seed, epoch, index)."""
        epoch, i = divmod(int(code), self.length)
        img, boxes, labels = synthetic_detection_scene(self.size, np.random.default_rng([self.seed, i]))
        rng = np.random.default_rng([self.seed, epoch, i, 1])
        image, boxes, size = prepare(img, boxes, self.train, rng, (self.size, self.size))
        return image, boxes, labels, size
