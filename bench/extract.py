"""Extraction throughput: the tutorial way vs ONNX Runtime alone vs embedx end to end.

For each backbone (resnet18, resnet50, efficientnet_lite0), in one run on the same images:

(a) ``torch_eager``: the PyTorch tutorial way, ``ImageFolder`` + ``DataLoader(num_workers=2)``
    with ``Resize(256) -> CenterCrop(224) -> ToTensor -> Normalize`` and the eager model
    under ``torch.no_grad()`` (the backbone's own normalization and sizes);
(b) ``ort_model_only``: ``OrtModel.run`` on a batch decoded beforehand (no decode at all);
(c) ``embedx``: ``embedx.extract.extract`` into a fresh cache (decode workers + ORT +
    journal + HDF5), timed by its own pipeline clock (export and session start excluded,
    like the model construction is excluded from (a));
(d) ``embedx_int8`` (resnet50): the same with ``precision="int8"``, with the cosine figure.

Each figure is the median of ``--repeats`` runs after a warm-up.  Ratios are against (a)
of the same backbone; embedx end to end is also given as % of (b).  torchvision's
ImageNet weights are not available offline, so resnet18/50 run with random weights
(``--weights none``; speed does not depend on the values); efficientnet_lite0 uses its
real weights.

    python bench/extract.py [--quick] [--data DIR] [--out bench/results/extract.json]
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import HYMENOPTERA, markdown_table, write_result  # noqa: E402

BACKBONES = {"resnet18": "none", "resnet50": "none", "efficientnet_lite0": "DEFAULT"}
BATCH_SIZE = 32


def subset(data: Path, limit: int | None, workdir: Path) -> Path:
    """``data`` itself, or a class-folder copy of its first ``limit`` images (round robin over classes)."""
    from embedx.data import discover

    dataset = discover(data)
    items = list(dataset.items)
    if limit is None or limit >= len(items):
        if dataset.layout == "class_folders":
            return data
        limit = len(items)
    by_class: dict[int, list] = {}
    for item in items:
        by_class.setdefault(item.label, []).append(item)
    chosen = []
    while len(chosen) < limit and any(by_class.values()):
        for label in sorted(by_class):
            if by_class[label] and len(chosen) < limit:
                chosen.append(by_class[label].pop(0))
    root = workdir / "images"
    for n, item in enumerate(chosen):
        target = root / dataset.classes[item.label] / f"{n:05d}{item.path.suffix}"
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(item.path, target)
    return root


def median_rate(fn, images: int, *, repeats: int, warmup: int) -> tuple[float, list[float]]:
    for _ in range(warmup):
        fn()
    rates = []
    for _ in range(repeats):
        seconds = fn()
        rates.append(images / seconds)
    return statistics.median(rates), rates


def torch_eager(data: Path, backbone: str, weights: str, *, repeats: int, warmup: int) -> dict:
    import torch
    from torchvision import datasets, transforms

    from embedx.backbones import build_feature_extractor, get_spec

    spec = get_spec(backbone).preprocess
    transform = transforms.Compose([
        transforms.Resize(spec.resize_size), transforms.CenterCrop(spec.input_size), transforms.ToTensor(),
        transforms.Normalize(spec.mean, spec.std),
    ])
    dataset = datasets.ImageFolder(str(data), transform=transform)
    model = build_feature_extractor(backbone, weights=weights).eval()

    def one_pass() -> float:
        loader = torch.utils.data.DataLoader(dataset, batch_size=BATCH_SIZE, shuffle=False, num_workers=2)
        start = time.perf_counter()
        with torch.no_grad():
            for inputs, _ in loader:
                model(inputs)
        return time.perf_counter() - start

    rate, rates = median_rate(one_pass, len(dataset), repeats=repeats, warmup=warmup)
    return {"images_per_second": rate, "runs": rates, "images": len(dataset), "threads": torch.get_num_threads()}


def ort_model_only(export, data: Path, *, repeats: int, warmup: int, precision: str = "fp32",
                   calibration=None) -> dict:
    from embedx.data import discover
    from embedx.preprocess import load_batch
    from embedx.runtime import OrtModel

    items = discover(data).items[:BATCH_SIZE]
    batch = load_batch([item.path for item in items], export.preprocess)
    model = OrtModel(export.path, device="cpu", precision=precision, calibration=calibration)
    runs = max(2, 96 // len(batch))

    def timed() -> float:
        start = time.perf_counter()
        for _ in range(runs):
            model.run(batch)
        return time.perf_counter() - start

    rate, rates = median_rate(timed, runs * len(batch), repeats=repeats, warmup=max(warmup, 1))
    return {"images_per_second": rate, "runs": rates, "providers": model.providers}


def embedx_extract(data: Path, backbone: str, weights: str, workdir: Path, *, repeats: int, warmup: int,
                   precision: str = "fp32") -> dict:
    """img/s of fresh extractions (``overwrite``), by extract's pipeline clock."""
    from embedx.extract import extract

    rates, last = [], None
    if precision == "int8":
        warmup = max(warmup, 1)  # the first run quantizes (cached on disk, like the export)
    for i in range(warmup + repeats):
        last = extract(data, backbone=backbone, weights=weights, output=workdir / f"{backbone}-{precision}.h5",
                       precision=precision, device="cpu", batch_size=BATCH_SIZE, overwrite=True)
        if i >= warmup:
            rates.append(last.images_per_second)
    return {
        "images_per_second": statistics.median(rates), "runs": rates, "images": last.new,
        "int8_cosine": last.int8_cosine, "workers": last.workers, "threads": last.threads,
        "decode_cpu_seconds": last.decode_seconds, "decode_wait_seconds": last.decode_wait_seconds,
        "inference_seconds": last.inference_seconds, "write_seconds": last.write_seconds,
        "hash_seconds": last.hash_seconds, "session_seconds": last.session_seconds,
        "pipeline_seconds": last.pipeline_seconds,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="96 images, one run each (proves it works)")
    parser.add_argument("--data", type=Path, default=HYMENOPTERA)
    parser.add_argument("--backbones", default=",".join(BACKBONES))
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--limit", type=int, default=None, help="use only this many images")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    repeats = args.repeats or (1 if args.quick else 3)
    warmup = 0 if args.quick else 1
    limit = args.limit or (96 if args.quick else None)

    from embedx.export import resolve_backbone

    rows: list[dict] = []
    summary: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="embedx-bench-extract-") as tmp:
        workdir = Path(tmp)
        data = subset(args.data, limit, workdir)
        for backbone in args.backbones.split(","):
            weights = BACKBONES.get(backbone, "none")
            print(f"## {backbone} (weights {weights})", file=sys.stderr, flush=True)
            export = resolve_backbone(backbone, weights=weights)
            eager = torch_eager(data, backbone, weights, repeats=repeats, warmup=warmup)
            model_only = ort_model_only(export, data, repeats=repeats, warmup=warmup)
            ours = embedx_extract(data, backbone, weights, workdir, repeats=repeats, warmup=warmup)
            base = eager["images_per_second"]
            for mode, result in (("torch_eager", eager), ("ort_model_only", model_only), ("embedx", ours)):
                rows.append({"backbone": backbone, "mode": mode, **result,
                             "vs_torch_eager": result["images_per_second"] / base})
            share = ours["images_per_second"] / model_only["images_per_second"]
            rows[-1]["pct_of_model_only"] = 100 * share
            summary.append({"what": f"{backbone} fp32 extract img/s, embedx end to end vs torch eager",
                            "baseline": f"{base:.1f}", "embedx": f"{ours['images_per_second']:.1f}",
                            "ratio": ours["images_per_second"] / base})
            summary.append({"what": f"{backbone} embedx end to end as share of ORT model-only",
                            "baseline": f"{model_only['images_per_second']:.1f}",
                            "embedx": f"{ours['images_per_second']:.1f}", "ratio": share})
            if backbone == "resnet50":
                int8 = embedx_extract(data, backbone, weights, workdir, repeats=repeats, warmup=warmup,
                                      precision="int8")
                rows.append({"backbone": backbone, "mode": "embedx_int8", **int8,
                             "vs_torch_eager": int8["images_per_second"] / base})
                summary.append({"what": f"resnet50 int8 extract img/s vs torch eager fp32 "
                                        f"(cosine {int8['int8_cosine']:.4f})",
                                "baseline": f"{base:.1f}", "embedx": f"{int8['images_per_second']:.1f}",
                                "ratio": int8["images_per_second"] / base})
            print(markdown_table([r for r in rows if r["backbone"] == backbone],
                                 ["backbone", "mode", "images_per_second", "vs_torch_eager"]),
                  file=sys.stderr, flush=True)
        images = sum(1 for _ in data.rglob("*") if _.is_file())
    path = write_result("extract", {"quick": args.quick, "data": str(args.data), "images": images,
                                    "batch_size": BATCH_SIZE, "repeats": repeats, "warmup": warmup,
                                    "rows": rows, "summary": summary}, args.out)
    print(markdown_table(rows, ["backbone", "mode", "images_per_second", "vs_torch_eager", "pct_of_model_only",
                                "int8_cosine"]))
    print(f"\nwrote {path}", file=sys.stderr)


if __name__ == "__main__":
    main()
