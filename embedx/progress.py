"""Progress reporting from library code, without drawing anything.

Long-running library functions take ``progress: ProgressCallback | None`` and call
it as ``progress(done, total, info)``: ``done`` and ``total`` count the unit of work
(images, epochs, requests; ``total`` may be None), ``info`` carries extra numbers
to show (loss, errors).  Only the CLI draws bars (``embedx.cli.progressbar``).
"""

from __future__ import annotations

from typing import Any, Protocol


class ProgressCallback(Protocol):
    def __call__(self, done: int, total: int | None, info: dict[str, Any]) -> None: ...

