"""Metrics against scikit-learn on known cases; ECE and temperature scaling; the PNGs."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn import metrics as skm

from embedx.errors import HeadError
from embedx.metrics import (
    bootstrap_intervals,
    classification_metrics,
    expected_calibration_error,
    fit_temperature,
    log_loss,
    plot_confusion_matrix,
    plot_reliability,
    reliability_bins,
    softmax,
    top_k_accuracy,
    wilson_interval,
)


@pytest.fixture(scope="module")
def case():
    rng = np.random.default_rng(0)
    n, classes = 500, 8
    y = rng.integers(0, classes, n)
    logits = rng.normal(0, 1, (n, classes)).astype(np.float32)
    logits[np.arange(n), y] += 1.5  # informative but far from perfect
    return y, logits


def test_softmax_rows_sum_to_one_and_handle_large_logits():
    proba = softmax(np.array([[1000.0, 0.0, -1000.0], [1.0, 2.0, 3.0]]), 2.0)
    np.testing.assert_allclose(proba.sum(axis=1), 1.0, atol=1e-6)
    assert proba[0, 0] == pytest.approx(1.0)
    np.testing.assert_allclose(proba[1], np.exp([0.5, 1.0, 1.5]) / np.exp([0.5, 1.0, 1.5]).sum(), rtol=1e-6)


def test_metrics_agree_with_sklearn(case):
    y, logits = case
    names = [f"c{i}" for i in range(8)]
    m = classification_metrics(y, logits, class_names=names)
    proba = softmax(logits)
    predicted = proba.argmax(1)
    assert m["n"] == 500
    assert m["accuracy"] == pytest.approx(skm.accuracy_score(y, predicted))
    assert m["balanced_accuracy"] == pytest.approx(skm.balanced_accuracy_score(y, predicted))
    assert m["macro_f1"] == pytest.approx(skm.f1_score(y, predicted, average="macro"))
    proba64 = proba.astype(np.float64) / proba.astype(np.float64).sum(axis=1, keepdims=True)
    assert m["log_loss"] == pytest.approx(skm.log_loss(y, proba64, labels=range(8)), rel=1e-4)
    assert m["top5_accuracy"] == pytest.approx(skm.top_k_accuracy_score(y, proba, k=5, labels=range(8)))
    assert m["confusion_matrix"] == skm.confusion_matrix(y, predicted, labels=range(8)).tolist()
    precision, recall, f1, support = skm.precision_recall_fscore_support(y, predicted, labels=range(8), zero_division=0)
    assert m["per_class"]["c3"] == pytest.approx(
        {"precision": precision[3], "recall": recall[3], "f1": f1[3], "support": support[3]}
    )
    # without a temperature the "calibrated" numbers are the raw ones
    assert m["temperature"] == 1.0 and m["ece_calibrated"] == m["ece"]


def test_top5_only_with_more_than_five_classes():
    y = np.array([0, 1, 2, 1])
    logits = np.eye(3, dtype=np.float32)[[0, 1, 2, 0]]
    m = classification_metrics(y, logits, class_names=["a", "b", "c"])
    assert "top5_accuracy" not in m
    assert m["accuracy"] == 0.75
    assert m["per_class"]["b"] == {"precision": 1.0, "recall": 0.5, "f1": pytest.approx(2 / 3), "support": 2}


def test_top_k_and_log_loss_by_hand():
    proba = np.array([[0.5, 0.3, 0.2], [0.1, 0.2, 0.7]])
    assert top_k_accuracy(np.array([1, 0]), proba, 1) == 0.0
    assert top_k_accuracy(np.array([1, 0]), proba, 2) == 0.5
    assert log_loss(np.array([0, 2]), proba) == pytest.approx(-(np.log(0.5) + np.log(0.7)) / 2)


def test_ece_on_a_known_case():
    # every prediction has confidence 0.8 but only half are right: ECE = |0.5 - 0.8| = 0.3
    proba = np.tile([0.8, 0.2], (10, 1))
    y = np.array([0] * 5 + [1] * 5)
    assert expected_calibration_error(y, proba) == pytest.approx(0.3)
    bins = reliability_bins(y, proba)
    assert bins["counts"].sum() == 10 and bins["counts"][11] == 10  # 0.8 falls in (0.7333, 0.8]
    # perfectly calibrated: two bins, each as accurate as it is confident
    proba = np.array([[1.0, 0.0]] * 4 + [[0.6, 0.4]] * 5)
    y = np.array([0] * 4 + [0, 0, 0, 1, 1])
    assert expected_calibration_error(y, proba) == pytest.approx(0.0, abs=1e-12)


def test_temperature_softens_overconfident_logits_and_ece_drops(case):
    y, logits = case
    overconfident = logits * 4.0
    temperature = fit_temperature(overconfident, y)
    assert temperature > 2.0
    before = expected_calibration_error(y, softmax(overconfident))
    after = expected_calibration_error(y, softmax(overconfident, temperature))
    assert after < before / 2
    m = classification_metrics(y, overconfident, class_names=list(range(8)), temperature=temperature)
    assert m["ece_calibrated"] == pytest.approx(after, abs=1e-6) and m["log_loss_calibrated"] < m["log_loss"]
    assert m["accuracy"] == pytest.approx(np.mean(overconfident.argmax(1) == y))  # T never changes the argmax


def test_temperature_sharpens_underconfident_logits(case):
    y, logits = case
    assert fit_temperature(logits * 0.2, y) < 0.5


def test_metrics_refuse_bad_input():
    with pytest.raises(HeadError, match="class names"):
        classification_metrics(np.array([0]), np.zeros((1, 3)), class_names=["a", "b"])
    with pytest.raises(HeadError, match="zero samples"):
        classification_metrics(np.array([], dtype=int), np.zeros((0, 2)), class_names=["a", "b"])
    with pytest.raises(HeadError, match="zero validation samples"):
        fit_temperature(np.zeros((0, 2)), np.array([], dtype=int))


def test_plots_are_png_files(case, tmp_path):
    y, logits = case
    matrix = skm.confusion_matrix(y, logits.argmax(1))
    cm = plot_confusion_matrix(matrix, [f"class {i}" for i in range(8)], tmp_path / "cm.png")
    rel = plot_reliability(y, logits * 3, tmp_path / "rel.png", temperature=fit_temperature(logits * 3, y))
    for path in (cm, rel):
        data = path.read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000


@pytest.mark.parametrize("correct,total", [(145, 153), (0, 10), (10, 10), (1, 1), (37, 80), (999, 1000)])
def test_wilson_interval_matches_scipy(correct, total):
    from scipy.stats import binomtest

    expected = binomtest(correct, total).proportion_ci(confidence_level=0.95, method="wilson")
    low, high = wilson_interval(correct, total)
    # scipy uses the exact normal quantile (1.95996...), embedx the usual 1.96.
    assert low == pytest.approx(expected.low, abs=2e-4)
    assert high == pytest.approx(expected.high, abs=2e-4)
    assert 0.0 <= low <= correct / total <= high <= 1.0


def test_wilson_interval_narrows_with_more_samples_and_wider_z():
    small = wilson_interval(45, 50)
    large = wilson_interval(4500, 5000)
    assert large[1] - large[0] < small[1] - small[0]
    wide = wilson_interval(45, 50, z=2.58)
    assert wide[0] < small[0] and wide[1] > small[1]


@pytest.mark.parametrize("correct,total", [(0, 0), (5, 4), (-1, 4)])
def test_wilson_interval_refuses_impossible_counts(correct, total):
    with pytest.raises(HeadError, match="Wilson"):
        wilson_interval(correct, total)


def test_metrics_carry_the_accuracy_interval(case):
    y, logits = case
    metrics = classification_metrics(y, logits, class_names=[str(i) for i in range(logits.shape[1])])
    low, high = metrics["accuracy_ci"]
    assert low < metrics["accuracy"] < high
    assert (low, high) == wilson_interval(round(metrics["accuracy"] * len(y)), len(y))
    top5_low, top5_high = metrics["top5_accuracy_ci"]  # 8 classes: top-5 is reported, with its interval
    assert top5_low < metrics["top5_accuracy"] < top5_high and metrics["top5_accuracy"] >= metrics["accuracy"]
    for name in ("balanced_accuracy", "macro_f1"):  # bootstrap intervals around the point estimates
        low, high = metrics[f"{name}_ci"]
        assert low < metrics[name] < high < 1.0


@pytest.mark.filterwarnings("ignore:y_pred contains classes not in y_true")
@pytest.mark.parametrize("n_classes, absent", [(2, 0), (3, 0), (5, 1)])
def test_bootstrap_intervals_equal_resampling_the_rows(n_classes, absent):
    """The multinomial-over-cells shortcut gives the intervals of resampling rows and scoring
    each resample with scikit-learn (a class the labels never name counts as F1 0, as there)."""
    rng = np.random.default_rng(n_classes)
    seen = n_classes - absent
    y = rng.integers(0, seen, 200)
    predicted = np.where(rng.random(200) < 0.8, y, rng.integers(0, n_classes, 200))
    got = bootstrap_intervals(y, predicted, n_classes)
    balanced, macro = [], []
    for _ in range(2000):
        rows = rng.integers(0, len(y), len(y))
        balanced.append(skm.balanced_accuracy_score(y[rows], predicted[rows]))
        macro.append(skm.f1_score(y[rows], predicted[rows], labels=np.arange(n_classes), average="macro",
                                  zero_division=0))
    for key, values in (("balanced_accuracy_ci", balanced), ("macro_f1_ci", macro)):
        np.testing.assert_allclose(got[key], np.percentile(values, [2.5, 97.5]), atol=0.015, err_msg=key)
    assert got == bootstrap_intervals(y, predicted, n_classes)  # a fixed seed: the same interval every time
    perfect = bootstrap_intervals(y, y, n_classes)
    assert perfect["balanced_accuracy_ci"] == [1.0, 1.0]
