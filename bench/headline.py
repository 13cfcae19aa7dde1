"""Headline: "train a classifier on a folder of images", the tutorial way vs embedx.

The tutorial way is the PyTorch transfer-learning tutorial's fixed-feature-extractor
recipe, kept as written: ImageFolder + DataLoader with the tutorial transforms
(RandomResizedCrop + flip for train, Resize/CenterCrop for val), a frozen backbone
with a new linear classifier, SGD(lr=0.001, momentum=0.9), StepLR(7, 0.1), and the
backbone run forward over every image in every epoch.  The only changes: 10 epochs,
the backbone under test instead of resnet18-with-downloaded-weights, and the
backbone's own normalization.

embedx: ``extract`` once (ONNX Runtime, parallel decode) + ``fit-head`` (logistic
regression, regularization chosen on val).  Both run in this one process on the same
images; the ratio is what we report.

    python bench/headline.py [--quick] [--data DIR] [--out bench/results/headline.json]
"""

from __future__ import annotations

import argparse
import copy
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import HYMENOPTERA, markdown_table, write_result  # noqa: E402


def tutorial_way(data: Path, backbone: str, weights: str, *, epochs: int, seed: int, workers: int = 2) -> dict:
    """The tutorial's fixed-feature-extractor training loop, timed end to end."""
    import torch
    from torch import nn, optim
    from torch.optim import lr_scheduler
    from torchvision import datasets, transforms

    from embedx.backbones import build_feature_extractor, get_spec

    torch.manual_seed(seed)
    spec = get_spec(backbone)
    pre = spec.preprocess
    interpolation = transforms.InterpolationMode(pre.interpolation)
    data_transforms = {
        "train": transforms.Compose([
            transforms.RandomResizedCrop(pre.input_size, interpolation=interpolation),
            transforms.RandomHorizontalFlip(),
            transforms.ToTensor(),
            transforms.Normalize(pre.mean, pre.std),
        ]),
        "val": transforms.Compose([
            transforms.Resize(pre.resize_size, interpolation=interpolation),
            transforms.CenterCrop(pre.input_size),
            transforms.ToTensor(),
            transforms.Normalize(pre.mean, pre.std),
        ]),
    }
    start = time.perf_counter()
    image_datasets = {x: datasets.ImageFolder(data / x, data_transforms[x]) for x in ["train", "val"]}
    loaders = {
        x: torch.utils.data.DataLoader(image_datasets[x], batch_size=4, shuffle=True, num_workers=workers)
        for x in ["train", "val"]
    }
    features = build_feature_extractor(backbone, weights=weights)
    for param in features.parameters():
        param.requires_grad = False
    model = nn.Sequential(features, nn.Linear(spec.feature_dim, len(image_datasets["train"].classes)))
    criterion = nn.CrossEntropyLoss()
    optimizer = optim.SGD(model[1].parameters(), lr=0.001, momentum=0.9)
    scheduler = lr_scheduler.StepLR(optimizer, step_size=7, gamma=0.1)
    best_acc, best_state, history = 0.0, None, []
    for _epoch in range(epochs):
        for phase in ["train", "val"]:
            model.train() if phase == "train" else model.eval()  # as the tutorial does
            corrects = 0
            for inputs, labels in loaders[phase]:
                optimizer.zero_grad()
                with torch.set_grad_enabled(phase == "train"):
                    outputs = model(inputs)
                    loss = criterion(outputs, labels)
                    if phase == "train":
                        loss.backward()
                        optimizer.step()
                corrects += int((outputs.argmax(1) == labels).sum())
            if phase == "train":
                scheduler.step()
            else:
                acc = corrects / len(image_datasets["val"])
                history.append(acc)
                if acc > best_acc:
                    best_acc, best_state = acc, copy.deepcopy(model.state_dict())
    seconds = time.perf_counter() - start
    del best_state
    return {
        "seconds": seconds,
        "val_accuracy_best": best_acc,
        "val_accuracy_last": history[-1],
        "train_images": len(image_datasets["train"]),
        "val_images": len(image_datasets["val"]),
        "epochs": epochs,
        "seed": seed,
    }


def embedx_way(data: Path, backbone: str, weights: str, *, precision: str, workdir: Path) -> dict:
    from embedx.export import resolve_backbone
    from embedx.extract import extract
    from embedx.heads import fit_head

    export_start = time.perf_counter()
    resolve_backbone(backbone, weights=weights)  # cold export is cached; timed separately
    export_seconds = time.perf_counter() - export_start

    start = time.perf_counter()
    cache = workdir / f"{backbone}-{precision}.h5"
    summary = extract(data, backbone=backbone, weights=weights, output=cache, precision=precision, overwrite=True)
    extract_seconds = time.perf_counter() - start
    fit = fit_head(cache, head="logreg", output=workdir / f"head-{backbone}-{precision}")
    seconds = time.perf_counter() - start
    info = summary.to_dict() if hasattr(summary, "to_dict") else dict(vars(summary))
    return {
        "seconds": seconds,
        "extract_seconds": extract_seconds,
        "fit_seconds": seconds - extract_seconds,
        "export_seconds_first_time": export_seconds,
        "val_accuracy": fit.metrics["val"]["accuracy"],
        "images": info.get("images"),
        "precision": precision,
        "int8_cosine": info.get("int8_cosine"),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=HYMENOPTERA)
    parser.add_argument("--quick", action="store_true", help="2 epochs, one seed, fp32 only")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--seeds", default="2,4")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    if not args.data.is_dir():
        sys.exit(f"data not found: {args.data} (pass --data with train/ and val/ class folders)")
    epochs = 2 if args.quick else args.epochs
    seeds = [int(s) for s in args.seeds.split(",")][: 1 if args.quick else None]
    cases = [("resnet18", "none", seeds[:1]), ("efficientnet_lite0", "DEFAULT", seeds)]
    precisions = ["fp32"] if args.quick else ["fp32", "int8"]

    from embedx.errors import QuantizationError

    rows, refused = [], []
    with tempfile.TemporaryDirectory(prefix="embedx-headline-") as tmp:
        for backbone, weights, case_seeds in cases:
            tutorial_runs = [
                tutorial_way(args.data, backbone, weights, epochs=epochs, seed=seed) for seed in case_seeds
            ]
            tutorial_seconds = sum(r["seconds"] for r in tutorial_runs) / len(tutorial_runs)
            tutorial_acc = sum(r["val_accuracy_best"] for r in tutorial_runs) / len(tutorial_runs)
            for precision in precisions:
                try:
                    ours = embedx_way(args.data, backbone, weights, precision=precision, workdir=Path(tmp))
                except QuantizationError as e:
                    # the cosine gate refusing int8 on this CPU is a result, not a crash
                    print(f"{backbone} {precision}: refused: {e}", file=sys.stderr, flush=True)
                    refused.append({"backbone": backbone, "weights": weights, "precision": precision,
                                    "refused": str(e)})
                    continue
                rows.append({
                    "backbone": backbone,
                    "weights": weights,
                    "precision": precision,
                    "tutorial_s": tutorial_seconds,
                    "tutorial_val_acc": tutorial_acc,
                    "embedx_s": ours["seconds"],
                    "embedx_val_acc": ours["val_accuracy"],
                    "speedup": tutorial_seconds / ours["seconds"],
                    "embedx_extract_s": ours["extract_seconds"],
                    "embedx_fit_s": ours["fit_seconds"],
                    "export_s_first_time": ours["export_seconds_first_time"],
                    "int8_cosine": ours["int8_cosine"],
                    "tutorial_runs": tutorial_runs,
                })
    columns = ["backbone", "weights", "precision", "tutorial_s", "tutorial_val_acc", "embedx_s",
               "embedx_val_acc", "speedup"]
    table = markdown_table(rows, columns)
    print(table)
    path = write_result("headline", {"epochs": epochs, "seeds": seeds, "data": str(args.data),
                                     "rows": rows, "refused": refused, "table": table}, args.out)
    print(f"\nwrote {path}", file=sys.stderr)


if __name__ == "__main__":
    main()
