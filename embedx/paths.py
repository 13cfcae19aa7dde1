"""Where embedx keeps what it builds: ONNX exports and feature caches."""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    """The cache root: ``$EMBEDX_CACHE_DIR`` if set, else ``./cache``."""
    return Path(os.environ.get("EMBEDX_CACHE_DIR") or "cache")


def onnx_dir() -> Path:
    return cache_dir() / "onnx"


def torch_home() -> Path:
    """torch's own cache root, honouring ``$TORCH_HOME`` like torch.hub does."""
    if os.environ.get("TORCH_HOME"):
        return Path(os.environ["TORCH_HOME"])
    xdg = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(xdg) / "torch"
