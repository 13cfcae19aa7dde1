"""``embedx backbones`` (the registry) and ``embedx export`` (verified ONNX export)."""

from __future__ import annotations

import json

import click


@click.command("backbones")
@click.option("--json", "as_json", is_flag=True, help="Print the registry as JSON.")
def backbones_command(as_json: bool) -> None:
    """List the known backbones: feature dim, input size, weights available offline.

    \b
    Any .onnx file works as a backbone too:
      embedx export --backbone model.onnx --layer auto
    """
    from embedx.backbones import list_specs, weights_status

    rows = []
    for spec in list_specs():
        row = spec.to_dict()
        row["weights"] = weights_status(spec)
        rows.append(row)
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    header = ("name", "dim", "layer", "input", "resize", "interp", "weights", "offline", "large")
    table = [header] + [
        (r["name"], str(r["feature_dim"]), "/".join(r["layers"]), str(r["preprocess"]["input_size"]),
         str(r["preprocess"]["resize_size"]), r["preprocess"]["interpolation"], r["weights_tag"],
         "yes" if r["weights"]["available"] else "no", "yes" if r["large"] else "")
        for r in rows
    ]
    widths = [max(len(line[i]) for line in table) for i in range(len(header))]
    for line in table:
        click.echo("  ".join(cell.ljust(width) for cell, width in zip(line, widths, strict=True)).rstrip())
    available = sum(r["weights"]["available"] for r in rows)
    click.echo(f"{len(rows)} backbones, {available} with pretrained weights on disk "
               "(others: place the file in the directory `embedx backbones --json` names, "
               "or use --weights none / a state dict)", err=True)


@click.command("export")
@click.option("--backbone", "-b", required=True,
              help="Registry name (see `embedx backbones`) or path to an .onnx file.")
@click.option("--weights", default="DEFAULT", show_default=True,
              help="DEFAULT (pretrained, offline only), another torchvision weights name "
                   "(e.g. IMAGENET1K_V1), none (random init) or a state-dict path.")
@click.option("--layer", default=None,
              help="Feature layer: a registry layer (e.g. fc7, pool; 'auto' = the default) or, for an "
                   ".onnx file, a tensor name or 'auto' (the global-pool output, e.g. "
                   "'464_quantized', 1280-d, in mobilenetv2-12-int8.onnx).")
@click.option("-o", "--output", type=click.Path(dir_okay=True), default=None,
              help="Also write the ONNX file here (it stays cached under cache/onnx/).")
@click.option("--opset", type=click.IntRange(13, 21), default=None,
              help="ONNX opset (default 17: fused LayerNormalization, widely supported).")
@click.option("--force", is_flag=True, help="Rebuild even if a valid cached export exists.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
def export_command(backbone: str, weights: str, layer: str | None, output: str | None,
                   opset: int | None, force: bool, as_json: bool) -> None:
    """Export a backbone to a verified ONNX feature extractor (cached).

    \b
    Checks: onnx.checker (full), ONNX Runtime vs torch at batch 1 and 3
    (max relative error <= 1e-4), all stored in the file's metadata.
    """
    from embedx import export
    from embedx.cli.progressbar import progress_bar

    if export.is_onnx_path(backbone):
        if weights not in ("DEFAULT", "default"):
            raise click.BadParameter("does not apply to an .onnx backbone", param_hint="--weights")
        if opset is not None:
            raise click.BadParameter("does not apply to an .onnx backbone", param_hint="--opset")
        click.echo(f"preparing {backbone} ...", err=True)
        result = export.prepare_onnx(backbone, layer=layer, output=output, force=force)
    else:
        with progress_bar(f"export {backbone}", unit="step", enabled=not as_json) as progress:
            result = export.export_backbone(backbone, weights=weights, layer=layer, output=output,
                                            opset=opset or export.DEFAULT_OPSET, force=force,
                                            progress=progress)
    if as_json:
        click.echo(json.dumps(result.to_dict(), indent=2))
        return
    parity = result.parity
    lines = [
        ("path", str(result.path)),
        ("backbone", result.backbone),
        ("weights", result.weights_tag),
        ("layer", f"{result.feature_layer} ({result.feature_dim}-d)"),
        ("input", f"{result.preprocess.input_size}px (resize {result.preprocess.resize_size}, "
                  f"{result.preprocess.interpolation})"),
        ("parity", f"max abs {parity.get('max_abs_error', 0):.3g}, max rel {parity.get('max_rel_error', 0):.3g} "
                   f"({parity.get('reference')}, batches {parity.get('batch_sizes')})"),
        ("size", f"{result.size_bytes / 1e6:.1f} MB"),
        ("seconds", f"{result.seconds:.2f}"),
        ("cached", "yes" if result.cached else "no"),
        ("fingerprint", result.fingerprint),
    ]
    for key, value in lines:
        click.echo(f"{key:12} {value}")


COMMANDS = [backbones_command, export_command]
