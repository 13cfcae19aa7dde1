"""``train/checkpoint.pt``: the whole training state after an epoch, what a resume continues from.

One file, replaced atomically: a kill at any moment leaves the previous epoch's whole
state.  It is resumed only by a run with the same config (``FinetuneConfig.to_dict()``),
which names the head it started from by ``_head_identity``.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import torch

from embedx.errors import ConfigError
from embedx.fsio import atomic_path, sha256_file

CHECKPOINT_FILE = "checkpoint.pt"
TRAIN_SUBDIR = "train"
CHECKPOINT_VERSION = 1


def _head_identity(head_dir: Path) -> str:
    """sha256 over head.json and the weights file: which head a checkpoint started from."""
    digest = hashlib.sha256()
    for path in sorted(head_dir.iterdir()):
        if path.name == "head.json" or path.suffix == ".safetensors":
            digest.update(path.name.encode())
            digest.update(sha256_file(path).encode())
    return digest.hexdigest()


def _save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    """``state`` (model, optimizer, schedule, history...) plus the version and the rng, atomically."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        torch.save({"version": CHECKPOINT_VERSION, **state, "rng": _rng_state()}, tmp)


def _resumable_checkpoint(path: Path, config: dict[str, Any]) -> dict[str, Any] | None:
    """The checkpoint at ``path`` if there is one; ConfigError if it is unreadable or of another config."""
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
    mismatch = _config_mismatch(checkpoint["config"], config)
    if mismatch:
        raise ConfigError(
            f"{path} was made with other settings ({'; '.join(mismatch)}); "
            "rerun with the same settings to resume, choose another -o, or pass "
            "resume=False (--no-resume) to start over"
        )
    return checkpoint


def _config_mismatch(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    keys = sorted(set(saved) | set(current))
    return [f"{k}: checkpoint {saved.get(k)!r} vs now {current.get(k)!r}"
            for k in keys if saved.get(k) != current.get(k)]


def _rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _restore_rng(state: dict[str, Any] | None) -> None:
    if not state:
        return
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
