"""``embedx fit-head`` and ``embedx evaluate``: thin wrappers over ``embedx.heads``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import click

from embedx.cli.types import FiniteFloatRange

HEAD_CHOICES = ("logreg", "linear", "mlp", "knn")
#: heads.adapt.METHODS and DEFAULT_METHOD, restated so that --help needs no numpy import
ADAPT_CHOICES = ("selftrain", "coral", "standardize", "none")
ADAPT_DEFAULT = "selftrain"


def _fmt(value: Any, digits: int = 4) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def _chosen(params: dict[str, Any]) -> str:
    keys = ("C", "weight_decay", "k", "steps", "refit")
    return ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in params.items() if k in keys)


def _ci(metrics: dict[str, Any], key: str) -> str:
    """`` [0.912-0.981]``, the interval ``metrics[key]``, or nothing (metrics of older heads)."""
    interval = metrics.get(key)
    return f" [{interval[0]:.3f}-{interval[1]:.3f}]" if interval else ""


def _metric_line(name: str, metrics: dict[str, Any]) -> str:
    from embedx.metrics import accuracy_interval

    low, high = metrics.get("accuracy_ci") or accuracy_interval(metrics["accuracy"], metrics["n"])
    line = (
        f"{name}: accuracy {_fmt(metrics['accuracy'])} [95% CI {low:.3f}-{high:.3f}], "
        f"balanced {_fmt(metrics['balanced_accuracy'])}{_ci(metrics, 'balanced_accuracy_ci')}, "
        f"macro-F1 {_fmt(metrics['macro_f1'])}{_ci(metrics, 'macro_f1_ci')}, "
        f"log-loss {_fmt(metrics['log_loss'])}"
    )
    if "top5_accuracy" in metrics:
        top5_low, top5_high = metrics.get("top5_accuracy_ci") or accuracy_interval(metrics["top5_accuracy"],
                                                                                     metrics["n"])
        line += f", top-5 {_fmt(metrics['top5_accuracy'])} [95% CI {top5_low:.3f}-{top5_high:.3f}]"
    line += (
        f"; ECE {_fmt(metrics['ece'])} -> {_fmt(metrics['ece_calibrated'])} "
        f"at T={metrics['temperature']:.3g} (n={metrics['n']})"
    )
    return line


@click.command("fit-head")
@click.option("--cache", "cache", required=True, type=click.Path(dir_okay=False, path_type=Path),
              help="Feature cache (.h5) made by `embedx extract`.")
@click.option("--head", "head_type", type=click.Choice(HEAD_CHOICES), default="logreg", show_default=True,
              help="logreg: scikit-learn; linear/mlp: torch; knn: cosine k-NN.")
@click.option("-o", "--output", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Head directory (default: $EMBEDX_CACHE_DIR/heads/<cache>-<head>).")
@click.option("--refit", is_flag=True, help="After choosing regularization on val, train again on train+val.")
@click.option("--class-weight", type=click.Choice(["balanced"]), default=None,
              help="Weight classes inversely to their frequency.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--label-smoothing", type=FiniteFloatRange(0.0, 1.0, max_open=True), default=0.0, show_default=True,
              help="For the linear and mlp heads.")
@click.option("--adapt-to", "adapt_to", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Unlabeled cache of the target domain (same backbone and settings): adapt the head to it.")
@click.option("--adapt", type=click.Choice(ADAPT_CHOICES), default=None,
              help="With --adapt-to: standardize (per domain), selftrain (standardize, then refit with confident "
                   "target pseudo-labels), coral (standardize, then whiten/recolour) or none "
                   f"[default: {ADAPT_DEFAULT}].")
@click.option("--views/--no-views", "views", default=True, show_default=True,
              help="Train on the cache's augmented views of train images too (`extract --views`); "
                   "val is always clean.")
@click.option("--cv", "cv", type=click.IntRange(min=2), default=None,
              help="Choose the regularization by stratified K-fold over train+val (for a small val set), report "
                   "the folds' accuracy (mean +- sd) and out-of-fold metrics, and train the head on train+val. "
                   "Costs about K sweeps and K+1 fits. Clean rows only; not with --adapt-to.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object (metrics, val_accuracy, fit_seconds).")
def fit_head_command(cache: Path, head_type: str, output: Path | None, refit: bool, class_weight: str | None,
                     seed: int, label_smoothing: float, adapt_to: Path | None, adapt: str | None, views: bool,
                     cv: int | None, as_json: bool) -> None:
    """Train a classifier head on cached features; regularization is chosen on val."""
    from embedx.cli.progressbar import progress_bar
    from embedx.heads import fit_head

    with progress_bar(f"fit-head {head_type}", unit="stage", enabled=not as_json) as progress:
        result = fit_head(cache, head=head_type, output=output, refit=refit, class_weight=class_weight,
                          seed=seed, label_smoothing=label_smoothing, cv=cv, progress=progress, adapt_to=adapt_to,
                          adapt=adapt, views=views)
    summary = result.to_dict()
    if as_json:
        click.echo(json.dumps(summary, sort_keys=True, default=str))
        return
    metrics = result.metrics
    with_views = f" + {metrics['n_train_views']} views" if metrics.get("n_train_views") else ""
    click.echo(f"{head_type} head fitted in {result.fit_seconds:.2f} s on {metrics['n_train']} rows{with_views} "
               f"({metrics['val_source']}: {metrics['n_val']} rows)")
    click.echo(f"chosen: {_chosen(summary['params'])}")
    if "cv" in metrics:
        folds = metrics["cv"]
        click.echo(f"cv: {folds['folds']} folds over {folds['rows']} train+val rows chose "
                   f"{folds['setting']}={folds['chosen']:.4g}; fold accuracy {folds['fold_accuracy_mean']:.4f} "
                   f"+- {folds['fold_accuracy_sd']:.4f} (sd); out-of-fold on the {folds['val_rows']} val rows "
                   f"{folds['val_rows_accuracy']:.4f}")
    click.echo(_metric_line("val", metrics["val"]))
    if "test" in metrics:
        click.echo(_metric_line("test", metrics["test"]))
    if "adaptation" in metrics:
        adaptation = metrics["adaptation"]
        click.echo(f"adaptation {adaptation['method']} to {adaptation.get('target_cache')}: source-val accuracy "
                   f"{_fmt(adaptation['source_val_accuracy_before'])} before, "
                   f"{_fmt(adaptation['source_val_accuracy_after'])} after")
    if metrics.get("note"):
        click.echo(f"note: {metrics['note']}")
    click.echo(f"head: {result.output_dir}")
    click.echo(f"plots: {summary['plots']['confusion_matrix']}, {summary['plots']['reliability']}")


@click.command("evaluate")
@click.option("--head", "head_dir", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Head directory written by `embedx fit-head`.")
@click.option("--cache", "cache", required=True, type=click.Path(dir_okay=False, path_type=Path),
              help="A cache extracted with the same backbone as the head's.")
@click.option("--split", "splits", multiple=True, help="Only these splits (repeatable; default: all).")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def evaluate_command(head_dir: Path, cache: Path, splits: tuple[str, ...], as_json: bool) -> None:
    """Metrics of a saved head on another cache made with the same backbone."""
    from embedx.heads import evaluate

    result = evaluate(head_dir, cache, splits=list(splits) or None)
    if as_json:
        click.echo(json.dumps(result, sort_keys=True, default=str))
        return
    click.echo(f"{result['head_type']} head {result['head']} on {result['cache']}")
    for name, metrics in result.items():
        if isinstance(metrics, dict):
            click.echo(_metric_line(name, metrics))
            if metrics.get("skipped_unknown_class"):
                click.echo(f"  ({metrics['skipped_unknown_class']} rows of classes "
                           "the head does not know were skipped)")


COMMANDS = [fit_head_command, evaluate_command]
