"""Untrusted artifacts (issue 15): a malformed head directory or bundle is one error line, never a traceback.

Each variant the red team tried on head.json is replayed through `embedx evaluate`, `embedx predict --head`
and `embedx bundle`: exit 1 and one `error:` line.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
from click.testing import CliRunner

from embedx.cli.main import cli
from embedx.fsio import sha256_file
from tests.bundle_fixtures import SPEC, tiny_backbone, write_images
from tests.test_heads import write_cache

FEATURE_DIM = 8


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> dict[str, Path]:
    """A head fitted by `embedx fit-head` on an 8-d cache, whose head.json points at a tiny backbone ONNX."""
    root = tmp_path_factory.mktemp("untrusted")
    rng = np.random.default_rng(0)
    y = np.arange(80) % 2
    X = (rng.normal(size=(80, FEATURE_DIM)) + y[:, None]).astype(np.float32)
    cache = write_cache(root / "feats.h5", X, y, ["train"] * 60 + ["val"] * 20, ["ants", "bees"])
    result = CliRunner().invoke(cli, ["fit-head", "--cache", str(cache), "-o", str(root / "head"), "--json"])
    assert result.exit_code == 0, result.output
    backbone = root / "backbone.onnx"
    onnx.save(tiny_backbone(feature_dim=FEATURE_DIM), backbone)
    head_json = root / "head" / "head.json"
    fields = json.loads(head_json.read_text())
    fields["cache"].update(onnx_path=str(backbone), onnx_sha256=sha256_file(backbone), preprocess=SPEC.to_dict())
    head_json.write_text(json.dumps(fields))
    images = root / "images"
    write_images(images, 2)
    return {"root": root, "head": root / "head", "cache": cache, "images": images}


def _set(**changes):
    def mutate(fields: dict, head: Path) -> dict:
        return {**fields, **changes}
    return mutate


def _drop(name):
    def mutate(fields: dict, head: Path) -> dict:
        return {k: v for k, v in fields.items() if k != name}
    return mutate


def _preprocess(**changes):
    def mutate(fields: dict, head: Path) -> dict:
        fields["cache"]["preprocess"] = {**fields["cache"]["preprocess"], **changes}
        return fields
    return mutate


def _text(text: str):
    def mutate(fields: dict, head: Path) -> str:
        return text
    return mutate


def _nan_temperature(fields: dict, head: Path) -> str:
    return json.dumps({**fields, "temperature": float("nan")})  # json.dumps writes a bare NaN


def _deep(fields: dict, head: Path) -> str:
    return json.dumps({**fields, "params": "HOLE"}).replace('"HOLE"', "[" * 100_000 + "]" * 100_000)


def _weights(change):
    def mutate(fields: dict, head: Path) -> dict:
        from safetensors.numpy import load_file, save_file

        arrays = load_file(str(head / "weights.safetensors"))
        change(arrays)
        save_file(arrays, str(head / "weights.safetensors"))
        return fields
    return mutate


def _nan_weight(arrays):
    arrays["weight"][0, 0] = np.nan


def _narrow_weight(arrays):
    arrays["weight"] = np.ascontiguousarray(arrays["weight"][:5])


def _outside(fields: dict, head: Path) -> dict:
    outside = head.parent / "outside"
    outside.mkdir()
    shutil.copy(head / "weights.safetensors", outside / "w.safetensors")
    return {**fields, "weights_file": "../outside/w.safetensors"}


def _symlink_out(fields: dict, head: Path) -> dict:
    outside = head.parent / "elsewhere.safetensors"
    shutil.move(head / "weights.safetensors", outside)
    (head / "weights.safetensors").symlink_to(outside)
    return fields


VARIANTS = {
    "classes as a dict": (_set(classes={"ants": 0, "bees": 1}), "'classes' must be a non-empty list"),
    "classes missing": (_drop("classes"), "'classes' must be a non-empty list"),
    "duplicate classes": (_set(classes=["ants", "ants"]), "unique class names"),
    "feature_dim 'abc'": (_set(feature_dim="abc"), "'feature_dim' must be a positive integer"),
    "feature_dim 10**9": (_set(feature_dim=10**9), "'feature_dim' must be a positive integer of at most"),
    "unknown init_params key": (_set(init_params={"bogus": 1}), "init_params .* do not fit"),
    "JSON nested 100,000 deep": (_deep, "nested 100001 levels deep"),
    "top-level list": (_text("[1, 2]"), "JSON list, not an object"),
    "not JSON": (_text("{\"schema_version\": 1,"), "not valid JSON"),
    "preprocess size 0": (_preprocess(input_size=0), "cache.preprocess is not a valid preprocessing spec"),
    "preprocess size 100000": (_preprocess(input_size=100_000, resize_size=100_000),
                               "cache.preprocess is not a valid preprocessing spec"),
    "preprocess size 'big'": (_preprocess(input_size="big"), "cache.preprocess is not a valid preprocessing spec"),
    "temperature 'hot'": (_set(temperature="hot"), "'temperature' must be a positive number"),
    "temperature 0": (_set(temperature=0), "'temperature' must be a positive number"),
    "temperature NaN": (_nan_temperature, "not valid JSON .*NaN is not a JSON number"),
    "temperature 1e400": (_set(temperature=10**400), "'temperature' must be a finite number"),
    "NaN weights": (_weights(_nan_weight), "array 'weight' holds NaN"),
    "weights_file ../outside": (_outside, "'weights_file' must be a file name in the head directory"),
    "weights symlink out of the head": (_symlink_out, "outside the head directory"),
    "200,000 classes vs 2 weight columns": (_set(classes=[f"c{i}" for i in range(200_000)]), "200000 classes"),
    "weights shape mismatch": (_weights(_narrow_weight), "does not fit head.json"),
}
#: the commands that read each part of a head directory (evaluate does not use the preprocessing)
PREPROCESS_VARIANTS = {name for name in VARIANTS if name.startswith("preprocess")}


def _broken_head(setup, tmp_path: Path, variant: str) -> Path:
    head = tmp_path / "head"
    shutil.copytree(setup["head"], head)
    mutate, _ = VARIANTS[variant]
    result = mutate(json.loads((head / "head.json").read_text()), head)
    (head / "head.json").write_text(result if isinstance(result, str) else json.dumps(result))
    return head


def _command(name: str, setup, head: Path, tmp_path: Path) -> list[str]:
    return {
        "evaluate": ["evaluate", "--head", str(head), "--cache", str(setup["cache"])],
        "predict": ["predict", "--head", str(head), str(setup["images"]), "--device", "cpu"],
        "bundle": ["bundle", "--head", str(head), "-o", str(tmp_path / "model.onnx")],
    }[name]


@pytest.mark.parametrize("command", ["evaluate", "predict", "bundle"])
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_a_malformed_head_directory_is_one_error_line(setup, tmp_path, variant, command):
    if command == "evaluate" and variant in PREPROCESS_VARIANTS:
        pytest.skip("evaluate reads features from a cache, not images: it does not use the preprocessing")
    head = _broken_head(setup, tmp_path, variant)
    result = CliRunner().invoke(cli, _command(command, setup, head, tmp_path))
    assert result.exit_code == 1, (result.output, result.exception)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert "Traceback" not in result.output and "NaN" not in result.stdout
    import re

    assert re.search(VARIANTS[variant][1], lines[0]), lines[0]


@pytest.mark.parametrize("command", ["evaluate", "predict", "bundle"])
def test_the_unmodified_head_works_with_each_command(setup, tmp_path, command):
    result = CliRunner().invoke(cli, _command(command, setup, setup["head"], tmp_path))
    assert result.exit_code == 0, result.output


# -- bundle metadata: predict --model and serve-onnx --------------------------------------

DEEP = "[" * 100_000 + "]" * 100_000
BUNDLE_VARIANTS = {
    "classes as a dict": ({"classes": '{"cat": 0}'}, "embedx.classes must be a non-empty list"),
    "classes missing": ({"classes": None}, "lacks embedx metadata"),
    "duplicate classes": ({"classes": '["cat", "cat", "dog"]'}, "unique class names"),
    "classes not JSON": ({"classes": '["cat",'}, "embedx.classes is not valid JSON"),
    "classes NaN": ({"classes": '["cat", NaN, "dog"]'}, "embedx.classes is not valid JSON"),
    "classes nested 100,000 deep": ({"classes": DEEP}, "nested 100000 levels deep"),
    "200,000 classes vs 3 outputs": ({"classes": json.dumps([f"c{i}" for i in range(200_000)])},
                                     "outputs 3 probabilities per image but .* lists 200000 classes"),
    "preprocess size 0": ({"preprocess": json.dumps({**SPEC.to_dict(), "input_size": 0})},
                          "embedx.preprocess is not a valid preprocessing spec"),
    "preprocess size 100000": ({"preprocess": json.dumps({**SPEC.to_dict(), "input_size": 100_000,
                                                          "resize_size": 100_000})},
                               "embedx.preprocess is not a valid preprocessing spec"),
    "preprocess a list": ({"preprocess": "[16, 20]"}, "embedx.preprocess is not a valid preprocessing spec"),
    "preprocess nested deep": ({"preprocess": DEEP}, "nested 100000 levels deep"),
    "input_format unknown": ({"input_format": "float_nhwc"}, "embedx.input_format is 'float_nhwc'"),
    "feature_dim 'abc'": ({"feature_dim": "abc"}, "embedx.feature_dim must be a positive integer"),
    "feature_dim 5,000 digits": ({"feature_dim": "1" * 5000}, "embedx.feature_dim must be a positive integer"),
    "temperature nan": ({"temperature": "nan"}, "embedx.temperature must be a finite positive number"),
    "head nested deep": ({"head": DEEP}, "embedx.head is nested 100000 levels deep"),
}


@pytest.fixture(scope="module")
def bundle_path(tmp_path_factory) -> Path:
    from tests.bundle_fixtures import make_bundle

    return make_bundle(tmp_path_factory.mktemp("bundle") / "model.onnx")


def _broken_bundle(bundle_path: Path, tmp_path: Path, variant: str) -> Path:
    from embedx import onnxmeta

    model = onnx.load(str(bundle_path))
    changes, _ = BUNDLE_VARIANTS[variant]
    for key, value in changes.items():
        if value is None:
            kept = [p for p in model.metadata_props if p.key != onnxmeta.PREFIX + key]
            del model.metadata_props[:]
            model.metadata_props.extend(kept)
        else:
            onnxmeta.write(model, {key: value})
    path = tmp_path / "broken.onnx"
    onnx.save(model, path)
    return path


@pytest.mark.parametrize("command", ["predict", "serve-onnx"])
@pytest.mark.parametrize("variant", list(BUNDLE_VARIANTS))
def test_a_bundle_with_malformed_metadata_is_one_error_line(bundle_path, setup, tmp_path, variant, command,
                                                           monkeypatch):
    import re

    import uvicorn

    def no_serving(self):  # a model that loads must not start serving: fail at once instead
        raise RuntimeError("serve-onnx loaded the model and would serve it")

    monkeypatch.setattr(uvicorn.Server, "run", no_serving)
    path = _broken_bundle(bundle_path, tmp_path, variant)
    args = (["predict", "--model", str(path), str(setup["images"]), "--device", "cpu"] if command == "predict"
            else ["serve-onnx", str(path), "--port", "0", "--device", "cpu"])
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 1, (result.output, result.exception)
    lines = [line for line in result.stderr.strip().splitlines() if not line.startswith("serving ")]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert re.search(BUNDLE_VARIANTS[variant][1], lines[0]), lines[0]


def test_the_unmodified_bundle_predicts(bundle_path, setup):
    result = CliRunner().invoke(cli, ["predict", "--model", str(bundle_path), str(setup["images"]), "--json"])
    assert result.exit_code == 0, result.output


# -- the server: finite options, JSON limits, readiness ----------------------------------


@pytest.mark.parametrize(("args", "value"), [
    (["serve-onnx", "{bundle}", "--max-body-mb"], "nan"),
    (["serve-onnx", "{bundle}", "--max-body-mb"], "inf"),
    (["serve-onnx", "{bundle}", "--timeout-s"], "nan"),
    (["serve-onnx", "{bundle}", "--timeout-s"], "inf"),
    (["serve-onnx", "{bundle}", "--max-delay-ms"], "nan"),
    (["fit-head", "--cache", "{missing}", "--label-smoothing"], "nan"),
    (["extract", "{missing}", "--val-fraction"], "nan"),
    (["finetune", "{data}", "--lr"], "nan"),
    (["finetune", "{data}", "--lr"], "inf"),
    (["finetune", "{data}", "--warmup-epochs"], "inf"),
])
def test_float_options_refuse_nan_and_inf(bundle_path, setup, tmp_path, monkeypatch, args, value):
    import uvicorn

    def no_serving(self):
        raise RuntimeError("serve-onnx accepted the option and would serve")

    monkeypatch.setattr(uvicorn.Server, "run", no_serving)
    paths = {"bundle": str(bundle_path), "missing": str(tmp_path / "missing"), "data": str(setup["images"])}
    result = CliRunner().invoke(cli, [arg.format(**paths) for arg in args] + [value])
    assert result.exit_code == 2, (result.output, result.exception)
    assert "is not a finite number" in result.stderr


@pytest.mark.parametrize("option", ["max_body_mb", "timeout_s", "max_delay_ms"])
@pytest.mark.parametrize("value", [float("nan"), float("inf"), "10"])
def test_serve_config_refuses_non_finite_numbers(option, value):
    from embedx.errors import ConfigError
    from embedx.serve.app import ServeConfig

    with pytest.raises(ConfigError, match=f"{option} must be a finite number"):
        ServeConfig(**{option: value})


def _serve(bundle_path: Path, scenario, **options):
    from embedx.serve import create_app
    from tests.test_serve import in_process

    async def ready_then(client, start):
        from tests.test_serve import _wait_ready

        await start()
        await _wait_ready(client)
        return await scenario(client)

    return in_process(create_app(bundle_path, device="cpu", **options), ready_then)


def test_a_deeply_nested_json_body_is_400_not_500(bundle_path):
    async def scenario(client):
        answers = []
        for body in ('{"images": ' + "[" * 50_000 + "]" * 50_000 + "}", "[" * 100_000, '{"image": NaN}'):
            answers.append(await client.post("/v1/predict", content=body,
                                             headers={"content-type": "application/json"}))
        return answers

    for answer in _serve(bundle_path, scenario):
        assert answer.status_code == 400, answer.text
        assert answer.json()["error"] == "bad json"


def test_readiness_turns_off_when_the_server_starts_draining(bundle_path):
    from embedx.serve import create_app
    from tests.test_serve import _wait_ready, in_process

    app = create_app(bundle_path, device="cpu")

    async def scenario(client, start):
        await start()
        await _wait_ready(client)
        return (await client.get("/health/ready")).status_code

    assert in_process(app, scenario) == 200
    assert app.state.server.ready is False  # the lifespan has ended: draining, not ready


@pytest.mark.parametrize("label", [-1, 3])
def test_knn_bank_labels_outside_the_classes_are_refused(tmp_path, label):
    from safetensors.numpy import load_file, save_file

    from embedx.errors import HeadError
    from embedx.heads import load_head, make_head

    rng = np.random.default_rng(0)
    X, y = rng.normal(size=(30, 4)).astype(np.float32), np.arange(30) % 3
    make_head("knn", k=3).fit(X, y).save(tmp_path / "h")
    load_head(tmp_path / "h")  # the untampered head loads
    weights = tmp_path / "h" / json.loads((tmp_path / "h" / "head.json").read_text())["weights_file"]
    arrays = load_file(str(weights))
    arrays["bank_labels"][0] = label
    save_file(arrays, str(weights))
    with pytest.raises(HeadError, match="bank labels lie outside its 3 classes"):
        load_head(tmp_path / "h")
