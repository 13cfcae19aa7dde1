"""``finetune()``: one run, step by step.

Check the arguments, load the start (head + backbone) and the data, make the config a
checkpoint must match, build the loaders and the optimizer, then either resume from
the checkpoint or evaluate the linear probe as epoch 0, train epoch by epoch (a
checkpoint after each), and write the artifacts from the best epoch.
"""

from __future__ import annotations

import logging
import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from embedx.errors import ConfigError
from embedx.finetune.artifacts import _write_artifacts, _write_report, remove_stale_temporaries
from embedx.finetune.checkpoint import (
    CHECKPOINT_FILE,
    TRAIN_SUBDIR,
    _head_identity,
    _restore_rng,
    _resumable_checkpoint,
    _save_checkpoint,
)
from embedx.finetune.data import (
    DEFAULT_CROP_SCALE,
    ImageListDataset,
    _collate,
    _first_images,
    _split_items,
    train_transform,
)
from embedx.finetune.loop import (
    _autocast,
    _cpu_state,
    _train_epoch,
    _trainable_blocks,
    evaluate_model,
    param_groups,
    parse_unfreeze,
    resolve_device,
    set_train_mode,
    set_trainable,
    warmup_cosine,
)
from embedx.finetune.model import FinetuneModel, _load_start, _Start, check_composition
from embedx.fsio import make_parent
from embedx.progress import ProgressCallback

logger = logging.getLogger(__name__)


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
    #: validation images the accuracies are measured on (their 95% intervals need it)
    val_count: int = 0

    def accuracy_ci(self, accuracy: float | None) -> list[float] | None:
        """The 95% Wilson interval of an accuracy on the ``val_count`` validation images."""
        from embedx.metrics import accuracy_interval

        return None if accuracy is None or not self.val_count else list(accuracy_interval(accuracy, self.val_count))

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        for key in ("output_dir", "onnx_path", "backbone_weights"):
            data[key] = str(data[key]) if data[key] is not None else None
        data["history"] = list(self.history)
        data["best_val_accuracy_ci"] = self.accuracy_ci(self.best_val_accuracy)
        data["initial_val_accuracy_ci"] = self.accuracy_ci(self.initial_val_accuracy)
        return data


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
    unfreeze = _check_arguments(head_dir, output_dir, unfreeze=unfreeze, epochs=epochs, batch_size=batch_size,
                                lr=lr, backbone_lr_mult=backbone_lr_mult, weight_decay=weight_decay,
                                warmup_epochs=warmup_epochs)
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
    make_parent(output_dir, what="fine-tuning output")
    checkpoint_path = output_dir / TRAIN_SUBDIR / CHECKPOINT_FILE
    if removed := remove_stale_temporaries(output_dir):
        logger.info("removed %d temporary file(s) a killed earlier run left in %s", removed, output_dir)
    checkpoint = _resumable_checkpoint(checkpoint_path, config.to_dict()) if resume else None

    loaders = _make_loaders(start, train_items, val_items, config, num_workers=num_workers, device=torch_device)
    # Before anything moves: the composed torch model must agree with the saved head.
    probe = _first_images(loaders.eval_set, 4)
    composition_error = None if reinit_head else check_composition(start, probe)
    training = _make_training(start, trainable, config, epochs=epochs, train_count=len(train_items),
                              val_count=len(val_items), device=torch_device)
    if checkpoint is not None:
        state = _resume(training, checkpoint)
        logger.info("resuming %s after epoch %d of %d", checkpoint_path, state.start_epoch, epochs)
    else:
        state = _evaluate_the_probe(training, loaders.val, composition_error)

    for epoch in range(state.start_epoch, epochs):
        _train_one_epoch(training, loaders, state, epoch=epoch, epochs=epochs, seed=seed, progress=progress)
        _save_checkpoint(checkpoint_path, {
            "config": config.to_dict(),
            "epoch": epoch + 1,
            "model": training.model.state_dict(),
            "best_model": state.best_state,
            "optimizer": training.optimizer.state_dict(),
            "scheduler": training.scheduler.state_dict(),
            "scaler": training.scaler.state_dict() if training.scaler is not None else None,
            "history": state.history,
            "best": state.best,
            "initial": state.initial,
        })

    return _finish(start, training, state, config, head_dir=head_dir, output_dir=output_dir, epochs=epochs,
                   val_loader=loaders.val, started=started)


# --------------------------------------------------------------------------- the steps


def _check_arguments(head_dir: Path, output_dir: Path, *, unfreeze: str | int, epochs: int, batch_size: int,
                     lr: float, backbone_lr_mult: float, weight_decay: float, warmup_epochs: float) -> str:
    """ConfigError for a bad argument, before anything is loaded; returns ``parse_unfreeze(unfreeze)``."""
    if output_dir.resolve() == head_dir.resolve():
        raise ConfigError(f"the output {output_dir} is the input head directory; choose another -o")
    unfreeze = parse_unfreeze(unfreeze)
    if epochs < 1:
        raise ConfigError(f"epochs must be >= 1, got {epochs}")
    if batch_size < 1:
        raise ConfigError(f"batch_size must be >= 1, got {batch_size}")
    if lr <= 0 or backbone_lr_mult < 0 or weight_decay < 0 or warmup_epochs < 0:
        raise ConfigError("lr must be > 0; backbone_lr_mult, weight_decay and warmup_epochs >= 0")
    return unfreeze


@dataclass
class _Loaders:
    """The val loader, and what each epoch makes its own shuffled train loader from."""

    eval_set: ImageListDataset
    train_set: ImageListDataset
    val: torch.utils.data.DataLoader
    args: dict[str, Any]

    def train(self, generator: torch.Generator) -> torch.utils.data.DataLoader:
        return torch.utils.data.DataLoader(self.train_set, shuffle=True, generator=generator, **self.args)


def _make_loaders(start: _Start, train_items: list, val_items: list, config: FinetuneConfig, *,
                  num_workers: int | None, device: torch.device) -> _Loaders:
    workers = num_workers if num_workers is not None else min(2, max((os.cpu_count() or 1) - 1, 0))
    spec = start.preprocess
    eval_set = ImageListDataset(val_items, spec)
    args = {"batch_size": config.batch_size, "collate_fn": _collate, "num_workers": workers,
            "pin_memory": device.type == "cuda", "persistent_workers": False}
    val_loader = torch.utils.data.DataLoader(eval_set, shuffle=False, **args)
    transform = train_transform(spec, crop_scale=config.crop_scale, hflip=config.hflip) if config.augment else None
    return _Loaders(eval_set, ImageListDataset(train_items, spec, transform), val_loader, args)


@dataclass
class _Training:
    """The model on its device and what steps it: optimizer, per-step schedule, precision."""

    model: FinetuneModel
    trainable: list[nn.Module]
    device: torch.device
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    autocast: Any
    scaler: torch.amp.GradScaler | None
    steps_per_epoch: int
    total_steps: int


def _make_training(start: _Start, trainable: list[nn.Module], config: FinetuneConfig, *, epochs: int,
                   train_count: int, val_count: int, device: torch.device) -> _Training:
    """Freeze all but ``trainable``, move the model to ``device``, and build AdamW and its schedule."""
    model = start.model
    trainable_params = set_trainable(model, trainable)
    logger.info(
        "fine-tuning %s: unfreeze=%s (%d of %d blocks), %d trainable parameters, %d train / %d val images",
        start.backbone_name, config.unfreeze, len(start.blocks) if config.unfreeze == "all" else int(config.unfreeze),
        len(start.blocks), trainable_params, train_count, val_count,
    )
    model.to(device)
    if device.type == "cuda":
        model.to(memory_format=torch.channels_last)

    optimizer = torch.optim.AdamW(
        param_groups(model, lr=config.lr, backbone_lr_mult=config.backbone_lr_mult,
                     weight_decay=config.weight_decay)
    )
    steps_per_epoch = math.ceil(train_count / config.batch_size)
    total_steps = steps_per_epoch * epochs
    warmup_steps = int(round(config.warmup_epochs * steps_per_epoch))
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: warmup_cosine(step, warmup_steps=warmup_steps, total_steps=total_steps)
    )
    autocast, scaler = _autocast(device)
    return _Training(model, trainable, device, optimizer, scheduler, autocast, scaler, steps_per_epoch, total_steps)


@dataclass
class _State:
    """What the epochs accumulate (and a checkpoint carries besides the weights and the optimizer)."""

    history: list[dict[str, Any]]
    best: dict[str, Any]
    best_state: dict[str, torch.Tensor]
    initial: dict[str, Any] | None
    start_epoch: int = 0


def _resume(training: _Training, checkpoint: dict[str, Any]) -> _State:
    """Model, optimizer, schedule, scaler and rng as the checkpoint's last epoch left them."""
    training.model.load_state_dict(checkpoint["model"])
    training.optimizer.load_state_dict(checkpoint["optimizer"])
    training.scheduler.load_state_dict(checkpoint["scheduler"])
    if training.scaler is not None and checkpoint.get("scaler"):
        training.scaler.load_state_dict(checkpoint["scaler"])
    state = _State(history=list(checkpoint["history"]), best=dict(checkpoint["best"]),
                   best_state=checkpoint["best_model"], initial=checkpoint.get("initial"),
                   start_epoch=int(checkpoint["epoch"]))
    _restore_rng(checkpoint.get("rng"))
    return state


def _evaluate_the_probe(training: _Training, val_loader, composition_error: float | None) -> _State:
    """Epoch 0, the linear probe itself, is a candidate: fine-tuning never returns worse on val."""
    initial = evaluate_model(training.model, val_loader, training.device)
    initial["composition_error"] = composition_error
    logger.info("before fine-tuning: val accuracy %.4f, loss %.4f", initial["val_accuracy"], initial["val_loss"])
    best = {"epoch": 0, "val_accuracy": initial["val_accuracy"], "val_loss": initial["val_loss"]}
    return _State(history=[], best=best, best_state=_cpu_state(training.model), initial=initial)


def _train_one_epoch(training: _Training, loaders: _Loaders, state: _State, *, epoch: int, epochs: int, seed: int,
                     progress: ProgressCallback | None) -> None:
    """Train, evaluate, append to the history, keep the best model (by val accuracy, then loss)."""
    model = training.model
    # Reseeding per epoch makes shuffling and augmentation the same with or without a resume.
    torch.manual_seed(seed * 100_003 + epoch)
    train_loader = loaders.train(torch.Generator().manual_seed(seed * 100_003 + epoch))
    set_train_mode(model, training.trainable)
    epoch_started = time.perf_counter()

    def report(done: int, info: dict[str, Any]) -> None:
        if progress is not None:
            progress(epoch * training.steps_per_epoch + done, training.total_steps, {"epoch": epoch + 1, **info})

    train = _train_epoch(model, train_loader, training.optimizer, training.scheduler, training.scaler,
                         training.autocast, training.device, report)
    metrics = evaluate_model(model, loaders.val, training.device)
    record = {"epoch": epoch + 1, **train, "lr": training.optimizer.param_groups[0]["lr"],
              "seconds": time.perf_counter() - epoch_started, **metrics}
    state.history.append(record)
    logger.info("epoch %d/%d: train loss %.4f, val loss %.4f, val accuracy %.4f",
                epoch + 1, epochs, record["train_loss"], record["val_loss"], record["val_accuracy"])
    report(training.steps_per_epoch, {"loss": record["train_loss"], "val_acc": record["val_accuracy"]})
    if (metrics["val_accuracy"], -metrics["val_loss"]) > (state.best["val_accuracy"], -state.best["val_loss"]):
        state.best = {"epoch": epoch + 1, "val_accuracy": metrics["val_accuracy"], "val_loss": metrics["val_loss"]}
        state.best_state = _cpu_state(model)


def _finish(start: _Start, training: _Training, state: _State, config: FinetuneConfig, *, head_dir: Path,
            output_dir: Path, epochs: int, val_loader, started: float) -> FinetuneResult:
    """The best epoch's model, on the CPU in fp32, written out as artifacts plus finetune.json."""
    model = training.model
    model.to("cpu")
    model.load_state_dict(state.best_state)
    model.to(memory_format=torch.contiguous_format)
    model.eval()
    initial, best = state.initial, state.best
    record = {
        "from_head": str(head_dir.resolve()),
        "data": config.data_root,
        "config": config.to_dict(),
        "epochs": epochs,
        "initial": initial,
        "best": best,
        "history": state.history,
        "device": str(training.device),
    }
    exported, weights_path, parity = _write_artifacts(start, model, output_dir, val_loader=val_loader, record=record)
    result = FinetuneResult(
        output_dir=output_dir,
        best_val_accuracy=float(best["val_accuracy"]),
        history=tuple(state.history),
        seconds=time.perf_counter() - started,
        onnx_path=Path(exported.path),
        initial_val_accuracy=None if initial is None else float(initial["val_accuracy"]),
        best_epoch=int(best["epoch"]),
        backbone_weights=weights_path,
        resumed_from_epoch=state.start_epoch,
        device=str(training.device),
        parity=parity,
        val_count=int((initial or (state.history[-1] if state.history else {})).get("val_count", 0)),
    )
    _write_report(output_dir, record, result.to_dict())
    logger.info("fine-tuned head in %s: val accuracy %s -> %.4f (epoch %d), %.1f s", output_dir,
                "n/a" if initial is None else f"{initial['val_accuracy']:.4f}", best["val_accuracy"], best["epoch"],
                result.seconds)
    return result
