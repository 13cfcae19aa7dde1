"""``embedx demo``: the whole loop, offline (``make demo``), step by step on stderr."""

from __future__ import annotations

import json
import time
from pathlib import Path

import click


@click.command("demo")
@click.option("--data", type=click.Path(exists=True, file_okay=False, path_type=Path), default=None,
              help="A class-folder data set (default: scikit-learn digits rendered as PNG).")
@click.option("--backbone", default="efficientnet_lite0", show_default=True)
@click.option("--weights", default="DEFAULT", show_default=True)
@click.option("--per-class", type=int, default=None,
              help="Digits only: at most this many images per class and split (a short run).")
def demo(data: Path | None, backbone: str, weights: str, per_class: int | None) -> None:
    """Run data -> extract -> fit-head -> bundle -> predict, offline."""
    from embedx.cli.progressbar import progress_bar
    from embedx.demo import Demo

    run = Demo(data=data, backbone=backbone, weights=weights, per_class=per_class)
    for step in run.steps():
        click.secho(f"\n== {step.title}", fg="cyan", bold=True, err=True)
        start = time.perf_counter()
        if step.unit:
            with progress_bar(step.name, unit=step.unit) as progress:
                lines = step.run(progress)
        else:
            lines = step.run(None)
        for line in lines[:-1]:
            click.echo(f"   {line}", err=True)
        click.echo(f"   {lines[-1]} ({time.perf_counter() - start:.1f} s)", err=True)
    click.secho("\nsummary", bold=True, err=True)
    click.echo(json.dumps(run.summary(), indent=2))


COMMANDS = [demo]
