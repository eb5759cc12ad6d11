"""A run stopped mid-epoch and resumed from its checkpoint trains on the same batches, with the same
losses, as one that was never interrupted; `lightning-peft fit ckpt_path=...` resumes a run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import lightning as L
import pytest
from helpers import TINY
from lightning.pytorch.callbacks import Callback, ModelCheckpoint

from lightning_peft import PEFT, LoRA
from lightning_peft.data.datamodules import MultiTaskSequenceData, SequenceData
from lightning_peft.models.tasks import CausalLM


@pytest.fixture(autouse=True)
def _quiet() -> None:
    warnings.simplefilter("ignore")


class Losses(Callback):
    def __init__(self) -> None:
        self.by_step: dict[int, float] = {}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.by_step[trainer.global_step] = float(outputs["loss"])


def _train(data: L.LightningDataModule, root: Path, ckpt_path: Path | None = None, **trainer) -> Losses:
    losses = Losses()
    callbacks = [PEFT(LoRA(r=2, target_modules=["q_proj", "v_proj"]), module="model", verbose=False), losses]
    callbacks.append(ModelCheckpoint(dirpath=root, every_n_train_steps=1, save_top_k=-1, filename="{step}"))
    L.Trainer(
        max_epochs=2,
        callbacks=callbacks,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        default_root_dir=root,
        **trainer,
    ).fit(CausalLM(config=TINY, lr=0.05), datamodule=data, ckpt_path=ckpt_path)
    return losses


@pytest.mark.parametrize(
    "make_data",
    [
        lambda: SequenceData(vocab_size=32, length=8, train_size=48, val_size=8, batch_size=8),
        lambda: MultiTaskSequenceData(vocab_size=32, length=8, train_size=24, val_size=8, batch_size=8),
    ],
    ids=["sequences", "multitask"],
)
def test_a_run_resumed_mid_epoch_has_the_losses_of_an_uninterrupted_one(make_data, tmp_path):
    whole = _train(make_data(), tmp_path / "whole")  # 6 batches an epoch, 12 steps
    assert len(whole.by_step) == 12
    resumed = _train(make_data(), tmp_path / "resumed", ckpt_path=tmp_path / "whole" / "step=8.ckpt")
    assert sorted(resumed.by_step) == list(range(9, 13))  # epoch 1, from its third batch on
    for step, loss in resumed.by_step.items():
        assert loss == pytest.approx(whole.by_step[step], abs=1e-6), (step, resumed.by_step, whole.by_step)


FIT = [sys.executable, "-m", "lightning_peft.cli.main", "fit"]
QUICK = [
    "model=tiny_llama",
    "trainer.max_epochs=2",
    "trainer.enable_progress_bar=false",
    "trainer.limit_val_batches=0",
    "callbacks=none",
    "data.train_size=48",
    "data.batch_size=8",
    "+callbacks.every_step._target_=lightning.pytorch.callbacks.ModelCheckpoint",
    "+callbacks.every_step.every_n_train_steps=1",
    "+callbacks.every_step.save_top_k=-1",
    "+callbacks.every_step.filename='{step}'",
]


def _fit(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.run([*FIT, *args], cwd=cwd, capture_output=True, text=True, timeout=300, env=env)


def _train_losses(run: Path) -> dict[int, float]:
    rows = (run / "logs" / "version_0" / "metrics.csv").read_text().splitlines()
    header = rows[0].split(",")
    losses = {}
    for row in rows[1:]:
        cells = dict(zip(header, row.split(","), strict=True))
        if cells.get("train_loss"):
            losses[int(cells["step"])] = float(cells["train_loss"])
    return losses


def test_fit_resumes_a_run_from_ckpt_path(tmp_path):
    whole = _fit(*QUICK, "trainer.log_every_n_steps=1", f"hydra.run.dir={tmp_path / 'whole'}", cwd=tmp_path)
    assert whole.returncode == 0, whole.stderr[-3000:]
    (checkpoint,) = (tmp_path / "whole").rglob("step=8.ckpt")  # in Lightning's log folder
    resumed = _fit(
        *QUICK,
        "trainer.log_every_n_steps=1",
        f"ckpt_path='{checkpoint}'",  # quoted: Hydra reads '=' as syntax
        f"hydra.run.dir={tmp_path / 'resumed'}",
        cwd=tmp_path,
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    before, after = _train_losses(tmp_path / "whole"), _train_losses(tmp_path / "resumed")
    assert sorted(after) == list(range(8, 12))  # Lightning logs the step before it counts it
    for step, loss in after.items():
        assert loss == pytest.approx(before[step], abs=1e-5), (step, after, before)
    record = json.loads((tmp_path / "resumed" / "metrics.json").read_text())
    assert record["metrics"]["global_step"] == 12
