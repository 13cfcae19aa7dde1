"""Exact solvers for softmax regression with an L2 penalty, G strengths side by side.

Each member ``g`` minimizes ``mean CE + lam_g/2 * ||W_g||^2`` (scikit-learn's
LogisticRegression objective, with ``C = 1 / (lam * n)``).  The logits are linear in
the weights, so gradients are closed-form (``X^T (P - Y)``): no autograd, and every
function runs on numpy or on torch through an ``embedx.heads.arrays`` namespace with
the same numbers up to float rounding.

* ``lbfgs_softmax``: full-batch L-BFGS (``lbfgs_minimize``) in float64 to the optimum,
  for problems small enough to solve once per grid value;
* ``lbfgs_members``: per-member batched L-BFGS in float32 that keeps each member's best
  validation iterate, for problems too large for that, started from
  ``class_mean_init``.
"""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np

from embedx.heads.arrays import NUMPY, threads_for
from embedx.heads.members import MemberFit

#: Validation rows scored per chunk (bounds the (rows, members, classes) logits in memory).
_VAL_CHUNK = 8192


def validation_scores(X_val: np.ndarray, y_val: np.ndarray, W, b, *,
                      xp: SimpleNamespace) -> tuple[np.ndarray, np.ndarray]:
    """Per member: mean NLL and accuracy on validation rows.  ``W`` (D, G, C) and ``b`` (G, C)
    are arrays of ``xp``."""
    dim, members, n_classes = W.shape
    loss, correct = np.zeros(members), np.zeros(members)
    for start in range(0, len(y_val), _VAL_CHUNK):
        rows = xp.asarray(X_val[start : start + _VAL_CHUNK])
        truth = xp.asarray(np.reshape(y_val[start : start + _VAL_CHUNK], (-1, 1, 1)), np.int64)
        logits = (rows @ W.reshape(dim, members * n_classes)).reshape(len(rows), members, n_classes) + b
        picked = xp.take_along_axis(xp.log_softmax(logits, 2), truth, 2)[..., 0]
        loss -= xp.numpy(picked.sum(axis=0)).astype(np.float64)
        correct += xp.numpy((logits.argmax(axis=2) == truth[..., 0]).sum(axis=0)).astype(np.float64)
    return loss / len(y_val), correct / len(y_val)


def lbfgs_softmax(
    X: np.ndarray,
    y: np.ndarray,
    n_classes: int,
    *,
    weight_decays: np.ndarray,
    X_val: np.ndarray | None = None,
    y_val: np.ndarray | None = None,
    sample_weight: np.ndarray | None = None,
    iterations: int = 200,
    init: tuple[np.ndarray, np.ndarray] | None = None,
    xp: SimpleNamespace = NUMPY,
) -> MemberFit:
    """Full-batch L-BFGS on the members' summed L2 objectives, float64, for at most ``iterations``
    iterations: the optimum scikit-learn would find, for every member at once.

    ``init``: one model (W (D, C), b (C,)) every member starts from (warm start for a
    refinement); zeros otherwise.  Members are scored on the validation data if given.
    Problems below ``arrays.SMALL_WORK`` multiply-adds per pass run on one thread.
    """
    n, dim = X.shape
    decays = np.asarray(weight_decays, dtype=np.float64)
    members = len(decays)
    size = dim * members * n_classes
    if init is None:
        x0 = np.zeros(size + members * n_classes)
    else:
        W0 = np.repeat(np.asarray(init[0], np.float64)[None], members, axis=0).transpose(1, 0, 2)  # (D, G, C)
        x0 = np.concatenate([W0.ravel(), np.tile(np.asarray(init[1], np.float64), members)])
    weights = np.ones(n) if sample_weight is None else np.asarray(sample_weight, dtype=np.float64)
    row_weight = xp.asarray((weights / max(weights.sum(), 1e-12)).reshape(-1, 1, 1), np.float64)
    X64 = xp.asarray(X, np.float64)
    target = xp.asarray(np.reshape(y, (-1, 1, 1)), np.int64)
    onehot = xp.asarray(np.eye(n_classes)[np.asarray(y)][:, None, :], np.float64)  # (n, 1, C)
    lam = xp.asarray(decays, np.float64)

    def objective(x: np.ndarray) -> tuple[float, np.ndarray]:
        W = xp.asarray(x[:size].reshape(dim, members, n_classes), np.float64)
        b = xp.asarray(x[size:].reshape(members, n_classes), np.float64)
        logp = xp.log_softmax((X64 @ W.reshape(dim, size // dim)).reshape(n, members, n_classes) + b, 2)
        value = -(xp.take_along_axis(logp, target, 2) * row_weight).sum() + 0.5 * (lam * (W * W).sum(axis=(0, 2))).sum()
        residual = (xp.exp(logp) - onehot) * row_weight  # d value / d logits
        grad_W = (X64.T @ residual.reshape(n, size // dim)).reshape(dim, members, n_classes) + lam.reshape(1, -1, 1) * W
        return float(value), np.concatenate([xp.numpy(grad_W).ravel(), xp.numpy(residual.sum(axis=0)).ravel()])

    with threads_for(xp, n * size):
        x, done = lbfgs_minimize(objective, x0, max_iter=int(iterations))
        W = x[:size].reshape(dim, members, n_classes).astype(np.float32)
        b = x[size:].reshape(members, n_classes).astype(np.float32)
        if X_val is not None and y_val is not None and len(y_val) > 0:
            val_loss, val_acc = validation_scores(X_val, y_val, xp.asarray(W), xp.asarray(b), xp=xp)
        else:
            val_loss, val_acc = np.full(members, np.nan), np.zeros(members)
    return MemberFit(weight_decays=decays, layers=[(np.ascontiguousarray(W.transpose(1, 0, 2)), b)],
                     val_loss=val_loss, val_accuracy=val_acc, best_step=np.full(members, done), steps=done,
                     batch_size=n)


def lbfgs_minimize(objective, x0: np.ndarray, *, max_iter: int, history: int = 20, gtol: float = 1e-6,
                   ftol: float = 1e-10) -> tuple[np.ndarray, int]:
    """Minimize a smooth function given as ``objective(x) -> (value, gradient)``: L-BFGS
    (two-loop recursion) with a backtracking Armijo line search.  Returns (x, iterations).

    A few lines of numpy instead of scipy's L-BFGS-B (whose bound handling costs ~20 ms
    per iteration on these vectors) or torch.optim (which imports torch._dynamo).
    """
    x = np.asarray(x0, dtype=np.float64).copy()
    value, grad = objective(x)
    pairs: list[tuple[np.ndarray, np.ndarray, float]] = []
    iterations = 0
    while iterations < max_iter and np.max(np.abs(grad)) >= gtol:
        iterations += 1
        direction = -grad
        if pairs:
            alphas = []
            for s_vec, y_vec, rho in reversed(pairs):
                alpha = rho * float(s_vec @ direction)
                direction = direction - alpha * y_vec
                alphas.append(alpha)
            s_vec, y_vec, _ = pairs[-1]
            direction = direction * (float(s_vec @ y_vec) / float(y_vec @ y_vec))
            for (s_vec, y_vec, rho), alpha in zip(pairs, reversed(alphas), strict=True):
                direction = direction + s_vec * (alpha - rho * float(y_vec @ direction))
        else:
            direction = direction / max(1.0, float(np.linalg.norm(grad)))
        slope = float(grad @ direction)
        if slope >= 0:  # not a descent direction: restart from the gradient
            pairs.clear()
            direction = -grad / max(1.0, float(np.linalg.norm(grad)))
            slope = float(grad @ direction)
        step = 1.0
        while True:
            candidate = x + step * direction
            new_value, new_grad = objective(candidate)
            if new_value <= value + 1e-4 * step * slope or step < 1e-12:
                break
            step *= 0.5
        s_vec, y_vec = candidate - x, new_grad - grad
        curvature = float(s_vec @ y_vec)
        if curvature > 1e-12:
            pairs.append((s_vec, y_vec, 1.0 / curvature))
            del pairs[:-history]
        converged = abs(value - new_value) <= ftol * max(1.0, abs(value))
        x, value, grad = candidate, new_value, new_grad
        if converged:
            break
    return x, iterations



def class_mean_init(X: np.ndarray, y: np.ndarray, n_classes: int, sample_weight: np.ndarray | None = None, *,
                    xp: SimpleNamespace = NUMPY) -> tuple[np.ndarray, np.ndarray]:
    """The nearest-class-mean classifier as a linear layer: ``W = means.T``, ``b = -|mean|^2 / 2
    + log prior`` (LDA with an identity covariance, on standardized features).

    One pass over the data, and a far better start than zeros for a solver that can only
    afford a few passes: its argmax is already a sound classifier.
    """
    weights = np.ones(len(y), dtype=np.float32) if sample_weight is None else np.asarray(sample_weight, np.float32)
    totals = np.bincount(y, weights=weights, minlength=n_classes)
    onehot = np.zeros((n_classes, len(y)), dtype=np.float32)
    onehot[np.asarray(y, dtype=np.int64), np.arange(len(y))] = weights
    means = xp.numpy(xp.asarray(onehot) @ xp.asarray(X)).astype(np.float64)  # class sums
    present = totals > 0
    means[present] /= totals[present, None]
    prior = np.log(np.where(present, totals, 1.0) / totals.sum())
    bias = np.where(present, -0.5 * np.sum(means**2, axis=1) + prior, -1e4)
    return np.ascontiguousarray(means.T, dtype=np.float32), bias.astype(np.float32)


def lbfgs_members(
    X: np.ndarray,
    y: np.ndarray,
    n_classes: int,
    *,
    weight_decays: np.ndarray,
    init: tuple[np.ndarray, np.ndarray],
    X_val: np.ndarray,
    y_val: np.ndarray,
    sample_weight: np.ndarray | None = None,
    iterations: int = 3,
    history: int = 8,
    keep_best: bool = True,
    patience: int | None = None,
    newton_steps: int = 4,
    xp: SimpleNamespace = NUMPY,
) -> MemberFit:
    """L-BFGS on ``mean CE + lam/2 * ||W||^2`` for G members at once, float32, each member with
    its own curvature pairs and its own step length.  ``init``: (W (G, D, C), b (G, C)).

    The logits are linear in the weights, so one iteration costs ONE matmul pair over the
    data for all members: ``X @ direction`` gives the logits along the search line, where
    the step length is found by a few 1-D Newton steps on the exact objective (no
    backtracking: no extra passes), and ``X^T (P - Y)`` gives the next gradient.

    For problems too large to solve to convergence for every grid value: after each
    iteration the members are scored on validation data and each keeps its best iterate
    (validation accuracy, then NLL), so the iteration count is chosen on validation data
    together with the L2 strength (``keep_best=False``: the last iterate).  ``patience``:
    stop once the best validation accuracy of any member has not risen for that many
    iterations (members behind the leader cannot become the choice).
    """
    lam = xp.asarray(weight_decays)
    members = len(weight_decays)
    dim = X.shape[1]
    X_t = xp.asarray(X)
    n = len(y)
    if sample_weight is None:
        row_weight = np.full((n, 1), 1.0 / n, dtype=np.float32)
    else:
        w = np.asarray(sample_weight, dtype=np.float64)
        row_weight = (w / w.sum()).astype(np.float32).reshape(-1, 1)
    row_weight = xp.asarray(row_weight)
    target = xp.asarray(np.reshape(y, (-1, 1, 1)), np.int64)
    onehot = xp.asarray(np.eye(n_classes, dtype=np.float32)[np.asarray(y)][:, None, :])  # (n, 1, C)

    def logits_of(rows, W, b):
        """(n, D) x (D, G, C) -> (n, G, C)."""
        return (rows @ W.reshape(dim, members * n_classes)).reshape(len(rows), members, n_classes) + b

    def objective(logits, W) -> tuple:
        """Loss (G,) and gradient at weights ``W`` whose training logits are ``logits``: one matmul."""
        logp = xp.log_softmax(logits, 2)
        nll = -xp.take_along_axis(logp, target, 2)[..., 0]  # (n, G)
        residual = xp.exp(logp)  # becomes (P - Y), weighted, in place: (n, G, C) arrays are the memory here
        residual -= onehot
        residual *= row_weight.reshape(-1, 1, 1)
        grad_W = (X_t.T @ residual.reshape(n, members * n_classes)).reshape(dim, members, n_classes)
        grad_W += lam.reshape(1, -1, 1) * W
        loss = (nll * row_weight).sum(axis=0) + 0.5 * lam * (W * W).sum(axis=(0, 2))
        return loss, (grad_W, residual.sum(axis=0))

    def step_length(logits, along, W, d_W, slope):
        """Per member, Newton steps on f(t) = objective(W + t d) from t = 1, kept within a factor
        4 per step and positive.  f is convex in t, and only elementwise work is needed here."""
        cross, square = (W * d_W).sum(axis=(0, 2)), (d_W * d_W).sum(axis=(0, 2))
        along_y = xp.take_along_axis(along, target, 2)[..., 0]  # (n, G)
        t = xp.ones(members)
        for _ in range(newton_steps):
            p = xp.softmax(logits + t.reshape(1, -1, 1) * along, 2)
            mean_along = (p * along).sum(axis=2)  # (n, G)
            first = ((mean_along - along_y) * row_weight).sum(axis=0) + lam * (cross + t * square)
            second = (((p * along * along).sum(axis=2) - mean_along**2) * row_weight).sum(axis=0) + lam * square
            t = (t - first / second.clip(1e-20, None)).clip(t / 4, t * 4)
        start = xp.logsumexp(logits, 2)

        def along_line(t):
            """f(t) - f(0), elementwise work only."""
            moved = xp.logsumexp(logits + t.reshape(1, -1, 1) * along, 2) - start - t * along_y
            return (moved * row_weight).sum(axis=0) + 0.5 * lam * (2 * t * cross + t * t * square)

        t = xp.where(slope < 0, t, 0.0)
        for _ in range(10):  # a safeguard: Newton on a convex f rarely needs it
            worse = along_line(t) > 0
            if not bool(worse.any()):
                break
            t = xp.where(worse, t / 4, t)
        return t

    def dot(a: tuple, b: tuple):
        """Per-member inner product of two (W, b) pairs: (G,)."""
        return (a[0] * b[0]).sum(axis=(0, 2)) + (a[1] * b[1]).sum(axis=1)

    def axpy(alpha, a: tuple, b: tuple) -> tuple:
        """b + alpha * a, with one alpha per member."""
        return (b[0] + alpha.reshape(1, -1, 1) * a[0], b[1] + alpha.reshape(-1, 1) * a[1])

    def scaled(direction: tuple, factor) -> tuple:
        return (direction[0] * factor.reshape(1, -1, 1), direction[1] * factor.reshape(-1, 1))

    W0, b0 = init
    x = (xp.asarray(np.asarray(W0, np.float32).transpose(1, 0, 2)), xp.asarray(b0))
    best = (xp.copy(x[0]), xp.copy(x[1]))
    best_loss, best_acc = validation_scores(X_val, y_val, *x, xp=xp)
    best_step = np.zeros(members, dtype=np.int64)
    logits = logits_of(X_t, *x)
    value, grad = objective(logits, x[0])
    pairs: list[tuple[tuple, tuple, object]] = []
    iteration = stale = 0
    for iteration in range(1, iterations + 1):
        # two-loop recursion, per member
        direction = (-grad[0], -grad[1])
        alphas = []
        for s, yk, rho in reversed(pairs):
            alpha = rho * dot(s, direction)
            direction = axpy(-alpha, yk, direction)
            alphas.append(alpha)
        if pairs:
            s, yk, _ = pairs[-1]
            direction = scaled(direction, dot(s, yk) / dot(yk, yk).clip(1e-30, None))
            for (s, yk, rho), alpha in zip(pairs, reversed(alphas), strict=True):
                direction = axpy(alpha - rho * dot(yk, direction), s, direction)
        else:
            direction = scaled(direction, 1.0 / xp.sqrt(dot(grad, grad)).clip(1.0, None))
        slope = dot(grad, direction)
        uphill = slope >= 0  # lost curvature information: that member steps down its gradient
        if bool(uphill.any()):
            direction = axpy(-xp.astype(uphill, np.float32) / xp.sqrt(dot(grad, grad)).clip(1.0, None), grad,
                             scaled(direction, xp.astype(~uphill, np.float32)))
            slope = dot(grad, direction)
        along = logits_of(X_t, *direction)  # the logits move along this line
        t = step_length(logits, along, x[0], direction[0], slope)
        new_x = axpy(t, direction, x)
        logits = logits + t.reshape(1, -1, 1) * along
        new_value, new_grad = objective(logits, new_x[0])
        s = (new_x[0] - x[0], new_x[1] - x[1])
        yk = (new_grad[0] - grad[0], new_grad[1] - grad[1])
        curvature = dot(s, yk)
        pairs.append((s, yk, xp.where(curvature > 1e-12, 1.0 / curvature.clip(1e-12, None), 0.0)))
        del pairs[:-history]
        x, value, grad = new_x, new_value, new_grad
        val_loss, val_acc = validation_scores(X_val, y_val, *x, xp=xp)
        stale = 0 if val_acc.max() > best_acc.max() else stale + 1
        better = (val_acc > best_acc) | ((val_acc == best_acc) & (val_loss < best_loss)) | (not keep_best)
        if better.any():
            mask = xp.asarray(better, bool)
            best[0][:, mask], best[1][mask] = x[0][:, mask], x[1][mask]
            best_loss = np.where(better, val_loss, best_loss)
            best_acc = np.where(better, val_acc, best_acc)
            best_step = np.where(better, iteration, best_step)
        if patience is not None and stale >= patience:
            break
    return MemberFit(
        weight_decays=np.asarray(weight_decays, dtype=np.float64),
        layers=[(np.ascontiguousarray(xp.numpy(best[0]).transpose(1, 0, 2)), xp.numpy(best[1]).copy())],
        val_loss=best_loss, val_accuracy=best_acc, best_step=best_step, steps=iteration,
        batch_size=n, train_loss=xp.numpy(value).astype(np.float64),
    )
