"""Export time and ONNX file size per backbone: first (cold) export vs cached.

The first export includes building the model, tracing, onnx.checker, and the
torch-vs-ORT parity check at batch 1 and 3; the cached one only verifies the file's
sha256 against its record.  Torchvision weights are not available offline here, so
they export with ``--weights none`` (same graph and size as pretrained);
EfficientNet-Lite uses its real weights.

    python bench/export.py [--quick] [--out bench/results/export.json]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import markdown_table, write_result  # noqa: E402

QUICK = [("resnet18", "none"), ("efficientnet_lite0", "DEFAULT")]
FULL = QUICK + [("resnet50", "none"), ("vit_b_16", "none"), ("inception_v3", "none"),
                ("convnext_tiny", "none"), ("swin_t", "none")]


def measure(name: str, weights: str) -> dict:
    from embedx.export import export_backbone

    with tempfile.TemporaryDirectory(prefix="embedx-bench-export-") as cache:
        os.environ["EMBEDX_CACHE_DIR"] = cache
        start = time.perf_counter()
        first = export_backbone(name, weights=weights)
        first_seconds = time.perf_counter() - start
        start = time.perf_counter()
        second = export_backbone(name, weights=weights)
        cached_seconds = time.perf_counter() - start
    assert second.cached and not first.cached
    return {
        "backbone": name,
        "weights": first.weights_tag,
        "feature_dim": first.feature_dim,
        "first_export_s": first_seconds,
        "cached_s": cached_seconds,
        "size_mb": first.size_bytes / 1e6,
        "max_rel_error": first.parity["max_rel_error"],
        "max_abs_error": first.parity["max_abs_error"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="resnet18 and efficientnet_lite0 only")
    parser.add_argument("--backbones", default=None,
                        help="comma-separated names instead of the default list (weights none, "
                             "DEFAULT for EfficientNet-Lite)")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    cases = QUICK if args.quick else FULL
    if args.backbones:
        cases = [(name, "DEFAULT" if name.startswith("efficientnet_lite") else "none")
                 for name in args.backbones.split(",")]
    rows = []
    for name, weights in cases:
        rows.append(measure(name, weights))
        print(rows[-1], file=sys.stderr, flush=True)
    columns = ["backbone", "weights", "feature_dim", "first_export_s", "cached_s", "size_mb", "max_rel_error"]
    table = markdown_table(rows, columns)
    path = write_result("export", {"rows": rows, "table": table, "quick": args.quick}, args.out)
    print(table)
    print(f"wrote {path}", file=sys.stderr)


if __name__ == "__main__":
    main()
