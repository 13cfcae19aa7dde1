"""What an embedx ONNX feature extractor is, and the cache that keeps the verified ones
(torch-free; shared by ``export`` (torch modules) and ``onnxgraph`` (user ONNX files)).

- The contract: input ``"input"`` (N, 3, H, W) float32 with a dynamic batch axis,
  output ``"features"`` (N, D) float32; ``ExportResult`` describes one such file.
- The checks in ONNX Runtime that both producers run: the same seeded random inputs at
  ``PARITY_BATCH_SIZES`` and one error measure (``relative_error``).
- The cache: every model is kept as ``paths.onnx_dir()/<name>-<fingerprint[:16]>.onnx``,
  where the fingerprint covers everything that changes the file.  A sidecar
  ``<file>.json`` written *after* the ONNX file was atomically renamed into place records
  its sha256, size and modification time; a cached file is used only when it is
  untouched since (same size and mtime) or its sha256 still matches, so a partial or
  corrupt file is rebuilt.  Builds of one fingerprint are serialized by a file lock.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from embedx import fsio, paths
from embedx.errors import OnnxModelError
from embedx.preprocess import PreprocessSpec

logger = logging.getLogger(__name__)

#: Opset 17 is the first with a LayerNormalization op, which ViT/Swin/ConvNeXt export
#: to one fused node instead of ~10 primitive ones (faster and closer to torch), while
#: staying within what TensorRT 8.6+, ORT >= 1.14 and onnxruntime.quantization support.
DEFAULT_OPSET = 17
#: Bump when the export code changes what it writes: old cached exports are then rebuilt.
EXPORT_CODE_VERSION = "1"
#: Largest allowed max |ort - torch| / max |torch| for an fp32 export.
PARITY_TOLERANCE = 1e-4
PARITY_BATCH_SIZES = (1, 3)
INPUT_NAME = "input"
OUTPUT_NAME = "features"


@dataclass(frozen=True)
class ExportResult:
    """One ONNX feature extractor on disk, ready for ``runtime.OrtModel``.

    ``weights_tag`` is the identity of the weights, ``weights_arg`` what to pass to
    ``backbones.build_feature_extractor`` to rebuild the same model (for a foreign ONNX
    file: the source file's absolute path).  ``sha256`` is the file's digest.
    """

    path: Path
    fingerprint: str
    backbone: str
    weights_tag: str
    feature_layer: str
    feature_dim: int
    preprocess: PreprocessSpec
    parity: dict = field(default_factory=dict)
    seconds: float = 0.0
    cached: bool = False
    size_bytes: int = 0
    weights_arg: str = ""
    sha256: str = ""
    opset: int = DEFAULT_OPSET

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["path"] = str(self.path)
        data["preprocess"] = self.preprocess.to_dict()
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ExportResult:
        known = {k: v for k, v in data.items() if k in cls.__dataclass_fields__}
        known["path"] = Path(known["path"])
        known["preprocess"] = PreprocessSpec.from_dict(known["preprocess"])
        return cls(**known)


# ------------------------------------------------------------------------ the checks


def ort_session(model_bytes: bytes, *, name: str) -> Any:
    """A CPU session of a model held in memory; ORT's errors become OnnxModelError."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    try:
        return ort.InferenceSession(model_bytes, options, providers=["CPUExecutionProvider"])
    except Exception as e:  # ORT raises its own Fail/InvalidGraph/... types
        raise OnnxModelError(f"ONNX Runtime cannot load {name}: {e}") from e


def relative_error(a: Any, b: Any) -> tuple[float, float]:
    """(max |a - b|, max |a - b| / max |b|) over whole arrays."""
    import numpy as np

    max_abs = float(np.max(np.abs(a.astype(np.float64) - b.astype(np.float64)))) if a.size else 0.0
    scale = float(np.max(np.abs(b))) if b.size else 0.0
    return max_abs, max_abs / max(scale, 1e-12)


def parity_inputs(input_size: int) -> dict[int, Any]:
    """Seeded random NCHW batches, one per ``PARITY_BATCH_SIZES``, each a prefix of the largest."""
    import numpy as np

    rng = np.random.default_rng(1234)
    largest = rng.standard_normal((max(PARITY_BATCH_SIZES), 3, input_size, input_size)).astype(np.float32)
    return {b: largest[:b] for b in PARITY_BATCH_SIZES}


# ------------------------------------------------------------------------- the cache


def fingerprint_of(parts: dict[str, Any]) -> str:
    return fsio.sha256_bytes(json.dumps(parts, sort_keys=True, default=str).encode())


def _safe_name(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("._") or "model"


def _cache_path(name: str, fingerprint: str) -> Path:
    return paths.onnx_dir() / f"{_safe_name(name)}-{fingerprint[:16]}.onnx"


def _sidecar(path: Path) -> Path:
    return path.with_name(path.name + ".json")


def _lookup(path: Path, fingerprint: str) -> ExportResult | None:
    """The cached export at ``path`` if it is complete and intact, else None."""
    sidecar = _sidecar(path)
    if not path.is_file() or not sidecar.is_file():
        return None
    try:
        record = json.loads(sidecar.read_text())
        result = ExportResult.from_dict(record)
    except (OSError, ValueError, KeyError, TypeError) as e:
        logger.warning("ignoring unreadable export record %s (%s); rebuilding", sidecar, e)
        return None
    if record.get("fingerprint") != fingerprint:
        return None
    stat = path.stat()
    # Unchanged size and modification time since the record was written mean an
    # untouched file (git's index makes the same bet); anything else is hashed.
    untouched = stat.st_size == result.size_bytes and stat.st_mtime_ns == record.get("mtime_ns")
    if not untouched and (stat.st_size != result.size_bytes or fsio.sha256_file(path) != result.sha256):
        logger.warning("cached export %s is corrupt or partial (size/sha256 differ from its record); rebuilding", path)
        return None
    return replace(result, path=path)


def publish(model: Any, path: Path, result: ExportResult) -> ExportResult:
    """Write ``model`` to ``path`` atomically, then its sidecar; returns the final result."""
    path.parent.mkdir(parents=True, exist_ok=True)
    data = model.SerializeToString()
    fsio.atomic_write(path, data)
    result = replace(result, path=path, size_bytes=len(data), sha256=fsio.sha256_bytes(data))
    record = {**result.to_dict(), "mtime_ns": path.stat().st_mtime_ns}
    fsio.atomic_write(_sidecar(path), json.dumps(record, indent=2, sort_keys=True))
    return result


def _copy_out(result: ExportResult, output: str | Path | None) -> ExportResult:
    """Copy the cached file to ``output`` too (atomically); the result then points there."""
    if output is None:
        return result
    target = Path(output)
    if target.is_dir():
        target = target / result.path.name
    if target.resolve() == result.path.resolve():
        return result
    target.parent.mkdir(parents=True, exist_ok=True)
    with fsio.atomic_path(target) as tmp:
        shutil.copyfile(result.path, tmp)
    return replace(result, path=target)


def cached_or_build(name: str, fingerprint: str, build: Callable[[Path], ExportResult], *,
                    output: str | Path | None, force: bool) -> ExportResult:
    """Return the cached export for ``fingerprint`` or call ``build(path)`` under a file lock."""
    from filelock import FileLock

    start = time.perf_counter()
    path = _cache_path(name, fingerprint)
    path.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(path) + ".lock"):
        found = None if force else _lookup(path, fingerprint)
        if found is not None:
            logger.info("using cached export %s", path)
            result = replace(found, cached=True, seconds=time.perf_counter() - start)
        else:
            result = build(path)
            result = replace(result, cached=False, seconds=time.perf_counter() - start)
    return _copy_out(result, output)
