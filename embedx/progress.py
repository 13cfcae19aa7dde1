"""Progress reporting from library code, without drawing anything.

Long-running library functions take ``progress: ProgressCallback | None`` and call
it as ``progress(done, total, info)``: ``done`` and ``total`` count the unit of work
(images, epochs, requests; ``total`` may be None), ``info`` carries extra numbers
to show (loss, errors).  Only the CLI draws bars (``embedx.cli.progressbar``).
"""

from __future__ import annotations

import time
from typing import Any, Protocol


class ProgressCallback(Protocol):
    def __call__(self, done: int, total: int | None, info: dict[str, Any]) -> None: ...


class RateMeter:
    """Rate and ETA over a whole run (what a summary line needs)."""

    def __init__(self, total: int | None = None) -> None:
        self.total = total
        self.start = time.perf_counter()
        self.done = 0

    def update(self, done: int) -> None:
        self.done = done

    @property
    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    @property
    def rate(self) -> float:
        return self.done / self.elapsed if self.elapsed > 0 else 0.0

    @property
    def eta(self) -> float | None:
        if not self.total or not self.rate:
            return None
        return max(self.total - self.done, 0) / self.rate
