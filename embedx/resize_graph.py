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
* ``mode="fast"``: what ``preprocess._fast_resized_view`` does with OpenCV, in OpenCV's own
  fixed-point arithmetic: the separable Gaussian blur of variance ``(s^2 - 1) / 6`` per axis
  (radius ``ceil(2 sigma)``, reflect-101 borders, integer weights summing to 256 made by
  OpenCV's error diffusion, rounded ``(v + 2^15) >> 16``), then for bilinear ``cv::resize``'s
  11-bit weights and vectorized rounding on the cropped pixels only (bicubic: a plain
  ``Resize``, a = -0.75, rounded).  On hymenoptera's 153 val images all 153 come out pixel for
  pixel equal to ``to_pixels`` (143 before the kernel's error diffusion was reproduced).

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
    crop, axes = b.const("crop", [spec.input_size]), b.const("axes", [1, 2])

    def offset(length: str, name: str) -> str:  # int(round((length - crop) / 2)), round half to even
        half = b.node("Div", [b.to_float(b.node("Sub", [length, crop], name + "_margin"), name + "_float"),
                              b.floats(name + "_two", 2.0)], name + "_half")
        return b.node("Cast", [b.node("Round", [half], name + "_round")], name, to=TensorProto.INT64)

    top, left = offset(new_height, "top"), offset(new_width, "left")
    mode, cubic_a = RESIZE_MODES[spec.interpolation], CUBIC_A[spec.mode]
    if spec.mode == "exact":
        sizes = b.node("Concat", [batch, new_height, new_width, channels], "sizes", axis=0)
        resized = b.node("Resize", [PIXEL_INPUT, "", "", sizes], "resized", mode=mode, antialias=1,
                         coordinate_transformation_mode="half_pixel", cubic_coeff_a=cubic_a)
    else:
        x = b.node("Transpose", [b.to_float(PIXEL_INPUT, "source_float")], "source_nchw", perm=[0, 3, 1, 2])
        x = _blur(b, _blur(b, x, width, new_width, axis=3), height, new_height, axis=2)
        # OpenCV's conversion of the 16-fraction-bit sums to uint8: (v + 2^15) >> 16
        x = b.node("Floor", [b.node("Div", [b.node("Add", [x, b.floats("half_unit", 32768.0)], "blur_sum"),
                                            b.floats("unit", 65536.0)], "blur_scaled")], "blurred")
        if spec.interpolation == "bilinear":  # OpenCV's fixed-point arithmetic, on the cropped part only
            rows = _opencv_linear_taps(b, height, new_height, top, spec.input_size, "rows")
            columns = _opencv_linear_taps(b, width, new_width, left, spec.input_size, "columns")
            x = _opencv_linear(b, b.node("Cast", [x], "blurred_int", to=TensorProto.INT32), rows, columns)
            x = b.node("Transpose", [b.node("Cast", [x], "crop_uint8", to=TensorProto.UINT8)], "crop_nhwc",
                       perm=[0, 2, 3, 1])
            b.nodes.append(helper.make_node("Identity", [x], [cropped], name=cropped))
        else:
            sizes = b.node("Concat", [batch, channels, new_height, new_width], "sizes", axis=0)
            x = b.node("Resize", [x, "", "", sizes], "resized_float", mode=mode, antialias=0,
                       coordinate_transformation_mode="half_pixel", cubic_coeff_a=cubic_a)
            x = b.node("Transpose", [b.round_pixels(x, "resized_rounded")], "resized_nhwc", perm=[0, 2, 3, 1])
            resized = b.node("Cast", [x], "resized", to=TensorProto.UINT8)
    if not (spec.mode == "fast" and spec.interpolation == "bilinear"):
        starts = b.node("Concat", [top, left], "starts", axis=0)
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


#: OpenCV's 8-bit Gaussian blur weighs with integers summing to 256 (``ufixedpoint16``).
_BLUR_SCALE = 256.0


def _blur(b: _Builder, x: str, length: str, new_length: str, *, axis: int) -> str:
    """``preprocess._fast_resized_view``'s Gaussian blur along one axis of NCHW float ``x``, unscaled:
    sigma ``sqrt(max(s^2 - 1, 0) / 6)`` for the shrink factor ``s`` (in doubles, as Python computes
    it), radius ``max(1, ceil(2 sigma))``, reflect-101 borders (OpenCV's default, ONNX ``Pad`` mode
    reflect), a depthwise ``Conv`` with OpenCV's bit-exact kernel: the side weights ``256 k`` rounded
    with error diffusion from the outermost tap inwards (``getGaussianKernelFixedPoint_ED``), the
    centre what makes them sum to 256.  Integer sums, exact in float32."""
    from onnx import TensorProto

    p = f"blur{axis}_"
    double = TensorProto.DOUBLE

    def doubles(name: str, value: float) -> str:
        return b.const(p + name, [value], np.float64)

    scale = b.node("Div", [b.node("Cast", [length], p + "length", to=double),
                           b.node("Cast", [new_length], p + "new_length", to=double)], p + "scale")
    excess = b.node("Sub", [b.node("Mul", [scale, scale], p + "scale2"), doubles("one", 1.0)], p + "excess")
    variance = b.node("Div", [b.node("Max", [excess, doubles("zero", 0.0)], p + "positive"), doubles("six", 6.0)],
                      p + "variance")
    sigma = b.node("Sqrt", [variance], p + "sigma")
    radius = b.node("Max", [b.node("Ceil", [b.node("Mul", [sigma, doubles("two", 2.0)], p + "two_sigma")],
                                   p + "ceil"), doubles("min_radius", 1.0)], p + "radius")
    r = b.node("Squeeze", [radius], p + "r")
    offsets = b.node("Range", [b.node("Neg", [r], p + "minus_r"),
                               b.node("Add", [r, b.const(p + "one_scalar", 1.0, np.float64)], p + "r_end"),
                               b.const(p + "step", 1.0, np.float64)], p + "offsets")
    spread = b.node("Max", [sigma, doubles("min_sigma", MIN_SIGMA)], p + "spread")
    denominator = b.node("Mul", [b.node("Mul", [spread, spread], p + "spread2"), doubles("minus_two", -2.0)],
                         p + "denominator")
    weights = b.node("Exp", [b.node("Div", [b.node("Mul", [offsets, offsets], p + "offsets2"), denominator],
                                    p + "exponent")], p + "weights")
    weights = b.node("Div", [weights, b.node("ReduceSum", [weights], p + "weight_sum", keepdims=1)], p + "normalized")
    # OpenCV's getGaussianKernelFixedPoint_ED: the side taps from the outermost inwards, each
    # rounded with the error of the ones before carried into it (error diffusion), which is
    # round(running sum) - round(previous running sum); the right side mirrors the left
    fixed = b.node("Mul", [weights, doubles("fixed", _BLUR_SCALE)], p + "fixed_point")
    zero_offset = b.const(p + "zero_offset", 0.0, np.float64)
    left = b.node("Where", [b.node("Less", [offsets, zero_offset], p + "is_left"), fixed,
                            doubles("no_weight", 0.0)], p + "left")
    running = b.node("Round", [b.node("CumSum", [left, b.const(p + "axis0", 0)], p + "cumsum")], p + "running")
    before = b.node("Concat", [doubles("start", 0.0),
                               b.node("Slice", [running, b.const(p + "from0", [0]), b.const(p + "to_last", [-1])],
                                      p + "running_head")], p + "before", axis=0)
    left_taps = b.node("Sub", [running, before], p + "left_taps")
    right_taps = b.node("Slice", [left_taps, b.const(p + "rev_start", [-1]), b.const(p + "rev_end", [-(2**62)]),
                                  b.const(p + "rev_axes", [0]), b.const(p + "rev_step", [-1])], p + "right_taps")
    sides = b.node("Add", [left_taps, right_taps], p + "sides")
    centre = b.node("Equal", [offsets, zero_offset], p + "is_centre")
    rest = b.node("Sub", [doubles("total", _BLUR_SCALE), b.node("ReduceSum", [sides], p + "side_sum", keepdims=1)],
                  p + "rest")
    weights = b.node("Cast", [b.node("Where", [centre, rest, sides], p + "kernel_d")], p + "kernel_f",
                     to=TensorProto.FLOAT)
    kernel_shape = b.const(p + "kernel_shape", [1, 1, -1, 1] if axis == 2 else [1, 1, 1, -1])
    kernel = b.node("Tile", [b.node("Reshape", [weights, kernel_shape], p + "kernel1"),
                             b.const(p + "per_channel", [3, 1, 1, 1])], p + "kernel")
    zero, pad = b.const(p + "no_pad", [0]), b.node("Cast", [radius], p + "pad", to=TensorProto.INT64)
    along = [zero, zero, pad, zero] if axis == 2 else [zero, zero, zero, pad]
    pads = b.node("Concat", along + along, p + "pads", axis=0)
    return b.node("Conv", [b.node("Pad", [x, pads], p + "padded", mode="reflect"), kernel], p + "out", group=3)


#: OpenCV's ``INTER_RESIZE_COEF_BITS``: bilinear weights are integers summing to 2048.
_COEF_SCALE = 2048


def _opencv_linear_taps(b: _Builder, length: str, new_length: str, start: str, count: int, name: str):
    """For outputs ``start .. start + count`` of OpenCV's bilinear resize of ``length`` to ``new_length``:
    (first source index, second source index, first weight, second weight), as ``cv::resize`` computes
    them: ``f = float((d + 0.5) / (new / old) - 0.5)``, ``s = floor(f)``, clamped to the edges with
    weight 0, weights ``round((1 - (f - s)) * 2048)`` and the rest of 2048."""
    from onnx import TensorProto

    p = name + "_"
    double = TensorProto.DOUBLE
    first = b.node("Cast", [b.node("Squeeze", [start], p + "start")], p + "first", to=double)
    outputs = b.node("Range", [first, b.node("Add", [first, b.const(p + "count", float(count), np.float64)],
                                             p + "last"), b.const(p + "step", 1.0, np.float64)], p + "outputs")
    size = b.node("Cast", [length], p + "size", to=double)
    scale = b.node("Reciprocal", [b.node("Div", [b.node("Cast", [new_length], p + "new_size", to=double), size],
                                         p + "inverse_scale")], p + "scale")
    centre = b.node("Sub", [b.node("Mul", [b.node("Add", [outputs, b.const(p + "half", 0.5, np.float64)],
                                                  p + "centre0"), scale], p + "centre1"),
                            b.const(p + "half_b", 0.5, np.float64)], p + "centre_d")
    centre = b.node("Cast", [centre], p + "centre", to=TensorProto.FLOAT)
    index = b.node("Floor", [centre], p + "floor")
    fraction = b.node("Sub", [centre, index], p + "fraction")
    zero = b.floats(p + "zero", 0.0)
    last = b.node("Sub", [b.to_float(length, p + "size_f"), b.floats(p + "one", 1.0)], p + "last_index")
    outside = b.node("Or", [b.node("Less", [index, zero], p + "below"),
                            b.node("GreaterOrEqual", [index, last], p + "above")], p + "outside")
    fraction = b.node("Where", [outside, zero, fraction], p + "fraction_clamped")
    index = b.node("Min", [b.node("Max", [index, zero], p + "index_low"), last], p + "index_clamped")
    second = b.node("Min", [b.node("Add", [index, b.floats(p + "one_b", 1.0)], p + "next"), last], p + "second_f")
    weight = b.node("Round", [b.node("Mul", [b.node("Sub", [b.floats(p + "one_c", 1.0), fraction], p + "rest"),
                                             b.floats(p + "coef_scale", float(_COEF_SCALE))], p + "scaled")],
                    p + "weight_f")
    weight = b.node("Cast", [weight], p + "weight", to=TensorProto.INT32)
    other = b.node("Sub", [b.const(p + "coef_total", [_COEF_SCALE], np.int32), weight], p + "other_weight")
    return (b.node("Cast", [index], p + "index", to=TensorProto.INT64),
            b.node("Cast", [second], p + "second", to=TensorProto.INT64), weight, other)


def _opencv_linear(b: _Builder, x: str, rows, columns) -> str:
    """OpenCV's 8-bit bilinear resize of int32 NCHW ``x`` at the given taps: a horizontal pass in
    exact integers, then its vectorized vertical pass ``((w0 (S0 >> 4)) >> 16 + (w1 (S1 >> 4)) >> 16
    + 2) >> 2`` (checked bit for bit against ``cv2.resize`` on hymenoptera)."""
    (col0, col1, a0, a1), (row0, row1, w0, w1) = columns, rows
    horizontal = b.node("Add", [b.node("Mul", [b.node("Gather", [x, col0], "h_left", axis=3), a0], "h_left_w"),
                                b.node("Mul", [b.node("Gather", [x, col1], "h_right", axis=3), a1], "h_right_w")],
                        "horizontal")
    column_shape = b.const("column_shape", [-1, 1])

    def term(rows_index: str, weight: str, name: str) -> str:
        picked = b.node("Gather", [horizontal, rows_index], name + "_rows", axis=2)
        shifted = b.node("Div", [picked, b.const(name + "_16", [16], np.int32)], name + "_shift4")
        product = b.node("Mul", [shifted, b.node("Reshape", [weight, column_shape], name + "_w")], name + "_product")
        return b.node("Div", [product, b.const(name + "_65536", [65536], np.int32)], name)

    total = b.node("Add", [b.node("Add", [term(row0, w0, "v_top"), term(row1, w1, "v_bottom")], "v_sum"),
                           b.const("v_round", [2], np.int32)], "v_rounded")
    value = b.node("Div", [total, b.const("v_4", [4], np.int32)], "v_value")
    return b.node("Clip", [value, b.const("v_lo", 0, np.int32), b.const("v_hi", 255, np.int32)], "v_clipped")
