"""Files that are never half-written, and the one content hash.

Every artifact embedx writes (ONNX exports, derived fp16/int8 models, heads, bundles,
journals, caches) goes through :func:`atomic_write` or :func:`atomic_dir`: the bytes go to a
temporary name beside the target, are fsynced, and are renamed over the target last, so a
reader sees the old file or the new one, never a mix. A failed write removes its temporary
file. Temporary names start with ``.`` and contain ``.tmp-`` so that folder listings skip them
and a later run can recognise (and :func:`remove_stale_temporaries` can delete) what a killed
run left behind.

torch-free and numpy-free: imported by every stage.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any

logger = logging.getLogger(__name__)

HASH_CHUNK = 1 << 20
TEMP_MARK = ".tmp-"


def make_parent(path: str | Path, *, what: str) -> None:
    """Create ``path``'s missing parent folders, saying so (a mistyped ``-o`` must not make a
    tree of folders anywhere without a word)."""
    parent = Path(path).parent
    if not parent.exists():
        logger.warning("creating the missing folder %s for the %s", parent, what)
        parent.mkdir(parents=True, exist_ok=True)


def sha256_file(path: str | Path) -> str:
    """sha256 hex digest of a file's bytes, read in 1 MiB chunks (hashlib releases the GIL)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def sha256_bytes(data: bytes | bytearray | memoryview) -> str:
    return hashlib.sha256(data).hexdigest()


def temporary_name(target: Path) -> Path:
    """A unique hidden name beside ``target`` (same folder, so the rename is atomic)."""
    handle, name = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}{TEMP_MARK}")
    os.close(handle)
    return Path(name)


def _fsync_dir(folder: Path) -> None:
    """Make a rename durable (best effort: not every file system allows opening a folder)."""
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _fsync_path(path: Path) -> None:
    with open(path, "rb+") as handle:
        os.fsync(handle.fileno())


@contextlib.contextmanager
def atomic_path(target: str | Path, *, fsync: bool = True) -> Iterator[Path]:
    """Yield a temporary path beside ``target``; on success it is fsynced and renamed over it.

    For writers that want a file name (``onnx.save``, ``torch.save``, ``np.savez``...). On any
    exception the temporary file is removed and ``target`` is untouched.
    """
    target = Path(target)
    tmp = temporary_name(target)
    try:
        yield tmp
        if fsync and tmp.exists():
            _fsync_path(tmp)
        os.replace(tmp, target)
        if fsync:
            _fsync_dir(target.parent)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write(target: str | Path, write: Callable[[IO[bytes]], Any] | bytes | str, *,
                 fsync: bool = True) -> Path:
    """Write ``target`` atomically from bytes, text (UTF-8) or a ``write(handle)`` callback."""
    target = Path(target)
    with atomic_path(target, fsync=fsync) as tmp, open(tmp, "wb") as handle:
        if isinstance(write, str):
            handle.write(write.encode("utf-8"))
        elif isinstance(write, bytes | bytearray | memoryview):
            handle.write(write)
        else:
            write(handle)
        handle.flush()
    return target


@contextlib.contextmanager
def atomic_dir(target: str | Path, *, replace: bool = True) -> Iterator[Path]:
    """Yield an empty temporary folder beside ``target``; on success it becomes ``target``.

    An existing ``target`` is replaced (moved aside, then deleted after the rename) when
    ``replace`` is true; otherwise it is an error (``FileExistsError``). On any exception the
    temporary folder is deleted and ``target`` is untouched. Every file in the folder is
    fsynced before the rename.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}{TEMP_MARK}"))
    old: Path | None = None
    try:
        yield work
        for root, _dirs, files in os.walk(work):
            for name in files:
                _fsync_path(Path(root) / name)
        if target.exists() or target.is_symlink():
            if not replace:
                raise FileExistsError(f"{target} exists")
            old = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.old{TEMP_MARK}"))
            os.replace(target, old / "previous")
        os.replace(work, target)
        _fsync_dir(target.parent)
    except BaseException:
        if old is not None and not target.exists():
            os.replace(old / "previous", target)  # put the previous folder back
        raise
    finally:
        shutil.rmtree(work, ignore_errors=True)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)


def remove_stale_temporaries(folder: str | Path, name: str) -> int:
    """Delete temporaries that killed writers of ``folder/name`` left; returns how many."""
    removed = 0
    with contextlib.suppress(FileNotFoundError):
        for entry in Path(folder).iterdir():
            if entry.name.startswith(f".{name}{TEMP_MARK}") or entry.name.startswith(f".{name}.old{TEMP_MARK}"):
                if entry.is_dir() and not entry.is_symlink():
                    shutil.rmtree(entry, ignore_errors=True)
                else:
                    entry.unlink(missing_ok=True)
                removed += 1
    return removed
