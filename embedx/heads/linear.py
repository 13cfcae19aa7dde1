"""Linear heads (logreg, linear) and the MLP head: standardized features, one sweep.

All three standardize features with the training mean/std (saved with the head)
and choose their regularization on validation data with ``embedx.heads.sweep.sweep``:
8 values on a log grid trained side by side, then 5 values around the best (itself
included, warm-started from it).  Without validation data they hold out a seeded 20% of
the training rows for that choice.

* ``logreg`` (default): the sweep solves softmax regression with an L2 penalty
  ``lam/2 ||W||^2`` on the mean loss, which is scikit-learn's objective with
  ``C = 1 / (lam * sum(sample_weight))`` (twice that for 2 classes, where
  scikit-learn fits one weight vector), with the exact solvers of ``embedx.heads.lbfgs``
  (on numpy up to ``sweep.NUMPY_MAX_ROWS`` rows: no torch import).  The final model is
  scikit-learn's ``LogisticRegression(C, lbfgs)`` on all training rows, warm-started
  from the sweep's solution so L-BFGS only polishes it.  Problems too large to solve to
  convergence once per grid value (50,000 x 2048 x 100 classes) go through
  ``sweep.large_l2_sweep`` instead: its model is the head (``solver="auto"`` skips
  scikit-learn's polish at that size; ``solver="torch"`` names the sweep's own model,
  whichever array library trained it).
* ``linear``: the same linear model trained with AdamW in torch (decoupled weight decay
  swept), cosine schedule, optional label smoothing, early stopping on val loss.
* ``mlp``: one hidden ReLU layer with dropout, otherwise like ``linear``.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np

from embedx.errors import HeadError
from embedx.heads.adam import plan_steps, train_members
from embedx.heads.base import GraphBuilder, Head, register, standardize, standardizer
from embedx.heads.sweep import DEFAULT_GRID, sweep

logger = logging.getLogger(__name__)

#: AdamW's decoupled decay per step is lr * wd, so its useful range sits higher than an L2 coefficient's.
ADAMW_GRID = tuple(float(v) for v in np.logspace(-3, 2.5, 8))
HOLDOUT_FRACTION = 0.2
#: Above this many multiply-adds per pass (rows x dims x classes), logreg keeps the sweep's own solution
#: instead of polishing it with scikit-learn (whose L-BFGS would then cost more than the whole sweep).
SKLEARN_FINAL_LIMIT = 2.0e8


def holdout_split(n: int, y: np.ndarray, seed: int,
                  fraction: float = HOLDOUT_FRACTION) -> tuple[np.ndarray, np.ndarray]:
    """Seeded stratified split of row indices (train, val) for heads fitted without val data."""
    rng = np.random.default_rng(seed)
    train, val = [], []
    for label in np.unique(y):
        rows = rng.permutation(np.flatnonzero(y == label))
        cut = int(round(len(rows) * fraction)) if len(rows) > 1 else 0
        val.append(rows[:cut])
        train.append(rows[cut:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(val))


class _Standardized(Head):
    """Shared by logreg/linear/mlp: standardization in and out of numpy, safetensors and ONNX."""

    def _prepare(self, X, y, val, sample_weight, overwrite: bool):
        self.mean_, self.scale_ = standardizer(X)
        Xs = standardize(X, self.mean_, self.scale_, in_place=overwrite)
        if val is None or not len(val[1]):
            train_rows, val_rows = holdout_split(len(X), y, int(getattr(self, "seed", 0)))
            self.val_source_ = "seeded 20% holdout of the training rows"
            sw = None if sample_weight is None else sample_weight[train_rows]
            return Xs[train_rows], y[train_rows], (Xs[val_rows], y[val_rows]), sw, Xs
        self.val_source_ = "validation data"
        return Xs, y, (standardize(val[0], self.mean_, self.scale_), val[1]), sample_weight, Xs


class _LinearModel(_Standardized):
    def _logits(self, X: np.ndarray) -> np.ndarray:
        return standardize(X, self.mean_, self.scale_) @ self.weight_ + self.bias_

    def _arrays(self) -> dict[str, np.ndarray]:
        return {"mean": self.mean_, "scale": self.scale_, "weight": self.weight_, "bias": self.bias_}

    def _set_arrays(self, arrays: dict[str, np.ndarray]) -> None:
        self.mean_, self.scale_ = arrays["mean"], arrays["scale"]
        self.weight_, self.bias_ = arrays["weight"], arrays["bias"]

    def _onnx_nodes(self, builder: GraphBuilder, features: str) -> str:
        x = builder.standardize(features, self.mean_, self.scale_)
        x = builder.node("MatMul", [x, builder.const("weight", self.weight_)])
        return builder.node("Add", [x, builder.const("bias", self.bias_)])


@register
class LogRegHead(_LinearModel):
    """Multinomial logistic regression (scikit-learn, lbfgs) with C chosen on validation data."""

    head_type = "logreg"

    def __init__(self, *, C: float | str = "auto", class_weight: str | None = None, seed: int = 0,
                 max_iter: int = 300, tol: float = 1e-4, solver: str = "auto") -> None:
        self.C = C
        self.class_weight = class_weight
        self.seed = seed
        self.max_iter = max_iter
        self.tol = tol
        self.solver = solver

    def _fit(self, X, y, val, sample_weight, *, overwrite: bool) -> None:
        n_classes = len(self.classes_)
        if self.solver not in ("auto", "sklearn", "torch"):
            raise HeadError(f"solver must be 'auto', 'sklearn' or 'torch', got {self.solver!r}")
        X_sweep, y_sweep, val_s, sw_sweep, Xs = self._prepare(X, y, val, sample_weight, overwrite)
        total_weight = float(len(X) if sample_weight is None else np.sum(sample_weight))
        per_c = 2.0 if n_classes == 2 else 1.0  # scikit-learn's binary model has one weight vector
        warm = None
        if self.C == "auto":
            lam, layers, self.sweep_, _ = sweep(
                X_sweep, y_sweep, n_classes, val_s, sw_sweep, grid=DEFAULT_GRID, name="l2",
                decoupled=False, early_stopping=False, seed=int(self.seed),
            )
            for row in self.sweep_:
                row["C"] = per_c / (row["l2"] * total_weight)
            C = per_c / (lam * total_weight)
            warm = layers[0]
        else:
            C = float(self.C)
            if not C > 0:
                raise HeadError(f"C must be a positive number or 'auto', got {self.C!r}")
        solver = self.solver
        if solver == "auto":
            too_big = warm is not None and len(X) * X.shape[1] * n_classes > SKLEARN_FINAL_LIMIT
            solver = "torch" if too_big else "sklearn"
        if solver == "torch" and warm is None:
            raise HeadError("solver='torch' keeps the sweep's model, so it needs C='auto'")
        self.chosen_params_ = {"C": float(C), "val_source": self.val_source_, "solver": solver}
        if solver == "torch":
            # The sweep's model at the chosen C (trained on the sweep's rows) is the head.
            self.weight_, self.bias_ = (np.ascontiguousarray(a, dtype=np.float32) for a in warm)
            return
        coef, intercept, iterations, converged = _sklearn_logreg(Xs, y, sample_weight, C=C, warm=warm,
                                                                 max_iter=int(self.max_iter), tol=float(self.tol))
        if n_classes == 2:
            self.weight_ = np.stack([-coef[0] / 2, coef[0] / 2], axis=1)
            self.bias_ = np.asarray([-intercept[0] / 2, intercept[0] / 2], dtype=np.float32)
        else:
            self.weight_, self.bias_ = np.ascontiguousarray(coef.T), intercept
        self.chosen_params_.update({"lbfgs_iterations": iterations, "converged": converged})


def _sklearn_logreg(X, y, sample_weight, *, C: float, warm, max_iter: int, tol: float):
    """scikit-learn's LogisticRegression(C, lbfgs), warm-started from ``warm`` = (W (D, C), b) if given."""
    import warnings

    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression
    from threadpoolctl import threadpool_limits

    model = LogisticRegression(C=C, solver="lbfgs", max_iter=max_iter, tol=tol, warm_start=warm is not None)
    if warm is not None:
        W, b = warm
        if W.shape[1] == 2:
            model.coef_ = (W[:, 1] - W[:, 0])[None, :].astype(np.float64)
            model.intercept_ = np.asarray([b[1] - b[0]], dtype=np.float64)
        else:
            model.coef_ = W.T.astype(np.float64)
            model.intercept_ = b.astype(np.float64)
    # one BLAS thread: this polish only runs on problems small enough that threads cost more than they bring
    with warnings.catch_warnings(record=True) as caught, threadpool_limits(1, user_api="blas"):
        warnings.simplefilter("always", ConvergenceWarning)
        model.fit(X, y, sample_weight=sample_weight)
    converged = not any(issubclass(w.category, ConvergenceWarning) for w in caught)
    if not converged:
        logger.warning("LogisticRegression(C=%g) did not converge in %d iterations", C, max_iter)
    return model.coef_.astype(np.float32), model.intercept_.astype(np.float32), int(np.max(model.n_iter_)), converged


@register
class LinearHead(_LinearModel):
    """A linear layer trained with AdamW in torch: cosine schedule, label smoothing, early stopping."""

    head_type = "linear"

    def __init__(self, *, weight_decay: float | str = "auto", lr: float = 1e-3, epochs: float = 30,
                 batch_size: int = 256, label_smoothing: float = 0.0, class_weight: str | None = None,
                 seed: int = 0, steps: int | None = None) -> None:
        self.weight_decay = weight_decay
        self.lr = lr
        self.epochs = epochs
        self.batch_size = batch_size
        self.label_smoothing = label_smoothing
        self.class_weight = class_weight
        self.seed = seed
        self.steps = steps

    hidden = 0
    dropout = 0.0

    def _fit(self, X, y, val, sample_weight, *, overwrite: bool) -> None:
        n_classes = len(self.classes_)
        X_tr, y_tr, val_s, sw, Xs = self._prepare(X, y, val, sample_weight, overwrite)
        hidden, dropout = int(self.hidden), float(self.dropout)
        settings = dict(hidden=hidden, dropout=dropout, label_smoothing=float(self.label_smoothing),
                        lr=float(self.lr), batch_size=int(self.batch_size), seed=int(self.seed))
        if self.weight_decay == "auto":
            wd, layers, self.sweep_, steps = sweep(
                X_tr, y_tr, n_classes, val_s, sw, grid=ADAMW_GRID, name="weight_decay", decoupled=True,
                early_stopping=True, max_epochs=float(self.epochs), **settings,
            )
        else:
            wd = float(self.weight_decay)
            outputs = (X.shape[1] * hidden + hidden * n_classes) if hidden else X.shape[1] * n_classes
            steps = int(self.steps) if self.steps else plan_steps(
                len(X_tr), outputs, batch_size=int(self.batch_size), max_epochs=float(self.epochs), min_steps=300)
            if self.steps and val is None:
                # fixed weight decay and step count (a refit): train on every row, no early stopping
                X_tr, y_tr, sw, val_s = Xs, y, sample_weight, None
            fit = train_members(X_tr, y_tr, n_classes, weight_decays=np.asarray([wd]), steps=steps,
                                X_val=None if val_s is None else val_s[0], y_val=None if val_s is None else val_s[1],
                                sample_weight=sw, decoupled=True, early_stopping=val_s is not None, **settings)
            layers = fit.member(0)
            steps = int(fit.best_step[0]) if val_s is not None else steps
        self._set_layers(layers)
        self.chosen_params_ = {"weight_decay": float(wd), "steps": int(steps), "val_source": self.val_source_}

    def _set_layers(self, layers: list[tuple[np.ndarray, np.ndarray]]) -> None:
        self.weight_ = np.ascontiguousarray(layers[0][0], dtype=np.float32)
        self.bias_ = np.ascontiguousarray(layers[0][1], dtype=np.float32)


@register
class MLPHead(LinearHead):
    """One hidden ReLU layer with dropout, trained like ``linear``."""

    head_type = "mlp"

    def __init__(self, *, hidden: int = 256, dropout: float = 0.5, weight_decay: float | str = "auto",
                 lr: float = 1e-3, epochs: float = 30, batch_size: int = 256, label_smoothing: float = 0.0,
                 class_weight: str | None = None, seed: int = 0, steps: int | None = None) -> None:
        super().__init__(weight_decay=weight_decay, lr=lr, epochs=epochs, batch_size=batch_size,
                         label_smoothing=label_smoothing, class_weight=class_weight, seed=seed, steps=steps)
        self.hidden = hidden
        self.dropout = dropout

    def _set_layers(self, layers: list[tuple[np.ndarray, np.ndarray]]) -> None:
        (w1, b1), (w2, b2) = layers
        self.w1_, self.b1_ = np.ascontiguousarray(w1, dtype=np.float32), np.ascontiguousarray(b1, dtype=np.float32)
        self.w2_, self.b2_ = np.ascontiguousarray(w2, dtype=np.float32), np.ascontiguousarray(b2, dtype=np.float32)

    def _logits(self, X: np.ndarray) -> np.ndarray:
        hidden = np.maximum(standardize(X, self.mean_, self.scale_) @ self.w1_ + self.b1_, 0.0)
        return hidden @ self.w2_ + self.b2_

    def _arrays(self) -> dict[str, np.ndarray]:
        return {"mean": self.mean_, "scale": self.scale_, "w1": self.w1_, "b1": self.b1_,
                "w2": self.w2_, "b2": self.b2_}

    def _set_arrays(self, arrays: dict[str, np.ndarray]) -> None:
        self.mean_, self.scale_ = arrays["mean"], arrays["scale"]
        self._set_layers([(arrays["w1"], arrays["b1"]), (arrays["w2"], arrays["b2"])])

    def _onnx_nodes(self, builder: GraphBuilder, features: str) -> str:
        x = builder.standardize(features, self.mean_, self.scale_)
        x = builder.node("Add", [builder.node("MatMul", [x, builder.const("w1", self.w1_)]),
                                 builder.const("b1", self.b1_)])
        x = builder.node("Relu", [x])
        x = builder.node("MatMul", [x, builder.const("w2", self.w2_)])
        return builder.node("Add", [x, builder.const("b2", self.b2_)])


def fixed_params(head: Head) -> dict[str, Any]:
    """Constructor parameters that reproduce ``head``'s chosen hyperparameters without a sweep (for --refit)."""
    params = head.get_params()
    chosen = head.chosen_params_
    if isinstance(head, LogRegHead):
        params["C"] = chosen["C"]
    elif isinstance(head, LinearHead):
        params["weight_decay"] = chosen["weight_decay"]
        params["steps"] = max(int(chosen["steps"]), 1)
    elif "k" in params and "k" in chosen:
        params["k"] = chosen["k"]
    return params
