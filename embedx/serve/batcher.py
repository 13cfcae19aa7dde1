"""Dynamic batching: concurrent requests' images become one onnxruntime call.

The batcher takes the first waiting image, then waits until ``max_batch`` images are
there or ``max_delay_s`` has passed since that first one arrived, whichever comes
first, and runs the whole batch in a one-thread executor (so the event loop stays
free and onnxruntime gets all its intra-op threads for one batch at a time).  While a
batch runs, new images queue up and form the next batch.  ``max_batch=1`` turns
batching off.  The server lowers ``max_batch`` to the batch cap it measures at warm-up
(``calibrate.py``), before it takes any request.

It waits only while more images are on their way: callers announce a request with
``with batcher.incoming():`` (from its first byte until it has submitted), and once
every announced request has submitted or failed the batch runs at once.  A lone client
therefore never waits ``max_delay_s``; under load the delay bounds the wait for the
requests still being read and decoded.

A failed batch fails only its own requests (``BatchFailedError``); the loop goes on.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Executor
from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np

from embedx.errors import ServeError
from embedx.predict import stack_images

logger = logging.getLogger(__name__)


class QueueFullError(ServeError):
    """More images are waiting than ``max_queue`` allows (HTTP 503)."""


class BatchFailedError(ServeError):
    """onnxruntime raised for the batch this image was in (HTTP 500)."""


class ShuttingDownError(ServeError):
    """The batcher is closed and takes no new images (HTTP 503)."""


@dataclass(eq=False)  # identity comparison: deque.remove must not compare arrays
class _Pending:
    array: np.ndarray
    future: asyncio.Future
    enqueued: float = field(default_factory=time.monotonic)


class DynamicBatcher:
    """Gather images from concurrent callers into batches for ``run_batch``.

    ``run_batch(batch) -> ndarray`` gets the stacked arrays and returns one row per
    image; it runs in ``executor``.  ``on_batch(size, seconds)`` and
    ``on_queue(depth)`` report to metrics.
    """

    def __init__(
        self,
        run_batch: Callable[[np.ndarray], np.ndarray],
        *,
        executor: Executor,
        max_batch: int = 32,
        max_delay_s: float = 0.005,
        max_queue: int = 256,
        on_batch: Callable[[int, float], None] | None = None,
        on_queue: Callable[[int], None] | None = None,
    ) -> None:
        if max_batch < 1 or max_queue < 1 or max_delay_s < 0:
            raise ServeError(
                f"need max_batch >= 1, max_queue >= 1, max_delay >= 0; got {max_batch}, {max_queue}, {max_delay_s}"
            )
        self.run_batch = run_batch
        self.executor = executor
        self.max_batch = max_batch
        self.max_delay_s = max_delay_s
        self.max_queue = max_queue
        self._on_batch = on_batch or (lambda size, seconds: None)
        self._on_queue = on_queue or (lambda depth: None)
        self._queue: deque[_Pending] = deque()
        self._wakeup: asyncio.Event | None = None
        self._task: asyncio.Task | None = None
        self._closing = False
        self._incoming = 0

    @property
    def depth(self) -> int:
        return len(self._queue)

    @property
    def incoming_count(self) -> int:
        """Requests announced with ``incoming()`` that have not submitted yet."""
        return self._incoming

    def start(self) -> None:
        self._wakeup = asyncio.Event()
        self._task = asyncio.get_running_loop().create_task(self._run(), name="embedx-batcher")

    async def close(self) -> None:
        """Stop taking images, run what is queued without waiting for stragglers, stop."""
        self._closing = True
        if self._wakeup is not None:
            self._wakeup.set()
        if self._task is not None:
            await self._task

    @contextmanager
    def incoming(self) -> Iterator[None]:
        """Announce one request whose images will be submitted (or fail) inside the block:
        while any is announced, a batch waits for them (up to ``max_delay_s``)."""
        self._incoming += 1
        try:
            yield
        finally:
            self._incoming -= 1
            if self._wakeup is not None:
                self._wakeup.set()

    def submit(self, arrays: list[np.ndarray]) -> list[asyncio.Future]:
        """Queue all of ``arrays`` at once (or none: QueueFullError); one future each."""
        if self._closing or self._task is None:
            raise ShuttingDownError("the server is shutting down and takes no new images")
        if len(self._queue) + len(arrays) > self.max_queue:
            raise QueueFullError(
                f"{len(self._queue)} images are waiting and this request adds {len(arrays)}; "
                f"the queue holds at most {self.max_queue}; retry shortly"
            )
        loop = asyncio.get_running_loop()
        futures = []
        for array in arrays:
            item = _Pending(array, loop.create_future())
            item.future.add_done_callback(lambda f, item=item: self._forget(f, item))
            self._queue.append(item)
            futures.append(item.future)
        self._on_queue(len(self._queue))
        self._wakeup.set()
        return futures

    def _forget(self, future: asyncio.Future, item: _Pending) -> None:
        # A caller that gave up (timeout, disconnect) leaves no work behind.
        if future.cancelled():
            try:
                self._queue.remove(item)
            except ValueError:
                pass  # already taken into a batch
            self._on_queue(len(self._queue))

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            if not self._queue:
                if self._closing:
                    return
                self._wakeup.clear()
                await self._wakeup.wait()
                continue
            deadline = self._queue[0].enqueued + self.max_delay_s
            while len(self._queue) < self.max_batch and self._incoming > 0 and not self._closing:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                self._wakeup.clear()
                try:
                    await asyncio.wait_for(self._wakeup.wait(), remaining)
                except asyncio.TimeoutError:
                    break
            items = []
            while self._queue and len(items) < self.max_batch:
                item = self._queue.popleft()
                if not item.future.done():
                    items.append(item)
            self._on_queue(len(self._queue))
            if items:
                await self._dispatch(loop, items)

    async def _dispatch(self, loop: asyncio.AbstractEventLoop, items: list[_Pending]) -> None:
        start = time.perf_counter()
        try:
            batch = stack_images([item.array for item in items])
            rows = await loop.run_in_executor(self.executor, self.run_batch, batch)
            if len(rows) != len(items):
                raise ServeError(f"the model returned {len(rows)} rows for {len(items)} images")
        except Exception as e:  # any inference failure fails this batch only
            logger.error("inference failed for a batch of %d: %s", len(items), e)
            for item in items:
                if not item.future.done():
                    item.future.set_exception(BatchFailedError(f"inference failed: {type(e).__name__}: {e}"))
            return
        self._on_batch(len(items), time.perf_counter() - start)
        for item, row in zip(items, rows, strict=True):
            if not item.future.done():
                item.future.set_result(row)
