"""Augmented views of an image for the feature cache (numpy and Pillow only: runs in extract's decode workers).

A *view* is an image made from a decoded image before resize and crop: a random
augmentation (``AugmentSpec``: flip, random resized crop, colour jitter, rotation) drawn
with a seed derived from (image key, view name, parameters). The same key, view and
parameters always give the same pixels, so a rerun or a resumed run stores the same rows.
(Deterministic test-time views of val images, a flip averaged with the clean row, were
measured and added nothing on ants/bees: see bench/views.py; they are not offered.)

Each view has its own cache key (``view_key``): the sha256 of the image key, the view's
name and its parameters. A view made with other parameters has another key, so changing
the augmentation adds the new views and drops the old ones at the next extract (nothing
is reused that was made differently), and raising ``--views`` from 4 to 8 computes only
views 4..7 (view i does not depend on K).
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field

import numpy as np
from PIL import Image, ImageEnhance

from embedx.errors import ConfigError
from embedx.fsio import sha256_bytes

#: Random augmentations a view can combine, applied in this order.
OPS = ("crop", "rotate", "flip", "color")
DEFAULT_OPS = ("flip", "crop", "color")
#: View names: ``augment/<i>`` for the i-th random view (the prefix leaves room for other kinds).
AUGMENT_PREFIX = "augment/"


@dataclass(frozen=True)
class AugmentSpec:
    """Which random augmentations a view applies, and their ranges (defaults: torchvision's usual ones)."""

    ops: tuple[str, ...] = DEFAULT_OPS
    #: random resized crop: fraction of the image's area, and aspect ratio (log-uniform)
    crop_scale: tuple[float, float] = (0.35, 1.0)
    crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)
    #: colour jitter: brightness, contrast and saturation factors drawn in [1 - x, 1 + x]
    color: float = 0.4
    #: rotation in degrees, drawn in [-rotate, rotate]
    rotate: float = 15.0
    flip_probability: float = field(default=0.5)

    def __post_init__(self) -> None:
        ops = tuple(str(op).strip() for op in self.ops)
        unknown = [op for op in ops if op not in OPS]
        if unknown or not ops:
            raise ConfigError(f"augmentations must be some of {','.join(OPS)}; got {','.join(ops) or 'none'}")
        object.__setattr__(self, "ops", tuple(op for op in OPS if op in ops))  # one canonical order
        low, high = self.crop_scale
        if not 0 < low <= high <= 1:
            raise ConfigError(f"crop scale must satisfy 0 < low <= high <= 1, got {self.crop_scale}")

    @classmethod
    def parse(cls, text: str | None) -> AugmentSpec:
        """``"flip,crop,color,rotate"`` (any subset, any order); None or "" gives the defaults."""
        if not text:
            return cls()
        return cls(ops=tuple(part for part in text.split(",") if part.strip()))

    def parameters(self) -> dict:
        """The ops and only the parameters they use (what the views' keys and seeds depend on)."""
        data = asdict(self)
        used = {"ops": list(self.ops)}
        for op, names in (("crop", ("crop_scale", "crop_ratio")), ("color", ("color",)),
                          ("rotate", ("rotate",)), ("flip", ("flip_probability",))):
            if op in self.ops:
                used.update({name: data[name] for name in names})
        return json.loads(json.dumps(used))

    @classmethod
    def from_parameters(cls, data: dict) -> AugmentSpec:
        values = {k: tuple(v) if isinstance(v, list) else v for k, v in data.items()}
        return cls(**values)

    def to_json(self) -> str:
        return json.dumps(self.parameters(), sort_keys=True, separators=(",", ":"))


@dataclass(frozen=True)
class ViewPlan:
    """The views an extract stores: ``count`` random views of every train image (val and test
    images get none)."""

    count: int = 0
    augment: AugmentSpec = field(default_factory=AugmentSpec)

    def __post_init__(self) -> None:
        if self.count < 0:
            raise ConfigError(f"views must be >= 0, got {self.count}")

    def __bool__(self) -> bool:
        return bool(self.count)

    def names(self, split: str) -> list[str]:
        """The view names an image of ``split`` gets."""
        return [f"{AUGMENT_PREFIX}{i}" for i in range(self.count)] if split == "train" else []

    def parameters(self, name: str) -> str:
        return self.augment.to_json()

    def to_dict(self) -> dict:
        return {"views": self.count, "augment": self.augment.parameters(),
                "seed": "sha256(image key | view name | parameters)"}

    @classmethod
    def from_dict(cls, data: dict) -> ViewPlan:
        return cls(count=int(data.get("views", 0)), augment=AugmentSpec.from_parameters(data["augment"]))


def _digest(key: str, name: str, parameters: str) -> str:
    return sha256_bytes(f"{key}|{name}|{parameters}".encode())


def view_key(key: str, name: str, parameters: str) -> str:
    """The cache key of view ``name`` of the image with key ``key`` (64 hex digits, like an image key)."""
    return _digest(key, name, parameters)


def view_image(image: Image.Image, key: str, name: str, parameters: str) -> Image.Image:
    """View ``name`` of a decoded RGB image: the same pixels for the same (key, name, parameters)."""
    spec = AugmentSpec.from_parameters(json.loads(parameters))
    seed = int(_digest(key, name, parameters)[:16], 16)
    return augment(image, spec, np.random.default_rng(seed))


def _crop_box(width: int, height: int, spec: AugmentSpec, rng: np.random.Generator) -> tuple[int, int, int, int]:
    """torchvision's RandomResizedCrop box: 10 tries at a random area and log-uniform ratio, else the whole image."""
    area = width * height
    log_ratio = (math.log(spec.crop_ratio[0]), math.log(spec.crop_ratio[1]))
    for _ in range(10):
        target = area * rng.uniform(*spec.crop_scale)
        ratio = math.exp(rng.uniform(*log_ratio))
        w = round(math.sqrt(target * ratio))
        h = round(math.sqrt(target / ratio))
        if 0 < w <= width and 0 < h <= height:
            left = int(rng.integers(0, width - w + 1))
            top = int(rng.integers(0, height - h + 1))
            return left, top, left + w, top + h
    return 0, 0, width, height


def augment(image: Image.Image, spec: AugmentSpec, rng: np.random.Generator) -> Image.Image:
    """One random view of ``image`` (RGB), drawing from ``rng`` in a fixed order."""
    if "crop" in spec.ops:
        image = image.crop(_crop_box(*image.size, spec, rng))
    if "rotate" in spec.ops:
        angle = float(rng.uniform(-spec.rotate, spec.rotate))
        image = image.rotate(angle, resample=Image.Resampling.BILINEAR, fillcolor=(124, 116, 104))
    if "flip" in spec.ops and rng.random() < spec.flip_probability:
        image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    if "color" in spec.ops:
        factors = rng.uniform(1 - spec.color, 1 + spec.color, size=3)
        for enhancer, factor in zip((ImageEnhance.Brightness, ImageEnhance.Contrast, ImageEnhance.Color),
                                    factors, strict=True):
            image = enhancer(image).enhance(float(factor))
    return image


__all__ = ["AugmentSpec", "OPS", "ViewPlan", "augment", "view_image", "view_key"]
