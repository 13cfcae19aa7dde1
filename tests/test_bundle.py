"""bundle: backbone + head + softmax(logits / T) in one ONNX file."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from embedx import onnxmeta, preprocess
from embedx.bundle import bundle, compose, save
from embedx.errors import CacheMismatchError, HeadError, OnnxModelError
from embedx.fsio import sha256_file as file_sha256
from embedx.preprocess import PreprocessSpec
from tests.bundle_fixtures import CLASSES, SPEC, make_bundle, tiny_backbone, tiny_head, write_images


def session(model) -> ort.InferenceSession:
    data = model.SerializeToString() if isinstance(model, onnx.ModelProto) else str(model)
    return ort.InferenceSession(data, providers=["CPUExecutionProvider"])


def softmax(logits: np.ndarray, temperature: float) -> np.ndarray:
    z = logits / temperature
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def two_stage(backbone, head_weight, head_bias, batch, temperature):
    (features,) = session(backbone).run(["features"], {"input": batch})
    return softmax(features @ head_weight + head_bias, temperature)


@pytest.fixture(scope="module")
def image_batch(tmp_path_factory) -> np.ndarray:
    files = write_images(tmp_path_factory.mktemp("images"), 6)
    return preprocess.load_batch(files, SPEC), files


def test_compose_equals_backbone_then_head_then_softmax(image_batch):
    batch, _ = image_batch
    head, weight, bias = tiny_head()
    model = compose(tiny_backbone(), head, classes=CLASSES, temperature=1.7, preprocess=SPEC)
    probabilities, logits = session(model).run(["probabilities", "logits"], {"input": batch})
    expected = two_stage(tiny_backbone(), weight, bias, batch, 1.7)
    np.testing.assert_allclose(probabilities, expected, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(softmax(logits, 1.7), expected, rtol=1e-5, atol=1e-6)
    assert probabilities.shape == (6, 3)
    assert [o.name for o in model.graph.output] == ["probabilities", "logits"]
    onnx.checker.check_model(model, full_check=True)


def test_with_preprocess_takes_uint8_pixels_and_agrees(image_batch):
    batch, files = image_batch
    head, weight, bias = tiny_head()
    model = compose(tiny_backbone(), head, classes=CLASSES, temperature=1.0, preprocess=SPEC, with_preprocess=True)
    (graph_input,) = model.graph.input
    assert graph_input.name == "image"
    assert graph_input.type.tensor_type.elem_type == onnx.TensorProto.UINT8
    assert [d.dim_value for d in graph_input.type.tensor_type.shape.dim[1:]] == [16, 16, 3]
    pixels = np.stack([preprocess.to_pixels(f, SPEC) for f in files])
    (probabilities,) = session(model).run(["probabilities"], {"image": pixels})
    np.testing.assert_allclose(probabilities, two_stage(tiny_backbone(), weight, bias, batch, 1.0),
                               rtol=1e-5, atol=1e-6)
    assert onnxmeta.from_proto(model)["input_format"] == "uint8_nhwc"


def test_metadata_travels_with_the_bundle(tmp_path):
    path = make_bundle(tmp_path / "sub" / "model.onnx", temperature=2.5)
    meta = onnxmeta.read(path)
    assert meta["kind"] == "bundle"
    assert json.loads(meta["classes"]) == CLASSES
    assert PreprocessSpec.from_json(meta["preprocess"]) == SPEC
    assert float(meta["temperature"]) == 2.5
    assert meta["input_format"] == "float_nchw"
    assert meta["backbone"] == "tiny" and meta["weights"] == "none" and meta["feature_dim"] == "8"
    assert meta["version"]
    assert "parity" not in meta and "fingerprint" not in meta  # those described the backbone alone
    assert not list(tmp_path.glob("sub/.*tmp*"))  # written atomically


def test_save_cleans_what_a_killed_run_left_and_replaces_only_bundles(tmp_path):
    out = tmp_path / "model.onnx"
    stale = tmp_path / ".model.onnx.tmp-killed"
    stale.write_bytes(b"half a bundle")
    make_bundle(out)
    assert not stale.exists()  # the next run removes it
    make_bundle(out, temperature=3.0)  # a bundle is replaced
    assert onnxmeta.read(out)["temperature"] == "3.0"


@pytest.mark.parametrize("existing", ["text", "empty", "backbone"])
def test_save_refuses_to_replace_what_is_not_a_bundle_unless_forced(tmp_path, existing):
    from embedx.errors import ConfigError

    out = tmp_path / "precious.onnx"
    if existing == "backbone":
        backbone = tiny_backbone()
        onnxmeta.write(backbone, {"kind": "backbone"})
        onnx.save(backbone, out)
    else:
        out.write_bytes(b"my thesis, chapter 3\n" if existing == "text" else b"")
    before = out.read_bytes()
    with pytest.raises(ConfigError, match="refusing to replace it.*--force"):
        make_bundle(out)
    assert out.read_bytes() == before
    make_bundle(out, force=True)
    assert onnxmeta.read(out)["kind"] == "bundle"


def test_save_refuses_a_folder_and_says_when_it_creates_parents(tmp_path, caplog):
    from embedx.errors import ConfigError

    with pytest.raises(ConfigError, match="is a folder"):
        make_bundle(tmp_path)
    with caplog.at_level("WARNING", logger="embedx.bundle"):
        make_bundle(tmp_path / "new" / "deeper" / "model.onnx")
    assert f"creating the missing folder {tmp_path / 'new' / 'deeper'}" in caplog.text


def test_head_of_another_opset_is_converted(image_batch):
    batch, _ = image_batch
    head, weight, bias = tiny_head(opset=13)
    model = compose(tiny_backbone(opset=17), head, classes=CLASSES, temperature=1.0, preprocess=SPEC)
    (probabilities,) = session(model).run(["probabilities"], {"input": batch})
    np.testing.assert_allclose(probabilities, two_stage(tiny_backbone(), weight, bias, batch, 1.0),
                               rtol=1e-5, atol=1e-6)


def test_head_names_never_clash_with_backbone_names(image_batch):
    """Both graphs use the initializer name "W": the head's is prefixed, not merged."""
    from onnx import helper, numpy_helper

    batch, _ = image_batch
    backbone = tiny_backbone()
    backbone.graph.initializer.append(numpy_helper.from_array(np.ones(1, dtype=np.float32), "W"))
    node = helper.make_node("Mul", ["features_raw", "W"], ["features"])
    backbone.graph.node[-1].output[0] = "features_raw"
    backbone.graph.node.append(node)
    head, weight, bias = tiny_head()
    model = compose(backbone, head, classes=CLASSES, temperature=1.0, preprocess=SPEC)
    (probabilities,) = session(model).run(["probabilities"], {"input": batch})
    np.testing.assert_allclose(probabilities, two_stage(tiny_backbone(), weight, bias, batch, 1.0),
                               rtol=1e-5, atol=1e-6)


def test_wrong_graph_names_are_refused():
    head, _, _ = tiny_head()
    backbone = tiny_backbone()
    backbone.graph.output[0].name = "output"
    with pytest.raises(OnnxModelError, match="backbone graph"):
        compose(backbone, head, classes=CLASSES, temperature=1.0, preprocess=SPEC)
    with pytest.raises(OnnxModelError, match="head graph"):
        compose(tiny_backbone(), tiny_backbone(), classes=CLASSES, temperature=1.0, preprocess=SPEC)
    with pytest.raises(HeadError, match="temperature"):
        compose(tiny_backbone(), head, classes=CLASSES, temperature=0.0, preprocess=SPEC)


def fake_head_dir(tmp_path: Path, backbone_path: Path, sha256: str) -> Path:
    head_dir = tmp_path / "head"
    head_dir.mkdir()
    (head_dir / "head.json").write_text(json.dumps({
        "schema_version": 1, "head_type": "logreg", "classes": CLASSES, "feature_dim": 8, "temperature": 1.0,
        "cache": {"backbone": "tiny", "onnx_path": str(backbone_path), "onnx_sha256": sha256,
                  "preprocess": SPEC.to_dict(), "feature_dim": 8},
    }))
    return head_dir


def test_bundle_refuses_a_changed_backbone_file(tmp_path):
    backbone_path = tmp_path / "backbone.onnx"
    onnx.save(tiny_backbone(), backbone_path)
    head_dir = fake_head_dir(tmp_path, backbone_path, sha256="0" * 64)
    with pytest.raises(CacheMismatchError, match="sha256"):
        bundle(head_dir, tmp_path / "model.onnx")
    assert not (tmp_path / "model.onnx").exists()


def test_bundle_refuses_a_missing_backbone_file_or_head_json(tmp_path):
    head_dir = fake_head_dir(tmp_path, tmp_path / "gone.onnx", sha256="0" * 64)
    with pytest.raises(OnnxModelError, match="missing"):
        bundle(head_dir, tmp_path / "model.onnx")
    with pytest.raises(HeadError, match="head.json"):
        bundle(tmp_path, tmp_path / "model.onnx")


# -- the real ImageNet classifier as a backbone (quantized graph, com.microsoft ops) ------


@pytest.mark.slow
def test_compose_with_the_real_int8_mobilenet(mobilenet_int8_onnx, hymenoptera, tmp_path):
    """mobilenetv2-12-int8's 1000 logits as "features", an identity head, T = 2."""
    from onnx import helper

    imagenet = PreprocessSpec()
    backbone = onnx.load(str(mobilenet_int8_onnx))
    for node in backbone.graph.node:
        node.output[:] = ["features" if name == "output" else name for name in node.output]
    backbone.graph.output[0].name = "features"
    head = helper.make_model(
        helper.make_graph(
            [helper.make_node("Identity", ["features"], ["logits"])], "identity",
            [helper.make_tensor_value_info("features", onnx.TensorProto.FLOAT, ["N", 1000])],
            [helper.make_tensor_value_info("logits", onnx.TensorProto.FLOAT, ["N", 1000])],
        ),
        opset_imports=[helper.make_opsetid("", 17)],
    )
    classes = [f"imagenet_{i}" for i in range(1000)]
    model = compose(backbone, head, classes=classes, temperature=2.0, preprocess=imagenet, with_preprocess=True)
    path = save(model, tmp_path / "mobilenet-bundle.onnx")
    files = sorted((hymenoptera / "val" / "ants").iterdir())[:4]
    pixels = np.stack([preprocess.to_pixels(f, imagenet) for f in files])
    (probabilities,) = session(path).run(["probabilities"], {"image": pixels})
    (logits,) = session(mobilenet_int8_onnx).run(["output"], {"input": preprocess.load_batch(files, imagenet)})
    np.testing.assert_allclose(probabilities, softmax(logits, 2.0), rtol=1e-4, atol=1e-5)
    assert file_sha256(path) == file_sha256(path)  # readable, complete


# -- real head directories: extract -> fit-head -> bundle, against the two-stage pipeline --


def build_head_dirs(root: Path, backbone: str | Path, images: Path, head_types) -> dict[str, Path]:
    from embedx.extract import extract
    from embedx.heads import fit_head

    cache = root / "feats.h5"
    extract(images, backbone=str(backbone), output=cache, workers=0, device="cpu", val_fraction=0.25)
    return {name: fit_head(cache, head=name, output=root / "heads" / name, plots=False).output_dir
            for name in head_types}


@pytest.fixture(scope="module")
def tiny_images(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("data")
    for i, name in enumerate(("ants", "bees")):
        write_images(root / name, 8, seed=10 + i)
    return root


@pytest.fixture(scope="module")
def head_dirs(tmp_path_factory, tiny_images) -> dict[str, Path]:
    from embedx.heads import HEAD_TYPES

    root = tmp_path_factory.mktemp("heads")
    onnx.save(tiny_backbone(), root / "tiny.onnx")
    return build_head_dirs(root, root / "tiny.onnx", tiny_images, sorted(HEAD_TYPES))


def assert_bundle_matches_two_stage(bundle_path: Path, head_dir: Path, files: list[Path], atol: float) -> None:
    from embedx.predict import HeadPipeline, load_model

    model = load_model(bundle_path, device="cpu")
    two_stage_model = HeadPipeline(head_dir, device="cpu")
    assert model.classes == two_stage_model.classes
    ours = model.predict_proba(np.stack([model.prepare(f) for f in files]))
    theirs = two_stage_model.predict_proba(np.stack([two_stage_model.prepare(f) for f in files]))
    np.testing.assert_allclose(ours, theirs, atol=atol)
    np.testing.assert_array_equal(ours.argmax(1), theirs.argmax(1))


@pytest.mark.parametrize("head_type", ["logreg", "linear", "mlp", "knn"])
@pytest.mark.parametrize("with_preprocess", [False, True], ids=["float_nchw", "uint8_nhwc"])
def test_bundle_of_every_head_equals_the_two_stage_pipeline(head_dirs, head_type, with_preprocess, tiny_images,
                                                            tmp_path):
    head_dir = head_dirs[head_type]
    path = bundle(head_dir, tmp_path / "model.onnx", with_preprocess=with_preprocess)
    assert_bundle_matches_two_stage(path, head_dir, sorted(tiny_images.rglob("*.*")), atol=1e-5)
    meta = onnxmeta.read(path)
    info = json.loads((head_dir / "head.json").read_text())
    assert json.loads(meta["classes"]) == info["classes"]
    assert float(meta["temperature"]) == pytest.approx(info["temperature"])
    assert json.loads(meta["head"])["head_type"] == head_type
    assert json.loads(meta["head"])["backbone_onnx_sha256"] == info["cache"]["onnx_sha256"]
    assert meta["backbone"] == info["cache"]["backbone"] and meta["weights"] == info["cache"]["weights_tag"]
    assert meta["input_format"] == ("uint8_nhwc" if with_preprocess else "float_nchw")


def test_predict_with_head_dir_equals_predict_with_its_bundle(head_dirs, tiny_images, tmp_path):
    from embedx.predict import predict_files

    path = bundle(head_dirs["logreg"], tmp_path / "model.onnx")
    with_head = list(predict_files([tiny_images], head=head_dirs["logreg"], top_k=2, device="cpu"))
    with_bundle = list(predict_files([tiny_images], model=path, top_k=2, device="cpu"))
    assert [r["path"] for r in with_head] == [r["path"] for r in with_bundle]
    for a, b in zip(with_head, with_bundle, strict=True):
        assert [c["label"] for c in a["top_k"]] == [c["label"] for c in b["top_k"]]
        assert [c["probability"] for c in a["top_k"]] == pytest.approx([c["probability"] for c in b["top_k"]], abs=1e-5)


def test_bundle_notices_a_backbone_file_changed_after_training(head_dirs, tmp_path):
    import shutil

    head_dir = tmp_path / "head"
    shutil.copytree(head_dirs["logreg"], head_dir)
    info = json.loads((head_dir / "head.json").read_text())
    changed = tmp_path / "changed.onnx"
    onnx.save(tiny_backbone(seed=5), changed)
    info["cache"]["onnx_path"] = str(changed)
    (head_dir / "head.json").write_text(json.dumps(info))
    with pytest.raises(CacheMismatchError, match="refit"):
        bundle(head_dir, tmp_path / "model.onnx")


def test_cli_bundle_then_predict(head_dirs, tiny_images, tmp_path):
    from click.testing import CliRunner

    from embedx.cli.main import cli

    runner = CliRunner()
    out = tmp_path / "model.onnx"
    made = runner.invoke(cli, ["bundle", "--head", str(head_dirs["knn"]), "-o", str(out), "--with-preprocess",
                               "--json"])
    assert made.exit_code == 0, made.output
    summary = json.loads(made.stdout)
    assert summary["path"] == str(out) and summary["classes"] == ["ants", "bees"]
    assert summary["input_format"] == "uint8_nhwc"
    predicted = runner.invoke(cli, ["predict", "--model", str(out), str(tiny_images / "bees"), "--json", "-k", "1"])
    assert predicted.exit_code == 0, predicted.output
    assert len(predicted.stdout.splitlines()) == 8
    by_head = runner.invoke(cli, ["predict", "--head", str(head_dirs["knn"]), str(tiny_images / "bees"),
                                  "--json", "-k", "1"])
    assert by_head.exit_code == 0, by_head.output
    assert [json.loads(line)["top_k"][0]["label"] for line in by_head.stdout.splitlines()] == [
        json.loads(line)["top_k"][0]["label"] for line in predicted.stdout.splitlines()
    ]
    missing = runner.invoke(cli, ["bundle", "--head", str(tmp_path), "-o", str(tmp_path / "x.onnx")])
    assert missing.exit_code == 1 and "head.json" in missing.stderr
    text = tmp_path / "notes.txt"
    text.write_text("not a model")
    refused = runner.invoke(cli, ["bundle", "--head", str(head_dirs["knn"]), "-o", str(text)])
    assert refused.exit_code == 1 and "--force" in refused.stderr and text.read_text() == "not a model"
    assert len(refused.stderr.strip().splitlines()) == 1
    forced = runner.invoke(cli, ["bundle", "--head", str(head_dirs["knn"]), "-o", str(text), "--force"])
    assert forced.exit_code == 0, forced.output
    assert onnxmeta.read(text)["kind"] == "bundle"


@pytest.mark.slow
def test_real_backbone_bundle_on_hymenoptera_equals_two_stage(hymenoptera, tmp_path):
    """efficientnet_lite0 with its real ImageNet weights, 12 images per class, both input formats."""
    import shutil

    data = tmp_path / "data"
    for name in ("ants", "bees"):
        (data / name).mkdir(parents=True)
        for source in sorted((hymenoptera / "train" / name).iterdir())[:12]:
            shutil.copy(source, data / name / source.name)
    from embedx.export import export_backbone

    exported = export_backbone("efficientnet_lite0", weights="DEFAULT")
    heads = build_head_dirs(tmp_path, exported.path, data, ["logreg"])
    files = sorted((hymenoptera / "val" / "ants").iterdir())[:6] + sorted((hymenoptera / "val" / "bees").iterdir())[:6]
    for with_preprocess in (False, True):
        path = bundle(heads["logreg"], tmp_path / f"model-{with_preprocess}.onnx", with_preprocess=with_preprocess)
        assert_bundle_matches_two_stage(path, heads["logreg"], files, atol=1e-4)


def test_bundle_of_a_torch_exported_backbone_equals_two_stage(tiny_images, tmp_path):
    """A registry backbone with random weights (weights="none"), exported by torch."""
    from embedx.export import export_backbone

    exported = export_backbone("mobilenet_v3_small", weights="none")
    heads = build_head_dirs(tmp_path, exported.path, tiny_images, ["logreg"])
    files = sorted(tiny_images.rglob("*.*"))
    for with_preprocess in (False, True):
        path = bundle(heads["logreg"], tmp_path / f"model-{with_preprocess}.onnx", with_preprocess=with_preprocess)
        assert_bundle_matches_two_stage(path, heads["logreg"], files, atol=1e-5)
