"""`embedx fit-head` and `embedx evaluate` through click's CliRunner: exit codes and output."""

from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner
from sklearn.datasets import make_classification

from embedx.cli.main import cli
from tests.test_heads import write_cache


@pytest.fixture
def runner():
    return CliRunner()


@pytest.fixture
def cache_file(tmp_path):
    X, y = make_classification(n_samples=200, n_features=10, n_informative=5, n_classes=2, random_state=0)
    splits = ["train"] * 150 + ["val"] * 50
    return write_cache(tmp_path / "feats.h5", X.astype(np.float32), y, splits, ["ants", "bees"])


def test_fit_head_json_is_one_object_with_val_accuracy_and_fit_seconds(runner, cache_file, tmp_path):
    result = runner.invoke(cli, ["fit-head", "--cache", str(cache_file), "-o", str(tmp_path / "h"), "--json"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert 0.5 < summary["val_accuracy"] <= 1.0
    assert summary["fit_seconds"] > 0
    assert summary["head_type"] == "logreg" and summary["params"]["C"] > 0
    assert summary["metrics"]["val"]["accuracy"] == summary["val_accuracy"]
    assert summary["output_dir"] == str(tmp_path / "h") and (tmp_path / "h" / "head.json").is_file()
    low, high = summary["val_accuracy_ci"]
    assert low < summary["val_accuracy"] <= high and high - low > 0.05  # 50 val rows: a wide interval
    assert summary["metrics"]["val"]["accuracy_ci"] == [low, high]


def test_fit_head_human_summary(runner, cache_file, tmp_path):
    result = runner.invoke(cli, ["fit-head", "--cache", str(cache_file), "--head", "knn", "-o", str(tmp_path / "k"),
                                 "--class-weight", "balanced", "--seed", "1"])
    assert result.exit_code == 0, result.output
    out = result.stdout
    assert "knn head fitted in" in out and "val: accuracy" in out and "ECE" in out and "k=20" in out
    assert "[95% CI 0." in out
    assert str(tmp_path / "k" / "reliability.png") in out


def test_fit_head_refit_and_label_smoothing(runner, cache_file, tmp_path):
    result = runner.invoke(cli, ["fit-head", "--cache", str(cache_file), "--head", "linear", "--refit",
                                 "--label-smoothing", "0.1", "-o", str(tmp_path / "l"), "--json"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["params"]["refit"] == "train+val" and summary["params"]["label_smoothing"] == 0.1


def test_fit_head_errors_exit_1_with_one_line(runner, tmp_path, cache_file):
    result = runner.invoke(cli, ["fit-head", "--cache", str(tmp_path / "missing.h5")])
    assert result.exit_code == 1
    assert "error:" in result.stderr and "embedx extract" in result.stderr
    result = runner.invoke(cli, ["fit-head", "--cache", str(cache_file), "--label-smoothing", "0.2"])
    assert result.exit_code == 1 and "label smoothing" in result.stderr


def test_bad_options_exit_2(runner, cache_file):
    assert runner.invoke(cli, ["fit-head", "--cache", str(cache_file), "--head", "svm"]).exit_code == 2
    assert runner.invoke(cli, ["fit-head"]).exit_code == 2
    assert runner.invoke(cli, ["fit-head", "--cache", str(cache_file), "--label-smoothing", "1.5"]).exit_code == 2


def test_evaluate_json_and_mismatch(runner, cache_file, tmp_path):
    assert runner.invoke(cli, ["fit-head", "--cache", str(cache_file), "-o", str(tmp_path / "h"),
                               "--json"]).exit_code == 0
    result = runner.invoke(cli, ["evaluate", "--head", str(tmp_path / "h"), "--cache", str(cache_file), "--json"])
    assert result.exit_code == 0, result.output
    metrics = json.loads(result.stdout)
    assert metrics["all"]["n"] == 200 and set(metrics) >= {"train", "val", "all"}
    result = runner.invoke(cli, ["evaluate", "--head", str(tmp_path / "h"), "--cache", str(cache_file),
                                 "--split", "val"])
    assert result.exit_code == 0 and "val: accuracy" in result.stdout and "all:" not in result.stdout
    result = runner.invoke(cli, ["evaluate", "--head", str(tmp_path / "h"), "--cache", str(cache_file),
                                 "--split", "val", "--json"])
    val_only = json.loads(result.stdout)
    assert "all" not in val_only and val_only["val"]["n"] == 50 and val_only["val"] == metrics["val"]
    assert val_only["val"]["accuracy_ci"][0] < val_only["val"]["accuracy"]
    other = write_cache(tmp_path / "other.h5", np.zeros((4, 3), np.float32), np.array([0, 1, 0, 1]), ["val"] * 4,
                        ["ants", "bees"], backbone="resnet18")
    result = runner.invoke(cli, ["evaluate", "--head", str(tmp_path / "h"), "--cache", str(other)])
    assert result.exit_code == 1
    assert "resnet18" in result.stderr and "embedx extract --backbone fakenet" in result.stderr


def test_evaluate_with_a_malformed_head_json_is_one_line(runner, cache_file, tmp_path):
    assert runner.invoke(cli, ["fit-head", "--cache", str(cache_file), "-o", str(tmp_path / "h"),
                               "--json"]).exit_code == 0
    head_json = tmp_path / "h" / "head.json"
    head_json.write_text(json.dumps({**json.loads(head_json.read_text()), "classes": {"ants": 0}}))
    result = runner.invoke(cli, ["evaluate", "--head", str(tmp_path / "h"), "--cache", str(cache_file)])
    assert result.exit_code == 1
    assert result.stderr.startswith("error: ") and len(result.stderr.strip().splitlines()) == 1
    assert "'classes' must be a non-empty list of class names" in result.stderr


def test_fit_head_never_replaces_a_folder_that_is_not_a_head(runner, cache_file, tmp_path):
    folder = tmp_path / "photos"
    folder.mkdir()
    (folder / "holiday.jpg").write_bytes(b"precious")
    result = runner.invoke(cli, ["fit-head", "--cache", str(cache_file), "-o", str(folder), "--json"])
    assert result.exit_code == 1
    assert result.stderr.startswith("error: ") and "not a head directory" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert [p.name for p in folder.iterdir()] == ["holiday.jpg"]
    again = runner.invoke(cli, ["fit-head", "--cache", str(cache_file), "-o", str(tmp_path / "h"), "--json"])
    assert again.exit_code == 0, again.output
    replaced = runner.invoke(cli, ["fit-head", "--cache", str(cache_file), "--head", "knn", "-o", str(tmp_path / "h"),
                                   "--json"])
    assert replaced.exit_code == 0, replaced.output  # a head directory is replaced
    assert json.loads((tmp_path / "h" / "head.json").read_text())["head_type"] == "knn"
