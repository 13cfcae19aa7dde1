"""Head fitting: embedx's regularization sweep vs scikit-learn over the same C grid.

Generated features, by default 50,000 train + 10,000 val rows, 2048 dims, 100 classes,
float32, two kinds (``--kind``, both by default):

* ``gaussian`` (the issue's benchmark): Gaussian class means (scaled by ``--separation``)
  plus unit isotropic noise.  Here the nearest-class-mean classifier is already close to
  Bayes-optimal, which flatters embedx's class-mean warm start;
* ``correlated``: class means (scaled 0.04) under correlated, unevenly scaled noise (a random
  mixing matrix with column scales from 3 to 0.2), where the class means are a poor
  classifier and every method has to actually fit.

In one run, per kind:

Library imports (torch, scikit-learn) happen before the clocks start, for both.

* embedx: ``embedx.heads.sweep.sweep`` on standardized features (what
  ``LogRegHead(C="auto")`` runs): for a problem this size, ``large_l2_sweep``: class-mean
  warm start, the 8 grid values and 3 refinement values as per-member batched L-BFGS on a
  row sample, then the winner on all rows, each phase keeping its best validation
  iterate.  The whole ``logreg`` head (sweep + what follows) is timed separately.
* scikit-learn: ``LogisticRegression(C, lbfgs)`` fitted sequentially for the same 8
  grid values (``C = 1 / (lam * n)``), nearest to embedx's chosen value first (so
  sklearn's best accuracy is measured even when the grid is cut).  It can take very
  long at full size, so it stops starting new fits after ``--sklearn-budget``
  seconds; the time of the fits it skipped is extrapolated from the mean of the
  fits it ran, and the output says which were run and which extrapolated.

Then ``embedx fit-head`` as a fresh process on a small generated cache (default 800 rows x
1280 float16 dims, 2 classes, 3/4 train and 1/4 val: the size of a cats/dogs set), the
import time included: the default path (numpy solvers up to ``sweep.NUMPY_MAX_ROWS``
training rows, torch never imported) and the torch path (the same sweep with numpy's row
limit at 0), alternated, median wall seconds of ``--fit-head-repeats`` runs each, with the
chosen C and val accuracy of both (they must agree).

    python bench/heads.py [--quick] [--kind gaussian|correlated|both] [--out bench/results/heads.json]
    python bench/heads.py --only-fit-head [--fit-head-rows 800]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import markdown_table, write_result  # noqa: E402


def generated_features(n: int, dim: int, classes: int, *, separation: float, seed: int = 0,
                       kind: str = "gaussian"):
    """Gaussian class means (scaled by ``separation``) plus noise, float32, generated fast.

    ``gaussian``: unit isotropic noise.  ``correlated``: the noise mixed by a random matrix
    whose columns are scaled from 3 down to 0.2 (correlated features of uneven scale).
    """
    rng = np.random.default_rng(seed)
    means = rng.standard_normal((classes, dim), dtype=np.float32) * np.float32(separation)
    labels = rng.integers(0, classes, size=n)
    features = rng.standard_normal((n, dim), dtype=np.float32)
    if kind == "correlated":
        mix = rng.standard_normal((dim, dim), dtype=np.float32) * np.geomspace(3.0, 0.2, dim, dtype=np.float32)
        features = features @ (mix / np.float32(np.sqrt(dim)))
    elif kind != "gaussian":
        raise ValueError(f"unknown kind {kind!r}")
    features += means[labels]
    return features, labels


def run_embedx(X, y, Xv, yv, classes: int) -> dict:
    import torch  # noqa: F401 - imported before the clock starts, like scikit-learn below

    from embedx.heads.base import standardize, standardizer
    from embedx.heads.sweep import DEFAULT_GRID, sweep

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
    return {"seconds": total, "measured_seconds": spent, "measured_cpu_seconds": cpu, "fits_run": len(ran),
            "fits_extrapolated": len(rows) - len(ran),
            "val_accuracy": max(r["val_accuracy"] for r in ran), "max_iter": max_iter, "rows": rows}


def run_kind(kind: str, rows: int, dim: int, classes: int, separation: float, budget: float, max_iter: int) -> dict:
    """One generated dataset: embedx's sweep, the logreg head, and the scikit-learn grid."""
    start = time.perf_counter()
    X, y = generated_features(rows + rows // 5, dim, classes, separation=separation, kind=kind)
    X, y, Xv, yv = X[:rows], y[:rows], X[rows:], y[rows:]
    print(f"[{kind}] generated {rows}+{len(yv)} x {dim}, {classes} classes in {time.perf_counter() - start:.1f} s",
          file=sys.stderr, flush=True)

    embedx = run_embedx(X, y, Xv, yv, classes)
    print(f"[{kind}] embedx sweep: {embedx['seconds']:.1f} s ({embedx['cpu_seconds']:.1f} s CPU), "
          f"val acc {embedx['val_accuracy']:.4f}", file=sys.stderr, flush=True)
    head = run_logreg_head(X, y, Xv, yv)
    print(f"[{kind}] logreg head: {head['seconds']:.1f} s, val acc {head['val_accuracy']:.4f}",
          file=sys.stderr, flush=True)
    sk = run_sklearn(X, y, Xv, yv, budget, max_iter, embedx["l2"])
    print(f"[{kind}] sklearn grid: {sk['seconds']:.1f} s ({sk['fits_run']} run in {sk['measured_seconds']:.1f} s, "
          f"{sk['measured_cpu_seconds']:.1f} s CPU; {sk['fits_extrapolated']} extrapolated), "
          f"val acc {sk['val_accuracy']:.4f}", file=sys.stderr, flush=True)
    speedup = sk["seconds"] / embedx["seconds"]
    print(f"[{kind}] speedup of the sweep over the sklearn grid: {speedup:.1f}x", file=sys.stderr, flush=True)
    table = [
        {"data": kind, "method": "embedx sweep (8 grid + 3 refine on a row sample, final on all rows)",
         "seconds": embedx["seconds"], "val_accuracy": embedx["val_accuracy"], "C": embedx["C"]},
        {"data": kind, "method": "embedx logreg head (the whole fit)", "seconds": head["seconds"],
         "val_accuracy": head["val_accuracy"], "C": head["C"]},
        {"data": kind, "method": f"sklearn LogisticRegression x 8 C ({sk['fits_run']} run"
                                 f"{', rest extrapolated' if sk['fits_extrapolated'] else ''})",
         "seconds": sk["seconds"], "val_accuracy": sk["val_accuracy"], "C": ""},
    ]
    extrapolated = " (partly extrapolated)" if sk["fits_extrapolated"] else ""
    summary = {"what": f"C sweep, {rows}x{dim}, {classes} classes, {kind}: seconds / val acc",
               "baseline": f"{sk['seconds']:.1f} s{extrapolated} / {sk['val_accuracy']:.3f}",
               "embedx": f"{embedx['seconds']:.1f} s / {embedx['val_accuracy']:.3f}", "ratio": speedup}
    return {"embedx_sweep": embedx, "logreg_head": head, "sklearn_grid": sk, "speedup": speedup,
            "table": table, "summary": summary}


#: The torch path of ``fit-head``: the same command with numpy's row limit at 0.
TORCH_PATH = "from embedx.heads import sweep; sweep.NUMPY_MAX_ROWS = 0; from embedx.cli.main import main; main()"


def small_cache(path: Path, rows: int, dim: int, classes: int) -> Path:
    """A real float16 cache file (``embedx.cache.CacheWriter``) of generated features, 3/4 train, 1/4 val."""
    import hashlib

    from embedx.cache import CacheMeta, CacheWriter

    X, y = generated_features(rows, dim, classes, separation=0.1)
    meta = CacheMeta(backbone="generated", weights_tag="none", weights_arg="none", onnx_path="/nowhere/generated.onnx",
                     onnx_sha256="0" * 64, feature_layer="pool", feature_dim=dim, preprocess={"input_size": 224},
                     dtype="float16", precision="fp32")
    keys = [hashlib.sha256(f"row-{i}".encode()).hexdigest() for i in range(rows)]
    names = [f"class{c}" for c in range(classes)]
    paths = [f"{names[label]}/{i}.jpg" for i, label in enumerate(y)]
    splits = ["train" if i < rows * 3 // 4 else "val" for i in range(rows)]
    with CacheWriter(path, meta, overwrite=True) as writer:
        writer.append(keys, X.astype(np.float16), paths=paths)
        writer.finalize(keys=keys, paths=paths, labels=[int(v) for v in y], splits=splits, classes=names, errors=[])
    return path


def run_fit_head_process(rows: int, dim: int, classes: int, repeats: int) -> dict:
    """``embedx fit-head --json`` as fresh processes, default path and torch path alternated."""
    root = Path(__file__).resolve().parent.parent
    commands = {"numpy (default)": [sys.executable, "-m", "embedx"], "torch": [sys.executable, "-c", TORCH_PATH]}
    with tempfile.TemporaryDirectory() as tmp:
        cache = small_cache(Path(tmp) / "small.h5", rows, dim, classes)
        env = {**os.environ, "PYTHONPATH": str(root), "EMBEDX_CACHE_DIR": tmp}
        walls: dict[str, list[float]] = {name: [] for name in commands}
        summaries: dict[str, dict] = {}
        for run in range(repeats + 1):  # the first round warms the file cache and is not counted
            for name, command in commands.items():
                start = time.perf_counter()
                done = subprocess.run([*command, "fit-head", "--cache", str(cache), "-o", str(Path(tmp) / "head"),
                                       "--json"], env=env, cwd=tmp, capture_output=True, text=True, check=True)
                if run:
                    walls[name].append(time.perf_counter() - start)
                summaries[name] = json.loads(done.stdout)
    result = {"rows": rows, "dim": dim, "classes": classes, "repeats": repeats, "paths": {}}
    for name in commands:
        summary = summaries[name]
        result["paths"][name] = {"wall_seconds": statistics.median(walls[name]), "wall_runs": walls[name],
                                 "fit_seconds": summary["fit_seconds"], "C": summary["params"]["C"],
                                 "val_accuracy": summary["val_accuracy"]}
        print(f"[fit-head] {name}: {result['paths'][name]['wall_seconds']:.2f} s wall (median of {repeats}), "
              f"C={summary['params']['C']:.4g}, val acc {summary['val_accuracy']:.4f}", file=sys.stderr, flush=True)
    numpy_path, torch_path = result["paths"].values()
    result["ratio"] = torch_path["wall_seconds"] / numpy_path["wall_seconds"]
    result["same_choice"] = (numpy_path["C"] == torch_path["C"]
                             and numpy_path["val_accuracy"] == torch_path["val_accuracy"])
    result["table"] = [{"data": f"cache {rows}x{dim} float16, {classes} classes",
                        "method": f"embedx fit-head, {name} path",
                        "seconds": values["wall_seconds"], "val_accuracy": values["val_accuracy"], "C": values["C"]}
                       for name, values in result["paths"].items()]
    result["summary"] = {"what": f"fit-head as a fresh process, {rows}x{dim} cache: wall seconds",
                         "baseline": f"{torch_path['wall_seconds']:.2f} s (torch path)",
                         "embedx": f"{numpy_path['wall_seconds']:.2f} s (numpy path)", "ratio": result["ratio"]}
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="10,000 x 512, 20 classes, short sklearn budget")
    parser.add_argument("--out", default=None)
    parser.add_argument("--kind", choices=("gaussian", "correlated", "both"), default="both")
    parser.add_argument("--rows", type=int, default=None)
    parser.add_argument("--dim", type=int, default=None)
    parser.add_argument("--classes", type=int, default=None)
    parser.add_argument("--separation", type=float, default=None,
                        help="scale of the class means; default 0.1 (gaussian), 0.04 (correlated)")
    parser.add_argument("--sklearn-budget", type=float, default=None,
                        help="seconds (per kind) before sklearn stops starting fits")
    parser.add_argument("--sklearn-max-iter", type=int, default=100, help="scikit-learn's default")
    parser.add_argument("--fit-head-rows", type=int, default=800, help="rows of the fresh-process fit-head cache")
    parser.add_argument("--fit-head-dim", type=int, default=1280)
    parser.add_argument("--fit-head-classes", type=int, default=2)
    parser.add_argument("--fit-head-repeats", type=int, default=3)
    parser.add_argument("--only-fit-head", action="store_true", help="skip the sweep comparison")
    args = parser.parse_args()
    fit_head = run_fit_head_process(args.fit_head_rows, args.fit_head_dim, args.fit_head_classes,
                                    args.fit_head_repeats)
    if args.only_fit_head:
        print(markdown_table(fit_head["table"], ["data", "method", "seconds", "val_accuracy", "C"]))
        path = write_result("heads_fit_process", {"fit_head_process": fit_head, "summary": [fit_head["summary"]]},
                            args.out)
        print(f"wrote {path}", file=sys.stderr)
        return
    rows = args.rows or (10_000 if args.quick else 50_000)
    dim = args.dim or (512 if args.quick else 2048)
    classes = args.classes or (20 if args.quick else 100)
    separations = {"gaussian": 0.1, "correlated": 0.04} if args.separation is None else {}
    budget = args.sklearn_budget if args.sklearn_budget is not None else (30.0 if args.quick else 300.0)
    kinds = ("gaussian", "correlated") if args.kind == "both" else (args.kind,)

    results = {kind: run_kind(kind, rows, dim, classes, separations.get(kind, args.separation), budget,
                              args.sklearn_max_iter) for kind in kinds}
    print(markdown_table([row for r in results.values() for row in r["table"]] + fit_head["table"],
                         ["data", "method", "seconds", "val_accuracy", "C"]))
    first = results[kinds[0]]
    payload = {
        "config": {"rows": rows, "val_rows": rows // 5, "dim": dim, "classes": classes, "kinds": list(kinds),
                   "separation": {kind: separations.get(kind, args.separation) for kind in kinds}, "quick": args.quick,
                   "sklearn_budget": budget},
        # the first kind at the top level (the benchmark), every kind under "kinds"
        "embedx_sweep": first["embedx_sweep"],
        "logreg_head": first["logreg_head"],
        "sklearn_grid": first["sklearn_grid"],
        "speedup": first["speedup"],
        "kinds": {kind: {k: v for k, v in r.items() if k != "summary"} for kind, r in results.items()},
        "fit_head_process": fit_head,
        "summary": [r["summary"] for r in results.values()] + [fit_head["summary"]],
    }
    path = write_result("heads", payload, args.out)
    print(f"wrote {path}", file=sys.stderr)


if __name__ == "__main__":
    main()
