"""Train many regularization strengths at once: one vectorized torch pass.

A sweep over G weight decays trains G independent models side by side.  For a
linear head the G weight matrices sit next to each other in one (D, G*C)
matrix, so each minibatch costs ONE matmul ``X_batch @ W`` for all members and
one for the gradient, instead of G separate fits each re-reading the features.
The MLP does the same for its first layer and a batched matmul for the second.

Each member's loss is its own mean cross-entropy (optionally label-smoothed and
sample-weighted); the members only share the data order and the optimizer's
step schedule, so their gradients stay independent.  Two ways to regularize:

* ``decoupled=False``: L2 in the objective, ``mean CE + lam/2 * ||W||^2`` (what
  scikit-learn's LogisticRegression minimizes, with ``C = 1 / (lam * n)``).
* ``decoupled=True``: AdamW-style decay ``W <- W * (1 - lr * lam)`` after each step.

torch is imported inside the functions: importing this module stays torch-free.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field

import numpy as np

logger = logging.getLogger(__name__)

#: The coarse grid of regularization strengths (mean-loss L2 coefficient / weight decay).
DEFAULT_GRID = tuple(float(v) for v in np.logspace(-6, 1, 8))
#: Multipliers of the refinement around the best coarse value (1.0: the best itself, trained on equally).
REFINE_FACTORS = tuple(float(v) for v in 10.0 ** np.array([-0.5, -0.25, 0.0, 0.25, 0.5]))
#: Forward multiply-adds (rows x dims x outputs x members x epochs) the coarse phase may spend; the
#: refinement gets half.  50k x 2048 x 100 gets the minimum, 2 coarse epochs: seconds, not minutes.
WORK_BUDGET = 1.0e11
#: Below this many multiply-adds per optimizer step (rows x dims x members x outputs), torch and BLAS
#: run on one thread: on a shared CPU, two threads synchronizing every small op cost more than they bring.
SMALL_WORK = 2.0e8
#: Validation rows used to fit a candidate's temperature (``calibrated_nll``).
CALIBRATION_ROWS = 4096
#: ...and when comparing many candidates at once (``best_model``): the softmaxes are the cost.
SELECTION_ROWS = 2048


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


def plan_steps(n: int, work_per_sample: float, *, batch_size: int, budget: float = WORK_BUDGET,
               min_epochs: float = 1.0, max_epochs: float = 30.0, min_steps: int = 0) -> int:
    """Optimizer steps for one phase: as many epochs as ``budget`` affords, within
    [min_epochs, max_epochs], and at least ``min_steps`` where the budget allows (small data)."""
    batch_size = min(batch_size, n)
    epochs = min(max(budget / max(n * work_per_sample, 1.0), min_epochs), max_epochs)
    steps = math.ceil(epochs * math.ceil(n / batch_size))
    affordable = int(budget / max(batch_size * work_per_sample, 1.0))
    return int(max(steps, min(min_steps, affordable), 1))


def train_members(
    X: np.ndarray,
    y: np.ndarray,
    n_classes: int,
    *,
    weight_decays: np.ndarray,
    X_val: np.ndarray | None = None,
    y_val: np.ndarray | None = None,
    sample_weight: np.ndarray | None = None,
    hidden: int = 0,
    dropout: float = 0.0,
    label_smoothing: float = 0.0,
    decoupled: bool = True,
    lr: float = 1e-3,
    steps: int = 300,
    batch_size: int = 1024,
    seed: int = 0,
    early_stopping: bool = False,
    evaluations: int = 20,
    patience: int = 4,
    init: list[tuple[np.ndarray, np.ndarray]] | None = None,
    optimizer: str = "adam",
) -> MemberFit:
    """Train ``len(weight_decays)`` models on standardized float32 features at once.

    With ``early_stopping`` (needs validation data) each member keeps its weights
    from the evaluation with the lowest validation loss, and training stops when no
    member improved for ``patience`` evaluations.  ``init``: one member's layers to
    start every member from (warm start for a refinement).  ``optimizer="lbfgs"``:
    full-batch L-BFGS for at most ``steps`` iterations on the L2 objective (small
    problems, where it converges to the optimum scikit-learn would find).

    Small problems run on one thread: on a shared CPU, two threads synchronizing
    every tiny op cost more than they bring.
    """
    import torch
    from threadpoolctl import threadpool_limits

    threads = torch.get_num_threads()
    rows_per_step = X.shape[0] if optimizer == "lbfgs" else min(batch_size, X.shape[0])
    small = rows_per_step * X.shape[1] * len(weight_decays) * (hidden or n_classes) < SMALL_WORK
    if small:
        torch.set_num_threads(1)
    try:
        # numpy's BLAS (the L-BFGS vector algebra) likewise: one thread for small problems
        with threadpool_limits(1 if small else None, user_api="blas"), torch.random.fork_rng(devices=[]):  # dropout draws from the global generator: seed it, privately
            torch.manual_seed(int(seed))
            return _train_members(X, y, n_classes, weight_decays=weight_decays, X_val=X_val, y_val=y_val,
                                  sample_weight=sample_weight, hidden=hidden, dropout=dropout,
                                  label_smoothing=label_smoothing, decoupled=decoupled, lr=lr, steps=steps,
                                  batch_size=batch_size, seed=seed, early_stopping=early_stopping,
                                  evaluations=evaluations, patience=patience, init=init, optimizer=optimizer)
    finally:
        torch.set_num_threads(threads)


def _train_members(X, y, n_classes, *, weight_decays, X_val, y_val, sample_weight, hidden, dropout,
                   label_smoothing, decoupled, lr, steps, batch_size, seed, early_stopping, evaluations,
                   patience, init, optimizer) -> MemberFit:
    import torch

    n, dim = X.shape
    decays = np.asarray(weight_decays, dtype=np.float64)
    members = len(decays)
    generator = torch.Generator().manual_seed(int(seed))
    X_t = torch.from_numpy(np.ascontiguousarray(X, dtype=np.float32))
    y_t = torch.from_numpy(np.asarray(y, dtype=np.int64))
    w_t = None if sample_weight is None else torch.from_numpy(np.asarray(sample_weight, dtype=np.float32))
    lam = torch.tensor(decays, dtype=torch.float32)
    batch_size = int(min(batch_size, n))
    has_val = X_val is not None and y_val is not None and len(y_val) > 0
    if early_stopping and not has_val:
        raise ValueError("early stopping needs validation data")

    # Parameters: first layer stacked as (D, G*out) so one matmul serves every member.
    first_out = hidden or n_classes
    if init is not None:
        W0 = np.repeat(init[0][0][None], members, axis=0)  # (G, D, out)
        W1 = torch.from_numpy(np.ascontiguousarray(W0.transpose(1, 0, 2).reshape(dim, members * first_out)))
        B1 = torch.from_numpy(np.repeat(init[0][1][None], members, axis=0).astype(np.float32))
    elif hidden:
        bound = math.sqrt(6.0 / dim)  # He-uniform for ReLU
        W1 = (torch.rand(dim, members * hidden, generator=generator) * 2 - 1) * bound
        B1 = torch.zeros(members, hidden)
    else:
        W1 = torch.zeros(dim, members * n_classes)
        B1 = torch.zeros(members, n_classes)
    params = [W1.float().requires_grad_(), B1.float().requires_grad_()]
    if hidden:
        if init is not None:
            W2 = torch.from_numpy(np.repeat(init[1][0][None], members, axis=0).astype(np.float32))
            B2 = torch.from_numpy(np.repeat(init[1][1][None], members, axis=0).astype(np.float32))
        else:
            bound = math.sqrt(1.0 / hidden)
            W2 = (torch.rand(members, hidden, n_classes, generator=generator) * 2 - 1) * bound
            B2 = torch.zeros(members, n_classes)
        params += [W2.requires_grad_(), B2.requires_grad_()]

    def forward(xb: torch.Tensor, train: bool) -> torch.Tensor:
        """(B, D) -> logits (B, G, C)."""
        out = (xb @ params[0]).view(len(xb), members, first_out) + params[1]
        if not hidden:
            return out
        out = torch.relu(out)
        if train and dropout > 0:
            # One mask per (row, unit), shared by the members: 1/G of the random numbers (the costly part).
            keep = torch.rand(len(xb), 1, hidden, generator=generator) >= dropout
            out = out * keep.to(out.dtype) * (1.0 / (1.0 - dropout))
        return torch.einsum("bgh,ghc->bgc", out, params[2]) + params[3]

    def member_penalty() -> torch.Tensor:
        total = (params[0].view(dim, members, first_out) ** 2).sum(dim=(0, 2))
        if hidden:
            total = total + (params[2] ** 2).sum(dim=(1, 2))
        return 0.5 * lam * total

    def decay_(step_lr: float) -> None:
        params[0].view(dim, members, first_out).mul_((1.0 - step_lr * lam).view(1, members, 1))
        if hidden:
            params[2].mul_((1.0 - step_lr * lam).view(members, 1, 1))

    def evaluate() -> tuple[np.ndarray, np.ndarray]:
        losses = torch.zeros(members, dtype=torch.float64)
        correct = torch.zeros(members, dtype=torch.float64)
        Xv = torch.from_numpy(X_val)
        yv = torch.from_numpy(np.asarray(y_val, dtype=np.int64))
        with torch.no_grad():
            for start in range(0, len(yv), 8192):
                logits = forward(Xv[start : start + 8192], False)
                target = yv[start : start + 8192]
                logp = torch.log_softmax(logits, dim=-1)
                picked = logp.gather(2, target.view(-1, 1, 1).expand(-1, members, 1)).squeeze(2)
                losses -= picked.sum(0).double()
                correct += (logits.argmax(-1) == target.view(-1, 1)).sum(0).double()
        return (losses / len(yv)).numpy(), (correct / len(yv)).numpy()

    def member_loss(xb: torch.Tensor, yb: torch.Tensor, wb: torch.Tensor | None) -> torch.Tensor:
        """Per-member mean (or weighted mean) cross-entropy of one batch: (G,)."""
        logp = torch.log_softmax(forward(xb, True), dim=-1)
        loss = -logp.gather(2, yb.view(-1, 1, 1).expand(-1, members, 1)).squeeze(2)
        if label_smoothing > 0:
            loss = (1 - label_smoothing) * loss - label_smoothing * logp.mean(dim=-1)
        if wb is None:
            return loss.mean(0)
        return (loss * wb.view(-1, 1)).sum(0) / wb.sum().clamp_min(1e-12)

    if optimizer == "lbfgs":
        if decoupled or early_stopping or dropout:
            raise ValueError("L-BFGS runs the deterministic L2 objective only")
        return _lbfgs(params, member_loss, member_penalty, evaluate if has_val else None, X_t, y_t, w_t,
                      steps=steps, decays=decays, dim=dim, first_out=first_out, hidden=hidden)

    # Adam by hand: torch.optim's first step imports torch._dynamo, seconds of a "fit in seconds".
    moments = [(torch.zeros_like(p), torch.zeros_like(p)) for p in params]
    beta1, beta2, adam_eps = 0.9, 0.999, 1e-8
    eval_every = max(1, steps // max(evaluations, 1))
    best_loss = np.full(members, np.inf)
    best_acc = np.zeros(members)
    best_step = np.full(members, steps)
    best_params = [p.detach().clone() for p in params] if early_stopping else None
    stale = 0
    last_train_loss = np.zeros(members)
    order = torch.randperm(n, generator=generator)
    cursor = 0
    step = 0
    for step in range(1, steps + 1):
        if cursor + batch_size > n:
            order, cursor = torch.randperm(n, generator=generator), 0
        index = order[cursor : cursor + batch_size]
        cursor += batch_size
        per_member = member_loss(X_t[index], y_t[index], None if w_t is None else w_t[index])
        objective = per_member if decoupled else per_member + member_penalty()
        step_lr = 0.5 * lr * (1 + math.cos(math.pi * (step - 1) / steps))
        for p in params:
            p.grad = None
        objective.sum().backward()
        with torch.no_grad():
            if decoupled:
                decay_(step_lr)
            correction1, correction2 = 1 - beta1**step, 1 - beta2**step
            for p, (m, v) in zip(params, moments, strict=True):
                m.mul_(beta1).add_(p.grad, alpha=1 - beta1)
                v.mul_(beta2).addcmul_(p.grad, p.grad, value=1 - beta2)
                p.addcdiv_(m, (v / correction2).sqrt_().add_(adam_eps), value=-step_lr / correction1)
        last_train_loss = per_member.detach().double().numpy()
        if early_stopping and (step % eval_every == 0 or step == steps):
            val_loss, val_acc = evaluate()
            improved = val_loss < best_loss - 1e-6
            leader_improved = bool(np.min(val_loss) < np.min(best_loss) - 1e-6)
            if improved.any():
                mask = torch.from_numpy(improved)
                with torch.no_grad():
                    # the first weight is column-stacked (D, G*out); the rest are member-first
                    best_params[0].view(dim, members, -1)[:, mask] = params[0].detach().view(dim, members, -1)[:, mask]
                    for kept, live in zip(best_params[1:], params[1:], strict=True):
                        kept[mask] = live.detach()[mask]
                best_loss = np.where(improved, val_loss, best_loss)
                best_acc = np.where(improved, val_acc, best_acc)
                best_step = np.where(improved, step, best_step)
            # Stop when the best member has not improved for `patience` evaluations: members
            # still improving behind it cannot become the choice in time to matter.
            stale = 0 if leader_improved else stale + 1
            if stale >= patience:
                logger.debug("early stop at step %d of %d", step, steps)
                break
    final = best_params if early_stopping else [p.detach() for p in params]
    if not early_stopping and has_val:
        with torch.no_grad():
            saved, params[:] = params[:], final
            best_loss, best_acc = evaluate()
            params[:] = saved
    return MemberFit(
        weight_decays=decays,
        layers=_layers(final, dim, members, first_out, hidden),
        val_loss=best_loss,
        val_accuracy=best_acc,
        best_step=best_step,
        steps=step,
        batch_size=batch_size,
        train_loss=last_train_loss,
    )


def _lbfgs(params, member_loss, member_penalty, evaluate, X_t, y_t, w_t, *, steps, decays, dim, first_out,
           hidden) -> MemberFit:
    """Full-batch L-BFGS on the summed members' L2 objectives, in float64 for an exact optimum."""
    import torch

    members = len(decays)
    shapes = [p.shape for p in params]
    sizes = [p.numel() for p in params]
    X64, w64 = X_t.double(), None if w_t is None else w_t.double()

    def unpack(x: np.ndarray) -> list:
        out, offset = [], 0
        for shape, size in zip(shapes, sizes, strict=True):
            out.append(torch.from_numpy(x[offset : offset + size]).view(shape).requires_grad_())
            offset += size
        return out

    def objective(x: np.ndarray) -> tuple[float, np.ndarray]:
        params[:] = unpack(x)
        value = (member_loss(X64, y_t, w64) + member_penalty().double()).sum()
        value.backward()
        return float(value.detach()), np.concatenate([p.grad.numpy().ravel() for p in params])

    x0 = np.concatenate([p.detach().double().numpy().ravel() for p in params])
    x, iterations = lbfgs_minimize(objective, x0, max_iter=int(steps))
    final = [t.detach().float() for t in unpack(x)]
    params[:] = final
    with torch.no_grad():
        val_loss, val_acc = evaluate() if evaluate is not None else (np.full(members, np.nan), np.zeros(members))
    return MemberFit(weight_decays=decays, layers=_layers(final, dim, members, first_out, hidden),
                     val_loss=val_loss, val_accuracy=val_acc, best_step=np.full(members, iterations),
                     steps=iterations, batch_size=len(y_t))


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


def _layers(final, dim: int, members: int, first_out: int, hidden: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """Torch parameters -> per-layer numpy (W (G, in, out), b (G, out))."""
    layers = [(final[0].view(dim, members, first_out).permute(1, 0, 2).contiguous().numpy(), final[1].numpy().copy())]
    if hidden:
        layers.append((final[2].numpy().copy(), final[3].numpy().copy()))
    return layers


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


def best_member(fit: MemberFit, X_val: np.ndarray, y_val: np.ndarray) -> int:
    """Among members whose val accuracy is within one standard error of the best (accuracy on
    a small val set is too noisy to pick by alone), the lowest temperature-calibrated val NLL."""
    return best_model([fit.member(i) for i in range(len(fit.weight_decays))], fit.val_accuracy, X_val, y_val)


def best_model(models: list[list[tuple[np.ndarray, np.ndarray]]], accuracy: np.ndarray, X_val: np.ndarray,
               y_val: np.ndarray) -> int:
    """``pick_best`` over candidate models: accuracy first, then calibrated NLL on the calibration rows."""
    close = within_one_se(accuracy, len(y_val))
    if len(close) == 1:
        return int(close[0])
    rows = calibration_rows(len(y_val), SELECTION_ROWS)
    nll = np.full(len(models), np.inf)
    nll[close] = calibrated_nlls(np.stack([member_logits(models[i], X_val[rows]) for i in close]), np.asarray(y_val)[rows])
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
    the candidates) among those within one standard error of the best accuracy."""
    candidates = within_one_se(accuracy, n_val)
    if len(candidates) == 1:
        return int(candidates[0])
    values = [float(loss(i)) if callable(loss) else float(np.asarray(loss)[i]) for i in candidates]
    return int(candidates[int(np.argmin(np.nan_to_num(values, nan=np.inf)))])


def sweep_table(fit: MemberFit, name: str, phase: str) -> list[dict]:
    return [
        {name: float(v), "phase": phase, "val_loss": float(loss), "val_accuracy": float(acc), "steps": int(s)}
        for v, loss, acc, s in zip(fit.weight_decays, fit.val_loss, fit.val_accuracy, fit.best_step, strict=True)
    ]


# -- large L2 problems: class-mean warm start, per-member L-BFGS, best validation iterate ------------


def class_mean_init(X: np.ndarray, y: np.ndarray, n_classes: int,
                    sample_weight: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The nearest-class-mean classifier as a linear layer: ``W = means.T``, ``b = -|mean|^2 / 2
    + log prior`` (LDA with an identity covariance, on standardized features).

    One pass over the data, and a far better start than zeros for a solver that can only
    afford a few passes: its argmax is already a sound classifier.
    """
    import torch

    weights = np.ones(len(y), dtype=np.float32) if sample_weight is None else np.asarray(sample_weight, np.float32)
    totals = np.bincount(y, weights=weights, minlength=n_classes)
    onehot = torch.zeros(n_classes, len(y))
    onehot[torch.from_numpy(np.asarray(y, dtype=np.int64)), torch.arange(len(y))] = torch.from_numpy(weights)
    means = (onehot @ torch.from_numpy(np.ascontiguousarray(X, dtype=np.float32))).double().numpy()  # class sums
    present = totals > 0
    means[present] /= totals[present, None]
    prior = np.log(np.where(present, totals, 1.0) / totals.sum())
    bias = np.where(present, -0.5 * np.sum(means**2, axis=1) + prior, -1e4)
    return np.ascontiguousarray(means.T, dtype=np.float32), bias.astype(np.float32)


def fit_scales(logits: np.ndarray, y: np.ndarray, weight_decays: np.ndarray, weight_norm2: float,
               iterations: int = 10) -> np.ndarray:
    """Per member, the factor ``a`` minimizing ``mean CE(a * logits) + lam/2 * a^2 * weight_norm2``.

    ``logits``: (n, C) shared by the members, or (G, n, C), one set per member.  Convex in
    ``a``: a few vectorized Newton steps from 1.  With ``weight_decays`` zero this is a
    temperature fit (``a = 1 / T``); otherwise the member's L2 penalty on the weights it
    scales is part of the objective.
    """
    import torch

    lam = torch.tensor(np.asarray(weight_decays, dtype=np.float64))
    z = torch.from_numpy(np.asarray(logits, dtype=np.float32))
    z = (z - z.max(dim=-1, keepdim=True).values).expand(len(lam), *z.shape[-2:])  # (G, n, C)
    labels = torch.from_numpy(np.asarray(y, dtype=np.int64)).view(1, -1, 1).expand(len(lam), -1, 1)
    picked = z.gather(2, labels).squeeze(2).double().mean(dim=1)  # (G,)
    a = torch.ones(len(lam), dtype=torch.float64)
    for _ in range(iterations):
        p = torch.softmax(a.float().view(-1, 1, 1) * z, dim=2)
        pz = p * z
        expected = pz.sum(dim=2)
        variance = ((pz * z).sum(dim=2) - expected**2).double().mean(dim=1)
        grad = expected.double().mean(dim=1) - picked + lam * a * weight_norm2
        hess = variance + lam * weight_norm2 + 1e-12
        a = torch.minimum(torch.maximum(a - grad / hess, a / 10), a * 10)
    return a.numpy()


def calibrated_nlls(logits: np.ndarray, y: np.ndarray) -> np.ndarray:
    """``calibrated_nll`` of G candidates at once: logits (G, n, C) -> (G,) NLL after each
    candidate's own temperature (within ``metrics.TEMPERATURE_BOUNDS``, never worse than T=1)."""
    import torch

    from embedx.metrics import TEMPERATURE_BOUNDS

    scale = fit_scales(logits, y, np.zeros(len(logits)), 0.0)
    scale = np.clip(scale, 1.0 / TEMPERATURE_BOUNDS[1], 1.0 / TEMPERATURE_BOUNDS[0])
    z = torch.from_numpy(np.asarray(logits, dtype=np.float32))
    labels = torch.from_numpy(np.asarray(y, dtype=np.int64)).view(1, -1, 1).expand(len(z), -1, 1)

    def nll(a: np.ndarray) -> np.ndarray:
        logp = torch.log_softmax(torch.from_numpy(a.astype(np.float32)).view(-1, 1, 1) * z, dim=2)
        return (-logp.gather(2, labels).squeeze(2).double().mean(dim=1)).numpy()

    return np.minimum(nll(scale), nll(np.ones(len(z))))


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
    import torch

    lam = torch.tensor(np.asarray(weight_decays, dtype=np.float64), dtype=torch.float32)
    members = len(lam)
    dim = X.shape[1]
    X_t = torch.from_numpy(np.ascontiguousarray(X, dtype=np.float32))
    y_t = torch.from_numpy(np.asarray(y, dtype=np.int64))
    n = len(y_t)
    if sample_weight is None:
        row_weight = torch.full((n, 1), 1.0 / n)
    else:
        w = np.asarray(sample_weight, dtype=np.float64)
        row_weight = torch.from_numpy((w / w.sum()).astype(np.float32)).view(-1, 1)
    Xv = torch.from_numpy(np.ascontiguousarray(X_val, dtype=np.float32))
    yv = torch.from_numpy(np.asarray(y_val, dtype=np.int64))
    target = y_t.view(-1, 1, 1).expand(-1, members, 1)

    def logits_of(rows: torch.Tensor, W: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """(n, D) x (D, G, C) -> (n, G, C)."""
        return (rows @ W.view(dim, members * n_classes)).view(len(rows), members, n_classes) + b

    def objective(logits: torch.Tensor, W: torch.Tensor) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        """Loss (G,) and gradient at weights ``W`` whose training logits are ``logits``: one matmul."""
        logp = torch.log_softmax(logits, dim=2)
        nll = -logp.gather(2, target).squeeze(2)  # (n, G)
        p = logp.exp_()
        p.scatter_add_(2, target, torch.full(target.shape, -1.0))  # P - Y
        p *= row_weight.view(-1, 1, 1)
        grad_W = (X_t.T @ p.view(n, members * n_classes)).view(dim, members, n_classes)
        grad_W += lam.view(1, -1, 1) * W
        loss = (nll * row_weight).sum(0) + 0.5 * lam * (W * W).sum(dim=(0, 2))
        return loss, (grad_W, p.sum(0))

    def step_length(logits: torch.Tensor, along: torch.Tensor, W: torch.Tensor, d_W: torch.Tensor,
                    slope: torch.Tensor) -> torch.Tensor:
        """Per member, Newton steps on f(t) = objective(W + t d) from t = 1, kept within a factor
        4 per step and positive.  f is convex in t, and only elementwise work is needed here."""
        cross, square = (W * d_W).sum(dim=(0, 2)), (d_W * d_W).sum(dim=(0, 2))
        along_y = along.gather(2, target).squeeze(2)  # (n, G)
        t = torch.ones(members)
        for _ in range(newton_steps):
            p = torch.softmax(logits + t.view(1, -1, 1) * along, dim=2)
            mean_along = (p * along).sum(dim=2)  # (n, G)
            first = ((mean_along - along_y) * row_weight).sum(0) + lam * (cross + t * square)
            second = (((p * along * along).sum(dim=2) - mean_along**2) * row_weight).sum(0) + lam * square
            t = (t - first / second.clamp_min(1e-20)).clamp(min=t / 4, max=t * 4)
        start = torch.logsumexp(logits, dim=2)

        def along_line(t: torch.Tensor) -> torch.Tensor:
            """f(t) - f(0), elementwise work only."""
            moved = torch.logsumexp(logits + t.view(1, -1, 1) * along, dim=2) - start - t * along_y
            return (moved * row_weight).sum(0) + 0.5 * lam * (2 * t * cross + t * t * square)

        t = torch.where(slope < 0, t, torch.zeros(members))
        for _ in range(10):  # a safeguard: Newton on a convex f rarely needs it
            worse = along_line(t) > 0
            if not bool(worse.any()):
                break
            t = torch.where(worse, t / 4, t)
        return t

    def dot(a: tuple, b: tuple) -> torch.Tensor:
        """Per-member inner product of two (W, b) pairs: (G,)."""
        return (a[0] * b[0]).sum(dim=(0, 2)) + (a[1] * b[1]).sum(dim=1)

    def axpy(alpha: torch.Tensor, a: tuple, b: tuple) -> tuple:
        """b + alpha * a, with one alpha per member."""
        return (b[0] + alpha.view(1, -1, 1) * a[0], b[1] + alpha.view(-1, 1) * a[1])

    def score(W: torch.Tensor, b: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        loss = torch.zeros(members, dtype=torch.float64)
        correct = torch.zeros(members, dtype=torch.float64)
        for start in range(0, len(yv), 8192):
            out = logits_of(Xv[start : start + 8192], W, b)
            truth = yv[start : start + 8192]
            logp = torch.log_softmax(out, dim=2)
            loss -= logp.gather(2, truth.view(-1, 1, 1).expand(-1, members, 1)).squeeze(2).sum(0).double()
            correct += (out.argmax(2) == truth.view(-1, 1)).sum(0).double()
        return (loss / len(yv)).numpy(), (correct / len(yv)).numpy()

    W0, b0 = init
    x = (torch.from_numpy(np.ascontiguousarray(np.asarray(W0, np.float32).transpose(1, 0, 2))),
         torch.from_numpy(np.ascontiguousarray(b0, dtype=np.float32)))
    best = (x[0].clone(), x[1].clone())
    best_loss, best_acc = score(*x)
    best_step = np.zeros(members, dtype=np.int64)
    with torch.no_grad():
        logits = logits_of(X_t, *x)
        value, grad = objective(logits, x[0])
        pairs: list[tuple[tuple, tuple, torch.Tensor]] = []
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
                gamma = dot(s, yk) / dot(yk, yk).clamp_min(1e-30)
                direction = (direction[0] * gamma.view(1, -1, 1), direction[1] * gamma.view(-1, 1))
                for (s, yk, rho), alpha in zip(pairs, reversed(alphas), strict=True):
                    direction = axpy(alpha - rho * dot(yk, direction), s, direction)
            else:
                norm = dot(grad, grad).sqrt().clamp_min(1.0)
                direction = (direction[0] / norm.view(1, -1, 1), direction[1] / norm.view(-1, 1))
            slope = dot(grad, direction)
            uphill = slope >= 0  # lost curvature information: that member steps down its gradient
            if bool(uphill.any()):
                keep = (~uphill).float()
                direction = axpy(-uphill.float() / dot(grad, grad).sqrt().clamp_min(1.0), grad,
                                 (direction[0] * keep.view(1, -1, 1), direction[1] * keep.view(-1, 1)))
                slope = dot(grad, direction)
            along = logits_of(X_t, *direction)  # the logits move along this line
            t = step_length(logits, along, x[0], direction[0], slope)
            new_x = axpy(t, direction, x)
            logits = logits + t.view(1, -1, 1) * along
            new_value, new_grad = objective(logits, new_x[0])
            s = (new_x[0] - x[0], new_x[1] - x[1])
            yk = (new_grad[0] - grad[0], new_grad[1] - grad[1])
            curvature = dot(s, yk)
            pairs.append((s, yk, torch.where(curvature > 1e-12, 1.0 / curvature.clamp_min(1e-12), torch.zeros(members))))
            del pairs[:-history]
            x, value, grad = new_x, new_value, new_grad
            val_loss, val_acc = score(*x)
            stale = 0 if val_acc.max() > best_acc.max() else stale + 1
            better = (val_acc > best_acc) | ((val_acc == best_acc) & (val_loss < best_loss)) | (not keep_best)
            if better.any():
                mask = torch.from_numpy(better)
                best[0][:, mask], best[1][mask] = x[0][:, mask], x[1][mask]
                best_loss = np.where(better, val_loss, best_loss)
                best_acc = np.where(better, val_acc, best_acc)
                best_step = np.where(better, iteration, best_step)
            if patience is not None and stale >= patience:
                break
    return MemberFit(
        weight_decays=np.asarray(weight_decays, dtype=np.float64),
        layers=[(best[0].permute(1, 0, 2).contiguous().numpy(), best[1].numpy().copy())],
        val_loss=best_loss, val_accuracy=best_acc, best_step=best_step, steps=iteration,
        batch_size=len(y_t), train_loss=value.double().numpy(),
    )
