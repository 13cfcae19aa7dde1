"""serve-onnx: the real server (uvicorn in a subprocess) on a free loopback port, via httpx."""

from __future__ import annotations

import asyncio
import base64
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

from bench.serve import ServerProcess
from embedx.predict import load_model
from tests.bundle_fixtures import CLASSES, image_bytes, make_bundle

PNG = {"content-type": "image/png"}


class Server(ServerProcess):
    """``python -m embedx serve-onnx MODEL --port P ...`` as a child process, on the CPU."""

    def __init__(self, model: Path, *options: str, log: Path) -> None:
        super().__init__(model, ["--device", "cpu", "--threads", "1", *options], log)

    def metric(self, name: str, **labels: str) -> float:
        return metric_value(httpx.get(self.url + "/metrics").text, name, **labels)


def metric_value(text: str, name: str, **labels: str) -> float:
    total = 0.0
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                total += sample.value
    return total


@pytest.fixture(scope="module")
def bundles(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("bundles")
    return {
        "float": make_bundle(folder / "model.onnx"),
        "uint8": make_bundle(folder / "model-u8.onnx", with_preprocess=True),
    }


@pytest.fixture(scope="module")
def server(bundles, tmp_path_factory):
    log = tmp_path_factory.mktemp("logs") / "server.log"
    srv = Server(bundles["float"], "--max-delay-ms", "20", "--max-body-mb", "0.05", "--top-k", "2", log=log)
    try:
        srv.wait_ready()
        yield srv
    finally:
        srv.stop()


def expected_probabilities(model_path: Path, data: bytes) -> np.ndarray:
    model = load_model(model_path, device="cpu")
    return model.predict_proba(model.prepare(data)[None])[0]


def check_answer(answer: dict, probabilities: np.ndarray, top_k: int) -> None:
    order = np.argsort(-probabilities)[:top_k]
    assert [c["label"] for c in answer["top_k"]] == [CLASSES[i] for i in order]
    assert [c["probability"] for c in answer["top_k"]] == pytest.approx(probabilities[order].tolist(), abs=1e-5)
    assert answer["label"] == CLASSES[order[0]]
    assert answer["probability"] == pytest.approx(float(probabilities[order[0]]), abs=1e-5)


# -- endpoints ----------------------------------------------------------------------


def test_health_and_model_endpoints(server):
    assert httpx.get(server.url + "/health/live").json() == {"status": "live"}
    assert httpx.get(server.url + "/health/ready").json() == {"status": "ready"}
    info = httpx.get(server.url + "/v1/model").json()
    assert info["classes"] == CLASSES
    assert info["kind"] == "bundle"
    assert info["input_format"] == "float_nchw"
    assert info["preprocess"]["input_size"] == 16
    assert info["temperature"] == pytest.approx(1.5)
    assert info["server"]["max_batch"] == 32 and info["server"]["top_k"] == 2
    assert info["server"]["ready"] is True
    # --batch-cap auto (the default): the model timed at 1, 2, 4, ... 32, the cap one of them
    batching = info["server"]["batching"]
    assert info["server"]["batch_cap"] == "auto" and batching["mode"] == "auto"
    assert set(batching["img_per_s"]) <= {"1", "2", "4", "8", "16", "32"} and "1" in batching["img_per_s"]
    assert all(rate > 0 for rate in batching["img_per_s"].values())
    assert str(batching["cap"]) in batching["img_per_s"] and batching["rounds"] >= 1
    assert server.metric("embedx_batch_cap") == batching["cap"]
    assert server.metric("embedx_batch_calibration_images_per_second", batch_size="1") > 0
    assert httpx.get(server.url + "/nope").status_code == 404
    assert httpx.get(server.url + "/v1/predict").status_code == 405


def test_predict_raw_body_matches_the_model(server, bundles):
    data = image_bytes(3)
    response = httpx.post(server.url + "/v1/predict", content=data, headers=PNG)
    assert response.status_code == 200, response.text
    check_answer(response.json(), expected_probabilities(bundles["float"], data), top_k=2)


def test_predict_octet_stream_jpeg_and_top_k_query(server, bundles):
    data = image_bytes(4, fmt="JPEG")
    response = httpx.post(server.url + "/v1/predict?top_k=3", content=data,
                          headers={"content-type": "application/octet-stream"})
    assert response.status_code == 200, response.text
    check_answer(response.json(), expected_probabilities(bundles["float"], data), top_k=3)
    bad = httpx.post(server.url + "/v1/predict?top_k=zero", content=data, headers=PNG)
    assert bad.status_code == 400 and "top_k" in bad.json()["detail"]


def test_predict_multipart_single_and_several_files(server, bundles):
    one = httpx.post(server.url + "/v1/predict", files={"file": ("a.png", image_bytes(5), "image/png")})
    assert one.status_code == 200, one.text
    check_answer(one.json(), expected_probabilities(bundles["float"], image_bytes(5)), top_k=2)
    several = httpx.post(server.url + "/v1/predict",
                         files=[("file", ("a.png", image_bytes(5))), ("file", ("b.png", image_bytes(6)))])
    assert several.status_code == 200, several.text
    results = several.json()["results"]
    assert len(results) == 2
    check_answer(results[1], expected_probabilities(bundles["float"], image_bytes(6)), top_k=2)
    empty = httpx.post(server.url + "/v1/predict", data={"name": "x"}, files={"other": ("", b"", "text/plain")})
    assert empty.status_code == 400


def test_predict_json_single_and_batch(server, bundles):
    images = [image_bytes(i) for i in range(3)]
    encoded = [base64.b64encode(data).decode() for data in images]
    single = httpx.post(server.url + "/v1/predict", json={"image": "data:image/png;base64," + encoded[0]})
    assert single.status_code == 200, single.text
    check_answer(single.json(), expected_probabilities(bundles["float"], images[0]), top_k=2)
    batch = httpx.post(server.url + "/v1/predict", json={"images": encoded})
    assert batch.status_code == 200, batch.text
    for answer, data in zip(batch.json()["results"], images, strict=True):
        check_answer(answer, expected_probabilities(bundles["float"], data), top_k=2)


# -- errors -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, detail",
    [
        ({"content": b"this is not an image", "headers": PNG}, "not an image"),
        ({"content": image_bytes(1)[:200], "headers": PNG}, "truncated"),
        ({"content": b"", "headers": PNG}, "empty"),
        ({"json": {"images": [base64.b64encode(image_bytes(1)).decode(), "bm90IGFuIGltYWdl"]}}, "images[1]"),
        ({"json": {"images": ["***"]}}, "base64"),
        ({"json": {"pictures": []}}, "'image' or 'images'"),
        ({"content": b"{not json", "headers": {"content-type": "application/json"}}, "JSON"),
    ],
    ids=["not-image", "truncated", "empty", "json-batch-one-bad", "bad-base64", "no-key", "bad-json"],
)
def test_bad_input_is_400_with_a_json_reason(server, kwargs, detail):
    response = httpx.post(server.url + "/v1/predict", **kwargs)
    assert response.status_code == 400, response.text
    body = response.json()
    assert set(body) == {"error", "detail"}
    assert detail in body["detail"]


def test_wrong_content_type_is_415(server):
    response = httpx.post(server.url + "/v1/predict", content=b"hello", headers={"content-type": "text/plain"})
    assert response.status_code == 415
    assert "Content-Type" in response.json()["detail"]
    form = httpx.post(server.url + "/v1/predict", data={"image": "x"})  # urlencoded form
    assert form.status_code == 415


def test_body_over_the_limit_is_413(server):
    big = b"\x89PNG" + bytes(100_000)  # the server allows 0.05 MB
    response = httpx.post(server.url + "/v1/predict", content=big, headers=PNG)
    assert response.status_code == 413
    assert "limit" in response.json()["detail"]

    def chunks():  # no Content-Length: the limit holds while streaming
        for _ in range(20):
            yield bytes(8192)

    streamed = httpx.post(server.url + "/v1/predict", content=chunks(), headers=PNG)
    assert streamed.status_code == 413
    multipart = httpx.post(server.url + "/v1/predict", files={"file": ("a.png", big)})
    assert multipart.status_code == 413
    # and the server is still fine
    assert httpx.post(server.url + "/v1/predict", content=image_bytes(1), headers=PNG).status_code == 200


async def _post_all(url: str, bodies: list[bytes]) -> list[httpx.Response]:
    async with httpx.AsyncClient(timeout=60) as client:
        return await asyncio.gather(*(client.post(url, content=body, headers=PNG) for body in bodies))


def test_one_corrupt_image_among_concurrent_good_ones_fails_alone(server, bundles):
    bodies = [image_bytes(10 + i) for i in range(8)]
    bodies.insert(4, image_bytes(99)[:150])  # truncated PNG
    responses = asyncio.run(_post_all(server.url + "/v1/predict", bodies))
    statuses = [r.status_code for r in responses]
    assert statuses == [200] * 4 + [400] + [200] * 4
    assert "invalid image" == responses[4].json()["error"]
    for response, body in zip(responses, bodies, strict=True):
        if response.status_code == 200:
            check_answer(response.json(), expected_probabilities(bundles["float"], body), top_k=2)


def test_metrics_count_requests_latency_batches_and_queue(server):
    before = server.metric("embedx_requests_total", route="/v1/predict", status="200")
    httpx.post(server.url + "/v1/predict", content=image_bytes(2), headers=PNG)
    httpx.post(server.url + "/v1/predict", content=b"junk", headers=PNG)
    text = httpx.get(server.url + "/metrics").text
    assert metric_value(text, "embedx_requests_total", route="/v1/predict", status="200") == before + 1
    assert metric_value(text, "embedx_requests_total", route="/v1/predict", status="400") >= 1
    assert metric_value(text, "embedx_request_latency_seconds_count", route="/v1/predict") >= before + 2
    assert metric_value(text, "embedx_batch_size_count") >= 1
    assert metric_value(text, "embedx_batch_size_sum") >= metric_value(text, "embedx_batch_size_count")
    assert "embedx_queue_depth" in text
    assert metric_value(text, "embedx_errors_total", reason="bad_image") >= 1


# -- batching, limits, shutdown (servers of their own) --------------------------------


class StalledUpload:
    """A client stuck mid-upload: headers and a few bytes of a PNG body, then silence.

    The server counts it as a request on its way, so a batch that is forming waits for
    it (up to ``--max-delay-ms``); closing the socket ends it (the server answers 400)."""

    def __init__(self, srv: Server) -> None:
        self.sock = socket.create_connection(("127.0.0.1", srv.port), timeout=60)
        before = srv.metric("embedx_requests_incoming")
        self.sock.sendall(b"POST /v1/predict HTTP/1.1\r\nhost: embedx\r\ncontent-type: image/png\r\n"
                          b"content-length: 1000\r\n\r\n" + image_bytes(1)[:100])
        _wait_for(srv, "embedx_requests_incoming", before + 1)  # its handler runs

    def status(self) -> int:
        """The status the server answered with (waits for it)."""
        return int(self.sock.makefile("rb").readline().split()[1])

    def close(self) -> None:
        self.sock.close()


def _wait_for(srv: Server, name: str, value: float, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while srv.metric(name) < value:
        assert time.monotonic() < deadline, f"{name} never reached {value}"
        time.sleep(0.02)


def test_concurrent_requests_share_one_inference_call(bundles, tmp_path):
    srv = Server(bundles["float"], "--max-delay-ms", "30000", "--max-batch", "8", "--batch-cap", "8",
                 log=tmp_path / "log")
    try:
        srv.wait_ready()
        batching = httpx.get(srv.url + "/v1/model").json()["server"]["batching"]
        assert batching["cap"] == 8 and batching["mode"] == "fixed" and batching["img_per_s"] == {}
        batches_before = srv.metric("embedx_batch_size_count")
        # while one upload is still arriving, the others wait for it; max_batch ends the wait
        staller = StalledUpload(srv)
        responses = asyncio.run(_post_all(srv.url + "/v1/predict", [image_bytes(i) for i in range(8)]))
        assert [r.status_code for r in responses] == [200] * 8
        assert srv.metric("embedx_batch_size_count") - batches_before == 1  # 8 images, one ORT call
        staller.close()
    finally:
        srv.stop()


def test_a_lone_request_does_not_wait_for_the_batch_delay(bundles, tmp_path):
    srv = Server(bundles["float"], "--max-delay-ms", "30000", log=tmp_path / "log")
    try:
        srv.wait_ready()
        start = time.monotonic()
        assert httpx.post(srv.url + "/v1/predict", content=image_bytes(1), headers=PNG, timeout=60).status_code == 200
        assert time.monotonic() - start < 20  # nothing else was coming: it ran at once, not after 30 s
    finally:
        srv.stop()


async def while_queued(srv: Server, count: int, scenario):
    """Post ``count`` images while a stalled upload holds the batch, wait until all sit in
    the batcher's queue, run ``scenario(client, tasks)``; return its result and the
    ``count`` responses."""
    async with httpx.AsyncClient(timeout=60) as client:
        queued = [asyncio.create_task(client.post(srv.url + "/v1/predict", content=image_bytes(i), headers=PNG))
                  for i in range(count)]
        await asyncio.to_thread(_wait_for, srv, "embedx_queue_depth", count)
        result = await scenario(client, queued)
        return result, await asyncio.gather(*queued)


def test_queue_full_is_503_with_retry_after_and_timeout_is_504(bundles, tmp_path):
    srv = Server(bundles["float"], "--max-batch", "8", "--batch-cap", "8", "--max-delay-ms", "60000",
                 "--max-queue", "2", "--timeout-s", "3", log=tmp_path / "log")
    try:
        srv.wait_ready()
        first = StalledUpload(srv)  # holds the batch; times out (408) before the queued two
        last = []

        async def scenario(client, queued):
            last.append(StalledUpload(srv))  # holds it past the queued two's deadline
            return await client.post(srv.url + "/v1/predict", content=image_bytes(3), headers=PNG)

        refused, timed_out = asyncio.run(while_queued(srv, 2, scenario))
        assert refused.status_code == 503
        assert refused.headers["retry-after"] == "1"
        assert refused.json()["error"] == "queue full"
        assert [r.status_code for r in timed_out] == [504, 504]
        assert timed_out[0].json()["error"] == "timeout"
        # timed-out requests leave the queue, so the server takes new ones again
        assert srv.metric("embedx_queue_depth") == 0
        assert srv.metric("embedx_errors_total", reason="timeout") >= 2
        # the stalled uploads: 408 once --timeout-s has passed
        assert first.status() == 408 and last[0].status() == 408
        first.close()
        last[0].close()
        assert httpx.post(srv.url + "/v1/predict", content=image_bytes(1), headers=PNG).status_code == 200
    finally:
        srv.stop()


def test_sigterm_drains_in_flight_requests(bundles, tmp_path):
    srv = Server(bundles["float"], "--max-batch", "32", "--batch-cap", "32", "--max-delay-ms", "3000",
                 log=tmp_path / "log")
    try:
        srv.wait_ready()
        staller = StalledUpload(srv)  # the 6 below wait for it (up to the 3 s delay)

        async def scenario(client, queued):
            srv.process.send_signal(signal.SIGTERM)

        _, responses = asyncio.run(while_queued(srv, 6, scenario))
        assert [r.status_code for r in responses] == [200] * 6
        staller.close()
        # uvicorn re-raises the captured SIGTERM once shut down cleanly
        assert srv.process.wait(timeout=30) in (0, -signal.SIGTERM)
        assert "Traceback" not in srv.log.read_text()
        with pytest.raises(httpx.TransportError):
            httpx.get(srv.url + "/health/live", timeout=2)
    finally:
        srv.stop()


def test_uint8_bundle_is_served_from_its_metadata(bundles, tmp_path):
    srv = Server(bundles["uint8"], "--no-batching", log=tmp_path / "log")
    try:
        srv.wait_ready()
        info = httpx.get(srv.url + "/v1/model").json()
        assert info["input_format"] == "uint8_nhwc" and info["input_name"] == "image"
        assert info["server"]["max_batch"] == 1
        assert info["server"]["batching"] == {"cap": 1, "mode": "auto", "img_per_s": {}, "rounds": 0,
                                              "seconds": 0.0, "tolerance": 0.05}  # nothing to time
        data = image_bytes(7)
        response = httpx.post(srv.url + "/v1/predict?top_k=3", content=data, headers=PNG)
        assert response.status_code == 200, response.text
        # the same answer as the float bundle
        check_answer(response.json(), expected_probabilities(bundles["float"], data), top_k=3)
    finally:
        srv.stop()


def test_cli_refuses_a_model_without_embedx_metadata(tmp_path):
    import onnx

    from tests.bundle_fixtures import tiny_backbone

    path = tmp_path / "backbone.onnx"
    onnx.save(tiny_backbone(), path)
    srv = Server(path, log=tmp_path / "log")
    assert srv.process.wait(timeout=60) == 1
    assert "backbone export" in srv.log.read_text()


# -- in-process: readiness and a failing inference -------------------------------------


async def _wait_ready(client: httpx.AsyncClient) -> None:
    deadline = time.monotonic() + 30
    while (await client.get("/health/ready")).status_code != 200:
        assert time.monotonic() < deadline, "never ready"
        await asyncio.sleep(0.02)


def in_process(app, scenario):
    """Run ``scenario(client, start)`` against ``app`` in this process; ``start()``
    enters the app's lifespan (startup, warm-up) as uvicorn would."""
    from contextlib import AsyncExitStack

    async def main():
        async with AsyncExitStack() as stack:
            client = await stack.enter_async_context(
                httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://embedx")
            )

            async def start():
                await stack.enter_async_context(app.router.lifespan_context(app))

            return await scenario(client, start)

    return asyncio.run(main())


def test_not_ready_before_warm_up_then_ready(bundles):
    from embedx.serve import create_app

    async def scenario(client, start):
        assert (await client.get("/health/live")).status_code == 200
        not_ready = await client.get("/health/ready")  # no startup, no warm-up yet
        assert not_ready.status_code == 503 and not_ready.headers["retry-after"] == "1"
        refused = await client.post("/v1/predict", content=image_bytes(1), headers=PNG)
        assert refused.status_code == 503 and refused.json()["error"] == "not ready"
        assert (await client.get("/v1/model")).json()["server"]["batching"] is None  # no cap before warm-up
        await start()
        await _wait_ready(client)
        assert (await client.get("/v1/model")).json()["server"]["batching"]["mode"] == "auto"
        assert (await client.post("/v1/predict", content=image_bytes(1), headers=PNG)).status_code == 200

    in_process(create_app(bundles["float"], device="cpu"), scenario)


def test_more_images_than_the_queue_holds_is_413_for_multipart_as_for_json(bundles):
    """Multipart got 503 'queue full, retry shortly' with Retry-After: a retry that can never succeed."""
    from embedx.serve import create_app

    async def scenario(client, start):
        await start()
        await _wait_ready(client)
        encoded = base64.b64encode(image_bytes(1)).decode()
        for request in ({"json": {"images": [encoded] * 3}},
                        {"files": [("file", (f"{i}.png", image_bytes(1), "image/png")) for i in range(3)]}):
            refused = await client.post("/v1/predict", **request)
            assert refused.status_code == 413 and "retry-after" not in refused.headers, refused.text
            assert refused.json()["error"] == "too many images" and "at most 2" in refused.json()["detail"]
        files = [("file", (f"{i}.png", image_bytes(1), "image/png")) for i in range(2)]
        assert (await client.post("/v1/predict", files=files)).status_code == 200
        for declared, status in ((b"1" * 5000, 413), (b"\xb2", 200)):  # int() refuses both; isdigit() did not
            response = await client.post("/v1/predict", content=image_bytes(1),
                                         headers={**PNG, "content-length": declared})
            assert response.status_code == status, (declared[:9], response.text)
        return True

    assert in_process(create_app(bundles["float"], device="cpu", max_queue=2, max_batch=2, batch_cap=2), scenario)


class FlakyModel:
    """The real model, but inference raises while ``fail`` is set."""

    def __init__(self, model):
        self.model = model
        self.fail = False

    def __getattr__(self, name):
        return getattr(self.model, name)

    def predict_proba(self, batch):
        if self.fail:
            raise RuntimeError("simulated onnxruntime failure")
        return self.model.predict_proba(batch)


def test_a_failing_inference_fails_its_requests_with_500_and_the_server_goes_on(bundles):
    from embedx.serve import create_app

    model = FlakyModel(load_model(bundles["float"], device="cpu"))

    async def scenario(client, start):
        await start()
        await _wait_ready(client)
        model.fail = True
        failed = await asyncio.gather(
            *(client.post("/v1/predict", content=image_bytes(i), headers=PNG) for i in range(3))
        )
        assert [r.status_code for r in failed] == [500] * 3
        assert "simulated onnxruntime failure" in failed[0].json()["detail"]
        model.fail = False
        assert (await client.post("/v1/predict", content=image_bytes(1), headers=PNG)).status_code == 200

    in_process(create_app(model=model, max_delay_ms=1), scenario)


# -- the batch cap (calibrate.py) --------------------------------------------------------


@pytest.mark.parametrize(
    ("rates", "cap"),
    [
        ({1: 69, 2: 66, 4: 67, 8: 52, 16: 48, 32: 43}, 1),  # lite0 on the 2-core CPU: batching only costs
        ({1: 100, 2: 120, 4: 123, 8: 103, 32: 82}, 2),  # 2 is within 5% of the best (4)
        ({1: 18, 8: 19, 32: 27}, 32),  # resnet18 on the CPU: gains to the end
        ({1: 300, 2: 580, 4: 1100, 8: 2000, 16: 3300, 32: 3400}, 16),  # a GPU: 16 is within 5% of 32
        ({1: 50}, 1),
    ],
)
def test_choose_batch_cap_takes_the_smallest_size_within_tolerance_of_the_best(rates, cap):
    from embedx.serve.calibrate import choose_batch_cap

    assert choose_batch_cap(rates) == cap


def test_choose_batch_cap_tolerance_and_empty():
    from embedx.serve.calibrate import choose_batch_cap

    rates = {1: 90, 2: 96, 4: 100}
    assert choose_batch_cap(rates, tolerance=0.0) == 4
    assert choose_batch_cap(rates, tolerance=0.05) == 2
    assert choose_batch_cap(rates, tolerance=0.10) == 1
    with pytest.raises(ValueError, match="at least one"):
        choose_batch_cap({})


def test_batch_sizes_and_parse_batch_cap():
    from embedx.errors import ConfigError
    from embedx.serve.calibrate import batch_sizes, parse_batch_cap

    assert batch_sizes(1) == [1]
    assert batch_sizes(32) == [1, 2, 4, 8, 16, 32]
    assert batch_sizes(24) == [1, 2, 4, 8, 16, 24]
    assert parse_batch_cap("auto") == parse_batch_cap(" AUTO ") == "auto"
    assert parse_batch_cap("8") == parse_batch_cap(8) == 8
    for bad in ("0", "-2", "many", 2.5):
        with pytest.raises(ConfigError, match="'auto' or a positive integer"):
            parse_batch_cap(bad)


class FakeModel:
    """Inference that costs ``seconds_per_call(size)`` on a fake clock (no real timing)."""

    def __init__(self, seconds_per_call):
        self.now = 0.0
        self.seconds_per_call = seconds_per_call
        self.calls: list[int] = []

    def clock(self) -> float:
        return self.now

    def run(self, batch: np.ndarray) -> np.ndarray:
        self.calls.append(len(batch))
        self.now += self.seconds_per_call(len(batch))
        return batch


def test_measure_rates_interleaves_sizes_and_drops_the_slow_ones_after_two_rounds():
    from embedx.serve.calibrate import measure_rates

    # 10 ms per image at batch 1..4, 20 ms per image at 8 and above
    model = FakeModel(lambda size: size * (0.01 if size <= 4 else 0.02))
    rates, rounds = measure_rates(model.run, lambda size: np.zeros((size, 3)), [1, 2, 4, 8, 16],
                                  budget_s=2.0, max_rounds=3, min_images=4, clock=model.clock)
    assert rates == pytest.approx({1: 100, 2: 100, 4: 100, 8: 50, 16: 50})
    assert rounds == 3
    first_round = [1, 1, 1, 1, 2, 2, 4, 8, 16]  # batch 1 and 2 repeat up to 4 images
    # after two rounds, 8 and 16 (half the best) are not timed again
    assert model.calls == first_round * 2 + [1, 1, 1, 1, 2, 2, 4]


def test_measure_rates_stops_within_the_budget_and_keeps_the_best_round():
    from embedx.serve.calibrate import measure_rates

    model = FakeModel(lambda size: 0.01 * size * (3.0 if not model.calls[:-1] else 1.0))  # first call slowed
    rates, rounds = measure_rates(model.run, lambda size: np.zeros(size), [1, 2], budget_s=0.25, max_rounds=10,
                                  min_images=2, clock=model.clock)
    assert rates == pytest.approx({1: 100, 2: 100})  # the best round of each: batch 1 not dropped
    # round 1 took 0.04 + 0.02 s, each later one 0.02 + 0.02 s: 5 rounds end at 0.22 s, a 6th would not fit
    assert rounds == 5 and model.now <= 0.25


def test_measure_rates_leaves_out_sizes_too_slow_to_time_and_runs_one_round_at_least():
    from embedx.serve.calibrate import measure_rates

    model = FakeModel(lambda size: 0.5 * size)  # 2 img/s: batch 8 would take 4 s
    rates, rounds = measure_rates(model.run, lambda size: np.zeros(size), [1, 2, 4, 8], budget_s=1.0,
                                  min_images=1, clock=model.clock)
    assert rounds == 1
    assert rates == pytest.approx({1: 2, 2: 2})  # 4 would end at 3.5 s, past twice the budget
    assert model.calls == [1, 2]


def test_resolve_batch_cap_fixed_auto_and_releasing_larger_batches(bundles):
    from embedx.serve.calibrate import release_larger_batches, resolve_batch_cap

    class Untimed:
        def predict_proba(self, batch):
            raise AssertionError("a fixed cap or max_batch 1 runs no inference")

    assert resolve_batch_cap(Untimed(), batch_cap=8, max_batch=32).to_dict()["cap"] == 8
    assert resolve_batch_cap(Untimed(), batch_cap=64, max_batch=32).cap == 32  # never above max_batch
    assert resolve_batch_cap(Untimed(), batch_cap="auto", max_batch=1).cap == 1
    model = load_model(bundles["uint8"], device="cpu")
    cap = resolve_batch_cap(model, batch_cap="auto", max_batch=4, budget_s=0.5)
    assert cap.mode == "auto" and set(cap.rates) == {1, 2, 4} and cap.cap in cap.rates
    assert "batch cap" in cap.describe()
    # after it, the memory for larger batches goes back; the model still answers alike
    before = model.predict_proba(model.warmup_input(4))
    assert release_larger_batches(model, cap.cap) is True
    np.testing.assert_allclose(model.predict_proba(model.warmup_input(4)), before, rtol=1e-6)
    assert release_larger_batches(Untimed(), 1) is False  # no onnxruntime session to shrink


def test_calibration_batch_has_the_models_shape_dtype_and_value_range(bundles):
    from embedx.serve.calibrate import calibration_batch
    from tests.bundle_fixtures import SPEC

    model = load_model(bundles["float"], device="cpu")
    batch = calibration_batch(model, 3)
    assert batch.shape == (3, 3, 16, 16) and batch.dtype == np.float32
    low = (0 - np.array(SPEC.mean)) / np.array(SPEC.std)
    high = (1 - np.array(SPEC.mean)) / np.array(SPEC.std)
    channels = batch.transpose(1, 0, 2, 3).reshape(3, -1)
    assert (channels.min(axis=1) >= low - 1e-5).all() and (channels.max(axis=1) <= high + 1e-5).all()
    assert channels.std(axis=1).min() > 0.5  # not constant: pixels spread over 0..255
    pixels = calibration_batch(load_model(bundles["uint8"], device="cpu"), 2)
    assert pixels.shape == (2, 16, 16, 3) and pixels.dtype == np.uint8


def test_cli_rejects_a_bad_batch_cap(bundles):
    from click.testing import CliRunner

    from embedx.cli.main import cli

    result = CliRunner().invoke(cli, ["serve-onnx", str(bundles["float"]), "--batch-cap", "zero"])
    assert result.exit_code == 2
    assert "'auto' or a positive integer" in result.output


# -- the batcher alone ------------------------------------------------------------------


def run_batcher(scenario, **options):
    from concurrent.futures import ThreadPoolExecutor

    from embedx.serve.batcher import DynamicBatcher

    calls: list[int] = []

    def run_batch(batch):
        calls.append(len(batch))
        if (batch < 0).any():
            raise RuntimeError("negative input")
        return batch * 2

    async def main():
        with ThreadPoolExecutor(1) as pool:
            batcher = DynamicBatcher(run_batch, executor=pool, **options)
            batcher.start()
            try:
                return await scenario(batcher)
            finally:
                await batcher.close()

    return asyncio.run(main()), calls


def test_batcher_respects_max_batch_and_returns_rows_in_order():
    async def scenario(batcher):
        futures = batcher.submit([np.full(2, i, dtype=np.float32) for i in range(10)])
        return await asyncio.gather(*futures)

    rows, calls = run_batcher(scenario, max_batch=4, max_delay_s=0.05)
    assert [row[0] for row in rows] == [2 * i for i in range(10)]
    assert calls == [4, 4, 2]


def test_batcher_failure_hits_only_its_batch():
    from embedx.serve.batcher import BatchFailedError

    async def scenario(batcher):
        bad = batcher.submit([np.full(2, -1.0), np.full(2, 1.0)])
        with pytest.raises(BatchFailedError, match="negative input"):
            await asyncio.gather(*bad)
        good = batcher.submit([np.full(2, 3.0)])
        return await asyncio.gather(*good)

    rows, calls = run_batcher(scenario, max_batch=8, max_delay_s=0.01)
    assert rows[0].tolist() == [6.0, 6.0]
    assert calls == [2, 1]


def test_batcher_queue_limit_and_cancelled_callers():
    from embedx.serve.batcher import QueueFullError

    async def scenario(batcher):
        first = batcher.submit([np.zeros(2), np.zeros(2)])
        with pytest.raises(QueueFullError):
            batcher.submit([np.zeros(2)])  # all-or-nothing: 2 + 1 > 2
        for future in first:
            future.cancel()
        await asyncio.sleep(0)
        assert batcher.depth == 0
        return await asyncio.gather(*batcher.submit([np.ones(2)]))

    rows, calls = run_batcher(scenario, max_batch=8, max_delay_s=0.01, max_queue=2)
    assert rows[0].tolist() == [2.0, 2.0]
    assert calls == [1]  # the cancelled images never ran


def test_batcher_close_runs_what_is_queued_without_waiting_for_the_delay():
    async def scenario(batcher):
        futures = batcher.submit([np.ones(2)])
        start = time.monotonic()
        await batcher.close()
        return time.monotonic() - start, [f.result() for f in futures]

    (seconds, rows), calls = run_batcher(scenario, max_batch=8, max_delay_s=60.0)
    assert rows[0].tolist() == [2.0, 2.0] and calls == [1]
    assert seconds < 30  # did not wait out the 60 s delay


def test_batcher_runs_at_once_when_nothing_else_is_coming():
    async def scenario(batcher):
        start = time.monotonic()
        with batcher.incoming():
            futures = batcher.submit([np.ones(2)])
        rows = await asyncio.gather(*futures)
        return time.monotonic() - start, rows

    (seconds, rows), calls = run_batcher(scenario, max_batch=8, max_delay_s=60.0)
    assert rows[0].tolist() == [2.0, 2.0] and calls == [1]
    assert seconds < 30  # did not wait out the 60 s delay


def test_batcher_waits_for_announced_requests_up_to_the_delay():
    async def scenario(batcher):
        with batcher.incoming():
            first = batcher.submit([np.ones(2)])
            with batcher.incoming():  # a second request, still decoding
                for _ in range(10):  # the batcher's turns to (wrongly) run the first one alone
                    await asyncio.sleep(0)
                second = batcher.submit([np.full(2, 3.0)])
        together = await asyncio.gather(*first, *second)
        with batcher.incoming():
            alone = batcher.submit([np.ones(2)])
            with batcher.incoming():  # one that never submits: the delay bounds the wait
                return together, await asyncio.gather(*alone)

    (together, alone), calls = run_batcher(scenario, max_batch=8, max_delay_s=0.2)
    assert [row.tolist() for row in together] == [[2.0, 2.0], [6.0, 6.0]]
    assert alone[0].tolist() == [2.0, 2.0]
    assert calls == [2, 1]


def test_serve_imports_no_torch(bundles, tmp_path):
    code = (
        "import sys; from embedx.serve import create_app; "
        f"app = create_app({str(bundles['float'])!r}, device='cpu'); "
        "bad = [m for m in ('torch', 'torchvision', 'h5py', 'sklearn', 'onnx', 'matplotlib') if m in sys.modules]; "
        "print(bad); sys.exit(1 if bad else 0)"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                            env={**os.environ, "PYTHONWARNINGS": "ignore"})
    assert result.returncode == 0, result.stdout + result.stderr
