"""A sweep's members (models trained side by side, one per regularization value) and how
one of them is chosen: accuracy first, then the NLL after temperature scaling.

numpy, or torch through ``embedx.heads.arrays`` where the caller passes its namespace
(``calibrated_nlls`` and ``fit_scales`` score many candidates at once).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from types import SimpleNamespace

import numpy as np

from embedx.heads.arrays import NUMPY

#: Validation rows used to fit a candidate's temperature (``calibrated_nll``).
CALIBRATION_ROWS = 4096
#: ...and when comparing many candidates at once (``best_model``): the softmaxes are the cost.
SELECTION_ROWS = 2048
#: Losses this close (relative) are a tie, won by the first candidate: models equal up to a scale
#: that the temperature absorbs score the same, and float rounding (numpy vs torch) must not choose.
NLL_TIE = 1e-6


@dataclass
class MemberFit:
    """Result of training G members side by side (arrays indexed by member)."""

    weight_decays: np.ndarray
    layers: list[tuple[np.ndarray, np.ndarray]]  # per layer: W (G, in, out), b (G, out)
    val_loss: np.ndarray
    val_accuracy: np.ndarray
    best_step: np.ndarray
    steps: int
    batch_size: int
    train_loss: np.ndarray = field(default_factory=lambda: np.zeros(0))

    def member(self, index: int) -> list[tuple[np.ndarray, np.ndarray]]:
        return [(W[index], b[index]) for W, b in self.layers]


def member_logits(layers: list[tuple[np.ndarray, np.ndarray]], X: np.ndarray) -> np.ndarray:
    """One member's logits in numpy (linear, or ReLU MLP with one hidden layer)."""
    out = X @ layers[0][0] + layers[0][1]
    for W, b in layers[1:]:
        out = np.maximum(out, 0.0) @ W + b
    return out


def calibrated_nll(logits: np.ndarray, y: np.ndarray, max_rows: int = CALIBRATION_ROWS) -> float:
    """Validation NLL after the temperature scaling the head will get anyway.

    Raw NLL would favour weak regularization (strongly regularized softmax models are
    underconfident, which temperature scaling fixes for free).
    """
    from embedx.metrics import fit_temperature, log_loss, softmax

    rows = calibration_rows(len(y), max_rows)  # the temperature is one number: a few thousand rows pin it down
    logits, y = logits[rows], y[rows]
    return log_loss(y, softmax(logits, fit_temperature(logits, y)))


def best_member(fit: MemberFit, X_val: np.ndarray, y_val: np.ndarray, *, xp: SimpleNamespace = NUMPY) -> int:
    """Among members whose val accuracy is within one standard error of the best (accuracy on
    a small val set is too noisy to pick by alone), the lowest temperature-calibrated val NLL."""
    return best_model([fit.member(i) for i in range(len(fit.weight_decays))], fit.val_accuracy, X_val, y_val, xp=xp)


def best_model(models: list[list[tuple[np.ndarray, np.ndarray]]], accuracy: np.ndarray, X_val: np.ndarray,
               y_val: np.ndarray, *, xp: SimpleNamespace = NUMPY) -> int:
    """``pick_best`` over candidate models: accuracy first, then calibrated NLL on the calibration rows."""
    close = within_one_se(accuracy, len(y_val))
    if len(close) == 1:
        return int(close[0])
    rows = calibration_rows(len(y_val), SELECTION_ROWS)
    nll = np.full(len(models), np.inf)
    nll[close] = calibrated_nlls(np.stack([member_logits(models[i], X_val[rows]) for i in close]),
                                 np.asarray(y_val)[rows], xp=xp)
    return pick_best(accuracy, nll, len(y_val))


def calibration_rows(n: int, max_rows: int = CALIBRATION_ROWS) -> np.ndarray | slice:
    """The validation rows that ``calibrated_nll`` fits and scores a temperature on (seeded)."""
    if n <= max_rows:
        return slice(None)
    return np.sort(np.random.default_rng(0).choice(n, max_rows, replace=False))


def within_one_se(accuracy: np.ndarray, n_val: int) -> np.ndarray:
    """Indices whose accuracy is within one standard error (binomial, at the best) of the best."""
    accuracy = np.asarray(accuracy, dtype=np.float64)
    top = float(accuracy.max())
    return np.flatnonzero(accuracy >= top - math.sqrt(max(top * (1 - top), 0.0) / max(n_val, 1)) - 1e-12)


def pick_best(accuracy: np.ndarray, loss, n_val: int) -> int:
    """Index with the lowest ``loss`` (an array, or a function of the index computed only for
    the candidates) among those within one standard error of the best accuracy; losses within
    ``NLL_TIE`` of the lowest tie, and the first of them wins."""
    candidates = within_one_se(accuracy, n_val)
    if len(candidates) == 1:
        return int(candidates[0])
    values = np.nan_to_num([float(loss(i)) if callable(loss) else float(np.asarray(loss)[i]) for i in candidates],
                           nan=np.inf)
    lowest = values.min()
    return int(candidates[np.flatnonzero(values <= lowest + NLL_TIE * abs(lowest))[0]])


def sweep_table(fit: MemberFit, name: str, phase: str) -> list[dict]:
    return [
        {name: float(v), "phase": phase, "val_loss": float(loss), "val_accuracy": float(acc), "steps": int(s)}
        for v, loss, acc, s in zip(fit.weight_decays, fit.val_loss, fit.val_accuracy, fit.best_step, strict=True)
    ]


def fit_scales(logits: np.ndarray, y: np.ndarray, weight_decays: np.ndarray, weight_norm2: float,
               iterations: int = 10, *, xp: SimpleNamespace = NUMPY) -> np.ndarray:
    """Per member, the factor ``a`` minimizing ``mean CE(a * logits) + lam/2 * a^2 * weight_norm2``.

    ``logits``: (n, C) shared by the members, or (G, n, C), one set per member.  Convex in
    ``a``: a few vectorized Newton steps from 1.  With ``weight_decays`` zero this is a
    temperature fit (``a = 1 / T``); otherwise the member's L2 penalty on the weights it
    scales is part of the objective.
    """
    lam = np.asarray(weight_decays, dtype=np.float64)
    n, n_classes = np.shape(logits)[-2:]
    z = xp.asarray(np.reshape(logits, (-1, n, n_classes)))  # (1 or G, n, C)
    z = z - xp.amax(z, axis=2, keepdims=True)
    labels = xp.asarray(np.reshape(y, (1, -1, 1)), np.int64)
    picked = xp.numpy(xp.take_along_axis(z, labels, 2)[..., 0]).astype(np.float64).mean(axis=1)  # (1 or G,)
    a = np.ones(len(lam))
    for _ in range(iterations):
        p = xp.softmax(xp.asarray(a.reshape(-1, 1, 1)) * z, 2)
        pz = p * z
        expected = pz.sum(axis=2)
        variance = xp.numpy((pz * z).sum(axis=2) - expected**2).astype(np.float64).mean(axis=1)
        grad = xp.numpy(expected).astype(np.float64).mean(axis=1) - picked + lam * a * weight_norm2
        hess = variance + lam * weight_norm2 + 1e-12
        a = np.minimum(np.maximum(a - grad / hess, a / 10), a * 10)
    return a


def calibrated_nlls(logits: np.ndarray, y: np.ndarray, *, xp: SimpleNamespace = NUMPY) -> np.ndarray:
    """``calibrated_nll`` of G candidates at once: logits (G, n, C) -> (G,) NLL after each
    candidate's own temperature (within ``metrics.TEMPERATURE_BOUNDS``, never worse than T=1)."""
    from embedx.metrics import TEMPERATURE_BOUNDS

    scale = fit_scales(logits, y, np.zeros(len(logits)), 0.0, xp=xp)
    scale = np.clip(scale, 1.0 / TEMPERATURE_BOUNDS[1], 1.0 / TEMPERATURE_BOUNDS[0])
    z = xp.asarray(logits)
    labels = xp.asarray(np.reshape(y, (1, -1, 1)), np.int64)

    def nll(a: np.ndarray) -> np.ndarray:
        logp = xp.log_softmax(xp.asarray(a.reshape(-1, 1, 1)) * z, 2)
        return -xp.numpy(xp.take_along_axis(logp, labels, 2)[..., 0]).astype(np.float64).mean(axis=1)

    return np.minimum(nll(scale), nll(np.ones(len(logits))))
