"""Decoding on the GPU: nvJPEG through torchvision, resize and crop in CUDA tensors.

``--decode gpu`` (and ``auto`` on a CUDA device) reads files in threads, hashes their bytes
(the cache keys), decodes the plain JPEGs of a batch in one ``torchvision.io.decode_jpeg``
call on the device, resizes them there (antialiased bilinear, torchvision's ``Resize``
geometry) and crops the centre: the batch leaves as uint8 NHWC on the GPU, ready for a
pixel-input model bound in place (``OrtModel.bound(...).run`` takes CUDA tensors).

Files nvJPEG should not or cannot take (PNG, progressive or CMYK JPEGs, EXIF-rotated,
truncated, anything it fails on) go to the CPU decoder one by one (``preprocess.to_pixels``,
the ``fast`` path), so the bad-input table records what the CPU path records.

Imports torch; loaded only when GPU decode is asked for. ``device="cpu"`` runs the same
code on the CPU (torchvision's libjpeg), which is how the dispatch and fallback are tested
on machines without a GPU.
"""

from __future__ import annotations

import logging
import math
import os
import threading
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from embedx import fsio, preprocess

logger = logging.getLogger(__name__)

DECODES = ("auto", "cpu", "gpu")
#: Batches decoded ahead of the one being computed (each a uint8 batch on the device).
PREFETCH = 3
#: Threads that read and hash files for the GPU decoder (I/O and hashlib release the GIL).
READ_THREADS = 8
#: Threads that decode batches on the GPU, each on its own CUDA stream.
DECODE_THREADS = 3
#: Most source pixels one decode call or one resize pass holds (a float32 RGB copy of this many
#: is 0.8 GB): a batch of large photos is decoded and resized in several parts, so device memory
#: stays bounded whatever the images' sizes.
PIXELS_PER_PASS = 1 << 26

_SOF_SEQUENTIAL = (0xC0, 0xC1)  # baseline and extended sequential Huffman
_SOF_OTHER = frozenset({0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF})


def cuda_decode_available() -> bool:
    """torch with a usable CUDA device and torchvision's nvJPEG decoder."""
    try:
        import torch
        import torchvision.io  # noqa: F401
    except ImportError:
        return False
    return bool(torch.cuda.is_available())


def gpu_size(data: bytes | bytearray | memoryview) -> tuple[int, int] | None:
    """A JPEG nvJPEG decodes the way the CPU path would: sequential (not progressive),
    8-bit, 1 or 3 components (not CMYK, not Adobe RGB-transformed), complete (ends in EOI),
    no EXIF rotation, under the decompression-bomb limit: its (width, height), else None."""
    size = len(data)
    if size < 4 or data[0] != 0xFF or data[1] != 0xD8:
        return None
    end = size
    while end > 2 and data[end - 1] == 0:  # zero padding after EOI is common and harmless
        end -= 1
    if data[end - 2] != 0xFF or data[end - 1] != 0xD9:
        return None
    position = 2
    while position + 4 <= size:
        if data[position] != 0xFF:
            return None
        marker = data[position + 1]
        if marker == 0xFF:
            position += 1
            continue
        length = int.from_bytes(data[position + 2 : position + 4], "big")
        if marker == 0xEE:  # Adobe APP14: a transform other than YCbCr goes to the CPU
            segment = bytes(data[position + 4 : position + 2 + length])
            if segment.startswith(b"Adobe") and len(segment) >= 12 and segment[11] != 1:
                return None
        if marker in _SOF_SEQUENTIAL:
            if position + 10 > size:
                return None
            precision = data[position + 4]
            height = int.from_bytes(data[position + 5 : position + 7], "big")
            width = int.from_bytes(data[position + 7 : position + 9], "big")
            components = data[position + 9]
            if precision != 8 or components not in (1, 3) or not width or not height:
                return None
            if width * height > preprocess.MAX_IMAGE_PIXELS:
                return None
            return (width, height) if preprocess._jpeg_orientation(data) == 1 else None
        if marker in _SOF_OTHER or marker in (0xDA, 0xD9):
            return None
        position += 2 + length
    return None


def gpu_eligible(data: bytes | bytearray | memoryview) -> bool:
    """Whether nvJPEG takes this file (``gpu_size`` is not None)."""
    return gpu_size(data) is not None


def resolve_decode(decode: str, device_is_cuda: bool) -> str:
    """``auto`` is ``gpu`` when the model runs on CUDA and nvJPEG is usable, else ``cpu``."""
    from embedx.errors import BackendError, ConfigError

    if decode not in DECODES:
        raise ConfigError(f"decode must be one of {', '.join(DECODES)}, got {decode!r}")
    if decode == "cpu":
        return "cpu"
    usable = device_is_cuda and cuda_decode_available()
    if decode == "gpu" and not usable:
        raise BackendError(
            "--decode gpu needs the model on a CUDA device and torch with CUDA (nvJPEG); "
            "use --decode cpu or --device cuda"
        )
    return "gpu" if usable else "cpu"


def _read(path: str) -> tuple[bytearray | None, str, str]:
    """(bytes, sha256, "") or (None, "", reason) for one file."""
    try:
        with open(path, "rb") as handle:
            data = bytearray(os.fstat(handle.fileno()).st_size)
            view = memoryview(data)
            filled = 0
            while filled < len(data):
                count = handle.readinto(view[filled:])
                if not count:
                    break
                filled += count
            rest = handle.read()  # grew since fstat
            if filled < len(data):
                del data[filled:]
            elif rest:
                data.extend(rest)
    except OSError as e:
        return None, "", f"cannot read: {e.strerror or e}"
    return data, fsio.sha256_bytes(data), ""


def _parts(indices: list[int], pixels: Any) -> list[list[int]]:
    """``indices`` in runs of at most ``PIXELS_PER_PASS`` source pixels (at least one each)."""
    parts: list[list[int]] = []
    total = 0
    for index in indices:
        if not parts or total + pixels(index) > PIXELS_PER_PASS:
            parts.append([])
            total = 0
        parts[-1].append(index)
        total += pixels(index)
    return parts


class TorchDecoder:
    """uint8 NHWC batches on ``device`` from encoded images (see the module docstring)."""

    def __init__(self, spec: preprocess.PreprocessSpec, *, device: str = "cuda") -> None:
        import torch

        self.spec = spec
        self.device = torch.device(device)
        self.size = spec.input_size
        self.gpu_images = 0
        self.cpu_images = 0

    def _geometry(self, height: int, width: int) -> tuple[int, int, int, int]:
        new_w, new_h, left, top = preprocess._geometry(width, height, self.spec)
        return new_h, new_w, top, left

    def _blur(self, stack: Any, scale_y: float, scale_x: float) -> Any:
        """The ``fast`` path's Gaussian blur before a shrinking bilinear resize
        (``preprocess._fast_resized_view``: variance (s^2 - 1) / 6, OpenCV's kernel and
        reflect-101 border), separable, on float NCHW."""
        import torch
        import torch.nn.functional as F

        for axis, scale in ((2, scale_y), (3, scale_x)):
            sigma = max(math.sqrt(max(scale * scale - 1.0, 0.0) / 6.0), 1e-3)
            radius = max(1, math.ceil(2.0 * sigma))
            taps = torch.arange(-radius, radius + 1, dtype=torch.float32, device=stack.device)
            kernel = torch.exp(-(taps * taps) / (2 * sigma * sigma))
            kernel = (kernel / kernel.sum()).repeat(3, 1, 1)
            if axis == 2:
                padded = F.pad(stack, (0, 0, radius, radius), mode="reflect")
                stack = F.conv2d(padded, kernel.unsqueeze(3), groups=3)
            else:
                padded = F.pad(stack, (radius, radius, 0, 0), mode="reflect")
                stack = F.conv2d(padded, kernel.unsqueeze(2), groups=3)
        return stack

    def _resize_crop(self, images: list[Any]) -> Any:
        """CHW uint8 device tensors -> (n, S, S, 3) uint8, grouped by size (one pass per size).

        ``fast`` specs: Gaussian blur + plain bilinear, as the ``fast`` CPU path does with
        OpenCV; ``exact`` specs: antialiased bilinear, as Pillow (and torchvision) do.
        """
        import torch
        import torch.nn.functional as F

        out = torch.empty((len(images), self.size, self.size, 3), dtype=torch.uint8, device=self.device)
        groups: dict[tuple[int, int], list[int]] = {}
        for index, image in enumerate(images):
            groups.setdefault((int(image.shape[1]), int(image.shape[2])), []).append(index)
        fast = self.spec.mode == "fast"
        chunks = []
        for (height, width), members in groups.items():
            step = max(1, PIXELS_PER_PASS // (height * width))
            chunks += [((height, width), members[i : i + step]) for i in range(0, len(members), step)]
        for (height, width), members in chunks:
            new_h, new_w, top, left = self._geometry(height, width)
            stack = torch.stack([images[i] for i in members]).float()
            scale_y, scale_x = height / new_h, width / new_w
            if (new_h, new_w) != (height, width):
                if fast and max(scale_x, scale_y) > 1.0:
                    stack = self._blur(stack, scale_y, scale_x)
                stack = F.interpolate(stack, size=(new_h, new_w), mode="bilinear", antialias=not fast,
                                      align_corners=False)
            crop = stack[:, :, top : top + self.size, left : left + self.size]
            pixels = crop.round_().clamp_(0, 255).to(torch.uint8).permute(0, 2, 3, 1)
            if len(members) == len(images):
                out.copy_(pixels)  # one size for the whole batch: already in order
            else:
                out[torch.as_tensor(members, device=self.device)] = pixels
        return out

    def _decode_many(self, datas: list[bytearray]) -> list[Any | None]:
        """Decoded CHW RGB tensors (None where this decoder fails on a file)."""
        import torch
        from torchvision.io import ImageReadMode, decode_jpeg

        tensors = [torch.frombuffer(data, dtype=torch.uint8) for data in datas]
        try:
            return list(decode_jpeg(tensors, mode=ImageReadMode.RGB, device=self.device))
        except RuntimeError as e:  # one bad file fails the batched call: find it
            logger.debug("batched JPEG decode failed (%s); decoding one by one", e)
        decoded: list[Any | None] = []
        for tensor in tensors:
            try:
                decoded.append(decode_jpeg(tensor, mode=ImageReadMode.RGB, device=self.device))
            except RuntimeError:
                decoded.append(None)
        return decoded

    def decode(self, datas: Sequence[bytearray]) -> tuple[Any, list[int], list[tuple[int, str]]]:
        """(uint8 (n, S, S, 3) on the device, the indices it holds in order, errors as (index, reason))."""
        import torch

        sizes = {i: size for i, data in enumerate(datas) if (size := gpu_size(data)) is not None}
        images: dict[int, Any] = {}
        batch = None
        try:
            for part in _parts(sorted(sizes), lambda i: sizes[i][0] * sizes[i][1]):
                for index, image in zip(part, self._decode_many([datas[i] for i in part]), strict=True):
                    if image is not None and image.shape[0] == 3:
                        images[index] = image
            on_device = sorted(images)
            if on_device:
                batch = self._resize_crop([images[i] for i in on_device])
        except RuntimeError as e:  # the device ran out of memory (or worse): the CPU does this batch
            logger.warning("GPU decode failed on a batch (%s); decoding its %d files on the CPU", e, len(datas))
            images, on_device, batch = {}, [], None
        self.gpu_images += len(on_device)
        pixels_by_index: dict[int, Any] = {}
        if batch is not None:
            pixels_by_index = {index: batch[row] for row, index in enumerate(on_device)}
        errors: list[tuple[int, str]] = []
        for index in range(len(datas)):
            if index in images:
                continue
            pixels, reason = preprocess.pixels_or_reason(bytes(datas[index]), self.spec)
            if pixels is None:
                errors.append((index, reason))
                continue
            self.cpu_images += 1
            pixels_by_index[index] = torch.from_numpy(pixels).to(self.device)
        rows = sorted(pixels_by_index)
        if not rows:
            return torch.empty((0, self.size, self.size, 3), dtype=torch.uint8, device=self.device), [], errors
        if batch is not None and rows == on_device:
            out = batch  # every row came from the device path, already in order
        else:
            out = torch.stack([pixels_by_index[index] for index in rows])
        return out, rows, errors


class GpuDecodeSource:
    """Batches in order, decoded on the GPU by ``decode_threads`` background threads.

    Yields the same dicts as extract's CPU decoders: ``rows``, ``keys`` (one per path, ""
    when unreadable), ``pixels`` (a uint8 device tensor), ``errors``, ``seconds``. Each
    thread takes the next batch, reads and hashes its files (a shared pool of
    ``read_threads``), decodes and resizes it on a CUDA stream of its own, and synchronizes
    that stream before handing the batch over, so a consumer on another stream (ONNX
    Runtime's) reads finished pixels. Several threads overlap one batch's file reading and
    Huffman decoding (on the CPU in nvJPEG's hybrid backend) with another's device work; at
    most ``PREFETCH`` finished batches wait for the consumer.
    """

    def __init__(self, spec: preprocess.PreprocessSpec, batches: Sequence[Sequence[str]], *,
                 device: str = "cuda", read_threads: int = READ_THREADS,
                 decode_threads: int = DECODE_THREADS) -> None:
        self.decoder = TorchDecoder(spec, device=device)
        self._batches = list(batches)
        self._done: dict[int, Any] = {}
        self._next = 0  # the next batch a thread takes
        self._lock = threading.Condition()
        self._room = threading.Semaphore(PREFETCH + decode_threads)
        self._stop = threading.Event()
        self._fatal: BaseException | None = None  # a thread could not start
        self._readers = ThreadPoolExecutor(max_workers=read_threads, thread_name_prefix="embedx-read")
        self._threads = [threading.Thread(target=self._work, name=f"embedx-gpu-decode-{i}", daemon=True)
                         for i in range(max(1, min(decode_threads, len(self._batches))))]
        for thread in self._threads:
            thread.start()

    def _take(self) -> int | None:
        while not self._room.acquire(timeout=0.1):
            if self._stop.is_set():
                return None
        with self._lock:
            if self._stop.is_set() or self._next >= len(self._batches):
                self._room.release()
                return None
            index = self._next
            self._next += 1
            return index

    def _work(self) -> None:
        try:
            import torch

            stream = torch.cuda.Stream(self.decoder.device) if self.decoder.device.type == "cuda" else None
        except BaseException as e:  # noqa: BLE001 - handed to the consumer, which raises it
            with self._lock:
                self._fatal = self._fatal or e
                self._lock.notify_all()
            return
        while (index := self._take()) is not None:
            try:
                item = self._decode(index, stream)
            except BaseException as e:  # noqa: BLE001 - handed to the consumer, which raises it
                item = e
            with self._lock:
                self._done[index] = item
                self._lock.notify_all()

    def _decode(self, index: int, stream: Any) -> dict[str, Any]:
        import torch

        start = time.perf_counter()
        results = list(self._readers.map(_read, self._batches[index]))
        keys = [key for _, key, _ in results]
        errors = [(i, reason) for i, (data, _, reason) in enumerate(results) if data is None]
        readable = [i for i, (data, _, _) in enumerate(results) if data is not None]
        datas = [results[i][0] for i in readable]
        if stream is not None:
            with torch.cuda.stream(stream):
                pixels, rows, decode_errors = self.decoder.decode(datas)
            stream.synchronize()
        else:
            pixels, rows, decode_errors = self.decoder.decode(datas)
        errors += [(readable[i], reason) for i, reason in decode_errors]
        return {"rows": [readable[i] for i in rows], "keys": keys, "pixels": pixels,
                "errors": sorted(errors), "seconds": time.perf_counter() - start}

    def __iter__(self) -> Iterator[dict[str, Any]]:
        for index in range(len(self._batches)):
            with self._lock:
                while index not in self._done:
                    if self._fatal is not None:
                        raise self._fatal
                    if not self._lock.wait(timeout=1.0) and not any(t.is_alive() for t in self._threads):
                        from embedx.errors import BackendError

                        raise BackendError(f"the GPU decode threads stopped before batch {index}")
                item = self._done.pop(index)
            self._room.release()
            if isinstance(item, BaseException):
                raise item
            yield item

    def close(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=30)
        self._readers.shutdown(wait=True, cancel_futures=True)
        self._done.clear()


__all__ = ["DECODES", "GpuDecodeSource", "TorchDecoder", "cuda_decode_available", "gpu_eligible", "gpu_size",
           "resolve_decode"]
