"""This machine and ONNX Runtime's execution providers: which to use and how (torch-free).

- ``gpu_available()`` asks the CUDA driver directly (``libcuda.so.1``: ``cuInit`` and
  ``cuDeviceGetCount``) instead of asking ORT, whose GPU providers print a loud error
  when they are requested on a machine without a GPU.
- ``resolve_providers(device)``: ``"auto"`` is TensorRT > CUDA > CPU, GPU providers
  only when ``gpu_available()`` says so; ``"cuda"``/``"tensorrt"`` are refused with a
  ``BackendError`` where they cannot run.
- ``session_options`` / ``provider_options``: how a session uses the machine (one
  intra-op thread per physical core, optional spinning, TensorRT's engine cache).
- The CPU's feature flags, which decide int8's weight bits (VNNI) and key ORT's
  optimized graphs (its layouts depend on them).
"""

from __future__ import annotations

import ctypes
import logging
import os
import threading
from functools import lru_cache
from pathlib import Path
from typing import Any

from embedx import paths
from embedx.errors import BackendError, ConfigError

logger = logging.getLogger(__name__)

DEVICES = ("auto", "cpu", "cuda", "tensorrt")

CPU = "CPUExecutionProvider"
CUDA = "CUDAExecutionProvider"
TENSORRT = "TensorrtExecutionProvider"
GPU_PROVIDERS = (TENSORRT, CUDA)

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
def tensorrt_loadable() -> bool:
    """TensorRT's runtime library can be loaded (ORT's TensorRT provider needs it)."""
    preload_gpu_libraries()
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
def cpu_flags() -> frozenset[str]:
    """The CPU feature flags of /proc/cpuinfo (empty where there is none)."""
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as handle:
            for line in handle:
                if line.startswith("flags"):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def cpu_has_vnni() -> bool:
    """x86 VNNI (AVX512-VNNI or AVX-VNNI): u8*s8 dot products without saturation."""
    return bool(cpu_flags() & {"avx512_vnni", "avx_vnni"})


def preload_gpu_libraries() -> None:
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
                logger.debug("onnxruntime.preload_dlls() failed: %s", e)


# -- providers ---------------------------------------------------------------------


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
        if TENSORRT in chosen and not tensorrt_loadable():
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
        if not tensorrt_loadable():
            raise BackendError(
                "--device tensorrt needs TensorRT (libnvinfer), which cannot be loaded; "
                "`pip install tensorrt` or use --device cuda"
            )
        return [TENSORRT, CUDA, CPU] if CUDA in available else [TENSORRT, CPU]
    return [CUDA, CPU]


def session_options(threads: int | None, spinning: bool = True) -> Any:
    """ORT session options: ``threads`` intra-op threads (default: the physical cores)."""
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
    options.log_severity_level = 3  # errors only; fallbacks are checked and logged by the caller
    return options


def provider_options(provider: str, precision: str) -> dict[str, str]:
    """Options for ``provider``: TensorRT gets its precision flags and an engine cache; CUDA
    gets the choices below, each measured on an H200 (bench/gpu.py, resnet50, batch 128,
    ONNX Runtime alone, 2026-12-04):

    - ``use_tf32``: off for ``fp32`` (3,449 img/s), because fp32 means fp32: with TF32 (6,759
      img/s) convolutions round their inputs to 10 mantissa bits and probabilities moved by
      2e-4, over the tolerance the tests claim; ``fp16`` is the fast path;
    - ``prefer_nhwc`` for fp16: tensor-core convolutions in their native layout without a
      transpose around each (8,859 -> 11,282 img/s);
    - ``cudnn_conv_algo_search`` EXHAUSTIVE: each input shape pays one search on its first
      call, which extraction (one padded batch shape) and serving (batch buckets, all warmed
      before ready) pay once; HEURISTIC was no faster after it (8,955 vs 8,859 img/s).
    """
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
    if provider == CUDA:
        options = {
            "use_tf32": "0" if precision == "fp32" else "1",
            "prefer_nhwc": "1" if precision == "fp16" else "0",
            "cudnn_conv_algo_search": "EXHAUSTIVE",
        }
        return {**options, **cuda_options_override()}
    return {}


def cuda_options_override() -> dict[str, str]:
    """``$EMBEDX_CUDA_OPTIONS`` (``key=value,key=value``): CUDA provider options that replace
    embedx's choices, for a model or a GPU where another setting measures faster."""
    text = os.environ.get("EMBEDX_CUDA_OPTIONS", "").strip()
    if not text:
        return {}
    options = {}
    for item in text.split(","):
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"EMBEDX_CUDA_OPTIONS must be key=value,key=value; got {item!r}")
        options[key.strip()] = value.strip()
    return options


def cpu_session(path: str | Path, threads: int | None = None, spinning: bool = True) -> Any:
    """A plain CPU session of ``path`` (no optimized-graph cache)."""
    import onnxruntime as ort

    return ort.InferenceSession(str(path), sess_options=session_options(threads, spinning), providers=[CPU])
