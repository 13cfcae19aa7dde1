"""``embedx report``: one self-contained HTML page about a saved head on a labeled cache.

The page holds, per split present in the cache, the metrics with a 95% Wilson interval on
accuracy; for one split (``test`` if the cache has one, else ``val``, else ``train``) the
confusion matrix, the reliability diagram and ECE, the per-class table, the most
confident mistakes as thumbnails, and a PCA map of the features (numpy SVD) coloured by
class with the mistakes marked; and, for a head whose head.json has an ``adaptation``
record, source vs target.

Everything is inlined (PNG/JPEG ``data:`` URIs, inline CSS): the file makes no network
request, and a Content-Security-Policy meta tag forbids any. Every string that comes from a
file (class names, paths, split names, head.json fields) is HTML-escaped, and is never
handed to matplotlib (whose ``$...$`` mathtext would parse it). Image paths come from the
cache (untrusted): they are resolved under the data root the cache recorded (or
``data_root``), and one that leads outside it, is missing, or does not decode gets a
placeholder that says why; it never stops the report.

Numbers are those of ``embedx.heads.evaluate`` (the same ``head_metrics`` on the same rows).
"""

from __future__ import annotations

import base64
import html
import io
import logging
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from embedx import __version__, untrusted
from embedx.errors import HeadError, ImageDecodeError
from embedx.fsio import atomic_write, file_under_root, make_parent, read_regular_file, reporting_write_errors
from embedx.progress import ProgressCallback

logger = logging.getLogger(__name__)

#: Longest side of a mistake's thumbnail, in pixels.
THUMB_SIZE = 128
#: Largest image file read for a thumbnail.
MAX_IMAGE_BYTES = 64 * 1024 * 1024
#: Most confident mistakes shown.
MAX_MISTAKES = 24
#: Most points drawn on the feature map (a seeded subsample beyond it; every mistake is kept).
MAP_POINTS = 4000
#: Above this many classes the confusion matrix is a picture, not a table.
MAX_TABLE_CLASSES = 40
#: Splits in the order they are shown; others follow, sorted.
SPLIT_ORDER = ("train", "val", "test")
_SPLIT_ROLES = {
    "train": "the head was fitted on these rows: optimistic",
    "val": "chose the regularization and the temperature",
    "test": "held out: the honest estimate",
}
_CSP = "default-src 'none'; img-src data:; style-src 'unsafe-inline'"


@dataclass(frozen=True)
class SplitResult:
    """What the report computed on one split (labels are indices into the head's classes)."""

    name: str
    rows: np.ndarray  # cache row indices of the rows whose class the head knows
    metrics: dict[str, Any]
    y_true: np.ndarray
    logits: np.ndarray


@dataclass(frozen=True)
class ReportResult:
    output: Path
    size_bytes: int
    focus_split: str
    metrics: dict[str, dict[str, Any]]
    mistakes: int
    thumbnails: int
    placeholders: list[tuple[str, str]] = field(default_factory=list)  # (path, why)
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return {
            "output": str(self.output),
            "size_bytes": self.size_bytes,
            "focus_split": self.focus_split,
            "accuracy": {name: m["accuracy"] for name, m in self.metrics.items()},
            "mistakes_shown": self.mistakes,
            "thumbnails": self.thumbnails,
            "placeholders": [{"path": p, "reason": r} for p, r in self.placeholders],
            "seconds": self.seconds,
        }


# --------------------------------------------------------------------------- paths and images


def image_under_root(root: Path | None, relpath: str) -> tuple[Path | None, str]:
    """``(resolved file, "")`` for a recorded path that leads to a regular file inside ``root``
    (symlinks followed), else ``(None, why not)``: cache paths are untrusted (``fsio.file_under_root``)."""
    if root is None:
        return None, "the cache records no data root (pass data_root / --data)"
    return file_under_root(root, relpath)  # strict: the page may travel; no picture from outside the root


def thumbnail_jpeg(path: Path, size: int = THUMB_SIZE) -> bytes:
    """A JPEG of ``path`` whose longest side is at most ``size`` (ImageDecodeError if it does not decode)."""
    from embedx.preprocess import decode

    image = decode(read_regular_file(path, max_bytes=MAX_IMAGE_BYTES, error=ImageDecodeError), min_size=size)
    image.thumbnail((size, size))
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=80)
    return buffer.getvalue()


# --------------------------------------------------------------------------- computing


def _split_order(names: Sequence[str]) -> list[str]:
    known = [s for s in SPLIT_ORDER if s in names]
    return known + sorted(set(names) - set(known))


def _evaluate_splits(model, data, splits: list[str], progress) -> dict[str, SplitResult]:
    from embedx.heads.fit import _feature_rows, head_metrics

    names = np.asarray(data.classes, dtype=str)
    y_names = names[np.asarray(data.labels, dtype=np.int64)]
    row_splits = np.asarray(data.splits).astype(str)
    results: dict[str, SplitResult] = {}
    for done, split in enumerate(splits):
        progress(done, f"metrics: {split}")
        rows = np.flatnonzero(row_splits == split)
        rows = rows[np.isin(y_names[rows], model.classes_)]
        if len(rows) == 0:
            continue
        metrics, y_index, logits = head_metrics(model, _feature_rows(data, rows), y_names[rows])
        skipped = int((row_splits == split).sum()) - len(rows)
        if skipped:
            metrics["skipped_unknown_class"] = skipped
        results[split] = SplitResult(split, rows, metrics, y_index, logits)
    return results


def pca_2d(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The first two principal components of ``features`` (rows) and the fraction of variance each
    explains (numpy SVD of the centred rows)."""
    centred = np.asarray(features, dtype=np.float64)
    centred = centred - centred.mean(axis=0, keepdims=True)
    _, singular, vt = np.linalg.svd(centred, full_matrices=False)
    components = vt[:2]
    coords = centred @ components.T
    if coords.shape[1] < 2:
        coords = np.hstack([coords, np.zeros((len(coords), 2 - coords.shape[1]))])
    total = float(np.sum(singular**2)) or 1.0
    explained = np.zeros(2)
    explained[: len(singular[:2])] = singular[:2] ** 2 / total
    return coords, explained


# --------------------------------------------------------------------------- pictures


def _pyplot():
    from embedx.metrics import _pyplot

    return _pyplot()


def _png_uri(data: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(data).decode("ascii")


def _jpeg_uri(data: bytes) -> str:
    return "data:image/jpeg;base64," + base64.b64encode(data).decode("ascii")


def _palette(n: int) -> list[str]:
    """``n`` distinct colours as #rrggbb (tab10, tab20, then evenly spaced hues)."""
    import matplotlib

    if n <= 10:
        colours = matplotlib.colormaps["tab10"].colors[:n]
    elif n <= 20:
        colours = matplotlib.colormaps["tab20"].colors[:n]
    else:
        colours = [matplotlib.colormaps["hsv"](i / n) for i in range(n)]
    return [matplotlib.colors.to_hex(c) for c in colours]


def _feature_map_png(coords: np.ndarray, labels: np.ndarray, mistakes: np.ndarray, colours: list[str],
                     explained: np.ndarray) -> bytes:
    """The PCA scatter (no text from files: the legend is HTML)."""
    from matplotlib.lines import Line2D

    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 6))
    try:
        ax.scatter(coords[:, 0], coords[:, 1], c=[colours[i] for i in labels], s=14, alpha=0.75, linewidths=0)
        if mistakes.any():
            ax.scatter(coords[mistakes, 0], coords[mistakes, 1], marker="o", s=60, linewidths=1.6,
                       c=[colours[i] for i in labels[mistakes]], edgecolors="black")
            ring = Line2D([], [], marker="o", linestyle="", markerfacecolor="white", markeredgecolor="black",
                          markeredgewidth=1.6, markersize=8, label="mistake")
            ax.legend(handles=[ring], loc="best")
        ax.set_xlabel(f"PC1 ({explained[0]:.0%} of the variance)")
        ax.set_ylabel(f"PC2 ({explained[1]:.0%} of the variance)")
        ax.set_title("features, PCA (colour: true class)")
        fig.tight_layout()
        buffer = io.BytesIO()
        fig.savefig(buffer, format="png", dpi=90)
        return buffer.getvalue()
    finally:
        plt.close(fig)


def _plot_png(plot, *args, **kwargs) -> bytes:
    """Run one of ``embedx.metrics``' path-writing plots and return its PNG bytes."""
    with tempfile.TemporaryDirectory(prefix="embedx-report-") as folder:
        path = Path(folder) / "plot.png"
        with reporting_write_errors(path, then="free space in the temporary folder (TMPDIR), then rerun"):
            plot(*args, path, **kwargs)
        return path.read_bytes()


# --------------------------------------------------------------------------- HTML


def _e(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _num(value: Any, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and not np.isfinite(value)):
        return "n/a"
    return f"{value:.{digits}f}"


_STYLE = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:24px auto;max-width:1180px;
color:#1d232a;padding:0 16px;line-height:1.4}
h1{font-size:1.6em;margin-bottom:4px}h2{font-size:1.25em;border-bottom:1px solid #d0d7de;padding-bottom:4px;
margin-top:36px}
table{border-collapse:collapse;margin:8px 0;font-size:.92em}
th,td{border:1px solid #d0d7de;padding:4px 8px;text-align:right;white-space:nowrap}th{background:#f3f5f7}
td.name,th.name{text-align:left;max-width:360px;white-space:normal;overflow-wrap:break-word}
.meta td{text-align:left}.meta th{text-align:left}
.note{color:#57606a;font-size:.9em}.warn{color:#9a3412}
.cm td{min-width:36px;text-align:center}
.grid{display:flex;flex-wrap:wrap;gap:12px}
.card{width:150px;font-size:.78em;border:1px solid #d0d7de;border-radius:6px;padding:6px;background:#fafbfc}
.card img,.card .ph{display:block;margin:0 auto 4px;max-width:128px;max-height:128px}
.card .ph{width:128px;height:96px;background:repeating-linear-gradient(45deg,#eee,#eee 8px,#ddd 8px,#ddd 16px);
display:flex;align-items:center;justify-content:center;text-align:center;color:#57606a;font-size:.9em}
.card .path{overflow-wrap:anywhere;color:#57606a}
.legend span{display:inline-block;margin-right:14px}
.swatch{display:inline-block;width:12px;height:12px;border-radius:6px;margin-right:4px;vertical-align:middle}
.figs{display:flex;flex-wrap:wrap;gap:24px;align-items:flex-start}
.wide{overflow-x:auto}.role{min-width:180px}
"""


def _meta_table(rows: list[tuple[str, Any]]) -> str:
    body = "".join(f"<tr><th>{_e(k)}</th><td>{_e(v)}</td></tr>" for k, v in rows)
    return f'<table class="meta">{body}</table>'


def _fit_notes(record) -> tuple[dict[str, str], list[str]]:
    """The role of each split for this head and the notes head.json's metrics carry (refit,
    cross-validation, small-val warnings), as plain text to escape."""
    recorded = record.fields.get("metrics")
    recorded = recorded if isinstance(recorded, dict) else {}
    roles = dict(_SPLIT_ROLES)
    notes = []
    if recorded.get("refit") is True:
        roles["val"] = "the head was refitted on train+val: optimistic here"
    cv = recorded.get("cv")
    if isinstance(cv, dict) and untrusted.finite(cv.get("fold_accuracy_mean")) and untrusted.finite(
            cv.get("fold_accuracy_sd")):
        notes.append(f"cross-validation at fit-head: fold accuracy {cv['fold_accuracy_mean']:.4f} "
                     f"± {cv['fold_accuracy_sd']:.4f} (sd)")
    for key in ("note", "warnings"):
        values = recorded.get(key)
        for value in values if isinstance(values, list) else [values]:
            if isinstance(value, str) and value:
                notes.append(f"fit-head: {value}")
    return roles, notes


def _same_file(a: str | Path | None, b: Path) -> bool:
    try:
        return bool(a) and Path(a).resolve() == b.resolve()
    except (OSError, RuntimeError, ValueError):
        return False


def _same_rows(recorded_digest: Any, digest: str, recorded_path: Any, cache: Path) -> bool:
    """Whether ``cache`` holds the rows a head recorded: by their digest (``cache.rows_digest``)
    when the head has one, wherever the file moved; by the path for heads written before it."""
    if isinstance(recorded_digest, str) and recorded_digest:
        return recorded_digest == digest
    return isinstance(recorded_path, str) and _same_file(recorded_path, cache)


def _foreign_roles(record, cache: Path, digest: str, present: list[str]) -> dict[str, str]:
    """Roles of the splits of a cache the head was not fitted on: its adaptation target (rows seen
    without labels), or any other cache (rows the head never saw)."""
    adaptation = record.fields.get("adaptation")
    adaptation = adaptation if isinstance(adaptation, dict) else {}
    if _same_rows(adaptation.get("target_rows_sha256"), digest, adaptation.get("target_cache"), cache):
        role = "the adaptation's target: seen at fit without labels (statistics, pseudo-labels)"
    else:
        role = "another cache than the head's: not seen at fit"
    return dict.fromkeys(present, role)


def _interval(metrics: dict[str, Any], key: str) -> str:
    interval = metrics.get(key)
    return f" <small>[{_num(interval[0])}, {_num(interval[1])}]</small>" if interval else ""


def _metrics_section(results: dict[str, SplitResult], note: str, roles: dict[str, str], notes: list[str]) -> str:
    from embedx.metrics import accuracy_interval

    head = ("<tr><th class=name>split</th><th>n</th><th>accuracy</th><th>95% interval<br><small>Wilson</small></th>"
            "<th>balanced accuracy<br><small>[95% bootstrap]</small></th>"
            "<th>macro-F1<br><small>[95% bootstrap]</small></th><th>log-loss</th>"
            "<th>ECE<br><small>raw &rarr; calibrated</small></th>"
            "<th class='name role'>role</th></tr>")
    rows = []
    for name, result in results.items():
        m = result.metrics
        low, high = accuracy_interval(m["accuracy"], m["n"])
        role = roles.get(name, "")
        if m.get("skipped_unknown_class"):
            role += f" ({m['skipped_unknown_class']} rows of classes the head does not know skipped)"
        rows.append(
            f"<tr><td class=name>{_e(name)}</td><td>{m['n']}</td><td>{_num(m['accuracy'], 4)}</td>"
            f"<td>[{_num(low)}, {_num(high)}]</td>"
            f"<td>{_num(m['balanced_accuracy'], 4)}{_interval(m, 'balanced_accuracy_ci')}</td>"
            f"<td>{_num(m['macro_f1'], 4)}{_interval(m, 'macro_f1_ci')}</td><td>{_num(m['log_loss'])}</td>"
            f"<td>{_num(m['ece'])} &rarr; {_num(m['ece_calibrated'])}</td><td class='name role'>{_e(role)}</td></tr>"
        )
    recorded = "".join(f"<li>{_e(text)}</li>" for text in notes)
    return (f'<section id="metrics"><h2>Metrics</h2><div class=wide><table>{head}{"".join(rows)}</table></div>'
            f'<p class=note>{note}</p>{f"<ul class=note>{recorded}</ul>" if recorded else ""}</section>')


def _confusion_section(result: SplitResult, class_names: list[str]) -> str:
    from embedx.metrics import plot_confusion_matrix

    matrix = np.asarray(result.metrics["confusion_matrix"], dtype=np.int64)
    n = len(class_names)
    title = f'<h2>Confusion matrix ({_e(result.name)})</h2>'
    if n > MAX_TABLE_CLASSES:  # the plot draws no class names above 40 classes
        png = _plot_png(plot_confusion_matrix, matrix, [str(i) for i in range(n)], title="confusion matrix")
        return (f'<section id="confusion">{title}<img alt="confusion matrix" src="{_png_uri(png)}">'
                f'<p class=note>{n} classes: rows are true classes, columns predicted ones, in the order of the '
                'per-class table.</p></section>')
    totals = matrix.sum(axis=1)
    header = "".join(f'<th class=name title="{_e(c)}">{_e(c)}</th>' for c in class_names)
    body = []
    for i, name in enumerate(class_names):
        cells = []
        for j in range(n):
            share = matrix[i, j] / totals[i] if totals[i] else 0.0
            colour = f"rgba({200 if i != j else 33},{60 if i != j else 102},{60 if i != j else 172},{share:.2f})"
            text = "#fff" if share > 0.55 else "#1d232a"
            cells.append(f'<td style="background:{colour};color:{text}">{matrix[i, j]}</td>')
        body.append(f"<tr><th class=name>{_e(name)}</th>{''.join(cells)}<td>{totals[i]}</td></tr>")
    return (f'<section id="confusion">{title}<table class=cm><tr><th class=name>true \\ predicted</th>{header}'
            f'<th>total</th></tr>{"".join(body)}</table><p class=note>Cell shade: the fraction of the true class '
            '(blue on the diagonal, red off it).</p></section>')


def _reliability_section(result: SplitResult, temperature: float) -> str:
    from embedx.metrics import plot_reliability, reliability_bins, softmax

    png = _plot_png(plot_reliability, result.y_true, result.logits, temperature=temperature)
    m = result.metrics
    bins = reliability_bins(result.y_true, softmax(result.logits, temperature))
    rows = "".join(
        f"<tr><td>{bins['edges'][i]:.2f} &ndash; {bins['edges'][i + 1]:.2f}</td><td>{int(bins['counts'][i])}</td>"
        f"<td>{_num(bins['confidence'][i])}</td><td>{_num(bins['accuracy'][i])}</td></tr>"
        for i in np.flatnonzero(bins["counts"] > 0)
    )
    table = ("<table><tr><th>confidence</th><th>rows</th><th>mean confidence</th><th>accuracy</th></tr>"
             f"{rows}</table>")
    return (f'<section id="reliability"><h2>Reliability ({_e(result.name)})</h2>'
            f'<div class=figs><img alt="reliability diagram" src="{_png_uri(png)}"><div>{table}'
            '<p class=note>Bins of the calibrated probabilities: a bin of a few rows is noise.</p></div></div>'
            f'<p>ECE (15 bins): <b>{_num(m["ece"], 4)}</b> raw, <b>{_num(m["ece_calibrated"], 4)}</b> after '
            f'temperature scaling at T = {_num(temperature, 3)} (fitted on val).</p></section>')


def _per_class_section(result: SplitResult, class_names: list[str]) -> str:
    from embedx.metrics import wilson_interval

    per_class = result.metrics["per_class"]
    matrix = np.asarray(result.metrics["confusion_matrix"], dtype=np.int64)
    rows = []
    for i, name in enumerate(class_names):
        values = per_class[str(name)]
        support = int(values["support"])
        low, high = wilson_interval(int(matrix[i, i]), support) if support else (float("nan"), float("nan"))
        rows.append(
            f"<tr><td class=name>{_e(name)}</td><td>{_num(values['precision'])}</td><td>{_num(values['recall'])}"
            f"</td><td>[{_num(low)}, {_num(high)}]</td><td>{_num(values['f1'])}</td><td>{support}</td></tr>"
        )
    head = ("<tr><th class=name>class</th><th>precision</th><th>recall</th><th>recall 95% (Wilson)</th>"
            "<th>F1</th><th>support</th></tr>")
    return (f'<section id="per-class"><h2>Per class ({_e(result.name)})</h2><table>{head}{"".join(rows)}'
            "</table></section>")


def _mistakes_section(result: SplitResult, data, class_names: list[str], temperature: float, root: Path | None,
                      *, limit: int, thumb_size: int, progress) -> tuple[str, int, int, list[tuple[str, str]]]:
    from embedx.metrics import softmax

    proba = softmax(result.logits, temperature)
    predicted = proba.argmax(axis=1)
    wrong = np.flatnonzero(predicted != result.y_true)
    order = wrong[np.argsort(-proba[wrong, predicted[wrong]], kind="stable")][:limit]
    cards, placeholders, thumbnails = [], [], 0
    paths = np.asarray(data.paths).astype(str)
    for done, index in enumerate(order):
        progress(done, len(order))
        relpath = str(paths[result.rows[index]])
        path, why = image_under_root(root, relpath)
        if path is not None:
            try:
                picture = f'<img alt="" src="{_jpeg_uri(thumbnail_jpeg(path, thumb_size))}">'
                thumbnails += 1
            except ImageDecodeError as e:
                from embedx.preprocess import decode_reason

                why = decode_reason(e, path)
        if why:
            picture = f'<div class=ph>{_e(why)}</div>'
            placeholders.append((relpath, why))
        true, guess = int(result.y_true[index]), int(predicted[index])
        cards.append(
            f'<div class=card>{picture}<div>true <b>{_e(class_names[true])}</b></div>'
            f'<div>predicted <b>{_e(class_names[guess])}</b> p={_num(float(proba[index, guess]))}</div>'
            f'<div>p(true)={_num(float(proba[index, true]))}</div><div class=path>{_e(relpath)}</div></div>'
        )
    progress(len(order), len(order))
    shown = f"the {len(order)} most confident of {len(wrong)}" if len(wrong) > len(order) else f"all {len(wrong)}"
    where = f"images under {_e(root)}" if root is not None else "no data root recorded"
    body = (f'<div class=grid>{"".join(cards)}</div>' if cards else "<p>No mistakes on this split.</p>")
    html_text = (f'<section id="mistakes"><h2>Most confident mistakes ({_e(result.name)})</h2>'
                 f'<p class=note>{shown} mistakes, by calibrated probability of the predicted class; {where}.</p>'
                 f'{body}</section>')
    return html_text, len(order), thumbnails, placeholders


def _map_section(result: SplitResult, data, class_names: list[str], *, max_points: int, seed: int = 0) -> str:
    from embedx.heads.fit import _feature_rows

    predicted = result.logits.argmax(axis=1)
    mistakes = predicted != result.y_true
    chosen = np.arange(len(result.rows))
    if len(chosen) > max_points:  # keep every mistake, subsample the rest
        rng = np.random.default_rng(seed)
        right = rng.choice(np.flatnonzero(~mistakes), size=max(max_points - int(mistakes.sum()), 0), replace=False)
        chosen = np.sort(np.concatenate([np.flatnonzero(mistakes), right]))
    features = _feature_rows(data, result.rows[chosen])
    coords, explained = pca_2d(features)
    colours = _palette(len(class_names))
    png = _feature_map_png(coords, result.y_true[chosen], mistakes[chosen], colours, explained)
    legend = "".join(f'<span><i class=swatch style="background:{colours[i]}"></i>{_e(name)}</span>'
                     for i, name in enumerate(class_names) if i < 40)
    more = f" (legend: the first 40 of {len(class_names)} classes)" if len(class_names) > 40 else ""
    return (f'<section id="feature-map"><h2>Feature map ({_e(result.name)})</h2>'
            f'<img alt="PCA map of the features" src="{_png_uri(png)}"><div class=legend>{legend}</div>'
            f'<p class=note>{len(chosen)} of {len(result.rows)} rows; a black ring marks a mistake (its fill is the '
            f'true class){more}.</p></section>')


def _accuracy_row(label: str, accuracy: Any, n: Any) -> str:
    """One "domain, n, accuracy, interval" row; "" when head.json's numbers are not an accuracy of n rows."""
    from embedx.metrics import accuracy_interval

    if not (untrusted.finite(accuracy) and 0 <= accuracy <= 1 and isinstance(n, int) and n > 0):
        return ""
    low, high = accuracy_interval(accuracy, n)
    return (f"<tr><td class=name>{_e(label)}</td><td>{n}</td><td>{_num(accuracy, 4)}</td>"
            f"<td>[{_num(low)}, {_num(high)}]</td></tr>")


def _adaptation_section(record, results: dict[str, SplitResult], focus: str, same_cache: bool) -> str:
    """Source vs target for a head trained with domain adaptation (head.json ``adaptation``:
    ``method``, ``source_val_accuracy_before``/``_after``, the target, ``warning``, ...); "" otherwise.

    Source numbers are head.json's (measured at fit-head on the source val rows); the target's
    are this report's on the focus split, when the cache is not the head's own.
    """
    adaptation = record.fields.get("adaptation")
    if not isinstance(adaptation, dict):
        return ""
    scalars = [(k, _num(v, 4) if isinstance(v, float) else v) for k, v in adaptation.items()
               if isinstance(v, (str, int, float, bool)) or v is None]
    recorded = record.fields.get("metrics") if isinstance(record.fields.get("metrics"), dict) else {}
    source = recorded.get("val") if isinstance(recorded.get("val"), dict) else {}
    n_source = source.get("n")
    rows = [
        _accuracy_row("source val, head without adaptation (the guard)",
                      adaptation.get("source_val_accuracy_before"), n_source),
        _accuracy_row("source val, adapted head", adaptation.get("source_val_accuracy_after",
                                                                 source.get("accuracy")), n_source),
    ]
    if same_cache:
        note = ("This report reads the head's own (source) cache, and the head applies the target's statistics "
                "at prediction time, so the metrics above are not its source accuracy: the source rows here "
                "are head.json's. Pass a labeled target cache with --cache for the target row.")
    else:
        m = results[focus].metrics
        rows.append(_accuracy_row(f"target {focus} (this cache)", m["accuracy"], m["n"]))
        note = "Source rows: measured by fit-head on the source val rows (head.json); target: this report."
    table = ("<table><tr><th class=name>domain</th><th>n</th><th>accuracy</th><th>95% interval (Wilson)</th></tr>"
             f'{"".join(rows)}</table>')
    return (f'<section id="adaptation"><h2>Domain adaptation: source vs target</h2>{_meta_table(scalars)}'
            f'{table}<p class=note>{_e(note)}</p></section>')


# --------------------------------------------------------------------------- the report


def build_report(
    head_dir: str | Path,
    cache: str | Path | None = None,
    *,
    output: str | Path,
    split: str | None = None,
    data_root: str | Path | None = None,
    max_mistakes: int = MAX_MISTAKES,
    thumb_size: int = THUMB_SIZE,
    map_points: int = MAP_POINTS,
    progress: ProgressCallback | None = None,
) -> ReportResult:
    """Write the HTML report of the head in ``head_dir`` on ``cache`` (default: the cache
    head.json records) to ``output``.

    ``split``: the split the confusion matrix, reliability, per-class table, mistakes and
    map describe (default ``test``, else ``val``, else ``train``); ``data_root``: where the
    images are (default: the root the cache recorded). ``progress(done, total, info)`` counts
    stages; ``info`` names the stage (and the thumbnails done, while they are made).
    """
    from embedx.cache import read_cache, rows_digest
    from embedx.heads.base import load_head
    from embedx.heads.fit import check_compatible

    start = time.perf_counter()
    head_dir = Path(head_dir)
    model = load_head(head_dir)
    record = model.record_
    recorded_cache = str(record.cache.get("path") or "")
    if cache is None:
        if not recorded_cache:
            raise HeadError(f"the head in {head_dir} records no cache path; pass the cache with --cache")
        if not Path(recorded_cache).exists():
            raise HeadError(f"the head in {head_dir} was fitted on {recorded_cache}, which is not there (moved?); "
                            "pass the cache with --cache")
        cache = recorded_cache
    cache = Path(cache)
    stages = 7

    def stage(done: int, name: str) -> None:
        if progress is not None:
            progress(done, stages, {"stage": name})

    stage(0, "read cache")
    data = read_cache(cache, load_features=False)
    check_compatible(record, data, head_dir=head_dir)
    class_names = [str(c) for c in model.classes_]
    present = _split_order(sorted(set(np.asarray(data.splits).astype(str).tolist())))
    results = _evaluate_splits(model, data, present, lambda done, name: stage(1, name))
    if not results:
        raise HeadError(f"none of the classes in {cache} is one the head in {head_dir} knows "
                        f"({class_names[:10]}); report on a cache with the same class names")
    if split is not None and split not in results:
        raise HeadError(f"cache {cache} has no rows of the head's classes in split {split!r}; it has "
                        f"{sorted(results)}")
    focus = split or next(s for s in ("test", "val", "train", *results) if s in results)
    chosen = results[focus]
    temperature = float(model.temperature_)
    root = Path(data_root) if data_root is not None else data.data_root

    stage(2, "plots")
    digest = rows_digest(data)
    same_cache = _same_rows(record.cache.get("rows_sha256"), digest, recorded_cache, cache)
    roles, notes = _fit_notes(record)
    if not same_cache:
        roles = _foreign_roles(record, cache, digest, list(results))
    sections = [
        _metrics_section(results, "Accuracy intervals are 95% Wilson score intervals on the rows of each split: "
                         "how far another sample of the same size could move the figure.", roles, notes),
        _confusion_section(chosen, class_names),
        _reliability_section(chosen, temperature),
        _per_class_section(chosen, class_names),
    ]
    stage(3, "thumbnails")

    def image_progress(done: int, total: int) -> None:
        if progress is not None:
            progress(3, stages, {"stage": "thumbnails", "images": f"{done}/{total}"})

    mistakes_html, shown, thumbnails, placeholders = _mistakes_section(
        chosen, data, class_names, temperature, root, limit=max_mistakes, thumb_size=thumb_size,
        progress=image_progress)
    sections.append(mistakes_html)
    stage(4, "feature map")
    sections.append(_map_section(chosen, data, class_names, max_points=map_points))
    sections.append(_adaptation_section(record, results, focus, same_cache))

    stage(5, "write")
    facts = [
        ("head", head_dir), ("head type", record.head_type), ("classes", len(class_names)),
        ("cache", cache), ("backbone", data.meta.backbone), ("feature dim", data.meta.feature_dim),
        ("val source at fit", record.fields.get("val_source", "n/a")), ("temperature", f"{temperature:.3g}"),
        ("detailed split", focus), ("embedx", __version__),
        ("written", time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())),
    ]
    page = (
        '<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">'
        f'<meta http-equiv="Content-Security-Policy" content="{_CSP}">'
        f"<title>embedx report: {_e(head_dir.name)}</title><style>{_STYLE}</style></head><body>"
        f"<h1>embedx report: {_e(record.head_type)} head on {_e(data.meta.backbone)} features</h1>"
        f"{_meta_table(facts)}{''.join(sections)}</body></html>\n"
    )
    output = Path(output)
    make_parent(output, what="report")
    with reporting_write_errors(output):
        atomic_write(output, page)
    stage(stages, "done")
    logger.info("wrote %s (%d bytes, %d thumbnails, %d placeholders)", output, len(page), thumbnails,
                len(placeholders))
    return ReportResult(output=output, size_bytes=output.stat().st_size, focus_split=focus,
                        metrics={name: r.metrics for name, r in results.items()}, mistakes=shown,
                        thumbnails=thumbnails, placeholders=placeholders, seconds=time.perf_counter() - start)
