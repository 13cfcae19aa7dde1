"""Multi-file artifacts under kills and concurrent writers (issue 15, items 6 and the Build
section): a head directory or a fine-tune output is the old one or the new one, never a mix;
a folder a killed swap moved aside is put back by the next reader; one writer at a time, and
the second is told who holds the lock. Kills here are real SIGKILLs of child processes."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from sklearn.datasets import make_classification

from embedx.errors import HeadError
from embedx.heads import load_head, make_head
from tests.test_heads import write_cache

REPO = Path(__file__).resolve().parent.parent


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(REPO)}


def _python(code: str, *args: str, **kwargs) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", textwrap.dedent(code), *args], env=_env(), text=True,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, **kwargs)


#: Run in a child: SIGKILL itself at the ``n``-th ``os.replace`` onto argv[1] (the target).
KILL_AT_RENAME = """
    import os, signal, sys
    from pathlib import Path
    target, n = Path(sys.argv[1]).resolve(), int(sys.argv[2])
    real, seen = os.replace, [0]
    def replace(src, dst):
        if Path(dst).resolve() == target or Path(src).resolve() == target:
            seen[0] += 1
            if seen[0] == n:
                os.kill(os.getpid(), signal.SIGKILL)
        return real(src, dst)
    os.replace = replace
"""


@pytest.fixture
def heads(tmp_path):
    X, y = make_classification(n_samples=120, n_features=8, n_informative=4, n_classes=2, random_state=0)
    X = X.astype(np.float32)
    return {kind: make_head(kind).fit(X, np.array(["ants", "bees"])[y]) for kind in ("logreg", "knn")}


@pytest.fixture
def cache_file(tmp_path):
    X, y = make_classification(n_samples=200, n_features=10, n_informative=5, n_classes=2, random_state=0)
    return write_cache(tmp_path / "feats.h5", X.astype(np.float32), y, ["train"] * 150 + ["val"] * 50,
                       ["ants", "bees"])


# -- a head moved aside by a killed swap is found by readers ----------------------------------


def test_a_head_moved_aside_by_a_killed_swap_is_restored_by_load_head(heads, tmp_path, caplog):
    out = tmp_path / "h"
    heads["logreg"].save(out)
    heads["knn"].save(tmp_path / "knn")
    # a real writer, SIGKILLed between atomic_dir's two renames (old aside, new not yet in)
    child = _python(KILL_AT_RENAME + """
    from embedx.heads import load_head
    load_head(sys.argv[3]).save(target)
    """, str(out), "2", str(tmp_path / "knn"))
    child.communicate(timeout=120)
    assert child.returncode == -9
    assert not out.exists() and list(tmp_path.glob(".h.tmp-aside-*/previous"))  # the state the kill left
    with caplog.at_level("WARNING"):
        head = load_head(out)
    assert head.head_type == "logreg"  # the old head, whole
    assert "restored" in caplog.text and str(out) in caplog.text
    assert out.is_dir() and not list(tmp_path.glob(".h.tmp-aside-*/previous"))
    heads["knn"].save(out)  # the next writer cleans the empty aside folder and the killed run's temporary
    assert load_head(out).head_type == "knn"
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_a_reader_of_a_read_only_folder_reads_the_moved_aside_head_where_it_lies(heads, tmp_path, monkeypatch):
    from embedx import fsio

    out = tmp_path / "h"
    heads["logreg"].save(out)
    aside = tmp_path / ".h.tmp-aside-killed"
    aside.mkdir()
    out.rename(aside / "previous")

    def refused(target):
        raise PermissionError(13, "Read-only file system", str(target))

    monkeypatch.setattr(fsio, "restore_moved_aside", refused)
    assert load_head(out).head_type == "logreg"
    assert not out.exists()


# -- one writer at a time ---------------------------------------------------------------------


HOLD_HEAD_DIR = """
    import sys
    from embedx.heads.base import head_dir_writer
    with head_dir_writer(sys.argv[1]) as work:
        (work / "partial").write_text("half a head")
        print("held", flush=True)
        sys.stdin.read()
"""


def test_a_second_writer_of_a_head_directory_is_refused_naming_the_first(heads, cache_file, tmp_path):
    out = tmp_path / "h"
    heads["logreg"].save(out)
    holder = _python(HOLD_HEAD_DIR, str(out))
    try:
        assert holder.stdout.readline().strip() == "held"
        second = subprocess.run([sys.executable, "-m", "embedx", "fit-head", "--cache", str(cache_file), "-o",
                                 str(out), "--head", "knn", "--json"], env=_env(), capture_output=True, text=True,
                                timeout=300)
        assert second.returncode == 1, second.stderr
        lines = [line for line in second.stderr.splitlines()  # progress bars aside
                 if "stage" not in line]
        assert len(lines) == 1 and "Traceback" not in second.stderr, second.stderr
        assert "another process is writing the head directory" in lines[0]
        assert f"pid {holder.pid}" in lines[0]
        with pytest.raises(HeadError, match=f"pid {holder.pid}"):
            heads["knn"].save(out)
    finally:
        holder.kill()
        holder.wait()
    assert load_head(out).head_type == "logreg"  # the killed holder changed nothing
    heads["knn"].save(out)  # its lock died with it; its temporary is cleaned
    assert load_head(out).head_type == "knn"
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_two_fit_heads_at_once_leave_one_whole_head(cache_file, tmp_path):
    out = tmp_path / "h"
    runs = [subprocess.Popen([sys.executable, "-m", "embedx", "fit-head", "--cache", str(cache_file), "-o",
                              str(out), "--head", kind, "--json"], env=_env(), text=True,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE) for kind in ("logreg", "knn")]
    results = [(run.wait(timeout=300), run.stderr.read()) for run in runs]
    for code, err in results:
        assert code == 0 or (code == 1 and "another process is writing" in err), err
    head = load_head(out)
    record = head.record_.fields
    assert head.head_type in ("logreg", "knn") and record["head_type"] == head.head_type
    assert sorted(p.name for p in out.iterdir()) == ["confusion_matrix.png", "head.json", "reliability.png",
                                                     "weights.safetensors"]


# -- a record names its own files relative to its folder --------------------------------------


def _head_with_onnx(heads, folder: Path, onnx_path: str, *, finetune: bool) -> Path:
    import json

    from embedx.fsio import sha256_file

    heads["logreg"].save(folder)
    (folder / "backbone.onnx").write_bytes(b"an onnx file")
    record = json.loads((folder / "head.json").read_text())
    record["cache"] = {"onnx_path": onnx_path, "onnx_sha256": sha256_file(folder / "backbone.onnx")}
    if finetune:
        record["finetune"] = {"epochs": 1}
    (folder / "head.json").write_text(json.dumps(record))
    return folder


def test_a_relative_backbone_path_is_read_inside_the_folder_wherever_it_moved(heads, tmp_path):
    from embedx.heads.record import HeadRecord

    folder = _head_with_onnx(heads, tmp_path / "ft", "backbone.onnx", finetune=True)
    folder.rename(tmp_path / "moved")
    assert HeadRecord.read(tmp_path / "moved").backbone_onnx() == tmp_path / "moved" / "backbone.onnx"


def test_an_old_absolute_backbone_path_inside_the_folder_still_works(heads, tmp_path):
    from embedx.heads.record import HeadRecord

    folder = tmp_path / "ft"
    _head_with_onnx(heads, folder, str((folder / "backbone.onnx").resolve()), finetune=True)
    assert HeadRecord.read(folder).backbone_onnx() == (folder / "backbone.onnx").resolve()


@pytest.mark.parametrize("onnx_path", ["../outside.onnx", "sub/../../outside.onnx", "ABSOLUTE"])
def test_a_fine_tune_record_naming_a_file_outside_its_folder_is_refused(heads, tmp_path, onnx_path):
    from embedx.heads.record import HeadRecord

    (tmp_path / "outside.onnx").write_bytes(b"an onnx file")
    if onnx_path == "ABSOLUTE":
        onnx_path = str(tmp_path / "outside.onnx")
    folder = _head_with_onnx(heads, tmp_path / "ft", onnx_path, finetune=True)
    with pytest.raises(HeadError, match="outside the head directory"):
        HeadRecord.read(folder).backbone_onnx()


def test_a_fit_head_record_may_name_an_export_elsewhere_by_absolute_path(heads, tmp_path):
    from embedx.heads.record import HeadRecord

    (tmp_path / "export.onnx").write_bytes(b"an onnx file")
    folder = _head_with_onnx(heads, tmp_path / "h", str(tmp_path / "export.onnx"), finetune=False)
    (folder / "backbone.onnx").unlink()
    assert HeadRecord.read(folder).backbone_onnx() == tmp_path / "export.onnx"
    with pytest.raises(HeadError, match="outside the head directory"):  # a relative name stays inside
        _head_with_onnx(heads, tmp_path / "h2", "../export.onnx", finetune=False)
        HeadRecord.read(tmp_path / "h2").backbone_onnx()


def test_a_second_bundle_writer_is_refused_naming_the_first(heads, tmp_path):
    out = tmp_path / "model.onnx"
    heads["logreg"].save(tmp_path / "h")
    holder = _python("""
        import sys
        from embedx.bundle import _output_lock
        with _output_lock(sys.argv[1]):
            print("held", flush=True)
            sys.stdin.read()
    """, str(out))
    try:
        assert holder.stdout.readline().strip() == "held"
        second = subprocess.run([sys.executable, "-m", "embedx", "bundle", "--head", str(tmp_path / "h"), "-o",
                                 str(out)], env=_env(), capture_output=True, text=True, timeout=120)
    finally:
        holder.kill()
        holder.wait()
    assert second.returncode == 1, second.stderr
    assert second.stderr.count("\n") == 1 and "Traceback" not in second.stderr
    assert "another process is writing the bundle" in second.stderr and f"pid {holder.pid}" in second.stderr


# -- a bundle over protobuf's 2 GB limit (external data) is replaced as a pair -----------------

#: Run in a child: save a 16-d tiny bundle (seed argv[3], temperature argv[4]) to argv[1] with a
#: proto limit of 0, so that its tensors go to an external data file as a > 2 GB bundle's do.
SAVE_EXTERNAL_BUNDLE = """
    import embedx.bundle
    from embedx.bundle import compose, save
    from tests.bundle_fixtures import CLASSES, SPEC, tiny_backbone, tiny_head
    embedx.bundle._PROTO_LIMIT = 0
    seed, temperature = int(sys.argv[3]), float(sys.argv[4])
    model = compose(tiny_backbone(feature_dim=16, seed=seed), tiny_head(feature_dim=16, seed=seed)[0],
                    classes=CLASSES, temperature=temperature, preprocess=SPEC,
                    metadata={"backbone": "tiny", "weights": "none", "feature_layer": "pool", "feature_dim": "16"})
    save(model, sys.argv[1])
"""


def _bundle_probabilities(path: Path) -> np.ndarray:
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (name, size) = session.get_inputs()[0].name, session.get_inputs()[0].shape[-1]
    pixels = np.random.default_rng(0).normal(size=(2, 3, size, size)).astype(np.float32)
    return session.run(None, {name: pixels})[0]


def test_a_killed_save_of_an_external_data_bundle_leaves_the_old_pair_whole(tmp_path):
    """The new tensors go to a data file of their own: a SIGKILL before the rename leaves the old
    .onnx with its own data, and the next save removes what the kill left and keeps one data file
    of one bundle's size (before, every save appended to one `<name>.data`, which only grew)."""
    out = tmp_path / "model.onnx"

    def save(seed: int, temperature: float, *, kill: bool = False) -> subprocess.CompletedProcess:
        code = textwrap.dedent(KILL_AT_RENAME if kill else "import sys") + textwrap.dedent(SAVE_EXTERNAL_BUNDLE)
        child = _python(code, str(out), "1", str(seed), str(temperature), cwd=REPO)
        stdout, stderr = child.communicate(timeout=120)
        return subprocess.CompletedProcess(child.args, child.returncode, stdout, stderr)

    assert save(0, 1.5).returncode == 0
    (data,) = [p for p in tmp_path.iterdir() if ".data" in p.name]
    old, size = _bundle_probabilities(out), data.stat().st_size
    assert onnx_external_location(out) == data.name

    killed = save(1, 3.0, kill=True)
    assert killed.returncode == -9, killed.stderr
    np.testing.assert_array_equal(_bundle_probabilities(out), old)  # the old bundle, whole
    assert len([p for p in tmp_path.iterdir() if ".data" in p.name]) == 2  # the killed run's new data

    assert save(1, 3.0).returncode == 0
    (data,) = [p for p in tmp_path.iterdir() if ".data" in p.name]
    assert onnx_external_location(out) == data.name and not list(tmp_path.glob(".model.onnx*"))
    assert data.stat().st_size == size  # the same shapes: the new tensors only
    assert not np.allclose(_bundle_probabilities(out), old, atol=1e-3)


def onnx_external_location(path: Path) -> str:
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    locations = {entry.value for tensor in model.graph.initializer for entry in tensor.external_data
                 if entry.key == "location"}
    (location,) = locations
    return location


# -- a full disk while writing a head, a report or a bundle: one line, the old artifact whole ------

#: Run the embedx CLI (argv[2:]) in a child where no file may grow past argv[1] bytes (EFBIG: a full disk).
CLI_WITH_FILE_LIMIT = """
    import resource, signal, sys
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    limit = int(sys.argv[1])
    from embedx.cli.main import cli
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    cli(sys.argv[2:], prog_name="embedx")
"""


def _full_disk(limit: int, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(CLI_WITH_FILE_LIMIT), str(limit), *args],
                          env=_env(), capture_output=True, text=True, timeout=120)


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


@pytest.mark.parametrize("limit", [64, 3000])  # the weights (safetensors' own error), head.json or a plot
def test_fit_head_on_a_full_disk_is_one_line_and_keeps_the_old_head(cache_file, tmp_path, limit):
    head = tmp_path / "head"
    assert _full_disk(1 << 30, "fit-head", "--cache", str(cache_file), "-o", str(head)).returncode == 0
    before = _snapshot(head)
    failed = _full_disk(limit, "fit-head", "--cache", str(cache_file), "-o", str(head), "--head", "linear")
    assert failed.returncode == 1 and "Traceback" not in failed.stderr, failed.stderr[-3000:]
    last = failed.stderr.strip().splitlines()[-1]
    assert last.startswith(f"error: cannot write {head}: EFBIG (27): File too large"), last
    assert _snapshot(head) == before
    assert not [p for p in tmp_path.iterdir() if ".tmp-" in p.name]


def test_report_and_bundle_on_a_full_disk_are_one_line(tmp_path):
    import onnx

    from tests.bundle_fixtures import tiny_backbone, write_images
    from tests.test_bundle import build_head_dirs

    for i, name in enumerate(("ants", "bees")):
        write_images(tmp_path / "data" / name, 8, seed=10 + i)
    onnx.save(tiny_backbone(), tmp_path / "tiny.onnx")
    head = build_head_dirs(tmp_path, tmp_path / "tiny.onnx", tmp_path / "data", ["logreg"])["logreg"]
    for command, output in (("report", tmp_path / "r.html"), ("bundle", tmp_path / "b.onnx")):
        failed = _full_disk(2000, command, "--head", str(head), "-o", str(output))
        assert failed.returncode == 1 and "Traceback" not in failed.stderr, failed.stderr[-3000:]
        last = failed.stderr.strip().splitlines()[-1]
        # the report fails at its first plot (a temporary PNG), the bundle at the bundle itself
        assert last.startswith("error: cannot write ") and ": EFBIG (27): File too large" in last, last
        assert not output.exists() and (command == "report" or str(output) in last)
