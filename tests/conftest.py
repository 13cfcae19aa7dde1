"""Shared fixtures: offline, CPU-only, each test in its own cache directory."""

from __future__ import annotations

from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SHARED_ASSETS = REPO.parent / "shared" / "assets"


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    """Every test gets its own EMBEDX_CACHE_DIR so tests never share exports by accident."""
    monkeypatch.setenv("EMBEDX_CACHE_DIR", str(tmp_path_factory.mktemp("embedx-cache")))


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
def mobilenet_int8_onnx(assets) -> Path:
    path = assets / "onnx" / "mobilenetv2-12-int8.onnx"
    if not path.is_file():
        pytest.skip(f"real model not available: {path} is absent")
    return path
