"""Training curves and benchmark charts, drawn with matplotlib (``pip install "lightning-peft[plots]"``).

``write_curves(metrics_csv, png)`` reads the ``metrics.csv`` that Lightning's ``CSVLogger`` writes and
draws one panel per metric against the global step: ``train_loss`` and ``val_loss`` share the ``loss``
panel (the same quantity, so their points line up at each validation step), and every other metric
(``val_acc``, ``train_acc``, ``val_ppl``, ...) gets a panel of its own. Each panel shows its values as
logged, on its own axis with ticks; a NaN or infinite value leaves a gap in its line.

``render_bars`` draws a grouped horizontal bar chart (the README's benchmark chart).

matplotlib is imported only when a chart is drawn, through its Agg canvas (no display, no pyplot state).
"""

from __future__ import annotations

import csv
import logging
import math
from collections.abc import Sequence
from io import BytesIO
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from matplotlib.figure import Figure

log = logging.getLogger(__name__)

INSTALL_HINT = 'pip install "lightning-peft[plots]"'
STAGES = ("train_", "val_", "test_")
SUFFIXES = ("_step", "_epoch")  # Lightning's names for a metric logged both per step and per epoch
NOT_METRICS = {"step", "epoch"}


def read_metrics(metrics_csv: str | Path) -> dict[str, tuple[list[int], list[float]]]:
    """``{column: (steps, values)}`` of every metric column of Lightning's ``metrics_csv``.

    Blank cells (a row logs only some metrics) are skipped; ``nan`` and ``inf`` are kept as NaN so a
    line drawn from them has a gap. Columns are in the file's order.
    """
    series: dict[str, tuple[list[int], list[float]]] = {}
    with Path(metrics_csv).open(newline="") as f:
        reader = csv.DictReader(f)
        if reader.fieldnames is None or "step" not in reader.fieldnames:
            raise ValueError(f"{metrics_csv} has no 'step' column; columns: {reader.fieldnames}")
        names = [n for n in reader.fieldnames if n not in NOT_METRICS]
        for row in reader:
            if not row.get("step"):
                continue
            step = int(float(row["step"]))
            for name in names:
                value = _number(row.get(name))
                if value is not None:
                    steps, values = series.setdefault(name, ([], []))
                    steps.append(step)
                    values.append(value if math.isfinite(value) else math.nan)
    return series


def _number(cell: str | None) -> float | None:
    try:
        return float(cell) if cell else None
    except ValueError:
        return None


def panel_of(name: str) -> str:
    """The panel a metric column is drawn on: ``loss`` for every loss of the task (``train_loss``,
    ``val_loss``, ``train_loss_epoch``, ``train_loss/task_a``: the same quantity, so train and validation
    share axes), otherwise the column's own name without Lightning's ``_step``/``_epoch`` suffix
    (``val_acc``, ``train_acc``, ``base/val_acc``)."""
    parts = name.split("/")
    part = next((p for p in parts if p.startswith(STAGES)), parts[0])
    for prefix in STAGES:
        part = part.removeprefix(prefix)
    for suffix in SUFFIXES:
        part = part.removesuffix(suffix)
        name = name.removesuffix(suffix)
    return "loss" if part == "loss" else name


def curves_figure(metrics_csv: str | Path) -> Figure:
    """A matplotlib ``Figure`` of the metrics in ``metrics_csv``: one panel per :func:`panel_of`, the
    ``loss`` panel first and the others in the file's column order, x = the global step, y = the values
    as logged (each panel on its own scale, with ticks and a legend)."""
    series = read_metrics(metrics_csv)
    if not series:
        raise ValueError(f"{metrics_csv} holds no metric values")
    panels: dict[str, list[str]] = {}
    for name in sorted(series, key=lambda n: panel_of(n) != "loss"):  # stable: file order otherwise
        panels.setdefault(panel_of(name), []).append(name)
    figure = _figure(len(panels))
    for axes, (title, names) in zip(figure.axes, panels.items(), strict=False):
        for name in names:
            steps, values = series[name]
            marker = "o" if len(steps) <= 60 else None  # sparse validation points stay visible
            axes.plot(steps, values, marker=marker, markersize=3, linewidth=1.5, label=name)
        axes.set_title(title)
        axes.set_xlabel("step")
        axes.set_ylabel(title)
        axes.grid(True, alpha=0.3)
        axes.legend(fontsize="small")
    for axes in figure.axes[1 : len(panels)]:
        axes.sharex(figure.axes[0])  # one step range for all panels, every panel keeping its tick labels
    for axes in figure.axes[len(panels) :]:
        axes.set_visible(False)
    return figure


def _figure(panels: int) -> Figure:
    """An empty figure on matplotlib's Agg canvas with a grid of ``panels`` axes, three to a row."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    columns = min(panels, 3)
    rows = math.ceil(panels / columns)
    figure = Figure(figsize=(4.8 * columns, 3.6 * rows), layout="constrained")
    FigureCanvasAgg(figure)
    figure.subplots(rows, columns, squeeze=False)
    return figure


def png_bytes(figure: Figure, dpi: int = 100) -> bytes:
    """``figure`` encoded as PNG by matplotlib."""
    buffer = BytesIO()
    figure.savefig(buffer, format="png", dpi=dpi)
    return buffer.getvalue()


def write_curves(metrics_csv: str | Path, png: str | Path) -> Path:
    """Draw the curves in Lightning's ``metrics_csv`` (:func:`curves_figure`) and write them to ``png``
    atomically; returns ``png``. Needs matplotlib (the ``plots`` extra).

    Example::

        write_curves(run / "logs/version_0/metrics.csv", run / "curves.png")
    """
    from lightning_peft.formats.files import write_bytes

    return write_bytes(png, png_bytes(curves_figure(metrics_csv)))


def write_curves_or_skip(metrics_csv: str | Path, png: str | Path) -> Path | None:
    """:func:`write_curves`, or one INFO line saying why there are no curves (``None``, nothing
    written): without matplotlib, how to get it; for a log with nothing to draw, what is missing. A
    finished run must not fail for its chart."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        log.info("skipped %s: matplotlib is not installed; %s to get training curves", png, INSTALL_HINT)
        return None
    try:
        written = write_curves(metrics_csv, png)
    except ValueError as error:  # no step column, no values
        log.info("skipped %s: %s", png, error)
        return None
    log.info("wrote %s", written)
    return written


def bars_figure(
    title: str,
    groups: Sequence[tuple[str, Sequence[float | None]]],
    series: Sequence[str],
    reference: float | None = 1.0,
    xlabel: str = "",
) -> Figure:
    """A horizontal grouped bar chart: one group per label (top to bottom in the given order), one bar
    per series, each bar labelled with its value, a dashed line at ``reference``.

    ``groups`` is ``[(label, [value per series, or None for no bar]), ...]``.
    """
    problems = [label for label, values in groups if len(values) != len(series)]
    if problems:
        raise ValueError(f"groups {problems} do not hold one value per series {list(series)}")
    figure = _figure(1)
    axes = figure.axes[0]
    figure.set_size_inches(8, 1.5 + 0.3 * len(series) * len(groups))
    height = 0.8 / len(series)
    for k, name in enumerate(series):
        rows = [(i, values[k]) for i, (_, values) in enumerate(groups) if values[k] is not None]
        offsets = [i - 0.4 + height * (k + 0.5) for i, _ in rows]
        bars = axes.barh(offsets, [v for _, v in rows], height=height, label=name)
        # a white box keeps a label readable where it crosses the reference line
        box = {"facecolor": "white", "edgecolor": "none", "pad": 0.5}
        axes.bar_label(bars, fmt="%.2f", padding=3, fontsize="small", bbox=box)
    if reference is not None:
        axes.axvline(reference, color="0.3", linestyle="--", linewidth=1)
    axes.set_yticks(range(len(groups)), [label for label, _ in groups])
    axes.invert_yaxis()  # the first group on top
    axes.set_title(title)
    axes.set_xlabel(xlabel)
    axes.margins(x=0.1)  # room for the value labels
    axes.grid(True, axis="x", alpha=0.3)
    figure.legend(loc="outside lower center", ncols=len(series))
    return figure


def render_bars(
    title: str,
    groups: Sequence[tuple[str, Sequence[float | None]]],
    series: Sequence[str],
    reference: float | None = 1.0,
    xlabel: str = "",
) -> bytes:
    """:func:`bars_figure` as PNG bytes.

    Example::

        png = render_bars("step time / limit", [("lora", [1.07, 1.21]), ("dora", [1.14, 1.56])],
                          ["time", "saved activations"])
    """
    return png_bytes(bars_figure(title, groups, series, reference, xlabel))
