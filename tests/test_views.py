"""Augmented views in the cache: extract, resume, increments, reading, fit-head."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from embedx.augment import AugmentSpec, ViewPlan, view_image, view_key
from embedx.cache import CacheWriter, cache_info, read_cache, read_views
from embedx.errors import ConfigError
from tests.test_extract import _build_tiny_onnx, run, write_image

VIEWS = 3


@pytest.fixture(scope="module")
def backbone(tmp_path_factory) -> str:
    return str(_build_tiny_onnx(tmp_path_factory.mktemp("tiny") / "tiny.onnx"))


def split_data(root: Path, train: int = 6, val: int = 3) -> Path:
    for split, count in (("train", train), ("val", val)):
        for name in ("alpha", "beta"):
            for i in range(count):
                write_image(root / split / name / f"{name}_{i}.jpg", name, i + (100 if split == "val" else 0))
    return root


def stored(path: Path):
    data = read_cache(path)
    views = read_views(path)
    return data, views


def test_view_image_is_deterministic_and_depends_on_key_and_name():
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (60, 80, 3), dtype=np.uint8))
    params = AugmentSpec.parse("flip,crop,color,rotate").to_json()
    first = np.asarray(view_image(image, key="a" * 64, name="augment/0", parameters=params))
    again = np.asarray(view_image(image, key="a" * 64, name="augment/0", parameters=params))
    other = np.asarray(view_image(image, key="a" * 64, name="augment/1", parameters=params))
    assert np.array_equal(first, again)
    assert first.shape != other.shape or not np.array_equal(first, other)
    flip_only = AugmentSpec(ops=("flip",), flip_probability=1.0).to_json()
    flipped = np.asarray(view_image(image, key="b" * 64, name="augment/0", parameters=flip_only))
    assert np.array_equal(flipped, np.asarray(image)[:, ::-1])
    assert view_key("a" * 64, "augment/0", params) != view_key("a" * 64, "augment/0", AugmentSpec().to_json())


def test_augment_spec_refuses_unknown_ops():
    with pytest.raises(ConfigError, match="augmentations must be some of"):
        AugmentSpec.parse("flip,warp")
    with pytest.raises(ConfigError, match="views must be >= 0"):
        ViewPlan(count=-1)


def test_views_of_train_only_rerun_same_bytes(tmp_path, backbone):
    data = split_data(tmp_path / "data")
    first = tmp_path / "a.h5"
    summary = run(data, backbone, first, dtype="float32", views=VIEWS)
    assert summary.new == 18 and summary.new_views == 12 * VIEWS and summary.views == 12 * VIEWS
    clean, views = stored(first)
    assert np.array_equal(np.unique(clean.splits[views.source]), ["train"])  # val rows stay clean
    assert sorted(np.bincount(views.source).tolist()) == [VIEWS] * 12
    assert set(views.names.tolist()) == {f"augment/{i}" for i in range(VIEWS)}
    assert len(set(views.keys.tolist())) == len(views.keys)
    # views differ from their clean row
    assert not np.allclose(views.features, clean.features[views.source])
    # a rerun from scratch makes the same bytes (workers decode the views here)
    second = tmp_path / "b.h5"
    run(data, backbone, second, dtype="float32", views=VIEWS, workers=1)
    _, views_again = stored(second)
    assert np.array_equal(views.keys, views_again.keys)
    assert np.array_equal(views.features, views_again.features)
    # old readers' view of the file: read_cache is what it was without views
    plain = tmp_path / "plain.h5"
    run(data, backbone, plain, dtype="float32")
    without = read_cache(plain)
    assert np.array_equal(without.features, clean.features) and np.array_equal(without.keys, clean.keys)
    assert read_views(plain).features.shape == (0, without.features.shape[1])
    assert "views" not in cache_info(plain)


def test_info_shows_views(tmp_path, backbone):
    from embedx.cli.main import cli

    data = split_data(tmp_path / "data", train=2, val=1)
    output = tmp_path / "c.h5"
    run(data, backbone, output, views=2, augment="flip,crop")
    info = cache_info(output)
    assert info["views"]["rows"] == 4 * 2 and info["views"]["images"] == 4
    assert info["views"]["per_kind"] == {"augment": 8}
    assert info["views"]["plan"]["augment"]["ops"] == ["crop", "flip"]
    result = CliRunner().invoke(cli, ["info", str(output)])
    assert result.exit_code == 0, result.output
    assert "views: 8 rows of 4 images; 2 augmented per train image (crop,flip)" in result.output
    result = CliRunner().invoke(cli, ["info", str(output), "--json"])
    assert json.loads(result.output)["views"]["rows"] == 8


def test_incremental_add_and_remove_follow_views(tmp_path, backbone):
    data = split_data(tmp_path / "data", train=3, val=1)
    output = tmp_path / "d.h5"
    run(data, backbone, output, views=2)
    write_image(data / "train" / "alpha" / "new.jpg", "alpha", 77)
    (data / "train" / "beta" / "beta_0.jpg").unlink()
    summary = run(data, backbone, output)  # no view options: the cache's views are kept
    assert summary.new == 1 and summary.new_views == 2
    clean, views = stored(output)
    assert summary.views == len(views.keys) == 2 * int((clean.splits == "train").sum())
    new_row = int(np.flatnonzero(clean.paths == "train/alpha/new.jpg")[0])
    assert (views.source == new_row).sum() == 2
    assert not any("beta_0" in p for p in clean.paths[views.source])


def test_changing_views_adds_or_replaces(tmp_path, backbone):
    data = split_data(tmp_path / "data", train=2, val=1)
    output = tmp_path / "e.h5"
    run(data, backbone, output, views=2)
    _, before = stored(output)
    more = run(data, backbone, output, views=3)  # view i does not depend on K: only view 2 is new
    assert more.new == 0 and more.new_views == 4
    _, after = stored(output)
    kept = np.isin(after.names, ["augment/0", "augment/1"])
    assert np.array_equal(after.keys[kept], before.keys) and np.array_equal(after.features[kept], before.features)
    other = run(data, backbone, output, augment="crop")  # other parameters: every view is made again
    assert other.new_views == 12
    _, replaced = stored(output)
    assert not set(replaced.keys.tolist()) & set(after.keys.tolist())
    dropped = run(data, backbone, output, views=0)
    assert dropped.views == 0 and "views" not in cache_info(output)


def test_val_fraction_views_follow_their_source_split(tmp_path, backbone):
    from tests.test_extract import class_folders

    data = class_folders(tmp_path / "data", per_class=8)
    output = tmp_path / "f.h5"
    run(data, backbone, output, views=2, val_fraction=0.4)
    clean, views = stored(output)
    assert (clean.splits == "val").any()
    assert set(clean.splits[views.source].tolist()) == {"train"}
    assert len(views.keys) == 2 * int((clean.splits == "train").sum())


def test_resume_after_kill_keeps_views_complete(tmp_path, backbone, monkeypatch):
    """A run that dies after some batches (views included) resumes to the uninterrupted result."""
    data = split_data(tmp_path / "data", train=5, val=2)
    reference = tmp_path / "ref.h5"
    run(data, backbone, reference, dtype="float32", views=2)
    output = tmp_path / "g.h5"
    calls = {"n": 0}
    original = CacheWriter.append

    def dying(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 6:  # the clean rows are 4+ batches of 4: this dies among the views
            raise RuntimeError("killed")
        return original(self, *args, **kwargs)

    monkeypatch.setattr(CacheWriter, "append", dying)
    with pytest.raises(RuntimeError, match="killed"):
        run(data, backbone, output, dtype="float32", views=2)
    monkeypatch.setattr(CacheWriter, "append", original)
    assert not output.exists()
    summary = run(data, backbone, output, dtype="float32", views=2)
    assert summary.new + summary.new_views < 14 + 20  # something came from the journal
    ref_clean, ref_views = stored(reference)
    clean, views = stored(output)
    assert np.array_equal(clean.features, ref_clean.features)
    assert np.array_equal(views.keys, ref_views.keys) and np.array_equal(views.features, ref_views.features)
    assert len(set(views.keys.tolist())) == len(views.keys) == 10 * 2


@pytest.fixture(scope="module")
def view_cache(tmp_path_factory, backbone) -> Path:
    root = tmp_path_factory.mktemp("fit")
    data = split_data(root / "data", train=8, val=4)
    output = root / "views.h5"
    run(data, backbone, output, views=VIEWS)
    return output


def test_fit_head_trains_on_views_by_default_and_not_with_no_views(view_cache, tmp_path):
    from embedx.cli.main import cli

    runner = CliRunner()
    outputs = {}
    for flag in ("--views", "--no-views"):
        result = runner.invoke(cli, ["fit-head", "--cache", str(view_cache), flag, "-o", str(tmp_path / flag[2:]),
                                     "--json"])
        assert result.exit_code == 0, result.output
        outputs[flag] = json.loads(result.output)["metrics"]
    assert outputs["--views"]["n_train_views"] == 16 * VIEWS
    assert outputs["--no-views"]["n_train_views"] == 0
    for metrics in outputs.values():  # chosen and reported on the clean val rows only
        assert metrics["n_train"] == 16 and metrics["n_val"] == 8
        assert sum(map(sum, metrics["val"]["confusion_matrix"])) == 8
    text = runner.invoke(cli, ["fit-head", "--cache", str(view_cache), "-o", str(tmp_path / "t")])
    assert f"on 16 rows + {16 * VIEWS} views" in text.output


def test_hash_split_keeps_views_of_val_images_out_of_training(tmp_path, backbone):
    """A cache without val rows: fit-head holds out train rows by key; their views are not trained on."""
    from embedx.heads import fit_head
    from embedx.heads.fit import _split_rows
    from tests.test_extract import class_folders

    data = class_folders(tmp_path / "data", per_class=10)
    output = tmp_path / "h.h5"
    run(data, backbone, output, views=2)
    train, val, _, _ = _split_rows(read_cache(output, load_features=False), 0)
    assert len(val)
    result = fit_head(output, output=tmp_path / "head", plots=False)
    assert result.metrics["n_train_views"] == 2 * len(train)
    held = read_views(output, sources=val)
    assert len(held.keys) == 2 * len(val)  # they exist, and were left out


@pytest.mark.slow
def test_hymenoptera_views_added_to_an_existing_cache(hymenoptera, hymenoptera_lite0, tmp_path, monkeypatch):
    """Real weights and data: views join a finished cache without recomputing its rows, and the
    default head trains on them (accuracy stays where the clean head is, within a few points)."""
    import shutil

    from embedx.extract import extract
    from embedx.heads import fit_head

    cache, _ = hymenoptera_lite0
    output = tmp_path / "views.h5"
    shutil.copy(cache, output)
    monkeypatch.setenv("EMBEDX_CACHE_DIR", str(cache.parent))
    summary = extract(hymenoptera, backbone="efficientnet_lite0", output=output, device="cpu", views=2)
    clean = read_cache(output)
    n_train = int((clean.splits == "train").sum())
    assert summary.new == 0 and summary.new_views == summary.views == 2 * n_train
    assert np.array_equal(clean.features, read_cache(cache).features)
    with_views = fit_head(output, output=tmp_path / "v", plots=False)
    without = fit_head(output, output=tmp_path / "c", plots=False, views=False)
    assert with_views.metrics["n_train_views"] == 2 * n_train and without.metrics["n_train_views"] == 0
    assert with_views.metrics["val"]["accuracy"] >= 0.92 and without.metrics["val"]["accuracy"] >= 0.92


def test_fit_head_ignores_views_of_a_filtered_cache_data(view_cache, tmp_path):
    """Row numbers of a CacheData read with splits= are not the file's: its views are not used."""
    from embedx.heads import fit_head

    full = fit_head(read_cache(view_cache), output=tmp_path / "full", plots=False)
    assert full.metrics["n_train_views"] == 16 * VIEWS
    part = read_cache(view_cache, splits=("train",))
    filtered = fit_head(part, output=tmp_path / "part", plots=False)
    assert filtered.metrics["n_train_views"] == 0


def test_sigkill_during_views_then_rerun_equals_uninterrupted(tmp_path, backbone):
    """kill -9 the CLI while it computes views (batches of 1: many shards), then rerun the same command."""
    import os
    import signal
    import subprocess
    import time

    from tests.test_extract_resume import command, shard_count

    data = split_data(tmp_path / "data", train=10, val=2)  # 24 rows, then 20 x 3 views
    env = dict(os.environ, EMBEDX_CACHE_DIR=str(tmp_path / "cachedir"))

    def views_command(output: Path) -> list[str]:
        line = command(data, Path(backbone), output, 0)
        line[line.index("--batch-size") + 1] = "1"
        return [*line, "--views", str(VIEWS)]

    reference = tmp_path / "reference.h5"
    subprocess.run(views_command(reference), env=env, check=True, capture_output=True)
    output = tmp_path / "killed.h5"
    process = subprocess.Popen(views_command(output), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    while process.poll() is None and shard_count(output) < 24 + 20:  # every clean row and 20 views journaled
        time.sleep(0.002)
    process.send_signal(signal.SIGKILL)
    process.communicate(timeout=60)
    assert process.returncode == -signal.SIGKILL and not output.exists(), "finished before the kill"
    finished = subprocess.run([*views_command(output), "--json"], env=env, capture_output=True)
    assert finished.returncode == 0, finished.stderr.decode()
    summary = json.loads(finished.stdout)
    assert summary["new"] == 0 and 0 < summary["new_views"] <= 60 - 20
    ref_clean, ref_views = stored(reference)
    clean, views = stored(output)
    np.testing.assert_array_equal(clean.features, ref_clean.features)
    assert views.keys.tolist() == ref_views.keys.tolist() and len(set(views.keys.tolist())) == 60
    np.testing.assert_array_equal(views.features, ref_views.features)


def test_damaged_view_is_reported_by_verify_and_recomputed_by_extract(tmp_path, backbone):
    import h5py

    from embedx.cache import CacheChecksumError
    from embedx.cli.main import cli

    data = split_data(tmp_path / "data", train=2, val=1)
    output = tmp_path / "v.h5"
    run(data, backbone, output, views=2, dtype="float32")
    _, good = stored(output)
    with h5py.File(output, "r+") as handle:  # a flipped value, its checksum left as it was
        handle["views/features"][3, 0] = handle["views/features"][3, 0] + 1.0
    with pytest.raises(CacheChecksumError):
        read_views(output)
    result = CliRunner().invoke(cli, ["verify", str(output), "--sample", "0"])
    assert result.exit_code == 1
    assert "views: 8 rows, 1 fail their checksum or hold NaN/inf (3)" in result.output
    summary = run(data, backbone, output, dtype="float32")
    assert summary.repaired == 1 and summary.new_views == 1 and summary.new == 0
    _, repaired = stored(output)
    np.testing.assert_array_equal(repaired.features, good.features)
    assert CliRunner().invoke(cli, ["verify", str(output), "--sample", "0"]).exit_code == 0


def test_views_refuse_gpu_decode(tmp_path, backbone):
    data = split_data(tmp_path / "data", train=1, val=1)
    with pytest.raises(ConfigError, match="views are decoded on the CPU"):
        run(data, backbone, tmp_path / "g.h5", views=1, decode="gpu")
