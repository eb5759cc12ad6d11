"""Training curves as a PNG, without matplotlib.

``write_curves(metrics_csv, png)`` reads Lightning's CSV log and draws one polyline per
series (``train_loss``, ``val_loss`` and the main metric when present) on a white canvas
with grey axes. Each series is scaled to its own range. The legend at the top left names
each series with its colour and its first and last values, in the order of ``SERIES``: blue
train_loss, orange val_loss, green val_acc / val_ppl. ``render_bars`` draws the README's
benchmark chart. Text uses a built-in 3 x 5 pixel font (digits, capitals, a few signs).
"""

from __future__ import annotations

import csv
import math
import struct
import zlib
from pathlib import Path

SERIES = ("train_loss", "val_loss", "val_acc", "val_ppl")
COLORS = {
    "train_loss": (31, 119, 180),
    "val_loss": (255, 127, 14),
    "val_acc": (44, 160, 44),
    "val_ppl": (44, 160, 44),
}
AXIS = (120, 120, 120)


def read_series(metrics_csv: Path) -> dict[str, list[float]]:
    """Values of each known series in ``metrics_csv``, in logging order, blanks skipped."""
    series: dict[str, list[float]] = {}
    with Path(metrics_csv).open(newline="") as f:
        for row in csv.DictReader(f):
            for name in SERIES:
                for key in (name, f"{name}_epoch", f"{name}_step"):
                    if row.get(key):
                        series.setdefault(name, []).append(float(row[key]))
                        break
    return series


def encode_png(pixels: list[bytearray], width: int, height: int) -> bytes:
    """An 8-bit RGB PNG from ``height`` rows of ``3 * width`` bytes."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    raw = b"".join(b"\x00" + bytes(row) for row in pixels)  # filter type 0 per row
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b"")
    )


def render(series: dict[str, list[float]], width: int = 480, height: int = 320) -> bytes:
    """PNG bytes plotting each series against its own index, stretched to the full width, with a
    legend (colour box, name, first -> last value) at the top left. NaN and infinite values leave a gap
    in their line (and read ``NAN`` / ``INF`` in the legend)."""
    canvas = _Canvas(width, height)

    def line(x0: int, y0: int, x1: int, y1: int, color: tuple[int, int, int]) -> None:
        steps = max(abs(x1 - x0), abs(y1 - y0), 1)
        for i in range(steps + 1):
            x, y = round(x0 + (x1 - x0) * i / steps), round(y0 + (y1 - y0) * i / steps)
            canvas.rect(x, y, x + 1, y + 1, color)

    left, right, top, bottom = 30, width - 10, 10, height - 30
    line(left, bottom, right, bottom, AXIS)
    line(left, top, left, bottom, AXIS)
    for k, (name, values) in enumerate((n, series[n]) for n in SERIES if series.get(n)):
        color = COLORS[name]
        canvas.rect(left + 8, top + 4 + 14 * k, left + 16, top + 12 + 14 * k, color)  # legend box
        canvas.text(left + 22, top + 3 + 14 * k, f"{name} {values[0]:.3g} - {values[-1]:.3g}", AXIS)
        finite = [v for v in values if math.isfinite(v)]
        lo, hi = (min(finite), max(finite)) if finite else (0.0, 1.0)
        span = (hi - lo) or 1.0
        points = [
            (
                left + round((right - left) * i / max(len(values) - 1, 1)),
                bottom - round((bottom - top) * (v - lo) / span),
            )
            if math.isfinite(v)
            else None
            for i, v in enumerate(values)
        ]
        for start, end in zip(points, points[1:] or points, strict=False):
            if start is not None and end is not None:  # a diverged value breaks the line
                line(*start, *end, color)
    return canvas.png()


def write_curves(metrics_csv: Path, png: Path) -> Path:
    """Render the curves in Lightning's ``metrics_csv`` to ``png``; returns ``png``.

    Example::

        write_curves(run / "logs/version_0/metrics.csv", run / "curves.png")
    """
    from lightning_peft.formats.files import write_bytes

    return write_bytes(png, render(read_series(metrics_csv)))


# A 3 x 5 pixel font (drawn at twice its size) for chart labels: digits, capitals, a few signs.
_GLYPHS = {
    "0": "###,#.#,#.#,#.#,###",
    "1": ".#.,##.,.#.,.#.,###",
    "2": "###,..#,###,#..,###",
    "3": "###,..#,###,..#,###",
    "4": "#.#,#.#,###,..#,..#",
    "5": "###,#..,###,..#,###",
    "6": "###,#..,###,#.#,###",
    "7": "###,..#,..#,..#,..#",
    "8": "###,#.#,###,#.#,###",
    "9": "###,#.#,###,..#,###",
    ".": "...,...,...,...,.#.",
    "-": "...,...,###,...,...",
    " ": "...,...,...,...,...",
    "(": ".#.,#..,#..,#..,.#.",
    ")": ".#.,..#,..#,..#,.#.",
    "/": "..#,..#,.#.,#..,#..",
    ":": "...,.#.,...,.#.,...",
    "=": "...,###,...,###,...",
    "+": "...,.#.,###,.#.,...",
    "_": "...,...,...,...,###",
    "A": ".#.,#.#,###,#.#,#.#",
    "B": "##.,#.#,##.,#.#,##.",
    "C": ".##,#..,#..,#..,.##",
    "D": "##.,#.#,#.#,#.#,##.",
    "E": "###,#..,##.,#..,###",
    "F": "###,#..,##.,#..,#..",
    "G": ".##,#..,#.#,#.#,.##",
    "H": "#.#,#.#,###,#.#,#.#",
    "I": "###,.#.,.#.,.#.,###",
    "J": "..#,..#,..#,#.#,.#.",
    "K": "#.#,#.#,##.,#.#,#.#",
    "L": "#..,#..,#..,#..,###",
    "M": "#.#,###,###,#.#,#.#",
    "N": "##.,#.#,#.#,#.#,#.#",
    "O": ".#.,#.#,#.#,#.#,.#.",
    "P": "##.,#.#,##.,#..,#..",
    "Q": ".#.,#.#,#.#,##.,.##",
    "R": "##.,#.#,##.,#.#,#.#",
    "S": ".##,#..,.#.,..#,##.",
    "T": "###,.#.,.#.,.#.,.#.",
    "U": "#.#,#.#,#.#,#.#,###",
    "V": "#.#,#.#,#.#,#.#,.#.",
    "W": "#.#,#.#,###,###,#.#",
    "X": "#.#,#.#,.#.,#.#,#.#",
    "Y": "#.#,#.#,.#.,.#.,.#.",
    "Z": "###,..#,.#.,#..,###",
}
_SCALE = 2  # font pixels per glyph pixel
_ADVANCE = 4 * _SCALE  # glyph width plus one column of space


class _Canvas:
    """White RGB pixels with the few drawing operations the charts need."""

    def __init__(self, width: int, height: int) -> None:
        self.width, self.height = width, height
        self.pixels = [bytearray(b"\xff" * 3 * width) for _ in range(height)]

    def rect(self, x0: int, y0: int, x1: int, y1: int, color: tuple[int, int, int]) -> None:
        for y in range(max(y0, 0), min(y1, self.height)):
            for x in range(max(x0, 0), min(x1, self.width)):
                self.pixels[y][3 * x : 3 * x + 3] = bytes(color)

    def text(self, x: int, y: int, text: str, color: tuple[int, int, int] = (0, 0, 0)) -> None:
        for k, char in enumerate(text.upper()):
            rows = _GLYPHS.get(char, _GLYPHS[" "]).split(",")
            for gy, row in enumerate(rows):
                for gx, cell in enumerate(row):
                    if cell == "#":
                        left, top = x + k * _ADVANCE + gx * _SCALE, y + gy * _SCALE
                        self.rect(left, top, left + _SCALE, top + _SCALE, color)

    def png(self) -> bytes:
        return encode_png(self.pixels, self.width, self.height)


def render_bars(
    title: str,
    groups: list[tuple[str, list[float | None]]],
    series: list[tuple[str, tuple[int, int, int]]],
    reference: float = 1.0,
    width: int = 640,
) -> bytes:
    """A horizontal grouped bar chart as PNG bytes: one group of bars per label, one bar per series.

    ``groups`` is ``[(label, [value per series or None]), ...]``; each bar is annotated with its
    value, a dashed line marks ``reference`` (e.g. 1.0 = the frozen-model limit), and the legend
    names the series under the title.

    Example::

        png = render_bars("STEP TIME / LIMIT", [("LORA", [1.07, 1.21]), ("DORA", [1.14, 1.56])],
                          [("TIME", (31, 119, 180)), ("SAVED", (255, 127, 14))])
    """
    bar, gap, label_width = 12, 10, max(len(label) for label, _ in groups) * _ADVANCE + 12
    top = 16 + 14 * (len(series) + 1)
    height = top + len(groups) * (bar * len(series) + gap) + 10
    canvas = _Canvas(width, height)
    canvas.text(8, 6, title)
    for k, (name, color) in enumerate(series):
        canvas.rect(8, 20 + 14 * k, 18, 30 + 14 * k, color)
        canvas.text(24, 20 + 14 * k, name)
    values = [v for _, row in groups for v in row if v is not None]
    longest = max([*values, reference]) * 1.08
    left, right = label_width, width - 8 * _ADVANCE

    def x_of(value: float) -> int:
        return left + round((right - left) * value / longest)

    y = top
    for label, row in groups:
        canvas.text(8, y + (bar * len(series) - 10) // 2, label)
        for value, (_, color) in zip(row, series, strict=True):
            if value is not None:
                canvas.rect(left, y + 1, x_of(value), y + bar - 1, color)
                canvas.text(x_of(value) + 4, y + 1, f"{value:.2f}")
            y += bar
        y += gap
    for dash in range(top - 4, height - 6, 6):  # the reference line
        canvas.rect(x_of(reference), dash, x_of(reference) + 1, dash + 3, AXIS)
    canvas.rect(left, top - 4, left + 1, height - 6, AXIS)
    return canvas.png()
