"""Regularization chosen by stratified K-fold cross-validation over train+val (``fit-head --cv K``),
and the warning that a val set is too small for the choice it drives.

A val set of a hundred or so images cannot tell regularization settings apart: a
0.948 on 153 images is 0.900-0.973 (95% Wilson).  With ``cv=K`` the train and val
rows are pooled and split into K stratified folds (seeded):

1. each fold's head runs its usual sweep with the fold as validation; the settings
   of the coarse grid (the same in every fold) are scored by their accuracy over all
   folds together, and the best is chosen like the sweep chooses (accuracy within one
   standard error, then the lowest mean validation loss);
2. the chosen setting is trained once more per fold, without a sweep, so that every
   train+val row gets an out-of-fold prediction: those are what is reported (the
   ``val`` metrics, over all train+val rows) and what the temperature is fitted on;
3. the head is that setting trained on all train+val rows.

The coarse grid is a factor 10 apart (``sweep.DEFAULT_GRID``, ``linear.ADAMW_GRID``,
``knn.K_GRID``); the refinement a single val split gets is not cross-validated.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from embedx.errors import HeadError
from embedx.heads.base import Head
from embedx.heads.members import pick_best

logger = logging.getLogger(__name__)

#: Below this many validation rows a 95% interval on accuracy is wider than about +-3.5 points.
SMALL_VAL_ROWS = 300
#: The swept setting per head type (its name in the sweep table).
SETTING = {"logreg": "l2", "linear": "weight_decay", "mlp": "weight_decay", "knn": "k"}


@dataclass(frozen=True)
class CVResult:
    """The head trained on all rows, its out-of-fold logits (row order of the input) and the summary."""

    head: Head
    oof_logits: np.ndarray
    summary: dict[str, Any]


def _grid_rows(model: Head) -> list[dict[str, Any]]:
    return [row for row in model.sweep_ if row.get("phase", "grid") == "grid"]


def _fixed(head: str, params: dict[str, Any], value: float, *, rows: int, steps: float, n_classes: int) -> dict:
    """Constructor parameters training ``head`` at setting ``value`` on ``rows`` rows without a sweep."""
    if head == "logreg":  # the sweep's mean-loss L2 coefficient as scikit-learn's C for this many rows
        return {**params, "C": (2.0 if n_classes == 2 else 1.0) / (value * rows)}
    if head in ("linear", "mlp"):
        return {**params, "weight_decay": value, "steps": max(int(round(steps)), 1)}
    return {**params, "k": int(value)}


def cross_validate(
    X: np.ndarray,
    y: np.ndarray,
    *,
    head: str,
    params: dict[str, Any],
    folds: int,
    seed: int,
    make_head: Callable[..., Head],
    groups: np.ndarray | None = None,
) -> CVResult:
    """Choose ``head``'s regularization by stratified ``folds``-fold CV on (X, y), then train on all rows.

    ``groups`` (the rows' content keys): rows of one group are always in the same fold, so a
    copy of an image is never scored by a head that trained on the other copy."""
    from sklearn.model_selection import StratifiedGroupKFold, StratifiedKFold

    if head not in SETTING:
        raise HeadError(f"cross-validation knows the heads {sorted(SETTING)}, not {head!r}")
    groups = np.arange(len(y)) if groups is None else np.asarray(groups)
    classes = np.unique(y)
    # distinct images (groups) per class: each fold needs one of every class
    counts = np.asarray([len(np.unique(groups[y == c])) for c in classes])
    if folds < 2 or counts.min() < folds:
        raise HeadError(f"--cv {folds} needs at least {max(folds, 2)} distinct train+val images of every class and "
                        f"folds >= 2; class {str(classes[counts.argmin()])!r} has {counts.min()}; use fewer folds")
    if len(np.unique(groups)) == len(y):  # no copies: plain stratified folds
        splits = list(StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed).split(np.zeros(len(y)), y))
    else:
        splitter = StratifiedGroupKFold(n_splits=folds, shuffle=True, random_state=seed)
        splits = list(splitter.split(np.zeros(len(y)), y, groups))
    name = SETTING[head]
    sweep_params = {**params, "k": "auto"} if head == "knn" else params  # knn sweeps k only when asked to
    scores: dict[float, dict[str, list[float]]] = {}
    for train, held in splits:
        model = make_head(head, **sweep_params).fit(X[train], y[train], X_val=X[held], y_val=y[held])
        for row in _grid_rows(model):
            score = scores.setdefault(float(row[name]), {"correct": [], "accuracy": [], "loss": [], "steps": []})
            score["correct"].append(round(row["val_accuracy"] * len(held)))
            score["accuracy"].append(row["val_accuracy"])
            score["loss"].append(row.get("val_loss_calibrated", row["val_loss"]))
            score["steps"].append(row.get("steps", 0))
    # only settings every fold scored (knn drops a k larger than a fold's training rows)
    values = [v for v, s in scores.items() if len(s["accuracy"]) == folds]
    if not values:
        raise HeadError(f"the {head} head with {params} has no regularization to choose; drop the fixed value")
    pooled = np.asarray([sum(scores[v]["correct"]) / len(y) for v in values])
    chosen = values[pick_best(pooled, np.asarray([np.mean(scores[v]["loss"]) for v in values]), len(y))]
    steps = float(np.mean(scores[chosen]["steps"]))

    oof = None
    fold_accuracy = []
    for train, held in splits:
        model = make_head(head, **_fixed(head, params, chosen, rows=len(train), steps=steps,
                                         n_classes=len(classes))).fit(X[train], y[train])
        logits = model.logits(X[held])
        oof = np.zeros((len(y), logits.shape[1]), np.float32) if oof is None else oof
        oof[held] = logits
        fold_accuracy.append(float(np.mean(model.classes_[logits.argmax(1)] == y[held])))
    final = make_head(head, **_fixed(head, params, chosen, rows=len(y), steps=steps * folds / (folds - 1),
                                     n_classes=len(classes))).fit(X, y)
    table = [{name: v, "cv_accuracy": float(a), "fold_accuracy": [float(x) for x in scores[v]["accuracy"]],
              "mean_val_loss": float(np.mean(scores[v]["loss"]))} for v, a in zip(values, pooled, strict=True)]
    summary = {
        "folds": folds,
        "seed": seed,
        "rows": int(len(y)),
        "setting": name,
        "chosen": chosen,
        "fold_accuracy": fold_accuracy,
        "fold_accuracy_mean": float(np.mean(fold_accuracy)),
        "fold_accuracy_sd": float(np.std(fold_accuracy, ddof=1)),
        "table": table,
    }
    logger.info("%d-fold CV chose %s=%g: fold accuracy %.4f +- %.4f", folds, name, chosen,
                summary["fold_accuracy_mean"], summary["fold_accuracy_sd"])
    return CVResult(head=final, oof_logits=oof, summary=summary)


def small_val_warnings(model: Head, n_val: int) -> list[str]:
    """Why a val set of ``n_val`` rows may be too small for the regularization it chose (empty: no reason).

    Two signs: fewer than ``SMALL_VAL_ROWS`` rows, and a runner-up setting of the coarse grid
    whose accuracy lies inside the best one's 95% interval and the best one's inside its own.
    """
    from embedx.metrics import wilson_interval

    warnings = []
    if 0 < n_val < SMALL_VAL_ROWS:
        warnings.append(f"the val set has {n_val} rows (fewer than {SMALL_VAL_ROWS}): its accuracy is only "
                        "known to a few points; choose the regularization with `--cv 5` (K-fold over train+val)")
    rows = _grid_rows(model)
    accuracy = sorted({round(row["val_accuracy"] * n_val) for row in rows}, reverse=True)
    if n_val > 0 and len(accuracy) > 1:
        best, runner_up = accuracy[0], accuracy[1]
        best_low, _ = wilson_interval(best, n_val)
        _, runner_high = wilson_interval(runner_up, n_val)
        if runner_up / n_val >= best_low and best / n_val <= runner_high:
            warnings.append(f"the best and runner-up regularization settings score {best / n_val:.3f} and "
                            f"{runner_up / n_val:.3f} on {n_val} val rows, inside each other's 95% intervals: "
                            "val cannot tell them apart; `--cv 5` decides on all train+val rows")
    return warnings
