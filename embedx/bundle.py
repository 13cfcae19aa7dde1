"""One deployable ONNX file: backbone + head + softmax(logits / T).

``bundle(head_dir, output)`` reads the head directory written by ``embedx fit-head``,
takes the backbone ONNX named in its ``head.json`` (``HeadRecord.backbone_onnx``, which
checks its sha256), the head's own graph (``head.to_onnx()``: ``"features"`` ->
``"logits"``), and joins them with ``onnx.compose.merge_models``.  The result maps ``"input"`` (N,3,H,W) float32 to
``"probabilities"`` (N,C) (and ``"logits"``), and carries in ``metadata_props`` the
class names, the preprocessing, the backbone and weights tag, the head summary and the
temperature, so that ``predict`` and ``serve-onnx`` need nothing else.

With ``with_preprocess="normalize"`` (or ``True``) the graph instead takes ``"image"``:
uint8 (N,H,W,3) pixels already resized and cropped (``preprocess.to_pixels``) and
normalizes them itself (input_format ``"uint8_nhwc"``).  With ``"full"`` it takes the
decoded image of any size, uint8 (N,H,W,3), and resizes and crops it too
(``resize_graph.prepend_full_preprocess``, as the head's ``mode`` resizes: Pillow's
antialiased filter for exact, OpenCV's fixed-point blur + resize for fast; input_format
``"uint8_nhwc_full"``; the model is converted to opset 18 for Resize's antialiasing).
The caller only decodes (``preprocess.decode_pixels``).

Needs ``onnx`` (not torch) to build; the bundle runs with onnxruntime alone.
"""

from __future__ import annotations

import contextlib
import logging
import re
import secrets
from pathlib import Path
from typing import Any

from embedx import __version__, onnxmeta
from embedx.errors import ConfigError, ExportError, HeadError, OnnxModelError
from embedx.fsio import (
    atomic_path,
    fsync_path,
    make_parent,
    remove_stale_temporaries,
    reporting_write_errors,
    writer_lock,
)
from embedx.pixel_input import FLOAT_INPUT, PIXEL_INPUT, prepend_normalization
from embedx.preprocess import PreprocessSpec

logger = logging.getLogger(__name__)

FEATURES = "features"
LOGITS = "logits"
#: the bundle's output of class probabilities (``predict`` reads it by this name)
PROBABILITIES = "probabilities"
UINT8_INPUT = PIXEL_INPUT
HEAD_PREFIX = "head/"
POST_PREFIX = "bundle/"
#: protobuf cannot serialize more than 2 GiB; larger models keep weights beside the file
_PROTO_LIMIT = 2_000_000_000
#: ``with_preprocess`` values -> the bundle's ``input_format``
INPUT_FORMATS = {"none": "float_nchw", "normalize": "uint8_nhwc", "full": "uint8_nhwc_full"}


def preprocess_level(with_preprocess: bool | str | None) -> str:
    """``with_preprocess`` as one of ``INPUT_FORMATS`` (False/None: "none", True: "normalize")."""
    if with_preprocess is None or with_preprocess is False:
        return "none"
    if with_preprocess is True:
        return "normalize"
    if with_preprocess not in INPUT_FORMATS:
        raise ConfigError(f"with_preprocess must be one of {sorted(INPUT_FORMATS)} (or a bool), "
                          f"got {with_preprocess!r}")
    return str(with_preprocess)


def bundle(head_dir: str | Path, output: str | Path, *, with_preprocess: bool | str = False,
           force: bool = False) -> Path:
    """Write backbone + head + softmax as one ONNX file at ``output``; return its path.

    An existing ``output`` that is not an embedx bundle is only replaced with ``force``;
    ``<output>.lock`` is held throughout (``fsio.writer_lock``).
    ``with_preprocess``: ``"none"``/False, ``"normalize"``/True or ``"full"`` (module docstring).
    """
    check_output(output, force=force)  # before any work
    make_parent(output, what="bundle")
    with _output_lock(output):
        return _bundle(head_dir, output, with_preprocess=with_preprocess, force=force)


def _output_lock(output: str | Path):
    """One writer of a bundle at a time: a second gets a one-line ConfigError naming the first."""
    return writer_lock(output, what="bundle", error=ConfigError)


def _bundle(head_dir: str | Path, output: str | Path, *, with_preprocess: bool | str, force: bool) -> Path:
    import onnx

    from embedx.heads import HeadRecord, load_head

    record = HeadRecord.read(head_dir)
    onnx_path = record.backbone_onnx()  # checked before the head's weights are read
    head = load_head(record)
    cache = record.cache
    backbone_model = onnx.load(str(onnx_path))
    head_model = head.to_onnx()
    backbone_meta = onnxmeta.from_proto(backbone_model)
    head_summary = {
        key: record.fields[key]
        for key in ("schema_version", "embedx_version", "head_type", "params", "feature_dim", "metrics")
        if key in record.fields
    }
    head_summary["cache_fingerprint"] = cache.get("fingerprint")
    head_summary["backbone_onnx_sha256"] = cache.get("onnx_sha256")
    metadata = {
        "backbone": cache.get("backbone") or backbone_meta.get("backbone", "unknown"),
        "weights": cache.get("weights_tag") or backbone_meta.get("weights", "unknown"),
        "feature_layer": cache.get("feature_layer") or backbone_meta.get("feature_layer", ""),
        "feature_dim": str(cache.get("feature_dim") or backbone_meta.get("feature_dim", "")),
        "head": head_summary,
    }
    model = compose(
        backbone_model,
        head_model,
        classes=record.class_names,
        temperature=record.temperature,
        preprocess=record.preprocess(),
        with_preprocess=with_preprocess,
        metadata=metadata,
    )
    return _save(model, Path(output), force=force)


def compose(
    backbone: Any,
    head: Any,
    *,
    classes: list[str],
    temperature: float,
    preprocess: PreprocessSpec,
    with_preprocess: bool | str = False,
    metadata: dict[str, Any] | None = None,
) -> Any:
    """Join a backbone ``ModelProto`` ("input" -> "features") and a head ("features" ->
    "logits") into one checked ``ModelProto`` with output ``"probabilities"``."""
    import onnx
    from onnx import TensorProto, helper

    level = preprocess_level(with_preprocess)
    if level == "full" and preprocess.interpolation not in ("bilinear", "bicubic"):
        raise ConfigError(f"--with-preprocess full resizes in the graph with bilinear or bicubic filters; this "
                          f"head's preprocessing uses {preprocess.interpolation!r}: bundle it with normalize")
    _require_io(backbone, inputs=[FLOAT_INPUT], outputs=[FEATURES], what="backbone")
    _require_io(head, inputs=[FEATURES], outputs=[LOGITS], what="head")
    if not temperature > 0:
        raise HeadError(f"temperature must be > 0, got {temperature}")
    backbone, head = _same_versions(backbone, head)
    # Prefix every name of the head graph except its input "features" and output "logits",
    # so the head's internal tensors cannot clash with the backbone's.
    head = onnx.compose.add_prefix(head, HEAD_PREFIX, rename_inputs=False, rename_outputs=False)
    try:
        model = onnx.compose.merge_models(
            backbone, head, io_map=[(FEATURES, FEATURES)], outputs=[LOGITS]
        )
    except ValueError as e:
        raise ExportError(f"cannot join the backbone and head graphs: {e}") from e
    graph = model.graph

    # logits -> Div(T) -> Softmax -> probabilities
    graph.initializer.append(
        helper.make_tensor(POST_PREFIX + "temperature", TensorProto.FLOAT, [], [float(temperature)])
    )
    graph.node.extend(
        [
            helper.make_node("Div", [LOGITS, POST_PREFIX + "temperature"], [POST_PREFIX + "scaled"],
                             name=POST_PREFIX + "div"),
            helper.make_node("Softmax", [POST_PREFIX + "scaled"], [PROBABILITIES],
                             axis=-1 if _opset(model) >= 13 else 1, name=POST_PREFIX + "softmax"),
        ]
    )
    batch_dim = _batch_dim(graph.input[0])
    logits_out = [o for o in graph.output if o.name == LOGITS][0]
    del graph.output[:]
    graph.output.extend(
        [
            helper.make_tensor_value_info(PROBABILITIES, TensorProto.FLOAT, [batch_dim, len(classes)]),
            logits_out,
        ]
    )
    if level == "full":
        from embedx.resize_graph import FULL_OPSET, prepend_full_preprocess

        model = _at_least_opset(model, FULL_OPSET)
        prepend_full_preprocess(model, preprocess, batch_dim=batch_dim)
    elif level == "normalize":
        prepend_normalization(model, preprocess, batch_dim=batch_dim)

    values = dict(metadata or {})
    values.update(
        {
            "version": __version__,
            "kind": "bundle",
            "classes": list(classes),
            "preprocess": preprocess.to_dict(),
            "temperature": repr(float(temperature)),
            "input_format": INPUT_FORMATS[level],
        }
    )
    for stale in ("parity", "fingerprint"):  # they described the backbone export alone
        _drop_meta(model, stale)
    onnxmeta.write(model, values)
    model.producer_name = "embedx"
    model.producer_version = __version__
    model.graph.name = "embedx_bundle"
    _check(model)
    return model


def _require_io(model: Any, *, inputs: list[str], outputs: list[str], what: str) -> None:
    initializers = {i.name for i in model.graph.initializer}
    found_in = [i.name for i in model.graph.input if i.name not in initializers]
    found_out = [o.name for o in model.graph.output]
    if found_in != inputs or not set(outputs) <= set(found_out):
        raise OnnxModelError(
            f"the {what} graph has inputs {found_in} and outputs {found_out}; expected inputs "
            f"{inputs} and outputs including {outputs} (see docs/architecture.md)"
        )


def _opset(model: Any) -> int:
    for entry in model.opset_import:
        if entry.domain in ("", "ai.onnx"):
            return entry.version
    return 1


def _same_versions(backbone: Any, head: Any) -> tuple[Any, Any]:
    """merge_models needs one IR version and one default-domain opset in both graphs."""
    from onnx import helper, version_converter

    target = _opset(backbone)
    if _opset(head) != target:
        try:
            head = version_converter.convert_version(head, target)
        except Exception as e:  # the converter raises plain RuntimeError/ValueError
            logger.info("head opset %d -> %d failed (%s); converting the backbone", _opset(head), target, e)
            target = _opset(head)
            try:
                backbone = version_converter.convert_version(backbone, target)
            except Exception as e2:
                raise ExportError(
                    f"backbone (opset {_opset(backbone)}) and head (opset {_opset(head)}) "
                    f"cannot be brought to one opset: {e2}"
                ) from e2
    # The backbone's IR version is one onnxruntime runs; a head made with onnx.helper may
    # carry the newest one, which it does not need and onnxruntime may refuse.
    needed = helper.find_min_ir_version_for(list(backbone.opset_import) + list(head.opset_import), True)
    backbone.ir_version = head.ir_version = max(backbone.ir_version, needed)
    # Other domains (com.microsoft in quantized graphs) must also agree where both use them.
    head_domains = {e.domain: e for e in head.opset_import}
    for entry in backbone.opset_import:
        other = head_domains.get(entry.domain)
        if other is not None and other.version != entry.version:
            other.version = entry.version = max(other.version, entry.version)
    return backbone, head


def _at_least_opset(model: Any, opset: int) -> Any:
    """``model`` converted to the default-domain ``opset`` if it is older (onnx's version converter)."""
    from onnx import version_converter

    if _opset(model) >= opset:
        return model
    # merge_models can list a domain twice (one entry per input model); the converter reads the first
    versions: dict[str, int] = {}
    for entry in model.opset_import:
        domain = "" if entry.domain == "ai.onnx" else entry.domain
        versions[domain] = max(versions.get(domain, 0), entry.version)
    del model.opset_import[:]
    for domain, version in versions.items():
        model.opset_import.add(domain=domain, version=version)
    try:
        return version_converter.convert_version(model, opset)
    except Exception as e:  # the converter raises plain RuntimeError/ValueError
        raise ExportError(f"the bundle (opset {_opset(model)}) cannot be converted to opset {opset}, which "
                          f"resizing in the graph needs: {e}; bundle with --with-preprocess normalize") from e


def _batch_dim(value_info: Any) -> Any:
    dims = value_info.type.tensor_type.shape.dim
    if dims and dims[0].HasField("dim_value"):
        return dims[0].dim_value
    if dims and dims[0].dim_param:
        return dims[0].dim_param
    return "batch"


def _drop_meta(model: Any, key: str) -> None:
    keep = [p for p in model.metadata_props if p.key != onnxmeta.PREFIX + key]
    del model.metadata_props[:]
    model.metadata_props.extend(keep)


def _check(model: Any) -> None:
    import onnx

    try:
        if model.ByteSize() < _PROTO_LIMIT:
            onnx.checker.check_model(model, full_check=True)
        else:
            onnx.checker.check_model(model)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as e:
        raise ExportError(f"the bundled graph fails onnx.checker: {e}") from e


def check_output(output: str | Path, *, force: bool = False) -> None:
    """ConfigError unless ``output`` is free or an embedx bundle (or ``force``): a bundle never
    silently replaces a folder, a backbone export or a file that is not ONNX at all."""
    output = Path(output)
    if output.is_dir():
        raise ConfigError(f"bundle output {output} is a folder; pass a file name such as {output / 'model.onnx'}")
    if not output.exists() or force:
        return
    from google.protobuf.message import DecodeError  # protobuf comes with onnx

    try:
        kind = onnxmeta.probe(output).get("kind")
    except (OSError, ValueError, DecodeError) as e:
        logger.debug("%s is not readable as ONNX: %s", output, e)
        kind = None
    if kind != "bundle":
        what = "an embedx ONNX file of kind " + repr(kind) if kind else "not an embedx bundle"
        raise ConfigError(f"{output} exists and is {what}; refusing to replace it: "
                          "choose another -o or pass --force (force=True)")


def save(model: Any, output: str | Path, *, force: bool = False) -> Path:
    """Write to a temporary name beside ``output``, then rename (no half-written bundles).

    Temporaries that a killed earlier run left beside ``output`` are deleted first; an existing
    ``output`` must be a bundle unless ``force`` (``check_output``); ``<output>.lock`` is held
    while writing.
    """
    output = Path(output)
    check_output(output, force=force)
    make_parent(output, what="bundle")
    with _output_lock(output):
        return _save(model, output, force=force)


def _save(model: Any, output: Path, *, force: bool) -> Path:
    import onnx

    check_output(output, force=force)
    removed = remove_stale_temporaries(output.parent, output.name)
    if removed:
        logger.info("removed %d temporary file(s) a killed earlier run left beside %s", removed, output)
    data = None  # a bundle over protobuf's 2 GB limit keeps its tensors in <output>.data-<token>
    if model.ByteSize() >= _PROTO_LIMIT:
        data = output.with_name(f"{output.name}.data-{secrets.token_hex(8)}")
    try:
        with reporting_write_errors(output), atomic_path(output) as tmp:
            if data is None:
                onnx.save(model, str(tmp))
            else:  # a new data file beside the old pair: a kill before the rename leaves that pair whole
                onnx.save(model, str(tmp), save_as_external_data=True, all_tensors_to_one_file=True,
                          location=data.name)
                fsync_path(data)
    except BaseException:
        if data is not None:
            data.unlink(missing_ok=True)
        raise
    for old in _data_files(output):  # the replaced bundle's data, or a killed run's
        if old != data:
            old.unlink(missing_ok=True)
    logger.info("wrote bundle %s (%.1f MB)", output, output.stat().st_size / 1e6)
    return output


def _data_files(output: Path) -> list[Path]:
    """The external-data files a bundle saved as ``output`` may have: ``<name>.data`` (older
    embedx) and ``<name>.data-<16 hex digits>``."""
    pattern = re.compile(re.escape(output.name) + r"\.data(-[0-9a-f]{16})?")
    with contextlib.suppress(FileNotFoundError):
        return [entry for entry in output.parent.iterdir() if pattern.fullmatch(entry.name) and entry.is_file()]
    return []

