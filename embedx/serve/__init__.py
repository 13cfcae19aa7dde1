"""``embedx serve-onnx``: one bundle over HTTP with dynamic batching (torch-free).

- ``app``: the Starlette app (``create_app``), its routes and errors, ``run`` (uvicorn).
- ``batcher``: ``DynamicBatcher``, which turns concurrent requests into one ORT call.
- ``prometheus``: the Prometheus metrics of one app, in a registry of its own.
"""

from embedx.serve.app import ServeConfig, create_app, run

__all__ = ["ServeConfig", "create_app", "run"]
