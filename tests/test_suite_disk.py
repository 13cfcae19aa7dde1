"""The suite cleans up as it goes: a CI run once failed with 'No space left on device'.

Every backbone's export, bundles and checkpoints add up to gigabytes; these tests pin the two
mechanisms that keep only one test's files on disk at a time.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.conftest import scratch


def test_a_passing_tests_cache_and_tmp_path_are_deleted_after_it(pytester, request):
    """A test run inside this one (pytester) writes into its EMBEDX_CACHE_DIR and tmp_path and
    records both; once that run is over, neither folder exists."""
    pytester.makeconftest("from tests.conftest import _isolated_cache  # noqa: F401\n")
    pytester.makeini(
        "[pytest]\n"
        f"tmp_path_retention_policy = {request.config.getini('tmp_path_retention_policy')}\n"
        f"tmp_path_retention_count = {request.config.getini('tmp_path_retention_count')}\n"
    )
    seen = pytester.path / "seen.json"
    pytester.makepyfile(test_writes=f"""
        import json, os
        from pathlib import Path

        def test_writes(tmp_path):
            cache = Path(os.environ["EMBEDX_CACHE_DIR"])
            (cache / "onnx").mkdir()
            (cache / "onnx" / "model.onnx").write_bytes(b"\\0" * 4096)
            (tmp_path / "features.h5").write_bytes(b"\\0" * 4096)
            Path({str(seen)!r}).write_text(json.dumps({{"cache": str(cache), "tmp": str(tmp_path)}}))
    """)
    pytester.runpytest().assert_outcomes(passed=1)
    folders = json.loads(seen.read_text())
    assert not Path(folders["cache"]).exists(), "the per-test EMBEDX_CACHE_DIR must be deleted after the test"
    assert not Path(folders["tmp"]).exists(), "tmp_path_retention_policy must delete a passing test's tmp_path"


def test_scratch_is_deleted_even_when_the_block_fails(tmp_path_factory):
    with pytest.raises(RuntimeError), scratch(tmp_path_factory, "boom") as path:
        (path / "big.bin").write_bytes(b"\0" * 4096)
        raise RuntimeError("a fixture failed half way")
    assert not path.exists()
