"""Torch -> ONNX, verified: the checker, torch-vs-ORT parity, metadata, the export cache.

``export_backbone`` exports a registry backbone and ``export_module`` a torch module
built elsewhere (a fine-tuned backbone); both keep the result in the ``onnxcache``,
keyed by a fingerprint of everything that changes the file: backbone, weights
identity, feature layer, opset, preprocessing, the torch/torchvision/onnx versions and
``EXPORT_CODE_VERSION``.

Parity: ONNX Runtime (CPUExecutionProvider) against torch on the same seeded random
input at batch 1 and batch 3.  ``max_abs_error`` is max |ort - torch| over all outputs;
``max_rel_error`` is that divided by max |torch| over the same output (a per-output
relative error that does not blow up on features near zero).  The export fails with
``ParityError`` when ``max_rel_error > PARITY_TOLERANCE`` (1e-4 for fp32).

``resolve_backbone`` dispatches a backbone argument: an ONNX file goes to
``onnxgraph.prepare_onnx`` (re-exported here with the cache's names), a registry name
to ``export_backbone``.
"""

from __future__ import annotations

import copy
import hashlib
import logging
import warnings
from pathlib import Path
from typing import Any

from embedx import __version__, onnxmeta
from embedx.backbones import get_spec, resolve_weights
from embedx.errors import ConfigError, ExportError, ParityError
from embedx.onnxcache import (
    DEFAULT_OPSET,
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
from embedx.onnxgraph import is_onnx_path, prepare_onnx
from embedx.preprocess import PreprocessSpec
from embedx.progress import ProgressCallback

__all__ = [
    "DEFAULT_OPSET", "EXPORT_CODE_VERSION", "EXPORT_STAGES", "INPUT_NAME", "OUTPUT_NAME",
    "PARITY_BATCH_SIZES", "PARITY_TOLERANCE", "ExportResult", "check_parity", "export_backbone",
    "export_module", "fingerprint_of", "is_onnx_path", "prepare_onnx", "resolve_backbone",
]

logger = logging.getLogger(__name__)

#: Batch size traced at export: not 1, so that nothing specializes on a unit batch.
_TRACE_BATCH = 2


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
        logger.warning("TorchScript ONNX export failed (%s: %s); trying the dynamo exporter",
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


def check_parity(module: Any, model_bytes: bytes, *, input_size: int, name: str) -> dict[str, Any]:
    """Run torch and ORT on the same inputs; ParityError beyond ``PARITY_TOLERANCE``."""
    import torch

    session = ort_session(model_bytes, name=name)
    worst_abs = worst_rel = 0.0
    for batch_size, batch in parity_inputs(input_size).items():
        with torch.no_grad():
            expected = module(torch.from_numpy(batch)).float().numpy()
        got = session.run([OUTPUT_NAME], {INPUT_NAME: batch})[0]
        if got.shape != expected.shape:
            raise ParityError(
                f"{name}: ONNX output shape {got.shape} differs from torch's {expected.shape} at "
                f"batch {batch_size}; the export did not keep a dynamic batch axis"
            )
        max_abs, max_rel = relative_error(got, expected)
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
    logger.info("exporting %s (%s, layer %s) to ONNX opset %d", name, weights_tag, feature_layer, opset)
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
    result = publish(model, path, result)
    if progress is not None:
        progress(len(EXPORT_STAGES), len(EXPORT_STAGES), {"stage": "done"})
    return result


def export_backbone(backbone: str, *, weights: str | Path | None = "DEFAULT", layer: str | None = None,
                    output: str | Path | None = None, opset: int = DEFAULT_OPSET,
                    force: bool = False, progress: ProgressCallback | None = None,
                    weights_arg: str | None = None) -> ExportResult:
    """Export registry backbone ``backbone`` to a verified ONNX feature extractor.

    Cached under ``paths.onnx_dir()``: a second call with the same arguments returns at
    once with ``cached=True``.  ``output`` also writes the file there.  ``force``
    rebuilds even when a valid cached export exists.  ``progress`` is called once per
    stage of ``EXPORT_STAGES`` (not at all for a cached export).  ``weights_arg``: the
    weights argument recorded (default: the resolved ``weights``), for a weights file
    written under a temporary name that will be renamed to this one (fine-tuning).
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
                             weights_arg=weights_arg or choice.arg, feature_layer=layer, preprocess=preprocess,
                             fingerprint=fingerprint, opset=opset, progress=progress)

    return cached_or_build(spec.name, fingerprint, build, output=output, force=force)


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

    return cached_or_build(name, fingerprint, build, output=output, force=False)


# -------------------------------------------------------------------------- dispatcher


def resolve_backbone(backbone: str | Path, *, weights: str | Path | None = "DEFAULT",
                     layer: str | None = None) -> ExportResult:
    """A registry name goes to ``export_backbone``, a path to an .onnx file to ``prepare_onnx``."""
    if is_onnx_path(backbone):
        if weights not in (None, "DEFAULT", "default"):
            raise ConfigError(f"--weights {weights!r} does not apply to an ONNX file ({backbone}); "
                              "its weights are inside it")
        return prepare_onnx(backbone, layer=layer)
    return export_backbone(str(backbone), weights=weights, layer=layer)
