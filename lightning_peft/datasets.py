"""Small data modules for the ``lightning-peft fit`` entry point: a shipped CSV and generated sequences.

Nothing is downloaded: the intent set ships inside the package (``lightning_peft/data/``) and the
sequence task is generated from a seed.
"""

from __future__ import annotations

import csv
from pathlib import Path

import lightning as L
import torch
from torch.utils.data import DataLoader

SHIPPED_CSV = Path(__file__).resolve().parent / "data" / "support_intents.csv"


class TextClassificationData(L.LightningDataModule):
    """Rows of ``text``, ``label``, ``split`` (train / validation) from a CSV, tokenized per batch.

    Args:
        path: the CSV; None is the shipped 240-request support-intent set (4 classes).
        tokenizer: a local tokenizer folder; None is the shipped MiniLM's.
        labels: class names in index order; None takes them sorted from the file.
    """

    def __init__(
        self,
        path: str | None = None,
        tokenizer: str | None = None,
        labels: list[str] | None = None,
        batch_size: int = 16,
        max_length: int = 64,
    ) -> None:
        super().__init__()
        self.path = Path(path) if path else SHIPPED_CSV
        if not self.path.is_file():
            raise ValueError(f"TextClassificationData: no CSV file at {self.path}")
        self.tokenizer_path = tokenizer
        self.labels = list(labels) if labels else None
        self.batch_size = batch_size
        self.max_length = max_length

    def setup(self, stage: str) -> None:
        from transformers import AutoTokenizer

        from lightning_peft.tasks import default_pretrained

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
        return DataLoader(
            self.splits["train"], batch_size=self.batch_size, shuffle=True, collate_fn=self._collate
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
        if problems:
            raise ValueError("SequenceData is misconfigured:\n  - " + "\n  - ".join(problems))
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
        return DataLoader(self.train, batch_size=self.hparams.batch_size, shuffle=True)

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
        from lightning_peft.mixing import MultiTaskLoader

        loaders = {
            t: DataLoader(d, batch_size=self.hparams.batch_size, shuffle=True) for t, d in self.train.items()
        }
        return MultiTaskLoader(
            loaders, sampling=self.sampling, temperature=self.temperature, seed=self.hparams.seed
        )

    def val_dataloader(self) -> dict[str, DataLoader]:
        return {t: DataLoader(d, batch_size=self.hparams.batch_size) for t, d in self.val.items()}
