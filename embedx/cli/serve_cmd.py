"""``embedx serve-onnx``."""

from __future__ import annotations

from pathlib import Path

import click

from embedx.cli.types import FiniteFloatRange


def _batch_cap(ctx: click.Context, param: click.Parameter, value: str) -> str | int:
    from embedx.errors import ConfigError
    from embedx.serve.calibrate import parse_batch_cap

    try:
        return parse_batch_cap(value)
    except ConfigError as e:
        raise click.BadParameter(str(e)) from e


@click.command("serve-onnx")
@click.argument("model", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to bind (loopback by default).")
@click.option("--port", default=8000, show_default=True, type=click.IntRange(0, 65535))
@click.option("--max-batch", default=32, show_default=True, type=click.IntRange(min=1),
              help="Most images per onnxruntime call (1 turns dynamic batching off).")
@click.option("--batch-cap", default="auto", show_default=True, callback=_batch_cap, metavar="auto|N",
              help="Most images per onnxruntime call, at most --max-batch: 'auto' times the model at batch "
                   "1, 2, 4, ... at warm-up and takes the smallest size within 5% of the best img/s; "
                   "N fixes it (N >= --max-batch: batches of up to --max-batch, no timing).")
@click.option("--max-delay-ms", default=5.0, show_default=True, type=FiniteFloatRange(min=0),
              help="Longest wait for a batch to fill after its first image arrives.")
@click.option("--no-batching", is_flag=True, help="Same as --max-batch 1.")
@click.option("--max-queue", default=256, show_default=True, type=click.IntRange(min=1),
              help="Images waiting for inference before requests get 503.")
@click.option("--max-body-mb", default=16.0, show_default=True, type=FiniteFloatRange(min=0, min_open=True),
              help="Largest request body (413 above).")
@click.option("--timeout-s", default=30.0, show_default=True, type=FiniteFloatRange(min=0, min_open=True),
              help="Per-request time limit (504 above).")
@click.option("--workers-decode", default=2, show_default=True, type=click.IntRange(min=1),
              help="Threads that decode and resize images.")
@click.option("--threads", default=None, type=click.IntRange(min=1), help="onnxruntime intra-op threads.")
@click.option("-k", "--top-k", default=5, show_default=True, type=click.IntRange(min=1),
              help="Classes per image in answers (a request may ask ?top_k=K).")
@click.option("--device", default="auto", show_default=True, type=click.Choice(["auto", "cpu", "cuda", "tensorrt"]))
@click.option("--buckets", default="auto", show_default=True, type=click.Choice(["auto", "on", "off"]),
              help="Pad every batch to 1, 2, 4, ... --max-batch images, each size warmed before the server is "
                   "ready (auto: on a GPU, where each new shape costs a kernel search).")
@click.option("--log-level", default="info", show_default=True,
              type=click.Choice(["critical", "error", "warning", "info", "debug"]))
@click.option("--access-log", is_flag=True, help="Log every request.")
def serve_command(model: Path, host: str, port: int, max_batch: int, batch_cap: str | int, max_delay_ms: float,
                  no_batching: bool, max_queue: int, max_body_mb: float, timeout_s: float, workers_decode: int,
                  threads: int | None, top_k: int, device: str, buckets: str, log_level: str,
                  access_log: bool) -> None:
    """Serve a bundle over HTTP: POST /v1/predict, GET /v1/model, /health/*, /metrics."""
    from embedx.serve import run

    click.echo(f"serving {model} on http://{host}:{port} (POST /v1/predict)", err=True)
    run(
        model,
        host=host,
        port=port,
        log_level=log_level,
        access_log=access_log,
        max_batch=1 if no_batching else max_batch,
        batch_cap=batch_cap,
        max_delay_ms=max_delay_ms,
        max_queue=max_queue,
        max_body_mb=max_body_mb,
        timeout_s=timeout_s,
        workers_decode=workers_decode,
        threads=threads,
        top_k=top_k,
        device=device,
        buckets={"auto": None, "on": True, "off": False}[buckets],
    )


COMMANDS = [serve_command]
