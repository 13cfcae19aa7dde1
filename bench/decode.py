"""Decode + preprocess throughput per core: the tutorial transform vs ``embedx.preprocess``.

Tutorial: ``PIL.Image.open(path).convert("RGB")`` then torchvision's
``Resize(256) -> CenterCrop(224) -> ToTensor() -> Normalize(mean, std)``.
embedx: ``preprocess.load(path, spec)`` (the path extract, predict and serve use),
and the same with JPEG draft turned off ("exact"), which must agree with the tutorial
to float rounding.

One process, one thread (``torch.set_num_threads(1)``), files read from the page
cache; each method runs once to warm up, then ``--repeats`` passes over all images
with the methods interleaved, and the median pass counts.  Rates are images per
CPU-second of this process (``time.process_time``: per core, and robust when other
processes share the machine); wall-clock rates are in the JSON too.  Two image sets: the real
data (``--data``, mostly ~500x375 JPEGs) and generated 2000x1500 photo-like JPEGs
(``--large N``), where JPEG draft (DCT-domain downscaling) matters.

Accuracy: max and mean absolute difference of embedx's float32 output against the
tutorial's, over the images both decode the same way (images with an EXIF rotation
or transparency are excluded: embedx rotates and composites on white on purpose).

    python bench/decode.py [--quick] [--data DIR] [--large N] [--repeats R] [--out FILE]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402

from bench.common import HYMENOPTERA, markdown_table, write_result  # noqa: E402


def tutorial_transform(spec):
    """torchvision's Resize -> CenterCrop -> ToTensor -> Normalize for a ``PreprocessSpec``."""
    from torchvision import transforms

    mode = transforms.InterpolationMode(spec.interpolation)
    return transforms.Compose([
        transforms.Resize(spec.resize_size, interpolation=mode),
        transforms.CenterCrop(spec.input_size),
        transforms.ToTensor(),
        transforms.Normalize(spec.mean, spec.std),
    ])


def make_large_jpegs(folder: Path, count: int, size=(2000, 1500)) -> list[Path]:
    """Photo-like JPEGs: smooth colour fields plus fine noise, quality 90."""
    from PIL import Image

    width, height = size
    paths = []
    for i in range(count):
        rng = np.random.default_rng(i)
        coarse = rng.integers(0, 256, (height // 80, width // 80, 3), dtype=np.uint8)
        smooth = np.asarray(Image.fromarray(coarse).resize(size, Image.Resampling.BICUBIC))
        pixels = np.clip(smooth.astype(np.int16) + rng.integers(-6, 7, smooth.shape), 0, 255)
        path = folder / f"large_{i:03d}.jpg"
        Image.fromarray(pixels.astype(np.uint8)).save(path, quality=90)
        paths.append(path)
    return paths


def comparable(path: Path) -> bool:
    """Both pipelines see the same pixels: no EXIF rotation, no transparency."""
    from PIL import Image

    with Image.open(path) as image:
        if image.getexif().get(0x0112, 1) != 1:
            return False
        return image.mode not in ("RGBA", "LA", "PA") and "transparency" not in image.info


def accuracy(paths: list[Path], spec, tutorial) -> dict:
    from PIL import Image

    from embedx import preprocess

    kept = [p for p in paths if comparable(p)]
    worst = worst_exact = 0.0
    means = []
    saved_gap = preprocess.JPEG_DRAFT_GAP
    for path in kept:
        reference = tutorial(Image.open(path).convert("RGB")).numpy()
        difference = np.abs(preprocess.load(path, spec) - reference)
        worst, means = max(worst, float(difference.max())), [*means, float(difference.mean())]
        try:
            preprocess.JPEG_DRAFT_GAP = float("inf")
            exact = np.abs(preprocess.load(path, spec) - reference)
        finally:
            preprocess.JPEG_DRAFT_GAP = saved_gap
        worst_exact = max(worst_exact, float(exact.max()))
    return {
        "compared": len(kept),
        "excluded": len(paths) - len(kept),
        "max_abs_diff": worst,
        "mean_abs_diff": statistics.fmean(means) if means else 0.0,
        "max_abs_diff_without_draft": worst_exact,
    }


def measure(paths: list[Path], spec, *, repeats: int) -> dict:
    from PIL import Image

    from embedx import preprocess

    tutorial = tutorial_transform(spec)

    def run_tutorial() -> None:
        for path in paths:
            tutorial(Image.open(path).convert("RGB"))

    def run_embedx() -> None:
        for path in paths:
            preprocess.load(path, spec)

    def run_embedx_exact() -> None:
        saved = preprocess.JPEG_DRAFT_GAP
        preprocess.JPEG_DRAFT_GAP = float("inf")
        try:
            run_embedx()
        finally:
            preprocess.JPEG_DRAFT_GAP = saved

    methods = {"tutorial": run_tutorial, "embedx": run_embedx, "embedx_exact": run_embedx_exact}
    wall: dict[str, list[float]] = {name: [] for name in methods}
    cpu: dict[str, list[float]] = {name: [] for name in methods}
    for fn in methods.values():
        fn()  # warm-up: page cache, lazy imports, plan cache
    for repeat in range(repeats):
        names = list(methods)
        names = names[repeat % len(names):] + names[: repeat % len(names)]  # rotate the order
        for name in names:
            start, start_cpu = time.perf_counter(), time.process_time()
            methods[name]()
            wall[name].append(time.perf_counter() - start)
            cpu[name].append(time.process_time() - start_cpu)
    # images per CPU-second of this (single-threaded) process: "per core", and far less
    # disturbed than wall time when other processes share the cores
    rates = {name: len(paths) / statistics.median(times) for name, times in cpu.items()}
    wall_rates = {name: len(paths) / statistics.median(times) for name, times in wall.items()}
    return {
        "images": len(paths),
        "images_per_s": rates,
        "images_per_s_wall": wall_rates,
        "pass_cpu_seconds": cpu,
        "pass_wall_seconds": wall,
        "ratio": rates["embedx"] / rates["tutorial"],
        "ratio_exact": rates["embedx_exact"] / rates["tutorial"],
        "ratio_wall": wall_rates["embedx"] / wall_rates["tutorial"],
        "accuracy": accuracy(paths, spec, tutorial),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a few images, 2 repeats (a smoke test)")
    parser.add_argument("--data", type=Path, default=HYMENOPTERA)
    parser.add_argument("--large", type=int, default=None, help="generated 2000x1500 JPEGs (default 24, quick 4)")
    parser.add_argument("--repeats", type=int, default=None, help="timed passes per method (default 5, quick 2)")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()

    import torch

    from embedx import data as data_module
    from embedx.preprocess import PreprocessSpec

    torch.set_num_threads(1)
    spec = PreprocessSpec()
    repeats = args.repeats or (2 if args.quick else 5)
    large = args.large if args.large is not None else (4 if args.quick else 24)
    sets: dict[str, dict] = {}
    if args.data.is_dir():
        paths = [item.path for item in data_module.discover(args.data).items]
        if args.quick:
            paths = paths[:: max(1, len(paths) // 40)]
        sets[args.data.name] = measure(paths, spec, repeats=repeats)
    else:
        print(f"skipping real data: {args.data} is absent", file=sys.stderr)
    with tempfile.TemporaryDirectory() as folder:
        if large:
            sets["generated_2000x1500"] = measure(make_large_jpegs(Path(folder), large), spec, repeats=repeats)

    rows, summary = [], []
    for name, result in sets.items():
        rates, acc = result["images_per_s"], result["accuracy"]
        rows.append({
            "images": f"{name} ({result['images']})",
            "tutorial img/s": rates["tutorial"],
            "embedx img/s": rates["embedx"],
            "ratio": result["ratio"],
            "exact img/s": rates["embedx_exact"],
            "exact ratio": result["ratio_exact"],
            "wall ratio": result["ratio_wall"],
            "max |diff|": acc["max_abs_diff"],
            "mean |diff|": acc["mean_abs_diff"],
            "max |diff| exact": acc["max_abs_diff_without_draft"],
        })
        summary.append({
            "what": f"decode+preprocess per core, {name}",
            "baseline": f"{rates['tutorial']:.0f} img/s",
            "embedx": f"{rates['embedx']:.0f} img/s",
            "ratio": result["ratio"],
        })
    table = markdown_table(rows, list(rows[0]) if rows else [])
    print(table)
    path = write_result("decode", {"quick": args.quick, "repeats": repeats, "threads": 1,
                                   "spec": spec.to_dict(), "sets": sets, "summary": summary,
                                   "table": table}, args.out)
    print(f"wrote {path}", file=sys.stderr)


if __name__ == "__main__":
    main()
