"""Heads: the contract over every head type, the sweep, fit_head/evaluate on real cache files."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from sklearn.datasets import make_classification

from embedx.errors import ConfigError, FeatureMismatchError, HeadError, NotFittedError
from embedx.heads import HEAD_TYPES, evaluate, fit_head, load_head, make_head

#: Small settings so every head trains in well under a second on tiny data.
FAST = {
    "logreg": {},
    "linear": {"epochs": 5},
    "mlp": {"hidden": 16, "epochs": 5},
    "knn": {"k": 5},
}
HEADS = sorted(FAST)


def test_every_registered_head_is_tested():
    assert set(HEAD_TYPES) == set(FAST)


@pytest.fixture(scope="module")
def data():
    X, y = make_classification(n_samples=240, n_features=12, n_informative=6, n_redundant=2, n_classes=3,
                               class_sep=1.5, random_state=0)
    X = X.astype(np.float32)
    return X[:180], y[:180], X[180:], y[180:]


@pytest.fixture(scope="module")
def fitted(data):
    X, y, Xv, yv = data
    return {name: make_head(name, **FAST[name]).fit(X, y, X_val=Xv, y_val=yv) for name in HEADS}


# --------------------------------------------------------------------------- contract, every head


@pytest.mark.parametrize("name", HEADS)
def test_probabilities_sum_to_one_and_predict_gives_labels(name, fitted, data):
    head = fitted[name]
    _, _, Xv, yv = data
    proba = head.predict_proba(Xv)
    assert proba.shape == (len(Xv), 3)
    np.testing.assert_allclose(proba.sum(axis=1), 1.0, atol=1e-5)
    assert (proba >= 0).all()
    assert set(head.predict(Xv)) <= set(head.classes_.tolist())
    assert list(head.classes_) == [0, 1, 2]
    assert np.mean(head.predict(Xv) == yv) > 0.6  # well above chance (1/3) on separable data


@pytest.mark.parametrize("name", HEADS)
def test_save_load_round_trip_gives_identical_probabilities(name, fitted, data, tmp_path):
    head = fitted[name]
    _, _, Xv, _ = data
    head.save(tmp_path / name)
    loaded = load_head(tmp_path / name)
    assert type(loaded) is type(head)
    np.testing.assert_array_equal(loaded.predict_proba(Xv), head.predict_proba(Xv))
    np.testing.assert_array_equal(loaded.predict(Xv), head.predict(Xv))
    assert loaded.temperature_ == head.temperature_
    info = json.loads((tmp_path / name / "head.json").read_text())
    assert info["schema_version"] == 1 and info["head_type"] == name and info["feature_dim"] == 12
    assert info["weights_file"] == "weights.safetensors" and (tmp_path / name / "weights.safetensors").is_file()


@pytest.mark.parametrize("name", HEADS)
def test_wrong_feature_dimension_is_refused(name, fitted, data):
    _, _, Xv, _ = data
    with pytest.raises(FeatureMismatchError, match="dimension 12"):
        fitted[name].predict_proba(Xv[:, :10])


@pytest.mark.parametrize("name", HEADS)
def test_use_before_fit_is_refused(name, tmp_path):
    head = make_head(name)
    X = np.zeros((2, 12), dtype=np.float32)
    for call in (head.predict_proba, head.predict, head.logits):
        with pytest.raises(NotFittedError, match="not fitted"):
            call(X)
    with pytest.raises(NotFittedError):
        head.save(tmp_path / "x")
    with pytest.raises(NotFittedError):
        head.to_onnx()


@pytest.mark.parametrize("name", HEADS)
def test_same_seed_gives_identical_probabilities(name, data):
    X, y, Xv, yv = data
    first = make_head(name, seed=3, **FAST[name]).fit(X, y, X_val=Xv, y_val=yv).predict_proba(Xv)
    second = make_head(name, seed=3, **FAST[name]).fit(X, y, X_val=Xv, y_val=yv).predict_proba(Xv)
    np.testing.assert_array_equal(first, second)


@pytest.mark.parametrize("name", HEADS)
def test_to_onnx_matches_numpy_logits(name, fitted, data):
    import onnxruntime as ort

    head = fitted[name]
    _, _, Xv, _ = data
    model = head.to_onnx()
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["features"]
    assert [o.name for o in session.get_outputs()] == ["logits"]
    for batch in (Xv[:1], Xv):
        (out,) = session.run(["logits"], {"features": batch})
        np.testing.assert_allclose(out, head.logits(batch), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name", HEADS)
def test_float16_features_and_string_labels(name, data):
    X, y, Xv, yv = data
    names = np.array(["cat", "dog", "emu"])
    head = make_head(name, **FAST[name]).fit(X.astype(np.float16), names[y], X_val=Xv.astype(np.float16),
                                             y_val=names[yv])
    assert list(head.classes_) == ["cat", "dog", "emu"]
    assert head.predict(Xv.astype(np.float16)).dtype.kind == "U"


@pytest.mark.parametrize("name", HEADS)
def test_copy_false_overwrites_X_and_gives_the_same_head(name, data):
    X, y, Xv, yv = data
    expected = make_head(name, seed=3, **FAST[name]).fit(X, y, X_val=Xv, y_val=yv).predict_proba(Xv)
    mine, mine_val = X.copy(), Xv.copy()
    head = make_head(name, seed=3, **FAST[name]).fit(mine, y, X_val=mine_val, y_val=yv, copy=False)
    np.testing.assert_allclose(head.predict_proba(Xv), expected, rtol=1e-5, atol=1e-6)
    assert not np.array_equal(mine, X), "copy=False standardizes/normalizes the training rows in place"
    np.testing.assert_array_equal(mine_val, Xv)  # validation rows are never overwritten
    np.testing.assert_array_equal(make_head(name, seed=3, **FAST[name]).fit(X.copy(), y, X_val=Xv, y_val=yv)
                                  .predict_proba(Xv), expected)  # the default copies


@pytest.mark.parametrize("name", HEADS)
def test_fit_without_validation_data_holds_out_rows(name, data):
    X, y, Xv, yv = data
    head = make_head(name, **FAST[name]).fit(X, y)
    assert np.mean(head.predict(Xv) == yv) > 0.6
    assert head.temperature_ == 1.0  # no validation data: no calibration


def test_single_class_and_bad_labels_are_refused(data):
    X, y, _, _ = data
    with pytest.raises(HeadError, match="at least 2 classes"):
        make_head("logreg").fit(X, np.zeros(len(X)))
    with pytest.raises(HeadError, match="one label per row"):
        make_head("logreg").fit(X, y[:-1])
    with pytest.raises(ConfigError, match="unknown head type"):
        make_head("svm")


def test_inference_is_torch_free(fitted, data, tmp_path):
    fitted["mlp"].save(tmp_path / "mlp")
    np.save(tmp_path / "x.npy", data[2])
    code = (
        "import sys, numpy as np\n"
        "from embedx.heads import load_head\n"
        f"head = load_head({str(tmp_path / 'mlp')!r})\n"
        f"head.predict_proba(np.load({str(tmp_path / 'x.npy')!r}))\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\n"
        "assert 'sklearn' not in sys.modules, 'sklearn was imported'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_load_refuses_other_schema_and_missing_dir(fitted, tmp_path):
    fitted["logreg"].save(tmp_path / "h")
    info = json.loads((tmp_path / "h" / "head.json").read_text())
    info["schema_version"] = 99
    (tmp_path / "h" / "head.json").write_text(json.dumps(info))
    with pytest.raises(HeadError, match="schema_version 99.*refit"):
        load_head(tmp_path / "h")
    with pytest.raises(HeadError, match="not a head directory"):
        load_head(tmp_path / "nothing")


# --------------------------------------------------------------------------- head.json: HeadRecord


def saved_fields(head, tmp_path: Path, **cache) -> dict:
    head.save(tmp_path / "h", extra={"cache": cache} if cache else None)
    return json.loads((tmp_path / "h" / "head.json").read_text())


@pytest.mark.parametrize(("field", "value", "message"), [
    ("schema_version", 2, "schema_version 2 .*reads schema_version 1.*refit"),
    ("classes", "ants", "'classes' must be a non-empty list of class names"),
    ("classes", [], "'classes' must be a non-empty list"),
    ("classes", [["ants"], "bees"], "'classes' must be a non-empty list"),
    ("feature_dim", "12", "'feature_dim' must be a positive integer"),
    ("feature_dim", True, "'feature_dim' must be a positive integer"),
    ("head_type", None, "'head_type' must be the name of a head type"),
    ("temperature", 0, "'temperature' must be a positive number"),
    ("temperature", "1.0", "'temperature' must be a positive number"),
    ("weights_file", "../elsewhere.safetensors", "'weights_file' must be a file name in the head directory"),
    ("init_params", [], "'init_params' must be an object"),
    ("cache", {"onnx_path": 3}, "cache.onnx_path must be a string"),
])
def test_a_malformed_head_json_is_one_head_error_line(field, value, message, fitted, tmp_path):
    from embedx.heads import HeadRecord

    fields = {**saved_fields(fitted["logreg"], tmp_path), field: value}
    (tmp_path / "h" / "head.json").write_text(json.dumps(fields))
    with pytest.raises(HeadError, match=message) as raised:
        HeadRecord.read(tmp_path / "h")
    assert "\n" not in str(raised.value) and "head.json" in str(raised.value)
    with pytest.raises(HeadError, match=message):
        load_head(tmp_path / "h")


def test_head_json_that_is_not_an_object_is_refused(tmp_path):
    from embedx.heads import HeadRecord

    (tmp_path / "head.json").write_text("[1, 2]")
    with pytest.raises(HeadError, match="JSON list, not an object"):
        HeadRecord.read(tmp_path)


def test_record_round_trips_and_loads_from_the_record(fitted, data, tmp_path):
    from embedx.heads import HeadRecord

    fields = saved_fields(fitted["knn"], tmp_path)
    record = HeadRecord.read(tmp_path / "h")
    assert record.to_dict() == fields and record.classes == (0, 1, 2) and record.class_names == ["0", "1", "2"]
    assert record.feature_dim == 12 and record.head_type == "knn" and record.cache == {}
    _, _, Xv, _ = data
    np.testing.assert_array_equal(load_head(record).predict_proba(Xv), fitted["knn"].predict_proba(Xv))


def test_backbone_onnx_is_found_and_checked_against_its_sha256(fitted, tmp_path):
    from embedx.errors import CacheMismatchError, OnnxModelError
    from embedx.fsio import sha256_file
    from embedx.heads import HeadRecord

    backbone = tmp_path / "backbone.onnx"
    backbone.write_bytes(b"stand-in for an ONNX file")
    saved_fields(fitted["logreg"], tmp_path, backbone="fakenet", onnx_path=str(backbone),
                 onnx_sha256=sha256_file(backbone))
    assert HeadRecord.read(tmp_path / "h").backbone_onnx() == backbone
    backbone.write_bytes(b"another file at the same path")
    with pytest.raises(CacheMismatchError, match="sha256 .*re-extract the cache and refit"):
        HeadRecord.read(tmp_path / "h").backbone_onnx()
    backbone.unlink()
    with pytest.raises(OnnxModelError, match="is missing; re-export it with `embedx export fakenet`"):
        HeadRecord.read(tmp_path / "h").backbone_onnx()
    saved_fields(fitted["logreg"], tmp_path)  # a head saved without a cache record
    with pytest.raises(HeadError, match="no cache.onnx_path"):
        HeadRecord.read(tmp_path / "h").backbone_onnx()


def test_head_record_builds_the_cache_fields_from_the_cache_meta(fitted):
    from embedx.cache import CacheMeta
    from embedx.heads import head_record

    meta = CacheMeta(backbone="fakenet", weights_tag="none", weights_arg="none", onnx_path="/x.onnx",
                     onnx_sha256="0" * 64, feature_layer="pool", feature_dim=12, preprocess={"input_size": 32})
    record = head_record(fitted["mlp"], meta, cache_path="feats.h5", metrics={"n_val": 3}, val_source="val",
                         fit_seconds=1.5)
    # the path absolute: a report or fine-tune run from another folder finds the same file
    assert record.cache == {**meta.to_dict(), "fingerprint": meta.fingerprint, "path": str(Path("feats.h5").absolute())}
    assert record.fields["metrics"] == {"n_val": 3} and record.fields["fit_seconds"] == 1.5
    assert record.head_type == "mlp" and record.fields["schema_version"] == 1


# --------------------------------------------------------------------------- choices the heads make


def test_sweep_regularizes_more_when_data_is_scarce_and_noisy():
    # few rows, many noise features: only heavy regularization generalizes
    X, y = make_classification(n_samples=80, n_features=300, n_informative=3, n_redundant=0, flip_y=0.1,
                               class_sep=1.0, random_state=1)
    scarce = make_head("logreg").fit(X[:50], y[:50], X_val=X[50:], y_val=y[50:])
    # many rows, a few clean features: weak regularization is best
    X, y = make_classification(n_samples=3000, n_features=5, n_informative=5, n_redundant=0, flip_y=0.0,
                               class_sep=2.0, random_state=1)
    plenty = make_head("logreg").fit(X[:2000], y[:2000], X_val=X[2000:], y_val=y[2000:])
    scarce_l2 = min(r["l2"] for r in scarce.sweep_ if r["C"] == pytest.approx(scarce.chosen_params_["C"]))
    plenty_l2 = min(r["l2"] for r in plenty.sweep_ if r["C"] == pytest.approx(plenty.chosen_params_["C"]))
    assert scarce_l2 >= 100 * plenty_l2
    assert len([r for r in scarce.sweep_ if r["phase"] == "grid"]) >= 8
    assert any(r["phase"] == "refine" for r in scarce.sweep_)


@pytest.mark.parametrize("solver", ["sklearn", "torch"])
@pytest.mark.parametrize("n_classes", [2, 3])
def test_logreg_matches_sklearn_at_the_chosen_C(solver, n_classes):
    """The sweep's own L-BFGS (solver="torch") reaches scikit-learn's optimum, binary included."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    from embedx.metrics import softmax

    X, y = make_classification(n_samples=300, n_features=12, n_informative=6, n_classes=n_classes, random_state=5)
    head = make_head("logreg", solver=solver).fit(X[:200], y[:200], X_val=X[200:], y_val=y[200:])
    assert head.chosen_params_["solver"] == solver
    scaler = StandardScaler().fit(X[:200])
    reference = LogisticRegression(C=head.chosen_params_["C"], max_iter=5000, tol=1e-10).fit(scaler.transform(X[:200]),
                                                                                            y[:200])
    np.testing.assert_allclose(softmax(head.logits(X[200:])), reference.predict_proba(scaler.transform(X[200:])),
                               atol=2e-3)


def test_class_weight_balanced_raises_minority_recall():
    rng = np.random.default_rng(0)
    n_major, n_minor = 900, 45
    X = np.vstack([rng.normal(0.0, 1.0, (n_major, 4)), rng.normal(1.2, 1.0, (n_minor, 4))]).astype(np.float32)
    y = np.array([0] * n_major + [1] * n_minor)
    Xv = np.vstack([rng.normal(0.0, 1.0, (300, 4)), rng.normal(1.2, 1.0, (300, 4))]).astype(np.float32)
    yv = np.array([0] * 300 + [1] * 300)
    for name in ("logreg", "knn"):
        plain = make_head(name, **FAST[name]).fit(X, y)
        balanced = make_head(name, class_weight="balanced", **FAST[name]).fit(X, y)
        recall_plain = np.mean(plain.predict(Xv[yv == 1]) == 1)
        recall_balanced = np.mean(balanced.predict(Xv[yv == 1]) == 1)
        assert recall_balanced > recall_plain + 0.2, name


def test_knn_auto_k_and_vote_weights():
    X, y = make_classification(n_samples=400, n_features=8, n_informative=6, n_classes=2, random_state=3)
    head = make_head("knn", k="auto").fit(X[:300], y[:300], X_val=X[300:], y_val=y[300:])
    assert head.chosen_params_["k"] in (1, 5, 10, 20, 50, 100, 200)
    assert len(head.sweep_) >= 5
    # k=1 is a hard nearest-neighbour vote: the top class gets (almost) all the mass
    one = make_head("knn", k=1).fit(X[:300], y[:300])
    assert one.predict_proba(X[300:]).max(axis=1).min() > 0.99


def test_linear_and_mlp_report_early_stopping_and_label_smoothing(data):
    X, y, Xv, yv = data
    head = make_head("linear", label_smoothing=0.1, epochs=5).fit(X, y, X_val=Xv, y_val=yv)
    assert head.chosen_params_["weight_decay"] > 0 and head.chosen_params_["steps"] >= 1
    assert len([r for r in head.sweep_ if r["phase"] == "grid"]) >= 8


# --------------------------------------------------------------------------- fit_head / evaluate on cache files


def write_cache(path: Path, X: np.ndarray, y: np.ndarray, splits, classes, *, backbone: str = "fakenet",
                weights_tag: str = "none", dtype: str = "float32", paths=None, attrs=None, views=None) -> Path:
    """A real embedx cache file (through embedx.cache) holding the given features; ``paths``
    (default ``<class>/<row>.png``), ``attrs`` (the ``extra`` attribute) and ``views`` (features,
    clean row of each) as given."""
    from embedx.cache import CacheMeta, CacheWriter

    meta = CacheMeta(backbone=backbone, weights_tag=weights_tag, weights_arg="none",
                     onnx_path=f"/nowhere/{backbone}.onnx",
                     onnx_sha256="0" * 64, feature_layer="pool", feature_dim=X.shape[1],
                     preprocess={"input_size": 32}, dtype=dtype, precision="fp32")
    keys = [hashlib.sha256(f"{path.name}-{i}".encode()).hexdigest() for i in range(len(X))]
    rel = list(paths) if paths is not None else [f"{classes[label]}/{i}.png" for i, label in enumerate(y)]
    stored_views = None
    with CacheWriter(path, meta, overwrite=True) as writer:
        writer.append(keys, X, paths=rel)
        if views is not None:
            view_features, source = views
            view_keys = [hashlib.sha256(f"{path.name}-view-{i}".encode()).hexdigest() for i in range(len(source))]
            writer.append(view_keys, np.asarray(view_features, dtype=np.float32))
            stored_views = {"keys": view_keys, "source": [int(s) for s in source],
                            "names": [f"augment/{i}" for i in range(len(source))],
                            "plan": {"views": 1, "augment": {}, "seed": 0}}
        writer.finalize(keys=keys, paths=rel, labels=[int(v) for v in y], splits=list(splits), classes=list(classes),
                        errors=[], attrs=attrs, views=stored_views)
    return path


@pytest.fixture
def cache_file(tmp_path, data):
    X, y, Xv, yv = data
    features = np.vstack([X, Xv])
    labels = np.concatenate([y, yv])
    splits = ["train"] * len(X) + ["val"] * len(Xv)
    return write_cache(tmp_path / "feats.h5", features, labels, splits, ["ants", "bees", "wasps"])


def test_fit_head_writes_a_complete_head_directory(cache_file, tmp_path):
    result = fit_head(cache_file, head="logreg", output=tmp_path / "head")
    out = tmp_path / "head"
    assert result.output_dir == out
    for name in ("head.json", "weights.safetensors", "confusion_matrix.png", "reliability.png"):
        assert (out / name).is_file(), name
    assert (out / "confusion_matrix.png").read_bytes()[:4] == b"\x89PNG"
    info = json.loads((out / "head.json").read_text())
    assert info["classes"] == ["ants", "bees", "wasps"]
    assert info["cache"]["backbone"] == "fakenet" and len(info["cache"]["fingerprint"]) == 64
    assert info["cache"]["onnx_path"] == "/nowhere/fakenet.onnx" and info["cache"]["preprocess"] == {"input_size": 32}
    assert info["params"]["C"] > 0 and info["fit_seconds"] > 0
    val = info["metrics"]["val"]
    assert info["metrics"]["val_source"] == "val split of the cache"
    for key in ("accuracy", "balanced_accuracy", "macro_f1", "log_loss", "ece", "ece_calibrated", "per_class",
                "confusion_matrix"):
        assert key in val, key
    assert val["temperature"] == pytest.approx(info["temperature"])
    # the stored accuracy is the loaded head's accuracy on the val rows
    from embedx.cache import read_cache

    cache = read_cache(cache_file, splits="val")
    predicted = load_head(out).predict(cache.features)
    assert np.mean(predicted == np.asarray(cache.classes)[cache.labels]) == pytest.approx(val["accuracy"])
    assert result.to_dict()["val_accuracy"] == val["accuracy"]


def test_fit_head_default_output_and_hash_split_without_val(tmp_path, data):
    from embedx import paths

    X, y, _, _ = data
    path = write_cache(tmp_path / "trainonly.h5", X, y, ["train"] * len(X), ["a", "b", "c"], dtype="float16")
    result = fit_head(path, head="knn", plots=False)
    assert result.output_dir == paths.cache_dir() / "heads" / "trainonly-knn"
    assert result.metrics["val_source"].startswith("hash split of train")
    assert 0 < result.metrics["n_val"] < len(X) and result.metrics["n_train"] + result.metrics["n_val"] == len(X)
    again = fit_head(path, head="knn", plots=False, output=tmp_path / "again")
    assert again.metrics["n_val"] == result.metrics["n_val"]  # the split is stable


def test_fit_head_from_a_file_reads_rows_lazily_and_equals_in_memory(tmp_path, data, monkeypatch):
    """From a path, fit_head reads only the rows each step needs (never the whole feature
    matrix) and trains the same head as from the cache loaded whole."""
    from embedx import cache as cache_module
    from embedx.cache import read_cache

    X, y, Xv, yv = data
    splits = ["train"] * 120 + ["test"] * 60 + ["val"] * len(Xv)
    path = write_cache(tmp_path / "three.h5", np.vstack([X, Xv]), np.concatenate([y, yv]), splits, ["a", "b", "c"],
                       dtype="float16")
    whole = read_cache(path)
    in_memory = fit_head(whole, head="logreg", output=tmp_path / "a", plots=False)
    reads = []
    original = cache_module._read_features
    monkeypatch.setattr(cache_module, "_read_features",
                        lambda handle, selected, path: reads.append(None if selected is None else len(selected))
                        or original(handle, selected, path))
    lazy = fit_head(path, head="logreg", output=tmp_path / "b", plots=False)
    assert reads == [len(Xv), 120, 60]  # val, train, test: each read once, nothing read whole
    assert lazy.metrics["val"]["accuracy"] == in_memory.metrics["val"]["accuracy"]
    assert lazy.metrics["test"]["accuracy"] == in_memory.metrics["test"]["accuracy"]
    np.testing.assert_allclose(lazy.head.predict_proba(Xv), in_memory.head.predict_proba(Xv), rtol=1e-5, atol=1e-6)


def test_fit_head_refit_and_test_split(tmp_path, data):
    X, y, Xv, yv = data
    splits = ["train"] * 120 + ["test"] * 60 + ["val"] * len(Xv)
    path = write_cache(tmp_path / "three.h5", np.vstack([X, Xv]), np.concatenate([y, yv]), splits, ["a", "b", "c"])
    result = fit_head(path, head="linear", refit=True, output=tmp_path / "h", params={"epochs": 5})
    assert result.metrics["refit"] is True and "test" in result.metrics
    assert result.head.chosen_params_["refit"] == "train+val"
    assert result.head.n_train_ == 120 + len(Xv)


def test_fit_head_refuses_label_smoothing_for_logreg(cache_file):
    with pytest.raises(ConfigError, match="label smoothing"):
        fit_head(cache_file, head="logreg", label_smoothing=0.1)


def test_evaluate_on_same_backbone_and_refuses_another(cache_file, tmp_path, data):
    result = fit_head(cache_file, head="logreg", output=tmp_path / "h", plots=False)
    metrics = evaluate(tmp_path / "h", cache_file)
    assert metrics["val"]["accuracy"] == pytest.approx(result.metrics["val"]["accuracy"])
    assert metrics["all"]["n"] == 240
    once = evaluate(tmp_path / "h", cache_file, splits=["val", "val"])  # a repeated --split counts once
    assert set(once) - {"head", "cache", "head_type"} == {"val"} and once["val"] == metrics["val"]
    with pytest.raises(HeadError, match=r"has no rows in splits \['test'\]; it has \['train', 'val'\]$"):
        evaluate(tmp_path / "h", cache_file, splits=["test"])
    X, y, _, _ = data
    other = write_cache(tmp_path / "resnet.h5", np.hstack([X, X]), y, ["val"] * len(X), ["ants", "bees", "wasps"],
                        backbone="resnet18")
    with pytest.raises(FeatureMismatchError,
                       match=r"'resnet18' \(24-d\).*'fakenet' \(12-d\).*embedx extract --backbone fakenet"):
        evaluate(tmp_path / "h", other)
    retrained = write_cache(tmp_path / "otherweights.h5", X, y, ["val"] * len(X), ["ants", "bees", "wasps"],
                            weights_tag="IMAGENET1K_V1")
    with pytest.raises(FeatureMismatchError, match="weights_tag"):
        evaluate(tmp_path / "h", retrained)


def test_evaluate_skips_classes_the_head_does_not_know(cache_file, tmp_path, data):
    fit_head(cache_file, head="knn", output=tmp_path / "h", plots=False)
    X, y, _, _ = data
    path = write_cache(tmp_path / "more.h5", X, y, ["val"] * len(X), ["ants", "bees", "hornets"])
    metrics = evaluate(tmp_path / "h", path)
    assert metrics["val"]["skipped_unknown_class"] == int(np.sum(y == 2))
    strangers = write_cache(tmp_path / "strangers.h5", X, y, ["val"] * len(X), ["owls", "moths", "hornets"])
    with pytest.raises(HeadError, match=r"none of the cache's classes \['hornets', 'moths', 'owls'\] is one"):
        evaluate(tmp_path / "h", strangers)


# --------------------------------------------------------------------------- real data


@pytest.mark.slow
@pytest.mark.timeout(300)  # the first user of hymenoptera_lite0 extracts it
def test_hymenoptera_efficientnet_lite0_default_head_reaches_094(hymenoptera_lite0, tmp_path):
    """The tutorial's fixed-feature-extractor figure is 0.948; the default head must reach 0.94."""
    cache, _ = hymenoptera_lite0
    result = fit_head(cache, output=tmp_path / "hymenoptera-logreg")
    assert result.metrics["val_source"] == "val split of the cache"
    assert result.metrics["val"]["accuracy"] >= 0.94


# --------------------------------------------------------------------------- the large-problem L2 sweep


def anisotropic_classes(n: int, dim: int, classes: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Gaussian classes under a correlated, unevenly scaled noise: the class-mean classifier is
    not optimal here (it ignores the covariance), logistic regression is close to it."""
    rng = np.random.default_rng(seed)
    means = rng.standard_normal((classes, dim)) * 0.1
    mix = rng.standard_normal((dim, dim)) * np.geomspace(3.0, 0.2, dim)
    y = rng.integers(0, classes, n)
    X = (means[y] + rng.standard_normal((n, dim)) @ mix / np.sqrt(dim)).astype(np.float32)
    return X, y


def test_class_mean_init_is_the_weighted_class_means():
    from embedx.heads.lbfgs import class_mean_init

    rng = np.random.default_rng(0)
    X = rng.standard_normal((50, 4)).astype(np.float32)
    y = np.arange(50) % 3
    w = rng.uniform(0.5, 2.0, 50)
    W, b = class_mean_init(X, y, 4, w)  # class 3 has no rows
    for label in range(3):
        mean = np.average(X[y == label], axis=0, weights=w[y == label])
        np.testing.assert_allclose(W[:, label], mean, rtol=1e-5, atol=1e-6)
        prior = w[y == label].sum() / w.sum()
        assert b[label] == pytest.approx(-0.5 * mean @ mean + np.log(prior), rel=1e-5)
    assert b[3] < -1e3  # an absent class is never predicted


def test_fit_scales_minimizes_each_members_objective():
    from embedx.heads.members import fit_scales
    from embedx.metrics import log_loss, softmax

    X, y = anisotropic_classes(400, 6, 3, seed=1)
    logits = X @ np.random.default_rng(2).standard_normal((6, 3)).astype(np.float32) * 0.3
    decays, norm2 = np.array([1e-4, 1e-2, 1.0]), 4.0
    scales = fit_scales(logits, y, decays, norm2)

    def objective(a, lam):
        return log_loss(y, softmax(a * logits)) + 0.5 * lam * a * a * norm2

    for a, lam in zip(scales, decays, strict=True):
        assert objective(a, lam) <= min(objective(a * 1.05, lam), objective(a / 1.05, lam)) + 1e-9
    assert scales[0] > scales[1] > scales[2]  # a stronger penalty shrinks the weights more


def test_lbfgs_members_reach_scikit_learns_optimum():
    """Every member converges to its own L2 optimum: curvature pairs and steps are per member."""
    from sklearn.linear_model import LogisticRegression

    from embedx.heads.lbfgs import lbfgs_members

    X, y = anisotropic_classes(600, 10, 4, seed=3)
    X = (X - X.mean(0)) / X.std(0)
    decays = np.array([1e-3, 1e-1])
    zeros = (np.zeros((2, 10, 4), np.float32), np.zeros((2, 4), np.float32))
    fit = lbfgs_members(X, y, 4, weight_decays=decays, init=zeros, X_val=X, y_val=y, iterations=150, keep_best=False)
    for g, lam in enumerate(decays):
        reference = LogisticRegression(C=1.0 / (lam * len(X)), max_iter=5000, tol=1e-10).fit(X, y)
        W, b = fit.member(g)[0]
        logits = X @ W + b
        np.testing.assert_allclose(logits - logits.mean(1, keepdims=True),
                                   reference.decision_function(X)
                                   - reference.decision_function(X).mean(1, keepdims=True),
                                   atol=2e-2)


def test_large_l2_sweep_phases_accuracy_and_determinism(monkeypatch):
    """Past the L-BFGS budget the logreg sweep samples rows, starts from the class means, and its
    iterations improve on that start where the class means are not optimal."""
    from sklearn.linear_model import LogisticRegression

    from embedx.heads import sweep
    from embedx.heads.base import standardize, standardizer
    from embedx.heads.lbfgs import class_mean_init
    from embedx.heads.sweep import DEFAULT_GRID, large_l2_sweep

    # the sizes of 50,000 x 2048 rows scaled down: 1,500 sampled rows of 5,000, 1,000 of 2,000 val rows
    monkeypatch.setattr(sweep, "LARGE_COARSE_WORK", 64 * 10 * len(DEFAULT_GRID) * 1500)
    monkeypatch.setattr(sweep, "SCORE_ROWS", 1000)

    X, y = anisotropic_classes(7000, 64, 10, seed=4)
    X, y, Xv, yv = X[:5000], y[:5000], X[5000:], y[5000:]
    mean, scale = standardizer(X)
    X, Xv = standardize(X, mean, scale), standardize(Xv, mean, scale)
    lam, layers, table, steps = large_l2_sweep(X, y, 10, (Xv, yv), None, grid=DEFAULT_GRID, name="l2", seed=0)
    phases = [row["phase"] for row in table]
    assert phases.count("grid") == 8 and phases.count("refine") == 3 and phases.count("final") == 1
    W, b = layers[0]
    accuracy = np.mean((Xv @ W + b).argmax(1) == yv)
    W0, b0 = class_mean_init(X, y, 10)
    assert accuracy > np.mean((Xv @ W0 + b0).argmax(1) == yv) + 0.02
    best_sklearn = max(LogisticRegression(C=1.0 / (v * len(X)), max_iter=300).fit(X, y).score(Xv, yv)
                       for v in DEFAULT_GRID[:5])
    assert accuracy >= best_sklearn - 0.03
    again = large_l2_sweep(X, y, 10, (Xv, yv), None, grid=DEFAULT_GRID, name="l2", seed=0)
    assert again[0] == lam and np.array_equal(again[1][0][0], W)


# --------------------------------------------------------------------------- the head directory is replaced whole


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def test_fit_head_killed_while_writing_leaves_the_old_head_whole(cache_file, tmp_path, monkeypatch):
    out = tmp_path / "head"
    fit_head(cache_file, head="logreg", output=out)
    before = _snapshot(out)

    def killed(*args, **kwargs):
        raise KeyboardInterrupt  # the run dies after the new head.json and weights exist

    monkeypatch.setattr("embedx.metrics.plot_reliability", killed)
    with pytest.raises(KeyboardInterrupt):
        fit_head(cache_file, head="knn", output=out)
    assert _snapshot(out) == before  # the old head.json, weights and plots, nothing of the new head
    assert load_head(out).head_type == "logreg"
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_save_killed_between_weights_and_head_json_is_no_mix(fitted, tmp_path, monkeypatch):
    from embedx.heads.record import HeadRecord

    out = tmp_path / "h"
    fitted["logreg"].save(out)
    before = _snapshot(out)

    def killed(self, directory):
        raise KeyboardInterrupt

    monkeypatch.setattr(HeadRecord, "write", killed)
    with pytest.raises(KeyboardInterrupt):
        fitted["mlp"].save(out)
    assert _snapshot(out) == before
    assert load_head(out).head_type == "logreg"


def test_refit_without_plots_leaves_no_old_plots(cache_file, tmp_path):
    out = tmp_path / "head"
    fit_head(cache_file, head="logreg", output=out)
    fit_head(cache_file, head="knn", output=out, plots=False)
    assert sorted(p.name for p in out.iterdir()) == ["head.json", "weights.safetensors"]


def test_stale_temporaries_of_a_killed_save_are_cleaned_and_a_moved_head_restored(fitted, tmp_path):
    from embedx.fsio import restore_moved_aside

    out = tmp_path / "h"
    fitted["logreg"].save(out)
    stale = tmp_path / ".h.tmp-killed"
    stale.mkdir()
    (stale / "head.json").write_text("{}")
    fitted["knn"].save(out)
    assert not stale.exists() and load_head(out).head_type == "knn"
    # killed after moving the old head aside, before the new one was renamed in
    aside = tmp_path / ".h.tmp-aside-killed"
    aside.mkdir()
    out.rename(aside / "previous")
    assert restore_moved_aside(out)
    assert load_head(out).head_type == "knn" and not (aside / "previous").exists()
    aside.rmdir()
    out.rename(tmp_path / "moved")
    aside.mkdir()
    (tmp_path / "moved").rename(aside / "previous")
    fitted["logreg"].save(out)  # the next save puts nothing back over what it writes, and cleans up
    assert load_head(out).head_type == "logreg"
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_save_refuses_to_replace_a_folder_that_is_not_a_head(fitted, tmp_path):
    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / "notes.txt").write_text("keep me")
    with pytest.raises(HeadError, match="not a head directory"):
        fitted["logreg"].save(folder)
    assert (folder / "notes.txt").read_text() == "keep me"
    (tmp_path / "file").write_text("x")
    with pytest.raises(HeadError, match="not a folder"):
        fitted["logreg"].save(tmp_path / "file")


def test_save_says_when_it_creates_missing_parent_folders(fitted, tmp_path, caplog):
    with caplog.at_level("WARNING", logger="embedx.heads.base"):
        fitted["logreg"].save(tmp_path / "a" / "b" / "h")
    assert "creating the missing folder" in caplog.text and str(tmp_path / "a" / "b") in caplog.text
    assert load_head(tmp_path / "a" / "b" / "h").head_type == "logreg"
