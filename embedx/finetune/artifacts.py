"""What a fine-tuning run leaves: the backbone's state dict and ONNX export, the head dir, the report.

The ONNX export is parity-checked against the trained torch backbone (``export.check_parity``),
and the head directory is the fit-head format whose cache section names the new backbone.

The output folder is replaced as a whole (``output_writer``, ``fsio.atomic_dir``): everything
goes to a new folder beside it, the training checkpoint is carried over (hard links), and the
new folder is swapped in, so a kill at any moment leaves the old output or the new one, never
a mix. Its records name its own files relative to it (head.json ``cache.onnx_path`` is
``backbone.onnx``; finetune.json's paths too), so the folder can be moved. The run holds
``<output>.lock`` (``fsio.writer_lock``) from start to end: one writer at a time.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import logging
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from embedx import fsio
from embedx.errors import HeadError
from embedx.finetune.loop import collect_logits
from embedx.finetune.model import FinetuneModel, _Start
from embedx.fsio import atomic_path, atomic_write
from embedx.heads.record import HEAD_JSON

logger = logging.getLogger(__name__)

BACKBONE_WEIGHTS_FILE = "backbone.safetensors"
BACKBONE_ONNX_FILE = "backbone.onnx"
REPORT_FILE = "finetune.json"


def remove_stale_temporaries(output_dir: Path) -> int:
    """Clean what a killed run left (the caller holds ``output_lock``): its new folder beside
    ``output_dir`` and, where it was killed mid-swap, the previous folder it had moved aside (put
    back first), then temporary files inside ``output_dir`` and its ``train/``; returns how many
    were deleted."""
    from embedx.finetune.checkpoint import CHECKPOINT_FILE, TRAIN_SUBDIR

    removed = fsio.remove_stale_temporaries(output_dir.parent, output_dir.name)
    names = (BACKBONE_WEIGHTS_FILE, BACKBONE_ONNX_FILE, REPORT_FILE, HEAD_JSON, "weights.safetensors",
             "confusion_matrix.png", "reliability.png")
    removed += sum(fsio.remove_stale_temporaries(output_dir, name) for name in names)
    return removed + fsio.remove_stale_temporaries(output_dir / TRAIN_SUBDIR, CHECKPOINT_FILE)


def output_lock(output_dir: Path):
    """``<output>.lock`` for a whole run: a second run (or fit-head) writing the same folder gets a
    one-line HeadError naming this one."""
    return fsio.writer_lock(output_dir, what="fine-tuning output", error=HeadError)


def check_output(output_dir: Path) -> None:
    """HeadError unless ``output_dir`` is free, empty or an earlier output (it is replaced whole)."""
    from embedx.finetune.checkpoint import TRAIN_SUBDIR

    if output_dir.exists() and not output_dir.is_dir():
        raise HeadError(f"the fine-tuning output {output_dir} exists and is not a folder; choose another -o")
    if output_dir.is_dir() and any(output_dir.iterdir()) and not any(
            (output_dir / name).exists() for name in (HEAD_JSON, REPORT_FILE, TRAIN_SUBDIR)):
        raise HeadError(f"{output_dir} is a folder that is not a fine-tuning output (no {HEAD_JSON}, {REPORT_FILE} "
                        f"or {TRAIN_SUBDIR}/); the output replaces its contents: choose another -o or empty it")


@contextlib.contextmanager
def output_writer(output_dir: Path) -> Iterator[Path]:
    """Yield a new folder that replaces ``output_dir`` as a whole on success
    (``fsio.atomic_dir``), holding the current ``train/`` files already (hard links, or copies
    where the file system has none)."""
    from embedx.finetune.checkpoint import TRAIN_SUBDIR

    with fsio.reporting_write_errors(output_dir), fsio.atomic_dir(output_dir) as work:
        train = output_dir / TRAIN_SUBDIR
        if train.is_dir():
            (work / TRAIN_SUBDIR).mkdir()
            for path in train.iterdir():
                if path.is_file() and not path.is_symlink() and fsio.TEMP_MARK not in path.name:
                    try:
                        os.link(path, work / TRAIN_SUBDIR / path.name)
                    except OSError:
                        shutil.copy2(path, work / TRAIN_SUBDIR / path.name)
        yield work


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


def _export(start: _Start, model: FinetuneModel, weights_path: Path, output_dir: Path, *, weights_arg: str):
    """The fine-tuned backbone as ONNX, rebuilt from its saved state dict.

    With the registry's preprocessing this is ``export_backbone(name, weights=file)``:
    the export ``embedx extract --backbone NAME --weights FILE`` finds in its cache, so
    a new cache made that way has the fingerprint this head records (``evaluate`` and
    ``fit-head`` accept it).  Otherwise ``export_module`` exports the module as it is.
    ``weights_arg``: where the weights file will be once the output is swapped in.
    """
    from embedx.backbones import get_spec
    from embedx.export import export_backbone, export_module

    target = output_dir / BACKBONE_ONNX_FILE
    if get_spec(start.backbone_name).preprocess == start.preprocess:
        return export_backbone(start.backbone_name, weights=weights_path, layer=start.feature_layer, output=target,
                               weights_arg=weights_arg)
    from embedx.backbones import resolve_weights

    choice = resolve_weights(get_spec(start.backbone_name), weights_path)
    return export_module(model.backbone, name=start.backbone_name, weights_tag=choice.tag, weights_arg=weights_arg,
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
    backbone's cache section (its ``onnx_path`` relative to the folder), the val metrics and
    the fine-tuning record."""
    from embedx.cache import CacheMeta
    from embedx.heads import head_record

    meta = CacheMeta.from_export(exported, dtype=old_cache.get("dtype", "float16"),
                                 precision=old_cache.get("precision", "fp32"))
    meta = dataclasses.replace(meta, onnx_path=BACKBONE_ONNX_FILE)
    val_source = "val images of the fine-tuning data (eval preprocessing)"
    return head_record(head, meta, metrics={"val_source": val_source, "n_val": n_val, "val": metrics},
                       val_source=val_source, finetune=finetune)


def _write_artifacts(start: _Start, model: FinetuneModel, work: Path, *, final_dir: Path, val_loader,
                     record: dict[str, Any]):
    """backbone.safetensors, backbone.onnx (checked against the trained model), the head, its
    plots, into ``work`` (an ``output_writer`` folder that becomes ``final_dir``)."""
    from embedx.metrics import (
        classification_metrics,
        fit_temperature,
        plot_confusion_matrix,
        plot_reliability,
    )

    weights_path = work / BACKBONE_WEIGHTS_FILE
    _save_backbone_weights(model.backbone, weights_path)
    exported = _export(start, model, weights_path, work,
                       weights_arg=str((final_dir / BACKBONE_WEIGHTS_FILE).resolve()))
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
    plot_confusion_matrix(np.asarray(metrics["confusion_matrix"]), class_names, work / "confusion_matrix.png",
                          title="fine-tuned, val")
    plot_reliability(labels, logits, work / "reliability.png", temperature=temperature,
                     title="fine-tuned, val reliability")
    head.write_files(work, head_json)
    return exported, parity


def _write_report(work: Path, record: dict[str, Any], result: dict[str, Any]) -> None:
    """finetune.json: the run's record and its result, the folder's own files named relative to it."""
    result = {**result, "output_dir": ".", "onnx_path": BACKBONE_ONNX_FILE, "backbone_weights": BACKBONE_WEIGHTS_FILE}
    atomic_write(work / REPORT_FILE, json.dumps({**record, "result": result}, indent=2, sort_keys=True, default=str))
