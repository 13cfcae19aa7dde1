"""fit_head(cv=K): regularization by stratified K-fold over train+val; the small-val warnings."""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pytest
from click.testing import CliRunner
from sklearn.datasets import make_classification

from embedx.cli.main import cli
from embedx.errors import HeadError
from embedx.heads import fit_head
from embedx.heads.cv import SMALL_VAL_ROWS, small_val_warnings
from embedx.heads.members import within_one_se
from tests.test_heads import write_cache


def _cache(tmp_path, n_train: int, n_val: int, *, seed: int = 0, name: str = "feats.h5"):
    X, y = make_classification(n_samples=n_train + n_val, n_features=12, n_informative=6, n_classes=3,
                               class_sep=1.0, flip_y=0.05, random_state=seed)
    splits = ["train"] * n_train + ["val"] * n_val
    return write_cache(tmp_path / name, X.astype(np.float32), y, splits, ["ants", "bees", "wasps"])


@pytest.mark.parametrize("head,params", [("logreg", {}), ("knn", {}), ("linear", {"epochs": 3})])
def test_cv_chooses_on_all_train_val_rows_and_reports_out_of_fold(tmp_path, head, params):
    path = _cache(tmp_path, 180, 60)  # 240 rows, 5 stratified folds of 48
    result = fit_head(path, head=head, cv=5, params=params, output=tmp_path / "h", plots=False)
    cv, val = result.metrics["cv"], result.metrics["val"]
    assert cv["folds"] == 5 and cv["rows"] == 240 and len(cv["fold_accuracy"]) == 5
    assert result.head.n_train_ == 240 and result.metrics["n_val"] == val["n"] == 240
    # equal folds: the pooled out-of-fold accuracy is the mean of the folds' accuracies
    assert val["accuracy"] == pytest.approx(cv["fold_accuracy_mean"], abs=1e-9)
    assert cv["fold_accuracy_sd"] == pytest.approx(np.std(cv["fold_accuracy"], ddof=1))
    assert val["accuracy_ci"][0] < val["accuracy"] < val["accuracy_ci"][1]
    assert 0.0 <= cv["val_rows_accuracy"] <= 1.0 and cv["val_rows"] == 60
    # the chosen setting is among those within one standard error of the best pooled CV accuracy
    accuracy = np.asarray([row["cv_accuracy"] for row in cv["table"]])
    chosen = [row[cv["setting"]] for row in cv["table"]].index(cv["chosen"])
    assert chosen in within_one_se(accuracy, 240)
    assert "cross-validation" in result.metrics["val_source"] and "warnings" not in result.metrics
    assert val["accuracy"] > 0.6  # far above chance (1/3)


def test_cv_logreg_head_uses_the_chosen_strength_for_all_rows(tmp_path):
    path = _cache(tmp_path, 180, 60)
    result = fit_head(path, head="logreg", cv=4, output=tmp_path / "h", plots=False)
    l2 = result.metrics["cv"]["chosen"]
    # the sweep's mean-loss L2 coefficient, as scikit-learn's C for 240 rows of 3 classes
    assert result.head.chosen_params_["C"] == pytest.approx(1.0 / (l2 * 240))
    assert result.head.chosen_params_["cv_folds"] == 4


def test_cv_needs_enough_rows_of_every_class(tmp_path):
    X = np.random.default_rng(0).normal(size=(12, 4)).astype(np.float32)
    y = np.array([0] * 9 + [1] * 3)
    path = write_cache(tmp_path / "few.h5", X, y, ["train"] * 8 + ["val"] * 4, ["a", "b"])
    with pytest.raises(HeadError, match="--cv 5 needs at least 5 distinct train\\+val images of every class") as error:
        fit_head(path, cv=5, output=tmp_path / "h", plots=False)
    assert "class 'b' has 3;" in str(error.value)  # the class as the user wrote it, not np.str_('b')


def test_a_small_val_set_is_warned_about_and_a_large_one_is_not(tmp_path):
    small = fit_head(_cache(tmp_path, 300, 60), output=tmp_path / "s", plots=False)
    assert any("--cv 5" in w and "60 rows" in w for w in small.metrics["warnings"])
    large = fit_head(_cache(tmp_path, 600, 2 * SMALL_VAL_ROWS, name="large.h5"), output=tmp_path / "l", plots=False)
    assert not any("rows (fewer than" in w for w in large.metrics["warnings"])


def test_runner_up_inside_the_best_interval_is_warned_about():
    def grid(*accuracies):
        return SimpleNamespace(sweep_=[{"l2": 10.0**-i, "phase": "grid", "val_accuracy": a}
                                       for i, a in enumerate(accuracies)] + [{"l2": 1.0, "phase": "refine",
                                                                              "val_accuracy": 0.5}])

    close = small_val_warnings(grid(0.95, 0.94, 0.95), 1000)
    assert len(close) == 1 and "0.950 and 0.940" in close[0] and "--cv 5" in close[0]
    assert small_val_warnings(grid(0.95, 0.90), 1000) == []
    assert small_val_warnings(grid(0.95, 0.95), 1000) == []  # nothing to tell apart


def test_cli_fit_head_cv(tmp_path):
    path = _cache(tmp_path, 180, 60)
    runner = CliRunner()
    result = runner.invoke(cli, ["fit-head", "--cache", str(path), "--cv", "3", "-o", str(tmp_path / "h"), "--json"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["metrics"]["cv"]["folds"] == 3 and summary["val_accuracy_ci"][0] < summary["val_accuracy"]
    human = runner.invoke(cli, ["fit-head", "--cache", str(path), "--cv", "3", "-o", str(tmp_path / "h2")])
    assert human.exit_code == 0 and "cv: 3 folds over 240 train+val rows chose l2=" in human.stdout
    assert runner.invoke(cli, ["fit-head", "--cache", str(path), "--cv", "1"]).exit_code == 2


def _cache_of_copies(path, n: int = 60, *, splits=None, seed: int = 0):
    """Every image twice (the same bytes under two names: one key), labels of pure noise."""
    import hashlib

    from embedx.cache import CacheMeta, CacheWriter

    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n, 16)).astype(np.float32)
    y = [int(v) for v in rng.integers(0, 2, n)]
    keys = [hashlib.sha256(f"img-{i}".encode()).hexdigest() for i in range(n)]
    meta = CacheMeta(backbone="fakenet", weights_tag="none", weights_arg="none", onnx_path="/nowhere/f.onnx",
                     onnx_sha256="0" * 64, feature_layer="pool", feature_dim=16, preprocess={"input_size": 32},
                     dtype="float32", precision="fp32")
    paths = [f"c{y[i]}/{i}.png" for i in range(n)] + [f"c{y[i]}/copy_{i}.png" for i in range(n)]
    with CacheWriter(path, meta, overwrite=True) as writer:
        writer.append(keys, X, paths=paths[:n])
        writer.finalize(keys=keys + keys, paths=paths, labels=y + y, splits=splits or ["train"] * (2 * n),
                        classes=["c0", "c1"], errors=[])
    return path


@pytest.mark.parametrize("head", ["knn", "logreg"])
def test_copies_of_one_image_stay_in_one_fold(tmp_path, head):
    # Noise labels: an honest out-of-fold accuracy is about 0.5. With the copies split across
    # folds, each row was scored by a head trained on its own copy (knn: 0.90 before the fix).
    path = _cache_of_copies(tmp_path / "copies.h5")
    result = fit_head(path, head=head, cv=5, output=tmp_path / "h", plots=False)
    assert result.metrics["val"]["n"] == 120
    assert result.metrics["val"]["accuracy"] < 0.7


def test_the_holdout_of_a_tiny_train_split_keeps_copies_together(tmp_path):
    from embedx.cache import read_cache
    from embedx.heads.fit import _split_rows

    data = read_cache(_cache_of_copies(tmp_path / "copies.h5", n=3), load_features=False)
    keys = np.asarray(data.keys).astype(str)
    for seed in range(5):
        train, val, _, source = _split_rows(data, seed)
        assert source.startswith("seeded stratified holdout")  # 3 images: the hash split leaves a class out
        assert len(val) and not set(keys[train]) & set(keys[val])


def test_cv_pools_a_train_only_cache_too_small_for_a_holdout(tmp_path):
    y = np.repeat([0, 1, 2], 2)
    X = (np.random.default_rng(0).normal(size=(6, 6)) + y[:, None] * 3).astype(np.float32)
    path = write_cache(tmp_path / "tiny_cv.h5", X, y, ["train"] * 6, ["a", "b", "c"])  # keys from the name
    with pytest.raises(HeadError, match="too few to hold any out"):  # without --cv a holdout is needed
        fit_head(path, head="logreg", output=tmp_path / "plain", plots=False)
    result = fit_head(path, head="logreg", cv=2, output=tmp_path / "h", plots=False)
    assert result.metrics["cv"]["rows"] == 6 and len(result.metrics["cv"]["fold_accuracy"]) == 2
