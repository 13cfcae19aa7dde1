"""``bundle --with-preprocess full`` against the existing path, and ``fit-head --cv 5`` against val.

On hymenoptera_data with efficientnet_lite0's real weights (a cache is extracted first,
unless ``--cache`` names one), in one process:

* parity: per val image, the max abs difference between the probabilities of the full
  bundle (the decoded image in, resize and crop in the graph) and of the plain bundle fed
  by ``preprocess.load`` (the path extract, predict and serve take), for the head as
  fitted (``mode="fast"``, the cache's) and the same head declared ``mode="exact"``;
  the distribution (max, p99, p90, median, share <= 1e-3) and top-1 agreement;
* speed: seconds per image of ``prepare`` + ``predict_proba`` one image at a time, both
  bundles alternated over ``--rounds`` rounds, median, and their ratio;
* cross-validation: ``fit_head`` with and without ``cv=5`` for each head type: seconds,
  the val (or out-of-fold) accuracy with its 95% Wilson interval, the folds' mean +- sd.

    python bench/full_bundle.py [--cache feats.h5] [--rounds 2] [--heads logreg,linear,knn]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import HYMENOPTERA, write_result  # noqa: E402


def distribution(gaps: list[float]) -> dict[str, float]:
    gaps_array = np.asarray(gaps)
    return {"max": float(gaps_array.max()), "p99": float(np.quantile(gaps_array, 0.99)),
            "p90": float(np.quantile(gaps_array, 0.9)), "median": float(np.median(gaps_array)),
            "share_within_1e-3": float(np.mean(gaps_array <= 1e-3)), "images": len(gaps)}


def parity_and_speed(head_dir: Path, work: Path, paths: list[Path], rounds: int) -> dict:
    from embedx.bundle import bundle
    from embedx.predict import load_model

    plain = load_model(bundle(head_dir, work / "plain.onnx", force=True), device="cpu")
    full = load_model(bundle(head_dir, work / "full.onnx", with_preprocess="full", force=True), device="cpu")
    gaps, agree = [], 0
    for path in paths:
        expected = plain.predict_proba(plain.prepare(path)[None])[0]
        got = full.predict_proba(full.prepare(path)[None])[0]
        gaps.append(float(np.abs(got - expected).max()))
        agree += int(got.argmax() == expected.argmax())
    seconds: dict[str, list[float]] = {"plain": [], "full": []}
    for _ in range(rounds):
        for name, model in (("plain", plain), ("full", full)):
            start = time.perf_counter()
            for path in paths:
                model.predict_proba(model.prepare(path)[None])
            seconds[name].append((time.perf_counter() - start) / len(paths))
    per_image = {name: statistics.median(values) for name, values in seconds.items()}
    return {"mode": plain.spec.mode, "gap": distribution(gaps), "top1_agree": agree,
            "seconds_per_image": per_image, "full_over_plain": per_image["full"] / per_image["plain"]}


def exact_copy(head_dir: Path, target: Path) -> Path:
    """The same head with its recorded preprocessing mode set to exact (weights copied)."""
    record = json.loads((head_dir / "head.json").read_text())
    record["cache"]["preprocess"]["mode"] = "exact"
    target.mkdir(parents=True, exist_ok=True)
    (target / record["weights_file"]).write_bytes((head_dir / record["weights_file"]).read_bytes())
    (target / "head.json").write_text(json.dumps(record))
    return target


def cross_validation(cache: Path, work: Path, heads: list[str]) -> list[dict]:
    from embedx.heads import fit_head

    fit_head(cache, head=heads[0], output=work / "warmup", plots=False)  # imports off the clock
    rows = []
    for head in heads:
        for cv in (None, 5):
            start = time.perf_counter()
            result = fit_head(cache, head=head, cv=cv, output=work / f"{head}-{cv}", plots=False)
            val = result.metrics["val"]
            row = {"head": head, "cv": cv, "seconds": time.perf_counter() - start, "accuracy": val["accuracy"],
                   "accuracy_ci": val["accuracy_ci"], "n": val["n"], "warnings": result.metrics.get("warnings", [])}
            if cv:
                folds = result.metrics["cv"]
                row.update({key: folds[key] for key in ("chosen", "setting", "fold_accuracy_mean",
                                                        "fold_accuracy_sd", "val_rows_accuracy")})
            rows.append(row)
            print(json.dumps(row), flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cache", type=Path, help="a hymenoptera cache made with efficientnet_lite0")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--heads", default="logreg,linear,knn")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    from embedx.heads import fit_head

    with tempfile.TemporaryDirectory() as folder:
        work = Path(folder)
        cache = args.cache
        if cache is None:
            from embedx.extract import extract

            cache = work / "hymenoptera-lite0.h5"
            extract(HYMENOPTERA, backbone="efficientnet_lite0", output=cache, device="cpu")
        paths = sorted((HYMENOPTERA / "val").glob("*/*"))
        head_dir = fit_head(cache, output=work / "head", plots=False).output_dir
        parity = [parity_and_speed(head_dir, work, paths, args.rounds),
                  parity_and_speed(exact_copy(head_dir, work / "exact"), work, paths, args.rounds)]
        for row in parity:
            print(json.dumps(row), flush=True)
        cv_rows = cross_validation(cache, work, args.heads.split(","))
    path = write_result("full_bundle", {"parity": parity, "cross_validation": cv_rows}, args.out)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
