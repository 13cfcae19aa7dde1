"""runtime: providers, OrtModel against torch, fp16/int8 rules, the int8 cosine gate."""

from __future__ import annotations

import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest

from embedx import onnxmeta, providers, quantize, runtime
from embedx.errors import BackendError, ConfigError, OnnxModelError, QuantizationError

torch = pytest.importorskip("torch")


def tiny_net():
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3, stride=2, padding=1),
        torch.nn.BatchNorm2d(8),
        torch.nn.ReLU(),
        torch.nn.Conv2d(8, 16, 3, stride=2, padding=1),
        torch.nn.ReLU(),
        torch.nn.AdaptiveAvgPool2d(1),
        torch.nn.Flatten(),
    ).eval()


def export(module, path: Path, size: int = 32) -> Path:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        _export(module, path, size)
    return path


def _export(module, path: Path, size: int) -> None:
    torch.onnx.export(
        module,
        (torch.randn(2, 3, size, size),),
        str(path),
        input_names=["input"],
        output_names=["features"],
        dynamic_axes={"input": {0: "batch"}, "features": {0: "batch"}},
        opset_version=17,
        dynamo=False,  # the TorchScript exporter: much faster to export a tiny test net
    )


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    net = tiny_net()
    path = export(net, tmp_path_factory.mktemp("tiny") / "tiny.onnx")
    import onnx

    model = onnx.load(str(path))
    onnxmeta.write(model, {"backbone": "tiny", "feature_dim": 16})
    onnx.save(model, str(path))
    return net, path


@pytest.fixture
def calibration():
    return np.random.default_rng(0).normal(size=(24, 3, 32, 32)).astype(np.float32)


needs_no_gpu = pytest.mark.skipif(runtime.gpu_available(), reason="this machine has a GPU")


def test_outputs_match_torch(tiny):
    net, path = tiny
    model = runtime.OrtModel(path, device="cpu")
    batch = np.random.default_rng(1).normal(size=(5, 3, 32, 32)).astype(np.float32)
    with torch.no_grad():
        expected = net(torch.from_numpy(batch)).numpy()
    got = model.run(batch)
    assert got.dtype == np.float32 and got.shape == (5, 16)
    np.testing.assert_allclose(got, expected, atol=1e-5, rtol=1e-4)
    assert model.input_name == "input" and model.output_name == "features"
    assert model.meta == {"backbone": "tiny", "feature_dim": "16"}


@needs_no_gpu
def test_auto_is_cpu_only_here_and_quiet(tiny, capfd):
    model = runtime.OrtModel(tiny[1], device="auto")
    model.run(np.zeros((1, 3, 32, 32), np.float32))
    assert model.providers == ["CPUExecutionProvider"]
    assert runtime.resolve_providers("auto") == ["CPUExecutionProvider"]
    captured = capfd.readouterr()
    assert "CUDA" not in captured.err and "TensorRT" not in captured.err
    assert "Error" not in captured.err


@needs_no_gpu
@pytest.mark.parametrize("device", ["cuda", "tensorrt"])
def test_forcing_a_gpu_without_one_is_refused(tiny, device):
    with pytest.raises(BackendError, match="needs an NVIDIA GPU"):
        runtime.resolve_providers(device)
    with pytest.raises(BackendError, match="needs an NVIDIA GPU"):
        runtime.OrtModel(tiny[1], device=device)


def test_auto_prefers_tensorrt_then_cuda(monkeypatch):
    monkeypatch.setattr(providers, "gpu_available", lambda: True)
    monkeypatch.setattr(providers, "tensorrt_loadable", lambda: True)
    assert runtime.resolve_providers("auto") == [runtime.TENSORRT, runtime.CUDA, runtime.CPU]
    monkeypatch.setattr(providers, "tensorrt_loadable", lambda: False)
    assert runtime.resolve_providers("auto") == [runtime.CUDA, runtime.CPU]
    assert runtime.resolve_providers("cuda") == [runtime.CUDA, runtime.CPU]
    with pytest.raises(BackendError, match="TensorRT"):
        runtime.resolve_providers("tensorrt")


@needs_no_gpu
def test_silent_fallback_to_cpu_is_caught(tiny, monkeypatch):
    """Pretend a GPU exists: ORT cannot start CUDA, falls back, and OrtModel notices."""
    monkeypatch.setattr(providers, "gpu_available", lambda: True)
    monkeypatch.setattr(runtime, "preload_gpu_libraries", lambda: None)
    with pytest.raises(BackendError, match="asked for CUDAExecutionProvider but runs"):
        runtime.OrtModel(tiny[1], device="cuda")


def test_gpu_can_be_disabled_by_environment(monkeypatch):
    monkeypatch.setenv("EMBEDX_DISABLE_GPU", "1")
    runtime.gpu_available.cache_clear()
    try:
        assert runtime.gpu_available() is False
    finally:
        monkeypatch.delenv("EMBEDX_DISABLE_GPU")
        runtime.gpu_available.cache_clear()


def test_bad_arguments(tiny, tmp_path):
    with pytest.raises(ConfigError, match="device must be one of"):
        runtime.resolve_providers("tpu")
    with pytest.raises(ConfigError, match="precision must be one of"):
        runtime.OrtModel(tiny[1], device="cpu", precision="int4")
    with pytest.raises(OnnxModelError, match="does not exist"):
        runtime.OrtModel(tmp_path / "missing.onnx", device="cpu")
    garbage = tmp_path / "garbage.onnx"
    garbage.write_bytes(b"not a model")
    with pytest.raises(OnnxModelError, match="cannot load"):
        runtime.OrtModel(garbage, device="cpu")


def test_wrong_input_is_a_clear_error(tiny):
    model = runtime.OrtModel(tiny[1], device="cpu")
    with pytest.raises(BackendError, match="rank-4"):
        model.run(np.zeros((3, 32, 32), np.float32))
    with pytest.raises(BackendError, match="failed on a batch of shape"):
        model.run(np.zeros((1, 4, 32, 32), np.float32))


def test_threads_default_to_physical_cores():
    cores = runtime.physical_cores()
    assert 1 <= cores <= (len(__import__("os").sched_getaffinity(0)))


@needs_no_gpu
def test_fp16_is_refused_on_cpu(tiny):
    with pytest.raises(BackendError, match="fp16 runs only on a GPU"):
        runtime.OrtModel(tiny[1], device="auto", precision="fp16")


# -- int8 --------------------------------------------------------------------------


def test_int8_cosine_is_what_it_claims(tiny, calibration):
    net, path = tiny
    int8_path, cosine = runtime.quantize_int8(path, calibration, min_cosine=0.9)
    assert int8_path.exists() and int8_path != path
    fp32 = runtime.OrtModel(path, device="cpu").run(calibration)
    int8 = runtime.OrtModel(int8_path, device="cpu", precision="int8")
    quantized = int8.run(calibration)
    recomputed = runtime.cosine_similarity_rows(fp32, quantized).mean()
    assert cosine == pytest.approx(recomputed, abs=1e-6)
    assert 0.9 <= cosine < 1.0  # quantized: close, not identical
    assert int8.int8_cosine == pytest.approx(cosine, abs=1e-6)
    assert int8.meta["precision"] == "int8" and int8.meta["backbone"] == "tiny"
    import onnx

    ops = {node.op_type for node in onnx.load(str(int8_path)).graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops  # static QDQ, not dynamic


def test_int8_is_cached_by_model_and_calibration(tiny, calibration):
    first, cosine = runtime.quantize_int8(tiny[1], calibration, min_cosine=0.9)
    stamp = first.stat().st_mtime_ns
    again, cosine_again = runtime.quantize_int8(tiny[1], calibration, min_cosine=0.9)
    assert (again, cosine_again) == (first, cosine) and again.stat().st_mtime_ns == stamp
    other, _ = runtime.quantize_int8(tiny[1], calibration[:16], min_cosine=0.9)
    assert other != first


def test_int8_calibration_source_is_loaded_only_when_not_cached(tiny, calibration):
    loads = []

    def load():
        loads.append(1)
        return calibration, "what-was-loaded"

    first, cosine = runtime.quantize_int8(tiny[1], runtime.CalibrationSource("asked-for", load), min_cosine=0.9)
    assert loads == [1]
    # stored under the key of what was loaded: asking for that key loads nothing
    never = runtime.CalibrationSource("what-was-loaded", lambda: pytest.fail("loaded a cached calibration"))
    assert runtime.quantize_int8(tiny[1], never, min_cosine=0.9) == (first, cosine)
    # the key asked for first named other images, so it is still not cached
    runtime.quantize_int8(tiny[1], runtime.CalibrationSource("asked-for", load), min_cosine=0.9)
    assert loads == [1, 1]


def test_metadata_probe_reads_what_onnx_reads(tiny, calibration, tmp_path):
    int8_path, _ = runtime.quantize_int8(tiny[1], calibration, min_cosine=0.9)
    for path in (tiny[1], int8_path):
        assert onnxmeta.probe(Path(path)) == onnxmeta.read(path)
    assert onnxmeta.probe(Path(int8_path))["precision"] == "int8"
    cut = tmp_path / "cut.onnx"
    cut.write_bytes(Path(int8_path).read_bytes()[:-3])  # a damaged file goes the slow way, which says why
    with pytest.raises(Exception):  # noqa: B017 - onnx's own decode error
        onnxmeta.probe(cut)


def test_int8_gate_refuses_with_the_figure(tiny, calibration):
    _, cosine = runtime.quantize_int8(tiny[1], calibration, min_cosine=0.0)
    assert runtime.quantize_int8(tiny[1], calibration, min_cosine=cosine)[1] == cosine
    with pytest.raises(QuantizationError, match=rf"cosine similarity of {cosine:.4f} .*below the gate"):
        runtime.quantize_int8(tiny[1], calibration, min_cosine=cosine + 1e-9)


@pytest.mark.parametrize("vnni", [True, False])
def test_int8_refusal_says_when_the_cpu_forced_7_bit_weights(tiny, calibration, monkeypatch, vnni):
    monkeypatch.setattr(quantize, "cpu_has_vnni", lambda: vnni)
    with pytest.raises(QuantizationError) as refused:
        runtime.quantize_int8(tiny[1], calibration, min_cosine=1.5)
    message = str(refused.value)
    assert "below the gate of 1.5" in message
    assert ("no VNNI" in message) is not vnni and ("7 bits" in message) is not vnni


def test_int8_through_ortmodel(tiny, calibration):
    with pytest.raises(BackendError, match="needs a calibration sample"):
        runtime.OrtModel(tiny[1], device="cpu", precision="int8")
    model = runtime.OrtModel(tiny[1], device="cpu", precision="int8", calibration=calibration,
                             min_cosine=0.9)
    assert model.precision == "int8" and model.int8_cosine > 0.9
    assert model.source_path == tiny[1] and model.path != tiny[1]
    assert model.run(calibration[:3]).shape == (3, 16)


def test_int8_rejects_a_bad_calibration(tiny):
    with pytest.raises(QuantizationError, match="NCHW"):
        runtime.quantize_int8(tiny[1], np.zeros((3, 32, 32), np.float32))


def test_cosine_rows():
    a = np.array([[1.0, 0.0], [0.0, 0.0], [1.0, 1.0]])
    b = np.array([[2.0, 0.0], [0.0, 0.0], [-1.0, -1.0]])
    np.testing.assert_allclose(runtime.cosine_similarity_rows(a, b), [1.0, 1.0, -1.0])


def test_runtime_is_torch_free():
    code = "import embedx.runtime, sys; sys.exit(int('torch' in sys.modules))"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


@pytest.mark.slow
def test_real_int8_classifier_runs(mobilenet_int8_onnx):
    model = runtime.OrtModel(mobilenet_int8_onnx, device="cpu")
    out = model.run(np.zeros((2, 3, 224, 224), np.float32))
    assert out.shape == (2, 1000) and model.output_name == "output"


@pytest.mark.slow
def test_resnet18_int8_gate(tmp_path):
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    net = torchvision.models.resnet18(weights=None)
    net.fc = torch.nn.Identity()
    path = export(net.eval(), tmp_path / "resnet18.onnx", size=224)
    sample = np.random.default_rng(0).normal(size=(16, 3, 224, 224)).astype(np.float32)
    try:
        _, cosine = runtime.quantize_int8(path, sample, min_cosine=0.99)
    except QuantizationError as e:
        pytest.fail(f"resnet18 (random weights) failed the int8 gate: {e}")
    assert 0.99 <= cosine <= 1.0


# -- GPU -----------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("device", ["cuda", "tensorrt"])
@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_gpu_providers_and_fp16(tiny, device, precision):
    if not runtime.gpu_available():
        pytest.skip("no NVIDIA GPU on this machine")
    if device == "tensorrt" and not providers.tensorrt_loadable():
        pytest.skip("TensorRT (libnvinfer) is not installed")
    net, path = tiny
    model = runtime.OrtModel(path, device=device, precision=precision)
    expected_provider = runtime.TENSORRT if device == "tensorrt" else runtime.CUDA
    assert model.providers[0] == expected_provider
    batch = np.random.default_rng(2).normal(size=(4, 3, 32, 32)).astype(np.float32)
    with torch.no_grad():
        reference = net(torch.from_numpy(batch)).numpy()
    got = model.run(batch)
    assert got.dtype == np.float32
    if precision == "fp32":
        np.testing.assert_allclose(got, reference, atol=1e-3, rtol=1e-3)
    else:
        assert runtime.cosine_similarity_rows(got, reference).min() > 0.999


def test_optimized_graph_is_cached_and_equivalent(tiny):
    net, path = tiny
    batch = np.random.default_rng(3).normal(size=(3, 3, 32, 32)).astype(np.float32)
    first = runtime.OrtModel(path, device="cpu")
    cached = runtime._optimized_cache_path(path)
    assert cached.exists()
    stamp = cached.stat().st_mtime_ns
    second = runtime.OrtModel(path, device="cpu")
    assert cached.stat().st_mtime_ns == stamp  # read, not rewritten
    np.testing.assert_array_equal(second.run(batch), first.run(batch))
    assert second.meta == first.meta == {"backbone": "tiny", "feature_dim": "16"}
    assert (second.input_name, second.output_name) == ("input", "features")
    plain = runtime.OrtModel(path, device="cpu", cache_optimized=False)
    np.testing.assert_allclose(plain.run(batch), first.run(batch), atol=1e-6)


def test_a_damaged_optimized_cache_is_rebuilt(tiny):
    path = tiny[1]
    runtime.OrtModel(path, device="cpu")
    cached = runtime._optimized_cache_path(path)
    cached.write_bytes(b"garbage")
    model = runtime.OrtModel(path, device="cpu")
    assert model.run(np.zeros((1, 3, 32, 32), np.float32)).shape == (1, 16)
    assert cached.stat().st_size > 100


def test_read_only_cache_still_runs(tiny, tmp_path, monkeypatch, calibration):
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("a file where the cache folder should be")
    monkeypatch.setenv("EMBEDX_CACHE_DIR", str(blocker))
    model = runtime.OrtModel(tiny[1], device="cpu")
    assert model.run(np.zeros((2, 3, 32, 32), np.float32)).shape == (2, 16)
    with pytest.raises(QuantizationError, match="not writable"):
        runtime.quantize_int8(tiny[1], calibration)


def test_fp16_copy_for_cuda_keeps_float32_io(tiny):
    """The CUDA fp16 model is built on any machine; only running it needs the GPU."""
    import onnx

    converted = quantize.fp16_model(tiny[1])
    assert converted == quantize.fp16_model(tiny[1])  # cached by the source's sha256
    model = onnx.load(str(converted))
    float16, float32 = onnx.TensorProto.FLOAT16, onnx.TensorProto.FLOAT
    assert model.graph.input[0].type.tensor_type.elem_type == float32
    assert model.graph.output[0].type.tensor_type.elem_type == float32
    assert {t.data_type for t in model.graph.initializer} == {float16}
    meta = onnxmeta.from_proto(model)
    assert meta["precision"] == "fp16" and meta["backbone"] == "tiny"
