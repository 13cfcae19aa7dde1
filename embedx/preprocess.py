"""Decode, resize, crop and normalize: the one preprocessing path.

extract, predict, serve and bundle all call these functions, so a model sees the
same pixels at training and at serving time.  Only Pillow and numpy are used here
(no torch): the serving path stays light.

The geometry follows torchvision's classic eval transform
``Resize(resize_size) -> CenterCrop(input_size) -> ToTensor -> Normalize``, computed
with Pillow's antialiased resize exactly as torchvision does on PIL images.
"""

from __future__ import annotations

import io
import json
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Union

import numpy as np
from PIL import Image, ImageFile, ImageOps

from embedx.errors import ConfigError, ImageDecodeError

ImageSource = Union[str, Path, bytes, bytearray, memoryview]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

#: Refuse images with more pixels than this (a decompression bomb guard).
#: 89.5 Mpx is Pillow's own warning threshold; we make it a hard error.
MAX_IMAGE_PIXELS = 89_478_485

_INTERPOLATIONS = {
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "lanczos": Image.Resampling.LANCZOS,
}


@dataclass(frozen=True)
class PreprocessSpec:
    """How an image becomes a model input: everything that changes the pixels.

    ``resize_size`` is the length the shorter side is resized to, then the centre
    ``input_size`` square is cropped.  ``mean``/``std`` apply to RGB values in [0, 1].
    """

    input_size: int = 224
    resize_size: int = 256
    interpolation: str = "bilinear"
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    layout: str = field(default="NCHW")

    def __post_init__(self) -> None:
        if self.interpolation not in _INTERPOLATIONS:
            raise ConfigError(
                f"interpolation must be one of {sorted(_INTERPOLATIONS)}, got {self.interpolation!r}"
            )
        if self.resize_size < self.input_size:
            raise ConfigError(
                f"resize_size ({self.resize_size}) must be >= input_size ({self.input_size})"
            )
        if len(self.mean) != 3 or len(self.std) != 3:
            raise ConfigError("mean and std need three values, one per RGB channel")
        # Frozen dataclasses keep tuples hashable even if lists were passed.
        object.__setattr__(self, "mean", tuple(float(v) for v in self.mean))
        object.__setattr__(self, "std", tuple(float(v) for v in self.std))

    def to_dict(self) -> dict:
        return asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict) -> "PreprocessSpec":
        known = {k: data[k] for k in cls.__dataclass_fields__ if k in data}
        return cls(**known)

    @classmethod
    def from_json(cls, text: str) -> "PreprocessSpec":
        return cls.from_dict(json.loads(text))


def _open(source: ImageSource) -> Image.Image:
    if isinstance(source, (bytes, bytearray, memoryview)):
        return Image.open(io.BytesIO(bytes(source)))
    return Image.open(source)


def decode(source: ImageSource, *, min_size: int | None = None) -> Image.Image:
    """Read an image file or bytes into an RGB ``PIL.Image``.

    EXIF orientation is applied; palette, alpha (composited on white), CMYK,
    16-bit and grayscale images become RGB; an animated image gives its first
    frame.  With ``min_size``, a JPEG is decoded at the smallest DCT scale whose
    shorter side is still >= ``min_size`` (Pillow's ``draft``), which is several
    times faster for large photos.

    Raises ``ImageDecodeError`` with a short reason for anything unreadable.
    """
    name = source if isinstance(source, (str, Path)) else "<bytes>"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = _open(source)
            width, height = image.size
            if width * height > MAX_IMAGE_PIXELS:
                raise ImageDecodeError(
                    f"{name}: {width}x{height} pixels exceeds the limit of "
                    f"{MAX_IMAGE_PIXELS} (possible decompression bomb)"
                )
            if min_size and image.format == "JPEG":
                # draft keeps both sides >= the requested size
                scale = min(width, height) / float(min_size)
                if scale >= 2:
                    image.draft("RGB", (int(width / scale) + 1, int(height / scale) + 1))
            image.load()
            image = ImageOps.exif_transpose(image)
            return _to_rgb(image)
    except ImageDecodeError:
        raise
    except Image.DecompressionBombError as e:
        raise ImageDecodeError(f"{name}: too many pixels (decompression bomb limit): {e}") from e
    except Image.DecompressionBombWarning as e:
        raise ImageDecodeError(f"{name}: too many pixels (decompression bomb limit): {e}") from e
    except Image.UnidentifiedImageError as e:
        raise ImageDecodeError(f"{name}: not an image Pillow can identify") from e
    except PermissionError as e:
        raise ImageDecodeError(f"{name}: permission denied") from e
    except IsADirectoryError as e:
        raise ImageDecodeError(f"{name}: is a directory") from e
    except FileNotFoundError as e:
        raise ImageDecodeError(f"{name}: file not found") from e
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        # Pillow reports truncated and malformed data as OSError/SyntaxError/ValueError.
        raise ImageDecodeError(f"{name}: cannot decode ({type(e).__name__}: {e})") from e


def _to_rgb(image: Image.Image) -> Image.Image:
    mode = image.mode
    if mode == "RGB":
        return image
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        # 16/32-bit grayscale: scale the actual range to 8 bits instead of clipping.
        array = np.asarray(image, dtype=np.float64)
        top = 65535.0 if mode.startswith("I;16") or array.max() > 255 else 255.0
        gray = np.clip(array / top * 255.0 + 0.5, 0, 255).astype(np.uint8)
        return Image.fromarray(gray, mode="L").convert("RGB")
    if mode == "F":
        array = np.asarray(image, dtype=np.float64)
        lo, hi = float(array.min()), float(array.max())
        gray = ((array - lo) / (hi - lo or 1.0) * 255.0 + 0.5).astype(np.uint8)
        return Image.fromarray(gray, mode="L").convert("RGB")
    if mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
        mode = "RGBA"
    if mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def resize_crop(image: Image.Image, spec: PreprocessSpec) -> Image.Image:
    """Resize the shorter side to ``spec.resize_size`` and centre-crop ``spec.input_size``.

    Matches ``torchvision.transforms.Resize(resize_size)`` followed by
    ``CenterCrop(input_size)`` on PIL images, but resizes only the region that
    survives the crop (Pillow's ``box`` argument), which saves work on wide images.
    """
    width, height = image.size
    short, long = (width, height) if width <= height else (height, width)
    new_short = spec.resize_size
    new_long = int(spec.resize_size * long / short)  # torchvision truncates the same way
    new_w, new_h = (new_short, new_long) if width <= height else (new_long, new_short)
    crop = spec.input_size
    # torchvision's CenterCrop offsets, in the resized image's pixel grid
    top = int(round((new_h - crop) / 2.0))
    left = int(round((new_w - crop) / 2.0))
    scale_x = width / new_w
    scale_y = height / new_h
    box = (left * scale_x, top * scale_y, (left + crop) * scale_x, (top + crop) * scale_y)
    # Pillow's filter taps may reach outside ``box`` (they clip to the whole image),
    # so this equals resizing everything and cropping afterwards.
    return image.resize((crop, crop), _INTERPOLATIONS[spec.interpolation], box=box)


def _normalizer(spec: PreprocessSpec) -> tuple[np.ndarray, np.ndarray]:
    mean = np.asarray(spec.mean, dtype=np.float32)
    std = np.asarray(spec.std, dtype=np.float32)
    scale = (1.0 / (255.0 * std)).reshape(3, 1, 1)
    bias = (-mean / std).reshape(3, 1, 1)
    return scale.astype(np.float32), bias.astype(np.float32)


def normalize(pixels: np.ndarray, spec: PreprocessSpec, out: np.ndarray | None = None) -> np.ndarray:
    """uint8 HWC RGB -> float32 CHW, ``(x / 255 - mean) / std`` as one multiply-add."""
    scale, bias = _normalizer(spec)
    chw = pixels.transpose(2, 0, 1)
    if out is None:
        out = np.empty(chw.shape, dtype=np.float32)
    np.multiply(chw, scale, out=out, casting="unsafe")
    out += bias
    return out


def to_pixels(source: ImageSource | Image.Image, spec: PreprocessSpec) -> np.ndarray:
    """Decode (if needed), resize and crop: uint8 HWC RGB of ``input_size`` square."""
    if isinstance(source, Image.Image):
        image = _to_rgb(source)
    else:
        image = decode(source, min_size=spec.resize_size)
    return np.asarray(resize_crop(image, spec), dtype=np.uint8)


def load(source: ImageSource | Image.Image, spec: PreprocessSpec, out: np.ndarray | None = None) -> np.ndarray:
    """The whole path: source -> float32 CHW array ready for the backbone."""
    return normalize(to_pixels(source, spec), spec, out=out)


def load_batch(sources: list[ImageSource], spec: PreprocessSpec) -> np.ndarray:
    """Several sources into one NCHW float32 batch (raises on the first bad one)."""
    batch = np.empty((len(sources), 3, spec.input_size, spec.input_size), dtype=np.float32)
    for i, source in enumerate(sources):
        load(source, spec, out=batch[i])
    return batch
