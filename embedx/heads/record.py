"""head.json: the one reader, writer and builder of a saved head's record.

A head directory holds ``head.json`` (this record, written last) and the head's weights.
:class:`HeadRecord` is the only code that parses the file: it refuses another
``schema_version`` and a field of the wrong type with one ``HeadError`` line that says
how to fix it. :func:`head_record` builds the record of a head fitted on a cache's
features (``fit_head``); :meth:`HeadRecord.backbone_onnx` finds
the backbone ONNX those features came from and checks its sha256 (``predict --head``,
``bundle``).

Fields (schema_version 1): ``schema_version``, ``embedx_version``, ``head_type``,
``classes`` (class names: strings, or the numbers or booleans a head was fitted on),
``feature_dim``, ``temperature``, ``weights_file``, ``params`` / ``init_params``,
``n_train``, ``sweep``, ``fit_seconds``, and from ``fit_head``: ``cache`` (the
``CacheMeta`` of the training features plus ``fingerprint`` and ``path``), ``metrics``,
``val_source``, and with ``--adapt-to`` ``adaptation`` (``heads.adapt``: method, target cache,
the prediction-time statistics file, checked when the head is loaded); ``finetune`` adds ``finetune``.

torch-, scikit-learn- and numpy-free.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from embedx import __version__, fsio, untrusted
from embedx.errors import CacheMismatchError, ConfigError, HeadError, OnnxModelError
from embedx.fsio import atomic_write, sha256_file

logger = logging.getLogger(__name__)

SCHEMA_VERSION = 1
HEAD_JSON = "head.json"
WEIGHTS_FILE = "weights.safetensors"
#: head.json larger than this is refused before it is parsed (a 1,000-class head's is ~100 KB).
MAX_HEAD_JSON_BYTES = 8 * 1024 * 1024
MAX_SIZE = untrusted.MAX_SIZE

#: Optional fields the record relies on: name -> (accepted types, what to call them).
_TYPED_FIELDS: dict[str, tuple[tuple[type, ...], str]] = {
    "embedx_version": ((str,), "a string"),
    "weights_file": ((str,), "a file name"),
    "temperature": ((int, float), "a positive number"),
    "params": ((dict,), "an object"),
    "init_params": ((dict,), "an object"),
    "n_train": ((int,), "an integer"),
    "fit_seconds": ((int, float), "a number"),
    "sweep": ((list,), "a list"),
    "cache": ((dict, type(None)), "an object"),
    "adaptation": ((dict,), "an object"),
}
#: Fields of ``cache`` the record relies on (bundle, predict --head, evaluate).
_CACHE_FIELDS: dict[str, tuple[tuple[type, ...], str]] = {
    "backbone": ((str,), "a string"),
    "onnx_path": ((str,), "a string"),
    "onnx_sha256": ((str,), "a string"),
    "fingerprint": ((str,), "a string"),
    "feature_dim": ((int,), "an integer"),
    "preprocess": ((dict,), "an object"),
}


@dataclass(frozen=True)
class HeadRecord:
    """A validated head.json. ``fields`` is the whole object as read or to be written;
    the typed attributes are the fields the readers rely on."""

    head_type: str
    classes: tuple[str | int | float | bool, ...]
    feature_dim: int
    temperature: float
    weights_file: str
    cache: dict[str, Any]
    fields: dict[str, Any] = field(repr=False)
    #: the head directory it was read from (None for a record not yet written)
    directory: Path | None = None

    # -- reading

    @classmethod
    def read(cls, directory: str | Path) -> HeadRecord:
        """The record of the head directory ``directory``; HeadError if it is missing or malformed."""
        directory = _recovered(Path(directory))
        path = directory / HEAD_JSON
        if not path.is_file():
            raise HeadError(f"{directory} is not a head directory: {path} is missing; run `embedx fit-head` first")
        try:
            with path.open("rb") as handle:
                data = handle.read(MAX_HEAD_JSON_BYTES + 1)
        except OSError as e:
            raise HeadError(f"cannot read {path}: {e}") from e
        fields = untrusted.loads(data, what=str(path), error=HeadError, max_bytes=MAX_HEAD_JSON_BYTES,
                                 hint="refit the head with `embedx fit-head`")
        return cls.from_fields(fields, directory=directory)

    @classmethod
    def from_fields(cls, fields: Any, *, directory: Path | None = None) -> HeadRecord:
        """Validate a head.json object (as parsed JSON) into a record."""
        where = directory / HEAD_JSON if directory is not None else HEAD_JSON
        if not isinstance(fields, dict):
            raise HeadError(f"{where} holds a JSON {type(fields).__name__}, not an object; refit the head")
        version = fields.get("schema_version")
        if version != SCHEMA_VERSION:
            raise HeadError(
                f"{where} has head schema_version {version!r} (written by embedx "
                f"{fields.get('embedx_version', '?')}) but this embedx {__version__} reads schema_version "
                f"{SCHEMA_VERSION}; refit the head with `embedx fit-head` or use the embedx version that wrote it"
            )

        def malformed(name: str, expected: str) -> HeadError:
            value = repr(fields.get(name, "<missing>"))
            return HeadError(f"{where}: {name!r} must be {expected}, found {value[:80]}; refit the head with "
                             "`embedx fit-head`")

        head_type = fields.get("head_type")
        if not isinstance(head_type, str) or not head_type:
            raise malformed("head_type", "the name of a head type")
        classes = fields.get("classes")
        problem = untrusted.classes_problem(classes)
        if problem:
            raise malformed("classes", problem)
        feature_dim = fields.get("feature_dim")
        if not _has_type(feature_dim, (int,)) or not 1 <= feature_dim <= MAX_SIZE:
            raise malformed("feature_dim", f"a positive integer of at most {MAX_SIZE:,}")
        for name, (types, expected) in _TYPED_FIELDS.items():
            if name in fields and not _has_type(fields[name], types):
                raise malformed(name, expected)
        for name in ("temperature", "fit_seconds"):
            if name in fields and not untrusted.finite(fields[name]):
                raise malformed(name, "a finite number")
        temperature = float(fields.get("temperature", 1.0))
        if not temperature > 0:
            raise malformed("temperature", "a positive number")
        weights_file = fields.get("weights_file", WEIGHTS_FILE)
        if weights_file in ("", ".", "..") or Path(weights_file).name != weights_file or "\\" in weights_file:
            raise malformed("weights_file", "a file name in the head directory")
        cache = fields.get("cache") or {}
        for name, (types, expected) in _CACHE_FIELDS.items():
            if name in cache and not _has_type(cache[name], types):
                raise HeadError(f"{where}: cache.{name} must be {expected}, found {cache[name]!r:.80}; refit "
                                "the head with `embedx fit-head` from a current cache")
        if "feature_dim" in cache and not 1 <= cache["feature_dim"] <= MAX_SIZE:
            raise HeadError(f"{where}: cache.feature_dim must be a positive integer of at most {MAX_SIZE:,}, found "
                            f"{cache['feature_dim']}; refit the head with `embedx fit-head` from a current cache")
        return cls(
            head_type=head_type,
            classes=tuple(classes),
            feature_dim=int(feature_dim),
            temperature=temperature,
            weights_file=weights_file,
            cache=cache,
            fields=fields,
            directory=directory,
        )

    @classmethod
    def of(cls, head: Any, **fields: Any) -> HeadRecord:
        """The record of a fitted head (``head.summary()``) with ``fields`` added or replaced."""
        return cls.from_fields({**head.summary(), **fields})

    # -- use

    @property
    def class_names(self) -> list[str]:
        return [str(c) for c in self.classes]

    def to_dict(self) -> dict[str, Any]:
        """The head.json object (a copy of its top level)."""
        return dict(self.fields)

    def write(self, directory: str | Path) -> Path:
        """Write ``directory/head.json`` atomically; returns its path."""
        text = json.dumps(self.fields, indent=2, sort_keys=False) + "\n"
        return atomic_write(Path(directory) / HEAD_JSON, text)

    def preprocess(self):
        """The ``PreprocessSpec`` of the training features (``cache.preprocess``)."""
        from embedx.preprocess import PreprocessSpec

        if "preprocess" not in self.cache:
            raise HeadError(f"{self._where()} has no cache.preprocess; refit the head with `embedx fit-head` "
                            "from a cache made by this embedx version")
        try:
            return PreprocessSpec.from_dict(self.cache["preprocess"])
        except (ConfigError, TypeError) as e:
            raise HeadError(f"{self._where()}: cache.preprocess is not a valid preprocessing spec ({e}); refit the "
                            "head with `embedx fit-head` from a current cache") from e

    def weights_path(self) -> Path:
        """``directory/weights_file``, checked to be a regular file inside the head directory
        (a symlink may point elsewhere inside it, not out of it)."""
        if self.directory is None:
            raise HeadError("a head's weights are found from a record read from its directory (HeadRecord.read)")
        path = self.directory / self.weights_file
        inside = self.directory.resolve()
        resolved = path.resolve()
        if resolved.parent != inside and inside not in resolved.parents:
            raise HeadError(f"{self._where()}: weights_file {self.weights_file!r} leads to {resolved}, outside the "
                            f"head directory {inside}; refit the head with `embedx fit-head`")
        if path.exists() and not resolved.is_file():
            raise HeadError(f"{self._where()}: weights_file {self.weights_file!r} is not a regular file; refit the "
                            "head with `embedx fit-head`")
        return path

    def backbone_onnx(self) -> Path:
        """The backbone ONNX whose features this head was trained on, checked against ``cache.onnx_sha256``.

        HeadError when head.json names none, OnnxModelError when the file is missing,
        CacheMismatchError when its sha256 differs from the one recorded at extraction.
        """
        onnx_path = self.cache.get("onnx_path")
        if not onnx_path:
            raise HeadError(f"{self._where()} has no cache.onnx_path; refit the head with `embedx fit-head` "
                            "from a cache made by this embedx version")
        path = self._own_file(onnx_path, "cache.onnx_path")
        if not path.is_file():
            raise OnnxModelError(
                f"the backbone ONNX this head was trained on, {path}, is missing; re-export it with "
                f"`embedx export {self.cache.get('backbone', 'BACKBONE')}` (the same backbone and weights "
                "give the same file)"
            )
        expected = self.cache.get("onnx_sha256")
        if expected:
            found = sha256_file(path)
            if found != expected:
                raise CacheMismatchError(
                    f"{path} has sha256 {found[:16]}… but the head was trained on features of a file with "
                    f"sha256 {expected[:16]}…; re-extract the cache and refit the head with the current "
                    "export, or restore the original ONNX file"
                )
        return path

    def _own_file(self, name: str, field_name: str) -> Path:
        """The file a field names. A relative name is the folder's own file (a fine-tune output
        names its backbone ``backbone.onnx``): it must stay inside the folder. An absolute one is
        taken as it is (a fit-head record names the export it used), except in a fine-tune
        record, whose files all live in its folder: older ones recorded them by absolute path,
        accepted while it leads inside the folder."""
        path = Path(name)
        if self.directory is None:
            return path
        inside = self.directory.resolve()
        if path.is_absolute() and "finetune" not in self.fields:
            return path
        resolved = (self.directory / path).resolve()
        if resolved != inside and inside not in resolved.parents:
            raise HeadError(f"{self._where()}: {field_name} {name!r} leads to {resolved}, outside the head directory "
                            f"{inside}; a head's own files stay in its folder: refit or fine-tune it again")
        return self.directory / path if not path.is_absolute() else path

    def _where(self) -> str:
        return str(self.directory / HEAD_JSON) if self.directory is not None else HEAD_JSON


def head_record(head: Any, cache_meta: Any, *, cache_path: str | Path = "", metrics: dict[str, Any],
                val_source: str, rows_sha256: str = "", **fields: Any) -> HeadRecord:
    """The record of ``head`` fitted on features described by ``cache_meta`` (a ``CacheMeta``).

    ``cache_path``: the cache file ("" when the features did not come from one);
    ``rows_sha256``: ``cache.rows_digest`` of its rows (the cache recognised wherever it moved);
    ``metrics`` and ``val_source``: as ``fit_head`` reports them; ``fields``: any other
    head.json fields (``fit_seconds``, ``finetune``).
    """
    # absolute, so that a report or fine-tune run from another folder finds the same file
    cache = {**cache_meta.to_dict(), "fingerprint": cache_meta.fingerprint,
             "path": str(Path(cache_path).absolute()) if str(cache_path) else ""}
    if rows_sha256:
        cache["rows_sha256"] = rows_sha256
    return HeadRecord.of(head, cache=cache, metrics=metrics, val_source=val_source, **fields)


#: How long a reader waits for a live writer that is between its two renames.
RESTORE_WAIT_SECONDS = 10.0


def _recovered(directory: Path) -> Path:
    """``directory``, or where its head is while a killed writer left it moved aside.

    ``fsio.atomic_dir`` renames the old folder aside, then the new one in; a kill between the
    two leaves no ``directory``. The reader puts the old one back under the writer lock (a
    live writer finishes its swap first) and logs it; where it cannot (a read-only folder),
    it reads the folder where it lies.
    """
    if fsio.moved_aside(directory) is None:
        return directory
    try:
        with fsio.writer_lock(directory, what="head directory", error=HeadError, wait=RESTORE_WAIT_SECONDS):
            fsio.restore_moved_aside(directory)
        return directory
    except (OSError, HeadError) as e:
        previous = fsio.moved_aside(directory)
        if previous is None:
            return directory
        logger.warning("%s is missing and its previous copy %s cannot be put back (%s); reading it there",
                       directory, previous, e)
        return previous


def _has_type(value: Any, types: tuple[type, ...]) -> bool:
    return isinstance(value, types) and not isinstance(value, bool)
