"""The suite cleans up as it goes: a CI run once failed with 'No space left on device'.

Every backbone's export, bundles and checkpoints add up to gigabytes; these tests pin the two
mechanisms that keep only one test's files on disk at a time. They run in file order.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.conftest import scratch

_seen: dict[str, Path] = {}


def test_a_test_writes_into_its_own_cache_and_tmp_path(tmp_path):
    cache = Path(os.environ["EMBEDX_CACHE_DIR"])
    (cache / "onnx").mkdir()
    (cache / "onnx" / "model.onnx").write_bytes(b"\0" * 4096)
    (tmp_path / "features.h5").write_bytes(b"\0" * 4096)
    _seen.update(cache=cache, tmp=tmp_path)


def test_the_previous_tests_folders_are_gone():
    if not _seen:
        pytest.skip("run together with the test above it (file order)")
    assert not _seen["cache"].exists(), "the per-test EMBEDX_CACHE_DIR must be deleted after the test"
    assert not _seen["tmp"].exists(), "tmp_path_retention_policy must delete a passing test's tmp_path"


def test_scratch_is_deleted_even_when_the_block_fails(tmp_path_factory):
    with pytest.raises(RuntimeError), scratch(tmp_path_factory, "boom") as path:
        (path / "big.bin").write_bytes(b"\0" * 4096)
        raise RuntimeError("a fixture failed half way")
    assert not path.exists()

