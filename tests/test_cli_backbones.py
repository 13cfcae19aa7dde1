"""`embedx backbones` and `embedx export` through click's CliRunner: output and exit codes."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from embedx.cli.main import cli

pytest.importorskip("torch")


@pytest.fixture
def runner():
    return CliRunner()


def test_backbones_table(runner):
    result = runner.invoke(cli, ["backbones"])
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert lines[0].split()[:4] == ["name", "dim", "layer", "input"]
    rows = {line.split()[0]: line.split() for line in lines[1:]}
    assert rows["resnet18"][1] == "512"
    assert rows["inception_v3"][3] == "299"
    assert rows["efficientnet_lite0"][1] == "1280"


def test_backbones_json(runner, tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    result = runner.invoke(cli, ["backbones", "--json"])
    assert result.exit_code == 0, result.output
    rows = json.loads(result.stdout)
    assert len(rows) >= 35
    by_name = {row["name"]: row for row in rows}
    vgg = by_name["vgg16"]
    assert vgg["feature_dim"] == 4096 and vgg["layers"] == ["fc7", "fc6", "pool"]
    assert vgg["preprocess"]["resize_size"] == 256 and vgg["preprocess"]["mean"][0] == pytest.approx(0.485)
    assert vgg["weights"]["available"] is False
    assert vgg["weights"]["searched"] == str(tmp_path / "hub" / "checkpoints")


def test_export_json_then_cached(runner, tmp_path):
    args = ["export", "--backbone", "squeezenet1_1", "--weights", "none", "--json"]
    first = runner.invoke(cli, args)
    assert first.exit_code == 0, first.output
    data = json.loads(first.stdout)
    assert data["feature_dim"] == 512 and data["cached"] is False
    assert data["parity"]["max_rel_error"] <= 1e-4
    second = runner.invoke(cli, [*args, "-o", str(tmp_path / "sq.onnx")])
    assert second.exit_code == 0, second.output
    again = json.loads(second.stdout)
    assert again["cached"] is True and again["path"] == str(tmp_path / "sq.onnx")
    assert (tmp_path / "sq.onnx").is_file()


def test_export_human_output(runner):
    result = runner.invoke(cli, ["export", "-b", "squeezenet1_1", "--weights", "none"])
    assert result.exit_code == 0, result.output
    keys = [line.split()[0] for line in result.stdout.splitlines()]
    assert {"path", "fingerprint", "parity", "seconds", "size", "cached"} <= set(keys)
    assert "max rel" in result.stdout


def test_unknown_backbone_exits_1(runner):
    result = runner.invoke(cli, ["export", "--backbone", "resnet19"])
    assert result.exit_code == 1
    assert "unknown backbone" in result.stderr and "resnet18" in result.stderr


def test_missing_weights_exits_1(runner, tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    result = runner.invoke(cli, ["export", "--backbone", "resnet18"])
    assert result.exit_code == 1
    assert "resnet18-f37072fd.pth" in result.stderr and str(tmp_path) in result.stderr
    assert result.stderr.count("\n") <= 2  # one clear line, no traceback


def test_bad_layer_exits_1(runner):
    result = runner.invoke(cli, ["export", "--backbone", "vgg11", "--weights", "none", "--layer", "fc8"])
    assert result.exit_code == 1 and "fc7, fc6, pool" in result.stderr


def test_unreadable_onnx_exits_1(runner, tmp_path):
    bad = tmp_path / "broken.onnx"
    bad.write_text("definitely not a model")
    result = runner.invoke(cli, ["export", "--backbone", str(bad)])
    assert result.exit_code == 1 and "broken.onnx" in result.stderr
    missing = runner.invoke(cli, ["export", "--backbone", str(tmp_path / "missing.onnx")])
    assert missing.exit_code == 1 and "no ONNX file" in missing.stderr


def test_bad_options_exit_2(runner, tmp_path):
    assert runner.invoke(cli, ["export"]).exit_code == 2  # --backbone is required
    assert runner.invoke(cli, ["export", "-b", "resnet18", "--opset", "5"]).exit_code == 2
    assert runner.invoke(cli, ["backbones", "--bogus"]).exit_code == 2
    onnx_path = tmp_path / "m.onnx"
    onnx_path.write_text("x")
    assert runner.invoke(cli, ["export", "-b", str(onnx_path), "--weights", "none"]).exit_code == 2


def test_onnx_layer_auto(runner, mobilenet_int8_onnx):
    result = runner.invoke(cli, ["export", "-b", str(mobilenet_int8_onnx), "--layer", "auto", "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["feature_dim"] == 1280 and data["backbone"] == "onnx:mobilenetv2-12-int8.onnx"
