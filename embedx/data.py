"""Finding images and their labels on disk; never decodes a pixel (torch-free).

Three layouts are understood, chosen by what the source looks like:

- ``class_folders``: ``DATA/<class>/**/<image>``; every item gets split ``"train"``.
- ``split_folders``: ``DATA/{train,val,test}/<class>/**/<image>``; the split is the top
  folder, classes are the union over splits (sorted).  Chosen when every visible
  top-level folder is a split name.
- ``manifest``: a CSV ``path,label[,split]`` (header row optional).  Relative paths are
  resolved against the CSV's folder, or against ``source`` when ``discover(folder,
  manifest=csv)`` is called with a folder.  A path that resolves (symlinks followed)
  outside that folder is refused unless ``allow_outside``.

An image is a file whose extension Pillow can open (case-insensitive).  Symlinks are
followed, except a folder link back into the walk, to DATA, or to any folder above the
link (a loop: ``bees/loop -> ..`` would relabel the ants as bees).  Whatever is
found but cannot be an item (a folder named ``x.jpg``, a symlink loop, an unreadable
folder, a non-image file, a name that is not valid UTF-8, a missing manifest entry)
goes to ``ImageDataset.skipped`` as ``(relpath, reason)``; nothing is dropped
silently.  Hidden entries (names starting with ``.``, e.g. ``.DS_Store``, ``._x.jpg``)
are ignored.  Whether an image file actually decodes is not decided here: extraction
decodes it and records failures.

An empty class folder stays a class with 0 items (a warning is logged), so the class
list, and hence the label ids, do not change when a folder is emptied.

Order is deterministic: classes sorted by name, items sorted by (split, class, relpath).
"""

from __future__ import annotations

import csv
import errno
import logging
import os
from collections import Counter
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from embedx.errors import ConfigError, DataError
from embedx.fsio import sha256_file

logger = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")
LAYOUTS = ("class_folders", "split_folders", "manifest")


@dataclass(frozen=True)
class ImageItem:
    path: Path
    relpath: str
    label: int
    split: str


@dataclass(frozen=True)
class ImageDataset:
    root: Path
    classes: tuple[str, ...]
    items: tuple[ImageItem, ...]
    layout: str
    skipped: tuple[tuple[str, str], ...] = ()

    def __len__(self) -> int:
        return len(self.items)

    def counts(self) -> dict[str, dict[str, int]]:
        """``{split: {class: n}}`` for the splits present; every class appears, even at 0."""
        tally = Counter((item.split, item.label) for item in self.items)
        splits = sorted({item.split for item in self.items}, key=_split_order)
        return {
            split: {name: tally[(split, label)] for label, name in enumerate(self.classes)}
            for split in splits
        }


@lru_cache(maxsize=1)
def image_extensions() -> frozenset[str]:
    """Lower-case extensions (with the dot) of every format Pillow can open."""
    from PIL import Image

    registered = Image.registered_extensions()  # runs Image.init() and loads all plugins
    return frozenset(ext.lower() for ext, fmt in registered.items() if fmt in Image.OPEN)


def is_image_name(name: str) -> bool:
    return os.path.splitext(name)[1].lower() in image_extensions()


#: The cache key of an image: the sha256 hex digest of its bytes (``fsio.sha256_file``).
hash_file = sha256_file


def split_for_key(key_hex: str, val_fraction: float) -> str:
    """``"val"`` or ``"train"`` from a content key, the same on every run and machine.

    The first 64 bits of the sha256, read as a fraction of 2**64, below
    ``val_fraction`` mean ``"val"``.  Identical images land in the same split, so
    duplicates never leak between train and val.
    """
    if not 0.0 <= val_fraction < 1.0:
        raise ConfigError(f"val_fraction must be in [0, 1), got {val_fraction}")
    try:
        if len(key_hex) < 16:
            raise ValueError("too short")
        position = int(key_hex[:16], 16)
    except ValueError as e:
        raise ConfigError(f"expected a sha256 hex digest as key, got {key_hex!r}") from e
    # integer comparison: IEEE doubles make the threshold the same on every machine
    return "val" if position < int(val_fraction * (1 << 64)) else "train"


def discover(source: str | Path, *, manifest: str | Path | None = None, allow_outside: bool = False) -> ImageDataset:
    """Find the images and labels under ``source`` (a folder, or a ``.csv`` manifest).

    Raises ``DataError`` when the source cannot be used at all: missing, not a
    folder, empty, without class folders, or without a single image file, or when a
    manifest path resolves (symlinks followed) outside DATA and ``allow_outside`` is false.
    """
    source = Path(source)
    if manifest is not None:
        manifest = Path(manifest)
        if not source.is_dir():
            raise DataError(
                f"with a manifest, DATA must be the folder its paths are relative to; "
                f"{source} is not a folder"
            )
        return _from_manifest(manifest, root=source, allow_outside=allow_outside)
    if not source.exists():
        raise DataError(f"data folder {source} does not exist; pass a folder of class folders or a CSV")
    if source.is_file():
        if source.suffix.lower() == ".csv":
            return _from_manifest(source, root=source.parent, allow_outside=allow_outside)
        raise DataError(
            f"DATA must be a folder of class folders (DATA/<class>/<image>) or a .csv manifest "
            f"(path,label[,split]); {source} is a file"
        )
    return _from_folders(source)


# -- folders -----------------------------------------------------------------------


class _Walker:
    """Collects image files under one class folder, recording what it skips."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.skipped: list[tuple[str, str]] = []

    def rel(self, path: str) -> str:
        return Path(os.path.relpath(path, self.root)).as_posix()

    def skip(self, path: str, reason: str) -> None:
        relpath = self.rel(path)
        if not _utf8_ok(relpath):  # keep the record storable: undecodable bytes as \xNN
            relpath = relpath.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
        self.skipped.append((relpath, reason))

    def entries(self, folder: str) -> list[os.DirEntry] | None:
        try:
            with os.scandir(folder) as it:
                return sorted((e for e in it if not e.name.startswith(".")), key=lambda e: e.name)
        except PermissionError:
            self.skip(folder, "permission denied: cannot list this folder")
        except OSError as e:
            self.skip(folder, f"cannot list this folder ({e.strerror or e})")
        return None

    def images(self, folder: str, ancestors: frozenset[str] = frozenset()) -> list[str]:
        """Image paths under ``folder`` (recursively, following symlinks, loops skipped).

        A folder link is a loop when it leads to a folder already being walked, or to the
        folder it is in or any folder above it (``bees/loop -> ..`` would otherwise store
        ``bees/loop/ants/*`` as bees); a link elsewhere is followed once.
        """
        real = os.path.realpath(folder)
        if real in ancestors:
            self.skip(folder, "symlink loop: links back to a folder that contains it")
            return []
        if ancestors and os.path.islink(folder):
            inside = os.path.realpath(os.path.dirname(folder))
            if inside == real or inside.startswith(real.rstrip(os.sep) + os.sep):
                self.skip(folder, "symlink loop: links to a folder that contains it")
                return []
        entries = self.entries(folder)
        if entries is None:
            return []
        ancestors = ancestors | {real}
        found: list[str] = []
        for entry in entries:
            kind = self.kind(entry)
            if kind == "dir":
                if is_image_name(entry.name):
                    # Not an image, but almost surely meant to be one: say so.
                    self.skip(entry.path, "a folder named like an image; its contents are not used")
                elif not _utf8_ok(entry.name):  # every image's relpath is stored as text
                    self.skip(entry.path, "folder name is not valid UTF-8; its contents are not used")
                else:
                    found.extend(self.images(entry.path, ancestors))
            elif kind == "file":
                if not is_image_name(entry.name):
                    self.skip(entry.path, "not an image file extension Pillow can open")
                elif not _utf8_ok(entry.name):
                    self.skip(entry.path, "file name is not valid UTF-8")
                else:
                    found.append(entry.path)
            else:
                self.skip(entry.path, kind)
        return found

    @staticmethod
    def kind(entry: os.DirEntry) -> str:
        """``"dir"``, ``"file"`` or the reason the entry is neither."""
        try:
            if entry.is_dir(follow_symlinks=True):
                return "dir"
            if entry.is_file(follow_symlinks=True):
                return "file"
        except OSError:
            pass
        if entry.is_symlink():
            try:
                os.stat(entry.path)
            except OSError as e:
                if e.errno == errno.ELOOP:
                    return "symlink loop"
                return "broken symlink"
            return "symlink to something that is neither a file nor a folder"
        return "not a regular file or folder"


def list_images(folder: str | Path) -> tuple[list[Path], list[tuple[str, str]]]:
    """The image files under ``folder`` as ``discover`` finds them (hidden entries ignored,
    symlinks followed, loops skipped; depth-first, sorted by name) and what was skipped
    as ``(path, reason)``: the one walker ``predict`` and ``extract`` share."""
    folder = Path(folder)
    walker = _Walker(folder)
    found = [Path(path) for path in walker.images(str(folder))]
    return found, [(str(folder / relpath), reason) for relpath, reason in walker.skipped]


def _utf8_ok(name: str) -> bool:
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _split_order(split: str) -> int:
    return SPLITS.index(split) if split in SPLITS else len(SPLITS)


def item_order(split: str, label: int, relpath: str) -> tuple[int, int, str]:
    """The sort key of a data set's items (their order in ``ImageDataset.items`` and in a cache)."""
    return _split_order(split), label, relpath


def _from_folders(root: Path) -> ImageDataset:
    walker = _Walker(root)
    top = walker.entries(str(root))
    if top is None:
        raise DataError(f"cannot list data folder {root}: {walker.skipped[-1][1]}")
    walker.skipped.clear()
    if not top:
        raise DataError(f"data folder {root} is empty; expected one folder per class")
    top_dirs = [e for e in top if walker.kind(e) == "dir"]
    if not top_dirs:
        raise DataError(
            f"data folder {root} has no class folders ({len(top)} files at the top level); "
            f"expected DATA/<class>/<image> or DATA/train/<class>/<image>"
        )
    split_layout = all(e.name in SPLITS for e in top_dirs)
    groups: list[tuple[str, os.DirEntry]]  # (split, class folder)
    if split_layout:
        groups = []
        for split_entry in top_dirs:
            class_entries = walker.entries(split_entry.path) or []
            for entry in class_entries:
                if walker.kind(entry) == "dir":
                    groups.append((split_entry.name, entry))
                else:
                    walker.skip(entry.path, f"a file directly in the {split_entry.name!r} split folder, "
                                            "not in a class folder")
        if not groups:
            raise DataError(
                f"data folder {root} has split folders ({', '.join(e.name for e in top_dirs)}) "
                f"but no class folders inside them; expected DATA/train/<class>/<image>"
            )
    else:
        groups = [("train", e) for e in top_dirs]
    for split, entry in list(groups):
        if not _utf8_ok(entry.name):  # a class name must be storable as text
            walker.skip(entry.path, "folder name is not valid UTF-8")
            groups.remove((split, entry))
    for entry in top:
        if walker.kind(entry) != "dir":
            walker.skip(entry.path, "a file at the top of the data folder, not in a class folder")

    classes = tuple(sorted({entry.name for _, entry in groups}))
    label_of = {name: i for i, name in enumerate(classes)}
    items: list[ImageItem] = []
    top_real = frozenset({os.path.realpath(root)})  # a class folder linking to DATA is a loop too
    for split, entry in groups:
        for path in walker.images(entry.path, top_real):
            items.append(ImageItem(Path(path), walker.rel(path), label_of[entry.name], split))
    items.sort(key=lambda it: item_order(it.split, it.label, it.relpath))
    if not items:
        raise DataError(
            f"data folder {root} has {len(classes)} class folder(s) but no image files "
            f"(recognised extensions: .jpg, .png, .webp, ... any format Pillow opens)"
        )
    dataset = ImageDataset(
        root=root,
        classes=classes,
        items=tuple(items),
        layout="split_folders" if split_layout else "class_folders",
        skipped=tuple(sorted(walker.skipped)),
    )
    _log_summary(dataset)
    return dataset


def _log_summary(dataset: ImageDataset) -> None:
    per_class = Counter(item.label for item in dataset.items)
    for label, name in enumerate(dataset.classes):
        if not per_class[label]:
            logger.warning("class %r has no images; it is kept as a class with 0 items", name)
    for relpath, reason in dataset.skipped:
        logger.info("skipped %s: %s", relpath, reason)
    logger.info(
        "found %d images in %d classes (%s layout), %d entries skipped",
        len(dataset.items), len(dataset.classes), dataset.layout, len(dataset.skipped),
    )


# -- manifest ----------------------------------------------------------------------


def _from_manifest(manifest: Path, *, root: Path, allow_outside: bool = False) -> ImageDataset:
    if not manifest.is_file():
        raise DataError(f"manifest {manifest} does not exist or is not a file")
    try:
        with open(manifest, newline="", encoding="utf-8-sig") as handle:
            rows = [row for row in csv.reader(handle)]
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise DataError(f"cannot read manifest {manifest}: {e}") from e
    numbered = [(n, row) for n, row in enumerate(rows, start=1) if row and any(c.strip() for c in row)]
    if numbered and [c.strip().lower() for c in numbered[0][1][:2]] == ["path", "label"]:
        numbered = numbered[1:]
    if not numbered:
        raise DataError(f"manifest {manifest} has no rows; expected lines of path,label[,split]")

    parsed: list[tuple[int, str, str, str]] = []
    for line, row in numbered:
        if len(row) not in (2, 3):
            raise DataError(
                f"manifest {manifest} line {line}: expected path,label[,split], got {len(row)} columns"
            )
        path, label = row[0].strip(), row[1].strip()
        split = row[2].strip().lower() if len(row) == 3 and row[2].strip() else "train"
        if not path or not label:
            raise DataError(f"manifest {manifest} line {line}: empty path or label")
        for column, value in (("path", path), ("label", label)):
            if "\0" in value:  # no file name holds one, and a class name holding one cannot be stored
                raise DataError(f"manifest {manifest} line {line}: the {column} holds a NUL byte; fix that line")
        if split not in SPLITS:
            raise DataError(
                f"manifest {manifest} line {line}: split must be one of {', '.join(SPLITS)}, "
                f"got {split!r}"
            )
        parsed.append((line, path, label, split))

    classes = tuple(sorted({label for _, _, label, _ in parsed}))
    label_of = {name: i for i, name in enumerate(classes)}
    items: list[ImageItem] = []
    skipped: list[tuple[str, str]] = []
    first_line: dict[str, int] = {}
    for line, raw, label, split in parsed:
        path = Path(raw) if os.path.isabs(raw) else root / raw
        if "\\" in raw and not path.exists():  # a manifest written on Windows
            path = root / raw.replace("\\", "/")
        if not allow_outside and not _inside(path, root):
            raise DataError(f"manifest {manifest} line {line}: {raw} resolves outside the data folder "
                            f"{root.resolve()}; move it inside or pass --allow-outside (allow_outside=True)")
        relpath = _relpath_under(path, root)
        if relpath in first_line:
            skipped.append((relpath, f"manifest line {line} repeats line {first_line[relpath]}"))
            continue
        first_line[relpath] = line
        if path.is_dir():
            skipped.append((relpath, "a folder, not an image file"))
        elif not path.is_file():
            reason = "symlink loop" if _is_loop(path) else "listed in the manifest but not found"
            skipped.append((relpath, reason))
        else:
            items.append(ImageItem(path, relpath, label_of[label], split))
    items.sort(key=lambda it: item_order(it.split, it.label, it.relpath))
    if not items:
        raise DataError(f"manifest {manifest}: none of its {len(parsed)} paths is an existing file")
    dataset = ImageDataset(root, classes, tuple(items), "manifest", tuple(skipped))
    _log_summary(dataset)
    return dataset


def _relpath_under(path: Path, root: Path) -> str:
    """POSIX path relative to ``root`` when ``path`` is inside it, else absolute."""
    absolute = Path(os.path.normpath(os.path.abspath(path)))
    try:
        return absolute.relative_to(os.path.abspath(root)).as_posix()
    except ValueError:
        return absolute.as_posix()


def _inside(path: Path, root: Path) -> bool:
    """``path``, symlinks resolved, is ``root`` or below it (a missing path: as far as it resolves)."""
    try:
        Path(os.path.realpath(path)).relative_to(os.path.realpath(root))
    except ValueError:
        return False
    return True


def _is_loop(path: Path) -> bool:
    try:
        os.stat(path)
    except OSError as e:
        return e.errno == errno.ELOOP
    return False
