"""The HTTP server around one bundle: Starlette app, uvicorn runner (torch-free).

Routes:

- ``POST /v1/predict``: one image as the raw body (``image/*``,
  ``application/octet-stream``) or a multipart upload (field ``file``; several
  ``file`` fields are a batch), or JSON ``{"image": base64}`` / ``{"images": [base64,
  ...]}``.  Answers ``{"label", "probability", "top_k": [...]}``, or ``{"results":
  [...]}`` for a batch.  ``?top_k=K`` overrides the server's default.
- ``GET /v1/model``: the bundle's metadata and the server's settings, with the batch cap
  chosen at warm-up (``server.batching``).
- ``GET /health/live`` (the process answers), ``GET /health/ready`` (200 only once
  the warm-up inference has run), ``GET /metrics`` (Prometheus text).

Errors are JSON ``{"error": ..., "detail": ...}``: 400 bad image or body, 408 body not
received in time, 413 body too large, 415 content type, 503 queue full or not ready (with
``Retry-After``), 504 timeout, 500 inference failure (that batch only).  Decoding runs in a thread pool and
inference in one executor thread, through the ``DynamicBatcher``.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import functools
import logging
import math
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
from starlette.applications import Starlette
from starlette.datastructures import UploadFile
from starlette.formparsers import MultiPartException, MultiPartParser
from starlette.middleware import Middleware
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from embedx import untrusted
from embedx.errors import ConfigError, EmbedxError, ImageDecodeError
from embedx.predict import FULL_IMAGE, load_model
from embedx.preprocess import decode_reason
from embedx.serve.batcher import BatchFailedError, DynamicBatcher, QueueFullError, ShuttingDownError
from embedx.serve.calibrate import (
    AUTO,
    BatchCap,
    Buckets,
    batch_sizes,
    parse_batch_cap,
    release_larger_batches,
    resolve_batch_cap,
    runs_on_gpu,
)
from embedx.serve.prometheus import ServeMetrics

logger = logging.getLogger(__name__)

RAW_TYPES = ("application/octet-stream",)
ROUTES = ("/v1/predict", "/v1/model", "/health/live", "/health/ready", "/metrics")


@dataclass(frozen=True)
class ServeConfig:
    """The server's knobs; the CLI options of ``embedx serve-onnx`` map onto these."""

    max_batch: int = 32
    batch_cap: str | int = AUTO  # "auto": measured at warm-up (see calibrate.py); N: at most N
    max_delay_ms: float = 5.0
    max_queue: int = 256
    max_body_mb: float = 16.0
    timeout_s: float = 30.0
    workers_decode: int = 2
    top_k: int = 5
    device: str = "auto"
    threads: int | None = None
    #: pad batches to fixed sizes (1, 2, 4, ... max_batch) warmed at start-up: None = on a GPU only
    buckets: bool | None = None
    #: one session per bucket (each sees one batch shape): None = when buckets are on, on a GPU
    bucket_sessions: bool | None = None

    def __post_init__(self) -> None:
        problems = []
        if self.max_batch < 1:
            problems.append(f"max_batch must be >= 1, got {self.max_batch}")
        for name in ("max_delay_ms", "max_body_mb", "timeout_s"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                # NaN passes every comparison below, and then every request fails while /health/ready says 200
                problems.append(f"{name} must be a finite number, got {value!r}")
                object.__setattr__(self, name, getattr(ServeConfig, name))  # the checks below stay meaningful
        if self.max_delay_ms < 0:
            problems.append(f"max_delay_ms must be >= 0, got {self.max_delay_ms}")
        if self.max_queue < 1:
            problems.append(f"max_queue must be >= 1, got {self.max_queue}")
        if self.max_body_mb <= 0:
            problems.append(f"max_body_mb must be > 0, got {self.max_body_mb}")
        if self.timeout_s <= 0:
            problems.append(f"timeout_s must be > 0, got {self.timeout_s}")
        if self.workers_decode < 1:
            problems.append(f"workers_decode must be >= 1, got {self.workers_decode}")
        if self.top_k < 1:
            problems.append(f"top_k must be >= 1, got {self.top_k}")
        try:
            object.__setattr__(self, "batch_cap", parse_batch_cap(self.batch_cap))
        except ConfigError as e:
            problems.append(str(e))
        if problems:
            raise ConfigError("; ".join(problems))

    @property
    def max_body_bytes(self) -> int:
        return int(self.max_body_mb * 1024 * 1024)


class HttpError(Exception):
    """A request answered with an error status and a JSON body."""

    def __init__(self, status: int, error: str, detail: str, *, reason: str, retry_after: int | None = None):
        super().__init__(detail)
        self.status, self.error, self.detail, self.reason = status, error, detail, reason
        self.retry_after = retry_after

    def response(self) -> JSONResponse:
        headers = {"Retry-After": str(self.retry_after)} if self.retry_after is not None else None
        return JSONResponse({"error": self.error, "detail": self.detail}, status_code=self.status, headers=headers)


class _MetricsMiddleware:
    """Counts every response by route and status and times it (pure ASGI, no buffering)."""

    def __init__(self, app: Any, metrics: ServeMetrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        route = scope["path"] if scope["path"] in ROUTES else "other"
        start = time.perf_counter()
        status = 500

        async def send_and_observe(message: dict) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                self.metrics.latency.labels(route).observe(time.perf_counter() - start)
            await send(message)

        try:
            await self.app(scope, receive, send_and_observe)
        finally:
            self.metrics.requests.labels(route, str(status)).inc()


class _Server:
    """State of one app: the model, the batcher, the pools, readiness."""

    def __init__(self, model: Any, config: ServeConfig) -> None:
        self.model = model
        self.config = config
        self.metrics = ServeMetrics()
        self.ready = False
        self.warmup_error: str | None = None
        self.batch_cap: BatchCap | None = None  # set at warm-up
        self.decode_pool: ThreadPoolExecutor | None = None
        self.ort_pool: ThreadPoolExecutor | None = None
        self.batcher: DynamicBatcher | None = None
        on_gpu = runs_on_gpu(model)
        # a model exported with a fixed batch size pads its own chunks: buckets would pad twice
        fixed = getattr(model, "fixed_batch", None) is not None
        # a bundle taking full images sees every image size: padding batches to fixed shapes cannot help it
        full = getattr(model, "input_format", "") == FULL_IMAGE
        bucketed = (on_gpu if config.buckets is None else config.buckets) and not fixed and not full
        #: the batch sizes the model ever sees, all warmed before ready (None: any size)
        self.buckets: list[int] | None = batch_sizes(config.max_batch) if bucketed else None
        self.run_batch = Buckets(model.predict_proba, self.buckets) if bucketed else model.predict_proba
        sessions = on_gpu if config.bucket_sessions is None else config.bucket_sessions
        #: sessions of their own for the buckets below max_batch (opened at warm-up)
        self.bucket_sessions = bool(bucketed and sessions and hasattr(model, "path"))

    # -- lifecycle ---------------------------------------------------------------

    @asynccontextmanager
    async def lifespan(self, app: Starlette):
        self.decode_pool = ThreadPoolExecutor(self.config.workers_decode, thread_name_prefix="embedx-decode")
        self.ort_pool = ThreadPoolExecutor(1, thread_name_prefix="embedx-ort")
        self.batcher = DynamicBatcher(
            self.run_batch,
            executor=self.ort_pool,
            max_batch=self.config.max_batch,
            max_delay_s=self.config.max_delay_ms / 1000.0,
            max_queue=self.config.max_queue,
            on_batch=self._observe_batch,
            on_queue=self.metrics.queue_depth.set,
        )
        self.batcher.start()
        self.metrics.incoming.set_function(lambda: self.batcher.incoming_count)
        warmup = asyncio.get_running_loop().create_task(self._warm_up())
        try:
            yield
        finally:
            self.ready = False  # draining: /health/ready turns 503 so that no new traffic is sent here
            logger.info("shutting down: draining %d queued images", self.batcher.depth)
            warmup.cancel()
            await asyncio.gather(warmup, return_exceptions=True)
            await self.batcher.close()
            self.decode_pool.shutdown(wait=False, cancel_futures=True)
            self.ort_pool.shutdown(wait=True)

    async def _warm_up(self) -> None:
        """One inference at max_batch and one at batch 1, so the first user waits for neither
        (the largest first: onnxruntime's arena then has room for every smaller batch, and
        TensorRT's engine covers the whole 1..max_batch range before the first request), and
        with buckets one at every bucket size (each shape's search happens here, once); then
        the batch cap (``--batch-cap auto`` times the model at batch 1, 2, 4, ...), on
        steady-state calls."""
        loop = asyncio.get_running_loop()
        start = time.perf_counter()
        try:
            if self.bucket_sessions:
                await loop.run_in_executor(self.ort_pool, self._open_bucket_sessions)
            for size in sorted(set(self.buckets or ()) | {1, self.config.max_batch}, reverse=True):
                await loop.run_in_executor(self.ort_pool, self.run_batch, self.model.warmup_input(size))
            cap = await loop.run_in_executor(self.ort_pool, functools.partial(
                resolve_batch_cap, self.model, batch_cap=self.config.batch_cap, max_batch=self.config.max_batch,
                run_batch=self.run_batch))
            if cap.cap < self.config.max_batch and self.buckets is None:
                # batches stay at most cap.cap: free what the larger ones took (CPU arena)
                await loop.run_in_executor(self.ort_pool, release_larger_batches, self.model, cap.cap)
        except Exception as e:  # a model that cannot run stays not-ready, with the reason
            self.warmup_error = f"{type(e).__name__}: {e}"
            logger.error("warm-up inference failed: %s", self.warmup_error)
            return
        self._set_batch_cap(cap)
        self.ready = True
        logger.info("warm-up done in %.2f s; ready", time.perf_counter() - start)

    def _open_bucket_sessions(self) -> None:
        """A session per bucket below max_batch (the loaded model keeps max_batch), each warmed.
        One that cannot be opened (device memory) leaves its bucket on the shared session."""
        runtime = getattr(self.model, "runtime", None)
        device = getattr(runtime, "device", self.config.device)
        for size in self.buckets[:-1]:
            try:
                model = load_model(self.model.path, device=device, threads=self.config.threads, spinning=False)
                model.predict_proba(self.model.warmup_input(size))
            except Exception as e:  # noqa: BLE001 - the shared session still serves this bucket
                logger.warning("bucket %d keeps the shared session: its own failed to open (%s)", size, e)
                continue
            self.run_batch.runners[size] = model.predict_proba

    def _set_batch_cap(self, cap: BatchCap) -> None:
        self.batch_cap = cap
        self.batcher.max_batch = cap.cap  # no request has been taken yet: not ready until now
        self.metrics.batch_cap.set(cap.cap)
        for size, rate in cap.rates.items():
            self.metrics.calibration_rate.labels(str(size)).set(rate)
        logger.info("%s", cap.describe())

    def _observe_batch(self, size: int, seconds: float) -> None:
        self.metrics.batch_size.observe(size)
        self.metrics.inference_seconds.observe(seconds)
        self.metrics.images.inc(size)

    # -- routes ------------------------------------------------------------------

    async def live(self, request: Request) -> Response:
        return JSONResponse({"status": "live"})

    async def ready_route(self, request: Request) -> Response:
        if self.ready:
            return JSONResponse({"status": "ready"})
        if self.warmup_error:
            return JSONResponse({"status": "failed", "detail": self.warmup_error}, status_code=503)
        return JSONResponse({"status": "warming up"}, status_code=503, headers={"Retry-After": "1"})

    async def model_info(self, request: Request) -> Response:
        info = self.model.describe()
        info["server"] = asdict(self.config) | {
            "ready": self.ready,
            "max_body_bytes": self.config.max_body_bytes,
            # the cap in use and the img/s by batch size it was chosen from; None before warm-up
            "batching": self.batch_cap.to_dict() if self.batch_cap else None,
            "buckets": self.buckets,
            "bucket_sessions": self.bucket_sessions,
        }
        return JSONResponse(info)

    async def metrics_route(self, request: Request) -> Response:
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return Response(generate_latest(self.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    async def predict(self, request: Request) -> Response:
        deadline = time.monotonic() + self.config.timeout_s
        try:
            if not self.ready:
                raise HttpError(503, "not ready", "the model is still warming up", reason="not_ready", retry_after=1)
            top_k = self._top_k(request)
            with self.batcher.incoming():  # a batch forming now waits for this request's images
                try:
                    images, batched = await asyncio.wait_for(self._read_images(request), self.config.timeout_s)
                except asyncio.TimeoutError as e:
                    raise HttpError(
                        408, "request timeout",
                        f"the request body did not arrive within {self.config.timeout_s:g} s", reason="timeout",
                    ) from e
                arrays = await self._decode(images, batched, deadline)
                futures = self._submit(arrays)
            rows = await self._results(futures, deadline)
        except HttpError as e:
            self.metrics.errors.labels(e.reason).inc()
            return e.response()
        results = [self._result(row, top_k) for row in rows]
        return JSONResponse({"results": results} if batched else results[0])

    def _result(self, row: np.ndarray, top_k: int) -> dict[str, Any]:
        ranked = self.model.top_k(row, top_k)
        return {"label": ranked[0]["label"], "probability": ranked[0]["probability"], "top_k": ranked}

    def _top_k(self, request: Request) -> int:
        text = request.query_params.get("top_k")
        if text is None:
            return self.config.top_k
        try:
            value = int(text)
        except ValueError:
            value = 0
        if value < 1:
            raise HttpError(400, "bad query", f"top_k must be a positive integer, got {text!r}", reason="bad_request")
        return value

    async def _read_body(self, request: Request) -> bytes:
        limit = self.config.max_body_bytes
        too_large = HttpError(
            413, "body too large", f"the request body exceeds the limit of {limit} bytes "
            f"({self.config.max_body_mb:g} MB); send a smaller image", reason="too_large",
        )
        declared = request.headers.get("content-length", "").strip()
        # ASCII digits only ('\xb2' is a digit to isdigit(), not to int()); a number longer than the
        # limit is larger than it, and int() refuses more than 4,300 digits
        digits = declared.lstrip("0") if declared.isascii() and declared.isdigit() else ""
        if len(digits) > len(str(limit)) or (digits and int(digits) > limit):
            raise too_large
        chunks, size = [], 0
        try:
            async for chunk in request.stream():
                size += len(chunk)
                if size > limit:
                    raise too_large
                chunks.append(chunk)
        except ClientDisconnect as e:
            raise HttpError(400, "client disconnected", "the body ended early", reason="bad_request") from e
        return b"".join(chunks)

    async def _read_images(self, request: Request) -> tuple[list[bytes], bool]:
        """The request's image bytes, and whether it was a batch."""
        media_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if not (media_type in ("", "multipart/form-data", "application/json", *RAW_TYPES)
                or media_type.startswith("image/")):
            raise HttpError(
                415, "unsupported content type",
                f"got Content-Type {media_type!r}; send image/* or application/octet-stream bytes, "
                "multipart/form-data with a 'file' field, or application/json {\"images\": [base64, ...]}",
                reason="unsupported_type",
            )
        body = await self._read_body(request)
        if media_type == "multipart/form-data":
            images = await self._multipart_images(request, body)
            return images, len(images) > 1
        if media_type == "application/json":
            return self._json_images(body)
        if not body:
            raise HttpError(400, "empty body", "the request body is empty; send the image bytes", reason="bad_request")
        return [body], False

    async def _multipart_images(self, request: Request, body: bytes) -> list[bytes]:
        async def stream():
            yield body
            yield b""

        parser = MultiPartParser(request.headers, stream(), max_part_size=self.config.max_body_bytes)
        try:
            form = await parser.parse()
        except MultiPartException as e:
            raise HttpError(400, "bad multipart body", e.message, reason="bad_request") from e
        try:
            uploads = [v for v in form.getlist("file") if isinstance(v, UploadFile)]
            if not uploads:
                uploads = [v for _, v in form.multi_items() if isinstance(v, UploadFile)]
            if not uploads:
                raise HttpError(
                    400, "no image", "the multipart body has no file; upload the image as field 'file'",
                    reason="bad_request",
                )
            self._check_count(len(uploads))
            return [await upload.read() for upload in uploads]
        finally:
            await form.close()

    def _json_images(self, body: bytes) -> tuple[list[bytes], bool]:
        usage = 'send {"image": "<base64>"} or {"images": ["<base64>", ...]}'
        try:  # size and nesting limits before the parser (json.loads recurses once per level)
            document = untrusted.loads(body, what="the body", max_bytes=self.config.max_body_bytes)
        except EmbedxError as e:
            raise HttpError(400, "bad json", f"{e}; {usage}", reason="bad_request") from e
        if isinstance(document, dict) and isinstance(document.get("images"), list):
            encoded, batched = document["images"], True
        elif isinstance(document, dict) and isinstance(document.get("image"), str):
            encoded, batched = [document["image"]], False
        else:
            raise HttpError(400, "bad json", f"no 'image' or 'images' key; {usage}", reason="bad_request")
        if not encoded:
            raise HttpError(400, "no image", f"'images' is empty; {usage}", reason="bad_request")
        self._check_count(len(encoded))
        images = []
        for index, text in enumerate(encoded):
            where = f"images[{index}]" if batched else "image"
            if not isinstance(text, str):
                raise HttpError(400, "bad base64", f"{where} is not a string", reason="bad_image")
            if text.startswith("data:") and "," in text:
                text = text.split(",", 1)[1]  # a data: URL
            try:
                images.append(base64.b64decode(text, validate=True))
            except (binascii.Error, ValueError) as e:
                raise HttpError(400, "bad base64", f"{where} is not valid base64: {e}", reason="bad_image") from e
        return images, batched

    def _check_count(self, count: int) -> None:
        """More images than the queue holds can never be accepted: 413, not a 503 to retry forever."""
        if count > self.config.max_queue:
            raise HttpError(
                413, "too many images", f"{count} images in one request; the server queues at most "
                f"{self.config.max_queue}: send at most that many per request", reason="too_large",
            )

    async def _decode(self, images: list[bytes], batched: bool, deadline: float) -> list[np.ndarray]:
        loop = asyncio.get_running_loop()
        tasks = [loop.run_in_executor(self.decode_pool, self.model.prepare, image) for image in images]
        try:
            outcomes = await asyncio.wait_for(
                asyncio.gather(*tasks, return_exceptions=True), max(deadline - time.monotonic(), 0.001)
            )
        except asyncio.TimeoutError as e:
            raise self._timeout("decoding") from e
        for index, outcome in enumerate(outcomes):
            if isinstance(outcome, ImageDecodeError):
                where = f"images[{index}]: " if batched else ""
                raise HttpError(400, "invalid image", where + decode_reason(outcome), reason="bad_image")
            if isinstance(outcome, BaseException):
                raise outcome
        return outcomes

    def _submit(self, arrays: list[np.ndarray]) -> list[asyncio.Future]:
        try:
            return self.batcher.submit(arrays)
        except QueueFullError as e:
            raise HttpError(503, "queue full", str(e), reason="queue_full", retry_after=1) from e
        except ShuttingDownError as e:
            raise HttpError(503, "shutting down", str(e), reason="shutting_down", retry_after=1) from e

    async def _results(self, futures: list[asyncio.Future], deadline: float) -> list[np.ndarray]:
        try:
            return await asyncio.wait_for(asyncio.gather(*futures), max(deadline - time.monotonic(), 0.001))
        except asyncio.TimeoutError as e:
            raise self._timeout("waiting for inference") from e
        except BatchFailedError as e:
            for future in futures:
                future.cancel()
            raise HttpError(500, "inference failed", str(e), reason="inference") from e

    def _timeout(self, stage: str) -> HttpError:
        return HttpError(
            504, "timeout", f"the request took longer than {self.config.timeout_s:g} s ({stage}); "
            "the server is overloaded, retry later", reason="timeout",
        )


def create_app(model_path: str | Path | None = None, *, model: Any = None, **options: Any) -> Starlette:
    """The Starlette app serving the bundle at ``model_path`` (or an already loaded ``model``).

    ``options`` are ``ServeConfig`` fields (``max_batch``, ``batch_cap``, ``max_delay_ms``, ...).  The
    model loads here, so a bad file fails before any port is bound; warm-up runs in the
    background after startup and ``/health/ready`` turns 200 when it is done.
    """
    config = ServeConfig(**options)
    if model is None:
        if model_path is None:
            raise ConfigError("create_app needs model_path (a bundle .onnx) or model=")
        # decode threads share the cores with ORT, so its threads must not spin-wait
        model = load_model(model_path, device=config.device, threads=config.threads, spinning=False)
    server = _Server(model, config)
    app = Starlette(
        routes=[
            Route("/v1/predict", server.predict, methods=["POST"]),
            Route("/v1/model", server.model_info, methods=["GET"]),
            Route("/health/live", server.live, methods=["GET"]),
            Route("/health/ready", server.ready_route, methods=["GET"]),
            Route("/metrics", server.metrics_route, methods=["GET"]),
        ],
        middleware=[Middleware(_MetricsMiddleware, metrics=server.metrics)],
        lifespan=server.lifespan,
    )
    app.state.server = server
    return app


def run(
    model_path: str | Path,
    *,
    host: str = "127.0.0.1",
    port: int = 8000,
    log_level: str = "info",
    access_log: bool = False,
    **options: Any,
) -> None:
    """Serve ``model_path`` with uvicorn until SIGINT/SIGTERM, then drain and stop."""
    import uvicorn
    from uvicorn.config import LOGGING_CONFIG

    app = create_app(model_path, **options)
    # embedx's own log lines (warm-up, the batch cap, failures) through uvicorn's handler
    log_config = {**LOGGING_CONFIG, "loggers": {
        **LOGGING_CONFIG["loggers"],
        "embedx": {"handlers": ["default"], "level": log_level.upper(), "propagate": False},
    }}
    config = app.state.server.config
    uvicorn_config = uvicorn.Config(
        app,
        host=host,
        port=port,
        log_level=log_level,
        log_config=log_config,
        access_log=access_log,
        # in-flight requests finish within their own timeout; then uvicorn stops waiting
        timeout_graceful_shutdown=config.timeout_s + 5,
        lifespan="on",
    )
    uvicorn.Server(uvicorn_config).run()
