"""data.discover on every layout and every bad entry; stable splits; hashing."""

from __future__ import annotations

import hashlib
import os
import sys
from pathlib import Path

import pytest

from embedx import data
from embedx.errors import ConfigError, DataError
from tests.corpus import make_corpus


def touch(path: Path, content: bytes = b"x") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(content)
    return path


@pytest.fixture
def corpus(tmp_path):
    return make_corpus(tmp_path / "corpus", n_good_per_class=4)


def test_corpus_items_are_exactly_the_expected_image_files(corpus):
    dataset = data.discover(corpus["root"])
    assert dataset.layout == "class_folders"
    assert list(dataset.classes) == corpus["classes"]
    relpaths = {item.relpath: dataset.classes[item.label] for item in dataset.items}
    expected = {**corpus["decode"], **{p: p.split("/")[0] for p in corpus["errors"]}}
    assert relpaths == expected
    assert {item.split for item in dataset.items} == {"train"}
    assert all(item.path == corpus["root"] / item.relpath for item in dataset.items)


def test_corpus_skipped_entries_have_reasons(corpus):
    dataset = data.discover(corpus["root"])
    skipped = dict(dataset.skipped)
    assert set(skipped) == set(corpus["skipped"])
    assert "symlink loop" in skipped[corpus["cases"]["symlink_loop_file"]]
    assert "symlink loop" in skipped[corpus["cases"]["symlink_loop_dir"]]
    assert "folder named like an image" in skipped[corpus["cases"]["dir_named_like_image"]]
    assert "extension" in skipped[corpus["cases"]["not_image_extension"]]


def test_empty_class_is_kept_with_zero_items(corpus, caplog):
    with caplog.at_level("WARNING", logger="embedx.data"):
        dataset = data.discover(corpus["root"])
    counts = dataset.counts()["train"]
    assert counts["gamma"] == 0
    assert counts["alpha"] > 0 and counts["beta"] > 0
    assert "'gamma' has no images" in caplog.text


def test_unreadable_folder_is_skipped_when_it_really_is(tmp_path):
    locked = touch(tmp_path / "d" / "cls" / "locked" / "a.jpg").parent
    touch(tmp_path / "d" / "cls" / "b.jpg")
    locked.chmod(0)
    try:
        try:
            os.listdir(locked)
        except PermissionError:
            pass
        else:
            pytest.skip("chmod 000 does not stop this user (root?) from listing a folder")
        dataset = data.discover(tmp_path / "d")
        assert [i.relpath for i in dataset.items] == ["cls/b.jpg"]
        assert dict(dataset.skipped) == {"cls/locked": "permission denied: cannot list this folder"}
    finally:
        locked.chmod(0o755)


def test_order_is_deterministic_and_sorted(tmp_path):
    for name in ["b/z.png", "b/a.JPG", "a/m.jpeg", "a/sub/c.webp", "a/c.bmp"]:
        touch(tmp_path / name)
    dataset = data.discover(tmp_path)
    assert dataset.classes == ("a", "b")
    assert [i.relpath for i in dataset.items] == [
        "a/c.bmp", "a/m.jpeg", "a/sub/c.webp", "b/a.JPG", "b/z.png",
    ]
    assert [i.label for i in dataset.items] == [0, 0, 0, 1, 1]
    assert dataset == data.discover(tmp_path)


def test_extensions_cover_pillow_formats_case_insensitively():
    extensions = data.image_extensions()
    for ext in (".jpg", ".jpeg", ".png", ".gif", ".bmp", ".tif", ".tiff", ".webp", ".ppm"):
        assert ext in extensions
    assert data.is_image_name("PHOTO.JPEG") and data.is_image_name("x.Png")
    assert not data.is_image_name("notes.txt")
    assert ".pdf" not in extensions  # Pillow writes PDF but cannot read it


def test_hidden_entries_are_ignored(tmp_path):
    touch(tmp_path / "cls" / "a.jpg")
    touch(tmp_path / "cls" / "._a.jpg")
    touch(tmp_path / "cls" / ".DS_Store")
    touch(tmp_path / ".git" / "x.jpg")
    dataset = data.discover(tmp_path)
    assert dataset.classes == ("cls",)
    assert [i.relpath for i in dataset.items] == ["cls/a.jpg"]
    assert dataset.skipped == ()


def test_loose_top_level_files_are_skipped(tmp_path):
    touch(tmp_path / "cls" / "a.jpg")
    touch(tmp_path / "stray.jpg")
    dataset = data.discover(tmp_path)
    assert [i.relpath for i in dataset.items] == ["cls/a.jpg"]
    assert [p for p, _ in dataset.skipped] == ["stray.jpg"]


def test_split_folders(tmp_path):
    for name in ["train/ants/1.jpg", "train/bees/2.jpg", "val/ants/3.jpg", "test/wasps/4.jpg"]:
        touch(tmp_path / name)
    dataset = data.discover(tmp_path)
    assert dataset.layout == "split_folders"
    assert dataset.classes == ("ants", "bees", "wasps")
    assert [(i.relpath, i.label, i.split) for i in dataset.items] == [
        ("train/ants/1.jpg", 0, "train"),
        ("train/bees/2.jpg", 1, "train"),
        ("val/ants/3.jpg", 0, "val"),
        ("test/wasps/4.jpg", 2, "test"),
    ]
    assert dataset.counts() == {
        "train": {"ants": 1, "bees": 1, "wasps": 0},
        "val": {"ants": 1, "bees": 0, "wasps": 0},
        "test": {"ants": 0, "bees": 0, "wasps": 1},
    }


def test_a_class_named_train_among_others_is_a_class(tmp_path):
    touch(tmp_path / "train" / "a.jpg")
    touch(tmp_path / "cats" / "b.jpg")
    dataset = data.discover(tmp_path)
    assert dataset.layout == "class_folders"
    assert dataset.classes == ("cats", "train")


def test_split_folders_without_class_folders_is_an_error(tmp_path):
    touch(tmp_path / "train" / "a.jpg")
    touch(tmp_path / "val" / "b.jpg")
    with pytest.raises(DataError, match="no class folders inside"):
        data.discover(tmp_path)


@pytest.mark.slow
def test_hymenoptera(hymenoptera):
    dataset = data.discover(hymenoptera)
    assert dataset.layout == "split_folders"
    assert dataset.classes == ("ants", "bees")
    counts = dataset.counts()
    assert sum(counts["train"].values()) == 245 and sum(counts["val"].values()) == 153


# -- manifest ----------------------------------------------------------------------


def test_manifest_with_header_relative_and_absolute_paths(tmp_path):
    a = touch(tmp_path / "imgs" / "a.jpg")
    touch(tmp_path / "imgs" / "b b.png")
    outside = touch(tmp_path.parent / f"{tmp_path.name}-outside.jpg")
    manifest = tmp_path / "list.csv"
    manifest.write_text(
        "path,label,split\n"
        f"imgs/a.jpg,cat,train\n"
        f"\"imgs/b b.png\",dog,val\n"
        f"{outside},dog,test\n"
        f"imgs/missing.jpg,cat,train\n"
        f"{a},cat,val\n"
        "imgs,dog,\n",
        encoding="utf-8",
    )
    dataset = data.discover(manifest, allow_outside=True)  # line 4 is outside DATA
    assert dataset.layout == "manifest"
    assert dataset.classes == ("cat", "dog")
    assert [(i.relpath, i.label, i.split) for i in dataset.items] == [
        ("imgs/a.jpg", 0, "train"),
        ("imgs/b b.png", 1, "val"),
        (outside.as_posix(), 1, "test"),
    ]
    assert dict(dataset.skipped) == {
        "imgs/missing.jpg": "listed in the manifest but not found",
        "imgs/a.jpg": "manifest line 6 repeats line 2",
        "imgs": "a folder, not an image file",
    }


def test_manifest_relative_to_a_given_folder(tmp_path):
    touch(tmp_path / "root" / "x" / "a.jpg")
    manifest = tmp_path / "elsewhere" / "m.csv"
    touch(manifest, b"x/a.jpg,cat\n")
    dataset = data.discover(tmp_path / "root", manifest=manifest)
    assert [(i.relpath, i.split) for i in dataset.items] == [("x/a.jpg", "train")]
    assert dataset.items[0].path == tmp_path / "root" / "x" / "a.jpg"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "has no rows"),
        ("path,label\n", "has no rows"),
        ("a.jpg\n", "line 1: expected path,label"),
        ("a.jpg,cat,train,extra\n", "line 1: expected path,label"),
        ("a.jpg,cat,holdout\n", "split must be one of"),
        (",cat\n", "empty path or label"),
        ("nope.jpg,cat\n", "none of its 1 paths"),
    ],
)
def test_bad_manifests(tmp_path, text, message):
    touch(tmp_path / "a.jpg")
    manifest = tmp_path / "m.csv"
    manifest.write_text(text)
    with pytest.raises(DataError, match=message):
        data.discover(manifest)


@pytest.mark.parametrize("allow_outside", [False, True])
@pytest.mark.parametrize(("text", "message"), [("a.jpg,cat\nx\0y.jpg,cat\n", "line 2: the path holds a NUL byte"),
                                               ("a.jpg,c\0t\n", "line 1: the label holds a NUL byte")])
def test_a_manifest_line_with_a_nul_byte_is_named(tmp_path, text, message, allow_outside):
    """Was a ValueError traceback (embedded null byte) with allow_outside, else 'resolves outside'."""
    touch(tmp_path / "a.jpg")
    manifest = tmp_path / "m.csv"
    manifest.write_text(text)
    with pytest.raises(DataError, match=message):
        data.discover(tmp_path, manifest=manifest, allow_outside=allow_outside)


# -- invalid DATA --------------------------------------------------------------------


def test_missing_folder(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        data.discover(tmp_path / "nope")


def test_empty_folder(tmp_path):
    with pytest.raises(DataError, match="is empty"):
        data.discover(tmp_path)


def test_no_class_folders(tmp_path):
    touch(tmp_path / "a.jpg")
    with pytest.raises(DataError, match="no class folders"):
        data.discover(tmp_path)


def test_class_folders_without_images(tmp_path):
    touch(tmp_path / "cls" / "readme.txt")
    (tmp_path / "other").mkdir()
    with pytest.raises(DataError, match="2 class folder.*no image files"):
        data.discover(tmp_path)


def test_a_file_instead_of_a_folder(tmp_path):
    with pytest.raises(DataError, match="is a file"):
        data.discover(touch(tmp_path / "a.jpg"))


def test_data_error_is_one_line(tmp_path):
    with pytest.raises(DataError) as info:
        data.discover(tmp_path / "nope")
    assert "\n" not in str(info.value)


# -- splits and hashing --------------------------------------------------------------


def test_split_for_key_is_stable_and_close_to_the_fraction():
    keys = [hashlib.sha256(str(i).encode()).hexdigest() for i in range(4000)]
    splits = [data.split_for_key(k, 0.2) for k in keys]
    assert splits == [data.split_for_key(k, 0.2) for k in keys]
    assert 0.17 < splits.count("val") / len(keys) < 0.23
    # fixed points: the split of a key never changes between versions or machines
    assert data.split_for_key("0" * 64, 0.2) == "val"
    assert data.split_for_key("f" * 64, 0.2) == "train"
    assert data.split_for_key("3400000000000000" + "0" * 48, 0.2) == "train"  # 0.203
    assert data.split_for_key("3300000000000000" + "f" * 48, 0.2) == "val"  # 0.199
    assert all(data.split_for_key(k, 0.0) == "train" for k in keys[:50])


def test_split_for_key_is_monotonic_in_the_fraction():
    keys = [hashlib.sha256(str(i).encode()).hexdigest() for i in range(500)]
    small = {k for k in keys if data.split_for_key(k, 0.1) == "val"}
    large = {k for k in keys if data.split_for_key(k, 0.3) == "val"}
    assert small < large


@pytest.mark.parametrize(("key", "fraction"), [("abc", 0.2), ("z" * 64, 0.2), ("0" * 64, 1.0)])
def test_split_for_key_rejects_bad_input(key, fraction):
    with pytest.raises(ConfigError):
        data.split_for_key(key, fraction)


def test_hash_file_is_sha256_of_bytes(tmp_path):
    payload = os.urandom(3 * (1 << 20) + 17)  # spans several read chunks
    path = touch(tmp_path / "blob.bin", payload)
    assert data.hash_file(path) == hashlib.sha256(payload).hexdigest()


def test_data_module_is_torch_free():
    import subprocess

    code = "import embedx.data, sys; sys.exit(int('torch' in sys.modules or 'onnxruntime' in sys.modules))"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


def test_unlistable_folder_is_skipped_even_as_root(tmp_path, monkeypatch):
    """Same as above without relying on permissions: scandir itself refuses."""
    locked = touch(tmp_path / "cls" / "locked" / "a.jpg").parent
    touch(tmp_path / "cls" / "b.jpg")
    real_scandir = os.scandir

    def scandir(path="."):
        if not isinstance(path, int) and Path(path) == locked:  # os.scandir also takes a folder's fd
            raise PermissionError(13, "Permission denied", str(path))
        return real_scandir(path)

    monkeypatch.setattr(data.os, "scandir", scandir)
    dataset = data.discover(tmp_path)
    assert [i.relpath for i in dataset.items] == ["cls/b.jpg"]
    assert dict(dataset.skipped) == {"cls/locked": "permission denied: cannot list this folder"}


def test_symlinks_to_files_and_folders_are_followed_and_broken_ones_skipped(tmp_path):
    outside = touch(tmp_path / "elsewhere" / "real.jpg")
    touch(tmp_path / "elsewhere" / "more" / "b.png")
    data_dir = tmp_path / "data"
    touch(data_dir / "cls" / "a.jpg")
    (data_dir / "cls" / "link.jpg").symlink_to(outside)
    (data_dir / "cls" / "linked_folder").symlink_to(tmp_path / "elsewhere" / "more")
    (data_dir / "cls" / "dangling.jpg").symlink_to(tmp_path / "nowhere.jpg")
    dataset = data.discover(data_dir)
    assert [i.relpath for i in dataset.items] == ["cls/a.jpg", "cls/link.jpg", "cls/linked_folder/b.png"]
    assert dict(dataset.skipped) == {"cls/dangling.jpg": "broken symlink"}


def test_files_directly_in_a_split_folder_are_skipped(tmp_path):
    touch(tmp_path / "train" / "cls" / "a.jpg")
    touch(tmp_path / "train" / "stray.jpg")
    dataset = data.discover(tmp_path)
    assert [i.relpath for i in dataset.items] == ["train/cls/a.jpg"]
    assert [p for p, _ in dataset.skipped] == ["train/stray.jpg"]


def test_manifest_with_windows_separators(tmp_path):
    touch(tmp_path / "imgs" / "sub" / "a.jpg")
    manifest = tmp_path / "m.csv"
    manifest.write_text("imgs\\\\sub\\\\a.jpg,cat\n")
    assert [i.relpath for i in data.discover(manifest).items] == ["imgs/sub/a.jpg"]


@pytest.mark.skipif(sys.platform != "linux", reason="needs a file system that stores raw bytes")
def test_names_that_are_not_utf8_are_skipped(tmp_path):
    root = os.fsencode(tmp_path)
    os.makedirs(os.path.join(root, b"good"))
    os.makedirs(os.path.join(root, b"bad\xff"))
    os.makedirs(os.path.join(root, b"good", b"sub\xfe"))  # its images' relpaths could not be stored either
    for folder, name in [(b"good", b"ok.jpg"), (b"good", b"x\xfe.jpg"), (b"bad\xff", b"a.jpg"),
                         (b"good/sub\xfe", b"b.jpg")]:
        with open(os.path.join(root, folder, name), "wb") as handle:
            handle.write(b"x")
    try:
        dataset = data.discover(tmp_path)
    except UnicodeEncodeError as e:  # pragma: no cover - a file system that refuses the names
        pytest.skip(f"cannot create such names here: {e}")
    assert dataset.classes == ("good",)
    assert [i.relpath for i in dataset.items] == ["good/ok.jpg"]
    assert dict(dataset.skipped) == {
        "bad\\xff": "folder name is not valid UTF-8",
        "good/x\\xfe.jpg": "file name is not valid UTF-8",
        "good/sub\\xfe": "folder name is not valid UTF-8; its contents are not used",
    }
    found, skipped = data.list_images(tmp_path / "good")  # predict's walker: the same
    assert found == [tmp_path / "good" / "ok.jpg"] and len(skipped) == 2


# --------------------------------------------------------------------------- links to ancestors, manifests outside DATA


def test_a_folder_link_to_an_ancestor_is_a_loop_not_a_second_label(tmp_path):
    touch(tmp_path / "ants" / "a.jpg")
    touch(tmp_path / "bees" / "b.jpg")
    (tmp_path / "bees" / "loop").symlink_to("..")  # DATA itself: would store ants/a.jpg again as bees
    (tmp_path / "bees" / "self").symlink_to(".")
    (tmp_path / "ants" / "root").symlink_to("/")
    dataset = data.discover(tmp_path)
    assert [(i.relpath, dataset.classes[i.label]) for i in dataset.items] == [("ants/a.jpg", "ants"),
                                                                               ("bees/b.jpg", "bees")]
    skipped = dict(dataset.skipped)
    assert set(skipped) == {"bees/loop", "bees/self", "ants/root"}
    assert all("symlink loop" in reason for reason in skipped.values())


def test_a_class_folder_linking_to_data_and_split_folder_ancestors_are_loops(tmp_path):
    touch(tmp_path / "train" / "ants" / "a.jpg")
    (tmp_path / "train" / "ants" / "up").symlink_to("..")
    (tmp_path / "train" / "ants" / "top").symlink_to("../..")
    (tmp_path / "train" / "bees").symlink_to("..")
    dataset = data.discover(tmp_path)
    assert [i.relpath for i in dataset.items] == ["train/ants/a.jpg"]
    assert {p for p, reason in dataset.skipped if "symlink loop" in reason} == {
        "train/ants/up", "train/ants/top", "train/bees"}


def test_a_link_elsewhere_is_followed_once(tmp_path):
    touch(tmp_path / "shared" / "s.jpg")
    (tmp_path / "shared" / "back").symlink_to(tmp_path / "data" / "cls")  # leads back into the walk
    touch(tmp_path / "data" / "cls" / "a.jpg")
    (tmp_path / "data" / "cls" / "more").symlink_to(tmp_path / "shared")
    dataset = data.discover(tmp_path / "data")
    assert [i.relpath for i in dataset.items] == ["cls/a.jpg", "cls/more/s.jpg"]
    assert [p for p, _ in dataset.skipped] == ["cls/more/back"]


def test_manifest_paths_must_resolve_inside_data_unless_allowed(tmp_path):
    outside = touch(tmp_path / "secret" / "x.jpg")
    root = tmp_path / "data"
    touch(root / "a.jpg")
    (root / "sneaky.jpg").symlink_to(outside)
    for listed in (str(outside), "../secret/x.jpg", "sneaky.jpg"):
        manifest = touch(root / "m.csv", f"a.jpg,cat\n{listed},dog\n".encode())
        with pytest.raises(DataError, match=r"line 2: .* resolves outside the data folder .*--allow-outside"):
            data.discover(root, manifest=manifest)
        dataset = data.discover(root, manifest=manifest, allow_outside=True)
        assert len(dataset.items) == 2
    with pytest.raises(DataError, match="outside the data folder"):
        data.discover(root / "m.csv")  # the CSV's folder is DATA
    assert len(data.discover(root / "m.csv", allow_outside=True).items) == 2


def test_list_images_is_the_walker_discover_uses(tmp_path):
    touch(tmp_path / "a.jpg")
    touch(tmp_path / ".hidden.jpg")
    touch(tmp_path / "notes.txt")
    touch(tmp_path / "sub" / "b.png")
    (tmp_path / "sub" / "up").symlink_to("..")
    found, skipped = data.list_images(tmp_path)
    assert found == [tmp_path / "a.jpg", tmp_path / "sub" / "b.png"]
    reasons = dict(skipped)
    assert set(reasons) == {str(tmp_path / "notes.txt"), str(tmp_path / "sub" / "up")}
    assert reasons[str(tmp_path / "notes.txt")] == "not an image file extension Pillow can open"
    assert reasons[str(tmp_path / "sub" / "up")].startswith("symlink loop")


def test_cli_extract_refuses_a_manifest_path_outside_data_unless_allow_outside(tmp_path):
    import json

    import onnx
    from click.testing import CliRunner

    from embedx.cli.main import cli
    from tests.bundle_fixtures import tiny_backbone, write_images

    onnx.save(tiny_backbone(), tmp_path / "tiny.onnx")
    inside = write_images(tmp_path / "data", 2)
    outside = write_images(tmp_path / "elsewhere", 1, seed=5)[0]
    manifest = touch(tmp_path / "data" / "m.csv", f"{inside[0].name},a\n{inside[1].name},b\n{outside},b\n".encode())
    args = ["extract", str(tmp_path / "data"), "--manifest", str(manifest), "--backbone", str(tmp_path / "tiny.onnx"),
            "-o", str(tmp_path / "f.h5"), "--workers", "0", "--device", "cpu", "--json", "-q"]
    refused = CliRunner().invoke(cli, args)
    assert refused.exit_code == 1 and "--allow-outside" in refused.stderr
    assert len(refused.stderr.strip().splitlines()) == 1
    allowed = CliRunner().invoke(cli, [*args, "--allow-outside"])
    assert allowed.exit_code == 0, allowed.output
    assert json.loads(allowed.stdout)["images"] == 3
