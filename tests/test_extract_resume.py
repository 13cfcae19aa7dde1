"""kill -9 an extraction again and again; the finished cache must equal an uninterrupted run's."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from embedx.cache import journal_dir, read_cache
from tests.test_extract import _build_tiny_onnx, write_image

N_IMAGES = 150
BATCH = 8

def make_data(root: Path) -> Path:
    for i in range(N_IMAGES):
        name = ("alpha", "beta")[i % 2]
        write_image(root / name / f"img_{i:03d}.jpg", name, i)
    (root / "alpha" / "broken.jpg").write_bytes(b"\xff\xd8\xff not a jpeg")
    (root / "beta" / "empty.png").write_bytes(b"")
    return root


def command(data: Path, onnx: Path, output: Path, workers: int) -> list[str]:
    return [sys.executable, "-m", "embedx", "extract", "--backbone", str(onnx), str(data),
            "-o", str(output), "--batch-size", str(BATCH), "--workers", str(workers), "--dtype", "float32",
            "--device", "cpu", "--threads", "1", "-q"]


def shard_count(output: Path) -> int:
    try:
        return sum(1 for name in os.listdir(journal_dir(output)) if name.startswith("shard-"))
    except FileNotFoundError:
        return 0


def children(pid: int) -> set[int]:
    found: set[int] = set()
    try:
        for task in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{task}/children") as handle:
                found |= {int(p) for p in handle.read().split()}
    except OSError:
        pass
    return found


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as handle:
            return handle.read().split(") ")[-1][:1] not in ("Z", "X")
    except OSError:
        return False


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("resume")
    return make_data(root / "data"), _build_tiny_onnx(root / "tiny.onnx"), root


@pytest.mark.parametrize("workers", [0, 1])
def test_sigkill_many_times_then_resume_equals_uninterrupted(setup, tmp_path, workers):
    data, onnx, _ = setup
    env = dict(os.environ, EMBEDX_CACHE_DIR=str(tmp_path / "cachedir"))
    reference = tmp_path / "reference.h5"
    subprocess.run(command(data, onnx, reference, workers), env=env, check=True, capture_output=True)

    output = tmp_path / "resumed.h5"
    rng = random.Random(1234 + workers)
    kills_mid_run = 0
    orphans: set[int] = set()
    for attempt in range(40):
        process = subprocess.Popen(command(data, onnx, output, workers), env=env,
                                   stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        start_shards = shard_count(output)
        # mostly a few batches into the run, sometimes at a random moment (startup, finalize)
        at_random_time = attempt % 3 == 2
        deadline = time.monotonic() + rng.uniform(0.2, 3.0)
        target = start_shards + rng.randint(1, 4)

        def trigger(at_random_time=at_random_time, deadline=deadline, target=target) -> bool:
            if at_random_time:
                return time.monotonic() >= deadline
            return shard_count(output) >= target
        killed = False
        while process.poll() is None:
            if trigger():
                orphans |= children(process.pid)
                process.send_signal(signal.SIGKILL)
                killed = True
                break
            time.sleep(0.002)
        _, stderr = process.communicate(timeout=120)
        if killed and process.returncode == -signal.SIGKILL:
            kills_mid_run += not output.exists()
            if kills_mid_run >= 5:
                break
            continue
        assert process.returncode == 0, stderr.decode()
        if kills_mid_run >= 3:
            break
        output.unlink()  # finished before enough kills: start over and kill sooner
    assert kills_mid_run >= 3, "the run finished before it could be killed often enough"
    # decode workers notice their parent died and exit
    deadline = time.monotonic() + 10
    while any(alive(pid) for pid in orphans) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not [pid for pid in orphans if alive(pid)]
    # the final rerun, with the same command, finishes the job
    finished = subprocess.run(command(data, onnx, output, workers), env=env, capture_output=True)
    assert finished.returncode == 0, finished.stderr.decode()

    expected, resumed = read_cache(reference), read_cache(output)
    assert resumed.complete and not journal_dir(output).exists()
    assert resumed.keys.tolist() == expected.keys.tolist()
    assert resumed.paths.tolist() == expected.paths.tolist()
    assert len(set(resumed.paths.tolist())) == len(resumed.paths) == N_IMAGES
    assert resumed.labels.tolist() == expected.labels.tolist()
    assert resumed.splits.tolist() == expected.splits.tolist()
    assert sorted(resumed.errors) == sorted(expected.errors)
    assert {p for p, _ in resumed.errors} == {"alpha/broken.jpg", "beta/empty.png"}
    np.testing.assert_array_equal(resumed.features, expected.features)
    assert not list(output.parent.glob(f".{output.name}.tmp-*"))


def test_second_writer_refused_while_first_runs_and_info_on_a_killed_run(setup, tmp_path):
    data, onnx, _ = setup
    env = dict(os.environ, EMBEDX_CACHE_DIR=str(tmp_path / "cachedir"))
    output = tmp_path / "f.h5"
    first = subprocess.Popen(command(data, onnx, output, 0), env=env, stdout=subprocess.DEVNULL,
                             stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 120
        while shard_count(output) < 2 and first.poll() is None and time.monotonic() < deadline:
            time.sleep(0.002)
        assert first.poll() is None, "the first run ended before it could be paused"
        first.send_signal(signal.SIGSTOP)  # paused mid-run, holding the lock
        second = subprocess.run(command(data, onnx, output, 0), env=env, capture_output=True, text=True)
        assert second.returncode == 1
        assert "another process is writing" in second.stderr
        first.send_signal(signal.SIGKILL)
    finally:
        first.kill()
        first.wait()
    info = subprocess.run([sys.executable, "-m", "embedx", "info", str(output)], env=env, capture_output=True,
                          text=True)
    assert info.returncode == 0, info.stderr
    assert "not finished" in info.stdout and "rerun the same" in info.stdout
    finished = subprocess.run(command(data, onnx, output, 0), env=env, capture_output=True, text=True)
    assert finished.returncode == 0, finished.stderr
    assert len(read_cache(output)) == N_IMAGES


def test_ctrl_c_stops_cleanly_and_the_rerun_finishes(setup, tmp_path):
    data, onnx, _ = setup
    env = dict(os.environ, EMBEDX_CACHE_DIR=str(tmp_path / "cachedir"))
    output = tmp_path / "f.h5"
    process = subprocess.Popen(command(data, onnx, output, 2), env=env, stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE, text=True, start_new_session=True,
                               preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.monotonic() + 120
    while shard_count(output) < 2 and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.002)
    assert process.poll() is None, "the run ended before it could be interrupted"
    os.killpg(process.pid, signal.SIGINT)  # what Ctrl-C in a terminal does: the whole group
    _, stderr = process.communicate(timeout=60)
    assert process.returncode != 0 and "Traceback" not in stderr, stderr
    assert not output.exists() and shard_count(output) >= 2
    finished = subprocess.run(command(data, onnx, output, 1), env=env, capture_output=True, text=True)
    assert finished.returncode == 0, finished.stderr
    assert len(read_cache(output)) == N_IMAGES
