"""``embedx predict`` and ``embedx bundle``."""

from __future__ import annotations

import csv
import functools
import io
import json
from pathlib import Path

import click


@click.command("bundle")
@click.option("--head", "head_dir", required=True, type=click.Path(exists=True, file_okay=False, path_type=Path),
              help="Head directory written by `embedx fit-head`.")
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False, path_type=Path),
              help="Where to write the bundle (.onnx).")
@click.option("--with-preprocess", is_flag=True,
              help="The graph takes uint8 (N,H,W,3) pixels, already resized and cropped, and normalizes them itself.")
@click.option("--force", is_flag=True, help="Replace an existing OUTPUT even if it is not an embedx bundle.")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON summary to stdout.")
def bundle_command(head_dir: Path, output: Path, with_preprocess: bool, force: bool, as_json: bool) -> None:
    """Write backbone + head + softmax as ONE ONNX file, labels and preprocessing inside."""
    from embedx import onnxmeta
    from embedx.bundle import bundle

    path = bundle(head_dir, output, with_preprocess=with_preprocess, force=force)
    meta = onnxmeta.read(path)
    summary = {
        "path": str(path),
        "size_bytes": path.stat().st_size,
        "classes": onnxmeta.read_json(meta, "classes"),
        "backbone": meta.get("backbone"),
        "weights": meta.get("weights"),
        "input_format": meta.get("input_format"),
        "temperature": float(meta.get("temperature", "1")),
    }
    if as_json:
        click.echo(json.dumps(summary))
    else:
        click.echo(
            f"wrote {path} ({summary['size_bytes'] / 1e6:.1f} MB): {summary['backbone']} + head, "
            f"{len(summary['classes'])} classes, input {summary['input_format']}",
            err=True,
        )
        click.echo(str(path))


@click.command("predict")
@click.option("--model", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="A bundle written by `embedx bundle` (needs only onnxruntime).")
@click.option("--head", "head_dir", type=click.Path(exists=True, file_okay=False, path_type=Path),
              help="A head directory: runs its backbone ONNX, then the head.")
@click.argument("images", nargs=-1, required=True, type=click.Path(exists=True, path_type=Path))
@click.option("-k", "--top-k", default=5, show_default=True, type=click.IntRange(min=1), help="Classes per image.")
@click.option("--batch-size", default=32, show_default=True, type=click.IntRange(min=1))
@click.option("--device", default="auto", show_default=True,
              type=click.Choice(["auto", "cpu", "cuda", "tensorrt"]))
@click.option("--format", "output_format", type=click.Choice(["text", "jsonl", "csv"]), default=None,
              help="text (default): path TAB ranked labels; jsonl: one JSON object per image; csv: a header, "
                   "then path,label_1,probability_1,...,error per image.")
@click.option("--json", "as_json", is_flag=True, help="Same as --format jsonl.")
def predict_command(model: Path | None, head_dir: Path | None, images: tuple[Path, ...], top_k: int,
                    batch_size: int, device: str, output_format: str | None, as_json: bool) -> None:
    """Classify IMAGES (files or folders) with a bundle or a head directory."""
    import sys

    from embedx.cli.progressbar import progress_bar
    from embedx.predict import expand_sources, predict_files

    if (model is None) == (head_dir is None):
        raise click.UsageError("pass exactly one of --model or --head")
    if as_json and output_format not in (None, "jsonl"):
        raise click.UsageError(f"--json means --format jsonl; it cannot go with --format {output_format}")
    output_format = "jsonl" if as_json else output_format or "text"
    echo_row = _csv_writer(top_k) if output_format == "csv" else functools.partial(_echo_row,
                                                                                  as_json=output_format == "jsonl")
    errors = 0
    skipped: list[tuple[str, str]] = []
    paths = expand_sources(images, skipped=skipped)
    rows = predict_files(paths, model=model, head=head_dir, top_k=top_k, batch_size=batch_size, device=device)
    # a bar only when the rows go elsewhere (a file, a pipe) and a person watches stderr
    show_bar = sys.stderr.isatty() and not sys.stdout.isatty() and len(paths) > batch_size
    with progress_bar("predict", enabled=show_bar) as progress:
        for done, row in enumerate(rows, start=1):
            progress(done, len(paths), {"errors": errors})
            errors += echo_row(row)
    for name, reason in skipped:  # what the folder walk passed over, as extract records it
        click.echo(f"skipped {_escape(name)}: {reason}", err=True)
    if errors:
        click.echo(f"{errors} image(s) could not be read", err=True)


def _csv_writer(top_k: int):
    """A function printing one prediction as a CSV row (after the header, printed now); 1 if an error row.

    The csv module quotes paths holding commas, quotes or newlines; a row has ``top_k``
    label/probability pairs, left empty where the model has fewer classes or the image failed.
    """
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")

    def emit(values: list) -> None:
        buffer.seek(0)
        buffer.truncate()
        writer.writerow(values)
        click.echo(buffer.getvalue(), nl=False)

    emit(["path", *[f"{name}_{rank}" for rank in range(1, top_k + 1) for name in ("label", "probability")], "error"])

    def echo_row(row: dict) -> int:
        ranked = [value for c in row.get("top_k", []) for value in (c["label"], f"{c['probability']:.6f}")]
        emit([row["path"], *ranked, *[""] * (2 * top_k - len(ranked)), row.get("error", "")])
        return int("error" in row)

    return echo_row


def _echo_row(row: dict, as_json: bool) -> int:
    """Print one prediction; 1 if it was an error line."""
    if as_json:
        click.echo(json.dumps(row))
    elif "error" in row:
        click.echo(f"{_escape(row['path'])}\terror: {_escape(row['error'])}")
    else:
        ranked = ", ".join(f"{_escape(c['label'])} {c['probability']:.3f}" for c in row["top_k"])
        click.echo(f"{_escape(row['path'])}\t{ranked}")
    return int("error" in row)


#: backslash and control characters (newline, tab, ...) as escapes: one image, one line, two columns
_ESCAPES = {**{code: f"\\x{code:02x}" for code in [*range(32), 127]},
            ord("\\"): "\\\\", ord("\n"): "\\n", ord("\t"): "\\t", ord("\r"): "\\r"}


def _escape(text: str) -> str:
    return str(text).translate(_ESCAPES)


COMMANDS = [predict_command, bundle_command]
