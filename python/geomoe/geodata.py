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
- Alpha: the file's declared colour interpretation decides. A band declared alpha (GDAL writes
  every 4-band uint8 GeoTIFF so, rasterio's defaults included) is the other bands' no-data mask and
  not a band (`--alpha-as-mask`, the default), or with `--alpha-as-data` a band like the others that
  masks nothing (4 real bands written with the defaults).
- Every file must have the model's band count (`--in-chans`): another count is an error naming the
  file, never a skip. A file that cannot be read is skipped with a warning and counted, as for
  images (`skip_unreadable`). A file whose header declares more than `--max-raster-pixels` values
  (bands x height x width) is an error before a pixel is read (RasterSizeError).
- The pretraining augmentation is the published one on all bands at once: RandomResizedCrop
  (scale 0.2-1, ratio 3/4-4/3, bicubic) and a horizontal flip, a pure function of (seed, epoch,
  index) as for RGB images; only the crop's window is read from the file.

`as_image_dataset` accepts any torch Dataset whose items are an image tensor [C, H, W] or a dict with
"image" (a torchgeo dataset, say), so it plugs into the pretraining loop."""

from __future__ import annotations

import contextlib
import json
import os
import warnings
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

# BandCountError and RasterSizeError are defined in data, beside check_readable, which lets them through
from .data import (
    BandCountError,
    LabelledImages,
    RasterSizeError,
    class_folder_samples,
    files_in_subfolders,
    random_resized_crop_box,
)

RASTER_EXTENSIONS = (".tif", ".tiff", ".jp2", ".img", ".vrt")
BAND_STATS_FILE = "band_stats.json"


def _rasterio():
    try:
        import rasterio
        import rasterio.errors  # noqa: F401  (NotGeoreferencedWarning)
    except ImportError as exc:
        raise ImportError(
            "reading GeoTIFF and other rasters needs rasterio: pip install 'geomoe-kernels[geo]' (or pip install rasterio)"
        ) from exc
    return rasterio


ALPHA_MODES = ("mask", "data")
# --max-raster-pixels: the values (bands x height x width) one raster may declare. 2**27 is 4 bands
# of 5792 x 5792, 0.5 GiB once read as float32; larger scenes want cutting into tiles.
MAX_RASTER_PIXELS = 2**27


@contextlib.contextmanager
def _opened(path: str):
    """The raster at `path` opened (a regular file only); a tile without a geotransform reads the same."""
    rasterio = _rasterio()
    if not os.path.isfile(path):
        raise OSError(f"not a regular file: {path}")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", rasterio.errors.NotGeoreferencedWarning)
        with rasterio.open(path) as src:
            yield src


def alpha_bands(src) -> List[int]:
    """The bands (1-based) that an open raster declares alpha in its colour interpretation (GDAL
    writes a 4-band uint8 GeoTIFF, rasterio's defaults included, with band 4 as alpha)."""
    from rasterio.enums import ColorInterp

    return [i + 1 for i, ci in enumerate(src.colorinterp) if ci == ColorInterp.alpha]


def _data_bands(src, alpha: str) -> List[int]:
    """The bands (1-based) read as data: with alpha 'mask' the declared alpha bands are left out
    (they mask the others), with 'data' every band is data."""
    skip = set(alpha_bands(src)) if alpha == "mask" else set()
    return [b for b in range(1, src.count + 1) if b not in skip]


def _alpha_note(alpha_idx: Sequence[int], alpha: str) -> str:
    if not alpha_idx:
        return ""
    which = ", ".join(str(b) for b in alpha_idx)
    if alpha == "mask":
        return f" (band {which} declared alpha: read as the no-data mask, not as a band; --alpha-as-data reads it as one)"
    return f" (band {which} declared alpha, read as a band: --alpha-as-data)"


def check_raster_size(src, path: str, max_pixels: int) -> None:
    """RasterSizeError when the open raster's header declares more than `max_pixels` values
    (bands x height x width): checked before anything is read (a sparse 200 KB GeoTIFF can declare
    gigabytes)."""
    n = src.count * src.height * src.width
    if n > max_pixels:
        itemsize = max(np.dtype(d).itemsize for d in src.dtypes)
        raise RasterSizeError(
            f"argument '--max-raster-pixels' expected rasters of at most {max_pixels:,} values (bands x height x "
            f"width), got {path} declaring {src.count} x {src.height} x {src.width} = {n:,} ({n * itemsize / 2**30:.1f} "
            f"GiB as {src.dtypes[0]}): cut it into tiles, or raise the limit"
        )


def read_raster(
    path: str,
    alpha: str = "mask",
    max_pixels: int = MAX_RASTER_PIXELS,
    crop: Optional[Callable[[int, int], Tuple[int, int, int, int]]] = None,
    bands: Optional[int] = None,
) -> Tuple[np.ndarray, np.ndarray]:
    """(values float32 [bands, H, W], valid bool [bands, H, W]) of the raster at `path`.

    From the header, before any pixel is read: the declared size against `max_pixels`
    (RasterSizeError), the data bands per the declared colour interpretation and `alpha`, their
    count against `bands` when given (BandCountError). alpha 'mask': a band declared alpha is not
    data, it marks the other bands' no-data (rasterio's read_masks); 'data': every band is data and
    an alpha band masks nothing (no-data from nodata values and internal masks only). With `crop`
    (width, height) -> (left, top, right, bottom) only that window is read."""
    from rasterio.enums import MaskFlags
    from rasterio.windows import Window

    with _opened(path) as src:
        check_raster_size(src, path, max_pixels)
        indexes = _data_bands(src, alpha)
        if bands is not None and len(indexes) != bands:
            raise BandCountError(
                f"raster {path} has {len(indexes)} bands{_alpha_note(alpha_bands(src), alpha)}, expected {bands} "
                f"(--in-chans): give --in-chans {len(indexes)}, or keep only {bands}-band files under the data folder"
            )
        window = None
        if crop is not None:
            left, top, right, bottom = crop(src.width, src.height)
            window = Window(left, top, right - left, bottom - top)
        values = src.read(indexes, window=window).astype(np.float32)
        if alpha == "mask":
            valid = src.read_masks(indexes, window=window) > 0
        else:
            valid = np.ones(values.shape, dtype=bool)
            for k, b in enumerate(indexes):
                if MaskFlags.alpha not in src.mask_flag_enums[b - 1]:  # a mask from an alpha band does not apply
                    valid[k] = src.read_masks(b, window=window) > 0
    valid &= np.isfinite(values)
    return values, valid


def _read_or_skip(path: str, index: int, warned: set, **kw) -> Optional[Tuple[np.ndarray, np.ndarray]]:
    """read_raster, or None for a file that cannot be read (warned once per index in `warned`); a
    band count or size over the limit raises."""
    try:
        return read_raster(path, **kw)
    except (BandCountError, RasterSizeError):
        raise
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


def band_stats(root: str, out: Optional[str] = None, alpha: str = "mask", max_pixels: int = MAX_RASTER_PIXELS) -> Dict[str, Any]:
    """Per-band mean and standard deviation over every valid pixel of the rasters under root
    (float64 sums, one pass); written to `out` (default root/band_stats.json) atomically. Files that
    cannot be read are skipped and counted; a band count other than the first file's is an error.
    Bands declared alpha are the no-data mask, not bands, unless alpha='data' (`read_raster`); the
    result says which bands were declared alpha ("alpha_bands", 1-based) in how many files."""
    files = raster_files(root)
    n = s = ss = None
    bands, skipped = None, 0
    alpha_idx: set = set()
    alpha_files = 0
    for path in files:
        try:
            with _opened(path) as src:
                declared = alpha_bands(src)
            values, valid = read_raster(path, alpha, max_pixels)
        except RasterSizeError:
            raise
        except Exception as exc:
            warnings.warn(f"skipping unreadable raster {path}: {type(exc).__name__}: {exc}")
            skipped += 1
            continue
        alpha_idx.update(declared)
        alpha_files += bool(declared)
        if bands is None:
            bands = values.shape[0]
            n, s, ss = np.zeros(bands), np.zeros(bands), np.zeros(bands)
        elif values.shape[0] != bands:
            raise BandCountError(
                f"{path} has {values.shape[0]} bands{_alpha_note(declared, alpha)}, expected {bands} like the files before it"
            )
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
        # a constant band (or one constant to float32 precision) is left unscaled: see load_band_stats
        "std": np.where(std >= std_floor(mean), std, 1.0).tolist(),
        "bands": int(bands),
        "files": len(files) - skipped,
        "skipped": skipped,
        "pixels": n.astype(np.int64).tolist(),
        "alpha": alpha,
        "alpha_bands": sorted(alpha_idx),
        "alpha_files": alpha_files,
    }
    out = out or os.path.join(root, BAND_STATS_FILE)
    tmp = out + ".tmp"
    with open(tmp, "w") as f:
        json.dump(stats, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, out)
    return stats


def std_floor(mean: np.ndarray) -> np.ndarray:
    """The smallest standard deviation accepted per band: a millionth of |mean|, and 1e-9. Below it,
    normalising makes values a million times their spread or more (a std of 1e-30 turns every step
    non-finite), and a band that varies less than that about its mean is constant to within about
    ten float32 roundings of the mean."""
    return 1e-6 * np.maximum(np.abs(np.asarray(mean, dtype=np.float64)), 1e-3)


def load_band_stats(path: str, bands: int) -> Tuple[np.ndarray, np.ndarray]:
    """(mean, std) float32 [bands] from a JSON file {"mean": [...], "std": [...]}; errors naming
    --band-stats and the file: not JSON, not that shape, another band count, a mean that is not
    finite, a standard deviation that is not finite or below `std_floor`."""
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f'argument \'--band-stats\' expected a JSON file with per-band "mean" and "std", got {path!r}, which does '
            f"not exist: compute it once with `geomoe stats DATA_DIR` (writes DATA_DIR/{BAND_STATS_FILE})"
        )
    try:
        with open(path) as f:
            d = json.load(f)
    except (OSError, ValueError) as exc:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise ValueError(
            f'argument \'--band-stats\' expected a JSON file {{"mean": [...], "std": [...]}}, got {path}: '
            f"{type(exc).__name__}: {exc}"
        ) from exc
    try:
        mean, std = np.asarray(d["mean"], dtype=np.float64), np.asarray(d["std"], dtype=np.float64)
    except (KeyError, TypeError, ValueError, IndexError) as exc:
        raise ValueError(f'argument \'--band-stats\' expected {{"mean": [...], "std": [...]}} in {path}, got {exc!r}') from exc
    if mean.shape != (bands,) or std.shape != (bands,):
        raise BandCountError(
            f"argument '--band-stats' expected {bands} means and standard deviations (--in-chans {bands}), got "
            f"{mean.size} and {std.size} in {path}"
            + (
                f" (written by `geomoe stats` reading the declared alpha band {d['alpha_bands']} as the no-data mask: "
                f"`geomoe stats --alpha-as-data` and --alpha-as-data here read it as a band)"
                if isinstance(d, dict) and d.get("alpha") == "mask" and d.get("alpha_bands")
                else ""
            )
        )
    finite32 = lambda x: np.isfinite(x) & (np.abs(x) <= np.finfo(np.float32).max)
    if not finite32(mean).all():
        raise ValueError(f"argument '--band-stats' expected finite float32 means, got {mean.tolist()} in {path}")
    low = ~finite32(std) | (std < std_floor(mean))
    if low.any():
        b = int(np.flatnonzero(low)[0])
        raise ValueError(
            f"argument '--band-stats' expected finite standard deviations of at least a millionth of |mean| and 1e-9, "
            f"got std {float(std[b])!r} for band {b + 1} (mean {float(mean[b])!r}) in {path}"
        )
    return mean.astype(np.float32), std.astype(np.float32)


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
    flip -> float tensor [C, size, size]. The same as reading only the crop's window
    (`read_raster(crop=...)` with the box drawn from `rng`) and `resized_window`, which is how the
    datasets do it."""
    C, H, W = values.shape
    left, top, right, bottom = random_resized_crop_box(W, H, rng, scale)
    return resized_window(values[:, top:bottom, left:right], valid[:, top:bottom, left:right], mean, std, size, rng)


def resized_window(
    values: np.ndarray, valid: np.ndarray, mean: np.ndarray, std: np.ndarray, size: int, rng: np.random.Generator
) -> torch.Tensor:
    """A crop window's raw values [C, h, w] -> normalised, no-data at 0, resized to size x size
    (bicubic), flipped at random -> float tensor [C, size, size]."""
    x = (values - mean[:, None, None]) / std[:, None, None]
    crop = torch.from_numpy(np.ascontiguousarray(np.where(valid, x, 0.0).astype(np.float32)))[None]
    ok = torch.from_numpy(np.ascontiguousarray(valid)).float()[None]
    out = F.interpolate(crop, size=(size, size), mode="bicubic", align_corners=False)[0]
    # an output pixel that draws on any no-data pixel is no-data (bilinear footprint: the bicubic one's core)
    ok = F.interpolate(ok, size=(size, size), mode="bilinear", align_corners=False)[0] > 1 - 1e-6
    out = torch.where(ok, out, torch.zeros(()))
    if rng.random() < 0.5:
        out = out.flip(-1)
    return out.contiguous()


def _cropper(rng: np.random.Generator, scale) -> Callable[[int, int], Tuple[int, int, int, int]]:
    return lambda width, height: random_resized_crop_box(width, height, rng, scale)


class RasterFolder(Dataset):
    """Every raster under root/<subfolder>/, as [in_chans, img_size, img_size] normalised tensors.
    Items are addressed like `ImageFolder`'s (code = epoch * len + index); only the crop's window is
    read. An unreadable file is None (warned once, counted by `skip_unreadable`); a band-count
    mismatch raises BandCountError, a raster declaring more than `max_pixels` values
    RasterSizeError. Bands declared alpha are masks, not data, unless alpha='data' (`read_raster`)."""

    def __init__(
        self,
        root: str,
        img_size: int,
        seed: int,
        in_chans: int,
        stats_file: Optional[str] = None,
        alpha: str = "mask",
        max_pixels: int = MAX_RASTER_PIXELS,
    ):
        _rasterio()
        self.files = raster_files(root)
        self.img_size, self.seed, self.in_chans = img_size, seed, in_chans
        self.alpha, self.max_pixels = alpha, max_pixels
        self.stats_file = stats_file or os.path.join(root, BAND_STATS_FILE)
        self.mean, self.std = load_band_stats(self.stats_file, in_chans)
        self._warned: set = set()
        self._check_header(0)  # the first file now: a wrong --in-chans fails before training starts

    def __len__(self) -> int:
        return len(self.files)

    def read(self, path: str, crop=None) -> Tuple[np.ndarray, np.ndarray]:
        """`read_raster` with this dataset's alpha rule, size limit and band count."""
        return read_raster(path, self.alpha, self.max_pixels, crop, self.in_chans)

    def _check_header(self, index: int) -> None:
        """The band count and size of file `index` from its header (nothing read); unreadable: skipped later."""
        path = self.files[index]
        try:
            with _opened(path) as src:
                alpha_idx, bands = alpha_bands(src), len(_data_bands(src, self.alpha))
                check_raster_size(src, path, self.max_pixels)
        except RasterSizeError:
            raise
        except Exception:
            return
        if bands != self.in_chans:
            raise BandCountError(
                f"raster {path} has {bands} bands{_alpha_note(alpha_idx, self.alpha)}, expected {self.in_chans} "
                f"(--in-chans): give --in-chans {bands}, or keep only {self.in_chans}-band files under the data folder"
            )

    def __getitem__(self, code: int) -> Optional[torch.Tensor]:
        epoch, index = divmod(int(code), len(self.files))
        path = self.files[index]
        rng = np.random.default_rng([self.seed, epoch, index, 1])
        read = _read_or_skip(
            path,
            index,
            self._warned,
            alpha=self.alpha,
            max_pixels=self.max_pixels,
            crop=_cropper(rng, (0.2, 1.0)),
            bands=self.in_chans,
        )
        if read is None:
            return None
        return resized_window(*read, self.mean, self.std, self.img_size, rng)


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
        alpha: str = "mask",
        max_pixels: int = MAX_RASTER_PIXELS,
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
        self.alpha, self.max_pixels = alpha, max_pixels

    def read(self, path: str) -> Tuple[np.ndarray, np.ndarray]:
        """`read_raster` with this dataset's alpha rule, size limit and band count."""
        return read_raster(path, self.alpha, self.max_pixels, bands=self.in_chans)

    def __getitem__(self, code: int):
        from .augment import random_erasing

        epoch, index = divmod(int(code), len(self.samples))
        path, label = self.samples[index]
        rng = np.random.default_rng([self.seed, epoch, index, 2])
        # training reads only the crop's window; validation resizes the whole raster, so reads it all
        crop = _cropper(rng, (0.08, 1.0)) if self.train else None
        kw = dict(alpha=self.alpha, max_pixels=self.max_pixels, crop=crop, bands=self.in_chans)
        read = _read_or_skip(path, index, self._warned, **kw)
        if read is None:
            return None
        if not self.train:
            return raster_eval_transform(*read, self.mean, self.std, self.img_size), label
        img = resized_window(*read, self.mean, self.std, self.img_size, rng)
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
