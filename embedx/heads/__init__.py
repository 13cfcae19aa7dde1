"""Classifier heads on cached features: one contract, automatic regularization, saved as a directory.

Importing this package imports neither torch nor scikit-learn: loading a head and
running ``predict_proba`` is numpy only (torch is imported inside the training code
of the ``linear``/``mlp`` heads and the regularization sweep).

    from embedx.heads import fit_head, load_head
    result = fit_head("cache/feats.h5", head="logreg")     # -> FitResult
    head = load_head(result.output_dir)
    head.predict_proba(features)                            # softmax(logits / temperature_)
    head.record_.backbone_onnx()                            # head.json (HeadRecord): the checked backbone ONNX
"""

from __future__ import annotations

from embedx.heads.base import HEAD_TYPES, Head, load_head
from embedx.heads.fit import DEFAULT_HEAD, FitResult, evaluate, fit_head, make_head
from embedx.heads.knn import KNNHead
from embedx.heads.linear import LinearHead, LogRegHead, MLPHead
from embedx.heads.record import HEAD_JSON, SCHEMA_VERSION, WEIGHTS_FILE, HeadRecord, head_record

__all__ = [
    "DEFAULT_HEAD",
    "HEAD_JSON",
    "HEAD_TYPES",
    "SCHEMA_VERSION",
    "WEIGHTS_FILE",
    "FitResult",
    "Head",
    "HeadRecord",
    "KNNHead",
    "LinearHead",
    "LogRegHead",
    "MLPHead",
    "evaluate",
    "fit_head",
    "head_record",
    "load_head",
    "make_head",
]
