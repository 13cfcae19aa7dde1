"""``embedx extract`` (images -> feature cache) and ``embedx info`` (what a cache holds)."""

from __future__ import annotations

import json
from pathlib import Path

import click

from embedx.cli.types import FiniteFloatRange, ShardType


def _summary_lines(summary: dict) -> list[str]:
    seconds = summary["seconds"]
    lines = [
        f"{summary['output']}: {summary['images']} images ({summary['new']} new, "
        f"{summary['reused']} reused), {summary['errors']} errors",
        f"{seconds:.1f} s in all, {summary['images_per_second']:.1f} img/s over "
        f"{summary['pipeline_seconds']:.1f} s of extraction "
        f"({summary['workers']} decode workers, {summary['threads']} ORT threads, "
        f"{', '.join(summary['providers']) or 'no session needed'})",
        f"time: setup {summary['setup_seconds']:.1f} s, "
        f"hash {summary['hash_seconds']:.2f} s ({summary['hashed']} files), "
        f"session {summary['session_seconds']:.1f} s, "
        f"decode {summary['decode_seconds']:.1f} CPU-s (waited {summary['decode_wait_seconds']:.1f} s), "
        f"inference {summary['inference_seconds']:.1f} s, write {summary['write_seconds']:.2f} s",
    ]
    if summary.get("engine") == "ray":
        lines.append(f"ray: {summary['actors']} inference actors, {summary['workers']} decode slots; "
                     f"cluster start-up {summary['engine_start_seconds']:.1f} s (not in the img/s)")
    if summary.get("repaired"):
        lines.append(f"recomputed {summary['repaired']} rows of the previous cache that failed their checksum "
                     "or held NaN/inf")
    if summary.get("int8_cosine") is not None:
        lines.append(f"int8: mean cosine {summary['int8_cosine']:.4f} to fp32 on the calibration images")
    if summary.get("views") or summary.get("new_views"):
        lines.append(f"views: {summary['views']} rows ({summary['new_views']} new)")
    for path, reason in summary.get("error_list", [])[:20]:
        lines.append(f"  skipped {path}: {reason}")
    if summary["errors"] > 20:
        lines.append(f"  ... and {summary['errors'] - 20} more (`embedx info {summary['output']}`)")
    return lines


@click.command("extract")
@click.argument("data", type=click.Path(path_type=Path))
@click.option("--backbone", "-b", required=True, help="Registry name (see `embedx backbones`) or a .onnx file.")
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Cache file (default: $EMBEDX_CACHE_DIR/<data>-<backbone>.h5).")
@click.option("--weights", default="DEFAULT", show_default=True, help="DEFAULT, none, or a weights file.")
@click.option("--layer", default=None, help="Feature layer (default: the backbone's usual one).")
@click.option("--batch-size", type=click.IntRange(min=1), default=32, show_default=True)
@click.option("--workers", type=click.IntRange(min=0), default=None,
              help="Decode processes (default: one per core; 0 decodes in the main process).")
@click.option("--threads", type=click.IntRange(min=1), default=None,
              help="ONNX Runtime intra-op threads (default: physical cores).")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda", "tensorrt"]), default="auto", show_default=True)
@click.option("--precision", type=click.Choice(["fp32", "fp16", "int8"]), default="fp32", show_default=True,
              help="fp16 needs a GPU; int8 is static quantization, refused below cosine 0.99.")
@click.option("--dtype", type=click.Choice(["float16", "float32"]), default="float16", show_default=True,
              help="How features are stored in the cache.")
@click.option("--val-fraction", type=FiniteFloatRange(0.0, 1.0, max_open=True), default=None,
              help="Without split folders: put this fraction in 'val', by content hash (stable).")
@click.option("--manifest", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="CSV path,label[,split] with paths relative to DATA.")
@click.option("--allow-outside", is_flag=True, help="Let manifest paths resolve outside DATA.")
@click.option("--preprocess", "preprocess_mode", type=click.Choice(["fast", "exact"]), default=None,
              help="How pixels are made: fast (libjpeg-turbo + OpenCV, the default) or exact "
                   "(pixel for pixel torchvision's transform on PIL images).")
@click.option("--decode", type=click.Choice(["auto", "cpu", "gpu"]), default="auto", show_default=True,
              help="Who decodes and resizes: gpu (nvJPEG + resize on the device; other files fall back to "
                   "the CPU one by one), cpu (decode workers), auto (gpu when the model runs on CUDA).")
@click.option("--engine", type=click.Choice(["local", "ray"]), default="local", show_default=True,
              help="local: this machine (decode processes + one ONNX Runtime session). ray: Ray Data, on one "
                   "machine or a cluster (decode in Ray tasks, inference in an actor pool; "
                   "pip install 'embedx[ray]'; docs/scale-out.md).")
@click.option("--ray-address", default=None, metavar="ADDR",
              help="With --engine ray: the cluster to join (default: $RAY_ADDRESS, else a one-machine cluster).")
@click.option("--actors", type=click.IntRange(min=1), default=None,
              help="With --engine ray: inference actors (default: one per GPU of the cluster, else 1).")
@click.option("--gpus-per-actor", type=FiniteFloatRange(0.0, None), default=None,
              help="With --engine ray: GPUs each actor reserves (default: 1 when the cluster has GPUs, else 0).")
@click.option("--shard", type=ShardType(), default=None, metavar="I/N",
              help="Only shard I of N (0 <= I < N, by content hash: stable on every machine); "
                   "join the N caches with `embedx merge`.")
@click.option("--views", "views", type=click.IntRange(min=0), default=None,
              help="Also store K augmented views of every train image (val/test stay clean): K extra forward "
                   "passes per train image, paid once here, not per epoch; fit-head trains on them. "
                   "Default: what the cache has; 0 drops them.")
@click.option("--augment", default=None, metavar="OPS",
              help="The views' augmentations, any of flip,crop,color,rotate [default: flip,crop,color]. "
                   "Other settings replace the views; a larger --views adds only the new ones.")
@click.option("--overwrite", is_flag=True, help="Replace a cache made with other settings, start over.")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON on stdout.")
@click.option("--quiet", "-q", is_flag=True, help="No progress bar.")
def extract_command(data, backbone, output, weights, layer, batch_size, workers, threads, device, precision,
                    dtype, val_fraction, manifest, allow_outside, preprocess_mode, decode, engine, ray_address,
                    actors, gpus_per_actor, shard, views, augment, overwrite, as_json, quiet) -> None:
    """Run BACKBONE once over every image under DATA and keep the features.

    \b
    DATA is DATA/<class>/<image>, DATA/{train,val,test}/<class>/<image>, or a CSV.
    Rerun the same command to resume a killed run, or after adding or removing
    images: only new images are computed.

    \b
    Two engines write the same cache:
      embedx extract DATA -b B                  this machine
      embedx extract DATA -b B --engine ray     Ray Data: this machine, or the
        cluster at --ray-address/$RAY_ADDRESS (one actor per GPU by default)
    """
    from contextlib import ExitStack

    from embedx.cli.progressbar import progress_bar
    from embedx.extract import extract

    with ExitStack() as stack:
        bar = []

        def progress(done, total, info) -> None:
            # the bar starts with the first batch, so its rate and ETA leave out the export
            if not bar:
                bar.append(stack.enter_context(progress_bar("extract", unit="img", enabled=not quiet)))
            bar[0](done, total, info)

        summary = extract(
            data, backbone=backbone, weights=weights, layer=layer, output=output, batch_size=batch_size,
            workers=workers, threads=threads, device=device, precision=precision, dtype=dtype,
            val_fraction=val_fraction, manifest=manifest, overwrite=overwrite, preprocess_mode=preprocess_mode,
            decode=decode, progress=progress, allow_outside=allow_outside, engine=engine, ray_address=ray_address,
            actors=actors, gpus_per_actor=gpus_per_actor, shard=shard, views=views, augment=augment,
        )
    result = summary.to_dict()
    if as_json:
        click.echo(json.dumps(result, indent=2))
    else:
        for line in _summary_lines(result):
            click.echo(line, err=True)
        click.echo(result["output"])


def _views_line(views: dict) -> str:
    plan = views["plan"]
    return (f"views: {views['rows']} rows of {views['images']} images; {plan['views']} augmented per train image "
            f"({','.join(plan['augment']['ops'])})")


def _info_lines(info: dict) -> list[str]:
    if "dim" not in info:  # only a journal so far
        journal = info["journal"]
        return [
            f"{info['path']}: not finished; journal {journal['path']} holds {journal['rows']} rows "
            f"in {journal['shards']} shards, {journal['errors']} errors",
            "rerun the same `embedx extract` command to finish it",
        ]
    lines = [
        f"{info['path']}: {info['rows']} rows x {info['dim']} ({info['dtype']}), "
        f"{'complete' if info['complete'] else 'INCOMPLETE'}, {info['file_size'] / 1e6:.1f} MB"
        + ("" if info.get("checksums") else ", no checksums (written before embedx kept them)"),
        f"backbone {info['backbone']} (weights {info['weights']}, layer {info['feature_layer']}, "
        f"{info['precision']}), made by embedx {info['embedx_version']} on {info['created']}",
        f"classes ({len(info['classes'])}): {', '.join(info['classes'])}",
    ]
    extra = info.get("extra") or {}
    if info.get("shard"):
        lines.append(f"shard {info['shard'][0]}/{info['shard'][1]} of the data set (join the shards with "
                     "`embedx merge`)")
    if extra.get("merged_from"):
        lines.append(f"merged from {len(extra['merged_from'])} shards: "
                     + ", ".join(part["shard"] for part in extra["merged_from"]))
    if extra.get("int8_cosine") is not None:
        lines.append(f"int8: mean cosine {extra['int8_cosine']:.4f} to fp32 on "
                     f"{len(extra.get('int8_calibration_keys') or [])} calibration images")
    for split, counts in info["counts"].items():
        lines.append(f"  {split}: " + ", ".join(f"{name} {n}" for name, n in counts.items()))
    lines.append(f"errors: {info['errors']}")
    for error in info["error_list"]:
        lines.append(f"  {error['path']}: {error['reason']}")
    if "views" in info:
        lines.append(_views_line(info["views"]))
    if "journal" in info:
        lines.append(f"an update is in progress: journal {info['journal']['path']} ({info['journal']['rows']} rows)")
    return lines


@click.command("info")
@click.argument("cache", type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print as JSON on stdout.")
def info_command(cache: Path, as_json: bool) -> None:
    """What a feature cache holds: rows, dim, classes per split, backbone, errors."""
    from embedx.cache import cache_info

    info = cache_info(cache)
    if as_json:
        click.echo(json.dumps(info, indent=2))
    else:
        click.echo("\n".join(_info_lines(info)))


COMMANDS = [extract_command, info_command]
