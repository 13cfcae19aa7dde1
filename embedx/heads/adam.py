"""Train many weight decays at once: minibatch Adam on G models side by side, one torch pass.

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

Used by the ``linear`` and ``mlp`` heads (the L2 problems of ``logreg`` have exact
solvers in ``embedx.heads.lbfgs``).  torch is imported inside the functions.
"""

from __future__ import annotations

import logging
import math

import numpy as np

from embedx.heads.arrays import threads_for, torch_namespace
from embedx.heads.members import MemberFit

logger = logging.getLogger(__name__)

#: Forward multiply-adds (rows x dims x outputs x members x epochs) the coarse phase may spend; the
#: refinement gets half.  50k x 2048 x 100 gets the minimum, 2 coarse epochs: seconds, not minutes.
WORK_BUDGET = 1.0e11



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
) -> MemberFit:
    """Train ``len(weight_decays)`` models on standardized float32 features at once.

    With ``early_stopping`` (needs validation data) each member keeps its weights
    from the evaluation with the lowest validation loss, and training stops when no
    member improved for ``patience`` evaluations.  ``init``: one member's layers to
    start every member from (warm start for a refinement).

    Small problems run on one thread (``arrays.threads_for``).
    """
    import torch

    work = min(batch_size, X.shape[0]) * X.shape[1] * len(weight_decays) * (hidden or n_classes)
    # dropout draws from the global generator: seed it, privately
    with threads_for(torch_namespace(), work), torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(seed))
        return _train_members(X, y, n_classes, weight_decays=weight_decays, X_val=X_val, y_val=y_val,
                              sample_weight=sample_weight, hidden=hidden, dropout=dropout,
                              label_smoothing=label_smoothing, decoupled=decoupled, lr=lr, steps=steps,
                              batch_size=batch_size, seed=seed, early_stopping=early_stopping,
                              evaluations=evaluations, patience=patience, init=init)


def _train_members(X, y, n_classes, *, weight_decays, X_val, y_val, sample_weight, hidden, dropout,
                   label_smoothing, decoupled, lr, steps, batch_size, seed, early_stopping, evaluations,
                   patience, init) -> MemberFit:
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


def _layers(final, dim: int, members: int, first_out: int, hidden: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """Torch parameters -> per-layer numpy (W (G, in, out), b (G, out))."""
    layers = [(final[0].view(dim, members, first_out).permute(1, 0, 2).contiguous().numpy(), final[1].numpy().copy())]
    if hidden:
        layers.append((final[2].numpy().copy(), final[3].numpy().copy()))
    return layers

