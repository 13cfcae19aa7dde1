"""Shared benchmark plumbing: timing with warm-up and medians, machine info, JSON out.

Every comparison in bench/ is a ratio of two measurements taken in the same run,
because the machines these run on are shared and noisy.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results"
SHARED_ASSETS = Path(__file__).resolve().parent.parent.parent / "shared" / "assets"
HYMENOPTERA = SHARED_ASSETS / "hymenoptera_data"


def machine_info() -> dict[str, Any]:
    info: dict[str, Any] = {
        "cpu_count": os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
    }
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    info["cpu"] = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    try:
        import onnxruntime
        import torch

        info["torch"] = torch.__version__
        info["onnxruntime"] = onnxruntime.__version__
    except ImportError:
        pass
    from embedx.providers import gpu_available

    info["gpu"] = gpu_available()
    return info


def timed(fn: Callable[[], Any], *, repeats: int = 3, warmup: int = 1) -> tuple[float, list[float], Any]:
    """Median wall seconds of ``fn()`` over ``repeats`` runs after ``warmup`` runs."""
    result = None
    for _ in range(warmup):
        result = fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), times, result


def write_result(name: str, payload: dict[str, Any], out: str | Path | None = None) -> Path:
    path = Path(out) if out else RESULTS / f"{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {"benchmark": name, "machine": machine_info(),
               "measured_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), **payload}
    path.write_text(json.dumps(payload, indent=2, default=str) + "\n")
    return path


def markdown_table(rows: list[dict[str, Any]], columns: list[str]) -> str:
    def cell(value: Any) -> str:
        if isinstance(value, float):
            return f"{value:.3g}" if abs(value) < 1000 else f"{value:.0f}"
        return str(value)

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(row.get(c, "")) for c in columns) + " |" for row in rows]
    return "\n".join(lines)
