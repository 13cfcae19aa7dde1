"""predict_files and `embedx predict` on tiny bundles (torch-free path)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from click.testing import CliRunner

from embedx import preprocess
from embedx.cli.main import cli
from embedx.errors import ConfigError, OnnxModelError
from embedx.predict import expand_sources, load_model, predict_files
from tests.bundle_fixtures import CLASSES, SPEC, make_bundle, tiny_backbone, write_images


@pytest.fixture(scope="module")
def bundle_path(tmp_path_factory) -> Path:
    return make_bundle(tmp_path_factory.mktemp("bundle") / "model.onnx")


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("images")
    write_images(folder / "a", 3, seed=1)
    write_images(folder / "b", 2, seed=2)
    (folder / "b" / "notes.txt").write_text("not an image")
    (folder / "b" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 40)
    return folder


def reference(model_path: Path, path: Path) -> np.ndarray:
    """Probabilities computed by hand: ORT on the preprocessed image."""
    model = load_model(model_path, device="cpu")
    return model.predict_proba(preprocess.load(path, SPEC)[None])[0]


def test_predict_files_ranks_every_image_and_reports_broken_ones(bundle_path, images):
    rows = list(predict_files([images], model=bundle_path, top_k=2, batch_size=2, device="cpu"))
    paths = [Path(row["path"]) for row in rows]
    assert paths == expand_sources([images])
    assert "notes.txt" not in {p.name for p in paths}  # not an image name
    by_name = {Path(row["path"]).name: row for row in rows}
    assert "error" in by_name["broken.png"] and "top_k" not in by_name["broken.png"]
    good = [row for row in rows if "top_k" in row]
    assert len(good) == 5
    for row in good:
        probabilities = reference(bundle_path, Path(row["path"]))
        order = np.argsort(-probabilities)[:2]
        assert [c["label"] for c in row["top_k"]] == [CLASSES[i] for i in order]
        assert [c["probability"] for c in row["top_k"]] == pytest.approx(probabilities[order].tolist(), abs=1e-6)


def test_batch_size_does_not_change_answers(bundle_path, images):
    one = list(predict_files([images], model=bundle_path, batch_size=1, device="cpu"))
    many = list(predict_files([images], model=bundle_path, batch_size=64, device="cpu"))
    assert [r.get("top_k") and [c["label"] for c in r["top_k"]] for r in one] == [
        r.get("top_k") and [c["label"] for c in r["top_k"]] for r in many
    ]
    for a, b in zip(one, many, strict=True):
        if "top_k" in a:
            assert [c["probability"] for c in a["top_k"]] == pytest.approx([c["probability"] for c in b["top_k"]],
                                                                            abs=1e-6)


def test_top_k_is_capped_at_the_number_of_classes(bundle_path, images):
    (row,) = predict_files([images / "a" / "img_0.png"], model=bundle_path, top_k=50, device="cpu")
    assert sorted(c["label"] for c in row["top_k"]) == sorted(CLASSES)
    assert sum(c["probability"] for c in row["top_k"]) == pytest.approx(1.0, abs=1e-5)


def test_uint8_bundle_gives_the_same_answers(bundle_path, images, tmp_path):
    u8 = load_model(make_bundle(tmp_path / "u8.onnx", with_preprocess=True), device="cpu")
    assert u8.input_format == "uint8_nhwc" and u8.input_name == "image"
    float_model = load_model(bundle_path, device="cpu")
    files = sorted((images / "a").iterdir())
    pixels = np.stack([u8.prepare(f) for f in files])
    assert pixels.dtype == np.uint8 and pixels.shape == (3, 16, 16, 3)
    floats = np.stack([float_model.prepare(f) for f in files])
    np.testing.assert_allclose(u8.predict_proba(pixels), float_model.predict_proba(floats), atol=1e-6)


def test_a_fixed_batch_bundle_runs_any_number_of_images(bundle_path, images, tmp_path):
    fixed = make_bundle(tmp_path / "fixed.onnx", batch=2)
    assert load_model(fixed, device="cpu").fixed_batch == 2
    assert load_model(bundle_path, device="cpu").fixed_batch is None
    ours = list(predict_files([images], model=fixed, batch_size=5, device="cpu"))  # chunks of 2, last padded
    theirs = list(predict_files([images], model=bundle_path, batch_size=5, device="cpu"))
    assert ours == theirs or all(
        a.get("error") == b.get("error")
        and [c["label"] for c in a.get("top_k", [])] == [c["label"] for c in b.get("top_k", [])]
        for a, b in zip(ours, theirs, strict=True)
    )


def test_model_must_be_a_bundle(tmp_path):
    backbone = tmp_path / "backbone.onnx"
    onnx.save(tiny_backbone(), backbone)
    with pytest.raises(OnnxModelError, match="backbone export"):
        load_model(backbone)
    bare = tiny_backbone()
    del bare.metadata_props[:]
    onnx.save(bare, tmp_path / "bare.onnx")
    with pytest.raises(OnnxModelError, match="lacks embedx metadata"):
        load_model(tmp_path / "bare.onnx")
    with pytest.raises(OnnxModelError, match="does not exist"):
        load_model(tmp_path / "missing.onnx")


def test_exactly_one_of_model_or_head(bundle_path, images):
    with pytest.raises(ConfigError):
        list(predict_files([images], device="cpu"))
    with pytest.raises(ConfigError):
        list(predict_files([images], model=bundle_path, head=images, device="cpu"))


def test_predict_with_a_bundle_imports_only_onnxruntime_numpy_pillow(bundle_path, images):
    code = (
        "import sys, json\n"
        "from embedx.predict import predict_files\n"
        f"rows = list(predict_files([{str(images)!r}], model={str(bundle_path)!r}, device='cpu'))\n"
        "assert len(rows) == 6, rows\n"
        "heavy = ('torch', 'torchvision', 'h5py', 'sklearn', 'scipy', 'onnx', 'matplotlib', 'safetensors')\n"
        "print(json.dumps([m for m in heavy if m in sys.modules]))\n"
        "assert 'onnxruntime' in sys.modules\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                            env={**os.environ, "PYTHONWARNINGS": "ignore"})
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout.strip().splitlines()[-1]) == []


def test_cli_predict_json_lines(bundle_path, images):
    result = CliRunner().invoke(cli, ["predict", "--model", str(bundle_path), str(images / "a"),
                                      str(images / "b" / "broken.png"), "-k", "1", "--json", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    rows = [json.loads(line) for line in result.stdout.splitlines()]
    assert len(rows) == 4
    assert all(len(row["top_k"]) == 1 for row in rows[:3])
    assert rows[3]["path"].endswith("broken.png") and "error" in rows[3]
    assert "1 image(s) could not be read" in result.stderr


def test_cli_predict_table(bundle_path, images):
    result = CliRunner().invoke(cli, ["predict", "--model", str(bundle_path), str(images / "a" / "img_0.png")])
    assert result.exit_code == 0, result.output
    path, ranked = result.stdout.strip().split("\t")
    assert path.endswith("img_0.png")
    assert len(ranked.split(", ")) == 3 and ranked.split()[0] in CLASSES


def test_cli_predict_needs_one_model_source(bundle_path, images):
    runner = CliRunner()
    neither = runner.invoke(cli, ["predict", str(images)])
    assert neither.exit_code == 2 and "exactly one of --model or --head" in neither.output
    both = runner.invoke(cli, ["predict", "--model", str(bundle_path), "--head", str(images), str(images)])
    assert both.exit_code == 2


def test_cli_predict_bad_model_is_one_line_error(tmp_path, images):
    onnx.save(tiny_backbone(), tmp_path / "backbone.onnx")
    result = CliRunner().invoke(cli, ["predict", "--model", str(tmp_path / "backbone.onnx"), str(images)])
    assert result.exit_code == 1
    assert result.stderr.startswith("error: ") and "embedx bundle" in result.stderr


@pytest.mark.gpu
@pytest.mark.parametrize("with_preprocess", [False, True], ids=["float_nchw", "uint8_nhwc"])
def test_bundle_on_the_gpu_agrees_with_the_cpu(with_preprocess, images, tmp_path):
    from embedx import runtime

    if not runtime.gpu_available():
        pytest.skip("no NVIDIA GPU with a CUDA driver on this machine")
    path = make_bundle(tmp_path / "model.onnx", with_preprocess=with_preprocess)
    gpu = load_model(path, device="cuda")
    assert gpu.providers[0] == "CUDAExecutionProvider"
    cpu = load_model(path, device="cpu")
    files = sorted((images / "a").iterdir())
    batch = np.stack([cpu.prepare(f) for f in files])
    np.testing.assert_allclose(gpu.predict_proba(batch), cpu.predict_proba(batch), atol=1e-4)


# ------------------------------------------------------------------- one walker with extract, one line per image


def test_expand_sources_walks_folders_like_extract_and_lists_what_it_skips(tmp_path):
    from embedx.data import discover

    write_images(tmp_path / "cls", 2, seed=3)
    first, second = sorted((tmp_path / "cls").iterdir())
    (tmp_path / "cls" / ".hidden.png").write_bytes(first.read_bytes())
    (tmp_path / "cls" / "notes.txt").write_text("not an image")
    (tmp_path / "cls" / "linked.png").symlink_to(second)
    (tmp_path / "cls" / "dangling.png").symlink_to(tmp_path / "nowhere.png")
    (tmp_path / "cls" / "loop").symlink_to("..")
    paths = expand_sources([tmp_path])
    assert [p.name for p in paths] == [item.path.name for item in discover(tmp_path).items]
    assert ".hidden.png" not in {p.name for p in paths} and "linked.png" in {p.name for p in paths}
    skipped: list[tuple[str, str]] = []
    assert expand_sources([tmp_path], skipped=skipped) == paths
    assert {Path(name).name: reason for name, reason in skipped} == {
        "notes.txt": "not an image file extension Pillow can open", "dangling.png": "broken symlink",
        "loop": "symlink loop: links back to a folder that contains it"}


def test_cli_predict_reports_skipped_files_and_escapes_newlines(bundle_path, tmp_path):
    folder = tmp_path / "imgs"
    (image,) = write_images(folder, 1, seed=4)
    image.rename(folder / "two\nlines.png")
    (folder / "readme.md").write_text("hello")
    result = CliRunner().invoke(cli, ["predict", "--model", str(bundle_path), str(folder), "-k", "1"])
    assert result.exit_code == 0, result.output
    (line,) = result.stdout.splitlines()
    assert line.startswith(f"{folder}/two\\nlines.png\t")
    assert f"skipped {folder / 'readme.md'}: not an image file extension" in result.stderr


def test_cli_predict_csv_has_a_header_and_quotes_awkward_paths(bundle_path, tmp_path):
    import csv
    import io

    folder = tmp_path / "imgs"
    first, second = write_images(folder, 2, seed=5)
    awkward = first.rename(folder / 'a, "quoted"\nname.png')
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 40)
    result = CliRunner().invoke(cli, ["predict", "--model", str(bundle_path), str(folder), "-k", "2",
                                      "--format", "csv", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    rows = list(csv.DictReader(io.StringIO(result.stdout)))
    assert list(rows[0]) == ["path", "label_1", "probability_1", "label_2", "probability_2", "error"]
    by_path = {row["path"]: row for row in rows}
    assert set(by_path) == {str(awkward), str(second), str(folder / "broken.png")}
    expected = reference(bundle_path, awkward)
    row = by_path[str(awkward)]
    assert row["label_1"] == CLASSES[int(np.argmax(expected))] and row["error"] == ""
    assert float(row["probability_1"]) == pytest.approx(float(expected.max()), abs=1e-5)
    assert float(row["probability_1"]) >= float(row["probability_2"])
    broken = by_path[str(folder / "broken.png")]
    assert broken["error"] and broken["label_1"] == "" and broken["probability_2"] == ""


def test_cli_predict_format_jsonl_equals_json_and_text_is_the_default(bundle_path, images):
    runner = CliRunner()
    args = ["predict", "--model", str(bundle_path), str(images / "a"), "-k", "2", "--device", "cpu"]
    jsonl = runner.invoke(cli, [*args, "--format", "jsonl"])
    assert jsonl.exit_code == 0 and jsonl.stdout == runner.invoke(cli, [*args, "--json"]).stdout
    assert len([json.loads(line) for line in jsonl.stdout.splitlines()]) == 3
    assert runner.invoke(cli, args).stdout == runner.invoke(cli, [*args, "--format", "text"]).stdout
    assert runner.invoke(cli, [*args, "--json", "--format", "csv"]).exit_code == 2
