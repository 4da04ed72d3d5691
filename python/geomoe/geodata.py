"""Remote-sensing rasters: GeoTIFF (and every other format GDAL reads) through rasterio, the optional
extra `pip install geomoe-kernels[geo]`; any number of bands and any bit depth (8/16/32-bit
integers, floats).

- Normalisation per band: `(x - mean[b]) / std[b]`, with the means and standard deviations from a
  JSON file `{"mean": [...], "std": [...]}` (one number per band): `--band-stats FILE`, by default
  `<data>/band_stats.json`, which `geomoe stats DIR` computes once over the folder's valid pixels.
- No-data: a pixel is no-data in a band where the file's mask says so (rasterio's `read_masks`:
  the band's nodata value, an internal mask or alpha band, NaN in float rasters). After
  normalisation it is set to 0 (the band's mean), also after the crop is resized: an output pixel
  that draws on a no-data pixel is 0.
- Every file must have the model's band count (`--in-chans`): another count is an error naming the
  file, never a skip. A file that cannot be read is skipped with a warning and counted, as for
  images (`skip_unreadable`).
- The pretraining augmentation is the published one on all bands at once: RandomResizedCrop
  (scale 0.2-1, ratio 3/4-4/3, bicubic) and a horizontal flip, a pure function of (seed, epoch,
  index) as for RGB images.

`as_image_dataset` accepts any torch Dataset whose items are an image tensor [C, H, W] or a dict with
"image" (a torchgeo dataset, say), so it plugs into the pretraining loop."""

from __future__ import annotations

import json
import os
import warnings
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from .data import LabelledImages, class_folder_samples, files_in_subfolders, random_resized_crop_box

RASTER_EXTENSIONS = (".tif", ".tiff", ".jp2", ".img", ".vrt")
BAND_STATS_FILE = "band_stats.json"


class BandCountError(ValueError):
    """A raster whose band count differs from the model's: an error, never a skipped file."""


def _rasterio():
    try:
        import rasterio
        import rasterio.errors  # noqa: F401  (NotGeoreferencedWarning)
    except ImportError as exc:
        raise ImportError(
            "reading GeoTIFF and other rasters needs rasterio: pip install 'geomoe-kernels[geo]' (or pip install rasterio)"
        ) from exc
    return rasterio


def read_raster(path: str) -> Tuple[np.ndarray, np.ndarray]:
    """(values float32 [bands, H, W], valid bool [bands, H, W]) of the raster at `path`."""
    rasterio = _rasterio()
    if not os.path.isfile(path):
        raise OSError(f"not a regular file: {path}")
    with warnings.catch_warnings():  # a tile without a geotransform reads the same
        warnings.simplefilter("ignore", rasterio.errors.NotGeoreferencedWarning)
        with rasterio.open(path) as src:
            values = src.read().astype(np.float32)
            valid = src.read_masks() > 0
    valid &= np.isfinite(values)
    return values, valid


def _read_or_skip(path: str, index: int, warned: set) -> Optional[Tuple[np.ndarray, np.ndarray]]:
    """read_raster, or None for a file that cannot be read (warned once per index in `warned`)."""
    try:
        return read_raster(path)
    except Exception as exc:
        if index not in warned:
            warned.add(index)
            warnings.warn(f"skipping unreadable raster {path}: {type(exc).__name__}: {exc}")
        return None


def raster_files(root: str) -> List[str]:
    """Every raster file under root/<subfolder>/ (recursively, sorted), the image-folder layout."""
    files = files_in_subfolders(
        root, lambda dirpath, names: [os.path.join(dirpath, f) for f in sorted(names) if f.lower().endswith(RASTER_EXTENSIONS)]
    )
    if not files:
        raise FileNotFoundError(f"no raster files ({', '.join(RASTER_EXTENSIONS)}) under {root}/<subfolder>/")
    return files


def band_stats(root: str, out: Optional[str] = None) -> Dict[str, Any]:
    """Per-band mean and standard deviation over every valid pixel of the rasters under root
    (float64 sums, one pass); written to `out` (default root/band_stats.json) atomically. Files that
    cannot be read are skipped and counted; a band count other than the first file's is an error."""
    files = raster_files(root)
    n = s = ss = None
    bands, skipped = None, 0
    for path in files:
        try:
            values, valid = read_raster(path)
        except Exception as exc:
            warnings.warn(f"skipping unreadable raster {path}: {type(exc).__name__}: {exc}")
            skipped += 1
            continue
        if bands is None:
            bands = values.shape[0]
            n, s, ss = np.zeros(bands), np.zeros(bands), np.zeros(bands)
        elif values.shape[0] != bands:
            raise BandCountError(f"{path} has {values.shape[0]} bands, expected {bands} like the files before it")
        v = np.where(valid, values, 0).astype(np.float64)
        n += valid.reshape(bands, -1).sum(1)
        s += v.reshape(bands, -1).sum(1)
        ss += (v * v).reshape(bands, -1).sum(1)
    if bands is None or n is None or s is None or ss is None:
        raise FileNotFoundError(f"no readable raster under {root}/<subfolder>/ ({skipped} unreadable)")
    if (n == 0).any():
        raise ValueError(f"band(s) {np.flatnonzero(n == 0).tolist()} have no valid pixel in any raster under {root}")
    mean = s / n
    std = np.sqrt(np.maximum(ss / n - mean * mean, 0.0))
    stats = {
        "mean": mean.tolist(),
        "std": np.where(std > 0, std, 1.0).tolist(),
        "bands": int(bands),
        "files": len(files) - skipped,
        "skipped": skipped,
        "pixels": n.astype(np.int64).tolist(),
    }
    out = out or os.path.join(root, BAND_STATS_FILE)
    tmp = out + ".tmp"
    with open(tmp, "w") as f:
        json.dump(stats, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, out)
    return stats


def load_band_stats(path: str, bands: int) -> Tuple[np.ndarray, np.ndarray]:
    """(mean, std) float32 [bands] from a JSON file {"mean": [...], "std": [...]}; clear errors."""
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f'argument \'--band-stats\' expected a JSON file with per-band "mean" and "std", got {path!r}, which does '
            f"not exist: compute it once with `geomoe stats DATA_DIR` (writes DATA_DIR/{BAND_STATS_FILE})"
        )
    with open(path) as f:
        d = json.load(f)
    try:
        mean, std = np.asarray(d["mean"], dtype=np.float32), np.asarray(d["std"], dtype=np.float32)
    except (KeyError, TypeError, ValueError) as exc:
        raise ValueError(f'argument \'--band-stats\' expected {{"mean": [...], "std": [...]}} in {path}, got {exc!r}') from exc
    if mean.shape != (bands,) or std.shape != (bands,):
        raise BandCountError(
            f"argument '--band-stats' expected {bands} means and standard deviations (--in-chans {bands}), got "
            f"{mean.size} and {std.size} in {path}"
        )
    if not (np.isfinite(mean).all() and np.isfinite(std).all() and (std > 0).all()):
        raise ValueError(f"argument '--band-stats' expected finite means and positive standard deviations, got {path}")
    return mean, std


def raster_transform(
    values: np.ndarray,
    valid: np.ndarray,
    mean: np.ndarray,
    std: np.ndarray,
    size: int,
    rng: np.random.Generator,
    scale=(0.2, 1.0),
) -> torch.Tensor:
    """[C, H, W] raw values -> normalised, no-data at 0, random resized crop (bicubic) and random
    flip -> float tensor [C, size, size]."""
    x = (values - mean[:, None, None]) / std[:, None, None]
    x = np.where(valid, x, 0.0).astype(np.float32)
    C, H, W = x.shape
    left, top, right, bottom = random_resized_crop_box(W, H, rng, scale)
    crop = torch.from_numpy(np.ascontiguousarray(x[:, top:bottom, left:right]))[None]
    ok = torch.from_numpy(np.ascontiguousarray(valid[:, top:bottom, left:right])).float()[None]
    out = F.interpolate(crop, size=(size, size), mode="bicubic", align_corners=False)[0]
    # an output pixel that draws on any no-data pixel is no-data (bilinear footprint: the bicubic one's core)
    ok = F.interpolate(ok, size=(size, size), mode="bilinear", align_corners=False)[0] > 1 - 1e-6
    out = torch.where(ok, out, torch.zeros(()))
    if rng.random() < 0.5:
        out = out.flip(-1)
    return out.contiguous()


class RasterFolder(Dataset):
    """Every raster under root/<subfolder>/, as [in_chans, img_size, img_size] normalised tensors.
    Items are addressed like `ImageFolder`'s (code = epoch * len + index); an unreadable file is
    None (warned once, counted by `skip_unreadable`); a band-count mismatch raises BandCountError."""

    def __init__(self, root: str, img_size: int, seed: int, in_chans: int, stats_file: Optional[str] = None):
        _rasterio()
        self.files = raster_files(root)
        self.img_size, self.seed, self.in_chans = img_size, seed, in_chans
        self.stats_file = stats_file or os.path.join(root, BAND_STATS_FILE)
        self.mean, self.std = load_band_stats(self.stats_file, in_chans)
        self._warned: set = set()
        self._check_bands(0)  # the first file now: a wrong --in-chans fails before training starts

    def __len__(self) -> int:
        return len(self.files)

    def _check_bands(self, index: int) -> None:
        path = self.files[index]
        try:
            rasterio = _rasterio()
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", rasterio.errors.NotGeoreferencedWarning)
                with rasterio.open(path) as src:
                    bands = src.count
        except Exception:
            return  # unreadable: skipped when its turn comes
        if bands != self.in_chans:
            raise BandCountError(
                f"raster {path} has {bands} bands, expected {self.in_chans} (--in-chans): give --in-chans {bands}, "
                f"or keep only {self.in_chans}-band files under the data folder"
            )

    def __getitem__(self, code: int) -> Optional[torch.Tensor]:
        epoch, index = divmod(int(code), len(self.files))
        path = self.files[index]
        read = _read_or_skip(path, index, self._warned)
        if read is None:
            return None
        values, valid = read
        if values.shape[0] != self.in_chans:
            raise BandCountError(f"raster {path} has {values.shape[0]} bands, expected {self.in_chans} (--in-chans)")
        rng = np.random.default_rng([self.seed, epoch, index, 1])
        return raster_transform(values, valid, self.mean, self.std, self.img_size, rng)


def raster_eval_transform(values: np.ndarray, valid: np.ndarray, mean: np.ndarray, std: np.ndarray, size: int) -> torch.Tensor:
    """The validation transform for rasters, as `data.eval_transform` for images: the short side
    resized to `size` (bicubic), a centre crop of size x size; normalised per band, no-data at 0."""
    x = (values - mean[:, None, None]) / std[:, None, None]
    x = torch.from_numpy(np.where(valid, x, 0.0).astype(np.float32))[None]
    ok = torch.from_numpy(valid.astype(np.float32))[None]
    H, W = x.shape[-2:]
    nh, nw = (int(size * H / W), size) if W <= H else (size, int(size * W / H))
    x = F.interpolate(x, size=(nh, nw), mode="bicubic", align_corners=False)[0]
    ok = F.interpolate(ok, size=(nh, nw), mode="bilinear", align_corners=False)[0] > 1 - 1e-6
    top, left = int(round((nh - size) / 2.0)), int(round((nw - size) / 2.0))
    crop = torch.where(ok, x, torch.zeros(()))[:, top : top + size, left : left + size]
    return crop.contiguous()


class RasterClassFolder(LabelledImages):
    """Fine-tuning on rasters: root/<class>/... raster files (labels by sorted class name, or the
    order of `classes`), normalised per band with the band statistics, no-data at 0. Training
    items: the fine-tuning crop (RandomResizedCrop scale 0.08-1, bicubic) and flip on all bands, then
    random erasing with probability `reprob` (RandAugment is for 8-bit RGB images and does not
    apply), every draw from (seed, epoch, index); evaluation items: `raster_eval_transform`. An
    unreadable file is None (warned once, counted); another band count than `in_chans` raises
    BandCountError."""

    def __init__(
        self,
        root: str,
        img_size: int,
        train: bool,
        in_chans: int,
        stats: Tuple[np.ndarray, np.ndarray],
        seed: int = 0,
        classes: Optional[Sequence[str]] = None,
        reprob: float = 0.0,
    ):
        _rasterio()
        rasters = lambda folder, names: [os.path.join(folder, f) for f in sorted(names) if f.lower().endswith(RASTER_EXTENSIONS)]
        classes, samples = class_folder_samples(root, classes, rasters)
        if not samples:
            raise FileNotFoundError(
                f"argument '--data' expected raster files ({', '.join(RASTER_EXTENSIONS)}) under {root}/<class>/, got none"
            )
        super().__init__(samples, classes, img_size, train, seed, None, reprob)
        self.in_chans, (self.mean, self.std) = in_chans, stats

    def __getitem__(self, code: int):
        from .augment import random_erasing

        epoch, index = divmod(int(code), len(self.samples))
        path, label = self.samples[index]
        read = _read_or_skip(path, index, self._warned)
        if read is None:
            return None
        values, valid = read
        if values.shape[0] != self.in_chans:
            raise BandCountError(
                f"raster {path} has {values.shape[0]} bands, expected {self.in_chans} (--in-chans): give --in-chans "
                f"{values.shape[0]}, or keep only {self.in_chans}-band files under the data folder"
            )
        if not self.train:
            return raster_eval_transform(values, valid, self.mean, self.std, self.img_size), label
        rng = np.random.default_rng([self.seed, epoch, index, 2])
        img = raster_transform(values, valid, self.mean, self.std, self.img_size, rng, scale=(0.08, 1.0))
        return random_erasing(img, rng, self.reprob), label


class ImageDataset(Dataset):
    """Any Dataset whose items are an image tensor [C, H, W] or a dict (or tuple) holding one under
    "image" (first element for a tuple), e.g. a torchgeo dataset, as the pretraining loop wants it:
    item codes epoch * len + index map to index; the image is checked against the model's bands and
    size (resize and normalise it in the dataset's own transforms); an item that raises is skipped
    and counted, except a band-count or size mismatch, which is an error."""

    def __init__(self, dataset: Sequence, in_chans: int, img_size: int):
        self.dataset, self.in_chans, self.img_size = dataset, in_chans, img_size
        self._warned: set = set()

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, code: int) -> Optional[torch.Tensor]:
        index = int(code) % len(self.dataset)
        try:
            item = self.dataset[index]
        except Exception as exc:
            if index not in self._warned:
                self._warned.add(index)
                warnings.warn(f"skipping item {index} of {type(self.dataset).__name__}: {type(exc).__name__}: {exc}")
            return None
        if isinstance(item, dict):
            if "image" not in item:
                raise TypeError(f"dataset item {index} expected a tensor or a dict with 'image', got keys {sorted(item)}")
            item = item["image"]
        elif isinstance(item, (tuple, list)):
            item = item[0]
        img = torch.as_tensor(item).float()
        want = (self.in_chans, self.img_size, self.img_size)
        if tuple(img.shape) != want:
            err = BandCountError if img.dim() == 3 and img.shape[0] != self.in_chans else ValueError
            raise err(f"dataset item {index} expected an image tensor of shape {list(want)}, got {list(img.shape)}")
        return img


def as_image_dataset(dataset: Any, in_chans: int, img_size: int) -> Dataset:
    """A geomoe dataset as it is; any other Dataset through `ImageDataset`."""
    from .data import _EpochIndexed

    if isinstance(dataset, (_EpochIndexed, RasterFolder, ImageDataset)):
        return dataset
    return ImageDataset(dataset, in_chans, img_size)


# ---- adapting the first patch embedding to another band count ------------------------------------


def adapt_in_chans(weight: torch.Tensor, in_chans: int) -> torch.Tensor:
    """The first patch embedding's conv weight [out, c, k, k] (RGB: c = 3) for `in_chans` bands:
    every band gets the mean of the c input kernels, scaled by c / in_chans. So an image whose bands
    all hold the same value v gives the same response as the RGB model on a grey image of value v
    (the sum over bands is unchanged), whatever the band order. Same band count: unchanged."""
    if weight.dim() != 4:
        raise ValueError(f"argument 'weight' expected a conv weight [out, in, k, k], got shape {list(weight.shape)}")
    c = weight.shape[1]
    if c == in_chans:
        return weight
    return (weight.mean(dim=1, keepdim=True) * (c / in_chans)).expand(-1, in_chans, -1, -1).contiguous()


# the first patch embedding's weight in each model (our key layout and the original one)
FIRST_EMBED_KEYS = ("patch_embed1.proj.weight", "patch_embed.proj.weight")


def adapt_state_dict_in_chans(state: Dict[str, torch.Tensor], in_chans: int) -> List[str]:
    """In place: the first patch embedding adapted to `in_chans` (`adapt_in_chans`); the decoder's
    pixel prediction (`decoder_pred`, 16*16*bands outputs) cannot carry over to another band count
    and is dropped (the model keeps its initial one). Returns what it changed, for the log."""
    notes = []
    for key in FIRST_EMBED_KEYS:
        if key in state and state[key].dim() == 4 and state[key].shape[1] != in_chans:
            notes.append(f"{key}: {state[key].shape[1]} -> {in_chans} bands (mean kernel x {state[key].shape[1]}/{in_chans})")
            state[key] = adapt_in_chans(state[key], in_chans)
    for key in ("decoder_pred.weight", "decoder_pred.bias"):
        if key in state and notes:
            notes.append(f"{key}: dropped (another band count), kept at its initial values")
            del state[key]
    return notes
