"""``embedx report``: a self-contained HTML page whose numbers are evaluate's, with untrusted
strings escaped and untrusted image paths kept inside the data root."""

from __future__ import annotations

import base64
import io
import json
import os
import re
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image
from sklearn.datasets import make_classification

from embedx.cli.main import cli
from embedx.errors import HeadError, ImageDecodeError
from embedx.heads import HEAD_JSON, evaluate, fit_head, load_head
from embedx.metrics import accuracy_interval
from embedx.report import build_report, image_under_root, pca_2d, thumbnail_jpeg
from tests.test_heads import write_cache

HOSTILE_CLASS = "<script>alert(1)</script>"
HOSTILE_NAME = "<img src=x onerror=alert(2)>.png"
CLASSES = [HOSTILE_CLASS, "ants", "bees"]
SPLITS = ["train"] * 150 + ["val"] * 45 + ["test"] * 45
SECTIONS = ("metrics", "confusion", "reliability", "per-class", "mistakes", "feature-map")


def _image(path: Path, colour: tuple[int, int, int], size: int = 24) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (size, size), colour).save(path)
    return path


@pytest.fixture
def features():
    X, y = make_classification(n_samples=len(SPLITS), n_features=8, n_informative=4, n_classes=3,
                               n_clusters_per_class=1, flip_y=0.2, class_sep=0.8, random_state=0)
    return X.astype(np.float32), y


@pytest.fixture
def root(tmp_path, features):
    """A data root with one small image per row (``c<label>/<row>.png``)."""
    _, y = features
    folder = tmp_path / "data"
    for row, label in enumerate(y):
        _image(folder / f"c{label}" / f"{row}.png", (40 * label, 255 - row % 200, 90))
    return folder


@pytest.fixture
def head(tmp_path, features, root):
    """A logreg head fitted on a cache whose rows point at the images under ``root``."""
    X, y = features
    paths = [f"c{label}/{row}.png" for row, label in enumerate(y)]
    cache = write_cache(tmp_path / "feats.h5", X, y, SPLITS, CLASSES, paths=paths, attrs={"data": str(root)})
    fit_head(cache, output=tmp_path / "head", plots=False)
    return tmp_path / "head", cache


def _test_mistakes(head_dir: Path, X: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Row indices of the test split the head gets wrong."""
    model = load_head(head_dir)
    rows = np.flatnonzero(np.asarray(SPLITS) == "test")
    predicted = model.logits(X[rows]).argmax(axis=1)
    return rows[predicted != y[rows]]


@pytest.fixture
def hostile(tmp_path, features, root, head):
    """The same features with the paths of five test mistakes replaced by hostile ones:
    outside the root (relative, absolute, through a symlink), missing, corrupt, and an
    HTML-looking file name of a real image. Returns (head dir, cache, outside image)."""
    X, y = features
    head_dir, _ = head
    wrong = _test_mistakes(head_dir, X, y)
    assert len(wrong) >= 6, "the generated data must leave some test mistakes"
    outside = _image(tmp_path / "outside.png", (250, 0, 0), size=64)
    (root / "link.png").symlink_to(outside)
    (root / "corrupt.png").write_text("not an image")
    _image(root / HOSTILE_NAME, (0, 200, 0))
    paths = [f"c{label}/{row}.png" for row, label in enumerate(y)]
    hostile_paths = ["../outside.png", str(outside), "link.png", "missing/none.png", "corrupt.png", HOSTILE_NAME]
    for row, path in zip(wrong, hostile_paths, strict=False):
        paths[row] = path
    cache = write_cache(tmp_path / "hostile.h5", X, y, SPLITS, CLASSES, paths=paths, attrs={"data": str(root)})
    return head_dir, cache, outside


def test_report_has_every_section_and_nothing_external(head, tmp_path):
    head_dir, cache = head
    result = build_report(head_dir, cache, output=tmp_path / "out" / "report.html")
    page = result.output.read_text(encoding="utf-8")
    for section in SECTIONS:
        assert f'<section id="{section}">' in page
    assert 'id="adaptation"' not in page  # the head has no adaptation record
    assert result.focus_split == "test" and set(result.metrics) == {"train", "val", "test"}
    assert "http:" not in page and "https:" not in page and "href" not in page and "@import" not in page
    sources = re.findall(r'\bsrc="([^"]*)"', page)
    assert sources and all(s.startswith(("data:image/png;base64,", "data:image/jpeg;base64,")) for s in sources)
    assert "Content-Security-Policy" in page and "default-src 'none'" in page
    assert result.thumbnails == result.mistakes > 0 and not result.placeholders
    assert result.size_bytes == result.output.stat().st_size


def test_numbers_are_those_of_evaluate(head, tmp_path):
    head_dir, cache = head
    result = build_report(head_dir, cache, output=tmp_path / "report.html")
    expected = evaluate(head_dir, cache)
    page = result.output.read_text(encoding="utf-8")
    for split in ("train", "val", "test"):
        mine, theirs = result.metrics[split], expected[split]
        for key in ("n", "accuracy", "balanced_accuracy", "macro_f1", "log_loss", "ece", "confusion_matrix"):
            assert mine[key] == theirs[key], (split, key)
        low, high = theirs["accuracy_ci"]
        assert f"<td>{theirs['accuracy']:.4f}</td><td>[{low:.3f}, {high:.3f}]</td>" in page
    test = expected["test"]
    assert f"<b>{test['ece']:.4f}</b> raw" in page
    matrix = np.asarray(test["confusion_matrix"])
    assert result.mistakes == min(24, int(matrix.sum() - np.trace(matrix)))
    for i, name in enumerate(("ants", "bees")):
        row = test["per_class"][name]
        assert (f"<td class=name>{name}</td><td>{row['precision']:.3f}</td><td>{row['recall']:.3f}</td>"
                in page), i


def test_hostile_strings_are_escaped_and_paths_stay_inside_the_root(hostile, tmp_path):
    head_dir, cache, outside = hostile
    result = build_report(head_dir, cache, output=tmp_path / "report.html", max_mistakes=100)
    page = result.output.read_text(encoding="utf-8")
    assert "<script" not in page and "<img src=x" not in page
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page and "&lt;img src=x onerror=alert(2)&gt;.png" in page
    reasons = dict(result.placeholders)
    assert reasons["../outside.png"] == reasons[str(outside)] == reasons["link.png"] == "outside the data root: refused"
    assert reasons["missing/none.png"] == "missing"
    assert "not an image" in reasons["corrupt.png"] or "text file" in reasons["corrupt.png"]
    assert HOSTILE_NAME not in reasons  # a real image inside the root, only its name is odd
    assert result.thumbnails == result.mistakes - 5
    leaked = base64.b64encode(thumbnail_jpeg(outside)).decode("ascii")
    assert leaked not in page  # the picture outside the root never reaches the page


def test_image_under_root_refuses_every_way_out(tmp_path):
    root = tmp_path / "root"
    inside = _image(root / "a" / "b.png", (1, 2, 3))
    (root / "dir").mkdir()
    assert image_under_root(root, "a/b.png") == (inside.resolve(), "")
    assert image_under_root(root, "a/../a/b.png") == (inside.resolve(), "")
    assert image_under_root(root, "../root/a/b.png") == (inside.resolve(), "")  # back inside: fine
    for path in ("../x.png", "/etc/passwd", "a/../../x.png"):
        assert image_under_root(root, path) == (None, "outside the data root: refused"), path
    assert image_under_root(root, "dir") == (None, "not a regular file")
    assert image_under_root(root, "bad\0name.png")[0] is None
    assert image_under_root(root, "")[1] == "no path recorded"
    assert image_under_root(None, "a/b.png")[0] is None


def test_a_cache_without_a_data_root_gives_placeholders(tmp_path, features, head):
    X, y = features
    head_dir, _ = head
    cache = write_cache(tmp_path / "noroot.h5", X, y, SPLITS, CLASSES)
    result = build_report(head_dir, cache, output=tmp_path / "report.html")
    assert result.thumbnails == 0 and len(result.placeholders) == result.mistakes > 0
    assert "no data root" in result.placeholders[0][1]
    again = build_report(head_dir, cache, output=tmp_path / "again.html", data_root=tmp_path / "data", split="val")
    assert again.focus_split == "val" and again.thumbnails == 0  # write_cache's paths do not exist under data/


def test_adaptation_section_appears_only_for_adapted_heads(head, tmp_path, features):
    head_dir, cache = head
    plain = build_report(head_dir, None, output=tmp_path / "plain.html").output.read_text(encoding="utf-8")
    assert '<section id="adaptation">' not in plain
    X, y = features
    target = write_cache(tmp_path / "target.h5", (X * 1.5 + 2.0).astype(np.float32), y, SPLITS, CLASSES)
    adapted = fit_head(cache, output=tmp_path / "adapted", plots=False, adapt_to=target, adapt="standardize")
    info, n_val = adapted.metrics["adaptation"], adapted.metrics["val"]["n"]
    before = info["source_val_accuracy_before"]
    own = build_report(tmp_path / "adapted", None, output=tmp_path / "own.html").output.read_text(encoding="utf-8")
    assert '<section id="adaptation">' in own and "standardize" in own
    low, high = accuracy_interval(before, n_val)
    assert (f"without adaptation (the guard)</td><td>{n_val}</td><td>{before:.4f}</td><td>[{low:.3f}, {high:.3f}]</td>"
            in own)
    assert "adapted head</td>" in own and "target test" not in own and "not its source accuracy" in own
    result = build_report(tmp_path / "adapted", target, output=tmp_path / "target.html")
    page = result.output.read_text(encoding="utf-8")
    accuracy = result.metrics["test"]["accuracy"]
    assert f"<td class=name>target test (this cache)</td><td>45</td><td>{accuracy:.4f}" in page
    # the target's rows did not choose anything and were not trained on with labels
    assert "chose the regularization" not in page and "fitted on these rows" not in page
    assert page.count("the adaptation&#x27;s target: seen at fit without labels") == 3  # train, val, test
    assert f"<th>source_val_accuracy_before</th><td>{before:.4f}</td>" in page  # not repr(float)


def test_splits_of_another_cache_are_not_given_the_roles_they_had_at_fit(head, tmp_path, features):
    head_dir, cache = head
    own = build_report(head_dir, None, output=tmp_path / "own.html").output.read_text(encoding="utf-8")
    assert "chose the regularization and the temperature" in own and "not seen at fit" not in own
    X, y = features
    other = write_cache(tmp_path / "other.h5", X, y, SPLITS, CLASSES)
    page = build_report(head_dir, other, output=tmp_path / "other.html").output.read_text(encoding="utf-8")
    assert "chose the regularization" not in page and "fitted on these rows" not in page
    assert page.count("another cache than the head&#x27;s: not seen at fit") == 3


def test_pca_2d_matches_scikit_learn(features):
    from sklearn.decomposition import PCA

    X, _ = features
    coords, explained = pca_2d(X)
    reference = PCA(n_components=2).fit(X.astype(np.float64))
    expected = reference.transform(X.astype(np.float64))
    assert np.allclose(np.abs(coords), np.abs(expected), atol=1e-6)  # each axis up to its sign
    assert np.allclose(explained, reference.explained_variance_ratio_, atol=1e-9)


def test_cli_report_defaults_to_the_recorded_cache_and_errors_are_one_line(head, tmp_path):
    head_dir, _ = head
    runner = CliRunner()
    output = tmp_path / "cli.html"
    result = runner.invoke(cli, ["report", "--head", str(head_dir), "-o", str(output), "--json"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["output"] == str(output) and output.is_file() and summary["focus_split"] == "test"
    assert set(summary["accuracy"]) == {"train", "val", "test"}
    result = runner.invoke(cli, ["report", "--head", str(head_dir), "-o", str(output), "--split", "val",
                                 "--mistakes", "2"])
    assert result.exit_code == 0, result.output
    assert "2 mistakes shown (val), 2 thumbnails, 0 placeholders" in result.stdout
    assert f"report: {output}" in result.stdout
    result = runner.invoke(cli, ["report", "--head", str(head_dir), "-o", str(output), "--split", "nope"])
    assert result.exit_code == 1 and "split 'nope'" in result.stderr
    record = json.loads((head_dir / HEAD_JSON).read_text())
    record["cache"]["path"] = ""
    (head_dir / HEAD_JSON).write_text(json.dumps(record))
    with pytest.raises(HeadError, match="records no cache path"):
        build_report(head_dir, output=output)


@pytest.mark.slow
@pytest.mark.timeout(300)  # the first user of hymenoptera_lite0 extracts it
def test_hymenoptera_lite0_report(hymenoptera_lite0, tmp_path):
    cache, _ = hymenoptera_lite0
    fit_head(cache, output=tmp_path / "head", plots=False)
    result = build_report(tmp_path / "head", output=tmp_path / "report.html")
    assert result.focus_split == "val" and result.metrics["val"]["accuracy"] >= 0.94
    assert result.mistakes > 0 and result.thumbnails == result.mistakes and not result.placeholders
    assert result.size_bytes < 2_000_000


def test_many_classes_with_mathtext_names(tmp_path):
    """Above 40 classes the confusion matrix is a picture; names that matplotlib would parse as
    mathtext ("$...") never reach it, so they neither break a plot nor get mangled."""
    rng = np.random.default_rng(0)
    n_classes, per_class = 42, 5
    names = sorted(f"$c{i:02d}^{{" for i in range(n_classes))
    y = np.repeat(np.arange(n_classes), per_class)
    X = (rng.normal(size=(len(y), 6)) + 3 * rng.normal(size=(n_classes, 6))[y]).astype(np.float32)
    splits = np.tile(["train", "train", "train", "val", "test"], n_classes)
    cache = write_cache(tmp_path / "many.h5", X, y, splits, names)
    fit_head(cache, output=tmp_path / "head", plots=False)
    result = build_report(tmp_path / "head", output=tmp_path / "report.html")
    page = result.output.read_text(encoding="utf-8")
    assert 'alt="confusion matrix"' in page and "<table class=cm>" not in page
    assert "the first 40 of 42 classes" in page
    assert all(f"<td class=name>{name}</td>" in page for name in names)  # the per-class table, verbatim


def test_a_cross_validated_head_marks_val_as_trained_on_and_shows_the_folds(tmp_path, head):
    _, cache = head
    fit_head(cache, output=tmp_path / "cv", plots=False, cv=3)
    page = build_report(tmp_path / "cv", output=tmp_path / "report.html").output.read_text(encoding="utf-8")
    assert "the head was refitted on train+val: optimistic here" in page
    assert "cross-validation at fit-head: fold accuracy" in page


def test_thumbnails_refuse_a_swapped_symlink_and_a_fifo(tmp_path):
    """A file checked by image_under_root and swapped before it is read: not followed, not waited on."""
    inside = _image(tmp_path / "ok.png", (10, 20, 30), size=300)
    assert Image.open(io.BytesIO(thumbnail_jpeg(inside, 64))).size == (64, 64)
    (tmp_path / "link.png").symlink_to(inside)
    os.mkfifo(tmp_path / "fifo.png")
    for name in ("link.png", "fifo.png"):
        with pytest.raises(ImageDecodeError):
            thumbnail_jpeg(tmp_path / name)


def test_a_head_fitted_from_a_relative_path_is_reported_from_another_folder(tmp_path, features, monkeypatch):
    X, y = features
    write_cache(tmp_path / "feats.h5", X, y, SPLITS, CLASSES)
    write_cache(tmp_path / "target.h5", (X * 1.5 + 2.0).astype(np.float32), y, SPLITS, CLASSES)
    monkeypatch.chdir(tmp_path)
    fit_head("feats.h5", output="head", plots=False, adapt_to="target.h5", adapt="standardize")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    own = build_report(tmp_path / "head", None, output=tmp_path / "own.html").output.read_text(encoding="utf-8")
    assert "chose the regularization and the temperature" in own and "not seen at fit" not in own
    assert "not its source accuracy" in own  # the head's own cache, found from another folder
    on_target = build_report(tmp_path / "head", tmp_path / "target.h5", output=tmp_path / "target.html")
    assert "seen at fit without labels" in on_target.output.read_text(encoding="utf-8")


def test_a_moved_head_and_cache_are_still_recognised_by_their_rows(tmp_path, features):
    import shutil

    X, y = features
    project = tmp_path / "projA"
    write_cache(project / "feats.h5", X, y, SPLITS, CLASSES)
    write_cache(project / "target.h5", (X * 1.5 + 2.0).astype(np.float32), y, SPLITS, CLASSES)
    fit_head(project / "feats.h5", output=project / "head", plots=False, adapt_to=project / "target.h5",
             adapt="standardize")
    moved = tmp_path / "projB"
    shutil.move(project, moved)
    with pytest.raises(HeadError, match=r"projA/feats.h5, which is not there \(moved\?\); pass the cache with --cache"):
        build_report(moved / "head", None, output=tmp_path / "r.html")
    own = build_report(moved / "head", moved / "feats.h5", output=tmp_path / "own.html").output.read_text("utf-8")
    assert "chose the regularization and the temperature" in own and "not seen at fit" not in own
    target = build_report(moved / "head", moved / "target.h5", output=tmp_path / "t.html").output.read_text("utf-8")
    assert "seen at fit without labels" in target
    shutil.copy(moved / "feats.h5", tmp_path / "other.h5")  # a copy holds the same rows
    copy = build_report(moved / "head", tmp_path / "other.h5", output=tmp_path / "c.html").output.read_text("utf-8")
    assert "chose the regularization and the temperature" in copy
