"""The model fine-tuning trains: the registry backbone with the saved head on top, in torch.

``_load_start`` rebuilds it from a head directory; ``check_composition`` proves the torch
head computes what the saved head does before any training is spent on it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from embedx import preprocess as pp
from embedx.errors import ConfigError, HeadError

logger = logging.getLogger(__name__)

#: Largest tolerated difference between the composed torch model's probabilities
#: and the saved head's on the same features (a wrong conversion is far above it).
COMPOSITION_TOLERANCE = 1e-3


class FinetuneModel(nn.Module):
    """Backbone (images -> features) followed by the head (features -> logits)."""

    def __init__(self, backbone: nn.Module, head: nn.Module) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = head

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(images))


def _linear(weight: np.ndarray, bias: np.ndarray) -> nn.Linear:
    """``nn.Linear`` from a head's (D, C) weight and (C,) bias (numpy's ``x @ W + b``)."""
    weight = np.asarray(weight, dtype=np.float32)
    layer = nn.Linear(weight.shape[0], weight.shape[1])
    with torch.no_grad():
        layer.weight.copy_(torch.from_numpy(np.ascontiguousarray(weight.T)))
        layer.bias.copy_(torch.from_numpy(np.asarray(bias, dtype=np.float32).reshape(-1)))
    return layer


class TorchHead(nn.Module):
    """A saved logreg/linear/mlp head in torch: its standardization (fixed), then its layers.

    The standardization stays a pair of buffers rather than being folded into the
    first layer, so the trained weights keep the scale AdamW and weight decay were
    tuned for, and ``arrays()`` gives back the head's own safetensors layout.
    """

    def __init__(self, mean: np.ndarray, scale: np.ndarray, layers: nn.Sequential) -> None:
        super().__init__()
        self.register_buffer("mean", torch.as_tensor(np.asarray(mean, dtype=np.float32)).clone())
        self.register_buffer("scale", torch.as_tensor(np.asarray(scale, dtype=np.float32)).clone())
        self.layers = layers

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.layers((features - self.mean) / self.scale)

    @classmethod
    def from_head(cls, head: Any) -> TorchHead:
        head_type = getattr(head, "head_type", type(head).__name__)
        if head_type in ("logreg", "linear"):
            layers = nn.Sequential(_linear(head.weight_, head.bias_))
        elif head_type == "mlp":
            layers = nn.Sequential(
                _linear(head.w1_, head.b1_), nn.ReLU(), nn.Dropout(float(head.dropout)), _linear(head.w2_, head.b2_)
            )
        else:
            raise HeadError(
                f"cannot fine-tune a {head_type!r} head: it has no layer to put on a backbone; "
                "fit a logreg, linear or mlp head (`embedx fit-head --head logreg`) and fine-tune that"
            )
        return cls(head.mean_, head.scale_, layers)

    def reset(self) -> None:
        """A fresh random head on raw features (plain fine-tuning, for comparison)."""
        with torch.no_grad():
            self.mean.zero_()
            self.scale.fill_(1.0)
        for layer in self.layers:
            if isinstance(layer, nn.Linear):
                layer.reset_parameters()

    def arrays(self) -> dict[str, np.ndarray]:
        """The weights in the saved head's layout (``weights.safetensors`` names)."""

        def numpy(tensor: torch.Tensor) -> np.ndarray:
            return np.ascontiguousarray(tensor.detach().float().cpu().numpy())

        linears = [layer for layer in self.layers if isinstance(layer, nn.Linear)]
        arrays = {"mean": numpy(self.mean), "scale": numpy(self.scale)}
        if len(linears) == 1:
            arrays.update(weight=numpy(linears[0].weight.T), bias=numpy(linears[0].bias))
        else:
            first, second = linears
            arrays.update(w1=numpy(first.weight.T), b1=numpy(first.bias), w2=numpy(second.weight.T),
                          b2=numpy(second.bias))
        return arrays


@dataclass
class _Start:
    """What fine-tuning starts from: the head dir's record, the head, the torch model."""

    head_json: dict[str, Any]
    head: Any
    backbone_name: str
    feature_layer: str | None
    preprocess: pp.PreprocessSpec
    model: FinetuneModel
    blocks: list[nn.Module]


def _load_start(head_dir: Path, *, reinit_head: bool, seed: int) -> _Start:
    from embedx.backbones import build_feature_extractor, feature_blocks
    from embedx.heads import load_head
    from embedx.onnxgraph import is_onnx_path

    head = load_head(head_dir)
    head_json = head.info_  # head.json as load_head read it
    adaptation = head_json.get("adaptation") if isinstance(head_json.get("adaptation"), dict) else {}
    if getattr(head, "adaptation_", None) is not None and not reinit_head:
        # The head reads target-domain rows through the target's statistics; fine-tuning trains it on
        # source images, and a changed backbone would no longer match those statistics either.
        raise HeadError(
            f"the head in {head_dir} is adapted to a target domain ({adaptation.get('method', '?')} to "
            f"{adaptation.get('target_cache', '?')}), whose statistics belong to the frozen backbone; fine-tune a "
            "head fitted without --adapt-to"
        )
    cache = head_json.get("cache") or {}
    backbone_name = cache.get("backbone")
    if not backbone_name or str(backbone_name).startswith("onnx:") or is_onnx_path(backbone_name):
        raise ConfigError(
            f"the head in {head_dir} was fitted on features of {backbone_name!r}, which is not a torch "
            "backbone from the registry; fine-tuning needs one (see `embedx backbones`)"
        )
    weights_arg = cache.get("weights_arg") or "DEFAULT"
    feature_layer = cache.get("feature_layer")
    preprocess = pp.PreprocessSpec.from_dict(cache["preprocess"])
    backbone = build_feature_extractor(backbone_name, weights=weights_arg, layer=feature_layer)
    torch.manual_seed(seed)
    module = TorchHead.from_head(head)
    if reinit_head:
        module.reset()
    model = FinetuneModel(backbone, module)
    return _Start(head_json, head, backbone_name, feature_layer, preprocess, model, list(feature_blocks(backbone)))


@torch.no_grad()
def check_composition(start: _Start, images: torch.Tensor) -> float:
    """Max |p_torch - p_head| on ``images``; raises HeadError beyond the tolerance.

    The head's own ``predict_proba`` on the torch backbone's features must equal
    softmax(logits / temperature) of the composed model: this catches a wrong
    conversion of the head before hours of training are spent on it.
    """
    start.model.eval()
    features = start.model.backbone(images)
    temperature = float(start.head_json.get("temperature") or 1.0)
    torch_probs = torch.softmax(start.model.head(features).double() / temperature, dim=1).numpy()
    head_probs = np.asarray(start.head.predict_proba(features.numpy()), dtype=np.float64)
    difference = float(np.abs(torch_probs - head_probs).max())
    logger.info("composition check: max |p_torch - p_head| = %.2e on %d images", difference, len(images))
    if difference > COMPOSITION_TOLERANCE:
        raise HeadError(
            f"the head converted to torch disagrees with the saved head by {difference:.3g} in probability "
            f"(tolerance {COMPOSITION_TOLERANCE}); this is a bug in embedx.finetune, please report it"
        )
    return difference
