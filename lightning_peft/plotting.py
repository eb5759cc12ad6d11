"""Training curves as a PNG, without matplotlib.

``write_curves(metrics_csv, png)`` reads Lightning's CSV log and draws one polyline per
series (``train_loss``, ``val_loss`` and the main metric when present) on a white canvas
with grey axes. Each series is scaled to its own range. The legend is a column of coloured
boxes at the top left, in the order of ``SERIES``: blue train_loss, orange val_loss,
green val_acc / val_ppl.
"""

from __future__ import annotations

import csv
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
    """PNG bytes plotting each series against its own index, stretched to the full width."""
    pixels = [bytearray(b"\xff" * 3 * width) for _ in range(height)]

    def put(x: int, y: int, color: tuple[int, int, int]) -> None:
        if 0 <= x < width and 0 <= y < height:
            pixels[y][3 * x : 3 * x + 3] = bytes(color)

    def line(x0: int, y0: int, x1: int, y1: int, color: tuple[int, int, int]) -> None:
        steps = max(abs(x1 - x0), abs(y1 - y0), 1)
        for i in range(steps + 1):
            put(round(x0 + (x1 - x0) * i / steps), round(y0 + (y1 - y0) * i / steps), color)

    left, right, top, bottom = 30, width - 10, 10, height - 30
    line(left, bottom, right, bottom, AXIS)
    line(left, top, left, bottom, AXIS)
    for k, (name, values) in enumerate((n, series[n]) for n in SERIES if series.get(n)):
        color = COLORS[name]
        for dy in range(8):  # legend box
            line(left + 8, top + 4 + 12 * k + dy, left + 16, top + 4 + 12 * k + dy, color)
        lo, hi = min(values), max(values)
        span = (hi - lo) or 1.0
        points = [
            (
                left + round((right - left) * i / max(len(values) - 1, 1)),
                bottom - round((bottom - top) * (v - lo) / span),
            )
            for i, v in enumerate(values)
        ]
        for (x0, y0), (x1, y1) in zip(points, points[1:] or points, strict=False):
            line(x0, y0, x1, y1, color)
    return encode_png(pixels, width, height)


def write_curves(metrics_csv: Path, png: Path) -> Path:
    """Render the curves in Lightning's ``metrics_csv`` to ``png``; returns ``png``.

    Example::

        write_curves(run / "logs/version_0/metrics.csv", run / "curves.png")
    """
    Path(png).write_bytes(render(read_series(metrics_csv)))
    return Path(png)
