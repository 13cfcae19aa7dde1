"""Sharded extraction (`extract --shard I/N`) and `embedx merge`: N shards merged equal one extraction."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest

from embedx.cache import cache_info, journal_dir, read_cache
from embedx.errors import CacheError, CacheMismatchError, ConfigError
from embedx.merge import merge
from embedx.shards import shard_of_key
from tests.test_extract import backbone, cli_run, run, tiny_onnx, write_image  # noqa: F401

UNREADABLE = Path("/proc/self/mem")  # open() works, read() at offset 0 fails (EIO): unreadable even for root


def make_data(root: Path, *, split_folders: bool) -> Path:
    """Images in two classes (in train/val/test folders, or class folders only), with a copy of
    one image under another name, a corrupt JPEG, an unreadable file and a skipped entry."""
    for i in range(14):
        name = ("alpha", "beta")[i % 2]
        split = ("train", "train", "val", "test")[i % 4] if split_folders else ""
        write_image(root / split / name / f"img_{i:02d}.jpg", name, i)
    top = root / ("train" if split_folders else "")
    (top / "beta" / "copy_of_img_00.jpg").write_bytes((top / "alpha" / "img_00.jpg").read_bytes())
    (top / "alpha" / "broken.jpg").write_bytes(b"\xff\xd8\xff not a jpeg")
    (top / "alpha" / "notes.txt").write_text("not an image")
    (top / "beta" / "unreadable.jpg").symlink_to(UNREADABLE)
    return root


def error_rows(path: Path) -> list[tuple[str, str, str]]:
    with h5py.File(path, "r") as handle:
        group = handle["errors"]
        return list(zip(group["paths"].asstr()[()].tolist(), group["reasons"].asstr()[()].tolist(),
                        group["keys"][()].astype(str).tolist(), strict=True))


def raw(path: Path) -> dict[str, np.ndarray]:
    """What the file stores, as stored (features in their dtype: compared byte for byte)."""
    with h5py.File(path, "r") as handle:
        return {name: handle[name][()] for name in ("features", "row_crc32", "labels", "keys", "sizes", "mtimes")} | {
            name: handle[name].asstr()[()] for name in ("paths", "splits", "classes")}


def assert_same_cache(merged: Path, single: Path) -> None:
    a, b = raw(merged), raw(single)
    for name in a:
        assert a[name].dtype == b[name].dtype, name
        np.testing.assert_array_equal(a[name], b[name], err_msg=name)
    assert a["features"].tobytes() == b["features"].tobytes()
    assert error_rows(merged) == error_rows(single)
    assert read_cache(merged).meta.fingerprint == read_cache(single).meta.fingerprint


@pytest.fixture(scope="module")
def made(tmp_path_factory, tiny_onnx):  # noqa: F811
    """Per layout: the data, one plain extraction, and shards 0/3, 1/3, 2/3 of it."""
    try:
        with open(UNREADABLE, "rb") as handle:
            handle.read(1)
        pytest.skip(f"{UNREADABLE} is readable here: no unreadable file to test with")
    except OSError:
        pass
    made = {}
    with pytest.MonkeyPatch.context() as patch:  # set up before the per-test cache folder is
        patch.setenv("EMBEDX_CACHE_DIR", str(tmp_path_factory.mktemp("embedx-cache")))
        for layout, options in (("folders", {"val_fraction": 0.3}), ("splits", {})):
            root = tmp_path_factory.mktemp(layout)
            data = make_data(root / "data", split_folders=layout == "splits")
            single = root / "single.h5"
            run(data, str(tiny_onnx), single, **options)
            parts = [root / f"part-{i}.h5" for i in range(3)]
            summaries = [run(data, str(tiny_onnx), part, shard=(i, 3), **options) for i, part in enumerate(parts)]
            made[layout] = {"data": data, "single": single, "parts": parts, "summaries": summaries,
                            "options": options}
    return made


@pytest.mark.parametrize("layout", ["folders", "splits"])
def test_three_shards_merged_equal_one_extraction(made, tmp_path, layout, backbone):  # noqa: F811
    case = made[layout]
    single = read_cache(case["single"])
    assert len(single.errors) == 3 and len(single) == 15  # broken, unreadable, notes.txt; 14 + the copy
    # every row and every error row is in exactly one shard, the one its key (or path) names
    seen_rows, seen_errors = [], []
    for index, part in enumerate(case["parts"]):
        cache = read_cache(part)
        assert cache.meta.shard == (index, 3) and cache.classes == single.classes
        assert all(shard_of_key(key, 3) == index for key in cache.keys.tolist())
        assert cache_info(part)["shard"] == [index, 3]
        seen_rows += cache.paths.tolist()
        seen_errors += cache.errors
    assert sorted(seen_rows) == sorted(single.paths.tolist())
    assert sorted(seen_errors) == sorted(single.errors)
    assert sum(s.new for s in case["summaries"]) == len(set(single.keys.tolist()))  # the copy computed once

    out = tmp_path / "all.h5"
    summary = merge(list(reversed(case["parts"])), output=out)  # the order given does not matter
    assert (summary.images, summary.errors, summary.duplicates) == (15, 3, 0)
    assert_same_cache(out, case["single"])
    info = cache_info(out)
    assert info["shard"] is None and len(info["extra"]["merged_from"]) == 3
    assert "error_order" not in info["extra"]
    lines = cli_run("info", out).stdout
    assert "merged from 3 shards" in lines and "shard " not in lines.split("merged")[0]
    assert "shard 1/3 of the data set" in cli_run("info", case["parts"][1]).stdout

    # a merged cache is an ordinary cache: extracting the same data into it computes nothing
    again = run(case["data"], backbone, out, **case["options"])
    assert (again.new, again.hashed, again.images) == (0, 2, 15)  # only the two error files are read again
    assert_same_cache(out, case["single"])


def test_merge_refuses_parts_of_different_extractions(made, tmp_path, backbone):  # noqa: F811
    case = made["splits"]
    other = tmp_path / "part-1-float32.h5"
    run(case["data"], backbone, other, shard=(1, 3), dtype="float32")
    with pytest.raises(CacheMismatchError, match=r"part-1-float32\.h5 is not a shard of the same extraction.*"
                                                 r"dtype: 'float32' vs 'float16'"):
        merge([case["parts"][0], other, case["parts"][2]], output=tmp_path / "all.h5")
    folders = made["folders"]["parts"][1]  # other data: other splits (val_fraction), other classes? same here
    with pytest.raises(CacheMismatchError, match=r"val_fraction: 0\.3 vs None"):
        merge([case["parts"][0], folders, case["parts"][2]], output=tmp_path / "all.h5")
    assert not (tmp_path / "all.h5").exists() and not journal_dir(tmp_path / "all.h5").exists()


def test_incomplete_repeated_and_mixed_shards(made, tmp_path, backbone):  # noqa: F811
    case = made["splits"]
    parts = case["parts"]
    with pytest.raises(ConfigError, match=r"shards 1/3 are missing.*--allow-partial"):
        merge([parts[0], parts[2]], output=tmp_path / "a.h5")
    summary = merge([parts[0], parts[2]], output=tmp_path / "a.h5", allow_partial=True)
    assert summary.images == len(read_cache(parts[0])) + len(read_cache(parts[2]))
    assert summary.warnings == ["shards 1/3 are missing"]

    with pytest.raises(ConfigError, match=r"shards 0/3 are given more than once"):
        merge([*parts, parts[0]], output=tmp_path / "b.h5")
    summary = merge([parts[0], *parts], output=tmp_path / "b.h5", allow_partial=True)
    assert summary.duplicates == len(read_cache(parts[0]))
    assert_same_cache(tmp_path / "b.h5", case["single"])

    # two shards of 2 plus one of 3: every image at least once, the overlap dropped
    halves = [tmp_path / f"half-{i}.h5" for i in range(2)]
    for i, half in enumerate(halves):
        run(case["data"], backbone, half, shard=(i, 2))
    with pytest.raises(ConfigError, match=r"different numbers of shards \(2, 3"):
        merge([*halves, parts[1]], output=tmp_path / "c.h5")
    summary = merge([*halves, parts[1]], output=tmp_path / "c.h5", allow_partial=True)
    assert summary.duplicates == len(read_cache(parts[1]))
    assert_same_cache(tmp_path / "c.h5", case["single"])


def test_shard_is_part_of_the_identity(made, tmp_path, backbone):  # noqa: F811
    case = made["splits"]
    part = tmp_path / "part.h5"
    first = run(case["data"], backbone, part, shard=(0, 3))
    assert first.hashed == 17  # every file is hashed to know its shard (the unreadable one too)
    assert run(case["data"], backbone, part, shard=(0, 3)).new == 0  # a rerun of the same shard reuses it
    with pytest.raises(CacheMismatchError, match=r"shard: \[0, 3\] vs \[1, 3\]"):
        run(case["data"], backbone, part, shard=(1, 3))
    with pytest.raises(CacheMismatchError, match=r"shard: \[0, 3\] vs None"):
        run(case["data"], backbone, part)
    assert read_cache(part).meta.shard == (0, 3)


@pytest.mark.parametrize("value", ["3/3", "-1/2", "1/0", "a/b", "1", "0/2/3", "", "\u00b2/4", "1/" + "1" * 5000])
def test_bad_shard_values_are_one_line_errors(value, tmp_path, backbone):  # noqa: F811
    result = cli_run("extract", "--backbone", backbone, tmp_path, "--shard", value, "-o", tmp_path / "x.h5")
    assert result.exit_code == 2
    error = [line for line in result.output.splitlines() if line.startswith("Error")]
    assert len(error) == 1 and "shard must be I/N" in error[0], result.output
    with pytest.raises(ConfigError, match="shard must be"):
        run(tmp_path, backbone, tmp_path / "x.h5", shard=(3, 3))


def test_merge_output_rules(made, tmp_path):
    case = made["splits"]
    with pytest.raises(ConfigError, match="is one of the parts"):
        merge(case["parts"], output=case["parts"][1])
    plain = tmp_path / "plain.h5"
    plain.write_bytes(case["single"].read_bytes())
    with pytest.raises(CacheError, match=r"was not made by `embedx merge`; pass --overwrite"):
        merge(case["parts"], output=plain)
    merge(case["parts"], output=plain, overwrite=True)
    assert_same_cache(plain, case["single"])
    summary = merge(case["parts"], output=plain)  # a merged file: merged again without --overwrite
    assert (summary.copied, summary.reused) == (0, 14)
    assert_same_cache(plain, case["single"])


KILL_SCRIPT = """
import os, signal, sys
import embedx.cache, embedx.merge
from embedx.merge import merge

embedx.merge.BATCH_ROWS = 4
where = sys.argv[1]
if where == "append":
    appended = embedx.cache.CacheWriter.append
    calls = []
    def append(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            os.kill(os.getpid(), signal.SIGKILL)
        return appended(self, *args, **kwargs)
    embedx.cache.CacheWriter.append = append
else:
    reserve = embedx.cache._reserve
    def killed_while_writing(path, size):
        reserve(path, size)
        os.kill(os.getpid(), signal.SIGKILL)
    embedx.cache._reserve = killed_while_writing
merge(sys.argv[3:], output=sys.argv[2])
"""


@pytest.mark.parametrize("where", ["append", "finalize"])
def test_merge_killed_then_rerun(made, tmp_path, where):
    case = made["splits"]
    out = tmp_path / "all.h5"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).parent.parent), *sys.path])}
    done = subprocess.run([sys.executable, "-c", KILL_SCRIPT, where, str(out), *map(str, case["parts"])],
                          env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == -9, done.stderr
    assert not out.exists()
    journaled = sum(len(np.load(shard)["keys"]) for shard in journal_dir(out).glob("shard-*.npz"))
    assert 0 < journaled < 14 if where == "append" else journaled == 14  # 14 distinct features in all
    summary = merge(case["parts"], output=out)
    assert (summary.reused, summary.copied) == (journaled, 14 - journaled)
    assert_same_cache(out, case["single"])
    assert not journal_dir(out).exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temporary left


def test_fit_head_evaluate_verify_on_a_merged_cache(made, tmp_path):
    case = made["splits"]
    out = tmp_path / "all.h5"
    result = cli_run("merge", *case["parts"], "-o", out, "--json", "-q")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["images"] == 15
    head = tmp_path / "head"
    result = cli_run("fit-head", "--cache", out, "-o", head, "--json")
    assert result.exit_code == 0, result.output
    result = cli_run("evaluate", "--head", head, "--cache", out, "--json")
    assert result.exit_code == 0, result.output
    assert "all" in json.loads(result.stdout)
    result = cli_run("verify", out, "--sample", 15)
    assert result.exit_code == 0, result.output
    assert result.stdout.strip().endswith("ok")
    result = cli_run("merge", case["parts"][0], "-o", tmp_path / "x.h5")
    assert result.exit_code == 1 and result.output.count("\n") == 1 and "1/3, 2/3 are missing" in result.output


def test_more_shards_than_images(tmp_path, backbone):  # noqa: F811
    data = tmp_path / "data"
    for i, name in enumerate(("alpha", "beta")):
        write_image(data / name / "only.jpg", name, i)
    single = tmp_path / "single.h5"
    run(data, backbone, single)
    parts = [tmp_path / f"part-{i}.h5" for i in range(3)]
    sizes = [run(data, backbone, part, shard=(i, 3)).images for i, part in enumerate(parts)]
    assert sum(sizes) == 2 and 0 in sizes  # an empty shard is a cache of 0 rows
    merge(parts, output=tmp_path / "all.h5")
    assert_same_cache(tmp_path / "all.h5", single)


def test_default_output_names_the_shard(tmp_path):
    from embedx.extract import default_output

    assert default_output(tmp_path / "imgs", "tiny", shard=(2, 8)).name == "imgs-tiny-shard2of8.h5"
    assert default_output(tmp_path / "imgs", "tiny").name == "imgs-tiny.h5"


def test_shards_with_views_merged_equal_one_extraction(tmp_path, backbone):  # noqa: F811
    """Views (`extract --views`) of each shard's train images travel through merge: the merged
    views (keys, clean rows, names, plan, feature bytes) equal one extraction's; parts made
    with other views are refused."""
    from embedx.cache import read_views

    data = tmp_path / "data"
    for i in range(10):
        name = ("alpha", "beta")[i % 2]
        write_image(data / ("train", "train", "val")[i % 3] / name / f"img_{i:02d}.jpg", name, i)
    copy = data / "train" / "alpha" / "copy_of_00.jpg"  # byte-identical: its views share keys with img_00's
    copy.write_bytes((data / "train" / "alpha" / "img_00.jpg").read_bytes())
    single = tmp_path / "single.h5"
    run(data, backbone, single, views=2)
    parts = [tmp_path / f"part-{i}.h5" for i in range(2)]
    for i, part in enumerate(parts):
        run(data, backbone, part, shard=(i, 2), views=2)
    out = tmp_path / "all.h5"
    summary = merge(parts, output=out)
    assert_same_cache(out, single)
    a, b = read_views(out), read_views(single)
    assert summary.views == len(b.keys) == 2 * int((read_cache(single).splits == "train").sum()) > 0
    for name in ("source", "names", "keys"):
        np.testing.assert_array_equal(getattr(a, name), getattr(b, name), err_msg=name)
    assert a.plan == b.plan and a.features.tobytes() == b.features.tobytes()

    other = tmp_path / "part-1-views3.h5"
    run(data, backbone, other, shard=(1, 2), views=3)
    with pytest.raises(CacheMismatchError, match=r"part-1-views3\.h5 was extracted with other views"):
        merge([parts[0], other], output=tmp_path / "bad.h5")
