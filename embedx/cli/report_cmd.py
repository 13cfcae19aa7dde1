"""``embedx report``: a thin wrapper over ``embedx.report.build_report``."""

from __future__ import annotations

import json
from pathlib import Path

import click


@click.command("report")
@click.option("--head", "head_dir", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Head directory written by `embedx fit-head`.")
@click.option("--cache", "cache", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="A labeled cache from the same backbone (default: the cache the head was fitted on).")
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path), default=Path("report.html"),
              show_default=True, help="The HTML file to write.")
@click.option("--split", default=None,
              help="The split the detailed sections describe (default: test, else val, else train).")
@click.option("--data", "data_root", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Where the images are (default: the data root the cache recorded).")
@click.option("--mistakes", "max_mistakes", type=click.IntRange(0, 500), default=24, show_default=True,
              help="How many of the most confident mistakes to show as thumbnails.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object (output, accuracy per split, ...).")
def report_command(head_dir: Path, cache: Path | None, output: Path, split: str | None, data_root: Path | None,
                   max_mistakes: int, as_json: bool) -> None:
    """One self-contained HTML page: metrics with intervals, confusion matrix, reliability,
    per-class table, the most confident mistakes as thumbnails, a PCA map of the features."""
    from embedx.cli.progressbar import progress_bar
    from embedx.report import build_report

    with progress_bar("report", unit="step", enabled=not as_json) as progress:
        result = build_report(head_dir, cache, output=output, split=split, data_root=data_root,
                              max_mistakes=max_mistakes, progress=progress)
    if as_json:
        click.echo(json.dumps(result.to_dict(), sort_keys=True))
        return
    accuracy = ", ".join(f"{name} {value:.4f}" for name, value in result.to_dict()["accuracy"].items())
    click.echo(f"accuracy: {accuracy}")
    click.echo(f"{result.mistakes} mistakes shown ({result.focus_split}), {result.thumbnails} thumbnails, "
               f"{len(result.placeholders)} placeholders")
    for path, reason in result.placeholders[:5]:
        click.echo(f"  no thumbnail for {path!r}: {reason}", err=True)
    click.echo(f"report: {result.output} ({result.size_bytes / 1e6:.2f} MB)")


COMMANDS = [report_command]
