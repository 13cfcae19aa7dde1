"""Domain shift on hymenoptera: what ``fit-head --adapt-to`` gains per corruption.

Target domains are made deterministically from hymenoptera_data with seven
ImageNet-C-style corruptions, each applied at the image's own resolution, before
extract's resize and crop:

* ``noise``: additive Gaussian noise, sigma 0.18 of the pixel range (seeded by the file's path);
* ``blur``: Gaussian blur, radius 4 px;
* ``contrast``: contrast scaled to 0.25 around the image mean;
* ``greyscale``: luminance only, as three equal channels;
* ``pixelate``: box-downsampled by 10, then nearest-neighbour upsampled back;
* ``darkness``: brightness scaled to 0.35;
* ``jpeg``: re-encoded as JPEG at quality 10.

Each corruption is applied to the train images (the *unlabeled* target: ``--adapt-to``)
and to the val images (the labeled evaluation, 153 images, never seen by the fit),
written as image folders under ``--work`` and extracted with efficientnet_lite0 (real
weights) into one cache each (resumable: a rerun reuses what is there). The source
is the clean train/val cache. Then, in one run, for each domain (``clean`` = clean
train as the target, clean val as the evaluation) and each method (``none`` and every
adaptation), ``fit_head(source, adapt_to=target train)`` and ``evaluate(head, target val)``:
val accuracy with its Wilson 95% interval, and the source-val accuracy the fit's
guard reports.

    nice python bench/adapt.py [--work DIR] [--out bench/results/adapt.json]
"""

from __future__ import annotations

import argparse
import hashlib
import io
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageFilter, ImageOps

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import HYMENOPTERA, RESULTS, markdown_table, write_result  # noqa: E402

BACKBONE = "efficientnet_lite0"
#: the adaptations compared (``none`` first: the baseline every gain is measured against)
METHODS = ("none", "standardize", "selftrain", "coral")


def _seed(relative: str) -> int:
    return int.from_bytes(hashlib.sha256(relative.encode()).digest()[:8], "little")


def _noise(image: Image.Image, rng: np.random.Generator) -> Image.Image:
    pixels = np.asarray(image, dtype=np.float32) / 255.0
    noisy = pixels + rng.normal(0.0, 0.18, pixels.shape).astype(np.float32)
    return Image.fromarray((np.clip(noisy, 0, 1) * 255 + 0.5).astype(np.uint8))


def _contrast(image: Image.Image, rng: np.random.Generator) -> Image.Image:
    pixels = np.asarray(image, dtype=np.float32)
    mean = pixels.mean(axis=(0, 1), keepdims=True)
    return Image.fromarray(np.clip((pixels - mean) * 0.25 + mean + 0.5, 0, 255).astype(np.uint8))


def _pixelate(image: Image.Image, rng: np.random.Generator) -> Image.Image:
    small = image.resize((max(1, image.width // 10), max(1, image.height // 10)), Image.Resampling.BOX)
    return small.resize(image.size, Image.Resampling.NEAREST)


def _darkness(image: Image.Image, rng: np.random.Generator) -> Image.Image:
    pixels = np.asarray(image, dtype=np.float32) * 0.35
    return Image.fromarray((pixels + 0.5).astype(np.uint8))


def _jpeg(image: Image.Image, rng: np.random.Generator) -> Image.Image:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=10)
    return Image.open(io.BytesIO(buffer.getvalue())).convert("RGB")


CORRUPTIONS = {
    "noise": _noise,
    "blur": lambda image, rng: image.filter(ImageFilter.GaussianBlur(4)),
    "contrast": _contrast,
    "greyscale": lambda image, rng: ImageOps.grayscale(image).convert("RGB"),
    "pixelate": _pixelate,
    "darkness": _darkness,
    "jpeg": _jpeg,
}


def corrupt_folder(source: Path, target: Path, corruption: str) -> int:
    """``source``'s class folders, each image corrupted, as PNGs under ``target`` (skips what exists)."""
    apply = CORRUPTIONS[corruption]
    written = 0
    for path in sorted(p for p in source.rglob("*") if p.is_file()):
        relative = path.relative_to(source).as_posix()
        out = (target / relative).with_suffix(".png")
        if out.exists():
            continue
        try:
            image = Image.open(path).convert("RGB")
        except OSError:
            continue
        rng = np.random.default_rng(_seed(f"{corruption}/{relative}"))
        out.parent.mkdir(parents=True, exist_ok=True)
        partial = out.with_suffix(".tmp.png")
        apply(image, rng).save(partial, format="PNG")
        partial.replace(out)
        written += 1
    return written


def prepare(work: Path, data: Path) -> dict[str, dict[str, Path]]:
    """Image folders and caches: {"source": ..., domain: {"train": cache, "val": cache}}."""
    from embedx.extract import extract

    def cache_of(folder: Path, name: str) -> Path:
        output = work / "caches" / f"{name}.h5"
        start = time.perf_counter()
        summary = extract(folder, backbone=BACKBONE, output=output, device="cpu", val_fraction=0.0)
        print(f"  {name}: {summary.images} rows ({summary.new} new) in {time.perf_counter() - start:.1f} s",
              file=sys.stderr)
        return output

    domains: dict[str, Any] = {"source": cache_of(data, "source")}
    domains["clean"] = {split: cache_of(data / split, f"clean-{split}") for split in ("train", "val")}
    for corruption in CORRUPTIONS:
        domains[corruption] = {}
        for split in ("train", "val"):
            folder = work / "images" / corruption / split
            corrupt_folder(data / split, folder, corruption)
            domains[corruption][split] = cache_of(folder, f"{corruption}-{split}")
    return domains


def measure(domains: dict[str, Any], work: Path, methods: tuple[str, ...]) -> list[dict[str, Any]]:
    from embedx.heads import evaluate, fit_head
    from embedx.metrics import wilson_interval

    rows = []
    for domain, caches in domains.items():
        if domain == "source":
            continue
        for method in methods:
            start = time.perf_counter()
            result = fit_head(domains["source"], adapt_to=caches["train"], adapt=method, plots=False,
                              output=work / "heads" / f"{domain}-{method}")
            (scores,) = [v for v in evaluate(result.output_dir, caches["val"]).values() if isinstance(v, dict)]
            n = int(scores["n"])
            correct = int(round(scores["accuracy"] * n))
            low, high = wilson_interval(correct, n)
            guard = result.metrics.get("adaptation", {})
            rows.append({
                "domain": domain, "method": method, "accuracy": correct / n, "n": n,
                "ci95_low": low, "ci95_high": high,
                "source_val_before": guard.get("source_val_accuracy_before"),
                "source_val_after": guard.get("source_val_accuracy_after"),
                "seconds": time.perf_counter() - start,
            })
            print(f"  {domain:10s} {method:12s} {correct / n:.3f} [{low:.3f}, {high:.3f}]", file=sys.stderr)
    return rows


def summarize(rows: list[dict[str, Any]], methods: tuple[str, ...]) -> dict[str, Any]:
    """Per method: the mean gain over ``none`` on the corruptions, and the change on clean data."""
    accuracy = {(r["domain"], r["method"]): r["accuracy"] for r in rows}
    corruptions = [d for d in CORRUPTIONS if (d, "none") in accuracy]
    summary = {}
    for method in methods:
        gains = [accuracy[(d, method)] - accuracy[(d, "none")] for d in corruptions]
        summary[method] = {
            "mean_corrupted_accuracy": float(np.mean([accuracy[(d, method)] for d in corruptions])),
            "mean_gain_over_none": float(np.mean(gains)),
            "clean_change": accuracy[("clean", method)] - accuracy[("clean", "none")],
            "gains": dict(zip(corruptions, gains, strict=True)),
        }
    return summary


def plot(rows: list[dict[str, Any]], methods: tuple[str, ...], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    domains = list(dict.fromkeys(r["domain"] for r in rows))
    by_key = {(r["domain"], r["method"]): r for r in rows}
    width = 0.8 / len(methods)
    fig, ax = plt.subplots(figsize=(10, 4))
    for i, method in enumerate(methods):
        xs = np.arange(len(domains)) + (i - (len(methods) - 1) / 2) * width
        values = [by_key[(d, method)]["accuracy"] for d in domains]
        errors = [[by_key[(d, method)]["accuracy"] - by_key[(d, method)]["ci95_low"] for d in domains],
                  [by_key[(d, method)]["ci95_high"] - by_key[(d, method)]["accuracy"] for d in domains]]
        ax.bar(xs, values, width, yerr=errors, capsize=2, label=method)
    ax.set_xticks(np.arange(len(domains)), domains)
    ax.set_ylim(0.4, 1.0)
    ax.set_ylabel("val accuracy (153 images, Wilson 95%)")
    ax.set_title(f"hymenoptera, {BACKBONE}, logreg head: adaptation to corrupted target domains")
    ax.legend(loc="lower left")
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=HYMENOPTERA)
    parser.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "embedx-bench-adapt",
                        help="image folders and caches (kept: a rerun reuses them)")
    parser.add_argument("--out", type=Path, default=RESULTS / "adapt.json")
    parser.add_argument("--prepare-only", action="store_true", help="make the images and caches, fit nothing")
    args = parser.parse_args(argv)
    if not args.data.is_dir():
        raise SystemExit(f"{args.data} is absent: the benchmark needs hymenoptera_data")
    start = time.perf_counter()
    domains = prepare(args.work, args.data)
    prepare_seconds = time.perf_counter() - start
    if args.prepare_only:
        return
    rows = measure(domains, args.work, METHODS)
    summary = summarize(rows, METHODS)
    png = plot(rows, METHODS, args.out.with_name("adapt.png"))
    from embedx.heads.adapt import DEFAULT_METHOD

    path = write_result("adapt", {
        "backbone": BACKBONE, "head": "logreg", "corruptions": list(CORRUPTIONS), "methods": list(METHODS),
        "default_method": DEFAULT_METHOD, "prepare_seconds": prepare_seconds, "rows": rows,
        "summary": summary, "plot": png.name,
    }, args.out)
    print(markdown_table(rows, ["domain", "method", "accuracy", "ci95_low", "ci95_high", "source_val_before",
                                "source_val_after"]))
    for method, values in summary.items():
        print(f"{method}: mean gain over none {values['mean_gain_over_none']:+.4f}, "
              f"clean change {values['clean_change']:+.4f}")
    print(f"wrote {path} and {png}")


if __name__ == "__main__":
    main()
