"""Resize and centre crop inside an ONNX graph: bundles that take decoded images of any size.

``prepend_full_preprocess`` puts in front of a model that reads uint8 NHWC pixels of
``input_size`` the steps ``preprocess.to_pixels`` does after decoding, so the model takes
``"image"`` uint8 (N, H, W, 3) of any H, W (images of one call share a size):

* the sizes: torchvision's ``Resize(resize_size)`` (shorter side ``resize_size``, longer
  ``resize_size * long // short``) and ``CenterCrop(input_size)`` (offsets rounded half to
  even, like Python's ``round`` and ONNX ``Round``);
* ``mode="exact"``: one uint8 ``Resize`` with ``antialias=1`` (onnxruntime's port of
  Pillow's resampling; bilinear, or bicubic with a = -0.5): on hymenoptera the pixels
  match Pillow's to a few thousandths of a grey level on average;
* ``mode="fast"``: what ``preprocess._fast_resized_view`` does with OpenCV, in float: the
  separable Gaussian blur of variance ``(s^2 - 1) / 6`` per axis (radius ``ceil(2 sigma)``,
  reflect-101 borders, rounded to uint8), then a plain half-pixel bilinear (or bicubic,
  a = -0.75) ``Resize``, rounded.  OpenCV computes both in fixed point: about one pixel in
  seven comes out one grey level off, and probabilities move by up to ~1e-2.

``Resize``'s ``antialias`` needs opset 18 (``FULL_OPSET``); the model must be there already.
Torch-free; needs ``onnx``.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from embedx.pixel_input import FLOAT_INPUT, PIXEL_INPUT, PREFIX, prepend_normalization
from embedx.preprocess import PreprocessSpec

#: ONNX Resize mode and cubic coefficient per interpolation: Pillow's (exact) and OpenCV's (fast) filters.
RESIZE_MODES = {"bilinear": "linear", "bicubic": "cubic"}
CUBIC_A = {"exact": -0.5, "fast": -0.75}
FULL_OPSET = 18
#: OpenCV's smallest sigma (``_fast_resized_view`` passes max(sigma, 1e-3)): a kernel of one tap.
MIN_SIGMA = 1e-3


class _Builder:
    """Nodes and initializers under ``PREFIX``, added in order."""

    def __init__(self) -> None:
        self.nodes: list[Any] = []
        self.initializers: list[Any] = []

    def const(self, name: str, values: Any, dtype: Any = np.int64) -> str:
        from onnx import numpy_helper

        self.initializers.append(numpy_helper.from_array(np.asarray(values, dtype=dtype), PREFIX + name))
        return PREFIX + name

    def node(self, op: str, inputs: list[str], name: str, **attrs: Any) -> str:
        from onnx import helper

        self.nodes.append(helper.make_node(op, inputs, [PREFIX + name], name=PREFIX + name, **attrs))
        return PREFIX + name

    def floats(self, name: str, value: float) -> str:
        return self.const(name, [value], np.float32)

    def to_float(self, tensor: str, name: str) -> str:
        from onnx import TensorProto

        return self.node("Cast", [tensor], name, to=TensorProto.FLOAT)

    def round_pixels(self, tensor: str, name: str) -> str:
        """Round and clip to 0..255 in float, as a uint8 result would be."""
        low, high = self.const(name + "_lo", 0.0, np.float32), self.const(name + "_hi", 255.0, np.float32)
        return self.node("Clip", [self.node("Round", [tensor], name + "_round"), low, high], name)


def prepend_full_preprocess(model: Any, spec: PreprocessSpec, *, batch_dim: Any = "N",
                            float_input: str = FLOAT_INPUT) -> None:
    """Make ``model`` (opset >= ``FULL_OPSET``) take decoded uint8 ``"image"`` (N, H, W, 3) of any size,
    in place: resize and crop as ``spec.mode`` does (module docstring), then ``prepend_normalization``."""
    from onnx import TensorProto, helper

    if spec.interpolation not in RESIZE_MODES:
        raise ValueError(f"a graph with resize and crop supports interpolation {sorted(RESIZE_MODES)}, "
                         f"not {spec.interpolation!r}")
    cropped = PREFIX + "cropped"
    prepend_normalization(model, spec, batch_dim=batch_dim, float_input=float_input, pixels=cropped)
    b = _Builder()
    shape = b.node("Shape", [PIXEL_INPUT], "shape")
    batch = b.node("Slice", [shape, b.const("at0", [0]), b.const("at1", [1])], "batch")
    height = b.node("Slice", [shape, b.const("at1b", [1]), b.const("at2", [2])], "height")
    width = b.node("Slice", [shape, b.const("at2b", [2]), b.const("at3", [3])], "width")
    short = b.node("Min", [height, width], "short")
    resize = b.const("resize_size", [spec.resize_size])
    new_height = b.node("Div", [b.node("Mul", [height, resize], "height_x"), short], "new_height")
    new_width = b.node("Div", [b.node("Mul", [width, resize], "width_x"), short], "new_width")
    channels = b.const("channels", [3])
    mode, cubic_a = RESIZE_MODES[spec.interpolation], CUBIC_A[spec.mode]
    if spec.mode == "exact":
        sizes = b.node("Concat", [batch, new_height, new_width, channels], "sizes", axis=0)
        resized = b.node("Resize", [PIXEL_INPUT, "", "", sizes], "resized", mode=mode, antialias=1,
                         coordinate_transformation_mode="half_pixel", cubic_coeff_a=cubic_a)
    else:
        x = b.node("Transpose", [b.to_float(PIXEL_INPUT, "source_float")], "source_nchw", perm=[0, 3, 1, 2])
        x = _blur(b, x, width, new_width, axis=3)
        x = b.round_pixels(_blur(b, x, height, new_height, axis=2), "blurred")
        sizes = b.node("Concat", [batch, channels, new_height, new_width], "sizes", axis=0)
        x = b.node("Resize", [x, "", "", sizes], "resized_float", mode=mode, antialias=0,
                   coordinate_transformation_mode="half_pixel", cubic_coeff_a=cubic_a)
        x = b.node("Transpose", [b.round_pixels(x, "resized_rounded")], "resized_nhwc", perm=[0, 2, 3, 1])
        resized = b.node("Cast", [x], "resized", to=TensorProto.UINT8)
    crop, axes = b.const("crop", [spec.input_size]), b.const("axes", [1, 2])

    def offset(length: str, name: str) -> str:  # int(round((length - crop) / 2)), round half to even
        half = b.node("Div", [b.to_float(b.node("Sub", [length, crop], name + "_margin"), name + "_float"),
                              b.floats(name + "_two", 2.0)], name + "_half")
        return b.node("Cast", [b.node("Round", [half], name + "_round")], name, to=TensorProto.INT64)

    starts = b.node("Concat", [offset(new_height, "top"), offset(new_width, "left")], "starts", axis=0)
    b.nodes.append(helper.make_node("Slice", [resized, starts, b.node("Add", [starts, crop], "ends"), axes],
                                    [cropped], name=cropped))
    graph = model.graph
    graph.initializer.extend(b.initializers)
    existing = list(graph.node)
    del graph.node[:]
    graph.node.extend(b.nodes + existing)
    kept = [value for value in graph.input if value.name != PIXEL_INPUT]
    del graph.input[:]
    graph.input.append(helper.make_tensor_value_info(PIXEL_INPUT, TensorProto.UINT8, [batch_dim, "H", "W", 3]))
    graph.input.extend(kept)


def _blur(b: _Builder, x: str, length: str, new_length: str, *, axis: int) -> str:
    """``preprocess._fast_resized_view``'s Gaussian blur along one axis of NCHW float ``x``: sigma
    ``sqrt(max(s^2 - 1, 0) / 6)`` for the shrink factor ``s``, radius ``max(1, ceil(2 sigma))``,
    reflect-101 borders (OpenCV's default, ONNX ``Pad`` mode reflect), a depthwise ``Conv``."""
    from onnx import TensorProto

    p = f"blur{axis}_"
    scale = b.node("Div", [b.to_float(length, p + "length"), b.to_float(new_length, p + "new_length")], p + "scale")
    excess = b.node("Sub", [b.node("Mul", [scale, scale], p + "scale2"), b.floats(p + "one", 1.0)], p + "excess")
    variance = b.node("Div", [b.node("Max", [excess, b.floats(p + "zero", 0.0)], p + "positive"),
                              b.floats(p + "six", 6.0)], p + "variance")
    sigma = b.node("Sqrt", [variance], p + "sigma")
    radius = b.node("Max", [b.node("Ceil", [b.node("Mul", [sigma, b.floats(p + "two", 2.0)], p + "two_sigma")],
                                   p + "ceil"), b.floats(p + "min_radius", 1.0)], p + "radius")
    r = b.node("Squeeze", [radius], p + "r")
    offsets = b.node("Range", [b.node("Neg", [r], p + "minus_r"),
                               b.node("Add", [r, b.const(p + "one_scalar", 1.0, np.float32)], p + "r_end"),
                               b.const(p + "step", 1.0, np.float32)], p + "offsets")
    spread = b.node("Max", [sigma, b.floats(p + "min_sigma", MIN_SIGMA)], p + "spread")
    denominator = b.node("Mul", [b.node("Mul", [spread, spread], p + "spread2"), b.floats(p + "minus_two", -2.0)],
                         p + "denominator")
    weights = b.node("Exp", [b.node("Div", [b.node("Mul", [offsets, offsets], p + "offsets2"), denominator],
                                    p + "exponent")], p + "weights")
    weights = b.node("Div", [weights, b.node("ReduceSum", [weights], p + "weight_sum", keepdims=1)], p + "normalized")
    kernel_shape = b.const(p + "kernel_shape", [1, 1, -1, 1] if axis == 2 else [1, 1, 1, -1])
    kernel = b.node("Tile", [b.node("Reshape", [weights, kernel_shape], p + "kernel1"),
                             b.const(p + "per_channel", [3, 1, 1, 1])], p + "kernel")
    zero, pad = b.const(p + "no_pad", [0]), b.node("Cast", [radius], p + "pad", to=TensorProto.INT64)
    along = [zero, zero, pad, zero] if axis == 2 else [zero, zero, zero, pad]
    pads = b.node("Concat", along + along, p + "pads", axis=0)
    return b.node("Conv", [b.node("Pad", [x, pads], p + "padded", mode="reflect"), kernel], p + "out", group=3)
