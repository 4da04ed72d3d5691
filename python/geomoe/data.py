"""Pretraining data: an image folder in the OpticalRS-4M layout, or the embedded procedural scenes.

No package on the registries ships a small set of real aerial images (the EuroSAT and tree-detection
packages only download at run time), so the default data is a procedural generator of aerial-like
scenes: a patchwork of fields with crop-row texture, roads, a river, built-up blocks with shadows,
haze and sensor noise. Each image is a pure function of (seed, index), so the set needs no storage.

Both sources go through the published transforms: RandomResizedCrop(scale 0.2-1, ratio 3/4-4/3, bicubic),
horizontal flip, ImageNet mean/std. Augmentation randomness is a pure function of (seed, epoch,
index), so a resumed run sees exactly the batches a straight run would.

Files are read as they are: 16-bit and float images (common in remote sensing) are scaled by their
own range to 8 bits, never clipped (`to_rgb`); only regular files are opened, and never in a way
that can block (a FIFO named *.png is skipped, not waited on); a file that cannot be decoded is
skipped with a warning naming it, in pretraining and fine-tuning alike."""

from __future__ import annotations

import math
import os
import stat
import warnings
from typing import Iterator, List, Optional, Sequence, Tuple

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset, Sampler

IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], dtype=np.float32)
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".tif", ".tiff", ".bmp", ".webp")


# ---- transforms ----------------------------------------------------------------------------------


def random_resized_crop_box(width: int, height: int, rng: np.random.Generator, scale=(0.2, 1.0), ratio=(3 / 4, 4 / 3)):
    """The crop box of torchvision's RandomResizedCrop: ten tries at a random area and aspect, then a
    centre crop clamped to the allowed aspect."""
    area = width * height
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target = area * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(*log_ratio))
        w = int(round(math.sqrt(target * aspect)))
        h = int(round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = int(rng.integers(0, height - h + 1))
            left = int(rng.integers(0, width - w + 1))
            return left, top, left + w, top + h
    in_ratio = width / height
    if in_ratio < ratio[0]:
        w, h = width, int(round(width / ratio[0]))
    elif in_ratio > ratio[1]:
        h, w = height, int(round(height * ratio[1]))
    else:
        w, h = width, height
    top, left = (height - h) // 2, (width - w) // 2
    return left, top, left + w, top + h


_HIGH_BIT_MODES = ("I", "F", "I;16", "I;16L", "I;16B", "I;16N")


def to_rgb(img: Image.Image) -> Image.Image:
    """An 8-bit RGB image. PIL's convert("RGB") clips 16-bit and 32-bit integer and float images
    (modes I;16, I, F: 16-bit PNG and TIFF, float TIFF) to 0-255, which makes a 16-bit image almost
    white and a float image in [0, 1] black; they are scaled by their real range instead: integer
    images from their minimum to their maximum, float images as they are when they lie in [0, 1] and
    from their minimum to their maximum otherwise. NaN or Inf pixels (no-data values) cannot be
    scaled: a ValueError, so the image is skipped with a warning naming it."""
    if img.mode not in _HIGH_BIT_MODES:
        return img.convert("RGB")
    arr = np.asarray(img, dtype=np.float64)
    if not np.isfinite(arr).all():
        raise ValueError(f"{int((~np.isfinite(arr)).sum())} NaN/Inf pixels in a mode {img.mode} image: no range to scale it by")
    lo, hi = (float(arr.min()), float(arr.max())) if arr.size else (0.0, 1.0)
    if img.mode == "F" and lo >= 0.0 and hi <= 1.0:
        lo, hi = 0.0, 1.0
    scaled = (arr - lo) / (hi - lo) if hi > lo else np.zeros_like(arr)
    return Image.fromarray(np.round(scaled * 255).astype(np.uint8)).convert("RGB")


def open_image(path: str) -> Image.Image:
    """The decoded 8-bit RGB image at `path` (`to_rgb`). Opened without blocking (O_NONBLOCK), and
    anything but a regular file refused: a FIFO or a device named like an image raises at once
    instead of hanging the run."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            kind = (
                "a FIFO"
                if stat.S_ISFIFO(mode)
                else "a socket"
                if stat.S_ISSOCK(mode)
                else "a device"
                if (stat.S_ISCHR(mode) or stat.S_ISBLK(mode))
                else "not a file"
            )
            raise OSError(f"not a regular file ({kind})")
        f = os.fdopen(fd, "rb")
        fd = -1  # the file object owns it now
        with f, Image.open(f) as img:
            return to_rgb(img)
    finally:
        if fd >= 0:
            os.close(fd)


def _regular_image_files(folder: str, filenames: Sequence[str]) -> List[str]:
    """The image files among `filenames` (by extension) that are regular files (symlinks followed):
    a FIFO, socket or device named *.png is left out with a warning."""
    out = []
    for f in sorted(filenames):
        if not f.lower().endswith(IMAGE_EXTENSIONS):
            continue
        path = os.path.join(folder, f)
        if os.path.isfile(path):
            out.append(path)
        else:
            warnings.warn(f"skipping {path}: not a regular file (a FIFO, socket, device or broken link)")
    return out


def pretrain_transform(img: Image.Image, size: int, rng: np.random.Generator, scale=(0.2, 1.0)) -> torch.Tensor:
    """PIL image -> random resized crop, random flip, normalised float tensor [3, size, size]."""
    img = to_rgb(img)
    box = random_resized_crop_box(img.width, img.height, rng, scale)
    img = img.resize((size, size), Image.BICUBIC, box=box)
    arr = np.asarray(img, dtype=np.float32) / 255.0
    if rng.random() < 0.5:
        arr = arr[:, ::-1]
    arr = (arr - IMAGENET_MEAN) / IMAGENET_STD
    return torch.from_numpy(np.ascontiguousarray(arr.transpose(2, 0, 1)))


# ---- procedural scenes ---------------------------------------------------------------------------

_FIELD_COLOURS = np.array(
    [
        [92, 120, 60],
        [120, 140, 70],
        [150, 140, 90],
        [170, 150, 100],
        [70, 100, 55],
        [130, 110, 80],
        [185, 170, 120],
        [60, 85, 50],
    ],
    dtype=np.float32,
)


def _grid(size: int):
    return np.mgrid[0:size, 0:size].astype(np.float32) / size


def _fields(size: int, rng: np.random.Generator) -> np.ndarray:
    """A Voronoi patchwork of fields, each with its own colour and crop-row direction."""
    yy, xx = _grid(size)
    n = int(rng.integers(5, 14))
    seeds = rng.random((n, 2)).astype(np.float32)
    cell = ((yy[..., None] - seeds[:, 0]) ** 2 + (xx[..., None] - seeds[:, 1]) ** 2).argmin(-1)
    colours = _FIELD_COLOURS[rng.integers(0, len(_FIELD_COLOURS), n)] * rng.uniform(0.85, 1.15, (n, 1)).astype(np.float32)
    angle = rng.uniform(0, np.pi, n).astype(np.float32)
    freq = rng.uniform(20, 70, n).astype(np.float32)
    rows = np.sin((xx * np.cos(angle[cell]) + yy * np.sin(angle[cell])) * freq[cell])
    return colours[cell] * (1 + 0.08 * rows[..., None])


def _river(img: np.ndarray, rng: np.random.Generator, width=(0.02, 0.05)) -> None:
    yy, xx = _grid(img.shape[0])
    phase, amp, w = rng.uniform(0, 6.3), rng.uniform(0.05, 0.2), rng.uniform(*width)
    centre = 0.5 + amp * np.sin(yy * rng.uniform(3, 8) + phase) + rng.uniform(-0.3, 0.3)
    img[np.abs(xx - centre) < w] = np.array([40, 70, 95], dtype=np.float32) * rng.uniform(0.8, 1.2)


def _roads(img: np.ndarray, rng: np.random.Generator, count=(1, 4)) -> None:
    yy, xx = _grid(img.shape[0])
    for _ in range(int(rng.integers(*count))):
        theta, offset = rng.uniform(0, np.pi), rng.uniform(0.2, 0.8)
        d = np.abs((xx - 0.5) * np.cos(theta) + (yy - 0.5) * np.sin(theta) - (offset - 0.5))
        img[d < rng.uniform(0.006, 0.015)] = np.array([150, 150, 145], dtype=np.float32)


def _buildings(img: np.ndarray, rng: np.random.Generator, count=(5, 25), spread=0.12) -> None:
    """Bright roofs with a shadow to the lower right, clustered around a centre."""
    size = img.shape[0]
    cy, cx = rng.uniform(0.2, 0.8, 2)
    s = max(1, size // 100)
    for _ in range(int(rng.integers(*count))):
        y0 = max(int((cy + rng.normal(0, spread)) * size), 0)
        x0 = max(int((cx + rng.normal(0, spread)) * size), 0)
        h, w = (rng.integers(2, max(3, size // 14), 2)).tolist()
        img[y0 + s : y0 + h + s, x0 + s : x0 + w + s] *= 0.55
        img[y0 : y0 + h, x0 : x0 + w] = np.array([[190, 90, 70], [200, 200, 195], [120, 120, 130]], dtype=np.float32)[
            rng.integers(0, 3)
        ]


def _canopy(size: int, rng: np.random.Generator) -> np.ndarray:
    """Dense tree crowns: dark green with round bright and dark blobs."""
    yy, xx = _grid(size)
    img = np.empty((size, size, 3), dtype=np.float32)
    img[:] = np.array([45, 75, 40], dtype=np.float32) * rng.uniform(0.8, 1.2)
    for _ in range(int(rng.integers(40, 90))):
        y, x, r = rng.random(), rng.random(), rng.uniform(0.02, 0.06)
        img[(yy - y) ** 2 + (xx - x) ** 2 < r * r] *= rng.uniform(0.7, 1.4)
    return img


def _finish(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Haze / illumination gradient and sensor noise, then uint8."""
    yy, xx = _grid(img.shape[0])
    img = img * (0.9 + 0.2 * (xx * rng.uniform(-1, 1) + yy * rng.uniform(-1, 1)))[..., None]
    img = img + rng.normal(0, 4, img.shape).astype(np.float32)
    return np.clip(img, 0, 255).astype(np.uint8)


def synthetic_scene(size: int, rng: np.random.Generator) -> np.ndarray:
    """An aerial-like RGB scene, uint8 [size, size, 3]: fields, maybe a river, roads, maybe a village."""
    img = _fields(size, rng)
    if rng.random() < 0.6:
        _river(img, rng)
    _roads(img, rng)
    if rng.random() < 0.7:
        _buildings(img, rng)
    return _finish(img, rng)


def _urban(size: int, rng: np.random.Generator) -> np.ndarray:
    img = np.empty((size, size, 3), dtype=np.float32)
    img[:] = np.array([118, 116, 110], dtype=np.float32) * rng.uniform(0.85, 1.15)
    _roads(img, rng, (3, 6))
    _buildings(img, rng, (60, 120), spread=0.3)
    return img


def _riverside(size: int, rng: np.random.Generator) -> np.ndarray:
    img = _fields(size, rng)
    _river(img, rng, width=(0.08, 0.15))
    return img


def _farmland(size: int, rng: np.random.Generator) -> np.ndarray:
    img = _fields(size, rng)
    _roads(img, rng, (1, 2))
    return img


SCENE_CLASSES = {"farmland": _farmland, "forest": _canopy, "river": _riverside, "urban": _urban}


def scene_of_class(name: str, size: int, rng: np.random.Generator) -> np.ndarray:
    return _finish(SCENE_CLASSES[name](size, rng), rng)


def write_scene_classes(root: str, per_class_train: int, per_class_val: int, size: int = 96, seed: int = 0) -> None:
    """A small scene-classification set, root/{train,val}/<class>/*.png: the embedded default for
    fine-tuning and the CI check that fine-tuning learns."""
    for split, count, salt in (("train", per_class_train, 1), ("val", per_class_val, 2)):
        for c, name in enumerate(sorted(SCENE_CLASSES)):
            folder = os.path.join(root, split, name)
            os.makedirs(folder, exist_ok=True)
            for i in range(count):
                rng = np.random.default_rng([seed, salt, c, i])
                Image.fromarray(scene_of_class(name, size, rng)).save(os.path.join(folder, f"{i:05d}.png"))


# ---- datasets ------------------------------------------------------------------------------------


class _EpochIndexed(Dataset):
    """Items are addressed by code = epoch * len + index, so augmentation can depend on the epoch."""

    def __init__(self, length: int, img_size: int, seed: int):
        self.length, self.img_size, self.seed = length, img_size, seed
        self._warned: set = set()

    def __len__(self) -> int:
        return self.length

    def _image(self, index: int) -> Image.Image:
        raise NotImplementedError

    def __getitem__(self, code: int) -> Optional[torch.Tensor]:
        """The transformed image, or None for a file that cannot be decoded (warned about once,
        counted by `skip_unreadable`, never replaced by another image)."""
        epoch, index = divmod(int(code), self.length)
        rng = np.random.default_rng([self.seed, epoch, index, 1])
        try:
            img = self._image(index)
        except Exception as exc:  # PIL raises OSError, ValueError, SyntaxError... for broken files
            if index not in self._warned:
                self._warned.add(index)
                warnings.warn(f"skipping unreadable image {self._describe(index)}: {type(exc).__name__}: {exc}")
            return None
        return pretrain_transform(img, self.img_size, rng)

    def _describe(self, index: int) -> str:
        return f"#{index}"


class SyntheticScenes(_EpochIndexed):
    """The embedded default data: `length` procedural aerial-like scenes."""

    def __init__(self, length: int = 4096, img_size: int = 224, seed: int = 0, source_size: Optional[int] = None):
        super().__init__(length, img_size, seed)
        self.source_size = source_size or max(img_size + img_size // 4, 64)

    def _image(self, index: int) -> Image.Image:
        rng = np.random.default_rng([self.seed, index, 0])
        return Image.fromarray(synthetic_scene(self.source_size, rng))


class ImageFolder(_EpochIndexed):
    """Every image file under root/<subfolder>/ (recursively), the OpticalRS-4M layout."""

    def __init__(self, root: str, img_size: int = 224, seed: int = 0):
        if not os.path.isdir(root):
            raise FileNotFoundError(f"argument '--data' expected a directory, got {root!r}")
        files: List[str] = []
        for sub in sorted(os.listdir(root)):
            top = os.path.join(root, sub)
            if not os.path.isdir(top):
                continue
            for dirpath, dirnames, filenames in os.walk(top):
                dirnames.sort()
                files += _regular_image_files(dirpath, filenames)
        if not files:
            raise FileNotFoundError(f"no image files ({', '.join(IMAGE_EXTENSIONS)}) under {root}/<subfolder>/")
        self.files = files
        super().__init__(len(files), img_size, seed)

    def _image(self, index: int) -> Image.Image:
        return open_image(self.files[index])

    def _describe(self, index: int) -> str:
        return self.files[index]


def skip_unreadable(batch: List[Optional[torch.Tensor]]):
    """Collate: stack the images that decoded; (images or None, how many were skipped)."""
    good = [b for b in batch if b is not None]
    return (torch.stack(good) if good else None), len(batch) - len(good)


def skip_unreadable_labelled(batch: List[Optional[Tuple[torch.Tensor, int]]]):
    """Collate for (image, label) items: (images or None, labels or None, how many were skipped)."""
    good = [b for b in batch if b is not None]
    if not good:
        return None, None, len(batch)
    return torch.stack([g[0] for g in good]), torch.tensor([g[1] for g in good]), len(batch) - len(good)


class ResumableBatchSampler(Sampler[List[int]]):
    """Batches of item codes in a per-epoch permutation seeded by (seed, epoch), starting at a given
    global step: the batch at step s is the same whether or not the run was resumed. With several
    ranks the global batch is batch_size * world and rank r takes the r-th slice of it."""

    def __init__(
        self,
        length: int,
        batch_size: int,
        seed: int,
        start_step: int = 0,
        total_steps: Optional[int] = None,
        rank: int = 0,
        world: int = 1,
    ):
        if length < batch_size * world:
            raise ValueError(
                f"argument '--batch-size' expected at most the dataset size {length} over {world} rank(s), got {batch_size}"
            )
        self.length, self.seed, self.rank = length, seed, rank
        self.batch_size, self.local = batch_size * world, batch_size
        self.per_epoch = length // self.batch_size  # the last partial batch is dropped
        self.start_step, self.total_steps = start_step, total_steps

    def __len__(self) -> int:
        return (self.total_steps - self.start_step) if self.total_steps is not None else 2**62

    def __iter__(self) -> Iterator[List[int]]:
        step = self.start_step
        while self.total_steps is None or step < self.total_steps:
            epoch, b = divmod(step, self.per_epoch)
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            perm = torch.randperm(self.length, generator=g)
            batch = perm[b * self.batch_size : (b + 1) * self.batch_size][self.rank * self.local : (self.rank + 1) * self.local]
            yield (batch + epoch * self.length).tolist()
            step += 1


class ClassFolder(Dataset):
    """root/<class>/... image files, labels by sorted class name. Training items are addressed by
    code = epoch * len + index (random-resized-crop and flip from (seed, epoch, index)); evaluation
    items by index (a plain bicubic resize). An item whose file cannot be decoded is None (warned
    about once, naming the file; `skip_unreadable_labelled` leaves it out of the batch)."""

    def __init__(self, root: str, img_size: int, train: bool, seed: int = 0, classes: Optional[Sequence[str]] = None):
        if not os.path.isdir(root):
            raise FileNotFoundError(f"expected a class folder root/<class>/..., got {root!r} which is not a directory")
        self.classes = (
            list(classes) if classes is not None else sorted(d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d)))
        )
        self.samples = []
        for label, name in enumerate(self.classes):
            for dirpath, dirnames, filenames in os.walk(os.path.join(root, name)):
                dirnames.sort()
                self.samples += [(path, label) for path in _regular_image_files(dirpath, filenames)]
        if not self.samples:
            raise FileNotFoundError(f"no image files under {root}/<class>/")
        self.img_size, self.train, self.seed = img_size, train, seed
        self._warned: set = set()

    def __len__(self) -> int:
        return len(self.samples)

    @property
    def unreadable(self) -> int:
        """How many files this process found it cannot decode (in the loading process: with loader
        workers, count through the collate function instead)."""
        return len(self._warned)

    def __getitem__(self, code: int):
        epoch, index = divmod(int(code), len(self.samples))
        path, label = self.samples[index]
        try:
            img = open_image(path)
        except Exception as exc:  # PIL raises OSError, ValueError, SyntaxError... for broken files
            if index not in self._warned:
                self._warned.add(index)
                warnings.warn(f"skipping unreadable image {path}: {type(exc).__name__}: {exc}")
            return None
        if self.train:
            rng = np.random.default_rng([self.seed, epoch, index, 2])
            return pretrain_transform(img, self.img_size, rng, scale=(0.08, 1.0)), label
        img = img.resize((self.img_size, self.img_size), Image.BICUBIC)
        arr = (np.asarray(img, dtype=np.float32) / 255.0 - IMAGENET_MEAN) / IMAGENET_STD
        return torch.from_numpy(np.ascontiguousarray(arr.transpose(2, 0, 1))), label
