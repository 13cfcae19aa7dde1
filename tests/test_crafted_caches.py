"""Caches changed behind embedx's back (one attribute or dataset of a sound cache): every reader
refuses them with one ``CacheError`` line naming the file, and the CLI with one ``error:`` line and
exit code 1, never a traceback or a 75 GiB allocation."""

from __future__ import annotations

import functools
import json

import h5py
import numpy as np
import pytest
from click.testing import CliRunner

from embedx import cache
from embedx.cache import CacheMeta, CacheWriter, cache_info, iter_features, read_cache, read_views, scan_rows
from embedx.errors import CacheError
from embedx.merge import merge
from embedx.verify import verify

ROWS, DIM = 12, 6


def build(path) -> None:
    """A sound cache with everything a reader may meet: errors (with keys), stats and views."""
    meta = CacheMeta(backbone="tiny", weights_tag="none", weights_arg="none", onnx_path="/models/tiny.onnx",
                     onnx_sha256="ab" * 32, feature_layer="pool", feature_dim=DIM, preprocess={"input_size": 32},
                     dtype="float32")
    keys = [f"{i:064x}" for i in range(ROWS)]
    view_keys = [f"{i + 1000:064x}" for i in range(3)]
    features = np.random.default_rng(0).standard_normal((ROWS + 3, DIM)).astype(np.float32)
    with CacheWriter(path, meta) as writer:
        writer.append(keys + view_keys, features)
        writer.finalize(keys=keys, paths=[f"c{i % 2}/{i}.jpg" for i in range(ROWS)],
                        labels=[i % 2 for i in range(ROWS)], classes=["c0", "c1"],
                        splits=["train" if i % 3 else "val" for i in range(ROWS)],
                        errors=[("bad.jpg", "not an image", f"{999:064x}"), ("locked.jpg", "cannot read")],
                        attrs={"data": "/nowhere"}, stats=[(100 + i, 10**9 + i) for i in range(ROWS)],
                        views={"keys": view_keys, "source": [0, 1, 2], "names": ["augment/0"] * 3,
                               "plan": {"views": 1, "augment": {}, "seed": 0}})


def replace(group, name, data=None, **kwargs) -> None:
    del group[name]
    group.create_dataset(name, data=data, **kwargs)


def set_meta(handle, **changes) -> None:
    handle.attrs["meta"] = json.dumps({**json.loads(handle.attrs["meta"]), **changes})


# name -> change made to a sound cache (an open h5py.File)
CRAFTED = {
    "schema_version text": lambda f: f.attrs.__setitem__("schema_version", "abc"),
    "schema_version float": lambda f: f.attrs.__setitem__("schema_version", 1.5),
    "schema_version array": lambda f: f.attrs.__setitem__("schema_version", np.array([1, 1])),
    "complete text": lambda f: f.attrs.__setitem__("complete", "no"),
    "meta a number": lambda f: f.attrs.__setitem__("meta", "5"),
    "meta a list": lambda f: f.attrs.__setitem__("meta", "[1, 2]"),
    "meta not JSON": lambda f: f.attrs.__setitem__("meta", "{bad"),
    "meta bytes": lambda f: f.attrs.__setitem__("meta", np.void(b"\xff\xfe")),
    "meta missing": lambda f: f.attrs.__delitem__("meta"),
    "meta.preprocess a list": lambda f: set_meta(f, preprocess=[1]),
    "meta.shard a number": lambda f: set_meta(f, shard=5),
    "meta.shard text": lambda f: set_meta(f, shard="ab"),
    "meta.feature_dim text": lambda f: set_meta(f, feature_dim="abc"),
    "meta.onnx_path a number": lambda f: set_meta(f, onnx_path=5),
    "extra not JSON": lambda f: f.attrs.__setitem__("extra", "{bad"),
    "extra a list": lambda f: f.attrs.__setitem__("extra", "[1]"),
    "extra nested 100 deep": lambda f: f.attrs.__setitem__("extra", "[" * 100 + "]" * 100),
    **{f"no {name}": functools.partial(lambda name, f: f.__delitem__(name), name)
       for name in ("features", "labels", "keys", "paths", "splits", "classes")},
    "classes integers": lambda f: replace(f, "classes", np.array([1, 2])),
    "splits integers": lambda f: replace(f, "splits", np.zeros(ROWS, np.int64)),
    "keys a group": lambda f: (f.__delitem__("keys"), f.create_group("keys")),
    "labels float": lambda f: replace(f, "labels", np.full(ROWS, 0.5)),
    "labels 2-D": lambda f: replace(f, "labels", np.zeros((ROWS, 2), np.int64)),
    "labels a scalar": lambda f: replace(f, "labels", np.int64(0)),
    "labels short": lambda f: replace(f, "labels", np.zeros(3, np.int64)),
    "splits short": lambda f: replace(f, "splits", np.array([b"train"] * 3)),
    "paths short": lambda f: replace(f, "paths", np.array([b"x"] * 3)),
    "row_crc32 short": lambda f: replace(f, cache.CHECKSUMS, np.zeros(3, np.uint32)),
    "row_crc32 text": lambda f: replace(f, cache.CHECKSUMS, np.array([b"ab"] * ROWS)),
    "sizes short": lambda f: replace(f, "sizes", np.zeros(3, np.int64)),
    "features 1-D": lambda f: replace(f, "features", np.zeros(ROWS, np.float32)),
    "features 3-D": lambda f: replace(f, "features", np.zeros((ROWS, DIM, 2), np.float32)),
    "features integers": lambda f: replace(f, "features", np.zeros((ROWS, DIM), np.int32)),
    "features of another dim": lambda f: replace(f, "features", np.zeros((ROWS, DIM - 1), np.float32)),
    "errors columns of other lengths": lambda f: replace(f["errors"], "paths", np.array([b"x"] * 3)),
    "errors a dataset": lambda f: replace(f, "errors", np.zeros(3)),
    "views source short": lambda f: replace(f[cache.VIEWS], "source", np.zeros(1, np.int64)),
    "views plan not JSON": lambda f: f[cache.VIEWS].attrs.__setitem__("plan", "{bad"),
    "views features of another dim": lambda f: replace(f[cache.VIEWS], "features", np.zeros((3, 2), np.float32)),
    # a file of a few KB declaring what would take tens of GiB to read
    "labels of 1e10 rows": lambda f: replace(f, "labels", shape=(10**10,), dtype=np.int64, chunks=(1 << 16,)),
    "features 1e9 wide": lambda f: replace(f, "features", shape=(ROWS, 10**9), dtype=np.float32,
                                           chunks=(1, 1 << 16)),
    "features of 1e9 rows, contiguous": lambda f: replace(f, "features", shape=(10**9, DIM), dtype=np.float32),
    "labels of 1e10 rows, compressed": lambda f: replace(f, "labels", shape=(10**10,), dtype=np.int64,
                                                         chunks=(1 << 16,), compression="gzip"),
    "labels in another file": lambda f: (f.__delitem__("labels"),
                                         f.__setitem__("labels", h5py.ExternalLink("/tmp/other.h5", "/labels"))),
}
# Caches whose layout is sound but whose labels are not: refused where labels are read.
BAD_LABELS = {
    "a label past the classes": lambda f: replace(f, "labels", np.full(ROWS, 7, np.int64)),
    "a negative label": lambda f: replace(f, "labels", np.r_[np.zeros(ROWS - 1, np.int64), -1]),
    "no classes, labels 0 and 1": lambda f: replace(f, "classes", np.array([], dtype=h5py.string_dtype())),
    "classes twice": lambda f: replace(f, "classes", np.array([b"c0", b"c0"])),
}


@pytest.fixture(scope="module")
def sound(tmp_path_factory):
    path = tmp_path_factory.mktemp("sound") / "feats.h5"
    build(path)
    return path


def crafted(tmp_path, sound, change):
    import shutil

    path = tmp_path / "crafted.h5"
    shutil.copy(sound, path)
    with h5py.File(path, "r+") as handle:
        change(handle)
    return path


def refused(path, read) -> str:
    with pytest.raises(CacheError) as caught:
        read(path)
    message = str(caught.value)
    assert str(path) in message and "\n" not in message, message
    return message


READERS = {
    "read_cache": read_cache,
    "read_cache without features": lambda p: read_cache(p, load_features=False),
    "cache_info": cache_info,
    "scan_rows": scan_rows,
    "iter_features": lambda p: list(iter_features(p)),
    "read_views": read_views,
    "verify": lambda p: verify(p, sample=2),
    "merge": lambda p: merge([p], output=p.with_name("merged.h5"), allow_partial=True),
}


def test_the_sound_cache_reads(sound):
    assert len(read_cache(sound)) == ROWS and cache_info(sound)["rows"] == ROWS
    assert len(read_views(sound).source) == 3 and read_cache(sound).extra == {"data": "/nowhere"}


@pytest.mark.parametrize("name", list(CRAFTED))
def test_every_reader_refuses_a_crafted_cache_in_one_line(tmp_path, sound, name):
    path = crafted(tmp_path, sound, CRAFTED[name])
    for read in READERS.values():
        refused(path, read)


@pytest.mark.parametrize("name", list(BAD_LABELS))
def test_labels_outside_the_classes_are_refused_where_labels_are_read(tmp_path, sound, name):
    path = crafted(tmp_path, sound, BAD_LABELS[name])
    for reader in ("read_cache", "read_cache without features", "cache_info", "verify", "merge"):
        refused(path, READERS[reader])


def test_views_pointing_past_the_rows_are_refused(tmp_path, sound):
    path = crafted(tmp_path, sound, lambda f: replace(f[cache.VIEWS], "source", np.array([0, 1, ROWS])))
    assert "1 views point at rows it does not have" in refused(path, read_views)


def test_the_storage_check_names_what_the_file_lacks(tmp_path, sound):
    message = refused(crafted(tmp_path, sound, CRAFTED["labels of 1e10 rows"]), read_cache)
    assert "'labels' declares shape (10000000000,) (80,000,000,000 bytes) but the file stores 0 bytes" in message


def test_caches_without_the_newer_datasets_still_read(tmp_path, sound):
    def as_old(handle):
        for name in (cache.CHECKSUMS, "sizes", "mtimes", cache.VIEWS):
            del handle[name]
        del handle["errors"]["keys"]
        del handle.attrs["extra"]

    path = crafted(tmp_path, sound, as_old)
    data = read_cache(path)
    assert len(data) == ROWS and data.stats is None and data.extra == {} and data.error_keys == ["", ""]
    assert not cache_info(path)["checksums"] and len(read_views(path).source) == 0
    with h5py.File(path, "r+") as handle:
        del handle["errors"]
    assert read_cache(path).errors == []


@pytest.fixture(scope="module")
def head(tmp_path_factory, sound):
    out = tmp_path_factory.mktemp("head") / "head"
    result = cli(["fit-head", "--cache", str(sound), "-o", str(out)])
    assert result.exit_code == 0, result.output
    return out


def cli(args):
    from embedx.cli.main import cli as group

    return CliRunner().invoke(group, [str(a) for a in args])


COMMANDS = {
    "info": lambda p, head: ["info", p],
    "info --json": lambda p, head: ["info", "--json", p],
    "verify": lambda p, head: ["verify", "--sample", 2, p],
    "merge": lambda p, head: ["merge", "--allow-partial", p, "-o", p.with_name("m.h5"), "-q"],
    "fit-head": lambda p, head: ["fit-head", "--cache", p, "-o", p.with_name("head")],
    "evaluate": lambda p, head: ["evaluate", "--head", head, "--cache", p],
    "report": lambda p, head: ["report", "--head", head, "--cache", p, "-o", p.with_name("r.html"),
                               "--mistakes", 0],
}


@pytest.mark.parametrize("name", ["schema_version text", "meta a number", "extra a list", "no splits",
                                  "row_crc32 short", "features 1-D", "labels of 1e10 rows", "a label past the classes",
                                  "a negative label"])
def test_every_command_says_one_error_line(tmp_path, sound, head, name):
    path = crafted(tmp_path, sound, {**CRAFTED, **BAD_LABELS}[name])
    for command, args in COMMANDS.items():
        result = cli(args(path, head))
        lines = result.stderr.strip().splitlines()
        assert result.exit_code == 1 and isinstance(result.exception, SystemExit), (command, result.output)
        assert lines and lines[-1].startswith(f"error: {path}") and "Traceback" not in result.output, (command, lines)
        assert not [line for line in lines if line.startswith("error:")][1:], (command, lines)


def test_merge_ignores_an_error_order_that_is_not_a_list_of_rows(tmp_path, sound):
    def odd_order(handle):
        handle.attrs["extra"] = json.dumps({"data": "/nowhere", "error_order": 5})

    path = crafted(tmp_path, sound, odd_order)
    merge([path], output=tmp_path / "merged.h5", allow_partial=True)  # was: TypeError, len() of an int
    assert read_cache(tmp_path / "merged.h5").errors == read_cache(path).errors
