"""Scale-out on one machine: plain extract vs the Ray engine (1 and 2 actors) vs shards + merge.

For each data set (hymenoptera, and ``--generated`` images made from it: random crops,
flips and re-encodes, each a distinct file), in one run and at equal cores (the local
engine's default decode workers = the Ray cluster's CPUs = this machine's cores):

- ``local``: ``extract(engine="local")``, the default;
- ``ray, 1 actor`` / ``ray, 2 actors``: ``extract(engine="ray", actors=N)`` on one Ray
  cluster started once at the beginning: its start-up is measured and reported apart (a
  long job pays it once); each run still pays its own actor pool's start;
- ``shards + merge``: ``--shards`` shard extractions one after another (the sum is the
  work; the largest part + merge is the wall time when they run on that many machines)
  and ``merge``.

Each figure is the wall time of the library call into a fresh cache (export and ORT caches
warm: a warm-up run of each mode on the first data set is not counted), median over ``--repeats``, the modes
interleaved so the shared machine's load spreads over all. Every cache is checked against
the local one (keys, paths, labels, splits, errors, feature bytes). Writes
bench/results/scale.json and scale.png.

    python bench/scale.py [--backbone efficientnet_lite0] [--generated 2000] [--repeats 2] [--shards 3]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import HYMENOPTERA, markdown_table, write_result  # noqa: E402
from bench.shards import same_cache  # noqa: E402


def generated(source: Path, count: int, root: Path, seed: int = 0) -> Path:
    """``count`` distinct JPEGs in class folders: random crops (60-100% of a side), flips and
    resizes of ``source``'s images, so decoding costs what real photos cost."""
    import numpy as np
    from PIL import Image

    from embedx.data import discover

    dataset = discover(source)
    rng = np.random.default_rng(seed)
    for n in range(count):
        item = dataset.items[n % len(dataset.items)]
        with Image.open(item.path) as image:
            image = image.convert("RGB")
            width, height = image.size
            scale = rng.uniform(0.6, 1.0)
            w, h = max(16, int(width * scale)), max(16, int(height * scale))
            left, top = int(rng.integers(0, width - w + 1)), int(rng.integers(0, height - h + 1))
            image = image.crop((left, top, left + w, top + h))
            if rng.random() < 0.5:
                image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
            image = image.resize((int(rng.integers(320, 520)), int(rng.integers(240, 400))))
            target = root / dataset.classes[item.label] / f"{n:05d}.jpg"
            target.parent.mkdir(parents=True, exist_ok=True)
            image.save(target, "JPEG", quality=int(rng.integers(80, 95)))
    return root


def measure(data: Path, work: Path, *, backbone: str, repeats: int, shards: int, warmup: bool) -> dict:
    from embedx.extract import extract
    from embedx.merge import merge

    options = {"backbone": backbone, "device": "cpu"}
    runs = 0

    def fresh(name: str) -> Path:
        nonlocal runs
        runs += 1
        return work / f"{runs:03d}-{name}.h5"

    def local() -> tuple[float, Path, dict]:
        output = fresh("local")
        tick = time.perf_counter()
        summary = extract(data, output=output, engine="local", **options)
        return time.perf_counter() - tick, output, {"workers": summary.workers, "threads": summary.threads}

    def on_ray(actors: int):
        def once() -> tuple[float, Path, dict]:
            output = fresh(f"ray{actors}")
            tick = time.perf_counter()
            summary = extract(data, output=output, engine="ray", actors=actors, **options)
            seconds = time.perf_counter() - tick
            assert summary.engine_start_seconds == 0.0  # the cluster started once, apart
            return seconds, output, {"actors": summary.actors, "decode_slots": summary.workers,
                                     "threads_per_actor": summary.threads}
        return once

    def sharded() -> tuple[float, Path, dict]:
        parts, seconds = [], []
        for index in range(shards):
            parts.append(fresh(f"shard{index}"))
            tick = time.perf_counter()
            extract(data, output=parts[-1], shard=(index, shards), **options)
            seconds.append(time.perf_counter() - tick)
        output = fresh("merged")
        tick = time.perf_counter()
        merge(parts, output=output)
        merge_seconds = time.perf_counter() - tick
        for part in parts:
            part.unlink()
        return sum(seconds) + merge_seconds, output, {"shards_sum": sum(seconds), "largest_shard": max(seconds),
                                                      "merge": merge_seconds}

    modes = {"local": local, "ray, 1 actor": on_ray(1), "ray, 2 actors": on_ray(2),
             f"{shards} shards + merge": sharded}
    seconds: dict[str, list[float]] = {name: [] for name in modes}
    details: dict[str, list[dict]] = {name: [] for name in modes}
    equal: dict[str, bool] = {}
    for repeat in range(-1 if warmup else 0, repeats):  # -1: the warm-up of every mode, not counted
        reference = None
        for name, once in modes.items():
            took, output, info = once()
            if reference is None:
                reference = output
            else:
                checks = same_cache(output, reference)
                equal[name] = equal.get(name, True) and all(checks.values())
                output.unlink()
            if repeat >= 0:
                seconds[name].append(took)
                details[name].append(info)
            print(f"  {data.name} repeat {repeat}: {name} {took:.1f} s {info}", file=sys.stderr)
        reference.unlink()
    from embedx.data import discover

    images = len(discover(data).items)
    median = {name: statistics.median(values) for name, values in seconds.items()}
    base = median["local"]
    rows = []
    for name in modes:
        row = {"data": data.name if data != HYMENOPTERA else "hymenoptera", "images": images, "mode": name,
               "seconds": median[name], "img/s": images / median[name], "vs local": median[name] / base,
               "equal to local": equal.get(name, True)}
        if name.endswith("merge"):
            shard_info = details[name]
            largest = statistics.median(d["largest_shard"] + d["merge"] for d in shard_info)
            row["note"] = (f"merge {statistics.median(d['merge'] for d in shard_info):.2f} s; largest shard + merge "
                           f"{largest:.1f} s = {largest / base:.2f}x local (shards on {shards} machines)")
        rows.append(row)
    return {"images": images, "seconds": seconds, "median": median, "details": details, "rows": rows,
            "ray_overhead": {name: median[name] / base - 1 for name in modes if name.startswith("ray")}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=HYMENOPTERA)
    parser.add_argument("--backbone", default="efficientnet_lite0")
    parser.add_argument("--generated", type=int, default=2000, help="images made from DATA (0: none)")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--shards", type=int, default=3)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()

    import ray

    from embedx.extract import default_workers
    from embedx.ray_engine import connect

    work = Path(tempfile.mkdtemp(prefix="embedx-bench-scale-"))
    try:
        sets = [args.data]
        if args.generated:
            tick = time.perf_counter()
            sets.append(generated(args.data, args.generated, work / f"generated{args.generated}"))
            print(f"generated {args.generated} images in {time.perf_counter() - tick:.1f} s", file=sys.stderr)
        os.environ.pop("RAY_ADDRESS", None)
        startup, started = connect()  # a one-machine cluster with this machine's cores, as extract starts
        assert started
        cpus = ray.cluster_resources().get("CPU")
        results = {}
        for data in sets:  # the first set warms up the export and ORT caches of every mode
            results[data.name] = measure(data, work, backbone=args.backbone, repeats=args.repeats,
                                         shards=args.shards, warmup=data is sets[0])
        ray.shutdown()
        rows = [row for result in results.values() for row in result["rows"]]
        print(markdown_table(rows, ["data", "images", "mode", "seconds", "img/s", "vs local", "equal to local",
                                    "note"]))
        print(f"Ray start-up (once, not in the rows): {startup:.1f} s; cluster CPUs {cpus:g}, "
              f"local decode workers {default_workers()}")
        path = write_result("scale", {"backbone": args.backbone, "repeats": args.repeats, "shards": args.shards,
                                      "ray_startup_seconds": startup, "ray_cluster_cpus": cpus,
                                      "local_default_workers": default_workers(), "rows": rows,
                                      "results": results, "load_average_after": list(os.getloadavg())}, args.out)
        from bench.plots import plot_scale

        print(f"wrote {path} and {', '.join(map(str, plot_scale(path.parent)))}", file=sys.stderr)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
