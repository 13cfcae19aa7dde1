"""Fine-tuning after the linear probe (LP-FT): the one place a backbone is unfrozen.

``finetune(head_dir, data)`` rebuilds the torch backbone a head's cache was made
with, puts the trained head on top (the linear probe: LP), and trains the whole
thing end to end with augmentation (FT).  Starting from a trained head instead of a
random one keeps the early gradients from wrecking the pretrained features
(Kumar et al., "Fine-Tuning can Distort Pretrained Features and Underperform
Out-of-Distribution", ICLR 2022).

The result is a head directory of the same format as ``fit-head`` whose cache
section points at the fine-tuned backbone (exported to ONNX through
``export.export_module``, parity-checked), so ``predict``, ``evaluate``, ``bundle``
and ``serve-onnx`` use it unchanged, plus the backbone's state dict
(``backbone.safetensors``) that ``build_feature_extractor(name, weights=path)``
and ``embedx extract --weights`` rebuild it from.

Output directory::

    head.json, weights.safetensors   the head (fit-head format), on the new backbone
    backbone.onnx                    the fine-tuned backbone (input "input", output "features")
    backbone.safetensors             its state dict
    finetune.json                    config, per-epoch history, before/after accuracy
    train/checkpoint.pt              after each epoch: model, best model so far, optimizer,
                                     schedule, rng, history (what a resume continues from)
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import math
import os
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from embedx import preprocess as pp
from embedx.errors import ConfigError, DataError, HeadError, ImageDecodeError
from embedx.progress import ProgressCallback

log = logging.getLogger(__name__)

CHECKPOINT_FILE = "checkpoint.pt"
BACKBONE_WEIGHTS_FILE = "backbone.safetensors"
BACKBONE_ONNX_FILE = "backbone.onnx"
REPORT_FILE = "finetune.json"
TRAIN_SUBDIR = "train"
CHECKPOINT_VERSION = 1

#: RandomResizedCrop's area range.  torchvision's (0.08, 1) is tuned for ImageNet
#: from scratch; a few epochs on a small data set do better with milder crops.
DEFAULT_CROP_SCALE = (0.25, 1.0)
#: Largest tolerated difference between the composed torch model's probabilities
#: and the saved head's on the same features (a wrong conversion is far above it).
COMPOSITION_TOLERANCE = 1e-3
#: The held-out fraction when the data has no "val" split.
DEFAULT_VAL_FRACTION = 0.2


@dataclass(frozen=True)
class FinetuneConfig:
    """Everything that changes what training does (except ``epochs``).

    A checkpoint is resumed only with the same config; ``epochs`` may grow between
    runs (the cosine schedule then stretches to the new length).
    """

    head_sha256: str
    data_root: str
    classes: tuple[str, ...]
    unfreeze: str
    batch_size: int
    lr: float
    backbone_lr_mult: float
    warmup_epochs: float
    weight_decay: float
    augment: bool
    crop_scale: tuple[float, float]
    hflip: bool
    seed: int
    reinit_head: bool

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["classes"] = list(self.classes)
        data["crop_scale"] = list(self.crop_scale)
        return data


@dataclass(frozen=True)
class FinetuneResult:
    output_dir: Path
    best_val_accuracy: float
    history: tuple[dict[str, Any], ...]
    seconds: float
    onnx_path: Path
    initial_val_accuracy: float | None = None
    best_epoch: int = 0
    backbone_weights: Path | None = None
    resumed_from_epoch: int = 0
    device: str = "cpu"
    parity: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        for key in ("output_dir", "onnx_path", "backbone_weights"):
            data[key] = str(data[key]) if data[key] is not None else None
        data["history"] = list(self.history)
        return data


# --------------------------------------------------------------------------- model


class FinetuneModel(nn.Module):
    """Backbone (images -> features) followed by the head (features -> logits)."""

    def __init__(self, backbone: nn.Module, head: nn.Module) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = head

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(images))


def _linear(weight: np.ndarray, bias: np.ndarray) -> nn.Linear:
    """``nn.Linear`` from a head's (D, C) weight and (C,) bias (numpy's ``x @ W + b``)."""
    weight = np.asarray(weight, dtype=np.float32)
    layer = nn.Linear(weight.shape[0], weight.shape[1])
    with torch.no_grad():
        layer.weight.copy_(torch.from_numpy(np.ascontiguousarray(weight.T)))
        layer.bias.copy_(torch.from_numpy(np.asarray(bias, dtype=np.float32).reshape(-1)))
    return layer


class TorchHead(nn.Module):
    """A saved logreg/linear/mlp head in torch: its standardization (fixed), then its layers.

    The standardization stays a pair of buffers rather than being folded into the
    first layer, so the trained weights keep the scale AdamW and weight decay were
    tuned for, and ``arrays()`` gives back the head's own safetensors layout.
    """

    def __init__(self, mean: np.ndarray, scale: np.ndarray, layers: nn.Sequential) -> None:
        super().__init__()
        self.register_buffer("mean", torch.as_tensor(np.asarray(mean, dtype=np.float32)).clone())
        self.register_buffer("scale", torch.as_tensor(np.asarray(scale, dtype=np.float32)).clone())
        self.layers = layers

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.layers((features - self.mean) / self.scale)

    @classmethod
    def from_head(cls, head: Any) -> TorchHead:
        head_type = getattr(head, "head_type", type(head).__name__)
        if head_type in ("logreg", "linear"):
            layers = nn.Sequential(_linear(head.weight_, head.bias_))
        elif head_type == "mlp":
            layers = nn.Sequential(
                _linear(head.w1_, head.b1_), nn.ReLU(), nn.Dropout(float(head.dropout)), _linear(head.w2_, head.b2_)
            )
        else:
            raise HeadError(
                f"cannot fine-tune a {head_type!r} head: it has no layer to put on a backbone; "
                "fit a logreg, linear or mlp head (`embedx fit-head --head logreg`) and fine-tune that"
            )
        return cls(head.mean_, head.scale_, layers)

    def reset(self) -> None:
        """A fresh random head on raw features (plain fine-tuning, for comparison)."""
        with torch.no_grad():
            self.mean.zero_()
            self.scale.fill_(1.0)
        for layer in self.layers:
            if isinstance(layer, nn.Linear):
                layer.reset_parameters()

    def arrays(self) -> dict[str, np.ndarray]:
        """The weights in the saved head's layout (``weights.safetensors`` names)."""

        def numpy(tensor: torch.Tensor) -> np.ndarray:
            return np.ascontiguousarray(tensor.detach().float().cpu().numpy())

        linears = [layer for layer in self.layers if isinstance(layer, nn.Linear)]
        arrays = {"mean": numpy(self.mean), "scale": numpy(self.scale)}
        if len(linears) == 1:
            arrays.update(weight=numpy(linears[0].weight.T), bias=numpy(linears[0].bias))
        else:
            first, second = linears
            arrays.update(w1=numpy(first.weight.T), b1=numpy(first.bias), w2=numpy(second.weight.T),
                          b2=numpy(second.bias))
        return arrays


# --------------------------------------------------------------------------- data


class ImageListDataset(torch.utils.data.Dataset):
    """(path, label) pairs -> (CHW float tensor, label); unreadable images give None."""

    def __init__(self, items: Sequence[tuple[str, int]], spec: pp.PreprocessSpec, transform=None) -> None:
        self.items = list(items)
        self.spec = spec
        self.transform = transform

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int):
        path, label = self.items[index]
        try:
            if self.transform is None:
                pixels = torch.from_numpy(pp.load(path, self.spec))
            else:
                pixels = self.transform(pp.decode(path, min_size=self.spec.resize_size))
        except ImageDecodeError as e:
            log.warning("skipping %s", e)
            return None
        return pixels, label


def _collate(batch):
    batch = [sample for sample in batch if sample is not None]
    if not batch:
        return None
    images = torch.stack([sample[0] for sample in batch])
    labels = torch.tensor([sample[1] for sample in batch], dtype=torch.long)
    return images, labels


def train_transform(spec: pp.PreprocessSpec, *, crop_scale=DEFAULT_CROP_SCALE, hflip: bool = True):
    """RandomResizedCrop (+ flip) on a decoded PIL image, normalized like the eval path."""
    from torchvision.transforms import InterpolationMode, v2

    steps = [
        v2.ToImage(),
        v2.RandomResizedCrop(
            spec.input_size,
            scale=tuple(crop_scale),
            interpolation=InterpolationMode(spec.interpolation),
            antialias=True,
        ),
    ]
    if hflip:
        steps.append(v2.RandomHorizontalFlip())
    steps += [v2.ToDtype(torch.float32, scale=True), v2.Normalize(list(spec.mean), list(spec.std))]
    return v2.Compose(steps)


def _split_items(dataset, head_classes: Sequence[str]) -> tuple[list, list]:
    """Train and val (path, label) lists, labels in the head's class order."""
    data_classes = list(dataset.classes)
    if sorted(data_classes) != sorted(head_classes):
        raise DataError(
            f"the data's classes {data_classes} differ from the head's classes {list(head_classes)}; "
            "fine-tune on data with the classes the head was fitted on, or fit a new head "
            "(`embedx extract` + `embedx fit-head`) for these classes"
        )
    remap = {i: list(head_classes).index(name) for i, name in enumerate(data_classes)}
    train = [(str(it.path), remap[it.label]) for it in dataset.items if it.split == "train"]
    val = [(str(it.path), remap[it.label]) for it in dataset.items if it.split == "val"]
    if not val and train:
        # The same content-keyed split as `embedx extract --val-fraction`, stable across reruns.
        from embedx.data import hash_file, split_for_key

        held_out = [split_for_key(hash_file(path), DEFAULT_VAL_FRACTION) == "val" for path, _ in train]
        val = [item for item, out in zip(train, held_out, strict=True) if out]
        train = [item for item, out in zip(train, held_out, strict=True) if not out]
        log.warning(
            "the data has no 'val' split; holding out %d of %d training images for validation",
            len(val),
            len(val) + len(train),
        )
    if not train:
        raise DataError(f"no training images found in {dataset.root}; expected a 'train' split or class folders")
    if not val:
        raise DataError(f"no validation images in {dataset.root}; add a 'val' split folder")
    return train, val


# --------------------------------------------------------------------------- training pieces


def parse_unfreeze(value: str | int) -> str:
    """'all' or a non-negative block count, as the string stored in the config."""
    text = str(value).strip().lower()
    if text == "all":
        return "all"
    try:
        count = int(text)
    except ValueError:
        count = -1
    if count < 0:
        raise ConfigError(f"unfreeze must be 'all' or a number of blocks >= 0, got {value!r}")
    return str(count)


def _trainable_blocks(backbone: nn.Module, unfreeze: str, blocks: Sequence[nn.Module]) -> list[nn.Module]:
    if unfreeze == "all":
        return [backbone]
    count = int(unfreeze)
    if count > len(blocks):
        raise ConfigError(
            f"unfreeze={count} but this backbone has {len(blocks)} blocks; "
            f"use a number from 0 to {len(blocks)} or 'all'"
        )
    return list(blocks[len(blocks) - count :]) if count else []


def set_trainable(model: FinetuneModel, trainable: Sequence[nn.Module]) -> int:
    """Freeze the backbone except ``trainable`` blocks; returns the trainable parameter count."""
    model.backbone.requires_grad_(False)
    for block in trainable:
        block.requires_grad_(True)
    model.head.requires_grad_(True)
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def set_train_mode(model: FinetuneModel, trainable: Sequence[nn.Module]) -> None:
    """Train mode for the head and trainable blocks, eval for frozen ones.

    Frozen blocks keep their batch-norm running statistics (and no dropout): they
    stay exactly the feature extractor the head was fitted on.
    """
    model.train()
    model.backbone.eval()
    for block in trainable:
        block.train()


def param_groups(model: FinetuneModel, *, lr: float, backbone_lr_mult: float, weight_decay: float) -> list[dict]:
    """AdamW groups: head vs backbone (discriminative LR), no decay on biases and norms."""
    groups = []
    for part, part_lr in ((model.head, lr), (model.backbone, lr * backbone_lr_mult)):
        params = [p for p in part.parameters() if p.requires_grad]
        decay = [p for p in params if p.ndim > 1]
        no_decay = [p for p in params if p.ndim <= 1]
        if decay:
            groups.append({"params": decay, "lr": part_lr, "weight_decay": weight_decay})
        if no_decay:
            groups.append({"params": no_decay, "lr": part_lr, "weight_decay": 0.0})
    return groups


def warmup_cosine(step: int, *, warmup_steps: int, total_steps: int) -> float:
    """LR multiplier: linear warm-up to 1, then cosine down to 0 (per optimizer step)."""
    if warmup_steps and step < warmup_steps:
        return (step + 1) / (warmup_steps + 1)
    span = max(total_steps - warmup_steps, 1)
    progress = min(max(step - warmup_steps, 0) / span, 1.0)
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device not in ("cpu", "cuda") and not device.startswith("cuda:"):
        raise ConfigError(f"device must be 'auto', 'cpu' or 'cuda', got {device!r}")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError("device 'cuda' asked for but torch sees no CUDA GPU; use --device cpu")
    return torch.device(device)


def _autocast(device: torch.device):
    """bf16 (or fp16) autocast on CUDA only; a no-op context on the CPU."""
    import contextlib

    if device.type != "cuda":
        return contextlib.nullcontext(), None
    if torch.cuda.is_bf16_supported():
        return torch.autocast("cuda", dtype=torch.bfloat16), None
    return torch.autocast("cuda", dtype=torch.float16), torch.amp.GradScaler("cuda")


def _to_device(batch, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Move one (images, labels) batch; channels-last on CUDA, where it is faster."""
    images, labels = batch
    images = images.to(device, non_blocking=True)
    if device.type == "cuda":
        images = images.contiguous(memory_format=torch.channels_last)
    return images, labels.to(device, non_blocking=True)


@torch.no_grad()
def evaluate_model(model: FinetuneModel, loader, device: torch.device) -> dict[str, float]:
    """Validation loss and accuracy (eval mode, the eval preprocessing)."""
    model.eval()
    total, correct, loss_sum = 0, 0, 0.0
    context, _ = _autocast(device)
    for batch in loader:
        if batch is None:
            continue
        images, labels = _to_device(batch, device)
        with context:
            logits = model(images)
        loss_sum += float(nn.functional.cross_entropy(logits.float(), labels, reduction="sum"))
        correct += int((logits.argmax(1) == labels).sum())
        total += int(labels.numel())
    if not total:
        raise DataError("none of the validation images could be decoded")
    return {"val_loss": loss_sum / total, "val_accuracy": correct / total, "val_count": total}


@torch.no_grad()
def collect_logits(model: FinetuneModel, loader, device: torch.device) -> tuple[np.ndarray, np.ndarray]:
    model.eval()
    all_logits, all_labels = [], []
    for batch in loader:
        if batch is None:
            continue
        images, labels = batch
        all_logits.append(model(images.to(device)).float().cpu().numpy())
        all_labels.append(labels.numpy())
    return np.concatenate(all_logits), np.concatenate(all_labels)


# --------------------------------------------------------------------------- files


def _replace_atomically(path: Path, write: Callable[[str], Any]) -> None:
    """``write(temp name)`` next to ``path``, then rename: a kill leaves the old file or the new one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    os.close(handle)
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _atomic_torch_save(obj: Any, path: Path) -> None:
    _replace_atomically(path, lambda tmp: torch.save(obj, tmp))


def _atomic_write_text(path: Path, text: str) -> None:
    _replace_atomically(path, lambda tmp: Path(tmp).write_text(text))


def _rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _load_checkpoint(path: Path) -> dict[str, Any] | None:
    if not path.is_file():
        return None
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unreadable file is reported the same way
        raise ConfigError(
            f"cannot read the checkpoint {path} ({type(e).__name__}: {e}); "
            "delete it or pass resume=False (--no-resume) to start over"
        ) from e
    if checkpoint.get("version") != CHECKPOINT_VERSION:
        raise ConfigError(
            f"checkpoint {path} has version {checkpoint.get('version')!r}, expected {CHECKPOINT_VERSION}; "
            "delete it or pass resume=False (--no-resume)"
        )
    return checkpoint


def _config_mismatch(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    keys = sorted(set(saved) | set(current))
    return [f"{k}: checkpoint {saved.get(k)!r} vs now {current.get(k)!r}" for k in keys if saved.get(k) != current.get(k)]


# --------------------------------------------------------------------------- the start: head + backbone


@dataclass
class _Start:
    """What fine-tuning starts from: the head dir's record, the head, the torch model."""

    head_json: dict[str, Any]
    head: Any
    backbone_name: str
    feature_layer: str | None
    preprocess: pp.PreprocessSpec
    model: FinetuneModel
    blocks: list[nn.Module]


def _load_start(head_dir: Path, *, reinit_head: bool, seed: int) -> _Start:
    from embedx.backbones import build_feature_extractor, feature_blocks
    from embedx.heads import load_head
    from embedx.onnxgraph import is_onnx_path

    head = load_head(head_dir)
    head_json = head.info_  # head.json as load_head read it
    cache = head_json.get("cache") or {}
    backbone_name = cache.get("backbone")
    if not backbone_name or str(backbone_name).startswith("onnx:") or is_onnx_path(backbone_name):
        raise ConfigError(
            f"the head in {head_dir} was fitted on features of {backbone_name!r}, which is not a torch "
            "backbone from the registry; fine-tuning needs one (see `embedx backbones`)"
        )
    weights_arg = cache.get("weights_arg") or "DEFAULT"
    feature_layer = cache.get("feature_layer")
    preprocess = pp.PreprocessSpec.from_dict(cache["preprocess"])
    backbone = build_feature_extractor(backbone_name, weights=weights_arg, layer=feature_layer)
    torch.manual_seed(seed)
    module = TorchHead.from_head(head)
    if reinit_head:
        module.reset()
    model = FinetuneModel(backbone, module)
    return _Start(head_json, head, backbone_name, feature_layer, preprocess, model, list(feature_blocks(backbone)))


@torch.no_grad()
def check_composition(start: _Start, images: torch.Tensor) -> float:
    """Max |p_torch - p_head| on ``images``; raises HeadError beyond the tolerance.

    The head's own ``predict_proba`` on the torch backbone's features must equal
    softmax(logits / temperature) of the composed model: this catches a wrong
    conversion of the head before hours of training are spent on it.
    """
    start.model.eval()
    features = start.model.backbone(images)
    temperature = float(start.head_json.get("temperature") or 1.0)
    torch_probs = torch.softmax(start.model.head(features).double() / temperature, dim=1).numpy()
    head_probs = np.asarray(start.head.predict_proba(features.numpy()), dtype=np.float64)
    difference = float(np.abs(torch_probs - head_probs).max())
    log.info("composition check: max |p_torch - p_head| = %.2e on %d images", difference, len(images))
    if difference > COMPOSITION_TOLERANCE:
        raise HeadError(
            f"the head converted to torch disagrees with the saved head by {difference:.3g} in probability "
            f"(tolerance {COMPOSITION_TOLERANCE}); this is a bug in embedx.finetune, please report it"
        )
    return difference


# --------------------------------------------------------------------------- finetune


def default_output(head_dir: str | Path) -> Path:
    head_dir = Path(head_dir)
    return head_dir.with_name(head_dir.name + "-ft")


def finetune(
    head_dir: str | Path,
    data: str | Path,
    *,
    unfreeze: str | int = "all",
    epochs: int = 5,
    batch_size: int = 32,
    lr: float = 1e-3,
    backbone_lr_mult: float = 0.1,
    warmup_epochs: float = 0.5,
    weight_decay: float = 1e-4,
    augment: bool = True,
    crop_scale: tuple[float, float] = DEFAULT_CROP_SCALE,
    hflip: bool = True,
    output: str | Path | None = None,
    resume: bool = True,
    device: str = "auto",
    seed: int = 0,
    num_workers: int | None = None,
    reinit_head: bool = False,
    manifest: str | Path | None = None,
    progress: ProgressCallback | None = None,
) -> FinetuneResult:
    """Fine-tune the backbone under a fitted head (LP-FT) and write a new head directory.

    ``unfreeze`` is ``"all"`` or the number of top blocks (``backbones.feature_blocks``)
    to train; the rest stays frozen with its batch-norm statistics.  The backbone's
    learning rate is ``lr * backbone_lr_mult``; the schedule is a linear warm-up over
    ``warmup_epochs`` then a cosine decay, per step.  ``reinit_head`` starts from a
    random head instead (plain fine-tuning, for comparison).

    A checkpoint is written after every epoch; with ``resume`` a rerun with the same
    settings continues after the last finished epoch (``epochs`` may be raised).
    """
    started = time.perf_counter()
    head_dir = Path(head_dir)
    output_dir = Path(output) if output is not None else default_output(head_dir)
    if output_dir.resolve() == head_dir.resolve():
        raise ConfigError(f"the output {output_dir} is the input head directory; choose another -o")
    unfreeze = parse_unfreeze(unfreeze)
    if epochs < 1:
        raise ConfigError(f"epochs must be >= 1, got {epochs}")
    if batch_size < 1:
        raise ConfigError(f"batch_size must be >= 1, got {batch_size}")
    if lr <= 0 or backbone_lr_mult < 0 or weight_decay < 0 or warmup_epochs < 0:
        raise ConfigError("lr must be > 0; backbone_lr_mult, weight_decay and warmup_epochs >= 0")
    torch_device = resolve_device(device)

    from embedx.data import discover

    start = _load_start(head_dir, reinit_head=reinit_head, seed=seed)
    classes = list(start.head_json.get("classes") or start.head.classes_)
    dataset = discover(data, manifest=manifest)
    train_items, val_items = _split_items(dataset, classes)
    trainable = _trainable_blocks(start.model.backbone, unfreeze, start.blocks)

    config = FinetuneConfig(
        head_sha256=_head_identity(head_dir),
        data_root=str(Path(dataset.root).resolve()),
        classes=tuple(classes),
        unfreeze=unfreeze,
        batch_size=batch_size,
        lr=float(lr),
        backbone_lr_mult=float(backbone_lr_mult),
        warmup_epochs=float(warmup_epochs),
        weight_decay=float(weight_decay),
        augment=bool(augment),
        crop_scale=(float(crop_scale[0]), float(crop_scale[1])),
        hflip=bool(hflip),
        seed=int(seed),
        reinit_head=bool(reinit_head),
    )
    checkpoint_path = output_dir / TRAIN_SUBDIR / CHECKPOINT_FILE
    checkpoint = _load_checkpoint(checkpoint_path) if resume else None
    if checkpoint is not None:
        mismatch = _config_mismatch(checkpoint["config"], config.to_dict())
        if mismatch:
            raise ConfigError(
                f"{checkpoint_path} was made with other settings ({'; '.join(mismatch)}); "
                "rerun with the same settings to resume, choose another -o, or pass "
                "resume=False (--no-resume) to start over"
            )

    workers = num_workers if num_workers is not None else min(2, max((os.cpu_count() or 1) - 1, 0))
    spec = start.preprocess
    eval_set = ImageListDataset(val_items, spec)
    loader_args = {"batch_size": batch_size, "collate_fn": _collate, "num_workers": workers,
                   "pin_memory": torch_device.type == "cuda", "persistent_workers": False}
    val_loader = torch.utils.data.DataLoader(eval_set, shuffle=False, **loader_args)
    transform = train_transform(spec, crop_scale=config.crop_scale, hflip=hflip) if augment else None
    train_set = ImageListDataset(train_items, spec, transform)

    model = start.model
    # Before anything moves: the composed torch model must agree with the saved head.
    probe = _first_images(eval_set, 4)
    if not reinit_head:
        composition_error = check_composition(start, probe)
    else:
        composition_error = None
    trainable_params = set_trainable(model, trainable)
    log.info(
        "fine-tuning %s: unfreeze=%s (%d of %d blocks), %d trainable parameters, %d train / %d val images",
        start.backbone_name, unfreeze, len(start.blocks) if unfreeze == "all" else int(unfreeze),
        len(start.blocks), trainable_params, len(train_items), len(val_items),
    )
    model.to(torch_device)
    if torch_device.type == "cuda":
        model.to(memory_format=torch.channels_last)

    optimizer = torch.optim.AdamW(
        param_groups(model, lr=lr, backbone_lr_mult=backbone_lr_mult, weight_decay=weight_decay)
    )
    steps_per_epoch = math.ceil(len(train_items) / batch_size)
    total_steps = steps_per_epoch * epochs
    warmup_steps = int(round(warmup_epochs * steps_per_epoch))
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: warmup_cosine(step, warmup_steps=warmup_steps, total_steps=total_steps)
    )
    autocast, scaler = _autocast(torch_device)

    history: list[dict[str, Any]] = []
    start_epoch = 0
    if checkpoint is not None:
        model.load_state_dict(checkpoint["model"])
        optimizer.load_state_dict(checkpoint["optimizer"])
        scheduler.load_state_dict(checkpoint["scheduler"])
        if scaler is not None and checkpoint.get("scaler"):
            scaler.load_state_dict(checkpoint["scaler"])
        history = list(checkpoint["history"])
        start_epoch = int(checkpoint["epoch"])
        best = dict(checkpoint["best"])
        best_state = checkpoint["best_model"]
        initial = checkpoint.get("initial")
        _restore_rng(checkpoint.get("rng"))
        log.info("resuming %s after epoch %d of %d", checkpoint_path, start_epoch, epochs)
    else:
        initial = evaluate_model(model, val_loader, torch_device)
        initial["composition_error"] = composition_error
        log.info("before fine-tuning: val accuracy %.4f, loss %.4f", initial["val_accuracy"], initial["val_loss"])
        # Epoch 0, the linear probe itself, is a candidate: fine-tuning never returns worse on val.
        best = {"epoch": 0, "val_accuracy": initial["val_accuracy"], "val_loss": initial["val_loss"]}
        best_state = _cpu_state(model)

    for epoch in range(start_epoch, epochs):
        # Reseeding per epoch makes shuffling and augmentation the same with or without a resume.
        torch.manual_seed(seed * 100_003 + epoch)
        generator = torch.Generator().manual_seed(seed * 100_003 + epoch)
        train_loader = torch.utils.data.DataLoader(train_set, shuffle=True, generator=generator, **loader_args)
        set_train_mode(model, trainable)
        epoch_started = time.perf_counter()

        def report(done: int, info: dict[str, Any], epoch: int = epoch) -> None:
            if progress is not None:
                progress(epoch * steps_per_epoch + done, total_steps, {"epoch": epoch + 1, **info})

        train = _train_epoch(model, train_loader, optimizer, scheduler, scaler, autocast, torch_device, report)
        metrics = evaluate_model(model, val_loader, torch_device)
        record = {"epoch": epoch + 1, **train, "lr": optimizer.param_groups[0]["lr"],
                  "seconds": time.perf_counter() - epoch_started, **metrics}
        history.append(record)
        log.info("epoch %d/%d: train loss %.4f, val loss %.4f, val accuracy %.4f",
                 epoch + 1, epochs, record["train_loss"], record["val_loss"], record["val_accuracy"])
        report(steps_per_epoch, {"loss": record["train_loss"], "val_acc": record["val_accuracy"]})
        if (metrics["val_accuracy"], -metrics["val_loss"]) > (best["val_accuracy"], -best["val_loss"]):
            best = {"epoch": epoch + 1, "val_accuracy": metrics["val_accuracy"], "val_loss": metrics["val_loss"]}
            best_state = _cpu_state(model)
        # One file, replaced atomically: a kill at any moment leaves the previous epoch's whole state.
        _atomic_torch_save(
            {
                "version": CHECKPOINT_VERSION,
                "config": config.to_dict(),
                "epoch": epoch + 1,
                "model": model.state_dict(),
                "best_model": best_state,
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "scaler": scaler.state_dict() if scaler is not None else None,
                "history": history,
                "best": best,
                "initial": initial,
                "rng": _rng_state(),
            },
            checkpoint_path,
        )

    model.to("cpu")
    model.load_state_dict(best_state)
    model.to(memory_format=torch.contiguous_format)
    model.eval()
    record = {
        "from_head": str(head_dir.resolve()),
        "data": config.data_root,
        "config": config.to_dict(),
        "epochs": epochs,
        "initial": initial,
        "best": best,
        "history": history,
        "device": str(torch_device),
    }
    exported, weights_path, parity = _write_artifacts(
        start, model, output_dir, val_loader=val_loader, probe=probe, record=record
    )
    result = FinetuneResult(
        output_dir=output_dir,
        best_val_accuracy=float(best["val_accuracy"]),
        history=tuple(history),
        seconds=time.perf_counter() - started,
        onnx_path=Path(exported.path),
        initial_val_accuracy=None if initial is None else float(initial["val_accuracy"]),
        best_epoch=int(best["epoch"]),
        backbone_weights=weights_path,
        resumed_from_epoch=start_epoch,
        device=str(torch_device),
        parity=parity,
    )
    _atomic_write_text(output_dir / REPORT_FILE,
                       json.dumps({**record, "result": result.to_dict()}, indent=2, sort_keys=True, default=str))
    log.info("fine-tuned head in %s: val accuracy %s -> %.4f (epoch %d), %.1f s", output_dir,
             "n/a" if initial is None else f"{initial['val_accuracy']:.4f}", best["val_accuracy"], best["epoch"],
             result.seconds)
    return result


def _train_epoch(model, loader, optimizer, scheduler, scaler, autocast, device, report) -> dict[str, float]:
    """One pass over ``loader``: AdamW steps (scaled under fp16), the schedule per step."""
    loss_sum, seen, correct, done = 0.0, 0, 0, 0
    for batch in loader:
        done += 1
        if batch is None:
            continue
        images, labels = _to_device(batch, device)
        with autocast:
            logits = model(images)
            loss = nn.functional.cross_entropy(logits.float(), labels)
        optimizer.zero_grad(set_to_none=True)
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
        else:
            loss.backward()
            optimizer.step()
        scheduler.step()
        loss_sum += float(loss.detach()) * len(labels)
        seen += len(labels)
        correct += int((logits.argmax(1) == labels).sum())
        report(done, {"loss": loss_sum / seen, "acc": correct / seen})
    return {"train_loss": loss_sum / max(seen, 1), "train_accuracy": correct / max(seen, 1)}


def _cpu_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {name: tensor.detach().cpu().clone() for name, tensor in model.state_dict().items()}


def _head_identity(head_dir: Path) -> str:
    """sha256 over head.json and the weights file: which head a checkpoint started from."""
    from embedx.data import hash_file

    digest = hashlib.sha256()
    for path in sorted(head_dir.iterdir()):
        if path.name == "head.json" or path.suffix == ".safetensors":
            digest.update(path.name.encode())
            digest.update(hash_file(path).encode())
    return digest.hexdigest()


def _first_images(dataset: ImageListDataset, count: int) -> torch.Tensor:
    images = []
    for index in range(len(dataset)):
        sample = dataset[index]
        if sample is not None:
            images.append(sample[0])
        if len(images) == count:
            break
    if not images:
        raise DataError("none of the validation images could be decoded")
    return torch.stack(images)


def _restore_rng(state: dict[str, Any] | None) -> None:
    if not state:
        return
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# --------------------------------------------------------------------------- artifacts


def _save_backbone_weights(backbone: nn.Module, path: Path) -> None:
    """The backbone's state dict as safetensors, written atomically.

    Keys are the feature extractor's (``net.`` prefix), which
    ``backbones.build_feature_extractor(name, weights=path)`` strips and loads.
    """
    from safetensors.torch import save_file

    state = {name: tensor.detach().cpu().contiguous() for name, tensor in backbone.state_dict().items()}
    _replace_atomically(path, lambda tmp: save_file(state, tmp, metadata={"format": "pt"}))


def _export(start: _Start, model: FinetuneModel, weights_path: Path, output_dir: Path):
    """The fine-tuned backbone as ONNX, rebuilt from its saved state dict.

    With the registry's preprocessing this is ``export_backbone(name, weights=file)``:
    the export ``embedx extract --backbone NAME --weights FILE`` finds in its cache, so
    a new cache made that way has the fingerprint this head records (``evaluate`` and
    ``fit-head`` accept it).  Otherwise ``export_module`` exports the module as it is.
    """
    from embedx.backbones import get_spec
    from embedx.export import export_backbone, export_module

    target = output_dir / BACKBONE_ONNX_FILE
    if get_spec(start.backbone_name).preprocess == start.preprocess:
        return export_backbone(start.backbone_name, weights=weights_path, layer=start.feature_layer, output=target)
    from embedx.backbones import resolve_weights

    choice = resolve_weights(get_spec(start.backbone_name), weights_path)
    return export_module(model.backbone, name=start.backbone_name, weights_tag=choice.tag, weights_arg=choice.arg,
                         feature_layer=start.feature_layer, preprocess=start.preprocess, output=target)


def check_onnx(path: Path, backbone: nn.Module, images: torch.Tensor) -> dict[str, float]:
    """ONNX Runtime (CPU) on ``path`` vs the trained torch backbone on real images."""
    from embedx.errors import ParityError
    from embedx.export import PARITY_TOLERANCE
    from embedx.runtime import OrtModel

    with torch.no_grad():
        expected = backbone.eval()(images).double().numpy()
    got = np.asarray(OrtModel(path, device="cpu").run(images.numpy()), dtype=np.float64)
    max_abs = float(np.abs(got - expected).max())
    max_rel = max_abs / max(float(np.abs(expected).max()), 1e-12)
    log.info("fine-tuned backbone: ONNX vs torch max abs %.2e, rel %.2e", max_abs, max_rel)
    if not max_rel <= PARITY_TOLERANCE:
        raise ParityError(
            f"the exported fine-tuned backbone {path} disagrees with the trained torch model "
            f"(max relative error {max_rel:.3g} > {PARITY_TOLERANCE:g}); the saved state dict does not "
            "rebuild the trained model, please report this"
        )
    return {"max_abs_error": max_abs, "max_rel_error": max_rel, "images": int(len(images))}


def _write_artifacts(start: _Start, model: FinetuneModel, output_dir: Path, *, val_loader, probe: torch.Tensor,
                     record: dict[str, Any]):
    """backbone.safetensors, backbone.onnx (checked against the trained model), the head dir."""
    from embedx.cache import CacheMeta
    from embedx.metrics import (
        classification_metrics,
        fit_temperature,
        plot_confusion_matrix,
        plot_reliability,
    )

    weights_path = (output_dir / BACKBONE_WEIGHTS_FILE).resolve()
    _save_backbone_weights(model.backbone, weights_path)
    exported = _export(start, model, weights_path, output_dir)
    parity = {**dict(exported.parity or {}), "trained_model": check_onnx(Path(exported.path), model.backbone, probe)}

    logits, labels = collect_logits(model, val_loader, torch.device("cpu"))
    temperature = fit_temperature(logits, labels)
    class_names = [str(c) for c in start.head.classes_]
    metrics = classification_metrics(labels, logits, class_names=class_names, temperature=temperature)

    old = start.head_json.get("cache") or {}
    meta = CacheMeta(
        backbone=exported.backbone,
        weights_tag=exported.weights_tag,
        weights_arg=exported.weights_arg,
        onnx_path=str(Path(exported.path).resolve()),
        onnx_sha256=exported.sha256,
        feature_layer=str(exported.feature_layer),
        feature_dim=int(exported.feature_dim),
        preprocess=exported.preprocess.to_dict(),
        dtype=old.get("dtype", "float16"),
        precision=old.get("precision", "fp32"),
    )
    cache_record = {**meta.to_dict(), "fingerprint": meta.fingerprint, "path": ""}
    head = copy.deepcopy(start.head)
    head._set_arrays(model.head.arrays())  # the same arrays load_head reads back
    head.temperature_ = temperature
    val_source = "val images of the fine-tuning data (eval preprocessing)"
    record = {**record, "parity": parity, "temperature": temperature}
    head.save(output_dir, extra={
        "cache": cache_record,
        "metrics": {"val_source": val_source, "n_val": int(len(labels)), "val": metrics},
        "val_source": val_source,
        "finetune": record,
    })
    plot_confusion_matrix(np.asarray(metrics["confusion_matrix"]), class_names, output_dir / "confusion_matrix.png",
                          title="fine-tuned, val")
    plot_reliability(labels, logits, output_dir / "reliability.png", temperature=temperature,
                     title="fine-tuned, val reliability")
    return exported, weights_path, parity
