"""``embedx verify``: is a feature cache still what ``extract`` wrote, and still true to its images?

Three checks, each naming the rows that fail it:

1. every row's features against its checksum (``row_crc32``), and for NaN/inf;
2. a sample of rows: the image at the row's path (relative to the data root the cache
   recorded) still hashes to the row's key (a missing file is reported, not a failure). The
   paths come from the cache: one leading outside the data root, or to anything but a regular
   file (a FIFO, a device), is listed as unreadable with the reason, and never read;
3. the same sample re-embedded with the cache's own backbone ONNX (``onnx_path``, checked
   against ``onnx_sha256``) and preprocessing: cosine to the stored row at least
   ``tolerance``.

On the tolerance (``tolerance_for``): the stored rows are compared with the sample embedded
again by the cache's fp32 backbone on the CPU, so the tolerance covers what the cache's dtype
and precision change. Measured on hymenoptera (398 images, train+val) with efficientnet_lite0
(real weights), CPU, ``bench/redteam/verify_tolerance.py``, minimum cosine over all rows:

==========  ===================  ===================  ============================
precision   dtype float32        dtype float16        tolerance (``MIN_COSINES``)
==========  ===================  ===================  ============================
fp32        1 - 2e-16            0.99999997           0.999
fp16        0.999921             0.999921             0.999
int8        0.96950              0.96950              0.95
==========  ===================  ===================  ============================

float16 storage rounds each value by at most 2^-11 relative: ~3e-8 off the cosine, nothing
next to the model's own error. fp32: 0.999 leaves room for a cache computed on CUDA or
TensorRT in fp32 (other kernels; not measured here). fp16 (the fp16 copy CUDA runs, run here
on the CPU provider; ``extract`` refuses fp16 on the CPU): worst 0.99992, 0.999 is >10x that
distance. int8 (static quantization, re-embedded with the fp32 model it was quantized from):
median 0.9953, 1st percentile 0.9832, worst 0.9695, so 0.95 (the worst distance x1.6); an int8
row is checked loosely, its bytes still exactly by their checksums. A cache decoded on the GPU
differs from the CPU decoder by design (cosine ~0.99, see ``embedx.gpu``): its rows are
compared at ``MIN_COSINE_GPU_DECODE`` (0.98; measured on an H200 with hymenoptera val, 153
rows re-embedded on CUDA and on the CPU: worst 0.985, mean 0.997), or the precision's
tolerance if that is lower.

Library code: returns a ``VerifyReport``; the CLI prints it and exits 1 when it is not ok.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from embedx.errors import CacheError
from embedx.fsio import MISSING, file_under_root, read_regular_file, sha256_bytes

logger = logging.getLogger(__name__)

#: Minimum cosine between a stored row and the same image embedded again, by the precision the
#: cache's model ran in (float16 and float32 storage alike; measured, see the module docstring).
MIN_COSINES = {"fp32": 0.999, "fp16": 0.999, "int8": 0.95}
MIN_COSINE = MIN_COSINES["fp32"]
#: The same for caches decoded on the GPU, re-embedded here through the CPU decoder.
MIN_COSINE_GPU_DECODE = 0.98
#: Rows sampled by default for the image checks.
SAMPLE = 32
#: Largest image file read (a larger one is listed as unreadable): a path comes from the cache.
MAX_IMAGE_BYTES = 256 * 1024 * 1024


@dataclass
class VerifyReport:
    """What ``verify`` found; ``bad_rows`` lists every row that failed a check."""

    path: str
    rows: int
    checksums: bool  # the cache has per-row checksums (older caches do not)
    checksum_rows: list[int] = field(default_factory=list)  # features that fail their checksum
    nonfinite_rows: list[int] = field(default_factory=list)  # features holding NaN or inf
    sampled: list[int] = field(default_factory=list)
    missing: list[dict[str, Any]] = field(default_factory=list)  # {row, path}: not found (not a failure)
    changed: list[dict[str, Any]] = field(default_factory=list)  # {row, path}: bytes no longer match the key
    unreadable: list[dict[str, Any]] = field(default_factory=list)  # {row, path, reason}: cannot read or decode
    cosines: dict[int, float] = field(default_factory=dict)  # row -> cosine of the re-embedded image
    low_cosine_rows: list[int] = field(default_factory=list)
    tolerance: float = MIN_COSINE
    reembed_skipped: str = ""  # why the sample was not re-embedded, if it was not
    views: int = 0  # augmented view rows (``extract --views``), each checked like a row
    damaged_views: list[int] = field(default_factory=list)  # view rows failing their checksum or holding NaN/inf

    @property
    def bad_rows(self) -> list[int]:
        rows = {*self.checksum_rows, *self.nonfinite_rows, *self.low_cosine_rows,
                *(entry["row"] for entry in self.changed), *(entry["row"] for entry in self.unreadable)}
        return sorted(rows)

    @property
    def ok(self) -> bool:
        return not self.bad_rows and not self.damaged_views

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["cosines"] = {str(row): value for row, value in self.cosines.items()}
        data["bad_rows"] = self.bad_rows
        data["ok"] = self.ok
        return data


def verify(path: str | Path, *, sample: int = SAMPLE, seed: int = 0, device: str = "cpu",
           data_root: str | Path | None = None) -> VerifyReport:
    """Check every checksum of the cache ``path``, then ``sample`` random rows (``seed``)
    against their images (under ``data_root``, default the one the cache recorded) and
    against the backbone run again on ``device``."""
    from embedx.cache import read_cache, scan_rows, scan_views

    if sample < 0:
        raise CacheError(f"sample must be >= 0, got {sample}")
    path = Path(path)
    data = read_cache(path, load_features=False)
    failed, nonfinite, has_checksums = scan_rows(path)
    report = VerifyReport(path=str(path), rows=len(data), checksums=has_checksums, checksum_rows=failed,
                          nonfinite_rows=nonfinite)
    report.views, report.damaged_views = scan_views(path)
    if not len(data) or not sample:
        return report
    chosen = np.sort(np.random.default_rng(seed).choice(len(data), size=min(sample, len(data)), replace=False))
    report.sampled = chosen.tolist()
    root = Path(data_root) if data_root is not None else data.data_root
    images: dict[int, bytes] = {}
    for row in report.sampled:
        relpath = str(data.paths[row])
        content = _read_image(report, row, root, relpath)
        if content is None:
            continue
        if sha256_bytes(content) != data.keys[row]:
            report.changed.append({"row": row, "path": relpath})
        else:
            images[row] = content
    _reembed(report, data, images, device=device)
    return report


def _read_image(report: VerifyReport, row: int, root: Path | None, relpath: str) -> bytes | None:
    """The bytes of ``row``'s image, or None with the row listed as missing or unreadable.

    The path comes from the cache (untrusted): one that leads outside ``root``, to a FIFO or
    a device, or to a file larger than ``MAX_IMAGE_BYTES`` is listed as unreadable, never read.
    """
    if root is None:
        why = "the cache records no data root; pass data_root (--data)"
        report.missing.append({"row": row, "path": relpath, "reason": why})
        return None
    file, why = file_under_root(root, relpath, links_out=True)  # extract followed such links too
    if why == MISSING:
        report.missing.append({"row": row, "path": relpath})
    elif file is None:
        report.unreadable.append({"row": row, "path": relpath, "reason": f"not read: {why}"})
    else:
        try:
            return read_regular_file(file, max_bytes=MAX_IMAGE_BYTES, error=CacheError)
        except CacheError as e:
            report.unreadable.append({"row": row, "path": relpath, "reason": f"not read: {e}"})
    return None


def _reembed(report: VerifyReport, data: Any, images: dict[int, bytes], *, device: str) -> None:
    """Embed ``images`` (row -> bytes) again with the cache's backbone; cosine to the stored rows."""
    from embedx import preprocess
    from embedx.cache import read_feature_rows
    from embedx.fsio import sha256_file

    meta = data.meta
    report.tolerance = tolerance_for(meta.precision, meta.decode)
    bad = set(report.checksum_rows) | set(report.nonfinite_rows)
    rows = [row for row in sorted(images) if row not in bad]
    if not rows:
        return
    onnx = Path(meta.onnx_path)
    if not onnx.is_file():
        report.reembed_skipped = f"the backbone {onnx} is gone"
        return
    if sha256_file(onnx) != meta.onnx_sha256:
        report.reembed_skipped = f"the backbone {onnx} is no longer the model the cache was made with (sha256 differs)"
        return
    spec = preprocess.PreprocessSpec.from_dict(meta.preprocess)
    pixels = np.empty((len(rows), spec.input_size, spec.input_size, 3), dtype=np.uint8)
    decoded: list[int] = []
    for row in rows:
        try:
            pixels[len(decoded)] = preprocess.to_pixels(images[row], spec)
        except Exception as e:  # noqa: BLE001 - an image that no longer decodes is a finding, not a crash
            report.unreadable.append({"row": row, "path": str(data.paths[row]), "reason": f"cannot decode: {e}"})
            continue
        decoded.append(row)
    if not decoded:
        return
    embedded = _embed(onnx, meta.onnx_sha256, spec, pixels[: len(decoded)], device=device)
    stored = read_feature_rows(data.path, np.asarray(decoded))
    norms = np.linalg.norm(stored, axis=1) * np.linalg.norm(embedded, axis=1)
    cosines = np.sum(stored.astype(np.float64) * embedded, axis=1) / np.maximum(norms, 1e-30)
    report.cosines = {row: float(value) for row, value in zip(decoded, cosines, strict=True)}
    report.low_cosine_rows = [row for row, value in report.cosines.items() if not value >= report.tolerance]


def tolerance_for(precision: str, decode: str = "cpu") -> float:
    """The minimum cosine a row of a cache made in ``precision``, decoded by ``decode``, must reach
    against the fp32 model run again on the CPU."""
    tolerance = MIN_COSINES.get(precision, MIN_COSINE)
    return min(tolerance, MIN_COSINE_GPU_DECODE) if decode == "gpu" else tolerance


def _embed(onnx: Path, sha256: str, spec: Any, pixels: np.ndarray, *, device: str) -> np.ndarray:
    """Features of uint8 NHWC ``pixels`` from the pixel-input copy of ``onnx`` (as ``extract`` runs it)."""
    from embedx.pixel_input import pixel_model
    from embedx.runtime import OrtModel

    model = OrtModel(pixel_model(onnx, spec, source_sha256=sha256), device=device, source_sha256=None)
    batch = model.input_shape[0] if isinstance(model.input_shape[0], int) else 32
    out = []
    for start in range(0, len(pixels), batch):
        chunk = pixels[start : start + batch]
        padded = np.concatenate([chunk, np.zeros((batch - len(chunk), *chunk.shape[1:]), chunk.dtype)])
        out.append(model.run(padded)[: len(chunk)])
    return np.concatenate(out).astype(np.float64)


__all__ = ["MAX_IMAGE_BYTES", "MIN_COSINE", "MIN_COSINES", "MIN_COSINE_GPU_DECODE", "SAMPLE", "VerifyReport",
           "tolerance_for", "verify"]
