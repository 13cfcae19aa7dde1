"""Tiny ONNX backbones, heads and bundles built with onnx.helper (no torch, milliseconds).

Shared by test_bundle.py, test_predict.py and test_serve.py.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from embedx import onnxmeta
from embedx.preprocess import PreprocessSpec

SPEC = PreprocessSpec(input_size=16, resize_size=20, mean=(0.5, 0.4, 0.3), std=(0.2, 0.25, 0.3))
CLASSES = ["cat", "dog", "fish"]


def tiny_backbone(*, spec: PreprocessSpec = SPEC, feature_dim: int = 8, seed: int = 0, opset: int = 17,
                  batch: str | int = "batch"):
    """"input" (N,3,S,S) -> Conv 3x3 -> Relu -> GlobalAveragePool -> Flatten -> "features"."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    weight = rng.normal(0, 0.5, (feature_dim, 3, 3, 3)).astype(np.float32)
    bias = rng.normal(0, 0.1, (feature_dim,)).astype(np.float32)
    size = spec.input_size
    graph = helper.make_graph(
        [
            helper.make_node("Conv", ["input", "conv.weight", "conv.bias"], ["conv"], pads=[1, 1, 1, 1]),
            helper.make_node("Relu", ["conv"], ["relu"]),
            helper.make_node("GlobalAveragePool", ["relu"], ["pool"]),
            helper.make_node("Flatten", ["pool"], ["features"], axis=1),
        ],
        "tiny_backbone",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, [batch, 3, size, size])],
        [helper.make_tensor_value_info("features", TensorProto.FLOAT, [batch, feature_dim])],
        [numpy_helper.from_array(weight, "conv.weight"), numpy_helper.from_array(bias, "conv.bias")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    onnxmeta.write(
        model,
        {
            "kind": "backbone",
            "backbone": "tiny",
            "weights": "none",
            "feature_layer": "pool",
            "feature_dim": str(feature_dim),
            "preprocess": spec.to_dict(),
            "fingerprint": "0" * 16,
        },
    )
    return model


def tiny_head(*, feature_dim: int = 8, num_classes: int = len(CLASSES), seed: int = 1, opset: int = 17):
    """"features" (N,D) -> MatMul + Add -> "logits" (N,C); returns (model, weight, bias)."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    weight = rng.normal(0, 3.0, (feature_dim, num_classes)).astype(np.float32)
    bias = rng.normal(0, 0.5, (num_classes,)).astype(np.float32)
    graph = helper.make_graph(
        [
            helper.make_node("MatMul", ["features", "W"], ["mm"]),
            helper.make_node("Add", ["mm", "b"], ["logits"]),
        ],
        "tiny_head",
        [helper.make_tensor_value_info("features", TensorProto.FLOAT, ["N", feature_dim])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", num_classes])],
        [numpy_helper.from_array(weight, "W"), numpy_helper.from_array(bias, "b")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    return model, weight, bias


def make_bundle(path: Path, *, with_preprocess: bool | str = False, temperature: float = 1.5,
                batch: str | int = "batch", force: bool = False, spec: PreprocessSpec = SPEC) -> Path:
    from embedx.bundle import compose, save

    head, _, _ = tiny_head()
    model = compose(
        tiny_backbone(batch=batch, spec=spec),
        head,
        classes=CLASSES,
        temperature=temperature,
        preprocess=spec,
        with_preprocess=with_preprocess,
        metadata={"backbone": "tiny", "weights": "none", "feature_layer": "pool", "feature_dim": "8"},
    )
    return save(model, path, **({"force": True} if force else {}))


def write_images(folder: Path, count: int = 6, *, size: tuple[int, int] = (40, 30), seed: int = 0) -> list[Path]:
    """Small noisy PNG/JPEG images with different dominant colours."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(count):
        base = rng.integers(0, 256, 3)
        pixels = np.clip(base + rng.normal(0, 40, (size[1], size[0], 3)), 0, 255).astype(np.uint8)
        path = folder / f"img_{i}.{'png' if i % 2 == 0 else 'jpg'}"
        Image.fromarray(pixels).save(path)
        paths.append(path)
    return paths


def image_bytes(seed: int = 0, *, size: tuple[int, int] = (40, 30), fmt: str = "PNG") -> bytes:
    import io

    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format=fmt)
    return buffer.getvalue()
