"""The contract every head follows, saving/loading, and ONNX graph helpers.

scikit-learn style: ``__init__`` stores parameters only; ``fit`` validates, learns
state whose names end in ``_`` and returns ``self``.  Inference (``logits``,
``predict_proba``, ``predict``) is numpy only, and so is ``load_head``: torch is
imported inside the training code of the torch heads and nowhere else.

A saved head is a directory: ``head.json`` (``heads.record.HeadRecord``) and
``weights.safetensors`` (numpy arrays, no pickle), plus the PNGs ``fit_head``
draws, replaced as a whole (``head_dir_writer``).  ``predict_proba`` returns
``softmax(logits / temperature_)``, the same numbers a bundle computes.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from embedx import __version__
from embedx.errors import FeatureMismatchError, HeadError, NotFittedError
from embedx.fsio import atomic_dir, make_parent, remove_stale_temporaries, reporting_write_errors, writer_lock
from embedx.heads.adapt import load_transform, write_transform
from embedx.heads.record import HEAD_JSON, SCHEMA_VERSION, WEIGHTS_FILE, HeadRecord

logger = logging.getLogger(__name__)

ONNX_OPSET = 17
ONNX_IR_VERSION = 8
#: Registry of head types: name -> class (filled by ``register``).
HEAD_TYPES: dict[str, type[Head]] = {}


def register(cls: type[Head]) -> type[Head]:
    HEAD_TYPES[cls.head_type] = cls
    return cls


def as_features(X: Any, *, what: str = "features") -> np.ndarray:
    """A C-contiguous float32 (N, D) array from anything array-like (float16 included)."""
    X = np.asarray(X)
    if X.ndim != 2:
        raise FeatureMismatchError(f"expected {what} as a 2-d array (samples x features), got shape {X.shape}")
    if not np.issubdtype(X.dtype, np.number):
        raise FeatureMismatchError(f"expected numeric {what}, got dtype {X.dtype}")
    return np.ascontiguousarray(X, dtype=np.float32)


class Head:
    """Base class: shared validation, probabilities, save/load. Subclasses implement
    ``_fit(X, y, val, sample_weight, overwrite=)`` (y as class indices), ``_logits(X)``,
    ``_arrays()``/``_set_arrays()`` and ``_onnx_nodes()``."""

    head_type: ClassVar[str] = ""

    # -- parameters (scikit-learn style)

    def get_params(self) -> dict[str, Any]:
        import inspect

        names = [p for p in inspect.signature(type(self).__init__).parameters if p != "self"]
        return {name: getattr(self, name) for name in names}

    def set_params(self, **params: Any) -> Head:
        valid = self.get_params()
        for key, value in params.items():
            if key not in valid:
                raise HeadError(f"{self.head_type} head has no parameter {key!r}; valid: {sorted(valid)}")
            setattr(self, key, value)
        return self

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.get_params().items())
        return f"{type(self).__name__}({args})"

    # -- fitting

    def fit(
        self,
        X: Any,
        y: Any,
        *,
        X_val: Any = None,
        y_val: Any = None,
        sample_weight: Any = None,
        copy: bool = True,
    ) -> Head:
        """Learn from features ``X`` (N, D) and labels ``y`` (any hashable values).

        ``X_val``/``y_val`` choose the regularization (heads with an automatic
        sweep), drive early stopping and fit the calibration temperature.
        ``copy=False`` lets the head standardize or normalize a float32 ``X`` in place
        instead of in a copy, so training needs no second (N, D) array; ``X`` is then
        overwritten and must not be used afterwards (``fit_head`` passes rows it read
        for this fit alone).
        """
        start = time.perf_counter()
        X = as_features(X)
        y = np.asarray(y)
        if y.ndim != 1 or len(y) != len(X):
            raise HeadError(f"expected one label per row: {len(X)} rows but labels of shape {y.shape}")
        classes = np.unique(y)
        if len(classes) < 2:
            raise HeadError(f"a classifier needs at least 2 classes in the training data, found {classes.tolist()}")
        y_index = np.searchsorted(classes, y)
        weights = self._sample_weights(y_index, len(classes), sample_weight)
        if not all_finite(X):
            raise HeadError("training features contain NaN or inf; re-extract the cache (`embedx extract` "
                            "recomputes such rows; with --dtype float32 where float16 overflowed)")
        val = None
        if X_val is not None or y_val is not None:
            if X_val is None or y_val is None:
                raise HeadError("pass both X_val and y_val, or neither")
            val = self._validation(as_features(X_val, what="validation features"), np.asarray(y_val), classes,
                                   X.shape[1])
        self.classes_ = classes
        self.feature_dim_ = int(X.shape[1])
        self.n_train_ = int(len(X))
        self.temperature_ = 1.0
        self.chosen_params_: dict[str, Any] = {}
        self.sweep_: list[dict[str, Any]] = []
        self._fit(X, y_index, val, weights, overwrite=not copy)
        if val is not None and len(val[1]):
            from embedx.metrics import fit_temperature

            self.temperature_ = fit_temperature(self._logits(val[0]), val[1])
        self.fit_seconds_ = time.perf_counter() - start
        return self

    def _validation(self, X_val: np.ndarray, y_val: np.ndarray, classes: np.ndarray, dim: int):
        if X_val.shape[1] != dim:
            raise FeatureMismatchError(f"validation features have {X_val.shape[1]} dims, training features {dim}")
        if len(y_val) != len(X_val):
            raise HeadError(f"expected one validation label per row: {len(X_val)} rows, {len(y_val)} labels")
        known = np.isin(y_val, classes)
        if not known.all():
            logger.warning("%d validation rows have classes absent from training; ignoring them", int((~known).sum()))
        return X_val[known], np.searchsorted(classes, y_val[known])

    def _sample_weights(self, y_index: np.ndarray, n_classes: int, sample_weight: Any) -> np.ndarray | None:
        weights = None if sample_weight is None else np.asarray(sample_weight, dtype=np.float64)
        if weights is not None and weights.shape != y_index.shape:
            raise HeadError(f"expected one sample weight per row ({len(y_index)}), got shape {weights.shape}")
        class_weight = getattr(self, "class_weight", None)
        if class_weight is None:
            return weights
        if class_weight != "balanced":
            raise HeadError(f"class_weight must be None or 'balanced', got {class_weight!r}")
        counts = np.bincount(y_index, minlength=n_classes).astype(np.float64)
        balanced = len(y_index) / (n_classes * counts[y_index])
        return balanced if weights is None else weights * balanced

    def _fit(self, X, y, val, sample_weight, *, overwrite: bool) -> None:  # pragma: no cover - abstract
        """``overwrite``: ``X`` may be standardized or normalized in place (``fit(copy=False)``)."""
        raise NotImplementedError

    # -- inference (numpy only)

    def _check(self, X: Any) -> np.ndarray:
        if not hasattr(self, "classes_"):
            raise NotFittedError(f"this {self.head_type} head is not fitted yet; "
                                 "call fit(X, y) or load_head(dir) first")
        X = as_features(X)
        if X.shape[1] != self.feature_dim_:
            raise FeatureMismatchError(
                f"expected features of dimension {self.feature_dim_} (what this head was trained on), "
                f"got {X.shape[1]}; extract features with the head's backbone (see head.json 'cache')"
            )
        return X

    def logits(self, X: Any) -> np.ndarray:
        """Raw class scores (N, C), before temperature scaling (of rows mapped by ``adaptation_``,
        the prediction-time feature transform of a head fitted with ``--adapt-to``, if any)."""
        X = self._check(X)
        adaptation = getattr(self, "adaptation_", None)
        if adaptation is not None:
            X = adaptation.apply(X)
        return self._logits(X).astype(np.float32, copy=False)

    def predict_proba(self, X: Any) -> np.ndarray:
        """``softmax(logits / temperature_)``: calibrated probabilities, rows sum to 1."""
        from embedx.metrics import softmax

        return softmax(self.logits(X), self.temperature_)

    def predict(self, X: Any) -> np.ndarray:
        logits = self.logits(X)  # checks fitted state first
        return self.classes_[np.argmax(logits, axis=1)]

    # -- saving

    def _arrays(self) -> dict[str, np.ndarray]:  # pragma: no cover - abstract
        raise NotImplementedError

    def _set_arrays(self, arrays: dict[str, np.ndarray]) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    def summary(self) -> dict[str, Any]:
        """The head.json fields this head knows about itself (fit_head adds cache and metrics)."""
        self._check(np.zeros((1, getattr(self, "feature_dim_", 1)), dtype=np.float32))
        params = {**self.get_params(), **self.chosen_params_}
        return {
            "schema_version": SCHEMA_VERSION,
            "embedx_version": __version__,
            "head_type": self.head_type,
            "params": _jsonable(params),
            "init_params": _jsonable(self.get_params()),
            "classes": _jsonable(self.classes_.tolist()),
            "feature_dim": self.feature_dim_,
            "temperature": float(self.temperature_),
            "weights_file": WEIGHTS_FILE,
            "n_train": self.n_train_,
            "sweep": _jsonable(self.sweep_),
            "fit_seconds": float(getattr(self, "fit_seconds_", 0.0)),
        }

    def save(self, directory: str | Path, *, extra: dict[str, Any] | None = None,
             record: HeadRecord | None = None) -> Path:
        """Write the head directory as a whole: ``weights.safetensors`` and ``head.json`` go to
        a temporary folder beside ``directory`` that then replaces it (``head_dir_writer``), so
        a kill at any moment leaves the old head or the new one, never a mix.

        head.json is ``record`` (built by ``heads.record.head_record``) or, without one,
        this head's own fields with ``extra`` added.
        """
        if record is not None and extra:
            raise HeadError("pass extra= or record= to save, not both")
        record = record or HeadRecord.of(self, **(extra or {}))
        directory = Path(directory)
        with head_dir_writer(directory) as work:
            self.write_files(work, record)
        logger.info("saved %s head to %s", self.head_type, directory)
        return directory

    def write_files(self, folder: Path, record: HeadRecord) -> None:
        """The weights, then head.json, into ``folder`` (a ``head_dir_writer`` folder)."""
        from safetensors.numpy import save_file

        arrays = {k: np.ascontiguousarray(v) for k, v in self._arrays().items()}
        save_file(arrays, str(Path(folder) / record.weights_file), metadata={"format": "embedx-head"})
        write_transform(folder, getattr(self, "adaptation_", None), record)
        record.write(folder)

    @property
    def info_(self) -> dict[str, Any]:
        """head.json as ``load_head`` read it (``record_.fields``)."""
        return self.record_.fields

    # -- ONNX

    def _onnx_nodes(self, builder: GraphBuilder, features: str) -> str:  # pragma: no cover - abstract
        raise NotImplementedError

    def to_onnx(self) -> Any:
        """An ``onnx.ModelProto``: input ``"features"`` (N, D) float32 -> output ``"logits"`` (N, C)."""
        import onnx

        self._check(np.zeros((1, getattr(self, "feature_dim_", 1)), dtype=np.float32))
        builder = GraphBuilder()
        features = "features"
        if getattr(self, "adaptation_", None) is not None:
            features = self.adaptation_.onnx_nodes(builder, features)
        out = self._onnx_nodes(builder, features)
        builder.node("Identity", [out], ["logits"])
        model = builder.model(self.feature_dim_, len(self.classes_), name=f"embedx_{self.head_type}_head")
        onnx.checker.check_model(model, full_check=True)
        return model


class GraphBuilder:
    """A few lines over ``onnx.helper`` so head graphs read like their numpy code."""

    def __init__(self) -> None:
        self.nodes: list[Any] = []
        self.initializers: list[Any] = []
        self._count = 0

    def const(self, name: str, value: Any, dtype: Any = np.float32) -> str:
        from onnx import numpy_helper

        self.initializers.append(numpy_helper.from_array(np.ascontiguousarray(np.asarray(value, dtype=dtype)), name))
        return name

    def node(self, op: str, inputs: list[str], outputs: list[str] | None = None, **attrs: Any) -> str:
        from onnx import helper

        self._count += 1
        outputs = outputs or [f"{op.lower()}_{self._count}"]
        self.nodes.append(helper.make_node(op, inputs, outputs, name=f"{op}_{self._count}", **attrs))
        return outputs[0]

    def standardize(self, features: str, mean: np.ndarray, scale: np.ndarray) -> str:
        """(x - mean) / scale, the same two operations the numpy path does."""
        centered = self.node("Sub", [features, self.const("mean", mean)])
        return self.node("Div", [centered, self.const("scale", scale)])

    def model(self, feature_dim: int, n_classes: int, *, name: str) -> Any:
        from onnx import TensorProto, helper

        graph = helper.make_graph(
            self.nodes,
            name,
            [helper.make_tensor_value_info("features", TensorProto.FLOAT, ["N", feature_dim])],
            [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", n_classes])],
            initializer=self.initializers,
        )
        model = helper.make_model(
            graph, opset_imports=[helper.make_opsetid("", ONNX_OPSET)], producer_name="embedx"
        )
        model.ir_version = ONNX_IR_VERSION
        return model


_CHUNK_ROWS = 8192


def standardizer(X: np.ndarray, sample_weight: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Per-feature mean and scale (std, with constant features left at scale 1).

    Two passes over row chunks with float64 sums: no float64 copy of the whole matrix
    (a 50,000 x 2048 float32 cache would need 800 MB more, and seconds).
    """
    w = None if sample_weight is None else np.asarray(sample_weight, dtype=np.float64)
    total = float(len(X)) if w is None else float(w.sum())
    chunks = [slice(start, start + _CHUNK_ROWS) for start in range(0, len(X), _CHUNK_ROWS)]
    sums = np.zeros(X.shape[1], dtype=np.float64)
    for chunk in chunks:
        rows = X[chunk]
        sums += rows.sum(axis=0, dtype=np.float64) if w is None else w[chunk] @ rows.astype(np.float64)
    mean = sums / max(total, 1e-300)
    squares = np.zeros(X.shape[1], dtype=np.float64)
    for chunk in chunks:
        centered = X[chunk] - mean.astype(X.dtype if X.dtype == np.float64 else np.float32)
        squares += ((centered * centered).sum(axis=0, dtype=np.float64) if w is None
                    else w[chunk] @ (centered.astype(np.float64) ** 2))
    std = np.sqrt(squares / max(total, 1e-300))
    scale = np.where(std > 1e-6 * max(float(np.max(std, initial=0.0)), 1e-12), std, 1.0)
    return mean.astype(np.float32), scale.astype(np.float32)


def standardize(X: np.ndarray, mean: np.ndarray, scale: np.ndarray, *, in_place: bool = False) -> np.ndarray:
    """``(X - mean) / scale`` as float32 (float64 input stays float64), one output array.

    ``in_place``: overwrite a writable float32/float64 ``X`` instead (no second array).
    """
    dtype = np.float64 if X.dtype == np.float64 else np.float32
    out = np.subtract(X, mean.astype(dtype), out=X if in_place and overwritable(X, dtype) else None, dtype=dtype)
    out *= (1.0 / scale).astype(dtype)
    return out


def overwritable(X: np.ndarray, dtype=np.float32) -> bool:
    """``X`` can take an in-place result of ``dtype``: that dtype, writable, C-contiguous."""
    return X.dtype == dtype and X.flags.writeable and X.flags.c_contiguous


def all_finite(X: np.ndarray) -> bool:
    """No NaN or inf in ``X``, checked by row chunks (no (N, D) boolean temporary)."""
    return all(np.isfinite(X[start:start + _CHUNK_ROWS]).all() for start in range(0, len(X), _CHUNK_ROWS))


@contextlib.contextmanager
def head_dir_writer(directory: str | Path) -> Iterator[Path]:
    """Yield an empty folder that replaces the head directory ``directory`` as a whole on success.

    One writer at a time: ``<directory>.lock`` (``fsio.writer_lock``) is held throughout, and a
    second writer gets a one-line HeadError naming the first. What a killed earlier writer left
    beside it is cleaned first: a previous head it had moved aside and not yet replaced is put
    back, other temporaries are deleted. An existing folder that is not a head directory (no
    head.json, not empty) is never replaced: HeadError.
    """
    directory = Path(directory)
    make_parent(directory, what="head directory")
    # a full disk or a read-only folder: one line naming the folder (the old head stays whole)
    with reporting_write_errors(directory), writer_lock(directory, what="head directory", error=HeadError):
        remove_stale_temporaries(directory.parent, directory.name)
        check_head_output(directory)
        with atomic_dir(directory) as work:
            yield work


def check_head_output(directory: str | Path) -> None:
    """HeadError unless ``directory`` is free, empty or a head directory (``head_dir_writer``
    replaces it as a whole, so anything else in it would be lost)."""
    directory = Path(directory)
    if directory.exists() and not directory.is_dir():
        raise HeadError(f"{directory} exists and is not a folder; choose another output for the head")
    if directory.is_dir() and not (directory / HEAD_JSON).is_file() and any(directory.iterdir()):
        raise HeadError(f"{directory} is a folder without {HEAD_JSON} (not a head directory); writing the head "
                        "there would replace its contents: choose another output or empty it")


def load_head(directory: str | Path | HeadRecord) -> Head:
    """A saved head, ready for ``predict_proba`` (torch-free): from its directory, or from the
    record already read from it (``HeadRecord.read``), so head.json is read once."""
    from safetensors import SafetensorError
    from safetensors.numpy import load_file

    record = directory if isinstance(directory, HeadRecord) else HeadRecord.read(directory)
    if record.directory is None:
        raise HeadError("load_head needs a record read from a head directory (HeadRecord.read)")
    directory = record.directory
    info = record.fields
    if record.head_type not in HEAD_TYPES:
        raise HeadError(f"{directory / HEAD_JSON} names head type {record.head_type!r}; "
                        f"known types: {sorted(HEAD_TYPES)}")
    weights_path = record.weights_path()
    try:
        arrays = load_file(str(weights_path))
    except (OSError, SafetensorError) as e:
        raise HeadError(f"cannot read the head weights {weights_path}: {e}; refit the head") from e
    for name, array in arrays.items():
        if np.issubdtype(array.dtype, np.floating) and not np.isfinite(array).all():
            raise HeadError(f"{weights_path}: array {name!r} holds NaN or infinite values; refit the head")
    cls = HEAD_TYPES[record.head_type]
    init_params = info.get("init_params", {})
    try:
        head = cls(**init_params)
    except TypeError as e:
        raise HeadError(f"{directory / HEAD_JSON}: init_params {init_params} do not fit a {record.head_type} head "
                        f"({e}); refit the head") from e
    head.classes_ = np.asarray(record.classes)
    head.feature_dim_ = record.feature_dim
    head.temperature_ = record.temperature
    head.n_train_ = int(info.get("n_train", 0))
    head.sweep_ = info.get("sweep", [])
    head.fit_seconds_ = float(info.get("fit_seconds", 0.0))
    head.chosen_params_ = {k: v for k, v in info.get("params", {}).items() if init_params.get(k) != v}
    head.record_ = record
    head.adaptation_ = load_transform(record)
    try:
        head._set_arrays(arrays)
    except KeyError as e:
        raise HeadError(f"{weights_path} lacks the array {e} a {record.head_type} head needs; refit the head") from e
    except (ValueError, TypeError, IndexError) as e:
        raise HeadError(f"{weights_path} does not hold a {record.head_type} head ({e}); refit the head") from e
    _check_loaded(head, weights_path)
    return head


def _check_loaded(head: Head, weights_path: Path) -> None:
    """A head whose weights do not fit its head.json (another feature_dim, another number of
    classes, arrays of mismatched shapes) is refused when loaded, not at its first prediction:
    it must map a row of zeros and a row of ones to finite scores, one per class."""
    probe = np.stack([np.zeros(head.feature_dim_, np.float32), np.ones(head.feature_dim_, np.float32)])
    n_classes = len(head.classes_)
    try:
        with np.errstate(all="ignore"):
            logits = head.logits(probe)
    except (ValueError, TypeError, IndexError, ArithmeticError) as e:
        raise HeadError(f"{weights_path} does not fit head.json ({head.feature_dim_} features, {n_classes} "
                        f"classes): {' '.join(str(e).split())[:200]}; refit the head") from e
    if logits.shape != (2, n_classes):
        raise HeadError(f"{weights_path} gives {logits.shape[-1] if logits.ndim else 0} scores per row but head.json "
                        f"lists {n_classes} classes; refit the head")
    if not all_finite(logits):
        raise HeadError(f"{weights_path} gives NaN or infinite scores; refit the head")


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.ndarray):
        return _jsonable(value.tolist())
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, float) and not np.isfinite(value):
        return None
    return value
