"""Segmentation data: LoveDA (official layout), SpaceNetv1 (as the release converted it), a
generic images/ + masks/ folder, and the embedded procedural scenes with masks (the default).

Layouts (docs/segmentation.md):
  loveda    ROOT/{Train,Val,Test}/{Urban,Rural}/{images_png,masks_png}/<id>.png (the official zips),
            or the flat ROOT/{Train,Val,Test}/{images_png,masks_png}; masks 0 (no-data) .. 7,
            reduced as published: 0 -> 255 (ignored), k -> k - 1 (7 classes); Test has no masks.
  spacenet  ROOT/{train,val}/{3band,mask}/<id>.png, masks 0 / 1 (background, building), no reduction;
            or ROOT/{3band,mask}/ unsplit: the first 5000 (natural name order) train, the rest val.
  folder    ROOT/{train,val}/{images,masks}/, a mask per image with the same stem (.png), labels
            0..C-1 and 255 (ignored); C from ROOT/classes.txt (one name a line) or --num-classes.
A mask whose size differs from its image's, or that holds a label outside 0..C-1 and 255, is an
error naming the file.

Training pipeline as published: random resize (the image scaled, keeping its ratio, to fit a
square of side crop * r, r ~ U(0.5, 2); image bilinear, mask nearest), random crop to the crop size
retried up to 10 times until no class covers 75 % or more of the labelled pixels, horizontal flip
(p 0.5), photometric distortion (brightness +-32, contrast x U(0.5, 1.5), saturation x U(0.5,
1.5), hue +-18 of 180, each with p 0.5, contrast before or after the HSV steps at random), ImageNet
normalisation, padding to the crop size (image 0 after normalisation, mask 255). The randomness of
item `index` in epoch `epoch` is a pure function of (seed, epoch, index): a resumed run sees the
batches of a straight one."""

from __future__ import annotations

import os
import re
from typing import List, NamedTuple, Optional, Sequence, Tuple

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from ..data import IMAGE_EXTENSIONS, open_image
from .uperhead import IGNORE_INDEX

MEAN = np.array([123.675, 116.28, 103.53], dtype=np.float32)
STD = np.array([58.395, 57.12, 57.375], dtype=np.float32)

LOVEDA_CLASSES = ("background", "building", "road", "water", "barren", "forest", "agricultural")
SPACENET_CLASSES = ("background", "building")
SCENE_CLASSES = ("field", "water", "road", "building", "forest")
SPACENET_TRAIN = 5000
DATASETS = ("auto", "loveda", "spacenet", "folder")


class SegDataError(ValueError):
    """Bad segmentation data: the message names the file."""


class Sample(NamedTuple):
    image: str
    mask: Optional[str]


class SegSource(NamedTuple):
    kind: str
    classes: Tuple[str, ...]
    train: List[Sample]
    val: List[Sample]
    test: List[Sample]  # LoveDA's Test (no masks), for submission files
    reduce_zero_label: bool
    head_classes: int  # the published head's outputs (7 for SpaceNet too)


def _natural(name: str):
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)]


def _images(folder: str) -> List[str]:
    if not os.path.isdir(folder):
        return []
    names = [f for f in os.listdir(folder) if f.lower().endswith(IMAGE_EXTENSIONS)]
    return [os.path.join(folder, f) for f in sorted(names, key=_natural)]


def _pair(images: List[str], mask_dir: Optional[str], what: str) -> List[Sample]:
    if mask_dir is None:
        return [Sample(p, None) for p in images]
    masks = {os.path.splitext(os.path.basename(m))[0]: m for m in _images(mask_dir)}
    out = []
    for p in images:
        stem = os.path.splitext(os.path.basename(p))[0]
        if stem not in masks:
            raise SegDataError(f"argument '--data': image {p} has no mask {os.path.join(mask_dir, stem)}.png ({what})")
        out.append(Sample(p, masks[stem]))
    return out


def _loveda_split(root: str, split: str, masks: bool) -> List[Sample]:
    base = os.path.join(root, split)
    groups = [base] if os.path.isdir(os.path.join(base, "images_png")) else [os.path.join(base, s) for s in ("Urban", "Rural")]
    out: List[Sample] = []
    for g in groups:
        imgs = _images(os.path.join(g, "images_png"))
        mdir = os.path.join(g, "masks_png")
        out += _pair(imgs, mdir if masks else None, f"LoveDA {split}")
    return out


def discover(root: str, dataset: str = "auto", num_classes: Optional[int] = None) -> SegSource:
    """The samples of --data by --dataset (auto: by the layout found)."""
    if dataset not in DATASETS:
        raise ValueError(f"argument '--dataset' expected one of {list(DATASETS)}, got {dataset!r}")
    if not os.path.isdir(root):
        raise ValueError(f"argument '--data' expected a directory, got {root!r}")
    if dataset == "auto":
        if os.path.isdir(os.path.join(root, "Train")):
            dataset = "loveda"
        elif os.path.isdir(os.path.join(root, "train", "3band")) or os.path.isdir(os.path.join(root, "3band")):
            dataset = "spacenet"
        elif os.path.isdir(os.path.join(root, "train", "images")):
            dataset = "folder"
        else:
            raise ValueError(
                f"argument '--data' expected a LoveDA (Train/, Val/), SpaceNet (train/3band, train/mask) or folder "
                f"(train/images, train/masks) layout, got {root!r} with {sorted(os.listdir(root))[:8]}"
            )
    if dataset == "loveda":
        train = _loveda_split(root, "Train", True)
        val = _loveda_split(root, "Val", True)
        test = _loveda_split(root, "Test", False)
        src = SegSource("loveda", LOVEDA_CLASSES, train, val, test, True, 7)
    elif dataset == "spacenet":
        if os.path.isdir(os.path.join(root, "train", "3band")):
            train = _pair(_images(os.path.join(root, "train", "3band")), os.path.join(root, "train", "mask"), "SpaceNet train")
            val = _pair(_images(os.path.join(root, "val", "3band")), os.path.join(root, "val", "mask"), "SpaceNet val")
        else:
            every = _pair(_images(os.path.join(root, "3band")), os.path.join(root, "mask"), "SpaceNet")
            train, val = every[:SPACENET_TRAIN], every[SPACENET_TRAIN:]
        src = SegSource("spacenet", SPACENET_CLASSES, train, val, [], False, 7)
    else:
        names_file = os.path.join(root, "classes.txt")
        if os.path.isfile(names_file):
            with open(names_file) as f:
                classes = tuple(line.strip() for line in f if line.strip())
        elif num_classes:
            classes = tuple(str(c) for c in range(num_classes))
        else:
            raise ValueError(f"argument '--num-classes' expected for a folder dataset without {names_file}")
        train = _pair(_images(os.path.join(root, "train", "images")), os.path.join(root, "train", "masks"), "train")
        val = _pair(_images(os.path.join(root, "val", "images")), os.path.join(root, "val", "masks"), "val")
        src = SegSource("folder", classes, train, val, [], False, len(classes))
    if num_classes is not None and num_classes != len(src.classes) and dataset != "folder":
        src = src._replace(head_classes=num_classes)
    if not src.train:
        raise ValueError(f"argument '--data' expected training images in {root!r} ({src.kind} layout), found none")
    return src


# ---- reading -------------------------------------------------------------------------------------


def read_mask(path: str) -> np.ndarray:
    with Image.open(path) as m:
        if m.mode not in ("L", "P", "I", "I;16", "1"):
            m = m.convert("L") if m.mode in ("LA",) else m
        arr = np.asarray(m)
    if arr.ndim == 3:  # an RGB-saved mask with equal channels
        if not (np.all(arr[..., :1] == arr[..., 1:3])):
            raise SegDataError(
                f"argument '--data': mask {path} has {arr.shape[2]} differing channels, expected one label channel"
            )
        arr = arr[..., 0]
    return arr.astype(np.int64)


def reduce_zero(mask: np.ndarray) -> np.ndarray:
    out = mask - 1
    out[mask == 0] = IGNORE_INDEX
    return out


def load_pair(sample: Sample, num_classes: int, reduce_zero_label: bool) -> Tuple[np.ndarray, np.ndarray]:
    """(image uint8 [H, W, 3] RGB, labels int64 [H, W]) checked: sizes equal, labels in range."""
    try:
        img = np.asarray(open_image(sample.image))
    except Exception as exc:
        raise SegDataError(f"argument '--data': cannot read image {sample.image}: {type(exc).__name__}: {exc}") from exc
    assert sample.mask is not None
    try:
        mask = read_mask(sample.mask)
    except SegDataError:
        raise
    except Exception as exc:
        raise SegDataError(f"argument '--data': cannot read mask {sample.mask}: {type(exc).__name__}: {exc}") from exc
    if mask.shape != img.shape[:2]:
        raise SegDataError(
            f"argument '--data': mask {sample.mask} is {mask.shape[1]} x {mask.shape[0]}, its image {sample.image} "
            f"{img.shape[1]} x {img.shape[0]}: expected the same size"
        )
    if reduce_zero_label:
        mask = reduce_zero(mask)
    bad = (mask != IGNORE_INDEX) & ((mask < 0) | (mask >= num_classes))
    if bad.any():
        values = sorted(set(np.unique(mask[bad]).tolist()))
        shown = [v + 1 for v in values] if reduce_zero_label else values
        allowed = f"0..{num_classes}" if reduce_zero_label else f"0..{num_classes - 1} and {IGNORE_INDEX}"
        raise SegDataError(f"argument '--data': mask {sample.mask} holds labels {shown[:8]} outside {allowed}")
    return img, mask


# ---- the embedded procedural scenes --------------------------------------------------------------


def scene_with_mask(size: int, rng: np.random.Generator) -> Tuple[np.ndarray, np.ndarray]:
    """An aerial-like scene and its labels (SCENE_CLASSES): fields, forest patches, a river, roads,
    buildings; uint8 [size, size, 3] and int64 [size, size]."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    n = int(rng.integers(3, 8))
    seeds = rng.random((n, 2)).astype(np.float32)
    cell = ((yy[..., None] - seeds[:, 0]) ** 2 + (xx[..., None] - seeds[:, 1]) ** 2).argmin(-1)
    palette = np.array([[150, 160, 80], [180, 150, 100], [120, 150, 70], [200, 180, 120]], np.float32)
    colours = palette[rng.integers(0, len(palette), n)] * rng.uniform(0.9, 1.1, (n, 1)).astype(np.float32)
    img = colours[cell]
    mask = np.zeros((size, size), np.int64)
    for _ in range(int(rng.integers(1, 4))):  # forest
        cy, cx, r = rng.random(), rng.random(), rng.uniform(0.1, 0.25)
        blob = (yy - cy) ** 2 + (xx - cx) ** 2 < r * r
        img[blob] = np.array([40, 80, 40], np.float32) * rng.uniform(0.8, 1.2)
        mask[blob] = 4
    if rng.random() < 0.7:  # river
        centre = 0.5 + rng.uniform(0.05, 0.2) * np.sin(yy * rng.uniform(3, 8) + rng.uniform(0, 6.3)) + rng.uniform(-0.3, 0.3)
        river = np.abs(xx - centre) < rng.uniform(0.07, 0.12)
        img[river] = np.array([40, 70, 130], np.float32)
        mask[river] = 1
    for _ in range(int(rng.integers(1, 3))):  # roads
        theta, off = rng.uniform(0, np.pi), rng.uniform(-0.3, 0.3)
        road = np.abs((xx - 0.5) * np.cos(theta) + (yy - 0.5) * np.sin(theta) - off) < rng.uniform(0.035, 0.05)
        img[road] = np.array([165, 165, 160], np.float32)
        mask[road] = 2
    for _ in range(int(rng.integers(2, 6))):  # buildings
        h, w = rng.integers(max(2, size // 8), max(3, size // 4), 2).tolist()
        y0, x0 = int(rng.integers(0, size - h)), int(rng.integers(0, size - w))
        img[y0 : y0 + h, x0 : x0 + w] = np.array([[200, 90, 70], [225, 225, 220]], np.float32)[rng.integers(0, 2)]
        mask[y0 : y0 + h, x0 : x0 + w] = 3
    img = img + rng.normal(0, 6, img.shape).astype(np.float32)
    return np.clip(img, 0, 255).astype(np.uint8), mask


# ---- augmentation --------------------------------------------------------------------------------


def _resize(arr: np.ndarray, size: Tuple[int, int], nearest: bool) -> np.ndarray:
    """size (h, w)."""
    h, w = size
    if arr.shape[:2] == (h, w):
        return arr
    if nearest:
        return np.asarray(Image.fromarray(arr.astype(np.int32)).resize((w, h), Image.NEAREST)).astype(np.int64)
    return np.asarray(Image.fromarray(arr).resize((w, h), Image.BILINEAR))


def random_resize(img: np.ndarray, mask: np.ndarray, crop: int, rng: np.random.Generator, ratio=(0.5, 2.0)):
    r = rng.uniform(*ratio)
    h, w = mask.shape
    scale = crop * r / max(h, w)  # keep-ratio fit into the square (crop r)^2
    size = (max(1, int(h * scale + 0.5)), max(1, int(w * scale + 0.5)))
    return _resize(img, size, False), _resize(mask, size, True)


def random_crop(img: np.ndarray, mask: np.ndarray, crop: int, rng: np.random.Generator, cat_max_ratio: float = 0.75):
    h, w = mask.shape

    def box():
        y = int(rng.integers(0, max(h - crop, 0) + 1))
        x = int(rng.integers(0, max(w - crop, 0) + 1))
        return y, x

    y, x = box()
    if cat_max_ratio < 1.0:
        for _ in range(10):
            labels, counts = np.unique(mask[y : y + crop, x : x + crop], return_counts=True)
            counts = counts[labels != IGNORE_INDEX]
            if len(counts) > 1 and counts.max() / counts.sum() < cat_max_ratio:
                break
            y, x = box()
    return img[y : y + crop, x : x + crop], mask[y : y + crop, x : x + crop]


def _rgb_to_hsv(rgb: np.ndarray) -> np.ndarray:
    """float RGB 0..255 -> H 0..180, S 0..255, V 0..255 (the 8-bit HSV convention)."""
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    v = rgb.max(-1)
    mn = rgb.min(-1)
    d = v - mn
    s = np.where(v > 0, d / np.maximum(v, 1e-12) * 255, 0)
    dd = np.maximum(d, 1e-12)
    h = np.where(v == r, (g - b) / dd, np.where(v == g, 2 + (b - r) / dd, 4 + (r - g) / dd)) * 30
    h = np.where(d > 0, h % 180, 0)
    return np.stack([h, s, v], -1)


def _hsv_to_rgb(hsv: np.ndarray) -> np.ndarray:
    h, s, v = hsv[..., 0] / 30.0, hsv[..., 1] / 255.0, hsv[..., 2]
    i = np.floor(h) % 6
    f = h - np.floor(h)
    p, q, t = v * (1 - s), v * (1 - s * f), v * (1 - s * (1 - f))
    choices = [(v, t, p), (q, v, p), (p, v, t), (p, q, v), (t, p, v), (v, p, q)]
    out = np.zeros(hsv.shape, np.float32)
    for k, (a, b, c) in enumerate(choices):
        sel = i == k
        out[sel] = np.stack([a[sel], b[sel], c[sel]], -1)
    return out


def photometric_distortion(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    x = img.astype(np.float32)

    def clip(a):
        return np.clip(a, 0, 255)

    if rng.integers(2):
        x = clip(x + rng.uniform(-32, 32))
    contrast_first = bool(rng.integers(2))

    def contrast(a):
        return clip(a * rng.uniform(0.5, 1.5)) if rng.integers(2) else a

    if contrast_first:
        x = contrast(x)
    if rng.integers(2):
        hsv = _rgb_to_hsv(x)
        hsv[..., 1] = clip(hsv[..., 1] * rng.uniform(0.5, 1.5))
        x = clip(_hsv_to_rgb(hsv))
    if rng.integers(2):
        hsv = _rgb_to_hsv(x)
        hsv[..., 0] = (hsv[..., 0] + int(rng.integers(-18, 18))) % 180
        x = clip(_hsv_to_rgb(hsv))
    if not contrast_first:
        x = contrast(x)
    return x


def normalise(img: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(((img.astype(np.float32) - MEAN) / STD).transpose(2, 0, 1)))


def train_transform(img: np.ndarray, mask: np.ndarray, crop: int, rng: np.random.Generator) -> Tuple[torch.Tensor, torch.Tensor]:
    img, mask = random_resize(img, mask, crop, rng)
    img, mask = random_crop(img, mask, crop, rng)
    if rng.random() < 0.5:
        img, mask = img[:, ::-1], mask[:, ::-1]
    x = normalise(photometric_distortion(img, rng))
    y = torch.from_numpy(np.ascontiguousarray(mask))
    ph, pw = crop - x.shape[1], crop - x.shape[2]
    if ph or pw:
        x = torch.nn.functional.pad(x, (0, pw, 0, ph), value=0.0)
        y = torch.nn.functional.pad(y, (0, pw, 0, ph), value=IGNORE_INDEX)
    return x, y


# ---- datasets ------------------------------------------------------------------------------------


class SegTrain(Dataset):
    """Training items by code = epoch * len + index (the ResumableBatchSampler's codes)."""

    def __init__(self, samples: Sequence[Sample], num_classes: int, reduce_zero_label: bool, crop: int, seed: int):
        self.samples, self.num_classes, self.reduce = list(samples), num_classes, reduce_zero_label
        self.crop, self.seed = crop, seed

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, code: int):
        epoch, index = divmod(int(code), len(self))
        img, mask = load_pair(self.samples[index], self.num_classes, self.reduce)
        return train_transform(img, mask, self.crop, np.random.default_rng([self.seed, epoch, index, 7]))


class SegEval(Dataset):
    """Whole images for slide inference: (normalised image [3, H, W], labels [H, W] or None, name)."""

    def __init__(self, samples: Sequence[Sample], num_classes: int, reduce_zero_label: bool):
        self.samples, self.num_classes, self.reduce = list(samples), num_classes, reduce_zero_label

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int):
        s = self.samples[i]
        if s.mask is None:
            try:
                img = np.asarray(open_image(s.image))
            except Exception as exc:
                raise SegDataError(f"argument '--data': cannot read image {s.image}: {type(exc).__name__}: {exc}") from exc
            return normalise(img), None, os.path.basename(s.image)
        img, mask = load_pair(s, self.num_classes, self.reduce)
        return normalise(img), torch.from_numpy(mask), os.path.basename(s.image)


class SceneTrain(Dataset):
    """The embedded procedural scenes, item codes as SegTrain's; scene `index` is fixed by (seed, index)."""

    def __init__(self, length: int, size: int, crop: int, seed: int):
        self.length, self.size, self.crop, self.seed = length, size, crop, seed

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, code: int):
        epoch, index = divmod(int(code), self.length)
        img, mask = scene_with_mask(self.size, np.random.default_rng([self.seed, index, 0]))
        return train_transform(img, mask, self.crop, np.random.default_rng([self.seed, epoch, index, 7]))


class SceneEval(Dataset):
    def __init__(self, length: int, size: int, seed: int):
        self.length, self.size, self.seed = length, size, seed

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, i: int):
        img, mask = scene_with_mask(self.size, np.random.default_rng([self.seed, 1_000_000 + i, 0]))
        return normalise(img), torch.from_numpy(mask), f"scene_{i:05d}.png"
