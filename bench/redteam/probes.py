"""Issue 15's red-team probes, run against the CLI on real files; prints one line per probe.

Real data: a subset of hymenoptera (10 ants, 10 bees from train, 5+5 from val) and real
efficientnet_lite0 weights. Usage (from the repository root, with embedx importable):

    nice python -m bench.redteam.probes [--work DIR] [--skip-server] [--skip-inception]

Each probe prints ``PASS``/``FAIL`` and what it saw; the exit status is the number of FAILs.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

HYMENOPTERA = Path(os.environ.get("EMBEDX_HYMENOPTERA", "/work/shared/assets/hymenoptera_data"))
REPO = Path(__file__).resolve().parents[2]
RESULTS: list[tuple[str, bool, str]] = []


def embedx(*args, env=None, timeout=600, **kwargs) -> subprocess.CompletedProcess:
    full_env = {**os.environ, "PYTHONPATH": str(REPO), **(env or {})}
    return subprocess.run([sys.executable, "-m", "embedx", *map(str, args)], env=full_env, capture_output=True,
                          text=True, timeout=timeout, **kwargs)


def one_line_error(run: subprocess.CompletedProcess) -> bool:
    errors = [line for line in run.stderr.splitlines() if line.startswith("error")]
    return run.returncode == 1 and "Traceback" not in run.stderr and len(errors) == 1


def record(name: str, ok: bool, seen: str) -> None:
    RESULTS.append((name, ok, seen))
    print(f"{'PASS' if ok else 'FAIL'}  {name}: {seen}", flush=True)


def make_data(root: Path) -> Path:
    for split, count in (("train", 10), ("val", 5)):
        for label in ("ants", "bees"):
            folder = root / split / label
            folder.mkdir(parents=True, exist_ok=True)
            for path in sorted((HYMENOPTERA / split / label).glob("*.jpg"))[:count]:
                shutil.copy(path, folder / path.name)
    return root


# -- the probes ------------------------------------------------------------------------------


def probe_symlink_loop(work: Path) -> None:
    data = make_data(work / "loopdata")
    (data / "train" / "bees" / "loop").symlink_to("..")
    run = embedx("extract", data, "-b", "efficientnet_lite0", "-o", work / "loop.h5", "--device", "cpu", "--json",
                 "-q", "--workers", "0")
    from embedx.cache import read_cache

    cache = read_cache(work / "loop.h5", load_features=False)
    relabelled = [str(p) for p in cache.paths if "loop" in str(p)]
    recorded = "symlink loop" in run.stdout
    record("1 folder link to an ancestor", run.returncode == 0 and not relabelled and len(cache.paths) == 30
           and recorded, f"exit {run.returncode}, {len(cache.paths)} rows (30 images), rows under loop/: "
           f"{len(relabelled)}; recorded as a symlink loop in the skipped list: {recorded}")


def probe_disk_full(work: Path, data: Path) -> None:
    """RLIMIT_FSIZE: every write past 200 KB fails with EFBIG (Python ignores SIGXFSZ), an OSError
    while writing like ENOSPC; then a rerun without the limit must finish."""
    out = work / "full.h5"
    limited = subprocess.run(
        ["bash", "-c", f"ulimit -f 200; exec {sys.executable} -m embedx extract {data} -b efficientnet_lite0 -o {out}"
                       " --device cpu --dtype float32 -q --workers 0"],
        env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True, text=True, timeout=600)
    ok_error = limited.returncode == 1 and "Traceback" not in limited.stderr and limited.returncode != 139
    rerun = embedx("extract", data, "-b", "efficientnet_lite0", "-o", out, "--device", "cpu", "--dtype", "float32",
                   "-q", "--workers", "0", "--json")
    last = (limited.stderr.strip().splitlines() or [""])[-1][:160]
    record("2 a write fails (EFBIG, file size limit)", ok_error and rerun.returncode == 0,
           f"limited run exit {limited.returncode}, last line {last!r}; rerun exit {rerun.returncode}")


def probe_corruption(work: Path, data: Path) -> Path:
    from embedx.cache import read_cache
    from tests.test_cache import flip_feature_bytes

    out = work / "feats.h5"
    embedx("extract", data, "-b", "efficientnet_lite0", "-o", out, "--device", "cpu", "-q", "--workers", "0")
    fresh = read_cache(out)
    flip_feature_bytes(out, [3, 11])
    verify = embedx("verify", out, "--json")
    bad = json.loads(verify.stdout)["bad_rows"] if verify.stdout.strip() else None
    fit = embedx("fit-head", "--cache", out, "-o", work / "junkhead")
    rerun = embedx("extract", data, "-b", "efficientnet_lite0", "-o", out, "--device", "cpu", "-q", "--workers", "0",
                   "--json")
    summary = json.loads(rerun.stdout) if rerun.stdout.strip() else {}
    repaired = read_cache(out)
    same = repaired.features.tobytes() == fresh.features.tobytes()
    record("3 flipped feature bytes", verify.returncode == 1 and bad == [3, 11] and one_line_error(fit)
           and summary.get("repaired") == 2 and same,
           f"verify exit {verify.returncode} bad_rows {bad}; fit-head exit {fit.returncode}; extract rerun "
           f"new={summary.get('new')} repaired={summary.get('repaired')}; repaired == fresh: {same}")
    return out


def probe_head_json(work: Path, cache: Path, images: list[Path]) -> Path:
    head = work / "head"
    embedx("fit-head", "--cache", cache, "-o", head, "--json")
    good = json.loads((head / "head.json").read_text())
    (work / "outside").mkdir(exist_ok=True)
    shutil.copy(head / "weights.safetensors", work / "outside" / "w.safetensors")

    def variant(name, change):
        folder = work / f"bad-{name}"
        shutil.rmtree(folder, ignore_errors=True)
        shutil.copytree(head, folder)
        text = change(json.loads(json.dumps(good)))
        (folder / "head.json").write_text(text if isinstance(text, str) else json.dumps(text))
        return folder

    def setting(key, value):
        def change(d):
            d[key] = value
            return d
        return change

    def preprocess_size(value):
        def change(d):
            d["cache"]["preprocess"]["input_size"] = value
            d["cache"]["preprocess"]["resize_size"] = value
            return d
        return change

    variants = {
        "classes-dict": setting("classes", {"a": 1}), "classes-missing": lambda d: {k: v for k, v in d.items()
                                                                                  if k != "classes"},
        "feature_dim-abc": setting("feature_dim", "abc"), "unknown-key": setting("zzz", 1),
        "nested-100000": lambda d: "[" * 100000 + "]" * 100000, "top-level-list": lambda d: [d],
        "size-0": preprocess_size(0), "size-100000": preprocess_size(100000),
        "temperature-str": setting("temperature", "hot"), "temperature-0": setting("temperature", 0),
        "temperature-nan": lambda d: json.dumps(d).replace('"temperature": ' + json.dumps(d["temperature"]),
                                                           '"temperature": NaN'),
        "weights-outside": setting("weights_file", "../outside/w.safetensors"),
        "200000-classes": setting("classes", [f"c{i}" for i in range(200000)]),
        "weights-nan": None,
    }
    failures = []
    for name, change in variants.items():
        if change is None:
            folder = variant(name, lambda d: d)
            import numpy as np
            from safetensors.numpy import load_file, save_file

            arrays = load_file(str(folder / "weights.safetensors"))
            first = next(k for k, v in arrays.items() if v.dtype.kind == "f")
            arrays[first] = np.full_like(arrays[first], np.nan)
            save_file(arrays, str(folder / "weights.safetensors"))
        else:
            folder = variant(name, change)
        run = embedx("predict", "--head", folder, "--device", "cpu", "--json", images[0])
        ok = (run.returncode == 0 and "NaN" not in run.stdout) if name == "unknown-key" else one_line_error(run)
        if not ok:
            failures.append(f"{name}: exit {run.returncode} {run.stderr.strip()[-120:]!r}")
    record("4 malformed head.json (14 variants via predict --head)", not failures,
           f"{len(variants) - len(failures)}/{len(variants)} one-line errors (unknown key: accepted, exit 0)"
           + (f"; failing: {failures}" if failures else ""))
    return head


def probe_server(work: Path, head: Path) -> None:
    bundle = work / "model.onnx"
    embedx("bundle", "--head", head, "-o", bundle)
    refused = [embedx("serve-onnx", bundle, option, value).returncode for option, value in
               (("--max-body-mb", "nan"), ("--max-body-mb", "inf"), ("--timeout-s", "nan"), ("--max-delay-ms", "nan"))]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen([sys.executable, "-m", "embedx", "serve-onnx", str(bundle), "--port", str(port),
                               "--device", "cpu", "--log-level", "error"], env={**os.environ, "PYTHONPATH": str(REPO)},
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        status = None
        for _ in range(120):
            try:
                status = urllib.request.urlopen(f"http://127.0.0.1:{port}/health/ready", timeout=2).status
                break
            except (urllib.error.URLError, ConnectionError):
                time.sleep(0.5)
        body = ("[" * 50000 + "]" * 50000).encode()
        request = urllib.request.Request(f"http://127.0.0.1:{port}/v1/predict", data=body,
                                         headers={"content-type": "application/json"})
        try:
            deep = urllib.request.urlopen(request, timeout=30).status
        except urllib.error.HTTPError as e:
            deep = e.code
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(timeout=60)
    record("5 server: nan/inf options, 50,000-deep JSON", refused == [2, 2, 2, 2] and deep == 400 and status == 200,
           f"options exit {refused}; ready {status}; deep body -> {deep}; SIGTERM exit {server.returncode}")


KILL_BETWEEN_RENAMES = """
import os, signal, sys
from pathlib import Path
target = Path(sys.argv[1]).resolve()
real, seen = os.replace, [0]
def replace(src, dst):
    if target in (Path(src).resolve(), Path(dst).resolve()):
        seen[0] += 1
        if seen[0] == 2:
            os.kill(os.getpid(), signal.SIGKILL)
    return real(src, dst)
os.replace = replace
from embedx.cli.main import cli
cli(sys.argv[2:])
"""


def probe_fit_head_killed(work: Path, cache: Path, head: Path, images: list[Path]) -> None:
    target = work / "killed-head"
    shutil.copytree(head, target)
    before = embedx("predict", "--head", target, "--device", "cpu", "--json", *images).stdout
    child = subprocess.run([sys.executable, "-c", KILL_BETWEEN_RENAMES, str(target), "fit-head", "--cache", str(cache),
                            "-o", str(target), "--head", "knn"], env={**os.environ, "PYTHONPATH": str(REPO)},
                           capture_output=True, text=True, timeout=600)
    missing = not target.exists()
    after = embedx("predict", "--head", target, "--device", "cpu", "--json", *images)
    restored = json.loads((target / "head.json").read_text())["head_type"] if target.exists() else None
    record("6 fit-head SIGKILLed between its two renames", child.returncode == -9 and missing
           and after.returncode == 0 and after.stdout == before and restored == "logreg",
           f"child {child.returncode}, head dir missing after kill: {missing}; predict exit {after.returncode}, "
           f"same output as the old head: {after.stdout == before}; head_type {restored}; "
           f"log says restored: {'restored' in after.stderr}")
    # a second writer while one holds the folder
    holder = subprocess.Popen([sys.executable, "-c", "import sys; from embedx.heads.base import head_dir_writer\n"
                               "with head_dir_writer(sys.argv[1]):\n print('held', flush=True); sys.stdin.read()",
                               str(target)], env={**os.environ, "PYTHONPATH": str(REPO)}, stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    try:
        holder.stdout.readline()
        second = embedx("fit-head", "--cache", cache, "-o", target, "--json")
    finally:
        holder.kill()
        holder.wait()
    record("6b second fit-head on the same -o", one_line_error(second) and f"pid {holder.pid}" in second.stderr,
           f"exit {second.returncode}: {second.stderr.strip().splitlines()[-1][:200]!r}")


def probe_bundle(work: Path, head: Path) -> None:
    out = work / "b.onnx"
    stale = work / ".b.onnx.tmp-killedrun"
    stale.write_bytes(b"half a bundle")
    made = embedx("bundle", "--head", head, "-o", out)
    cleaned = not stale.exists()
    notes = work / "notes.txt"
    notes.write_text("precious")
    refused = embedx("bundle", "--head", head, "-o", notes)
    forced = embedx("bundle", "--head", head, "-o", notes, "--force")
    record("7 bundle temp cleanup, non-bundle -o", made.returncode == 0 and cleaned and one_line_error(refused)
           and forced.returncode == 0,
           f"stale temp removed: {cleaned}; -o notes.txt exit {refused.returncode}, with --force exit "
           f"{forced.returncode}")


def probe_smaller(work: Path, data: Path, head: Path) -> None:
    folder = work / "predict-in"
    folder.mkdir()
    source = sorted((data / "val" / "ants").glob("*.jpg"))[0]
    shutil.copy(source, folder / "a.jpg")
    shutil.copy(source, folder / ".hidden.jpg")
    shutil.copy(source, folder / "new\nline.jpg")
    (folder / "notes.txt").write_text("not an image")
    (folder / "link.jpg").symlink_to(source)
    run = embedx("predict", "--head", head, "--device", "cpu", folder)
    plain = run.stdout
    record("8a predict folder: hidden, newline, link, non-image", ".hidden" not in plain
           and "new\nline" not in plain and run.returncode in (0, 1),
           f"exit {run.returncode}; stdout lines {len(plain.splitlines())}; stderr: "
           f"{' | '.join(run.stderr.strip().splitlines()[-3:])[:240]!r}")
    deep = work / "x" / "y" / "z" / "h"
    made = embedx("fit-head", "--cache", work / "feats.h5", "-o", deep, "--json")
    record("8b -o creates parents and says so", made.returncode == 0 and "creating the missing folder" in made.stderr,
           f"exit {made.returncode}; warning: {'creating the missing folder' in made.stderr}")
    manifest = work / "m.csv"
    manifest.write_text(f"../{source.name},ants\n")
    shutil.copy(source, data.parent / source.name)
    outside = embedx("extract", data, "--manifest", manifest, "-b", "efficientnet_lite0", "-o", work / "m.h5",
                     "--device", "cpu", "-q")
    record("8c manifest path outside DATA", outside.returncode == 1 and "outside" in outside.stderr,
           f"exit {outside.returncode}: {outside.stderr.strip().splitlines()[-1][:200] if outside.stderr else ''!r}")


def probe_inception(work: Path, data: Path) -> None:
    run = embedx("extract", data, "-b", "inception_v3", "--weights", "none", "-o", work / "inc.h5", "--device", "cpu",
                 "-q", "--workers", "0")
    fit = embedx("fit-head", "--cache", work / "inc.h5", "-o", work / "inc-head")
    text = run.stderr + fit.stderr
    record("8d inception_v3 --weights none, float16", (run.returncode == 1 and "--dtype float32" in run.stderr)
           or (run.returncode == 0 and fit.returncode == 0),
           f"extract exit {run.returncode}; suggests --dtype float32: {'--dtype float32' in text}; "
           f"{run.stderr.strip().splitlines()[-1][:200] if run.stderr.strip() else ''!r}")


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--work", type=Path, default=Path("/tmp/embedx-redteam"))
    parser.add_argument("--skip-server", action="store_true")
    parser.add_argument("--skip-inception", action="store_true")
    args = parser.parse_args()
    sys.path.insert(0, str(REPO))
    shutil.rmtree(args.work, ignore_errors=True)
    args.work.mkdir(parents=True)
    os.environ.setdefault("EMBEDX_CACHE_DIR", str(args.work / "cache"))
    data = make_data(args.work / "data")
    images = sorted((data / "val" / "bees").glob("*.jpg"))[:2]
    probe_symlink_loop(args.work)
    cache = probe_corruption(args.work, data)
    probe_disk_full(args.work, data)
    head = probe_head_json(args.work, cache, images)
    probe_fit_head_killed(args.work, cache, head, images)
    probe_bundle(args.work, head)
    probe_smaller(args.work, data, head)
    if not args.skip_server:
        probe_server(args.work, head)
    if not args.skip_inception:
        probe_inception(args.work, data)
    failed = sum(not ok for _, ok, _ in RESULTS)
    print(f"{len(RESULTS) - failed}/{len(RESULTS)} probes pass")
    return failed


if __name__ == "__main__":
    sys.exit(main())
