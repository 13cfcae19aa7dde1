"""The L2 sweep on numpy (small problems, no torch import) against the same sweep on torch."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
from sklearn.datasets import make_classification

from embedx.heads import make_head, sweep
from embedx.heads.arrays import NUMPY, torch_namespace
from embedx.heads.lbfgs import class_mean_init, lbfgs_members, lbfgs_softmax
from embedx.heads.members import calibrated_nlls, fit_scales, pick_best
from tests.test_heads import write_cache


def fit_both(monkeypatch, X, y, Xv, yv, **params):
    """The logreg head fitted on the numpy path, then on the torch path (numpy's row limit at 0)."""
    heads = {}
    for path, limit in (("numpy", sweep.NUMPY_MAX_ROWS), ("torch", 0)):
        with monkeypatch.context() as patched:
            patched.setattr(sweep, "NUMPY_MAX_ROWS", limit)
            heads[path] = make_head("logreg", **params).fit(X, y, X_val=Xv, y_val=yv)
    return heads["numpy"], heads["torch"]


@pytest.mark.parametrize("large", [False, True], ids=["full-batch", "large_l2_sweep"])
@pytest.mark.parametrize("n_classes", [2, 4])
def test_numpy_and_torch_sweeps_choose_the_same_C_and_probabilities(monkeypatch, n_classes, large):
    X, y = make_classification(n_samples=900, n_features=40, n_informative=12, n_classes=n_classes,
                               class_sep=0.8, flip_y=0.05, random_state=n_classes)
    X = X.astype(np.float32)
    if large:  # past the full-batch budget: class-mean start, per-member L-BFGS, best validation iterate
        monkeypatch.setattr(sweep, "LBFGS_BUDGET", 1.0)
    small, large_path = fit_both(monkeypatch, X[:600], y[:600], X[600:], y[600:], solver="torch")
    assert [row["phase"] for row in small.sweep_].count("refine") == (3 if large else 5)
    assert small.chosen_params_["C"] == large_path.chosen_params_["C"]
    for mine, theirs in zip(small.sweep_, large_path.sweep_, strict=True):
        assert mine["l2"] == theirs["l2"] and mine["val_accuracy"] == theirs["val_accuracy"]
        assert mine["val_loss"] == pytest.approx(theirs["val_loss"], rel=1e-3)
    np.testing.assert_allclose(small.predict_proba(X[600:]), large_path.predict_proba(X[600:]), atol=1e-4)
    assert np.mean(small.predict(X[600:]) == y[600:]) == np.mean(large_path.predict(X[600:]) == y[600:])


def test_default_head_same_C_and_polished_probabilities_with_sample_weights(monkeypatch):
    X, y = make_classification(n_samples=500, n_features=30, n_informative=10, n_classes=3, weights=[0.6, 0.3, 0.1],
                               random_state=7)
    small, large_path = fit_both(monkeypatch, X[:350], y[:350], X[350:], y[350:], class_weight="balanced")
    assert small.chosen_params_ == large_path.chosen_params_
    np.testing.assert_allclose(small.predict_proba(X[350:]), large_path.predict_proba(X[350:]), atol=1e-5)


def test_solvers_agree_across_array_libraries():
    X, y = make_classification(n_samples=400, n_features=16, n_informative=8, n_classes=3, random_state=2)
    X = ((X - X.mean(0)) / X.std(0)).astype(np.float32)
    weights = np.random.default_rng(0).uniform(0.5, 2.0, len(y))
    decays = np.array([1e-3, 1e-1])
    results = {}
    for xp in (NUMPY, torch_namespace()):
        W, b = class_mean_init(X, y, 3, weights, xp=xp)
        full = lbfgs_softmax(X, y, 3, weight_decays=decays, X_val=X, y_val=y, sample_weight=weights, xp=xp)
        members = lbfgs_members(X, y, 3, weight_decays=decays, init=(np.stack([W, W]), np.stack([b, b])),
                                X_val=X, y_val=y, sample_weight=weights, iterations=10, xp=xp)
        logits = np.stack([X @ full.member(g)[0][0] for g in range(2)])
        results[xp.name] = (W, b, full, members, fit_scales(X @ W + b, y, decays, 2.0, xp=xp),
                            calibrated_nlls(logits, y, xp=xp))
    (W, b, full, members, scales, nlls), (W_t, b_t, full_t, members_t, scales_t, nlls_t) = results.values()
    np.testing.assert_allclose(W, W_t, atol=1e-5)
    np.testing.assert_allclose(b, b_t, atol=1e-5)
    np.testing.assert_allclose(full.layers[0][0], full_t.layers[0][0], atol=1e-4)
    assert full.steps == full_t.steps
    np.testing.assert_allclose(members.layers[0][0], members_t.layers[0][0], atol=1e-3)
    np.testing.assert_array_equal(members.best_step, members_t.best_step)
    np.testing.assert_allclose(scales, scales_t, rtol=1e-5)
    np.testing.assert_allclose(nlls, nlls_t, rtol=1e-5)


def test_calibrated_losses_within_rounding_tie_and_the_first_wins():
    accuracy = np.array([0.80, 0.80, 0.80])
    assert pick_best(accuracy, np.array([2.0, 2.0 - 1e-9, 1.5]), 100) == 2
    assert pick_best(accuracy, np.array([2.0 + 1e-9, 2.0, 2.5]), 100) == 0  # float noise does not choose
    assert pick_best(accuracy, np.array([2.0, 1.99, np.nan]), 100) == 1


def test_fit_head_on_a_small_cache_never_imports_torch(tmp_path):
    X, y = make_classification(n_samples=300, n_features=24, n_informative=8, n_classes=3, random_state=0)
    path = write_cache(tmp_path / "small.h5", X.astype(np.float32), y, ["train"] * 200 + ["val"] * 100,
                       ["a", "b", "c"])
    code = (
        "import sys\n"
        "from embedx.cli.main import cli\n"
        "assert not {'torch', 'sklearn', 'h5py'} & set(sys.modules), 'the CLI imports what only commands need'\n"
        "from embedx.heads import fit_head\n"
        f"fit_head({str(path)!r}, output={str(tmp_path / 'head')!r}, plots=False)\n"
        f"fit_head({str(path)!r}, head='knn', output={str(tmp_path / 'knn')!r}, params={{'k': 'auto'}}, plots=False)\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_a_head_whose_classes_are_not_sorted_is_evaluated_like_the_same_head_sorted(tmp_path):
    # head.json may list classes in any order (weights columns to match); evaluate and report
    # mapped the true labels with searchsorted, which assumes sorted classes.
    import json
    import shutil

    from safetensors.numpy import load_file, save_file
    from sklearn.datasets import make_classification

    from embedx.heads import evaluate, fit_head
    from tests.test_heads import write_cache

    X, y = make_classification(n_samples=90, n_features=8, n_informative=5, n_classes=3, n_clusters_per_class=1,
                               random_state=0)
    cache = write_cache(tmp_path / "f.h5", X.astype(np.float32), y, ["train"] * 60 + ["val"] * 30, ["a", "b", "c"])
    fit_head(cache, output=tmp_path / "sorted", plots=False)
    shutil.copytree(tmp_path / "sorted", tmp_path / "reversed")
    record = json.loads((tmp_path / "reversed" / "head.json").read_text())
    record["classes"] = record["classes"][::-1]
    (tmp_path / "reversed" / "head.json").write_text(json.dumps(record))
    arrays = load_file(str(tmp_path / "reversed" / "weights.safetensors"))
    arrays["weight"], arrays["bias"] = arrays["weight"][:, ::-1].copy(), arrays["bias"][::-1].copy()
    save_file(arrays, str(tmp_path / "reversed" / "weights.safetensors"))
    want = evaluate(tmp_path / "sorted", cache, splits=["val"])["val"]
    got = evaluate(tmp_path / "reversed", cache, splits=["val"])["val"]
    assert got["accuracy"] == want["accuracy"] and got["n"] == want["n"] == 30
    assert np.asarray(got["confusion_matrix"]).trace() == np.asarray(want["confusion_matrix"]).trace()
