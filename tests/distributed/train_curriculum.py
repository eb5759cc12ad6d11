"""A curriculum that unfreezes a block mid-training, on 2 CPU processes under DDP; run as a script.

DDP registers only the parameters that require grad when it wraps the model; here the last block
joins at epoch 1 all the same. ``test_curriculum_ddp.py`` starts this
script with ``subprocess`` (Lightning's ``ddp`` re-launches ``sys.argv``, so it cannot run inside
pytest) and reads what each rank writes to ``--out``:

- ``record_rank<r>.pt``: the last block's and the head's weights after every step, and the block's
  weights before training;
- ``results.json`` (rank 0): the world size, the phase and the learning rate at every step.

Usage::

    python train_curriculum.py --out /tmp/run
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_peft import PEFT, Freeze
from lightning_peft.callbacks.curriculum import CurriculumSchedule

STEPS_PER_EPOCH = 4  # 32 samples, 2 ranks, batches of 4
PHASES = [{"start": 0, "lr": 0.05}, {"start": 1, "last_n_blocks": 1, "lr": 0.02}]


class Tower(L.LightningModule):
    """A user's module that knows nothing of curricula: a stack of blocks and a head."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.model = nn.ModuleDict(
            {
                "embed": nn.Linear(4, 16),
                "layers": nn.ModuleList([nn.Linear(16, 16) for _ in range(3)]),
                "head": nn.Linear(16, 2),
            }
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.tanh(self.model["embed"](x))  # (B, 16)
        for layer in self.model["layers"]:
            x = torch.tanh(layer(x))
        return self.model["head"](x)  # (B, 2)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.cross_entropy(self(x), y)

    def configure_optimizers(self):
        return torch.optim.AdamW([p for p in self.parameters() if p.requires_grad], lr=0.05, weight_decay=0.1)


class Record(Callback):
    def __init__(self, curriculum: CurriculumSchedule) -> None:
        self.curriculum = curriculum
        self.block: list[torch.Tensor] = []
        self.head: list[torch.Tensor] = []
        self.phases: list[int | None] = []
        self.lrs: list[float] = []

    def on_train_start(self, trainer, pl_module):
        self.initial_block = pl_module.model["layers"][2].weight.detach().clone()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.block.append(pl_module.model["layers"][2].weight.detach().clone())
        self.head.append(pl_module.model["head"].weight.detach().clone())
        self.phases.append(self.curriculum.phase)
        self.lrs.append(trainer.optimizers[0].param_groups[0]["lr"])


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", required=True)
    parser.add_argument("--max-epochs", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(1)
    out = Path(args.out)

    curriculum = CurriculumSchedule(PHASES, unit="epoch", module="model")
    record = Record(curriculum)
    trainer = L.Trainer(
        strategy="ddp",  # find_unused_parameters=False: every registered parameter must get a gradient
        accelerator="cpu",
        devices=2,
        max_epochs=args.max_epochs,
        callbacks=[
            PEFT(Freeze(trainable_modules=["head"]), module="model", verbose=False),
            curriculum,
            record,
        ],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2 * 4 * STEPS_PER_EPOCH, 4, generator=g)
    y = (x[:, 0] * x[:, 1] > 0).long()
    trainer.fit(Tower(), DataLoader(TensorDataset(x, y), batch_size=4, shuffle=False))

    rank = trainer.global_rank
    torch.save(
        {
            "initial_block": record.initial_block,
            "block": torch.stack(record.block),
            "head": torch.stack(record.head),
        },
        out / f"record_rank{rank}.pt",
    )
    if rank == 0:
        results = {"world_size": trainer.world_size, "phases": record.phases, "lrs": record.lrs}
        (out / "results.json").write_text(json.dumps(results, indent=2))
    trainer.strategy.barrier()


if __name__ == "__main__":
    main()
