"""`embedx verify` and what a damaged cache does to `fit-head` and to a rerun of `extract`."""

from __future__ import annotations

import json

import h5py
import numpy as np
import pytest

from embedx import cache
from embedx.cache import read_cache
from embedx.verify import verify
from tests.test_cache import flip_feature_bytes
from tests.test_extract import backbone, class_folders, cli_run, run, tiny_onnx, write_image  # noqa: F401


@pytest.fixture
def made(tmp_path, backbone):  # noqa: F811
    data = class_folders(tmp_path / "data", per_class=6)
    out = tmp_path / "f.h5"
    run(data, backbone, out, dtype="float16")
    return data, out


@pytest.mark.parametrize("dtype", ["float16", "float32"])
def test_a_sound_cache_verifies(tmp_path, backbone, dtype):  # noqa: F811
    data = class_folders(tmp_path / "data", per_class=6)
    out = tmp_path / "f.h5"
    run(data, backbone, out, dtype=dtype)
    report = verify(out, sample=100)
    assert report.ok and report.checksums and report.sampled == list(range(12))
    assert len(report.cosines) == 12 and min(report.cosines.values()) >= 0.999999  # float16 costs ~1e-7
    result = cli_run("verify", out, "--sample", 4)
    assert result.exit_code == 0, result.output
    assert "checksums: 0 rows fail" in result.stdout and result.stdout.strip().endswith("ok")


def test_flipped_bytes_fail_verify_and_fit_head_and_extract_repairs_exactly_them(tmp_path, backbone, made):  # noqa: F811
    data, out = made
    fresh = read_cache(out)
    flip_feature_bytes(out, [2, 9])

    result = cli_run("verify", out, "--json")
    assert result.exit_code == 1, result.output
    report = json.loads(result.stdout)
    assert report["checksum_rows"] == [2, 9] and report["bad_rows"] == [2, 9] and not report["ok"]
    result = cli_run("verify", out)
    assert result.exit_code == 1 and "checksums: 2 rows fail (2, 9)" in result.stdout
    assert "BAD rows: 2, 9" in result.stdout

    result = cli_run("fit-head", "--cache", out, "-o", tmp_path / "head")  # was: fitted on the junk
    assert result.exit_code == 1, result.output
    assert "2 rows (2, 9) do not match their checksums" in result.stderr
    assert "Traceback" not in result.stderr and result.stderr.strip().splitlines()[-1].startswith("error: ")

    summary = run(data, backbone, out, dtype="float16")
    assert (summary.new, summary.repaired) == (2, 2)
    assert verify(out).ok
    repaired = read_cache(out)
    np.testing.assert_array_equal(repaired.features, fresh.features)
    assert repaired.keys.tolist() == fresh.keys.tolist()


def test_rows_with_consistent_but_wrong_features_are_found_by_embedding_again(made):
    _, out = made
    with h5py.File(out, "r+") as handle:  # wrong values, with a checksum to match: only the backbone can tell
        row = handle["features"][5].astype(np.float32)
        handle["features"][5] = row[::-1]
        handle[cache.CHECKSUMS][5] = cache.row_checksums(handle["features"][5:6])[0]
    report = verify(out, sample=12)
    assert report.checksum_rows == [] and report.low_cosine_rows == [5] and report.bad_rows == [5]
    assert report.cosines[5] < 0.999


def test_images_that_changed_or_went_missing(made):
    data, out = made
    paths = read_cache(out, load_features=False).paths.tolist()
    (data / paths[0]).unlink()
    write_image(data / paths[3], "beta", 99)  # other bytes under the same name
    report = verify(out, sample=12)
    assert report.missing == [{"row": 0, "path": paths[0]}]  # reported, not a failure
    assert report.changed == [{"row": 3, "path": paths[3]}] and report.bad_rows == [3]
    assert 3 not in report.cosines and len(report.cosines) == 10
    result = cli_run("verify", out, "--sample", 12)
    assert result.exit_code == 1 and f"missing: row 0 {paths[0]}" in result.stdout


def test_a_moved_data_root_and_a_missing_or_changed_backbone(tmp_path, made):
    data, out = made
    moved = tmp_path / "moved"
    data.rename(moved)
    assert len(verify(out, sample=4).missing) == 4
    assert verify(out, sample=4, data_root=moved).ok
    other = tmp_path / "other.onnx"
    other.write_bytes(b"not the model")
    for onnx_path, why in ((tmp_path / "gone.onnx", "is gone"), (other, "sha256 differs")):
        with h5py.File(out, "r+") as handle:
            meta = json.loads(handle.attrs["meta"])
            handle.attrs["meta"] = json.dumps({**meta, "onnx_path": str(onnx_path)})
        report = verify(out, sample=4, data_root=moved)
        assert why in report.reembed_skipped and not report.cosines and report.ok


def test_verify_of_a_cache_that_is_not_one(tmp_path):
    (tmp_path / "x.h5").write_bytes(b"nope")
    result = cli_run("verify", tmp_path / "x.h5")
    assert result.exit_code == 1 and result.stderr.startswith("error: ") and "not a readable HDF5" in result.stderr


def test_an_int8_cache_is_re_embedded_at_its_measured_tolerance(made):
    """int8 rows were skipped; now they are compared with the fp32 model at 0.95 (measured: worst
    0.9695 on hymenoptera with efficientnet_lite0). A row of other features (checksum rewritten
    to match, so only the re-embedding can see it) is named."""
    from embedx.verify import MIN_COSINES, tolerance_for

    data, out = made
    with h5py.File(out, "r+") as handle:
        meta = json.loads(handle.attrs["meta"])
        handle.attrs["meta"] = json.dumps({**meta, "precision": "int8"})
    report = verify(out, sample=12)
    assert report.ok and not report.reembed_skipped and len(report.cosines) == 12
    assert report.tolerance == MIN_COSINES["int8"] == 0.95
    with h5py.File(out, "r+") as handle:
        row = -np.asarray(handle["features"][5], dtype=np.float32)  # cosine -1 to the image's features
        handle["features"][5] = row.astype(handle["features"].dtype)
        handle[cache.CHECKSUMS][5] = cache.row_checksums(handle["features"][5:6])[0]
    report = verify(out, sample=12)
    assert report.checksum_rows == [] and report.low_cosine_rows == [5] and report.bad_rows == [5]
    assert tolerance_for("fp16") == 0.999 and tolerance_for("int8", "gpu") == 0.95
    assert tolerance_for("fp32", "gpu") == 0.98


@pytest.mark.timeout(30)  # a FIFO used to block verify forever
def test_paths_a_crafted_cache_records_outside_its_data_root_or_to_no_regular_file_are_never_read(tmp_path):
    """Cache paths are untrusted: a path leading out of the data root (``..``, absolute) was read
    and hashed (a matching key made the report say ok), a FIFO blocked verify forever."""
    import hashlib
    import os

    from tests.test_heads import write_cache

    data = tmp_path / "data"
    data.mkdir()
    secret = tmp_path / "secret.txt"
    secret.write_bytes(b"outside the data root")
    (data / "link.png").symlink_to(secret)
    os.mkfifo(data / "pipe.png")
    (data / "dir.png").mkdir()
    paths = ["../secret.txt", str(secret), "link.png", "pipe.png", "/dev/zero", "dir.png", "gone.png"]
    out = write_cache(tmp_path / "c.h5", np.ones((len(paths), 4), np.float32), np.zeros(len(paths), int),
                      ["train"] * len(paths), ["a"], paths=paths, attrs={"data": str(data)})
    with h5py.File(out, "r+") as handle:  # keys that match the secret: reading it would "confirm" the rows
        handle["keys"][...] = np.array([hashlib.sha256(secret.read_bytes()).hexdigest()] * len(paths), dtype="S64")
    report = verify(out, sample=len(paths))
    reasons = {entry["path"]: entry["reason"] for entry in report.unreadable}
    assert report.missing == [{"row": 6, "path": "gone.png"}] and report.changed == []
    for path in (*paths[:2], "/dev/zero"):
        assert "outside the data root" in reasons[path], (path, reasons)
    # a link under the data root may lead anywhere: extract's data walk follows it, verify reads what it read
    assert "link.png" not in reasons
    assert "not a regular file" in reasons["pipe.png"] and "not a regular file" in reasons["dir.png"]
    assert [0, 1, 3, 4, 5] == [row for row in report.bad_rows if row != 2] and not report.ok

    result = cli_run("verify", out, "--sample", 7, "--data", data)  # FIFO inside the root, named by --data
    assert result.exit_code == 1 and "unreadable: row 3 pipe.png (not read: not a regular file)" in result.stdout
