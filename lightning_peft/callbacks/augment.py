"""Token augmentation of training batches as a callback: validation, test and predict batches are untouched.

The batch dict is augmented in place in ``on_train_batch_start`` (the same dict then reaches
``training_step``). Batch ``n`` of the run on rank ``r`` draws from a generator seeded from
``(seed, n, r)``; ``n`` is saved in the checkpoint, so a resumed run augments its batches exactly as
an uninterrupted one would.
"""

from __future__ import annotations

from collections.abc import MutableMapping
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities.rank_zero import rank_zero_warn
from typing_extensions import override

from lightning_peft.data.augment import TokenAugmentation


class TextAugmentation(Callback):
    """Apply a :class:`~lightning_peft.data.augment.TokenAugmentation` to every training batch.

    Args:
        augmentation: what to do to a batch (probabilities, protected ids, seed).

    Example::

        augment = TokenAugmentation(delete=0.05, swap=0.05, mask=0.1, tokenizer=tok, seed=0)
        trainer = L.Trainer(callbacks=[TextAugmentation(augmentation=augment)])

    To augment in a DataModule's train ``collate_fn`` instead, call the ``TokenAugmentation`` on the
    collated batch there (and leave this callback out).
    """

    def __init__(self, augmentation: TokenAugmentation) -> None:
        if not isinstance(augmentation, TokenAugmentation):
            raise TypeError(
                f"TextAugmentation: augmentation must be a TokenAugmentation, got {type(augmentation).__name__}"
            )
        self.augmentation = augmentation
        self.batches_seen = 0

    @property
    @override
    def state_key(self) -> str:
        # what the callback does, not its seed or the ids the tokenizer fills in: a resume with
        # another seed still finds its position (and is warned that its batches differ)
        aug = self.augmentation
        return self._generate_state_key(delete=aug.delete, swap=aug.swap, mask=aug.mask)

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        # ids not given take the data module's tokenizer's (InstructionData, TextClassificationData):
        # the shipped config then fits whichever tokenizer the data uses
        tokenizer = getattr(trainer.datamodule, "tokenizer", None) if trainer.datamodule is not None else None
        if tokenizer is not None:
            self.augmentation.use_tokenizer(tokenizer)
        if stage == "fit":
            self.augmentation.check_ids()  # fail before the first step, not at it

    @override
    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if not isinstance(batch, MutableMapping):
            raise TypeError(
                "TextAugmentation edits the batch dict in place and needs a dict with input_ids and "
                f"attention_mask; the training batch is a {type(batch).__name__}"
            )
        generator = self.augmentation.generator(self.batches_seen, trainer.global_rank)
        batch.update(self.augmentation(batch, generator=generator))
        self.batches_seen += 1

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"batches_seen": self.batches_seen, "seed": self.augmentation.seed}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.batches_seen = int(state_dict["batches_seen"])
        if state_dict.get("seed", self.augmentation.seed) != self.augmentation.seed:
            rank_zero_warn(
                f"TextAugmentation: the checkpoint was augmented with seed={state_dict['seed']}, this run uses "
                f"seed={self.augmentation.seed}; the resumed batches differ from the original run's"
            )
