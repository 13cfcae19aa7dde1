"""fsio: atomic files and folders, the one content hash."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest

from embedx import fsio


def _leftovers(folder):
    return sorted(p.name for p in folder.iterdir() if fsio.TEMP_MARK in p.name)


def test_sha256_file_matches_hashlib(tmp_path):
    data = os.urandom(3 * fsio.HASH_CHUNK + 17)
    (tmp_path / "f").write_bytes(data)
    assert fsio.sha256_file(tmp_path / "f") == hashlib.sha256(data).hexdigest()
    assert fsio.sha256_bytes(data) == hashlib.sha256(data).hexdigest()


@pytest.mark.parametrize("payload", [b"bytes", "text é", lambda h: h.write(b"callback")])
def test_atomic_write_replaces_the_target(tmp_path, payload):
    target = tmp_path / "out.bin"
    target.write_bytes(b"old")
    fsio.atomic_write(target, payload)
    assert target.read_bytes() in (b"bytes", "text é".encode(), b"callback")
    assert _leftovers(tmp_path) == []


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path):
    target = tmp_path / "out.bin"
    target.write_bytes(b"old")

    def boom(handle):
        handle.write(b"half")
        raise RuntimeError("disk on fire")

    with pytest.raises(RuntimeError, match="disk on fire"):
        fsio.atomic_write(target, boom)
    assert target.read_bytes() == b"old"
    assert _leftovers(tmp_path) == []


def test_atomic_path_hands_out_a_hidden_name_beside_the_target(tmp_path):
    target = tmp_path / "model.onnx"
    with fsio.atomic_path(target) as tmp:
        assert tmp.parent == tmp_path and tmp.name.startswith(".model.onnx.tmp-")
        tmp.write_bytes(b"x")
        assert not target.exists()
    assert target.read_bytes() == b"x"


def test_atomic_dir_publishes_a_whole_folder_and_replaces_the_old_one(tmp_path):
    target = tmp_path / "head"
    target.mkdir()
    (target / "stale.png").write_bytes(b"old plot")
    with fsio.atomic_dir(target) as work:
        (work / "head.json").write_text("{}")
        (work / "weights").write_bytes(b"w")
        assert not (target / "head.json").exists()
    assert sorted(p.name for p in target.iterdir()) == ["head.json", "weights"]
    assert _leftovers(tmp_path) == []


def test_a_failed_atomic_dir_keeps_the_old_folder(tmp_path):
    target = tmp_path / "head"
    target.mkdir()
    (target / "head.json").write_text("old")
    with pytest.raises(RuntimeError), fsio.atomic_dir(target) as work:
        (work / "head.json").write_text("new")
        raise RuntimeError("killed")
    assert (target / "head.json").read_text() == "old"
    assert _leftovers(tmp_path) == []


def test_atomic_dir_refuses_to_replace_when_asked_not_to(tmp_path):
    target = tmp_path / "head"
    target.mkdir()
    with pytest.raises(FileExistsError), fsio.atomic_dir(target, replace=False) as work:
        (work / "a").write_text("a")
    assert list(target.iterdir()) == []


def test_remove_stale_temporaries_deletes_only_what_a_killed_writer_left(tmp_path):
    target = tmp_path / "model.onnx"
    stale = fsio.temporary_name(target)
    stale_dir = tmp_path / ".model.onnx.tmp-abc"
    stale_dir.mkdir()
    (tmp_path / "model.onnx").write_bytes(b"keep")
    (tmp_path / "other.onnx").write_bytes(b"keep")
    assert fsio.remove_stale_temporaries(tmp_path, "model.onnx") == 2
    assert not stale.exists() and not stale_dir.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx", "other.onnx"]


def test_make_parent_says_which_folder_it_creates(tmp_path, caplog):
    import logging

    target = tmp_path / "new" / "deeper" / "feats.h5"
    with caplog.at_level(logging.WARNING, logger="embedx.fsio"):
        fsio.make_parent(target, what="feature cache")
    assert (tmp_path / "new" / "deeper").is_dir()
    assert f"creating the missing folder {tmp_path / 'new' / 'deeper'} for the feature cache" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="embedx.fsio"):
        fsio.make_parent(target, what="feature cache")
    assert caplog.text == ""


def test_atomic_artifacts_get_the_mode_a_plain_open_would_give(tmp_path):
    """mkstemp/mkdtemp make 0600/0700: a head, report or cache only its writer could read."""
    old = os.umask(0o022)
    try:
        fsio._umask.cache_clear()
        fsio.atomic_write(tmp_path / "report.html", "<html></html>")
        with fsio.atomic_path(tmp_path / "weights.bin") as tmp:
            tmp.write_bytes(b"x")
        with fsio.atomic_dir(tmp_path / "head") as work:
            (work / "head.json").write_text("{}")
    finally:
        os.umask(old)
        fsio._umask.cache_clear()
    assert (tmp_path / "report.html").stat().st_mode & 0o777 == 0o644
    assert (tmp_path / "weights.bin").stat().st_mode & 0o777 == 0o644
    assert (tmp_path / "head").stat().st_mode & 0o777 == 0o755


@pytest.mark.timeout(30)  # opening a FIFO for reading waits for a writer unless told not to
def test_read_regular_file_reads_only_a_regular_file_of_bounded_size(tmp_path):
    (tmp_path / "ok.png").write_bytes(b"12345")
    assert fsio.read_regular_file(tmp_path / "ok.png", max_bytes=5, error=ValueError) == b"12345"
    (tmp_path / "link.png").symlink_to(tmp_path / "ok.png")  # swapped in after file_under_root resolved it
    os.mkfifo(tmp_path / "fifo.png")
    for path, why in ((tmp_path / "ok.png", "more than the 4 read"), (tmp_path / "link.png", "cannot open"),
                      (tmp_path / "fifo.png", "not a regular file"), ("/dev/zero", "not a regular file"),
                      (tmp_path, "not a regular file"), (tmp_path / "gone.png", "cannot open")):
        with pytest.raises(ValueError, match=why):
            fsio.read_regular_file(path, max_bytes=4, error=ValueError)


def test_file_under_root_refuses_every_way_out(tmp_path):
    root = tmp_path / "root"
    (root / "a").mkdir(parents=True)
    inside = root / "a" / "b.png"
    inside.write_bytes(b"x")
    (tmp_path / "secret").write_bytes(b"s")
    (root / "out.png").symlink_to(tmp_path / "secret")
    (root / "in.png").symlink_to(inside)
    assert fsio.file_under_root(root, "a/../a/b.png") == (inside, "")
    assert fsio.file_under_root(root, "../root/in.png") == (inside, "")  # back inside: fine
    for relpath in ("../secret", str(tmp_path / "secret"), "out.png", "/dev/zero"):
        assert fsio.file_under_root(root, relpath) == (None, "outside the data root: refused"), relpath
    assert fsio.file_under_root(root, "a") == (None, "not a regular file")
    assert fsio.file_under_root(root, "a/gone.png") == (None, fsio.MISSING)
    assert fsio.file_under_root(root, "bad\0name.png")[1].startswith("cannot resolve the path")
    assert fsio.file_under_root(root, "") == (None, "no path recorded")


def test_cleaning_one_target_never_deletes_another_targets_temporary(tmp_path):
    """The folder atomic_dir moved feats.h5 aside into was named `.feats.h5.old.tmp-*`: the
    temporary name of a target feats.h5.old, whose writer lost its file to feats.h5's cleaning."""
    others = [fsio.temporary_name(tmp_path / name) for name in ("feats.h5.old", "feats.h5.tmp-x", "feats.h5x")]
    legacy_aside = tmp_path / ".feats.h5.old.tmp-killed"  # a pre-fix aside: also feats.h5.old's temporary
    (legacy_aside / fsio.ASIDE_NAME).mkdir(parents=True)
    own = [fsio.temporary_name(tmp_path / "feats.h5"), tmp_path / ".feats.h5.tmp-aside-killed"]
    own[1].mkdir()
    assert fsio.remove_stale_temporaries(tmp_path, "feats.h5") == 2
    assert not any(path.exists() for path in own)
    assert all(path.exists() for path in others) and (legacy_aside / fsio.ASIDE_NAME).is_dir()
    assert fsio.moved_aside(tmp_path / "feats.h5") is None  # the legacy name is feats.h5.old's: not taken


def test_the_aside_folder_is_a_temporary_of_its_own_target_only(tmp_path):
    target = tmp_path / "h"
    (target / "old").mkdir(parents=True)
    seen = []
    real_replace = os.replace

    def spy(src, dst):  # look at the aside folder between the two renames
        if Path(dst).name == fsio.ASIDE_NAME:
            seen.append(Path(dst).parent.name)
        real_replace(src, dst)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(fsio.os, "replace", spy)
        with fsio.atomic_dir(target) as work:
            (work / "new").mkdir()
    assert len(seen) == 1 and fsio.is_temporary_of(seen[0], "h")
    assert not fsio.is_temporary_of(seen[0], "h.old") and not fsio.is_temporary_of(seen[0], "h.tmp-aside")
    assert (target / "new").is_dir() and _leftovers(tmp_path) == []


def test_reporting_write_errors_names_write_failures_and_passes_other_errors_on(tmp_path):
    import errno

    from embedx.errors import WriteError
    from embedx.fsio import reporting_write_errors

    out = tmp_path / "out" / "head"
    with pytest.raises(WriteError, match=r"cannot write .*head: ENOSPC \(28\): No space left on device"):
        with reporting_write_errors(out):
            raise OSError(errno.ENOSPC, "No space left on device")
    with pytest.raises(WriteError, match=r"EACCES \(13\)"):  # on a temporary beside the output
        with reporting_write_errors(out):
            raise PermissionError(errno.EACCES, "Permission denied", str(out.parent / ".head.tmp-x"))
    with pytest.raises(FileNotFoundError):  # reading an input elsewhere is not the write's error
        with reporting_write_errors(out):
            (tmp_path / "input.json").read_text()
    with pytest.raises(ConnectionResetError):
        with reporting_write_errors(out):
            raise ConnectionResetError(errno.ECONNRESET, "Connection reset by peer")
    with pytest.raises(KeyboardInterrupt):
        with reporting_write_errors(out):
            raise KeyboardInterrupt


def test_with_links_out_a_link_under_the_root_may_lead_anywhere_but_the_path_may_not(tmp_path):
    # extract follows linked class folders; verify and report must read what it read
    root = tmp_path / "root"
    (tmp_path / "store" / "ants").mkdir(parents=True)
    image = tmp_path / "store" / "ants" / "a.png"
    image.write_bytes(b"x")
    root.mkdir()
    (root / "ants").symlink_to(tmp_path / "store" / "ants")
    assert fsio.file_under_root(root, "ants/a.png") == (None, "outside the data root: refused")
    assert fsio.file_under_root(root, "ants/a.png", links_out=True) == (image, "")
    (tmp_path / "secret").write_bytes(b"s")
    for relpath in ("../secret", str(tmp_path / "secret"), "/dev/zero", "ants/../../secret"):
        assert fsio.file_under_root(root, relpath, links_out=True) == (None, "outside the data root: refused")
    assert fsio.file_under_root(root, "ants", links_out=True) == (None, "not a regular file")
