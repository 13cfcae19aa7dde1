"""Domain adaptation on cached features: ``fit_head(..., adapt_to=TARGET, adapt=METHOD)``.

The head is trained on labeled *source* features and used on an unlabeled *target*
domain (a cache of the target images from the same backbone). Each method is a pair
of maps: one applied to the source features the head trains on, one applied to every
feature the head sees afterwards (predict, evaluate, the bundle graph):

* ``none``: both the identity.
* ``standardize`` (per-domain standardization): source rows ``(x - mean_s) / std_s``,
  target rows ``(x - mean_t) / std_t``, each domain with its own per-feature statistics.
  At prediction time the target's mean and std are applied.
* ``coral`` (CORAL, Sun et al. 2016, closed form) on top of per-domain standardization:
  the standardized source is whitened with its own covariance and recoloured with the
  target's, ``z_s @ C_s^-1/2 @ C_t^1/2``, so that its covariance becomes the target's;
  target rows are standardized as in ``standardize`` (the covariance step changes only
  what the head trains on). Shrinkage: with a few hundred rows in 1,280 dimensions a
  sample covariance is singular, so each domain's covariance (of standardized features,
  i.e. a correlation matrix) is shrunk towards the identity,
  ``(1 - a) C + a I``, with the Ledoit-Wolf estimate of ``a`` per domain
  (``sklearn.covariance.ledoit_wolf_shrinkage``): the weight that minimizes the expected
  squared error of the estimate, chosen from the data, no knob. ``shrinkage=`` fixes it.
* ``selftrain``: ``standardize``, then one round of self-training that uses the target's own
  structure: the head labels the (standardized) target rows, those whose calibrated top
  probability is at least ``PSEUDO_LABEL_THRESHOLD`` join the source training rows with
  that pseudo-label, and the head is fitted again (regularization chosen on source val, as
  before). Prediction applies the same target statistics as ``standardize``.

What prediction needs (the target's ``mean`` and ``scale``, float32, ``feature_dim`` each)
is saved as ``adaptation.safetensors`` in the head directory and described by the
``adaptation`` field of head.json (``method``, ``file``, the target cache, the shrinkage,
the guard's source-val accuracies). :func:`load_transform` reads it back as an untrusted
input: a known method, a file name inside the head directory, arrays of the right shape,
finite, positive scales; anything else is one ``HeadError`` line.

The guard: the fit also trains the same head without adaptation and reports source-val
accuracy before and after (the adapted head on the source val rows mapped like its training
rows); it warns when adaptation costs more than ``GUARD_DROP`` there.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from embedx.errors import ConfigError, FeatureMismatchError, HeadError

logger = logging.getLogger(__name__)

METHODS = ("none", "standardize", "coral", "selftrain")
#: chosen from bench/adapt.py (bench/results/adapt.json): see docs/adaptation.md
DEFAULT_METHOD = "selftrain"
ADAPT_FILE = "adaptation.safetensors"
#: adaptation that costs more than this much source-val accuracy is reported with a warning
GUARD_DROP = 0.01
#: the prediction-time arrays of each method
_ARRAYS = {"none": (), "standardize": ("mean", "scale"), "coral": ("mean", "scale"), "selftrain": ("mean", "scale")}
#: selftrain: target rows whose calibrated top probability reaches this join training with their pseudo-label
PSEUDO_LABEL_THRESHOLD = 0.8


@dataclass(frozen=True)
class FeatureTransform:
    """``(x - mean) / scale``, applied to every feature row an adapted head sees."""

    mean: np.ndarray
    scale: np.ndarray

    def apply(self, X: np.ndarray) -> np.ndarray:
        return ((X - self.mean) / self.scale).astype(np.float32, copy=False)

    def arrays(self) -> dict[str, np.ndarray]:
        return {"mean": self.mean, "scale": self.scale}

    def onnx_nodes(self, builder: Any, features: str) -> str:
        """The same two operations in a head graph (constants named apart from the head's own)."""
        centered = builder.node("Sub", [features, builder.const("adapt_mean", self.mean)])
        return builder.node("Div", [centered, builder.const("adapt_scale", self.scale)])


@dataclass(frozen=True)
class Adapter:
    """A fitted adaptation: ``source(X)`` maps source rows (what the head trains on),
    ``transform`` is applied at prediction time (None for ``none``)."""

    method: str
    source_mean: np.ndarray | None = None
    source_scale: np.ndarray | None = None
    #: CORAL's whiten-then-recolour matrix on standardized source rows
    matrix: np.ndarray | None = None
    transform: FeatureTransform | None = None
    info: dict[str, Any] | None = None
    #: the target rows, mapped (selftrain's pseudo-labelling needs them)
    target_rows: np.ndarray | None = None

    def source(self, X: np.ndarray) -> np.ndarray:
        if self.method == "none":
            return X
        Z = ((X - self.source_mean) / self.source_scale).astype(np.float32)
        if self.matrix is not None:
            Z = (Z @ self.matrix).astype(np.float32)
        return Z

    def record(self, before: float | None, after: float | None) -> dict[str, Any]:
        """The head.json ``adaptation`` field."""
        fields: dict[str, Any] = {"method": self.method, **(self.info or {})}
        if self.transform is not None:
            fields["file"] = ADAPT_FILE
        fields["source_val_accuracy_before"] = before
        fields["source_val_accuracy_after"] = after
        warning = guard(before, after, self.method) if before is not None and after is not None else None
        if warning:
            logger.warning("%s", warning)
            fields["warning"] = warning
        return fields


def check_method(method: str) -> str:
    if method not in METHODS:
        raise ConfigError(f"unknown adaptation {method!r}; choose one of {list(METHODS)}")
    return method


def domain_stats(X: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-feature mean and std (float64 sums; a constant feature keeps scale 1)."""
    from embedx.heads.base import standardizer

    return standardizer(np.asarray(X, dtype=np.float32))


def shrunk_covariance(Z: np.ndarray, shrinkage: float | None = None) -> tuple[np.ndarray, float]:
    """``(1 - a) C + a * mean(diag C) * I`` of centred rows ``Z`` (float64) and ``a``;
    ``a`` by Ledoit-Wolf unless given."""
    Z = np.asarray(Z, dtype=np.float64)
    Z = Z - Z.mean(axis=0)
    covariance = Z.T @ Z / max(len(Z), 1)
    if shrinkage is None:
        from sklearn.covariance import ledoit_wolf_shrinkage

        shrinkage = float(ledoit_wolf_shrinkage(Z, assume_centered=True))
    if not 0.0 <= shrinkage <= 1.0:
        raise ConfigError(f"CORAL shrinkage must be in [0, 1], got {shrinkage}")
    target = float(np.trace(covariance)) / covariance.shape[0]
    shrunk = (1.0 - shrinkage) * covariance
    shrunk[np.diag_indices_from(shrunk)] += shrinkage * target
    return shrunk, float(shrinkage)


def _matrix_power(S: np.ndarray, power: float) -> np.ndarray:
    values, vectors = np.linalg.eigh(S)
    values = np.maximum(values, 1e-12 * max(float(values.max()), 1e-300))
    return (vectors * values**power) @ vectors.T


def coral_matrix(source_covariance: np.ndarray, target_covariance: np.ndarray) -> np.ndarray:
    """``C_s^-1/2 @ C_t^1/2``: rows with covariance ``C_s`` times it have covariance ``C_t``
    (``A.T @ C_s @ A == C_t``)."""
    return _matrix_power(source_covariance, -0.5) @ _matrix_power(target_covariance, 0.5)


def fit_adapter(source: np.ndarray, target: np.ndarray, *, method: str, shrinkage: float | None = None) -> Adapter:
    """The adaptation of ``method`` from source rows (the head's training rows) to target rows."""
    check_method(method)
    if method == "none":
        return Adapter(method="none")
    # selftrain's statistics are standardize's; its second fit is self_train
    if len(target) < 2:
        raise HeadError(f"the target domain has {len(target)} rows; adaptation needs at least 2 (more than a few "
                        "dozen for stable statistics)")
    source_mean, source_scale = domain_stats(source)
    target_mean, target_scale = domain_stats(target)
    transform = FeatureTransform(mean=target_mean, scale=target_scale)
    info: dict[str, Any] = {"n_target": int(len(target))}
    matrix = None
    if method == "coral":
        source_cov, source_shrinkage = shrunk_covariance((source - source_mean) / source_scale, shrinkage)
        target_cov, target_shrinkage = shrunk_covariance(transform.apply(target), shrinkage)
        matrix = coral_matrix(source_cov, target_cov).astype(np.float32)
        info["shrinkage"] = {"source": source_shrinkage, "target": target_shrinkage,
                             "rule": "fixed" if shrinkage is not None else "ledoit-wolf"}
    return Adapter(method=method, source_mean=source_mean, source_scale=source_scale, matrix=matrix,
                   transform=transform, info=info,
                   target_rows=transform.apply(target) if method == "selftrain" else None)


def self_train(adapter: Adapter, head: Any, new_head: Any, X_train: np.ndarray, y_train: np.ndarray,
               X_val: np.ndarray, y_val: np.ndarray) -> tuple[Any, dict[str, Any], tuple[np.ndarray, np.ndarray]]:
    """``selftrain``'s second fit: ``new_head()`` on the source rows plus the confidently
    pseudo-labeled target rows of ``head``; returns it, what it did, and those target rows with
    their pseudo-labels (a refit on train+val adds them again)."""
    probabilities = head.predict_proba(adapter.target_rows)
    confident = probabilities.max(axis=1) >= PSEUDO_LABEL_THRESHOLD
    pseudo = head.classes_[probabilities.argmax(axis=1)][confident]
    info = {"threshold": PSEUDO_LABEL_THRESHOLD, "pseudo_labeled": int(confident.sum()),
            "of": int(len(confident)), "per_class": {str(c): int((pseudo == c).sum()) for c in head.classes_}}
    pseudo_rows = (adapter.target_rows[confident], pseudo)
    if not confident.any():
        logger.warning("selftrain: no target row reached probability %.2f; the head is standardize's",
                       PSEUDO_LABEL_THRESHOLD)
        return head, info, pseudo_rows
    X = np.concatenate([X_train, pseudo_rows[0]])
    y = np.concatenate([np.asarray(y_train), pseudo])
    return new_head().fit(X, y, X_val=X_val, y_val=y_val, copy=False), info, pseudo_rows


def read_target(path: str | Path, source_meta: Any) -> tuple[np.ndarray, dict[str, Any]]:
    """All rows of the target cache ``path`` (labels ignored), refused unless its features have
    the source cache's identity (backbone, weights, layer, preprocessing, dtype, precision)."""
    from embedx.cache import read_cache

    target = read_cache(path)
    differences = source_meta.differences(target.meta)
    if differences:
        raise FeatureMismatchError(
            f"target cache {path} does not hold features of the same model as the source ({'; '.join(differences)}"
            f"); extract the target images with the source's settings (`embedx extract --backbone "
            f"{source_meta.backbone} --dtype {source_meta.dtype} …`)"
        )
    if len(target) == 0:
        raise HeadError(f"target cache {path} has no rows; extract the target domain's images into it")
    from embedx.cache import rows_digest

    return target.features, {"target_cache": str(Path(path).absolute()), "target_fingerprint": target.meta.fingerprint,
                             "target_rows_sha256": rows_digest(target)}


def fit_adapter_on_cache(data: Any, source_train: np.ndarray, adapt_to: str | Path | None,
                         method: str | None) -> Adapter:
    """``fit_head``'s adapter: from the source's training rows to all rows of the cache ``adapt_to``."""
    method = check_method(method or DEFAULT_METHOD)
    if adapt_to is None:
        raise ConfigError(f"adaptation {method!r} needs the target domain: pass adapt_to= (--adapt-to TARGET.h5), "
                          "an unlabeled cache of the target images from the same backbone")
    target, target_info = read_target(adapt_to, data.meta)
    adapter = fit_adapter(source_train, target, method=method)
    return replace(adapter, info={**target_info, **(adapter.info or {})})


def guard(before: float, after: float, method: str) -> str | None:
    """The warning when adaptation costs more than ``GUARD_DROP`` source-val accuracy, else None."""
    if after >= before - GUARD_DROP:
        return None
    return (f"adaptation {method!r} lowered source-val accuracy from {before:.4f} to {after:.4f} "
            f"({(after - before) * 100:+.1f} points); compare `--adapt none` on the target before using it")


# -- the head directory: write and load the prediction-time transform


def write_transform(folder: Path, transform: FeatureTransform | None, record: Any) -> None:
    """``adaptation.safetensors`` in ``folder`` when the head has a prediction-time transform
    (whose head.json ``record`` must then name it)."""
    if transform is None:
        return
    if (record.fields.get("adaptation") or {}).get("file") != ADAPT_FILE:
        raise HeadError("this head applies a feature transform but its record has no adaptation field naming "
                        f"{ADAPT_FILE}; save it through fit_head(adapt_to=...)")
    from safetensors.numpy import save_file

    arrays = {k: np.ascontiguousarray(v, dtype=np.float32) for k, v in transform.arrays().items()}
    save_file(arrays, str(Path(folder) / ADAPT_FILE), metadata={"format": "embedx-adaptation"})


def load_transform(record: Any) -> FeatureTransform | None:
    """The prediction-time transform a head directory records (None without adaptation);
    every problem with the untrusted field or file is one HeadError line."""
    field = record.fields.get("adaptation")
    if field is None:
        return None
    where = f"{record.directory}/head.json" if record.directory is not None else "head.json"
    fix = "refit the head with `embedx fit-head --adapt-to …`"
    if not isinstance(field, dict):
        raise HeadError(f"{where}: 'adaptation' must be an object, found {field!r:.80}; {fix}")
    method = field.get("method")
    if method not in METHODS:
        raise HeadError(f"{where}: adaptation.method must be one of {list(METHODS)}, found {method!r:.80}; {fix}")
    names = _ARRAYS[method]
    if not names:
        return None
    name = field.get("file")
    if not isinstance(name, str) or name in ("", ".", "..") or Path(name).name != name or "\\" in name:
        raise HeadError(f"{where}: adaptation.file must be a file name in the head directory, found "
                        f"{name!r:.80}; {fix}")
    path = Path(record.directory) / name
    if not path.is_file() or path.is_symlink():
        raise HeadError(f"{path} is missing or not a regular file, but head.json says the head was adapted "
                        f"({method}); {fix}")
    from safetensors import SafetensorError
    from safetensors.numpy import load_file

    try:
        arrays = load_file(str(path))
    except (OSError, SafetensorError) as e:
        raise HeadError(f"cannot read the adaptation statistics {path}: {' '.join(str(e).split())[:160]}; "
                        f"{fix}") from e
    dim = record.feature_dim
    for array_name in names:
        array = arrays.get(array_name)
        if array is None:
            raise HeadError(f"{path} lacks the array {array_name!r} that {method} needs; {fix}")
        if array.shape != (dim,) or not np.issubdtype(array.dtype, np.floating):
            raise HeadError(f"{path}: {array_name!r} must be {dim} floats (the head's feature_dim), found "
                            f"{array.dtype} of shape {array.shape}; {fix}")
        if not np.isfinite(array).all():
            raise HeadError(f"{path}: {array_name!r} holds NaN or infinite values; {fix}")
    if not (arrays["scale"] > 0).all():
        raise HeadError(f"{path}: 'scale' must be positive everywhere; {fix}")
    return FeatureTransform(mean=arrays["mean"].astype(np.float32), scale=arrays["scale"].astype(np.float32))
