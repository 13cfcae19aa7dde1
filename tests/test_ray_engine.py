"""``extract(..., engine="ray")`` on a local Ray cluster (2 CPUs, shared by the module's tests):
the cache equals the local engine's, a killed Ray worker or driver costs no rows, and a
missing Ray is one clear error."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from embedx.cache import journal_dir, read_cache
from embedx.errors import BackendError, ConfigError
from tests.corpus import make_corpus
from tests.test_extract import _build_tiny_onnx, class_folders, cli_run, run, write_image
from tests.test_extract_resume import alive, children

#: The process title Ray gives the inference actors (``ray::MapWorker(MapBatches(_Embedder))``).
ACTOR_TITLE = "MapWorker(MapBatches(_Embedder))"


@pytest.fixture(scope="module")
def ray_cluster(tmp_path_factory):
    """One local Ray cluster with 2 CPUs for this module (starting one costs seconds): its address."""
    pytest.importorskip("ray", reason="Ray is not installed: pip install 'embedx[ray]'")
    import ray

    from embedx.ray_engine import connect

    if ray.is_initialized():
        ray.shutdown()
    # the workers' environment is fixed when the cluster starts: their derived-model cache must
    # outlive the per-test EMBEDX_CACHE_DIR that is current at this moment
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("EMBEDX_CACHE_DIR", str(tmp_path_factory.mktemp("ray-workers-cache")))
        patch.setenv("RAY_ADDRESS", "")
        seconds, started = connect()
    assert started and ray.is_initialized()
    try:
        yield ray.get_runtime_context().gcs_address
    finally:
        ray.shutdown()


@pytest.fixture(scope="module")
def backbone(tmp_path_factory) -> str:
    """test_extract's tiny ONNX backbone (3 layers, 8-d features)."""
    return str(_build_tiny_onnx(tmp_path_factory.mktemp("tiny") / "tiny.onnx"))


def ray_run(data, backbone, output, **options):
    """test_extract.run's extraction on the Ray engine (which refuses ``workers``)."""
    from embedx.extract import extract

    options.setdefault("batch_size", 4)
    return extract(data, backbone=backbone, output=output, device="cpu", engine="ray", **options)


def assert_same_cache(got: Path, expected: Path) -> None:
    a, b = read_cache(got), read_cache(expected)
    assert a.complete and not journal_dir(got).exists()
    assert a.keys.tolist() == b.keys.tolist()
    assert a.paths.tolist() == b.paths.tolist()
    assert len(set(a.paths.tolist())) == len(a.paths)
    assert a.labels.tolist() == b.labels.tolist()
    assert a.splits.tolist() == b.splits.tolist()
    assert a.classes == b.classes
    assert sorted(a.errors) == sorted(b.errors)
    assert a.features.dtype == b.features.dtype
    assert a.features.tobytes() == b.features.tobytes()


def actor_pids() -> set[int]:
    found = set()
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                with open(f"/proc/{name}/cmdline", "rb") as handle:
                    if ACTOR_TITLE.encode() in handle.read():
                        found.add(int(name))
            except OSError:
                continue
    return found


def test_ray_equals_local_with_bad_input_copies_and_increments(ray_cluster, tmp_path, backbone):
    corpus = make_corpus(tmp_path / "data")
    data = tmp_path / "data"
    good = next(relpath for relpath, name in corpus["decode"].items() if name == "alpha")
    shutil.copy(data / good, data / "beta" / "copy_of_an_alpha.jpg")  # one key under two names and labels
    local = run(data, backbone, tmp_path / "local.h5", workers=2)
    calls = []
    on_ray = ray_run(data, backbone, tmp_path / "ray.h5", actors=2,
                  progress=lambda done, total, info: calls.append((done, total)))
    assert_same_cache(tmp_path / "ray.h5", tmp_path / "local.h5")
    assert read_cache(tmp_path / "ray.h5").errors, "the corpus has bad inputs"
    assert (on_ray.images, on_ray.new, on_ray.reused, on_ray.errors) == \
        (local.images, local.new, local.reused, local.errors)
    assert on_ray.engine == "ray" and on_ray.actors == 2 and on_ray.providers == ["CPUExecutionProvider"]
    assert on_ray.engine_start_seconds == 0.0  # joined the running cluster
    assert calls[0][0] == 0 and calls[-1][0] == calls[-1][1] > 0

    # an increment: two images added, one removed; only the new ones are computed
    (data / good).unlink()
    for index in (90, 91):
        write_image(data / "beta" / f"new_{index}.jpg", "beta", index)
    local = run(data, backbone, tmp_path / "local.h5", workers=0)
    on_ray = ray_run(data, backbone, tmp_path / "ray.h5")
    assert on_ray.new == local.new == 2 and on_ray.actors == 1
    assert_same_cache(tmp_path / "ray.h5", tmp_path / "local.h5")
    again = ray_run(data, backbone, tmp_path / "ray.h5")
    assert again.new == 0 and again.actors == 0  # nothing to do: no Ray job at all

    # the engine is not part of the cache's identity: each updates the other's cache
    write_image(data / "alpha" / "new_92.jpg", "alpha", 92)
    assert ray_run(data, backbone, tmp_path / "local.h5").new == 1
    assert run(data, backbone, tmp_path / "ray.h5").new == 1
    assert_same_cache(tmp_path / "ray.h5", tmp_path / "local.h5")


def test_an_inference_actor_killed_mid_run_costs_no_rows(ray_cluster, tmp_path, backbone):
    data = class_folders(tmp_path / "data", per_class=120)
    run(data, backbone, tmp_path / "local.h5", dtype="float32")
    killed: list[tuple[int, int, int]] = []
    earlier = actor_pids()  # an earlier test's pool may still be shutting down

    def kill_an_actor(done: int, total: int, info: dict) -> None:
        if killed or done == 0:
            return
        pids = actor_pids() - earlier
        assert pids, "no inference actor of this run is alive"
        pid = min(pids)
        os.kill(pid, signal.SIGKILL)
        killed.append((pid, done, total))

    summary = ray_run(data, backbone, tmp_path / "ray.h5", dtype="float32", actors=2,
                  progress=kill_an_actor)
    pid, done, total = killed[0]
    assert done < total, "the run should have had batches left when the actor was killed"
    assert summary.new == summary.images == 240
    assert_same_cache(tmp_path / "ray.h5", tmp_path / "local.h5")


def _extract_command(data: Path, backbone: str, output: Path) -> list[str]:
    return [sys.executable, "-m", "embedx", "extract", "--backbone", backbone, str(data), "-o", str(output),
            "--batch-size", "4", "--dtype", "float32", "--device", "cpu", "--engine", "ray", "-q", "--json"]


@pytest.mark.timeout(240)
def test_a_killed_driver_resumes_with_the_same_command(tmp_path, backbone):
    """The CLI as users run it: no --ray-address, so it starts its own cluster, which dies with it."""
    pytest.importorskip("ray", reason="Ray is not installed: pip install 'embedx[ray]'")
    data = class_folders(tmp_path / "data", per_class=150)
    (data / "alpha" / "broken.jpg").write_bytes(b"\xff\xd8\xff not a jpeg")
    run(data, backbone, tmp_path / "local.h5", dtype="float32")
    output = tmp_path / "ray.h5"
    env = {name: value for name, value in os.environ.items() if name != "RAY_ADDRESS"}
    env["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).resolve().parent.parent), env.get("PYTHONPATH", "")])
    command = _extract_command(data, backbone, output)
    process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    journaled, cluster = 0, set()
    try:
        deadline = time.monotonic() + 120
        while process.poll() is None and time.monotonic() < deadline:
            journaled = len(list(journal_dir(output).glob("shard-*"))) if journal_dir(output).is_dir() else 0
            if journaled >= 3:
                cluster = children(process.pid)  # the cluster it started: GCS, raylet, ...
                process.send_signal(signal.SIGKILL)
                break
            time.sleep(0.005)
    finally:
        _, stderr = process.communicate(timeout=60)
    assert process.returncode == -signal.SIGKILL, f"not killed mid-run: {stderr.decode()[-2000:]}"
    assert journaled >= 3 and not output.exists() and cluster
    deadline = time.monotonic() + 30
    while any(alive(pid) for pid in cluster) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not [pid for pid in cluster if alive(pid)], "the killed driver's Ray cluster outlived it"

    finished = subprocess.run(command, env=env, capture_output=True, timeout=150)
    assert finished.returncode == 0, finished.stderr.decode()[-2000:]
    summary = json.loads(finished.stdout)
    assert summary["engine"] == "ray" and 0 < summary["new"] < summary["images"] == 300
    assert summary["engine_start_seconds"] > 0  # its own cluster, started and stopped
    assert_same_cache(output, tmp_path / "local.h5")


#: Runs the embedx CLI in a Python where `import ray` fails as it does when Ray is not installed.
WITHOUT_RAY = """
import sys
from importlib.abc import MetaPathFinder

class NoRay(MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "ray" or name.startswith("ray."):
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return None

sys.meta_path.insert(0, NoRay())
from embedx.cli.main import main
main(sys.argv[1:])
"""


def test_without_ray_the_engine_is_one_clear_error(tmp_path, backbone):
    data = class_folders(tmp_path / "data", per_class=1)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(Path(__file__).resolve().parent.parent),
                                                        os.environ.get("PYTHONPATH", "")]))

    def without_ray(*args) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-c", WITHOUT_RAY, "extract", "--backbone", backbone, str(data),
                               "-o", str(tmp_path / "f.h5"), "--device", "cpu", "-q", *args],
                              env=env, capture_output=True, text=True, timeout=120)

    result = without_ray("--engine", "ray")
    assert result.returncode == 1, result.stderr
    assert result.stderr.startswith("error: ") and len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert "pip install 'embedx[ray]'" in result.stderr and "No module named 'ray'" in result.stderr
    assert not (tmp_path / "f.h5").exists() and not journal_dir(tmp_path / "f.h5").exists()
    # the local engine does not need it
    assert without_ray("--workers", "0").returncode == 0


def test_ray_options_are_checked(ray_cluster, tmp_path, backbone):
    data = class_folders(tmp_path / "data", per_class=2)
    out = tmp_path / "f.h5"
    with pytest.raises(ConfigError, match="need --engine ray"):
        run(data, backbone, out, actors=2)
    with pytest.raises(ConfigError, match="int8"):
        ray_run(data, backbone, out, precision="int8")
    with pytest.raises(ConfigError, match="--decode gpu"):
        ray_run(data, backbone, out, decode="gpu")
    with pytest.raises(ConfigError, match="GPUs"):
        ray_run(data, backbone, out, gpus_per_actor=1)
    with pytest.raises(ConfigError, match="drop --workers"):
        ray_run(data, backbone, out, workers=2)
    with pytest.raises(ConfigError, match="engine must be"):
        run(data, backbone, out, engine="spark")
    assert cli_run("extract", "--backbone", backbone, data, "--engine", "ray", "--actors", 0).exit_code == 2
    from embedx.extract import extract
    from embedx.providers import gpu_available

    if not gpu_available():  # an embedx error raised in an actor reaches the caller as itself, one line
        with pytest.raises(BackendError, match="needs an NVIDIA GPU") as raised:
            extract(data, backbone=backbone, output=out, engine="ray", device="cuda")
        assert "\n" not in str(raised.value)
    result = cli_run("extract", "--backbone", backbone, data, "-o", out, "--device", "cpu", "--engine", "ray",
                     "--actors", 2, "--batch-size", 2)
    assert result.exit_code == 0, result.output
    assert "ray: 2 inference actors" in result.stderr and result.stdout.strip() == str(out)
    assert read_cache(out).keys.size == 4


def assert_same_views(got: Path, expected: Path) -> None:
    from embedx.cache import read_views

    a, b = read_views(got), read_views(expected)
    for name in ("source", "names", "keys"):
        assert getattr(a, name).tolist() == getattr(b, name).tolist(), name
    assert a.plan == b.plan and a.features.tobytes() == b.features.tobytes()


def test_ray_computes_views_as_the_local_engine_does(ray_cluster, tmp_path, backbone):
    """`--views K` on Ray: the same view rows (keys, clean rows, names, plan, feature bytes) as
    the local engine, on a fresh cache (every view listed before keys are known, a byte copy
    among them) and on an increment (only the new image's views computed)."""
    from tests.test_views import split_data

    data = split_data(tmp_path / "data", train=5, val=2)
    original = data / "train" / "alpha" / "alpha_0.jpg"
    (data / "train" / "beta" / "copy_of_alpha_0.jpg").write_bytes(original.read_bytes())
    (data / "train" / "alpha" / "broken.jpg").write_bytes(b"\xff\xd8\xff not a jpeg")
    local = run(data, backbone, tmp_path / "local.h5", views=2, augment="flip,crop,color,rotate")
    calls = []
    on_ray = ray_run(data, backbone, tmp_path / "ray.h5", views=2, augment="flip,crop,color,rotate", actors=2,
                     progress=lambda done, total, info: calls.append((done, total)))
    assert_same_cache(tmp_path / "ray.h5", tmp_path / "local.h5")
    assert_same_views(tmp_path / "ray.h5", tmp_path / "local.h5")
    assert (on_ray.new, on_ray.views, on_ray.new_views) == (local.new, local.views, local.new_views)
    assert on_ray.views == 2 * 11 and calls[-1][0] == calls[-1][1]  # 11 decodable train images, the copy too

    write_image(data / "train" / "alpha" / "alpha_new.jpg", "alpha", 77)
    local = run(data, backbone, tmp_path / "local.h5")  # a plain rerun keeps the cache's views
    on_ray = ray_run(data, backbone, tmp_path / "ray.h5")
    assert (on_ray.new, on_ray.new_views) == (local.new, local.new_views) == (1, 2)
    assert_same_cache(tmp_path / "ray.h5", tmp_path / "local.h5")
    assert_same_views(tmp_path / "ray.h5", tmp_path / "local.h5")


def test_ray_shards_merge_into_the_local_cache(ray_cluster, tmp_path, backbone):
    from embedx.merge import merge

    data = class_folders(tmp_path / "data", per_class=8)
    (data / "beta" / "broken.jpg").write_bytes(b"\xff\xd8\xff not a jpeg")
    run(data, backbone, tmp_path / "local.h5")
    parts = [tmp_path / f"part-{index}.h5" for index in range(2)]
    for index, part in enumerate(parts):
        summary = ray_run(data, backbone, part, shard=(index, 2))
        assert 0 < summary.new < 16
    merge(parts, output=tmp_path / "all.h5")
    assert_same_cache(tmp_path / "all.h5", tmp_path / "local.h5")


def test_joins_a_running_cluster_by_address_or_ray_address(ray_cluster, tmp_path, backbone):
    import ray

    data = class_folders(tmp_path / "data", per_class=3)
    run(data, backbone, tmp_path / "local.h5")
    env = {name: value for name, value in os.environ.items() if name != "RAY_ADDRESS"}
    env["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).resolve().parent.parent), env.get("PYTHONPATH", "")])
    logs = Path(ray._private.worker.global_worker.node.get_session_dir_path()) / "logs"
    for how, output in (("flag", tmp_path / "flag.h5"), ("environment", tmp_path / "env.h5")):
        command = [sys.executable, "-m", "embedx", "extract", "--backbone", backbone, str(data), "-o", str(output),
                   "--batch-size", "4", "--device", "cpu", "--engine", "ray", "-q", "--json"]
        if how == "flag":
            command += ["--ray-address", ray_cluster]
        process = subprocess.Popen(command, env=dict(env, RAY_ADDRESS=ray_cluster) if how == "environment" else env,
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        stdout, stderr = process.communicate(timeout=120)
        assert process.returncode == 0, stderr.decode()[-2000:]
        assert json.loads(stdout)["new"] == 6
        assert_same_cache(output, tmp_path / "local.h5")
        # it ran as a driver of this cluster (Ray logs each driver in the cluster's session folder)
        assert list(logs.glob(f"python-core-driver-*_{process.pid}.log")), f"{how}: did not join {ray_cluster}"
    assert ray.cluster_resources().get("CPU") == 2  # the joined cluster outlives the runs that joined it
