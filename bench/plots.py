"""PNG plots from bench/results/*.json (matplotlib, Agg backend)."""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def _load(results: Path, name: str) -> dict | None:
    path = results / f"{name}.json"
    return json.loads(path.read_text()) if path.exists() else None


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_scaling(results: Path) -> list[Path]:
    data = _load(results, "scaling")
    if not data:
        return []
    out = []
    rows = data.get("extraction_vs_batch", [])
    if rows:
        fig, ax = plt.subplots(figsize=(5, 3.5))
        ax.plot([r["batch_size"] for r in rows], [r["images_per_second"] for r in rows], marker="o")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("batch size")
        ax.set_ylabel("images / s")
        ax.set_title(f"ONNX Runtime {rows[0]['backbone']}, model only")
        ax.grid(alpha=0.3)
        out.append(_save(fig, results / "extract_vs_batch.png"))
    rows = data.get("head_fit_vs_rows", [])
    if rows:
        fig, ax = plt.subplots(figsize=(5, 3.5))
        ax.plot([r["rows"] for r in rows], [r["fit_seconds"] for r in rows], marker="o")
        ax.set_xlabel("training rows (2048-d, 100 classes)")
        ax.set_ylabel("seconds (full regularization sweep)")
        ax.set_title("fit-head time vs N")
        ax.grid(alpha=0.3)
        out.append(_save(fig, results / "head_fit_vs_rows.png"))
    return out


def plot_headline(results: Path) -> list[Path]:
    data = _load(results, "headline")
    if not data or not data.get("rows"):
        return []
    rows = data["rows"]
    labels = [f"{r['backbone']}\n{r['precision']}" for r in rows]
    fig, ax = plt.subplots(figsize=(1.6 * len(rows) + 2, 3.8))
    xs = range(len(rows))
    ax.bar([x - 0.2 for x in xs], [r["tutorial_s"] for r in rows], width=0.4, label="tutorial way")
    ax.bar([x + 0.2 for x in xs], [r["embedx_s"] for r in rows], width=0.4, label="embedx")
    for x, r in zip(xs, rows, strict=True):
        ax.annotate(f"{r['speedup']:.0f}×", (x + 0.2, r["embedx_s"]), ha="center", va="bottom")
    ax.set_xticks(list(xs), labels)
    ax.set_ylabel("wall seconds (train a classifier)")
    ax.set_title(f"{data.get('epochs')} epochs, same images")
    ax.legend()
    return [_save(fig, results / "headline.png")]


def plot_serve(results: Path) -> list[Path]:
    data = _load(results, "serve")
    rows = (data or {}).get("rows") or []
    if not rows or "concurrency" not in rows[0]:
        return []
    fig, ax = plt.subplots(figsize=(5, 3.5))
    for batching in sorted({str(r.get("batching")) for r in rows}):
        sel = [r for r in rows if str(r.get("batching")) == batching]
        ax.plot([r["concurrency"] for r in sel], [r["throughput_rps"] for r in sel], marker="o",
                label=f"batching {batching}")
    ax.set_xlabel("concurrent clients")
    ax.set_ylabel("requests / s")
    ax.set_title("serve-onnx throughput")
    ax.legend()
    ax.grid(alpha=0.3)
    return [_save(fig, results / "serve_throughput.png")]


def _grouped_bars(rows: list[dict], *, group: str, value: str, title: str, path: Path) -> Path:
    """One bar per ``mode`` in each ``group`` (x axis), height ``value``."""
    groups = list(dict.fromkeys(r[group] for r in rows))
    modes = list(dict.fromkeys(r["mode"] for r in rows))
    fig, ax = plt.subplots(figsize=(1.8 * len(groups) + 3, 3.8))
    width = 0.8 / len(modes)
    for i, mode in enumerate(modes):
        values = [next((r[value] for r in rows if r[group] == g and r["mode"] == mode), 0) for g in groups]
        ax.bar([x + i * width for x in range(len(groups))], values, width=width, label=mode)
    ax.set_xticks([x + width * (len(modes) - 1) / 2 for x in range(len(groups))], groups)
    ax.set_ylabel("images / s")
    ax.set_title(title)
    ax.legend(fontsize=8)
    return _save(fig, path)


def plot_extract(results: Path) -> list[Path]:
    data = _load(results, "extract")
    rows = (data or {}).get("rows") or []
    if not rows or "images_per_second" not in rows[0]:
        return []
    rows = sorted(rows, key=lambda r: r["backbone"])
    return [_grouped_bars(rows, group="backbone", value="images_per_second",
                          title="feature extraction throughput", path=results / "extract_throughput.png")]


def plot_scale(results: Path) -> list[Path]:
    rows = (_load(results, "scale") or {}).get("rows") or []
    if not rows:
        return []
    return [_grouped_bars(rows, group="data", value="img/s", title="local vs Ray vs shards + merge (2 cores)",
                          path=results / "scale.png")]


def draw_all(results: Path) -> list[Path]:
    out: list[Path] = []
    for plot in (plot_headline, plot_extract, plot_scaling, plot_serve, plot_scale):
        out += plot(results)
    return out
