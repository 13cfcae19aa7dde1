"""Backbones that take uint8 pixels: normalization inside the ONNX graph.

Extraction hands the runtime uint8 NHWC batches (``preprocess.to_pixels``), a quarter of
the bytes of float32 NCHW, and the graph does ``Cast -> Transpose -> x * scale + bias``
itself: on a GPU that work runs on the device after a 4x smaller upload; on the CPU it
spares the main process a float32 pass over every pixel. The multiply-add is the one
``preprocess.normalize`` does (same constants, same order), so features agree with the
float path to float rounding. Bundles with ``--with-preprocess`` use the same prefix.

Torch-free.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np

from embedx import fsio, onnxmeta, paths
from embedx.preprocess import PreprocessSpec

logger = logging.getLogger(__name__)

#: Input name of a pixel model: uint8 (N, H, W, 3), RGB, already resized and cropped.
PIXEL_INPUT = "image"
#: Input name of a backbone export: float32 (N, 3, H, W), normalized.
FLOAT_INPUT = "input"
PREFIX = "preprocess/"
#: Bumped when the prefix graph changes (part of the derived file's name).
PREFIX_VERSION = "1"


def prepend_normalization(model: Any, spec: PreprocessSpec, *, batch_dim: Any = "N",
                          float_input: str = FLOAT_INPUT, pixels: str = PIXEL_INPUT) -> None:
    """Make ``model`` take uint8 NHWC ``"image"`` and feed ``float_input`` from it, in place.

    ``uint8 NHWC -> Cast -> Transpose -> x * 1/(255 std) + (-mean/std) -> float_input``.
    ``pixels``: the uint8 NHWC tensor read (the graph input ``"image"``, declared here, unless
    another name: ``resize_graph`` feeds the prefix from its crop).
    """
    from onnx import TensorProto, helper, numpy_helper

    graph = model.graph
    if not any(value.name == float_input for value in graph.input):
        raise ValueError(f"the model has no input {float_input!r} to feed from pixels")
    mean = np.asarray(spec.mean, dtype=np.float32)
    std = np.asarray(spec.std, dtype=np.float32)
    scale = (1.0 / (255.0 * std)).reshape(1, 3, 1, 1).astype(np.float32)
    bias = (-mean / std).reshape(1, 3, 1, 1).astype(np.float32)
    size = spec.input_size
    graph.initializer.extend([numpy_helper.from_array(scale, PREFIX + "scale"),
                              numpy_helper.from_array(bias, PREFIX + "bias")])
    nodes = [
        helper.make_node("Cast", [pixels], [PREFIX + "float"], to=TensorProto.FLOAT, name=PREFIX + "cast"),
        helper.make_node("Transpose", [PREFIX + "float"], [PREFIX + "nchw"], perm=[0, 3, 1, 2],
                         name=PREFIX + "transpose"),
        helper.make_node("Mul", [PREFIX + "nchw", PREFIX + "scale"], [PREFIX + "scaled"], name=PREFIX + "mul"),
        helper.make_node("Add", [PREFIX + "scaled", PREFIX + "bias"], [float_input], name=PREFIX + "add"),
    ]
    existing = list(graph.node)
    del graph.node[:]
    graph.node.extend(nodes + existing)
    kept = [value for value in graph.input if value.name != float_input]
    del graph.input[:]
    if pixels == PIXEL_INPUT:
        graph.input.append(helper.make_tensor_value_info(PIXEL_INPUT, TensorProto.UINT8,
                                                         [batch_dim, size, size, 3]))
    graph.input.extend(kept)


def pixel_model(path: str | Path, spec: PreprocessSpec, *, source_sha256: str | None = None) -> Path:
    """A copy of the backbone ``path`` that takes uint8 pixels, cached under ``cache_dir()/runtime``.

    Keyed by the source's sha256 and the normalization constants; written atomically.
    """
    import onnx

    path = Path(path)
    digest = source_sha256 or fsio.sha256_file(path)
    constants = fsio.sha256_bytes(repr((spec.input_size, spec.mean, spec.std, PREFIX_VERSION)).encode())
    folder = paths.cache_dir() / "runtime"
    folder.mkdir(parents=True, exist_ok=True)
    target = folder / f"{path.stem}-{digest[:16]}-u8{constants[:8]}.onnx"
    if target.exists():
        return target
    model = onnx.load(str(path))
    prepend_normalization(model, spec)
    onnxmeta.write(model, {"input_format": "uint8_nhwc"})
    with fsio.atomic_path(target) as tmp:
        onnx.save(model, str(tmp))
    logger.info("wrote pixel-input model %s", target)
    return target


__all__ = ["FLOAT_INPUT", "PIXEL_INPUT", "pixel_model", "prepend_normalization"]
