"""The regularization sweep: a coarse grid of strengths trained side by side, then a
refinement around the best, warm-started from it; one value and its model come out.

How the members train depends on the problem:

* L2-penalized softmax regression (``logreg``) has exact solvers
  (``embedx.heads.lbfgs``): full-batch L-BFGS to the optimum when solving every grid
  value costs at most ``LBFGS_BUDGET``, ``large_l2_sweep`` past that.  Problems of at most
  ``NUMPY_MAX_ROWS`` training rows run on numpy, larger ones on torch
  (``array_namespace``): importing torch costs seconds, more than such a fit.
* Decoupled weight decay with early stopping (``linear``, ``mlp``): minibatch Adam in
  torch (``embedx.heads.adam.train_members``).

The choice among members is ``embedx.heads.members.best_model``'s: accuracy within one
standard error of the best, then the lowest temperature-calibrated validation NLL.
"""

from __future__ import annotations

import logging
from types import SimpleNamespace

import numpy as np

from embedx.heads.arrays import NUMPY, torch_namespace
from embedx.heads.lbfgs import class_mean_init, lbfgs_members, lbfgs_softmax
from embedx.heads.members import MemberFit, best_member, best_model, fit_scales, sweep_table

logger = logging.getLogger(__name__)

#: The coarse grid of regularization strengths (mean-loss L2 coefficient / weight decay).
DEFAULT_GRID = tuple(float(v) for v in np.logspace(-6, 1, 8))
#: Multipliers of the refinement around the best coarse value (1.0: the best itself, trained on equally).
REFINE_FACTORS = tuple(float(v) for v in 10.0 ** np.array([-0.5, -0.25, 0.0, 0.25, 0.5]))
#: Learning-rate factor of the refinement phase (warm-started from the coarse winner).
REFINE_LR_FACTOR = 0.3
#: Full-batch L-BFGS iterations for the L2 sweep, used when they cost at most LBFGS_BUDGET multiply-adds.
LBFGS_ITERATIONS = 200
LBFGS_BUDGET = 2.0e10
#: L2 problems of up to this many training rows run on numpy, larger ones on torch.
NUMPY_MAX_ROWS = 10_000
#: Large L2 sweeps (see ``large_l2_sweep``): multiply-adds of one function evaluation of the coarse
#: grid on its row sample, L-BFGS iterations of the coarse and the refinement phases.
LARGE_COARSE_WORK = 1.0e10
LARGE_COARSE_ITERATIONS = 20
LARGE_REFINE_ITERATIONS = 10
LARGE_FINAL_ITERATIONS = 20
#: ...each phase stops earlier once its best validation accuracy has not risen for this many iterations.
LARGE_PATIENCE = 1
#: The refinement around the coarse winner: its L2 value times these factors.
LARGE_REFINE_FACTORS = (10.0**-0.5, 1.0, 10.0**0.5)
#: Validation rows scoring the coarse grid and the refinement: the final model is scored on all of them.
SCORE_ROWS = 4096
#: Training rows fitting the class-mean classifier's scale per member (one number each).
SCALE_ROWS = 2048


def array_namespace(rows: int) -> SimpleNamespace:
    """numpy for L2 problems of at most ``NUMPY_MAX_ROWS`` training rows, torch past that."""
    return NUMPY if rows <= NUMPY_MAX_ROWS else torch_namespace()


def sweep(
    X: np.ndarray,
    y: np.ndarray,
    n_classes: int,
    val: tuple[np.ndarray, np.ndarray],
    sample_weight: np.ndarray | None,
    *,
    grid: tuple[float, ...],
    name: str,
    decoupled: bool,
    early_stopping: bool,
    hidden: int = 0,
    dropout: float = 0.0,
    label_smoothing: float = 0.0,
    lr: float = 3e-3,
    max_epochs: float = 10,
    batch_size: int = 256,
    seed: int = 0,
) -> tuple[float, list[tuple[np.ndarray, np.ndarray]], list[dict], int]:
    """Coarse grid, then the best value and its neighbours trained on from the best model.

    Returns (chosen value, its layers, the sweep table, optimizer steps of the chosen
    model).  An L2 linear model (not ``decoupled``, no ``early_stopping``, ``hidden``,
    ``dropout`` or ``label_smoothing``) gets full-batch L-BFGS when solving it exactly 200
    times over is affordable and ``large_l2_sweep`` otherwise; anything else minibatch Adam
    within ``adam.WORK_BUDGET``.
    """
    l2 = not (decoupled or early_stopping or hidden or dropout or label_smoothing)
    if l2 and len(X) * X.shape[1] * n_classes * len(grid) * LBFGS_ITERATIONS > LBFGS_BUDGET:
        return large_l2_sweep(X, y, n_classes, val, sample_weight, grid=grid, name=name, seed=seed)
    if l2:
        xp = array_namespace(len(X))

        def train(values: np.ndarray, refine: list | None) -> MemberFit:
            return lbfgs_softmax(X, y, n_classes, weight_decays=values, X_val=val[0], y_val=val[1],
                                 sample_weight=sample_weight, xp=xp,
                                 iterations=LBFGS_ITERATIONS // 2 if refine else LBFGS_ITERATIONS,
                                 init=refine[0] if refine else None)
    else:
        from embedx.heads.adam import WORK_BUDGET, plan_steps, train_members

        xp = torch_namespace()
        outputs = (X.shape[1] * hidden + hidden * n_classes) if hidden else X.shape[1] * n_classes

        def train(values: np.ndarray, refine: list | None) -> MemberFit:
            factor = 0.5 if refine else 1.0
            members = len(REFINE_FACTORS) if refine else len(grid)  # before the decay filter below
            steps = plan_steps(len(X), outputs * members, batch_size=batch_size, budget=WORK_BUDGET * factor,
                               min_epochs=2 * factor, max_epochs=max_epochs * factor, min_steps=int(200 * factor))
            # Fine-tune around the best model rather than shake it with a fresh optimizer at the full lr.
            return train_members(X, y, n_classes, weight_decays=values, X_val=val[0], y_val=val[1],
                                 sample_weight=sample_weight, hidden=hidden, dropout=dropout,
                                 label_smoothing=label_smoothing, decoupled=decoupled,
                                 lr=lr * REFINE_LR_FACTOR if refine else lr, steps=steps, batch_size=batch_size,
                                 seed=seed, early_stopping=early_stopping, init=refine)

    coarse = train(np.asarray(grid), None)
    table = sweep_table(coarse, name, "grid")
    best = best_member(coarse, val[0], val[1], xp=xp)
    center = float(coarse.weight_decays[best])
    values = np.asarray([center * f for f in REFINE_FACTORS])
    if decoupled:  # the decay factor 1 - lr * wd must stay positive
        values = values[values * lr < 0.5]
    refined = train(values, coarse.member(best))
    table += sweep_table(refined, name, "refine")
    # The coarse winner as it is stays a candidate: refining must beat it to replace it.
    accuracy = np.append(refined.val_accuracy, coarse.val_accuracy[best])
    models = [refined.member(i) for i in range(len(values))] + [coarse.member(best)]
    chosen = best_model(models, accuracy, val[0], val[1], xp=xp)
    if chosen == len(values):
        logger.debug("%s sweep: refinement did not beat the coarse best %g", name, center)
        return center, models[chosen], table, int(coarse.best_step[best])
    steps = int(coarse.best_step[best]) + int(refined.best_step[chosen])
    return float(values[chosen]), models[chosen], table, steps


    return float(values[chosen]), models[chosen], table, steps


def large_l2_sweep(
    X: np.ndarray,
    y: np.ndarray,
    n_classes: int,
    val: tuple[np.ndarray, np.ndarray],
    sample_weight: np.ndarray | None,
    *,
    grid: tuple[float, ...],
    name: str,
    seed: int = 0,
) -> tuple[float, list[tuple[np.ndarray, np.ndarray]], list[dict], int]:
    """The L2 sweep for problems too large to solve to convergence once per grid value.

    Softmax regression costs passes over the data (rows x dims x classes multiply-adds
    each), so this sweep spends few, and where they count:

    1. every member starts from the nearest-class-mean classifier (one pass over the
       rows), scaled per member by the factor optimal for its L2 penalty;
    2. coarse grid and refinement (three values around the winner, warm-started from it)
       with per-member L-BFGS (``lbfgs_members``) on a seeded sample of rows sized to
       ``LARGE_COARSE_WORK``, scored on a seeded sample of validation rows;
    3. the winner, its L2 value rescaled to the full row count (the same scikit-learn
       ``C``), trained on all rows from where it stands, scored on all validation rows.

    Each member keeps its best validation iterate: the number of iterations is chosen on
    validation data along with the L2 strength.  Same return as ``sweep``.
    """
    n, dim = X.shape
    y = np.asarray(y)
    weights = None if sample_weight is None else np.asarray(sample_weight)
    rng = np.random.default_rng(seed)

    def rows_of(total: int, size: int) -> np.ndarray:
        return np.sort(rng.choice(total, size, replace=False)) if size < total else np.arange(total)

    rows = rows_of(n, max(int(LARGE_COARSE_WORK / (dim * n_classes * len(grid))), 20 * n_classes))
    scored = rows_of(len(val[1]), SCORE_ROWS)
    X_sample, y_sample = X[rows], y[rows]
    w_sample = None if weights is None else weights[rows]
    val_sample = (val[0][scored], val[1][scored])

    xp = array_namespace(n)
    W, b = class_mean_init(X, y, n_classes, weights, xp=xp)
    fitted = rows[: min(len(rows), SCALE_ROWS)]
    scales = fit_scales(X[fitted] @ W + b, y[fitted], np.asarray(grid), float(np.sum(W * W)), xp=xp)
    common = dict(X_val=val_sample[0], y_val=val_sample[1], sample_weight=w_sample, patience=LARGE_PATIENCE, xp=xp)
    coarse = lbfgs_members(X_sample, y_sample, n_classes, weight_decays=np.asarray(grid),
                           init=(scales[:, None, None] * W[None], scales[:, None] * b[None]),
                           iterations=LARGE_COARSE_ITERATIONS, **common)
    table = sweep_table(coarse, name, "grid")
    best = best_member(coarse, *val_sample, xp=xp)
    values = np.asarray([float(coarse.weight_decays[best]) * f for f in LARGE_REFINE_FACTORS])
    W_best, b_best = coarse.member(best)[0]
    refined = lbfgs_members(X_sample, y_sample, n_classes, weight_decays=values,
                            init=(np.repeat(W_best[None], len(values), 0), np.repeat(b_best[None], len(values), 0)),
                            iterations=LARGE_REFINE_ITERATIONS, **common)
    table += sweep_table(refined, name, "refine")
    # The coarse winner as it is stays a candidate: refining must beat it to replace it.
    models = [refined.member(i) for i in range(len(values))] + [coarse.member(best)]
    chosen = best_model(models, np.append(refined.val_accuracy, coarse.val_accuracy[best]), *val_sample, xp=xp)
    lam = float(np.append(values, coarse.weight_decays[best])[chosen]) * len(rows) / n  # the same C on all rows
    steps = int(coarse.best_step[best]) + (int(refined.best_step[chosen]) if chosen < len(values) else 0)
    if len(rows) == n and len(scored) == len(val[1]):
        return lam, models[chosen], table, steps
    (W_final, b_final), = models[chosen]
    final = lbfgs_members(X, y, n_classes, weight_decays=np.asarray([lam]), init=(W_final[None], b_final[None]),
                          iterations=LARGE_FINAL_ITERATIONS, X_val=val[0], y_val=val[1], sample_weight=weights,
                          patience=LARGE_PATIENCE, xp=xp)
    table += sweep_table(final, name, "final")
    return lam, final.member(0), table, steps + int(final.best_step[0])
