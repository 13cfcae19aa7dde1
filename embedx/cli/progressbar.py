"""The CLI's progress bars: tqdm on stderr with rate and ETA."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from tqdm import tqdm

from embedx.progress import ProgressCallback


@contextmanager
def progress_bar(description: str, unit: str = "img", *, enabled: bool = True) -> Iterator[ProgressCallback]:
    """Yield a ProgressCallback that drives a tqdm bar (rate and ETA come with it)."""
    bar = tqdm(desc=description, unit=unit, dynamic_ncols=True, disable=not enabled, leave=True)

    def callback(done: int, total: int | None, info: dict[str, Any]) -> None:
        if total is not None and bar.total != total:
            bar.total = total
        bar.n = done
        if info:
            bar.set_postfix({k: (f"{v:.4g}" if isinstance(v, float) else v) for k, v in info.items()}, refresh=False)
        bar.refresh()

    try:
        yield callback
    finally:
        bar.close()
