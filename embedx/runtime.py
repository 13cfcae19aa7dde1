"""ONNX Runtime sessions: provider choice, threads, precision (torch-free).

- ``gpu_available()`` asks the CUDA driver directly (``libcuda.so.1``: ``cuInit`` and
  ``cuDeviceGetCount``) instead of asking ORT, whose GPU providers print a loud error
  when they are requested on a machine without a GPU.
- ``resolve_providers(device)``: ``"auto"`` is TensorRT > CUDA > CPU, GPU providers
  only when ``gpu_available()`` says so; ``"cuda"``/``"tensorrt"`` are refused with a
  ``BackendError`` where they cannot run.
- ``OrtModel``: one inference session, float32 NCHW in, float32 ``(N, D)`` out.  After
  the session is made, the providers it really uses are checked: a GPU provider that
  silently fell back to the CPU is an error when it was asked for by name, a warning
  under ``"auto"``.
- Precision: ``fp16`` only on a GPU (TensorRT's fp16 flag; for CUDA an fp16 copy of the
  model, cached on disk); ``int8`` is ORT static QDQ quantization from a calibration
  sample (``quantize_int8``), refused unless its features keep a mean cosine >=
  ``min_cosine`` to the fp32 ones on that sample.  Dynamic quantization is not
  offered: it quantizes only MatMul/Gemm and leaves a CNN's convolutions in fp32.

Derived models (fp16, int8) are cached under ``paths.cache_dir()/"runtime"``, keyed by
the sha256 of the source model (and of the calibration sample for int8).
"""

from __future__ import annotations

import ctypes
import hashlib
import json
import logging
import os
import tempfile
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np

from embedx import onnxmeta, paths
from embedx.errors import BackendError, ConfigError, OnnxModelError, QuantizationError

log = logging.getLogger(__name__)

DEVICES = ("auto", "cpu", "cuda", "tensorrt")
PRECISIONS = ("fp32", "fp16", "int8")

CPU = "CPUExecutionProvider"
CUDA = "CUDAExecutionProvider"
TENSORRT = "TensorrtExecutionProvider"
GPU_PROVIDERS = (TENSORRT, CUDA)

#: Samples per batch when calibrating int8 and when comparing int8 with fp32.
CALIBRATION_BATCH = 8
#: Part of the int8 cache key: bump when the quantization recipe changes.
QUANTIZATION_SETTINGS = "qdq-u8s8-pc-minmax"

_preload_lock = threading.Lock()
_preloaded = False


# -- hardware ----------------------------------------------------------------------


@lru_cache(maxsize=1)
def gpu_available() -> bool:
    """True when the CUDA driver loads and reports at least one device.

    Neither torch nor ORT is imported; ``$EMBEDX_DISABLE_GPU=1`` forces False.
    """
    if os.environ.get("EMBEDX_DISABLE_GPU", "").strip() not in ("", "0"):
        return False
    try:
        libcuda = ctypes.CDLL("libcuda.so.1")
    except OSError:
        return False
    try:
        if libcuda.cuInit(0) != 0:
            return False
        count = ctypes.c_int(0)
        if libcuda.cuDeviceGetCount(ctypes.byref(count)) != 0:
            return False
        return count.value > 0
    except AttributeError:
        return False


@lru_cache(maxsize=1)
def _tensorrt_loadable() -> bool:
    """TensorRT's runtime library can be loaded (ORT's TensorRT provider needs it)."""
    _preload_gpu_libraries()
    for name in ("libnvinfer.so.10", "libnvinfer.so.8", "libnvinfer.so"):
        try:
            ctypes.CDLL(name)
            return True
        except OSError:
            continue
    try:  # the pip wheel "tensorrt" keeps its libraries inside its package folder
        import tensorrt_libs  # type: ignore[import-not-found]

        folder = Path(tensorrt_libs.__file__).parent
        for candidate in sorted(folder.glob("libnvinfer.so*")):
            ctypes.CDLL(str(candidate))
            return True
    except (ImportError, OSError):
        pass
    return False


def physical_cores() -> int:
    """Physical cores this process may run on (hyper-threads do not help GEMMs)."""
    try:
        allowed = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        allowed = os.cpu_count() or 1
    cores: set[tuple[str, str]] = set()
    try:
        physical, core = "0", None
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as handle:
            for line in handle:
                key, _, value = line.partition(":")
                key, value = key.strip(), value.strip()
                if key == "physical id":
                    physical = value
                elif key == "core id":
                    core = value
                    cores.add((physical, core))
    except OSError:
        pass
    return max(1, min(allowed, len(cores) or allowed))


@lru_cache(maxsize=1)
def _cpu_flags() -> frozenset[str]:
    """The CPU feature flags of /proc/cpuinfo (empty where there is none)."""
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as handle:
            for line in handle:
                if line.startswith("flags"):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def _cpu_has_vnni() -> bool:
    """x86 VNNI (AVX512-VNNI or AVX-VNNI): u8*s8 dot products without saturation."""
    return bool(_cpu_flags() & {"avx512_vnni", "avx_vnni"})


def _preload_gpu_libraries() -> None:
    """Let ORT find CUDA/cuDNN from the nvidia-* wheels before the first GPU session."""
    global _preloaded
    with _preload_lock:
        if _preloaded:
            return
        _preloaded = True
        import onnxruntime as ort

        if hasattr(ort, "preload_dlls"):
            try:
                ort.preload_dlls()
            except Exception as e:  # noqa: BLE001 - best effort; the session reports the real error
                log.debug("onnxruntime.preload_dlls() failed: %s", e)


def resolve_providers(device: str = "auto") -> list[str]:
    """Provider names for ``device``, best first, always ending with the CPU."""
    if device not in DEVICES:
        raise ConfigError(f"device must be one of {', '.join(DEVICES)}, got {device!r}")
    if device == "cpu":
        return [CPU]
    import onnxruntime as ort

    available = set(ort.get_available_providers())
    if device == "auto":
        if not gpu_available():
            return [CPU]
        chosen = [p for p in GPU_PROVIDERS if p in available]
        if TENSORRT in chosen and not _tensorrt_loadable():
            chosen.remove(TENSORRT)
        return [*chosen, CPU]
    wanted = TENSORRT if device == "tensorrt" else CUDA
    if not gpu_available():
        raise BackendError(
            f"--device {device} needs an NVIDIA GPU, but no CUDA device was found "
            f"(libcuda.so.1 missing or reports 0 devices); use --device cpu or auto"
        )
    if wanted not in available:
        raise BackendError(
            f"--device {device} needs onnxruntime's {wanted}, but this onnxruntime "
            f"({ort.__version__}) offers only {sorted(available)}; install onnxruntime-gpu"
        )
    if device == "tensorrt":
        if not _tensorrt_loadable():
            raise BackendError(
                "--device tensorrt needs TensorRT (libnvinfer), which cannot be loaded; "
                "`pip install tensorrt` or use --device cuda"
            )
        return [TENSORRT, CUDA, CPU] if CUDA in available else [TENSORRT, CPU]
    return [CUDA, CPU]


# -- files -------------------------------------------------------------------------


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def array_sha256(array: np.ndarray) -> str:
    """A key for an array: its dtype, shape and bytes."""
    array = np.ascontiguousarray(array)
    digest = hashlib.sha256(f"{array.dtype.str}{array.shape}".encode())
    digest.update(array.data)
    return digest.hexdigest()


def _derived_dir() -> Path:
    folder = paths.cache_dir() / "runtime"
    folder.mkdir(parents=True, exist_ok=True)  # OSError for a read-only cache: callers decide
    return folder


def _save_atomically(model: Any, target: Path) -> None:
    """Write an ONNX model under a temporary name, then rename (never a half file)."""
    import onnx

    handle, tmp = tempfile.mkstemp(dir=target.parent, prefix=target.name, suffix=".tmp")
    os.close(handle)
    try:
        onnx.save(model, tmp)
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


# -- precision ---------------------------------------------------------------------


def _fp16_model(path: Path) -> Path:
    """An fp16 copy of ``path`` (float32 inputs/outputs kept), cached by sha256."""
    import onnx
    from onnxruntime.transformers.float16 import convert_float_to_float16

    target = _derived_dir() / f"{path.stem}-{file_sha256(path)[:16]}-fp16.onnx"
    if target.exists():
        return target
    model = onnx.load(str(path))
    converted = convert_float_to_float16(model, keep_io_types=True)
    onnxmeta.write(converted, {"precision": "fp16"})
    _save_atomically(converted, target)
    log.info("wrote fp16 model %s", target)
    return target


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


def _cpu_session(path: Path, threads: int | None = None) -> Any:
    import onnxruntime as ort

    options = _session_options(threads)
    return ort.InferenceSession(str(path), sess_options=options, providers=[CPU])


def _run_batched(session: Any, data: np.ndarray) -> np.ndarray:
    name = session.get_inputs()[0].name
    outputs = [
        session.run(None, {name: data[i : i + CALIBRATION_BATCH]})[0]
        for i in range(0, len(data), CALIBRATION_BATCH)
    ]
    return np.concatenate(outputs).reshape(len(data), -1).astype(np.float32)


def cosine_similarity_rows(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Cosine similarity of each row of ``a`` with the same row of ``b`` (float64)."""
    a = np.asarray(a, dtype=np.float64).reshape(len(a), -1)
    b = np.asarray(b, dtype=np.float64).reshape(len(b), -1)
    dot = np.einsum("ij,ij->i", a, b)
    norms = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
    # two zero vectors are the same vector
    return np.where(norms > 0, dot / np.where(norms > 0, norms, 1.0), 1.0)


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
    vnni = _cpu_has_vnni()  # decides the weights' bits: part of the cache key and of a refusal
    settings = f"{QUANTIZATION_SETTINGS}-{'vnni' if vnni else 'r7'}"
    model_key = (source_sha256 or file_sha256(path))[:16]

    def cached(calibration_key: str) -> tuple[Path, dict | None]:
        try:
            target = _derived_dir() / f"{path.stem}-{model_key}-{calibration_key[:12]}-{settings}-int8.onnx"
        except OSError as e:
            raise QuantizationError(
                f"int8 quantization writes its model under {paths.cache_dir()}, which is not "
                f"writable ({e.strerror or e}); set EMBEDX_CACHE_DIR to a writable folder"
            ) from e
        report_path = target.with_suffix(".json")
        if target.exists() and report_path.exists():
            report = json.loads(report_path.read_text())
            log.info("int8 model from cache: %s (mean cosine %.5f)", target, report["mean_cosine"])
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
        report_path = target.with_suffix(".json")
        tmp = report_path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(report, indent=2, sort_keys=True))
        os.replace(tmp, report_path)
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

    input_name = _cpu_session(path).get_inputs()[0].name
    with tempfile.TemporaryDirectory(dir=target.parent) as work:
        prepared = Path(work) / "prepared.onnx"
        try:
            # shape inference + graph fusion first: measured on resnet18, the int8 model runs
            # 5x faster with this pre-pass than without (same cosine, 0.9999)
            quant_pre_process(str(path), str(prepared), skip_symbolic_shape=False)
        except Exception as e:  # noqa: BLE001 - the pre-pass is optional; quantize the original
            log.warning("quantization pre-processing failed (%s); quantizing the model as is", e)
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
        reference = _run_batched(_cpu_session(path), calibration)
        candidate = _run_batched(_cpu_session(quantized), calibration)
        cosines = cosine_similarity_rows(reference, candidate)
        model = onnx.load(str(quantized))
        source_meta = onnxmeta.from_proto(onnx.load(str(path), load_external_data=False))
        onnxmeta.write(model, source_meta)
        onnxmeta.write(model, {"precision": "int8", "int8_cosine": f"{cosines.mean():.6f}"})
        _save_atomically(model, target)
    report = {
        "source": str(path),
        "samples": int(len(calibration)),
        "mean_cosine": float(cosines.mean()),
        "min_cosine": float(cosines.min()),
    }
    log.info(
        "int8 model %s: mean cosine %.5f, min %.5f over %d images",
        target, report["mean_cosine"], report["min_cosine"], report["samples"],
    )
    return report


# -- sessions ----------------------------------------------------------------------


def _session_options(threads: int | None, spinning: bool = True) -> Any:
    import onnxruntime as ort

    options = ort.SessionOptions()
    if not spinning:
        # ORT's intra-op threads spin while waiting for work; when other processes
        # (decode workers, server threads) share the cores, that spinning steals
        # their CPU time.  Measured in bench/extract.py and bench/serve.py.
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.intra_op_num_threads = threads or physical_cores()
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.log_severity_level = 3  # errors only; fallbacks are checked and logged here
    return options


def _provider_options(provider: str, precision: str) -> dict[str, str]:
    if provider == TENSORRT:
        engines = paths.cache_dir() / "tensorrt"
        engines.mkdir(parents=True, exist_ok=True)
        return {
            "trt_fp16_enable": "True" if precision == "fp16" else "False",
            "trt_int8_enable": "True" if precision == "int8" else "False",
            "trt_engine_cache_enable": "True",
            "trt_engine_cache_path": str(engines),
            "trt_timing_cache_enable": "True",
            "trt_timing_cache_path": str(engines),
        }
    return {}


def _optimized_cache_path(path: Path) -> Path:
    """Where the ORT-optimized copy of ``path`` lives for this machine and ORT version.

    Keyed by the file's identity (absolute path, size, mtime) rather than its sha256,
    which would cost as much as the optimization saves; the CPU flags are in the key
    because ORT's layout choices (NCHWc blocks) depend on them.
    """
    import onnxruntime as ort

    stat = path.stat()
    flags = ",".join(sorted(_cpu_flags()))
    identity = f"{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}|{ort.__version__}|{flags}"
    digest = hashlib.sha256(identity.encode()).hexdigest()[:20]
    folder = _derived_dir() / "optimized"
    folder.mkdir(parents=True, exist_ok=True)
    return folder / f"{path.stem}-{digest}.ort.onnx"


def _cpu_session_cached(path: Path, threads: int | None, spinning: bool = True) -> Any:
    """A CPU session from the cached optimized graph, writing it on the first use."""
    import onnxruntime as ort

    try:
        cached = _optimized_cache_path(path)
    except OSError as e:  # a read-only cache: optimize in memory, as ORT does by default
        log.debug("not caching the optimized graph of %s: %s", path, e)
        return ort.InferenceSession(str(path), sess_options=_session_options(threads, spinning), providers=[CPU])
    if cached.exists():
        options = _session_options(threads, spinning)
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        try:
            return ort.InferenceSession(str(cached), sess_options=options, providers=[CPU])
        except Exception as e:  # noqa: BLE001 - a stale or damaged cache entry is rebuilt
            log.warning("ignoring unusable optimized model %s: %s", cached, e)
            cached.unlink(missing_ok=True)
    options = _session_options(threads, spinning)
    handle, tmp = tempfile.mkstemp(dir=cached.parent, prefix=cached.name, suffix=".tmp")
    os.close(handle)
    options.optimized_model_filepath = tmp
    try:
        session = ort.InferenceSession(str(path), sess_options=options, providers=[CPU])
        if os.path.getsize(tmp):
            os.replace(tmp, cached)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return session


def _varint(data: Any, position: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        byte = data[position]
        position += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, position
        shift += 7


def _embedx_metadata(path: Path) -> dict[str, str]:
    """``onnxmeta.read(path)`` without parsing the graph: the top-level fields of the
    ModelProto are walked and only ``metadata_props`` (field 14) is decoded, so a 94 MB
    resnet50 costs microseconds instead of 0.1 s (measured).  Falls back to
    ``onnxmeta.read`` on anything unexpected."""
    import mmap

    try:
        with open(path, "rb") as handle, mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) as data:
            found: dict[str, str] = {}
            position, end = 0, len(data)
            while position < end:
                tag, position = _varint(data, position)
                field, wire = tag >> 3, tag & 7
                if wire == 0:
                    _, position = _varint(data, position)
                elif wire == 1:
                    position += 8
                elif wire == 5:
                    position += 4
                elif wire == 2:
                    length, position = _varint(data, position)
                    if field == 14:  # StringStringEntryProto {1: key, 2: value}
                        entry, stop, pair = position, position + length, {}
                        while entry < stop:
                            inner, entry = _varint(data, entry)
                            size, entry = _varint(data, entry)
                            pair[inner >> 3] = data[entry : entry + size].decode("utf-8")
                            entry += size
                        key = pair.get(1, "")
                        if key.startswith(onnxmeta.PREFIX):
                            found[key[len(onnxmeta.PREFIX):]] = pair.get(2, "")
                    position += length
                else:
                    raise ValueError(f"wire type {wire}")
            if position != end:
                raise ValueError("truncated")
            return found
    except (OSError, ValueError, IndexError, UnicodeDecodeError) as e:
        log.debug("reading the metadata of %s the slow way: %s", path, e)
        return onnxmeta.read(path)


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
        import onnxruntime as ort

        if precision not in PRECISIONS:
            raise ConfigError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
        self.source_path = Path(path)
        if not self.source_path.is_file():
            raise OnnxModelError(f"ONNX model {self.source_path} does not exist")
        self.device = device
        self.precision = precision
        self.int8_cosine: float | None = None
        requested = resolve_providers(device)
        on_gpu = requested[0] in GPU_PROVIDERS
        model_path = self.source_path
        if precision == "fp16":
            if not on_gpu:
                raise BackendError(
                    "fp16 runs only on a GPU (ONNX Runtime's CPU kernels are fp32), and "
                    f"--device {device} resolved to the CPU here; use --precision fp32 or int8"
                )
            if requested[0] == CUDA:
                model_path = _fp16_model(self.source_path)
        elif precision == "int8":
            model_path, self.int8_cosine = self._int8_path(calibration, min_cosine, source_sha256)
        if on_gpu:
            _preload_gpu_libraries()
        providers = [(p, _provider_options(p, precision)) for p in requested]
        try:
            if requested == [CPU] and cache_optimized:
                self.session = _cpu_session_cached(model_path, threads, spinning)
            else:
                self.session = ort.InferenceSession(
                    str(model_path), sess_options=_session_options(threads, spinning), providers=providers
                )
        except Exception as e:  # noqa: BLE001 - ORT raises its own exception types
            raise OnnxModelError(f"ONNX Runtime cannot load {model_path}: {e}") from e
        self.path = model_path
        self.providers: list[str] = list(self.session.get_providers())
        if requested[0] != self.providers[0]:
            message = (
                f"ONNX Runtime was asked for {requested[0]} but runs {model_path.name} on "
                f"{self.providers[0]} (check the CUDA/cuDNN/TensorRT libraries)"
            )
            if device in ("cuda", "tensorrt"):
                raise BackendError(message + "; use --device auto or cpu")
            log.warning(message)
        inputs, outputs = self.session.get_inputs(), self.session.get_outputs()
        self.input_name: str = inputs[0].name
        self.input_shape = list(inputs[0].shape)
        output_names = [o.name for o in outputs]
        self.output_name: str = "features" if "features" in output_names else output_names[0]
        custom = self.session.get_modelmeta().custom_metadata_map
        self.meta: dict[str, str] = {
            k[len(onnxmeta.PREFIX):]: v for k, v in custom.items() if k.startswith(onnxmeta.PREFIX)
        }
        log.info("loaded %s on %s (%s)", model_path.name, self.providers[0], precision)

    def _int8_path(self, calibration: np.ndarray | CalibrationSource | None, min_cosine: float,
                   source_sha256: str | None) -> tuple[Path, float | None]:
        meta = _embedx_metadata(self.source_path)
        if meta.get("precision") == "int8":
            cosine = meta.get("int8_cosine")
            return self.source_path, float(cosine) if cosine else None
        if calibration is None:
            raise BackendError(
                f"int8 needs a calibration sample to quantize {self.source_path.name}: pass "
                f"calibration= (a batch of preprocessed images) or use quantize_int8() first"
            )
        return quantize_int8(self.source_path, calibration, min_cosine=min_cosine, source_sha256=source_sha256)

    def run(self, batch: np.ndarray) -> np.ndarray:
        """float32 NCHW batch -> float32 ``(N, D)`` (outputs of higher rank are flattened)."""
        batch = np.ascontiguousarray(batch, dtype=np.float32)
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
