"""What a fine-tuning run leaves: the backbone's state dict and ONNX export, the head dir, the report.

The ONNX export is parity-checked against the trained torch backbone (``export.check_parity``),
and the head directory is the fit-head format whose cache section names the new backbone.
"""

from __future__ import annotations

import copy
import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from embedx.finetune.loop import collect_logits
from embedx.finetune.model import FinetuneModel, _Start
from embedx.fsio import atomic_path, atomic_write
from embedx.heads.record import HEAD_JSON

logger = logging.getLogger(__name__)

BACKBONE_WEIGHTS_FILE = "backbone.safetensors"
BACKBONE_ONNX_FILE = "backbone.onnx"
REPORT_FILE = "finetune.json"


def remove_stale_temporaries(output_dir: Path) -> int:
    """Delete the temporary files a killed run left in ``output_dir`` and its ``train/``
    (every file here is written through ``fsio``); returns how many."""
    from embedx.finetune.checkpoint import CHECKPOINT_FILE, TRAIN_SUBDIR
    from embedx.fsio import remove_stale_temporaries as remove

    names = (BACKBONE_WEIGHTS_FILE, BACKBONE_ONNX_FILE, REPORT_FILE, HEAD_JSON, "weights.safetensors",
             "confusion_matrix.png", "reliability.png")
    removed = sum(remove(output_dir, name) for name in names)
    return removed + remove(output_dir / TRAIN_SUBDIR, CHECKPOINT_FILE)


def _save_backbone_weights(backbone: nn.Module, path: Path) -> None:
    """The backbone's state dict as safetensors, written atomically.

    Keys are the feature extractor's (``net.`` prefix), which
    ``backbones.build_feature_extractor(name, weights=path)`` strips and loads.
    """
    from safetensors.torch import save_file

    state = {name: tensor.detach().cpu().contiguous() for name, tensor in backbone.state_dict().items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        save_file(state, str(tmp), metadata={"format": "pt"})


def _export(start: _Start, model: FinetuneModel, weights_path: Path, output_dir: Path):
    """The fine-tuned backbone as ONNX, rebuilt from its saved state dict.

    With the registry's preprocessing this is ``export_backbone(name, weights=file)``:
    the export ``embedx extract --backbone NAME --weights FILE`` finds in its cache, so
    a new cache made that way has the fingerprint this head records (``evaluate`` and
    ``fit-head`` accept it).  Otherwise ``export_module`` exports the module as it is.
    """
    from embedx.backbones import get_spec
    from embedx.export import export_backbone, export_module

    target = output_dir / BACKBONE_ONNX_FILE
    if get_spec(start.backbone_name).preprocess == start.preprocess:
        return export_backbone(start.backbone_name, weights=weights_path, layer=start.feature_layer, output=target)
    from embedx.backbones import resolve_weights

    choice = resolve_weights(get_spec(start.backbone_name), weights_path)
    return export_module(model.backbone, name=start.backbone_name, weights_tag=choice.tag, weights_arg=choice.arg,
                         feature_layer=start.feature_layer, preprocess=start.preprocess, output=target)


def check_onnx(path: Path, backbone: nn.Module, *, input_size: int) -> dict[str, Any]:
    """``export.check_parity`` of the ONNX file at ``path`` against the trained torch backbone (CPU).

    The export was rebuilt from the saved state dict; this proves that state dict is the
    trained model (ParityError beyond ``export.PARITY_TOLERANCE``).
    """
    from embedx.export import check_parity

    parity = check_parity(backbone.eval(), Path(path).read_bytes(), input_size=input_size,
                          name=f"the fine-tuned backbone {path} vs the trained torch model")
    logger.info("fine-tuned backbone: ONNX vs torch max abs %.2e, rel %.2e",
                parity["max_abs_error"], parity["max_rel_error"])
    return parity


def _head_record(head: Any, exported, old_cache: dict[str, Any], *, metrics: dict[str, Any], n_val: int,
                 finetune: dict[str, Any]):
    """head.json of the fine-tuned head (``heads.head_record``, the one builder): the new
    backbone's cache section, the val metrics and the fine-tuning record."""
    from embedx.cache import CacheMeta
    from embedx.heads import head_record

    meta = CacheMeta.from_export(exported, dtype=old_cache.get("dtype", "float16"),
                                 precision=old_cache.get("precision", "fp32"))
    val_source = "val images of the fine-tuning data (eval preprocessing)"
    return head_record(head, meta, metrics={"val_source": val_source, "n_val": n_val, "val": metrics},
                       val_source=val_source, finetune=finetune)


def _write_artifacts(start: _Start, model: FinetuneModel, output_dir: Path, *, val_loader,
                     record: dict[str, Any]):
    """backbone.safetensors, backbone.onnx (checked against the trained model), the head dir."""
    from embedx.metrics import (
        classification_metrics,
        fit_temperature,
        plot_confusion_matrix,
        plot_reliability,
    )

    # The folder keeps its training checkpoint, so it is not swapped as a whole: head.json
    # goes first and comes back last, so a kill in between leaves no head (an error when
    # loaded), never an old head.json beside new weights.
    (output_dir / HEAD_JSON).unlink(missing_ok=True)
    weights_path = (output_dir / BACKBONE_WEIGHTS_FILE).resolve()
    _save_backbone_weights(model.backbone, weights_path)
    exported = _export(start, model, weights_path, output_dir)
    trained = check_onnx(Path(exported.path), model.backbone, input_size=exported.preprocess.input_size)
    parity = {**dict(exported.parity or {}), "trained_model": trained}

    logits, labels = collect_logits(model, val_loader, torch.device("cpu"))
    temperature = fit_temperature(logits, labels)
    class_names = [str(c) for c in start.head.classes_]
    metrics = classification_metrics(labels, logits, class_names=class_names, temperature=temperature)

    head = copy.deepcopy(start.head)
    head._set_arrays(model.head.arrays())  # the same arrays load_head reads back
    head.temperature_ = temperature
    head_json = _head_record(
        head, exported, start.head_json.get("cache") or {}, metrics=metrics, n_val=int(len(labels)),
        finetune={**record, "parity": parity, "temperature": temperature},
    )
    plot_confusion_matrix(np.asarray(metrics["confusion_matrix"]), class_names, output_dir / "confusion_matrix.png",
                          title="fine-tuned, val")
    plot_reliability(labels, logits, output_dir / "reliability.png", temperature=temperature,
                     title="fine-tuned, val reliability")
    head.write_files(output_dir, head_json)  # head.json last: now the folder is a head again
    return exported, weights_path, parity


def _write_report(output_dir: Path, record: dict[str, Any], result: dict[str, Any]) -> None:
    """finetune.json: the run's record and its result."""
    atomic_write(output_dir / REPORT_FILE,
                 json.dumps({**record, "result": result}, indent=2, sort_keys=True, default=str))
