"""A tiny image folder with every kind of bad input embedx must survive.

``make_corpus(root)`` writes class folders of small, learnable images (each class its
own colour and stripe direction) plus one of each awkward case from issue 3, and
returns a description of what each path should become:

- ``decode``: relpath -> class name, every file that must decode (good images and the
  awkward-but-valid ones: CMYK, 16-bit PNG, palette with transparency, grayscale,
  EXIF rotation, animated GIF, odd names);
- ``errors``: relpath -> case name, image files that must be recorded as decode errors
  (zero bytes, truncated JPEG, text named .jpg, HTML named .png, decompression bomb,
  unreadable permissions);
- ``skipped``: relpath -> case name, entries ``data.discover`` must put in ``skipped``
  (symlink loops, a folder named like an image, a non-image file, an unreadable folder);
- ``cases``: case name -> relpath, to find a particular file;
- ``classes``: all class names (sorted), ``empty_classes``: the ones with no images.

Permission cases depend on who runs the tests: as root, chmod 000 does not stop
reads, so those files decode and the folder lists.  ``unreadable_effective`` says
which way it went, and the lists above already account for it.
"""

from __future__ import annotations

import io
import os
import struct
import zlib
from pathlib import Path

import numpy as np
from PIL import Image

#: class name -> (RGB base colour, stripe axis)
CLASS_STYLES = {
    "alpha": ((220, 40, 40), 0),
    "beta": ((40, 60, 220), 1),
}
EMPTY_CLASS = "gamma"


def good_image(class_name: str, index: int, size: tuple[int, int] = (40, 32)) -> Image.Image:
    """A small image of ``class_name``: its colour, stripes along its axis, some noise."""
    colour, axis = CLASS_STYLES[class_name]
    rng = np.random.default_rng(1000 * list(CLASS_STYLES).index(class_name) + index)
    width, height = size
    pixels = np.empty((height, width, 3), dtype=np.float64)
    pixels[:] = colour
    stripes = (np.arange(height if axis == 0 else width) // 4) % 2 == 0
    if axis == 0:
        pixels[stripes, :, :] *= 0.5
    else:
        pixels[:, stripes, :] *= 0.5
    pixels += rng.normal(0, 12, pixels.shape)
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8), "RGB")


def jpeg_bytes(image: Image.Image, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=options.pop("quality", 92), **options)
    return buffer.getvalue()


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def bomb_png(width: int = 20000, height: int = 20000) -> bytes:
    """A PNG whose header claims ``width`` x ``height`` RGB pixels but stores almost nothing."""
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + png_chunk(b"IHDR", header)
        + png_chunk(b"IDAT", zlib.compress(b"\x00" * 64))
        + png_chunk(b"IEND", b"")
    )


def exif_rotated_jpeg() -> bytes:
    """48x32 stored, EXIF Orientation 6 (rotate 90 degrees clockwise to display): 32x48.

    Stored left half red, right half blue; displayed, the top is red, the bottom blue.
    """
    pixels = np.zeros((32, 48, 3), dtype=np.uint8)
    pixels[:, :24] = (255, 0, 0)
    pixels[:, 24:] = (0, 0, 255)
    exif = Image.Exif()
    exif[0x0112] = 6
    return jpeg_bytes(Image.fromarray(pixels, "RGB"), quality=95, exif=exif.tobytes())


def cmyk_jpeg() -> bytes:
    """Pure cyan in CMYK (displays as RGB ~ (0, 255, 255))."""
    return jpeg_bytes(Image.new("CMYK", (40, 32), (255, 0, 0, 0)), quality=95)


def gray16_png() -> bytes:
    """16-bit grayscale: left half 16384 (-> ~64 in 8 bits), right half 49152 (-> ~191)."""
    values = np.full((32, 40), 16384, dtype=np.uint16)
    values[:, 20:] = 49152
    buffer = io.BytesIO()
    Image.fromarray(values).save(buffer, "PNG")
    return buffer.getvalue()


def palette_transparent_png() -> bytes:
    """Palette image: index 0 transparent (must become white), index 1 opaque green."""
    image = Image.new("P", (40, 32), 0)
    palette = [0, 0, 0, 0, 200, 0] + [0] * (256 * 3 - 6)
    image.putpalette(palette)
    image.paste(1, (20, 0, 40, 32))
    buffer = io.BytesIO()
    image.save(buffer, "PNG", transparency=0)
    return buffer.getvalue()


def animated_gif() -> bytes:
    """Three frames: red, green, blue.  The first frame (red) is the image."""
    frames = [Image.new("RGB", (40, 32), c) for c in ((255, 0, 0), (0, 255, 0), (0, 0, 255))]
    buffer = io.BytesIO()
    frames[0].save(buffer, "GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)
    return buffer.getvalue()


def grayscale_png() -> bytes:
    buffer = io.BytesIO()
    Image.new("L", (40, 32), 100).save(buffer, "PNG")
    return buffer.getvalue()


def _readable(path: Path) -> bool:
    try:
        if path.is_dir():
            os.listdir(path)
        else:
            with open(path, "rb") as handle:
                handle.read(1)
    except PermissionError:
        return False
    return True


def make_corpus(root: Path, *, n_good_per_class: int = 6) -> dict:
    """Write the corpus under ``root`` (created) and return what each path should become."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    decode: dict[str, str] = {}
    errors: dict[str, str] = {}
    skipped: dict[str, str] = {}
    cases: dict[str, str] = {}

    def write(relpath: str, data: bytes) -> Path:
        path = root / relpath
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        return path

    for class_name in CLASS_STYLES:
        for i in range(n_good_per_class):
            image = good_image(class_name, i)
            if i % 2:
                buffer = io.BytesIO()
                image.save(buffer, "PNG")
                relpath = f"{class_name}/good_{i:03d}.png"
                write(relpath, buffer.getvalue())
            else:
                relpath = f"{class_name}/good_{i:03d}.jpg"
                write(relpath, jpeg_bytes(image))
            decode[relpath] = class_name
    (root / EMPTY_CLASS).mkdir()

    valid = {
        "cmyk": ("alpha/cmyk.jpg", cmyk_jpeg()),
        "gray16": ("alpha/gray16.png", gray16_png()),
        "palette_transparent": ("alpha/palette transparent.png", palette_transparent_png()),
        "grayscale": ("alpha/grayscale.png", grayscale_png()),
        "exif_rotated": ("beta/exif_rotated.jpg", exif_rotated_jpeg()),
        "animated_gif": ("beta/animated.gif", animated_gif()),
        "space_name": ("beta/with space.jpg", jpeg_bytes(good_image("beta", 90))),
        "non_ascii_name": ("beta/ñandú 写真.JPG", jpeg_bytes(good_image("beta", 91))),
    }
    for case, (relpath, data) in valid.items():
        write(relpath, data)
        decode[relpath] = relpath.split("/")[0]
        cases[case] = relpath

    full = jpeg_bytes(good_image("alpha", 99, size=(64, 64)))
    broken = {
        "zero_byte": ("alpha/zero_byte.jpg", b""),
        "truncated_jpeg": ("alpha/truncated.jpg", full[: int(len(full) * 0.6)]),
        "text_as_jpg": ("beta/readme.jpg", b"this is a text file, not a JPEG\n" * 4),
        "html_as_png": ("beta/page.png", b"<!doctype html><html><body>404 Not Found</body></html>\n"),
        "bomb": ("alpha/bomb.png", bomb_png()),
    }
    for case, (relpath, data) in broken.items():
        write(relpath, data)
        errors[relpath] = case
        cases[case] = relpath

    # unreadable file: an error only if chmod 000 really blocks reading (not as root)
    relpath = "beta/unreadable.jpg"
    locked_file = write(relpath, jpeg_bytes(good_image("beta", 92)))
    locked_file.chmod(0)
    cases["unreadable_file"] = relpath
    unreadable_effective = not _readable(locked_file)
    if unreadable_effective:
        errors[relpath] = "unreadable_file"
    else:
        decode[relpath] = "beta"

    # unreadable folder inside a class: skipped by discover if it really cannot be listed
    relpath = "alpha/locked"
    write(f"{relpath}/inside.png", gray16_png())
    (root / relpath).chmod(0)
    cases["unreadable_dir"] = relpath
    if _readable(root / relpath):
        decode[f"{relpath}/inside.png"] = "alpha"
    else:
        skipped[relpath] = "unreadable_dir"

    (root / "alpha/loop.jpg").symlink_to("loop.jpg")  # a symlink to itself
    skipped["alpha/loop.jpg"] = "symlink_loop_file"
    cases["symlink_loop_file"] = "alpha/loop.jpg"
    (root / "beta/again").symlink_to(".", target_is_directory=True)  # folder links to itself
    skipped["beta/again"] = "symlink_loop_dir"
    cases["symlink_loop_dir"] = "beta/again"
    write("beta/folder.jpg/hidden_inside.jpg", jpeg_bytes(good_image("beta", 93)))
    skipped["beta/folder.jpg"] = "dir_named_like_image"
    cases["dir_named_like_image"] = "beta/folder.jpg"
    write("alpha/notes.txt", b"not an image\n")
    skipped["alpha/notes.txt"] = "not_image_extension"
    cases["not_image_extension"] = "alpha/notes.txt"

    return {
        "root": root,
        "classes": sorted([*CLASS_STYLES, EMPTY_CLASS]),
        "empty_classes": [EMPTY_CLASS],
        "decode": decode,
        "errors": errors,
        "skipped": skipped,
        "cases": cases,
        "unreadable_effective": unreadable_effective,
    }
