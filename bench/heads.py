"""Head fitting: embedx's vectorized regularization sweep vs scikit-learn over the same C grid.

Generated features (Gaussian class means + unit noise, float32): by default 50,000
train + 10,000 val rows, 2048 dims, 100 classes.  In one run:

* embedx: ``embedx.heads.linear.sweep`` on standardized features, all 8 grid values
  trained side by side in one torch pass, then 5 refinement values around the best (itself included) (what
  ``LogRegHead(C="auto")`` does before its final scikit-learn polish, which is
  timed separately as ``logreg_head``).
* scikit-learn: ``LogisticRegression(C, lbfgs)`` fitted sequentially for the same 8
  grid values (``C = 1 / (lam * n)``), nearest to embedx's chosen value first (so
  sklearn's best accuracy is measured even when the grid is cut).  It can take very
  long at full size, so it stops starting new fits after ``--sklearn-budget``
  seconds; the time of the fits it skipped is extrapolated from the mean of the
  fits it ran, and the output says which were run and which extrapolated.

    python bench/heads.py [--quick] [--out bench/results/heads.json]
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import markdown_table, write_result  # noqa: E402


def generated_features(n: int, dim: int, classes: int, *, separation: float, seed: int = 0):
    """Gaussian class means (scaled by ``separation``) plus unit noise, float32, generated fast."""
    rng = np.random.default_rng(seed)
    means = rng.standard_normal((classes, dim), dtype=np.float32) * np.float32(separation)
    labels = rng.integers(0, classes, size=n)
    features = rng.standard_normal((n, dim), dtype=np.float32)
    features += means[labels]
    return features, labels


def run_embedx(X, y, Xv, yv, classes: int) -> dict:
    from embedx.heads.base import standardize, standardizer
    from embedx.heads.linear import sweep
    from embedx.heads.sweep import DEFAULT_GRID

    start, cpu = time.perf_counter(), time.process_time()
    mean, scale = standardizer(X)
    Xs, Xvs = standardize(X, mean, scale), standardize(Xv, mean, scale)
    lam, layers, table, _ = sweep(Xs, y, classes, (Xvs, yv), None, grid=DEFAULT_GRID, name="l2", decoupled=False,
                                  early_stopping=False, seed=0)
    seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
    W, b = layers[0]
    accuracy = float(np.mean((Xvs @ W + b).argmax(1) == yv))
    return {"seconds": seconds, "cpu_seconds": cpu, "val_accuracy": accuracy, "l2": lam, "C": 1.0 / (lam * len(X)),
            "values_tried": len(table), "table": table}


def run_logreg_head(X, y, Xv, yv) -> dict:
    from embedx.heads import make_head

    start = time.perf_counter()
    head = make_head("logreg").fit(X, y, X_val=Xv, y_val=yv)
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "val_accuracy": float(np.mean(head.predict(Xv) == yv)),
            "C": head.chosen_params_["C"], "solver": head.chosen_params_["solver"],
            "lbfgs_iterations": head.chosen_params_.get("lbfgs_iterations")}


def run_sklearn(X, y, Xv, yv, budget: float, max_iter: int, center: float) -> dict:
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression

    from embedx.heads.base import standardize, standardizer
    from embedx.heads.sweep import DEFAULT_GRID

    mean, scale = standardizer(X)
    Xs, Xvs = standardize(X, mean, scale), standardize(Xv, mean, scale)
    rows, spent, cpu = [], 0.0, time.process_time()
    # Nearest to embedx's choice first: when the budget cuts the grid, sklearn's best accuracy is still measured.
    for lam in sorted(DEFAULT_GRID, key=lambda v: (abs(np.log10(v) - np.log10(center)), -v)):
        C = 1.0 / (lam * len(X))
        if spent > budget:
            rows.append({"l2": lam, "C": C, "status": "extrapolated"})
            continue
        start = time.perf_counter()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", ConvergenceWarning)
            model = LogisticRegression(C=C, solver="lbfgs", max_iter=max_iter).fit(Xs, y)
        seconds = time.perf_counter() - start
        spent += seconds
        converged = not any(issubclass(w.category, ConvergenceWarning) for w in caught)
        rows.append({"l2": lam, "C": C, "status": "run", "seconds": seconds, "converged": converged,
                     "n_iter": int(np.max(model.n_iter_)), "val_accuracy": float(model.score(Xvs, yv))})
    cpu = time.process_time() - cpu
    ran = [r for r in rows if r["status"] == "run"]
    mean_seconds = spent / len(ran)
    total = spent + mean_seconds * (len(rows) - len(ran))
    return {"seconds": total, "measured_seconds": spent, "measured_cpu_seconds": cpu, "fits_run": len(ran), "fits_extrapolated": len(rows) - len(ran),
            "val_accuracy": max(r["val_accuracy"] for r in ran), "max_iter": max_iter, "rows": rows}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="10,000 x 512, 20 classes, short sklearn budget")
    parser.add_argument("--out", default=None)
    parser.add_argument("--rows", type=int, default=None)
    parser.add_argument("--dim", type=int, default=None)
    parser.add_argument("--classes", type=int, default=None)
    parser.add_argument("--separation", type=float, default=None,
                        help="scale of the class means (noise std is 1); default 0.1")
    parser.add_argument("--sklearn-budget", type=float, default=None, help="seconds before sklearn stops starting fits")
    parser.add_argument("--sklearn-max-iter", type=int, default=100, help="scikit-learn's default")
    args = parser.parse_args()
    rows = args.rows or (10_000 if args.quick else 50_000)
    dim = args.dim or (512 if args.quick else 2048)
    classes = args.classes or (20 if args.quick else 100)
    separation = args.separation if args.separation is not None else 0.1
    budget = args.sklearn_budget if args.sklearn_budget is not None else (30.0 if args.quick else 300.0)

    start = time.perf_counter()
    X, y = generated_features(rows + rows // 5, dim, classes, separation=separation)
    X, y, Xv, yv = X[:rows], y[:rows], X[rows:], y[rows:]
    print(f"generated {rows}+{len(yv)} x {dim}, {classes} classes in {time.perf_counter() - start:.1f} s",
          file=sys.stderr, flush=True)

    embedx = run_embedx(X, y, Xv, yv, classes)
    print(f"embedx sweep: {embedx['seconds']:.1f} s ({embedx['cpu_seconds']:.1f} s CPU), val acc {embedx['val_accuracy']:.4f}", file=sys.stderr, flush=True)
    head = run_logreg_head(X, y, Xv, yv)
    print(f"logreg head (sweep + sklearn polish): {head['seconds']:.1f} s, val acc {head['val_accuracy']:.4f}",
          file=sys.stderr, flush=True)
    sk = run_sklearn(X, y, Xv, yv, budget, args.sklearn_max_iter, embedx["l2"])
    print(f"sklearn grid: {sk['seconds']:.1f} s ({sk['fits_run']} run in {sk['measured_seconds']:.1f} s, "
          f"{sk['measured_cpu_seconds']:.1f} s CPU; {sk['fits_extrapolated']} extrapolated), "
          f"val acc {sk['val_accuracy']:.4f}", file=sys.stderr, flush=True)

    speedup = sk["seconds"] / embedx["seconds"]
    table = [
        {"method": "embedx vectorized sweep (8 grid + 5 refine)", "seconds": embedx["seconds"],
         "val_accuracy": embedx["val_accuracy"], "C": embedx["C"]},
        {"method": "embedx logreg head (sweep + sklearn polish)", "seconds": head["seconds"],
         "val_accuracy": head["val_accuracy"], "C": head["C"]},
        {"method": f"sklearn LogisticRegression x 8 C ({sk['fits_run']} run"
                   f"{', rest extrapolated' if sk['fits_extrapolated'] else ''})",
         "seconds": sk["seconds"], "val_accuracy": sk["val_accuracy"], "C": ""},
    ]
    print(markdown_table(table, ["method", "seconds", "val_accuracy", "C"]))
    print(f"speedup of the sweep over the sklearn grid: {speedup:.1f}x", file=sys.stderr)
    extrapolated = " (partly extrapolated)" if sk["fits_extrapolated"] else ""
    payload = {
        "config": {"rows": rows, "val_rows": int(len(yv)), "dim": dim, "classes": classes,
                   "separation": separation, "quick": args.quick, "sklearn_budget": budget},
        "embedx_sweep": embedx,
        "logreg_head": head,
        "sklearn_grid": sk,
        "speedup": speedup,
        "summary": [
            {"what": f"C sweep, {rows}x{dim}, {classes} classes: seconds / val acc",
             "baseline": f"{sk['seconds']:.1f} s{extrapolated} / {sk['val_accuracy']:.3f}",
             "embedx": f"{embedx['seconds']:.1f} s / {embedx['val_accuracy']:.3f}", "ratio": speedup},
        ],
    }
    path = write_result("heads", payload, args.out)
    print(f"wrote {path}", file=sys.stderr)


if __name__ == "__main__":
    main()
