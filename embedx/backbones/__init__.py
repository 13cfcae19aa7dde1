"""Backbones: the registry (``registry``, torch-free) and building them in torch (``build``).

``import embedx.backbones`` loads neither torch nor torchvision: the registry reads
torchvision's weights enums on the first look-up, and ``build_feature_extractor`` /
``feature_blocks`` import ``embedx.backbones.build`` (and with it torch) when called.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from embedx.backbones.registry import (
    RANDOM_INIT_SEED,
    BackboneSpec,
    WeightsChoice,
    get_spec,
    list_specs,
    resolve_weights,
    weights_status,
)

__all__ = [
    "RANDOM_INIT_SEED", "BackboneSpec", "WeightsChoice", "build_feature_extractor", "feature_blocks",
    "get_spec", "list_specs", "resolve_weights", "weights_status",
]


def build_feature_extractor(name: str, *, weights: str | Path | None = "DEFAULT",
                            layer: str | None = None) -> Any:
    """The headless backbone ``name`` as an ``nn.Module`` in eval mode (see ``build``)."""
    from embedx.backbones import build

    return build.build_feature_extractor(name, weights=weights, layer=layer)


def feature_blocks(model: Any) -> list[Any]:
    """The trainable units of a backbone, input to output (see ``build``)."""
    from embedx.backbones import build

    return build.feature_blocks(model)
