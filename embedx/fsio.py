"""Files that are never half-written, and the one content hash.

Every artifact embedx writes (ONNX exports, derived fp16/int8 models, heads, bundles,
journals, caches) goes through :func:`atomic_write` or :func:`atomic_dir`: the bytes go to a
temporary name beside the target, are fsynced, and are renamed over the target last, so a
reader sees the old file or the new one, never a mix. A failed write removes its temporary
file. Temporary names start with ``.`` and contain ``.tmp-`` so that folder listings skip them
and a later run can recognise (and :func:`remove_stale_temporaries` can delete) what a killed
run left behind. A folder that a killed :func:`atomic_dir` had moved aside and not yet replaced
is put back (:func:`restore_moved_aside`), by the next writer and by readers alike.

One writer at a time: :func:`writer_lock` takes ``<target>.lock`` without waiting and writes
who holds it into the file, so that the second writer's one-line error names the first.

torch-free and numpy-free: imported by every stage.
"""

from __future__ import annotations

import contextlib
import errno as errno_codes
import functools
import hashlib
import logging
import os
import shutil
import socket
import stat
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any

logger = logging.getLogger(__name__)

HASH_CHUNK = 1 << 20
TEMP_MARK = ".tmp-"
#: The name under which :func:`atomic_dir` keeps the previous folder while it swaps.
ASIDE_NAME = "previous"
#: What follows ``.tmp-`` in the name of the folder that holds it (``.<name>.tmp-aside-<random>``).
ASIDE_MARK = "aside-"


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


# -- reading the files an untrusted artifact names ------------------------------------------

#: The reason :func:`file_under_root` gives for a path that leads nowhere.
MISSING = "missing"


def file_under_root(root: Path, relpath: str, *, links_out: bool = False) -> tuple[Path | None, str]:
    """``(resolved file, "")`` when ``relpath`` (a path a cache or manifest recorded: untrusted)
    leads, symlinks followed, to a regular file inside ``root``; else ``(None, why not)``, where
    why is :data:`MISSING` for a path that leads nowhere. Nothing is opened.

    ``links_out``: the path itself must stay inside ``root`` (no absolute path, no ``..`` out of
    it), but a symlink under ``root`` may lead anywhere, as the data walk of ``extract`` follows
    it (a data set of linked class folders)."""
    if not relpath:
        return None, "no path recorded"
    try:
        base = root.resolve()
        resolved = base.joinpath(relpath).resolve()
        written = Path(os.path.normpath(base.joinpath(relpath))) if links_out else resolved
        inside = written == base or base in written.parents
        exists, regular = resolved.exists(), resolved.is_file()
    except (OSError, RuntimeError, ValueError) as e:  # a symlink loop, a NUL byte, a name too long
        return None, f"cannot resolve the path ({type(e).__name__})"
    if not inside:
        return None, "outside the data root: refused"
    if not exists:
        return None, MISSING
    return (resolved, "") if regular else (None, "not a regular file")


def read_regular_file(path: Path, *, max_bytes: int, error: type[Exception]) -> bytes:
    """The bytes of the regular file ``path``, at most ``max_bytes`` of them.

    Opened without following a last-component symlink and without blocking (a FIFO would wait
    for a writer forever), then checked on the open descriptor, so a file swapped after
    :func:`file_under_root` looked at it is refused too. ``error`` (one line naming ``path``)
    for anything else: a device such as ``/dev/zero``, a FIFO, a folder, a larger file.
    """
    try:
        descriptor = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0))
    except OSError as e:
        raise error(f"{path}: cannot open ({e.strerror or type(e).__name__})") from e
    status = os.fstat(descriptor)
    if not stat.S_ISREG(status.st_mode):  # checked before fdopen, which refuses a folder with its own error
        os.close(descriptor)
        raise error(f"{path}: not a regular file")
    with os.fdopen(descriptor, "rb") as handle:
        if status.st_size > max_bytes:
            raise error(f"{path}: {status.st_size:,} bytes, more than the {max_bytes:,} read")
        content = handle.read(max_bytes + 1)
    if len(content) > max_bytes:  # grew since fstat
        raise error(f"{path}: more than the {max_bytes:,} bytes read")
    return content


@functools.cache
def _umask() -> int:
    """The process's umask (read once: setting it back is the only way to read it)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def temporary_name(target: Path) -> Path:
    """A unique hidden name beside ``target`` (same folder, so the rename is atomic), with the
    mode a plain ``open`` would give (mkstemp's is 0600: a head or cache only its writer could read)."""
    handle, name = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}{TEMP_MARK}")
    try:
        os.fchmod(handle, 0o666 & ~_umask())
    finally:
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


def fsync_path(path: Path) -> None:
    """Flush ``path``'s bytes to the disk (before a rename makes them the real file)."""
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
            fsync_path(tmp)
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
    work.chmod(0o777 & ~_umask())  # mkdtemp's 0700 would hide the artifact from everyone else
    old: Path | None = None
    try:
        yield work
        for root, _dirs, files in os.walk(work):
            for name in files:
                fsync_path(Path(root) / name)
        if target.exists() or target.is_symlink():
            if not replace:
                raise FileExistsError(f"{target} exists")
            old = Path(tempfile.mkdtemp(dir=target.parent, prefix=_aside_prefix(target)))
            os.replace(target, old / ASIDE_NAME)
        os.replace(work, target)
        _fsync_dir(target.parent)
    except BaseException:
        if old is not None and not target.exists() and (old / ASIDE_NAME).exists():
            os.replace(old / ASIDE_NAME, target)  # put the previous folder back
        raise
    finally:
        shutil.rmtree(work, ignore_errors=True)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)


def _aside_prefix(target: Path) -> str:
    """Where :func:`atomic_dir` moves the previous ``target`` aside: one of ``target``'s own
    temporary names (``.<name>.tmp-aside-<random>``), never another target's. The old
    ``.<name>.old.tmp-<random>`` was also the temporary name of a target ``<name>.old``, so
    the writer of one cleaned away the other's file in flight."""
    return f".{target.name}{TEMP_MARK}{ASIDE_MARK}"


def is_temporary_of(entry_name: str, name: str) -> bool:
    """True if ``entry_name`` is one of the temporary names of the target ``name``
    (``.<name>.tmp-<random>``, moved-aside folders included) and of no other target.

    The random part of a temporary name holds no ``.``, so the last ``.tmp-`` of a name
    says whose it is: ``.feats.h5.tmp-x.tmp-ab12`` belongs to ``feats.h5.tmp-x``, not to
    ``feats.h5``.
    """
    prefix = f".{name}{TEMP_MARK}"
    return entry_name.startswith(prefix) and len(entry_name) > len(prefix) and "." not in entry_name[len(prefix):]


def moved_aside(target: str | Path) -> Path | None:
    """The previous ``target`` folder that an :func:`atomic_dir` killed between its two renames
    left aside (``target`` itself is then missing), or None."""
    target = Path(target)
    if target.exists() or target.is_symlink() or not target.parent.is_dir():
        return None
    prefix = _aside_prefix(target)
    candidates = (entry for entry in target.parent.iterdir()
                  if entry.name.startswith(prefix) and is_temporary_of(entry.name, target.name))
    for aside in sorted(candidates):
        if (aside / ASIDE_NAME).is_dir():
            return aside / ASIDE_NAME
    return None


def restore_moved_aside(target: str | Path) -> bool:
    """Put back the folder :func:`moved_aside` finds; True if one was restored. The caller
    holds ``target``'s :func:`writer_lock` (a live writer's swap is not undone)."""
    target = Path(target)
    previous = moved_aside(target)
    if previous is None:
        return False
    os.replace(previous, target)
    _fsync_dir(target.parent)
    logger.warning("restored %s, which an interrupted write had moved aside", target)
    return True


def remove_stale_temporaries(folder: str | Path, name: str) -> int:
    """Clean what killed writers of ``folder/name`` left: a previous folder moved aside and not
    replaced is put back first (:func:`restore_moved_aside`), then every temporary of ``name``
    (:func:`is_temporary_of`, no other target's) is deleted; returns how many were deleted.
    Call it holding the target's :func:`writer_lock`.

    A ``.<name>.old.tmp-*`` folder left by an embedx that moved folders aside under that name
    is neither put back nor deleted: it is also the temporary name of a target ``<name>.old``,
    which may be writing it now."""
    restore_moved_aside(Path(folder) / name)
    removed = 0
    with contextlib.suppress(FileNotFoundError):
        for entry in Path(folder).iterdir():
            if is_temporary_of(entry.name, name):
                if entry.is_dir() and not entry.is_symlink():
                    shutil.rmtree(entry, ignore_errors=True)
                else:
                    entry.unlink(missing_ok=True)
                removed += 1
    return removed


# -- one writer at a time ------------------------------------------------------------------


def lock_path(target: str | Path) -> Path:
    """``<target>.lock``, beside the file or folder it guards."""
    target = Path(target)
    return target.with_name(target.name + ".lock")


def _holder(path: Path) -> str:
    """Who holds the lock file ``path``, as its holder wrote it (one line), or a placeholder."""
    try:
        with open(path, "rb") as handle:
            text = handle.read(300).decode("utf-8", "replace")
    except OSError:
        text = ""
    text = " ".join(text.split())
    return text or "a process that did not say who it is"


@contextlib.contextmanager
def writer_lock(target: str | Path, *, what: str, error: type[Exception], wait: float = 0.0) -> Iterator[Path]:
    """Hold ``<target>.lock`` (a ``filelock.FileLock``: an OS lock, gone with its process) while
    writing ``target``; yields the lock file's path.

    Taken without waiting (or for up to ``wait`` seconds); when another process holds it,
    ``error`` is raised with one line naming ``what``, the target and who holds it (the pid,
    host, command and start time the holder wrote into the lock file). A second writer in the
    same process is refused the same way.
    """
    from filelock import FileLock, Timeout

    path = lock_path(target)
    lock = FileLock(str(path), timeout=wait)
    try:
        lock.acquire(timeout=wait)
    except Timeout as e:
        raise error(f"another process is writing the {what} {target} (lock {path} held by {_holder(path)}); wait "
                    "for it to finish or write to another -o") from e
    try:
        command = " ".join(Path(arg).name if i == 0 else arg for i, arg in enumerate(sys.argv[:4]))
        with contextlib.suppress(OSError), open(path, "r+b") as handle:  # the flock holds, not the contents
            handle.truncate(0)
            handle.write(f"pid {os.getpid()} on {socket.gethostname()} ({command[:120]}) since "
                         f"{time.strftime('%Y-%m-%d %H:%M:%S')}\n".encode("utf-8", "replace"))
        yield path
    finally:
        with contextlib.suppress(OSError), open(path, "r+b") as handle:
            handle.truncate(0)
        lock.release()


# --------------------------------------------------------------------------- write failures


def os_error_text(error: BaseException) -> str:
    """``"ENOSPC (28): No space left on device"`` for an OSError, or for the wrappers that put the
    errno in their message (h5py: ``errno = 28``; safetensors: ``(os error 28)``); else its first line."""
    import re

    number = getattr(error, "errno", None)
    if number is None:
        found = re.search(r"errno = (\d+)|os error (\d+)", str(error))
        number = int(found.group(1) or found.group(2)) if found else None
    if number is not None:
        return f"{errno_codes.errorcode.get(number, 'errno')} ({number}): {os.strerror(number)}"
    return str(error).splitlines()[0] if str(error) else type(error).__name__


@contextlib.contextmanager
def reporting_write_errors(path: str | Path, *,
                           then: str = "free space (or fix the folder), then rerun") -> Iterator[None]:
    """Turn an OSError (or safetensors' error, which wraps one) raised while writing ``path`` into
    one ``WriteError`` line naming the file and the errno. Errors of embedx's own pass through."""
    from embedx.errors import EmbedxError, WriteError

    try:
        yield
    except EmbedxError:
        raise
    except OSError as e:
        if not _a_write_failure(e, Path(path)):
            raise  # reading an input, a network error...: not this write's
        raise WriteError(f"cannot write {path}: {os_error_text(e)}; {then}") from e
    except Exception as e:
        if type(e).__name__ != "SafetensorError" or "os error" not in str(e):
            raise
        raise WriteError(f"cannot write {path}: {os_error_text(e)}; {then}") from e


#: errnos that only a write gives: the disk, the quota, the file size limit, a read-only or failing disk
_WRITE_ERRNOS = frozenset(getattr(errno_codes, name) for name in ("ENOSPC", "EDQUOT", "EFBIG", "EROFS", "EIO")
                          if hasattr(errno_codes, name))


def _a_write_failure(error: OSError, path: Path) -> bool:
    """Whether ``error``, raised while ``path`` was being written, is that write's: an errno only
    writes give, or any error on a file beside ``path`` (its temporaries live there)."""
    if error.errno in _WRITE_ERRNOS:
        return True
    if error.filename is None:
        return False
    try:
        folder = path.absolute().parent
        failed = Path(os.fsdecode(error.filename)).absolute()
    except (TypeError, ValueError):
        return False
    return failed == path.absolute() or folder in failed.parents
