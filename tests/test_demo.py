"""The demo loop end to end on a short run of the rendered digits (real weights)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from embedx.demo import render_digits, run_demo


def test_render_digits_is_reproducible_and_split(tmp_path):
    first = render_digits(tmp_path / "a", per_class=3)
    second = render_digits(tmp_path / "b", per_class=3)
    files_a = sorted(p.relative_to(first).as_posix() for p in first.rglob("*.png"))
    files_b = sorted(p.relative_to(second).as_posix() for p in second.rglob("*.png"))
    assert files_a == files_b
    assert {p.split("/")[0] for p in files_a} == {"train", "val", "test"}
    assert len({p.split("/")[1] for p in files_a}) == 10
    assert len(files_a) == 3 * 3 * 10


@pytest.mark.slow
def test_demo_runs_end_to_end(tmp_path):
    summary = run_demo(workdir=tmp_path, per_class=12)
    assert summary["images"] == 12 * 3 * 10
    # real EfficientNet-Lite0 features separate digits far above chance (0.1)
    assert summary["val_accuracy"] > 0.6
    assert summary["held_out_images"] == 120
    assert summary["held_out_accuracy"] > 0.6
    low, high = summary["held_out_accuracy_ci"]
    assert low < summary["held_out_accuracy"] <= high
    assert summary["val_accuracy_ci"][0] < summary["val_accuracy"]


def test_demo_cli_help_runs():
    result = subprocess.run([sys.executable, "-m", "embedx.demo", "--help"], capture_output=True, text=True)
    assert result.returncode == 0
    assert "--per-class" in result.stdout
