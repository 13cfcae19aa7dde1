"""Torch -> ONNX, verified: the checker, torch-vs-ORT parity, metadata, a keyed cache.

Every export is cached as ``paths.onnx_dir()/<name>-<fingerprint[:16]>.onnx`` where the
fingerprint covers everything that changes the file: backbone, weights identity,
feature layer, opset, preprocessing, the torch/torchvision/onnx versions and
``EXPORT_CODE_VERSION``.  A sidecar ``<file>.json`` written *after* the ONNX file was
atomically renamed into place records its sha256, size and modification time; a cached
file is used only when it is untouched since (same size and mtime) or its sha256 still
matches, so a partial or corrupt file is rebuilt.

Parity: ONNX Runtime (CPUExecutionProvider) against torch on the same seeded random
input at batch 1 and batch 3.  ``max_abs_error`` is max |ort - torch| over all outputs;
``max_rel_error`` is that divided by max |torch| over the same output (a per-output
relative error that does not blow up on features near zero).  The export fails with
``ParityError`` when ``max_rel_error > PARITY_TOLERANCE`` (1e-4 for fp32).

``prepare_onnx`` does the same for any ONNX file: validate, optionally tap an
intermediate tensor (graph surgery: dequantize if needed, Flatten to (N, D), prune),
rename I/O to "input"/"features", check batch consistency, write metadata, cache.
"""

from __future__ import annotations

import copy
import difflib
import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
import time
import warnings
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from embedx import __version__, onnxmeta, paths
from embedx.backbones import get_spec, resolve_weights
from embedx.errors import ConfigError, ExportError, OnnxModelError, ParityError
from embedx.preprocess import PreprocessSpec
from embedx.progress import ProgressCallback
from embedx.runtime import file_sha256

log = logging.getLogger(__name__)

#: Opset 17 is the first with a LayerNormalization op, which ViT/Swin/ConvNeXt export
#: to one fused node instead of ~10 primitive ones (faster and closer to torch), while
#: staying within what TensorRT 8.6+, ORT >= 1.14 and onnxruntime.quantization support.
DEFAULT_OPSET = 17
#: Bump when the export code changes what it writes: old cached exports are then rebuilt.
EXPORT_CODE_VERSION = "1"
#: Largest allowed max |ort - torch| / max |torch| for an fp32 export.
PARITY_TOLERANCE = 1e-4
PARITY_BATCH_SIZES = (1, 3)
#: Batch size traced at export: not 1, so that nothing specializes on a unit batch.
_TRACE_BATCH = 2
INPUT_NAME = "input"
OUTPUT_NAME = "features"


@dataclass(frozen=True)
class ExportResult:
    """One ONNX feature extractor on disk, ready for ``runtime.OrtModel``.

    ``weights_tag`` is the identity of the weights, ``weights_arg`` what to pass to
    ``backbones.build_feature_extractor`` to rebuild the same model (for a foreign ONNX
    file: the source file's absolute path).  ``sha256`` is the file's digest.
    """

    path: Path
    fingerprint: str
    backbone: str
    weights_tag: str
    feature_layer: str
    feature_dim: int
    preprocess: PreprocessSpec
    parity: dict = field(default_factory=dict)
    seconds: float = 0.0
    cached: bool = False
    size_bytes: int = 0
    weights_arg: str = ""
    sha256: str = ""
    opset: int = DEFAULT_OPSET

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["path"] = str(self.path)
        data["preprocess"] = self.preprocess.to_dict()
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ExportResult:
        known = {k: v for k, v in data.items() if k in cls.__dataclass_fields__}
        known["path"] = Path(known["path"])
        known["preprocess"] = PreprocessSpec.from_dict(known["preprocess"])
        return cls(**known)


# ------------------------------------------------------------------------- the cache


def fingerprint_of(parts: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


def _safe_name(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("._") or "model"


def _cache_path(name: str, fingerprint: str) -> Path:
    return paths.onnx_dir() / f"{_safe_name(name)}-{fingerprint[:16]}.onnx"


def _sidecar(path: Path) -> Path:
    return path.with_name(path.name + ".json")


def _lookup(path: Path, fingerprint: str) -> ExportResult | None:
    """The cached export at ``path`` if it is complete and intact, else None."""
    sidecar = _sidecar(path)
    if not path.is_file() or not sidecar.is_file():
        return None
    try:
        record = json.loads(sidecar.read_text())
        result = ExportResult.from_dict(record)
    except (OSError, ValueError, KeyError, TypeError) as e:
        log.warning("ignoring unreadable export record %s (%s); rebuilding", sidecar, e)
        return None
    if record.get("fingerprint") != fingerprint:
        return None
    stat = path.stat()
    # Unchanged size and modification time since the record was written mean an
    # untouched file (git's index makes the same bet); anything else is hashed.
    untouched = stat.st_size == result.size_bytes and stat.st_mtime_ns == record.get("mtime_ns")
    if not untouched and (stat.st_size != result.size_bytes or file_sha256(path) != result.sha256):
        log.warning("cached export %s is corrupt or partial (size/sha256 differ from its record); rebuilding", path)
        return None
    return replace(result, path=path)


def _publish(model: Any, path: Path, result: ExportResult) -> ExportResult:
    """Write ``model`` to ``path`` atomically, then its sidecar; returns the final result."""
    path.parent.mkdir(parents=True, exist_ok=True)
    data = model.SerializeToString()
    handle, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    try:
        with os.fdopen(handle, "wb") as out:
            out.write(data)
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    result = replace(result, path=path, size_bytes=len(data), sha256=hashlib.sha256(data).hexdigest())
    record = {**result.to_dict(), "mtime_ns": path.stat().st_mtime_ns}
    _write_text_atomic(_sidecar(path), json.dumps(record, indent=2, sort_keys=True))
    return result


def _write_text_atomic(path: Path, text: str) -> None:
    handle, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    try:
        with os.fdopen(handle, "w") as out:
            out.write(text)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _copy_out(result: ExportResult, output: str | Path | None) -> ExportResult:
    """Copy the cached file to ``output`` too (atomically); the result then points there."""
    if output is None:
        return result
    target = Path(output)
    if target.is_dir():
        target = target / result.path.name
    if target.resolve() == result.path.resolve():
        return result
    target.parent.mkdir(parents=True, exist_ok=True)
    handle, tmp = tempfile.mkstemp(dir=target.parent, prefix=target.name + ".", suffix=".tmp")
    os.close(handle)
    try:
        shutil.copyfile(result.path, tmp)
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return replace(result, path=target)


def _cached_or_build(name: str, fingerprint: str, build, *, output, force: bool) -> ExportResult:
    """Return the cached export for ``fingerprint`` or call ``build(path)`` under a file lock."""
    from filelock import FileLock

    start = time.perf_counter()
    path = _cache_path(name, fingerprint)
    path.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(path) + ".lock"):
        found = None if force else _lookup(path, fingerprint)
        if found is not None:
            log.info("using cached export %s", path)
            result = replace(found, cached=True, seconds=time.perf_counter() - start)
        else:
            result = build(path)
            result = replace(result, cached=False, seconds=time.perf_counter() - start)
    return _copy_out(result, output)


# ------------------------------------------------------------------------ torch export


def _versions() -> dict[str, str]:
    import onnx
    import torch
    import torchvision

    return {"torch": torch.__version__, "torchvision": torchvision.__version__, "onnx": onnx.__version__}


def _torch_to_onnx(module: Any, input_size: int, opset: int) -> tuple[bytes, str]:
    """Export ``module`` to ONNX bytes with a dynamic batch axis; returns (bytes, exporter).

    The TorchScript exporter (``dynamo=False``) comes first: it is several times faster
    than the torch.export one and handles every registry model; the dynamo exporter is
    the fallback for modules that tracing cannot handle.
    """
    import io

    import torch

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        dummy = torch.randn(_TRACE_BATCH, 3, input_size, input_size)
    names = {"input_names": [INPUT_NAME], "output_names": [OUTPUT_NAME]}
    axes = {INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}}
    buffer = io.BytesIO()
    try:
        # Not under no_grad: with grad disabled nn.MultiheadAttention (ViT) takes its fused
        # fast path, aten::_native_multi_head_attention, which has no ONNX symbolic.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(module, (dummy,), buffer, dynamo=False, opset_version=opset,
                              dynamic_axes=axes, do_constant_folding=True, **names)
        return buffer.getvalue(), "torchscript"
    except Exception as first:  # any exporter failure: try the other exporter before giving up
        log.warning("TorchScript ONNX export failed (%s: %s); trying the dynamo exporter",
                    type(first).__name__, _first_line(first))
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                program = torch.onnx.export(
                    module, (dummy,), dynamo=True, opset_version=max(opset, 18), verbose=False,
                    dynamic_shapes=({0: torch.export.Dim("batch")},), **names)
            return program.model_proto.SerializeToString(), "dynamo"
        except Exception as second:
            raise ExportError(
                f"cannot export {type(module).__name__} to ONNX: TorchScript exporter: "
                f"{type(first).__name__}: {_first_line(first)}; dynamo exporter: "
                f"{type(second).__name__}: {_first_line(second)}"
            ) from second


def _first_line(error: BaseException) -> str:
    """The first line of an exception message (torch appends whole IR graphs to some)."""
    text = str(error).strip()
    return text.splitlines()[0][:500] if text else type(error).__name__


def _ort_session(model_bytes: bytes, *, name: str):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    try:
        return ort.InferenceSession(model_bytes, options, providers=["CPUExecutionProvider"])
    except Exception as e:  # ORT raises its own Fail/InvalidGraph/... types
        raise OnnxModelError(f"ONNX Runtime cannot load {name}: {e}") from e


def _relative(a: Any, b: Any) -> tuple[float, float]:
    """(max |a - b|, max |a - b| / max |b|) over whole arrays."""
    import numpy as np

    max_abs = float(np.max(np.abs(a.astype(np.float64) - b.astype(np.float64)))) if a.size else 0.0
    scale = float(np.max(np.abs(b))) if b.size else 0.0
    return max_abs, max_abs / max(scale, 1e-12)


def _parity_inputs(input_size: int) -> dict[int, Any]:
    import numpy as np

    rng = np.random.default_rng(1234)
    largest = rng.standard_normal((max(PARITY_BATCH_SIZES), 3, input_size, input_size)).astype(np.float32)
    return {b: largest[:b] for b in PARITY_BATCH_SIZES}


def check_parity(module: Any, model_bytes: bytes, *, input_size: int, name: str) -> dict[str, Any]:
    """Run torch and ORT on the same inputs; ParityError beyond ``PARITY_TOLERANCE``."""
    import torch

    session = _ort_session(model_bytes, name=name)
    worst_abs = worst_rel = 0.0
    for batch_size, batch in _parity_inputs(input_size).items():
        with torch.no_grad():
            expected = module(torch.from_numpy(batch)).float().numpy()
        got = session.run([OUTPUT_NAME], {INPUT_NAME: batch})[0]
        if got.shape != expected.shape:
            raise ParityError(
                f"{name}: ONNX output shape {got.shape} differs from torch's {expected.shape} at "
                f"batch {batch_size}; the export did not keep a dynamic batch axis"
            )
        max_abs, max_rel = _relative(got, expected)
        worst_abs, worst_rel = max(worst_abs, max_abs), max(worst_rel, max_rel)
    parity = {
        "reference": "torch",
        "provider": "CPUExecutionProvider",
        "max_abs_error": worst_abs,
        "max_rel_error": worst_rel,
        "batch_sizes": list(PARITY_BATCH_SIZES),
        "tolerance": PARITY_TOLERANCE,
    }
    if not worst_rel <= PARITY_TOLERANCE:
        raise ParityError(
            f"{name}: ONNX Runtime and torch disagree: max relative error {worst_rel:.3g} "
            f"(max abs {worst_abs:.3g}) > tolerance {PARITY_TOLERANCE:g}; the export is not "
            "trustworthy; try another --opset or report the backbone"
        )
    return parity


def _check(model: Any, name: str) -> None:
    import onnx

    try:
        onnx.checker.check_model(model, full_check=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as e:
        raise ExportError(f"{name}: the exported ONNX model fails onnx.checker: {e}") from e


#: The stages a torch export reports through ``progress`` (done counts them).
EXPORT_STAGES = ("build", "trace", "check", "parity", "write")


def _report(progress: ProgressCallback | None, stage: str) -> None:
    if progress is not None:
        progress(EXPORT_STAGES.index(stage), len(EXPORT_STAGES), {"stage": stage})


def _export_torch(module: Any, *, path: Path, name: str, weights_tag: str, weights_arg: str,
                  feature_layer: str, preprocess: PreprocessSpec, fingerprint: str,
                  opset: int, progress: ProgressCallback | None = None) -> ExportResult:
    import onnx
    import torch

    module = module.eval()
    _report(progress, "trace")
    with torch.no_grad():
        probe = module(torch.zeros(1, 3, preprocess.input_size, preprocess.input_size))
    if probe.ndim != 2:
        raise ExportError(f"{name}: the module returns shape {tuple(probe.shape)}; expected (N, D) features")
    feature_dim = int(probe.shape[1])
    log.info("exporting %s (%s, layer %s) to ONNX opset %d", name, weights_tag, feature_layer, opset)
    model_bytes, exporter = _torch_to_onnx(module, preprocess.input_size, opset)
    _report(progress, "check")
    model = onnx.load_from_string(model_bytes)
    _check(model, name)
    _report(progress, "parity")
    parity = check_parity(module, model_bytes, input_size=preprocess.input_size, name=name)
    _report(progress, "write")
    onnxmeta.write(model, {
        "version": __version__,
        "kind": "backbone",
        "backbone": name,
        "weights": weights_tag,
        "weights_arg": weights_arg,
        "feature_layer": feature_layer,
        "feature_dim": str(feature_dim),
        "preprocess": preprocess.to_dict(),
        "parity": parity,
        "fingerprint": fingerprint,
        "exporter": exporter,
        "opset": str(opset),
    })
    result = ExportResult(
        path=path, fingerprint=fingerprint, backbone=name, weights_tag=weights_tag,
        feature_layer=feature_layer, feature_dim=feature_dim, preprocess=preprocess,
        parity=parity, weights_arg=weights_arg, opset=opset,
    )
    result = _publish(model, path, result)
    if progress is not None:
        progress(len(EXPORT_STAGES), len(EXPORT_STAGES), {"stage": "done"})
    return result


def export_backbone(backbone: str, *, weights: str | Path | None = "DEFAULT", layer: str | None = None,
                    output: str | Path | None = None, opset: int = DEFAULT_OPSET,
                    force: bool = False, progress: ProgressCallback | None = None) -> ExportResult:
    """Export registry backbone ``backbone`` to a verified ONNX feature extractor.

    Cached under ``paths.onnx_dir()``: a second call with the same arguments returns at
    once with ``cached=True``.  ``output`` also writes the file there.  ``force``
    rebuilds even when a valid cached export exists.  ``progress`` is called once per
    stage of ``EXPORT_STAGES`` (not at all for a cached export).
    """
    from embedx.backbones import build_feature_extractor

    spec = get_spec(backbone)
    layer = spec.check_layer(layer)
    choice = resolve_weights(spec, weights)
    preprocess = choice.preprocess or spec.preprocess
    fingerprint = fingerprint_of({
        "code": EXPORT_CODE_VERSION, "kind": "registry", "backbone": spec.name, "source": spec.source,
        "weights": choice.identity, "layer": layer, "opset": opset,
        "preprocess": preprocess.to_dict(), **_versions(),
    })

    def build(path: Path) -> ExportResult:
        _report(progress, "build")
        module = build_feature_extractor(spec.name, weights=choice.arg, layer=layer)
        return _export_torch(module, path=path, name=spec.name, weights_tag=choice.tag,
                             weights_arg=choice.arg, feature_layer=layer, preprocess=preprocess,
                             fingerprint=fingerprint, opset=opset, progress=progress)

    return _cached_or_build(spec.name, fingerprint, build, output=output, force=force)


def _state_digest(module: Any) -> str:
    digest = hashlib.sha256()
    for key, tensor in sorted(module.state_dict().items()):
        digest.update(key.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def export_module(module: Any, *, name: str, weights_tag: str, feature_layer: str,
                  preprocess: PreprocessSpec | dict, output: str | Path | None = None,
                  weights_arg: str = "", opset: int = DEFAULT_OPSET,
                  progress: ProgressCallback | None = None) -> ExportResult:
    """Export a torch module built elsewhere (e.g. a fine-tuned backbone), verified and cached.

    The module must map NCHW float32 to (N, D); it is copied to the CPU in eval mode,
    so the caller's module is left as it was.  The fingerprint covers its weights.
    """
    if isinstance(preprocess, dict):
        preprocess = PreprocessSpec.from_dict(preprocess)
    module = copy.deepcopy(module).cpu().eval()
    fingerprint = fingerprint_of({
        "code": EXPORT_CODE_VERSION, "kind": "module", "name": name, "weights_tag": weights_tag,
        "state": _state_digest(module), "layer": feature_layer, "opset": opset,
        "preprocess": preprocess.to_dict(), **_versions(),
    })

    def build(path: Path) -> ExportResult:
        return _export_torch(module, path=path, name=name, weights_tag=weights_tag, weights_arg=weights_arg,
                             feature_layer=feature_layer, preprocess=preprocess,
                             fingerprint=fingerprint, opset=opset, progress=progress)

    return _cached_or_build(name, fingerprint, build, output=output, force=False)


# -------------------------------------------------------------------- foreign ONNX


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
        log.debug("shape inference failed: %s", e)
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
            log.warning("%s has %d outputs; using the first, %r", source.name, len(graph.output), target)
    elif layer == "auto":
        target = _auto_layer(graph)
        if target is None:
            raise OnnxModelError(f"{source.name}: --layer auto found no global pooling or matmul; "
                                 "name the tensor with --layer NAME")
    elif layer in tensors:
        target = layer
    else:
        raise _bad_layer(layer, graph, source)
    source_sha = file_sha256(source)
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
            log.warning("onnx.checker on the derived model: %s (ONNX Runtime is checked next)", e)
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
        return _publish(model, cache_path, result)

    return _cached_or_build(f"onnx-{source.stem}", fingerprint, build, output=output, force=force)


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
    session = _ort_session(model_bytes, name=name)
    inputs = _parity_inputs(input_size)
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
    max_abs, max_rel = _relative(large[: small.shape[0]], small)
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


# -------------------------------------------------------------------------- dispatcher


def is_onnx_path(backbone: str | Path) -> bool:
    text = str(backbone)
    return text.lower().endswith(".onnx") or (os.sep in text and Path(text).is_file())


def resolve_backbone(backbone: str | Path, *, weights: str | Path | None = "DEFAULT",
                     layer: str | None = None) -> ExportResult:
    """A registry name goes to ``export_backbone``, a path to an .onnx file to ``prepare_onnx``."""
    if is_onnx_path(backbone):
        if weights not in (None, "DEFAULT", "default"):
            raise ConfigError(f"--weights {weights!r} does not apply to an ONNX file ({backbone}); "
                              "its weights are inside it")
        return prepare_onnx(backbone, layer=layer)
    return export_backbone(str(backbone), weights=weights, layer=layer)
