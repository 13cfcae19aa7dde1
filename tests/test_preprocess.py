"""preprocess: same pixels as torchvision's eval transform; every bad input decoded or refused."""

from __future__ import annotations

import dataclasses
import io
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image, ImageFile

from embedx import preprocess
from embedx.errors import ConfigError, ImageDecodeError
from embedx.preprocess import PreprocessSpec
from tests.corpus import make_corpus

#: exact mode: pixel for pixel torchvision (the fast mode has its own tests below)
SPECS = {
    "imagenet": PreprocessSpec(mode="exact"),
    "bicubic-274": PreprocessSpec(input_size=240, resize_size=274, interpolation="bicubic",
                                  mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), mode="exact"),
    "no-crop": PreprocessSpec(input_size=224, resize_size=224, mode="exact"),
}
FAST = PreprocessSpec()

SIZES = [(500, 375), (375, 500), (224, 224), (257, 1000), (1000, 257), (301, 299), (100, 80),
         (640, 480), (333, 777), (256, 256), (255, 300), (1024, 768), (3, 700), (1200, 1199)]


def torchvision_transform(spec: PreprocessSpec):
    """The tutorial's eval transform (one definition, shared with bench/decode.py)."""
    pytest.importorskip("torchvision")
    import torch

    from bench.decode import tutorial_transform

    torch.set_num_threads(1)
    return tutorial_transform(spec)


def noise_image(width: int, height: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8), "RGB")


def photo_jpeg(width: int, height: int, seed: int = 0) -> bytes:
    """Smooth shapes plus mild noise: compresses like a photo, unlike pure noise."""
    rng = np.random.default_rng(seed)
    coarse = rng.integers(0, 256, (max(2, height // 60), max(2, width // 60), 3), dtype=np.uint8)
    smooth = np.asarray(Image.fromarray(coarse).resize((width, height), Image.Resampling.BICUBIC))
    pixels = np.clip(smooth.astype(np.int16) + rng.integers(-8, 9, smooth.shape), 0, 255)
    buffer = io.BytesIO()
    Image.fromarray(pixels.astype(np.uint8)).save(buffer, "JPEG", quality=90)
    return buffer.getvalue()


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return make_corpus(tmp_path_factory.mktemp("corpus") / "data", n_good_per_class=2)


# -- geometry: identical to torchvision ------------------------------------------------


@pytest.mark.parametrize("spec_name", list(SPECS))
def test_load_matches_torchvision_on_pil_images(spec_name):
    spec = SPECS[spec_name]
    reference = torchvision_transform(spec)
    for i, (width, height) in enumerate(SIZES):
        image = noise_image(width, height, seed=i)
        expected = reference(image).numpy()
        got = preprocess.load(image, spec)
        assert got.shape == expected.shape == (3, spec.input_size, spec.input_size)
        assert got.dtype == np.float32
        np.testing.assert_allclose(got, expected, atol=1e-5, rtol=0, err_msg=f"{width}x{height}")


@pytest.mark.parametrize("spec_name", list(SPECS))
def test_resize_crop_is_bit_identical_to_resize_then_crop(spec_name):
    """The partial (box) resize must not change a single pixel, for any image size."""
    spec = SPECS[spec_name]
    resample = preprocess._INTERPOLATIONS[spec.interpolation]
    rng = np.random.default_rng(7)
    sizes = SIZES + [tuple(int(v) for v in pair) for pair in rng.integers(40, 1000, (30, 2))]
    used_box = 0
    for width, height in sizes:
        image = noise_image(width, height, seed=width * height)
        new_w, new_h, left, top = preprocess._geometry(width, height, spec)
        crop = spec.input_size
        full = np.asarray(image.resize((new_w, new_h), resample))[top : top + crop, left : left + crop]
        got = np.asarray(preprocess.resize_crop(image, spec))
        assert np.array_equal(got, full), f"{width}x{height} differs from resize-then-crop"
        used_box += preprocess._plan(width, height, spec)[0] != (new_w, new_h)
    if spec.resize_size == 256:
        assert used_box > len(sizes) // 2  # the fast path is actually taken


def test_load_from_png_file_matches_torchvision(tmp_path):
    spec = SPECS["imagenet"]
    path = tmp_path / "x.png"
    noise_image(613, 401).save(path)
    expected = torchvision_transform(spec)(Image.open(path).convert("RGB")).numpy()
    np.testing.assert_allclose(preprocess.load(path, spec), expected, atol=1e-5, rtol=0)
    np.testing.assert_allclose(preprocess.load(path.read_bytes(), spec), expected, atol=1e-5, rtol=0)


def test_small_jpeg_is_decoded_at_full_size_and_matches(tmp_path):
    spec = SPECS["imagenet"]
    data = photo_jpeg(500, 375)
    assert preprocess.decode(data, min_size=spec.resize_size).size == (500, 375)
    expected = torchvision_transform(spec)(Image.open(io.BytesIO(data)).convert("RGB")).numpy()
    np.testing.assert_allclose(preprocess.load(data, spec), expected, atol=1e-5, rtol=0)


def test_large_jpeg_uses_draft_within_a_small_tolerance():
    spec = SPECS["imagenet"]
    data = photo_jpeg(2000, 1500, seed=3)
    drafted = preprocess.decode(data, min_size=spec.resize_size)
    assert drafted.size == (1000, 750)  # 1/2: the short side stays >= 2 x 256
    assert preprocess.decode(data).size == (2000, 1500)
    expected = torchvision_transform(spec)(Image.open(io.BytesIO(data)).convert("RGB")).numpy()
    difference = np.abs(preprocess.load(data, spec) - expected)
    # measured: mean 0.003, max 0.0175 (normalized units; one grey level is ~0.017)
    assert difference.mean() < 0.01
    assert difference.max() < 0.1


@pytest.mark.parametrize(
    ("width", "height", "min_size", "scale"),
    [(2000, 1500, 256, 2), (4000, 3000, 256, 4), (800, 533, 256, 1), (1024, 1024, 256, 2),
     (1023, 1023, 256, 2), (1022, 1022, 256, 1), (6000, 4000, 256, 4), (9000, 8200, 256, 8),
     (300, 300, None, 1)],
)
def test_draft_scale(width, height, min_size, scale):
    assert preprocess._draft_scale(width, height, min_size or 10**9) == scale


def test_normalize_is_the_torchvision_formula():
    spec = SPECS["imagenet"]
    pixels = np.random.default_rng(0).integers(0, 256, (5, 7, 3), dtype=np.uint8)
    expected = (pixels.transpose(2, 0, 1) / 255.0 - np.array(spec.mean)[:, None, None]) / np.array(
        spec.std
    )[:, None, None]
    np.testing.assert_allclose(preprocess.normalize(pixels, spec), expected, atol=1e-5)


def test_to_pixels_and_batches(tmp_path):
    spec = SPECS["imagenet"]
    paths = []
    for i, size in enumerate([(300, 200), (200, 300), (224, 224)]):
        paths.append(tmp_path / f"{i}.png")
        noise_image(*size, seed=i).save(paths[-1])
    pixels = preprocess.to_pixels(paths[0], spec)
    assert pixels.shape == (224, 224, 3) and pixels.dtype == np.uint8 and pixels.flags.c_contiguous
    batch = preprocess.load_batch(paths, spec)
    assert batch.shape == (3, 3, 224, 224) and batch.dtype == np.float32
    for row, path in zip(batch, paths, strict=True):
        np.testing.assert_array_equal(row, preprocess.load(path, spec))
    np.testing.assert_array_equal(batch[0], preprocess.normalize(pixels, spec))
    out = np.zeros((3, 224, 224), np.float32)
    assert preprocess.load(paths[1], spec, out=out) is out
    np.testing.assert_array_equal(out, batch[1])


# -- every awkward input --------------------------------------------------------------


def mean_rgb(image: Image.Image, box=None) -> np.ndarray:
    pixels = np.asarray(image.crop(box) if box else image, dtype=np.float64)
    return pixels.reshape(-1, 3).mean(axis=0)


def test_corpus_good_images_decode_to_rgb(corpus):
    for relpath in corpus["decode"]:
        image = preprocess.decode(corpus["root"] / relpath)
        assert image.mode == "RGB", relpath
        pixels = preprocess.to_pixels(corpus["root"] / relpath, SPECS["imagenet"])
        assert pixels.shape == (224, 224, 3)


def test_cmyk_jpeg(corpus):
    image = preprocess.decode(corpus["root"] / corpus["cases"]["cmyk"])
    np.testing.assert_allclose(mean_rgb(image), [0, 255, 255], atol=6)  # cyan


def test_16bit_png_is_scaled_not_clipped(corpus):
    path = corpus["root"] / corpus["cases"]["gray16"]
    assert Image.open(path).mode.startswith("I")
    image = preprocess.decode(path)
    np.testing.assert_allclose(mean_rgb(image, (0, 0, 20, 32)), [64, 64, 64], atol=1)
    np.testing.assert_allclose(mean_rgb(image, (20, 0, 40, 32)), [191, 191, 191], atol=1)


def test_palette_transparency_is_composited_on_white(corpus):
    image = preprocess.decode(corpus["root"] / corpus["cases"]["palette_transparent"])
    np.testing.assert_array_equal(mean_rgb(image, (0, 0, 20, 32)), [255, 255, 255])
    np.testing.assert_array_equal(mean_rgb(image, (20, 0, 40, 32)), [0, 200, 0])


def test_rgba_and_la_are_composited_on_white():
    rgba = Image.new("RGBA", (4, 4), (255, 0, 0, 0))
    rgba.paste((0, 0, 255, 255), (2, 0, 4, 4))
    half = Image.new("LA", (4, 4), (0, 128))
    for image, left, right in [(rgba, [255, 255, 255], [0, 0, 255])]:
        buffer = io.BytesIO()
        image.save(buffer, "PNG")
        decoded = preprocess.decode(buffer.getvalue())
        np.testing.assert_array_equal(mean_rgb(decoded, (0, 0, 2, 4)), left)
        np.testing.assert_array_equal(mean_rgb(decoded, (2, 0, 4, 4)), right)
    buffer = io.BytesIO()
    half.save(buffer, "PNG")
    np.testing.assert_allclose(mean_rgb(preprocess.decode(buffer.getvalue())), [127, 127, 127], atol=1)


def test_grayscale(corpus):
    image = preprocess.decode(corpus["root"] / corpus["cases"]["grayscale"])
    np.testing.assert_array_equal(mean_rgb(image), [100, 100, 100])


def test_exif_rotation_is_applied(corpus):
    path = corpus["root"] / corpus["cases"]["exif_rotated"]
    assert Image.open(path).size == (48, 32)
    image = preprocess.decode(path)
    assert image.size == (32, 48)
    top, bottom = mean_rgb(image, (0, 0, 32, 20)), mean_rgb(image, (0, 28, 32, 48))
    assert top[0] > 200 and top[2] < 60  # red on top
    assert bottom[2] > 200 and bottom[0] < 60  # blue below


def test_animated_gif_gives_the_first_frame(corpus):
    image = preprocess.decode(corpus["root"] / corpus["cases"]["animated_gif"])
    np.testing.assert_allclose(mean_rgb(image), [255, 0, 0], atol=2)


@pytest.mark.parametrize("case", ["space_name", "non_ascii_name"])
def test_odd_names(corpus, case):
    path = corpus["root"] / corpus["cases"][case]
    assert preprocess.decode(path).size == (40, 32)
    assert preprocess.decode(str(path)).size == (40, 32)


@pytest.mark.parametrize(
    ("case", "reason"),
    [
        ("zero_byte", "empty file (0 bytes)"),
        ("truncated_jpeg", "truncated image data"),
        ("text_as_jpg", "a text file, not an image"),
        ("html_as_png", "an HTML/XML document"),
        ("bomb", "decompression bomb"),
    ],
)
def test_bad_files_raise_with_a_reason(corpus, case, reason):
    path = corpus["root"] / corpus["cases"][case]
    for source in (path, path.read_bytes()):
        with pytest.raises(ImageDecodeError) as info:
            preprocess.decode(source)
        assert reason in str(info.value)
        assert info.value.reason in str(info.value) and str(path) not in info.value.reason
        assert "\n" not in str(info.value)
        for spec in (SPECS["imagenet"], FAST):  # the fast decoder hands what it refuses to Pillow
            with pytest.raises(ImageDecodeError) as info:
                preprocess.load(source, spec)
            assert reason in str(info.value)


def test_bomb_is_refused_before_decoding(corpus):
    """20000x20000 claimed by a 100-byte file: refused from the header, nothing allocated."""
    path = corpus["root"] / corpus["cases"]["bomb"]
    assert path.stat().st_size < 200
    with pytest.raises(ImageDecodeError, match="20000x20000|400000000"):
        preprocess.decode(path)


def test_corrupt_data_after_a_valid_header():
    buffer = io.BytesIO()
    noise_image(64, 64).save(buffer, "PNG")
    data = bytearray(buffer.getvalue())
    data[60:80] = b"\x00" * 20  # inside the compressed pixels (IDAT), after a valid header
    with pytest.raises(ImageDecodeError) as info:
        preprocess.decode(bytes(data))
    assert "image" in info.value.reason and "Error" in info.value.reason


@pytest.mark.parametrize("image_format", ["PNG", "JPEG"])
def test_over_our_limit_but_under_pillows(monkeypatch, image_format):
    monkeypatch.setattr(preprocess, "MAX_IMAGE_PIXELS", 100)
    buffer = io.BytesIO()
    Image.new("RGB", (11, 10)).save(buffer, image_format)
    with pytest.raises(ImageDecodeError, match="11x10 pixels exceeds the limit of 100"):
        preprocess.decode(buffer.getvalue())
    with pytest.raises(ImageDecodeError, match="11x10 pixels exceeds the limit of 100"):
        preprocess.load(buffer.getvalue(), FAST)


def test_unreadable_file(corpus):
    path = corpus["root"] / corpus["cases"]["unreadable_file"]
    if not corpus["unreadable_effective"]:
        pytest.skip("chmod 000 does not stop this user (root?) from reading; see the next test")
    with pytest.raises(ImageDecodeError, match="permission denied"):
        preprocess.decode(path)


def test_permission_error_is_a_decode_error(tmp_path, monkeypatch):
    path = tmp_path / "x.png"
    noise_image(8, 8).save(path)

    def refuse(*args, **kwargs):
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(preprocess.Image, "open", refuse)
    with pytest.raises(ImageDecodeError, match="permission denied"):
        preprocess.decode(path)


def test_missing_and_directory(tmp_path):
    with pytest.raises(ImageDecodeError, match="file not found"):
        preprocess.decode(tmp_path / "nope.jpg")
    (tmp_path / "dir.jpg").mkdir()
    with pytest.raises(ImageDecodeError, match="is a directory"):
        preprocess.decode(tmp_path / "dir.jpg")


def test_truncated_images_stay_errors():
    """Nothing in embedx turns on Pillow's global LOAD_TRUNCATED_IMAGES."""
    import embedx.data  # noqa: F401
    import embedx.runtime  # noqa: F401

    assert ImageFile.LOAD_TRUNCATED_IMAGES is False


# -- spec ------------------------------------------------------------------------------


def test_spec_round_trips_and_validates():
    spec = SPECS["bicubic-274"]
    assert PreprocessSpec.from_json(spec.to_json()) == spec
    assert PreprocessSpec.from_json(FAST.to_json()) == FAST
    with pytest.raises(ConfigError, match="mode"):
        PreprocessSpec(mode="turbo")
    assert PreprocessSpec.from_dict({**spec.to_dict(), "unknown": 1}) == spec
    assert PreprocessSpec(mean=[0.5, 0.5, 0.5]).mean == (0.5, 0.5, 0.5)
    with pytest.raises(ConfigError, match="interpolation"):
        PreprocessSpec(interpolation="area")
    with pytest.raises(ConfigError, match="resize_size"):
        PreprocessSpec(input_size=300, resize_size=256)
    with pytest.raises(ConfigError, match="three values"):
        PreprocessSpec(mean=(0.5, 0.5))


def test_fast_is_the_default_and_a_spec_without_mode_is_exact():
    """A spec recorded before ``mode`` existed (cache, ONNX metadata) was made the exact way,
    and fast and exact specs never compare or serialize equal (a cache is never reused
    across modes)."""
    assert FAST.mode == "fast"
    legacy = {k: v for k, v in FAST.to_dict().items() if k != "mode"}
    assert PreprocessSpec.from_dict(legacy).mode == "exact"
    assert PreprocessSpec.from_json(json.dumps(legacy)) == SPECS["imagenet"]
    assert FAST != SPECS["imagenet"] and FAST.to_json() != SPECS["imagenet"].to_json()


def test_cache_identity_differs_between_modes():
    from embedx.cache import CacheMeta

    def meta(spec: dict) -> CacheMeta:
        return CacheMeta(backbone="b", weights_tag="w", weights_arg="", onnx_path="m.onnx", onnx_sha256="0",
                         feature_layer="avgpool", feature_dim=8, preprocess=spec)

    fast, exact = meta(FAST.to_dict()), meta(SPECS["imagenet"].to_dict())
    assert fast.fingerprint != exact.fingerprint
    assert any(line.startswith("preprocess:") and "'fast'" in line for line in fast.differences(exact))
    legacy = meta({k: v for k, v in SPECS["imagenet"].to_dict().items() if k != "mode"})
    assert legacy.fingerprint != fast.fingerprint


# -- fast mode: libjpeg-turbo + OpenCV, close to the exact path ----------------------


def test_fast_jpeg_is_decoded_by_libjpeg_turbo_and_stays_close():
    data = photo_jpeg(500, 375, seed=5)
    turbo = preprocess._turbo_decode(data, FAST.resize_size)
    assert turbo is not None and turbo.shape == (375, 500, 3) and turbo.dtype == np.uint8
    full = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"), dtype=np.int16)
    # fast DCT and upsampling, 4:2:0 chroma: measured 1.3 grey levels on average
    assert np.abs(turbo.astype(np.int16) - full).mean() < 2.0
    fast, exact = preprocess.load(data, FAST), preprocess.load(data, SPECS["imagenet"])
    assert fast.shape == exact.shape == (3, 224, 224) and fast.dtype == np.float32
    # measured: mean 0.021 normalized units (one grey level is 0.017), max 0.12
    assert np.abs(fast - exact).mean() < 0.05
    for same in (data, bytearray(data), memoryview(data)):
        np.testing.assert_array_equal(preprocess.load(same, FAST), fast)


def test_fast_large_jpeg_decodes_at_the_draft_scale():
    data = photo_jpeg(2000, 1500, seed=3)
    assert preprocess._turbo_decode(data, FAST.resize_size).shape == (750, 1000, 3)
    assert preprocess._turbo_decode(data, None).shape == (1500, 2000, 3)
    exact = preprocess.load(data, SPECS["imagenet"])
    assert np.abs(preprocess.load(data, FAST) - exact).mean() < 0.05


@pytest.mark.parametrize(("width", "height"), [(500, 375), (375, 500), (257, 1000), (1000, 257), (224, 224),
                                               (100, 80), (3, 700), (1200, 1199)])
@pytest.mark.parametrize("spec_name", list(SPECS))
def test_fast_resize_geometry_and_partial_blur(spec_name, width, height):
    """Blurring only the region the crop reads (in place) equals blurring the whole image;
    the output is torchvision's crop of the same scene, close to the exact path."""
    import cv2

    spec = dataclasses.replace(SPECS[spec_name], mode="fast")
    image = np.asarray(Image.open(io.BytesIO(photo_jpeg(width, height, seed=width))).convert("RGB"))
    got = preprocess._fast_resized_view(image.copy(), spec)
    assert got.shape == (spec.input_size, spec.input_size, 3)
    new_w, new_h, left, top = preprocess._geometry(width, height, spec)
    scale_x, scale_y = width / new_w, height / new_h
    whole = image
    if max(scale_x, scale_y) > 1:
        sigmas = [np.sqrt(max(s * s - 1, 0) / 6) for s in (scale_x, scale_y)]
        radii = [max(1, int(np.ceil(2 * sigma))) for sigma in sigmas]
        whole = cv2.GaussianBlur(image, (2 * radii[0] + 1, 2 * radii[1] + 1),
                                 sigmaX=max(sigmas[0], 1e-3), sigmaY=max(sigmas[1], 1e-3))
    interpolation = preprocess._CV2_INTERPOLATIONS[spec.interpolation]
    expected = cv2.resize(whole, (new_w, new_h), interpolation=interpolation)
    crop = spec.input_size
    np.testing.assert_array_equal(got, expected[top : top + crop, left : left + crop])
    exact = preprocess.to_pixels(Image.fromarray(image), SPECS[spec_name]).astype(np.int16)
    assert np.abs(got.astype(np.int16) - exact).mean() < 3.0  # grey levels


def test_fast_pil_input_is_not_modified():
    image = noise_image(500, 375)
    before = np.asarray(image).copy()
    preprocess.load(image, FAST)
    np.testing.assert_array_equal(np.asarray(image), before)


def test_fast_mode_on_every_awkward_input_matches_exact(corpus):
    """EXIF rotation, CMYK, palettes, 16-bit, gray, GIF: decoded as the exact path does
    (Pillow, or libjpeg-turbo for plain JPEGs), then resized close to it."""
    for relpath in corpus["decode"]:
        path = corpus["root"] / relpath
        fast = preprocess.to_pixels(path, FAST).astype(np.int16)
        exact = preprocess.to_pixels(path, SPECS["imagenet"]).astype(np.int16)
        assert fast.shape == exact.shape == (224, 224, 3), relpath
        # tiny noisy JPEGs upscaled 8x magnify the fast DCT: measured up to 4.3 grey levels
        assert np.abs(fast - exact).mean() < 6.0, relpath


def _jpeg_with_orientation(orientation: int | None) -> bytes:
    image = Image.new("RGB", (48, 32), (255, 0, 0))
    image.paste((0, 0, 255), (24, 0, 48, 32))
    buffer = io.BytesIO()
    exif = Image.Exif()
    if orientation is not None:
        exif[0x0112] = orientation
    exif[0x010F] = "camera"
    image.save(buffer, "JPEG", exif=exif.tobytes(), quality=95)
    return buffer.getvalue()


@pytest.mark.parametrize("orientation", [None, 1, 3, 6, 8])
def test_jpeg_orientation_reader_agrees_with_pillow(orientation):
    data = _jpeg_with_orientation(orientation)
    assert preprocess._jpeg_orientation(data) == Image.open(io.BytesIO(data)).getexif().get(0x0112, 1)
    fast = preprocess.to_pixels(data, FAST).astype(np.int16)
    exact = preprocess.to_pixels(data, SPECS["imagenet"]).astype(np.int16)
    assert np.abs(fast - exact).mean() < 4.0  # rotated the same way


def test_jpeg_orientation_reader_gives_up_on_what_it_cannot_follow():
    data = _jpeg_with_orientation(6)
    assert preprocess._jpeg_orientation(b"\xff\xd8" + b"\x00" * 20) is None
    start = data.index(b"Exif\0\0") + 6
    broken = data[:start] + b"XX" + data[start + 2 :]  # not II/MM
    assert preprocess._jpeg_orientation(broken) is None


def test_preprocess_is_torch_free():
    code = "import embedx.preprocess, sys; sys.exit(int('torch' in sys.modules))"
    assert subprocess.run([sys.executable, "-c", code], env={**os.environ}).returncode == 0


@pytest.mark.slow
def test_hymenoptera_matches_torchvision_without_draft(hymenoptera):
    """Every real image (no draft, PIL in): within 1e-5 of the tutorial transform."""
    spec = SPECS["imagenet"]
    reference = torchvision_transform(spec)
    paths = sorted(p for p in hymenoptera.rglob("*") if p.is_file())
    worst = 0.0
    for path in paths:
        image = Image.open(path).convert("RGB")  # as the tutorial: no EXIF, no compositing
        worst = max(worst, float(np.abs(preprocess.load(image, spec) - reference(image).numpy()).max()))
    assert worst < 1e-5


@pytest.mark.slow
def test_hymenoptera_draft_stays_close(hymenoptera):
    """The real JPEGs large enough to be drafted: close to a full decode, on average and at worst.

    Measured with JPEG_DRAFT_GAP=2: mean 0.001, max 0.09 (drafting down to the target
    size, gap 1, gave mean 0.033 and max 1.5 on the same images).
    """
    spec = SPECS["imagenet"]
    reference = torchvision_transform(spec)
    drafted = []
    for path in sorted(hymenoptera.rglob("*.jpg")):
        with Image.open(path) as image:
            if preprocess._draft_scale(*image.size, spec.resize_size) > 1:
                drafted.append(path)
    if not drafted:
        pytest.skip("no JPEG in the data set is large enough to be drafted")
    differences = [np.abs(preprocess.load(path, spec) - reference(Image.open(path).convert("RGB")).numpy())
                   for path in drafted]
    assert np.mean([d.mean() for d in differences]) < 0.005
    assert max(d.max() for d in differences) < 0.25
