"""Shards of a data set: which images shard ``I`` of ``N`` extracts (``extract(shard=(I, N))``).

An image belongs to shard ``int(key[:16], 16) % N``, its key being the sha256 of its bytes:
the same image is in the same shard on every machine and in every run, wherever it lies, and
copies of one image (one key) are in one shard.  A file with no key (it could not be read)
and an entry the data walk skipped belong to ``int(sha256(relpath)[:16], 16) % N``, so every
error row is in exactly one shard too.  ``embedx merge`` (``embedx.merge``) joins the shards.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from embedx.errors import ConfigError
from embedx.fsio import sha256_bytes


def check_shard(shard: Sequence[int] | None) -> tuple[int, int] | None:
    """``(index, count)`` as ints, or ``ConfigError`` unless ``0 <= index < count``."""
    if shard is None:
        return None
    try:
        index, count = (int(part) for part in shard)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"shard must be (index, count), got {shard!r}") from e
    if count < 1 or not 0 <= index < count:
        raise ConfigError(f"shard must be I/N with N >= 1 and 0 <= I < N, got {index}/{count}")
    return index, count


def parse_shard(text: str) -> tuple[int, int]:
    """``"I/N"`` -> ``(I, N)``; ``ConfigError`` (one line) for anything else."""
    parts = [part.strip() for part in str(text).strip().split("/")]
    # ASCII digits only ('²'.isdigit() is true, int() refuses it) and few of them (int() refuses 4,300)
    if len(parts) != 2 or not all(part.isascii() and part.isdigit() and len(part) <= 9 for part in parts):
        raise ConfigError(f"shard must be I/N (e.g. 0/4: the first of 4 shards), got {text!r:.80}")
    return check_shard((int(parts[0]), int(parts[1])))


def shard_text(shard: Sequence[int] | None) -> str:
    """``"I/N"``, or ``"whole"`` for a cache made without shards."""
    return "whole" if shard is None else f"{shard[0]}/{shard[1]}"


def shard_of_key(key: str, count: int) -> int:
    return int(key[:16], 16) % count


def shard_of_path(relpath: str, count: int) -> int:
    return shard_of_key(sha256_bytes(relpath.encode("utf-8", "surrogateescape")), count)


def members(items: Sequence[Any], keys: Sequence[str], shard: tuple[int, int]) -> set[int]:
    """Indices of ``items`` in ``shard``: by key, or by relative path for those without one."""
    index, count = shard
    return {i for i, (item, key) in enumerate(zip(items, keys, strict=True))
            if (shard_of_key(key, count) if key else shard_of_path(item.relpath, count)) == index}


def error_order(skipped: Sequence[tuple[str, str]], items: Sequence[Any],
                errors: Sequence[tuple[str, str, str]]) -> list[int]:
    """Where each error row stands in a whole run's errors table: skipped entries first (their
    index in ``skipped``), then the items' errors (``len(skipped)`` + item index).  A shard
    records it so that ``merge`` writes the errors in a whole run's order."""
    skipped_at: dict[tuple[str, str], int] = {}
    for position, entry in enumerate(skipped):
        skipped_at.setdefault(tuple(entry), position)
    item_at = {item.relpath: len(skipped) + position for position, item in enumerate(items)}
    order = []
    for relpath, reason, key in errors:
        at = skipped_at.get((relpath, reason)) if not key else None
        order.append(at if at is not None else item_at.get(relpath, len(skipped) + len(items)))
    return order


__all__ = ["check_shard", "error_order", "members", "parse_shard", "shard_of_key", "shard_of_path", "shard_text"]
