"""LoRA+: B matrices in their own optimizer group at ratio x lr, from Python and the shipped configs."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from conftest import VOCAB, tiny_llama

from lightning_peft import PEFT, LoRA
from lightning_peft.models.tasks import CausalLM
from lightning_peft.strategies.loraplus import loraplus_param_groups

TINY = {
    "model_type": "llama",
    "vocab_size": VOCAB,
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
}


def test_b_matrices_get_ratio_times_the_learning_rate():
    model = LoRA(r=4, target_modules=["q_proj", "embed_tokens"], lora_bias=False).apply(tiny_llama())
    slow, fast = loraplus_param_groups(model, lr=1e-3, loraplus_lr_ratio=16)
    assert fast["lr"] == pytest.approx(16e-3) and slow["lr"] == pytest.approx(1e-3)
    b_side = {id(m.lora_B) for m in (layer.self_attn.q_proj for layer in model.model.layers)}
    b_side.add(id(model.model.embed_tokens.lora_embedding_B))
    assert {id(p) for p in fast["params"]} == b_side
    assert len(slow["params"]) == 3  # the A matrices
    assert len(loraplus_param_groups(model, lr=1e-3)) == 1


def test_a_bad_ratio_is_refused_naming_it():
    with pytest.raises(ValueError, match="loraplus_lr_ratio must be a positive number"):
        loraplus_param_groups(tiny_llama(), lr=1e-3, loraplus_lr_ratio=0)


def _data() -> torch.utils.data.DataLoader:
    ids = 3 + (torch.arange(12) + torch.arange(8)[:, None] * 5) % (VOCAB - 3)
    return torch.utils.data.DataLoader(ids, batch_size=4)


class _Recorded(CausalLM):
    def training_step(self, batch, batch_idx):
        loss = super().training_step(batch, batch_idx)
        self.losses = [*getattr(self, "losses", []), loss.item()]
        return loss


def _fit(root, epochs: int, ckpt=None) -> tuple[_Recorded, L.Trainer]:
    module = _Recorded(config=TINY, lr=5e-3, loraplus_lr_ratio=16)
    trainer = L.Trainer(
        default_root_dir=root,
        max_epochs=epochs,
        callbacks=[PEFT(LoRA(r=4), module="model", verbose=False)],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(module, _data(), ckpt_path=ckpt)
    return module, trainer


def test_the_task_module_trains_with_loraplus_and_the_loss_drops(tmp_path):
    module, trainer = _fit(tmp_path, epochs=6)
    groups = trainer.optimizers[0].param_groups
    assert [g["lr"] for g in groups] == pytest.approx([5e-3, 8e-2])
    assert all(
        n.endswith("lora_B") for n, p in module.named_parameters() if any(p is q for q in groups[1]["params"])
    )
    assert module.losses[-1] < module.losses[0] - 0.05, module.losses


def test_loraplus_training_resumes_exactly(tmp_path):
    straight, _ = _fit(tmp_path / "a", epochs=4)
    _, first = _fit(tmp_path / "b", epochs=2)
    first.save_checkpoint(tmp_path / "half.ckpt")
    resumed, trainer = _fit(tmp_path / "c", epochs=4, ckpt=tmp_path / "half.ckpt")
    assert [g["lr"] for g in trainer.optimizers[0].param_groups] == pytest.approx([5e-3, 8e-2])
    torch.testing.assert_close(
        torch.tensor(resumed.losses), torch.tensor(straight.losses[4:]), atol=1e-5, rtol=0
    )
