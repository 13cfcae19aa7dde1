"""``embedx merge``: one feature cache from the caches of a data set's shards."""

from __future__ import annotations

import json
from pathlib import Path

import click


@click.command("merge")
@click.argument("parts", nargs=-1, required=True, type=click.Path(dir_okay=False, path_type=Path))
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False, path_type=Path),
              help="The merged cache.")
@click.option("--allow-partial", is_flag=True,
              help="Merge parts that are not every shard of one N once (missing, repeated or mixed N): "
                   "a warning instead of an error.")
@click.option("--overwrite", is_flag=True, help="Replace an existing file not made by `embedx merge`.")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON on stdout.")
@click.option("--quiet", "-q", is_flag=True, help="No progress bar.")
def merge_command(parts, output, allow_partial, overwrite, as_json, quiet) -> None:
    """Join the caches of `embedx extract --shard I/N` (all N of them) into one cache.

    \b
    embedx extract DATA -b efficientnet_lite0 --shard 0/3 -o part-0.h5   # on machine 0
    ...                                                                  # 1/3, 2/3 elsewhere
    embedx merge part-0.h5 part-1.h5 part-2.h5 -o all.h5
    The result is the cache one `embedx extract DATA -b ...` would have made. Rerun the
    same command after a kill: it finishes from its journal.
    """
    from contextlib import ExitStack

    from embedx.cli.progressbar import progress_bar
    from embedx.merge import merge

    with ExitStack() as stack:
        bar = []

        def progress(done, total, info) -> None:
            if not bar:  # from the first copy on: a refusal is then one line, without a bar
                bar.append(stack.enter_context(progress_bar("merge", unit="row", enabled=not quiet)))
            bar[0](done, total, info)

        summary = merge(parts, output=output, overwrite=overwrite, allow_partial=allow_partial,
                        progress=progress)
    result = summary.to_dict()
    if as_json:
        click.echo(json.dumps(result, indent=2))
        return
    # the warnings (missing shards, ...) were logged as they were found
    click.echo(f"{result['output']}: {result['images']} rows, {result['errors']} errors from "
               f"{len(result['parts'])} shards ({', '.join(result['shards'])}); {result['copied']} copied, "
               f"{result['reused']} already there, {result['duplicates']} duplicate rows dropped, "
               f"{result['seconds']:.1f} s", err=True)
    click.echo(result["output"])


COMMANDS = [merge_command]
