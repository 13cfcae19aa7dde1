"""Classification metrics, calibration and the two plots a head directory carries.

numpy + scikit-learn only (no torch).  Labels are always indices into the
columns of the probability matrix (``0 .. n_classes - 1``); names only appear in
the per-class table and the plots.

Calibration follows Guo et al. 2017: ECE over 15 equal-width confidence bins,
and temperature scaling (one scalar ``T`` fitted on validation logits by
minimizing the negative log-likelihood of ``softmax(logits / T)``).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from embedx.errors import HeadError

logger = logging.getLogger(__name__)

ECE_BINS = 15
#: Bounds of the temperature search (log-spaced); outside them a head is broken, not miscalibrated.
TEMPERATURE_BOUNDS = (0.01, 100.0)
_EPS = 1e-15


def softmax(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    """Row-wise softmax of ``logits / temperature`` in float64-safe form, returned as float32."""
    z = np.asarray(logits, dtype=np.float64) / float(temperature)
    z = z - z.max(axis=1, keepdims=True)
    np.exp(z, out=z)
    z /= z.sum(axis=1, keepdims=True)
    return z.astype(np.float32)


def log_loss(y_true: np.ndarray, proba: np.ndarray) -> float:
    """Mean negative log-likelihood of the true class (probabilities clipped at 1e-15)."""
    y_true = np.asarray(y_true, dtype=np.int64)
    picked = np.asarray(proba, dtype=np.float64)[np.arange(len(y_true)), y_true]
    return float(-np.mean(np.log(np.clip(picked, _EPS, 1.0))))


def _nll_of_logits(logits: np.ndarray, y_true: np.ndarray, temperature: float) -> float:
    z = logits / temperature
    z = z - z.max(axis=1, keepdims=True)
    log_norm = np.log(np.exp(z).sum(axis=1))
    return float(np.mean(log_norm - z[np.arange(len(y_true)), y_true]))


def fit_temperature(logits: np.ndarray, y_true: np.ndarray) -> float:
    """The ``T`` minimizing the NLL of ``softmax(logits / T)`` (a bounded 1-D search on log T).

    ``T > 1`` softens an overconfident model, ``T < 1`` sharpens an underconfident one.
    Accuracy never changes: dividing by a positive scalar keeps the argmax.
    """
    from scipy.optimize import minimize_scalar

    logits = np.asarray(logits, dtype=np.float64)
    y_true = np.asarray(y_true, dtype=np.int64)
    if len(y_true) == 0:
        raise HeadError("cannot fit a temperature on zero validation samples")
    low, high = np.log(TEMPERATURE_BOUNDS[0]), np.log(TEMPERATURE_BOUNDS[1])
    result = minimize_scalar(
        lambda log_t: _nll_of_logits(logits, y_true, float(np.exp(log_t))),
        bounds=(low, high),
        method="bounded",
        options={"xatol": 1e-4},
    )
    temperature = float(np.exp(result.x))
    # Never return something worse than leaving the logits alone.
    if _nll_of_logits(logits, y_true, temperature) > _nll_of_logits(logits, y_true, 1.0):
        return 1.0
    return temperature


def reliability_bins(y_true: np.ndarray, proba: np.ndarray, n_bins: int = ECE_BINS) -> dict[str, np.ndarray]:
    """Per confidence bin ``(lower, upper]``: count, mean confidence, accuracy."""
    proba = np.asarray(proba, dtype=np.float64)
    y_true = np.asarray(y_true, dtype=np.int64)
    confidence = proba.max(axis=1)
    correct = (proba.argmax(axis=1) == y_true).astype(np.float64)
    index = np.clip(np.ceil(confidence * n_bins).astype(np.int64) - 1, 0, n_bins - 1)
    counts = np.bincount(index, minlength=n_bins).astype(np.float64)
    conf_sum = np.bincount(index, weights=confidence, minlength=n_bins)
    acc_sum = np.bincount(index, weights=correct, minlength=n_bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_conf = np.where(counts > 0, conf_sum / counts, np.nan)
        accuracy = np.where(counts > 0, acc_sum / counts, np.nan)
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    return {"edges": edges, "counts": counts, "confidence": mean_conf, "accuracy": accuracy}


def expected_calibration_error(y_true: np.ndarray, proba: np.ndarray, n_bins: int = ECE_BINS) -> float:
    """ECE: the count-weighted mean of |accuracy - confidence| over ``n_bins`` equal-width bins."""
    bins = reliability_bins(y_true, proba, n_bins)
    total = bins["counts"].sum()
    if total == 0:
        return float("nan")
    filled = bins["counts"] > 0
    gaps = np.abs(bins["accuracy"][filled] - bins["confidence"][filled])
    return float(np.sum(bins["counts"][filled] * gaps) / total)


def wilson_interval(correct: int, total: int, z: float = 1.96) -> tuple[float, float]:
    """The Wilson score interval for a proportion ``correct / total`` (95% with the default ``z``).

    Unlike the normal approximation it stays inside [0, 1] and does not collapse
    to a point at 0 or ``total`` correct, which matters for the small val sets
    heads are chosen on (153 images: 0.948 is 0.900-0.973).
    """
    correct, total = int(correct), int(total)
    if total <= 0 or not 0 <= correct <= total:
        raise HeadError(f"a Wilson interval needs 0 <= correct <= total and total > 0, got {correct}/{total}")
    p = correct / total
    z2 = z * z
    denominator = 1.0 + z2 / total
    centre = (p + z2 / (2 * total)) / denominator
    half = z * np.sqrt(p * (1.0 - p) / total + z2 / (4 * total * total)) / denominator
    return max(0.0, float(centre - half)), min(1.0, float(centre + half))


def accuracy_interval(accuracy: float, n: int, z: float = 1.96) -> tuple[float, float]:
    """:func:`wilson_interval` for an accuracy already computed on ``n`` samples."""
    return wilson_interval(round(accuracy * n), n, z)


def format_accuracy(accuracy: float, n: int) -> str:
    """``0.9477 [0.900-0.973] (n=153)``: an accuracy with its 95% Wilson interval, as embedx prints it."""
    low, high = accuracy_interval(accuracy, n)
    return f"{accuracy:.4f} [{low:.3f}-{high:.3f}] (n={n})"


#: Resamples of :func:`bootstrap_intervals` (a fixed seed: the same data give the same interval).
BOOTSTRAP_RESAMPLES = 1000


def bootstrap_intervals(y_true: np.ndarray, predicted: np.ndarray, n_classes: int, *,
                        resamples: int = BOOTSTRAP_RESAMPLES, seed: int = 0) -> dict[str, list[float]]:
    """95% percentile-bootstrap intervals of balanced accuracy and macro-F1 (the rows resampled
    with replacement), as ``{"balanced_accuracy_ci": [low, high], "macro_f1_ci": [low, high]}``.

    Resampling rows is drawing the confusion matrix's cells from a multinomial with the
    observed cell frequencies, so the cost depends on the non-empty cells, not on the rows.
    Definitions follow scikit-learn's: balanced accuracy averages the recall of the classes
    present in the resample; macro-F1 averages F1 over all ``n_classes`` (0 where undefined).
    """
    from scipy import sparse

    y_true = np.asarray(y_true, dtype=np.int64)
    predicted = np.asarray(predicted, dtype=np.int64)
    cells, counts = np.unique(y_true * n_classes + predicted, return_counts=True)
    truth, guess = cells // n_classes, cells % n_classes
    draws = np.random.default_rng(seed).multinomial(len(y_true), counts / counts.sum(), size=resamples)
    columns = np.arange(len(cells))

    def per_class(classes: np.ndarray, weights: np.ndarray) -> np.ndarray:  # (resamples, n_classes) sums
        spread = sparse.csr_matrix((weights, (classes, columns)), shape=(n_classes, len(cells)), dtype=np.int64)
        return np.asarray(spread @ draws.T).T

    ones = np.ones(len(cells), dtype=np.int64)
    support, said, correct = per_class(truth, ones), per_class(guess, ones), per_class(truth, (truth == guess) * 1)
    with np.errstate(invalid="ignore", divide="ignore"):
        recall = np.where(support > 0, correct / support, np.nan)
        balanced = np.nanmean(recall, axis=1)
        denominator = support + said  # 2 tp + fp + fn
        f1 = np.where(denominator > 0, 2 * correct / denominator, 0.0)
    macro_f1 = f1.mean(axis=1)
    return {name: [float(np.percentile(values, 2.5)), float(np.percentile(values, 97.5))]
            for name, values in (("balanced_accuracy_ci", balanced), ("macro_f1_ci", macro_f1))}


def top_k_accuracy(y_true: np.ndarray, proba: np.ndarray, k: int) -> float:
    proba = np.asarray(proba)
    k = min(k, proba.shape[1])
    top = np.argpartition(-proba, k - 1, axis=1)[:, :k]
    return float(np.mean(np.any(top == np.asarray(y_true)[:, None], axis=1)))


def classification_metrics(
    y_true: np.ndarray,
    logits: np.ndarray,
    *,
    class_names: Sequence[Any],
    temperature: float | None = None,
) -> dict[str, Any]:
    """Every number a head reports, from integer labels and raw logits.

    ``temperature`` given: ``ece_calibrated``/``log_loss_calibrated`` use it
    (fitted elsewhere, on validation data); otherwise they equal the raw values.
    """
    from sklearn.metrics import (
        balanced_accuracy_score,
        confusion_matrix,
        f1_score,
        precision_recall_fscore_support,
    )

    y_true = np.asarray(y_true, dtype=np.int64)
    logits = np.asarray(logits, dtype=np.float32)
    n_classes = logits.shape[1]
    if len(class_names) != n_classes:
        raise HeadError(f"expected {n_classes} class names for {n_classes} logit columns, got {len(class_names)}")
    if len(y_true) == 0:
        raise HeadError("cannot compute metrics on zero samples")
    labels = np.arange(n_classes)
    proba = softmax(logits)
    predicted = proba.argmax(axis=1)
    precision, recall, f1, support = precision_recall_fscore_support(
        y_true, predicted, labels=labels, zero_division=0
    )
    temperature = 1.0 if temperature is None else float(temperature)
    calibrated = softmax(logits, temperature)
    metrics: dict[str, Any] = {
        "n": int(len(y_true)),
        "accuracy": float(np.mean(predicted == y_true)),
        "accuracy_ci": list(wilson_interval(int(np.sum(predicted == y_true)), len(y_true))),
        "balanced_accuracy": float(balanced_accuracy_score(y_true, predicted)),
        "macro_f1": float(f1_score(y_true, predicted, labels=labels, average="macro", zero_division=0)),
        **bootstrap_intervals(y_true, predicted, n_classes),
        "log_loss": log_loss(y_true, proba),
        "ece": expected_calibration_error(y_true, proba),
        "temperature": temperature,
        "log_loss_calibrated": log_loss(y_true, calibrated),
        "ece_calibrated": expected_calibration_error(y_true, calibrated),
    }
    if n_classes > 5:
        metrics["top5_accuracy"] = top_k_accuracy(y_true, proba, 5)
        metrics["top5_accuracy_ci"] = list(accuracy_interval(metrics["top5_accuracy"], len(y_true)))
    metrics["per_class"] = {
        str(name): {
            "precision": float(precision[i]),
            "recall": float(recall[i]),
            "f1": float(f1[i]),
            "support": int(support[i]),
        }
        for i, name in enumerate(class_names)
    }
    metrics["confusion_matrix"] = confusion_matrix(y_true, predicted, labels=labels).tolist()
    return metrics


def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt


def plot_confusion_matrix(matrix: np.ndarray, class_names: Sequence[Any], path: str | Path, *, title: str = "") -> Path:
    """Row-normalized confusion matrix as a PNG (counts written in the cells when few classes)."""
    plt = _pyplot()
    matrix = np.asarray(matrix, dtype=np.float64)
    n = len(class_names)
    with np.errstate(invalid="ignore", divide="ignore"):
        normalized = np.nan_to_num(matrix / matrix.sum(axis=1, keepdims=True))
    size = min(4 + 0.35 * n, 24)
    fig, ax = plt.subplots(figsize=(size, size * 0.85))
    try:
        image = ax.imshow(normalized, cmap="Blues", vmin=0.0, vmax=1.0)
        fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label="fraction of the true class")
        if n <= 40:
            ax.set_xticks(range(n), [str(c) for c in class_names], rotation=90 if n > 6 else 0)
            ax.set_yticks(range(n), [str(c) for c in class_names])
        if n <= 20:
            for i in range(n):
                for j in range(n):
                    ax.text(j, i, str(int(matrix[i, j])), ha="center", va="center",
                            color="white" if normalized[i, j] > 0.5 else "black", fontsize=8)
        ax.set_xlabel("predicted")
        ax.set_ylabel("true")
        ax.set_title(title or "confusion matrix")
        return _save(fig, path)
    finally:
        plt.close(fig)


def _save(fig, path: str | Path) -> Path:
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=100)
    return path


def plot_reliability(
    y_true: np.ndarray, logits: np.ndarray, path: str | Path, *, temperature: float = 1.0, title: str = ""
) -> Path:
    """Reliability diagram: accuracy vs confidence per bin, before and after temperature scaling."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5.5, 5))
    try:
        ax.plot([0, 1], [0, 1], linestyle="--", color="gray", linewidth=1, label="perfect calibration")
        for label, temp, marker in (("raw", 1.0, "o"), (f"T = {temperature:.3g}", temperature, "s")):
            proba = softmax(logits, temp)
            bins = reliability_bins(y_true, proba)
            filled = bins["counts"] > 0
            ece = expected_calibration_error(y_true, proba)
            ax.plot(bins["confidence"][filled], bins["accuracy"][filled], marker=marker,
                    label=f"{label} (ECE {ece:.3f})")
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1)
        ax.set_xlabel("confidence (max probability)")
        ax.set_ylabel("accuracy")
        ax.set_title(title or f"reliability ({ECE_BINS} bins)")
        ax.legend(loc="upper left")
        return _save(fig, path)
    finally:
        plt.close(fig)
