"""The extraction engine end to end on tiny generated images and a tiny ONNX backbone."""

from __future__ import annotations

import functools
import io
import json
import multiprocessing
import os
import shutil
import warnings
from concurrent import futures
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from embedx import onnxmeta
from embedx.cache import CacheWriter, journal_dir, read_cache
from embedx.errors import CacheError, CacheLockedError, CacheMismatchError, ConfigError, DataError
from embedx.extract import _decode_batch
from embedx.preprocess import PreprocessSpec
from tests.corpus import good_image, make_corpus

TINY_SPEC = PreprocessSpec(input_size=32, resize_size=36)
TINY_DIM = 8


def _build_tiny_onnx(path: Path) -> Path:
    """A 3-layer conv net with embedx's I/O names and preprocessing in its metadata."""
    import onnx
    import torch

    torch.manual_seed(0)
    net = torch.nn.Sequential(
        torch.nn.Conv2d(3, TINY_DIM, 3, stride=2), torch.nn.ReLU(),
        torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(),
    ).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # the TorchScript exporter is enough here
        torch.onnx.export(net, torch.zeros(1, 3, 32, 32), str(path), input_names=["input"],
                          output_names=["features"], dynamic_axes={"input": {0: "N"}, "features": {0: "N"}},
                          dynamo=False)
    model = onnx.load(str(path))
    onnxmeta.write(model, {"kind": "backbone", "backbone": "tiny", "weights": "none",
                           "feature_layer": "pool", "feature_dim": str(TINY_DIM),
                           "preprocess": TINY_SPEC.to_dict()})
    onnx.save(model, str(path))
    return path


@pytest.fixture(scope="session")
def tiny_onnx(tmp_path_factory) -> Path:
    return _build_tiny_onnx(tmp_path_factory.mktemp("tiny") / "tiny.onnx")


@pytest.fixture
def backbone(tiny_onnx) -> str:
    """The tiny ONNX file as a backbone (export.prepare_onnx takes its preprocessing from the metadata)."""
    return str(tiny_onnx)


def write_image(path: Path, class_name: str, index: int, fmt: str = "JPEG") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    buffer = io.BytesIO()
    good_image(class_name, index, size=(44 + index % 5, 36)).save(buffer, fmt)
    path.write_bytes(buffer.getvalue())


def class_folders(root: Path, per_class: int = 5) -> Path:
    for name in ("alpha", "beta"):
        for i in range(per_class):
            write_image(root / name / f"{name}_{i}.jpg", name, i)
    return root


def run(data, backbone, output, **options):
    from embedx.extract import extract

    options.setdefault("workers", 0)
    options.setdefault("batch_size", 4)
    return extract(data, backbone=backbone, output=output, device="cpu", **options)


# -- layouts -------------------------------------------------------------------------


def test_class_folders(tmp_path, backbone):
    data = class_folders(tmp_path / "data")
    calls = []
    summary = run(data, backbone, tmp_path / "f.h5", progress=lambda d, t, i: calls.append((d, t)))
    assert (summary.images, summary.new, summary.reused, summary.errors) == (10, 10, 0, 0)
    assert calls[0] == (0, 10) and calls[-1] == (10, 10)
    assert summary.providers == ["CPUExecutionProvider"]
    cache = read_cache(tmp_path / "f.h5")
    assert cache.features.shape == (10, TINY_DIM) and cache.classes == ["alpha", "beta"]
    assert cache.paths.tolist()[:2] == ["alpha/alpha_0.jpg", "alpha/alpha_1.jpg"]
    assert cache.labels.tolist() == [0] * 5 + [1] * 5
    assert set(cache.splits.tolist()) == {"train"}
    assert cache.meta.feature_dim == TINY_DIM and cache.meta.dtype == "float16"
    assert cache.meta.preprocess["input_size"] == 32
    assert not journal_dir(tmp_path / "f.h5").exists()
    # the features are the ONNX model's output on the shared preprocessing
    from embedx.preprocess import load
    from embedx.runtime import OrtModel

    expected = OrtModel(backbone, device="cpu").run(load(data / "beta" / "beta_3.jpg", TINY_SPEC)[None])
    np.testing.assert_allclose(cache.features[8], expected[0], rtol=2e-3, atol=2e-3)


def test_split_folders_record_splits(tmp_path, backbone):
    data = tmp_path / "data"
    for split, count in (("train", 3), ("val", 2), ("test", 1)):
        for name in ("alpha", "beta"):
            for i in range(count):
                write_image(data / split / name / f"{i}.png", name, i + 10 * len(split), "PNG")
    run(data, backbone, tmp_path / "f.h5")
    cache = read_cache(tmp_path / "f.h5")
    assert sorted(cache.splits.tolist()) == ["test"] * 2 + ["train"] * 6 + ["val"] * 4
    val = read_cache(tmp_path / "f.h5", splits="val")
    assert all(p.startswith("val/") for p in val.paths)


def test_manifest(tmp_path, backbone):
    data = class_folders(tmp_path / "data", per_class=2)
    manifest = tmp_path / "list.csv"
    manifest.write_text("path,label,split\nalpha/alpha_0.jpg,cat,train\nbeta/beta_1.jpg,dog,val\n"
                        "beta/missing.jpg,dog,train\n")
    summary = run(data, backbone, tmp_path / "f.h5", manifest=manifest)
    cache = read_cache(tmp_path / "f.h5")
    assert cache.classes == ["cat", "dog"] and summary.images == 2
    assert dict(zip(cache.paths.tolist(), cache.splits.tolist(), strict=True)) == {
        "alpha/alpha_0.jpg": "train", "beta/beta_1.jpg": "val"}
    assert [p for p, _ in cache.errors] == ["beta/missing.jpg"]


def test_val_fraction_splits_by_content(tmp_path, backbone):
    from embedx.data import split_for_key

    data = class_folders(tmp_path / "data", per_class=10)
    run(data, backbone, tmp_path / "f.h5", val_fraction=0.3)
    cache = read_cache(tmp_path / "f.h5")
    assert cache.splits.tolist() == [split_for_key(k, 0.3) for k in cache.keys]
    assert {"train", "val"} == set(cache.splits.tolist())
    # changing the fraction reuses every feature
    summary = run(data, backbone, tmp_path / "f.h5", val_fraction=0.5)
    assert summary.new == 0 and read_cache(tmp_path / "f.h5").splits.tolist() == [
        split_for_key(k, 0.5) for k in cache.keys]


def test_val_fraction_refused_with_split_folders(tmp_path, backbone):
    write_image(tmp_path / "data" / "train" / "a" / "x.jpg", "alpha", 0)
    write_image(tmp_path / "data" / "val" / "a" / "y.jpg", "alpha", 1)
    with pytest.raises(ConfigError, match="val-fraction"):
        run(tmp_path / "data", backbone, tmp_path / "f.h5", val_fraction=0.2)


def test_invalid_data_is_one_clear_error(tmp_path, backbone):
    with pytest.raises(DataError, match="does not exist"):
        run(tmp_path / "nowhere", backbone, tmp_path / "f.h5")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="empty"):
        run(tmp_path / "empty", backbone, tmp_path / "f.h5")


# -- bad input -----------------------------------------------------------------------


@pytest.mark.parametrize("workers", [0, 2])
def test_bad_input_corpus(tmp_path, backbone, workers):
    corpus = make_corpus(tmp_path / "data")
    summary = run(tmp_path / "data", backbone, tmp_path / "f.h5", workers=workers)
    cache = read_cache(tmp_path / "f.h5")
    assert sorted(cache.paths.tolist()) == sorted(corpus["decode"])
    errors = dict(cache.errors)
    for relpath in list(corpus["errors"]) + list(corpus["skipped"]):
        assert relpath in errors, relpath
        assert errors[relpath], f"{relpath} has no reason"
    assert len(cache.errors) == len(corpus["errors"]) + len(corpus["skipped"]) == summary.errors
    assert summary.workers == workers
    assert "gamma" in cache.classes  # the empty class keeps its label
    for relpath, class_name in corpus["decode"].items():
        index = cache.paths.tolist().index(relpath)
        assert cache.classes[cache.labels[index]] == class_name
    assert np.isfinite(cache.features).all()


def test_worker_processes_give_the_same_features(tmp_path, backbone):
    data = class_folders(tmp_path / "data", per_class=9)
    inline = run(data, backbone, tmp_path / "a.h5", workers=0, dtype="float32")
    pooled = run(data, backbone, tmp_path / "b.h5", workers=2, dtype="float32")
    assert pooled.workers == 2 and inline.workers == 0
    a, b = read_cache(tmp_path / "a.h5"), read_cache(tmp_path / "b.h5")
    assert a.keys.tolist() == b.keys.tolist()
    np.testing.assert_array_equal(a.features, b.features)


# -- identity, overwrite, lock ---------------------------------------------------------


def test_other_settings_refused_then_overwritten(tmp_path, backbone):
    data = class_folders(tmp_path / "data", per_class=2)
    run(data, backbone, tmp_path / "f.h5")
    with pytest.raises(CacheMismatchError, match="dtype.*--overwrite"):
        run(data, backbone, tmp_path / "f.h5", dtype="float32")
    summary = run(data, backbone, tmp_path / "f.h5", dtype="float32", overwrite=True)
    assert summary.new == 4
    assert read_cache(tmp_path / "f.h5").meta.dtype == "float32"


def test_locked_cache_is_refused(tmp_path, backbone):
    from embedx.cache import CacheMeta

    data = class_folders(tmp_path / "data", per_class=1)
    meta = CacheMeta(backbone="x", weights_tag="x", weights_arg="x", onnx_path="x", onnx_sha256="x",
                     feature_layer="x", feature_dim=1, preprocess={})
    with CacheWriter(tmp_path / "f.h5", meta):
        with pytest.raises(CacheLockedError):
            run(data, backbone, tmp_path / "f.h5")
    assert not (tmp_path / "f.h5").exists()


# -- incremental -----------------------------------------------------------------------


def test_incremental_add_remove_rename(tmp_path, backbone):
    data = class_folders(tmp_path / "data", per_class=5)
    first = run(data, backbone, tmp_path / "f.h5", dtype="float32")
    assert first.new == 10
    before = read_cache(tmp_path / "f.h5")
    feature_of = dict(zip(before.keys.tolist(), before.features, strict=True))

    write_image(data / "alpha" / "new_1.jpg", "alpha", 101)
    write_image(data / "beta" / "new_2.jpg", "beta", 102)
    (data / "alpha" / "alpha_0.jpg").unlink()
    (data / "beta" / "beta_4.jpg").rename(data / "beta" / "renamed.jpg")
    shutil.move(data / "alpha" / "alpha_1.jpg", data / "beta" / "moved_from_alpha.jpg")

    second = run(data, backbone, tmp_path / "f.h5", dtype="float32")
    assert (second.new, second.reused, second.images) == (2, 9, 11)
    after = read_cache(tmp_path / "f.h5")
    assert "alpha/alpha_0.jpg" not in after.paths and "beta/renamed.jpg" in after.paths
    moved = after.paths.tolist().index("beta/moved_from_alpha.jpg")
    assert after.classes[after.labels[moved]] == "beta"  # label follows the folder
    for key, features in zip(after.keys.tolist(), after.features, strict=True):
        if key in feature_of:
            np.testing.assert_array_equal(features, feature_of[key])
    # a third run has nothing to do
    third = run(data, backbone, tmp_path / "f.h5", dtype="float32")
    assert (third.new, third.images) == (0, 11)


def test_failed_images_are_not_retried_while_unchanged(tmp_path, backbone):
    data = class_folders(tmp_path / "data", per_class=2)
    (data / "alpha" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really")
    first = run(data, backbone, tmp_path / "f.h5")
    assert first.errors == 1 and first.new == 4
    second = run(data, backbone, tmp_path / "f.h5")
    assert second.new == 0 and second.errors == 1
    assert dict(read_cache(tmp_path / "f.h5").errors)["alpha/broken.jpg"]


def test_float16_and_float32_agree(tmp_path, backbone):
    data = class_folders(tmp_path / "data", per_class=3)
    run(data, backbone, tmp_path / "16.h5", dtype="float16")
    run(data, backbone, tmp_path / "32.h5", dtype="float32")
    half, full = read_cache(tmp_path / "16.h5"), read_cache(tmp_path / "32.h5")
    assert half.meta.fingerprint != full.meta.fingerprint
    np.testing.assert_allclose(half.features, full.features, rtol=1e-3, atol=1e-3)
    assert (tmp_path / "16.h5").stat().st_size < (tmp_path / "32.h5").stat().st_size or TINY_DIM < 64


def test_int8_records_the_cosine(tmp_path, backbone):
    data = class_folders(tmp_path / "data", per_class=6)
    summary = run(data, backbone, tmp_path / "f.h5", precision="int8", dtype="float32")
    assert summary.int8_cosine is not None and summary.int8_cosine >= 0.99
    cache = read_cache(tmp_path / "f.h5")
    assert cache.meta.precision == "int8"
    assert json.loads(cache.attrs["extra"])["int8_cosine"] == pytest.approx(summary.int8_cosine)
    shown = cli_run("info", tmp_path / "f.h5")
    assert shown.exit_code == 0 and "int8: mean cosine" in shown.stdout
    run(data, backbone, tmp_path / "fp32.h5", dtype="float32")
    fp32 = read_cache(tmp_path / "fp32.h5").features
    cosine = (cache.features * fp32).sum(1) / np.linalg.norm(cache.features, axis=1) / np.linalg.norm(fp32, axis=1)
    assert cosine.mean() > 0.98


def test_default_output_in_cache_dir(tmp_path, backbone, monkeypatch):
    monkeypatch.setenv("EMBEDX_CACHE_DIR", str(tmp_path / "cachedir"))
    data = class_folders(tmp_path / "mydata", per_class=1)
    summary = run(data, backbone, None)
    assert Path(summary.output) == tmp_path / "cachedir" / "mydata-tiny.h5"
    assert read_cache(summary.output).features.shape == (2, TINY_DIM)


def test_options_are_checked(tmp_path, backbone):
    data = class_folders(tmp_path / "data", per_class=1)
    for bad in (dict(batch_size=0), dict(dtype="int8"), dict(precision="fp8"), dict(workers=-1)):
        with pytest.raises(ConfigError):
            run(data, backbone, tmp_path / "f.h5", **bad)


def test_extract_module_is_torch_free():
    import subprocess
    import sys

    code = ("import sys, embedx.extract, embedx.cli.extract_cmd; "
            "assert 'torch' not in sys.modules and 'h5py' not in sys.modules, sorted(sys.modules)")
    subprocess.run([sys.executable, "-c", code], check=True)


# -- CLI -------------------------------------------------------------------------------


def cli_run(*args):
    from embedx.cli.main import cli

    return CliRunner().invoke(cli, [str(a) for a in args])


def test_cli_extract_and_info(tmp_path, backbone):
    data = class_folders(tmp_path / "data", per_class=2)
    out = tmp_path / "f.h5"
    result = cli_run("extract", "--backbone", backbone, data, "-o", out, "--workers", 0, "--device", "cpu",
                     "--json", "-q")
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["images"] == 4 and summary["output"] == str(out)

    result = cli_run("extract", "--backbone", backbone, data, "-o", out, "--workers", 0, "-q")
    assert result.exit_code == 0, result.output
    assert result.stdout.strip() == str(out)
    assert "4 images (0 new, 4 reused)" in result.stderr

    result = cli_run("info", out, "--json")
    assert result.exit_code == 0, result.output
    info = json.loads(result.stdout)
    assert info["rows"] == 4 and info["counts"] == {"train": {"alpha": 2, "beta": 2}}
    result = cli_run("info", out)
    assert result.exit_code == 0 and "4 rows x 8 (float16), complete" in result.stdout
    assert "train: alpha 2, beta 2" in result.stdout


def test_cli_exit_codes(tmp_path, backbone):
    data = class_folders(tmp_path / "data", per_class=1)
    out = tmp_path / "f.h5"
    assert cli_run("extract", "--backbone", backbone, data, "-o", out, "--workers", 0, "-q").exit_code == 0
    mismatch = cli_run("extract", "--backbone", backbone, data, "-o", out, "--dtype", "float32", "-q")
    assert mismatch.exit_code == 1 and "--overwrite" in mismatch.stderr
    assert mismatch.stderr.startswith("error: ") and "Traceback" not in mismatch.output
    assert cli_run("extract", "--backbone", backbone, data, "--precision", "fp8").exit_code == 2
    assert cli_run("extract", data).exit_code == 2  # --backbone is required
    missing = cli_run("extract", "--backbone", backbone, tmp_path / "nowhere", "-o", out, "-q")
    assert missing.exit_code == 1 and "does not exist" in missing.stderr
    bad_info = cli_run("info", tmp_path / "nothing.h5")
    assert bad_info.exit_code == 1 and "embedx extract" in bad_info.stderr


# -- real data -------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.timeout(300)  # the first user of hymenoptera_lite0 extracts it
def test_hymenoptera_with_efficientnet_lite0(hymenoptera, hymenoptera_lite0):
    """398 files: 397 JPEGs and imageNotFound.gif, whose first frame decodes like any image."""
    from embedx.data import discover

    dataset = discover(hymenoptera)
    path, summary = hymenoptera_lite0
    cache = read_cache(path)
    assert cache.classes == ["ants", "bees"]
    assert cache.features.shape == (len(dataset.items), 1280) == (398, 1280)
    assert (summary.images, summary.new, summary.errors) == (398, 398, 0)
    assert cache.errors == [] and dataset.skipped == ()
    assert {split: int((cache.splits == split).sum()) for split in ("train", "val")} == {"train": 245, "val": 153}
    assert "train/ants/imageNotFound.gif" in cache.paths
    assert len(set(cache.paths.tolist())) == len(cache.paths)
    assert np.isfinite(cache.features).all() and (np.abs(cache.features).sum(1) > 0).all()
    # a rerun computes nothing
    again = run(hymenoptera, "efficientnet_lite0", path)
    assert (again.new, again.images) == (0, 398)


def _decode_or_die(crash_on: frozenset[str], spec_json: str, paths: list[str]) -> dict:
    """``extract._decode_batch``, except that a decoder *process* dies on a file named in
    ``crash_on``, as on a native crash in an image library.  Spawned workers unpickle this
    function by name (importing this module), so they run it too; the main process, which
    decodes the first batch itself, never dies."""
    if multiprocessing.parent_process() is not None and crash_on & {os.path.basename(p) for p in paths}:
        os._exit(70)
    return _decode_batch(spec_json, paths)


def die_decoding(monkeypatch, *names: str) -> None:
    """Make every decoder process that gets one of the files ``names`` die."""
    from embedx import extract as extract_module

    monkeypatch.setattr(extract_module, "_decode_batch", functools.partial(_decode_or_die, frozenset(names)))


def test_a_decoder_process_that_dies_costs_only_its_file(tmp_path, backbone, monkeypatch):
    data = class_folders(tmp_path / "data", per_class=8)
    # two files in two batches that two workers decode at the same time
    die_decoding(monkeypatch, "beta_2.jpg", "alpha_5.jpg")
    summary = run(data, backbone, tmp_path / "f.h5", workers=2)
    cache = read_cache(tmp_path / "f.h5")
    assert summary.images == 14 and "beta/beta_2.jpg" not in cache.paths
    assert dict(cache.errors) == {"beta/beta_2.jpg": "the decoder process crashed on this file",
                                  "alpha/alpha_5.jpg": "the decoder process crashed on this file"}


def test_a_decoder_that_dies_while_the_main_process_is_busy_costs_only_its_file(tmp_path, backbone, monkeypatch):
    """The pool breaks on a batch decoded ahead while the main process is still busy with an
    earlier one: the next submit finds the pool broken, which must cost only the crashing file."""
    from embedx import extract as extract_module
    from embedx import runtime

    data = class_folders(tmp_path / "data", per_class=8)
    die_decoding(monkeypatch, "alpha_5.jpg")
    run_model, submit = runtime.OrtModel.run, extract_module._Decoder._submit
    submitted = []

    def recorded_submit(self, paths):
        submitted.append(submit(self, paths))
        return submitted[-1]

    def slow_run(self, batch):
        # the worker decodes every batch submitted so far, dying on alpha_5's, meanwhile
        assert not futures.wait(submitted, timeout=60).not_done, "the decoder never finished"
        return run_model(self, batch)

    monkeypatch.setattr(extract_module._Decoder, "_submit", recorded_submit)
    monkeypatch.setattr(runtime.OrtModel, "run", slow_run)
    summary = run(data, backbone, tmp_path / "f.h5", workers=1, batch_size=2)
    cache = read_cache(tmp_path / "f.h5")
    assert summary.images == 15 and len(cache.paths) == 15
    assert dict(cache.errors) == {"alpha/alpha_5.jpg": "the decoder process crashed on this file"}


def test_int8_increments_keep_the_calibration(tmp_path, backbone, monkeypatch):
    from embedx import extract as extract_module

    monkeypatch.setattr(extract_module, "CALIBRATION_IMAGES", 3)
    data = class_folders(tmp_path / "data", per_class=4)
    out = tmp_path / "f.h5"
    first = run(data, backbone, out, precision="int8", dtype="float32")
    calibrated = json.loads(read_cache(out).attrs["extra"])["int8_calibration_keys"]
    assert first.new == 8 and len(calibrated) == 3
    # a new image that would now be among the first train images: the old calibration stays
    write_image(data / "alpha" / "aaa_first.jpg", "alpha", 77)
    second = run(data, backbone, out, precision="int8", dtype="float32")
    assert second.new == 1
    assert json.loads(read_cache(out).attrs["extra"])["int8_calibration_keys"] == calibrated
    # a calibration image is gone: the int8 model cannot be rebuilt, so every row is recomputed
    (data / "alpha" / "alpha_1.jpg").unlink()
    third = run(data, backbone, out, precision="int8", dtype="float32")
    assert third.new == third.images == 8
    assert json.loads(read_cache(out).attrs["extra"])["int8_calibration_keys"] != calibrated


def test_decode_workers_start_with_one_blas_thread(monkeypatch):
    import os

    from embedx.extract import _Decoder

    monkeypatch.delenv("OPENBLAS_NUM_THREADS", raising=False)
    with _Decoder._starting_workers():
        pool = _Decoder._new_pool(1)
        future = pool.submit(os.getenv, "OPENBLAS_NUM_THREADS")
    try:
        assert future.result(timeout=60) == "1"
    finally:
        pool.shutdown()
    assert "OPENBLAS_NUM_THREADS" not in os.environ  # the parent's environment is restored


def test_int8_rerun_does_not_decode_its_calibration_again(tmp_path, backbone, monkeypatch):
    from embedx import extract as extract_module
    from embedx import preprocess

    monkeypatch.setattr(extract_module, "CALIBRATION_IMAGES", 3)
    data = class_folders(tmp_path / "data", per_class=4)
    first = run(data, backbone, tmp_path / "a.h5", precision="int8", dtype="float32")
    calibrated = json.loads(read_cache(tmp_path / "a.h5").attrs["extra"])["int8_calibration_keys"]
    loads = []
    real_load = preprocess.load
    monkeypatch.setattr(preprocess, "load", lambda *a, **k: loads.append(1) or real_load(*a, **k))
    second = run(data, backbone, tmp_path / "b.h5", precision="int8", dtype="float32")
    assert loads == [] and second.new == 8 and second.int8_cosine == first.int8_cosine
    assert json.loads(read_cache(tmp_path / "b.h5").attrs["extra"])["int8_calibration_keys"] == calibrated
    assert np.array_equal(read_cache(tmp_path / "a.h5").features, read_cache(tmp_path / "b.h5").features)


def test_unchanged_files_are_not_read_again(tmp_path, backbone):
    import os

    data = class_folders(tmp_path / "data", per_class=3)
    out = tmp_path / "f.h5"
    assert run(data, backbone, out).hashed == 6
    again = run(data, backbone, out)
    assert (again.hashed, again.new, again.images) == (0, 0, 6)
    # touched (same bytes, new mtime): read and hashed again, but not recomputed
    target = data / "alpha" / "alpha_0.jpg"
    os.utime(target, ns=(target.stat().st_atime_ns, target.stat().st_mtime_ns + 10**9))
    touched = run(data, backbone, out)
    assert (touched.hashed, touched.new) == (1, 0)
    # rewritten with other content: hashed, a new key, computed
    before = set(read_cache(out).keys.tolist())
    write_image(data / "beta" / "beta_0.jpg", "alpha", 50)
    changed = run(data, backbone, out)
    assert (changed.hashed, changed.new) == (1, 1)
    assert len(set(read_cache(out).keys.tolist()) - before) == 1


def test_padded_batches_give_the_same_features(tmp_path, backbone, monkeypatch):
    """On a GPU the session runs IO-bound at one batch shape (the last batch padded); the
    padding never reaches the cache. The same runner works on the CPU provider, so the
    GPU's code path is taken here by saying the model is on a GPU."""
    from embedx import runtime

    data = class_folders(tmp_path / "data", per_class=3)  # 6 images, batch 4: the last batch has 2
    plain = run(data, backbone, tmp_path / "a.h5", dtype="float32")
    bound = []
    original = runtime.OrtModel.bound
    monkeypatch.setattr(runtime.OrtModel, "on_gpu", property(lambda self: True))
    monkeypatch.setattr(runtime.OrtModel, "bound", lambda self, size: bound.append(size) or original(self, size))
    padded = run(data, backbone, tmp_path / "b.h5", dtype="float32")
    assert bound == [4]
    assert plain.images == padded.images == 6
    np.testing.assert_allclose(read_cache(tmp_path / "a.h5").features, read_cache(tmp_path / "b.h5").features,
                               rtol=1e-5, atol=1e-6)


def test_fp16_on_cpu_is_refused_clearly(tmp_path, backbone):
    data = class_folders(tmp_path / "data", per_class=1)
    result = cli_run("extract", "--backbone", backbone, data, "-o", tmp_path / "f.h5", "--device", "cpu",
                     "--precision", "fp16", "--workers", 0, "-q")
    assert result.exit_code == 1 and "fp16" in result.stderr and "GPU" in result.stderr
    # the failed start left nothing that blocks the same command in fp32
    assert run(data, backbone, tmp_path / "f.h5").images == 2


def test_preprocess_mode_is_recorded_and_never_mixed(tmp_path, backbone):
    """--preprocess exact makes torchvision-identical pixels; the cache records the mode, and a
    run in the other mode is refused (the features would differ) until --overwrite."""
    data = class_folders(tmp_path / "data", per_class=2)
    run(data, backbone, tmp_path / "exact.h5", preprocess_mode="exact")
    run(data, backbone, tmp_path / "fast.h5", preprocess_mode="fast")
    exact, fast = read_cache(tmp_path / "exact.h5"), read_cache(tmp_path / "fast.h5")
    assert exact.meta.preprocess["mode"] == "exact" and fast.meta.preprocess["mode"] == "fast"
    assert not np.array_equal(exact.features, fast.features)  # the pixels differ, a little
    np.testing.assert_allclose(exact.features, fast.features, atol=0.5)
    with pytest.raises(CacheMismatchError, match="preprocess.*--overwrite"):
        run(data, backbone, tmp_path / "exact.h5", preprocess_mode="fast")
    with pytest.raises(ConfigError, match="preprocess_mode"):
        run(data, backbone, tmp_path / "x.h5", preprocess_mode="pretty")


def test_cli_preprocess_option(tmp_path, backbone):
    data = class_folders(tmp_path / "data", per_class=2)
    out = tmp_path / "f.h5"
    result = cli_run("extract", "--backbone", backbone, data, "-o", out, "--workers", 0, "--device", "cpu",
                     "--preprocess", "exact", "-q")
    assert result.exit_code == 0, result.output
    assert read_cache(out).meta.preprocess["mode"] == "exact"
    result = cli_run("extract", "--backbone", backbone, data, "-o", out, "--preprocess", "fast", "-q")
    assert result.exit_code == 1 and "preprocess" in result.output and "--overwrite" in result.output
    assert cli_run("extract", "--backbone", backbone, data, "--preprocess", "pretty").exit_code == 2


# -- decode: cpu | gpu ------------------------------------------------------------------


def test_gpu_decode_needs_a_gpu_and_says_so(tmp_path, backbone):
    from embedx.errors import BackendError

    data = class_folders(tmp_path / "data", per_class=2)
    with pytest.raises(BackendError, match="--decode gpu needs"):
        run(data, backbone, tmp_path / "g.h5", decode="gpu")
    assert not (tmp_path / "g.h5").exists()
    with pytest.raises(ConfigError, match="decode must be one of"):
        run(data, backbone, tmp_path / "g.h5", decode="nvjpeg")


def test_the_cache_records_the_decoder_and_cpu_caches_keep_their_fingerprint(tmp_path, backbone):
    from embedx.cache import CacheMeta

    data = class_folders(tmp_path / "data", per_class=2)
    summary = run(data, backbone, tmp_path / "c.h5")
    assert summary.decode == "cpu"
    meta = read_cache(tmp_path / "c.h5").meta
    assert meta.decode == "cpu"
    fields = meta.to_dict()
    older = CacheMeta.from_dict({k: v for k, v in fields.items() if k != "decode"})  # before decode existed
    assert older.fingerprint == meta.fingerprint
    on_gpu = CacheMeta.from_dict({**fields, "decode": "gpu"})
    assert on_gpu.fingerprint != meta.fingerprint
    assert on_gpu.differences(meta) == ["decode: 'gpu' vs 'cpu'"]


def test_cli_decode_option(tmp_path, backbone):
    data = class_folders(tmp_path / "data", per_class=2)
    result = cli_run("extract", data, "--backbone", backbone, "--device", "cpu", "--decode", "gpu",
                     "-o", tmp_path / "x.h5", "-q")
    assert result.exit_code == 1 and "--decode gpu needs" in result.output
    result = cli_run("extract", data, "--backbone", backbone, "--device", "cpu", "--decode", "cpu",
                     "-o", tmp_path / "x.h5", "-q", "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["decode"] == "cpu"


def _needs_cuda_decode():
    from embedx.gpu import cuda_decode_available
    from embedx.providers import gpu_available

    if not (gpu_available() and cuda_decode_available()):
        pytest.skip("needs an NVIDIA GPU with ONNX Runtime's CUDA provider and torch with CUDA")


@pytest.mark.gpu
@pytest.mark.parametrize("precision", ["fp32", "fp16"])
@pytest.mark.parametrize("decode", ["cpu", "gpu"])
def test_extraction_on_the_gpu_agrees_with_the_cpu(tmp_path, backbone, precision, decode):
    _needs_cuda_decode()
    data = class_folders(tmp_path / "data", per_class=5)  # 10 images, batch 4: padded last batch
    reference = run(data, backbone, tmp_path / "cpu.h5", dtype="float32")
    summary = extract_on_gpu(data, backbone, tmp_path / "gpu.h5", precision=precision, decode=decode)
    assert summary.decode == decode and summary.providers[0] == "CUDAExecutionProvider"
    assert summary.images == reference.images == 10
    a, b = read_cache(tmp_path / "cpu.h5"), read_cache(tmp_path / "gpu.h5")
    assert a.keys.tolist() == b.keys.tolist() and b.meta.decode == decode
    cosine = (a.features * b.features).sum(1) / np.linalg.norm(a.features, axis=1) / np.linalg.norm(b.features, axis=1)
    assert cosine.min() >= (0.9999 if decode == "cpu" and precision == "fp32" else 0.99), cosine


@pytest.mark.gpu
def test_gpu_decode_records_the_bad_input_table_of_the_cpu(tmp_path, backbone):
    _needs_cuda_decode()
    corpus = make_corpus(tmp_path / "data")
    run(tmp_path / "data", backbone, tmp_path / "cpu.h5")
    extract_on_gpu(tmp_path / "data", backbone, tmp_path / "gpu.h5", decode="gpu")
    a, b = read_cache(tmp_path / "cpu.h5"), read_cache(tmp_path / "gpu.h5")
    assert sorted(b.paths.tolist()) == sorted(a.paths.tolist()) == sorted(corpus["decode"])
    assert sorted(b.errors) == sorted(a.errors)


def extract_on_gpu(data, backbone, output, **options):
    from embedx.extract import extract

    return extract(data, backbone=backbone, output=output, device="cuda", batch_size=4, workers=0,
                   dtype="float32", **options)


def test_copies_of_one_image_are_computed_once_in_a_fresh_run(tmp_path, backbone):
    """A fresh cache is not hashed up front (the decoders hash what they read); copies of one
    image under other names are still computed once, and every name gets its row."""
    data = class_folders(tmp_path / "data", per_class=3)
    shutil.copy(data / "alpha" / "alpha_0.jpg", data / "alpha" / "copy_a.jpg")
    shutil.copy(data / "alpha" / "alpha_0.jpg", data / "beta" / "copy_b.jpg")
    summary = run(data, backbone, tmp_path / "c.h5", dtype="float32")
    cache = read_cache(tmp_path / "c.h5")
    assert summary.images == 8 and summary.new == 6 and summary.reused == 2
    paths = cache.paths.tolist()
    rows = [paths.index(p) for p in ("alpha/alpha_0.jpg", "alpha/copy_a.jpg", "beta/copy_b.jpg")]
    assert len({cache.keys[r] for r in rows}) == 1
    np.testing.assert_array_equal(cache.features[rows[0]], cache.features[rows[2]])
    assert cache.classes[cache.labels[rows[2]]] == "beta"


def test_a_file_unreadable_while_decoding_is_retried_by_the_next_run(tmp_path, backbone, monkeypatch):
    """Planned (hashed) first, then unreadable when the decoder opens it: the error carries no
    key, so the next run tries the file again instead of skipping it for good."""
    from embedx import extract as extract_module

    data = class_folders(tmp_path / "data", per_class=2)
    out = tmp_path / "f.h5"
    run(data, backbone, out)
    write_image(data / "alpha" / "new.jpg", "alpha", 9)  # the next plan hashes it (not a fresh cache)
    real = extract_module._decode_batch

    def unreadable(spec_json, paths):
        result = real(spec_json, paths)
        for position, path in enumerate(paths):
            if path.endswith("new.jpg"):
                result["keys"][position] = ""
                keep = [i for i, row in enumerate(result["rows"]) if row != position]
                result["rows"] = [result["rows"][i] for i in keep]
                result["pixels"] = result["pixels"][keep]
                result["errors"].append((position, "cannot read: Input/output error (simulated)"))
        return result

    monkeypatch.setattr(extract_module, "_decode_batch", unreadable)
    failed = run(data, backbone, out)
    assert failed.new == 0 and ("alpha/new.jpg", "cannot read: Input/output error (simulated)") in failed.error_list
    monkeypatch.setattr(extract_module, "_decode_batch", real)
    again = run(data, backbone, out)
    assert again.new == 1 and again.errors == 0


# -- damaged caches and non-finite features ----------------------------------------


def test_a_rerun_repairs_exactly_the_damaged_rows(tmp_path, backbone):
    from tests.test_cache import flip_feature_bytes

    data = class_folders(tmp_path / "data", per_class=6)
    out = tmp_path / "f.h5"
    run(data, backbone, out)
    fresh = read_cache(out)
    flip_feature_bytes(out, [1, 8])
    with pytest.raises(CacheError, match=r"2 rows \(1, 8\)"):
        read_cache(out)
    summary = run(data, backbone, out)  # was "0 new, 12 reused", keeping the bad rows
    assert (summary.new, summary.reused, summary.repaired) == (2, 10, 2)
    repaired = read_cache(out)
    np.testing.assert_array_equal(repaired.features, fresh.features)
    assert repaired.keys.tolist() == fresh.keys.tolist() and repaired.paths.tolist() == fresh.paths.tolist()


def test_float16_overflow_is_refused_naming_the_files(tmp_path, backbone, monkeypatch):
    from embedx.runtime import OrtModel

    data = class_folders(tmp_path / "data", per_class=2)
    real = OrtModel.run
    monkeypatch.setattr(OrtModel, "run", lambda self, x: real(self, x) * 1e6)  # beyond float16's 65504
    result = cli_run("extract", "--backbone", backbone, data, "-o", tmp_path / "f.h5", "--workers", 0,
                     "--device", "cpu", "-q")
    assert result.exit_code == 1, result.output
    assert "4 images (alpha/alpha_0.jpg, alpha/alpha_1.jpg, " in result.stderr and "--dtype float32" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert run(data, backbone, tmp_path / "g.h5", dtype="float32").images == 4


def test_a_full_disk_while_journaling_is_one_line_and_the_rerun_resumes(tmp_path, backbone, monkeypatch):
    import errno

    from embedx import cache

    data = class_folders(tmp_path / "data", per_class=6)
    out = tmp_path / "f.h5"
    real, calls = cache.atomic_write, []

    def fills_up(target, *args, **kwargs):
        calls.append(target)
        if len(calls) > 2:  # meta.json and the first shard fit
            raise OSError(errno.ENOSPC, "No space left on device", str(target))
        return real(target, *args, **kwargs)

    monkeypatch.setattr(cache, "atomic_write", fills_up)
    result = cli_run("extract", "--backbone", backbone, data, "-o", out, "--workers", 0, "--device", "cpu",
                     "--batch-size", 4, "-q")
    assert result.exit_code == 1, result.output
    assert result.stderr.startswith("error: cannot write ") and "shard-00000001.npz: ENOSPC (28)" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert sorted(p.name for p in journal_dir(out).iterdir()) == ["meta.json", "shard-00000000.npz"]
    monkeypatch.setattr(cache, "atomic_write", real)
    summary = run(data, backbone, out)
    assert (summary.images, summary.new, summary.reused) == (12, 8, 4)


def test_a_full_disk_while_writing_the_cache_is_one_line_and_the_rerun_resumes(tmp_path, backbone):
    import resource
    import signal
    import subprocess
    import sys

    def small_files_only():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        # the shards and the pixel-input model fit, the cache's reservation (its data + 64 KiB) does not
        resource.setrlimit(resource.RLIMIT_FSIZE, (40 << 10, 40 << 10))

    data = class_folders(tmp_path / "data", per_class=6)
    out = tmp_path / "f.h5"
    command = [sys.executable, "-m", "embedx", "extract", "--backbone", backbone, str(data), "-o", str(out),
               "--workers", "0", "--device", "cpu", "-q"]
    failed = subprocess.run(command, capture_output=True, text=True, timeout=300, preexec_fn=small_files_only)
    assert failed.returncode == 1, failed.stderr[-3000:]
    assert failed.stderr.strip().splitlines() == [
        f"error: cannot write {out}: EFBIG (27): File too large; free space (or fix the folder), then rerun "
        "the same command: it resumes from the journal"]
    assert not out.exists() and list(journal_dir(out).glob("shard-*.npz"))
    done = subprocess.run(command + ["--json"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads(done.stdout)["new"] == 0 and len(read_cache(out)) == 12


@pytest.mark.skipif(os.name != "posix", reason="needs a file system that stores raw bytes")
def test_a_sub_folder_whose_name_is_not_utf8_is_skipped_and_extract_finishes(tmp_path, backbone):
    """Its images' relpaths cannot be stored as text: extract crashed at finalize
    (UnicodeEncodeError), on every rerun."""
    data = class_folders(tmp_path / "data", per_class=2)
    sub = os.path.join(os.fsencode(data / "alpha"), b"\xff\xfe")
    os.makedirs(sub)
    write_image(Path(os.fsdecode(os.path.join(sub, b"x.jpg"))), "alpha", 9)
    summary = run(data, backbone, tmp_path / "f.h5")
    cache = read_cache(tmp_path / "f.h5")
    assert summary.new == 4 and len(cache) == 4
    assert dict(cache.errors) == {"alpha/\\xff\\xfe": "folder name is not valid UTF-8; its contents are not used"}
