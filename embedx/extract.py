"""The extraction pipeline: images -> backbone features -> HDF5 cache.

Stages (see docs/cache-format.md for what lands on disk):

1. ``data.discover`` lists the images; ``export.resolve_backbone`` gives the ONNX.
2. Every file gets its key, the sha256 of its bytes, hashed in up to 16 threads (a
   file whose path, size and mtime match a row of the previous cache keeps that
   row's key unread).  Keys already in the cache or its resume journal are not
   decoded again, nor are keys that failed to decode before.  A cache with nothing
   in it yet is not hashed up front: the decoders hash the bytes they read.
3. Decoding: worker *processes* (spawned: the parent holds ORT/torch threads) read,
   decode, resize and crop one batch each (``preprocess.to_pixels``, the same code
   predict and serve use) and send back uint8 pixels; at most two batches per worker
   are in flight, and a worker that dies costs only the file it died on.  Or, with
   ``decode="gpu"``, ``gpu.GpuDecodeSource``: nvJPEG and resizing on the device.
4. The main process runs ONNX Runtime on the batch: a pixel-input copy of the
   backbone (``pixel_input``: uint8 NHWC in, normalization in the graph) for every
   precision but int8 (whose calibrated model takes float32, normalized here).  On a
   GPU the session runs IO-bound at one padded batch shape (``OrtModel.bound``).
   The features are journaled (``CacheWriter.append``) by a background thread, two
   batches deep at most.
5. ``CacheWriter.finalize`` writes the cache in the data set's order and drops
   the journal.  A killed run loses at most the batches not yet journaled.

Library code: no printing; progress via the ``progress(done, total, info)`` callback.
Torch is imported by ``export`` for a named backbone (its fingerprint holds the torch
version) and by GPU decode; a run from an ``.onnx`` file on the CPU never imports it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
import os
import signal
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from embedx import preprocess
from embedx.errors import ConfigError, ImageDecodeError
from embedx.fsio import sha256_bytes, sha256_file

logger = logging.getLogger(__name__)

#: Decodable train images used to calibrate int8 (the first ones, in data set order).
CALIBRATION_IMAGES = 64
#: Batches decoded ahead of the one being inferred, per worker.
PREFETCH_PER_WORKER = 2
#: With the default ``workers``, jobs of at most this many batches decode inline.
SMALL_JOB_BATCHES = 2
#: Threads that hash files before a run (hashlib and file reads release the GIL).
HASH_THREADS = 16
#: With the default ``workers``, one worker per this many batches after the first
#: (the first is decoded in the main process while the workers start), up to one per core.
BATCHES_PER_WORKER = 3


@dataclass
class ExtractSummary:
    """What one ``extract`` call did (printed by the CLI, JSON with ``--json``)."""

    output: str
    images: int  # rows in the finished cache
    new: int  # rows computed by this run
    hashed: int  # files read to compute their key (unchanged files of the previous cache are not)
    reused: int  # rows taken from the existing cache or the resume journal
    errors: int  # entries in the cache's errors table
    seconds: float  # the whole call, including backbone export
    images_per_second: float  # (new + new_views) / pipeline_seconds: forward passes per second
    pipeline_seconds: float  # from opening the cache to the finished file: hash, session, decode, infer, write
    # (less engine_start_seconds)
    setup_seconds: float  # discover the data, export/resolve the backbone (cached after the first run)
    hash_seconds: float
    session_seconds: float  # ORT session (and int8 calibration), overlapped with the first decodes
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
    decode: str = "cpu"
    repaired: int = 0  # rows of the previous cache that failed their checksum or held NaN/inf: computed again
    views: int = 0  # view rows in the finished cache (augmented views of train images)
    new_views: int = 0  # view rows computed by this run (one forward pass each)
    view_plan: dict[str, Any] = field(default_factory=dict)  # ``ViewPlan.to_dict()``, {} without views
    engine: str = "local"
    actors: int = 0  # Ray inference actors (0 with the local engine)
    engine_start_seconds: float = 0.0  # joining or starting the Ray cluster (not in pipeline_seconds' rate)

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
    # Ctrl-C reaches the whole process group: the main process handles it and shuts
    # the pool down; a worker dying of it mid-batch would only add tracebacks.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    threading.Thread(target=_watch_parent, args=(parent,), daemon=True).start()


_SPECS: dict[str, preprocess.PreprocessSpec] = {}
#: Environment of decode workers (set while they start).
_WORKER_ENVIRONMENT = {"OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def _decode_batch(spec_json: str, paths: Sequence[str | tuple[str, str, str]]) -> dict[str, Any]:
    """Read, hash and decode ``paths`` into one uint8 NHWC batch (runs in a worker).

    An entry ``(path, view name, parameters)`` is an augmented view of that file
    (``embedx.augment``): its key is the view's key, made from the key of the bytes read.
    Returns ``rows`` (indices into ``paths`` that decoded), ``keys`` (for every
    path, "" when unreadable), ``pixels`` for the decoded rows, ``errors`` as
    ``(index, reason)`` and the CPU seconds spent.
    """
    start = time.thread_time()
    spec = _SPECS.get(spec_json)
    if spec is None:
        spec = _SPECS[spec_json] = preprocess.PreprocessSpec.from_json(spec_json)
    size = spec.input_size
    pixels = np.empty((len(paths), size, size, 3), dtype=np.uint8)
    rows: list[int] = []
    keys: list[str] = []
    errors: list[tuple[int, str]] = []
    for index, task in enumerate(paths):
        path, view = (task, None) if isinstance(task, str) else (task[0], task[1:])
        try:
            with open(path, "rb") as handle:
                data = handle.read()
        except OSError as e:
            keys.append("")
            errors.append((index, f"cannot read: {e.strerror or e}"))
            continue
        key = sha256_bytes(data)
        transform = None
        if view is not None:
            from embedx.augment import view_image, view_key

            transform = functools.partial(view_image, key=key, name=view[0], parameters=view[1])
            key = view_key(key, *view)
        keys.append(key)
        decoded, reason = preprocess.pixels_or_reason(data, spec, transform=transform)
        if decoded is None:
            errors.append((index, reason))
            continue
        pixels[len(rows)] = decoded
        rows.append(index)
    return {
        "rows": rows,
        "keys": keys,
        "pixels": pixels[: len(rows)],
        "errors": errors,
        "seconds": time.thread_time() - start,
    }


class _Decoder:
    """Decoded batches, in order, from worker processes (or inline with ``workers=0``).

    Work is submitted on construction, so workers start decoding while the caller
    still sets up its ONNX Runtime session.  At most ``PREFETCH_PER_WORKER`` batches
    per worker are in flight (bounded memory).  If a worker process dies (a native
    crash in an image library, the OOM killer), the pool is restarted and that batch
    is decoded again one file per task, so only the file that kills a decoder is
    lost, recorded as an error.
    """

    def __init__(self, spec: preprocess.PreprocessSpec, workers: int, batches: Sequence[Sequence[str]]) -> None:
        self.spec_json = spec.to_json()
        self.workers = workers
        self._batches = iter(batches)
        self._pending: deque = deque()  # (paths, future)
        self._first = None  # future of the first batch, decoded in a thread of this process
        self._thread = None
        self.pool = None
        if workers > 0:
            # The first batch is decoded here, in a thread (Pillow releases the GIL),
            # while the workers start (a fresh interpreter each) and the caller
            # creates its ORT session: the backbone gets going at once.
            first = next(self._batches, None)
            with self._starting_workers():  # the first submits start the processes
                self._start_pool()
                self._fill()
            # only now: spawning snapshots sys.path, which a decoder library being
            # imported in that thread may have changed for a moment (OpenCV does)
            if first is not None:
                self._thread = ThreadPoolExecutor(max_workers=1)
                self._first = self._thread.submit(_decode_batch, self.spec_json, first)

    @staticmethod
    @contextmanager
    def _starting_workers():
        """Start workers with SIGINT ignored from their first instruction (the disposition
        survives exec), so a Ctrl-C while they import does not print their tracebacks; and
        with one BLAS/OpenMP thread (a worker is single-threaded by design, and numpy's
        import starting a BLAS pool per core costs each worker ~0.1 CPU-s, measured)."""
        saved = {name: os.environ.get(name) for name in _WORKER_ENVIRONMENT}
        os.environ.update(_WORKER_ENVIRONMENT)
        main = threading.current_thread() is threading.main_thread()
        previous = signal.signal(signal.SIGINT, signal.SIG_IGN) if main else None
        try:
            yield
        finally:
            if main:
                signal.signal(signal.SIGINT, previous)
            for name, value in saved.items():
                if value is None:
                    os.environ.pop(name, None)
                else:
                    os.environ[name] = value

    @staticmethod
    def _new_pool(workers: int):
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        # spawn: the parent has ORT (and maybe torch) threads, which fork does not survive
        return ProcessPoolExecutor(
            max_workers=workers,
            mp_context=multiprocessing.get_context("spawn"),
            initializer=_init_worker,
            initargs=(os.getpid(),),
        )

    def _start_pool(self) -> None:
        self.pool = self._new_pool(self.workers)

    def _restart_pool(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)
        again = [paths for paths, _ in self._pending]
        with self._starting_workers():
            self._start_pool()
            self._pending = deque((paths, self._submit(paths)) for paths in again)

    def _submit(self, paths: Sequence[str]):
        """Queue ``paths`` for decoding on the current pool (a Future of ``_decode_batch``)."""
        return self.pool.submit(_decode_batch, self.spec_json, paths)

    def _fill(self) -> None:
        from concurrent.futures.process import BrokenProcessPool

        ahead = max(2, PREFETCH_PER_WORKER * self.workers)
        while len(self._pending) < ahead:
            paths = next(self._batches, None)
            if paths is None:
                return
            try:
                future = self._submit(paths)
            except BrokenProcessPool:
                # a worker died on a batch decoded ahead while this process was busy: a new
                # pool takes over what is pending, and the batch that kills a worker again
                # is isolated when its turn comes (``__iter__``)
                self._restart_pool()
                future = self._submit(paths)
            self._pending.append((paths, future))

    def _isolated(self, paths: Sequence[str]) -> dict[str, Any]:
        """Decode ``paths`` one per task after a worker died; a file that kills one is an error."""
        from concurrent.futures.process import BrokenProcessPool

        parts = []
        # a pool of its own: another batch that kills a worker must not count against these files
        pool = self._new_pool(1)
        try:
            for path in paths:
                try:
                    with self._starting_workers():
                        future = pool.submit(_decode_batch, self.spec_json, [path])
                    parts.append(future.result())
                except BrokenProcessPool:
                    logger.warning("a decoder process died on %s; recording it as an error", path)
                    pool.shutdown(wait=False)
                    pool = self._new_pool(1)
                    parts.append({"rows": [], "keys": [""], "pixels": None, "seconds": 0.0,
                                  "errors": [(0, "the decoder process crashed on this file")]})
        finally:
            pool.shutdown(wait=True)
        pixels = [part["pixels"] for part in parts if part["rows"]]
        return {
            "rows": [i for i, part in enumerate(parts) if part["rows"]],
            "keys": [part["keys"][0] for part in parts],
            "pixels": np.concatenate(pixels) if pixels else np.empty((0, 1, 1, 3), dtype=np.uint8),
            "errors": [(i, part["errors"][0][1]) for i, part in enumerate(parts) if part["errors"]],
            "seconds": sum(part["seconds"] for part in parts),
        }

    def __iter__(self):
        from concurrent.futures.process import BrokenProcessPool

        if self.pool is None:
            for paths in self._batches:
                yield _decode_batch(self.spec_json, paths)
            return
        if self._first is not None:
            yield self._first.result()
        while self._pending:
            paths, future = self._pending.popleft()
            try:
                result = future.result()
            except BrokenProcessPool:
                self._restart_pool()
                result = self._isolated(paths)
            self._fill()
            yield result

    def close(self) -> None:
        if self._thread is not None:
            self._thread.shutdown(wait=True, cancel_futures=True)
            self._thread = None
        if self.pool is not None:
            self.pool.shutdown(wait=True, cancel_futures=True)
            self.pool = None


# --------------------------------------------------------------------------- helpers


def default_workers() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def default_output(data: str | Path, backbone: str, precision: str = "fp32",
                   shard: tuple[int, int] | None = None) -> Path:
    """``cache_dir()/<data name>-<backbone>.h5`` (``-int8``/``-fp16`` added for those,
    ``-shard<I>of<N>`` for a shard)."""
    from embedx import paths
    from embedx.onnxgraph import is_onnx_path

    data_path = Path(data).resolve()
    data_name = data_path.stem if data_path.suffix.lower() == ".csv" else data_path.name
    backbone_name = Path(backbone).stem if is_onnx_path(backbone) else str(backbone)
    suffix = "" if precision == "fp32" else f"-{precision}"
    if shard is not None:
        suffix += f"-shard{shard[0]}of{shard[1]}"
    return paths.cache_dir() / f"{data_name}-{backbone_name}{suffix}.h5"


def _hash_all(paths: Sequence[Path], threads: int) -> list[tuple[str, str]]:
    """(key, "") or ("", reason) for each path; hashlib releases the GIL on big buffers."""

    def one(path: Path) -> tuple[str, str]:
        try:
            return sha256_file(path), ""
        except OSError as e:
            return "", f"cannot read: {e.strerror or e}"

    if threads <= 1 or len(paths) < 64:
        return [one(p) for p in paths]
    with ThreadPoolExecutor(max_workers=threads) as pool:
        return list(pool.map(one, paths, chunksize=32))


def _calibration(run: Any, items: Sequence[Any], spec: preprocess.PreprocessSpec,
                 keys: Sequence[str] | None, known_errors: Any) -> Any:
    """int8 calibration images: those of ``keys`` (an earlier run's), else the first
    ``CALIBRATION_IMAGES`` decodable train images in data set order (deterministic).

    A ``CalibrationSource`` keyed by the images' content keys and the preprocessing, so
    that the images are decoded only when no int8 model for them is cached; it sets
    ``run.calibration_keys`` to the images used.
    """
    from embedx.quantize import CalibrationSource

    first_index: dict[str, int] = {}
    for index, key in enumerate(run.keys):
        if key:
            first_index.setdefault(key, index)
    if keys:
        candidates = [first_index[key] for key in keys]
    else:
        candidates = [i for i, item in enumerate(items) if item.split == "train"] or list(range(len(items)))
    candidates = [i for i in candidates
                  if run.keys[i] and i not in run.read_errors and run.keys[i] not in known_errors]

    def key_of(chosen_keys: Sequence[str]) -> str:
        return sha256_bytes("\n".join([spec.to_json(), *chosen_keys]).encode())

    def load() -> tuple[np.ndarray, str]:
        chosen: list[np.ndarray] = []
        chosen_keys: list[str] = []
        for index in candidates:
            try:
                chosen.append(preprocess.load(items[index].path, spec))
            except ImageDecodeError:
                continue
            chosen_keys.append(run.keys[index])
            if len(chosen) >= CALIBRATION_IMAGES:
                break
        if not chosen:
            raise ConfigError("int8 needs decodable images to calibrate on, and none of the data decodes")
        run.calibration_keys = chosen_keys
        return np.stack(chosen), key_of(chosen_keys)

    # if these images are all cached as calibrated, they are the ones used (the key names them)
    run.calibration_keys = [run.keys[i] for i in candidates[:CALIBRATION_IMAGES]]
    return CalibrationSource(key=key_of(run.calibration_keys), load=load)


def _recorded_calibration(run: Any, writer: Any) -> tuple[list[str] | None, bool]:
    """The calibration keys of the run this one continues, if all those images are still
    here, and whether the earlier rows had to be discarded because they are not."""
    recorded = writer.journal_notes.get("int8_calibration_keys") or writer.base_extra.get("int8_calibration_keys")
    if not recorded:
        return None, False
    present = set(run.keys)
    if all(key in present for key in recorded):
        return list(recorded), False
    logger.warning(
        "images the earlier int8 run calibrated on are gone, so its int8 model cannot be rebuilt; "
        "every image is computed again with a newly calibrated model"
    )
    writer.discard_previous()
    return None, True


def _normalize_into(pixels: np.ndarray, spec: preprocess.PreprocessSpec) -> np.ndarray:
    """float32 NCHW of uint8 NHWC ``pixels`` (int8 models take normalized floats)."""
    batch = np.empty((len(pixels), 3, spec.input_size, spec.input_size), dtype=np.float32)
    for i in range(len(pixels)):
        preprocess.normalize(pixels[i], spec, out=batch[i])
    return batch


def _host_pixels(pixels: Any) -> np.ndarray:
    """A uint8 NHWC batch as numpy, whether it is numpy already or a (device) tensor."""
    if isinstance(pixels, np.ndarray):
        return pixels
    return pixels.cpu().numpy()


def _pixel_input(precision: str) -> bool:
    """Whether the model takes uint8 pixels and normalizes them in its graph (every precision but
    int8, whose static quantization is calibrated on the float input)."""
    return precision != "int8"


# --------------------------------------------------------------------------- extract


@dataclass
class _Run:
    """Mutable state of one extraction (keys by item index, errors, clocks)."""

    keys: list[str]
    read_errors: dict[int, str]
    todo: list[int]
    stats: list[tuple[int, int] | None] = field(default_factory=list)
    hashed: int = 0
    decode_errors: dict[int, str] = field(default_factory=dict)
    new: int = 0
    workers: int = 0
    model: Any = None
    actors: int = 0  # the Ray engine's inference actors, and what their sessions use
    providers: list[str] = field(default_factory=list)
    threads: int = 0
    calibration_keys: list[str] | None = None
    computed: set[str] = field(default_factory=set)  # keys computed in this run
    members: set[int] | None = None  # with a shard: the items in it, fixed when planned
    view_todo: list[tuple[int, str]] = field(default_factory=list)  # (item index, view name) to compute
    new_views: int = 0
    seconds: dict[str, float] = field(
        default_factory=lambda: dict.fromkeys(
            ("hash", "session", "decode", "wait", "inference", "write", "engine_start"), 0.0)
    )

    def tasks(self) -> list[tuple[int, str | None]]:
        """What to compute, in order: ``(item index, None)`` for each clean row, then
        ``(item index, view name)`` for each view."""
        return [(index, None) for index in self.todo] + list(self.view_todo)


def _stat(path: Path) -> tuple[int, int] | None:
    try:
        info = os.stat(path)
    except OSError:
        return None
    return info.st_size, info.st_mtime_ns


def _plan(items: Sequence[Any], writer: Any, workers: int, *, lazy: bool = False) -> _Run:
    """Key every file and list the items to compute: one per key not done and not known bad.

    A file whose relative path, size and mtime match a row of the previous cache keeps
    that row's key without being read (like rsync and make); every other file is hashed.
    With ``lazy`` and a cache that has nothing yet (no rows, no journal, no known errors)
    nothing is hashed here: every item is computed, the decoders hash the bytes they read
    (reading and hashing every file a second time was a third of a GPU run), and a file
    whose bytes an earlier one had is dropped at journaling time instead.
    """
    tick = time.perf_counter()
    stats = [_stat(item.path) for item in items]
    if lazy and not (writer.base_stats or writer.done_keys or writer.known_errors):
        run = _Run(keys=[""] * len(items), read_errors={}, todo=list(range(len(items))), stats=stats,
                   hashed=len(items))
        run.seconds["hash"] = time.perf_counter() - tick
        return run
    keys = [""] * len(items)
    to_hash: list[int] = []
    for index, item in enumerate(items):
        known = writer.base_stats.get(item.relpath)
        if known is not None and stats[index] == known[:2] and writer.has(known[2]):
            keys[index] = known[2]
        else:
            to_hash.append(index)
    hashed = _hash_all([items[i].path for i in to_hash], threads=min(HASH_THREADS, max(2, workers)))
    read_errors: dict[int, str] = {}
    for index, (key, reason) in zip(to_hash, hashed, strict=True):
        keys[index] = key
        if not key:
            read_errors[index] = reason
    known_errors = writer.known_errors
    todo: list[int] = []
    seen: set[str] = set()
    for index, key in enumerate(keys):
        if key and key not in seen and not writer.has(key) and key not in known_errors:
            todo.append(index)
        seen.add(key)
    run = _Run(keys=keys, read_errors=read_errors, todo=todo, stats=stats, hashed=len(to_hash))
    run.seconds["hash"] = time.perf_counter() - tick
    return run


class _Journal:
    """The cache writer's calls (``append``, ``record_error``, ``flush``), in order, in one
    background thread at most ``depth`` batches behind, so that a batch's journal write and
    fsync overlap the next batch's inference. A write that fails is raised at the next call
    or at ``close``; a crash loses at most the ``depth`` batches not yet journaled, which a
    rerun computes again."""

    def __init__(self, writer: Any, depth: int = 2) -> None:
        self.writer = writer
        self.depth = depth
        self.seconds = 0.0
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="embedx-journal")
        self._pending: deque = deque()

    def _timed(self, name: str, *args: Any, **kwargs: Any) -> None:
        tick = time.perf_counter()
        getattr(self.writer, name)(*args, **kwargs)
        self.seconds += time.perf_counter() - tick

    def submit(self, name: str, *args: Any, **kwargs: Any) -> None:
        while self._pending and (self._pending[0].done() or len(self._pending) >= self.depth):
            self._pending.popleft().result()
        self._pending.append(self._pool.submit(self._timed, name, *args, **kwargs))

    def close(self) -> None:
        try:
            while self._pending:
                self._pending.popleft().result()
        finally:
            self._pool.shutdown(wait=True, cancel_futures=True)


def _first_of_each_key(run: _Run, features: np.ndarray, rows: list[int],
                       keys: Sequence[str]) -> tuple[np.ndarray, list[int]]:
    """Drop rows whose key (``keys``, one per row: bytes or view) was already computed in this run:
    copies of one image under several names are computed once when the plan hashed them (lazy plans do not)."""
    keep = []
    for position, key in enumerate(keys):
        if key not in run.computed:
            run.computed.add(key)
            keep.append(position)
    if len(keep) == len(rows):
        return features, rows
    return features[keep], [rows[position] for position in keep]


def _plan_views(run: _Run, items: Sequence[Any], writer: Any, plan: Any, val_fraction: float | None, *,
                lazy: bool) -> None:
    """List the views to compute: those of ``plan`` for each item's split that the cache lacks.

    A lazy plan (a fresh cache: keys unknown yet) lists every view of every item; the
    decoders key them and duplicates are dropped at journaling time, like rows."""
    from embedx.augment import view_key

    if not plan:
        return
    known_errors = writer.known_errors
    seen: set[str] = set()
    for index, item in enumerate(items):
        if run.members is not None and index not in run.members:
            continue  # another shard's image
        key = run.keys[index]
        if lazy:
            run.view_todo.extend((index, name) for name in plan.names(item.split))
            continue
        if not key or key in known_errors:
            continue
        for name in plan.names(_split(item, key, val_fraction)):
            vkey = view_key(key, name, plan.parameters(name))
            if vkey not in seen and not writer.has(vkey):
                run.view_todo.append((index, name))
            seen.add(vkey)


def _split(item: Any, key: str, val_fraction: float | None) -> str:
    """The split a row lands in: its item's, or the hash split by key with ``val_fraction``."""
    from embedx.data import split_for_key

    return split_for_key(key, val_fraction) if val_fraction else item.split


def _resolve_views(writer: Any, views: int | None, augment: Any) -> Any:
    """The views of this run: what was asked, and for what was not asked, what the cache has
    (a plain rerun keeps a cache's views, and gives new images theirs)."""
    from embedx.augment import AugmentSpec, ViewPlan

    previous = ViewPlan.from_dict(writer.base_views) if writer.base_views else ViewPlan()
    if augment is not None and not isinstance(augment, AugmentSpec):
        augment = AugmentSpec.parse(augment)
    return ViewPlan(count=previous.count if views is None else int(views),
                    augment=previous.augment if augment is None else augment)


def _note_decoded(run: _Run, items: Sequence[Any], journal: _Journal, tasks: Sequence[tuple[int, str | None]],
                  keys: Sequence[str], errors: Sequence[tuple[int, str]]) -> None:
    """Record one decoded batch's keys and journal its decode errors (both engines).

    ``tasks`` are the batch's ``(item index, view name or None)``; ``keys`` and ``errors`` are
    by position in it. A clean row's key is the key of the bytes read for decoding (a file that
    could not be read now has none, so its error is retried by the next run, not kept); a
    view's error is logged, not stored (the clean row records the file's error), and the next
    run tries that view again."""
    for position, key in enumerate(keys):
        index, view = tasks[position]
        if view is None:
            run.keys[index] = key
    for position, reason in errors:
        index, view = tasks[position]
        if view is not None:
            logger.warning("view %s of %s not stored: %s", view, items[index].relpath, reason)
            continue
        run.decode_errors[index] = reason
        journal.submit("record_error", items[index].relpath, reason, key=run.keys[index])


def _journal_features(run: _Run, items: Sequence[Any], journal: _Journal, tasks: Sequence[tuple[int, str | None]],
                      keys: Sequence[str], positions: list[int], features: np.ndarray | None) -> None:
    """Journal the ``features`` of the batch's decoded ``positions`` (the first row of each key
    only: copies of one image under several names are computed once), or a flush when there
    are none (so the batch's errors reach the disk); counts new rows and views."""
    if positions:
        features, positions = _first_of_each_key(run, features, positions, [keys[p] for p in positions])
    if positions:
        journal.submit("append", [keys[p] for p in positions], features,
                       paths=[items[tasks[p][0]].relpath for p in positions])
    else:
        journal.submit("flush")
    views = sum(tasks[p][1] is not None for p in positions)
    run.new += len(positions) - views
    run.new_views += views


def _decoder(run: _Run, spec: preprocess.PreprocessSpec, path_batches: list[list[str]], *,
             workers: int | None, decode: str) -> Any:
    """What yields decoded batches: the GPU decoder, or CPU decode workers (or inline)."""
    if decode == "gpu":
        from embedx.gpu import GpuDecodeSource

        run.workers = 0
        return GpuDecodeSource(spec, path_batches)
    run.workers = min(default_workers() if workers is None else workers, len(path_batches))
    if workers is None and len(path_batches) <= SMALL_JOB_BATCHES:
        run.workers = 0  # starting processes would cost more than decoding inline
    elif workers is None:
        # a worker's start (a fresh interpreter importing numpy, Pillow, the decoders) costs
        # ~0.15 CPU-s, as much as decoding ~50 images: a short job starts fewer
        run.workers = min(run.workers, max(1, (len(path_batches) - 1) // BATCHES_PER_WORKER))
    return _Decoder(spec, run.workers, path_batches)


def _compute(run: _Run, items: Sequence[Any], writer: Any, exported: Any, *, batch_size: int,
             workers: int | None, threads: int | None, device: str, precision: str, decode: str,
             progress, plan: Any = None) -> None:
    """Decode, infer and journal every item in ``run.todo``, then every view in ``run.view_todo``
    (extra rows through the same decoders, session and journal), in order.

    Every precision but int8 runs a pixel-input copy of the backbone (uint8 NHWC in,
    normalization in the graph: ``pixel_input``). On a GPU the session runs through IO
    binding at one fixed batch shape (``OrtModel.bound``): the last batch is padded, so
    cuDNN searches once, and GPU-decoded batches never leave the device.
    """
    spec = exported.preprocess
    tasks = run.tasks()
    batches = [tasks[i : i + batch_size] for i in range(0, len(tasks), batch_size)]

    def source(index: int, name: str | None) -> str | tuple[str, str, str]:
        path = str(items[index].path)
        return path if name is None else (path, name, plan.parameters(name))

    decoder = _decoder(run, spec, [[source(*task) for task in batch] for batch in batches],
                       workers=workers, decode=decode)
    journal = _Journal(writer)
    try:
        from embedx.runtime import OrtModel

        tick = time.perf_counter()  # the workers are already decoding the first batches
        calibration = None
        pixel_input = _pixel_input(precision)
        if precision == "int8":
            calibration = _calibration(run, items, spec, run.calibration_keys, writer.known_errors)
            model_path = exported.path
        else:
            from embedx.pixel_input import pixel_model

            model_path = pixel_model(exported.path, spec, source_sha256=exported.sha256 or None)
        # decode workers share the cores with ORT: its threads must not spin-wait
        run.model = OrtModel(model_path, device=device, precision=precision, threads=threads,
                             calibration=calibration, spinning=run.workers == 0,
                             source_sha256=(exported.sha256 or None) if model_path == exported.path else None)
        runner = run.model.bound(batch_size) if run.model.on_gpu else None
        if precision == "int8":
            writer.note({"int8_calibration_keys": run.calibration_keys})
        run.seconds["session"] = time.perf_counter() - tick
        if progress is not None:
            progress(0, len(tasks), {})
        done = 0
        waited = time.perf_counter()
        for batch, result in zip(batches, decoder, strict=True):
            run.seconds["wait"] += time.perf_counter() - waited
            run.seconds["decode"] += result["seconds"]
            _note_decoded(run, items, journal, batch, result["keys"], result["errors"])
            rows = list(result["rows"])  # positions in the batch
            features = None
            tick = time.perf_counter()
            if rows:
                pixels = result["pixels"]
                if runner is None or not pixel_input:  # host arrays (GPU-decoded too if ORT fell back)
                    pixels = _host_pixels(pixels)
                if not pixel_input:  # on a GPU the bound runner pads the batch to its fixed shape
                    pixels = _normalize_into(pixels, spec)
                features = (runner or run.model).run(pixels)[: len(rows)]
            run.seconds["inference"] += time.perf_counter() - tick
            _journal_features(run, items, journal, batch, result["keys"], rows, features)
            done += len(batch)
            if progress is not None:
                progress(done, len(tasks), {"errors": len(run.decode_errors)})
            waited = time.perf_counter()
        journal.close()  # a failed journal write is raised here
    finally:
        try:
            with contextlib.suppress(Exception):  # already raised above, or another error is on its way
                journal.close()
        finally:
            run.seconds["write"] += journal.seconds
            decoder.close()


def _assemble(run: _Run, dataset: Any, writer: Any, val_fraction: float | None,
              shard: tuple[int, int] | None = None):
    """The cache's rows (every item whose key has features, in data set order) and errors;
    with ``shard``, only the items in ``run.members`` and the skipped entries of that shard."""
    from embedx.shards import shard_of_path

    known_errors = writer.known_errors
    errors: list[tuple[str, str, str]] = [(relpath, reason, "") for relpath, reason in dataset.skipped
                                          if shard is None or shard_of_path(relpath, shard[1]) == shard[0]]
    rows: dict[str, list] = {"keys": [], "paths": [], "labels": [], "splits": [], "stats": []}
    for index, item in enumerate(dataset.items):
        key = run.keys[index]
        if run.members is not None and index not in run.members:
            continue
        if not key:
            errors.append((item.relpath, run.read_errors.get(index) or run.decode_errors[index], ""))
        elif index in run.decode_errors:
            errors.append((item.relpath, run.decode_errors[index], key))
        elif writer.has(key):
            rows["keys"].append(key)
            rows["paths"].append(item.relpath)
            rows["labels"].append(item.label)
            rows["splits"].append(_split(item, key, val_fraction))
            rows["stats"].append(run.stats[index] or (-1, -1))
        elif key in known_errors:
            errors.append((item.relpath, known_errors[key], key))
        else:  # its bytes changed between hashing and decoding; the next run picks it up
            errors.append((item.relpath, "changed during extraction; run again to include it", key))
    return rows, errors


def _assemble_views(rows: dict[str, list], writer: Any, plan: Any) -> dict[str, Any] | None:
    """The view rows of the finished cache: each clean row's views of ``plan`` (by its split:
    augmented views of train rows), in row order."""
    from embedx.augment import view_key

    if not plan:
        return None
    views: dict[str, Any] = {"keys": [], "source": [], "names": [], "plan": plan.to_dict()}
    missing = 0
    for row, (key, split) in enumerate(zip(rows["keys"], rows["splits"], strict=True)):
        for name in plan.names(split):
            vkey = view_key(key, name, plan.parameters(name))
            if writer.has(vkey):
                views["keys"].append(vkey)
                views["source"].append(row)
                views["names"].append(name)
            else:
                missing += 1
    if missing:
        logger.warning("%d views could not be made (see the warnings above); the next run tries again", missing)
    return views


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
    allow_outside: bool = False,
    overwrite: bool = False,
    preprocess_mode: str | None = None,
    decode: str = "auto",
    views: int | None = None,
    augment: Any = None,
    engine: str = "local",
    ray_address: str | None = None,
    actors: int | None = None,
    gpus_per_actor: float | None = None,
    progress: Callable[[int, int | None, dict[str, Any]], None] | None = None,
    shard: tuple[int, int] | None = None,
) -> ExtractSummary:
    """Fill (or update, or finish) the feature cache of ``data`` under ``backbone``.

    Rerunning the same call continues a killed run; rerunning after images were
    added or removed computes only the new ones (by content) and drops the removed
    ones.  A cache made with other settings is refused (``CacheMismatchError``)
    unless ``overwrite``.  ``workers`` decode processes (default: one per core, fewer
    for a job of a few batches; 0 decodes in this process); ``threads`` for ONNX Runtime (default: physical cores).
    ``preprocess_mode``: ``"fast"`` or ``"exact"`` (pixel for pixel torchvision's
    transform) instead of the backbone's default (see ``embedx.preprocess``); the cache
    records it, and so do heads and bundles made from it.
    ``decode``: ``"gpu"`` decodes JPEGs with nvJPEG and resizes on the device (CUDA only;
    other files fall back to the CPU decoder one by one), ``"cpu"`` uses decode workers,
    ``"auto"`` is ``gpu`` when the model runs on CUDA and torch has CUDA. The cache records
    it (features differ slightly: cosine ~0.99 to the CPU's) and refuses a run the other way.
    ``views``: store that many augmented views of every *train* image (``augment``: an
    ``augment.AugmentSpec`` or ``"flip,crop,color,rotate"``, any subset; default flip, crop, color)
    next to its clean row, in the cache's ``views`` group; each costs one more forward pass,
    once. View i of an image is the same on every run (its seed is the image key, the view's name and
    the augmentation's parameters); views resume and follow increments like rows. Options not
    given keep the previous cache's views; ``views=0`` drops the augmented ones; other
    augmentation parameters replace them (new keys). Views are decoded on the CPU.
    ``engine``: ``"local"`` (this machine: decode processes and one ORT session) or ``"ray"``
    (``embedx.ray_engine``: decode in Ray tasks, inference in ``actors`` Ray actors with
    ``gpus_per_actor`` GPUs each, on the cluster at ``ray_address`` or ``RAY_ADDRESS``, else a
    one-machine cluster started for the call; CPU decode, fp32/fp16). The cache, its journal and
    resume are the same with either.
    ``progress(done, total, info)`` is called once per batch.
    ``shard=(index, count)``: only the images of that shard (``embedx.shards``: by content key;
    every file is hashed first), with the whole data set's classes and splits; the cache
    records the shard and refuses a run of another one. ``embedx.merge`` joins the shards.
    """
    from embedx.cache import CacheMeta, CacheWriter
    from embedx.data import discover

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
    if preprocess_mode is not None and preprocess_mode not in preprocess.MODES:
        raise ConfigError(f"preprocess_mode must be one of {list(preprocess.MODES)}, got {preprocess_mode!r}")
    if engine not in ("local", "ray"):
        raise ConfigError(f"engine must be local or ray, got {engine!r}")
    ray_options = None
    if engine == "ray":
        from embedx.ray_engine import RayOptions, import_ray

        ray_options = RayOptions(address=ray_address, actors=actors, gpus_per_actor=gpus_per_actor)
        import_ray()  # missing Ray is one error before any work
        if decode == "gpu":
            raise ConfigError("--engine ray decodes in Ray tasks on CPUs: drop --decode gpu, or use --engine local")
        if workers is not None:
            raise ConfigError("--workers sets the local engine's decode processes; --engine ray decodes in Ray "
                              "tasks, one per free CPU of the cluster: drop --workers")
        decode = "cpu"
    elif (ray_address, actors, gpus_per_actor) != (None, None, None):
        raise ConfigError("--ray-address, --actors and --gpus-per-actor need --engine ray")
    from embedx.shards import check_shard, error_order, members

    shard = check_shard(shard)

    started = time.perf_counter()
    from embedx.onnxgraph import is_onnx_path

    if not is_onnx_path(backbone):
        from embedx.backbones import get_spec

        get_spec(backbone)  # an unknown name fails before the data are walked
    dataset = discover(data, manifest=manifest, allow_outside=allow_outside)  # outside DATA: refused unless allowed
    if val_fraction and any(item.split != "train" for item in dataset.items):
        raise ConfigError(
            f"{data} already has val/test splits ({dataset.layout}); --val-fraction only splits "
            "data without split folders or manifest splits: drop it"
        )
    from embedx.export import resolve_backbone

    exported = resolve_backbone(backbone, weights=weights, layer=layer)
    if preprocess_mode is not None and preprocess_mode != exported.preprocess.mode:
        # the ONNX model is the same; only how pixels are made changes (and is recorded)
        exported = dataclasses.replace(exported,
                                       preprocess=dataclasses.replace(exported.preprocess, mode=preprocess_mode))
    from embedx.gpu import resolve_decode
    from embedx.providers import GPU_PROVIDERS, resolve_providers

    wants_views = bool(views)
    if wants_views and decode == "gpu":
        raise ConfigError("views are decoded on the CPU (augmentation runs in the decode workers); "
                          "use --decode cpu (or auto) with --views")
    if wants_views and decode == "auto":
        decode = "cpu"
    if decode != "cpu":  # (the Ray engine's driver may have no GPU: its actors pick their providers)
        decode = resolve_decode(decode, resolve_providers(device)[0] in GPU_PROVIDERS)
    meta = dataclasses.replace(CacheMeta.from_export(exported, dtype=dtype, precision=precision, decode=decode),
                               shard=shard)
    output = Path(output) if output is not None else default_output(manifest or data, backbone, precision, shard)

    with CacheWriter(output, meta, overwrite=overwrite) as writer:
        pipeline_start = time.perf_counter()
        plan = _resolve_views(writer, views, augment)
        if plan and decode == "gpu":
            raise ConfigError(f"{output} stores views, which are decoded on the CPU; use --decode cpu")
        # int8 picks its calibration images by key and a shard its images: both need every key
        # first; so do views with --val-fraction, to know which rows are train
        lazy = precision != "int8" and shard is None and not (plan and val_fraction)
        run = _plan(dataset.items, writer, default_workers() if workers is None else workers, lazy=lazy)
        if precision == "int8":
            # an int8 model depends on its calibration images: keep the earlier run's
            calibration_keys, discarded = _recorded_calibration(run, writer)
            if discarded:
                run = _plan(dataset.items, writer, default_workers() if workers is None else workers)
            run.calibration_keys = calibration_keys
        if shard is not None:
            run.members = members(dataset.items, run.keys, shard)
            run.todo = [index for index in run.todo if index in run.members]
        _plan_views(run, dataset.items, writer, plan, val_fraction, lazy=lazy and not any(run.keys))
        if (run.todo or run.view_todo) and ray_options is not None:
            from embedx import ray_engine

            ray_engine.compute(run, dataset.items, writer, exported, batch_size=batch_size, threads=threads,
                               device=device, precision=precision, progress=progress, options=ray_options,
                               plan=plan)
        elif run.todo or run.view_todo:
            _compute(run, dataset.items, writer, exported, batch_size=batch_size, workers=workers,
                     threads=threads, device=device, precision=precision, decode=decode, progress=progress,
                     plan=plan)
        rows, errors = _assemble(run, dataset, writer, val_fraction, shard)
        view_rows = _assemble_views(rows, writer, plan)
        tick = time.perf_counter()
        model = run.model
        int8_cosine = model.int8_cosine if model is not None else writer.base_extra.get("int8_cosine")
        extra = {"data": str(Path(data).resolve()), "layout": dataset.layout, "val_fraction": val_fraction,
                 "providers": list(model.providers) if model else (run.providers
                                                                   or writer.base_extra.get("providers", [])),
                 "int8_cosine": int8_cosine, "int8_calibration_keys": run.calibration_keys}
        if shard is not None:  # where each error stands in a whole run's table, for merge
            extra["error_order"] = error_order(dataset.skipped, dataset.items, errors)
        writer.finalize(**rows, classes=list(dataset.classes), errors=errors, attrs=extra, views=view_rows)
        run.seconds["write"] += time.perf_counter() - tick
        repaired = len(writer.damaged_rows) + len(writer.damaged_views)

    finished = time.perf_counter()
    pipeline_seconds = finished - pipeline_start - run.seconds["engine_start"]  # Ray's start-up is reported apart
    summary = ExtractSummary(
        output=str(output),
        images=len(rows["keys"]),
        new=run.new,
        hashed=run.hashed,
        reused=len(rows["keys"]) - run.new,
        errors=len(errors),
        seconds=finished - started,
        images_per_second=(run.new + run.new_views) / pipeline_seconds if pipeline_seconds > 0 else 0.0,
        pipeline_seconds=pipeline_seconds,
        setup_seconds=pipeline_start - started,
        hash_seconds=run.seconds["hash"],
        session_seconds=run.seconds["session"],
        decode_seconds=run.seconds["decode"],
        decode_wait_seconds=run.seconds["wait"],
        inference_seconds=run.seconds["inference"],
        write_seconds=run.seconds["write"],
        backbone=meta.backbone,
        precision=precision,
        dtype=dtype,
        providers=list(model.providers) if model else run.providers,
        workers=run.workers,
        threads=int(model.session.get_session_options().intra_op_num_threads) if model else run.threads,
        batch_size=batch_size,
        int8_cosine=int8_cosine,
        error_list=[(path, reason) for path, reason, _ in errors],
        decode=decode,
        repaired=repaired,
        views=len(view_rows["keys"]) if view_rows else 0,
        new_views=run.new_views,
        view_plan=plan.to_dict() if plan else {},
        engine=engine,
        actors=run.actors,
        engine_start_seconds=run.seconds["engine_start"],
    )
    logger.info(
        "extracted %d new, reused %d, %d errors in %.1f s (%.1f img/s)",
        summary.new, summary.reused, summary.errors, summary.seconds, summary.images_per_second,
    )
    return summary


__all__ = ["ExtractSummary", "default_output", "extract"]
