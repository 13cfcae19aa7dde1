"""Cosine k-NN with temperature-weighted votes (the DINO / VISSL evaluation).

Features are L2-normalized; the k most similar training rows vote for their
class with weight ``exp(sim / T)`` (T = 0.07).  ``logits = log(votes + eps)``,
so ``softmax(logits)`` is the normalized vote.  For numerical range the
similarities are shifted by the row's best similarity before ``exp``, which
``softmax`` does not see.  ``k="auto"`` picks k on validation data from
(1, 5, 10, 20, 50, 100, 200) by accuracy, then log-loss.
"""

from __future__ import annotations

import logging

import numpy as np

from embedx.errors import HeadError
from embedx.heads.base import GraphBuilder, Head, overwritable, register

logger = logging.getLogger(__name__)

K_GRID = (1, 5, 10, 20, 50, 100, 200)
VOTE_EPS = 1e-6
_CHUNK = 4096


def l2_normalize(X: np.ndarray, *, in_place: bool = False) -> np.ndarray:
    """Rows scaled to unit length (float32); ``in_place`` overwrites a writable float32 ``X``."""
    norms = np.sqrt(np.einsum("ij,ij->i", X, X))[:, None].astype(np.float32, copy=False)
    np.maximum(norms, 1e-12, out=norms)
    if in_place and overwritable(X):
        X /= norms
        return X
    return np.divide(X, norms, dtype=np.float32)


@register
class KNNHead(Head):
    head_type = "knn"

    def __init__(self, *, k: int | str = 20, vote_temperature: float = 0.07, class_weight: str | None = None,
                 seed: int = 0) -> None:
        self.k = k
        self.vote_temperature = vote_temperature
        self.class_weight = class_weight
        self.seed = seed

    def _fit(self, X, y, val, sample_weight, *, overwrite: bool) -> None:
        if not self.vote_temperature > 0:
            raise HeadError(f"vote_temperature must be > 0, got {self.vote_temperature}")
        self.bank_ = l2_normalize(X, in_place=overwrite)
        self.bank_labels_ = y.astype(np.int64)
        # class_weight: each vote is scaled by its class's weight (sample weights are per row)
        weights = np.ones(len(y), dtype=np.float32) if sample_weight is None else sample_weight.astype(np.float32)
        self.bank_weights_ = weights
        if self.k == "auto":
            if val is None or not len(val[1]):
                raise HeadError("k='auto' needs validation data (X_val, y_val); or pass k=20")
            self.k_ = self._choose_k(val[0], val[1])
        else:
            if int(self.k) < 1:
                raise HeadError(f"k must be >= 1 or 'auto', got {self.k!r}")
            self.k_ = int(self.k)
        self.chosen_params_ = {"k": int(min(self.k_, len(y)))}

    def _choose_k(self, X_val: np.ndarray, y_val: np.ndarray) -> int:
        from embedx.heads.members import calibrated_nll, pick_best
        from embedx.metrics import log_loss, softmax

        calibrated = []
        for k in K_GRID:
            if k > len(self.bank_labels_) and k != K_GRID[0]:
                break
            self.k_ = k
            logits = self._logits(X_val)
            acc = float(np.mean(logits.argmax(1) == y_val))
            calibrated.append(calibrated_nll(logits, y_val))
            self.sweep_.append({"k": k, "val_accuracy": acc, "val_loss": log_loss(y_val, softmax(logits)),
                                "val_loss_calibrated": calibrated[-1]})
        accuracy = [row["val_accuracy"] for row in self.sweep_]
        best = pick_best(np.asarray(accuracy), np.asarray(calibrated), len(y_val))
        return int(self.sweep_[best]["k"])

    @property
    def _k_eff(self) -> int:
        return int(min(self.k_, len(self.bank_labels_)))

    def _logits(self, X: np.ndarray) -> np.ndarray:
        k = self._k_eff
        n_classes = len(self.classes_)
        out = np.empty((len(X), n_classes), dtype=np.float32)
        onehot = np.eye(n_classes, dtype=np.float32)[self.bank_labels_] * self.bank_weights_[:, None]
        for start in range(0, len(X), _CHUNK):
            sims = l2_normalize(X[start : start + _CHUNK]) @ self.bank_.T
            top = np.argpartition(-sims, k - 1, axis=1)[:, :k] if k < sims.shape[1] else np.broadcast_to(
                np.arange(sims.shape[1]), sims.shape)
            top_sims = np.take_along_axis(sims, top, axis=1)
            weights = np.exp((top_sims - top_sims.max(axis=1, keepdims=True)) / np.float32(self.vote_temperature))
            votes = np.einsum("nk,nkc->nc", weights, onehot[top])
            out[start : start + _CHUNK] = np.log(votes + np.float32(VOTE_EPS))
        return out

    def _arrays(self) -> dict[str, np.ndarray]:
        return {"bank": self.bank_, "bank_labels": self.bank_labels_, "bank_weights": self.bank_weights_,
                "k": np.asarray([self.k_], dtype=np.int64)}

    def _set_arrays(self, arrays: dict[str, np.ndarray]) -> None:
        bank, labels, weights, k = arrays["bank"], arrays["bank_labels"], arrays["bank_weights"], arrays["k"]
        # weights files are untrusted: a label outside the classes would index the one-hot from the end
        n_classes = len(getattr(self, "classes_", ()))
        if (bank.ndim != 2 or labels.shape != (len(bank),) or weights.shape != (len(bank),)
                or not np.issubdtype(labels.dtype, np.integer) or k.shape != (1,) or int(k[0]) < 1):
            raise HeadError("the kNN head's arrays do not fit together (bank, bank_labels, bank_weights, k); "
                            "refit the head")
        if len(labels) and n_classes and (labels.min() < 0 or labels.max() >= n_classes):
            raise HeadError(f"the kNN head's bank labels lie outside its {n_classes} classes; refit the head")
        self.bank_, self.bank_labels_, self.bank_weights_ = bank, labels.astype(np.int64), weights
        self.k_ = int(k[0])

    def _onnx_nodes(self, builder: GraphBuilder, features: str) -> str:
        """Normalize -> MatMul(bank^T) -> TopK -> exp((s - s_max)/T) -> weighted one-hot votes -> Log."""
        n_classes = len(self.classes_)
        onehot = np.eye(n_classes, dtype=np.float32)[self.bank_labels_] * self.bank_weights_[:, None]
        square = builder.node("Mul", [features, features])
        norm = builder.node("Sqrt", [builder.node("ReduceSum", [square, builder.const("axis1", [1], np.int64)],
                                                  keepdims=1)])
        norm = builder.node("Max", [norm, builder.const("norm_floor", 1e-12)])
        x = builder.node("Div", [features, norm])
        sims = builder.node("MatMul", [x, builder.const("bank_t", np.ascontiguousarray(self.bank_.T))])
        top_sims, top_index = "topk_values", "topk_indices"
        builder.node("TopK", [sims, builder.const("k", [self._k_eff], np.int64)], [top_sims, top_index], axis=1,
                     largest=1, sorted=1)
        best = builder.node("ReduceMax", [top_sims], axes=[1], keepdims=1)
        shifted = builder.node("Div", [builder.node("Sub", [top_sims, best]),
                                       builder.const("vote_t", self.vote_temperature)])
        weights = builder.node("Unsqueeze", [builder.node("Exp", [shifted]), builder.const("axis2", [2], np.int64)])
        neighbours = builder.node("Gather", [builder.const("onehot", onehot), top_index], axis=0)  # (N, k, C)
        votes = builder.node("ReduceSum", [builder.node("Mul", [neighbours, weights]),
                                           builder.const("axis1b", [1], np.int64)],
                             keepdims=0)
        return builder.node("Log", [builder.node("Add", [votes, builder.const("vote_eps", VOTE_EPS)])])
