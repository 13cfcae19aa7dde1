"""The batch cap: the largest batch the server forms, measured at warm-up (``--batch-cap auto``).

Batching pays only where the model runs faster per image in a larger batch.  On a GPU it
does; on a small CPU a mobile network often runs *slower* per image at batch 32 than at
batch 1 (efficientnet_lite0 on the 2-core development machine: 0.62x), and there dynamic
batching up to ``--max-batch`` makes the server slower.  So before the server turns
ready it times the model at batch sizes 1, 2, 4, ... up to ``max_batch`` and caps the
batches at the smallest size whose img/s is within ``tolerance`` of the best.

Two parts, kept apart so the choice is testable without a clock:

- ``choose_batch_cap(rates)``: pure, from measured img/s per batch size.
- ``measure_rates(run_batch, make_batch, sizes)``: the timing, in interleaved rounds (every
  size once per round, so a burst of load from other processes hits them alike), the best
  per-image time of each size over its calls, within a time budget: a slow model gets
  fewer rounds (at least one), and sizes far behind the best after two rounds are dropped,
  so the close ones get the repeats.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from embedx.errors import ConfigError

logger = logging.getLogger(__name__)

AUTO = "auto"
TOLERANCE = 0.05  # a batch size within 5% of the best img/s is as good (timing noise is larger)
BUDGET_S = 3.0  # calibration rounds stop once the next one would end past this (a slow model: 1 round)
MAX_ROUNDS = 5
MIN_IMAGES = 4  # per size and round: batch 1 runs 4 calls, so one short call is not the whole sample
KEEP_WITHIN = 0.7  # after a round, sizes below 70% of the best img/s are not timed again


@dataclass(frozen=True)
class BatchCap:
    """The cap the batcher uses, and how it was set: ``auto`` (measured) or ``fixed``."""

    cap: int
    mode: str
    rates: dict[int, float] = field(default_factory=dict)  # img/s by batch size, measured ones only
    rounds: int = 0
    seconds: float = 0.0
    tolerance: float = TOLERANCE

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON (for ``GET /v1/model``); batch sizes as string keys."""
        return {
            "cap": self.cap,
            "mode": self.mode,
            "img_per_s": {str(size): round(rate, 2) for size, rate in sorted(self.rates.items())},
            "rounds": self.rounds,
            "seconds": round(self.seconds, 3),
            "tolerance": self.tolerance,
        }

    def describe(self) -> str:
        """One line for the start-up log."""
        if self.mode != AUTO:
            return f"batch cap {self.cap} (fixed)"
        rates = ", ".join(f"{size}: {rate:.0f}" for size, rate in sorted(self.rates.items()))
        return (f"batch cap {self.cap} (auto: img/s by batch size {rates}; {self.rounds} rounds "
                f"in {self.seconds:.1f} s; smallest within {self.tolerance:.0%} of the best)")


def parse_batch_cap(value: str | int) -> str | int:
    """``"auto"`` or a positive integer (from the CLI or a keyword argument)."""
    if isinstance(value, str) and value.strip().lower() == AUTO:
        return AUTO
    try:
        number = int(value)
    except (TypeError, ValueError):
        number = 0
    if number < 1 or (isinstance(value, float) and not value.is_integer()):
        raise ConfigError(f"batch_cap must be 'auto' or a positive integer, got {value!r}")
    return number


def batch_sizes(max_batch: int) -> list[int]:
    """1, 2, 4, ... below ``max_batch``, then ``max_batch`` itself."""
    sizes = [1 << i for i in range(max_batch.bit_length()) if 1 << i < max_batch]
    return [*sizes, max_batch]


def bucket_for(size: int, buckets: Sequence[int]) -> int:
    """The smallest bucket that holds ``size`` images (``buckets`` ascending)."""
    for bucket in buckets:
        if bucket >= size:
            return bucket
    raise ValueError(f"a batch of {size} is larger than the largest bucket {buckets[-1]}")


class Buckets:
    """Run every batch at one of a few fixed sizes: ``run(batch)`` pads it to its bucket.

    On a GPU each new input shape costs its first call a kernel/algorithm search (cuDNN's
    exhaustive search: ~0.2-1 s for a mobile network, measured on an H200), so a server that
    runs whatever size the queue happens to hold keeps paying it, and a batch cap measured
    on first calls picks the wrong size. With buckets (``batch_sizes(max_batch)``: 1, 2, 4,
    ..., max) warmed once at start-up, every call runs a shape already searched; padding
    costs at most the rows up to the next bucket, which on a GPU is nearly free. The
    padding rows copy the batch's last image (real pixels: no special values reach the model).
    """

    def __init__(self, run_batch: Callable[[np.ndarray], Any], sizes: Sequence[int]) -> None:
        if not sizes:
            raise ValueError("Buckets needs at least one size")
        self.run_batch = run_batch
        self.sizes = sorted(set(sizes))
        #: bucket size -> its own runner (a session of its own), where one is set
        self.runners: dict[int, Callable[[np.ndarray], Any]] = {}

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        count = len(batch)
        bucket = bucket_for(count, self.sizes)
        if bucket > count:
            batch = np.concatenate([batch, np.repeat(batch[-1:], bucket - count, axis=0)])
        return np.asarray(self.runners.get(bucket, self.run_batch)(batch))[:count]


def runs_on_gpu(model: Any) -> bool:
    """Whether ``model``'s onnxruntime session runs on a GPU provider (CUDA or TensorRT)."""
    session = getattr(model, "session", None)
    if session is None:
        inner = getattr(model, "backbone", None)  # a head pipeline: its backbone's session
        session = getattr(inner, "session", None)
    if session is None:
        return False
    return session.get_providers()[0] in ("CUDAExecutionProvider", "TensorrtExecutionProvider")


def choose_batch_cap(rates: Mapping[int, float], *, tolerance: float = TOLERANCE) -> int:
    """The smallest batch size whose img/s is at least ``(1 - tolerance)`` of the best.

    The smallest, because a larger batch that is no faster only adds latency (its images
    wait for each other) and bursts of work.
    """
    if not rates:
        raise ValueError("choose_batch_cap needs at least one measured batch size")
    best = max(rates.values())
    return min(size for size, rate in rates.items() if rate >= (1 - tolerance) * best)


def measure_rates(
    run_batch: Callable[[np.ndarray], Any],
    make_batch: Callable[[int], np.ndarray],
    sizes: Sequence[int],
    *,
    budget_s: float = BUDGET_S,
    max_rounds: int = MAX_ROUNDS,
    min_images: int = MIN_IMAGES,
    keep_within: float = KEEP_WITHIN,
    clock: Callable[[], float] = time.perf_counter,
) -> tuple[dict[int, float], int]:
    """img/s of ``run_batch`` at each of ``sizes`` (its fastest call), and the rounds run.

    The fastest call, not the mean: other processes on a shared machine only ever slow a
    call down, and the fastest is the one they disturbed least.  Small sizes get more calls
    (``min_images`` per round), so their best is, if anything, the more optimistic: the
    choice then leans to the smaller, lower-latency cap.

    Round 1 times every size, largest last; a size that would end past twice the budget
    (guessed at the previous size's time per image) is left out, and so are the larger ones.
    From round 3 on, only the sizes within ``keep_within`` of the best so far are timed.
    Rounds run while the next one is expected to end within ``budget_s``.
    """
    def images(size: int) -> int:  # per round: whole calls, at least min_images
        return max(1, math.ceil(min_images / size)) * size

    batches = {size: make_batch(size) for size in sizes}
    per_image = dict.fromkeys(sizes, math.inf)  # best seconds per image
    cost: dict[int, float] = {}  # seconds the size took in its latest round
    start = clock()
    active = sorted(sizes)
    rounds = 0
    while active and rounds < max_rounds:
        for index, size in enumerate(active):
            if rounds == 0 and index > 0:
                previous = active[index - 1]
                guess = cost[previous] / images(previous) * images(size)  # as fast per image
                if clock() - start + guess > 2 * budget_s:
                    logger.info("batch sizes %s not timed: the model is too slow to time them within %.1f s",
                                active[index:], 2 * budget_s)
                    break
            cost[size] = 0.0
            for _ in range(images(size) // size):
                began = clock()
                run_batch(batches[size])
                seconds = clock() - began
                cost[size] += seconds
                per_image[size] = min(per_image[size], seconds / size)
        rounds += 1
        measured = {size: 1 / seconds for size, seconds in per_image.items() if seconds < math.inf}
        best = max(measured.values())
        active = [size for size in active if size in measured]
        if rounds >= 2:  # a best of two: one burst of load elsewhere does not drop the size that wins
            active = [size for size in active if measured[size] >= keep_within * best]
        if clock() - start + sum(cost[size] for size in active) > budget_s:
            break
    return {size: 1 / seconds for size, seconds in per_image.items() if seconds < math.inf}, rounds


def calibration_batch(model: Any, size: int, *, seed: int = 0) -> np.ndarray:
    """Random pixels in the model's input shape and dtype, normalized as its preprocessing
    would (``model.spec``): the value range of real images, not zeros."""
    template = model.warmup_input(size)
    pixels = np.random.default_rng(seed).integers(0, 256, template.shape, dtype=np.uint8)
    if template.dtype == np.uint8:
        return pixels
    values = pixels.astype(np.float32) / 255.0
    spec = getattr(model, "spec", None)
    if spec is not None and template.ndim == 4 and template.shape[1] == 3:  # float NCHW
        values = (values - np.reshape(spec.mean, (1, 3, 1, 1))) / np.reshape(spec.std, (1, 3, 1, 1))
    return values.astype(template.dtype)


def resolve_batch_cap(model: Any, *, batch_cap: str | int, max_batch: int,
                      run_batch: Callable[[np.ndarray], Any] | None = None, **options: Any) -> BatchCap:
    """The cap for ``model``: a fixed one (at most ``max_batch``), or measured (``auto``).

    ``run_batch`` is what the server will call (``model.predict_proba``, or it in
    ``Buckets``); every size should have run once before (warm-up), so the rates are
    steady-state ones. ``options`` go to ``measure_rates`` (``budget_s``, ...), and
    ``tolerance`` to the choice. With ``max_batch`` 1 nothing is timed.
    """
    batch_cap = parse_batch_cap(batch_cap)
    if batch_cap != AUTO:
        return BatchCap(cap=min(batch_cap, max_batch), mode="fixed")
    tolerance = options.pop("tolerance", TOLERANCE)
    if max_batch == 1:
        return BatchCap(cap=1, mode=AUTO, tolerance=tolerance)
    largest = calibration_batch(model, max_batch)
    start = time.perf_counter()
    rates, rounds = measure_rates(run_batch or model.predict_proba, lambda size: largest[:size], batch_sizes(max_batch),
                                  **options)
    return BatchCap(cap=choose_batch_cap(rates, tolerance=tolerance), mode=AUTO, rates=rates, rounds=rounds,
                    seconds=time.perf_counter() - start, tolerance=tolerance)


def release_larger_batches(model: Any, batch_size: int) -> bool:
    """Run one batch of ``batch_size`` letting onnxruntime's CPU arena shrink, so the memory
    that warm-up and timing took for larger batches goes back (lite0: 350 -> 90 MB at batch 2).

    Only for a model exposing its onnxruntime ``session`` (a bundle); returns whether it ran.
    """
    session = getattr(model, "session", None)
    if session is None or getattr(model, "fixed_batch", None) is not None or not hasattr(model, "input_name"):
        return False
    import onnxruntime

    options = onnxruntime.RunOptions()
    options.add_run_config_entry("memory.enable_memory_arena_shrinkage", "cpu:0")
    session.run(None, {model.input_name: model.warmup_input(batch_size)}, options)
    return True
