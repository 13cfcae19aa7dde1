"""Scaling curves: extraction img/s vs batch size, head fit time vs number of rows.

    python bench/scaling.py [--quick] [--out bench/results/scaling.json]

Extraction is ONNX Runtime model-only (a pre-built batch in memory) for resnet18 with
``--weights none``: what the backbone can do at each batch size on this machine.
Head fit time is the full automatic regularization sweep of the default head on
generated features (2048-d, 100 classes) at growing N.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import markdown_table, timed, write_result  # noqa: E402


def extraction_vs_batch(batch_sizes: list[int], backbone: str = "resnet18") -> list[dict]:
    from embedx.export import resolve_backbone
    from embedx.runtime import OrtModel

    export = resolve_backbone(backbone, weights="none")
    model = OrtModel(export.path, device="cpu")
    rng = np.random.default_rng(0)
    rows = []
    for batch_size in batch_sizes:
        batch = rng.standard_normal((batch_size, 3, 224, 224), dtype=np.float32)
        repeats = max(2, 64 // batch_size)
        median, _, _ = timed(lambda batch=batch: model.run(batch), repeats=repeats, warmup=1)
        rows.append({"backbone": backbone, "batch_size": batch_size, "images_per_second": batch_size / median})
    return rows


def generated_features(n: int, dim: int, classes: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    means = rng.standard_normal((classes, dim), dtype=np.float32) * 0.25
    labels = rng.integers(0, classes, size=n)
    features = means[labels] + rng.standard_normal((n, dim), dtype=np.float32)
    return features, labels


def head_fit_vs_rows(sizes: list[int], dim: int = 2048, classes: int = 100) -> list[dict]:
    from embedx.heads import make_head

    rows = []
    for n in sizes:
        features, labels = generated_features(int(n * 1.25), dim, classes)
        train, val = slice(0, n), slice(n, None)
        start = time.perf_counter()
        head = make_head("logreg", seed=0).fit(features[train], labels[train], X_val=features[val], y_val=labels[val])
        seconds = time.perf_counter() - start
        accuracy = float((head.predict(features[val]) == labels[val]).mean())
        rows.append({"rows": n, "dim": dim, "classes": classes, "fit_seconds": seconds, "val_accuracy": accuracy})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    batch_sizes = [1, 4, 16] if args.quick else [1, 2, 4, 8, 16, 32, 64]
    sizes = [1000, 5000] if args.quick else [1000, 5000, 10000, 25000, 50000]
    extraction = extraction_vs_batch(batch_sizes)
    print(markdown_table(extraction, ["backbone", "batch_size", "images_per_second"]))
    heads = head_fit_vs_rows(sizes)
    print(markdown_table(heads, ["rows", "dim", "classes", "fit_seconds", "val_accuracy"]))
    path = write_result("scaling", {"extraction_vs_batch": extraction, "head_fit_vs_rows": heads}, args.out)
    print(f"wrote {path}", file=sys.stderr)


if __name__ == "__main__":
    main()
