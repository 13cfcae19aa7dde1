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
                          float_input: str = FLOAT_INPUT) -> None:
    """Make ``model`` take uint8 NHWC ``"image"`` and feed ``float_input`` from it, in place.

    ``uint8 NHWC -> Cast -> Transpose -> x * 1/(255 std) + (-mean/std) -> float_input``.
    """
    _prepend_normalization(model, spec, batch_dim=batch_dim, float_input=float_input, pixels=PIXEL_INPUT)


def _prepend_normalization(model: Any, spec: PreprocessSpec, *, batch_dim: Any, float_input: str,
                           pixels: str) -> None:
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


#: ONNX Resize settings per ``PreprocessSpec.interpolation``: Pillow's filters (cubic with a = -0.5).
_RESIZE_MODES = {"bilinear": "linear", "bicubic": "cubic"}
#: Resize's ``antialias`` attribute (Pillow's filter widening when shrinking) came with opset 18.
FULL_OPSET = 18


def prepend_full_preprocess(model: Any, spec: PreprocessSpec, *, batch_dim: Any = "N",
                            float_input: str = FLOAT_INPUT) -> None:
    """Make ``model`` take decoded uint8 ``"image"`` (N, H, W, 3) of any size, in place.

    ``Resize`` (uint8, antialiased, half-pixel centres: onnxruntime's port of Pillow's
    resampling) of the shorter side to ``resize_size`` with torchvision's sizes, ``Slice``
    of the centre ``input_size`` square (torchvision's offsets: half-to-even rounding, as
    ONNX ``Round``), then ``prepend_normalization``'s prefix.  The model must be at opset
    ``FULL_OPSET`` or later.  Images of one call share one size (N of them).
    """
    from onnx import TensorProto, helper, numpy_helper

    if spec.interpolation not in _RESIZE_MODES:
        raise ValueError(f"a graph with resize and crop supports interpolation {sorted(_RESIZE_MODES)}, "
                         f"not {spec.interpolation!r}")
    cropped = PREFIX + "cropped"
    _prepend_normalization(model, spec, batch_dim=batch_dim, float_input=float_input, pixels=cropped)
    graph = model.graph

    def const(name: str, values: list, dtype=np.int64) -> str:
        graph.initializer.append(numpy_helper.from_array(np.asarray(values, dtype=dtype), PREFIX + name))
        return PREFIX + name

    def node(op: str, inputs: list[str], name: str, **attrs: Any) -> str:
        nodes.append(helper.make_node(op, inputs, [PREFIX + name], name=PREFIX + name, **attrs))
        return PREFIX + name

    nodes: list[Any] = []
    shape = node("Shape", [PIXEL_INPUT], "shape")
    batch = node("Slice", [shape, const("at0", [0]), const("at1", [1])], "batch")
    height = node("Slice", [shape, const("at1b", [1]), const("at2", [2])], "height")
    width = node("Slice", [shape, const("at2b", [2]), const("at3", [3])], "width")
    short = node("Min", [height, width], "short")
    resize = const("resize_size", [spec.resize_size])
    # torchvision: the shorter side becomes resize_size, the longer int(resize_size * long / short)
    new_height = node("Div", [node("Mul", [height, resize], "height_x"), short], "new_height")
    new_width = node("Div", [node("Mul", [width, resize], "width_x"), short], "new_width")
    sizes = node("Concat", [batch, new_height, new_width, const("channels", [3])], "sizes", axis=0)
    resized = node("Resize", [PIXEL_INPUT, "", "", sizes], "resized", mode=_RESIZE_MODES[spec.interpolation],
                   antialias=1, coordinate_transformation_mode="half_pixel", cubic_coeff_a=-0.5)
    crop = const("crop", [spec.input_size])

    def offset(length: str, name: str) -> str:  # int(round((length - crop) / 2)), round half to even
        margin = node("Cast", [node("Sub", [length, crop], name + "_margin")], name + "_float", to=TensorProto.FLOAT)
        half = node("Div", [margin, const(name + "_two", [2.0], np.float32)], name + "_half")
        return node("Cast", [node("Round", [half], name + "_round")], name, to=TensorProto.INT64)

    top, left = offset(new_height, "top"), offset(new_width, "left")
    starts = node("Concat", [top, left], "starts", axis=0)
    ends = node("Add", [starts, crop], "ends")
    nodes.append(helper.make_node("Slice", [resized, starts, ends, const("axes", [1, 2])], [cropped],
                                  name=cropped))
    existing = list(graph.node)
    del graph.node[:]
    graph.node.extend(nodes + existing)
    kept = [value for value in graph.input if value.name != PIXEL_INPUT]
    del graph.input[:]
    graph.input.append(helper.make_tensor_value_info(PIXEL_INPUT, TensorProto.UINT8, [batch_dim, "H", "W", 3]))
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


__all__ = ["FLOAT_INPUT", "PIXEL_INPUT", "pixel_model", "prepend_full_preprocess", "prepend_normalization"]
