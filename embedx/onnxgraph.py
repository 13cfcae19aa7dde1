"""Any ONNX image model made an embedx feature extractor: graph surgery (torch-free).

``prepare_onnx`` validates a user's ONNX file, optionally taps an intermediate tensor
(``_tap``: dequantize if needed, Flatten to (N, D), ``_prune`` what the new output does
not need), renames the I/O to "input"/"features" with a dynamic batch axis (a
channels-last input gets a Transpose in front), checks that a sample gets the same
features in batches of 1 and 3, writes embedx metadata and keeps the result in the
``onnxcache``.  ``is_onnx_path`` is the one rule for "this backbone argument is an ONNX
file": its name ends in ``.onnx`` (any case).
"""

from __future__ import annotations

import copy
import difflib
import logging
from pathlib import Path
from typing import Any

from embedx import __version__, fsio, onnxmeta
from embedx.errors import OnnxModelError
from embedx.onnxcache import (
    EXPORT_CODE_VERSION,
    INPUT_NAME,
    OUTPUT_NAME,
    PARITY_BATCH_SIZES,
    PARITY_TOLERANCE,
    ExportResult,
    cached_or_build,
    fingerprint_of,
    ort_session,
    parity_inputs,
    publish,
    relative_error,
)
from embedx.preprocess import PreprocessSpec

logger = logging.getLogger(__name__)


def is_onnx_path(backbone: str | Path) -> bool:
    """A backbone argument names an ONNX file when it ends in ``.onnx`` (any case).

    Nothing else counts, not even an existing file: a registry name never ends so, and
    any other path is reported as an unknown backbone instead of being parsed.
    """
    return str(backbone).lower().endswith(".onnx")


# Quantized producers: where their output's scale and zero point are among their inputs.
_QUANT_OUTPUT_PARAMS = {
    "QuantizeLinear": (1, 2), "QLinearConv": (6, 7), "QLinearMatMul": (6, 7), "QLinearAdd": (6, 7),
    "QLinearMul": (6, 7), "QLinearGlobalAveragePool": (3, 4), "QLinearAveragePool": (3, 4),
    "QLinearLeakyRelu": (3, 4), "QLinearSigmoid": (3, 4), "QLinearConcat": (1, 2),
}
# Ops that move quantized values without changing their scale.
_QUANT_PASSTHROUGH = {"Reshape", "Flatten", "Squeeze", "Unsqueeze", "Transpose", "MaxPool", "Identity"}
_POOL_OPS = {"GlobalAveragePool", "QLinearGlobalAveragePool", "GlobalMaxPool"}
_MATMUL_OPS = {"Gemm", "MatMul", "QLinearMatMul", "MatMulInteger", "QGemm"}


def _node_inputs(node: Any) -> list[str]:
    """Inputs of ``node`` including names used inside its subgraphs (If/Loop bodies)."""
    names = list(node.input)
    for attribute in node.attribute:
        graphs = list(attribute.graphs) + ([attribute.g] if attribute.HasField("g") else [])
        for graph in graphs:
            for inner in graph.node:
                names.extend(_node_inputs(inner))
    return names


def _rename_tensor(graph: Any, old: str, new: str) -> None:
    for node in graph.node:
        node.input[:] = [new if n == old else n for n in node.input]
        node.output[:] = [new if n == old else n for n in node.output]
        for attribute in node.attribute:
            for inner in list(attribute.graphs) + ([attribute.g] if attribute.HasField("g") else []):
                _rename_tensor(inner, old, new)
    for info in list(graph.input) + list(graph.output) + list(graph.value_info):
        if info.name == old:
            info.name = new


def _auto_layer(graph: Any) -> str | None:
    """The global-pool output, else the input of the last matmul: the penultimate features."""
    for node in reversed(graph.node):
        if node.op_type in _POOL_OPS or (node.op_type == "ReduceMean" and _reduces_spatial(node)):
            return node.output[0]
    for node in reversed(graph.node):
        if node.op_type in _MATMUL_OPS:
            return node.input[0]
    return None


def _reduces_spatial(node: Any) -> bool:
    for attribute in node.attribute:
        if attribute.name == "axes":
            return sorted(a % 4 for a in attribute.ints) == [2, 3]
    return False


def _bad_layer(layer: str, graph: Any, source: Path) -> OnnxModelError:
    tensors = [out for node in graph.node for out in node.output]
    near_output = list(dict.fromkeys(reversed(tensors)))[:8]
    close = difflib.get_close_matches(layer, tensors, n=4, cutoff=0.6)
    auto = _auto_layer(graph)
    return OnnxModelError(
        f"layer {layer!r} is not a tensor in {source.name}; "
        + (f"close names: {', '.join(close)}; " if close else "")
        + f"tensors nearest the output: {', '.join(near_output)}"
        + (f"; --layer auto picks {auto!r} (the global-pool output)" if auto else "")
    )


def _tap(model: Any, tensor: str) -> None:
    """Make ``tensor`` the single float32 (N, D) output "features" of ``model`` (in place)."""
    from onnx import TensorProto, helper

    graph = model.graph
    producers = {out: node for node in graph.node for out in node.output}
    consumers: dict[str, list[Any]] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)

    def quant_params(name: str, depth: int = 0) -> tuple[str, str] | None:
        node = producers.get(name)
        if node is None or depth > 8:
            return None
        if node.op_type in _QUANT_OUTPUT_PARAMS:
            scale, zero = _QUANT_OUTPUT_PARAMS[node.op_type]
            if len(node.input) > zero:
                return node.input[scale], node.input[zero]
        if node.op_type in _QUANT_PASSTHROUGH:
            return quant_params(node.input[0], depth + 1)
        return None

    new_nodes = []
    source = tensor
    params = quant_params(tensor)
    dequantized = [n for n in consumers.get(tensor, []) if n.op_type == "DequantizeLinear" and n.input[0] == tensor]
    if dequantized:
        source = dequantized[0].output[0]
    elif params is not None:
        source = f"{tensor}__embedx_dequantized"
        new_nodes.append(helper.make_node("DequantizeLinear", [tensor, *params], [source],
                                          name="embedx_dequantize"))
    else:
        element = _element_type(model, tensor)
        if element is not None and element != TensorProto.FLOAT:
            cast = f"{tensor}__embedx_float"
            new_nodes.append(helper.make_node("Cast", [source], [cast], to=TensorProto.FLOAT, name="embedx_cast"))
            source = cast
    new_nodes.append(helper.make_node("Flatten", [source], [OUTPUT_NAME], axis=1, name="embedx_flatten"))
    graph.node.extend(new_nodes)
    del graph.output[:]
    graph.output.append(helper.make_tensor_value_info(OUTPUT_NAME, TensorProto.FLOAT, ["batch", None]))
    _prune(graph)


def _element_type(model: Any, tensor: str) -> int | None:
    import onnx

    for info in list(model.graph.value_info) + list(model.graph.output) + list(model.graph.input):
        if info.name == tensor:
            return info.type.tensor_type.elem_type
    try:
        inferred = onnx.shape_inference.infer_shapes(model)
    except Exception as e:  # custom ops can defeat shape inference; the dtype is then unknown
        logger.debug("shape inference failed: %s", e)
        return None
    for info in inferred.graph.value_info:
        if info.name == tensor:
            return info.type.tensor_type.elem_type
    return None


def _prune(graph: Any) -> None:
    """Drop nodes, initializers and value_info not needed for the graph outputs."""
    needed = {out.name for out in graph.output}
    keep = []
    for node in reversed(graph.node):
        if any(out in needed for out in node.output):
            keep.append(node)
            needed.update(_node_inputs(node))
    keep.reverse()
    del graph.node[:]
    graph.node.extend(keep)
    initializers = [init for init in graph.initializer if init.name in needed]
    del graph.initializer[:]
    graph.initializer.extend(initializers)
    infos = [info for info in graph.value_info if info.name in needed]
    del graph.value_info[:]
    graph.value_info.extend(infos)
    # older files list initializers as graph inputs too; a pruned one would become required
    inputs = [info for info in graph.input if info.name in needed]
    del graph.input[:]
    graph.input.extend(inputs)


def _load_onnx(path: Path) -> Any:
    import onnx

    if not path.exists():
        raise OnnxModelError(f"no ONNX file at {path}; expected a path to a .onnx model or a registry name "
                             "(see `embedx backbones`)")
    if not path.is_file():
        raise OnnxModelError(f"{path} is not a file; expected a .onnx model file")
    try:
        model = onnx.load(str(path))
    except Exception as e:  # protobuf DecodeError, OSError, external-data errors: all unreadable
        raise OnnxModelError(
            f"cannot read {path} as an ONNX model ({type(e).__name__}: {e}); "
            "expected a file saved with onnx.save / torch.onnx.export"
        ) from e
    if not model.graph.node or not model.graph.output:
        raise OnnxModelError(f"{path} parses but holds no ONNX graph (no nodes or outputs); "
                             "is it really an ONNX model?")
    return model


def _default_preprocess(model: Any, graph_input: Any) -> PreprocessSpec:
    """The file's embedx metadata, else ImageNet preprocessing at the input's static size."""
    meta = onnxmeta.from_proto(model)
    if "preprocess" in meta:
        return PreprocessSpec.from_json(meta["preprocess"])
    dims = graph_input.type.tensor_type.shape.dim
    height = dims[1] if _is_nhwc(graph_input) else dims[2]
    size = height.dim_value if height.dim_value > 0 else 224
    return PreprocessSpec(input_size=size, resize_size=round(size / 0.875))


def _is_nhwc(graph_input: Any) -> bool:
    """A channels-last image input (TensorFlow/Keras exports): (N, H, W, 3)."""
    dims = graph_input.type.tensor_type.shape.dim
    return len(dims) == 4 and dims[3].dim_value == 3 and dims[1].dim_value != 3


def prepare_onnx(path: str | Path, *, layer: str | None = None,
                 preprocess: PreprocessSpec | dict | None = None, output: str | Path | None = None,
                 force: bool = False) -> ExportResult:
    """Make any ONNX image model an embedx feature extractor (cached).

    ``layer``: None uses the model's first output; ``"auto"`` taps the global-pool
    output (the penultimate features of a classifier); any other value names an
    intermediate tensor.  The tapped tensor is dequantized if it is quantized,
    flattened to (N, D) float32 and exposed as output "features"; the input is renamed
    "input" with a dynamic batch axis.  ``preprocess`` defaults to the file's own embedx
    metadata, else ImageNet mean/std at the input's size (224/256 when unknown).
    """
    import onnx

    source = Path(path)
    original = _load_onnx(source)
    graph = original.graph
    initializer_names = {init.name for init in graph.initializer}
    inputs = [i for i in graph.input if i.name not in initializer_names]
    if len(inputs) != 1 or len(inputs[0].type.tensor_type.shape.dim) != 4:
        shapes = [(i.name, len(i.type.tensor_type.shape.dim)) for i in inputs]
        raise OnnxModelError(f"{source.name}: expected one image input of rank 4 (N,3,H,W), found {shapes}")
    if isinstance(preprocess, dict):
        preprocess = PreprocessSpec.from_dict(preprocess)
    preprocess = preprocess or _default_preprocess(original, inputs[0])

    tensors = {out for node in graph.node for out in node.output}
    if layer is None:
        target = graph.output[0].name
        if len(graph.output) > 1:
            logger.warning("%s has %d outputs; using the first, %r", source.name, len(graph.output), target)
    elif layer == "auto":
        target = _auto_layer(graph)
        if target is None:
            raise OnnxModelError(f"{source.name}: --layer auto found no global pooling or matmul; "
                                 "name the tensor with --layer NAME")
    elif layer in tensors:
        target = layer
    else:
        raise _bad_layer(layer, graph, source)
    source_sha = fsio.sha256_file(source)
    fingerprint = fingerprint_of({
        "code": EXPORT_CODE_VERSION, "kind": "onnx", "source_sha256": source_sha, "layer": target,
        "preprocess": preprocess.to_dict(), "onnx": onnx.__version__,
    })
    name = f"onnx:{source.name}"

    def build(cache_path: Path) -> ExportResult:
        model = copy.deepcopy(original)
        _derive(model, inputs[0].name, target, nhwc=_is_nhwc(inputs[0]))
        try:
            onnx.checker.check_model(model, full_check=True)
        except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as e:
            # custom-domain ops (com.microsoft) can fail the strict check; ORT is the judge then
            logger.warning("onnx.checker on the derived model: %s (ONNX Runtime is checked next)", e)
        model_bytes = model.SerializeToString()
        parity, feature_dim = _batch_consistency(model_bytes, preprocess.input_size, source.name)
        meta = {
            "version": __version__, "kind": "backbone", "backbone": name, "weights": f"file:{source_sha[:16]}",
            "weights_arg": str(source.resolve()), "feature_layer": target, "feature_dim": str(feature_dim),
            "preprocess": preprocess.to_dict(), "parity": parity, "fingerprint": fingerprint,
        }
        # the source's own embedx keys described the source (e.g. a bundle's classes)
        kept = [p for p in model.metadata_props if not p.key.startswith(onnxmeta.PREFIX)]
        del model.metadata_props[:]
        model.metadata_props.extend(kept)
        onnxmeta.write(model, meta)
        opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
        result = ExportResult(
            path=cache_path, fingerprint=fingerprint, backbone=name, weights_tag=f"file:{source_sha[:16]}",
            feature_layer=target, feature_dim=feature_dim, preprocess=preprocess, parity=parity,
            weights_arg=str(source.resolve()), opset=opset,
        )
        return publish(model, cache_path, result)

    return cached_or_build(f"onnx-{source.stem}", fingerprint, build, output=output, force=force)


def _derive(model: Any, input_name: str, target: str, *, nhwc: bool = False) -> None:
    """Rename I/O to the embedx names, free the batch axis, tap ``target`` (in place).

    A channels-last (NHWC) input gets a Transpose in front, so that the derived model
    takes NCHW like every embedx backbone.
    """
    from onnx import helper

    graph = model.graph
    tensors = {out for node in graph.node for out in node.output} | {i.name for i in graph.input}
    if OUTPUT_NAME in tensors:  # e.g. an embedx export given back as a file
        _rename_tensor(graph, OUTPUT_NAME, OUTPUT_NAME + "__orig")
        target = OUTPUT_NAME + "__orig" if target == OUTPUT_NAME else target
    if INPUT_NAME in tensors and input_name != INPUT_NAME:
        _rename_tensor(graph, INPUT_NAME, INPUT_NAME + "__orig")
    internal = INPUT_NAME + "__nhwc" if nhwc else INPUT_NAME
    if input_name != internal:
        _rename_tensor(graph, input_name, internal)
        target = internal if target == input_name else target
    graph_input = next(i for i in graph.input if i.name == internal)
    dims = graph_input.type.tensor_type.shape.dim
    if nhwc:
        graph_input.name = INPUT_NAME
        height, width = dims[1].dim_value, dims[2].dim_value
        for dim, value in zip(dims[1:], (3, height, width), strict=True):
            dim.Clear()
            if value > 0:
                dim.dim_value = value
        graph.node.insert(0, helper.make_node("Transpose", [INPUT_NAME], [internal], perm=[0, 2, 3, 1],
                                              name="embedx_nchw_to_nhwc"))
    batch = dims[0]
    batch.ClearField("dim_value")
    batch.dim_param = "batch"
    # shapes recorded for intermediate tensors may pin the old batch size
    del graph.value_info[:]
    _tap(model, target)


def _batch_consistency(model_bytes: bytes, input_size: int, name: str) -> tuple[dict[str, Any], int]:
    """Run batch 1 and 3; sample 0 must get the same features in both. Returns (parity, dim)."""
    session = ort_session(model_bytes, name=name)
    inputs = parity_inputs(input_size)
    outputs = {}
    for batch_size, batch in inputs.items():
        try:
            outputs[batch_size] = session.run([OUTPUT_NAME], {INPUT_NAME: batch})[0]
        except Exception as e:  # ORT's own error types
            raise OnnxModelError(
                f"{name}: ONNX Runtime fails on a ({batch_size}, 3, {input_size}, {input_size}) input: {e}; "
                "the model may need another input size (pass a preprocess spec) or have a fixed batch size"
            ) from e
    small, large = outputs[min(inputs)], outputs[max(inputs)]
    if small.ndim != 2 or large.shape[0] != max(inputs):
        raise OnnxModelError(f"{name}: features have shape {large.shape} for a batch of {max(inputs)}; "
                             "expected (batch, D)")
    max_abs, max_rel = relative_error(large[: small.shape[0]], small)
    parity = {
        "reference": "batch_consistency", "provider": "CPUExecutionProvider", "max_abs_error": max_abs,
        "max_rel_error": max_rel, "batch_sizes": list(PARITY_BATCH_SIZES), "tolerance": PARITY_TOLERANCE,
    }
    # quantized kernels may pick other blockings per batch size; only gross disagreement fails
    if max_rel > 1e-2:
        raise OnnxModelError(
            f"{name}: the same image gets different features in a batch of 1 and of {max(inputs)} "
            f"(max relative error {max_rel:.3g}); the graph mixes samples across the batch axis"
        )
    return parity, int(small.shape[1])
