"""``embedx finetune``: train the backbone under a fitted head (LP-FT)."""

from __future__ import annotations

import json

import click

from embedx.cli.progressbar import progress_bar
from embedx.cli.types import FiniteFloatRange


class UnfreezeType(click.ParamType):
    name = "all|N"

    def convert(self, value, param, ctx):
        from embedx.errors import ConfigError
        from embedx.finetune import parse_unfreeze

        try:
            return parse_unfreeze(value)
        except ConfigError as e:
            self.fail(str(e), param, ctx)


@click.command("finetune")
@click.option("--head", "head_dir", required=True, type=click.Path(exists=True, file_okay=False),
              help="Head directory from `embedx fit-head` (the linear probe to start from).")
@click.argument("data", type=click.Path(exists=True))
@click.option("--unfreeze", default="all", show_default=True, type=UnfreezeType(),
              help="Train all of the backbone, or only its top N blocks (0: the head alone).")
@click.option("--epochs", default=5, show_default=True, type=click.IntRange(min=1))
@click.option("--batch-size", default=32, show_default=True, type=click.IntRange(min=1))
@click.option("--lr", default=1e-3, show_default=True, type=FiniteFloatRange(min=0, min_open=True),
              help="Learning rate of the head (AdamW, warm-up then cosine).")
@click.option("--backbone-lr-mult", default=0.1, show_default=True, type=FiniteFloatRange(min=0),
              help="Backbone learning rate = lr x this.")
@click.option("--warmup-epochs", default=0.5, show_default=True, type=FiniteFloatRange(min=0))
@click.option("--weight-decay", default=1e-4, show_default=True, type=FiniteFloatRange(min=0))
@click.option("--augment/--no-augment", default=True, show_default=True,
              help="RandomResizedCrop + horizontal flip on the training images.")
@click.option("--no-flip", is_flag=True, help="Augment without horizontal flips (text, asymmetric objects).")
@click.option("--manifest", type=click.Path(exists=True, dir_okay=False),
              help="CSV manifest (path,label[,split]) with paths relative to DATA.")
@click.option("-o", "--output", type=click.Path(file_okay=False),
              help="Output head directory [default: HEAD-ft next to --head].")
@click.option("--resume/--no-resume", default=True, show_default=True,
              help="Continue from a checkpoint of the same settings in the output directory.")
@click.option("--device", default="auto", show_default=True, type=click.Choice(["auto", "cpu", "cuda"]))
@click.option("--seed", default=0, show_default=True, type=int)
@click.option("--workers", default=None, type=click.IntRange(min=0, max=2),
              help="Data-loading worker processes [default: up to 2].")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
@click.option("--quiet", "-q", is_flag=True, help="No progress bar.")
def finetune_command(head_dir, data, unfreeze, epochs, batch_size, lr, backbone_lr_mult, warmup_epochs,
                     weight_decay, augment, no_flip, manifest, output, resume, device, seed, workers,
                     as_json, quiet):
    """Fine-tune the backbone under the head in --head on DATA (class folders with train/val).

    Starts from the fitted head (linear probing then fine-tuning), keeps the best
    epoch by validation accuracy, and writes a head directory that `predict`,
    `evaluate`, `bundle` and `serve-onnx` use as they are, with the fine-tuned
    backbone as ONNX. Interrupted runs resume where they stopped.
    """
    from embedx.finetune import finetune

    with progress_bar("finetune", unit="step", enabled=not quiet) as callback:
        result = finetune(
            head_dir, data, unfreeze=unfreeze, epochs=epochs, batch_size=batch_size, lr=lr,
            backbone_lr_mult=backbone_lr_mult, warmup_epochs=warmup_epochs, weight_decay=weight_decay,
            augment=augment, hflip=not no_flip, manifest=manifest, output=output, resume=resume,
            device=device, seed=seed, num_workers=workers, progress=callback,
        )
    if as_json:
        click.echo(json.dumps(result.to_dict(), indent=2, sort_keys=True))
        return
    from embedx.metrics import format_accuracy

    def shown(accuracy: float | None) -> str:
        if accuracy is None:
            return "n/a"
        return format_accuracy(accuracy, result.val_count) if result.val_count else f"{accuracy:.4f}"

    if result.resumed_from_epoch:
        click.echo(f"resumed after epoch {result.resumed_from_epoch}", err=True)
    click.echo(f"val accuracy {shown(result.initial_val_accuracy)} -> {shown(result.best_val_accuracy)} "
               f"(best epoch {result.best_epoch}; 95% Wilson intervals), {result.seconds:.1f}s", err=True)
    click.echo(str(result.output_dir))


COMMANDS = [finetune_command]
