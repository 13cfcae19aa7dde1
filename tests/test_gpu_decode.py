"""GPU decode: which files go to nvJPEG, the CPU fallback, the same bad-input table.

The decoder runs on ``device="cpu"`` here (torchvision's libjpeg instead of nvJPEG): the
dispatch, fallback, resize geometry and batching are the same code. ``gpu`` tests run it on
CUDA and compare its features with the CPU path's.
"""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from embedx import gpu, preprocess
from tests.corpus import good_image, jpeg_bytes, make_corpus

SPEC = preprocess.PreprocessSpec(input_size=32, resize_size=36, mean=(0.5,) * 3, std=(0.5,) * 3)


def _photo(size=(64, 48), seed=0) -> Image.Image:
    rng = np.random.default_rng(seed)
    base = np.linspace(0, 255, size[0] * size[1] * 3).reshape(size[1], size[0], 3)
    return Image.fromarray(np.clip(base + rng.normal(0, 20, base.shape), 0, 255).astype(np.uint8))


def test_plain_jpegs_are_eligible_and_awkward_ones_are_not():
    plain = jpeg_bytes(_photo())
    assert gpu.gpu_eligible(plain)
    assert gpu.gpu_eligible(plain + b"\0\0\0")  # zero padding after EOI
    assert gpu.gpu_eligible(jpeg_bytes(_photo().convert("L")))
    progressive = jpeg_bytes(_photo(), progressive=True)
    assert not gpu.gpu_eligible(progressive)
    assert not gpu.gpu_eligible(plain[: len(plain) // 2])  # truncated
    assert not gpu.gpu_eligible(jpeg_bytes(_photo().convert("CMYK")))
    png = io.BytesIO()
    _photo().save(png, "PNG")
    assert not gpu.gpu_eligible(png.getvalue())
    assert not gpu.gpu_eligible(b"")
    rotated = io.BytesIO()
    exif = Image.Exif()
    exif[0x0112] = 6
    _photo().save(rotated, "JPEG", exif=exif)
    assert not gpu.gpu_eligible(rotated.getvalue())


def test_decoded_batches_match_the_cpu_path_in_geometry_and_colour():
    datas = [bytearray(jpeg_bytes(_photo(size, seed), quality=95))
             for seed, size in enumerate([(64, 48), (48, 64), (64, 48), (40, 40)])]
    decoder = gpu.TorchDecoder(SPEC, device="cpu")
    pixels, rows, errors = decoder.decode(datas)
    assert rows == [0, 1, 2, 3] and errors == []
    assert tuple(pixels.shape) == (4, 32, 32, 3) and str(pixels.dtype) == "torch.uint8"
    assert decoder.gpu_images == 4 and decoder.cpu_images == 0
    for data, got in zip(datas, pixels.numpy(), strict=True):
        reference = preprocess.to_pixels(bytes(data), SPEC).astype(np.float64)
        # another JPEG decoder and resampler: close, not equal
        assert np.abs(got.astype(np.float64) - reference).mean() < 6.0


def test_files_the_device_cannot_take_fall_back_to_the_cpu_in_order():
    good = bytearray(jpeg_bytes(_photo()))
    png = io.BytesIO()
    _photo(seed=3).save(png, "PNG")
    broken = bytearray(b"not an image at all")
    decoder = gpu.TorchDecoder(SPEC, device="cpu")
    pixels, rows, errors = decoder.decode([good, bytearray(png.getvalue()), broken, good])
    assert rows == [0, 1, 3]
    assert [index for index, _ in errors] == [2]
    assert decoder.cpu_images == 1 and decoder.gpu_images == 2
    np.testing.assert_array_equal(pixels[1].numpy(), preprocess.to_pixels(png.getvalue(), SPEC))


def test_the_bad_input_table_is_the_cpu_paths(tmp_path):
    corpus = make_corpus(tmp_path / "data")
    files = sorted(corpus["decode"]) + sorted(corpus["errors"])
    paths = [str(tmp_path / "data" / relpath) for relpath in files]
    source = gpu.GpuDecodeSource(SPEC, [paths[:7], paths[7:]], device="cpu", read_threads=2)
    try:
        batches = list(source)
    finally:
        source.close()
    decoded, failed = set(), {}
    offset = 0
    for batch, count in zip(batches, (7, len(paths) - 7), strict=True):
        assert len(batch["keys"]) == count
        assert tuple(batch["pixels"].shape)[0] == len(batch["rows"])
        decoded |= {files[offset + i] for i in batch["rows"]}
        failed |= {files[offset + i]: reason for i, reason in batch["errors"]}
        offset += count
    assert decoded == set(corpus["decode"])
    assert set(failed) == set(corpus["errors"])
    for relpath in failed:  # the CPU path fails on the same files, with the same reasons
        data = (tmp_path / "data" / relpath).read_bytes()
        with pytest.raises(Exception) as caught:
            preprocess.to_pixels(data, SPEC)
        assert failed[relpath] in (getattr(caught.value, "reason", None), "cannot read: Permission denied")


def test_resolve_decode():
    assert gpu.resolve_decode("cpu", True) == "cpu"
    assert gpu.resolve_decode("auto", False) == "cpu"
    with pytest.raises(Exception, match="--decode gpu needs"):
        gpu.resolve_decode("gpu", False)
    with pytest.raises(Exception, match="decode must be one of"):
        gpu.resolve_decode("nvjpeg", True)


@pytest.mark.gpu
def test_gpu_decode_matches_the_cpu_decode_on_cuda():
    if not gpu.cuda_decode_available():
        pytest.skip("no CUDA device with torch here")
    datas = [bytearray(jpeg_bytes(good_image("alpha", i, size=(80, 60)))) for i in range(8)]
    decoder = gpu.TorchDecoder(SPEC, device="cuda")
    pixels, rows, errors = decoder.decode(datas)
    assert rows == list(range(8)) and errors == [] and pixels.device.type == "cuda"
    for data, got in zip(datas, pixels.cpu().numpy(), strict=True):
        reference = preprocess.to_pixels(bytes(data), SPEC).astype(np.float64)
        assert np.abs(got.astype(np.float64) - reference).mean() < 6.0


def test_batches_come_back_in_order_from_several_decode_threads(tmp_path):
    from embedx import fsio

    paths = []
    for i in range(23):
        path = tmp_path / f"{i:02d}.jpg"
        path.write_bytes(jpeg_bytes(_photo(seed=i)))
        paths.append(str(path))
    batches = [paths[i : i + 3] for i in range(0, len(paths), 3)]
    source = gpu.GpuDecodeSource(SPEC, batches, device="cpu", read_threads=2, decode_threads=3)
    try:
        got = [batch["keys"] for batch in source]
    finally:
        source.close()
    assert got == [[fsio.sha256_file(p) for p in batch] for batch in batches]


def test_closing_early_stops_the_threads(tmp_path):
    paths = []
    for i in range(12):
        path = tmp_path / f"{i:02d}.jpg"
        path.write_bytes(jpeg_bytes(_photo(seed=i)))
        paths.append(str(path))
    source = gpu.GpuDecodeSource(SPEC, [[p] for p in paths], device="cpu", decode_threads=2)
    first = next(iter(source))
    assert len(first["rows"]) == 1
    source.close()
    assert not any(thread.is_alive() for thread in source._threads)


def test_large_batches_are_decoded_and_resized_in_bounded_parts(monkeypatch):
    datas = [bytearray(jpeg_bytes(_photo((64, 48), seed))) for seed in range(5)]
    whole, rows, _ = gpu.TorchDecoder(SPEC, device="cpu").decode(datas)
    monkeypatch.setattr(gpu, "PIXELS_PER_PASS", 64 * 48 * 2)  # two images a pass
    calls = []
    real = gpu.TorchDecoder._decode_many
    monkeypatch.setattr(gpu.TorchDecoder, "_decode_many", lambda self, d: calls.append(len(d)) or real(self, d))
    parts, rows_parts, _ = gpu.TorchDecoder(SPEC, device="cpu").decode(datas)
    assert calls == [2, 2, 1] and rows_parts == rows == [0, 1, 2, 3, 4]
    assert (parts.numpy() == whole.numpy()).all()


def test_a_device_failure_sends_the_batch_to_the_cpu(monkeypatch):
    def out_of_memory(self, images):
        raise RuntimeError("CUDA out of memory (simulated)")

    monkeypatch.setattr(gpu.TorchDecoder, "_resize_crop", out_of_memory)
    datas = [bytearray(jpeg_bytes(_photo(seed=seed))) for seed in range(3)]
    decoder = gpu.TorchDecoder(SPEC, device="cpu")
    pixels, rows, errors = decoder.decode(datas)
    assert rows == [0, 1, 2] and errors == [] and decoder.cpu_images == 3 and decoder.gpu_images == 0
    np.testing.assert_array_equal(pixels[1].numpy(), preprocess.to_pixels(bytes(datas[1]), SPEC))


def test_decode_threads_that_stop_are_an_error_not_a_hang(tmp_path, monkeypatch):
    from embedx.errors import BackendError

    path = tmp_path / "a.jpg"
    path.write_bytes(jpeg_bytes(_photo()))
    monkeypatch.setattr(gpu.GpuDecodeSource, "_work", lambda self: None)  # threads that end at once
    source = gpu.GpuDecodeSource(SPEC, [[str(path)]], device="cpu")
    with pytest.raises(BackendError, match="stopped before batch 0"):
        list(source)
    source.close()
