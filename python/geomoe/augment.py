"""The published fine-tuning augmentations, written here (no timm): RandAugment in the form the
published code asks for, `rand-m9-mstd0.5-inc1`, and random erasing with per-pixel noise.

Every random draw comes from the generator passed in, which the dataset seeds from (seed, epoch,
index): an image's augmentation is a pure function of those three numbers, so a resumed run sees
exactly the images a straight run would, with any number of loader workers.

RandAugment (`rand-m{M}[-n{N}][-mstd{S}][-inc{0|1}]`): for each image, N operations (default 2)
drawn with replacement from the operation set; each is applied with probability 1/2 at a magnitude
drawn from a normal distribution around M with std S (clipped to [0, 10]). With inc1 the operation
set is the "increasing" one, where a larger magnitude always means a stronger change:
AutoContrast, Equalize, Invert, Rotate (up to 30 degrees), Posterize (keep 4 - int(0.4 m) bits),
Solarize (threshold 256 - int(25.6 m)), SolarizeAdd (add int(11 m) below 128), Color, Contrast,
Brightness and Sharpness (factor 1 +- 0.09 m, at least 0.1), ShearX, ShearY (up to 0.3), TranslateX,
TranslateY (up to 45 % of the side); the sign of every signed operation is a coin flip. inc0 takes
the original set, where the four enhancements use the factor 0.18 m + 0.1, Posterize keeps int(0.4 m)
bits and Solarize's threshold is int(25.6 m). Geometric operations resample bicubically and fill
with the ImageNet mean colour. These are PIL's operations on the 8-bit image, the same ones the
published pipeline applies.

Random erasing (p, per-pixel): with probability p, one box of 2-33 % of the image's area and aspect
ratio 0.3-3.3 (log-uniform; up to ten tries to fit) is replaced by standard normal noise, after
normalisation."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Tuple

import numpy as np
import torch
from PIL import Image, ImageEnhance, ImageOps

_MAX_LEVEL = 10.0
# the ImageNet mean as 8-bit RGB: what geometric operations fill uncovered pixels with
FILL = (124, 116, 104)


def _signed(v: float, rng: np.random.Generator) -> float:
    return -v if rng.random() > 0.5 else v


def _affine(img: Image.Image, matrix: Tuple[float, ...]) -> Image.Image:
    return img.transform(img.size, Image.AFFINE, matrix, resample=Image.BICUBIC, fillcolor=FILL)


def _solarize_add(img: Image.Image, add: int, threshold: int = 128) -> Image.Image:
    lut = [min(255, i + add) if i < threshold else i for i in range(256)]
    return img.point(lut * 3)


def _posterize(img: Image.Image, bits: int) -> Image.Image:
    """Keep the `bits` high bits of every channel (0 bits: black, which PIL's posterize refuses)."""
    if bits >= 8:
        return img
    mask = ~(2 ** (8 - bits) - 1) & 0xFF
    return img.point([i & mask for i in range(256)] * 3)


def _enhance_increasing(m: float, rng: np.random.Generator) -> float:
    return max(0.1, 1.0 + _signed(m / _MAX_LEVEL * 0.9, rng))


def _enhance(m: float, rng: np.random.Generator) -> float:
    return m / _MAX_LEVEL * 1.8 + 0.1


# name -> (operation(img, arg), magnitude -> arg); arg None for operations without one
_Op = Tuple[Callable[..., Image.Image], Optional[Callable[[float, np.random.Generator], float]]]
_ENHANCERS = {"Color": ImageEnhance.Color, "Contrast": ImageEnhance.Contrast, "Brightness": ImageEnhance.Brightness}
_ENHANCERS["Sharpness"] = ImageEnhance.Sharpness

OPS: Dict[str, _Op] = {
    "AutoContrast": (lambda img, _: ImageOps.autocontrast(img), None),
    "Equalize": (lambda img, _: ImageOps.equalize(img), None),
    "Invert": (lambda img, _: ImageOps.invert(img), None),
    "Rotate": (
        lambda img, deg: img.rotate(deg, resample=Image.BICUBIC, fillcolor=FILL),
        lambda m, rng: _signed(m / _MAX_LEVEL * 30.0, rng),
    ),
    "Posterize": (lambda img, bits: _posterize(img, int(bits)), lambda m, rng: int(m / _MAX_LEVEL * 4)),
    "PosterizeIncreasing": (lambda img, bits: _posterize(img, int(bits)), lambda m, rng: 4 - int(m / _MAX_LEVEL * 4)),
    "Solarize": (lambda img, t: ImageOps.solarize(img, int(t)), lambda m, rng: int(m / _MAX_LEVEL * 256)),
    "SolarizeIncreasing": (lambda img, t: ImageOps.solarize(img, int(t)), lambda m, rng: 256 - int(m / _MAX_LEVEL * 256)),
    "SolarizeAdd": (lambda img, add: _solarize_add(img, int(add)), lambda m, rng: int(m / _MAX_LEVEL * 110)),
    "ShearX": (lambda img, f: _affine(img, (1, f, 0, 0, 1, 0)), lambda m, rng: _signed(m / _MAX_LEVEL * 0.3, rng)),
    "ShearY": (lambda img, f: _affine(img, (1, 0, 0, f, 1, 0)), lambda m, rng: _signed(m / _MAX_LEVEL * 0.3, rng)),
    "TranslateXRel": (
        lambda img, pct: _affine(img, (1, 0, pct * img.size[0], 0, 1, 0)),
        lambda m, rng: _signed(m / _MAX_LEVEL * 0.45, rng),
    ),
    "TranslateYRel": (
        lambda img, pct: _affine(img, (1, 0, 0, 0, 1, pct * img.size[1])),
        lambda m, rng: _signed(m / _MAX_LEVEL * 0.45, rng),
    ),
}
for _name, _cls in _ENHANCERS.items():
    OPS[_name] = (lambda img, f, _cls=_cls: _cls(img).enhance(f), _enhance)
    OPS[_name + "Increasing"] = (lambda img, f, _cls=_cls: _cls(img).enhance(f), _enhance_increasing)

_GEOMETRY_AND_POINT = ["AutoContrast", "Equalize", "Invert", "Rotate"]
_TAIL = ["ShearX", "ShearY", "TranslateXRel", "TranslateYRel"]
INCREASING_OPS = (
    _GEOMETRY_AND_POINT
    + [
        "PosterizeIncreasing",
        "SolarizeIncreasing",
        "SolarizeAdd",
        "ColorIncreasing",
        "ContrastIncreasing",
        "BrightnessIncreasing",
        "SharpnessIncreasing",
    ]
    + _TAIL
)
ORIGINAL_OPS = (
    _GEOMETRY_AND_POINT + ["Posterize", "Solarize", "SolarizeAdd", "Color", "Contrast", "Brightness", "Sharpness"] + _TAIL
)


@dataclass(frozen=True)
class RandAugment:
    """`num_ops` operations per image from `ops`, each with probability `prob` at a magnitude drawn
    from N(magnitude, magnitude_std) clipped to [0, 10]. Call with a PIL RGB image and a generator."""

    magnitude: float = 9.0
    num_ops: int = 2
    magnitude_std: float = 0.5
    ops: Tuple[str, ...] = tuple(INCREASING_OPS)
    prob: float = 0.5

    def __call__(self, img: Image.Image, rng: np.random.Generator) -> Image.Image:
        for k in rng.integers(0, len(self.ops), self.num_ops):
            if rng.random() > self.prob:
                continue
            m = self.magnitude
            if self.magnitude_std == math.inf:
                m = rng.uniform(0, m)
            elif self.magnitude_std > 0:
                m = rng.normal(m, self.magnitude_std)
            m = max(0.0, min(float(m), _MAX_LEVEL))
            op, level = OPS[self.ops[int(k)]]
            img = op(img, None if level is None else level(m, rng))
        return img


def parse_randaug(spec: Optional[str], flag: str = "--randaug") -> Optional[RandAugment]:
    """'rand-m9-mstd0.5-inc1' (sections m, n, mstd, inc in any order after 'rand') -> RandAugment;
    None, '' or 'none' -> None (off). Anything else: a ValueError naming the flag."""
    if spec is None or spec.strip().lower() in ("", "none", "off"):
        return None
    parts = spec.strip().split("-")
    want = f"argument '{flag}' expected 'none' or rand-m<magnitude>[-n<ops>][-mstd<std>][-inc<0|1>] (e.g. rand-m9-mstd0.5-inc1)"
    if parts[0] != "rand":
        raise ValueError(f"{want}, got {spec!r}")
    fields: Dict[str, float] = {}
    for part in parts[1:]:
        m = re.fullmatch(r"(mstd|inc|m|n)(\d+(?:\.\d*)?|inf)", part)
        if m is None:
            raise ValueError(f"{want}, got {spec!r} (section {part!r})")
        fields[m.group(1)] = float(m.group(2))
    magnitude, num_ops = fields.get("m", _MAX_LEVEL), fields.get("n", 2)
    std, inc = fields.get("mstd", 0.0), fields.get("inc", 0)
    if num_ops != int(num_ops) or num_ops < 1 or inc not in (0, 1) or not 0 <= magnitude <= _MAX_LEVEL:
        raise ValueError(f"{want} with m in [0, 10], n >= 1, inc 0 or 1, got {spec!r}")
    return RandAugment(
        magnitude=magnitude,
        num_ops=int(num_ops),
        magnitude_std=math.inf if std > 100 else std,
        ops=tuple(INCREASING_OPS if inc else ORIGINAL_OPS),
    )


def random_erasing(
    img: torch.Tensor,
    rng: np.random.Generator,
    prob: float,
    area: Tuple[float, float] = (0.02, 1 / 3),
    aspect: Tuple[float, float] = (0.3, 1 / 0.3),
) -> torch.Tensor:
    """With probability `prob`, one box of the normalised image [C, H, W] filled with N(0, 1) noise
    per pixel (a new tensor; the input is left alone). The noise comes from `rng` too."""
    if prob <= 0 or rng.random() >= prob:
        return img
    C, H, W = img.shape
    log_aspect = (math.log(aspect[0]), math.log(aspect[1]))
    for _ in range(10):
        target = rng.uniform(*area) * H * W
        ratio = math.exp(rng.uniform(*log_aspect))
        h = int(round(math.sqrt(target * ratio)))
        w = int(round(math.sqrt(target / ratio)))
        if w < W and h < H:
            top, left = int(rng.integers(0, H - h + 1)), int(rng.integers(0, W - w + 1))
            out = img.clone()
            noise = rng.standard_normal((C, h, w)).astype(np.float32)
            out[:, top : top + h, left : left + w] = torch.from_numpy(noise).to(img.dtype)
            return out
    return img


__all__: List[str] = ["RandAugment", "parse_randaug", "random_erasing", "INCREASING_OPS", "ORIGINAL_OPS", "OPS", "FILL"]
