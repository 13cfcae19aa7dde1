"""Building backbones in torch: the headless model, its weights, its fine-tuning blocks.

``build_feature_extractor`` builds the torchvision or EfficientNet-Lite model of a
registry spec, cuts it down to the feature layer (``_remove_head``), loads the weights
``registry.resolve_weights`` chose (every parameter must be covered) and wraps it in a
``FeatureExtractor``.  ``feature_blocks`` lists the units ``finetune --unfreeze N`` counts.

This module imports torch; ``embedx.backbones`` imports it only when a model is built.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Any

import torch
from torch import nn

from embedx.backbones.registry import (
    RANDOM_INIT_SEED,
    BackboneSpec,
    get_spec,
    resolve_weights,
    torchvision_members,
)
from embedx.errors import ConfigError

logger = logging.getLogger(__name__)


class FeatureExtractor(nn.Module):
    """A headless backbone: NCHW float32 in, (N, feature_dim) float32 out.

    ``mode`` says how the features are taken from ``net``: "forward" (its own
    forward, classifier replaced), "pool" (global average of ``net.features``),
    "lite" (global average of EfficientNet-Lite's ``extract_features``).
    """

    def __init__(self, net: nn.Module, *, mode: str, name: str, feature_layer: str,
                 feature_dim: int, family: str) -> None:
        super().__init__()
        self.net = net
        self.mode = mode
        self.name = name
        self.family = family
        self.feature_layer = feature_layer
        self.feature_dim = feature_dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.mode == "pool":
            x = self.net.features(x)
            return torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1)
        if self.mode == "lite":
            x = self.net.extract_features(x)
            return torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1)
        return torch.flatten(self.net(x), 1)


# ---------------------------------------------------------------------------- weights


def _load_state_dict_file(path: Path) -> dict[str, Any]:
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path), device="cpu")
        else:
            state = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:  # torch/safetensors raise several types for a bad file; all mean the same
        raise ConfigError(
            f"cannot load weights from {path}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}; "
            "expected a state dict saved with torch.save(model.state_dict(), path) or safetensors"
        ) from e
    for key in ("state_dict", "model", "model_state_dict"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict) or not all(hasattr(v, "shape") for v in state.values()):
        raise ConfigError(f"{path} holds a {type(state).__name__}, not a state dict of tensors")
    # unwrap DataParallel ("module.") and embedx FeatureExtractor ("net.") prefixes
    for prefix in ("module.", "net."):
        if state and all(k.startswith(prefix) for k in state):
            state = {k[len(prefix):]: v for k, v in state.items()}
    return state


# torchvision's DenseNet checkpoints use old key names ("norm.1"), see torchvision.models.densenet
_DENSENET_KEY = re.compile(
    r"^(.*denselayer\d+\.(?:norm|relu|conv))\.((?:[12])\.(?:weight|bias|running_mean|running_var))$"
)


def _load_weights(net: Any, state: dict[str, Any], *, spec: BackboneSpec, origin: str,
                  head_keys: set[str]) -> None:
    """Load ``state`` into the headless ``net``: every parameter must be covered.

    Keys of the removed classifier and aux heads (``head_keys``) are ignored; missing
    keys, keys of another architecture or shape mismatches are a ConfigError naming a
    few of them.
    """
    if spec.family == "densenet":
        state = {(_DENSENET_KEY.sub(r"\1\2", k)): v for k, v in state.items()}
    own = net.state_dict()
    mismatched = [
        f"{k} {tuple(v.shape)} vs model {tuple(own[k].shape)}"
        for k, v in state.items() if k in own and tuple(v.shape) != tuple(own[k].shape)
    ]
    # BatchNorm's num_batches_tracked is absent from older checkpoints and unused in eval
    missing = [k for k in own if k not in state and not k.endswith("num_batches_tracked")]
    foreign = [k for k in state if k not in own and k not in head_keys]
    if mismatched or missing or foreign:
        details = []
        if missing:
            details.append(f"{len(missing)} missing keys (e.g. {', '.join(missing[:3])})")
        if foreign:
            details.append(f"{len(foreign)} unexpected keys (e.g. {', '.join(foreign[:3])})")
        if mismatched:
            details.append(f"{len(mismatched)} shape mismatches (e.g. {'; '.join(mismatched[:2])})")
        raise ConfigError(
            f"weights from {origin} do not fit backbone {spec.name!r}: {' and '.join(details)}; "
            f"pass a state dict of a {spec.name} model (or of an embedx feature extractor)"
        )
    ignored = [k for k in state if k not in own]
    if ignored:
        logger.debug("ignoring %d classifier keys not used by the %s feature extractor (e.g. %s)",
                     len(ignored), spec.name, ignored[:3])
    net.load_state_dict({k: v for k, v in state.items() if k in own}, strict=False)  # checked above


# --------------------------------------------------------------------- feature models


def _build_net(spec: BackboneSpec, *, random_init: bool, member: str | None = None) -> Any:
    """The full classification model with its architecture settings, no weights loaded.

    ``member`` names the torchvision weights to be loaded, when they change the
    architecture (ViT SWAG weights use another image size, hence position embedding).
    """
    if spec.source == "efficientnet_lite":
        from efficientnet_lite_pytorch import EfficientNet

        return EfficientNet.from_name(spec.name.replace("efficientnet_", "efficientnet-"))
    from torchvision.models import get_model

    kwargs: dict[str, Any] = {}
    if spec.family in ("inception", "googlenet"):
        # transform_input=True as torchvision's pretrained config sets it, for every
        # weights choice, so that the graph does not depend on where the weights came from.
        # aux heads are dropped below; weight init only matters for random init.
        kwargs = {"transform_input": True, "aux_logits": True, "init_weights": random_init}
    if member is not None and spec.family == "vit":
        min_size = torchvision_members(spec)[member].meta.get("min_size", (224, 224))
        if min_size[0] != 224:
            kwargs["image_size"] = int(min_size[0])
    return get_model(spec.name, weights=None, **kwargs)


def _remove_head(net: Any, spec: BackboneSpec, layer: str) -> str:
    """Cut ``net`` down to ``layer`` in place; returns the FeatureExtractor mode."""
    family = spec.family
    if family in ("inception", "googlenet"):
        net.aux_logits = False
        if family == "inception":
            net.AuxLogits = None
        else:
            net.aux1 = net.aux2 = None
    if family in ("resnet", "regnet", "shufflenet", "inception", "googlenet"):
        net.fc = nn.Identity()
    elif family in ("densenet", "mobilenet_v2", "efficientnet", "mnasnet"):
        net.classifier = nn.Identity()
    elif family == "mobilenet_v3":
        net.classifier = net.classifier[:-1] if layer == "pre_logits" else nn.Identity()
    elif family in ("vgg", "alexnet"):
        if layer == "pool":
            net.avgpool = nn.Identity()
            net.classifier = nn.Identity()
            return "pool"
        # vgg: Linear ReLU Dropout Linear ReLU Dropout Linear; alexnet: Dropout first
        linear = [i for i, m in enumerate(net.classifier) if isinstance(m, nn.Linear)]
        stop = linear[1] if layer == "fc6" else linear[2]
        net.classifier = net.classifier[:stop]
    elif family == "squeezenet":
        net.classifier = nn.Identity()
        return "pool"
    elif family == "convnext":
        net.classifier[-1] = nn.Identity()  # keeps LayerNorm2d + Flatten
    elif family == "vit":
        net.heads = nn.Identity()
    elif family == "swin":
        net.head = nn.Identity()
    elif family == "maxvit":
        net.classifier[-1] = nn.Identity()  # keeps pool, LayerNorm, Linear, Tanh
    elif family == "efficientnet_lite":
        net._fc = nn.Identity()
        net._dropout = nn.Identity()
        return "lite"
    else:  # pragma: no cover - every registered family is handled above
        raise AssertionError(f"no head removal for family {family}")
    return "forward"


def build_feature_extractor(name: str, *, weights: str | Path | None = "DEFAULT",
                            layer: str | None = None) -> FeatureExtractor:
    """The headless backbone ``name`` as an ``nn.Module`` in eval mode.

    ``weights``: "DEFAULT" (pretrained, from ``$TORCH_HOME/hub/checkpoints`` or the
    EfficientNet-Lite package; WeightsNotFoundError when absent, never a download),
    "none" (random init seeded with ``RANDOM_INIT_SEED``), or a path to a state dict.
    The module maps NCHW float32 to (N, feature_dim) float32 and carries ``name``,
    ``family``, ``feature_layer``, ``feature_dim`` and ``weights_tag``.
    """
    spec = get_spec(name)
    layer = spec.check_layer(layer)
    choice = resolve_weights(spec, weights)
    state = _load_state_dict_file(choice.path) if choice.path is not None else None
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(RANDOM_INIT_SEED)
        net = _build_net(spec, random_init=choice.kind == "none", member=choice.member)
    full_keys = set(net.state_dict())
    mode = _remove_head(net, spec, layer)
    if state is not None:
        _load_weights(net, state, spec=spec, origin=str(choice.path),
                      head_keys=full_keys - set(net.state_dict()))
    extractor = FeatureExtractor(
        net, mode=mode, name=spec.name, feature_layer=layer, feature_dim=spec.dim_of(layer),
        family=spec.family,
    )
    extractor.weights_tag = choice.tag
    extractor.weights_arg = choice.arg
    return extractor.eval()


# ------------------------------------------------------------------ fine-tuning units


def _param_group(**members: Any) -> nn.Module:
    """One block made of existing modules/parameters (shared, not copied)."""
    group = nn.Module()
    for key, member in members.items():
        if isinstance(member, nn.Parameter):
            group.register_parameter(key, member)
        elif member is not None:
            group.add_module(key, member)
    return group


def _has_params(module: Any) -> bool:
    return any(True for _ in module.parameters())


def feature_blocks(model: nn.Module) -> list[nn.Module]:
    """The trainable units of a backbone, ordered from input to output.

    ``finetune --unfreeze N`` unfreezes the last N of them.  Accepts a FeatureExtractor
    (from ``build_feature_extractor``) or a bare torchvision/EfficientNet-Lite model.
    Only blocks with parameters are returned; unknown families fall back to the
    top-level children that have parameters.
    """
    net = getattr(model, "net", model)
    family = getattr(model, "family", None) or _guess_family(net)
    blocks: list[nn.Module]
    if family == "resnet":
        blocks = [_param_group(conv1=net.conv1, bn1=net.bn1), net.layer1, net.layer2, net.layer3, net.layer4]
    elif family == "regnet":
        blocks = [net.stem, *net.trunk_output.children()]
    elif family in ("vgg", "alexnet"):
        blocks = [*net.features.children(), *net.classifier.children()]
    elif family in ("densenet", "mobilenet_v2", "mobilenet_v3", "efficientnet", "convnext", "squeezenet"):
        blocks = [*net.features.children()]
        if family in ("mobilenet_v3", "convnext") and hasattr(net.classifier, "children"):
            blocks += [*net.classifier.children()]
    elif family == "mnasnet":
        blocks = [*net.layers.children()]
    elif family == "vit":
        blocks = [_param_group(conv_proj=net.conv_proj, class_token=net.class_token,
                               pos_embedding=net.encoder.pos_embedding),
                  *net.encoder.layers.children(), net.encoder.ln]
    elif family == "swin":
        blocks = [*net.features.children(), net.norm]
    elif family == "maxvit":
        blocks = [net.stem, *net.blocks.children(), net.classifier]
    elif family == "shufflenet":
        blocks = [net.conv1, net.stage2, net.stage3, net.stage4, net.conv5]
    elif family == "efficientnet_lite":
        blocks = [_param_group(conv_stem=net._conv_stem, bn0=net._bn0), *net._blocks,
                  _param_group(conv_head=net._conv_head, bn1=net._bn1)]
    else:  # inception, googlenet and anything unknown: top-level children in definition order
        blocks = list(net.children())
    return [block for block in blocks if _has_params(block)]


def _guess_family(net: Any) -> str:
    if hasattr(net, "_blocks") and hasattr(net, "_conv_stem"):
        return "efficientnet_lite"
    kind = type(net).__name__.lower()
    for family in ("resnet", "regnet", "vgg", "alexnet", "densenet", "mobilenetv2", "mobilenetv3",
                   "efficientnet", "convnext", "squeezenet", "mnasnet", "visiontransformer",
                   "swintransformer", "maxvit", "shufflenetv2"):
        if kind.startswith(family):
            return {"mobilenetv2": "mobilenet_v2", "mobilenetv3": "mobilenet_v3",
                    "visiontransformer": "vit", "swintransformer": "swin",
                    "shufflenetv2": "shufflenet"}.get(family, family)
    return "generic"
