"""Pretraining data: an image folder in the OpticalRS-4M layout, or the embedded procedural scenes.

No package on the registries ships a small set of real aerial images (the EuroSAT and tree-detection
packages only download at run time), so the default data is a procedural generator of aerial-like
scenes: a patchwork of fields with crop-row texture, roads, a river, built-up blocks with shadows,
haze and sensor noise. Each image is a pure function of (seed, index), so the set needs no storage.

Both sources go through the published transforms: RandomResizedCrop(scale 0.2-1, ratio 3/4-4/3, bicubic),
horizontal flip, ImageNet mean/std. Augmentation randomness is a pure function of (seed, epoch,
index), so a resumed run sees exactly the batches a straight run would. Fine-tuning adds the
published RandAugment and random erasing (augment.py) and validates through a short-side resize and
a centre crop; its data is a class folder or a published split file (`read_split`).

Files are read as they are: 16-bit and float images (common in remote sensing) are scaled by their
own range to 8 bits, never clipped (`to_rgb`); only regular files are opened, and never in a way
that can block (a FIFO named *.png is skipped, not waited on); a file that cannot be decoded is
skipped with a warning naming it, in pretraining and fine-tuning alike."""

from __future__ import annotations

import json
import math
import os
import stat
import warnings
from typing import Any, Callable, Dict, Iterator, List, NamedTuple, Optional, Sequence, Tuple

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset, Sampler

from .augment import RandAugment, random_erasing

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


def files_in_subfolders(root: str, keep: Callable[[str, Sequence[str]], List[str]]) -> List[str]:
    """The files `keep(dirpath, filenames)` returns for every folder under root/<subfolder>/
    (recursively, in sorted order): the image-folder layout (files directly in root are not read)."""
    if not os.path.isdir(root):
        raise FileNotFoundError(f"argument '--data' expected a directory, got {root!r}")
    files: List[str] = []
    for sub in sorted(os.listdir(root)):
        top = os.path.join(root, sub)
        if not os.path.isdir(top):
            continue
        for dirpath, dirnames, filenames in os.walk(top):
            dirnames.sort()
            files += keep(dirpath, filenames)
    return files


class ImageFolder(_EpochIndexed):
    """Every image file under root/<subfolder>/ (recursively), the OpticalRS-4M layout."""

    def __init__(self, root: str, img_size: int = 224, seed: int = 0):
        files = files_in_subfolders(root, _regular_image_files)
        if not files:
            raise FileNotFoundError(f"no image files ({', '.join(IMAGE_EXTENSIONS)}) under {root}/<subfolder>/")
        self.files = files
        super().__init__(len(files), img_size, seed)

    def _image(self, index: int) -> Image.Image:
        return open_image(self.files[index])

    def _describe(self, index: int) -> str:
        return self.files[index]


class BandCountError(ValueError):
    """A raster whose band count differs from the model's: an error, never a skipped file."""


class RasterSizeError(ValueError):
    """A raster that declares more values than --max-raster-pixels: an error before any pixel is
    read, never a skipped file."""


PROBE_FILES = 16  # files a run tries to read before it starts (`check_readable`)


def check_readable(
    files: Sequence[str], read: Callable[[str], Any], where: str, flag: str = "--data", limit: int = PROBE_FILES
) -> None:
    """Before a run: read files in order until one decodes, at most `limit` of them (a bounded
    check: one read when the first file is good). When every file was tried and none decodes, a
    ValueError naming `flag`, `where` the files are and the first file's error: the run would skip
    every step. When only the first `limit` of more files failed, a warning; the run then stops if
    none of the images it draws can be read (pretraining: at its end, fine-tuning: at the first
    epoch's end, before a checkpoint). Errors other than an unreadable file (a band count, a
    raster over the size limit) pass through."""
    first = None
    for path in files[:limit]:
        try:
            read(path)
            return
        except (BandCountError, RasterSizeError):
            raise
        except Exception as exc:
            first = first or f"{path}: {type(exc).__name__}: {exc}"
    if len(files) <= limit:
        raise ValueError(
            f"argument '{flag}' expected image files that can be read {where}, got {len(files)} and none can be read, "
            f"e.g. {first}"
        )
    warnings.warn(
        f"none of the first {limit} of the {len(files)} files {where} can be read (e.g. {first}); the run stops if no "
        f"image it draws can be read"
    )


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


def _normalised(img: Image.Image) -> torch.Tensor:
    arr = (np.asarray(img, dtype=np.float32) / 255.0 - IMAGENET_MEAN) / IMAGENET_STD
    return torch.from_numpy(np.ascontiguousarray(arr.transpose(2, 0, 1)))


def finetune_train_transform(
    img: Image.Image, size: int, rng: np.random.Generator, randaug: Optional[RandAugment] = None, reprob: float = 0.0
) -> torch.Tensor:
    """The published training transform: RandomResizedCrop(size, scale 0.08-1, ratio 3/4-4/3,
    bicubic), horizontal flip, RandAugment (when given), ImageNet mean/std, random erasing with
    probability `reprob` (per-pixel noise, one box). Every draw from `rng`."""
    img = to_rgb(img)
    box = random_resized_crop_box(img.width, img.height, rng, (0.08, 1.0))
    img = img.resize((size, size), Image.BICUBIC, box=box)
    if rng.random() < 0.5:
        img = img.transpose(Image.FLIP_LEFT_RIGHT)
    if randaug is not None:
        img = randaug(img, rng)
    return random_erasing(_normalised(img), rng, reprob)


def eval_transform(img: Image.Image, size: int) -> torch.Tensor:
    """The published validation transform: the short side resized to `size` (bicubic; the long side
    to int(size * long / short)), a centre crop of size x size, ImageNet mean/std."""
    img = to_rgb(img)
    w, h = img.size
    nw, nh = (size, int(size * h / w)) if w <= h else (int(size * w / h), size)
    img = img.resize((nw, nh), Image.BICUBIC)
    top, left = int(round((nh - size) / 2.0)), int(round((nw - size) / 2.0))
    return _normalised(img.crop((left, top, left + size, top + size)))


class LabelledImages(Dataset):
    """(path, label) samples for classification. Training items are addressed by code = epoch * len
    + index and transformed by `finetune_train_transform` with a generator seeded by (seed, epoch,
    index); evaluation items by index, through `eval_transform`. An item whose file cannot be
    decoded is None (warned about once, naming the file; `skip_unreadable_labelled` leaves it out
    of the batch)."""

    def __init__(
        self,
        samples: Sequence[Tuple[str, int]],
        classes: Sequence[str],
        img_size: int,
        train: bool,
        seed: int = 0,
        randaug: Optional[RandAugment] = None,
        reprob: float = 0.0,
    ):
        self.samples, self.classes = list(samples), list(classes)
        self.img_size, self.train, self.seed = img_size, train, seed
        self.randaug, self.reprob = randaug, reprob
        self._warned: set = set()

    def __len__(self) -> int:
        return len(self.samples)

    def read(self, path: str) -> Any:
        """The decoded file at `path`, or an exception (`check_readable`)."""
        return open_image(path)

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
            return finetune_train_transform(img, self.img_size, rng, self.randaug, self.reprob), label
        return eval_transform(img, self.img_size), label


class ClassFolder(LabelledImages):
    """root/<class>/... image files, labels by sorted class name (or the order of `classes`)."""

    def __init__(
        self,
        root: str,
        img_size: int,
        train: bool,
        seed: int = 0,
        classes: Optional[Sequence[str]] = None,
        randaug: Optional[RandAugment] = None,
        reprob: float = 0.0,
    ):
        classes, samples = class_folder_samples(root, classes, _regular_image_files)
        if not samples:
            raise FileNotFoundError(f"no image files under {root}/<class>/")
        super().__init__(samples, classes, img_size, train, seed, randaug, reprob)


def class_folder_samples(
    root: str, classes: Optional[Sequence[str]], files_in: Callable[[str, Sequence[str]], List[str]]
) -> Tuple[List[str], List[Tuple[str, int]]]:
    """(class names, [(path, label)]) of a root/<class>/... folder: labels by sorted class name (or
    the order of `classes`), each class's folders walked in sorted order, `files_in(folder, names)`
    picking the files to keep."""
    if not os.path.isdir(root):
        raise FileNotFoundError(
            f"argument '--data' expected a class folder root/<class>/..., got {root!r} which is not a directory"
        )
    names = list(classes) if classes is not None else sorted(d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d)))
    samples: List[Tuple[str, int]] = []
    for label, name in enumerate(names):
        for dirpath, dirnames, filenames in os.walk(os.path.join(root, name)):
            dirnames.sort()
            samples += [(path, label) for path in files_in(dirpath, filenames)]
    return names, samples


def folder_classes(root: str) -> List[str]:
    """The class names of a root/<class>/ folder: its subfolders, sorted."""
    return sorted(d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d)))


def _listed(names: Sequence[str], n: int = 6) -> str:
    return ", ".join(repr(x) for x in list(names)[:n]) + (f" and {len(names) - n} more" if len(names) > n else "")


def check_classification_data(
    flag: str,
    classes: Sequence[str],
    train: Sequence[Tuple[str, int]],
    val: Sequence[Tuple[str, int]],
    train_where: str,
    val_where: str,
    val_classes: Optional[Sequence[str]] = None,
) -> None:
    """Refuse, before training, data on which a fine-tuning learns nothing or scores itself wrongly
    (a ValueError naming `flag`, what was expected and what came): fewer than two classes (the loss
    is 0 and top-1 100 % whatever the model), a class without a training image (an output nothing
    teaches, or validation images no prediction can match), and validation class folders
    (`val_classes`: the validation folder's own class names) other than training's: a validation
    folder whose name training lacks (`val/A` beside `train/a`, an extra `val/zextra`) would be
    dropped and top-1 taken over the rest."""
    if val_classes is not None and list(val_classes) != list(classes):
        only_val = [c for c in val_classes if c not in classes]
        only_train = [c for c in classes if c not in val_classes]
        raise ValueError(
            f"argument '{flag}' expected the validation class folders {val_where}/<class>/ to be the training ones "
            f"({_listed(classes)}), got {_listed(val_classes)}"
            + (f"; only in {val_where}: {_listed(only_val)}" if only_val else "")
            + (f"; missing from {val_where}: {_listed(only_train)}" if only_train else "")
            + " (class names are compared exactly, case included)"
        )
    if len(classes) < 2:
        raise ValueError(
            f"argument '{flag}' expected at least 2 classes in {train_where}, got {len(classes)}"
            + (f" ({_listed(classes)})" if classes else "")
            + ": with one class the loss is 0 and top-1 100 % whatever the model learns"
        )
    per_class = np.bincount(np.asarray([y for _, y in train], dtype=np.int64), minlength=len(classes))
    empty = [c for c, n in zip(classes, per_class.tolist()) if n == 0]
    if empty:
        in_val = sorted({classes[y] for _, y in val} & set(empty))
        raise ValueError(
            f"argument '{flag}' expected at least one training image of every class in {train_where}, got none of "
            f"{_listed(empty)}"
            + (f" (validation images of {_listed(in_val)} could never be predicted right)" if in_val else "")
            + ": remove the class or add training images"
        )


# ---- published split files -----------------------------------------------------------------------


class Split(NamedTuple):
    classes: List[str]  # class names, index = label
    train: List[Tuple[str, int]]  # (path, label)
    val: List[Tuple[str, int]]


def _split_error(path: str, what: str) -> ValueError:
    return ValueError(
        f"argument '--split' expected a split file {{'train': [{{'image', 'label'}}, ...], 'val': [...], 'categories': {{name: id}}}}, got {path}: {what}"
    )


def read_split(path: str, root: Optional[str] = None) -> Split:
    """A published split file: {"train": [{"image": relative path, "label": int}, ...], "val": [...],
    "categories": {name: id}}. Paths are relative to `root` (the --data folder), or to the file's own
    folder without one. Every image must exist, every label must be a category id, the ids must be
    0..K-1, train and val must not share an image and no image may carry two labels (images are
    compared as the files their paths resolve to, so `x/./0.png`, `x//0.png`, an absolute path or a
    link to one file are one image); else a ValueError naming --split and what is wrong. An image
    listed twice in one part with the same label is kept once, with a warning."""
    try:
        with open(path) as f:
            data = json.load(f)
    except (OSError, ValueError) as exc:
        raise _split_error(path, f"{type(exc).__name__}: {exc}") from exc
    if not isinstance(data, dict) or any(k not in data for k in ("train", "val", "categories")):
        got = sorted(data) if isinstance(data, dict) else type(data).__name__
        raise _split_error(path, f"the keys 'train', 'val' and 'categories' are needed, it has {got}")
    cats = data["categories"]
    if not isinstance(cats, dict) or not cats or not all(isinstance(v, int) and not isinstance(v, bool) for v in cats.values()):
        raise _split_error(path, f"'categories' must map each class name to an integer id, got {cats!r:.200}")
    if sorted(cats.values()) != list(range(len(cats))):
        raise _split_error(path, f"the category ids must be 0..{len(cats) - 1} once each, got {sorted(cats.values())}")
    classes = [name for name, _ in sorted(cats.items(), key=lambda kv: kv[1])]
    base = root if root is not None else os.path.dirname(os.path.abspath(path))
    out: Dict[str, List[Tuple[str, int]]] = {}
    first_seen: Dict[Tuple[int, int], Any] = {}  # each training file -> its index (see _once_each)
    for part in ("train", "val"):
        entries = data[part]
        if not isinstance(entries, list) or not entries:
            raise _split_error(path, f"'{part}' must be a non-empty list of {{'image', 'label'}} entries")
        samples, missing = [], []
        for i, e in enumerate(entries):
            if not isinstance(e, dict) or not isinstance(e.get("image"), str) or not isinstance(e.get("label"), int):
                raise _split_error(path, f"'{part}'[{i}] must be {{'image': str, 'label': int}}, got {e!r:.200}")
            if not 0 <= e["label"] < len(classes):
                raise _split_error(path, f"'{part}'[{i}] has label {e['label']}, not one of the {len(classes)} category ids")
            full = os.path.join(base, e["image"])
            if not os.path.isfile(full):
                missing.append(e["image"])
            samples.append((full, e["label"]))
        if missing:
            more = f" and {len(missing) - 4} more" if len(missing) > 4 else ""
            raise _split_error(path, f"{len(missing)} '{part}' images not found under {base}: {', '.join(missing[:4])}{more}")
        out[part] = _once_each(path, part, entries, samples, classes, first_seen)
    shared = [where[1] for where in first_seen.values() if isinstance(where, tuple)]
    if shared:
        ti, vi = shared[0]
        raise _split_error(
            path,
            f"{len(shared)} images are in both 'train' and 'val' (compared as files, not as written), e.g. "
            f"'train'[{ti}] {data['train'][ti]['image']!r} and 'val'[{vi}] {data['val'][vi]['image']!r}",
        )
    return Split(classes, out["train"], out["val"])


def _file_key(path: str) -> Tuple[int, int]:
    """What makes two paths the same image: the file they resolve to (device and inode), so
    `x/./0.png`, `x//0.png`, an absolute path, a symlink and a hard link to one file are one image."""
    st = os.stat(path)
    return st.st_dev, st.st_ino


def _once_each(
    path: str,
    part: str,
    entries: list,
    samples: List[Tuple[str, int]],
    classes: List[str],
    first_seen: Dict[Tuple[int, int], Any],
) -> List[Tuple[str, int]]:
    """`samples` of one part of a split file with each file once: an image listed again with the
    same label is a duplicate (a warning naming how many and one of them; kept once), with another
    label a conflict (a ValueError naming both entries). `first_seen` maps each file to its first
    train index, then ("both", (train index, val index)) when val lists a training image too."""
    kept: List[Tuple[str, int]] = []
    here: Dict[Tuple[int, int], int] = {}
    dups: List[Tuple[int, int]] = []
    for i, (full, label) in enumerate(samples):
        key = _file_key(full)
        if key in here:
            j = here[key]
            if samples[j][1] != label:
                raise _split_error(
                    path,
                    f"'{part}'[{j}] {entries[j]['image']!r} (label {samples[j][1]}, {classes[samples[j][1]]!r}) and "
                    f"'{part}'[{i}] {entries[i]['image']!r} (label {label}, {classes[label]!r}) are the same file with "
                    f"two labels",
                )
            dups.append((j, i))
            continue
        here[key] = i
        kept.append((full, label))
        if part == "train":
            first_seen[key] = i
        elif key in first_seen:
            first_seen[key] = ("both", (first_seen[key], i))
    if dups:
        j, i = dups[0]
        warnings.warn(
            f"--split {path}: {len(dups)} '{part}' entries list an image already listed with the same label, kept once; "
            f"e.g. '{part}'[{i}] {entries[i]['image']!r} is '{part}'[{j}] {entries[j]['image']!r}"
        )
    return kept


def write_split(path: str, split: Split, root: str) -> None:
    """The split as a published-format JSON file, image paths relative to `root`."""
    rel = lambda samples: [{"image": os.path.relpath(p, root).replace(os.sep, "/"), "label": int(y)} for p, y in samples]
    data = {"train": rel(split.train), "val": rel(split.val), "categories": {c: i for i, c in enumerate(split.classes)}}
    with open(path, "w") as f:
        json.dump(data, f, indent=1)


def split_from_folder(root: str, train_fraction: float, seed: int = 0) -> Split:
    """A published-style split of root/<class>/ images: `train_fraction` of each class (at least
    one image) drawn at random for training, every other image for validation."""
    folder = ClassFolder(root, 16, train=False)
    rng = np.random.default_rng(seed)
    train, val = [], []
    for label in range(len(folder.classes)):
        mine = [s for s in folder.samples if s[1] == label]
        order = rng.permutation(len(mine))
        n = max(1, int(round(train_fraction * len(mine))))
        train += [mine[i] for i in sorted(order[:n])]
        val += [mine[i] for i in sorted(order[n:])]
    return Split(folder.classes, train, val)
