"""Prometheus metrics of one server, in a registry of its own (no global state)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


class ServeMetrics:
    """Request counts by route and status, latency, batch size, batch cap, queue depth."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "embedx_requests",
            "HTTP requests by route and status code.",
            ["route", "status"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "embedx_request_latency_seconds",
            "Time from request start to response start, by route.",
            ["route"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.batch_size = Histogram(
            "embedx_batch_size",
            "Images per onnxruntime call.",
            buckets=BATCH_BUCKETS,
            registry=self.registry,
        )
        self.inference_seconds = Histogram(
            "embedx_inference_seconds",
            "Duration of one onnxruntime call.",
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.queue_depth = Gauge(
            "embedx_queue_depth",
            "Images waiting for the batcher.",
            registry=self.registry,
        )
        self.incoming = Gauge(
            "embedx_requests_incoming",
            "Predict requests being read or decoded, whose images a forming batch waits for.",
            registry=self.registry,
        )
        self.batch_cap = Gauge(
            "embedx_batch_cap",
            "Most images per onnxruntime call: --batch-cap, or measured at warm-up (auto).",
            registry=self.registry,
        )
        self.calibration_rate = Gauge(
            "embedx_batch_calibration_images_per_second",
            "The model's img/s at each batch size, measured at warm-up for --batch-cap auto.",
            ["batch_size"],
            registry=self.registry,
        )
        self.images = Counter(
            "embedx_images",
            "Images classified.",
            registry=self.registry,
        )
        self.errors = Counter(
            "embedx_errors",
            "Requests refused or failed, by reason.",
            ["reason"],
            registry=self.registry,
        )
