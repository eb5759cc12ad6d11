"""``HeldOutEvaluation``: generate answers to held-out instruction records before and after training.

When training starts, the callback answers every record of a held-out JSON-lines file with the
adapters disabled (the base model the run starts from); when training ends, with the adapters on.
Both are scored with exact match and ROUGE-L (:mod:`lightning_peft.generation.scoring`). The figures
go into ``trainer.callback_metrics`` (so ``lightning-peft fit`` writes them to ``metrics.json``) as
``heldout/before/<metric>`` and ``heldout/after/<metric>``; every answer goes to a JSONL file in the
log folder, and a few are printed.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities.rank_zero import rank_zero_info
from typing_extensions import override

from lightning_peft.callbacks.module_path import missing_module_error, resolve_module
from lightning_peft.generation.generate import write_jsonl
from lightning_peft.generation.settings import GenerationSettings
from lightning_peft.generation.templates import PromptTemplate
from lightning_peft.strategies.base import disable_adapters
from lightning_peft.strategies.targeting import validation_error


class HeldOutEvaluation(Callback):
    """Exact match and ROUGE-L of greedy answers to held-out records, before and after training.

    Args:
        path: a JSON-lines file of records with the fields ``template`` needs (``output`` included).
        module: dotted path of the submodule that generates (a transformers causal LM).
        template: formats the records; None takes the data module's ``template``.
        tokenizer: a tokenizer object or local folder; None takes the data module's ``tokenizer``.
        max_new_tokens, batch_size: passed to :func:`~lightning_peft.generation.generate.generate`.
        samples_file: written in the trainer's log folder, one line per record and moment.
        num_samples: answers printed per moment.

    Example::

        HeldOutEvaluation("lightning_peft/data/trips_heldout.jsonl", module="model")
    """

    def __init__(
        self,
        path: str,
        module: str | None = "model",
        template: PromptTemplate | None = None,
        tokenizer: Any = None,
        max_new_tokens: int = 32,
        batch_size: int = 8,
        samples_file: str = "heldout_samples.jsonl",
        num_samples: int = 3,
    ) -> None:
        from lightning_peft.data.records import read_jsonl

        problems = []
        if not Path(path).is_file():
            problems.append(f"path={path!r} is not a file (a JSON-lines file of held-out records)")
        if template is not None and not isinstance(template, PromptTemplate):
            problems.append(f"template must be a PromptTemplate or None, got {type(template).__name__}")
        for name, value in (("max_new_tokens", max_new_tokens), ("batch_size", batch_size)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                problems.append(f"{name} must be a positive int, got {value!r}")
        validation_error("HeldOutEvaluation", problems)
        self.records = read_jsonl(path)
        if not self.records:
            raise ValueError(f"HeldOutEvaluation: {path} holds no records")
        self.module = module
        self.template = template
        self.tokenizer = tokenizer
        self.settings = GenerationSettings(max_new_tokens=max_new_tokens, batch_size=batch_size)
        self.samples_file = samples_file
        self.num_samples = num_samples
        self.results: dict[str, dict[str, float]] = {}

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.global_step == 0:  # a resumed run has no "before"
            with disable_adapters(self._target(pl_module)):
                self._evaluate(trainer, pl_module, "before")

    @override
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._evaluate(trainer, pl_module, "after")

    def _target(self, pl_module: pl.LightningModule) -> torch.nn.Module:
        target = resolve_module(pl_module, self.module)
        if target is None:
            raise missing_module_error("HeldOutEvaluation", self.module, pl_module)
        return target

    def _evaluate(self, trainer: pl.Trainer, pl_module: pl.LightningModule, moment: str) -> None:
        from lightning_peft.generation.scoring import evaluate_records

        tokenizer, template = self._tokenizer_and_template(trainer)
        metrics, samples = evaluate_records(
            self._target(pl_module), tokenizer, self.records, template, self.settings
        )
        self.results[moment] = metrics
        for name, value in metrics.items():
            trainer.callback_metrics[f"heldout/{moment}/{name}"] = torch.tensor(float(value))
        if trainer.is_global_zero:
            path = Path(trainer.log_dir or trainer.default_root_dir) / self.samples_file
            earlier = []
            if path.is_file():
                from lightning_peft.data.records import read_jsonl

                earlier = [s for s in read_jsonl(path) if s.get("moment") != moment]
            write_jsonl(earlier + [{"moment": moment, **s} for s in samples], path, overwrite=True)
        shown = "\n".join(f"  {s['prompt']!r} -> {s['generated']!r}" for s in samples[: self.num_samples])
        rank_zero_info(
            f"held-out {moment} training ({len(samples)} records): exact_match={metrics['exact_match']:.3f} "
            f"rougeL={metrics['rougeL']:.3f}\n{shown}"
        )

    def _tokenizer_and_template(self, trainer: pl.Trainer) -> tuple[Any, PromptTemplate]:
        data = getattr(trainer, "datamodule", None)
        if isinstance(self.tokenizer, str | Path):
            from transformers import AutoTokenizer

            self.tokenizer = AutoTokenizer.from_pretrained(str(self.tokenizer), local_files_only=True)
        tokenizer = self.tokenizer if self.tokenizer is not None else getattr(data, "tokenizer", None)
        template = self.template if self.template is not None else getattr(data, "template", None)
        if tokenizer is None or not isinstance(template, PromptTemplate):
            raise ValueError(
                "HeldOutEvaluation needs tokenizer= and template=, or a data module that has both "
                f"(InstructionData); the data module here is {type(data).__name__}"
            )
        return tokenizer, template
