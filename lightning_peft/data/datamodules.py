"""Small data modules for the ``lightning-peft fit`` entry point: a shipped CSV and generated sequences.

Nothing is downloaded: the intent set ships inside the package (``lightning_peft/data/``) and the
sequence task is generated from a seed. Training loaders are :class:`~lightning_peft.data.loaders.ResumableDataLoader`
with a seeded order, so a run resumed from a mid-epoch checkpoint sees the same batches as one that was
never interrupted.
"""

from __future__ import annotations

import csv
import importlib.util
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch.utils.data import DataLoader

from lightning_peft.data.augment import TokenAugmentation
from lightning_peft.data.loaders import ResumableDataLoader, SeededSampler
from lightning_peft.data.records import (
    DATA_EXTRA,
    data_files_problems,
    dataset_splits,
    load_data_files,
    read_jsonl,
    rows_as_records,
    toy_instructions,
)
from lightning_peft.generation.templates import ALPACA, InstructionCollator, PromptTemplate
from lightning_peft.strategies.targeting import validation_error

SHIPPED_CSV = Path(__file__).resolve().parent / "support_intents.csv"


class TextClassificationData(L.LightningDataModule):
    """Rows of ``text``, ``label``, ``split`` (train / validation) from a CSV, tokenized per batch.

    Args:
        path: the CSV; None is the shipped 240-request support-intent set (4 classes).
        tokenizer: a local tokenizer folder; None is the shipped MiniLM's.
        labels: class names in index order; None takes them sorted from the file.
        seed: decides the order of the training examples in each epoch.
    """

    def __init__(
        self,
        path: str | None = None,
        tokenizer: str | None = None,
        labels: list[str] | None = None,
        batch_size: int = 16,
        max_length: int = 64,
        seed: int = 0,
    ) -> None:
        super().__init__()
        self.path = Path(path) if path else SHIPPED_CSV
        if not self.path.is_file():
            raise ValueError(f"TextClassificationData: no CSV file at {self.path}")
        self.tokenizer_path = tokenizer
        self.labels = list(labels) if labels else None
        self.batch_size = batch_size
        self.max_length = max_length
        self.seed = seed

    def setup(self, stage: str) -> None:
        from transformers import AutoTokenizer

        from lightning_peft.models.tasks import default_pretrained

        with self.path.open(newline="") as f:
            rows = list(csv.DictReader(f))
        missing = {"text", "label", "split"} - set(rows[0] if rows else {})
        if missing:
            raise ValueError(f"{self.path} lacks the columns {sorted(missing)}; it needs text, label, split")
        self.labels = self.labels or sorted({r["label"] for r in rows})
        unknown = sorted({r["label"] for r in rows} - set(self.labels))
        if unknown:
            raise ValueError(f"labels {unknown} in {self.path} are not in labels={self.labels}")
        self.splits = {
            split: [(r["text"], self.labels.index(r["label"])) for r in rows if r["split"] == split]
            for split in ("train", "validation")
        }
        self.tokenizer = AutoTokenizer.from_pretrained(
            self.tokenizer_path or default_pretrained(), local_files_only=True
        )

    def _collate(self, examples: list[tuple[str, int]]) -> dict[str, torch.Tensor]:
        texts, labels = zip(*examples, strict=True)
        batch = self.tokenizer(
            list(texts), padding=True, truncation=True, max_length=self.max_length, return_tensors="pt"
        )
        return {
            "input_ids": batch["input_ids"],
            "attention_mask": batch["attention_mask"],
            "labels": torch.tensor(labels),
        }

    def train_dataloader(self) -> DataLoader:
        train = self.splits["train"]
        return ResumableDataLoader(
            train,
            batch_size=self.batch_size,
            sampler=SeededSampler(len(train), self.seed),
            collate_fn=self._collate,
        )

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.splits["validation"], batch_size=64, collate_fn=self._collate)


class SequenceData(L.LightningDataModule):
    """Generated counting sequences (each token is the previous one plus one, wrapping around the
    vocabulary) from random starts: a causal LM learns the rule in a few dozen steps.

    Args:
        vocab_size: token ids are drawn from ``[3, vocab_size)`` (0-2 are left to special tokens).
        length: tokens per sequence.
    """

    def __init__(
        self,
        vocab_size: int = 128,
        length: int = 16,
        train_size: int = 256,
        val_size: int = 64,
        batch_size: int = 16,
        seed: int = 0,
    ) -> None:
        super().__init__()
        sizes = {"length": length, "train_size": train_size, "val_size": val_size, "batch_size": batch_size}
        problems = [f"{k} must be positive, got {v}" for k, v in sizes.items() if v <= 0]
        if vocab_size <= 4:
            problems.append(f"vocab_size must be above 4, got {vocab_size}")
        validation_error("SequenceData", problems)
        self.save_hyperparameters()

    def _make(self, n: int, seed: int, step: int = 1) -> torch.Tensor:
        h = self.hparams
        g = torch.Generator().manual_seed(seed)
        starts = torch.randint(0, h.vocab_size - 3, (n, 1), generator=g)  # (n, 1)
        return 3 + (starts + step * torch.arange(h.length)) % (h.vocab_size - 3)  # (n, length)

    def setup(self, stage: str) -> None:
        self.train = self._make(self.hparams.train_size, self.hparams.seed)
        self.val = self._make(self.hparams.val_size, self.hparams.seed + 1)

    def train_dataloader(self) -> DataLoader:
        return ResumableDataLoader(
            self.train,
            batch_size=self.hparams.batch_size,
            sampler=SeededSampler(len(self.train), self.hparams.seed),
        )

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.val, batch_size=self.hparams.batch_size)


class MultiTaskSequenceData(SequenceData):
    """Two tasks that conflict on the same inputs: counting up (task ``up``) and down (task ``down``).

    The train loader is a :class:`~lightning_peft.MultiTaskLoader` (for ``MultiTaskSchedule``); the
    validation loaders are a dict keyed by task, so each is validated with its own adapter.
    """

    TASKS = {"up": 1, "down": -1}

    def __init__(self, *args, sampling: str = "round_robin", temperature: float = 1.0, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.sampling = sampling
        self.temperature = temperature

    def setup(self, stage: str) -> None:
        h = self.hparams
        self.train = {t: self._make(h.train_size, h.seed, step) for t, step in self.TASKS.items()}
        self.val = {t: self._make(h.val_size, h.seed + 1, step) for t, step in self.TASKS.items()}

    def train_dataloader(self):
        from lightning_peft.data.mixing import MultiTaskLoader

        loaders = {
            t: ResumableDataLoader(
                d, batch_size=self.hparams.batch_size, sampler=SeededSampler(len(d), self.hparams.seed + k)
            )
            for k, (t, d) in enumerate(self.train.items())
        }
        return MultiTaskLoader(
            loaders, sampling=self.sampling, temperature=self.temperature, seed=self.hparams.seed
        )

    def val_dataloader(self) -> dict[str, DataLoader]:
        return {t: DataLoader(d, batch_size=self.hparams.batch_size) for t, d in self.val.items()}


class InstructionData(L.LightningDataModule):
    """Instruction records formatted by a :class:`~lightning_peft.generation.templates.PromptTemplate` for a causal LM.

    Batches come from an :class:`~lightning_peft.generation.templates.InstructionCollator`: the loss covers the
    response only. An ``augmentation`` edits the prompts of training batches (never the response, never
    a validation batch); its step counter is saved in checkpoints, so a resumed run continues it.

    Records come from one of: ``path``, ``dataset``, ``data_files``, or (none given) ``size`` generated
    toy records.

    Args:
        path: a JSON-lines file of records (``lightning_peft/data/instructions.jsonl`` is a small example);
            None generates ``size`` toy records (uppercase, reverse or repeat a short word) from ``seed``,
            which a tiny character-level Llama learns in under a minute on a CPU (:func:`toy_instructions`).
        dataset: a Hugging Face ``datasets.Dataset``, or a ``DatasetDict`` (its ``train`` split; its
            ``validation`` split, if any, replaces ``val_fraction``). Needs the ``data`` extra.
        data_files: local ``.jsonl``/``.json``, ``.csv`` or ``.parquet`` files (one kind), read through
            ``datasets`` (the ``data`` extra).
        columns: the column holding each template field when the names differ, e.g.
            ``{"instruction": "question", "output": "answer"}``.
        template: formats a record; None is :data:`~lightning_peft.generation.templates.ALPACA`.
        tokenizer: a local tokenizer folder; None is :func:`~lightning_peft.data.tokenizer.char_tokenizer`.
        chat_template: a Jinja chat template to set on the tokenizer (for ``template.chat``).
        max_length: the longest row in tokens (the prompt is cut from its left to fit).
        val_fraction: the share of records held out for validation, chosen by ``seed``.
        augmentation: applied to each collated training batch.

    Example::

        data = InstructionData(size=512, batch_size=16)
        module = CausalLM(config={"model_type": "llama", "vocab_size": len(data.tokenizer), ...})
        L.Trainer(max_epochs=3).fit(module, datamodule=data)
    """

    def __init__(
        self,
        path: str | None = None,
        template: PromptTemplate | None = None,
        tokenizer: str | None = None,
        chat_template: str | None = None,
        max_length: int = 256,
        batch_size: int = 16,
        size: int = 512,
        val_fraction: float = 0.1,
        seed: int = 0,
        augmentation: TokenAugmentation | None = None,
        dataset: Any = None,
        data_files: str | Sequence[str] | None = None,
        columns: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__()
        data_files = [data_files] if isinstance(data_files, str | Path) else data_files
        data_files = [str(f) for f in data_files] if data_files is not None else None
        problems = self._source_problems(path, dataset, data_files, columns)
        if template is not None and not isinstance(template, PromptTemplate):
            problems.append(f"template must be a PromptTemplate, got {type(template).__name__}")
        if augmentation is not None and not isinstance(augmentation, TokenAugmentation):
            problems.append(
                f"augmentation must be a TokenAugmentation or None, got {type(augmentation).__name__}"
            )
        for name, value in (("batch_size", batch_size), ("size", size)):
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                problems.append(f"{name} must be a positive int, got {value!r}")
        if not isinstance(val_fraction, int | float) or not 0.0 < val_fraction < 1.0:
            problems.append(f"val_fraction must be in (0, 1), got {val_fraction!r}")
        validation_error("InstructionData", problems)
        self.path = Path(path) if path is not None else None
        self.dataset = dataset
        self.data_files = data_files
        self.columns = {str(k): str(v) for k, v in (columns or {}).items()}
        self.template = template if template is not None else ALPACA
        self.tokenizer = self._load_tokenizer(tokenizer, chat_template)
        self.collator = InstructionCollator(self.tokenizer, self.template, max_length=max_length)
        self.batch_size = batch_size
        self.size = size
        self.val_fraction = float(val_fraction)
        self.seed = seed
        self.augmentation = augmentation
        if augmentation is not None:  # ids it was not given come from this data's tokenizer
            augmentation.use_tokenizer(self.tokenizer)
            augmentation.check_ids()

    @staticmethod
    def _load_tokenizer(path: str | None, chat_template: str | None):
        if path is None:
            from lightning_peft.data.tokenizer import char_tokenizer

            return char_tokenizer(chat_template=chat_template)
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        if chat_template is not None:
            tokenizer.chat_template = chat_template
        return tokenizer

    @staticmethod
    def _source_problems(
        path: str | None, dataset: Any, data_files: list[str] | None, columns: Mapping[str, str] | None
    ) -> list[str]:
        sources = {"path": path, "dataset": dataset, "data_files": data_files}
        given = [name for name, value in sources.items() if value is not None]
        problems = [f"give one source of records, not {' and '.join(given)}"] if len(given) > 1 else []
        if path is not None and not Path(path).is_file():
            problems.append(f"no JSON-lines file at {path}")
        if data_files is not None:
            problems += data_files_problems(data_files)
        if (dataset is not None or data_files is not None) and importlib.util.find_spec("datasets") is None:
            problems.append(
                f"dataset= and data_files= read through the datasets library, not installed: {DATA_EXTRA}"
            )
        if columns is not None and not (
            isinstance(columns, Mapping) and all(isinstance(v, str) for v in columns.values())
        ):
            problems.append(f"columns must map template fields to column names, got {columns!r}")
        return problems

    def _records(self) -> tuple[list[dict], list[dict] | None, str]:
        """(records, validation records if the source splits them, what the source is called)."""
        if self.dataset is None and self.data_files is None:
            if self.path is not None:
                return read_jsonl(self.path), None, str(self.path)
            return toy_instructions(self.size, self.seed), None, "the toy tasks"
        if self.dataset is not None:
            train, val = dataset_splits(self.dataset)
            source = "the dataset"
        else:
            train, val, source = load_data_files(self.data_files), None, ", ".join(self.data_files)
        needed = self.template.required_fields()
        records = rows_as_records(train, self.columns, needed, source)
        if val is not None:
            val = rows_as_records(val, self.columns, needed, f"{source}'s validation split")
        return records, val, source

    def setup(self, stage: str) -> None:
        records, val, source = self._records()
        if len(records) < (1 if val else 2):
            raise ValueError(f"InstructionData: {source} has {len(records)} records; it needs 2 or more")
        for record in records + (val or []):
            self.template.render(record, self.tokenizer)  # a missing field fails here, not mid-epoch
        order = torch.randperm(len(records), generator=torch.Generator().manual_seed(self.seed)).tolist()
        if val:
            self.val, self.train = val, [records[i] for i in order]
            return
        n_val = min(max(1, round(self.val_fraction * len(records))), len(records) - 1)
        self.val = [records[i] for i in order[:n_val]]
        self.train = [records[i] for i in order[n_val:]]

    def _train_collate(self, records: list[dict]) -> dict[str, torch.Tensor]:
        batch = self.collator(records)
        return batch if self.augmentation is None else self.augmentation(batch)

    def train_dataloader(self) -> DataLoader:
        return ResumableDataLoader(
            self.train,
            batch_size=self.batch_size,
            sampler=SeededSampler(len(self.train), self.seed),
            collate_fn=self._train_collate,
        )

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.val, batch_size=self.batch_size, collate_fn=self.collator)

    def state_dict(self) -> dict:
        return {"augmentation": self.augmentation.state_dict()} if self.augmentation is not None else {}

    def load_state_dict(self, state_dict: dict) -> None:
        if self.augmentation is not None and "augmentation" in state_dict:
            self.augmentation.load_state_dict(state_dict["augmentation"])
