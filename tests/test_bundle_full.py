"""Bundles with ``--with-preprocess full``: resize and centre crop in the graph, decoded images of any size."""

from __future__ import annotations

import base64
import dataclasses
import io
import json

import httpx
import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from PIL import Image

from embedx import onnxmeta
from embedx.bundle import compose
from embedx.cli.main import cli
from embedx.errors import ConfigError
from embedx.predict import load_model, predict_files
from tests.bundle_fixtures import CLASSES, SPEC, make_bundle, tiny_backbone, tiny_head
from tests.test_serve import Server

SIZES = [(40, 30), (30, 40), (64, 64), (23, 57), (200, 120), (20, 20), (21, 300)]
#: Measured on these images: exact-mode bundles agree to 3.7e-4 (onnxruntime's uint8 antialiased Resize is a
#: port of Pillow's), fast-mode ones to 5e-7 (the graph does OpenCV's fixed-point blur and resize).
TOLERANCE = {"exact": 1e-3, "fast": 1e-3}


def encoded(size: tuple[int, int], fmt: str, seed: int) -> bytes:
    """A smooth-ish image (noise upsampled) of ``size``, as PNG or JPEG bytes."""
    rng = np.random.default_rng(seed)
    small = np.clip(rng.integers(0, 256, 3) + rng.normal(0, 60, (max(size[1] // 4, 1), max(size[0] // 4, 1), 3)),
                    0, 255).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(small).resize(size, Image.BILINEAR).save(buffer, format=fmt)
    return buffer.getvalue()


@pytest.fixture(scope="module", params=[("exact", "bilinear"), ("fast", "bilinear"), ("exact", "bicubic"),
                                        ("fast", "bicubic")], ids=lambda p: "-".join(p))
def pair(request, tmp_path_factory):
    """(mode, the existing float bundle, the full-preprocess bundle) for one preprocessing mode and filter."""
    mode, interpolation = request.param
    folder = tmp_path_factory.mktemp(f"full-{mode}-{interpolation}")
    spec = dataclasses.replace(SPEC, mode=mode, interpolation=interpolation)
    return (mode, make_bundle(folder / "plain.onnx", spec=spec),
            make_bundle(folder / "full.onnx", spec=spec, with_preprocess="full"))


def test_full_bundle_agrees_with_the_existing_path_on_images_of_several_sizes(pair):
    mode, plain_path, full_path = pair
    plain, full = load_model(plain_path, device="cpu"), load_model(full_path, device="cpu")
    for seed, size in enumerate(SIZES):
        for fmt in ("PNG", "JPEG"):
            data = encoded(size, fmt, seed)
            pixels = full.prepare(data)
            assert pixels.dtype == np.uint8 and pixels.shape[2] == 3
            if fmt == "PNG":  # decoded, not resized (a large JPEG is decoded at a reduced DCT scale, as always)
                assert pixels.shape == (size[1], size[0], 3)
            expected = plain.predict_proba(plain.prepare(data)[None])[0]
            got = full.predict_proba(pixels[None])[0]
            assert np.abs(got - expected).max() <= TOLERANCE[mode], (size, fmt)


def test_full_bundle_metadata_and_graph(pair):
    mode, _, full_path = pair
    model = onnx.load(str(full_path))
    meta = onnxmeta.from_proto(model)
    assert meta["input_format"] == "uint8_nhwc_full" and meta["kind"] == "bundle"
    assert max(e.version for e in model.opset_import if e.domain in ("", "ai.onnx")) >= 18
    (image,) = model.graph.input
    dims = [d.dim_param or d.dim_value for d in image.type.tensor_type.shape.dim]
    assert image.name == "image" and dims[1:] == ["H", "W", 3]
    assert image.type.tensor_type.elem_type == onnx.TensorProto.UINT8
    ops = [n.op_type for n in model.graph.node if n.name.startswith("preprocess/")]
    if mode == "exact":  # one antialiased Resize
        (resize,) = [n for n in model.graph.node if n.op_type == "Resize"]
        assert onnx.helper.get_attribute_value(next(a for a in resize.attribute if a.name == "antialias")) == 1
        assert "Conv" not in ops
    else:  # OpenCV's path: a blur per axis, then the bilinear taps gathered (bicubic: a Resize)
        bilinear = load_model(full_path, device="cpu").spec.interpolation == "bilinear"
        assert ops.count("Conv") == 2 and ("Gather" in ops) == bilinear and ("Resize" in ops) != bilinear


def test_predict_files_runs_a_full_bundle_on_mixed_sizes_in_one_batch(pair, tmp_path):
    mode, plain_path, full_path = pair
    for seed, size in enumerate(SIZES):
        (tmp_path / f"img_{seed}.png").write_bytes(encoded(size, "PNG", seed))
    rows = list(predict_files([tmp_path], model=full_path, top_k=3, batch_size=len(SIZES), device="cpu"))
    expected = {row["path"]: row for row in predict_files([tmp_path], model=plain_path, top_k=3, device="cpu")}
    assert len(rows) == len(SIZES)
    for row in rows:
        want = {c["label"]: c["probability"] for c in expected[row["path"]]["top_k"]}
        got = {c["label"]: c["probability"] for c in row["top_k"]}
        assert got == pytest.approx(want, abs=TOLERANCE[mode])


def test_full_preprocess_refuses_an_interpolation_the_graph_cannot_do():
    head, _, _ = tiny_head()
    spec = dataclasses.replace(SPEC, interpolation="lanczos")
    with pytest.raises(ConfigError, match="bilinear or bicubic"):
        compose(tiny_backbone(spec=spec), head, classes=CLASSES, temperature=1.0, preprocess=spec,
                with_preprocess="full")
    with pytest.raises(ConfigError, match="with_preprocess must be one of"):
        compose(tiny_backbone(), head, classes=CLASSES, temperature=1.0, preprocess=SPEC, with_preprocess="crop")


def test_serve_onnx_takes_raw_images_of_any_size_for_a_full_bundle(tmp_path):
    mode, spec = "exact", dataclasses.replace(SPEC, mode="exact")
    plain = load_model(make_bundle(tmp_path / "plain.onnx", spec=spec), device="cpu")
    full_path = make_bundle(tmp_path / "full.onnx", spec=spec, with_preprocess="full")
    images = [encoded(size, "PNG", seed) for seed, size in enumerate(SIZES[:3])]
    srv = Server(full_path, "--max-delay-ms", "50", log=tmp_path / "log")
    try:
        srv.wait_ready()
        info = httpx.get(srv.url + "/v1/model").json()
        assert info["input_format"] == "uint8_nhwc_full"
        batch = httpx.post(srv.url + "/v1/predict?top_k=3",
                           json={"images": [base64.b64encode(data).decode() for data in images]})
        assert batch.status_code == 200, batch.text
        answers = batch.json()["results"]
        for data, answer in zip(images, answers, strict=True):
            expected = plain.predict_proba(plain.prepare(data)[None])[0]
            got = {c["label"]: c["probability"] for c in answer["top_k"]}
            assert got == pytest.approx({CLASSES[i]: float(p) for i, p in enumerate(expected)},
                                        abs=TOLERANCE[mode])
        single = httpx.post(srv.url + "/v1/predict", content=images[1], headers={"Content-Type": "image/png"})
        assert single.status_code == 200, single.text
    finally:
        srv.stop()


def test_cli_bundle_with_preprocess_full_and_bare_flag(tmp_path):
    from tests.bundle_fixtures import write_images
    from tests.test_bundle import build_head_dirs

    for i, name in enumerate(("ants", "bees")):
        write_images(tmp_path / "data" / name, 4, seed=10 + i)
    onnx.save(tiny_backbone(), tmp_path / "tiny.onnx")
    head_dir = build_head_dirs(tmp_path, tmp_path / "tiny.onnx", tmp_path / "data", ["logreg"])["logreg"]
    runner = CliRunner()
    full = runner.invoke(cli, ["bundle", "--head", str(head_dir), "-o", str(tmp_path / "full.onnx"),
                               "--with-preprocess", "full", "--json"])
    assert full.exit_code == 0, full.output
    assert json.loads(full.stdout)["input_format"] == "uint8_nhwc_full"
    bare = runner.invoke(cli, ["bundle", "--head", str(head_dir), "-o", str(tmp_path / "u8.onnx"),
                               "--with-preprocess", "--json"])
    assert bare.exit_code == 0 and json.loads(bare.stdout)["input_format"] == "uint8_nhwc"
    assert runner.invoke(cli, ["bundle", "--head", str(head_dir), "-o", str(tmp_path / "x.onnx"),
                               "--with-preprocess", "crop"]).exit_code == 2


@pytest.mark.slow
@pytest.mark.timeout(600)  # the first user of hymenoptera_lite0 extracts it
def test_full_bundle_on_hymenoptera_with_efficientnet_lite0(hymenoptera, hymenoptera_lite0, tmp_path):
    """Against the existing path on the 153 val images: the fast-mode head (the cache's) and the same
    head declared exact (its head.json edited), each with its own decode and resize."""
    from embedx.bundle import bundle
    from embedx.heads import fit_head

    cache, _ = hymenoptera_lite0
    head = fit_head(cache, output=tmp_path / "head", plots=False).output_dir
    record = json.loads((head / "head.json").read_text())
    assert record["cache"]["preprocess"]["mode"] == "fast"
    exact_head = tmp_path / "exact"
    exact_head.mkdir()
    (exact_head / record["weights_file"]).write_bytes((head / record["weights_file"]).read_bytes())
    record["cache"]["preprocess"]["mode"] = "exact"
    (exact_head / "head.json").write_text(json.dumps(record))
    paths = sorted((hymenoptera / "val").glob("*/*"))
    assert len(paths) == 153
    # measured: fast 0 on every image (its pixels equal the two-step path's), exact 1.1e-3 / p90 2e-4
    for head_dir, worst, p90 in ((head, 1e-5, 1e-6), (exact_head, 2e-3, 5e-4)):
        plain = load_model(bundle(head_dir, tmp_path / "plain.onnx", force=True), device="cpu")
        full = load_model(bundle(head_dir, tmp_path / "full.onnx", with_preprocess="full", force=True), device="cpu")
        gaps = [np.abs(full.predict_proba(full.prepare(p)[None]) - plain.predict_proba(plain.prepare(p)[None])).max()
                for p in paths]
        assert max(gaps) <= worst and np.quantile(gaps, 0.9) <= p90, (plain.spec.mode, max(gaps))


def test_fast_mode_graph_pixels_equal_the_cpu_path_for_many_shrink_factors():
    """The graph's fast-mode resize and crop against ``preprocess.to_pixels``, pixel for pixel, over
    image sizes whose shrink factors give Gaussian kernels where OpenCV's error-diffused rounding
    and plain rounding of the taps differ (10 of hymenoptera's 153 val images were a grey level off)."""
    from onnx import TensorProto, helper

    from embedx import preprocess
    from embedx.pixel_input import FLOAT_INPUT
    from embedx.resize_graph import FULL_OPSET, prepend_full_preprocess

    spec = dataclasses.replace(SPEC, mode="fast", interpolation="bilinear", input_size=32, resize_size=36)
    shape = ["N", 3, spec.input_size, spec.input_size]
    graph = helper.make_graph([helper.make_node("Identity", [FLOAT_INPUT], ["out"])], "identity",
                              [helper.make_tensor_value_info(FLOAT_INPUT, TensorProto.FLOAT, shape)],
                              [helper.make_tensor_value_info("out", TensorProto.FLOAT, shape)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", FULL_OPSET)], ir_version=9)
    prepend_full_preprocess(model, spec)
    import onnxruntime as ort

    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    scale = np.asarray(spec.std, np.float32)[:, None, None] * 255.0
    rng = np.random.default_rng(0)
    off = []
    for short in range(40, 400, 9):  # shrink factors 1.1 .. 11: radii 1 .. 9
        image = rng.integers(0, 256, (short, short + int(rng.integers(0, 60)), 3), dtype=np.uint8)
        got = session.run(None, {name: image[None]})[0][0]
        expected = preprocess.normalize(preprocess.to_pixels(Image.fromarray(image), spec), spec)
        if np.abs((got - expected) * scale).max() > 0.5:
            off.append(image.shape[:2])
    assert not off, f"graph pixels differ from to_pixels for sizes {off}"
