"""Shared fixtures: offline, CPU-only, each test in its own cache directory."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SHARED_ASSETS = REPO.parent / "shared" / "assets"
#: Fixtures that read ../shared/assets: a test using one of them is marked ``data``.
DATA_FIXTURES = {"assets", "hymenoptera", "mobilenet_int8_onnx"}


def pytest_addoption(parser):
    parser.addoption("--zoo", action="store_true",
                     help="also run the `zoo` tests (every backbone's export; `make test-zoo`)")


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config, items):
    """Mark the tests that read ../shared/assets ``data``; leave out the ``zoo`` tests unless --zoo."""
    zoo = config.getoption("--zoo")
    selected, deselected = [], []
    for item in items:
        if DATA_FIXTURES & set(item.fixturenames):
            item.add_marker(pytest.mark.data)
        (deselected if item.get_closest_marker("zoo") and not zoo else selected).append(item)
    if deselected:
        config.hook.pytest_deselected(items=deselected)
        items[:] = selected


@contextmanager
def scratch(tmp_path_factory, name: str) -> Iterator[Path]:
    """A fresh directory that is deleted when the block ends, pass or fail.

    The suite writes gigabytes in all (every backbone's ONNX export, bundles, checkpoints);
    pytest keeps `mktemp` directories until the session ends, which once filled a CI
    machine's disk. Fixtures that write more than a few files use this instead.
    """
    path = tmp_path_factory.mktemp(name)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory):
    """Every test gets its own EMBEDX_CACHE_DIR, deleted after it, so tests never share exports
    by accident and the disk holds one test's exports at a time.

    It does not use the ``monkeypatch`` fixture: set up before the test's own fixtures, it is
    torn down after them, so the folder is deleted after a test's monkeypatches (of ``os.scandir``,
    say) are undone.
    """
    with pytest.MonkeyPatch.context() as patch, scratch(tmp_path_factory, "embedx-cache") as path:
        patch.setenv("EMBEDX_CACHE_DIR", str(path))
        yield path


@pytest.fixture(scope="session")
def shared_cache_dir(tmp_path_factory) -> Path:
    """A cache directory shared by a whole session, for expensive exports reused by many tests."""
    return tmp_path_factory.mktemp("embedx-shared-cache")


@pytest.fixture(scope="session")
def assets() -> Path:
    """../shared/assets, or a skip (with the reason) where it is absent."""
    if not SHARED_ASSETS.is_dir():
        pytest.skip(f"real data not available: {SHARED_ASSETS} is absent")
    return SHARED_ASSETS


@pytest.fixture(scope="session")
def hymenoptera(assets) -> Path:
    path = assets / "hymenoptera_data"
    if not path.is_dir():
        pytest.skip(f"real data not available: {path} is absent")
    return path


@pytest.fixture(scope="session")
def hymenoptera_lite0(hymenoptera, shared_cache_dir):
    """hymenoptera_data extracted once per session with efficientnet_lite0's real weights
    (extract's defaults, on the CPU): ``(cache path, ExtractSummary)``, for the tests that
    check the extraction, a head fitted on it and fine-tuning from that head."""
    from embedx.backbones import get_spec, weights_status
    from embedx.extract import extract

    if not weights_status(get_spec("efficientnet_lite0"))["available"]:
        pytest.skip("efficientnet_lite0 weights are not installed")
    output = shared_cache_dir / "hymenoptera-efficientnet_lite0.h5"
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("EMBEDX_CACHE_DIR", str(shared_cache_dir))
        summary = extract(hymenoptera, backbone="efficientnet_lite0", output=output, device="cpu")
    return output, summary


@pytest.fixture(scope="session")
def mobilenet_int8_onnx(assets) -> Path:
    path = assets / "onnx" / "mobilenetv2-12-int8.onnx"
    if not path.is_file():
        pytest.skip(f"real model not available: {path} is absent")
    return path
