"""Decode + preprocess throughput per core: the tutorial transform vs ``embedx.preprocess``.

Tutorial: ``PIL.Image.open(path).convert("RGB")`` then torchvision's
``Resize(256) -> CenterCrop(224) -> ToTensor() -> Normalize(mean, std)``.
embedx, both modes of ``preprocess.load(path, spec)`` (the path extract, predict and
serve use): ``mode="exact"`` (Pillow, pixel for pixel the tutorial, plus JPEG draft
for large photos) and ``mode="fast"`` (the default: libjpeg-turbo's fast DCT decode
and OpenCV's blur + resize).

One process, one thread (``torch.set_num_threads(1)``, OpenCV single-threaded), files
read from the page cache; each method runs once to warm up, then ``--repeats`` passes
over all images with the methods interleaved, and the median pass counts.  Rates are
images per CPU-second of this process (``time.process_time``: per core, and robust
when other processes share the machine); wall-clock rates are in the JSON too.  Two
image sets: the real data (``--data``, mostly ~500x375 JPEGs) and generated
2000x1500 photo-like JPEGs (``--large N``), where DCT-domain downscaling matters.

Pixels: max and mean absolute difference of each mode's float32 output against the
tutorial's, over the images both decode the same way (images with an EXIF rotation
or transparency are excluded: embedx rotates and composites on white on purpose).

Model: on the real data, efficientnet_lite0 (real weights) features of every image
through both modes: cosine of fast to exact per image, and the val accuracy of the
default head (``fit_head``, as ``embedx fit-head`` runs it) trained on each
(``--no-model`` skips this).

    python bench/decode.py [--quick] [--data DIR] [--large N] [--repeats R] [--no-model] [--out FILE]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402

from bench.common import HYMENOPTERA, markdown_table, write_result  # noqa: E402
from embedx.preprocess import PreprocessSpec  # noqa: E402

DEFAULT_MODE = PreprocessSpec().mode
EXACT = PreprocessSpec(mode="exact")
FAST = PreprocessSpec(mode="fast")


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


def pixel_accuracy(paths: list[Path], tutorial) -> dict:
    from PIL import Image

    from embedx import preprocess

    kept = [p for p in paths if comparable(p)]
    result: dict = {"compared": len(kept), "excluded": len(paths) - len(kept)}
    for name, spec in (("exact", EXACT), ("fast", FAST)):
        worst, means = 0.0, []
        for path in kept:
            reference = tutorial(Image.open(path).convert("RGB")).numpy()
            difference = np.abs(preprocess.load(path, spec) - reference)
            worst, means = max(worst, float(difference.max())), [*means, float(difference.mean())]
        result[f"{name}_max_abs_diff"] = worst
        result[f"{name}_mean_abs_diff"] = statistics.fmean(means) if means else 0.0
    saved_gap, worst = preprocess.JPEG_DRAFT_GAP, 0.0
    try:
        preprocess.JPEG_DRAFT_GAP = float("inf")
        for path in kept:
            reference = tutorial(Image.open(path).convert("RGB")).numpy()
            worst = max(worst, float(np.abs(preprocess.load(path, EXACT) - reference).max()))
    finally:
        preprocess.JPEG_DRAFT_GAP = saved_gap
    result["exact_max_abs_diff_without_draft"] = worst
    return result


def measure(paths: list[Path], *, repeats: int) -> dict:
    from PIL import Image

    from embedx import preprocess

    tutorial = tutorial_transform(EXACT)

    def run_tutorial() -> None:
        for path in paths:
            tutorial(Image.open(path).convert("RGB"))

    def runner(spec):
        def run() -> None:
            for path in paths:
                preprocess.load(path, spec)
        return run

    methods = {"tutorial": run_tutorial, "exact": runner(EXACT), "fast": runner(FAST)}
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
        "ratio_exact": rates["exact"] / rates["tutorial"],
        "ratio_fast": rates["fast"] / rates["tutorial"],
        "ratio_fast_wall": wall_rates["fast"] / wall_rates["tutorial"],
        "pixels": pixel_accuracy(paths, tutorial),
    }


def model_accuracy(data_root: Path, backbone: str = "efficientnet_lite0") -> dict:
    """Features of every image through both modes: cosine, and the default head's val accuracy."""
    from embedx import preprocess
    from embedx.cache import CacheData, CacheMeta
    from embedx.data import discover
    from embedx.export import export_backbone
    from embedx.heads import fit_head
    from embedx.quantize import cosine_similarity_rows
    from embedx.runtime import OrtModel

    exported = export_backbone(backbone)
    model = OrtModel(exported.path, device="cpu")
    dataset = discover(data_root)
    items = dataset.items
    result: dict = {"backbone": backbone, "weights": exported.weights_tag, "images": len(items)}
    features = {}
    with tempfile.TemporaryDirectory() as folder:
        for mode in ("exact", "fast"):
            spec = replace(exported.preprocess, mode=mode)
            rows = []
            for start in range(0, len(items), 32):
                batch = preprocess.load_batch([item.path for item in items[start : start + 32]], spec)
                rows.append(model.run(batch))
            # stored as the cache stores them (float16 by default)
            features[mode] = np.concatenate(rows).astype(np.float16).astype(np.float32)
            meta = CacheMeta.from_export(exported)
            meta = replace(meta, preprocess=spec.to_dict())
            cache = CacheData(
                features=features[mode], labels=np.array([item.label for item in items]),
                classes=list(dataset.classes), splits=np.array([item.split for item in items]),
                paths=np.array([item.relpath for item in items]),
                keys=np.array([f"{i:064x}" for i in range(len(items))]),
                meta=meta, errors=[], complete=True, path=Path(folder) / f"{mode}.h5")
            fitted = fit_head(cache, output=Path(folder) / f"head-{mode}", plots=False)
            result[f"{mode}_val_accuracy"] = float(fitted.metrics["val"]["accuracy"])
            result["val_images"] = int(fitted.metrics["n_val"])
    cosine = cosine_similarity_rows(features["fast"], features["exact"])
    result.update(cosine_mean=float(cosine.mean()), cosine_min=float(cosine.min()),
                  cosine_p1=float(np.percentile(cosine, 1)))
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a few images, 2 repeats (a smoke test)")
    parser.add_argument("--data", type=Path, default=HYMENOPTERA)
    parser.add_argument("--large", type=int, default=None, help="generated 2000x1500 JPEGs (default 24, quick 4)")
    parser.add_argument("--repeats", type=int, default=None, help="timed passes per method (default 5, quick 2)")
    parser.add_argument("--no-model", dest="model", action="store_false",
                        help="skip the efficientnet_lite0 cosine and val accuracy")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()

    import torch

    from embedx import data as data_module

    torch.set_num_threads(1)
    repeats = args.repeats or (2 if args.quick else 5)
    large = args.large if args.large is not None else (4 if args.quick else 24)
    sets: dict[str, dict] = {}
    model: dict | None = None
    if args.data.is_dir():
        paths = [item.path for item in data_module.discover(args.data).items]
        if args.quick:
            paths = paths[:: max(1, len(paths) // 40)]
        sets[args.data.name] = measure(paths, repeats=repeats)
        if args.model:
            model = model_accuracy(args.data)
    else:
        print(f"skipping real data: {args.data} is absent", file=sys.stderr)
    with tempfile.TemporaryDirectory() as folder:
        if large:
            sets["generated_2000x1500"] = measure(make_large_jpegs(Path(folder), large), repeats=repeats)

    rows, summary = [], []
    for name, result in sets.items():
        rates, pixels = result["images_per_s"], result["pixels"]
        rows.append({
            "images": f"{name} ({result['images']})",
            "tutorial img/s": rates["tutorial"],
            "exact img/s": rates["exact"],
            "exact ratio": result["ratio_exact"],
            "fast img/s": rates["fast"],
            "fast ratio": result["ratio_fast"],
            "fast wall ratio": result["ratio_fast_wall"],
            "exact max |diff|": pixels["exact_max_abs_diff"],
            "fast mean |diff|": pixels["fast_mean_abs_diff"],
            "fast max |diff|": pixels["fast_max_abs_diff"],
        })
        for mode in ("fast", "exact"):
            summary.append({
                "what": f"decode+preprocess per core, {name}, {mode}"
                        + (" (default)" if mode == DEFAULT_MODE else ""),
                "baseline": f"{rates['tutorial']:.0f} img/s",
                "embedx": f"{rates[mode]:.0f} img/s",
                "ratio": result[f"ratio_{mode}"],
            })
    table = markdown_table(rows, list(rows[0]) if rows else [])
    if model:
        table += (f"\n\n{model['backbone']} on {args.data.name} ({model['images']} images): feature cosine "
                  f"fast vs exact mean {model['cosine_mean']:.4f}, 1st percentile {model['cosine_p1']:.4f}, "
                  f"min {model['cosine_min']:.4f}; default head val accuracy ({model['val_images']} images) "
                  f"exact {model['exact_val_accuracy']:.3f}, fast {model['fast_val_accuracy']:.3f}")
        summary.append({
            "what": f"{model['backbone']} default head val accuracy, {args.data.name}: exact -> fast "
                    f"(feature cosine {model['cosine_mean']:.3f})",
            "baseline": f"{model['exact_val_accuracy']:.3f}", "embedx": f"{model['fast_val_accuracy']:.3f}",
            "ratio": None,
        })
    print(table)
    path = write_result("decode", {"quick": args.quick, "repeats": repeats, "threads": 1,
                                   "load_average": os.getloadavg(), "spec": FAST.to_dict(),
                                   "sets": sets, "model": model, "summary": summary,
                                   "table": table}, args.out)
    print(f"wrote {path}", file=sys.stderr)


if __name__ == "__main__":
    main()
