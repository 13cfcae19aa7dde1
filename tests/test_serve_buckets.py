"""Serving in batch buckets: every batch runs at a warmed size, padded, same answers."""

from __future__ import annotations

import asyncio

import httpx
import numpy as np
import pytest

from embedx.predict import load_model
from embedx.serve.calibrate import Buckets, batch_sizes, bucket_for, runs_on_gpu
from tests.bundle_fixtures import image_bytes, make_bundle
from tests.test_serve import PNG, _wait_ready, check_answer, expected_probabilities, in_process


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    return make_bundle(tmp_path_factory.mktemp("bundles") / "model.onnx")


def test_bucket_for_takes_the_smallest_bucket_that_holds_the_batch():
    sizes = batch_sizes(24)
    assert sizes == [1, 2, 4, 8, 16, 24]
    assert [bucket_for(n, sizes) for n in (1, 2, 3, 5, 9, 16, 17, 24)] == [1, 2, 4, 8, 16, 16, 24, 24]
    with pytest.raises(ValueError, match="larger than the largest bucket"):
        bucket_for(25, sizes)


def test_buckets_pad_to_the_bucket_and_return_only_the_real_rows():
    seen = []

    def run(batch):
        seen.append(len(batch))
        return batch.reshape(len(batch), -1).sum(axis=1, keepdims=True)

    buckets = Buckets(run, [1, 2, 4, 8])
    batch = np.arange(5 * 3, dtype=np.float32).reshape(5, 3)
    out = buckets(batch)
    assert seen == [8]
    np.testing.assert_array_equal(out, batch.sum(axis=1, keepdims=True))
    buckets(batch[:4])
    assert seen == [8, 4]  # a full bucket is not padded


def test_bucketed_probabilities_equal_unpadded_ones(bundle):
    model = load_model(bundle, device="cpu")
    batch = model.warmup_input(3)
    rng = np.random.default_rng(0)
    batch = (rng.normal(size=batch.shape)).astype(batch.dtype)
    direct = model.predict_proba(batch)
    padded = Buckets(model.predict_proba, batch_sizes(8))(batch)
    np.testing.assert_allclose(padded, direct, rtol=1e-5, atol=1e-6)
    assert not runs_on_gpu(model)


def test_a_bucketed_server_warms_every_bucket_and_only_ever_runs_bucket_sizes(bundle):
    from embedx.serve import create_app

    model = load_model(bundle, device="cpu")
    shapes = []
    original = model.predict_proba

    def recording(batch):
        shapes.append(len(batch))
        return original(batch)

    model.predict_proba = recording

    async def scenario(client, start):
        await start()
        await _wait_ready(client)
        warmed = set(shapes)
        info = (await client.get("/v1/model")).json()["server"]
        assert info["buckets"] == [1, 2, 4, 8]
        assert {1, 2, 4, 8} <= warmed
        shapes.clear()
        answers = await asyncio.gather(*[
            client.post("/v1/predict", content=image_bytes(i), headers=PNG) for i in range(7)
        ])
        assert all(answer.status_code == 200 for answer in answers)
        assert shapes and set(shapes) <= {1, 2, 4, 8}

    app = create_app(model=model, max_batch=8, max_delay_ms=50, buckets=True)
    in_process(app, scenario)


def test_buckets_are_off_by_default_on_the_cpu(bundle):
    from embedx.serve import create_app

    async def scenario(client, start):
        await start()
        await _wait_ready(client)
        assert (await client.get("/v1/model")).json()["server"]["buckets"] is None

    in_process(create_app(bundle, device="cpu", max_batch=4), scenario)


assert httpx  # the in-process client comes from tests.test_serve


@pytest.mark.gpu
def test_on_a_gpu_buckets_are_on_and_every_bucket_is_warmed(bundle):
    from embedx.providers import gpu_available
    from embedx.serve import create_app

    if not gpu_available():
        pytest.skip("no NVIDIA GPU with ONNX Runtime's CUDA provider")

    async def scenario(client, start):
        await start()
        await _wait_ready(client)
        info = (await client.get("/v1/model")).json()["server"]
        assert info["buckets"] == [1, 2, 4, 8]
        cap = info["batching"]
        assert cap["mode"] == "auto" and set(cap["img_per_s"]) == {"1", "2", "4", "8"}
        answers = await asyncio.gather(*[
            client.post("/v1/predict", content=image_bytes(i), headers=PNG) for i in range(5)
        ])
        assert all(answer.status_code == 200 for answer in answers)

    in_process(create_app(bundle, device="cuda", max_batch=8), scenario)


def test_a_session_per_bucket_gives_the_same_answers_and_each_sees_one_shape(bundle):
    from embedx.serve import create_app

    async def scenario(client, start):
        await start()
        await _wait_ready(client)
        server = app.state.server
        info = (await client.get("/v1/model")).json()["server"]
        assert info["buckets"] == [1, 2, 4] and info["bucket_sessions"] is True
        runners = server.run_batch.runners
        assert sorted(runners) == [1, 2]  # max_batch (4) stays on the loaded model
        sessions = {id(runner.__self__.session) for runner in runners.values()} | {id(server.model.session)}
        assert len(sessions) == 3
        answers = await asyncio.gather(*[
            client.post("/v1/predict", content=image_bytes(i), headers=PNG) for i in range(3)
        ])
        assert all(answer.status_code == 200 for answer in answers)
        for i, answer in enumerate(answers):
            check_answer(answer.json(), expected_probabilities(bundle, image_bytes(i)), top_k=3)

    app = create_app(bundle, device="cpu", max_batch=4, buckets=True, bucket_sessions=True)
    in_process(app, scenario)


def test_a_bucket_session_that_cannot_open_leaves_the_bucket_on_the_shared_one(bundle, monkeypatch):
    from embedx.serve import app as app_module
    from embedx.serve import create_app

    real = app_module.load_model
    opened = []

    def flaky_load(path, **options):
        opened.append(1)
        if len(opened) == 1:
            raise RuntimeError("out of device memory (simulated)")
        return real(path, **options)

    monkeypatch.setattr(app_module, "load_model", flaky_load)

    async def scenario(client, start):
        await start()
        await _wait_ready(client)
        assert sorted(app.state.server.run_batch.runners) == [2]  # bucket 1 failed, 4 is the model's
        answer = await client.post("/v1/predict", content=image_bytes(0), headers=PNG)
        assert answer.status_code == 200

    app = create_app(model=load_model(bundle, device="cpu"), device="cpu", max_batch=4, buckets=True,
                     bucket_sessions=True)
    in_process(app, scenario)


def test_fixed_batch_models_are_not_bucketed(bundle):
    from embedx.serve.app import ServeConfig, _Server

    model = load_model(bundle, device="cpu")
    model.fixed_batch = 2
    server = _Server(model, ServeConfig(max_batch=8, buckets=True, bucket_sessions=True))
    assert server.buckets is None and not server.bucket_sessions
