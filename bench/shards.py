"""Shard + merge against one extraction, on the same data, in one run.

For ``--shards N``: (a) ``single``: one ``extract`` of the data set into a fresh cache;
(b) ``shards``: the N ``extract(shard=(i, N))`` one after another (as N machines would run
them at once: the sum is the work, the largest part the wall time of a parallel run);
(c) ``merge``: ``merge`` of the N parts.  Each is wall time of the library call, export
included (cached after the warm-up run, which is not counted); the modes alternate
(single, shards + merge, single, ...) so machine load spreads over both, and the figure is
the median over ``--repeats``.  The merged cache is checked against the single one: same
keys, paths, labels, splits, errors and feature bytes.

    python bench/shards.py [--data DIR] [--backbone efficientnet_lite0] [--shards 3] [--repeats 2]
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import HYMENOPTERA, markdown_table, write_result  # noqa: E402


def same_cache(merged: Path, single: Path) -> dict[str, bool]:
    import h5py

    with h5py.File(merged, "r") as a, h5py.File(single, "r") as b:
        checks = {name: bool((a[name][()] == b[name][()]).all()) and a[name].shape == b[name].shape
                  for name in ("keys", "paths", "labels", "splits", "classes", "sizes", "mtimes")}
        checks["features_bytes"] = a["features"][()].tobytes() == b["features"][()].tobytes()
        checks["errors"] = all((a["errors"][n][()] == b["errors"][n][()]).all()
                               and a["errors"][n].shape == b["errors"][n].shape for n in ("paths", "keys"))
    return checks


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=HYMENOPTERA)
    parser.add_argument("--backbone", default="efficientnet_lite0")
    parser.add_argument("--shards", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()

    from embedx.extract import extract
    from embedx.merge import merge

    work = Path(tempfile.mkdtemp(prefix="embedx-bench-shards-"))
    try:
        options = {"backbone": args.backbone, "device": "cpu"}
        extract(args.data, output=work / "warmup.h5", **options)  # export and ORT caches, not counted
        times: dict[str, list[float]] = {"single": [], "shards_sum": [], "shards_max": [], "merge": []}
        checks = {}
        for repeat in range(args.repeats):
            run_dir = work / f"run{repeat}"
            run_dir.mkdir()
            tick = time.perf_counter()
            single = extract(args.data, output=run_dir / "single.h5", **options)
            times["single"].append(time.perf_counter() - tick)
            parts, part_seconds = [], []
            for index in range(args.shards):
                part = run_dir / f"part-{index}.h5"
                tick = time.perf_counter()
                extract(args.data, output=part, shard=(index, args.shards), **options)
                part_seconds.append(time.perf_counter() - tick)
                parts.append(part)
            times["shards_sum"].append(sum(part_seconds))
            times["shards_max"].append(max(part_seconds))
            tick = time.perf_counter()
            merged = merge(parts, output=run_dir / "all.h5")
            times["merge"].append(time.perf_counter() - tick)
            checks = same_cache(run_dir / "all.h5", run_dir / "single.h5")
            print(f"repeat {repeat}: single {times['single'][-1]:.1f} s ({single.images} rows), shards "
                  f"{[round(s, 1) for s in part_seconds]} s, merge {times['merge'][-1]:.2f} s "
                  f"({merged.images} rows); equal: {all(checks.values())}", file=sys.stderr)
            shutil.rmtree(run_dir)
        median = {name: statistics.median(values) for name, values in times.items()}
        rows = [
            {"mode": "single extraction", "seconds": median["single"], "vs single": 1.0},
            {"mode": f"{args.shards} shards, sum (one machine, one after another)", "seconds": median["shards_sum"],
             "vs single": median["shards_sum"] / median["single"]},
            {"mode": f"{args.shards} shards + merge, sum", "seconds": median["shards_sum"] + median["merge"],
             "vs single": (median["shards_sum"] + median["merge"]) / median["single"]},
            {"mode": f"largest shard + merge ({args.shards} machines at once)",
             "seconds": median["shards_max"] + median["merge"],
             "vs single": (median["shards_max"] + median["merge"]) / median["single"]},
            {"mode": "merge alone", "seconds": median["merge"], "vs single": median["merge"] / median["single"]},
        ]
        print(markdown_table(rows, ["mode", "seconds", "vs single"]))
        print(f"merged == single: {checks}")
        path = write_result("shards", {"data": str(args.data), "backbone": args.backbone, "shards": args.shards,
                                       "repeats": args.repeats, "seconds": times, "median": median, "rows": rows,
                                       "merged_equals_single": checks}, args.out)
        print(f"wrote {path}", file=sys.stderr)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
