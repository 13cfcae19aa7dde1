"""``make demo``: the whole loop, offline, on data that ships with scikit-learn.

data -> extract (efficientnet_lite0, real ImageNet weights) -> fit-head -> bundle ->
predict on held-out images.  By default the data are scikit-learn's handwritten
digits rendered as PNG files in ``train/val/test`` class folders; ``--data DIR`` runs
the same loop on any class-folder data set.  Everything is written under ``cache/``.

Run as ``python -m embedx.demo [--data DIR]``.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import click
import numpy as np

from embedx import paths


def render_digits(root: Path, *, size: int = 64, per_class: int | None = None) -> Path:
    """Write scikit-learn's 1,797 digits as PNGs: ``root/{train,val,test}/<digit>/<index>.png``.

    The split is fixed by index (60/20/20), so the demo is reproducible.  Digits are
    drawn dark on light and upscaled, closer to what an ImageNet backbone expects.
    ``per_class`` keeps at most that many images per class and split (a short run).
    """
    from PIL import Image
    from sklearn.datasets import load_digits

    done_marker = root / ".complete"
    if done_marker.exists():
        return root
    digits = load_digits()
    counts: dict[tuple[str, int], int] = {}
    for index, (pixels, label) in enumerate(zip(digits.images, digits.target, strict=True)):
        fraction = (index * 0.6180339887) % 1.0  # a stable, well-mixed split by index
        split = "train" if fraction < 0.6 else "val" if fraction < 0.8 else "test"
        counts[split, label] = counts.get((split, label), 0) + 1
        if per_class is not None and counts[split, label] > per_class:
            continue
        folder = root / split / str(label)
        folder.mkdir(parents=True, exist_ok=True)
        gray = (255 - pixels * (255.0 / 16.0)).astype(np.uint8)
        image = Image.fromarray(gray, mode="L").resize((size, size), Image.Resampling.BICUBIC)
        image.save(folder / f"{index:04d}.png")
    done_marker.write_text("ok\n")
    return root


def _step(title: str) -> float:
    click.secho(f"\n== {title}", fg="cyan", bold=True, err=True)
    return time.perf_counter()


def _done(start: float, message: str) -> None:
    click.echo(f"   {message} ({time.perf_counter() - start:.1f} s)", err=True)


def run_demo(
    *,
    data: Path | None = None,
    backbone: str = "efficientnet_lite0",
    weights: str = "DEFAULT",
    workdir: Path | None = None,
    per_class: int | None = None,
) -> dict:
    """Run the loop and return a summary dict (also printed by the CLI)."""
    from embedx.bundle import bundle
    from embedx.cli.progressbar import progress_bar
    from embedx.extract import extract
    from embedx.heads import fit_head
    from embedx.predict import predict_files

    workdir = workdir or paths.cache_dir() / "demo"
    workdir.mkdir(parents=True, exist_ok=True)

    start = _step("1/5 data")
    if data is None:
        folder = "digits" if per_class is None else f"digits-{per_class}"
        data = render_digits(workdir / folder, per_class=per_class)
        _done(start, f"rendered scikit-learn digits as PNG class folders under {data}")
    else:
        data = Path(data)
        _done(start, f"using {data}")
    name = data.name

    start = _step(f"2/5 extract: {backbone} runs once over every image")
    with progress_bar("extract", unit="img") as progress:
        summary = extract(
            data, backbone=backbone, weights=weights, output=workdir / f"{name}-{backbone}.h5",
            progress=progress,
        )
    info = summary.to_dict() if hasattr(summary, "to_dict") else dict(vars(summary))
    _done(start, f"{info.get('images')} images, {info.get('errors')} errors -> {info.get('output')}")

    start = _step("3/5 fit-head: logistic regression, regularization chosen on val")
    result = fit_head(Path(info["output"]), head="logreg", output=workdir / "heads" / f"{name}-logreg")
    val = result.metrics.get("val", {})
    _done(
        start,
        f"val accuracy {val.get('accuracy', float('nan')):.4f}, "
        f"ECE {val.get('ece', float('nan')):.4f} -> {val.get('ece_calibrated', float('nan')):.4f} "
        f"after temperature scaling; plots in {result.output_dir}",
    )

    start = _step("4/5 bundle: backbone + head + softmax in one ONNX file")
    model_path = bundle(result.output_dir, workdir / f"{name}-model.onnx")
    _done(start, f"{model_path} ({Path(model_path).stat().st_size / 1e6:.1f} MB)")

    start = _step("5/5 predict with the bundle on held-out images (onnxruntime only)")
    held_out = sorted((data / "test").glob("*/*")) if (data / "test").is_dir() else []
    if not held_out:
        held_out = sorted((data / "val").glob("*/*")) if (data / "val").is_dir() else []
    held_out = [p for p in held_out if p.is_file()]
    correct = total = 0
    examples: dict[str, str] = {}  # one example line per class
    for row in predict_files(held_out, model=model_path, top_k=1):
        if "error" in row:
            continue
        predicted = row["top_k"][0]["label"]
        truth = Path(row["path"]).parent.name
        correct += predicted == truth
        total += 1
        if truth not in examples and len(examples) < 5:
            examples[truth] = (
                f"{Path(row['path']).name}: predicted {predicted} "
                f"(p={row['top_k'][0]['probability']:.2f}), truth {truth}"
            )
    for line in examples.values():
        click.echo(f"   {line}", err=True)
    held_out_accuracy = correct / total if total else float("nan")
    _done(start, f"held-out accuracy {held_out_accuracy:.4f} on {total} images")

    return {
        "data": str(data),
        "backbone": backbone,
        "cache": info.get("output"),
        "images": info.get("images"),
        "extract_img_per_s": info.get("images_per_second"),
        "val_accuracy": val.get("accuracy"),
        "held_out_accuracy": held_out_accuracy,
        "held_out_images": total,
        "head": str(result.output_dir),
        "model": str(model_path),
    }


@click.command()
@click.option("--data", type=click.Path(exists=True, file_okay=False, path_type=Path), default=None,
              help="A class-folder data set (default: scikit-learn digits rendered as PNG).")
@click.option("--backbone", default="efficientnet_lite0", show_default=True)
@click.option("--weights", default="DEFAULT", show_default=True)
@click.option("--per-class", type=int, default=None,
              help="Digits only: at most this many images per class and split (a short run).")
def main(data: Path | None, backbone: str, weights: str, per_class: int | None) -> None:
    """Run data -> extract -> fit-head -> bundle -> predict, offline."""
    from embedx.errors import EmbedxError

    try:
        summary = run_demo(data=data, backbone=backbone, weights=weights, per_class=per_class)
    except EmbedxError as e:
        click.echo(f"error: {e}", err=True)
        sys.exit(1)
    click.secho("\nsummary", bold=True, err=True)
    click.echo(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
