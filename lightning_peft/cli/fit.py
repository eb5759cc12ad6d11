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
    lightning-peft fit -m peft=lora,dora peft.r=4,8     # a sweep: 4 jobs, then summary.csv

A ``peft`` key that the chosen method does not take (``r`` for IA3) is an error before training: the
run would train something else than asked. A sweep runs every job even when some fail; its summary
says which failed and why.
"""

from __future__ import annotations

import logging
import os
import warnings
from pathlib import Path
from typing import Any

import hydra
import lightning as L
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from lightning_peft.cli.compose import FinalCheckpoint, build_callbacks, instantiate, trainer_strategy
from lightning_peft.formats.files import json_text, write_text

log = logging.getLogger(__name__)


def run(cfg: DictConfig) -> dict[str, float]:
    """Fit once with ``cfg``; returns the final metrics (also written to ``metrics.json``).

    The adapter is exported from the best checkpoint when a ``ModelCheckpoint`` monitors a metric,
    otherwise from ``checkpoints/last-adapter.ckpt``; only rank 0 exports, after every rank is done."""
    out = (
        Path(HydraConfig.get().runtime.output_dir)
        if HydraConfig.initialized()
        else Path(cfg.get("output_dir", "."))
    )
    final = out / "checkpoints" / "last-adapter.ckpt"
    trainer, module, datamodule, log_dir = _fit(cfg, out, final)
    metrics: dict[str, Any] = {k: float(v) for k, v in trainer.callback_metrics.items()}
    if not trainer.is_global_zero:
        return metrics
    import torch

    # read from the file: under ddp_spawn this process's Trainer did not train, so it keeps no step count
    metrics["global_step"] = int(torch.load(final, weights_only=True, map_location="cpu")["global_step"])
    record = _export(cfg, trainer, module, datamodule, out, final)
    record["metrics"] = metrics
    metrics_file = out / "metrics.json"
    write_text(metrics_file, json_text(record, indent=2) + "\n")  # NaN -> null: valid JSON
    log.info("metrics: %s", ", ".join(f"{k}={v:.4g}" for k, v in sorted(metrics.items())))
    log.info("wrote %s, %s (from %s) and %s", final, out / "adapter", record["adapter_from"], metrics_file)
    # training curves next to metrics.json, drawn from Lightning's CSV log (when matplotlib is installed)
    csv_log = log_dir / "metrics.csv"
    if csv_log.is_file():
        from lightning_peft.cli.curves import write_curves_or_skip

        write_curves_or_skip(csv_log, out / "curves.png")
    return metrics


def _fit(cfg: DictConfig, out: Path, final: Path) -> tuple[L.Trainer, Any, Any, Path]:
    """Build everything from ``cfg`` and train; ``final`` holds the adapter-only checkpoint afterwards."""
    from lightning.pytorch.loggers import CSVLogger
    from lightning.pytorch.plugins.io import CheckpointIO

    from lightning_peft.callbacks.checkpoint import AtomicCheckpointIO

    L.seed_everything(cfg.seed, workers=True)
    # built before the Trainer: a bad value (negative r, unknown key) fails here, before any training
    callbacks = [*build_callbacks(cfg), FinalCheckpoint(final)]
    datamodule = instantiate(cfg.data, _convert_="all")
    module = instantiate(cfg.model, _convert_="all")
    strategy = trainer_strategy(cfg)
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
        **({"strategy": strategy} if strategy else {}),
    )
    # read now, which fixes the version: processes that ddp_spawn starts get this logger and log there
    log_dir = Path(trainer.logger.log_dir)
    with warnings.catch_warnings():
        # lightning <= 2.6.6 calls a torch pytree API that torch 2.13 deprecates, on every batch
        warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)")
        trainer.fit(module, datamodule=datamodule, ckpt_path=cfg.get("ckpt_path"))
    if not final.is_file() and trainer.strategy.launcher is None:
        # resuming a run that had already finished trains nothing and Lightning calls no on_train_end
        trainer.save_checkpoint(final, weights_only=False)
    return trainer, module, datamodule, log_dir


def _export(
    cfg: DictConfig, trainer: L.Trainer, module: Any, datamodule: Any, out: Path, final: Path
) -> dict:
    """Export the adapter (and the merged model if asked) from the best or the last checkpoint; returns
    the record for ``metrics.json``."""
    from lightning_peft.formats import export_adapter

    best = _best_checkpoint(trainer)
    source = best or final
    # a data module that tokenizes (InstructionData) hands its tokenizer on: generate reads it there
    tokenizer = getattr(datamodule, "tokenizer", None)
    if not callable(getattr(tokenizer, "save_pretrained", None)):
        tokenizer = None
    # a whole adapted LightningModule: PEFT paths are relative to the Hugging Face model inside it, and a
    # head trained beside that model sends the export to the lightning_peft layout, which the note says
    root = None if cfg.get("peft_module") else cfg.get("model_attribute")
    written = export_adapter(
        source,
        out / "adapter",
        overwrite=True,
        tokenizer=tokenizer,
        task_type=_task_type(module, cfg),
        root=root,
    )
    record = {
        "checkpoint": str(final),
        "best_checkpoint": str(best) if best else None,
        "adapter": str(written.path),
        "adapter_from": str(source),
        "adapter_format": written.format,
        "adapter_note": written.note,
        "overrides": _overrides(),
    }
    if written.note:
        log.info("adapter: %s", written.note)
    if cfg.get("export_merged"):
        record["merged"] = _export_merged(module, source, out / "merged", tokenizer)
    return record


def _task_type(module: Any, cfg: DictConfig) -> str | None:
    """peft's task type of the Hugging Face model PEFT adapts (prompt and prefix tuning need it in
    adapter_config.json; a checkpoint does not record the model's class)."""
    from transformers import PreTrainedModel

    from lightning_peft.formats.peft_layout import task_type_of

    path = cfg.get("peft_module")
    adapted = module.get_submodule(path) if path else module
    model = next((m for m in adapted.modules() if isinstance(m, PreTrainedModel)), None)
    return task_type_of(type(model).__name__) if model is not None else None


def _best_checkpoint(trainer: L.Trainer) -> Path | None:
    """The checkpoint a monitoring ``ModelCheckpoint`` kept as best, if there is one."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    for callback in trainer.checkpoint_callbacks:
        if isinstance(callback, ModelCheckpoint) and callback.monitor and callback.best_model_path:
            path = Path(callback.best_model_path)
            if path.is_file():
                return path
    return None


def _export_merged(module: Any, checkpoint: Path, out: Path, tokenizer: Any) -> str | None:
    """The trained model with its adapters merged, for ``lightning-peft generate --model``; a method
    that cannot merge (prompt tuning, bottleneck adapters) is reported, not fatal: the adapter is saved.
    The module is built afresh and the exported checkpoint loaded into it, so the merged model is the
    one the adapter holds (under ddp_spawn this process's module never trained)."""
    from lightning_peft.callbacks.checkpoint import load_from_checkpoint
    from lightning_peft.formats import export_merged

    try:
        trained = load_from_checkpoint(type(module), checkpoint)
        result = export_merged(trained, out, tokenizer=tokenizer, overwrite=True)
    except ValueError as err:
        log.warning("no merged export: %s", err)
        return None
    log.info("wrote merged model to %s", result.path)
    if result.note:
        log.info("merged: %s", result.note)
    return str(result.path)


def _overrides() -> list[str]:
    return list(HydraConfig.get().overrides.task) if HydraConfig.initialized() else []


@hydra.main(version_base="1.3", config_path="pkg://lightning_peft.conf", config_name="config")
def main(cfg: DictConfig) -> float | None:
    """Hydra's entry point. Returns ``cfg.optimized_metric`` for sweepers (Optuna) that minimise it.

    In a ``-m`` sweep a job that fails writes ``failed.json`` (its error line) and returns, so the other
    jobs run and the summary lists it; a single run raises as usual."""
    from hydra.types import RunMode

    _print_each_log_line_once()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    key = cfg.get("optimized_metric")
    if not HydraConfig.initialized() or HydraConfig.get().mode != RunMode.MULTIRUN:
        metrics = run(cfg)
        return metrics.get(key) if key else None
    try:
        metrics = run(cfg)
    except Exception as err:
        log.exception("job %s failed", HydraConfig.get().job.num)
        out = Path(HydraConfig.get().runtime.output_dir)
        error = " ".join(str(err).split()) or type(err).__name__
        record = {"error": f"{type(err).__name__}: {error}", "overrides": _overrides()}
        write_text(out / "failed.json", json_text(record, indent=2) + "\n")
        return float("nan") if key else None  # Optuna records a NaN trial as failed and goes on
    return metrics.get(key) if key else None


def _print_each_log_line_once() -> None:
    """Leave Lightning's log lines to the handlers Hydra set up (the console and the run's log file).

    ``import lightning`` gives the ``lightning`` logger a console handler of its own, and its records also
    propagate to the root logger that Hydra configures: without this every line would print twice.
    """
    for name in ("lightning", "lightning.pytorch", "lightning.fabric"):
        logger = logging.getLogger(name)
        for handler in list(logger.handlers):
            if type(handler) is logging.StreamHandler:  # Lightning's own console handler, not a file
                logger.removeHandler(handler)
        logger.propagate = True


if __name__ == "__main__":
    main()
