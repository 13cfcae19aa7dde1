"""Fine-tuning after the linear probe (LP-FT): the one place a backbone is unfrozen.

``finetune(head_dir, data)`` rebuilds the torch backbone a head's cache was made
with, puts the trained head on top (the linear probe: LP), and trains the whole
thing end to end with augmentation (FT).  Starting from a trained head instead of a
random one keeps the early gradients from wrecking the pretrained features
(Kumar et al., "Fine-Tuning can Distort Pretrained Features and Underperform
Out-of-Distribution", ICLR 2022).

The result is a head directory of the same format as ``fit-head`` whose cache
section points at the fine-tuned backbone (exported to ONNX through
``export.export_module``, parity-checked), so ``predict``, ``evaluate``, ``bundle``
and ``serve-onnx`` use it unchanged, plus the backbone's state dict
(``backbone.safetensors``) that ``build_feature_extractor(name, weights=path)``
and ``embedx extract --weights`` rebuild it from.

Output directory::

    head.json, weights.safetensors   the head (fit-head format), on the new backbone
    backbone.onnx                    the fine-tuned backbone (input "input", output "features")
    backbone.safetensors             its state dict
    finetune.json                    config, per-epoch history, before/after accuracy
    train/checkpoint.pt              after each epoch: model, best model so far, optimizer,
                                     schedule, rng, history (what a resume continues from)

written to a new folder and swapped in as a whole when the run ends (``artifacts.output_writer``),
so a kill leaves the old output or the new one; head.json and finetune.json name these files
relative to the folder.

Modules:

- ``data``: (path, label) lists in the head's class order, the dataset, augmentation.
- ``model``: ``FinetuneModel`` (backbone + ``TorchHead``), loading the start, the composition check.
- ``loop``: trainable blocks, AdamW groups, the warm-up/cosine schedule, one epoch, evaluation.
- ``checkpoint``: ``train/checkpoint.pt`` (save, load, config match, rng).
- ``artifacts``: the backbone's safetensors and ONNX (parity-checked), the head dir, finetune.json.
- ``train``: ``finetune()`` itself, its config and result.
"""

from __future__ import annotations

from embedx.finetune.artifacts import (
    BACKBONE_ONNX_FILE,
    BACKBONE_WEIGHTS_FILE,
    REPORT_FILE,
    check_onnx,
)
from embedx.finetune.checkpoint import CHECKPOINT_FILE, CHECKPOINT_VERSION, TRAIN_SUBDIR
from embedx.finetune.data import (
    DEFAULT_CROP_SCALE,
    DEFAULT_VAL_FRACTION,
    ImageListDataset,
    _split_items,  # noqa: F401 - the tests call it as finetune._split_items
    train_transform,
)
from embedx.finetune.loop import (
    collect_logits,
    evaluate_model,
    param_groups,
    parse_unfreeze,
    resolve_device,
    set_train_mode,
    set_trainable,
    warmup_cosine,
)
from embedx.finetune.model import COMPOSITION_TOLERANCE, FinetuneModel, TorchHead, check_composition
from embedx.finetune.train import FinetuneConfig, FinetuneResult, default_output, finetune

__all__ = [
    "BACKBONE_ONNX_FILE",
    "BACKBONE_WEIGHTS_FILE",
    "CHECKPOINT_FILE",
    "CHECKPOINT_VERSION",
    "COMPOSITION_TOLERANCE",
    "DEFAULT_CROP_SCALE",
    "DEFAULT_VAL_FRACTION",
    "REPORT_FILE",
    "TRAIN_SUBDIR",
    "FinetuneConfig",
    "FinetuneModel",
    "FinetuneResult",
    "ImageListDataset",
    "TorchHead",
    "check_composition",
    "check_onnx",
    "collect_logits",
    "default_output",
    "evaluate_model",
    "finetune",
    "param_groups",
    "parse_unfreeze",
    "resolve_device",
    "set_train_mode",
    "set_trainable",
    "train_transform",
    "warmup_cosine",
]
