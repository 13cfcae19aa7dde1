"""Extraction throughput: the tutorial way vs ONNX Runtime alone vs embedx end to end.

For each backbone (resnet18, resnet50, efficientnet_lite0), in one run on the same images:

(a) ``torch_tutorial``, the baseline of record: the PyTorch transfer-learning tutorial's
    configuration exactly, ``ImageFolder`` + ``DataLoader(batch_size=4, num_workers=4)``
    with ``Resize(256) -> CenterCrop(224) -> ToTensor -> Normalize`` and the eager model
    in ``eval()`` under ``torch.no_grad()`` (the backbone's own normalization and sizes);
(a') ``torch_batch32``: the same with ``batch_size=32, num_workers=2`` (one worker per
    core), the batch embedx uses, reported next to it so that neither torch figure is read
    alone.  Which is faster depends on the model: on the 2-core AVX-512 machine of
    bench/results, resnet50 runs ~20 img/s at batch 4 and ~13-15 at batch 32 (torch's
    CPU convolutions prefer small batches there), so the tutorial's configuration is the
    stronger baseline for it;
(b) ``ort_model_only``: ``OrtModel.run`` on a batch decoded beforehand (no decode at all);
(c) ``embedx``: ``embedx.extract.extract`` into a fresh cache (decode workers + ORT +
    journal + HDF5), timed by its own pipeline clock (export and session start excluded,
    like the model construction is excluded from (a));
(d) ``ort_model_only_int8`` and ``embedx_int8`` (resnet50): (b) and (c) with
    ``precision="int8"``, with the cosine figure.

Each figure is the median of ``--repeats`` runs after a warm-up; the modes are
interleaved (every mode's first run, then every mode's second, ...) so that load from
other processes spreads over all of them, and the load average is recorded before and
after.  ``vs_torch_eager`` is against (a) of the same backbone, ``vs_torch_batch32``
against (a'); embedx end to end is also given as % of (b).  torchvision's
ImageNet weights are not available offline, so resnet18/50 run with random weights
(``--weights none``; speed does not depend on the values); efficientnet_lite0 uses its
real weights.

    python bench/extract.py [--quick] [--data DIR] [--out bench/results/extract.json]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
import warnings
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


TUTORIAL = {"batch_size": 4, "num_workers": 4}  # the transfer-learning tutorial's DataLoader
BATCH32 = {"batch_size": BATCH_SIZE, "num_workers": 2}


def load_average() -> list[float]:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return []


class Mode:
    """One way to extract: ``once()`` runs it and returns (images, seconds, details)."""

    def __init__(self, name: str, once) -> None:
        self.name, self.once = name, once
        self.rates: list[float] = []
        self.details: dict = {}

    def measure(self) -> None:
        images, seconds, self.details = self.once()
        self.rates.append(images / seconds)

    def result(self) -> dict:
        return {"images_per_second": statistics.median(self.rates), "runs": self.rates, **self.details}


def interleaved(modes: list[Mode], *, repeats: int, warmup: int) -> None:
    """Warm every mode up, then run them in turn ``repeats`` times (noise spreads over all)."""
    for mode in modes:
        for _ in range(warmup):
            mode.once()
    for _ in range(repeats):
        for mode in modes:
            mode.measure()


def torch_eager(data: Path, backbone: str, model, *, batch_size: int, num_workers: int):
    import torch
    from torchvision import datasets, transforms

    from embedx.backbones import get_spec

    # the tutorial's 4 workers on 2 cores draw a warning from torch at every pass
    warnings.filterwarnings("ignore", message="This DataLoader will create")
    spec = get_spec(backbone).preprocess
    transform = transforms.Compose([
        transforms.Resize(spec.resize_size), transforms.CenterCrop(spec.input_size), transforms.ToTensor(),
        transforms.Normalize(spec.mean, spec.std),
    ])
    dataset = datasets.ImageFolder(str(data), transform=transform)

    def once():
        loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers)
        start = time.perf_counter()
        with torch.no_grad():
            for inputs, _ in loader:
                model(inputs)
        return len(dataset), time.perf_counter() - start, {
            "images": len(dataset), "threads": torch.get_num_threads(), "batch_size": batch_size,
            "num_workers": num_workers}

    return once


def ort_model_only(export, data: Path, *, precision: str = "fp32", calibration=None):
    from embedx.data import discover
    from embedx.preprocess import load_batch
    from embedx.runtime import OrtModel

    items = discover(data).items[:BATCH_SIZE]
    batch = load_batch([item.path for item in items], export.preprocess)
    model = OrtModel(export.path, device="cpu", precision=precision, calibration=calibration)
    runs = max(2, 96 // len(batch))

    def once():
        start = time.perf_counter()
        for _ in range(runs):
            model.run(batch)
        return runs * len(batch), time.perf_counter() - start, {
            "providers": model.providers, "int8_cosine": model.int8_cosine}

    return once


def embedx_extract(data: Path, backbone: str, weights: str, workdir: Path, *, precision: str = "fp32"):
    """Fresh extractions (``overwrite``), timed by extract's pipeline clock."""
    from embedx.extract import extract

    def once():
        last = extract(data, backbone=backbone, weights=weights, output=workdir / f"{backbone}-{precision}.h5",
                       precision=precision, device="cpu", batch_size=BATCH_SIZE, overwrite=True)
        return last.new, last.pipeline_seconds, {
            "images": last.new, "int8_cosine": last.int8_cosine, "workers": last.workers,
            "threads": last.threads, "decode_cpu_seconds": last.decode_seconds,
            "decode_wait_seconds": last.decode_wait_seconds, "inference_seconds": last.inference_seconds,
            "write_seconds": last.write_seconds, "hash_seconds": last.hash_seconds,
            "session_seconds": last.session_seconds, "pipeline_seconds": last.pipeline_seconds,
        }

    return once


def int8_calibration(data: Path, export):
    """The calibration batch ``extract`` would use: the first ``CALIBRATION_IMAGES`` images."""
    from embedx.data import discover
    from embedx.extract import CALIBRATION_IMAGES
    from embedx.preprocess import load_batch

    items = [item for item in discover(data).items if item.split == "train"][:CALIBRATION_IMAGES]
    return load_batch([item.path for item in items], export.preprocess)


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
            load_before = load_average()
            print(f"## {backbone} (weights {weights}), load average {load_before}", file=sys.stderr, flush=True)
            from embedx.backbones import build_feature_extractor

            export = resolve_backbone(backbone, weights=weights)
            model = build_feature_extractor(backbone, weights=weights).eval()
            modes = [
                Mode("torch_tutorial", torch_eager(data, backbone, model, **TUTORIAL)),
                Mode("torch_batch32", torch_eager(data, backbone, model, **BATCH32)),
                Mode("ort_model_only", ort_model_only(export, data)),
                Mode("embedx", embedx_extract(data, backbone, weights, workdir)),
            ]
            if backbone == "resnet50":
                calibration = int8_calibration(data, export)
                modes += [
                    Mode("ort_model_only_int8", ort_model_only(export, data, precision="int8",
                                                               calibration=calibration)),
                    Mode("embedx_int8", embedx_extract(data, backbone, weights, workdir, precision="int8")),
                ]
            interleaved(modes, repeats=repeats, warmup=warmup)
            load_after = load_average()
            results = {mode.name: mode.result() for mode in modes}
            base = results["torch_tutorial"]["images_per_second"]
            batch32 = results["torch_batch32"]["images_per_second"]
            model_only = results["ort_model_only"]["images_per_second"]
            for name, result in results.items():
                rate = result["images_per_second"]
                row = {"backbone": backbone, "mode": name, **result, "vs_torch_eager": rate / base,
                       "vs_torch_batch32": rate / batch32, "load_before": load_before, "load_after": load_after}
                if name.startswith("embedx"):
                    reference = results["ort_model_only_int8" if name == "embedx_int8" else "ort_model_only"]
                    row["pct_of_model_only"] = 100 * rate / reference["images_per_second"]
                rows.append(row)
            ours = results["embedx"]["images_per_second"]
            summary.append({"what": f"{backbone} fp32 extract img/s, embedx end to end vs torch eager "
                                    f"(tutorial: batch 4, 4 workers; torch at batch 32: {batch32:.1f} img/s, "
                                    f"{ours / batch32:.2f}x)",
                            "baseline": f"{base:.1f}", "embedx": f"{ours:.1f}", "ratio": ours / base})
            summary.append({"what": f"{backbone} embedx end to end as share of ORT model-only",
                            "baseline": f"{model_only:.1f}", "embedx": f"{ours:.1f}", "ratio": ours / model_only})
            if backbone == "resnet50":
                int8 = results["embedx_int8"]
                rate = int8["images_per_second"]
                summary.append({"what": f"resnet50 int8 extract img/s vs torch eager fp32 tutorial "
                                        f"(cosine {int8['int8_cosine']:.4f}; "
                                        f"vs torch at batch 32 {rate / batch32:.2f}x; "
                                        f"int8 model-only {results['ort_model_only_int8']['images_per_second']:.1f})",
                                "baseline": f"{base:.1f}", "embedx": f"{rate:.1f}", "ratio": rate / base})
            print(markdown_table([r for r in rows if r["backbone"] == backbone],
                                 ["backbone", "mode", "images_per_second", "vs_torch_eager", "vs_torch_batch32",
                                  "pct_of_model_only"]), file=sys.stderr, flush=True)
            print(f"load average before {load_before}, after {load_after}", file=sys.stderr, flush=True)
        images = sum(1 for _ in data.rglob("*") if _.is_file())
    path = write_result("extract", {"quick": args.quick, "data": str(args.data), "images": images,
                                    "batch_size": BATCH_SIZE, "tutorial": TUTORIAL, "batch32": BATCH32,
                                    "repeats": repeats, "warmup": warmup,
                                    "rows": rows, "summary": summary}, args.out)
    print(markdown_table(rows, ["backbone", "mode", "images_per_second", "vs_torch_eager", "vs_torch_batch32",
                                "pct_of_model_only", "int8_cosine", "load_after"]))
    print(f"\nwrote {path}", file=sys.stderr)


if __name__ == "__main__":
    main()
