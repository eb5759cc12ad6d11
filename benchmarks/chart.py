"""The README's chart: step time and saved activations of each method over the frozen-model limit.

Reads the JSON that ``step_time.py --json`` writes and draws a PNG with ``lightning_peft.cli.curves``
(no matplotlib)::

    python benchmarks/chart.py benchmarks/results/step_time_cpu_h2048.json benchmarks/results/ratios_cpu_h2048.png
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from lightning_peft.cli.curves import render_bars

SERIES = [("step time / limit", (31, 119, 180)), ("saved activations / limit", (255, 127, 14))]


def chart(results: dict) -> bytes:
    settings = results["settings"]
    title = (
        f"llama hidden {settings['hidden']} - {settings['batch']}x{settings['seq']} tokens - "
        f"{settings['device']} - median of {settings['rounds']}"
    )
    groups = [
        (row["method"].replace("-", " "), [row["x_limit"], row["saved_vs_limit"]])
        for row in results["rows"]
        if row["method"] != "limit"
    ]
    return render_bars(title, groups, SERIES, reference=1.0)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("results", help="JSON written by step_time.py --json")
    parser.add_argument("png", help="where to write the chart")
    args = parser.parse_args(argv)
    Path(args.png).write_bytes(chart(json.loads(Path(args.results).read_text())))
    print(f"wrote {args.png}")


if __name__ == "__main__":
    main()
