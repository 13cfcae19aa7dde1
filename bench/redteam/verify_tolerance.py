"""Measure the cosine ``embedx verify`` sees between stored rows and a CPU fp32 re-embedding.

Real data (hymenoptera, train+val), real weights (efficientnet_lite0), CPU.  For each
storage dtype (float16, float32) and model precision:

* fp32, int8: a cache made by ``extract --device cpu --precision P --dtype D``; every row is
  re-embedded with the cache's fp32 backbone exactly as ``verify`` does (``verify._embed``).
* fp16: ``extract`` refuses fp16 on the CPU, so the fp16 copy a CUDA run uses
  (``quantize.fp16_model``) is run here on ONNX Runtime's CPU provider over the same pixels,
  rounded to the storage dtype, and compared with the fp32 re-embedding.

Prints min / 0.1% / 1% / median cosine per combination and writes them as JSON.
Usage: nice python -m bench.redteam.verify_tolerance [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np

DATA = Path(os.environ.get("EMBEDX_HYMENOPTERA", "/work/shared/assets/hymenoptera_data"))
BACKBONE = "efficientnet_lite0"


def _stats(cos: np.ndarray) -> dict[str, float]:
    return {"n": int(len(cos)), "min": float(cos.min()), "p0.1": float(np.quantile(cos, 0.001)),
            "p1": float(np.quantile(cos, 0.01)), "median": float(np.median(cos)), "mean": float(cos.mean())}


def _cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a, b = a.astype(np.float64), b.astype(np.float64)
    return np.sum(a * b, axis=1) / np.maximum(np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1), 1e-30)


def _pixels(data, root: Path, spec) -> np.ndarray:
    from embedx import preprocess

    return np.stack([preprocess.to_pixels((root / str(p)).read_bytes(), spec) for p in data.paths])


def _run_plain(model_path: Path, pixels: np.ndarray, batch: int = 32) -> np.ndarray:
    import onnxruntime as ort

    session = ort.InferenceSession(str(model_path), providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    fixed = session.get_inputs()[0].shape[0]
    batch = fixed if isinstance(fixed, int) else batch
    out = []
    for start in range(0, len(pixels), batch):
        chunk = pixels[start : start + batch]
        padded = np.concatenate([chunk, np.zeros((batch - len(chunk), *chunk.shape[1:]), chunk.dtype)])
        out.append(session.run(None, {name: padded})[0][: len(chunk)])
    return np.concatenate(out)


def main() -> None:
    from embedx.cache import read_cache
    from embedx.extract import extract
    from embedx.pixel_input import pixel_model
    from embedx.preprocess import PreprocessSpec
    from embedx.quantize import fp16_model
    from embedx.verify import _embed

    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, default=Path("bench/results/verify_tolerance.json"))
    args = parser.parse_args()
    results: dict[str, dict[str, float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        reference = None
        for precision in ("fp32", "int8"):
            for dtype in ("float32", "float16"):
                started = time.perf_counter()
                cache = Path(tmp) / f"{precision}-{dtype}.h5"
                extract(DATA, backbone=BACKBONE, output=cache, device="cpu", precision=precision, dtype=dtype,
                        workers=0, threads=2)
                data = read_cache(cache)
                spec = PreprocessSpec.from_dict(data.meta.preprocess)
                if reference is None:
                    pixels = _pixels(data, DATA, spec)
                    reference = (list(map(str, data.keys)),
                                 _embed(Path(data.meta.onnx_path), data.meta.onnx_sha256, spec, pixels, device="cpu"))
                    fp32_meta = data.meta
                order = {k: i for i, k in enumerate(reference[0])}
                rows = np.asarray([order[str(k)] for k in data.keys])
                cos = _cosine(np.asarray(data.features), reference[1][rows])
                results[f"{dtype}/{precision}"] = _stats(cos)
                seconds = time.perf_counter() - started
                print(f"{dtype:8s} {precision:5s} {results[f'{dtype}/{precision}']}  ({seconds:.0f} s)", flush=True)
        fp16 = pixel_model(fp16_model(Path(fp32_meta.onnx_path)), spec)
        try:
            features = _run_plain(fp16, pixels)
        except Exception as e:  # noqa: BLE001 - report what the CPU provider cannot run
            print(f"fp16 model does not run on the CPU provider: {e}")
        else:
            for dtype in ("float32", "float16"):
                cos = _cosine(features.astype(dtype), reference[1])
                results[f"{dtype}/fp16"] = _stats(cos)
                print(f"{dtype:8s} fp16  {results[f'{dtype}/fp16']}", flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"backbone": BACKBONE, "data": str(DATA), "results": results}, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
