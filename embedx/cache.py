"""The HDF5 feature cache: schema, identity, resume journal, reading.

This is the only module that imports h5py, and it imports no torch.  The file
format is documented in docs/cache-format.md; in short:

* A finished cache ``feats.h5`` is only ever written under a temporary name, fsynced
  and renamed into place (``fsio.atomic_path``), with the ``complete`` attribute set
  last, so a file at the final name is always whole.
* Work in progress goes to a journal directory next to it, ``feats.h5.partial/``:
  one small ``.npz`` shard per batch (no pickle), each written atomically
  (``fsio.atomic_write``), so a ``kill -9`` loses at most the batch in flight.  A rerun
  reads the valid shards and skips the keys they hold.
* Rows are identified by the sha256 of the image bytes (the *key*), so a moved or
  renamed image keeps its features and an incremental run computes only new keys.
* ``CacheMeta.fingerprint`` says which model made the features; a cache or journal
  with another fingerprint is never reused silently (``CacheMismatchError``).
* One writer at a time: ``<cache>.lock`` is taken without waiting
  (``fsio.writer_lock``; ``CacheLockedError`` naming the holder for the second process).
"""

from __future__ import annotations

import contextlib
import errno as errno_codes
import hashlib
import json
import logging
import math
import os
import shutil
import time
import zipfile
import zlib
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np

from embedx import __version__, untrusted
from embedx.errors import CacheError, CacheLockedError, CacheMismatchError
from embedx.fsio import (
    atomic_path,
    atomic_write,
    lock_path,  # noqa: F401 - part of the cache API (where the writer lock lives)
    make_parent,
    os_error_text,
    remove_stale_temporaries,
    sha256_bytes,
    sha256_file,
    writer_lock,
)

logger = logging.getLogger(__name__)

#: Version of the on-disk layout; bump on any incompatible change.
SCHEMA_VERSION = 1
#: Version of the journal layout (``<cache>.partial/``).
JOURNAL_VERSION = 1
DTYPES = ("float16", "float32")
PRECISIONS = ("fp32", "fp16", "int8")
DECODES = ("cpu", "gpu")
#: Target size of one HDF5 chunk of ``features``, in bytes.
CHUNK_BYTES = 1 << 20
#: The dataset of per-row checksums (crc32 of each row's stored bytes); caches written
#: before it existed have none and read unchecked.
CHECKSUMS = "row_crc32"
#: The group of augmented views (rows made from the clean rows' images); caches
#: without views have none and read as before.
VIEWS = "views"
#: ``CacheWriter``'s source name for a view row of the previous cache.
_BASE_VIEWS = "@views"

_STR = None  # h5py string dtype, created on first use (h5py is imported lazily)


def _h5py():
    import h5py

    return h5py


def _vlen_str():
    global _STR
    if _STR is None:
        _STR = _h5py().string_dtype("utf-8")
    return _STR


#: The fields of ``CacheMeta`` that are text (a file saying otherwise is refused when read).
_TEXT_FIELDS = ("backbone", "weights_tag", "weights_arg", "onnx_path", "onnx_sha256", "feature_layer")


@dataclass(frozen=True)
class CacheMeta:
    """Everything that decides what the features are (the identity of a cache)."""

    backbone: str
    weights_tag: str
    weights_arg: str
    onnx_path: str
    onnx_sha256: str
    feature_layer: str
    feature_dim: int
    preprocess: dict = field(hash=False)
    dtype: str = "float16"
    precision: str = "fp32"
    #: who decoded and resized the images: "cpu" (``preprocess``) or "gpu" (nvJPEG, ``embedx.gpu``)
    decode: str = "cpu"
    #: ``(index, count)`` of a cache holding one shard of a data set (``embedx.shards``), else None.
    #: In the identity so that a cache of one shard is never reused by a run of another one
    #: (or of the whole data set); ``embedx merge`` writes a cache without it.
    shard: tuple[int, int] | None = None

    def __post_init__(self) -> None:
        if self.dtype not in DTYPES:
            raise CacheError(f"cache dtype must be one of {DTYPES}, got {self.dtype!r}")
        if self.precision not in PRECISIONS:
            raise CacheError(f"precision must be one of {PRECISIONS}, got {self.precision!r}")
        if self.decode not in DECODES:
            raise CacheError(f"decode must be one of {DECODES}, got {self.decode!r}")
        object.__setattr__(self, "feature_dim", int(self.feature_dim))
        if self.shard is not None:
            index, count = (int(part) for part in self.shard)
            if count < 1 or not 0 <= index < count:
                raise CacheError(f"shard must be (index, count) with 0 <= index < count, got {self.shard!r}")
            object.__setattr__(self, "shard", (index, count))
        # JSON round trip: tuples become lists, so a meta read back compares equal.
        object.__setattr__(self, "preprocess", json.loads(json.dumps(dict(self.preprocess))))

    @classmethod
    def from_export(cls, exported: Any, *, dtype: str = "float16", precision: str = "fp32",
                    decode: str = "cpu") -> CacheMeta:
        """The identity of features made by an ``export.ExportResult`` (duck-typed)."""
        sha256 = getattr(exported, "sha256", "")
        if not sha256:
            sha256 = sha256_file(exported.path)
        return cls(
            backbone=exported.backbone,
            weights_tag=exported.weights_tag,
            weights_arg=str(getattr(exported, "weights_arg", "")),
            onnx_path=str(Path(exported.path).resolve()),
            onnx_sha256=sha256,
            feature_layer=str(exported.feature_layer),
            feature_dim=int(exported.feature_dim),
            preprocess=exported.preprocess.to_dict(),
            dtype=dtype,
            precision=precision,
            decode=decode,
        )

    def identity(self) -> dict[str, Any]:
        """The fields the fingerprint covers (all but ``onnx_path``: a moved file is the same model).

        ``decode`` only when it is "gpu", ``shard`` only when set: caches decoded on the CPU (all
        of them before GPU decode existed), of a whole data set, keep the fingerprint they always had."""
        data = self.to_dict()
        data.pop("onnx_path")
        if data["decode"] == "cpu":
            data.pop("decode")
        return data

    @property
    def fingerprint(self) -> str:
        text = json.dumps(self.identity(), sort_keys=True, separators=(",", ":"))
        return sha256_bytes(text.encode("utf-8"))

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        if data["shard"] is None:
            data.pop("shard")
        else:
            data["shard"] = list(data["shard"])
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> CacheMeta:
        if not isinstance(data, dict):
            raise CacheError(f"cache metadata must be a JSON object, got {type(data).__name__}; "
                             "rebuild it with `embedx extract --overwrite`")
        names = {f.name for f in fields(cls)}
        missing = names - set(data) - {"dtype", "precision", "decode", "shard"}
        if missing:
            raise CacheError(f"cache metadata lacks {sorted(missing)}; rebuild it with `embedx extract --overwrite`")
        wrong = [name for name in _TEXT_FIELDS if not isinstance(data[name], str)]
        if wrong:
            raise CacheError(f"cache metadata {wrong} must be text; rebuild it with `embedx extract --overwrite`")
        return cls(**{k: v for k, v in data.items() if k in names})

    def differences(self, other: CacheMeta) -> list[str]:
        """Human-readable ``field: this != other`` for each identity field that differs."""
        mine, theirs = self.to_dict(), other.to_dict()
        names = [*mine, *(k for k in theirs if k not in mine)]
        return [f"{k}: {mine.get(k)!r} vs {theirs.get(k)!r}" for k in names
                if k != "onnx_path" and mine.get(k) != theirs.get(k)]


@dataclass
class CacheData:
    """A whole cache in memory (``read_cache``)."""

    features: np.ndarray | None  # float32, N x D (None: read with load_features=False)
    labels: np.ndarray  # int64, N
    classes: list[str]
    splits: np.ndarray  # str, N
    paths: np.ndarray  # str, N, relative to the data root
    keys: np.ndarray  # str, N, sha256 hex of the image bytes
    meta: CacheMeta
    errors: list[tuple[str, str]]  # (path, reason) of every skipped file
    complete: bool
    path: Path
    attrs: dict[str, Any] = field(default_factory=dict)
    error_keys: list[str] = field(default_factory=list)  # the key of each error row ("" for a file never read)
    stats: np.ndarray | None = None  # int64, N x 2: (size, mtime_ns) per row; None in caches without them
    extra: dict[str, Any] = field(default_factory=dict)  # the ``extra`` attribute, parsed (what finalize got)

    def __len__(self) -> int:
        return len(self.keys)

    @property
    def data_root(self) -> Path | None:
        """The data folder the extraction recorded (``extra.data``), or None: row paths are relative to it."""
        root = self.extra.get("data")
        return Path(root) if isinstance(root, str) and root else None


def journal_dir(path: str | Path) -> Path:
    """Where the resume journal of cache ``path`` lives."""
    path = Path(path)
    return path.with_name(path.name + ".partial")


class CacheChecksumError(CacheError):
    """Rows of a cache whose features do not match their checksums (damaged on disk)."""

    def __init__(self, path: Path, rows: Sequence[int]) -> None:
        self.path = Path(path)
        self.rows = [int(r) for r in rows]
        super().__init__(
            f"{path}: the features of {len(self.rows)} rows ({row_ranges(self.rows)}) do not match their "
            "checksums (the file was damaged on disk); rerun the `embedx extract` command that made it "
            "to recompute them"
        )


class NonFiniteFeaturesError(CacheError):
    """Features with NaN or inf (in float32, or once stored as float16): never stored."""


class CacheWriteError(CacheError):
    """An OSError while writing the journal or the cache (a full disk, a read-only folder...)."""


def rows_digest(data: Any) -> str:
    """sha256 of a cache's rows (``data.keys`` and ``data.splits``, in order): the same rows wherever
    the file lies or is copied (head.json's ``cache.rows_sha256``, the report's "is this the head's cache")."""
    digest = hashlib.sha256()
    for key, split in zip(np.asarray(data.keys).astype(str), np.asarray(data.splits).astype(str), strict=True):
        digest.update(f"{key}\t{split}\n".encode("utf-8", "surrogateescape"))
    return digest.hexdigest()


def row_checksums(features: np.ndarray) -> np.ndarray:
    """crc32 of each row's bytes, little-endian, in the array's dtype (uint32, one per row)."""
    block = np.ascontiguousarray(features, dtype=features.dtype.newbyteorder("<"))
    view = block.view(np.uint8).reshape(len(block), block[0].nbytes if len(block) else 0)
    return np.fromiter((zlib.crc32(row) for row in view), dtype=np.uint32, count=len(block))


def row_ranges(rows: Sequence[int], limit: int = 8) -> str:
    """``"3, 17-20, 40"``: sorted row numbers as ranges, the first ``limit`` ranges then ``…``."""
    spans: list[list[int]] = []
    for row in sorted(int(r) for r in rows):
        if spans and row == spans[-1][1] + 1:
            spans[-1][1] = row
        else:
            spans.append([row, row])
    text = [f"{a}" if a == b else f"{a}-{b}" for a, b in spans[:limit]]
    return ", ".join(text) + (", …" if len(spans) > limit else "")


def write_error(path: Path, error: BaseException) -> CacheWriteError:
    """One line for an OSError (or h5py's RuntimeError) while writing ``path``: the file and the errno."""
    return CacheWriteError(f"cannot write {path}: {os_error_text(error)}; free space (or fix the folder), then "
                           "rerun the same command: it resumes from the journal")


# --------------------------------------------------------------------------- reading


def _attr(value: Any) -> Any:
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    if isinstance(value, np.generic):
        return value.item()
    return value


def _strings(dataset) -> np.ndarray:
    if len(dataset) == 0:
        return np.array([], dtype=str)
    try:
        if dataset.dtype.kind == "S":
            return dataset[()].astype(str)
        return np.asarray(dataset.asstr()[()], dtype=str)
    except UnicodeError as e:
        raise _layout_error(Path(dataset.file.filename), f"dataset '{dataset.name.lstrip('/')}' holds text that "
                            f"is not {'ASCII' if dataset.dtype.kind == 'S' else 'UTF-8'}") from e


def _open_checked(path: Path, *, allow_incomplete: bool = False):
    """Open a cache for reading and check it is an embedx cache of this schema, laid out as
    ``extract`` writes it (``_check_layout``): anything else is one ``CacheError``."""
    h5py = _h5py()
    if not path.exists():
        hint = ""
        if journal_dir(path).is_dir():
            hint = (" (an interrupted extraction left a journal next to it; "
                    "rerun the same `embedx extract` command to finish it)")
        raise CacheError(f"cache {path} does not exist{hint}; create it with `embedx extract`")
    try:
        handle = h5py.File(path, "r")
    except OSError as e:
        raise CacheError(f"{path} is not a readable HDF5 file ({e}); "
                         "rebuild it with `embedx extract --overwrite`") from e
    try:
        try:
            attrs = {k: _attr(v) for k, v in handle.attrs.items()}
        except (OSError, TypeError, ValueError) as e:  # an attribute of a type h5py cannot read
            raise _layout_error(path, f"its attributes cannot be read ({' '.join(str(e).split())[:200]})") from e
        if "schema_version" not in attrs or attrs.get("format") != "embedx-features":
            raise CacheError(f"{path} is an HDF5 file but not an embedx feature cache; "
                             "point to a file made by `embedx extract`")
        version = attrs["schema_version"]
        if not isinstance(version, int) or isinstance(version, bool):
            raise _layout_error(path, f"its schema_version {version!r} is not an integer")
        if version > SCHEMA_VERSION:
            raise CacheError(
                f"{path} has cache schema {version}, newer than this embedx ({__version__}) reads "
                f"(schema {SCHEMA_VERSION}); upgrade embedx"
            )
        if version < SCHEMA_VERSION:
            raise CacheError(
                f"{path} has the old cache schema {version} (this embedx reads {SCHEMA_VERSION}); "
                "rebuild it with `embedx extract --overwrite`"
            )
        if not isinstance(attrs.get("complete", False), (bool, int)):
            raise _layout_error(path, f"its complete attribute {attrs['complete']!r} is not true or false")
        if not attrs.get("complete") and not allow_incomplete:
            raise CacheError(f"{path} is incomplete; rerun the `embedx extract` command that made it to finish it")
        _check_layout(path, handle, attrs)
    except BaseException:
        handle.close()
        raise
    return handle, attrs


def _layout_error(path: Path, problem: str) -> CacheError:
    return CacheError(f"{path} is damaged or was not written by embedx: {problem}; "
                      "rebuild it with `embedx extract --overwrite`")


def _check_layout(path: Path, handle, attrs: dict[str, Any]) -> None:
    """Refuse a file whose layout ``extract`` would not have written, before anything is read:
    metadata and ``extra`` JSON objects; every dataset present, of its kind (text, integer, float)
    and rank; one entry per row in every per-row dataset; error and view columns of one length;
    no dataset declaring more than the file stores (``_check_stored``).  Shapes, types and storage
    sizes only: no data is read, so every reader can afford it on every open.  Datasets that
    newer versions added (``row_crc32``, ``sizes``/``mtimes``, ``errors/keys``, ``views``) may
    be absent, as in the caches written before them."""
    meta = _meta_from_attrs(path, attrs)
    _extra_of(path, attrs)
    features = _dataset(path, handle, "features", "float", 2)
    rows, dim = features.shape
    if dim != meta.feature_dim:
        raise _layout_error(path, f"its features are {dim}-d but its metadata says {meta.feature_dim}-d")
    _dataset(path, handle, "classes", "text", 1)
    columns = [_dataset(path, handle, name, "text", 1) for name in ("keys", "paths", "splits")]
    columns.append(_dataset(path, handle, "labels", "integer", 1))
    columns += [_dataset(path, handle, name, "integer", 1, required=False) for name in (CHECKSUMS, "sizes", "mtimes")]
    _same_length(path, [("features", rows)] + [(c.name, len(c)) for c in columns if c is not None])
    errors = _group(path, handle, "errors")
    if errors is not None:
        columns = [_dataset(path, errors, "paths", "text", 1), _dataset(path, errors, "reasons", "text", 1),
                   _dataset(path, errors, "keys", "text", 1, required=False)]
        _same_length(path, [(c.name, len(c)) for c in columns if c is not None])
    views = _group(path, handle, VIEWS)
    if views is not None:
        view_features = _dataset(path, views, "features", "float", 2)
        if view_features.shape[1] != dim:
            raise _layout_error(path, f"its view features are {view_features.shape[1]}-d, its features {dim}-d")
        columns = [_dataset(path, views, "source", "integer", 1), _dataset(path, views, "names", "text", 1),
                   _dataset(path, views, "keys", "text", 1),
                   _dataset(path, views, CHECKSUMS, "integer", 1, required=False)]
        _same_length(path, [(view_features.name, len(view_features))]
                     + [(c.name, len(c)) for c in columns if c is not None])
        _json_object(path, _attr(views.attrs.get("plan")), f"the attribute 'plan' of '{VIEWS}'")


def _same_length(path: Path, columns: list[tuple[str, int]]) -> None:
    first, rows = columns[0]
    for name, length in columns[1:]:
        if length != rows:
            raise _layout_error(path, f"dataset '{name.lstrip('/')}' has {length} rows, "
                                      f"'{first.lstrip('/')}' {rows}")


def _member(path: Path, group, name: str):
    """``group[name]`` when it is there as a plain member (a hard link), None when it is absent;
    links to other places or files are refused (a cache is one self-contained file)."""
    where = f"{group.name.rstrip('/')}/{name}".lstrip("/")
    link = group.get(name, getlink=True)
    if link is None:
        return None, where
    if not isinstance(link, _h5py().HardLink):
        raise _layout_error(path, f"'{where}' is a {type(link).__name__} to elsewhere, not a member of the file")
    return group[name], where


def _group(path: Path, group, name: str):
    member, where = _member(path, group, name)
    if member is not None and not isinstance(member, _h5py().Group):
        raise _layout_error(path, f"'{where}' is a dataset, not a group")
    return member


_KINDS = {"i": "integer", "u": "integer", "f": "float"}


def _dataset(path: Path, group, name: str, kind: str, ndim: int, *, required: bool = True):
    """``group[name]``, checked to be a dataset of ``kind`` ("text", "integer" or "float") and of
    rank ``ndim`` that the file stores whole; None when it is absent and not ``required``."""
    h5py = _h5py()
    dataset, where = _member(path, group, name)
    if dataset is None:
        if required:
            raise _layout_error(path, f"it has no dataset '{where}'")
        return None
    if not isinstance(dataset, h5py.Dataset):
        raise _layout_error(path, f"'{where}' is a group, not a dataset")
    found = "text" if h5py.check_string_dtype(dataset.dtype) is not None else _KINDS.get(dataset.dtype.kind)
    if found != kind:
        raise _layout_error(path, f"dataset '{where}' holds {found or dataset.dtype}, not {kind}")
    if dataset.ndim != ndim:
        raise _layout_error(path, f"dataset '{where}' has shape {dataset.shape}, not {ndim}-D")
    _check_stored(path, dataset, where)
    return dataset


def _check_stored(path: Path, dataset, where: str) -> None:
    """Refuse a dataset that declares more elements than the file holds: HDF5 reads unwritten
    elements as a fill value, so a file of a few KB can declare 10^10 labels, and reading them
    would ask for 75 GiB.  Without a filter (what embedx writes) the allocated storage must cover
    every declared element; with one (compression) every chunk must be stored, which bounds the
    data by the file size times the filter's ratio.  External raw-data files and virtual
    datasets (data in other files) are refused."""
    plist = dataset.id.get_create_plist()
    layout = plist.get_layout()
    if layout == _h5py().h5d.VIRTUAL or plist.get_external_count():
        raise _layout_error(path, f"dataset '{where}' keeps its data in other files")
    if not dataset.size:
        return
    declared = dataset.size * dataset.id.get_type().get_size()
    if not plist.get_nfilters():
        stored = dataset.id.get_storage_size()
        if stored < declared:
            raise _layout_error(path, f"dataset '{where}' declares shape {dataset.shape} ({declared:,} bytes) "
                                      f"but the file stores {stored:,} bytes of it")
        return
    needed = math.prod(-(-size // chunk) for size, chunk in zip(dataset.shape, dataset.chunks, strict=True))
    stored_chunks = dataset.id.get_num_chunks()
    if stored_chunks < needed:
        raise _layout_error(path, f"dataset '{where}' declares shape {dataset.shape} but the file stores "
                                  f"{stored_chunks:,} of its {needed:,} chunks")


def _json_object(path: Path, text: Any, what: str) -> dict[str, Any]:
    """The JSON object in attribute text ``text`` (embedx.untrusted's limits), else a ``CacheError``."""
    if not isinstance(text, str):
        raise _layout_error(path, f"{what} is {type(text).__name__}, not JSON text")
    value = untrusted.loads(text, what=f"{path}: {what}", error=CacheError,
                            hint="rebuild it with `embedx extract --overwrite`")
    if not isinstance(value, dict):
        raise _layout_error(path, f"{what} is a JSON {type(value).__name__}, not an object")
    return value


def _meta_from_attrs(path: Path, attrs: dict[str, Any]) -> CacheMeta:
    if "meta" not in attrs:
        raise _layout_error(path, "it has no attribute 'meta'")
    data = _json_object(path, attrs["meta"], "the attribute 'meta'")
    try:
        return CacheMeta.from_dict(data)
    except CacheError as e:
        raise CacheError(f"{path}: {e}") from e
    except (KeyError, TypeError, ValueError) as e:  # a field of the wrong type ("feature_dim": "abc")
        raise _layout_error(path, f"its metadata is unreadable ({' '.join(str(e).split())[:200]})") from e


def _extra_of(path: Path, attrs: dict[str, Any]) -> dict[str, Any]:
    """What the writer stored in the ``extra`` attribute (a JSON object; {} when there is none)."""
    text = attrs.get("extra")
    return _json_object(path, text, "the attribute 'extra'") if text is not None else {}


def _labels_and_classes(path: Path, handle) -> tuple[np.ndarray, list[str]]:
    """The labels (int64) and class names of an open cache, each label an index into the classes."""
    classes = [str(c) for c in _strings(handle["classes"])]
    if len(set(classes)) != len(classes):
        raise _layout_error(path, "its class names are not unique")
    labels = handle["labels"][()]
    outside = np.flatnonzero((labels < 0) | (labels >= len(classes)))
    if len(outside):
        raise _layout_error(path, f"{len(outside)} rows have labels outside its {len(classes)} classes "
                                  f"(rows {row_ranges(outside)}; label {labels[outside[0]]})")
    return labels.astype(np.int64), classes


def _read_errors(handle) -> list[tuple[str, str, str]]:
    if "errors" not in handle:
        return []
    group = handle["errors"]
    paths, reasons = _strings(group["paths"]), _strings(group["reasons"])
    keys = _strings(group["keys"]) if "keys" in group else np.full(len(paths), "")
    return [(str(p), str(r), str(k)) for p, r, k in zip(paths, reasons, keys, strict=True)]


def read_cache(path: str | Path, *, splits: Sequence[str] | str | None = None,
               load_features: bool = True) -> CacheData:
    """Load a complete cache; features come back as float32.

    Features are read chunk by chunk into one preallocated float32 array, so a
    float16 cache needs only its float32 size in memory, not twice that.
    ``splits`` keeps only rows of those splits (e.g. ``"train"`` or ``("train", "val")``).
    ``load_features=False`` reads everything but the features (``features`` is None);
    ``read_feature_rows`` then reads the rows wanted, when they are wanted.
    """
    path = Path(path)
    handle, attrs = _open_checked(path)
    with handle:
        meta = _meta_from_attrs(path, attrs)
        row_splits = _strings(handle["splits"])
        if splits is None:
            selected = None
        else:
            wanted = (splits,) if isinstance(splits, str) else tuple(splits)
            selected = np.flatnonzero(np.isin(row_splits, wanted))
        labels, classes = _labels_and_classes(path, handle)
        features = _read_features(handle, selected, path) if load_features else None
        paths, keys = _strings(handle["paths"]), _strings(handle["keys"])
        stats = None
        if "sizes" in handle and "mtimes" in handle:
            stats = np.stack([handle["sizes"][()], handle["mtimes"][()]], axis=1).astype(np.int64)
        if selected is not None:
            labels, paths, keys, row_splits = labels[selected], paths[selected], keys[selected], row_splits[selected]
            stats = stats[selected] if stats is not None else None
        errors = _read_errors(handle)
        return CacheData(
            features=features,
            labels=labels,
            classes=classes,
            splits=row_splits,
            paths=paths,
            keys=keys,
            meta=meta,
            errors=[(p, r) for p, r, _ in errors],
            complete=bool(attrs.get("complete")),
            path=path,
            attrs=attrs,
            error_keys=[k for _, _, k in errors],
            stats=stats,
            extra=_extra_of(path, attrs),
        )


def read_feature_rows(path: str | Path, rows: np.ndarray) -> np.ndarray:
    """Rows ``rows`` (row indices in ascending order) of a complete cache's features,
    as one new float32 array read chunk by chunk: memory for those rows only."""
    path = Path(path)
    rows = np.asarray(rows, dtype=np.int64)
    if len(rows) > 1 and np.any(np.diff(rows) <= 0):
        raise ValueError("read_feature_rows needs strictly ascending row indices")
    handle, _ = _open_checked(path)
    with handle:
        dataset = handle["features"]
        if len(rows) and (rows[0] < 0 or rows[-1] >= dataset.shape[0]):
            raise CacheError(f"{path} has {dataset.shape[0]} rows; "
                             f"asked for row {rows[0] if rows[0] < 0 else rows[-1]}")
        return _read_features(handle, rows, path)


@dataclass
class ViewData:
    """Views of a cache's images (``read_views``): one row per view, each pointing at its clean row."""

    features: np.ndarray | None  # float32, M x D (None: read with load_features=False)
    source: np.ndarray  # int64: the row of the clean image (index into read_cache's unfiltered rows)
    names: np.ndarray  # "augment/<i>" (random view i)
    keys: np.ndarray  # each view's own key (sha256 of image key, name and parameters)
    plan: dict  # how they were made: {"views": K, "augment": {...}, "seed": ...}


def read_views(path: str | Path, *, sources: np.ndarray | None = None, kind: str | None = None,
               load_features: bool = True) -> ViewData:
    """The views of a complete cache, empty (M = 0) when it has none.

    ``sources``: only views of these clean rows; ``kind``: only names ``<kind>/…`` (``"augment"``).
    Rows come in file order (grouped by clean row); features are float32, checksummed like rows.
    """
    path = Path(path)
    handle, attrs = _open_checked(path)
    with handle:
        dim = int(handle["features"].shape[1])
        if VIEWS not in handle:
            empty = np.array([], dtype=str)
            return ViewData(np.empty((0, dim), np.float32) if load_features else None,
                            np.array([], dtype=np.int64), empty, empty, {})
        group = handle[VIEWS]
        source = group["source"][()].astype(np.int64)
        outside = np.flatnonzero((source < 0) | (source >= handle["features"].shape[0]))
        if len(outside):
            raise _layout_error(path, f"{len(outside)} views point at rows it does not have "
                                      f"(view rows {row_ranges(outside)})")
        names = _strings(group["names"])
        keep = np.ones(len(source), dtype=bool)
        if sources is not None:
            keep &= np.isin(source, np.asarray(sources, dtype=np.int64))
        if kind is not None:
            keep &= np.char.startswith(names.astype(str), f"{kind}/") if len(names) else keep
        selected = np.flatnonzero(keep)
        features = _read_features(group, selected, path) if load_features else None
        return ViewData(features=features, source=source[selected], names=names[selected],
                        keys=_strings(group["keys"])[selected], plan=json.loads(_attr(group.attrs["plan"])))


def _text_or_none(value: Any) -> str | None:
    return None if value is None else str(value)


def _views_info(group) -> dict[str, Any]:
    names = _strings(group["names"])
    kinds = np.array([name.split("/", 1)[0] for name in names.tolist()], dtype=str)
    return {"rows": len(names), "plan": json.loads(_attr(group.attrs["plan"])),
            "per_kind": {kind: int(n) for kind, n in zip(*np.unique(kinds, return_counts=True), strict=True)},
            "images": int(len(np.unique(group["source"][()])))}


def _feature_blocks(group):
    """``(start, block)`` over the features of ``group`` (the file, or its ``views`` group) in
    stored dtype, a few HDF5 chunks at a time."""
    dataset = group["features"]
    rows, dim = dataset.shape
    step = dataset.chunks[0] if dataset.chunks else max(1, CHUNK_BYTES // max(1, dim * 4))
    step = max(step, 1024)
    for start in range(0, rows, step):
        yield start, dataset[start : min(start + step, rows)]


def iter_features(path: str | Path) -> Iterator[tuple[int, np.ndarray]]:
    """``(first row, block)`` over a complete cache's features in their stored dtype, a few
    HDF5 chunks at a time (memory for one block); each block is checked against its rows'
    checksums first (``CacheChecksumError`` naming the bad rows of that block)."""
    path = Path(path)
    handle, _ = _open_checked(path)
    with handle:
        checksums = handle[CHECKSUMS][()] if CHECKSUMS in handle else None
        for start, block in _feature_blocks(handle):
            if checksums is not None:
                bad = np.flatnonzero(row_checksums(block) != checksums[start : start + len(block)])
                if len(bad):
                    raise CacheChecksumError(path, (start + bad).tolist())
            yield start, block


def _read_features(handle, selected: np.ndarray | None, path: Path) -> np.ndarray:
    """Features of ``handle`` (the file, or its ``views`` group: all rows, or the ascending rows
    ``selected``) as float32; each row read is checked against its checksum
    (``CacheChecksumError`` naming every bad row)."""
    rows, dim = handle["features"].shape
    checksums = handle[CHECKSUMS][()] if CHECKSUMS in handle else None
    out = np.empty((rows if selected is None else len(selected), dim), dtype=np.float32)
    bad: list[int] = []
    done = 0
    for start, block in _feature_blocks(handle):
        stop = start + len(block)
        if selected is None:
            inside = np.arange(start, stop)
            out[start:stop] = block
        else:
            inside = selected[(selected >= start) & (selected < stop)]
            if not len(inside):
                continue
            block = block[inside - start]
            out[done : done + len(inside)] = block
            done += len(inside)
        if checksums is not None:
            bad.extend(inside[row_checksums(block) != checksums[inside]].tolist())
    if bad:
        raise CacheChecksumError(path, bad)
    return out


def damaged_rows(handle) -> tuple[list[int], list[int]]:
    """``(rows failing their checksum, rows holding NaN or inf)`` of an open cache (or of its
    ``views`` group), reading every row."""
    checksums = handle[CHECKSUMS][()] if CHECKSUMS in handle else None
    failed: list[int] = []
    nonfinite: list[int] = []
    for start, block in _feature_blocks(handle):
        if checksums is not None:
            failed.extend((start + np.flatnonzero(row_checksums(block) != checksums[start : start + len(block)]))
                          .tolist())
        nonfinite.extend((start + np.flatnonzero(~np.isfinite(block).all(axis=1))).tolist())
    return failed, nonfinite


def scan_rows(path: str | Path) -> tuple[list[int], list[int], bool]:
    """``(rows failing their checksum, rows holding NaN or inf, whether the cache has checksums)``,
    reading every row of a complete cache."""
    path = Path(path)
    handle, _ = _open_checked(path)
    with handle:
        failed, nonfinite = damaged_rows(handle)
        return failed, nonfinite, CHECKSUMS in handle


def scan_views(path: str | Path) -> tuple[int, list[int]]:
    """``(view rows, view rows failing their checksum or holding NaN or inf)`` of a complete
    cache, reading every view; ``(0, [])`` without views."""
    path = Path(path)
    handle, _ = _open_checked(path)
    with handle:
        if VIEWS not in handle:
            return 0, []
        failed, nonfinite = damaged_rows(handle[VIEWS])
        return int(handle[VIEWS]["features"].shape[0]), sorted(set(failed) | set(nonfinite))


def cache_info(path: str | Path) -> dict[str, Any]:
    """A summary of a cache without loading its features (what `embedx info` prints).

    For a cache that does not exist yet but has a journal (an interrupted run),
    the summary says how far the journal got, with ``complete`` False.
    """
    path = Path(path)
    if not path.exists() and journal_dir(path).is_dir():
        journal = _scan_journal(journal_dir(path))
        return {
            "path": str(path),
            "complete": False,
            "rows": journal["rows"],
            "journal": {"path": str(journal_dir(path)), "shards": journal["shards"], "rows": journal["rows"],
                        "errors": journal["errors"]},
            "meta": journal["meta"],
        }
    handle, attrs = _open_checked(path, allow_incomplete=True)
    with handle:
        meta = _meta_from_attrs(path, attrs)
        labels, classes = _labels_and_classes(path, handle)
        row_splits = _strings(handle["splits"])
        per_split: dict[str, dict[str, int]] = {}
        for split in sorted(set(row_splits.tolist())):
            counts = np.bincount(labels[row_splits == split], minlength=len(classes))
            per_split[split] = {name: int(n) for name, n in zip(classes, counts, strict=True)}
        errors = [{"path": p, "reason": r} for p, r, _ in _read_errors(handle)]
        features = handle["features"]
        info = {
            "path": str(path),
            "complete": bool(attrs.get("complete")),
            "rows": int(features.shape[0]),
            "dim": int(features.shape[1]),
            "dtype": str(features.dtype),
            "checksums": CHECKSUMS in handle,
            "classes": classes,
            "counts": per_split,
            "backbone": meta.backbone,
            "weights": meta.weights_tag,
            "feature_layer": meta.feature_layer,
            "precision": meta.precision,
            "shard": list(meta.shard) if meta.shard else None,
            "fingerprint": meta.fingerprint,
            "onnx_sha256": meta.onnx_sha256,
            "preprocess": meta.preprocess,
            "schema_version": attrs.get("schema_version"),
            "embedx_version": _text_or_none(attrs.get("embedx_version")),
            "created": _text_or_none(attrs.get("created")),
            "errors": len(errors),
            "error_list": errors,
            "file_size": path.stat().st_size,
        }
        if VIEWS in handle:
            info["views"] = _views_info(handle[VIEWS])
        extra = _extra_of(path, attrs)
        if extra:
            info["extra"] = extra
    if journal_dir(path).is_dir():
        info["journal"] = {"path": str(journal_dir(path)),
                           **{k: v for k, v in _scan_journal(journal_dir(path)).items() if k != "meta"}}
    return info


# --------------------------------------------------------------------------- journal


def _scan_journal(directory: Path) -> dict[str, Any]:
    meta = None
    meta_file = directory / "meta.json"
    if meta_file.is_file():
        try:
            meta = json.loads(meta_file.read_text("utf-8")).get("meta")
        except ValueError:
            meta = None
    rows = errors = shards = 0
    for shard in sorted(directory.glob("shard-*.npz")):
        loaded = _load_shard(shard, None)
        if loaded is not None:
            shards += 1
            rows += len(loaded["keys"])
            errors += len(loaded["error_reasons"])
    return {"meta": meta, "shards": shards, "rows": rows, "errors": errors}


def _load_shard(path: Path, feature_dim: int | None, *, with_features: bool = False) -> dict[str, np.ndarray] | None:
    """A shard's arrays, or None (with a warning) if it is unreadable or malformed."""
    try:
        with np.load(path, allow_pickle=False) as npz:
            data = {name: npz[name] for name in ("keys", "paths", "error_paths", "error_keys", "error_reasons")}
            features = npz["features"]
            if features.ndim != 2 or features.shape[0] != len(data["keys"]):
                raise ValueError(f"features shape {features.shape} does not match {len(data['keys'])} keys")
            if feature_dim is not None and features.shape[1] != feature_dim:
                raise ValueError(f"feature dim {features.shape[1]}, expected {feature_dim}")
            if CHECKSUMS in npz.files and not np.array_equal(row_checksums(features), npz[CHECKSUMS]):
                raise ValueError("its features do not match their checksums")
            if not np.isfinite(features).all():
                raise ValueError("its features hold NaN or inf")
            if with_features:
                data["features"] = features
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as e:
        logger.warning("ignoring unreadable journal shard %s: %s", path, e)
        return None
    return data


def _data_size(rows: int, row_bytes: int, chunk_rows: int, paths, splits, classes, errors, *,
               view_rows: int = 0, view_names: Sequence[str] = ()) -> int:
    """A bound on what a finished cache stores, in bytes: features in whole chunks (rows and views
    chunked apart) with 64 bytes of chunk index each (47-52 measured), 4 + 8 + 64 + 16 bytes of
    checksum, label, key, size and mtime per row (view rows: checksum, source and key), 64 per
    error key, 48 bytes plus the text per string (a vlen string's reference and heap object take
    32-40).  HDF5's fixed structures (superblock, object headers, heap collections) are not in
    it: ``_final_size`` adds room for them."""
    strings = [*paths, *splits, *classes, *(text for error in errors for text in error[:2]), *view_names]
    chunks = -(-rows // chunk_rows) + -(-view_rows // chunk_rows)
    fixed = (chunks * (chunk_rows * row_bytes + 64) + rows * (4 + 8 + 64 + 16) + view_rows * (4 + 8 + 64)
             + len(errors) * 64)
    return fixed + sum(48 + len(str(text).encode("utf-8")) for text in strings)


#: Room for HDF5's own structures on top of ``_data_size``: 10% + 64 KiB, at most 4 MiB.  What they
#: take does not grow with the rows (the per-row overheads are in ``_data_size``): a cache of no
#: rows is 13.5 KB, and no cache measured took more than its data size + 17 KB
#: (``tests/test_cache.py``).  A flat 4 MiB refused an 18 KB cache on a disk with 3 MiB free.
SLACK_FIXED = 64 << 10
SLACK_MAX = 4 << 20


def _final_size(rows: int, row_bytes: int, chunk_rows: int, paths, splits, classes, errors, *,
                view_rows: int = 0, view_names: Sequence[str] = (), attribute_bytes: int = 0) -> int:
    """A bound on the size of a finished cache, in bytes (what ``_reserve`` allocates): its data
    (``_data_size``), its JSON attributes (``attribute_bytes``: meta, extra, the views' plan; a
    merge of many shards has a large ``extra``) and room for HDF5's structures, 10% + 64 KiB of
    it, at most 4 MiB."""
    data = _data_size(rows, row_bytes, chunk_rows, paths, splits, classes, errors, view_rows=view_rows,
                      view_names=view_names) + 2 * attribute_bytes  # an attribute over 64 KiB is stored densely
    return data + min(SLACK_MAX, data // 10 + SLACK_FIXED)


def _reserve(path: Path, size: int) -> None:
    """Allocate ``size`` bytes of disk for ``path`` before HDF5 writes to it: a full disk then
    fails here, cleanly, not while HDF5 closes an object (which h5py cannot report and which
    ended in a segfault).  HDF5 truncates the file to its real size when it closes it."""
    with open(path, "rb+") as handle:
        try:
            os.posix_fallocate(handle.fileno(), 0, size)
        except OSError as e:
            if e.errno not in (errno_codes.EOPNOTSUPP, errno_codes.ENOSYS, errno_codes.EINVAL):
                raise


class CacheWriter:
    """Builds one cache: takes the lock, resumes the journal, appends batches, finalizes.

    Use as a context manager::

        with CacheWriter(path, meta) as writer:
            todo = [key for key in keys if key not in writer.done_keys]
            writer.append(batch_keys, batch_features, paths=batch_paths)
            writer.record_error("a/b.jpg", "cannot decode", key=key)
            writer.finalize(keys=..., paths=..., labels=..., splits=..., classes=..., errors=...)

    On entering, an existing complete cache at ``path`` with the same fingerprint is
    taken as the base (its features are reused by key); one with another fingerprint
    raises ``CacheMismatchError`` unless ``overwrite``.  The same goes for a journal.
    """

    def __init__(self, path: str | Path, meta: CacheMeta, *, overwrite: bool = False) -> None:
        self.path = Path(path)
        self.meta = meta
        self.overwrite = overwrite
        self.journal = journal_dir(self.path)
        self._lock = None
        self._sources: dict[str, tuple[str, int]] = {}  # key -> (shard file name | "", row)
        self._base_rows = 0
        self._known_errors: dict[str, str] = {}
        self._pending_errors: list[tuple[str, str, str]] = []
        self._next_shard = 0
        self.reused_from_journal = 0
        #: The previous cache's ``extra`` attribute (what the caller stored at finalize), or {}.
        self.base_extra: dict[str, Any] = {}
        #: relpath -> (size, mtime_ns, key) of the previous cache's rows (when it recorded stats).
        self.base_stats: dict[str, tuple[int, int, str]] = {}
        #: Rows of the previous cache that fail their checksum or hold NaN/inf (not reused).
        self.damaged_rows: list[int] = []
        #: View rows of the previous cache that fail their checksum or hold NaN/inf (not reused).
        self.damaged_views: list[int] = []
        #: How the previous cache's views were made (its ``views`` group's plan), or {} without views.
        self.base_views: dict[str, Any] = {}

    # -- lifecycle

    def __enter__(self) -> CacheWriter:
        self.open()
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def open(self) -> CacheWriter:
        make_parent(self.path, what="feature cache")
        lock = contextlib.ExitStack()
        lock.enter_context(writer_lock(self.path, what="feature cache", error=CacheLockedError))
        self._lock = lock
        remove_stale_temporaries(self.path.parent, self.path.name)  # a finalize that was killed (we hold the lock)
        try:
            self._open_base()
            self._open_journal()
        except BaseException:
            self.close()
            raise
        return self

    def close(self) -> None:
        if self._lock is not None:
            self._lock.close()
            self._lock = None

    def _mismatch(self, what: str, other: CacheMeta) -> CacheMismatchError:
        diffs = "; ".join(other.differences(self.meta))
        return CacheMismatchError(
            f"{what} was built with other settings than this run ({diffs}); "
            f"pass --overwrite to replace it, or write to another file with -o"
        )

    def _open_base(self) -> None:
        if not self.path.exists() or self.overwrite:
            return
        try:
            handle, attrs = _open_checked(self.path)
        except CacheError as e:
            raise CacheError(f"{e} (or pass --overwrite to replace it)") from e
        with handle:
            base_meta = _meta_from_attrs(self.path, attrs)
            if base_meta.fingerprint != self.meta.fingerprint:
                raise self._mismatch(f"cache {self.path}", base_meta)
            keys = _strings(handle["keys"])
            failed, nonfinite = damaged_rows(handle)
            damaged = set(failed) | set(nonfinite)
            for row, key in enumerate(keys.tolist()):
                if row not in damaged:  # a damaged row is computed again
                    self._sources.setdefault(key, ("", row))
            self.damaged_rows = sorted(damaged)
            if failed:
                logger.warning("%s: rows %s fail their checksums; computing them again",
                               self.path, row_ranges(failed))
            if nonfinite:
                logger.warning("%s: rows %s hold NaN or inf; computing them again",
                               self.path, row_ranges(nonfinite))
            self._base_rows = len(keys)
            if VIEWS in handle:
                self._open_base_views(handle[VIEWS])
            if "sizes" in handle and "mtimes" in handle:
                sizes, mtimes = handle["sizes"][()].tolist(), handle["mtimes"][()].tolist()
                self.base_stats = {
                    path: (size, mtime, key)
                    for path, size, mtime, key in zip(_strings(handle["paths"]).tolist(), sizes, mtimes,
                                                      keys.tolist(), strict=True)
                }
            self.base_extra = _extra_of(self.path, attrs)
            for _path, reason, key in _read_errors(handle):
                if key:
                    self._known_errors[key] = reason
        logger.info("reusing %d rows of %s", self._base_rows, self.path)

    def _open_base_views(self, group) -> None:
        failed, nonfinite = damaged_rows(group)
        damaged = set(failed) | set(nonfinite)
        for row, key in enumerate(_strings(group["keys"]).tolist()):
            if row not in damaged:
                self._sources.setdefault(key, (_BASE_VIEWS, row))
        self.damaged_views = sorted(damaged)
        if damaged:
            logger.warning("%s: view rows %s are damaged; computing them again", self.path, row_ranges(damaged))
        self.base_views = json.loads(_attr(group.attrs["plan"]))

    def _open_journal(self) -> None:
        meta_file = self.journal / "meta.json"
        if self.journal.is_dir():
            state = None
            try:
                state = json.loads(meta_file.read_text("utf-8"))
                journal_meta = CacheMeta.from_dict(state["meta"])
            except (OSError, ValueError, KeyError, CacheError, TypeError):
                logger.warning("discarding journal %s: its meta.json is missing or unreadable", self.journal)
                shutil.rmtree(self.journal)
            else:
                if state.get("version") != JOURNAL_VERSION:
                    if not self.overwrite:
                        raise CacheError(
                            f"journal {self.journal} has layout {state.get('version')}, this embedx writes "
                            f"{JOURNAL_VERSION}; pass --overwrite to start over"
                        )
                    shutil.rmtree(self.journal)
                elif journal_meta.fingerprint != self.meta.fingerprint:
                    # a journal without a shard holds nothing to lose (a run that failed at its start)
                    if not self.overwrite and any(self.journal.glob("shard-*.npz")):
                        raise self._mismatch(f"the unfinished extraction in {self.journal}", journal_meta)
                    shutil.rmtree(self.journal)
                elif self.overwrite and not state.get("overwrite"):
                    # --overwrite means start over, unless this journal was itself
                    # started by --overwrite (then this is the rerun of a killed run).
                    shutil.rmtree(self.journal)
        try:
            self.journal.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise write_error(self.journal, e) from e
        if not meta_file.is_file():
            state = {"version": JOURNAL_VERSION, "schema_version": SCHEMA_VERSION, "meta": self.meta.to_dict(),
                     "fingerprint": self.meta.fingerprint, "overwrite": self.overwrite,
                     "embedx_version": __version__}
            self._write_journal(meta_file.name, json.dumps(state, indent=1))
        for temp in self.journal.glob(".*"):
            temp.unlink(missing_ok=True)  # journal files are never hidden: torn writes of a killed run
        numbers = []
        for shard in sorted(self.journal.glob("shard-*.npz")):
            numbers.append(int(shard.stem.split("-")[1]))
            data = _load_shard(shard, self.meta.feature_dim)
            if data is None:
                continue
            for row, key in enumerate(data["keys"].tolist()):
                if key not in self._sources or self._sources[key][0] in ("", _BASE_VIEWS):
                    if key not in self._sources:
                        self.reused_from_journal += 1
                    self._sources[key] = (shard.name, row)
            for key, reason in zip(data["error_keys"].tolist(), data["error_reasons"].tolist(), strict=True):
                if key:
                    self._known_errors[key] = reason
        self._next_shard = max(numbers, default=-1) + 1
        if numbers:
            logger.info("resuming %s: %d shards, %d rows done", self.journal, len(numbers), self.reused_from_journal)

    # -- state

    @property
    def done_keys(self) -> set[str]:
        """Keys whose features are already available (base cache or journal)."""
        return set(self._sources)

    def has(self, key: str) -> bool:
        return key in self._sources

    @property
    def known_errors(self) -> dict[str, str]:
        """key -> reason for images that failed before (not retried while their bytes are the same)."""
        return dict(self._known_errors)

    @property
    def journal_notes(self) -> dict[str, Any]:
        """What the caller noted in the journal (``note``), e.g. how it calibrated int8."""
        try:
            return json.loads((self.journal / "notes.json").read_text("utf-8"))
        except (OSError, ValueError):
            return {}

    def note(self, values: dict[str, Any]) -> None:
        """Merge ``values`` into the journal's notes (atomically), for a resumed run to read."""
        notes = {**self.journal_notes, **values}
        self._write_journal("notes.json", json.dumps(notes))

    def discard_previous(self) -> None:
        """Forget the previous cache's rows and the journal: everything is computed again.

        For when the earlier rows cannot match this run's model (an int8 model whose
        calibration images are gone).  The previous cache stays on disk until finalize.
        """
        self._sources.clear()
        self._known_errors.clear()
        self._base_rows = 0
        self.base_extra = {}
        self.base_stats = {}
        self.base_views = {}
        for shard in self.journal.glob("shard-*.npz"):
            shard.unlink()
        (self.journal / "notes.json").unlink(missing_ok=True)

    # -- writing

    def record_error(self, path: str, reason: str, *, key: str = "") -> None:
        """Remember a skipped file; it is journaled with the next ``append`` or ``flush``."""
        self._pending_errors.append((str(path), str(reason), str(key or "")))
        if key:
            self._known_errors[key] = reason

    def append(self, keys: Sequence[str], features: np.ndarray, *, paths: Sequence[str] | None = None) -> None:
        """Journal one batch (atomically): after this returns, a crash does not lose it."""
        features = np.asarray(features, dtype=np.float32)
        if features.ndim != 2 or features.shape != (len(keys), self.meta.feature_dim):
            raise CacheError(
                f"expected features of shape ({len(keys)}, {self.meta.feature_dim}), got {features.shape}"
            )
        paths = list(paths) if paths is not None else [""] * len(keys)
        self._check_finite(keys, features, paths)
        errors, self._pending_errors = self._pending_errors, []
        name = f"shard-{self._next_shard:08d}.npz"
        self._next_shard += 1
        arrays = {
            "keys": np.asarray(list(keys), dtype="U64"),
            "paths": np.asarray(paths, dtype=str),
            "features": features,
            CHECKSUMS: row_checksums(features),
            "error_paths": np.asarray([e[0] for e in errors], dtype=str),
            "error_reasons": np.asarray([e[1] for e in errors], dtype=str),
            "error_keys": np.asarray([e[2] for e in errors], dtype="U64"),
        }
        self._write_journal(name, lambda fh: np.savez(fh, **arrays))
        for row, key in enumerate(keys):
            self._sources[key] = (name, row)

    def _check_finite(self, keys: Sequence[str], features: np.ndarray, paths: Sequence[str]) -> None:
        """Refuse features that are NaN or inf, or that become inf when stored (float16 overflow)."""
        with np.errstate(over="ignore"):
            stored = np.isfinite(features.astype(self.meta.dtype)).all(axis=1)
        if stored.all():
            return
        bad = np.flatnonzero(~stored)
        names = ", ".join(paths[i] or keys[i] for i in bad[:5]) + (", …" if len(bad) > 5 else "")
        if np.isfinite(features[bad]).all():
            raise NonFiniteFeaturesError(
                f"the features of {len(bad)} images ({names}) exceed the float16 range (±65504) and would be "
                "stored as inf; extract with `--dtype float32`"
            )
        raise NonFiniteFeaturesError(
            f"the backbone gave NaN or inf features for {len(bad)} images ({names}); nothing of them is "
            "stored: check the model and its weights (or leave these images out)"
        )

    def _write_journal(self, name: str, content: Any) -> None:
        """``atomic_write`` of one journal file; an OSError becomes one ``CacheWriteError`` line."""
        try:
            atomic_write(self.journal / name, content)
        except OSError as e:
            raise write_error(self.journal / name, e) from e

    def flush(self) -> None:
        """Journal pending error records even if no batch follows."""
        if self._pending_errors:
            self.append([], np.empty((0, self.meta.feature_dim), dtype=np.float32))

    def finalize(
        self,
        *,
        keys: Sequence[str],
        paths: Sequence[str],
        labels: Sequence[int],
        splits: Sequence[str],
        classes: Sequence[str],
        errors: Sequence[tuple[str, str]] | Sequence[tuple[str, str, str]],
        attrs: dict[str, Any] | None = None,
        stats: Sequence[tuple[int, int]] | None = None,
        views: dict[str, Any] | None = None,
    ) -> Path:
        """Write the finished cache with these rows, in this order, then drop the journal.

        Every key must have features (appended or reused).  ``errors`` are
        ``(path, reason)`` or ``(path, reason, key)``.  ``attrs`` go into the file's
        ``extra`` attribute as JSON.  ``stats`` are ``(size, mtime_ns)`` per row, as seen
        when the key was computed; the next writer trusts a row's key for a file whose
        path, size and mtime are unchanged (``base_stats``) instead of reading it again.
        ``views``: ``{"keys", "source" (the clean row of each), "names", "plan"}``, written to
        the ``views`` group (every view key must have features, like a row's).
        """
        rows = len(keys)
        if not (len(paths) == len(labels) == len(splits) == rows) or (stats is not None and len(stats) != rows):
            raise CacheError("finalize needs keys, paths, labels, splits (and stats) of the same length")
        view_keys = list(views["keys"]) if views else []
        missing = [k for k in [*keys, *view_keys] if k not in self._sources]
        if missing:
            raise CacheError(f"{len(missing)} rows have no features (first key {missing[0]}); "
                             "this is a bug in the caller")
        errors = [tuple(e) + ("",) * (3 - len(e)) for e in errors]
        try:
            with atomic_path(self.path) as temp:  # fsynced, then renamed over the cache; removed on error
                self._write_final(temp, keys=keys, paths=paths, labels=labels, splits=splits, classes=classes,
                                  errors=errors, attrs=attrs, stats=stats, views=views)
        except (OSError, RuntimeError) as e:  # h5py reports a failed write as either
            raise write_error(self.path, e) from e
        shutil.rmtree(self.journal, ignore_errors=True)
        logger.info("wrote %s: %d rows, %d errors", self.path, rows, len(errors))
        return self.path

    def _write_final(self, temp: Path, *, keys, paths, labels, splits, classes, errors, attrs, stats,
                     views=None) -> None:
        """Write the whole cache to ``temp`` and close it; on any error every HDF5 handle is
        closed (the output, then the base) before the error goes on, so that h5py never
        finalizes a half-closed file later."""
        h5py = _h5py()
        rows = len(keys)
        dim = self.meta.feature_dim
        dtype = np.dtype(self.meta.dtype)
        view_keys = list(views["keys"]) if views else []
        view_rows = len(view_keys)
        chunk_rows = max(1, min(max(rows, 1), CHUNK_BYTES // (dim * dtype.itemsize)))
        shards: OrderedDict[str, np.ndarray] = OrderedDict()
        base = h5py.File(self.path, "r") if self._base_rows and self.path.exists() else None
        out = None
        try:
            # no chunk cache: a failed write of features fails at once and leaves nothing to flush
            out = h5py.File(temp, "w", rdcc_nbytes=0)
            view_names = [str(n) for n in views["names"]] if views else []
            attribute_bytes = sum(len(text.encode("utf-8")) for text in (
                json.dumps(self.meta.to_dict(), sort_keys=True), json.dumps(attrs or {}, sort_keys=True, default=str),
                json.dumps(views["plan"], sort_keys=True) if views else ""))
            _reserve(temp, _final_size(rows, dim * dtype.itemsize, chunk_rows, paths, splits, classes, errors,
                                       view_rows=view_rows, view_names=view_names, attribute_bytes=attribute_bytes))
            out.attrs["format"] = "embedx-features"
            out.attrs["schema_version"] = SCHEMA_VERSION
            out.attrs["complete"] = False
            self._write_features(out, keys, base, shards, chunk_rows)
            out.create_dataset("labels", data=np.asarray(labels, dtype=np.int64))
            out.create_dataset("classes", data=list(classes), dtype=_vlen_str())
            out.create_dataset("paths", data=[str(p) for p in paths], dtype=_vlen_str())
            out.create_dataset("keys", data=np.asarray(list(keys), dtype="S64"))
            out.create_dataset("splits", data=[str(s) for s in splits], dtype=_vlen_str())
            if stats is not None:
                table = np.asarray(stats, dtype=np.int64).reshape(rows, 2)
                out.create_dataset("sizes", data=table[:, 0])
                out.create_dataset("mtimes", data=table[:, 1])
            group = out.create_group("errors")
            group.create_dataset("paths", data=[e[0] for e in errors], dtype=_vlen_str())
            group.create_dataset("reasons", data=[e[1] for e in errors], dtype=_vlen_str())
            group.create_dataset("keys", data=np.asarray([e[2] for e in errors], dtype="S64"))
            del group
            if views:
                group = out.create_group(VIEWS)
                group.attrs["plan"] = json.dumps(views["plan"], sort_keys=True)
                self._write_features(group, view_keys, base, shards, chunk_rows)
                group.create_dataset("source", data=np.asarray(views["source"], dtype=np.int64))
                group.create_dataset("names", data=[str(n) for n in views["names"]], dtype=_vlen_str())
                group.create_dataset("keys", data=np.asarray(view_keys, dtype="S64"))
                del group
            meta = self.meta
            out.attrs["embedx_version"] = __version__
            out.attrs["created"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
            out.attrs["meta"] = json.dumps(meta.to_dict(), sort_keys=True)
            out.attrs["fingerprint"] = meta.fingerprint
            for name in ("backbone", "weights_tag", "weights_arg", "onnx_path", "onnx_sha256",
                         "feature_layer", "dtype", "precision"):
                out.attrs[name] = str(getattr(meta, name))
            out.attrs["feature_dim"] = meta.feature_dim
            out.attrs["preprocess"] = json.dumps(meta.preprocess, sort_keys=True)
            out.attrs["extra"] = json.dumps(attrs or {}, sort_keys=True, default=str)
            out.attrs["complete"] = True  # last: only a whole file says complete
            out.flush()  # a full disk fails here, with every object closed
            size = out.id.get_filesize()  # what HDF5 wrote: the rest of the reservation goes
            handle, out = out, None
            handle.close()
            if os.stat(temp).st_size > size:
                os.truncate(temp, size)
                h5py.File(temp, "r").close()  # HDF5 checks that nothing it addresses was cut off
        finally:
            if out is not None:
                try:
                    out.close()
                except (OSError, RuntimeError):
                    logger.debug("closing %s after a failed write also failed", temp, exc_info=True)
            if base is not None:
                base.close()

    def _write_features(self, group, keys: Sequence[str], base, shards: OrderedDict, chunk_rows: int) -> None:
        """``features`` and ``row_crc32`` of ``group`` (the file or its views group): the rows of ``keys``."""
        rows, dim, dtype = len(keys), self.meta.feature_dim, np.dtype(self.meta.dtype)
        features = group.create_dataset(
            "features", shape=(rows, dim), maxshape=(None, dim), dtype=dtype, chunks=(chunk_rows, dim)
        )
        checksums = group.create_dataset(CHECKSUMS, shape=(rows,), dtype=np.uint32)
        step = chunk_rows * max(1, 4096 // chunk_rows)  # whole chunks: there is no chunk cache
        for start in range(0, rows, step):
            block = self._gather(keys[start : start + step], base, shards).astype(dtype)
            features[start : start + len(block)] = block
            checksums[start : start + len(block)] = row_checksums(block)

    def _gather(self, keys: Sequence[str], base, shards: OrderedDict) -> np.ndarray:
        block = np.empty((len(keys), self.meta.feature_dim), dtype=np.float32)
        from_base: dict[str, list[tuple[int, int]]] = {"": [], _BASE_VIEWS: []}
        for i, key in enumerate(keys):
            source, row = self._sources[key]
            if source in from_base:
                from_base[source].append((i, row))
                continue
            if source not in shards:
                data = _load_shard(self.journal / source, self.meta.feature_dim, with_features=True)
                if data is None:
                    raise CacheError(f"journal shard {source} became unreadable while finalizing; "
                                     "rerun the same command")
                shards[source] = data["features"]
                while len(shards) > 16:
                    shards.popitem(last=False)
            else:
                shards.move_to_end(source)
            block[i] = shards[source][row]
        for source, wanted in from_base.items():
            if not wanted:
                continue
            dataset = base["features"] if source == "" else base[VIEWS]["features"]
            rows = np.array(sorted({row for _, row in wanted}))
            low, high = int(rows[0]), int(rows[-1]) + 1
            if high - low <= 4 * len(rows):
                values = dataset[low:high][rows - low]  # a slice: far faster than a point selection
            else:
                values = dataset[rows]
            position = {row: j for j, row in enumerate(rows.tolist())}
            for i, row in wanted:
                block[i] = values[position[row]]
        return block
