"""Decode, resize, crop and normalize: the one preprocessing path.

extract, predict, serve and bundle all call these functions, so a model sees the
same pixels at training and at serving time.  No torch here: the serving path stays
light.  ``PreprocessSpec.mode`` picks one of two ways to compute the pixels; it is
part of the spec, so a cache or model records which one made its features, and a
cache made one way is never reused the other way (the specs differ).

The geometry is torchvision's classic eval transform
``Resize(resize_size) -> CenterCrop(input_size) -> ToTensor -> Normalize`` in both.

``mode="exact"``: Pillow decodes and resizes (antialiased) exactly as torchvision
does on PIL images: the uint8 pixels are bit-identical and the float output agrees
to ~5e-7.  The two liberties, both on purpose: large JPEGs are decoded at a reduced
DCT scale (see ``JPEG_DRAFT_GAP``), and EXIF rotation / transparency are applied
(torchvision's ``convert("RGB")`` ignores both).  Decode (55% of the time) and
Pillow's resize (38%) are its floor.

``mode="fast"`` (the default): a plain JPEG is decoded by libjpeg-turbo (simplejpeg)
with its fast integer DCT and fast upsampling, at the same DCT scale as the draft;
every other image is decoded by Pillow exactly as above.  OpenCV's SIMD resize
then replaces Pillow's, after a small Gaussian blur that stands in for the
antialiasing OpenCV lacks (``_fast_resized_view``).  Pixels differ from exact by
~0.03 normalized units on average (about 2 grey levels).

Measured with ``bench/decode.py`` (2026-11-23, shared 2-core Xeon, load average 6-8),
images per CPU-second of one single-threaded process, against the tutorial transform
(two runs):

    hymenoptera_data (398, mostly ~500x375)  tutorial 208/210  exact 264/269 (1.27x/1.28x)
                                             fast 406/406 (1.95x/1.93x)
    generated 2000x1500 JPEGs (24)           tutorial 33/33  exact 74/77 (2.26x/2.33x)
                                             fast 95/98 (2.91x/2.96x)

In fast mode libjpeg-turbo's decode is ~70% of the time (mostly Huffman decoding,
which no scale or crop avoids), blur + resize ~18%, normalize ~7%.
efficientnet_lite0 on hymenoptera: feature cosine fast vs exact 0.992 mean (1st
percentile 0.977, min 0.969); the default head's val accuracy is 0.948 with both
(without the blur: cosine 0.981 mean, min 0.898).
"""


from __future__ import annotations

import io
import json
import math
import numbers
import struct
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from fractions import Fraction
from functools import lru_cache
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
from PIL import Image, ImageOps

from embedx.errors import ConfigError, ImageDecodeError
from embedx.untrusted import finite

ImageSource = str | Path | bytes | bytearray | memoryview

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

#: Refuse images with more pixels than this (a decompression bomb guard).
#: 89.5 Mpx is Pillow's own warning threshold; we make it a hard error.
MAX_IMAGE_PIXELS = 89_478_485

#: ``PreprocessSpec.mode`` values.
MODES = ("fast", "exact")
#: The largest input_size/resize_size a spec may ask for (an 8192² float32 crop is 0.8 GB).
MAX_SIZE = 8192

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
    #: ``"fast"`` (libjpeg-turbo decode, OpenCV resize) or ``"exact"`` (pixel for
    #: pixel torchvision's transform on PIL images); see the module docstring.
    mode: str = "fast"

    def __post_init__(self) -> None:
        # A spec may come from a file someone else wrote (head.json, bundle metadata): check types and ranges.
        if not isinstance(self.mode, str) or self.mode not in MODES:
            raise ConfigError(f"mode must be one of {list(MODES)}, got {self.mode!r:.80}")
        if not isinstance(self.interpolation, str) or self.interpolation not in _INTERPOLATIONS:
            raise ConfigError(
                f"interpolation must be one of {sorted(_INTERPOLATIONS)}, got {self.interpolation!r:.80}"
            )
        if not isinstance(self.layout, str):
            raise ConfigError(f"layout must be a string, got {self.layout!r:.80}")
        for name in ("input_size", "resize_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_SIZE:
                raise ConfigError(f"{name} must be an integer from 1 to {MAX_SIZE}, got {value!r:.80}")
        if self.resize_size < self.input_size:
            raise ConfigError(
                f"resize_size ({self.resize_size}) must be >= input_size ({self.input_size})"
            )
        for name in ("mean", "std"):
            values = getattr(self, name)
            if (not isinstance(values, (list, tuple)) or len(values) != 3
                    or not all(isinstance(v, numbers.Real) and not isinstance(v, bool) for v in values)):
                raise ConfigError(f"{name} needs three values, numbers one per RGB channel, got {values!r:.80}")
            if not all(finite(v) for v in values) or (name == "std" and not all(v > 0 for v in values)):
                raise ConfigError(f"{name} must be finite{' and > 0' if name == 'std' else ''}, got {values!r:.80}")
        # Frozen dataclasses keep tuples hashable even if lists were passed.
        object.__setattr__(self, "mean", tuple(float(v) for v in self.mean))
        object.__setattr__(self, "std", tuple(float(v) for v in self.std))

    def to_dict(self) -> dict:
        return asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict) -> PreprocessSpec:
        """A spec from ``to_dict``; one recorded before ``mode`` existed was made the exact way."""
        known = {k: data[k] for k in cls.__dataclass_fields__ if k in data}
        known.setdefault("mode", "exact")
        return cls(**known)

    @classmethod
    def from_json(cls, text: str) -> PreprocessSpec:
        return cls.from_dict(json.loads(text))


#: A JPEG is decoded at a reduced DCT scale (1/2, 1/4, 1/8) only while the reduced
#: image keeps a shorter side >= this many times ``resize_size``, so the antialiased
#: resize still does at least a 2x reduction (the idea of Pillow's ``reducing_gap``).
#: Measured on the real photos of hymenoptera_data that get drafted: 2.0 differs from
#: the full decode by 0.001 on average (max 0.09) in normalized units; 1.0 (draft
#: down to the target) was 3x faster on big photos but 0.033 off on average, up to 1.5.
JPEG_DRAFT_GAP = 2.0

_ORIENTATION = 0x0112


#: Leading bytes -> the Pillow plugins to try first.  Once every plugin is loaded
#: (``data.image_extensions`` loads them), ``Image.open`` probes formats in
#: registration order (AVIF, BLP, BMP, ...), ~0.1 ms per image before reaching JPEG.
_MAGIC = (
    (b"\xff\xd8\xff", ("JPEG", "MPO")),
    (b"\x89PNG\r\n\x1a\n", ("PNG",)),
    (b"GIF87a", ("GIF",)),
    (b"GIF89a", ("GIF",)),
)


def _open(handle: BinaryIO) -> Image.Image:
    head = handle.read(16)
    handle.seek(0)
    formats = next((names for magic, names in _MAGIC if head.startswith(magic)), None)
    if formats is not None:
        try:
            return Image.open(handle, formats=formats)
        except Image.UnidentifiedImageError:
            handle.seek(0)  # a damaged file of that type: let every plugin have a go
    return Image.open(handle)


def _fail(name: object, reason: str, cause: BaseException | None = None) -> ImageDecodeError:
    """An ``ImageDecodeError`` whose message is ``"<name>: <reason>"``; ``.reason`` has no name."""
    error = ImageDecodeError(f"{name}: {reason}")
    error.reason = reason  # type: ignore[attr-defined]
    if cause is not None:
        error.__cause__ = cause
    return error


def decode_reason(error: ImageDecodeError, name: object = "<bytes>") -> str:
    """Why an image could not be read, without the ``"<name>: "`` its message starts with
    (for error tables and responses that name the file themselves)."""
    return getattr(error, "reason", None) or str(error).removeprefix(f"{name}: ")


def _sniff(source: ImageSource) -> str:
    """Why Pillow could not identify a file: say what it looks like instead."""
    try:
        if isinstance(source, (bytes, bytearray, memoryview)):
            head = bytes(source[:512])
        else:
            with open(source, "rb") as handle:
                head = handle.read(512)
    except OSError:
        return "not an image Pillow can identify"
    if not head:
        return "empty file (0 bytes)"
    text = head.lstrip(b"\xef\xbb\xbf \t\r\n").lower()
    if text.startswith((b"<!doctype html", b"<html", b"<head", b"<?xml", b"<svg")):
        return "an HTML/XML document, not an image (a web page saved under an image name?)"
    if all(32 <= c < 127 or c in (9, 10, 13) for c in head):
        return "a text file, not an image"
    return "not an image Pillow can identify (unknown or corrupt header)"


def _draft_scale(width: int, height: int, min_size: int) -> int:
    """The largest JPEG DCT reduction (8, 4, 2 or 1) keeping the shorter side large enough."""
    short = min(width, height)
    for scale in (8, 4, 2):
        if -(-short // scale) >= min_size * JPEG_DRAFT_GAP:
            return scale
    return 1


def decode(source: ImageSource, *, min_size: int | None = None) -> Image.Image:
    """Read an image file or bytes into an RGB ``PIL.Image``.

    EXIF orientation is applied; palette, alpha (composited on white), CMYK,
    16-bit and grayscale images become RGB; an animated image gives its first
    frame.  With ``min_size``, a large JPEG is decoded at the smallest DCT scale
    whose shorter side stays >= ``min_size * JPEG_DRAFT_GAP`` (Pillow's ``draft``),
    several times faster for photos much larger than the model input.

    Raises ``ImageDecodeError`` for anything unreadable; its ``.reason`` is the
    message without the file name (for error tables).  Truncated files are errors:
    this relies on ``PIL.ImageFile.LOAD_TRUNCATED_IMAGES`` staying False.
    """
    image = _decode(source, min_size=min_size, fast=False)
    assert isinstance(image, Image.Image)
    return image


def _decode(source: ImageSource, *, min_size: int | None, fast: bool) -> Image.Image | np.ndarray:
    """``decode``; with ``fast``, a plain RGB or grayscale JPEG (no EXIF rotation) is
    decoded by libjpeg-turbo with its fast DCT and upsampling into a uint8 HWC array.
    Whatever that decoder refuses goes through Pillow, which decodes it or says why not.
    """
    name = source if isinstance(source, (str, Path)) else "<bytes>"
    try:
        data: Any = source
        if fast and not isinstance(source, (bytes, bytearray, memoryview)):
            with open(source, "rb") as file:
                data = file.read()
        if fast and bytes(data[:3]) == b"\xff\xd8\xff":
            pixels = _turbo_decode(data, min_size)
            if pixels is not None:
                return pixels
        if isinstance(data, (bytes, bytearray, memoryview)):
            handle: BinaryIO = io.BytesIO(data)
        else:
            handle = open(source, "rb")  # noqa: SIM115 - closed once the pixels are read
        with handle:
            image = _open(handle)
            width, height = image.size
            if width * height > MAX_IMAGE_PIXELS:
                raise _fail(
                    name,
                    f"{width}x{height} pixels exceeds the limit of {MAX_IMAGE_PIXELS} "
                    f"(possible decompression bomb)",
                )
            if min_size and image.format == "JPEG":
                scale = _draft_scale(width, height, min_size)
                if scale > 1:
                    image.draft("RGB", (width // scale, height // scale))
            image.load()
            orientation = image.getexif().get(_ORIENTATION, 1)
        if orientation != 1:
            ImageOps.exif_transpose(image, in_place=True)
        return _to_rgb(image)
    except ImageDecodeError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise _fail(name, f"too many pixels (decompression bomb limit): {e}", e) from e
    except Image.UnidentifiedImageError as e:
        raise _fail(name, _sniff(source), e) from e
    except PermissionError as e:
        raise _fail(name, "permission denied", e) from e
    except IsADirectoryError as e:
        raise _fail(name, "is a directory, not an image file", e) from e
    except FileNotFoundError as e:
        raise _fail(name, "file not found", e) from e
    except (OSError, SyntaxError, ValueError, EOFError, struct.error) as e:
        # Pillow reports truncated and malformed data as OSError/SyntaxError/ValueError.
        kind = "truncated image data" if "truncated" in str(e).lower() else "corrupt or unsupported image"
        raise _fail(name, f"{kind} ({type(e).__name__}: {e})", e) from e


@lru_cache(maxsize=1)
def _fast_libraries() -> tuple[Any, Any]:
    """(simplejpeg, cv2), imported on first use of ``mode="fast"``; OpenCV single-threaded
    (images are small and the callers parallelize over images)."""
    try:
        import cv2
        import simplejpeg
    except ImportError as e:
        raise ConfigError(
            f"preprocessing mode 'fast' needs simplejpeg and opencv-python-headless ({e}); "
            "install them (`pip install embedx` declares both) or use mode='exact'"
        ) from e
    cv2.setNumThreads(1)
    return simplejpeg, cv2


def _turbo_decode(data: Any, min_size: int | None) -> np.ndarray | None:
    """A plain JPEG (YCbCr, RGB or gray; no EXIF rotation; under the pixel limit)
    decoded by libjpeg-turbo with its fast DCT and upsampling, at the DCT scale
    ``decode`` would draft to; None for anything else, and for anything it refuses.

    Reading the header this way instead of with ``Image.open`` saves ~0.1 ms a photo.
    """
    simplejpeg, _ = _fast_libraries()
    try:
        height, width, colorspace, _ = simplejpeg.decode_jpeg_header(data)
    except ValueError:
        return None
    if (colorspace not in ("YCbCr", "RGB", "Gray") or width * height > MAX_IMAGE_PIXELS
            or _jpeg_orientation(data) != 1):
        return None
    scale = _draft_scale(width, height, min_size) if min_size else 1
    try:
        return simplejpeg.decode_jpeg(
            data, colorspace="RGB", fastdct=True, fastupsample=True, strict=True,
            min_width=-(-width // scale), min_height=-(-height // scale),
        )
    except ValueError:  # truncated, corrupt or exotic (12-bit, ...): Pillow's turn
        return None


def _jpeg_orientation(data: Any) -> int | None:
    """The EXIF orientation in a JPEG's first Exif APP1 segment (where Pillow reads it):
    1 without one, None where the markers or the EXIF cannot be followed."""
    size, position = len(data), 2
    while position + 4 <= size:
        if data[position] != 0xFF:
            return None
        marker = data[position + 1]
        if marker == 0xFF:  # fill byte
            position += 1
            continue
        if marker in (0xDA, 0xD9):  # start of scan / end of image: no EXIF before the pixels
            return 1
        length = int.from_bytes(data[position + 2 : position + 4], "big")
        if marker == 0xE1 and bytes(data[position + 4 : position + 10]) == b"Exif\0\0":
            return _tiff_orientation(bytes(data[position + 10 : position + 2 + length]))
        position += 2 + length
    return None


def _tiff_orientation(tiff: bytes) -> int | None:
    order = {b"II": "little", b"MM": "big"}.get(tiff[:2])
    if order is None or len(tiff) < 8:
        return None
    ifd = int.from_bytes(tiff[4:8], order)
    if ifd + 2 > len(tiff):
        return None
    for index in range(int.from_bytes(tiff[ifd : ifd + 2], order)):
        entry = ifd + 2 + 12 * index
        if entry + 12 > len(tiff):
            return None
        if int.from_bytes(tiff[entry : entry + 2], order) == _ORIENTATION:
            if int.from_bytes(tiff[entry + 2 : entry + 4], order) != 3:  # not a SHORT
                return None
            return int.from_bytes(tiff[entry + 8 : entry + 10], order)
    return 1


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


def _geometry(width: int, height: int, spec: PreprocessSpec) -> tuple[int, int, int, int]:
    """torchvision's ``Resize(resize_size)`` size and ``CenterCrop(input_size)`` offsets."""
    short, long = (width, height) if width <= height else (height, width)
    new_short = spec.resize_size
    new_long = int(spec.resize_size * long / short)  # torchvision truncates the same way
    new_w, new_h = (new_short, new_long) if width <= height else (new_long, new_short)
    crop = spec.input_size
    top = int(round((new_h - crop) / 2.0))
    left = int(round((new_w - crop) / 2.0))
    return new_w, new_h, left, top


def _exact_box_axis(in_size: int, out_size: int, offset: int, crop: int) -> bool:
    """Whether resizing only ``[offset, offset + crop)`` of this axis (Pillow's ``box``)
    computes the same filter taps and weights as resizing the whole axis.

    Pillow takes the box as float32 and computes each output pixel's centre as
    ``box0 + (i + 0.5) * (box1 - box0) / crop`` in doubles; the full resize computes
    ``(offset + i + 0.5) * in_size / out_size``.  They agree bit for bit when the
    scale is a short binary fraction and the box ends (and their difference) are
    exact float32 numbers: the case for the usual power-of-two ``resize_size`` (256)
    on the shorter side, rarely on the longer one.  Otherwise a weight can round
    differently and a few pixels come out one grey level off.
    """
    scale = Fraction(in_size, out_size)
    if scale.denominator & (scale.denominator - 1) or scale.denominator > 1 << 20:
        return False  # not a short binary fraction

    def float32_exact(value: Fraction) -> bool:
        return Fraction(float(np.float32(float(value)))) == value

    return all(float32_exact(v) for v in (offset * scale, (offset + crop) * scale, crop * scale))


def _vertical_first(width: int, height: int, out_w: int, out_h: int) -> bool:
    """Pillow (>= 11)'s choice of pass order in ``ImagingResampleInner``."""
    return height - out_h > 0 and height - out_h > (width - out_w) * 2


@lru_cache(maxsize=4096)
def _plan(width: int, height: int, spec: PreprocessSpec) -> tuple[tuple[int, int], tuple, int, int]:
    """(Pillow output size, Pillow box, column offset, row offset) for ``resize_crop``.

    Resizing only the cropped region is used along each axis where it is exact, and
    only if Pillow then runs its two passes in the same order as for the full
    resize (the order changes the rounding of the intermediate image).
    """
    new_w, new_h, left, top = _geometry(width, height, spec)
    crop = spec.input_size
    reference_order = _vertical_first(width, height, new_w, new_h)
    box_x = _exact_box_axis(width, new_w, left, crop)
    box_y = _exact_box_axis(height, new_h, top, crop)
    for use_x, use_y in ((box_x, box_y), (False, box_y), (box_x, False)):
        size = (crop if use_x else new_w, crop if use_y else new_h)
        if _vertical_first(width, height, *size) == reference_order:
            break
    else:
        use_x = use_y = False
        size = (new_w, new_h)
    x0, x1 = (left * width / new_w, (left + crop) * width / new_w) if use_x else (0, width)
    y0, y1 = (top * height / new_h, (top + crop) * height / new_h) if use_y else (0, height)
    return size, (x0, y0, x1, y1), 0 if use_x else left, 0 if use_y else top


def _resized_view(image: Image.Image, spec: PreprocessSpec) -> np.ndarray:
    """uint8 HWC view of the ``input_size`` square, resized exactly like torchvision."""
    size, box, cut_x, cut_y = _plan(image.width, image.height, spec)
    resized = image.resize(size, _INTERPOLATIONS[spec.interpolation], box=box)
    pixels = np.asarray(resized)
    crop = spec.input_size
    return pixels[cut_y : cut_y + crop, cut_x : cut_x + crop]


#: OpenCV's counterpart of each ``PreprocessSpec.interpolation`` (fast mode).
_CV2_INTERPOLATIONS = {"nearest": 0, "bilinear": 1, "bicubic": 2, "lanczos": 4}  # cv2.INTER_*


def _fast_resized_view(pixels: np.ndarray, spec: PreprocessSpec) -> np.ndarray:
    """uint8 HWC view of the ``input_size`` square: torchvision's geometry, OpenCV's resize.

    OpenCV's bilinear/bicubic resize does not widen its filter when it shrinks, so it
    aliases where Pillow's (and torchvision's) antialiased resize does not.  A Gaussian
    blur first, of the variance that the wider filter adds ((s^2 - 1) / 6 for a
    triangle filter s source pixels wide), brings it back close to Pillow's output:
    on hymenoptera with efficientnet_lite0, feature cosine to the exact path 0.991 mean
    with the blur, 0.981 without.  Only the part of the image the crop keeps is blurred.
    """
    _, cv2 = _fast_libraries()
    height, width = pixels.shape[:2]
    new_w, new_h, left, top = _geometry(width, height, spec)
    crop = spec.input_size
    scale_x, scale_y = width / new_w, height / new_h
    if spec.interpolation != "nearest" and max(scale_x, scale_y) > 1.0:
        sigma_x = math.sqrt(max(scale_x * scale_x - 1.0, 0.0) / 6.0)
        sigma_y = math.sqrt(max(scale_y * scale_y - 1.0, 0.0) / 6.0)
        radius_x, radius_y = (max(1, math.ceil(2.0 * sigma)) for sigma in (sigma_x, sigma_y))
        # source columns/rows the resize reads for the crop, plus the blur's and the
        # interpolation's reach, so the region's own border never shows
        x0 = max(0, math.floor((left + 0.5) * scale_x - 0.5) - radius_x - 2)
        x1 = min(width, math.floor((left + crop - 0.5) * scale_x - 0.5) + radius_x + 4)
        y0 = max(0, math.floor((top + 0.5) * scale_y - 0.5) - radius_y - 2)
        y1 = min(height, math.floor((top + crop - 0.5) * scale_y - 0.5) + radius_y + 4)
        if not pixels.flags.writeable:
            pixels = pixels.copy()
        region = pixels[y0:y1, x0:x1]
        region[...] = cv2.GaussianBlur(region, (2 * radius_x + 1, 2 * radius_y + 1),
                                       sigmaX=max(sigma_x, 1e-3), sigmaY=max(sigma_y, 1e-3))
    resized = cv2.resize(pixels, (new_w, new_h), interpolation=_CV2_INTERPOLATIONS[spec.interpolation])
    return resized[top : top + crop, left : left + crop]


def resize_crop(image: Image.Image, spec: PreprocessSpec) -> Image.Image:
    """Resize the shorter side to ``spec.resize_size`` and centre-crop ``spec.input_size``.

    With ``mode="exact"``, pixel for pixel ``torchvision.transforms.Resize(resize_size)``
    followed by ``CenterCrop(input_size)`` on PIL images.  Along an axis where it is
    exact (see ``_exact_box_axis``; usually the shorter one) only the part that survives
    the crop is resized.  With ``mode="fast"``, ``_fast_resized_view``.
    """
    return Image.fromarray(to_pixels(image, spec), "RGB")


@lru_cache(maxsize=64)
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


def _pixels_view(source: ImageSource | Image.Image, spec: PreprocessSpec) -> np.ndarray:
    fast = spec.mode == "fast"
    if isinstance(source, Image.Image):
        image: Image.Image | np.ndarray = _to_rgb(source)
    else:
        image = _decode(source, min_size=spec.resize_size, fast=fast)
    if not fast:
        assert isinstance(image, Image.Image)
        return _resized_view(image, spec)
    pixels = image if isinstance(image, np.ndarray) else np.array(image)
    return _fast_resized_view(pixels, spec)


def decode_pixels(source: ImageSource | Image.Image, spec: PreprocessSpec) -> np.ndarray:
    """Decode only, as ``to_pixels`` decodes (the same decoder, JPEG draft scale, EXIF
    rotation): uint8 HWC RGB at the decoded size, for a model that resizes and crops itself
    (a bundle with ``--with-preprocess full``)."""
    if isinstance(source, Image.Image):
        return np.asarray(_to_rgb(source))
    image = _decode(source, min_size=spec.resize_size, fast=spec.mode == "fast")
    return np.ascontiguousarray(image if isinstance(image, np.ndarray) else np.asarray(image))


def to_pixels(source: ImageSource | Image.Image, spec: PreprocessSpec) -> np.ndarray:
    """Decode (if needed), resize and crop: uint8 HWC RGB of ``input_size`` square."""
    return np.ascontiguousarray(_pixels_view(source, spec))


def pixels_or_reason(source: ImageSource, spec: PreprocessSpec, *,
                     transform: Callable[[Image.Image], Image.Image] | None = None) -> tuple[np.ndarray | None, str]:
    """``(to_pixels(source, spec), "")``, or ``(None, reason)`` for a file that cannot be used:
    one bad file in a batch costs only its row (extract's CPU and GPU decoders).
    ``transform`` (an augmented view, ``embedx.augment``) is applied to the decoded image
    before resize and crop."""
    try:
        if transform is not None:
            return to_pixels(transform(decode(source, min_size=spec.resize_size)), spec), ""
        return to_pixels(source, spec), ""
    except ImageDecodeError as e:
        return None, decode_reason(e)
    except Exception as e:  # noqa: BLE001 - any decoder failure is that file's; the reason is kept
        return None, f"cannot decode ({type(e).__name__}: {e})"


def load(source: ImageSource | Image.Image, spec: PreprocessSpec, out: np.ndarray | None = None) -> np.ndarray:
    """The whole path: source -> float32 CHW array ready for the backbone."""
    return normalize(_pixels_view(source, spec), spec, out=out)


def load_batch(sources: list[ImageSource], spec: PreprocessSpec) -> np.ndarray:
    """Several sources into one NCHW float32 batch (raises on the first bad one)."""
    batch = np.empty((len(sources), 3, spec.input_size, spec.input_size), dtype=np.float32)
    for i, source in enumerate(sources):
        load(source, spec, out=batch[i])
    return batch
