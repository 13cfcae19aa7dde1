"""ONNX Runtime sessions: ``OrtModel``, a batch in, float32 ``(N, D)`` out (torch-free).

The input is what the model declares: float32 NCHW for a backbone export, uint8 NHWC
pixels for a pixel-input copy (``pixel_input``) or a bundle made ``--with-preprocess``.

- The providers come from ``providers.resolve_providers(device)`` (TensorRT > CUDA > CPU
  under ``"auto"``).  After the session is made, the providers it really uses are
  checked: a GPU provider that silently fell back to the CPU is an error when it was
  asked for by name, a warning under ``"auto"``.
- Precision: ``fp16`` only on a GPU (TensorRT's fp16 flag; for CUDA the fp16 copy of
  ``quantize.fp16_model``); ``int8`` runs a model already quantized, or quantizes one
  with ``quantize.quantize_int8`` from a calibration sample.
- On the CPU the graph ORT optimizes is cached on disk (under ``quantize.derived_dir()``)
  and loaded without re-optimizing next time.

The names of ``providers`` and ``quantize`` that callers used to import from here are
re-exported.
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path
from typing import Any

import numpy as np

from embedx import fsio, onnxmeta
from embedx.errors import BackendError, ConfigError, OnnxModelError
from embedx.providers import (
    CPU,
    CUDA,
    DEVICES,
    GPU_PROVIDERS,
    TENSORRT,
    cpu_flags,
    cpu_session,
    gpu_available,
    physical_cores,
    preload_gpu_libraries,
    provider_options,
    resolve_providers,
    session_options,
)
from embedx.quantize import (
    CALIBRATION_BATCH,
    QUANTIZATION_SETTINGS,
    CalibrationSource,
    array_sha256,
    cosine_similarity_rows,
    derived_dir,
    fp16_model,
    quantize_int8,
)

__all__ = [
    "CALIBRATION_BATCH", "CPU", "CUDA", "DEVICES", "GPU_PROVIDERS", "PRECISIONS", "QUANTIZATION_SETTINGS",
    "TENSORRT", "CalibrationSource", "OrtModel", "array_sha256", "cosine_similarity_rows",
    "gpu_available", "physical_cores", "quantize_int8", "resolve_providers",
]

logger = logging.getLogger(__name__)

PRECISIONS = ("fp32", "fp16", "int8")


# -- the optimized-graph cache --------------------------------------------------------


def _optimized_cache_path(path: Path) -> Path:
    """Where the ORT-optimized copy of ``path`` lives for this machine and ORT version.

    Keyed by the file's identity (absolute path, size, mtime) rather than its sha256,
    which would cost as much as the optimization saves; the CPU flags are in the key
    because ORT's layout choices (NCHWc blocks) depend on them.
    """
    import onnxruntime as ort

    stat = path.stat()
    flags = ",".join(sorted(cpu_flags()))
    identity = f"{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}|{ort.__version__}|{flags}"
    digest = hashlib.sha256(identity.encode()).hexdigest()[:20]
    folder = derived_dir() / "optimized"
    folder.mkdir(parents=True, exist_ok=True)
    return folder / f"{path.stem}-{digest}.ort.onnx"


class _NothingWritten(Exception):
    """ORT made the session but wrote no optimized graph: keep no empty cache entry."""

    def __init__(self, session: Any) -> None:
        super().__init__("no optimized graph written")
        self.session = session


def _cpu_session_cached(path: Path, threads: int | None, spinning: bool = True) -> Any:
    """A CPU session from the cached optimized graph, writing it on the first use."""
    import onnxruntime as ort

    try:
        cached = _optimized_cache_path(path)
    except OSError as e:  # a read-only cache: optimize in memory, as ORT does by default
        logger.debug("not caching the optimized graph of %s: %s", path, e)
        return cpu_session(path, threads, spinning)
    if cached.exists():
        options = session_options(threads, spinning)
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        try:
            return ort.InferenceSession(str(cached), sess_options=options, providers=[CPU])
        except Exception as e:  # noqa: BLE001 - a stale or damaged cache entry is rebuilt
            logger.warning("ignoring unusable optimized model %s: %s", cached, e)
            cached.unlink(missing_ok=True)
    options = session_options(threads, spinning)
    try:
        with fsio.atomic_path(cached) as tmp:
            options.optimized_model_filepath = str(tmp)
            session = ort.InferenceSession(str(path), sess_options=options, providers=[CPU])
            if not tmp.stat().st_size:
                raise _NothingWritten(session)
    except _NothingWritten as unwritten:
        session = unwritten.session
    return session


# -- the model ------------------------------------------------------------------------


class OrtModel:
    """An ONNX backbone (or bundle) ready to run: ``run(float32 NCHW) -> float32 (N, D)``.

    ``precision="int8"`` runs a model already quantized by ``quantize_int8``, or
    quantizes ``path`` first when a ``calibration`` batch is given (gated at
    ``min_cosine``; the figure is in ``.int8_cosine``; ``source_sha256``, when known,
    spares hashing ``path`` for the int8 cache key).

    On the CPU the graph ORT optimizes is kept on disk (``cache_optimized``) and
    loaded without re-optimizing next time: resnet50's session starts in 0.3 s
    instead of 0.7 s.
    """

    def __init__(
        self,
        path: str | Path,
        *,
        device: str = "auto",
        precision: str = "fp32",
        threads: int | None = None,
        calibration: np.ndarray | CalibrationSource | None = None,
        min_cosine: float = 0.99,
        cache_optimized: bool = True,
        spinning: bool = True,
        source_sha256: str | None = None,
    ) -> None:
        if precision not in PRECISIONS:
            raise ConfigError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
        self.source_path = Path(path)
        if not self.source_path.is_file():
            raise OnnxModelError(f"ONNX model {self.source_path} does not exist")
        self.device = device
        self.precision = precision
        self.int8_cosine: float | None = None
        requested = resolve_providers(device)
        self.path = self._model_path(requested, calibration, min_cosine, source_sha256)
        self.session = self._open(requested, threads, spinning, cache_optimized)
        self.providers: list[str] = list(self.session.get_providers())
        self._check_providers(requested)
        inputs, outputs = self.session.get_inputs(), self.session.get_outputs()
        self.input_name: str = inputs[0].name
        self.input_shape = list(inputs[0].shape)
        self.input_dtype = np.dtype(np.uint8 if inputs[0].type == "tensor(uint8)" else np.float32)
        output_names = [o.name for o in outputs]
        self.output_name: str = "features" if "features" in output_names else output_names[0]
        custom = self.session.get_modelmeta().custom_metadata_map
        self.meta: dict[str, str] = {
            k[len(onnxmeta.PREFIX):]: v for k, v in custom.items() if k.startswith(onnxmeta.PREFIX)
        }
        logger.info("loaded %s on %s (%s)", self.path.name, self.providers[0], precision)

    def _model_path(self, requested: list[str], calibration: np.ndarray | CalibrationSource | None,
                    min_cosine: float, source_sha256: str | None) -> Path:
        """The file that runs: the source, or its fp16 (CUDA) or int8 copy."""
        if self.precision == "fp16":
            if requested[0] not in GPU_PROVIDERS:
                raise BackendError(
                    "fp16 runs only on a GPU (ONNX Runtime's CPU kernels are fp32), and "
                    f"--device {self.device} resolved to the CPU here; use --precision fp32 or int8"
                )
            if requested[0] == CUDA:
                return fp16_model(self.source_path)
        elif self.precision == "int8":
            path, self.int8_cosine = self._int8_path(calibration, min_cosine, source_sha256)
            return path
        return self.source_path

    def _open(self, requested: list[str], threads: int | None, spinning: bool, cache_optimized: bool) -> Any:
        import onnxruntime as ort

        if requested[0] in GPU_PROVIDERS:
            preload_gpu_libraries()
            # the GPU runs the graph; ORT's CPU pool only waits, and its spinning threads take
            # cores from the thread that launches the kernels and from the decoders
            threads, spinning = threads or 1, False
        providers = [(p, provider_options(p, self.precision)) for p in requested]
        try:
            if requested == [CPU] and cache_optimized:
                return _cpu_session_cached(self.path, threads, spinning)
            return ort.InferenceSession(
                str(self.path), sess_options=session_options(threads, spinning), providers=providers
            )
        except Exception as e:  # noqa: BLE001 - ORT raises its own exception types
            raise OnnxModelError(f"ONNX Runtime cannot load {self.path}: {e}") from e

    def _check_providers(self, requested: list[str]) -> None:
        """A provider that silently fell back: an error when asked for by name, else a warning."""
        if requested[0] == self.providers[0]:
            return
        message = (
            f"ONNX Runtime was asked for {requested[0]} but runs {self.path.name} on "
            f"{self.providers[0]} (check the CUDA/cuDNN/TensorRT libraries)"
        )
        if self.device in ("cuda", "tensorrt"):
            raise BackendError(message + "; use --device auto or cpu")
        logger.warning(message)

    def _int8_path(self, calibration: np.ndarray | CalibrationSource | None, min_cosine: float,
                   source_sha256: str | None) -> tuple[Path, float | None]:
        meta = onnxmeta.probe(self.source_path)
        if meta.get("precision") == "int8":
            cosine = meta.get("int8_cosine")
            return self.source_path, float(cosine) if cosine else None
        if calibration is None:
            raise BackendError(
                f"int8 needs a calibration sample to quantize {self.source_path.name}: pass "
                f"calibration= (a batch of preprocessed images) or use quantize_int8() first"
            )
        return quantize_int8(self.source_path, calibration, min_cosine=min_cosine, source_sha256=source_sha256)

    @property
    def on_gpu(self) -> bool:
        """Whether the session runs on CUDA or TensorRT."""
        return self.providers[0] in GPU_PROVIDERS

    def bound(self, batch_size: int) -> Any:
        """A ``iobinding.BoundRunner`` of this session at ``batch_size``: one fixed input shape
        (short batches padded), inputs and outputs bound in place (device-to-device for
        torch CUDA tensors). What extraction uses on a GPU."""
        from embedx.iobinding import BoundRunner

        return BoundRunner(self.session, batch_size=batch_size, input_name=self.input_name,
                           output_name=self.output_name)

    def run(self, batch: np.ndarray) -> np.ndarray:
        """A batch in the model's input layout and dtype (float32 NCHW, or uint8 NHWC pixels)
        -> float32 ``(N, D)`` (outputs of higher rank are flattened)."""
        batch = np.ascontiguousarray(batch, dtype=self.input_dtype)
        expected_rank = len(self.input_shape)
        if batch.ndim != expected_rank:
            raise BackendError(
                f"{self.path.name} expects a rank-{expected_rank} input {self.input_shape}, "
                f"got shape {batch.shape}"
            )
        try:
            (output,) = self.session.run([self.output_name], {self.input_name: batch})
        except Exception as e:  # noqa: BLE001 - ORT raises its own exception types
            raise BackendError(
                f"{self.path.name} failed on a batch of shape {batch.shape} "
                f"(model input {self.input_name} {self.input_shape}): {e}"
            ) from e
        return np.asarray(output, dtype=np.float32).reshape(len(batch), -1)

    def __repr__(self) -> str:
        return f"OrtModel({str(self.path)!r}, providers={self.providers}, precision={self.precision!r})"
