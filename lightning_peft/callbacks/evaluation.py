"""``Evaluation``: torchmetrics on every validation epoch, for the adapted model and optionally its base.

Classification (``accuracy``, ``f1``) and language-model (``perplexity``) metrics come from one extra
forward per validation batch: ``module(**inputs)`` where ``inputs`` is the batch without ``labels``
(``module`` is a dotted path, None for the LightningModule's own forward) and the output is the logits
or has ``.logits``. Generation metrics (ROUGE-L, BLEU) come from greedy completions of fixed prompts at
the end of the epoch, made by :func:`lightning_peft.generation.generate.generate` (batched, left-padded
prompts with an attention mask, any transformers causal LM); a few samples are written to a JSONL file
and printed. ``compare_base=True`` repeats every metric with the adapters disabled and logs it as
``base/<metric>``.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities.rank_zero import rank_zero_info
from torch import nn
from typing_extensions import override

from lightning_peft.callbacks.module_path import missing_module_error, resolve_module
from lightning_peft.generation.settings import GenerationSettings
from lightning_peft.strategies.base import disable_adapters
from lightning_peft.strategies.targeting import validation_error

Metric = Literal["accuracy", "f1", "perplexity"]
METRICS = ("accuracy", "f1", "perplexity")


class Evaluation(Callback):
    """Validation metrics chosen in config, with the base model (adapters off) alongside if asked.

    Args:
        metrics: any of ``"accuracy"``, ``"f1"`` (macro, needs ``num_classes``), ``"perplexity"``
            (causal LM: logits at t predict the label at t + 1; -100 is ignored).
        num_classes: classes for accuracy/F1.
        module: dotted path of the submodule whose forward gives logits (None: the LightningModule).
        compare_base: also evaluate with every adapter disabled, logged as ``base/<metric>``.
        prompts, references: generation task: greedy continuations of ``prompts`` scored against
            ``references`` with ROUGE-L (F-measure) and BLEU; needs ``tokenizer`` (an object or a local
            folder) and a ``module`` with ``generate`` (a transformers causal LM).
        max_new_tokens: generation length.
        stop_strings: a continuation ends before the first of these (``["\\n"]`` for one-line answers).
        batch_size: prompts generated together (left-padded; greedy text does not depend on it).
        samples_file: JSONL of prompt / generated / reference, written in the trainer's log folder.
        num_samples: how many samples are printed.

    Example::

        Evaluation(metrics=["accuracy", "f1"], num_classes=4, compare_base=True)
    """

    def __init__(
        self,
        metrics: Sequence[Metric] = ("accuracy",),
        num_classes: int | None = None,
        module: str | None = None,
        compare_base: bool = False,
        prompts: Sequence[str] | None = None,
        references: Sequence[str] | None = None,
        tokenizer: Any = None,
        max_new_tokens: int = 16,
        stop_strings: Sequence[str] = (),
        batch_size: int = 8,
        samples_file: str = "samples.jsonl",
        num_samples: int = 3,
    ) -> None:
        self.metrics = list(metrics)
        problems = [
            f"unknown metric {m!r}; choose from {', '.join(METRICS)}"
            for m in self.metrics
            if m not in METRICS
        ]
        if {"accuracy", "f1"} & set(self.metrics) and not (isinstance(num_classes, int) and num_classes > 1):
            problems.append(f"accuracy and f1 need num_classes > 1, got {num_classes!r}")
        if (prompts is None) != (references is None) or (
            prompts is not None and len(prompts) != len(references)
        ):
            problems.append("prompts and references must both be given, with one reference per prompt")
        if prompts is not None and tokenizer is None:
            problems.append("generation metrics need a tokenizer (an object or a local folder)")
        try:
            self.settings = GenerationSettings(
                max_new_tokens=max_new_tokens,
                stop_strings=stop_strings if isinstance(stop_strings, str) else list(stop_strings),
                batch_size=batch_size,
            )
        except ValueError as err:
            problems.append(str(err).removeprefix("invalid generation settings: "))
        validation_error("Evaluation", problems)
        self.num_classes = num_classes
        self.module = module
        self.compare_base = compare_base
        self.prompts = list(prompts) if prompts is not None else None
        self.references = list(references) if references is not None else None
        self.tokenizer = tokenizer
        self.max_new_tokens = max_new_tokens
        self.samples_file = samples_file
        self.num_samples = num_samples
        self.samples: list[dict[str, str]] = []

    def _build(self) -> dict[str, Any]:
        import torchmetrics

        built: dict[str, Any] = {}
        if "accuracy" in self.metrics:
            built["accuracy"] = torchmetrics.Accuracy(task="multiclass", num_classes=self.num_classes)
        if "f1" in self.metrics:
            built["f1"] = torchmetrics.F1Score(
                task="multiclass", num_classes=self.num_classes, average="macro"
            )
        if "perplexity" in self.metrics:
            built["perplexity"] = torchmetrics.text.Perplexity(ignore_index=-100)
        return built

    @override
    def on_validation_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._states = {"": self._build(), "base/": self._build() if self.compare_base else {}}

    def _target(self, pl_module: pl.LightningModule) -> nn.Module:
        target = resolve_module(pl_module, self.module)
        if target is None:
            raise missing_module_error("Evaluation", self.module, pl_module)
        return target

    @torch.no_grad()
    def _update(self, target: nn.Module, batch: dict[str, torch.Tensor], metrics: dict[str, Any]) -> None:
        inputs = {k: v for k, v in batch.items() if k != "labels"}
        out = target(**inputs)
        logits = getattr(out, "logits", out)
        labels = batch["labels"] if "labels" in batch else batch["input_ids"]
        for name, metric in metrics.items():
            metric.to(logits.device)
            if name == "perplexity":
                metric.update(logits[:, :-1].float(), labels[:, 1:])  # (B, T-1, V) predicts (B, T-1)
            else:
                metric.update(logits.argmax(-1), labels)

    @override
    def on_validation_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        if not isinstance(batch, dict) or not self._states[""]:
            return
        target = self._target(pl_module)
        self._update(target, batch, self._states[""])
        if self.compare_base:
            with disable_adapters(target):
                self._update(target, batch, self._states["base/"])

    @override
    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        for prefix, metrics in self._states.items():
            for name, metric in metrics.items():
                if metric.update_count:
                    pl_module.log(f"{prefix}{name}", metric.compute(), sync_dist=True)
        if self.prompts is not None and not trainer.sanity_checking:  # one samples row per epoch
            target = self._target(pl_module)
            self._generate(trainer, pl_module, target, "")
            if self.compare_base:
                with disable_adapters(target):
                    self._generate(trainer, pl_module, target, "base/")

    def _generate(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, target: nn.Module, prefix: str
    ) -> None:
        from torchmetrics.text import BLEUScore, ROUGEScore

        from lightning_peft.generation.generate import generate  # transformers loads only when used

        tokenizer = self._tokenizer()
        if not callable(getattr(target, "generate", None)):
            raise ValueError(
                f"Evaluation: generation metrics need module={self.module!r} to be a causal LM with "
                f"generate(), and {type(target).__name__} has none"
            )
        records = generate(target, tokenizer, self.prompts, self.settings)
        generated = [record["completion"].strip() for record in records]
        rouge = ROUGEScore(rouge_keys=("rougeL",))(generated, self.references)["rougeL_fmeasure"]
        bleu = BLEUScore()(generated, [[r] for r in self.references])
        pl_module.log(f"{prefix}rougeL", rouge)
        pl_module.log(f"{prefix}bleu", bleu)
        samples = [
            {"prompt": p, "generated": g, "reference": r}
            for p, g, r in zip(self.prompts, generated, self.references, strict=True)
        ]
        if not prefix:  # the adapted model's; the base model's go to their own file only
            self.samples = samples
        folder = Path(trainer.log_dir or trainer.default_root_dir)
        folder.mkdir(parents=True, exist_ok=True)
        if trainer.is_global_zero:
            name = self.samples_file if not prefix else f"base_{self.samples_file}"
            from lightning_peft.formats.files import write_text

            # appended by rewriting the whole file beside it and renaming: a crash never leaves half a line
            path = folder / name
            before = path.read_text(encoding="utf-8") if path.is_file() else ""
            lines = "".join(json.dumps({"epoch": trainer.current_epoch, **s}) + "\n" for s in samples)
            write_text(path, before + lines)
        shown = "\n".join(f"  {s['prompt']!r} -> {s['generated']!r}" for s in samples[: self.num_samples])
        rank_zero_info(
            f"Evaluation ({prefix or 'adapted'}): rougeL={float(rouge):.3f} bleu={float(bleu):.3f}\n{shown}"
        )

    def _tokenizer(self) -> Any:
        if isinstance(self.tokenizer, str | Path):
            from transformers import AutoTokenizer

            self.tokenizer = AutoTokenizer.from_pretrained(self.tokenizer, local_files_only=True)
        return self.tokenizer
