"""``embedx merge``: one feature cache from the caches of a data set's shards.

The shards come from ``extract(shard=(I, N))`` (``embedx extract --shard I/N``), run anywhere:
a SLURM array, several machines, Ray.  ``merge`` checks that they are parts of one
extraction (the same model, preprocessing, precision, dtype and schema: ``CacheMeta``
without its shard; the same classes and splits), that they cover the data set (every
``I`` of one ``N``), then writes the cache a single run would have written:

* rows in data set order (``data.item_order``: split, label, relative path), one per path
  (a row found in two parts is kept once), errors in a single run's order (each shard
  records where its errors stand, ``extra["error_order"]``), the parts' class list;
* features copied as stored (float16 stays float16: the same bytes), each part's rows
  checked against their checksums as they are read;
* through ``CacheWriter``: rows are journaled next to the output batch by batch, then the
  cache is written under a temporary name and renamed, so a kill at any moment leaves the
  old output (or none) and a rerun of the same command picks up the journal and finishes.

Ray-free and torch-free.  Library code: progress via ``progress(done, total, info)``.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from embedx.errors import CacheError, CacheMismatchError, ConfigError

logger = logging.getLogger(__name__)

#: Rows journaled per batch while copying (one fsynced journal file each).
BATCH_ROWS = 4096


@dataclass
class MergeSummary:
    """What one ``merge`` call did (printed by the CLI, JSON with ``--json``)."""

    output: str
    parts: list[str]
    shards: list[str]  # "I/N" of each part, in the order given
    images: int  # rows in the merged cache
    errors: int  # entries in its errors table
    duplicates: int  # rows found in more than one part, kept once
    copied: int  # features (distinct keys) copied by this call
    reused: int  # features already in the output or its journal (a rerun), not copied again
    seconds: float
    views: int = 0  # augmented view rows in the merged cache (``extract --views``)
    warnings: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class _Part:
    path: Path
    cache: Any  # CacheData without features
    shard: tuple[int, int]  # (0, 1) for a cache of a whole data set
    extra: dict[str, Any]


def _read_part(path: Path) -> _Part:
    from embedx.cache import read_cache

    cache = read_cache(path, load_features=False)  # its extra is a JSON object (checked when read)
    return _Part(path=path, cache=cache, shard=cache.meta.shard or (0, 1), extra=cache.extra)


def _check_same_extraction(parts: Sequence[_Part]) -> None:
    """``CacheMismatchError`` naming the file and what differs unless every part comes from
    one extraction (the identity without the shard, classes, layout, splits, int8 calibration)."""
    first = parts[0]
    meta = dataclasses.replace(first.cache.meta, shard=None)
    for part in parts[1:]:
        differences = dataclasses.replace(part.cache.meta, shard=None).differences(meta)
        if part.cache.classes != first.cache.classes:
            differences.append(f"classes: {part.cache.classes} vs {first.cache.classes}")
        for name in ("layout", "val_fraction", "int8_calibration_keys"):
            if part.extra.get(name) != first.extra.get(name):
                differences.append(f"{name}: {part.extra.get(name)!r} vs {first.extra.get(name)!r}")
        if differences:
            raise CacheMismatchError(
                f"{part.path} is not a shard of the same extraction as {first.path} ({'; '.join(differences)}); "
                "merge only the shards of one `embedx extract --shard I/N` setting"
            )
    if len({part.extra.get("data") for part in parts}) > 1:
        logger.warning("the shards name different data folders (%s); merging them as one data set",
                       ", ".join(sorted({str(part.extra.get('data')) for part in parts})))


def _coverage_problems(parts: Sequence[_Part]) -> list[str]:
    """Why ``parts`` are not every shard of one N exactly once (empty when they are)."""
    from embedx.shards import shard_text

    counts = sorted({count for _, count in (part.shard for part in parts)})
    if len(counts) > 1:
        return [f"the parts split the data set in different numbers of shards ({', '.join(map(str, counts))}: "
                + ", ".join(f"{part.path.name} {shard_text(part.shard)}" for part in parts) + ")"]
    count = counts[0]
    have = [index for index, _ in (part.shard for part in parts)]
    problems = []
    missing = sorted(set(range(count)) - set(have))
    if missing:
        problems.append(f"shards {', '.join(f'{i}/{count}' for i in missing)} are missing")
    repeated = sorted({i for i in have if have.count(i) > 1})
    if repeated:
        problems.append(f"shards {', '.join(f'{i}/{count}' for i in repeated)} are given more than once")
    return problems


def _check_output(output: Path, parts: Sequence[_Part], overwrite: bool) -> None:
    from embedx.cache import cache_info

    for part in parts:
        if output.exists() and os.path.samefile(output, part.path):
            raise ConfigError(f"the output {output} is one of the parts; write the merged cache to another file")
    if overwrite or not output.exists():
        return
    try:
        made_by_merge = bool((cache_info(output).get("extra") or {}).get("merged_from"))
    except CacheError:
        made_by_merge = False
    if not made_by_merge:
        raise CacheError(f"{output} exists and was not made by `embedx merge`; pass --overwrite to replace it, "
                         "or write to another file with -o")


def _merged_rows(parts: Sequence[_Part]) -> tuple[list[tuple[int, int]], int, list[str]]:
    """``(part, row)`` of every row of the merged cache, in data set order; how many rows were
    dropped as already taken from an earlier part; warnings."""
    from embedx.data import item_order

    taken: dict[str, str] = {}  # path -> key
    chosen: list[tuple[tuple, int, int]] = []
    duplicates = 0
    warnings: list[str] = []
    for number, part in enumerate(parts):
        cache = part.cache
        # with --val-fraction the data set's items were all "train" (its split is by key)
        whole_train = bool(part.extra.get("val_fraction"))
        for row, (path, key) in enumerate(zip(cache.paths.tolist(), cache.keys.tolist(), strict=True)):
            if path in taken:
                duplicates += 1
                if taken[path] != key:
                    warnings.append(f"{path} has other bytes in {part.path.name} than in an earlier part "
                                    "(it changed between the shards' runs); keeping the earlier one")
                continue
            taken[path] = key
            split = "train" if whole_train else str(cache.splits[row])
            chosen.append((item_order(split, int(cache.labels[row]), path), number, row))
    chosen.sort(key=lambda entry: entry[0])
    return [(number, row) for _, number, row in chosen], duplicates, warnings


def _merged_errors(parts: Sequence[_Part]) -> list[tuple[str, str, str]]:
    """Every error row of the parts once, in a single run's order when every part recorded it."""
    entries: dict[tuple[str, str, str], int] = {}
    ordered = all(len(_error_order(part)) == len(part.cache.errors) for part in parts)
    for part in parts:
        order = _error_order(part)
        for position, ((path, reason), key) in enumerate(zip(part.cache.errors, part.cache.error_keys, strict=True)):
            entries.setdefault((path, reason, key), order[position] if ordered else len(entries))
    return sorted(entries, key=entries.__getitem__)


def _error_order(part: _Part) -> list[int]:
    """Where a part's errors stand in a single run's order (``extra["error_order"]``); [] when it
    recorded none, or something other than a list of integers."""
    order = part.extra.get("error_order")
    if not isinstance(order, list) or not all(isinstance(n, int) and not isinstance(n, bool) for n in order):
        return []
    return order


def _check_same_views(parts: Sequence[_Part]) -> list[Any]:
    """Each part's views (without features); ``CacheMismatchError`` unless all were made with
    one views plan (or none has views)."""
    from embedx.cache import read_views

    views = [read_views(part.path, load_features=False) for part in parts]
    plans = [json.dumps(view.plan, sort_keys=True) for view in views]
    for part, plan in zip(parts[1:], plans[1:], strict=True):
        if plan != plans[0]:
            raise CacheMismatchError(
                f"{part.path} was extracted with other views than {parts[0].path} (views: {plan} vs {plans[0]}); "
                "extract every shard with the same --views and --augment"
            )
    return views


def _copy_views(parts: Sequence[_Part], views: Sequence[Any], rows: Sequence[tuple[int, int]],
                writer: Any) -> tuple[dict[str, Any] | None, int]:
    """Copy the views of the merged rows (those not in ``writer`` yet), block by block; the
    ``views`` argument of ``finalize`` (grouped by merged row, in each part's order, as a
    single extraction writes them) and how many were copied."""
    from embedx.cache import read_views

    if not any(view.plan for view in views):
        return None, 0
    merged_row = {entry: index for index, entry in enumerate(rows)}
    entries: list[tuple[int, int, str, str]] = []  # merged row, position in its part, key, name
    copied = 0
    for number, (part, view) in enumerate(zip(parts, views, strict=True)):
        wanted: list[int] = []
        for position, source in enumerate(view.source.tolist()):
            row = merged_row.get((number, source))
            if row is None:  # the clean row was a duplicate taken from another part
                continue
            key = str(view.keys[position])
            entries.append((row, position, key, str(view.names[position])))
            if not writer.has(key):
                wanted.append(source)
        sources = np.unique(np.asarray(wanted, dtype=np.int64))
        for start in range(0, len(sources), BATCH_ROWS):
            block = read_views(part.path, sources=sources[start : start + BATCH_ROWS])  # checksums checked
            fresh = [i for i, key in enumerate(block.keys.tolist()) if not writer.has(key)]
            if fresh:
                writer.append([str(block.keys[i]) for i in fresh], block.features[fresh])
                copied += len(fresh)
    entries.sort(key=lambda entry: entry[:2])
    # A view belongs to a merged row: byte-identical images share view keys (and feature rows) but
    # each keeps its own entries, as in one extraction.
    seen: set[tuple[int, str]] = set()
    unique = [entry for entry in entries if not ((entry[0], entry[2]) in seen or seen.add((entry[0], entry[2])))]
    return {"keys": [entry[2] for entry in unique], "source": [entry[0] for entry in unique],
            "names": [entry[3] for entry in unique], "plan": views[0].plan}, copied


def merge(
    parts: Sequence[str | Path],
    *,
    output: str | Path,
    overwrite: bool = False,
    allow_partial: bool = False,
    progress: Callable[[int, int | None, dict[str, Any]], None] | None = None,
) -> MergeSummary:
    """Write ``output``, the cache of the whole data set, from the caches of its shards.

    Refuses (``CacheMismatchError``) parts of different extractions, naming the file and what
    differs; refuses (``ConfigError``) a set that is not every shard of one N once, unless
    ``allow_partial`` (then it warns, and a row in two parts is kept once).  An existing
    ``output`` not made by merge is refused unless ``overwrite``.  Rerunning the same call
    after a kill finishes the job from the journal next to ``output``.
    """
    from embedx.cache import CacheWriter, iter_features
    from embedx.shards import shard_text

    started = time.perf_counter()
    if not parts:
        raise ConfigError("merge needs at least one part (a cache made by `embedx extract --shard I/N`)")
    output = Path(output)
    loaded = [_read_part(Path(path)) for path in parts]
    _check_same_extraction(loaded)
    part_views = _check_same_views(loaded)
    warnings = _coverage_problems(loaded)
    if warnings and not allow_partial:
        raise ConfigError(f"the parts are not every shard of the data set once: {'; '.join(warnings)}; "
                          "add the missing ones, or pass --allow-partial to merge them anyway")
    _check_output(output, loaded, overwrite)
    rows, duplicates, row_warnings = _merged_rows(loaded)
    warnings += row_warnings
    for warning in warnings:
        logger.warning("%s", warning)
    errors = _merged_errors(loaded)
    by_part: list[set[int]] = [set() for _ in loaded]
    for number, row in rows:
        by_part[number].add(row)

    first = loaded[0]
    meta = dataclasses.replace(first.cache.meta, shard=None)
    extra = {key: value for key, value in first.extra.items() if key != "error_order"}
    extra["merged_from"] = [{"path": str(part.path), "shard": shard_text(part.cache.meta.shard),
                             "rows": len(part.cache)} for part in loaded]
    with_stats = all(part.cache.stats is not None for part in loaded)
    copied = 0
    with CacheWriter(output, meta, overwrite=overwrite) as writer:
        distinct = {str(loaded[number].cache.keys[row]) for number, row in rows}
        reused = sum(1 for key in distinct if writer.has(key))
        total = len(distinct) - reused
        if progress is not None:
            progress(0, total, {})
        for number, part in enumerate(loaded):
            wanted = sorted(row for row in by_part[number] if not writer.has(str(part.cache.keys[row])))
            if not wanted:
                continue
            at = 0
            pending_keys: list[str] = []
            pending_set: set[str] = set()
            pending_paths: list[str] = []
            pending: list[np.ndarray] = []
            for start, block in iter_features(part.path):  # checksums checked block by block
                stop = start + len(block)
                inside = []
                while at < len(wanted) and wanted[at] < stop:
                    row = wanted[at]
                    key = str(part.cache.keys[row])
                    if not writer.has(key) and key not in pending_set:  # a copy under another name
                        inside.append(row)
                        pending_set.add(key)
                        pending_keys.append(key)
                        pending_paths.append(str(part.cache.paths[row]))
                    at += 1
                if inside:
                    pending.append(block[np.asarray(inside) - start])
                if len(pending_keys) >= BATCH_ROWS or (at == len(wanted) and pending_keys):
                    writer.append(pending_keys, np.concatenate(pending), paths=pending_paths)
                    copied += len(pending_keys)
                    pending_keys, pending_set, pending_paths, pending = [], set(), [], []
                    if progress is not None:
                        progress(copied, total, {})
                if at == len(wanted):
                    break
        view_rows, copied_views = _copy_views(loaded, part_views, rows, writer)
        copied += copied_views
        caches = [part.cache for part in loaded]
        writer.finalize(
            keys=[str(caches[n].keys[r]) for n, r in rows],
            paths=[str(caches[n].paths[r]) for n, r in rows],
            labels=[int(caches[n].labels[r]) for n, r in rows],
            splits=[str(caches[n].splits[r]) for n, r in rows],
            classes=first.cache.classes,
            errors=errors,
            attrs=extra,
            stats=[tuple(caches[n].stats[r].tolist()) for n, r in rows] if with_stats else None,
            views=view_rows,
        )
    summary = MergeSummary(
        output=str(output), parts=[str(part.path) for part in loaded],
        shards=[shard_text(part.cache.meta.shard) for part in loaded], images=len(rows), errors=len(errors),
        duplicates=duplicates, copied=copied, reused=reused,
        seconds=time.perf_counter() - started, warnings=warnings, views=len(view_rows["keys"]) if view_rows else 0,
    )
    logger.info("merged %d parts into %s: %d rows, %d errors", len(loaded), output, summary.images, summary.errors)
    return summary


__all__ = ["MergeSummary", "merge"]
