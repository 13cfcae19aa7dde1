"""``fit_head`` (cache -> head directory) and ``evaluate`` (head + another cache -> metrics).

Splits come from the cache: ``train`` trains, ``val`` chooses the regularization,
fits the temperature and is reported, ``test`` is only reported.  A cache without
val rows gets a stable hash split of its train rows by content key (20%, the same
on every run, see ``embedx.data.split_for_key``), and the metrics say so in
``val_source``.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from embedx import paths
from embedx.errors import ConfigError, FeatureMismatchError, HeadError
from embedx.fsio import writer_lock
from embedx.heads.base import HEAD_TYPES, Head, check_head_output, head_dir_writer, load_head
from embedx.heads.linear import fixed_params, holdout_split
from embedx.heads.record import HeadRecord, head_record
from embedx.progress import ProgressCallback

logger = logging.getLogger(__name__)

DEFAULT_HEAD = "logreg"
VAL_FRACTION = 0.2
CONFUSION_PNG = "confusion_matrix.png"
RELIABILITY_PNG = "reliability.png"
#: Heads that train with a loss and can smooth their labels.
SMOOTHING_HEADS = ("linear", "mlp")


@dataclass(frozen=True)
class FitResult:
    head: Head
    metrics: dict[str, Any]
    output_dir: Path
    fit_seconds: float

    def to_dict(self) -> dict[str, Any]:
        """The summary ``embedx fit-head --json`` prints (one JSON object)."""
        val = self.metrics.get("val", {})
        return {
            "head_type": self.head.head_type,
            "output_dir": str(self.output_dir),
            "val_accuracy": val.get("accuracy"),
            "val_accuracy_ci": val.get("accuracy_ci"),
            "val_source": self.metrics.get("val_source"),
            "fit_seconds": self.fit_seconds,
            "params": {**self.head.get_params(), **self.head.chosen_params_},
            "temperature": float(self.head.temperature_),
            "classes": [str(c) for c in self.head.classes_],
            "plots": {
                "confusion_matrix": str(self.output_dir / CONFUSION_PNG),
                "reliability": str(self.output_dir / RELIABILITY_PNG),
            },
            "metrics": self.metrics,
        }


def make_head(name: str = DEFAULT_HEAD, **params: Any) -> Head:
    """A new, unfitted head of type ``name`` ("logreg", "linear", "mlp", "knn")."""
    if name not in HEAD_TYPES:
        raise ConfigError(f"unknown head type {name!r}; choose one of {sorted(HEAD_TYPES)}")
    cls = HEAD_TYPES[name]
    try:
        return cls(**params)
    except TypeError as e:
        raise ConfigError(f"invalid parameters for the {name} head: {e}") from e


def _read(cache: Any, *, load_features: bool = True):
    if isinstance(cache, (str, Path)):
        from embedx.cache import read_cache

        return read_cache(cache, load_features=load_features)
    for attribute in ("features", "labels", "classes", "splits", "keys", "meta"):
        if not hasattr(cache, attribute):
            raise ConfigError(f"expected a cache path or CacheData, got {type(cache).__name__} without .{attribute}")
    return cache


def _feature_rows(data, rows: np.ndarray) -> np.ndarray:
    """A new float32 array of the given rows: read from the file when the features were not
    loaded (then only these rows take memory), else copied out of the loaded ones."""
    if data.features is None:
        from embedx.cache import read_feature_rows

        return read_feature_rows(data.path, rows)
    return np.asarray(data.features, dtype=np.float32)[rows]


def _view_rows(data, sources: np.ndarray, kind: str) -> tuple[np.ndarray, np.ndarray]:
    """(features, clean row of each) of the cache's views of kind ``kind`` of rows ``sources``;
    none for a cache without views or in-memory data without a file."""
    path = getattr(data, "path", None)
    dim = int(data.meta.feature_dim)
    if not path or not Path(path).is_file():
        return np.empty((0, dim), np.float32), np.empty(0, np.int64)
    from embedx.cache import cache_info, read_views

    if cache_info(path)["rows"] != len(data.keys):  # a CacheData read with splits=: its rows are not the file's
        logger.warning("not using the views of %s: the data given hold a subset of its rows", path)
        return np.empty((0, dim), np.float32), np.empty(0, np.int64)
    views = read_views(path, sources=sources, kind=kind)
    return views.features, views.source


def _with_views(data, rows: np.ndarray, y_names: np.ndarray) -> tuple[np.ndarray, np.ndarray, int]:
    """Training features of ``rows`` followed by their augmented views (views of these rows only,
    so a view never lands on the other side of a split from its image), labels, and the view count."""
    X = _feature_rows(data, rows)
    X_views, source = _view_rows(data, rows, "augment")
    if not len(source):
        return X, y_names[rows], 0
    return np.concatenate([X, X_views]), np.concatenate([y_names[rows], y_names[source]]), len(source)


def _split_rows(data, seed: int, *, hold_out: bool = True) -> tuple[np.ndarray, np.ndarray, np.ndarray, str]:
    """(train, val, test) row indices, each ascending, and where val came from.

    A cache without val rows gives part of train as val (by content key, so copies of one image
    stay on one side), unless ``hold_out`` is False (cross-validation pools train and val anyway)."""
    splits = np.asarray(data.splits).astype(str)
    train = np.flatnonzero(splits == "train")
    val = np.flatnonzero(splits == "val")
    test = np.flatnonzero(splits == "test")
    if len(train) == 0:
        raise HeadError(
            f"cache {getattr(data, 'path', '')} has no rows in split 'train' (splits found: "
            f"{sorted(set(splits.tolist()))}); extract a data set with a train split"
        )
    if len(val):
        return train, val, test, "val split of the cache"
    if not hold_out:
        return train, val, test, "no val split in the cache"
    from embedx.data import split_for_key

    keys = np.asarray(data.keys).astype(str)
    in_val = np.asarray([split_for_key(k, VAL_FRACTION) == "val" for k in keys[train]], dtype=bool)
    labels = np.asarray(data.labels)
    if in_val.any() and len(np.unique(labels[train[~in_val]])) == len(np.unique(labels[train])):
        return train[~in_val], train[in_val], test, f"hash split of train ({VAL_FRACTION:.0%} by content key)"
    # Too few rows for the hash split to leave every class in train: seeded stratified holdout of
    # the distinct images (a key and its copies are held out together).
    unique, first, inverse = np.unique(keys[train], return_index=True, return_inverse=True)
    _, held = holdout_split(len(unique), labels[train][first], seed, VAL_FRACTION)
    if len(held) == 0:
        raise HeadError(f"only {len(train)} training rows: too few to hold any out for validation; add images")
    in_val = np.isin(inverse.ravel(), held)
    return train[~in_val], train[in_val], test, f"seeded stratified holdout of train ({VAL_FRACTION:.0%})"


def _head_params(head: str, *, class_weight, seed, label_smoothing, params) -> dict[str, Any]:
    values: dict[str, Any] = {"class_weight": class_weight, "seed": seed}
    if label_smoothing:
        if head not in SMOOTHING_HEADS:
            raise ConfigError(f"label smoothing applies to the {' and '.join(SMOOTHING_HEADS)} heads, not {head!r}")
        values["label_smoothing"] = float(label_smoothing)
    values.update(params or {})
    return values


def head_metrics(head: Head, X: np.ndarray, y_names: np.ndarray) -> tuple[dict[str, Any], np.ndarray, np.ndarray]:
    """Metrics of ``head`` on rows whose class it knows, plus (labels, logits) used."""
    from embedx.metrics import classification_metrics

    classes = np.asarray(head.classes_)
    known = np.isin(y_names, classes)
    order = np.argsort(classes, kind="stable")  # a loaded head's classes need not be sorted
    y_index = order[np.searchsorted(classes[order], y_names[known])]
    logits = head.logits(X[known])
    metrics = classification_metrics(y_index, logits, class_names=[str(c) for c in head.classes_],
                                     temperature=head.temperature_)
    if not known.all():
        metrics["skipped_unknown_class"] = int((~known).sum())
    return metrics, y_index, logits


def fit_head(
    cache: Any,
    *,
    head: str = DEFAULT_HEAD,
    output: str | Path | None = None,
    refit: bool = False,
    class_weight: str | None = None,
    seed: int = 0,
    label_smoothing: float = 0.0,
    params: dict[str, Any] | None = None,
    plots: bool = True,
    cv: int | None = None,
    progress: ProgressCallback | None = None,
    adapt_to: str | Path | None = None,
    adapt: str | None = None,
    views: bool = True,
) -> FitResult:
    """Train a head on a cache (path or ``CacheData``) and write its directory.

    ``refit``: after choosing hyperparameters on val, train again on train+val with
    them (val metrics and the temperature stay those of the model before the refit).
    ``adapt_to``: an unlabeled cache of the target domain (same backbone), to adapt with
    ``adapt`` (``heads.adapt.METHODS``, default ``heads.adapt.DEFAULT_METHOD``); val and test
    metrics are then of the source rows mapped as the head's training rows, and
    ``metrics["adaptation"]`` holds the guard's source-val accuracy before and after.
    ``views``: train on the cache's augmented views of the training rows too (``extract
    --views``); regularization is chosen and metrics reported on clean val rows only.
    ``cv=K``: choose them by stratified K-fold over train+val instead (``embedx.heads.cv``):
    the head is trained on train+val, the ``val`` metrics are the out-of-fold predictions
    over all train+val rows, ``metrics["cv"]`` holds the folds' accuracies (mean, sd).
    Without it, a val set too small for the choice it drives is warned about
    (``metrics["warnings"]``). ``cv`` does not combine with adaptation (a ``ConfigError``)
    and trains on clean rows only (a cache's views are left out, with a warning).
    """
    from embedx.metrics import plot_confusion_matrix, plot_reliability

    start = time.perf_counter()
    if class_weight not in (None, "balanced"):
        raise ConfigError(f"class_weight must be None or 'balanced', got {class_weight!r}")
    if output is not None:
        check_head_output(output)  # before the work: a folder that is not a head is never replaced
        if Path(output).parent.is_dir():  # another fit writing it is refused now, not after this one's work
            with writer_lock(output, what="head directory", error=HeadError):
                pass  # (the write takes the lock again)
    steps_total = 4 + int(refit and not cv)

    def report(done: int, stage: str) -> None:
        if progress is not None:
            progress(done, steps_total, {"stage": stage})

    # Features are read per use from a cache file, never all at once: the training rows
    # are read for this fit alone and standardized in place (fit(copy=False)), so the
    # peak is about one float32 copy of the training rows, not three.
    data = _read(cache, load_features=False)
    names = np.asarray(data.classes, dtype=str)
    labels = np.asarray(data.labels, dtype=np.int64)
    if len(labels) and (labels.min() < 0 or labels.max() >= len(names)):
        raise HeadError(f"cache labels must index its {len(names)} classes; "
                        f"found labels {labels.min()}..{labels.max()}")
    y_names = names[labels]
    # ascending rows, as read_feature_rows needs; --cv pools train and val, so holds nothing out
    train, val, test, val_source = _split_rows(data, seed, hold_out=not cv)
    values = _head_params(head, class_weight=class_weight, seed=seed, label_smoothing=label_smoothing, params=params)
    if cv and (adapt_to is not None or adapt is not None):
        raise ConfigError("--cv cannot be combined with --adapt-to yet (the adaptation would have to be fitted "
                          "inside every fold); choose one")
    model = make_head(head, **values)
    adapter = None
    if adapt_to is not None or adapt is not None:
        from embedx.heads.adapt import fit_adapter_on_cache

        adapter = fit_adapter_on_cache(data, _feature_rows(data, train), adapt_to, adapt)

    def rows_of(rows: np.ndarray) -> np.ndarray:  # the source rows as the head trains on them
        return _feature_rows(data, rows) if adapter is None else adapter.source(_feature_rows(data, rows))

    def train_set(rows: np.ndarray) -> tuple[np.ndarray, np.ndarray, int]:  # + their views, if asked
        X, y, n_views = _with_views(data, rows, y_names) if views else (_feature_rows(data, rows), y_names[rows], 0)
        return (X if adapter is None else adapter.source(X)), y, n_views

    report(0, "fit")
    pseudo_rows = None  # selftrain's pseudo-labeled target rows: the refit on train+val trains on them too
    if cv:
        model, metrics, val_y, val_logits = _fit_cv(data, train, val, y_names, head=head, values=values, folds=cv,
                                                    seed=seed)
        val_source = metrics["val_source"]
        metrics["n_train_views"] = 0
        if views and len(_view_rows(data, train, "augment")[1]):
            metrics.setdefault("warnings", []).append(
                "--cv trains on clean rows only: the cache's augmented views were not used (fit without --cv "
                "to train on them, or pass --no-views to silence this)")
            logger.warning("%s", metrics["warnings"][-1])
    else:
        X_val = rows_of(val)
        X_train, y_train, n_views = train_set(train)
        self_training = adapter is not None and adapter.target_rows is not None
        # fit(copy=False) standardizes X_train in place: self-training fits again on the same rows
        model.fit(X_train, y_train, X_val=X_val, y_val=y_names[val], copy=self_training)
        if self_training:
            from embedx.heads.adapt import self_train

            model, adapter.info["self_training"], pseudo_rows = self_train(
                adapter, model, lambda: make_head(head, **values), X_train, y_train, X_val, y_names[val])
        del X_train, y_train
        metrics = {"val_source": val_source, "n_train": int(len(train)), "n_val": int(len(val)),
                   "n_train_views": int(n_views)}
        metrics["val"], val_y, val_logits = head_metrics(model, X_val, y_names[val])
        del X_val
        from embedx.heads.cv import small_val_warnings

        metrics["warnings"] = small_val_warnings(model, len(val))
        for warning in metrics["warnings"]:
            logger.warning("%s", warning)
    report(1, "metrics")
    final = model
    if refit and not cv:
        report(2, "refit on train+val")
        rows = np.sort(np.concatenate([train, val]))
        X_rows, y_rows, _ = train_set(rows)
        if pseudo_rows is not None and len(pseudo_rows[1]):
            X_rows, y_rows = np.concatenate([X_rows, pseudo_rows[0]]), np.concatenate([y_rows, pseudo_rows[1]])
        final = make_head(head, **fixed_params(model)).fit(X_rows, y_rows, copy=False)
        del X_rows, y_rows
        final.temperature_ = model.temperature_
        final.chosen_params_ = {**model.chosen_params_, "refit": "train+val"}
        final.sweep_ = model.sweep_
        metrics["refit"] = True
        metrics["note"] = "val metrics and temperature are from the model before the refit on train+val"
    if len(test):
        metrics["test"], _, _ = head_metrics(final, rows_of(test), y_names[test])
    extra = {}
    if adapter is not None:
        before = metrics["val"]["accuracy"]
        if adapter.method != "none":  # the guard: the same head without adaptation, on the raw source rows
            X_plain, y_plain, _ = _with_views(data, train, y_names) if views else (
                _feature_rows(data, train), y_names[train], 0)  # trained as the adapted head was
            plain = make_head(head, **values).fit(X_plain, y_plain, X_val=_feature_rows(data, val),
                                                  y_val=y_names[val], copy=False)
            before = head_metrics(plain, _feature_rows(data, val), y_names[val])[0]["accuracy"]
        metrics["adaptation"] = extra["adaptation"] = adapter.record(before, metrics["val"]["accuracy"])
        final.adaptation_ = adapter.transform  # from here on the head sees target-domain rows
    fit_seconds = time.perf_counter() - start
    final.fit_seconds_ = fit_seconds
    output_dir = Path(output) if output is not None else default_output(data, head)
    report(steps_total - 2, "save")
    from embedx.cache import rows_digest

    record = head_record(final, data.meta, cache_path=getattr(data, "path", ""), metrics=metrics,
                         rows_sha256=rows_digest(data),
                         val_source=val_source, fit_seconds=fit_seconds, **extra)
    # head.json, weights and plots go to one new folder that replaces output_dir as a whole.
    with head_dir_writer(output_dir) as work:
        final.write_files(work, record)
        if plots:
            report(steps_total - 1, "plots")
            class_names = [str(c) for c in final.classes_]
            plot_confusion_matrix(np.asarray(metrics["val"]["confusion_matrix"]), class_names,
                                  work / CONFUSION_PNG, title=f"{head} head, val ({val_source})")
            plot_reliability(val_y, val_logits, work / RELIABILITY_PNG, temperature=model.temperature_,
                             title=f"{head} head, val reliability")
    report(steps_total, "done")
    logger.info("fitted %s head: val accuracy %.4f in %.2f s -> %s", head, metrics["val"]["accuracy"],
                fit_seconds, output_dir)
    return FitResult(head=final, metrics=metrics, output_dir=output_dir, fit_seconds=fit_seconds)


def _fit_cv(data, train: np.ndarray, val: np.ndarray, y_names: np.ndarray, *, head: str, values: dict[str, Any],
            folds: int, seed: int) -> tuple[Head, dict[str, Any], np.ndarray, np.ndarray]:
    """``fit_head(cv=K)``: (head trained on train+val, metrics, out-of-fold labels and logits)."""
    from embedx.heads.cv import cross_validate
    from embedx.metrics import classification_metrics, fit_temperature

    rows = np.sort(np.concatenate([train, val]))
    result = cross_validate(_feature_rows(data, rows), y_names[rows], head=head, params=values, folds=folds,
                            seed=seed, make_head=make_head, groups=np.asarray(data.keys).astype(str)[rows])
    model = result.head
    y_index = np.searchsorted(model.classes_, y_names[rows])
    model.temperature_ = fit_temperature(result.oof_logits, y_index)
    model.chosen_params_ = {**model.chosen_params_, "refit": "train+val", "cv_folds": folds}
    model.sweep_ = result.summary["table"]
    in_val = np.isin(rows, val)
    summary = {**result.summary, "val_rows": int(in_val.sum()),
               "val_rows_accuracy": float(np.mean(result.oof_logits[in_val].argmax(1) == y_index[in_val]))}
    metrics = {"val_source": f"{folds}-fold cross-validation over train+val (out-of-fold predictions)",
               "n_train": int(len(rows)), "n_val": int(len(rows)), "refit": True, "cv": summary,
               "note": "val metrics are out-of-fold predictions over train+val; the head is trained on all of them",
               "val": classification_metrics(y_index, result.oof_logits, class_names=[str(c) for c in model.classes_],
                                             temperature=model.temperature_)}
    return model, metrics, y_index, result.oof_logits


def default_output(data, head: str) -> Path:
    stem = Path(str(getattr(data, "path", "") or "cache")).stem or "cache"
    return paths.cache_dir() / "heads" / f"{stem}-{head}"


def check_compatible(record: HeadRecord, data, *, head_dir: Path) -> None:
    """Refuse a cache whose features are not what the head was trained on (says how to fix it)."""
    expected = record.cache
    meta = data.meta
    where = getattr(data, "path", "the cache")
    want_backbone, want_dim = expected.get("backbone", "?"), record.feature_dim
    fix = f"run `embedx extract --backbone {want_backbone} …` to build a cache this head can read"
    if int(meta.feature_dim) != want_dim or meta.backbone != want_backbone:
        raise FeatureMismatchError(
            f"cache {where} was built with {meta.backbone!r} ({meta.feature_dim}-d) but the head in "
            f"{head_dir} expects {want_backbone!r} ({want_dim}-d); {fix}"
        )
    fingerprint = expected.get("fingerprint")
    if fingerprint and fingerprint != meta.fingerprint:
        differences = [
            f"{key}: head {expected.get(key)!r} vs cache {value!r}"
            for key, value in meta.to_dict().items()
            if key != "onnx_path" and key in expected and expected.get(key) != value
        ]
        raise FeatureMismatchError(
            f"cache {where} has fingerprint {meta.fingerprint[:12]}… but the head in {head_dir} was trained on "
            f"{fingerprint[:12]}… ({'; '.join(differences) or 'other model settings'}); "
            f"{fix} with the same weights, layer and precision"
        )


def evaluate(head_dir: str | Path, cache: Any, *, splits: list[str] | None = None) -> dict[str, Any]:
    """Metrics of a saved head on a cache made with the same backbone, keyed by split name.

    One split evaluated (``splits=["val"]``, or a cache with rows in one split only): one key,
    that split's name.  Several: one key per split plus ``"all"`` over their rows together.
    """
    head_dir = Path(head_dir)
    model = load_head(head_dir)
    data = _read(cache, load_features=False)
    check_compatible(model.record_, data, head_dir=head_dir)
    names = np.asarray(data.classes, dtype=str)
    y_names = names[np.asarray(data.labels, dtype=np.int64)]
    row_splits = np.asarray(data.splits).astype(str)
    wanted = list(dict.fromkeys(splits)) if splits else sorted(set(row_splits.tolist()))
    result: dict[str, Any] = {"head": str(head_dir), "cache": str(getattr(data, "path", "")),
                              "head_type": model.head_type}
    selected = np.flatnonzero(np.isin(row_splits, wanted))
    if len(selected) == 0:
        raise HeadError(f"cache {result['cache']} has no rows in splits {wanted}; "
                        f"it has {sorted(set(row_splits.tolist()))}")
    known = np.isin(y_names[selected], model.classes_)
    if not known.any():
        raise HeadError(
            f"none of the cache's classes {sorted(set(y_names[selected].tolist()))[:10]} is one the head knows "
            f"({[str(c) for c in model.classes_][:10]}); evaluate on a data set with the same class names"
        )
    features, y_selected = _feature_rows(data, selected), y_names[selected]  # the wanted splits' rows only
    present = [split for split in wanted if np.any(row_splits[selected] == split)]
    if len(present) > 1:
        result["all"], _, _ = head_metrics(model, features, y_selected)
        for split in present:
            inside = row_splits[selected] == split
            if np.isin(y_selected[inside], model.classes_).any():
                result[split], _, _ = head_metrics(model, features[inside], y_selected[inside])
    else:
        result[present[0]], _, _ = head_metrics(model, features, y_selected)
    return result
