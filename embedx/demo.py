"""The whole loop, offline, on data that ships with scikit-learn (``make demo``).

data -> extract (efficientnet_lite0, real ImageNet weights) -> fit-head -> bundle ->
predict on held-out images.  By default the data are scikit-learn's handwritten
digits rendered as PNG files in ``train/val/test`` class folders; ``data=DIR`` runs
the same loop on any class-folder data set.  Everything is written under ``cache/``.

Library code: ``Demo.steps()`` are the loop's steps as plain library calls, which
``embedx demo`` (``embedx/cli/demo_cmd.py``) runs with a heading, a progress bar and
a line of outcome per step; ``run_demo`` runs them silently and returns the summary.
``python -m embedx.demo [--data DIR]`` is ``embedx demo``.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from embedx import paths
from embedx.metrics import accuracy_interval, format_accuracy
from embedx.progress import ProgressCallback

if TYPE_CHECKING:
    from embedx.extract import ExtractSummary
    from embedx.heads import FitResult

logger = logging.getLogger(__name__)


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


@dataclass(frozen=True)
class DemoStep:
    """One step of the loop: ``run(progress)`` does it and returns what it did, one line each."""

    name: str  # what its progress bar is called
    title: str
    run: Callable[[ProgressCallback | None], list[str]]
    unit: str | None = None  # what ``progress`` counts, for the one step that reports it


@dataclass
class Demo:
    """One run of the loop: its settings, and what each step made (set as the steps run)."""

    data: Path | None = None
    backbone: str = "efficientnet_lite0"
    weights: str = "DEFAULT"
    workdir: Path | None = None  # default: ``cache_dir()/demo``
    per_class: int | None = None
    extracted: ExtractSummary | None = field(default=None, init=False)
    fitted: FitResult | None = field(default=None, init=False)
    model: Path | None = field(default=None, init=False)
    held_out_accuracy: float = field(default=float("nan"), init=False)
    held_out_images: int = field(default=0, init=False)

    def __post_init__(self) -> None:
        self.workdir = Path(self.workdir) if self.workdir is not None else paths.cache_dir() / "demo"

    def steps(self) -> list[DemoStep]:
        """The steps, to run in this order."""
        return [
            DemoStep("data", "1/5 data", self._data),
            DemoStep("extract", f"2/5 extract: {self.backbone} runs once over every image", self._extract,
                     unit="img"),
            DemoStep("fit-head", "3/5 fit-head: logistic regression, regularization chosen on val",
                     self._fit_head),
            DemoStep("bundle", "4/5 bundle: backbone + head + softmax in one ONNX file", self._bundle),
            DemoStep("predict", "5/5 predict with the bundle on held-out images (onnxruntime only)",
                     self._predict),
        ]

    def _data(self, progress: ProgressCallback | None) -> list[str]:
        self.workdir.mkdir(parents=True, exist_ok=True)
        if self.data is None:
            folder = "digits" if self.per_class is None else f"digits-{self.per_class}"
            self.data = render_digits(self.workdir / folder, per_class=self.per_class)
            return [f"rendered scikit-learn digits as PNG class folders under {self.data}"]
        self.data = Path(self.data)
        return [f"using {self.data}"]

    def _extract(self, progress: ProgressCallback | None) -> list[str]:
        from embedx.extract import extract

        self.extracted = extract(self.data, backbone=self.backbone, weights=self.weights,
                                 output=self.workdir / f"{self.data.name}-{self.backbone}.h5", progress=progress)
        return [f"{self.extracted.images} images, {self.extracted.errors} errors -> {self.extracted.output}"]

    def _fit_head(self, progress: ProgressCallback | None) -> list[str]:
        from embedx.heads import fit_head

        self.fitted = fit_head(Path(self.extracted.output), head="logreg",
                               output=self.workdir / "heads" / f"{self.data.name}-logreg")
        val = self.fitted.metrics["val"]
        return [
            f"val accuracy {format_accuracy(val['accuracy'], val['n'])} (95% Wilson interval), "
            f"ECE {val.get('ece', float('nan')):.4f} -> {val.get('ece_calibrated', float('nan')):.4f} "
            f"after temperature scaling; plots in {self.fitted.output_dir}"
        ]

    def _bundle(self, progress: ProgressCallback | None) -> list[str]:
        from embedx.bundle import bundle

        self.model = Path(bundle(self.fitted.output_dir, self.workdir / f"{self.data.name}-model.onnx"))
        return [f"{self.model} ({self.model.stat().st_size / 1e6:.1f} MB)"]

    def _predict(self, progress: ProgressCallback | None) -> list[str]:
        from embedx.predict import predict_files

        held_out = sorted((self.data / "test").glob("*/*")) if (self.data / "test").is_dir() else []
        if not held_out:
            held_out = sorted((self.data / "val").glob("*/*")) if (self.data / "val").is_dir() else []
        held_out = [p for p in held_out if p.is_file()]
        correct = total = 0
        examples: dict[str, str] = {}  # one example line per class
        for row in predict_files(held_out, model=self.model, top_k=1):
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
        self.held_out_accuracy = correct / total if total else float("nan")
        self.held_out_images = total
        shown = format_accuracy(self.held_out_accuracy, total) if total else "n/a (no images)"
        return [*examples.values(), f"held-out accuracy {shown} (95% Wilson interval)"]

    def summary(self) -> dict[str, Any]:
        """What the loop made and how well it did (after every step ran)."""
        return {
            "data": str(self.data),
            "backbone": self.backbone,
            "cache": self.extracted.output,
            "images": self.extracted.images,
            "extract_img_per_s": self.extracted.images_per_second,
            "val_accuracy": self.fitted.metrics.get("val", {}).get("accuracy"),
            "val_accuracy_ci": self.fitted.metrics.get("val", {}).get("accuracy_ci"),
            "held_out_accuracy": self.held_out_accuracy,
            "held_out_accuracy_ci": (list(accuracy_interval(self.held_out_accuracy, self.held_out_images))
                                     if self.held_out_images else None),
            "held_out_images": self.held_out_images,
            "head": str(self.fitted.output_dir),
            "model": str(self.model),
        }


def run_demo(
    *,
    data: Path | None = None,
    backbone: str = "efficientnet_lite0",
    weights: str = "DEFAULT",
    workdir: Path | None = None,
    per_class: int | None = None,
    progress: ProgressCallback | None = None,
) -> dict[str, Any]:
    """Run the loop and return its summary (what ``embedx demo`` prints as JSON).

    ``progress`` goes to the step that reports progress (extract); each step's outcome
    is logged.
    """
    demo = Demo(data=data, backbone=backbone, weights=weights, workdir=workdir, per_class=per_class)
    for step in demo.steps():
        for line in step.run(progress if step.unit else None):
            logger.info("%s: %s", step.name, line)
    return demo.summary()


if __name__ == "__main__":
    from embedx.cli.main import main

    main(["demo", *sys.argv[1:]])
