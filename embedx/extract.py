"""The extraction pipeline: images -> backbone features -> HDF5 cache.

Stages (see docs/cache-format.md for what lands on disk):

1. ``data.discover`` lists the images; ``export.resolve_backbone`` gives the ONNX.
2. Every file is hashed (sha256 of its bytes = the cache key) in a few threads;
   keys already in the cache or its resume journal are not decoded again, nor are
   keys that failed to decode before.
3. Worker *processes* read, decode, resize and crop one batch each
   (``preprocess.to_pixels``, the same code predict and serve use) and send back
   uint8 pixels (a quarter of the bytes of float32); a bounded number of batches
   is in flight, so memory stays flat and the backbone does not wait.
4. The main process normalizes (``preprocess.normalize``, one multiply-add), runs
   ONNX Runtime on the batch and journals the features (``CacheWriter.append``).
5. ``CacheWriter.finalize`` writes the cache in the data set's order and drops
   the journal.  A killed run loses at most the batch in flight.

Library code: no printing; progress via the ``progress(done, total, info)`` callback.
Torch is imported only by ``export`` (to export a named backbone once).
"""

from __future__ import annotations

import hashlib
import logging
import os
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from embedx import preprocess
from embedx.errors import ConfigError, ImageDecodeError

log = logging.getLogger(__name__)

#: Decodable train images used to calibrate int8 (the first ones, in data set order).
CALIBRATION_IMAGES = 64
#: Batches decoded ahead of the one being inferred, per worker.
PREFETCH_PER_WORKER = 2
#: With the default ``workers``, jobs of at most this many batches decode inline.
SMALL_JOB_BATCHES = 2


@dataclass
class ExtractSummary:
    """What one ``extract`` call did (printed by the CLI, JSON with ``--json``)."""

    output: str
    images: int  # rows in the finished cache
    new: int  # rows computed by this run
    reused: int  # rows taken from the existing cache or the resume journal
    errors: int  # entries in the cache's errors table
    seconds: float  # the whole call, including backbone export and session start
    images_per_second: float  # new / pipeline_seconds
    pipeline_seconds: float  # hash + decode/infer + write, without setup
    setup_seconds: float  # discover, export/resolve, ORT session (and int8 calibration)
    hash_seconds: float
    decode_seconds: float  # CPU seconds spent decoding, summed over workers
    decode_wait_seconds: float  # main process waiting for decoded batches
    inference_seconds: float
    write_seconds: float
    backbone: str = ""
    precision: str = "fp32"
    dtype: str = "float16"
    providers: list[str] = field(default_factory=list)
    workers: int = 0
    threads: int = 0
    batch_size: int = 0
    int8_cosine: float | None = None
    error_list: list[tuple[str, str]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# --------------------------------------------------------------------------- workers


def _watch_parent(parent: int) -> None:
    """Exit when the parent dies (a SIGKILLed extract must not leave decoders behind)."""
    while True:
        time.sleep(0.5)
        if os.getppid() != parent:
            os._exit(0)


def _init_worker(parent: int) -> None:
    threading.Thread(target=_watch_parent, args=(parent,), daemon=True).start()


_SPECS: dict[str, preprocess.PreprocessSpec] = {}


def _decode_batch(spec_json: str, paths: Sequence[str]) -> dict[str, Any]:
    """Read, hash and decode ``paths`` into one uint8 NHWC batch (runs in a worker).

    Returns ``rows`` (indices into ``paths`` that decoded), ``keys`` (for every
    path, "" when unreadable), ``pixels`` for the decoded rows, ``errors`` as
    ``(index, reason)`` and the CPU seconds spent.
    """
    start = time.process_time()
    spec = _SPECS.get(spec_json)
    if spec is None:
        spec = _SPECS[spec_json] = preprocess.PreprocessSpec.from_json(spec_json)
    size = spec.input_size
    pixels = np.empty((len(paths), size, size, 3), dtype=np.uint8)
    rows: list[int] = []
    keys: list[str] = []
    errors: list[tuple[int, str]] = []
    for index, path in enumerate(paths):
        try:
            with open(path, "rb") as handle:
                data = handle.read()
        except OSError as e:
            keys.append("")
            errors.append((index, f"cannot read: {e.strerror or e}"))
            continue
        keys.append(hashlib.sha256(data).hexdigest())
        try:
            pixels[len(rows)] = preprocess.to_pixels(data, spec)
        except ImageDecodeError as e:
            errors.append((index, str(e).removeprefix("<bytes>: ")))
            continue
        except Exception as e:  # noqa: BLE001 - one bad file must not stop the run; the reason is kept
            errors.append((index, f"cannot decode ({type(e).__name__}: {e})"))
            continue
        rows.append(index)
    return {
        "rows": rows,
        "keys": keys,
        "pixels": pixels[: len(rows)],
        "errors": errors,
        "seconds": time.process_time() - start,
    }


class _Decoder:
    """Decoded batches, in submission order, from worker processes (or inline)."""

    def __init__(self, spec: preprocess.PreprocessSpec, workers: int) -> None:
        self.spec_json = spec.to_json()
        self.workers = workers
        self.pool = None
        if workers > 0:
            import multiprocessing
            from concurrent.futures import ProcessPoolExecutor

            # spawn: the parent has ORT (and maybe torch) threads, which fork does not survive
            self.pool = ProcessPoolExecutor(
                max_workers=workers,
                mp_context=multiprocessing.get_context("spawn"),
                initializer=_init_worker,
                initargs=(os.getpid(),),
            )

    def map(self, batches: Sequence[Sequence[str]]):
        """Yield one result dict per batch, keeping at most a few batches in flight."""
        if self.pool is None:
            for paths in batches:
                yield _decode_batch(self.spec_json, paths)
            return
        ahead = max(2, PREFETCH_PER_WORKER * self.workers)
        pending: deque = deque()
        queue = iter(batches)
        for paths in queue:
            pending.append(self.pool.submit(_decode_batch, self.spec_json, paths))
            if len(pending) >= ahead:
                break
        while pending:
            result = pending.popleft().result()
            nxt = next(queue, None)
            if nxt is not None:
                pending.append(self.pool.submit(_decode_batch, self.spec_json, nxt))
            yield result

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=True, cancel_futures=True)
            self.pool = None


# --------------------------------------------------------------------------- helpers


def default_workers() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def default_output(data: str | Path, backbone: str, precision: str = "fp32") -> Path:
    """``cache_dir()/<data name>-<backbone>.h5`` (``-int8``/``-fp16`` added for those)."""
    from embedx import paths

    data_path = Path(data).resolve()
    data_name = data_path.stem if data_path.suffix.lower() == ".csv" else data_path.name
    backbone_name = Path(backbone).stem if str(backbone).lower().endswith(".onnx") else str(backbone)
    suffix = "" if precision == "fp32" else f"-{precision}"
    return paths.cache_dir() / f"{data_name}-{backbone_name}{suffix}.h5"


def _hash_all(paths: Sequence[Path], threads: int) -> list[tuple[str, str]]:
    """(key, "") or ("", reason) for each path; hashlib releases the GIL on big buffers."""
    from embedx.data import hash_file

    def one(path: Path) -> tuple[str, str]:
        try:
            return hash_file(path), ""
        except OSError as e:
            return "", f"cannot read: {e.strerror or e}"

    if threads <= 1 or len(paths) < 64:
        return [one(p) for p in paths]
    with ThreadPoolExecutor(max_workers=threads) as pool:
        return list(pool.map(one, paths, chunksize=32))


def _calibration_batch(items, keys, errors_by_key, spec) -> np.ndarray:
    """The first decodable train images, in data set order (deterministic)."""
    chosen: list[np.ndarray] = []
    ordered = [i for i, item in enumerate(items) if item.split == "train"] or list(range(len(items)))
    for index in ordered:
        if not keys[index] or keys[index] in errors_by_key:
            continue
        try:
            chosen.append(preprocess.load(items[index].path, spec))
        except ImageDecodeError:
            continue
        if len(chosen) >= CALIBRATION_IMAGES:
            break
    if not chosen:
        raise ConfigError("int8 needs decodable images to calibrate on, and none of the data decodes")
    return np.stack(chosen)


def _normalize_into(pixels: np.ndarray, spec: preprocess.PreprocessSpec) -> np.ndarray:
    batch = np.empty((len(pixels), 3, spec.input_size, spec.input_size), dtype=np.float32)
    for i in range(len(pixels)):
        preprocess.normalize(pixels[i], spec, out=batch[i])
    return batch


# --------------------------------------------------------------------------- extract


def extract(
    data: str | Path,
    *,
    backbone: str,
    weights: str = "DEFAULT",
    layer: str | None = None,
    output: str | Path | None = None,
    batch_size: int = 32,
    workers: int | None = None,
    threads: int | None = None,
    device: str = "auto",
    precision: str = "fp32",
    dtype: str = "float16",
    val_fraction: float | None = None,
    manifest: str | Path | None = None,
    overwrite: bool = False,
    progress: Callable[[int, int | None, dict[str, Any]], None] | None = None,
) -> ExtractSummary:
    """Fill (or update, or finish) the feature cache of ``data`` under ``backbone``.

    Rerunning the same call continues a killed run; rerunning after images were
    added or removed computes only the new ones (by content) and drops the removed
    ones.  A cache made with other settings is refused (``CacheMismatchError``)
    unless ``overwrite``.  ``workers`` decode processes (default: one per core,
    0 decodes in this process); ``threads`` for ONNX Runtime (default: physical cores).
    """
    from embedx import data as data_module
    from embedx.cache import CacheMeta, CacheWriter, sha256_file

    if batch_size < 1:
        raise ConfigError(f"batch_size must be >= 1, got {batch_size}")
    if dtype not in ("float16", "float32"):
        raise ConfigError(f"dtype must be float16 or float32, got {dtype!r}")
    if precision not in ("fp32", "fp16", "int8"):
        raise ConfigError(f"precision must be fp32, fp16 or int8, got {precision!r}")
    if workers is not None and workers < 0:
        raise ConfigError(f"workers must be >= 0, got {workers}")
    if val_fraction is not None and not 0.0 <= val_fraction < 1.0:
        raise ConfigError(f"val_fraction must be in [0, 1), got {val_fraction}")

    started = time.perf_counter()
    dataset = data_module.discover(data, manifest=manifest)
    if val_fraction and any(item.split != "train" for item in dataset.items):
        raise ConfigError(
            f"{data} already has val/test splits ({dataset.layout}); --val-fraction only splits "
            "data without split folders or manifest splits: drop it"
        )
    from embedx.export import resolve_backbone

    exported = resolve_backbone(backbone, weights=weights, layer=layer)
    setup_seconds = time.perf_counter() - started
    spec = exported.preprocess
    output = Path(output) if output is not None else default_output(manifest or data, backbone, precision)
    meta = CacheMeta(
        backbone=exported.backbone,
        weights_tag=exported.weights_tag,
        weights_arg=str(getattr(exported, "weights_arg", weights)),
        onnx_path=str(Path(exported.path).resolve()),
        onnx_sha256=getattr(exported, "sha256", "") or sha256_file(exported.path),
        feature_layer=str(exported.feature_layer),
        feature_dim=int(exported.feature_dim),
        preprocess=spec.to_dict(),
        dtype=dtype,
        precision=precision,
    )
    items = dataset.items
    n_workers = default_workers() if workers is None else workers
    timings = dict.fromkeys(("hash", "decode", "wait", "inference", "write"), 0.0)

    with CacheWriter(output, meta, overwrite=overwrite) as writer:
        pipeline_start = time.perf_counter()
        hashed = _hash_all([item.path for item in items], threads=min(4, max(2, n_workers)))
        keys = [key for key, _ in hashed]
        read_errors = {i: reason for i, (key, reason) in enumerate(hashed) if not key}
        timings["hash"] = time.perf_counter() - pipeline_start
        known_errors = writer.known_errors
        # one decode per distinct key that is neither done nor known to fail
        todo: list[int] = []
        seen: set[str] = set()
        for index, key in enumerate(keys):
            if key and key not in seen and not writer.has(key) and key not in known_errors:
                todo.append(index)
            if key:
                seen.add(key)

        tick = time.perf_counter()
        model = None
        int8_cosine = None
        if todo:
            from embedx.runtime import OrtModel

            calibration = None
            if precision == "int8":
                calibration = _calibration_batch(items, keys, known_errors, spec)
            model = OrtModel(exported.path, device=device, precision=precision, threads=threads,
                             calibration=calibration)
            int8_cosine = model.int8_cosine
        session_seconds = time.perf_counter() - tick
        setup_seconds += session_seconds
        pipeline_start += session_seconds  # the pipeline clock excludes the session start
        if progress is not None:
            progress(0, len(todo), {})

        decode_errors: dict[int, str] = {}
        new = 0
        total = len(todo)
        done = 0
        if todo:
            batches = [todo[i : i + batch_size] for i in range(0, total, batch_size)]
            n_workers = min(n_workers, len(batches))
            if workers is None and len(batches) <= SMALL_JOB_BATCHES:
                n_workers = 0  # starting processes would cost more than decoding inline
            decoder = _Decoder(spec, n_workers)
            try:
                waited = time.perf_counter()
                for batch_indices, result in zip(
                    batches, decoder.map([[str(items[i].path) for i in b] for b in batches]), strict=True
                ):
                    timings["wait"] += time.perf_counter() - waited
                    timings["decode"] += result["seconds"]
                    for position, key in enumerate(result["keys"]):
                        keys[batch_indices[position]] = key or keys[batch_indices[position]]
                    for position, reason in result["errors"]:
                        index = batch_indices[position]
                        decode_errors[index] = reason
                        writer.record_error(items[index].relpath, reason, key=result["keys"][position])
                    rows = [batch_indices[p] for p in result["rows"]]
                    if rows:
                        tick = time.perf_counter()
                        features = model.run(_normalize_into(result["pixels"], spec))
                        timings["inference"] += time.perf_counter() - tick
                        tick = time.perf_counter()
                        writer.append([keys[i] for i in rows], features, paths=[items[i].relpath for i in rows])
                        timings["write"] += time.perf_counter() - tick
                        new += len(rows)
                    else:
                        writer.flush()
                    done += len(batch_indices)
                    if progress is not None:
                        progress(done, total, {"errors": len(decode_errors)})
                    waited = time.perf_counter()
            finally:
                decoder.close()

        # the cache: every item whose key has features, in data set order
        known_errors = writer.known_errors
        errors: list[tuple[str, str, str]] = [(relpath, reason, "") for relpath, reason in dataset.skipped]
        row_keys, row_paths, row_labels, row_splits = [], [], [], []
        for index, item in enumerate(items):
            key = keys[index]
            if index in read_errors and not key:
                errors.append((item.relpath, read_errors[index], ""))
            elif index in decode_errors:
                errors.append((item.relpath, decode_errors[index], key))
            elif key in known_errors and not writer.has(key):
                errors.append((item.relpath, known_errors[key], key))
            elif writer.has(key):
                split = item.split
                if val_fraction:
                    split = data_module.split_for_key(key, val_fraction)
                row_keys.append(key)
                row_paths.append(item.relpath)
                row_labels.append(item.label)
                row_splits.append(split)
            else:  # a key that changed under us and failed; keep it visible
                errors.append((item.relpath, "not decoded (file changed during extraction?)", key))
        tick = time.perf_counter()
        extra = {
            "data": str(Path(data).resolve()),
            "layout": dataset.layout,
            "val_fraction": val_fraction,
            "providers": list(model.providers) if model else [],
            "int8_cosine": int8_cosine,
        }
        writer.finalize(keys=row_keys, paths=row_paths, labels=row_labels, splits=row_splits,
                        classes=list(dataset.classes), errors=errors, attrs=extra)
        timings["write"] += time.perf_counter() - tick

    finished = time.perf_counter()
    pipeline_seconds = finished - pipeline_start
    summary = ExtractSummary(
        output=str(output),
        images=len(row_keys),
        new=new,
        reused=len(row_keys) - new,
        errors=len(errors),
        seconds=finished - started,
        images_per_second=new / pipeline_seconds if pipeline_seconds > 0 else 0.0,
        pipeline_seconds=pipeline_seconds,
        setup_seconds=setup_seconds,
        hash_seconds=timings["hash"],
        decode_seconds=timings["decode"],
        decode_wait_seconds=timings["wait"],
        inference_seconds=timings["inference"],
        write_seconds=timings["write"],
        backbone=meta.backbone,
        precision=precision,
        dtype=dtype,
        providers=list(model.providers) if model else [],
        workers=n_workers if todo else 0,
        threads=int(model.session.get_session_options().intra_op_num_threads) if model else 0,
        batch_size=batch_size,
        int8_cosine=int8_cosine,
        error_list=[(path, reason) for path, reason, _ in errors],
    )
    log.info(
        "extracted %d new, reused %d, %d errors in %.1f s (%.1f img/s)",
        summary.new, summary.reused, summary.errors, summary.seconds, summary.images_per_second,
    )
    return summary


__all__ = ["ExtractSummary", "default_output", "extract"]
