"""``extract(..., engine="ray")``: the decode + inference stage of extraction on Ray Data.

The driver (the process that called ``extract``) plans as the local engine does
(``extract._plan``: keys, resume, increments) and owns the cache: it alone writes the
journal and the finished file. Ray Data runs the rest as one streaming dataset::

    (index, path) blocks ─ map_batches(_decode, Ray tasks, 1 CPU each)
        ─ map_batches(_Embedder, an actor pool: the ONNX session loaded once per actor,
                      ``gpus_per_actor`` GPUs each when the cluster has GPUs)
        ─ iter_batches on the driver ─ extract's journal (record_error / append / flush)

Why the driver writes: the journal's order-free, keyed rows and its lock stay exactly
the local engine's, so resume, increments, copies of one image (``_first_of_each_key``)
and bad-input rows behave the same, and nothing but features (a few KB per image) comes
back over the network. Order does not matter: rows are keyed, and ``_assemble`` puts
the finished cache in data set order.

Fault tolerance is Ray's: a decode task whose worker dies is retried (Ray's
``max_retries``, 3 by default for system failures); an inference actor that dies is
restarted and its batch retried (Ray Data's actor pools set ``max_restarts=-1`` and
``max_task_retries=-1``). Rows are journaled only when they reach the driver, so a
retried batch can cost time, never rows; a killed driver is resumed by rerunning it.

Every node must read the images, and the model file the driver prepares under
``paths.cache_dir()``, at the same absolute paths (shared storage), and have embedx
installed. ``ray`` is imported only here, and only when this engine runs.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from embedx.errors import BackendError, ConfigError, EmbedxError

logger = logging.getLogger(__name__)

#: What to install for this engine.
INSTALL_HINT = "pip install 'embedx[ray]'"
#: Blocks handed to the decode tasks per CPU of the cluster (enough to keep them all busy
#: and the stream flowing), each a whole number of batches, at most ``MAX_BATCHES_PER_BLOCK``.
BLOCKS_PER_CPU = 4
MAX_BATCHES_PER_BLOCK = 16
#: Logical CPUs an inference actor reserves when it runs on the CPU: none, so that the decode
#: tasks get one per core and share the cores with the actors' ORT threads, as the local
#: engine's decode workers share them with its session; an actor with a GPU reserves one CPU,
#: the thread that feeds it.
CPU_ACTOR_CPUS = 0.0


@dataclass(frozen=True)
class RayOptions:
    """Where and how wide the Ray engine runs.

    ``address``: a running cluster (``ray start --head`` prints it); None joins the one
    ``RAY_ADDRESS`` names, else starts a one-machine cluster for this call. ``actors``:
    inference actors (default: one per GPU of the cluster over ``gpus_per_actor``, else 1).
    ``gpus_per_actor``: GPUs each actor reserves (default: 1 when the cluster has GPUs,
    else 0; fractions share a GPU between actors).
    """

    address: str | None = None
    actors: int | None = None
    gpus_per_actor: float | None = None

    def __post_init__(self) -> None:
        if self.actors is not None and self.actors < 1:
            raise ConfigError(f"actors must be >= 1, got {self.actors}")
        if self.gpus_per_actor is not None and not (0 <= self.gpus_per_actor and math.isfinite(self.gpus_per_actor)):
            raise ConfigError(f"gpus_per_actor must be a finite number >= 0, got {self.gpus_per_actor}")


def import_ray() -> Any:
    """``ray`` with Ray Data, or one ``ConfigError`` naming the extra to install."""
    try:
        import ray
        import ray.data  # noqa: F401 - Ray Data needs pyarrow and pandas (the extra pins them)
    except ImportError as e:
        raise ConfigError(f"--engine ray needs Ray Data, which is not installed ({e}); "
                          f"install it with `{INSTALL_HINT}`, or use --engine local") from e
    return ray


def connect(address: str | None = None) -> tuple[float, bool]:
    """Join ``address`` (or ``RAY_ADDRESS``), else start a one-machine cluster, unless this process
    is connected already: ``(seconds it took, whether this call connected)``; ``ray.shutdown()``
    then stops the cluster it started, or leaves the one it joined."""
    ray = import_ray()
    if ray.is_initialized():
        return 0.0, False
    tick = time.perf_counter()
    address = address or os.environ.get("RAY_ADDRESS") or None
    _quiet_ray_data()
    quiet = {"include_dashboard": False, "log_to_driver": False, "logging_level": logging.ERROR}
    if address:
        ray.init(address=address, **quiet)
    else:
        from embedx.extract import default_workers

        ray.init(num_cpus=default_workers(), **quiet)
    return time.perf_counter() - tick, True


def _quiet_ray_data() -> None:
    from ray.data import DataContext

    # its INFO lines per run, and errors it logs before they are raised here (Ray's own logs: /tmp/ray)
    logging.getLogger("ray.data").setLevel(logging.CRITICAL)
    context = DataContext.get_current()
    context.enable_progress_bars = False  # extract's progress callback reports instead
    context.print_on_execution_start = False
    # an error in a task or actor reaches the driver as itself (in a RayTaskError), not as
    # Ray Data's UserCodeException, which carries only its text: embedx's errors stay one line
    context.raise_original_map_exception = True


# --------------------------------------------------------------------------- in Ray workers


def _decode(batch: dict[str, np.ndarray], spec_json: str, input_size: int) -> dict[str, np.ndarray]:
    """Ray task: read, key and decode a batch of paths, or augmented views of them (a ``view``
    name and its ``parameters``), with ``extract._decode_batch``, into columns; rows that
    failed carry their reason in ``error`` and zero pixels."""
    from embedx.extract import _decode_batch

    count = len(batch["path"])
    tasks = [str(path) if not view else (str(path), str(view), str(parameters))
             for path, view, parameters in zip(batch["path"], batch["view"], batch["parameters"], strict=True)]
    result = _decode_batch(spec_json, tasks)
    pixels = np.zeros((count, input_size, input_size, 3), dtype=np.uint8)
    pixels[result["rows"]] = result["pixels"]
    ok = np.zeros(count, dtype=bool)
    ok[result["rows"]] = True
    error = np.full(count, "", dtype=object)
    for position, reason in result["errors"]:
        error[position] = reason
    return {"index": batch["index"], "view": batch["view"], "key": np.array(result["keys"], dtype=object), "ok": ok,
            "error": error, "pixels": pixels, "decode_seconds": np.full(count, result["seconds"] / max(count, 1))}


class _Embedder:
    """Ray actor: one ORT session of the pixel-input model, loaded once; decoded batches
    in, feature rows out (zeros where decoding failed; the driver drops those rows).

    An ``EmbedxError`` while loading (``--device cuda`` on a node without a GPU, say) is
    raised at the first batch instead: an actor whose constructor fails dies, and Ray
    reports that as its death, without the error itself."""

    def __init__(self, model_path: str, feature_dim: int, device: str, precision: str, threads: int | None,
                 batch_size: int) -> None:
        from embedx.runtime import OrtModel

        tick = time.perf_counter()
        self.failure: EmbedxError | None = None
        try:
            self.model = OrtModel(model_path, device=device, precision=precision, threads=threads, spinning=False)
        except EmbedxError as e:
            self.failure = e
            return
        self.runner = self.model.bound(batch_size) if self.model.on_gpu else None
        self.feature_dim = feature_dim
        self.providers = ",".join(self.model.providers)
        self.threads = int(self.model.session.get_session_options().intra_op_num_threads)
        self.session_seconds = time.perf_counter() - tick

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        if self.failure is not None:
            raise self.failure
        tick = time.perf_counter()
        ok = np.asarray(batch["ok"], dtype=bool)
        count = len(ok)
        features = np.zeros((count, self.feature_dim), dtype=np.float32)
        if ok.any():
            features[ok] = (self.runner or self.model).run(np.ascontiguousarray(batch["pixels"][ok]))[: int(ok.sum())]
        seconds = time.perf_counter() - tick
        session, self.session_seconds = self.session_seconds, 0.0  # counted once per actor
        return {"index": batch["index"], "view": batch["view"], "key": batch["key"], "ok": ok, "error": batch["error"],
                "features": features, "decode_seconds": batch["decode_seconds"],
                "inference_seconds": np.full(count, seconds / count),
                "session_seconds": np.full(count, session / count),
                "providers": np.full(count, self.providers, dtype=object),
                "threads": np.full(count, self.threads)}


# --------------------------------------------------------------------------- on the driver


@dataclass(frozen=True)
class _Plan:
    actors: int
    gpus_per_actor: float
    actor_cpus: float
    decode_slots: int
    rows_per_block: int
    threads: int | None


def _layout(ray: Any, options: RayOptions, todo: int, batch_size: int, threads: int | None) -> _Plan:
    """Actors, their resources and the block size, from the cluster's resources."""
    resources = ray.cluster_resources()
    cpus, gpus = float(resources.get("CPU", 0)), float(resources.get("GPU", 0))
    gpus_per_actor = options.gpus_per_actor if options.gpus_per_actor is not None else (1.0 if gpus else 0.0)
    if gpus_per_actor > gpus:
        raise ConfigError(f"--gpus-per-actor {gpus_per_actor:g} but the Ray cluster has {gpus:g} GPUs; "
                          "pass --gpus-per-actor 0 to run on CPUs")
    actors = options.actors or (max(1, int(gpus // gpus_per_actor)) if gpus_per_actor else 1)
    if gpus_per_actor and actors * gpus_per_actor > gpus:
        raise ConfigError(f"{actors} actors x {gpus_per_actor:g} GPUs need {actors * gpus_per_actor:g} GPUs "
                          f"but the Ray cluster has {gpus:g}; pass fewer --actors or a smaller --gpus-per-actor")
    actor_cpus = 1.0 if gpus_per_actor else CPU_ACTOR_CPUS
    if not gpus_per_actor and threads is None:
        from embedx.providers import physical_cores

        threads = max(1, physical_cores() // actors)  # the actors share this machine's cores
    decode_slots = max(1, int(cpus - actors * actor_cpus))
    batches = math.ceil(todo / batch_size)
    per_block = min(MAX_BATCHES_PER_BLOCK, max(1, math.ceil(batches / (BLOCKS_PER_CPU * max(cpus, 1.0)))))
    return _Plan(actors=actors, gpus_per_actor=gpus_per_actor, actor_cpus=actor_cpus, decode_slots=decode_slots,
                 rows_per_block=per_block * batch_size, threads=threads)


def _dataset(ray: Any, tasks: Sequence[tuple[int, str | None]], items: Sequence[Any], plan: _Plan, *,
             spec: Any, views: Any, model_path: str, feature_dim: int, batch_size: int, device: str,
             precision: str) -> Any:
    """The streaming dataset of ``tasks`` (``(item index, view name or None)``, ``extract._compute``'s)."""
    import pyarrow as pa

    columns = {"index": pa.array([index for index, _ in tasks], type=pa.int64()),
               "path": pa.array([str(items[index].path) for index, _ in tasks], type=pa.string()),
               "view": pa.array([view or "" for _, view in tasks], type=pa.string()),
               "parameters": pa.array([views.parameters(view) if view else "" for _, view in tasks],
                                      type=pa.string())}
    blocks = [pa.table({name: column.slice(start, plan.rows_per_block) for name, column in columns.items()})
              for start in range(0, len(tasks), plan.rows_per_block)]
    from ray.data import ActorPoolStrategy

    decoded = ray.data.from_arrow(blocks).map_batches(
        _decode, batch_size=batch_size, batch_format="numpy", num_cpus=1,
        fn_kwargs={"spec_json": spec.to_json(), "input_size": spec.input_size})
    return decoded.map_batches(
        _Embedder, batch_size=batch_size, batch_format="numpy", compute=ActorPoolStrategy(size=plan.actors),
        num_cpus=plan.actor_cpus, num_gpus=plan.gpus_per_actor or None,
        fn_constructor_kwargs={"model_path": model_path, "feature_dim": feature_dim, "device": device,
                               "precision": precision, "threads": plan.threads, "batch_size": batch_size})


def compute(run: Any, items: Sequence[Any], writer: Any, exported: Any, *, batch_size: int, threads: int | None,
            device: str, precision: str, progress: Any, options: RayOptions, plan: Any = None) -> None:
    """Decode, infer and journal every item in ``run.todo``, then every view in ``run.view_todo``
    (of ``plan``, an ``augment.ViewPlan``) on Ray (``extract._compute``'s contract: fills
    ``run.keys``, ``run.decode_errors``, ``run.new``, ``run.new_views``, ``run.seconds``)."""
    from embedx.extract import _Journal, _journal_features, _note_decoded
    from embedx.pixel_input import pixel_model

    if precision == "int8":
        raise ConfigError("--engine ray runs fp32 and fp16; int8 calibrates on the driver: use --engine local")
    ray = import_ray()
    run.seconds["engine_start"], connected = connect(options.address)
    journal = None
    try:
        tick = time.perf_counter()
        spec = exported.preprocess
        model_path = pixel_model(exported.path, spec, source_sha256=exported.sha256 or None)
        tasks = run.tasks()
        layout = _layout(ray, options, len(tasks), batch_size, threads)
        run.workers, run.actors = layout.decode_slots, layout.actors
        dataset = _dataset(ray, tasks, items, layout, spec=spec, views=plan, model_path=str(model_path.resolve()),
                           feature_dim=exported.feature_dim, batch_size=batch_size, device=device,
                           precision=precision)
        run.seconds["session"] = time.perf_counter() - tick
        journal = _Journal(writer)
        if progress is not None:
            progress(0, len(tasks), {})
        done = 0
        waited = time.perf_counter()
        for batch in dataset.iter_batches(batch_size=None, batch_format="numpy"):
            run.seconds["wait"] += time.perf_counter() - waited
            batch_tasks = [(int(index), str(view) or None) for index, view in zip(batch["index"], batch["view"],
                                                                                 strict=True)]
            keys = [str(key) for key in batch["key"]]
            errors = [(position, str(reason)) for position, reason in enumerate(batch["error"]) if reason]
            _note_decoded(run, items, journal, batch_tasks, keys, errors)
            ok = np.asarray(batch["ok"], dtype=bool)
            _journal_features(run, items, journal, batch_tasks, keys, np.flatnonzero(ok).tolist(),
                              batch["features"][ok] if ok.any() else None)
            run.seconds["decode"] += float(np.sum(batch["decode_seconds"]))
            run.seconds["inference"] += float(np.sum(batch["inference_seconds"]))
            run.seconds["session"] += float(np.sum(batch["session_seconds"]))  # the actors' model loads
            if not run.providers and batch_tasks:
                run.providers = str(batch["providers"][0]).split(",")
                run.threads = int(batch["threads"][0])
            done += len(batch_tasks)
            if progress is not None:
                progress(done, len(tasks), {"errors": len(run.decode_errors)})
            waited = time.perf_counter()
        journal.close()  # a failed journal write is raised here
    except ray.exceptions.RayTaskError as e:
        if isinstance(e.cause, EmbedxError):  # embedx's own error in a task or actor: its one line,
            e.cause.args = (str(e.cause).splitlines()[0],)  # less the retry advice Ray Data appends
            raise e.cause from None
        raise
    except ray.exceptions.RayError as e:
        raise BackendError(f"the Ray job failed ({type(e).__name__}: {str(e).splitlines()[0]}); "
                           "rows journaled so far are kept: rerun the same command to continue") from e
    finally:
        try:
            if journal is not None:
                with contextlib.suppress(Exception):  # already raised above, or another error is on its way
                    journal.close()
                run.seconds["write"] += journal.seconds
        finally:
            if connected:  # this call's cluster is stopped, a joined one left as it was
                ray.shutdown()


__all__ = ["INSTALL_HINT", "RayOptions", "compute", "connect", "import_ray"]
