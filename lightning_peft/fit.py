"""``lightning-peft fit``: one Hydra entry point for single runs and ``-m`` sweeps.

Everything comes from ``conf/`` (shipped as ``lightning_peft/conf``): ``model``, ``data``, ``peft``,
``trainer``, ``callbacks``, ``schedule``, ``experiment``, ``hparams_search``. Each run writes, under
Hydra's run folder: ``checkpoints/`` (adapter-only), ``adapter/`` (the exported adapter),
``metrics.json`` (final metrics) and Lightning's CSV logs. A sweep also writes ``summary.csv`` and
``summary.md`` in the sweep folder, one row per job. Every file is written beside its final name and
renamed when complete (checkpoints through :class:`~lightning_peft.checkpoint.AtomicCheckpointIO`).

    lightning-peft fit ckpt_path=outputs/<date>/<time>/checkpoints/<name>.ckpt   # resume a run where it stopped

A run whose training loss becomes NaN or infinite stops with an error and exports nothing
(``stop_on_non_finite_loss=false`` lets it go on).

    lightning-peft fit                                  # LoRA on the shipped MiniLM and intent set
    lightning-peft fit peft=ia3 trainer.max_epochs=1
    lightning-peft fit -m peft=lora,ia3 ++peft.r=4,8    # a sweep; `++` because IA3 has no `r`

In a sweep across methods, a ``peft`` key that the chosen method does not take (``r`` for IA3) is
dropped with a warning, so the grid runs; write it with ``++`` so that Hydra accepts it for every method.
"""

from __future__ import annotations

import csv
import io
import logging
import os
from pathlib import Path
from typing import Any

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.experimental.callback import Callback as HydraCallback
from omegaconf import DictConfig, OmegaConf

log = logging.getLogger(__name__)


def build_callbacks(cfg: DictConfig) -> list[Any]:
    """The ``PEFT`` callback first, then every entry of ``callbacks`` and ``schedule`` that is set."""
    from hydra.utils import instantiate

    from lightning_peft import PEFT

    strategy = instantiate(_known_fields(cfg.peft), _convert_="all")
    callbacks = [
        PEFT(
            strategy,
            module=cfg.get("peft_module"),
            stop_on_non_finite_loss=cfg.get("stop_on_non_finite_loss", True),
        )
    ]
    for group in ("callbacks", "schedule"):
        node = cfg.get(group) or {}
        # a group holds one callback (a node with _target_) or several keyed by name
        entries = {group: node} if "_target_" in node else dict(node)
        for name, entry in entries.items():
            if entry is not None and "_target_" in entry:
                callbacks.append(instantiate(entry, _convert_="all"))
            elif entry is not None:
                raise ValueError(f"{group}.{name} has no _target_; every entry must name a class")
    return callbacks


def _known_fields(node: DictConfig) -> DictConfig:
    """``node`` without the keys its ``_target_`` dataclass does not take (warned about)."""
    import dataclasses

    from hydra.utils import get_class

    target = get_class(node._target_)
    if not dataclasses.is_dataclass(target):
        return node
    fields = {f.name for f in dataclasses.fields(target) if f.init}
    extra = [k for k in node if k != "_target_" and k not in fields]
    if not extra:
        return node
    log.warning("%s takes no %s; ignored for this job", target.__name__, ", ".join(extra))
    return OmegaConf.create({k: v for k, v in OmegaConf.to_container(node).items() if k not in extra})


def run(cfg: DictConfig) -> dict[str, float]:
    """Fit once with ``cfg``; returns the final metrics (also written to ``metrics.json``)."""
    import lightning as L
    from hydra.utils import instantiate
    from lightning.pytorch.loggers import CSVLogger
    from lightning.pytorch.plugins.io import CheckpointIO

    from lightning_peft.checkpoint import AtomicCheckpointIO
    from lightning_peft.formats.files import json_text, write_text

    out = (
        Path(HydraConfig.get().runtime.output_dir)
        if HydraConfig.initialized()
        else Path(cfg.get("output_dir", "."))
    )
    L.seed_everything(cfg.seed, workers=True)
    # built before the Trainer: a bad value (negative r, unknown key) fails here, before any training
    callbacks = build_callbacks(cfg)
    datamodule = instantiate(cfg.data, _convert_="all")
    module = instantiate(cfg.model, _convert_="all")
    # checkpoints are written beside their final name, never moved in from $TMPDIR (see AtomicCheckpointIO)
    plugins = list(instantiate(cfg.trainer.get("plugins") or [], _convert_="all"))
    if not any(isinstance(p, CheckpointIO) for p in plugins):
        plugins.append(AtomicCheckpointIO())
    trainer = instantiate(
        cfg.trainer,
        callbacks=callbacks,
        logger=CSVLogger(out, name="logs"),
        default_root_dir=out,
        plugins=plugins,
        _convert_="all",
    )
    trainer.fit(module, datamodule=datamodule, ckpt_path=cfg.get("ckpt_path"))

    metrics: dict[str, Any] = {k: float(v) for k, v in trainer.callback_metrics.items()}
    metrics["global_step"] = trainer.global_step
    final = out / "checkpoints" / "last-adapter.ckpt"
    # a full (not weights-only) save: after fit only the PEFT callback's on_save_checkpoint can cut
    # the file to the adapters, and Lightning skips callback hooks for weights-only saves; the extra
    # optimizer state is adapter-sized
    trainer.save_checkpoint(final, weights_only=False)
    if trainer.is_global_zero:
        from lightning_peft import export_adapter

        # a data module that tokenizes (InstructionData) hands its tokenizer on: generate reads it there
        tokenizer = getattr(datamodule, "tokenizer", None)
        if not callable(getattr(tokenizer, "save_pretrained", None)):
            tokenizer = None
        written = export_adapter(final, out / "adapter", overwrite=True, tokenizer=tokenizer)
        record = {
            "metrics": metrics,
            "checkpoint": str(final),
            "adapter": str(written.path),
            "adapter_format": written.format,
            "overrides": _overrides(),
        }
        if cfg.get("export_merged"):
            record["merged"] = _export_merged(module, out / "merged", tokenizer)
        metrics_file = out / "metrics.json"
        write_text(metrics_file, json_text(record, indent=2) + "\n")  # NaN -> null: valid JSON
        log.info("metrics: %s", ", ".join(f"{k}={v:.4g}" for k, v in sorted(metrics.items())))
        log.info("wrote %s, %s and %s", final, out / "adapter", metrics_file)
        # training curves next to metrics.json, drawn from Lightning's CSV log
        csv_log = Path(trainer.logger.log_dir) / "metrics.csv"
        if csv_log.is_file():
            from lightning_peft.plotting import write_curves

            log.info("wrote %s", write_curves(csv_log, out / "curves.png"))
    return metrics


def _export_merged(module: Any, out: Path, tokenizer: Any) -> str | None:
    """The trained model with its adapters merged, for ``lightning-peft generate --model``; a method
    that cannot merge (prompt tuning, bottleneck adapters) is reported, not fatal: the adapter is saved."""
    from lightning_peft import export_merged

    try:
        result = export_merged(module, out, tokenizer=tokenizer, overwrite=True)
    except ValueError as err:
        log.warning("no merged export: %s", err)
        return None
    log.info("wrote merged model to %s", result.path)
    return str(result.path)


def _overrides() -> list[str]:
    return list(HydraConfig.get().overrides.task) if HydraConfig.initialized() else []


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg: DictConfig) -> float | None:
    """Hydra's entry point. Returns ``cfg.optimized_metric`` for sweepers (Optuna) that minimise it."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    metrics = run(cfg)
    key = cfg.get("optimized_metric")
    return metrics.get(key) if key else None


class SweepSummary(HydraCallback):
    """Hydra callback: after a ``-m`` sweep, one table of every job's overrides and final metrics."""

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        import json

        from lightning_peft.formats.files import write_text

        sweep_dir = Path(config.hydra.sweep.dir)
        rows = []
        for metrics_file in sorted(
            sweep_dir.glob("*/metrics.json"), key=lambda p: _job_number(p.parent.name)
        ):
            record = json.loads(metrics_file.read_text())
            rows.append(
                {
                    "job": metrics_file.parent.name,
                    "overrides": " ".join(record["overrides"]),
                    **record["metrics"],
                }
            )
        if not rows:
            log.warning("no job of the sweep in %s wrote metrics.json", sweep_dir)
            return
        columns = list(dict.fromkeys(k for row in rows for k in row))
        table = io.StringIO()
        writer = csv.DictWriter(table, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
        write_text(sweep_dir / "summary.csv", table.getvalue())
        lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
        lines += ["| " + " | ".join(_cell(row.get(c)) for c in columns) + " |" for row in rows]
        write_text(sweep_dir / "summary.md", "\n".join(lines) + "\n")
        print("\n".join(lines))
        print(f"sweep summary: {sweep_dir / 'summary.csv'}")


def _job_number(name: str) -> int:
    return int(name) if name.isdigit() else 1 << 30


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return "" if value is None else str(value)


def config_yaml(cfg: DictConfig) -> str:
    """The resolved config as YAML (for logs and tests)."""
    return OmegaConf.to_yaml(cfg, resolve=True)


if __name__ == "__main__":
    main()
