"""embedx: run a frozen backbone once, keep the features, train heads in seconds.

Importing ``embedx`` imports neither torch nor onnxruntime; each stage lives in
its own module (see docs/architecture.md).
"""

from __future__ import annotations

__version__ = "0.1.0"

from embedx.errors import EmbedxError  # noqa: E402

__all__ = ["EmbedxError", "__version__"]
