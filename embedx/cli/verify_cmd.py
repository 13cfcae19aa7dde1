"""``embedx verify``: a cache's checksums, its images and its backbone, row by row."""

from __future__ import annotations

import json
from pathlib import Path

import click


def _report_lines(report) -> list[str]:
    from embedx.cache import row_ranges

    lines = [f"{report.path}: {report.rows} rows"]
    if report.checksums:
        lines.append(f"checksums: {len(report.checksum_rows)} rows fail"
                     + (f" ({row_ranges(report.checksum_rows)})" if report.checksum_rows else ""))
    else:
        lines.append("checksums: none (a cache written before embedx kept them)")
    if report.nonfinite_rows:
        lines.append(f"NaN or inf: {len(report.nonfinite_rows)} rows ({row_ranges(report.nonfinite_rows)})")
    if report.views:
        lines.append(f"views: {report.views} rows, {len(report.damaged_views)} fail their checksum or hold NaN/inf"
                     + (f" ({row_ranges(report.damaged_views)})" if report.damaged_views else ""))
    if report.sampled:
        lines.append(f"sample: {len(report.sampled)} rows; {len(report.missing)} images missing, "
                     f"{len(report.changed)} changed since extraction, {len(report.unreadable)} unreadable")
        for kind in ("missing", "changed", "unreadable"):
            for entry in getattr(report, kind):
                lines.append(f"  {kind}: row {entry['row']} {entry['path']}"
                             + (f" ({entry['reason']})" if "reason" in entry else ""))
    if report.reembed_skipped:
        lines.append(f"re-embedding: skipped, {report.reembed_skipped}")
    elif report.cosines:
        lines.append(f"re-embedding: {len(report.cosines)} rows, lowest cosine {min(report.cosines.values()):.6f} "
                     f"(at least {report.tolerance} expected); {len(report.low_cosine_rows)} below"
                     + (f" ({row_ranges(report.low_cosine_rows)})" if report.low_cosine_rows else ""))
    if report.ok:
        lines.append("ok")
    else:
        bad = f"BAD rows: {row_ranges(report.bad_rows, limit=50)}" if report.bad_rows else "BAD views"
        lines.append(f"{bad}; rerun the `embedx extract` command "
                     "that made the cache to recompute them")
    return lines


@click.command("verify")
@click.argument("cache", type=click.Path(path_type=Path))
@click.option("--sample", default=32, show_default=True, type=click.IntRange(min=0),
              help="Rows whose images are hashed and embedded again.")
@click.option("--seed", default=0, show_default=True, type=int, help="Which rows are sampled.")
@click.option("--data", "data_root", type=click.Path(path_type=Path), default=None,
              help="The data root, if the images moved (default: the one the cache recorded).")
@click.option("--device", default="cpu", show_default=True, help="Where the backbone runs: cpu, cuda, auto.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON on stdout.")
@click.pass_context
def verify_command(ctx: click.Context, cache: Path, sample: int, seed: int, data_root: Path | None, device: str,
                   as_json: bool) -> None:
    """Check a feature cache: every row's checksum, a sample of images against their keys,
    and the sample embedded again with the cache's own backbone. Exit 1 naming the bad rows."""
    from embedx.verify import verify

    report = verify(cache, sample=sample, seed=seed, device=device, data_root=data_root)
    if as_json:
        click.echo(json.dumps(report.to_dict(), indent=2))
    else:
        click.echo("\n".join(_report_lines(report)))
    if not report.ok:
        ctx.exit(1)


COMMANDS = [verify_command]
