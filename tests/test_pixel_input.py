"""uint8 pixel-input backbones and IO-bound runs at a fixed batch shape (CPU provider here)."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from embedx import preprocess
from embedx.errors import BackendError
from embedx.iobinding import BoundRunner
from embedx.pixel_input import PIXEL_INPUT, pixel_model
from tests.bundle_fixtures import SPEC, tiny_backbone


@pytest.fixture
def backbone(tmp_path):
    path = tmp_path / "tiny.onnx"
    onnx.save(tiny_backbone(), str(path))
    return path


def _session(path):
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def _pixels(count, seed=0):
    size = SPEC.input_size
    return np.random.default_rng(seed).integers(0, 256, (count, size, size, 3), dtype=np.uint8)


def test_the_pixel_model_equals_normalize_then_the_float_model(backbone):
    u8_path = pixel_model(backbone, SPEC)
    session = _session(u8_path)
    assert [i.name for i in session.get_inputs()] == [PIXEL_INPUT]
    assert session.get_inputs()[0].type == "tensor(uint8)"
    pixels = _pixels(5)
    floats = np.stack([preprocess.normalize(p, SPEC) for p in pixels])
    (expected,) = _session(backbone).run(["features"], {"input": floats})
    (got,) = session.run(["features"], {PIXEL_INPUT: pixels})
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)
    assert pixel_model(backbone, SPEC) == u8_path  # cached, not rebuilt
    other = preprocess.PreprocessSpec(input_size=SPEC.input_size, resize_size=SPEC.resize_size,
                                      mean=(0.5,) * 3, std=(0.5,) * 3)
    assert pixel_model(backbone, other) != u8_path  # the constants are part of the key


def test_bound_runner_pads_short_batches_and_returns_real_rows(backbone):
    session = _session(pixel_model(backbone, SPEC))
    runner = BoundRunner(session, batch_size=4)
    assert runner.feature_dim == 8 and not runner.on_gpu
    pixels = _pixels(7, seed=1)
    (expected,) = session.run(["features"], {PIXEL_INPUT: pixels})
    first = runner.run(pixels[:4])
    second = runner.run(pixels[4:])  # 3 rows, padded to 4
    assert second.shape == (3, 8)
    np.testing.assert_allclose(np.concatenate([first, second]), expected, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(first, expected[:4], rtol=1e-6, atol=1e-6)  # not overwritten by the next run


def test_bound_runner_refuses_wrong_batches(backbone):
    runner = BoundRunner(_session(pixel_model(backbone, SPEC)), batch_size=2)
    with pytest.raises(BackendError, match="a batch of 3 rows"):
        runner.run(_pixels(3))
    with pytest.raises(BackendError, match="expects items of shape"):
        runner.run(np.zeros((1, 8, 8, 3), dtype=np.uint8))
