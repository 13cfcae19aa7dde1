"""The HDF5 feature cache on its own: schema, identity, journal, lock, reading."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from embedx import cache
from embedx.cache import CacheMeta, CacheWriter, cache_info, journal_dir, read_cache
from embedx.errors import CacheError, CacheLockedError, CacheMismatchError

DIM = 6


def make_meta(**changes) -> CacheMeta:
    values = dict(
        backbone="tiny", weights_tag="none", weights_arg="none", onnx_path="/models/tiny.onnx",
        onnx_sha256="ab" * 32, feature_layer="pool", feature_dim=DIM,
        preprocess={"input_size": 32, "resize_size": 36, "mean": (0.5, 0.5, 0.5)},
        dtype="float16", precision="fp32",
    )
    values.update(changes)
    return CacheMeta(**values)


def key(i: int) -> str:
    return f"{i:064x}"


def features_for(keys: list[str]) -> np.ndarray:
    """Deterministic features per key, so any row can be checked against its key."""
    return np.stack([np.random.default_rng(int(k, 16) % 2**32).standard_normal(DIM) for k in keys]).astype(np.float32)


def finalize(writer: CacheWriter, keys: list[str], *, errors=()) -> None:
    writer.finalize(
        keys=keys, paths=[f"c{i % 2}/img {i}.jpg" for i in range(len(keys))], labels=[i % 2 for i in range(len(keys))],
        splits=["train" if i % 3 else "val" for i in range(len(keys))], classes=["c0", "c1"], errors=list(errors),
    )


def build(path, keys, *, batch: int = 4, overwrite: bool = False, **meta_changes) -> None:
    with CacheWriter(path, make_meta(**meta_changes), overwrite=overwrite) as writer:
        for start in range(0, len(keys), batch):
            writer.append(keys[start : start + batch], features_for(keys[start : start + batch]))
        finalize(writer, keys, errors=[("bad.jpg", "not an image", key(999)), ("locked.jpg", "cannot read")])


# -- identity ----------------------------------------------------------------------


def test_fingerprint_covers_everything_but_the_onnx_location():
    base = make_meta()
    assert make_meta(onnx_path="/elsewhere/tiny.onnx").fingerprint == base.fingerprint
    for change in (dict(backbone="other"), dict(weights_tag="IMAGENET1K_V1"), dict(onnx_sha256="cd" * 32),
                   dict(feature_layer="fc7"), dict(feature_dim=7), dict(preprocess={"input_size": 64}),
                   dict(dtype="float32"), dict(precision="int8")):
        assert make_meta(**change).fingerprint != base.fingerprint, change


def test_meta_round_trips_through_dict():
    meta = make_meta()
    again = CacheMeta.from_dict(json.loads(json.dumps(meta.to_dict())))
    assert again == meta and again.fingerprint == meta.fingerprint


def test_meta_rejects_unknown_dtype():
    with pytest.raises(CacheError, match="dtype"):
        make_meta(dtype="int8")


# -- write and read ----------------------------------------------------------------


@pytest.mark.parametrize("dtype", ["float16", "float32"])
def test_round_trip(tmp_path, dtype):
    path = tmp_path / "feats.h5"
    keys = [key(i) for i in range(10)]
    build(path, keys, dtype=dtype)
    data = read_cache(path)
    assert data.features.dtype == np.float32 and data.features.shape == (10, DIM)
    tolerance = 1e-2 if dtype == "float16" else 0
    np.testing.assert_allclose(data.features, features_for(keys), atol=tolerance, rtol=tolerance)
    assert data.keys.tolist() == keys
    assert data.labels.dtype == np.int64 and data.labels.tolist() == [i % 2 for i in range(10)]
    assert data.paths[1] == "c1/img 1.jpg"
    assert data.classes == ["c0", "c1"]
    assert data.errors == [("bad.jpg", "not an image"), ("locked.jpg", "cannot read")]
    assert data.complete and data.path == path
    assert data.meta == make_meta(dtype=dtype)
    import h5py

    with h5py.File(path, "r") as handle:
        assert handle["features"].dtype == np.dtype(dtype)
        assert handle["features"].chunks is not None and handle["features"].compression is None
        assert handle.attrs["schema_version"] == cache.SCHEMA_VERSION
        assert handle.attrs["complete"]
        assert json.loads(handle.attrs["preprocess"])["input_size"] == 32
    assert not journal_dir(path).exists()


def chunked_cache(tmp_path, monkeypatch, rows: int, dtype: str):
    """A cache of ``rows`` rows written and read in chunks of 3 rows: (path, keys)."""
    monkeypatch.setattr(cache, "CHUNK_BYTES", DIM * 4 * 3)
    path = tmp_path / "feats.h5"
    keys = [key(i) for i in range(rows)]
    build(path, keys, batch=len(keys), dtype=dtype)
    return path, keys


def test_read_cache_filters_splits_and_reads_in_chunks(tmp_path, monkeypatch):
    path, keys = chunked_cache(tmp_path, monkeypatch, 2500, "float32")
    everything = read_cache(path)
    np.testing.assert_array_equal(everything.features, features_for(keys))
    val = read_cache(path, splits="val")
    wanted = [i for i in range(2500) if i % 3 == 0]
    assert val.keys.tolist() == [keys[i] for i in wanted]
    np.testing.assert_array_equal(val.features, everything.features[wanted])
    assert set(val.splits.tolist()) == {"val"}
    both = read_cache(path, splits=("train", "val"))
    assert len(both) == 2500


def test_read_without_features_then_rows_on_demand(tmp_path, monkeypatch):
    path, _ = chunked_cache(tmp_path, monkeypatch, 50, "float16")
    everything = read_cache(path)
    light = read_cache(path, load_features=False)
    assert light.features is None and light.keys.tolist() == everything.keys.tolist()
    rows = np.array([0, 2, 3, 17, 48, 49])
    got = cache.read_feature_rows(path, rows)
    assert got.dtype == np.float32 and got.flags.c_contiguous
    np.testing.assert_array_equal(got, everything.features[rows])
    assert cache.read_feature_rows(path, np.array([], dtype=np.int64)).shape == (0, DIM)
    with pytest.raises(ValueError, match="ascending"):
        cache.read_feature_rows(path, np.array([3, 2]))
    with pytest.raises(CacheError, match="has 50 rows"):
        cache.read_feature_rows(path, np.array([49, 50]))


def test_empty_cache_is_valid(tmp_path):
    path = tmp_path / "feats.h5"
    with CacheWriter(path, make_meta()) as writer:
        finalize(writer, [], errors=[("a.jpg", "broken")])
    data = read_cache(path)
    assert data.features.shape == (0, DIM) and data.errors == [("a.jpg", "broken")]


def test_cache_info(tmp_path):
    path = tmp_path / "feats.h5"
    build(path, [key(i) for i in range(9)])
    info = cache_info(path)
    assert info["rows"] == 9 and info["dim"] == DIM and info["dtype"] == "float16"
    assert info["complete"] is True
    assert info["backbone"] == "tiny" and info["weights"] == "none"
    assert info["counts"] == {"train": {"c0": 3, "c1": 3}, "val": {"c0": 2, "c1": 1}}
    assert info["errors"] == 2 and info["error_list"][0] == {"path": "bad.jpg", "reason": "not an image"}
    assert info["file_size"] == path.stat().st_size
    json.dumps(info)  # all plain JSON


# -- refusing bad files --------------------------------------------------------------


def test_missing_alien_incomplete_and_old_files_are_refused(tmp_path):
    import h5py

    with pytest.raises(CacheError, match="does not exist"):
        read_cache(tmp_path / "nope.h5")
    (tmp_path / "text.h5").write_text("hello")
    with pytest.raises(CacheError, match="not a readable HDF5"):
        read_cache(tmp_path / "text.h5")
    with h5py.File(tmp_path / "alien.h5", "w") as handle:
        handle["x"] = np.zeros(3)
    with pytest.raises(CacheError, match="not an embedx feature cache"):
        read_cache(tmp_path / "alien.h5")
    path = tmp_path / "feats.h5"
    build(path, [key(1)])
    with h5py.File(path, "a") as handle:
        handle.attrs["complete"] = False
    with pytest.raises(CacheError, match="incomplete"):
        read_cache(path)
    with h5py.File(path, "a") as handle:
        handle.attrs["complete"] = True
        handle.attrs["schema_version"] = 0
    with pytest.raises(CacheError, match="old cache schema"):
        read_cache(path)
    with h5py.File(path, "a") as handle:
        handle.attrs["schema_version"] = cache.SCHEMA_VERSION + 1
    with pytest.raises(CacheError, match="upgrade embedx"):
        read_cache(path)


# -- identity, overwrite, lock -------------------------------------------------------


def test_other_settings_are_refused_with_what_differs(tmp_path):
    path = tmp_path / "feats.h5"
    build(path, [key(1)])
    with pytest.raises(CacheMismatchError) as info:
        CacheWriter(path, make_meta(dtype="float32", backbone="resnet18")).open()
    message = str(info.value)
    assert "dtype" in message and "backbone" in message and "--overwrite" in message and "-o" in message
    # a moved ONNX file is the same model
    with CacheWriter(path, make_meta(onnx_path="/moved/tiny.onnx")) as writer:
        assert writer.has(key(1))


def test_overwrite_starts_fresh(tmp_path):
    path = tmp_path / "feats.h5"
    build(path, [key(1), key(2)])
    with CacheWriter(path, make_meta(dtype="float32"), overwrite=True) as writer:
        assert not writer.done_keys
        writer.append([key(3)], features_for([key(3)]))
        finalize(writer, [key(3)])
    data = read_cache(path)
    assert data.keys.tolist() == [key(3)] and data.meta.dtype == "float32"


def test_second_writer_is_locked_out(tmp_path):
    path = tmp_path / "feats.h5"
    with CacheWriter(path, make_meta()):
        with pytest.raises(CacheLockedError, match="another process"):
            CacheWriter(path, make_meta()).open()
    # released on exit
    with CacheWriter(path, make_meta()) as writer:
        assert writer.done_keys == set()


def test_lock_held_by_another_process(tmp_path):
    path = tmp_path / "feats.h5"
    holder = subprocess.Popen(
        [sys.executable, "-c",
         "import sys, filelock; lock = filelock.FileLock(sys.argv[1]); lock.acquire(); "
         "print('held', flush=True); sys.stdin.read()", str(cache.lock_path(path))],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )  # holds the lock until killed (or its stdin closes), however long the test takes
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(CacheLockedError):
            CacheWriter(path, make_meta()).open()
    finally:
        holder.kill()
        holder.wait()
    CacheWriter(path, make_meta()).open().close()  # a dead holder's lock is gone


# -- journal -------------------------------------------------------------------------


def test_journal_survives_an_unfinished_writer(tmp_path):
    path = tmp_path / "feats.h5"
    keys = [key(i) for i in range(8)]
    writer = CacheWriter(path, make_meta()).open()
    writer.append(keys[:4], features_for(keys[:4]))
    writer.record_error("x/bad.jpg", "truncated", key=key(100))
    writer.append(keys[4:6], features_for(keys[4:6]))
    writer.close()  # as if killed: no finalize
    assert not path.exists()
    info = cache_info(path)
    assert info["complete"] is False and info["journal"]["rows"] == 6 and info["journal"]["errors"] == 1
    with pytest.raises(CacheError, match="rerun the same"):
        read_cache(path)

    with CacheWriter(path, make_meta()) as writer:
        assert writer.done_keys == set(keys[:6])
        assert writer.known_errors == {key(100): "truncated"}
        writer.append(keys[6:], features_for(keys[6:]))
        finalize(writer, keys)
    data = read_cache(path)
    np.testing.assert_allclose(data.features, features_for(keys), atol=1e-2)
    assert not journal_dir(path).exists()


def test_torn_and_corrupt_shards_are_ignored(tmp_path):
    path = tmp_path / "feats.h5"
    keys = [key(i) for i in range(6)]
    with CacheWriter(path, make_meta()) as writer:
        writer.append(keys[:3], features_for(keys[:3]))
        writer.append(keys[3:], features_for(keys[3:]))
    journal = journal_dir(path)
    shards = sorted(journal.glob("shard-*.npz"))
    shards[1].write_bytes(shards[1].read_bytes()[:100])  # a torn shard
    (journal / ".tmp-123-shard-00000009.npz").write_bytes(b"half a zip")
    with CacheWriter(path, make_meta()) as writer:
        assert writer.done_keys == set(keys[:3])
        assert not list(journal.glob(".tmp-*"))
        writer.append(keys[3:], features_for(keys[3:]))
        finalize(writer, keys)
    assert read_cache(path).keys.tolist() == keys


def test_journal_of_other_settings_is_refused_then_overwritten(tmp_path):
    path = tmp_path / "feats.h5"
    with CacheWriter(path, make_meta()) as writer:
        writer.append([key(1)], features_for([key(1)]))
    with pytest.raises(CacheMismatchError, match="unfinished extraction"):
        CacheWriter(path, make_meta(feature_layer="fc7")).open()
    with CacheWriter(path, make_meta(feature_layer="fc7"), overwrite=True) as writer:
        assert not writer.done_keys


def test_overwrite_run_resumes_its_own_journal(tmp_path):
    """A killed `--overwrite` run, rerun with --overwrite, continues instead of starting over."""
    path = tmp_path / "feats.h5"
    build(path, [key(1)])
    with CacheWriter(path, make_meta(dtype="float32"), overwrite=True) as writer:
        writer.append([key(2)], features_for([key(2)]))
    with CacheWriter(path, make_meta(dtype="float32"), overwrite=True) as writer:
        assert writer.done_keys == {key(2)}


def test_incremental_reuses_base_rows_by_key(tmp_path):
    path = tmp_path / "feats.h5"
    build(path, [key(i) for i in range(6)], dtype="float32")
    new_order = [key(5), key(7), key(0), key(3)]  # 7 is new; 1, 2, 4 removed; order changed
    with CacheWriter(path, make_meta(dtype="float32")) as writer:
        assert writer.done_keys == {key(i) for i in range(6)}
        writer.append([key(7)], features_for([key(7)]))
        finalize(writer, new_order)
    data = read_cache(path)
    assert data.keys.tolist() == new_order
    np.testing.assert_array_equal(data.features, features_for(new_order))


def test_finalize_refuses_rows_without_features(tmp_path):
    with CacheWriter(tmp_path / "feats.h5", make_meta()) as writer:
        with pytest.raises(CacheError, match="no features"):
            finalize(writer, [key(1)])


def test_append_checks_the_feature_shape(tmp_path):
    with CacheWriter(tmp_path / "feats.h5", make_meta()) as writer:
        with pytest.raises(CacheError, match="shape"):
            writer.append([key(1)], np.zeros((1, DIM + 1)))


def test_cache_module_is_torch_free():
    code = "import sys, embedx.cache; assert 'torch' not in sys.modules and 'onnxruntime' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_notes_base_extra_and_discard_previous(tmp_path):
    path = tmp_path / "feats.h5"
    with CacheWriter(path, make_meta()) as writer:
        writer.append([key(1)], features_for([key(1)]))
        writer.finalize(keys=[key(1)], paths=["a.jpg"], labels=[0], splits=["train"], classes=["c0"],
                        errors=[], attrs={"int8_calibration_keys": [key(1)]})
    with CacheWriter(path, make_meta()) as writer:
        assert writer.base_extra == {"int8_calibration_keys": [key(1)]}
        writer.note({"calibration": [1, 2]})
        writer.append([key(2)], features_for([key(2)]))
    with CacheWriter(path, make_meta()) as writer:
        assert writer.journal_notes == {"calibration": [1, 2]} and writer.done_keys == {key(1), key(2)}
        writer.discard_previous()
        assert writer.done_keys == set() and writer.journal_notes == {} and writer.base_extra == {}
        writer.append([key(3)], features_for([key(3)]))
        finalize(writer, [key(3)])
    assert read_cache(path).keys.tolist() == [key(3)]


def test_meta_from_export(tmp_path):
    from types import SimpleNamespace

    from embedx.preprocess import PreprocessSpec

    onnx_file = tmp_path / "m.onnx"
    onnx_file.write_bytes(b"not really onnx")
    exported = SimpleNamespace(path=onnx_file, backbone="tiny", weights_tag="none", weights_arg="none",
                               feature_layer="pool", feature_dim=DIM, preprocess=PreprocessSpec(), sha256="")
    meta = CacheMeta.from_export(exported, dtype="float32", precision="int8")
    import hashlib

    assert meta.onnx_sha256 == hashlib.sha256(b"not really onnx").hexdigest()
    assert meta.onnx_path == str(onnx_file.resolve()) and meta.preprocess["input_size"] == 224
    assert (meta.dtype, meta.precision, meta.feature_dim) == ("float32", "int8", DIM)


def test_an_empty_journal_of_other_settings_is_dropped(tmp_path):
    path = tmp_path / "feats.h5"
    CacheWriter(path, make_meta()).open().close()  # started, failed before the first batch
    with CacheWriter(path, make_meta(dtype="float32")) as writer:
        assert writer.done_keys == set()


def test_incremental_reuse_of_sparse_and_dense_base_rows(tmp_path):
    path = tmp_path / "feats.h5"
    keys = [key(i) for i in range(300)]
    build(path, keys, batch=len(keys), dtype="float32")
    sparse = [keys[299], keys[0], keys[150]]  # few rows far apart: a point selection
    dense = keys[100:200][::-1]  # a run of rows: read as one slice
    for wanted in (sparse, dense):
        with CacheWriter(path, make_meta(dtype="float32")) as writer:
            finalize(writer, wanted)
        np.testing.assert_array_equal(read_cache(path).features, features_for(wanted))
        build(path, keys, batch=len(keys), overwrite=True, dtype="float32")


# -- checksums, non-finite features, write failures -------------------------------


def flip_feature_bytes(path, rows) -> None:
    """Overwrite the stored bytes of ``rows`` in the file itself, as a bad disk would
    (behind h5py's back: the checksums are not updated)."""
    import h5py

    with h5py.File(path, "r") as handle:
        dataset = handle["features"]
        chunk_rows, dim = dataset.chunks
        row_bytes = dim * dataset.dtype.itemsize
        offsets = [dataset.id.get_chunk_info_by_coord((row // chunk_rows * chunk_rows, 0)).byte_offset
                   + (row % chunk_rows) * row_bytes for row in rows]
    with open(path, "r+b") as raw:
        for offset in offsets:
            raw.seek(offset)
            old = raw.read(row_bytes)
            raw.seek(offset)
            raw.write(bytes(b ^ 0x5A for b in old))


@pytest.mark.parametrize("dtype", ["float16", "float32"])
def test_flipped_feature_bytes_fail_their_checksums_naming_the_rows(tmp_path, dtype):
    path = tmp_path / "feats.h5"
    keys = [key(i) for i in range(12)]
    build(path, keys, dtype=dtype)
    assert read_cache(path).features.shape == (12, DIM)
    flip_feature_bytes(path, [2, 3, 9])
    with pytest.raises(cache.CacheChecksumError, match=r"3 rows \(2-3, 9\).*embedx extract") as caught:
        read_cache(path)
    assert caught.value.rows == [2, 3, 9]
    with pytest.raises(cache.CacheChecksumError, match=r"1 rows \(9\)"):
        cache.read_feature_rows(path, np.array([0, 9]))
    # what is not read is not checked: other rows and the rest of the file still read
    np.testing.assert_allclose(cache.read_feature_rows(path, np.array([0, 4, 11])),
                               features_for([keys[0], keys[4], keys[11]]), rtol=1e-3, atol=1e-3)
    assert read_cache(path, load_features=False).keys.tolist() == keys


def test_a_cache_without_checksums_still_reads(tmp_path):
    import h5py

    path = tmp_path / "feats.h5"
    keys = [key(i) for i in range(5)]
    build(path, keys)
    assert cache_info(path)["checksums"]
    with h5py.File(path, "r+") as handle:  # as written before checksums existed
        del handle[cache.CHECKSUMS]
    assert not cache_info(path)["checksums"]
    np.testing.assert_allclose(read_cache(path).features, features_for(keys), rtol=1e-3, atol=1e-3)


def test_a_rerun_computes_damaged_and_nonfinite_rows_again(tmp_path):
    import h5py

    path = tmp_path / "feats.h5"
    keys = [key(i) for i in range(10)]
    build(path, keys)
    flip_feature_bytes(path, [1, 7])
    with h5py.File(path, "r+") as handle:  # NaN written through h5py: its checksum is not updated...
        handle["features"][4] = np.nan
        handle[cache.CHECKSUMS][4] = cache.row_checksums(handle["features"][4:5])[0]  # ...now it is
    with CacheWriter(path, make_meta()) as writer:
        assert writer.damaged_rows == [1, 4, 7]
        assert writer.done_keys == set(keys) - {keys[1], keys[4], keys[7]}
        again = [keys[1], keys[4], keys[7]]
        writer.append(again, features_for(again))
        finalize(writer, keys)
    repaired = tmp_path / "fresh.h5"
    build(repaired, keys)
    np.testing.assert_array_equal(read_cache(path).features, read_cache(repaired).features)


def test_journal_shards_carry_checksums(tmp_path):
    path = tmp_path / "feats.h5"
    keys = [key(i) for i in range(6)]
    with CacheWriter(path, make_meta()) as writer:
        writer.append(keys[:3], features_for(keys[:3]))
        writer.append(keys[3:], features_for(keys[3:]))
    shard = sorted(journal_dir(path).glob("shard-*.npz"))[1]
    with np.load(shard) as npz:
        arrays = {name: npz[name] for name in npz.files}
    assert arrays[cache.CHECKSUMS].tolist() == cache.row_checksums(arrays["features"]).tolist()
    arrays["features"][1, 2] += 1.0  # a shard whose features changed after they were summed
    with open(shard, "wb") as handle:
        np.savez(handle, **arrays)
    with CacheWriter(path, make_meta()) as writer:
        assert writer.done_keys == set(keys[:3])


def test_nonfinite_features_are_never_stored(tmp_path):
    path = tmp_path / "feats.h5"
    keys = [key(i) for i in range(3)]
    huge = features_for(keys)
    huge[1, 0] = 1e6  # finite in float32, inf in float16
    with CacheWriter(path, make_meta(dtype="float16")) as writer:
        with pytest.raises(cache.NonFiniteFeaturesError, match=r"1 images \(b/1.jpg\).*--dtype float32"):
            writer.append(keys, huge, paths=["a/0.jpg", "b/1.jpg", "a/2.jpg"])
        nan = features_for(keys)
        nan[2, 3] = np.nan
        with pytest.raises(cache.NonFiniteFeaturesError, match=r"NaN or inf features for 1 images \(a/2.jpg\)"):
            writer.append(keys, nan, paths=["a/0.jpg", "b/1.jpg", "a/2.jpg"])
        assert not writer.done_keys and not list(journal_dir(path).glob("shard-*"))
    with CacheWriter(path, make_meta(dtype="float32"), overwrite=True) as writer:
        writer.append(keys, huge)  # float32 holds it
        assert writer.done_keys == set(keys)


def test_a_full_disk_while_journaling_is_one_error_and_the_journal_survives(tmp_path, monkeypatch):
    import errno

    path = tmp_path / "feats.h5"
    keys = [key(i) for i in range(6)]
    real = cache.atomic_write
    with CacheWriter(path, make_meta()) as writer:
        writer.append(keys[:3], features_for(keys[:3]))

        def full(target, *args, **kwargs):
            raise OSError(errno.ENOSPC, "No space left on device", str(target) + ".tmp")

        monkeypatch.setattr(cache, "atomic_write", full)
        with pytest.raises(cache.CacheWriteError, match=r"cannot write .*shard-00000001.npz: ENOSPC \(28\).*rerun"):
            writer.append(keys[3:], features_for(keys[3:]))
    monkeypatch.setattr(cache, "atomic_write", real)
    with CacheWriter(path, make_meta()) as writer:  # the resume works
        assert writer.done_keys == set(keys[:3])
        writer.append(keys[3:], features_for(keys[3:]))
        finalize(writer, keys)
    assert read_cache(path).keys.tolist() == keys


def test_a_full_disk_while_writing_the_cache_is_one_error_and_the_journal_survives(tmp_path, monkeypatch):
    import errno

    import h5py

    path = tmp_path / "feats.h5"
    keys = [key(i) for i in range(6)]
    build(path, keys[:2])  # a base cache is open too while the new one is written
    with CacheWriter(path, make_meta()) as writer:
        writer.append(keys[2:], features_for(keys[2:]))
        real = h5py.Dataset.__setitem__

        def full(self, selection, value):
            if self.name == "/features":
                raise OSError(errno.ENOSPC, "No space left on device")
            return real(self, selection, value)

        monkeypatch.setattr(h5py.Dataset, "__setitem__", full)
        with pytest.raises(cache.CacheWriteError, match=r"cannot write .*feats.h5: ENOSPC \(28\)"):
            finalize(writer, keys)
        monkeypatch.setattr(h5py.Dataset, "__setitem__", real)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["feats.h5", "feats.h5.lock", "feats.h5.partial"]
    assert read_cache(path).keys.tolist() == keys[:2]  # the old cache is untouched
    with CacheWriter(path, make_meta()) as writer:
        assert writer.done_keys == set(keys)
        finalize(writer, keys)
    assert read_cache(path).keys.tolist() == keys


FILL_AND_FINALIZE = """
import resource, signal, sys
import numpy as np
from embedx.cache import CacheMeta, CacheWriter
meta = CacheMeta(backbone="t", weights_tag="n", weights_arg="n", onnx_path="/x.onnx", onnx_sha256="ab" * 32,
                 feature_layer="p", feature_dim=512, preprocess={}, dtype="float32")
keys = [f"{i:064x}" for i in range(4000)]
with CacheWriter(sys.argv[1], meta) as writer:
    if not writer.done_keys:
        for start in range(0, 4000, 500):
            writer.append(keys[start : start + 500], np.ones((500, 512), np.float32))
    limit = int(sys.argv[2])
    if limit:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))  # no file may grow past it: a full disk
    writer.finalize(keys=keys, paths=["a.jpg"] * 4000, labels=[0] * 4000, splits=["train"] * 4000,
                    classes=["a"], errors=[])
"""


@pytest.mark.parametrize("limit", [3_000_000, 8_440_000])  # in the features; in HDF5's closing of small objects
def test_a_real_write_failure_in_hdf5_is_an_error_not_a_segfault(tmp_path, limit):
    path = tmp_path / "feats.h5"
    failed = subprocess.run([sys.executable, "-c", FILL_AND_FINALIZE, str(path), str(limit)],
                            capture_output=True, text=True, timeout=120)
    assert failed.returncode == 1, failed.stderr[-2000:]
    assert failed.stderr.strip().splitlines()[-1].startswith(
        f"embedx.cache.CacheWriteError: cannot write {path}: EFBIG (27)")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["feats.h5.lock", "feats.h5.partial"]
    done = subprocess.run([sys.executable, "-c", FILL_AND_FINALIZE, str(path), "0"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert len(read_cache(path)) == 4000


def write_sized(path, *, rows: int, dim: int, name_length: int, dtype: str, views: int = 0, errors: int = 0,
                classes: int = 1) -> None:
    """A cache of ``rows`` rows whose paths are ``name_length`` long, with ``views`` views per row."""
    keys = [key(i) for i in range(rows)]
    view_keys = [key(10**9 + i) for i in range(rows * views)]
    names = [f"c/{i:07d}".ljust(name_length, "x") for i in range(rows)]
    with CacheWriter(path, make_meta(feature_dim=dim, dtype=dtype)) as writer:
        writer.append(keys + view_keys, np.ones((rows + len(view_keys), dim), np.float32))
        writer.finalize(keys=keys, paths=names, labels=[i % classes for i in range(rows)], splits=["train"] * rows,
                        classes=[f"class {i}" for i in range(classes)], stats=[(1, 2)] * rows,
                        errors=[(name, "cannot decode " * 3, "") for name in names[:errors]],
                        views={"keys": view_keys, "source": [i % rows for i in range(len(view_keys))],
                               "names": [f"augment/{i}" for i in range(len(view_keys))], "plan": {"views": views}}
                        if views else None)


@pytest.mark.parametrize(("rows", "dim", "name_length", "dtype", "views", "errors", "classes"), [
    (0, 8, 10, "float32", 0, 0, 1), (1, 8, 10, "float32", 0, 0, 1), (40, 8, 10, "float32", 0, 3, 2),
    (10, 8, 10, "float32", 3, 5, 2), (200, 512, 20, "float16", 0, 0, 2), (200, 64, 40, "float32", 2, 50, 100),
    (1000, 1, 1, "float16", 0, 0, 1000), (20000, 2, 300, "float16", 0, 500, 1), (20000, 1, 1, "float16", 0, 500, 1),
    (3000, 700, 40, "float32", 0, 500, 1), (4000, 512, 30, "float16", 1, 100, 10),
])
def test_the_disk_reserved_for_a_cache_is_at_least_its_size(tmp_path, monkeypatch, rows, dim, name_length, dtype,
                                                            views, errors, classes):
    reserved = []
    real = cache._reserve
    monkeypatch.setattr(cache, "_reserve", lambda path, size: (reserved.append(size), real(path, size)))
    path = tmp_path / "feats.h5"
    write_sized(path, rows=rows, dim=dim, name_length=name_length, dtype=dtype, views=views, errors=errors,
                classes=classes)
    # with room to spare: HDF5's own structures took at most 17 KB beyond the data (at no rows)
    assert path.stat().st_size + (32 << 10) <= reserved[0]


def test_a_small_cache_fits_a_disk_with_a_little_more_room_than_it(tmp_path, monkeypatch):
    """The reservation was the cache + 10% + 4 MiB: an 18 KB cache could not be written to a disk
    with 3 MiB free.  A disk of 3 MiB (posix_fallocate past it says ENOSPC) takes it, and still
    refuses, at the reservation, a cache larger than it."""
    import errno
    import os

    real = os.posix_fallocate

    def three_mib_free(fd, offset, length):
        if offset + length > 3 << 20:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(fd, offset, length)

    monkeypatch.setattr(os, "posix_fallocate", three_mib_free)
    write_sized(tmp_path / "small.h5", rows=40, dim=64, name_length=20, dtype="float16", errors=2)
    assert len(read_cache(tmp_path / "small.h5")) == 40
    with pytest.raises(cache.CacheWriteError, match=r"cannot write .*large.h5: ENOSPC \(28\)"):
        write_sized(tmp_path / "large.h5", rows=3000, dim=512, name_length=20, dtype="float16")
    assert not (tmp_path / "large.h5").exists()


@pytest.mark.parametrize(("rows", "extra_bytes"), [(1, 70_000), (2000, 350_000)])
def test_the_reservation_counts_a_large_extra_attribute(tmp_path, monkeypatch, rows, extra_bytes):
    # a merge of many shards records each of them in `extra` (about 100 bytes a shard)
    reserved = []
    real = cache._reserve
    monkeypatch.setattr(cache, "_reserve", lambda path, size: (reserved.append(size), real(path, size)))
    path = tmp_path / "merged.h5"
    keys = [key(i) for i in range(rows)]
    merged_from = [{"path": f"/shared/feats/part-{i:05d}.h5", "rows": 1} for i in range(extra_bytes // 50)]
    with CacheWriter(path, make_meta(feature_dim=8, dtype="float16")) as writer:
        writer.append(keys, np.ones((rows, 8), np.float32))
        writer.finalize(keys=keys, paths=[f"c/{i}.jpg" for i in range(rows)], labels=[0] * rows,
                        splits=["train"] * rows, classes=["c"], errors=[], attrs={"merged_from": merged_from})
    assert path.stat().st_size <= reserved[0]
