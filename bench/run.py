"""``make bench``: every benchmark in one run, JSON + PNG plots + one markdown table.

Each stage's script runs in its own process (so one crash does not hide the others)
and writes ``bench/results/<name>.json``.  This runner then collects them, draws the
plots and prints the summary table that the README quotes.

    python bench/run.py [--quick] [--only headline,extract,...]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"

#: (name, script, extra args for a full run). Order: cheapest first.  The counts are
#: set so that the whole suite takes about 10 minutes on a 2-core Xeon (18 on a
#: 2-core AMD EPYC without AVX-512); each
#: script's defaults (run it alone) are larger.  bench/finetune.py and bench/export.py
#: are not part of the suite (minutes each); run them on their own.
STAGES = [
    ("decode", "decode.py", ["--repeats", "3", "--large", "12"]),
    ("heads", "heads.py", ["--sklearn-budget", "60"]),
    ("scaling", "scaling.py", []),
    ("extract", "extract.py", ["--limit", "128", "--repeats", "2"]),
    ("serve", "serve.py", ["--soak", "2000", "--time-limit", "30"]),
    ("headline", "headline.py", ["--seeds", "2"]),
]


def run_stage(name: str, script: str, extra: list[str], quick: bool) -> dict:
    command = [sys.executable, str(HERE / script), "--out", str(RESULTS / f"{name}.json"), *extra]
    if quick:
        command.append("--quick")
    print(f"\n### {name}: {' '.join(command[1:])}", file=sys.stderr, flush=True)
    start = time.perf_counter()
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    completed = subprocess.run(command, env=env)
    seconds = time.perf_counter() - start
    status = "ok" if completed.returncode == 0 else f"failed (exit {completed.returncode})"
    print(f"### {name}: {status} in {seconds:.0f} s", file=sys.stderr, flush=True)
    return {"name": name, "status": status, "seconds": seconds}


def load(name: str) -> dict | None:
    path = RESULTS / f"{name}.json"
    return json.loads(path.read_text()) if path.exists() else None


def summary_table() -> str:
    """The README's table: one row per headline claim, each a ratio measured in one run."""
    lines = ["| stage | comparison | baseline | embedx | ratio |", "|---|---|---|---|---|"]

    def add(stage: str, what: str, base: str, ours: str, ratio: float | None) -> None:
        lines.append(f"| {stage} | {what} | {base} | {ours} | {'' if ratio is None else f'{ratio:.2f}×'} |")

    headline = load("headline")
    if headline:
        for row in headline.get("rows", []):
            add("train a classifier", f"{row['backbone']} ({row['weights']}, {row['precision']}): wall s / val acc",
                f"{row['tutorial_s']:.1f} s / {row['tutorial_val_acc']:.3f}",
                f"{row['embedx_s']:.1f} s / {row['embedx_val_acc']:.3f}", row["speedup"])
        for row in headline.get("refused", []):
            reason = row["refused"].split(";")[0]
            add("train a classifier", f"{row['backbone']} ({row['weights']}, {row['precision']})", "",
                f"refused: {reason}", None)
    for name in ("extract", "decode", "heads", "serve"):
        result = load(name)
        for row in (result or {}).get("summary", []):
            add(name, row["what"], row["baseline"], row["embedx"], row.get("ratio"))
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--only", default="", help="comma-separated stage names")
    args = parser.parse_args()
    only = {s for s in args.only.split(",") if s}
    RESULTS.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    statuses = [
        run_stage(name, script, extra, args.quick)
        for name, script, extra in STAGES
        if (not only or name in only) and (HERE / script).exists()
    ]
    try:
        from bench.plots import draw_all

        for png in draw_all(RESULTS):
            print(f"plot: {png}", file=sys.stderr)
    except Exception as e:  # plots are a nice-to-have; the numbers are in the JSON
        print(f"plots failed: {type(e).__name__}: {e}", file=sys.stderr)
    table = summary_table()
    (RESULTS / "summary.md").write_text(table + "\n")
    print("\n" + table)
    total = time.perf_counter() - start
    print(f"\nbench finished in {total:.0f} s; results in {RESULTS}", file=sys.stderr)
    (RESULTS / "run.json").write_text(json.dumps({"stages": statuses, "seconds": total}, indent=2) + "\n")
    if any(s["status"] != "ok" for s in statuses):
        sys.exit(1)


if __name__ == "__main__":
    sys.path.insert(0, str(HERE.parent))
    main()
