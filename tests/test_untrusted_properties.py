"""Property-based tests (hypothesis) for the parsers of untrusted input (issue 15).

head.json (``HeadRecord``) and bundle metadata (``OnnxClassifier``'s checks): any input gives a
result or an ``EmbedxError``, never another exception. The HTTP body parsers: any body gives a
2xx or a 4xx, never a 5xx.
"""

from __future__ import annotations

import asyncio
import base64
import json
import threading
from pathlib import Path

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from embedx import untrusted
from embedx.errors import EmbedxError
from embedx.heads.record import HeadRecord
from tests.bundle_fixtures import CLASSES, SPEC, image_bytes, make_bundle

SETTINGS = settings(max_examples=75, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                            HealthCheck.too_slow])

scalars = st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8)
json_values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=4)
                           | st.dictionaries(st.text(max_size=8), inner, max_size=4), max_leaves=12)

VALID_HEAD = {
    "schema_version": 1, "head_type": "logreg", "classes": ["ants", "bees"], "feature_dim": 8, "temperature": 1.0,
    "weights_file": "weights.safetensors", "init_params": {}, "params": {}, "n_train": 10,
    "cache": {"backbone": "tiny", "onnx_path": "/nowhere.onnx", "feature_dim": 8, "preprocess": SPEC.to_dict()},
}
# valid records with some fields replaced by anything (including inside cache and cache.preprocess)
head_fields = st.fixed_dictionaries({}, optional={name: json_values for name in VALID_HEAD}).map(
    lambda changes: {**VALID_HEAD, **changes})
preprocess_dicts = st.fixed_dictionaries({}, optional={name: json_values for name in SPEC.to_dict()}).map(
    lambda changes: {**SPEC.to_dict(), **changes})


def _record_or_error(fields) -> None:
    try:
        record = HeadRecord.from_fields(fields, directory=Path("/nowhere/head"))
    except EmbedxError:
        return
    try:
        record.preprocess()
    except EmbedxError:
        pass


@SETTINGS
@given(json_values)
def test_any_json_value_as_head_json_is_a_record_or_an_embedx_error(value):
    _record_or_error(value)


@SETTINGS
@given(head_fields)
def test_a_head_json_with_any_field_changed_is_a_record_or_an_embedx_error(fields):
    _record_or_error(fields)


@SETTINGS
@given(preprocess_dicts)
def test_any_preprocess_in_head_json_is_a_spec_or_an_embedx_error(preprocess):
    _record_or_error({**VALID_HEAD, "cache": {**VALID_HEAD["cache"], "preprocess": preprocess}})


DEEP = b"[" * 100_000 + b"]" * 100_000


@SETTINGS
@given(st.binary(max_size=200) | st.text(max_size=200).map(str.encode)
       | json_values.map(lambda v: json.dumps(v).encode()))
@example(DEEP)
@example(b'{"schema_version": 1, "head_type": "logreg", "classes": ["a", "b"], "feature_dim": 8, "temperature": NaN}')
def test_any_bytes_in_head_json_are_a_record_or_a_head_error(tmp_path, data):
    (tmp_path / "head.json").write_bytes(data)
    try:
        HeadRecord.read(tmp_path)
    except EmbedxError:
        pass


@SETTINGS
@given(st.text(alphabet="[]{}\"\\,:0 a", max_size=300))
def test_untrusted_loads_gives_a_value_or_an_embedx_error(text):
    try:
        untrusted.loads(text, what="text", max_depth=8)
    except EmbedxError:
        pass


# -- bundle metadata ---------------------------------------------------------------------

VALID_META = {"kind": "bundle", "classes": json.dumps(CLASSES), "preprocess": SPEC.to_json(),
              "input_format": "float_nchw", "feature_dim": "8", "temperature": "1.5", "head": "{}"}
meta_values = st.text(max_size=40) | json_values.map(json.dumps) | preprocess_dicts.map(json.dumps)
bundle_meta = st.fixed_dictionaries({}, optional={name: meta_values for name in VALID_META}).map(
    lambda changes: {**VALID_META, **changes})


@pytest.fixture(scope="module")
def bundle_model(tmp_path_factory):
    import onnx

    return onnx.load(str(make_bundle(tmp_path_factory.mktemp("bundle") / "model.onnx")))


@SETTINGS
@given(bundle_meta)
@example({**VALID_META, "classes": "[" * 100_000})
@example({**VALID_META, "preprocess": json.dumps({**SPEC.to_dict(), "input_size": 0})})
def test_any_bundle_metadata_is_a_model_or_an_embedx_error(bundle_model, tmp_path, meta):
    """Through ``load_model`` (what ``predict --model`` and ``serve-onnx`` call) and ``describe()``."""
    import onnx

    from embedx import onnxmeta
    from embedx.predict import load_model

    model = onnx.ModelProto()
    model.CopyFrom(bundle_model)
    onnxmeta.write(model, meta)
    path = tmp_path / "model.onnx"
    onnx.save(model, path)
    try:
        load_model(path, device="cpu").describe()
    except EmbedxError:
        pass


# -- the HTTP body parsers ---------------------------------------------------------------


class RunningApp:
    """The app's lifespan and an httpx client on an event loop in a thread, so that each
    hypothesis example (synchronous) can send one request to the one warmed-up server."""

    def __init__(self, app) -> None:
        import httpx

        self.app = app
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.client = httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://embedx")
        self.lifespan = app.router.lifespan_context(app)
        self.call(self.lifespan.__aenter__())
        self.call(self._ready())

    async def _ready(self) -> None:
        from tests.test_serve import _wait_ready

        await _wait_ready(self.client)

    def call(self, coroutine, timeout: float = 60):
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(timeout)

    def close(self) -> None:
        self.call(self.lifespan.__aexit__(None, None, None))
        self.call(self.client.aclose())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    from embedx.serve import create_app

    path = make_bundle(tmp_path_factory.mktemp("bundle") / "model.onnx")
    running = RunningApp(create_app(path, device="cpu", max_delay_ms=0.5, max_body_mb=1, max_queue=4))
    yield running
    running.close()


good_image = st.integers(0, 3).map(lambda seed: base64.b64encode(image_bytes(seed)).decode())
image_fields = st.text(max_size=20) | good_image | st.binary(max_size=40).map(lambda b: base64.b64encode(b).decode())
json_bodies = (
    json_values.map(json.dumps)
    | st.fixed_dictionaries({"image": image_fields | json_values}).map(json.dumps)
    | st.fixed_dictionaries({"images": st.lists(image_fields | json_values, max_size=6) | json_values}).map(json.dumps)
    | st.integers(1, 3000).map(lambda n: '{"images": ' + "[" * n + "]" * n + "}")
).map(str.encode) | st.binary(max_size=200)
content_types = st.sampled_from(["application/json", "image/png", "application/octet-stream", "multipart/form-data",
                                 "multipart/form-data; boundary=xyz", "text/plain", "", "image/", "application/json;"])
top_k = st.none() | st.text(max_size=6) | st.integers(-3, 10).map(str)


def _multipart(files: list[bytes]) -> bytes:
    parts = [b'--xyz\r\nContent-Disposition: form-data; name="file"; filename="a.png"\r\n'
             b"Content-Type: image/png\r\n\r\n" + data + b"\r\n" for data in files]
    return b"".join(parts) + b"--xyz--\r\n"


multipart_bodies = st.lists(st.binary(max_size=60) | st.integers(0, 3).map(image_bytes), max_size=3).map(_multipart)


@SETTINGS
@example(body=b'{"images": ' + b"[" * 50_000 + b"]" * 50_000 + b"}", content_type="application/json", k=None)
@example(body=b'{"image": NaN}', content_type="application/json", k=None)
@given(body=json_bodies | multipart_bodies | st.binary(max_size=300) | st.integers(0, 3).map(image_bytes),
       content_type=content_types, k=top_k)
def test_any_request_body_is_answered_2xx_or_4xx_never_5xx(served, body, content_type, k):
    params = {} if k is None else {"top_k": k}
    headers = {"content-type": content_type} if content_type else {}
    response = served.call(served.client.post("/v1/predict", content=body, headers=headers, params=params))
    assert response.status_code < 500, (response.status_code, response.text)
    assert response.headers["content-type"].startswith("application/json")
