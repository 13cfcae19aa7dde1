"""Augmented views in the cache: ants/bees val accuracy with and without views, and what views cost.

For each backbone (default efficientnet_lite0, lite1, lite2; real weights, CPU), a cache of
../shared/assets/hymenoptera_data is extracted clean, then the same command with ``views=8``
(flip, crop, colour: the defaults) adds the views incrementally; both timed in this run, so
the cost of views (once, here, not per epoch) is a ratio of two measurements. Then the
default head (logreg) is fitted on that one cache, so that the clean rows are the same in
both arms:

* ``clean``: ``--no-views`` (what embedx did before views);
* ``views``: clean + the 8 augmented views of every train image (the default now);

and by number of views (the first k of the 8, k = 0, 1, 2, 4, 8).

Every accuracy comes with its 95% Wilson interval: with 153 val images it is about ±3.5
points, so the differences here are inside it (the JSON says so per comparison).

Test-time views (a flipped view of every val image, averaged with its clean row) were
measured at commit 65b3a2a with this script (val images right of 153, without -> with the
flip averaged in): lite0 145 -> 145 clean, 147 -> 147 with views; lite1 149 -> 148 and
147 -> 147; lite2 149 -> 148 and 147 -> 147. They added nothing, so embedx does not offer them.

    nice python bench/views.py [--backbones efficientnet_lite0,...] [--views 8] [--out bench/results/views.json]
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import HYMENOPTERA, RESULTS, machine_info  # noqa: E402

ARMS = {"clean": False, "views": True}


def wilson(correct: int, total: int, z: float = 1.959964) -> tuple[float, float]:
    """95% Wilson score interval of a proportion."""
    if total == 0:
        return 0.0, 1.0
    p = correct / total
    centre = (p + z * z / (2 * total)) / (1 + z * z / total)
    half = z * math.sqrt(p * (1 - p) / total + z * z / (4 * total * total)) / (1 + z * z / total)
    return centre - half, centre + half


def by_k(cache: Path, views: int) -> dict:
    """Val accuracy of the default head trained on clean train rows + their first k views, k = 0, 1, 2, 4, ..., K
    (``fit_head``'s training set, made here with a subset of the stored views)."""
    import numpy as np

    from embedx.cache import read_cache, read_views
    from embedx.heads import make_head

    data = read_cache(cache)
    names = np.asarray(data.classes)[data.labels]
    train, val = np.flatnonzero(data.splits == "train"), np.flatnonzero(data.splits == "val")
    stored = read_views(cache, sources=train, kind="augment")
    index = np.array([int(name.split("/")[1]) for name in stored.names.tolist()])
    out = {}
    for k in sorted({0, 1, 2, 4, views} & set(range(views + 1))):
        keep = index < k
        X = np.concatenate([data.features[train], stored.features[keep]])
        y = np.concatenate([names[train], names[stored.source[keep]]])
        head = make_head().fit(X, y, X_val=data.features[val], y_val=names[val])
        correct = int((head.predict(data.features[val]) == names[val]).sum())
        low, high = wilson(correct, len(val))
        out[str(k)] = {"val_accuracy": correct / len(val), "correct": correct, "wilson95": [low, high]}
        print(f"  {cache.stem}: k={k} val {correct}/{len(val)} = {correct / len(val):.3f} [{low:.3f}, {high:.3f}]",
              flush=True)
    return out


def one_backbone(backbone: str, views: int, work: Path) -> dict:
    from embedx.extract import extract
    from embedx.heads import fit_head

    cache = work / f"hymenoptera-{backbone}-views{views}.h5"
    result: dict = {"extract": {}, "arms": {}}
    for step, count in (("clean", 0), ("views", views)):  # the second run adds the views to the first's cache
        summary = extract(HYMENOPTERA, backbone=backbone, output=cache, views=count, device="cpu")
        result["extract"][step] = {"pipeline_seconds": summary.pipeline_seconds, "images": summary.images,
                                   "new": summary.new, "views": summary.views, "new_views": summary.new_views,
                                   "forward_passes_per_second": summary.images_per_second,
                                   "view_plan": summary.view_plan}
        print(f"{backbone:20s} extract {step}: {summary.new} rows + {summary.new_views} views computed in "
              f"{summary.pipeline_seconds:.1f} s", flush=True)
    clean, added = result["extract"]["clean"], result["extract"]["views"]
    if clean["new"] and added["new_views"]:
        result["extract"]["views_seconds_over_clean"] = added["pipeline_seconds"] / clean["pipeline_seconds"]
    for arm, with_views in ARMS.items():
        fitted = fit_head(cache, output=work / f"head-{backbone}-{arm}", views=with_views, plots=False)
        val = fitted.metrics["val"]
        n = int(sum(map(sum, val["confusion_matrix"])))
        correct = int(sum(val["confusion_matrix"][i][i] for i in range(len(val["confusion_matrix"]))))
        low, high = wilson(correct, n)
        result["arms"][arm] = {"val_accuracy": correct / n, "correct": correct, "n_val": n,
                               "wilson95": [low, high], "n_train": fitted.metrics["n_train"],
                               "n_train_views": fitted.metrics["n_train_views"],
                               "chosen": {k: v for k, v in fitted.head.chosen_params_.items()
                                          if isinstance(v, (int, float, str))},
                               "fit_seconds": fitted.fit_seconds}
        print(f"{backbone:20s} {arm:10s} val {correct}/{n} = {correct / n:.3f} "
              f"[{low:.3f}, {high:.3f}] (train {fitted.metrics['n_train']} + {fitted.metrics['n_train_views']} views)",
              flush=True)
    result["by_k"] = by_k(cache, views)
    base = result["arms"]["clean"]
    for arm, values in result["arms"].items():
        if arm != "clean":
            inside = base["wilson95"][0] <= values["val_accuracy"] <= base["wilson95"][1]
            values["vs_clean"] = {"points": 100 * (values["val_accuracy"] - base["val_accuracy"]),
                                  "inside_clean_interval": inside}
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbones", default="efficientnet_lite0,efficientnet_lite1,efficientnet_lite2")
    parser.add_argument("--views", type=int, default=8)
    parser.add_argument("--work", type=Path, default=None, help="Where caches and heads go (default: a temp dir).")
    parser.add_argument("--out", type=Path, default=RESULTS / "views.json")
    args = parser.parse_args()
    if not HYMENOPTERA.is_dir():
        sys.exit(f"needs {HYMENOPTERA}")
    with tempfile.TemporaryDirectory(prefix="embedx-views-") as temp:
        work = args.work or Path(temp)
        work.mkdir(parents=True, exist_ok=True)
        results = {name: one_backbone(name, args.views, work) for name in args.backbones.split(",")}
    out = {"machine": machine_info(), "views": args.views, "head": "logreg (default)", "data": str(HYMENOPTERA),
           "note": "95% Wilson intervals; 153 val images: about ±3.5 points", "results": results}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
