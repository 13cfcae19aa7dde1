"""Derived models: fp16 copies and int8 quantization, cached on disk (torch-free).

- fp16 (``fp16_model``): an fp16 copy of the model with float32 inputs and outputs, for
  ORT's CUDA provider (TensorRT takes fp32 models and its own fp16 flag).
- int8 (``quantize_int8``): ORT static QDQ quantization from a calibration sample,
  refused unless its features keep a mean cosine >= ``min_cosine`` to the fp32 ones on
  that sample.  Dynamic quantization is not offered: it quantizes only MatMul/Gemm and
  leaves a CNN's convolutions in fp32.

Derived models live under ``derived_dir()`` (``paths.cache_dir()/"runtime"``), keyed by
the sha256 of the source model (and of the calibration sample for int8).
"""

from __future__ import annotations

import hashlib
import json
import logging
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from embedx import fsio, onnxmeta, paths
from embedx.errors import OnnxModelError, QuantizationError
from embedx.providers import CPU, cpu_has_vnni, cpu_session

logger = logging.getLogger(__name__)

#: Samples per batch when calibrating int8 and when comparing int8 with fp32.
CALIBRATION_BATCH = 8
#: Part of the int8 cache key: bump when the quantization recipe changes.
QUANTIZATION_SETTINGS = "qdq-u8s8-pc-minmax"


def derived_dir() -> Path:
    """Where models derived from a source model are cached (fp16, int8, ORT-optimized)."""
    folder = paths.cache_dir() / "runtime"
    folder.mkdir(parents=True, exist_ok=True)  # OSError for a read-only cache: callers decide
    return folder


def array_sha256(array: np.ndarray) -> str:
    """A key for an array: its dtype, shape and bytes."""
    array = np.ascontiguousarray(array)
    digest = hashlib.sha256(f"{array.dtype.str}{array.shape}".encode())
    digest.update(array.data)
    return digest.hexdigest()


def _save_model(model: Any, target: Path) -> None:
    import onnx

    with fsio.atomic_path(target) as tmp:
        onnx.save(model, str(tmp))


def cosine_similarity_rows(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Cosine similarity of each row of ``a`` with the same row of ``b`` (float64)."""
    a = np.asarray(a, dtype=np.float64).reshape(len(a), -1)
    b = np.asarray(b, dtype=np.float64).reshape(len(b), -1)
    dot = np.einsum("ij,ij->i", a, b)
    norms = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
    # two zero vectors are the same vector
    return np.where(norms > 0, dot / np.where(norms > 0, norms, 1.0), 1.0)


# -- fp16 ----------------------------------------------------------------------------


def fp16_model(path: Path) -> Path:
    """An fp16 copy of ``path`` (float32 inputs/outputs kept), cached by sha256."""
    import onnx
    from onnxruntime.transformers.float16 import convert_float_to_float16

    target = derived_dir() / f"{path.stem}-{fsio.sha256_file(path)[:16]}-fp16.onnx"
    if target.exists():
        return target
    model = onnx.load(str(path))
    converted = convert_float_to_float16(model, keep_io_types=True)
    onnxmeta.write(converted, {"precision": "fp16"})
    _save_model(converted, target)
    logger.info("wrote fp16 model %s", target)
    return target


# -- int8 ----------------------------------------------------------------------------
class _Calibration:
    """A ``CalibrationDataReader`` over an NCHW float32 array, in small batches."""

    def __init__(self, input_name: str, data: np.ndarray) -> None:
        self.input_name = input_name
        self.data = data
        self._batches: Iterator[np.ndarray] | None = None

    def get_next(self) -> dict[str, np.ndarray] | None:
        if self._batches is None:
            self._batches = (
                self.data[i : i + CALIBRATION_BATCH]
                for i in range(0, len(self.data), CALIBRATION_BATCH)
            )
        batch = next(self._batches, None)
        return None if batch is None else {self.input_name: batch}

    def rewind(self) -> None:
        self._batches = None


def _run_batched(session: Any, data: np.ndarray) -> np.ndarray:
    name = session.get_inputs()[0].name
    outputs = [
        session.run(None, {name: data[i : i + CALIBRATION_BATCH]})[0]
        for i in range(0, len(data), CALIBRATION_BATCH)
    ]
    return np.concatenate(outputs).reshape(len(data), -1).astype(np.float32)


@dataclass(frozen=True)
class CalibrationSource:
    """An int8 calibration sample named by a key before it is loaded.

    ``key`` must identify the sample's pixels (extract uses the sha256 of the images'
    bytes and the preprocessing spec); ``load()`` returns the NCHW float32 array and
    the key of what it really loaded (an image that no longer decodes may have been
    replaced).  ``quantize_int8`` calls ``load`` only when no int8 model is cached
    for ``key``, so a rerun does not decode its calibration images again.
    """

    key: str
    load: Callable[[], tuple[np.ndarray, str]]


def quantize_int8(
    path: str | Path,
    calibration: np.ndarray | CalibrationSource,
    *,
    min_cosine: float = 0.99,
    source_sha256: str | None = None,
) -> tuple[Path, float]:
    """Static QDQ int8 quantization of ``path`` calibrated on ``calibration`` (NCHW float32,
    or a ``CalibrationSource`` loaded only when its model is not cached).

    Per-channel int8 weights, uint8 activations (U8S8: ORT fuses every Conv into a
    QLinearConv on x86; S8S8 left a third of resnet50's convolutions in fp32 and ran
    slower than fp32), MinMax calibration.  Without VNNI, weights use 7 bits
    (``reduce_range``) to avoid the AVX2 u8*s8 saturation.  Returns ``(int8_path, mean_cosine)``
    where ``mean_cosine`` is the mean over the calibration images of the cosine
    similarity between int8 and fp32 features; raises ``QuantizationError`` when it is
    below ``min_cosine``.  ``source_sha256``: the sha256 of ``path`` where the caller
    knows it (an export records it), saving a read of the model.  The result is cached
    on disk keyed by (model sha256,
    calibration: the array's sha256 or the ``CalibrationSource`` key), next to a JSON
    file with the figures.
    """
    path = Path(path)
    if not path.is_file():
        raise OnnxModelError(f"ONNX model {path} does not exist")
    vnni = cpu_has_vnni()  # decides the weights' bits: part of the cache key and of a refusal
    settings = f"{QUANTIZATION_SETTINGS}-{'vnni' if vnni else 'r7'}"
    model_key = (source_sha256 or fsio.sha256_file(path))[:16]

    def cached(calibration_key: str) -> tuple[Path, dict | None]:
        try:
            target = derived_dir() / f"{path.stem}-{model_key}-{calibration_key[:12]}-{settings}-int8.onnx"
        except OSError as e:
            raise QuantizationError(
                f"int8 quantization writes its model under {paths.cache_dir()}, which is not "
                f"writable ({e.strerror or e}); set EMBEDX_CACHE_DIR to a writable folder"
            ) from e
        report_path = target.with_suffix(".json")
        if target.exists() and report_path.exists():
            report = json.loads(report_path.read_text())
            logger.info("int8 model from cache: %s (mean cosine %.5f)", target, report["mean_cosine"])
            return target, report
        return target, None

    if isinstance(calibration, CalibrationSource):
        target, report = cached(calibration.key)
        if report is None:
            array, loaded_key = calibration.load()
            array = _checked_calibration(array)
            target, report = cached(loaded_key)
    else:
        array = _checked_calibration(calibration)
        target, report = cached(array_sha256(array))
    if report is None:
        report = _quantize(path, array, target, reduce_range=not vnni)
        fsio.atomic_write(target.with_suffix(".json"), json.dumps(report, indent=2, sort_keys=True))
    mean_cosine = float(report["mean_cosine"])
    if mean_cosine < min_cosine:
        raise QuantizationError(
            f"int8 features of {path.name} reach a mean cosine similarity of {mean_cosine:.4f} "
            f"(min {report['min_cosine']:.4f}) to fp32 on {report['samples']} calibration "
            f"images, below the gate of {min_cosine}; use --precision fp32, or calibrate "
            f"with more and more representative images"
            + ("" if vnni else
               "; this CPU has no VNNI, so the weights were quantized to 7 bits (onnxruntime's "
               "reduce_range, against AVX2's u8*s8 saturation), which costs accuracy: a CPU with "
               "AVX512-VNNI or AVX-VNNI quantizes with 8 bits")
        )
    return target, mean_cosine


def _checked_calibration(calibration: np.ndarray) -> np.ndarray:
    calibration = np.ascontiguousarray(calibration, dtype=np.float32)
    if calibration.ndim != 4 or len(calibration) == 0:
        raise QuantizationError(
            f"int8 calibration needs a non-empty NCHW float32 batch of preprocessed images, "
            f"got an array of shape {calibration.shape}"
        )
    return calibration


def _quantize(path: Path, calibration: np.ndarray, target: Path, *, reduce_range: bool) -> dict:
    import onnx
    from onnxruntime.quantization import (
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )
    from onnxruntime.quantization.shape_inference import quant_pre_process

    input_name = cpu_session(path).get_inputs()[0].name
    with tempfile.TemporaryDirectory(dir=target.parent) as work:
        prepared = Path(work) / "prepared.onnx"
        try:
            # shape inference + graph fusion first: measured on resnet18, the int8 model runs
            # 5x faster with this pre-pass than without (same cosine, 0.9999)
            quant_pre_process(str(path), str(prepared), skip_symbolic_shape=False)
        except Exception as e:  # noqa: BLE001 - the pre-pass is optional; quantize the original
            logger.warning("quantization pre-processing failed (%s); quantizing the model as is", e)
            prepared = path
        quantized = Path(work) / "int8.onnx"
        try:
            quantize_static(
                str(prepared),
                str(quantized),
                _Calibration(input_name, calibration),
                quant_format=QuantFormat.QDQ,
                per_channel=True,
                reduce_range=reduce_range,
                activation_type=QuantType.QUInt8,
                weight_type=QuantType.QInt8,
                calibrate_method=CalibrationMethod.MinMax,
                calibration_providers=[CPU],
            )
        except Exception as e:  # noqa: BLE001 - ORT raises many types; the user needs one
            raise QuantizationError(f"int8 quantization of {path} failed: {e}") from e
        reference = _run_batched(cpu_session(path), calibration)
        candidate = _run_batched(cpu_session(quantized), calibration)
        cosines = cosine_similarity_rows(reference, candidate)
        model = onnx.load(str(quantized))
        source_meta = onnxmeta.from_proto(onnx.load(str(path), load_external_data=False))
        onnxmeta.write(model, source_meta)
        onnxmeta.write(model, {"precision": "int8", "int8_cosine": f"{cosines.mean():.6f}"})
        _save_model(model, target)
    report = {
        "source": str(path),
        "samples": int(len(calibration)),
        "mean_cosine": float(cosines.mean()),
        "min_cosine": float(cosines.min()),
    }
    logger.info(
        "int8 model %s: mean cosine %.5f, min %.5f over %d images",
        target, report["mean_cosine"], report["min_cosine"], report["samples"],
    )
    return report
