"""The GPU side by side: embedx extract and serve against torch and ORT references, one process.

Run on a machine with an NVIDIA GPU (measured on one H200 with 16 cores); everything below
runs in this one process (serving in two child servers), on the same generated images, so
every ratio is between figures taken minutes apart on the same machine:

- ``data``: ``--images`` synthetic 500x375 JPEGs (q90, each unique: content-keyed caches
  would dedupe copies), written by all cores;
- ``ort``: resnet50 in ONNX Runtime alone on a batch already on the device, in the
  configurations that matter (float32 numpy input as ``session.run`` takes it; uint8
  pixels bound in place; fp32 with and without TF32; fp16; ``prefer_nhwc``; CUDA graphs;
  batch 128 and 256): the ceiling that end-to-end extraction is held against;
- ``decode``: GPU decode alone (nvJPEG + resize + crop on the device) and the CPU decode
  workers alone, img/s;
- ``extract``: ``embedx.extract.extract`` end to end into a fresh cache, resnet50,
  fp32/fp16 x CPU/GPU decode, batch 128 (its pipeline clock: hashing, session creation,
  decoding, inference, journal and HDF5; the export and the cached fp16 copy are made
  before, like the model construction of the torch columns);
- ``torch``: torchvision resnet50 fed by a tuned DataLoader (ImageFolder + PIL, batch 128,
  one worker per core but one, pinned memory), fp32 and AMP; the PyTorch tutorial's
  configuration (batch 4, 4 workers) on the first ``--tutorial-images``;
- ``reference``: the 30-line script: nvJPEG decode + resize on the GPU + resnet50 AMP
  channels_last;
- ``lite0``: efficientnet_lite0 (real weights) end to end, fp32 vs fp16, on 4,096 images;
- ``serve``: ``bench/serve.py --quick`` on the GPU (lite0 bundle, batching on vs off at 1, 8
  and 32 clients), as a child process;
- ``parity``: GPU decode vs the ``fast`` CPU decode (features' cosine, lite0) on the
  images of ``--real-data`` when given (hymenoptera), and CUDA fp32 vs CPU fp32.

Results go to ``--out`` (default bench/results/gpu.json), rewritten after every section so
that a run stopped by its time limit keeps what it measured.

    python bench/gpu.py [--images 16384] [--sections data,ort,...] [--out PATH] [--real-data DIR]
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

import numpy as np  # noqa: E402

from bench.common import RESULTS, machine_info  # noqa: E402

SECTIONS = ("data", "ort", "lite0_ort", "decode", "extract", "torch", "reference", "lite0", "serve", "parity")
BATCH = 128
RESNET = "resnet50"
LITE = "efficientnet_lite0"


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# -- data --------------------------------------------------------------------------------


def _write_images(job: tuple[str, int, int]) -> int:
    folder, start, stop = job
    from PIL import Image

    for index in range(start, stop):
        rng = np.random.default_rng(index)
        coarse = rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)
        image = np.asarray(Image.fromarray(coarse).resize((500, 375), Image.BILINEAR), dtype=np.float32)
        image += rng.normal(0, 10, image.shape)
        label = "a" if index % 2 == 0 else "b"
        buffer = io.BytesIO()
        Image.fromarray(np.clip(image, 0, 255).astype(np.uint8)).save(buffer, "JPEG", quality=90)
        (Path(folder) / label / f"{index:06d}.jpg").write_bytes(buffer.getvalue())
    return stop - start


def make_data(folder: Path, count: int) -> Path:
    from concurrent.futures import ProcessPoolExecutor

    for label in ("a", "b"):
        (folder / label).mkdir(parents=True, exist_ok=True)
    step = 256
    jobs = [(str(folder), start, min(start + step, count)) for start in range(0, count, step)]
    with ProcessPoolExecutor(os.cpu_count()) as pool:
        written = sum(pool.map(_write_images, jobs))
    assert written == count
    return folder


def subset(folder: Path, count: int, target: Path) -> Path:
    """A folder of hard links to the first ``count`` images of ``folder``."""
    files = sorted(folder.rglob("*.jpg"))[:count]
    for path in files:
        out = target / path.parent.name / path.name
        out.parent.mkdir(parents=True, exist_ok=True)
        os.link(path, out)
    return target


# -- ONNX Runtime alone ---------------------------------------------------------------------


def _time_session(name: str, path: Path, spec, *, batch: int, options: dict, bound: bool = True,
                  seconds: float = 3.0) -> dict:
    """img/s of one ORT CUDA session configuration on one batch already on the device."""
    import onnxruntime as ort
    import torch

    from embedx.iobinding import BoundRunner

    try:
        started = time.perf_counter()
        session = ort.InferenceSession(str(path), providers=[("CUDAExecutionProvider", options)])
        if bound:
            runner = BoundRunner(session, batch_size=batch)
            pixels = torch.randint(0, 256, (batch, spec.input_size, spec.input_size, 3), dtype=torch.uint8,
                                   device="cuda")

            def step():
                return runner.run(pixels)
        else:
            floats = np.random.default_rng(0).normal(size=(batch, 3, spec.input_size, spec.input_size))
            floats = floats.astype(np.float32)
            input_name = session.get_inputs()[0].name

            def step():
                return session.run(None, {input_name: floats})
        for _ in range(3):
            step()
        setup = time.perf_counter() - started
        runs, began = 0, time.perf_counter()
        while time.perf_counter() - began < seconds:
            step()
            runs += 1
        rate = runs * batch / (time.perf_counter() - began)
        log(f"ort alone: {name}, batch {batch}: {rate:.0f} img/s (setup {setup:.1f} s)")
        return {"config": name, "batch": batch, "img_s": rate, "setup_s": setup, "options": options,
                "providers": session.get_providers()[:1]}
    except Exception as e:  # noqa: BLE001 - one configuration failing is a result, not the end
        log(f"ort alone: {name}, batch {batch}: FAILED {e}")
        return {"config": name, "batch": batch, "error": f"{type(e).__name__}: {e}"}


def _options(*, tf32: bool = True, nhwc: bool = False, graph: bool = False, algo: str = "EXHAUSTIVE") -> dict:
    return {"cudnn_conv_algo_search": algo, "use_tf32": "1" if tf32 else "0", "prefer_nhwc": "1" if nhwc else "0",
            "enable_cuda_graph": "1" if graph else "0"}


def ort_alone(exported, spec) -> list[dict]:
    """resnet50 in ORT alone, one configuration per row, on one batch already on the device."""
    from embedx.pixel_input import pixel_model
    from embedx.quantize import fp16_model

    u8 = pixel_model(exported.path, spec)
    fp16 = fp16_model(u8)
    return [
        _time_session("float32 numpy, session.run (the old way)", exported.path, spec, batch=BATCH,
                      options=_options(), bound=False),
        _time_session("uint8 bound, fp32, TF32 off", u8, spec, batch=BATCH, options=_options(tf32=False)),
        _time_session("uint8 bound, fp32, TF32 on", u8, spec, batch=BATCH, options=_options()),
        _time_session("uint8 bound, fp16", fp16, spec, batch=BATCH, options=_options()),
        _time_session("uint8 bound, fp16, prefer_nhwc", fp16, spec, batch=BATCH, options=_options(nhwc=True)),
        _time_session("uint8 bound, fp16, prefer_nhwc, CUDA graph", fp16, spec, batch=BATCH,
                      options=_options(nhwc=True, graph=True)),
        _time_session("uint8 bound, fp16, prefer_nhwc, batch 256", fp16, spec, batch=256, options=_options(nhwc=True)),
        _time_session("uint8 bound, fp16, HEURISTIC search", fp16, spec, batch=BATCH,
                      options=_options(algo="HEURISTIC")),
    ]


def lite_ort_alone() -> list[dict]:
    """efficientnet_lite0 in ORT alone: cuDNN's algorithm search x layout x precision, at a
    serving batch (4) and an extraction batch (128)."""
    from embedx.export import export_backbone
    from embedx.pixel_input import pixel_model
    from embedx.quantize import fp16_model

    exported = export_backbone(LITE, weights="DEFAULT")
    spec = exported.preprocess
    u8 = pixel_model(exported.path, spec)
    fp16 = fp16_model(u8)
    rows = []
    for algo in ("EXHAUSTIVE", "HEURISTIC", "DEFAULT"):
        for label, path, options in (
            ("fp32 (TF32 off)", u8, _options(tf32=False, algo=algo)),
            ("fp16 NCHW", fp16, _options(algo=algo)),
            ("fp16 prefer_nhwc", fp16, _options(nhwc=True, algo=algo)),
        ):
            for batch in (4, 128):
                rows.append(_time_session(f"lite0 {label}, {algo}", path, spec, batch=batch, options=options,
                                          seconds=0.7))
    return rows


# -- decode alone ----------------------------------------------------------------------------


def decode_alone(folder: Path, spec) -> dict:
    """img/s of the decoders alone over every image (the clock includes their start), and
    GPU decode's steady state by thread count (after one batch of warm-up), and what
    reading + hashing alone allow."""
    from concurrent.futures import ThreadPoolExecutor

    from embedx import gpu
    from embedx.extract import _Decoder

    files = [str(p) for p in sorted(folder.rglob("*.jpg"))]
    batches = [files[i : i + BATCH] for i in range(0, len(files), BATCH)]
    out: dict = {}

    def gpu_rate(threads: int, warm: bool) -> float:
        source = gpu.GpuDecodeSource(spec, batches, decode_threads=threads)
        try:
            iterator = iter(source)
            count = 0
            if warm:
                next(iterator)
            began = time.perf_counter()
            count = sum(len(item["rows"]) for item in iterator)
        finally:
            source.close()
        return count / (time.perf_counter() - began)

    out["gpu_decode_img_s"] = gpu_rate(gpu.DECODE_THREADS, warm=False)
    for threads in (1, 2, 4):
        out[f"gpu_decode_steady_{threads}_threads_img_s"] = gpu_rate(threads, warm=True)
    with ThreadPoolExecutor(gpu.READ_THREADS) as pool:
        began = time.perf_counter()
        count = sum(1 for _ in pool.map(gpu._read, files))
        out["read_and_hash_only_img_s"] = count / (time.perf_counter() - began)
    log(f"decode alone: {out}")
    workers = max(1, (os.cpu_count() or 2) - 1)
    began = time.perf_counter()
    decoder = _Decoder(spec, workers, batches)
    try:
        count = sum(len(item["rows"]) for item in decoder)
    finally:
        decoder.close()
    out["cpu_decode_img_s"] = count / (time.perf_counter() - began)
    out["cpu_decode_workers"] = workers
    log(f"decode alone: CPU {out['cpu_decode_img_s']:.0f} img/s ({workers} workers)")
    return out


# -- embedx end to end ----------------------------------------------------------------------


def embedx_extract(folder: Path, work: Path, *, backbone: str, weights: str, precision: str, decode: str,
                   label: str) -> dict:
    from embedx.extract import extract

    output = work / f"{label}.h5"
    started = time.perf_counter()
    summary = extract(folder, backbone=backbone, weights=weights, output=output, batch_size=BATCH,
                      device="cuda", precision=precision, decode=decode, overwrite=True)
    row = {"pipeline": label, "img_s": summary.images_per_second, "images": summary.new,
           "wall_s": time.perf_counter() - started, "inference_s": summary.inference_seconds,
           "decode_wait_s": summary.decode_wait_seconds, "write_s": summary.write_seconds,
           "session_s": summary.session_seconds, "hash_s": summary.hash_seconds,
           "providers": summary.providers[:1], "decode": getattr(summary, "decode", decode)}
    log(f"embedx {label}: {row['img_s']:.0f} img/s over {summary.new} images "
        f"(inference {row['inference_s']:.1f} s, wait {row['decode_wait_s']:.1f} s, write {row['write_s']:.1f} s)")
    output.unlink(missing_ok=True)
    return row


def derive_fp16(backbone: str, weights: str) -> None:
    """Make the pixel-input fp16 copy that extraction runs before timing it: like the export,
    it is made once per model and cached, so no run but a model's first pays it."""
    from embedx.export import export_backbone
    from embedx.pixel_input import pixel_model
    from embedx.quantize import fp16_model

    exported = export_backbone(backbone, weights=weights)
    fp16_model(pixel_model(exported.path, exported.preprocess, source_sha256=exported.sha256 or None))


# -- torch references ------------------------------------------------------------------------


def torch_loader(folder: Path, *, batch: int, workers: int, amp: bool, label: str, limit: int | None = None) -> dict:
    import torch
    import torchvision
    from torchvision import transforms

    transform = transforms.Compose([transforms.Resize(256), transforms.CenterCrop(224), transforms.ToTensor(),
                                    transforms.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))])
    dataset = torchvision.datasets.ImageFolder(str(folder), transform)
    if limit is not None:
        dataset = torch.utils.data.Subset(dataset, range(min(limit, len(dataset))))
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch, num_workers=workers, pin_memory=True)
    model = torchvision.models.resnet50(weights=None).cuda().eval()
    if amp:
        model = model.to(memory_format=torch.channels_last)
    count = 0
    began = time.perf_counter()  # warm-up included: the loader's start is part of the job
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.float16, enabled=amp):
        for images, _ in loader:
            images = images.cuda(non_blocking=True)
            if amp:
                images = images.to(memory_format=torch.channels_last)
            model(images).float().cpu()
            count += len(images)
    rate = count / (time.perf_counter() - began)
    log(f"torch {label}: {rate:.0f} img/s over {count} images")
    return {"pipeline": label, "img_s": rate, "images": count}


def nvjpeg_reference(folder: Path) -> dict:
    """nvJPEG decode + resize + crop on the GPU + resnet50 AMP channels_last: the 30-line script."""
    from concurrent.futures import ThreadPoolExecutor

    import torch
    import torch.nn.functional as F
    import torchvision
    from torchvision.io import ImageReadMode, decode_jpeg

    files = sorted(folder.rglob("*.jpg"))
    model = torchvision.models.resnet50(weights=None).cuda().eval().to(memory_format=torch.channels_last)
    mean = torch.tensor([0.485, 0.456, 0.406], device="cuda").view(1, 3, 1, 1) * 255
    std = torch.tensor([0.229, 0.224, 0.225], device="cuda").view(1, 3, 1, 1) * 255

    def read(path):
        return torchvision.io.read_file(str(path))

    count = 0
    with ThreadPoolExecutor(8) as pool, torch.no_grad(), torch.autocast("cuda", dtype=torch.float16):
        chunks = [files[i : i + BATCH] for i in range(0, len(files), BATCH)]
        began = time.perf_counter()
        for datas in (list(pool.map(read, chunk)) for chunk in chunks):
            images = decode_jpeg(datas, mode=ImageReadMode.RGB, device="cuda")
            batch = torch.stack([F.interpolate(image[None].float(), size=(256, 341), mode="bilinear",
                                               antialias=True)[0, :, 16:240, 58:282] for image in images])
            batch = ((batch - mean) / std).contiguous(memory_format=torch.channels_last)
            model(batch).float().cpu()
            count += len(images)
        rate = count / (time.perf_counter() - began)
    log(f"nvJPEG + torch AMP reference: {rate:.0f} img/s over {count} images")
    return {"pipeline": "nvJPEG + resize on GPU + torch AMP channels_last (reference)", "img_s": rate,
            "images": count}


# -- parity --------------------------------------------------------------------------------


def parity(real: Path | None, synthetic: Path) -> dict:
    """GPU decode vs CPU ``fast`` decode, lite0 features' cosine; CUDA fp32 (TF32 off) vs CPU fp32."""
    import onnxruntime as ort

    from embedx.export import export_backbone
    from embedx.gpu import TorchDecoder
    from embedx.pixel_input import PIXEL_INPUT, pixel_model
    from embedx.preprocess import to_pixels

    folder = real if real is not None and real.is_dir() else synthetic
    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in (".jpg", ".jpeg"))[:256]
    exported = export_backbone(LITE, weights="DEFAULT")
    spec = exported.preprocess
    u8 = str(pixel_model(exported.path, spec))
    cpu = ort.InferenceSession(u8, providers=["CPUExecutionProvider"])
    cuda = ort.InferenceSession(u8, providers=[("CUDAExecutionProvider", {"use_tf32": "0"})])

    def features(session, pixels):
        return np.concatenate([session.run(None, {PIXEL_INPUT: pixels[i : i + 32]})[0]
                               for i in range(0, len(pixels), 32)])

    def cosine(a, b):
        return (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)

    datas = [bytearray(p.read_bytes()) for p in files]
    decoder = TorchDecoder(spec, device="cuda")
    pixels, rows, errors = decoder.decode(datas)
    cpu_pixels = np.stack([to_pixels(bytes(datas[i]), spec) for i in rows])
    cpu_features = features(cpu, cpu_pixels)
    decode_cosine = cosine(features(cpu, pixels.cpu().numpy()), cpu_features)
    cuda_features = features(cuda, cpu_pixels)
    out = {"images": len(rows), "source": str(folder), "on_device": decoder.gpu_images, "errors": len(errors),
           "gpu_decode_vs_cpu_fast_cosine_min": float(decode_cosine.min()),
           "gpu_decode_vs_cpu_fast_cosine_mean": float(decode_cosine.mean()),
           "cuda_fp32_vs_cpu_fp32_max_abs": float(np.abs(cuda_features - cpu_features).max()),
           "cuda_fp32_vs_cpu_fp32_cosine_min": float(cosine(cuda_features, cpu_features).min()),
           "cuda_providers": cuda.get_providers()[:1]}
    log(f"parity: {out}")
    return out


# -- serving -------------------------------------------------------------------------------


def serve(out_dir: Path, time_limit: float) -> dict:
    target = out_dir / "serve-gpu.json"
    command = [sys.executable, str(HERE / "serve.py"), "--quick", "--server-args", "--device cuda",
               "--ceiling-backbones", "", "--soak", "300", "--time-limit", str(time_limit), "--out", str(target)]
    log("serve: " + " ".join(command))
    done = subprocess.run(command, capture_output=True, text=True, timeout=time_limit * 8 + 120)
    sys.stderr.write(done.stderr[-6000:])
    if done.returncode != 0 or not target.exists():
        return {"error": f"exit {done.returncode}", "stderr_tail": done.stderr[-2000:]}
    return json.loads(target.read_text())


# -- main ----------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=16384)
    parser.add_argument("--tutorial-images", type=int, default=4096)
    parser.add_argument("--lite-images", type=int, default=4096)
    parser.add_argument("--sections", default=",".join(SECTIONS))
    parser.add_argument("--out", type=Path, default=RESULTS / "gpu.json")
    parser.add_argument("--real-data", type=Path, default=None, help="real photos for the parity section")
    parser.add_argument("--serve-time-limit", type=float, default=20.0)
    parser.add_argument("--workdir", type=Path, default=None)
    args = parser.parse_args()
    sections = [s for s in args.sections.split(",") if s]
    unknown = set(sections) - set(SECTIONS)
    if unknown:
        parser.error(f"unknown sections {sorted(unknown)}; known: {','.join(SECTIONS)}")

    import torch

    if not torch.cuda.is_available():
        sys.exit("bench/gpu.py needs an NVIDIA GPU (torch.cuda.is_available() is False)")
    work = args.workdir or Path(tempfile.mkdtemp(prefix="embedx-bench-gpu-"))
    os.environ.setdefault("EMBEDX_CACHE_DIR", str(work / "cache"))
    result: dict = {"benchmark": "gpu", "machine": machine_info(), "gpu": torch.cuda.get_device_name(0),
                    "cuda_options_override": os.environ.get("EMBEDX_CUDA_OPTIONS", ""),
                    "measured_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                    "images": args.images, "batch": BATCH, "sections": {}, "errors": {}}

    def save() -> None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2, default=str) + "\n")

    def section(name: str, fn):
        if name not in sections:
            return None
        log(f"== {name}")
        began = time.perf_counter()
        try:
            value = fn()
            result["sections"][name] = value
            return value
        except Exception as e:  # noqa: BLE001 - a failed section is recorded; the others still run
            result["errors"][name] = f"{type(e).__name__}: {e}\n{traceback.format_exc()[-3000:]}"
            log(f"section {name} FAILED: {e}")
            return None
        finally:
            result.setdefault("section_seconds", {})[name] = round(time.perf_counter() - began, 1)
            save()

    data = work / "data"
    if not data.exists():
        began = time.perf_counter()
        make_data(data, args.images)
        result["data_seconds"] = time.perf_counter() - began
        log(f"data: {args.images} JPEGs in {result['data_seconds']:.1f} s")
    from embedx.export import export_backbone

    resnet = export_backbone(RESNET, weights="none")
    spec = resnet.preprocess
    section("ort", lambda: ort_alone(resnet, spec))
    section("lite0_ort", lite_ort_alone)
    section("decode", lambda: decode_alone(data, spec))
    rows: list[dict] = []

    def extract_rows():
        for precision in ("fp32", "fp16"):
            for decode in ("cpu", "gpu"):
                rows.append(embedx_extract(data, work, backbone=RESNET, weights="none", precision=precision,
                                           decode=decode, label=f"embedx extract {precision}, {decode} decode"))
        return rows

    derive_fp16(RESNET, "none")
    section("extract", extract_rows)
    workers = max(1, (os.cpu_count() or 2) - 1)
    section("torch", lambda: [
        torch_loader(data, batch=BATCH, workers=workers, amp=False, label="DataLoader tuned fp32"),
        torch_loader(data, batch=BATCH, workers=workers, amp=True, label="DataLoader tuned AMP"),
        torch_loader(subset(data, args.tutorial_images, work / "tutorial"), batch=4, workers=4, amp=False,
                     label=f"tutorial configuration (batch 4, 4 workers), first {args.tutorial_images}"),
    ])
    section("reference", lambda: nvjpeg_reference(data))

    def lite_rows():
        small = work / "lite" if (work / "lite").exists() else subset(data, args.lite_images, work / "lite")
        derive_fp16(LITE, "DEFAULT")
        return [embedx_extract(small, work, backbone=LITE, weights="DEFAULT", precision=precision, decode=decode,
                               label=f"lite0 {precision}, {decode} decode")
                for decode in ("gpu", "cpu") for precision in ("fp32", "fp16")]

    section("lite0", lite_rows)
    section("serve", lambda: serve(args.out.parent, args.serve_time_limit))
    section("parity", lambda: parity(args.real_data, data))
    result["summary"] = summarize(result)
    save()
    plot(result, args.out.with_suffix(".png"))
    log(f"wrote {args.out}")
    print(json.dumps(result["summary"], indent=2))
    shutil.rmtree(work / "tutorial", ignore_errors=True)


def plot(result: dict, path: Path) -> Path:
    """A bar chart of the end-to-end and reference img/s of ``result`` (resnet50 on the GPU)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sections = result["sections"]
    bars: list[tuple[str, float, str]] = []
    for row in sections.get("torch") or []:
        label = row["pipeline"].replace("configuration", "config").split("), first")[0]
        bars.append((label + (")" if "(" in label and not label.endswith(")") else ""), row["img_s"], "#999999"))
    if sections.get("reference"):
        bars.append(("nvJPEG + torch AMP script", sections["reference"]["img_s"], "#666666"))
    for row in sections.get("extract") or []:
        bars.append((row["pipeline"].replace("embedx extract ", "embedx "), row["img_s"], "#1f77b4"))
    ort = [row for row in sections.get("ort") or [] if "img_s" in row]
    if ort:
        best = max(ort, key=lambda row: row["img_s"])
        bars.append((f"ORT alone, best ({best['config'].replace('uint8 bound, ', '')})", best["img_s"], "#ff7f0e"))
    figure, axis = plt.subplots(figsize=(9, 0.45 * len(bars) + 1.2))
    labels = [label for label, _, _ in bars]
    axis.barh(range(len(bars)), [rate for _, rate, _ in bars], color=[color for _, _, color in bars])
    axis.set_yticks(range(len(bars)), labels, fontsize=8)
    axis.invert_yaxis()
    for index, (_, rate, _) in enumerate(bars):
        axis.text(rate, index, f" {rate:,.0f}", va="center", fontsize=8)
    axis.set_xlabel("images per second (resnet50, 500x375 JPEGs, batch 128)")
    axis.set_title(f"{result.get('gpu', 'GPU')}, {result.get('images')} images, {result.get('measured_at', '')[:10]}",
                   fontsize=9)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


def summarize(result: dict) -> dict:
    """The ratios the GPU issue's targets are stated in."""
    sections = result["sections"]

    def rate(rows, needle):
        for row in rows or []:
            if needle in row.get("pipeline", row.get("config", "")) and "img_s" in row:
                return row["img_s"]
        return None

    out: dict = {}
    extract_rows = sections.get("extract")
    torch_rows = sections.get("torch")
    reference = (sections.get("reference") or {}).get("img_s")
    ort_best = max((row["img_s"] for row in sections.get("ort") or [] if "img_s" in row), default=None)
    for precision in ("fp32", "fp16"):
        best = max(filter(None, [rate(extract_rows, f"{precision}, gpu decode"),
                                 rate(extract_rows, f"{precision}, cpu decode")]), default=None)
        out[f"extract_{precision}_img_s"] = best
        tuned = rate(torch_rows, "DataLoader tuned fp32")
        if best and tuned:
            out[f"extract_{precision}_vs_torch_tuned_fp32"] = best / tuned
        if best and reference:
            out[f"extract_{precision}_vs_nvjpeg_reference"] = best / reference
        if best and ort_best:
            out[f"extract_{precision}_vs_ort_alone_best"] = best / ort_best
    out["ort_alone_best_img_s"] = ort_best
    lite = sections.get("lite0")
    for decode in ("gpu", "cpu"):
        fp32, fp16 = rate(lite, f"fp32, {decode}"), rate(lite, f"fp16, {decode}")
        if fp32 and fp16:
            out[f"lite0_fp16_over_fp32_{decode}_decode"] = fp16 / fp32
    serve_rows = (sections.get("serve") or {}).get("rows") or []
    for clients in (1, 8, 32):
        on = next((r["throughput_rps"] for r in serve_rows
                   if r["batching"] == "on" and r["concurrency"] == clients), None)
        off = next((r["throughput_rps"] for r in serve_rows
                    if r["batching"] == "off" and r["concurrency"] == clients), None)
        if on and off:
            out[f"serve_on_over_off_{clients}_clients"] = on / off
    return out


if __name__ == "__main__":
    main()
