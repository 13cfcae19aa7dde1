"""Domain adaptation (embedx.heads.adapt): the closed forms, heads that carry their transform
into predict, evaluate and the bundle, untrusted statistics, the guard."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from safetensors.numpy import load_file, save_file

from embedx.cli.heads_cmd import ADAPT_CHOICES, ADAPT_DEFAULT
from embedx.cli.main import cli
from embedx.errors import ConfigError, FeatureMismatchError, HeadError
from embedx.heads import evaluate, fit_head, load_head
from embedx.heads.adapt import (
    ADAPT_FILE,
    DEFAULT_METHOD,
    METHODS,
    coral_matrix,
    fit_adapter,
    guard,
    shrunk_covariance,
)
from tests.test_heads import write_cache

DIM = 12
CLASSES = ["ants", "bees"]


def only_split(result: dict) -> dict:
    """The metrics of a one-split cache's evaluation (keyed by that split's name)."""
    (metrics,) = [value for value in result.values() if isinstance(value, dict)]
    return metrics


def samples(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Two correlated Gaussian classes in DIM dimensions (the class signal spread over all features)."""
    rng = np.random.default_rng(seed)
    mixing = np.random.default_rng(99).normal(size=(DIM, DIM)) / np.sqrt(DIM)
    y = rng.integers(0, 2, n)
    X = rng.normal(size=(n, DIM)) @ mixing + np.where(y[:, None] == 1, 0.9, -0.9) * mixing[0]
    return X.astype(np.float32), y


def shifted(X: np.ndarray) -> np.ndarray:
    """The target domain: every feature rescaled and moved (a per-feature affine shift)."""
    rng = np.random.default_rng(7)
    return (X * rng.uniform(0.2, 3.0, DIM) + rng.uniform(-4, 4, DIM)).astype(np.float32)


@pytest.fixture
def domains(tmp_path) -> dict[str, Path]:
    X, y = samples(300, seed=0)
    source = write_cache(tmp_path / "source.h5", X, y, ["train"] * 220 + ["val"] * 80, CLASSES)
    Xt, yt = samples(200, seed=1)
    target = write_cache(tmp_path / "target.h5", shifted(Xt), yt, ["train"] * 200, CLASSES)
    Xe, ye = samples(200, seed=2)
    labeled = write_cache(tmp_path / "target-labeled.h5", shifted(Xe), ye, ["val"] * 200, CLASSES)
    return {"source": source, "target": target, "labeled": labeled}


# -- the closed forms


def test_none_is_the_identity():
    X, _ = samples(50, seed=0)
    adapter = fit_adapter(X, shifted(X), method="none")
    assert adapter.source(X) is X and adapter.transform is None


def test_standardize_gives_each_domain_zero_mean_and_unit_variance():
    X, _ = samples(400, seed=0)
    Xt = shifted(samples(300, seed=1)[0])
    adapter = fit_adapter(X, Xt, method="standardize")
    for Z in (adapter.source(X), adapter.transform.apply(Xt)):
        np.testing.assert_allclose(Z.mean(axis=0), 0, atol=1e-5)
        np.testing.assert_allclose(Z.std(axis=0), 1, atol=1e-4)
    assert adapter.matrix is None


def test_coral_matrix_maps_the_source_covariance_onto_the_target_covariance():
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(2, DIM, DIM))
    source_cov, target_cov = a @ a.T + 0.1 * np.eye(DIM), b @ b.T + 0.1 * np.eye(DIM)
    A = coral_matrix(source_cov, target_cov)
    np.testing.assert_allclose(A.T @ source_cov @ A, target_cov, atol=1e-8)


@pytest.mark.parametrize("shrinkage", [0.0, 0.3, None], ids=["unshrunk", "fixed", "ledoit-wolf"])
def test_coral_source_covariance_after_the_transform_is_the_shrunk_target_covariance(shrinkage):
    X, _ = samples(400, seed=0)
    rng = np.random.default_rng(3)
    Xt = samples(300, seed=1)[0] @ rng.normal(size=(DIM, DIM))  # another covariance, not just other scales
    adapter = fit_adapter(X, Xt, method="coral", shrinkage=shrinkage)
    standardized_source = (X - adapter.source_mean) / adapter.source_scale
    source_cov, _ = shrunk_covariance(standardized_source, shrinkage)
    target_cov, used = shrunk_covariance(adapter.transform.apply(Xt), shrinkage)
    A = adapter.matrix.astype(np.float64)
    np.testing.assert_allclose(A.T @ source_cov @ A, target_cov, atol=1e-4)
    if shrinkage == 0.0:  # unshrunk: the mapped source rows have exactly the target's covariance
        np.testing.assert_allclose(np.cov(adapter.source(X), rowvar=False, bias=True), target_cov, atol=1e-3)
    else:
        assert 0 < used <= 1 and adapter.info["shrinkage"]["target"] == pytest.approx(used)
    assert not np.allclose(target_cov, np.eye(DIM), atol=0.05)


def test_unknown_method_and_bad_shrinkage_are_refused():
    X, _ = samples(40, seed=0)
    with pytest.raises(ConfigError, match="choose one of"):
        fit_adapter(X, X, method="dann")
    with pytest.raises(ConfigError, match="shrinkage"):
        fit_adapter(X, X, method="coral", shrinkage=1.5)


def test_cli_choices_are_the_library_methods():
    assert set(ADAPT_CHOICES) == set(METHODS) and ADAPT_DEFAULT == DEFAULT_METHOD


# -- heads that carry the adaptation


def test_adapted_head_records_the_method_and_predict_and_evaluate_apply_it(domains, tmp_path):
    plain = fit_head(domains["source"], output=tmp_path / "plain", plots=False)
    adapted = fit_head(domains["source"], adapt_to=domains["target"], adapt="standardize", output=tmp_path / "std",
                       plots=False)
    info = json.loads((adapted.output_dir / "head.json").read_text())["adaptation"]
    assert info["method"] == "standardize" and info["file"] == ADAPT_FILE
    assert info["target_cache"] == str(domains["target"]) and info["n_target"] == 200
    assert info["source_val_accuracy_before"] == pytest.approx(plain.metrics["val"]["accuracy"])
    stats = load_file(str(adapted.output_dir / ADAPT_FILE))
    Xt = shifted(samples(200, seed=1)[0])
    np.testing.assert_allclose(stats["mean"], Xt.mean(axis=0), rtol=1e-4, atol=1e-4)

    head = load_head(adapted.output_dir)
    Xe = shifted(samples(200, seed=2)[0])
    adapted_proba, mapped = head.predict_proba(Xe), head.adaptation_.apply(Xe)
    np.testing.assert_allclose(mapped, (Xe - stats["mean"]) / stats["scale"], rtol=1e-5, atol=1e-5)
    head.adaptation_ = None
    np.testing.assert_allclose(head.predict_proba(mapped), adapted_proba, atol=1e-6)
    assert not np.allclose(head.predict_proba(Xe), adapted_proba, atol=1e-3)  # the transform is what differs

    on_target = only_split(evaluate(adapted.output_dir, domains["labeled"]))["accuracy"]
    without = only_split(evaluate(plain.output_dir, domains["labeled"]))["accuracy"]
    assert on_target >= adapted.metrics["val"]["accuracy"] - 0.08  # the shift is undone
    assert on_target > without + 0.1


def test_none_and_coral_record_what_they_did(domains, tmp_path):
    none = fit_head(domains["source"], adapt_to=domains["target"], adapt="none", output=tmp_path / "none", plots=False)
    assert json.loads((none.output_dir / "head.json").read_text())["adaptation"]["method"] == "none"
    assert not (none.output_dir / ADAPT_FILE).exists() and load_head(none.output_dir).adaptation_ is None
    coral = fit_head(domains["source"], adapt_to=domains["target"], adapt="coral", output=tmp_path / "coral",
                     plots=False)
    info = coral.metrics["adaptation"]
    assert info["method"] == "coral" and info["shrinkage"]["rule"] == "ledoit-wolf"
    assert load_head(coral.output_dir).adaptation_ is not None


def test_selftrain_adds_confident_target_rows_with_their_pseudo_labels(domains, tmp_path):
    from embedx.heads.adapt import PSEUDO_LABEL_THRESHOLD

    standardize = fit_head(domains["source"], adapt_to=domains["target"], adapt="standardize",
                           output=tmp_path / "std", plots=False)
    selftrain = fit_head(domains["source"], adapt_to=domains["target"], adapt="selftrain", output=tmp_path / "self",
                         plots=False)
    info = json.loads((selftrain.output_dir / "head.json").read_text())["adaptation"]
    Xt = shifted(samples(200, seed=1)[0])
    confident = load_head(standardize.output_dir).predict_proba(Xt).max(axis=1) >= PSEUDO_LABEL_THRESHOLD
    assert info["method"] == "selftrain" and info["file"] == ADAPT_FILE
    assert info["self_training"]["pseudo_labeled"] == int(confident.sum()) and 0 < confident.sum() < 200
    assert sum(info["self_training"]["per_class"].values()) == int(confident.sum())
    assert selftrain.head.n_train_ == standardize.head.n_train_ + int(confident.sum())
    same_stats = [load_file(str(d / ADAPT_FILE)) for d in (standardize.output_dir, selftrain.output_dir)]
    np.testing.assert_array_equal(same_stats[0]["mean"], same_stats[1]["mean"])
    Xe = shifted(samples(200, seed=2)[0])
    assert not np.allclose(load_head(selftrain.output_dir).predict_proba(Xe),
                           load_head(standardize.output_dir).predict_proba(Xe), atol=1e-4)


def test_selftrain_refit_on_train_val_keeps_the_pseudo_labeled_target_rows(domains, tmp_path):
    """--refit trains the final head on train+val plus the same confident target rows as the
    selftrain fit, as its head.json says (not on the source rows alone)."""
    fits = {method: fit_head(domains["source"], adapt_to=domains["target"], adapt=method, refit=True,
                             output=tmp_path / method, plots=False) for method in ("standardize", "selftrain")}
    pseudo = fits["selftrain"].metrics["adaptation"]["self_training"]["pseudo_labeled"]
    assert pseudo > 0 and fits["selftrain"].head.chosen_params_["refit"] == "train+val"
    assert fits["selftrain"].head.n_train_ == fits["standardize"].head.n_train_ + pseudo == 300 + pseudo


def test_guard_compares_with_a_plain_head_trained_on_the_same_views(tmp_path):
    """The guard's "before" is the head fit-head makes without adaptation: with a cache's views,
    one trained on clean rows + views, as the adapted head is."""
    X, y = samples(300, seed=0)
    rng = np.random.default_rng(3)
    source_rows = np.repeat(np.arange(220), 2)  # two noisy views of every train row
    noisy = X[source_rows] + rng.normal(scale=2.5, size=(len(source_rows), DIM)).astype(np.float32)
    source = write_cache(tmp_path / "views.h5", X, y, ["train"] * 220 + ["val"] * 80, CLASSES,
                         views=(noisy, source_rows))
    Xt, yt = samples(200, seed=1)
    target = write_cache(tmp_path / "target.h5", shifted(Xt), yt, ["train"] * 200, CLASSES)
    plain = fit_head(source, output=tmp_path / "plain", plots=False)
    clean = fit_head(source, views=False, output=tmp_path / "clean", plots=False)
    assert plain.metrics["n_train_views"] == 440
    assert plain.metrics["val"]["accuracy"] != clean.metrics["val"]["accuracy"]  # the views matter here
    adapted = fit_head(source, adapt_to=target, adapt="coral", output=tmp_path / "coral", plots=False)
    assert adapted.metrics["adaptation"]["source_val_accuracy_before"] == plain.metrics["val"]["accuracy"]


def test_a_target_cache_of_another_model_is_refused_naming_the_difference(domains, tmp_path):
    X, y = samples(50, seed=4)
    other = write_cache(tmp_path / "other.h5", X, y, ["train"] * 50, CLASSES, backbone="othernet")
    with pytest.raises(FeatureMismatchError, match=r"backbone: 'fakenet' vs 'othernet'"):
        fit_head(domains["source"], adapt_to=other, output=tmp_path / "h", plots=False)
    half = write_cache(tmp_path / "half.h5", X, y, ["train"] * 50, CLASSES, dtype="float16")
    with pytest.raises(FeatureMismatchError, match="dtype"):
        fit_head(domains["source"], adapt_to=half, output=tmp_path / "h", plots=False)
    with pytest.raises(ConfigError, match="adapt_to"):
        fit_head(domains["source"], adapt="coral", output=tmp_path / "h", plots=False)


def test_guard_warns_when_adaptation_costs_source_val_accuracy(tmp_path, caplog):
    assert guard(0.95, 0.945, "coral") is None
    assert "-2.0 points" in guard(0.95, 0.93, "coral")
    # A cosine k-NN head on features where only feature 0 tells the classes apart; the target's
    # features all follow one direction, so recolouring with its covariance buries feature 0.
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 300)
    X = rng.normal(size=(300, DIM)).astype(np.float32)
    X[:, 0] = np.where(y == 1, 1.5, -1.5) + 0.3 * rng.normal(size=300)
    source = write_cache(tmp_path / "s.h5", X, y, ["train"] * 200 + ["val"] * 100, CLASSES)
    direction = rng.normal(size=DIM)
    Xt = (rng.normal(size=(300, 1)) * direction + 0.01 * rng.normal(size=(300, DIM))).astype(np.float32)
    target = write_cache(tmp_path / "t.h5", Xt, np.zeros(300, int), ["train"] * 300, CLASSES)
    with caplog.at_level("WARNING", logger="embedx.heads.adapt"):
        result = fit_head(source, head="knn", adapt_to=target, adapt="coral", output=tmp_path / "h", plots=False)
    info = result.metrics["adaptation"]
    assert info["source_val_accuracy_after"] < info["source_val_accuracy_before"] - 0.01
    assert "lowered source-val accuracy" in info["warning"] and info["warning"] in caplog.text


# -- untrusted statistics in a head directory


@pytest.fixture
def adapted_dir(domains, tmp_path) -> Path:
    return fit_head(domains["source"], adapt_to=domains["target"], adapt="standardize", output=tmp_path / "head",
                    plots=False).output_dir


def _tamper_arrays(head_dir: Path, **arrays) -> None:
    stats = {**load_file(str(head_dir / ADAPT_FILE)), **arrays}
    save_file({k: v for k, v in stats.items() if v is not None}, str(head_dir / ADAPT_FILE))


def _tamper_json(head_dir: Path, **fields) -> None:
    info = json.loads((head_dir / "head.json").read_text())
    info["adaptation"] = {**info["adaptation"], **fields}
    (head_dir / "head.json").write_text(json.dumps(info))


@pytest.mark.parametrize("tamper, message", [
    (lambda d: _tamper_arrays(d, mean=np.zeros(DIM + 1, np.float32)), "must be 12 floats"),
    (lambda d: _tamper_arrays(d, scale=np.full(DIM, np.nan, np.float32)), "NaN or infinite"),
    (lambda d: _tamper_arrays(d, scale=-np.ones(DIM, np.float32)), "positive"),
    (lambda d: _tamper_arrays(d, mean=np.zeros((DIM, 2), np.float32)), "must be 12 floats"),
    (lambda d: _tamper_arrays(d, mean=np.zeros(DIM, np.int32)), "must be 12 floats"),
    (lambda d: (d / ADAPT_FILE).write_bytes(b"not safetensors"), "cannot read the adaptation statistics"),
    (lambda d: (d / ADAPT_FILE).unlink(), "missing"),
    (lambda d: _tamper_json(d, file="../weights.safetensors"), "file name in the head directory"),
    (lambda d: _tamper_json(d, method="magic"), "adaptation.method"),
    (lambda d: _tamper_json(d, method=["standardize"]), "adaptation.method"),
], ids=["long", "nan", "negative", "2d", "int", "garbage", "missing", "escape", "method", "method-type"])
def test_tampered_adaptation_statistics_are_one_head_error_line(adapted_dir, domains, tamper, message):
    tamper(adapted_dir)
    with pytest.raises(HeadError, match=message) as caught:
        load_head(adapted_dir)
    assert "\n" not in str(caught.value)
    result = CliRunner().invoke(cli, ["evaluate", "--head", str(adapted_dir), "--cache", str(domains["labeled"])])
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert len(result.stderr.strip().splitlines()) == 1


def test_adaptation_that_is_not_an_object_is_refused(adapted_dir):
    info = json.loads((adapted_dir / "head.json").read_text())
    info["adaptation"] = "standardize"
    (adapted_dir / "head.json").write_text(json.dumps(info))
    with pytest.raises(HeadError, match="'adaptation' must be an object"):
        load_head(adapted_dir)


# -- the CLI


def test_cli_fit_head_adapt_to_then_evaluate_the_target(domains, tmp_path):
    runner = CliRunner()
    out = tmp_path / "cli-head"
    result = runner.invoke(cli, ["fit-head", "--cache", str(domains["source"]), "--adapt-to", str(domains["target"]),
                                 "-o", str(out)])
    assert result.exit_code == 0, result.output
    assert f"adaptation {DEFAULT_METHOD} to {domains['target']}: source-val accuracy" in result.output
    result = runner.invoke(cli, ["evaluate", "--head", str(out), "--cache", str(domains["labeled"]), "--json"])
    assert result.exit_code == 0 and only_split(json.loads(result.output))["accuracy"] > 0.7
    result = runner.invoke(cli, ["fit-head", "--cache", str(domains["source"]), "--adapt", "magic"])
    assert result.exit_code == 2


# -- the bundle carries the transform


def test_bundle_of_an_adapted_head_equals_the_head(tmp_path):
    import onnx
    from PIL import Image

    from embedx.bundle import bundle
    from embedx.extract import extract
    from embedx.predict import HeadPipeline, load_model
    from tests.bundle_fixtures import tiny_backbone, write_images

    onnx.save(tiny_backbone(), tmp_path / "tiny.onnx")
    images, dark = tmp_path / "images", tmp_path / "dark"
    for i, name in enumerate(CLASSES):
        for path in write_images(images / name, 8, seed=20 + i):
            (dark / name).mkdir(parents=True, exist_ok=True)
            pixels = (np.asarray(Image.open(path).convert("RGB"), np.float32) * 0.4).astype(np.uint8)
            Image.fromarray(pixels).save(dark / name / f"{path.stem}.png")
    caches = {}
    for name, folder in (("source", images), ("target", dark)):
        caches[name] = tmp_path / f"{name}.h5"
        extract(folder, backbone=str(tmp_path / "tiny.onnx"), output=caches[name], workers=0, device="cpu",
                val_fraction=0.25 if name == "source" else None)
    head_dir = fit_head(caches["source"], adapt_to=caches["target"], adapt="standardize", output=tmp_path / "head",
                        plots=False).output_dir
    files = sorted(dark.rglob("*.png"))
    pipeline = HeadPipeline(head_dir, device="cpu")
    assert pipeline.head.adaptation_ is not None
    expected = pipeline.predict_proba(np.stack([pipeline.prepare(f) for f in files]))
    for with_preprocess in (False, True):
        model = load_model(bundle(head_dir, tmp_path / f"model-{with_preprocess}.onnx",
                                  with_preprocess=with_preprocess), device="cpu")
        found = model.predict_proba(np.stack([model.prepare(f) for f in files]))
        np.testing.assert_allclose(found, expected, atol=1e-4)
    features = pipeline.backbone.run(np.stack([pipeline.prepare(f) for f in files]))
    adapted_logits = pipeline.head.logits(features)
    pipeline.head.adaptation_ = None  # without its transform the head scores these rows otherwise
    assert np.abs(pipeline.head.logits(features) - adapted_logits).max() > 1e-2


# -- real data


@pytest.mark.slow
def test_hymenoptera_blur_selftrain_beats_no_adaptation(hymenoptera, hymenoptera_lite0, tmp_path):
    from bench.adapt import corrupt_folder
    from embedx.extract import extract

    source, _ = hymenoptera_lite0
    caches = {}
    for split in ("train", "val"):
        corrupt_folder(hymenoptera / split, tmp_path / split, "blur")
        caches[split] = tmp_path / f"blur-{split}.h5"
        extract(tmp_path / split, backbone="efficientnet_lite0", output=caches[split], device="cpu")
    accuracy = {}
    for method in ("none", "selftrain"):
        head = fit_head(source, adapt_to=caches["train"], adapt=method, output=tmp_path / method, plots=False)
        accuracy[method] = only_split(evaluate(head.output_dir, caches["val"]))["accuracy"]
    assert accuracy["selftrain"] > accuracy["none"] + 0.1  # bench/adapt.py measured 0.739 -> 0.908


def test_selftrain_refits_on_the_source_rows_as_mapped_not_as_the_first_fit_left_them(tmp_path, monkeypatch):
    # The first fit standardizes its training rows in place; self-training fitted again on that
    # array (train + views mapped by the adapter), so its source rows were standardized twice.
    import embedx.heads.adapt as adapt_module
    from embedx.cache import read_cache, read_views

    X, y = samples(300, seed=0)
    rng = np.random.default_rng(3)
    source_rows = np.repeat(np.arange(220), 2)
    views = X[source_rows] * 1.5 + 1.0 + rng.normal(scale=0.3, size=(len(source_rows), DIM)).astype(np.float32)
    source = write_cache(tmp_path / "views.h5", X, y, ["train"] * 220 + ["val"] * 80, CLASSES,
                         views=(views, source_rows))
    Xt, yt = samples(200, seed=1)
    target = write_cache(tmp_path / "target.h5", shifted(Xt), yt, ["train"] * 200, CLASSES)
    seen = {}
    original = adapt_module.self_train

    def spy(adapter, head, new_head, X_train, y_train, X_val, y_val):
        seen["rows"], seen["adapter"] = X_train.copy(), adapter
        return original(adapter, head, new_head, X_train, y_train, X_val, y_val)

    monkeypatch.setattr(adapt_module, "self_train", spy)
    fit_head(source, adapt_to=target, adapt="selftrain", output=tmp_path / "h", plots=False)
    clean = read_cache(source).features[:220]
    expected = seen["adapter"].source(np.concatenate([clean, read_views(source, sources=np.arange(220)).features]))
    np.testing.assert_allclose(seen["rows"], expected, atol=1e-5)
