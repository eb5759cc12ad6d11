"""The callback contract, for every method: a short fit lowers the loss, frozen tensors stay
bit-identical, checkpoints hold only trainable tensors, and a resume reproduces the uninterrupted run."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest
import torch
from conftest import VOCAB, tiny_llama
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from torch.utils.data import DataLoader

from lightning_peft import (
    IA3,
    PEFT,
    BottleneckAdapter,
    Compose,
    Freeze,
    LoRA,
    PrefixTuning,
    PromptTuning,
    QLoRA,
)

# name -> (strategy factory, learning rate): soft prompts need the large rates of their papers
METHODS = {
    # the head of a random tiny model must learn too: "all-linear" would leave it frozen
    "lora": (lambda: LoRA(r=4, lora_alpha=8, target_modules=r".*_proj|lm_head"), 2e-2),
    "lora-dropout": (
        lambda: LoRA(r=4, lora_alpha=8, lora_dropout=0.1, target_modules=["q_proj", "v_proj", "lm_head"]),
        2e-2,
    ),
    "dora": (lambda: LoRA(r=4, lora_alpha=8, use_dora=True, target_modules=r".*_proj|lm_head"), 2e-2),
    "qlora-nf4": (
        lambda: QLoRA(r=4, lora_alpha=8, target_modules=r".*_proj|lm_head", compute_dtype="float32"),
        2e-2,
    ),
    "freeze": (lambda: Freeze(last_n_blocks=1, trainable_modules=["lm_head"]), 2e-2),
    "ia3": (lambda: Compose([IA3(), Freeze(trainable_modules=["lm_head"])]), 2e-2),
    "adapter": (
        lambda: Compose(
            [
                BottleneckAdapter(reduction_factor=4, non_linearity="silu"),
                Freeze(trainable_modules=["lm_head"]),
            ]
        ),
        2e-2,
    ),
    "prompt-tuning": (lambda: PromptTuning(num_virtual_tokens=4), 0.3),
    "prefix-tuning": (lambda: PrefixTuning(num_virtual_tokens=4), 0.3),
    "prefix-tuning-mlp": (
        lambda: PrefixTuning(num_virtual_tokens=4, prefix_projection=True, encoder_hidden_size=16),
        2e-2,
    ),
}


class CausalLM(L.LightningModule):
    """A user's causal-LM module with no knowledge of PEFT."""

    def __init__(self, lr: float = 2e-2) -> None:
        super().__init__()
        self.lr = lr
        self.model = tiny_llama().train()
        self.losses: list[float] = []

    def training_step(self, batch, batch_idx):
        loss = self.model(input_ids=batch, labels=batch).loss
        self.losses.append(loss.item())
        return loss

    def configure_optimizers(self):
        return torch.optim.AdamW([p for p in self.parameters() if p.requires_grad], lr=self.lr)


def sequences() -> DataLoader:
    # repeating 6-token cycles from random starts: learnable, deterministic, no shuffling
    g = torch.Generator().manual_seed(0)
    starts = torch.randint(3, VOCAB - 6, (32, 1), generator=g)
    data = starts + torch.arange(12).remainder(6)
    return DataLoader(data, batch_size=4)


class FrozenSnapshot(Callback):
    """At the start of training (after the strategy ran) and at its end: copies every frozen tensor,
    and measures the loss on all the data in eval mode."""

    @staticmethod
    def tensors(pl_module) -> dict:
        # not pl_module.state_dict(): during a run with PEFT it holds only what checkpoints store
        return {**dict(pl_module.named_parameters()), **dict(pl_module.named_buffers())}

    def on_train_start(self, trainer, pl_module):
        trainable = {n for n, p in pl_module.named_parameters() if p.requires_grad}
        self.before = {
            k: v.detach().clone() for k, v in self.tensors(pl_module).items() if k not in trainable
        }
        self.loss_before = self.eval_loss(pl_module)

    def on_train_end(self, trainer, pl_module):
        after = self.tensors(pl_module)
        self.changed = [k for k, v in self.before.items() if not torch.equal(v, after[k])]
        self.loss_after = self.eval_loss(pl_module)

    @staticmethod
    @torch.no_grad()
    def eval_loss(pl_module) -> float:
        pl_module.eval()
        with torch.random.fork_rng():  # iterating a DataLoader draws a seed: keep the run's RNG stream intact
            losses = [pl_module.model(input_ids=b, labels=b).loss for b in sequences()]
        pl_module.train()
        return float(torch.stack(losses).mean())


def fit(root: Path, method: str, epochs: int, ckpt_path: Path | None = None, *callbacks) -> CausalLM:
    torch.manual_seed(123)  # dropout masks and adapter init repeat between runs
    factory, lr = METHODS[method]
    module = CausalLM(lr)
    trainer = L.Trainer(
        max_epochs=epochs,
        callbacks=[PEFT(factory(), module="model"), *callbacks],
        logger=False,
        enable_checkpointing=any(isinstance(c, ModelCheckpoint) for c in callbacks),
        enable_progress_bar=False,
        enable_model_summary=False,
        accelerator="cpu",
        default_root_dir=root,
    )
    trainer.fit(module, sequences(), ckpt_path=ckpt_path)
    return module


@pytest.fixture(scope="module", params=sorted(METHODS))
def runs(request, tmp_path_factory):
    """One uninterrupted 2-epoch run and one run of 1 epoch + resume + 1 epoch, per method."""
    method = request.param
    root = tmp_path_factory.mktemp(method)
    snapshot = FrozenSnapshot()
    straight = fit(root / "straight", method, 2, None, snapshot)
    checkpoint = ModelCheckpoint(dirpath=root / "ckpt", save_top_k=-1)
    fit(root / "first", method, 1, None, checkpoint)
    resumed = fit(root / "resumed", method, 2, Path(checkpoint.best_model_path))
    return method, straight, resumed, snapshot, Path(checkpoint.best_model_path)


def test_short_fit_lowers_the_loss(runs):
    method, _, _, snapshot, _ = runs
    before, after = snapshot.loss_before, snapshot.loss_after
    print(f"{method}: eval loss {before:.4f} -> {after:.4f}")
    # deterministic eval-mode loss on fixed data; soft prompts on a random frozen model move it least
    assert after < before - 0.01, f"{method}: eval loss {before:.4f} -> {after:.4f}"


def test_frozen_tensors_are_bit_identical_after_training(runs):
    method, _, _, snapshot, _ = runs
    assert snapshot.before, method
    assert snapshot.changed == [], f"{method} changed frozen tensors: {snapshot.changed[:5]}"


def test_checkpoint_holds_exactly_the_trainable_tensors(runs):
    method, straight, _, _, path = runs
    saved = torch.load(path, weights_only=True)
    trainable = {n for n, p in straight.named_parameters() if p.requires_grad}
    assert set(saved["state_dict"]) == trainable
    assert set(saved["lightning_peft"]["trainable"]) == trainable
    assert saved["lightning_peft"]["strategy"] == METHODS[method][0]().to_config()


def test_resume_reproduces_the_uninterrupted_run(runs):
    method, straight, resumed, _, _ = runs
    torch.testing.assert_close(
        torch.tensor(resumed.losses), torch.tensor(straight.losses[8:]), atol=1e-6, rtol=0, msg=method
    )
