"""The summary of a ``-m`` sweep: one table of every job, written when the sweep ends."""

from __future__ import annotations

import csv
import io
import json
import logging
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback as HydraCallback
from omegaconf import DictConfig

from lightning_peft.formats.files import write_text

log = logging.getLogger(__name__)

SWEEP_FAILURES: list[str] = []  # the jobs of the last -m sweep that failed (SweepSummary fills it)


class SweepSummary(HydraCallback):
    """Hydra callback: after a ``-m`` sweep, one table of every job: its overrides, status (ok or failed),
    final metrics, and for a failed job its error line. Failed jobs are also kept in ``SWEEP_FAILURES``
    (``lightning-peft fit`` exits with their number)."""

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        SWEEP_FAILURES.clear()
        rows = [_row(job) for job in _jobs(sweep_dir)]
        SWEEP_FAILURES.extend(row["job"] for row in rows if row["status"] == "failed")
        if not rows:
            log.warning("no job of the sweep in %s wrote metrics.json or failed.json", sweep_dir)
            return
        columns = list(dict.fromkeys(k for row in rows for k in row if k != "error"))
        if SWEEP_FAILURES:
            columns.append("error")
        table = io.StringIO()
        writer = csv.DictWriter(table, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
        write_text(sweep_dir / "summary.csv", table.getvalue())
        lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
        lines += [
            "| " + " | ".join(_cell(row.get(c)).replace("|", "\\|") for c in columns) + " |" for row in rows
        ]
        write_text(sweep_dir / "summary.md", "\n".join(lines) + "\n")
        print("\n".join(lines))
        print(f"sweep summary: {sweep_dir / 'summary.csv'}")
        if SWEEP_FAILURES:
            print(f"{len(SWEEP_FAILURES)} of {len(rows)} jobs failed: {', '.join(SWEEP_FAILURES)}")


def _jobs(sweep_dir: Path) -> list[Path]:
    """The sweep's job folders that finished (metrics.json) or failed (failed.json), in job order."""
    if not sweep_dir.is_dir():
        return []
    done = [p for p in sweep_dir.iterdir() if (p / "metrics.json").is_file() or (p / "failed.json").is_file()]
    return sorted(done, key=lambda p: _job_number(p.name))


def _row(job: Path) -> dict[str, Any]:
    if (job / "failed.json").is_file():
        record = json.loads((job / "failed.json").read_text())
        return {
            "job": job.name,
            "status": "failed",
            "overrides": " ".join(record["overrides"]),
            "error": record["error"],
        }
    record = json.loads((job / "metrics.json").read_text())
    return {"job": job.name, "status": "ok", "overrides": " ".join(record["overrides"]), **record["metrics"]}


def _job_number(name: str) -> int:
    return int(name) if name.isdigit() else 1 << 30


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return "" if value is None else str(value)
