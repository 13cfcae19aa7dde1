"""``embedx``: the click group, and the one place errors become exit codes.

EmbedxError -> one line on stderr, exit 1; bad options -> click's usage error,
exit 2; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import importlib
import logging
import sys
from collections.abc import Sequence

import click

from embedx import __version__
from embedx.errors import EmbedxError

#: Modules under embedx.cli that contribute commands, in help order.
COMMAND_MODULES = (
    "backbones_cmd",  # backbones, export
    "extract_cmd",  # extract, info
    "merge_cmd",  # merge
    "verify_cmd",  # verify
    "heads_cmd",  # fit-head, evaluate
    "predict_cmd",  # predict, bundle
    "serve_cmd",  # serve-onnx
    "finetune_cmd",  # finetune
    "demo_cmd",  # demo
)


class EmbedxGroup(click.Group):
    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except EmbedxError as e:
            click.echo(f"error: {e}", err=True)
            ctx.exit(1)


@click.group(cls=EmbedxGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="embedx")
@click.option("-v", "--verbose", count=True, help="More log output (-vv for debug).")
def cli(verbose: int) -> None:
    """Transfer learning on images: run the frozen backbone once, keep the features.

    \b
    embedx extract --backbone efficientnet_lite0 data/ -o cache/feats.h5
    embedx fit-head --cache cache/feats.h5 -o cache/heads/mine
    embedx bundle --head cache/heads/mine -o cache/model.onnx
    embedx serve-onnx cache/model.onnx
    """
    level = logging.WARNING - 10 * verbose
    logging.basicConfig(level=max(level, logging.DEBUG), format="%(levelname)s %(name)s: %(message)s")


for _module_name in COMMAND_MODULES:
    _module = importlib.import_module(f"embedx.cli.{_module_name}")
    for _command in getattr(_module, "COMMANDS", []):
        cli.add_command(_command)


def main(args: Sequence[str] | None = None) -> None:
    """The ``embedx`` command; ``args`` default to the command line's."""
    cli(args=args, prog_name="embedx")


if __name__ == "__main__":
    sys.exit(main())
