"""serve-onnx under load: dynamic batching on vs off, and a malformed-traffic soak.

The server runs as its own process (``python -m embedx serve-onnx``) on a loopback
port.  The client is a lean HTTP/1.1 keep-alive client on asyncio streams (one
connection per simulated client, Content-Length framing): it costs about 0.3-1 ms of
CPU per request where httpx's async client cost 3-3.5 ms, and on a 2-core machine
every client millisecond is taken from the server.  Every request posts one real JPEG
(hymenoptera, or generated images where absent).

0. The ceiling: the same bundle in onnxruntime alone (no HTTP, no decoding), img/s at
   batch 1, 8 and 32 with the server's session settings.  Batching cannot make the
   server gain more than the model gains from batch size.
1. Throughput and p50/p99 latency at 1, 8 and 32 concurrent clients, with batching
   on (``--max-batch 32 --max-delay-ms 5`` and the product default ``--batch-cap auto``:
   the server times the model at batch 1, 2, 4, ... 32 at warm-up and caps its batches;
   the cap it chose and the img/s it measured are reported) and off (``--max-batch 1``:
   the same server, one image per ORT call, calls one after another with all intra-op
   threads, nothing timed at warm-up), same run; with the server's and the client's CPU
   time per request.
2. A soak of 10,000 requests (1,000 with ``--quick``) at 32 clients, 5% malformed
   (truncated JPEG, random bytes, empty body, wrong content type, bad base64, too
   large): counts 5xx (must be 0) and malformed answers that are not 4xx (must be 0).
3. Server RSS after warm-up and after each phase (memory must stay flat).

    python bench/serve.py [--quick] [--model bundle.onnx] [--backbone efficientnet_lite0]
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import json
import os
import random
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

import numpy as np  # noqa: E402

from bench.common import HYMENOPTERA, markdown_table, write_result  # noqa: E402

CONCURRENCY = (1, 8, 32)
ROUNDS = 2  # slices per load level, the modes alternating
MODES = {"on": ["--max-batch", "32", "--batch-cap", "auto", "--max-delay-ms", "5"], "off": ["--max-batch", "1"]}


# -- the model ------------------------------------------------------------------------


def build_bundle(backbone: str, weights: str, folder: Path) -> Path:
    """Export ``backbone`` and put a random 2-class linear head on it (serving cost is the
    backbone's; the head's weights do not matter here)."""
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from embedx.bundle import compose, save
    from embedx.export import export_backbone
    from embedx.preprocess import PreprocessSpec

    exported = export_backbone(backbone, weights=weights)
    dim = exported.feature_dim
    rng = np.random.default_rng(0)
    head = helper.make_model(
        helper.make_graph(
            [helper.make_node("Gemm", ["features", "W", "b"], ["logits"])],
            "bench_head",
            [helper.make_tensor_value_info("features", TensorProto.FLOAT, ["N", dim])],
            [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 2])],
            [numpy_helper.from_array(rng.normal(0, 0.05, (dim, 2)).astype(np.float32), "W"),
             numpy_helper.from_array(np.zeros(2, np.float32), "b")],
        ),
        opset_imports=[helper.make_opsetid("", 17)],
    )
    spec = exported.preprocess
    spec = spec if isinstance(spec, PreprocessSpec) else PreprocessSpec.from_dict(spec)
    model = compose(onnx.load(str(exported.path)), head, classes=["ants", "bees"], temperature=1.0,
                    preprocess=spec, metadata={"backbone": backbone, "weights": exported.weights_tag})
    return save(model, folder / f"{backbone}-bench.onnx")


# -- the payloads ---------------------------------------------------------------------


def good_images(limit: int) -> list[bytes]:
    files = sorted(p for p in (HYMENOPTERA / "val").rglob("*.jpg"))[:limit] if HYMENOPTERA.is_dir() else []
    if files:
        return [p.read_bytes() for p in files]
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    out = []
    for _ in range(limit):
        buffer = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (375, 500, 3), dtype=np.uint8)).save(buffer, "JPEG", quality=85)
        out.append(buffer.getvalue())
    return out


def request(body: bytes, content_type: str, kind: str = "good") -> dict:
    return {"kind": kind, "body": body, "content_type": content_type}


def malformed_requests(image: bytes, max_body: int) -> list[dict]:
    """One request of each malformed kind."""
    def as_json(document: dict, kind: str) -> dict:
        return request(json.dumps(document).encode(), "application/json", kind)

    return [
        request(image[: len(image) // 3], "image/jpeg", "truncated_jpeg"),
        request(os.urandom(2048), "image/jpeg", "random_bytes"),
        request(b"", "image/jpeg", "empty_body"),
        request(b"hello", "text/plain", "wrong_content_type"),
        as_json({"images": ["@@not base64@@"]}, "bad_base64"),
        as_json({"image": base64.b64encode(b"GIF89a broken").decode()}, "not_an_image_in_json"),
        request(b"\xff\xd8" + bytes(max_body + 10), "image/jpeg", "too_large"),
    ]


# -- the server -----------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class ServerProcess:
    """``python -m embedx serve-onnx MODEL --port P OPTIONS`` as a child process (tests use it too)."""

    def __init__(self, model: Path, options: list[str], log: Path) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = log
        command = [sys.executable, "-m", "embedx", "serve-onnx", str(model), "--port", str(self.port),
                   "--log-level", "warning", *options]
        self.handle = open(log, "wb")
        self.process = subprocess.Popen(command, stdout=self.handle, stderr=subprocess.STDOUT)

    def wait_ready(self, timeout: float = 180) -> None:
        """Poll /health/ready until 200; raise with the server's log if it dies or times out."""
        import httpx

        deadline = time.monotonic() + timeout
        with httpx.Client(timeout=5) as client:  # one client: a new one per poll costs ~10 ms of CPU
            while time.monotonic() < deadline:
                if self.process.poll() is not None:
                    raise RuntimeError(f"server exited with {self.process.returncode}:\n{self.log.read_text()[-4000:]}")
                try:
                    if client.get(self.url + "/health/ready").status_code == 200:
                        return
                except httpx.TransportError:
                    pass
                time.sleep(0.1)
        raise RuntimeError(f"server not ready after {timeout} s:\n{self.log.read_text()[-4000:]}")

    def batching(self) -> dict:
        """The batch cap the server uses and how it was chosen (``server.batching`` of /v1/model)."""
        import httpx

        return httpx.get(self.url + "/v1/model").json()["server"]["batching"]

    def rss_mb(self) -> float:
        with open(f"/proc/{self.process.pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
        return float("nan")

    def cpu_seconds(self) -> float:
        """User + system CPU time of the server process so far."""
        with open(f"/proc/{self.process.pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def batches(self) -> tuple[float, float]:
        """(ORT calls, images) so far, from /metrics."""
        import httpx
        from prometheus_client.parser import text_string_to_metric_families

        values = {}
        for family in text_string_to_metric_families(httpx.get(self.url + "/metrics").text):
            for sample in family.samples:
                values[sample.name] = sample.value
        return values.get("embedx_batch_size_count", 0.0), values.get("embedx_batch_size_sum", 0.0)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.handle.close()


# -- the client -----------------------------------------------------------------------


class Connection:
    """One keep-alive HTTP/1.1 connection: POST a body, read status and body (Content-Length
    framing, as uvicorn answers); reconnects after the server closes it."""

    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        self.reader = self.writer = None

    async def post(self, path: str, body: bytes, content_type: str) -> int:
        if self.writer is None:
            self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
        head = (f"POST {path} HTTP/1.1\r\nhost: {self.host}:{self.port}\r\ncontent-type: {content_type}\r\n"
                f"content-length: {len(body)}\r\n\r\n")
        self.writer.write(head.encode("latin-1") + body)
        try:
            await self.writer.drain()
        except ConnectionError:
            pass  # the server may answer (413) and close before taking the whole body
        status_line = await self.reader.readline()
        if not status_line:
            raise ConnectionError("the server closed the connection before answering")
        status = int(status_line.split()[1])
        length, close = 0, False
        while (line := await self.reader.readline()) not in (b"\r\n", b""):
            name, _, value = line.decode("latin-1").partition(":")
            name = name.strip().lower()
            if name == "content-length":
                length = int(value)
            elif name == "connection":
                close = value.strip().lower() == "close"
        await self.reader.readexactly(length)
        if close:
            self.close()
        return status


async def load(url: str, requests: list[dict], concurrency: int, time_limit: float) -> dict:
    """Send ``requests`` from ``concurrency`` clients; latencies and statuses per request."""
    host, port = url.removeprefix("http://").split(":")
    results: list[tuple[str, int, float]] = []
    cursor = iter(range(len(requests)))
    stop_at = time.perf_counter() + time_limit

    async def client_task() -> None:
        connection = Connection(host, int(port))
        try:
            for index in cursor:
                if time.perf_counter() > stop_at:
                    return
                request = requests[index]
                start = time.perf_counter()
                try:
                    status = await asyncio.wait_for(
                        connection.post("/v1/predict", request["body"], request["content_type"]), 60)
                except (OSError, ValueError, IndexError, asyncio.IncompleteReadError, asyncio.TimeoutError):
                    status = 0  # transport failure: counted apart from HTTP statuses
                    connection.close()
                results.append((request["kind"], status, time.perf_counter() - start))
        finally:
            connection.close()

    cpu_before, start = time.process_time(), time.perf_counter()
    await asyncio.gather(*(client_task() for _ in range(concurrency)))
    wall = time.perf_counter() - start
    latencies = sorted(seconds for kind, status, seconds in results if kind == "good" and status == 200)
    statuses: dict[str, int] = {}
    for _, status, _ in results:
        statuses[str(status)] = statuses.get(str(status), 0) + 1
    return {
        "requests": len(results),
        "seconds": wall,
        "throughput_rps": len(results) / wall if wall else 0.0,
        "p50_ms": 1000 * percentile(latencies, 50),
        "p99_ms": 1000 * percentile(latencies, 99),
        "client_cpu_ms": 1000 * (time.process_time() - cpu_before) / max(len(results), 1),
        "statuses": statuses,
        "results": results,
    }


def measure(server: ServerProcess, requests: list[dict], concurrency: int, time_limit: float) -> dict:
    """One round of one load level against one server: what ``load`` reports, plus the
    server's ORT calls, images and CPU seconds over the round."""
    calls_before, images_before = server.batches()
    cpu_before = server.cpu_seconds()
    result = asyncio.run(load(server.url, requests, concurrency, time_limit))
    calls, images_done = server.batches()
    return {**result, "calls": calls - calls_before, "images": images_done - images_before,
            "server_cpu_s": server.cpu_seconds() - cpu_before,
            "client_cpu_s": result["client_cpu_ms"] * result["requests"] / 1000}


def level_row(mode: str, concurrency: int, rounds: list[dict]) -> dict:
    """The table row of one mode at one load level, over its rounds."""
    requests = sum(r["requests"] for r in rounds)
    seconds = sum(r["seconds"] for r in rounds)
    latencies = sorted(t for r in rounds for kind, status, t in r["results"] if kind == "good" and status == 200)
    statuses: dict[str, int] = {}
    for r in rounds:
        for status, count in r["statuses"].items():
            statuses[status] = statuses.get(status, 0) + count
    server_cpu = sum(r["server_cpu_s"] for r in rounds)
    row = {
        "batching": mode, "concurrency": concurrency, "requests": requests, "seconds": seconds,
        "throughput_rps": requests / seconds if seconds else 0.0,
        "p50_ms": 1000 * percentile(latencies, 50), "p99_ms": 1000 * percentile(latencies, 99),
        "mean_batch": sum(r["images"] for r in rounds) / max(sum(r["calls"] for r in rounds), 1),
        "server_cpu_ms": 1000 * server_cpu / max(requests, 1),
        "server_cores": server_cpu / seconds if seconds else 0.0,
        "client_cpu_ms": 1000 * sum(r["client_cpu_s"] for r in rounds) / max(requests, 1),
        "statuses": statuses, "rounds_rps": [r["throughput_rps"] for r in rounds],
    }
    print(f"batching {mode:3} clients {concurrency:2}: {row['throughput_rps']:.1f} req/s "
          f"(rounds {', '.join(f'{x:.0f}' for x in row['rounds_rps'])}), "
          f"p50 {row['p50_ms']:.0f} ms, p99 {row['p99_ms']:.0f} ms, mean batch {row['mean_batch']:.1f}, "
          f"server {row['server_cpu_ms']:.1f} ms CPU/req ({row['server_cores']:.2f} cores), "
          f"client {row['client_cpu_ms']:.2f} ms CPU/req, {row['statuses']}; load {os.getloadavg()[0]:.1f}",
          file=sys.stderr)
    return row


def model_ceiling(model: Path, images: list[bytes], server_args: str) -> dict:
    """img/s of the bundle in onnxruntime alone at batch 1, 8 and 32 (best of 3 rounds of 32 images), with the
    server's session settings (CPU, no spinning, ``--threads`` from ``server_args``)."""
    from embedx.predict import load_model

    words = server_args.split()
    threads = int(words[words.index("--threads") + 1]) if "--threads" in words else None
    classifier = load_model(model, device="cpu", threads=threads, spinning=False)
    batch = np.stack([classifier.prepare(images[i % len(images)]) for i in range(32)])
    sizes = (1, 8, 32)
    best = dict.fromkeys(sizes, float("inf"))
    for size in sizes:
        classifier.predict_proba(batch[:size])  # warm-up
    for _ in range(3):  # the sizes take turns, so a burst of load elsewhere hits them alike
        for size in sizes:
            start = time.perf_counter()
            for _ in range(32 // size):
                classifier.predict_proba(batch[:size])
            best[size] = min(best[size], (time.perf_counter() - start) / 32)
    rates = {f"batch_{size}_img_s": 1 / seconds for size, seconds in best.items()}
    ceiling = {**rates, "ratio_32_over_1": rates["batch_32_img_s"] / rates["batch_1_img_s"],
               "best_over_1": max(rates.values()) / rates["batch_1_img_s"]}
    print(f"{model.name} alone (onnxruntime, no HTTP, no decode): "
          f"{', '.join(f'{k} {v:.0f}' for k, v in rates.items())}; "
          f"batch 32 / batch 1 = {ceiling['ratio_32_over_1']:.2f}x", file=sys.stderr)
    return ceiling


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=100, method="inclusive")[int(q) - 1] if q < 100 else values[-1]


# -- main -----------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small counts (about a minute)")
    parser.add_argument("--out", default=None, help="JSON result path (default bench/results/serve.json)")
    parser.add_argument("--model", type=Path, default=None, help="a bundle to serve (default: build one)")
    parser.add_argument("--backbone", default="efficientnet_lite0")
    parser.add_argument("--weights", default="DEFAULT")
    parser.add_argument("--soak", type=int, default=None, help="requests in the malformed soak (10000; quick 1000)")
    parser.add_argument("--time-limit", type=float, default=None, help="seconds per load level at most")
    parser.add_argument("--server-args", default="", help="extra serve-onnx options for both modes, e.g. '--threads 1'")
    parser.add_argument("--modes", default="on,off", help="which of on,off to run (the ratio needs both)")
    parser.add_argument("--max-batch", type=int, default=32, help="--max-batch of the batching-on server")
    parser.add_argument("--batch-cap", default="auto",
                        help="--batch-cap of the batching-on server (auto: measured at warm-up; 32: the old behaviour)")
    parser.add_argument("--ceiling-backbones", default="resnet18,mobilenet_v3_large",
                        help="more backbones whose model-alone batch gain is measured (random weights: the "
                             "timing does not depend on them); '' for none")
    args = parser.parse_args()

    per_client = 6 if args.quick else 25
    soak_count = args.soak or (1000 if args.quick else 10_000)
    time_limit = args.time_limit or (30.0 if args.quick else 120.0)
    workdir = Path(tempfile.mkdtemp(prefix="embedx-bench-serve-"))
    model = args.model or build_bundle(args.backbone, args.weights, workdir)
    images = good_images(64)
    good = [request(image, "image/jpeg") for image in images]
    print(f"model {model}; {len(images)} images, mean {statistics.mean(map(len, images)) / 1024:.0f} KiB",
          file=sys.stderr)

    modes = {"on": ["--max-batch", str(args.max_batch), "--batch-cap", args.batch_cap, "--max-delay-ms", "5"],
             "off": MODES["off"]}
    ceiling = model_ceiling(model, images, args.server_args)
    ceilings = {args.backbone: ceiling}
    for backbone in filter(None, args.ceiling_backbones.split(",")):
        if backbone != args.backbone:
            ceilings[backbone] = model_ceiling(build_bundle(backbone, "none", workdir), images, args.server_args)
    load_before = os.getloadavg()
    rows, memory = [], []
    soak = None
    servers = {}
    caps: dict[str, dict] = {}
    try:
        # both servers up at once, levels interleaved (on, off, on, off...): load from other
        # processes on a shared machine then hits both modes alike.  The idle one sleeps.
        for mode in (m for m in modes if m in args.modes.split(",")):
            extra = ["--device", "cpu", "--max-body-mb", "2", "--max-queue", "512", *args.server_args.split()]
            servers[mode] = server = ServerProcess(model, [*modes[mode], *extra], workdir / f"server-{mode}.log")
            server.wait_ready()  # one at a time: the other's start-up would disturb --batch-cap auto's timing
            caps[mode] = server.batching()
            print(f"batching {mode}: cap {cap_label(caps[mode])}, img/s by batch size at warm-up "
                  f"{caps[mode]['img_per_s']} ({caps[mode]['rounds']} rounds, {caps[mode]['seconds']:.1f} s); "
                  f"load {os.getloadavg()[0]:.1f}", file=sys.stderr)
            asyncio.run(load(server.url, good[:8], 4, time_limit))  # warm connections and caches
            memory.append({"mode": mode, "phase": "after warm-up", "rss_mb": server.rss_mb()})
        for concurrency in CONCURRENCY:
            # each level in ROUNDS slices, the modes taking turns, so that a burst of load from
            # elsewhere on a shared machine hits both alike
            count = max(per_client * concurrency, 30 if args.quick else 100) // ROUNDS
            requests = [good[i % len(good)] for i in range(count)]
            rounds: dict[str, list[dict]] = {mode: [] for mode in servers}
            for _ in range(ROUNDS):
                for mode, server in servers.items():
                    rounds[mode].append(measure(server, requests, concurrency, time_limit / ROUNDS))
            rows += [level_row(mode, concurrency, rounds[mode]) | {"batch_cap": cap_label(caps[mode])}
                     for mode in servers]
        for mode, server in servers.items():
            memory.append({"mode": mode, "phase": "after load", "rss_mb": server.rss_mb()})
        if "on" in servers:
            soak = run_soak(servers["on"], good, soak_count, time_limit * 4)
            memory.append({"mode": "on", "phase": "after soak", "rss_mb": servers["on"].rss_mb()})
    finally:
        for server in servers.values():
            server.stop()

    def at(mode: str, concurrency: int) -> dict:
        return next(r for r in rows if r["batching"] == mode and r["concurrency"] == concurrency)

    columns = ["batching", "batch_cap", "concurrency", "requests", "throughput_rps", "p50_ms", "p99_ms", "mean_batch",
               "server_cpu_ms", "client_cpu_ms"]
    table = markdown_table(rows, columns)
    print(table, file=sys.stderr)
    if {r["batching"] for r in rows} != set(MODES) or soak is None:
        return  # a partial run (--modes) is for experiments; nothing is written

    ratio = at("on", 32)["throughput_rps"] / at("off", 32)["throughput_rps"]
    rss = [m["rss_mb"] for m in memory if m["mode"] == "on"]
    summary = [
        {"what": f"{name} alone in onnxruntime, img/s at batch 1 vs 32 (the most batching can gain)",
         "baseline": f"{c['batch_1_img_s']:.0f}", "embedx": f"{c['batch_32_img_s']:.0f}", "ratio": c["ratio_32_over_1"]}
        for name, c in ceilings.items()
    ] + [
        {"what": f"{args.backbone} req/s at 32 clients, batching off vs on",
         "baseline": f"{at('off', 32)['throughput_rps']:.1f}", "embedx": f"{at('on', 32)['throughput_rps']:.1f}",
         "ratio": ratio},
        {"what": "p99 ms at 32 clients, batching off vs on", "baseline": f"{at('off', 32)['p99_ms']:.0f}",
         "embedx": f"{at('on', 32)['p99_ms']:.0f}", "ratio": at("off", 32)["p99_ms"] / at("on", 32)["p99_ms"]},
        {"what": "req/s at 1 client, batching off vs on", "baseline": f"{at('off', 1)['throughput_rps']:.1f}",
         "embedx": f"{at('on', 1)['throughput_rps']:.1f}",
         "ratio": at("on", 1)["throughput_rps"] / at("off", 1)["throughput_rps"]},
        {"what": f"soak {soak['requests']} req, {soak['malformed']} malformed: 5xx / malformed not 4xx",
         "baseline": "0 / 0", "embedx": f"{soak['5xx']} / {soak['malformed_not_4xx']}", "ratio": None},
        {"what": "batch cap of the batching-on server, chosen at warm-up", "baseline": "1",
         "embedx": cap_label(caps["on"]), "ratio": None},
        {"what": "server RSS MB after warm-up -> after soak", "baseline": f"{rss[0]:.0f}",
         "embedx": f"{rss[-1]:.0f}", "ratio": None},
    ]
    print(f"batching speed-up at 32 clients: {ratio:.2f}x; soak: {soak}; memory: {memory}", file=sys.stderr)
    path = write_result("serve", {
        "quick": args.quick, "model": str(model), "backbone": args.backbone, "weights": args.weights,
        "modes": modes, "server_args": args.server_args, "rows": rows, "soak": soak, "memory": memory,
        "summary": summary,
        "speedup_32": ratio, "table": table, "model_alone": ceilings, "batch_caps": caps,
        # a shared machine makes the ratio move: CPU contention hurts the 2-thread batched runs most
        "loadavg_before_after": [load_before, os.getloadavg()],
    }, args.out)
    print(f"wrote {path}", file=sys.stderr)
    if soak["5xx"] or soak["malformed_not_4xx"]:
        sys.exit(1)


def cap_label(batching: dict) -> str:
    """'4 (auto)', '32 (fixed)', or '1 (off)' for a --max-batch 1 server (nothing to time)."""
    if batching["mode"] == "auto" and not batching["img_per_s"]:
        return f"{batching['cap']} (off)"
    return f"{batching['cap']} ({batching['mode']})"


def run_soak(server: ServerProcess, good: list[dict], count: int, time_limit: float) -> dict:
    rng = random.Random(0)
    bad = malformed_requests(good[0]["body"], 2 * 1024 * 1024)
    requests = [rng.choice(bad) if rng.random() < 0.05 else good[i % len(good)] for i in range(count)]
    samples: list[float] = []
    done = threading.Event()

    def sample_rss() -> None:  # once a second while the soak runs
        while not done.wait(1.0):
            samples.append(server.rss_mb())

    sampler = threading.Thread(target=sample_rss, daemon=True)
    sampler.start()
    try:
        result = asyncio.run(load(server.url, requests, 32, time_limit))
    finally:
        done.set()
        sampler.join()
    outcomes = result.pop("results")
    malformed = [(kind, status) for kind, status, _ in outcomes if kind != "good"]
    by_kind: dict[str, dict[str, int]] = {}
    for kind, status in malformed:
        by_kind.setdefault(kind, {}).setdefault(str(status), 0)
        by_kind[kind][str(status)] += 1
    soak = {
        "requests": result["requests"],
        "malformed": len(malformed),
        "5xx": sum(1 for _, status, _ in outcomes if status >= 500),
        "transport_errors": sum(1 for _, status, _ in outcomes if status == 0),
        "malformed_not_4xx": sum(1 for _, status in malformed if not 400 <= status < 500),
        "good_not_200": sum(1 for kind, status, _ in outcomes if kind == "good" and status != 200),
        "malformed_by_kind": by_kind,
        "throughput_rps": result["throughput_rps"],
        "p99_ms": result["p99_ms"],
        "statuses": result["statuses"],
        # RSS at 10%, 50% and 100% of the soak: flat once ORT has seen every batch size
        "rss_mb_at_10_50_100_pct": [samples[int(f * (len(samples) - 1))] for f in (0.1, 0.5, 1.0)] if samples else [],
    }
    print(f"soak: {soak}", file=sys.stderr)
    return soak


if __name__ == "__main__":
    main()
