"""The README's chart: step time and saved activations of each method over the frozen-model limit.

Reads the JSON that ``step_time.py --json`` writes and draws grouped bars with matplotlib (the
``plots`` extra: ``pip install "lightning-peft[plots]"``), a dashed line at the limit (1.0)::

    python benchmarks/chart.py benchmarks/results/step_time_cpu_h2048.json benchmarks/results/ratios_cpu_h2048.png
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import TYPE_CHECKING

from lightning_peft.cli.curves import bars_figure, png_bytes
from lightning_peft.formats.files import write_bytes

if TYPE_CHECKING:
    from matplotlib.figure import Figure

SERIES = ["step time / limit (median)", "saved activations / limit"]


def figure(results: dict) -> Figure:
    """The chart of one ``step_time.py --json`` record as a matplotlib ``Figure`` (the limit's own row,
    1.0 by definition, is the dashed line)."""
    settings = results["settings"]
    title = (
        f"Llama hidden {settings['hidden']}, {settings['batch']} x {settings['seq']} tokens, "
        f"{settings['device']}, median of {settings['rounds']} rounds"
    )
    groups = [
        (row["method"], [row["x_limit"], row["saved_vs_limit"]])
        for row in results["rows"]
        if row["method"] != "limit"
    ]
    return bars_figure(title, groups, SERIES, reference=1.0, xlabel="ratio to the frozen-model limit (1.0)")


def chart(results: dict) -> bytes:
    """PNG bytes of :func:`figure`."""
    return png_bytes(figure(results))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("results", help="JSON written by step_time.py --json")
    parser.add_argument("png", help="where to write the chart")
    args = parser.parse_args(argv)
    write_bytes(args.png, chart(json.loads(Path(args.results).read_text())))
    print(f"wrote {args.png}")


if __name__ == "__main__":
    main()
