"""Fine-tuning: the cached head vs LP-FT vs plain fine-tuning, same budget.

On the ants/bees data with efficientnet_lite0 (real weights):

1. the cached-feature path: ``extract`` + ``fit-head`` (logistic regression);
2. LP-FT: ``finetune`` starting from that head, top ``--unfreeze`` blocks trained;
3. plain fine-tuning: the same run from a freshly initialized linear head
   (``reinit_head=True``), same epochs, learning rates, augmentation and seed.

Reported: val accuracy of each (for the fine-tuned runs both the best epoch, which
is what ``finetune`` keeps and is chosen on this same val split, so optimistic, and
the last epoch, which is not selected), wall seconds of each.  The goal is
LP-FT >= cached head and LP-FT >= plain fine-tuning.

    python bench/finetune.py [--quick] [--data DIR] [--epochs 3] [--unfreeze 2] [--out ...]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import HYMENOPTERA, markdown_table, write_result  # noqa: E402


def run(data: Path, *, backbone: str, epochs: int, unfreeze: str, batch_size: int, lr: float,
        backbone_lr_mult: float, workdir: Path, seed: int) -> dict:
    from embedx.extract import extract
    from embedx.finetune import finetune
    from embedx.heads import fit_head

    started = time.perf_counter()
    summary = extract(data, backbone=backbone, output=workdir / "feats.h5")
    extract_seconds = time.perf_counter() - started
    cache_path = Path(getattr(summary, "output", workdir / "feats.h5"))

    started = time.perf_counter()
    fitted = fit_head(cache_path, head="logreg", output=workdir / "heads" / "logreg")
    fit_seconds = time.perf_counter() - started
    cached_val = fitted.metrics.get("val", {}).get("accuracy")

    common = dict(unfreeze=unfreeze, epochs=epochs, batch_size=batch_size, lr=lr,
                  backbone_lr_mult=backbone_lr_mult, seed=seed, device="cpu")
    lpft = finetune(fitted.output_dir, data, output=workdir / "heads" / "lpft", **common)
    plain = finetune(fitted.output_dir, data, output=workdir / "heads" / "plain", reinit_head=True, **common)

    rows = [
        {"method": "cached head (extract + fit-head)", "val_accuracy": cached_val,
         "seconds": extract_seconds + fit_seconds},
        {"method": f"LP-FT ({epochs} epochs, unfreeze {unfreeze})", "val_accuracy": lpft.best_val_accuracy,
         "last_epoch_val_accuracy": lpft.history[-1]["val_accuracy"], "seconds": lpft.seconds,
         "best_epoch": lpft.best_epoch},
        {"method": "plain fine-tuning (random head, same budget)", "val_accuracy": plain.best_val_accuracy,
         "last_epoch_val_accuracy": plain.history[-1]["val_accuracy"], "seconds": plain.seconds,
         "best_epoch": plain.best_epoch},
    ]
    return {
        "data": str(data),
        "backbone": backbone,
        "settings": {**common, "lr": lr},
        "cached_head": {"val_accuracy": cached_val, "extract_seconds": extract_seconds,
                        "fit_seconds": fit_seconds,
                        "val_accuracy_torch_before": lpft.initial_val_accuracy},
        "lpft": lpft.to_dict(),
        "plain": plain.to_dict(),
        "rows": rows,
        "lpft_minus_cached": None if cached_val is None else lpft.best_val_accuracy - cached_val,
        "lpft_minus_plain": lpft.best_val_accuracy - plain.best_val_accuracy,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=HYMENOPTERA)
    parser.add_argument("--backbone", default="efficientnet_lite0")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--unfreeze", default="2")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--backbone-lr-mult", type=float, default=0.1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="1 epoch, top block only")
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    if not args.data.is_dir():
        sys.exit(f"data not found: {args.data}")
    if args.quick:
        args.epochs, args.unfreeze = 1, "1"
    with tempfile.TemporaryDirectory(prefix="embedx-bench-ft-") as tmp:
        workdir = args.workdir or Path(tmp)
        payload = run(args.data, backbone=args.backbone, epochs=args.epochs, unfreeze=args.unfreeze,
                      batch_size=args.batch_size, lr=args.lr, backbone_lr_mult=args.backbone_lr_mult,
                      workdir=workdir, seed=args.seed)
    payload["quick"] = args.quick
    path = write_result("finetune", payload, args.out)
    print(markdown_table(payload["rows"], ["method", "val_accuracy", "last_epoch_val_accuracy", "best_epoch",
                                           "seconds"]))
    print(f"wrote {path}", file=sys.stderr)


if __name__ == "__main__":
    main()
