"""The pieces of the training loop: what trains and at which rate, the device and its
precision, one epoch of AdamW steps, and evaluation."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Sequence

import numpy as np
import torch
from torch import nn

from embedx.errors import ConfigError, DataError
from embedx.finetune.model import FinetuneModel


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
