"""Evaluation: metrics equal hand computations, base comparison, generation scores and samples."""

from __future__ import annotations

import json

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from conftest import VOCAB, tiny_char_llama, tiny_llama
from torch import nn
from torch.utils.data import DataLoader
from torchmetrics.text import ROUGEScore

from lightning_peft import PEFT, LoRA
from lightning_peft.callbacks.evaluation import Evaluation
from lightning_peft.data.tokenizer import char_tokenizer


class Features(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.model = nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)

    def validation_step(self, batch, batch_idx):
        self.log("val_loss", F.cross_entropy(self(batch["x"]), batch["labels"]))


def feature_batches() -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    return [
        {"x": torch.randn(8, 6, generator=g), "labels": torch.randint(0, 3, (8,), generator=g)}
        for _ in range(3)
    ]


def validate(module, callbacks, data) -> dict[str, float]:
    trainer = L.Trainer(
        callbacks=callbacks, logger=False, enable_progress_bar=False, enable_model_summary=False
    )
    (metrics,) = trainer.validate(module, DataLoader(data, batch_size=None), verbose=False)
    return metrics


def hand_accuracy_and_f1(model: nn.Module, batches) -> tuple[float, float]:
    with torch.no_grad():
        preds = torch.cat([model(b["x"]).argmax(-1) for b in batches])
    labels = torch.cat([b["labels"] for b in batches])
    f1s = []
    for c in range(3):
        tp = ((preds == c) & (labels == c)).sum().item()
        fp = ((preds == c) & (labels != c)).sum().item()
        fn = ((preds != c) & (labels == c)).sum().item()
        f1s.append(2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 0.0)
    return (preds == labels).float().mean().item(), sum(f1s) / 3


def test_accuracy_and_f1_equal_a_hand_computation():
    module, batches = Features(), feature_batches()
    metrics = validate(module, [Evaluation(metrics=["accuracy", "f1"], num_classes=3)], batches)
    accuracy, f1 = hand_accuracy_and_f1(module.model, batches)
    assert metrics["accuracy"] == pytest.approx(accuracy, abs=1e-6)
    assert metrics["f1"] == pytest.approx(f1, abs=1e-6)


def test_compare_base_logs_the_metrics_of_the_unadapted_model():
    module, batches = Features(), feature_batches()
    base_accuracy, _ = hand_accuracy_and_f1(module.model, batches)
    callbacks = [
        PEFT(LoRA(r=2, target_modules=["model"], init_lora_weights=False)),
        Evaluation(metrics=["accuracy"], num_classes=3, compare_base=True),
    ]
    metrics = validate(module, callbacks, batches)
    adapted_accuracy, _ = hand_accuracy_and_f1(module, batches)
    assert metrics["base/accuracy"] == pytest.approx(base_accuracy, abs=1e-6)
    assert metrics["accuracy"] == pytest.approx(adapted_accuracy, abs=1e-6)


class LM(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.model = tiny_llama()

    def validation_step(self, batch, batch_idx):
        self.log("val_loss", self.model(**batch, labels=batch["input_ids"]).loss)


def test_perplexity_is_exp_of_the_mean_next_token_nll():
    module = LM()
    g = torch.Generator().manual_seed(2)
    batches = [{"input_ids": torch.randint(3, VOCAB, (2, 9), generator=g)} for _ in range(2)]
    metrics = validate(module, [Evaluation(metrics=["perplexity"], module="model")], batches)
    with torch.no_grad():
        nll = [
            F.cross_entropy(
                module.model(**b).logits[:, :-1].reshape(-1, VOCAB),
                b["input_ids"][:, 1:].reshape(-1),
                reduction="sum",
            )
            for b in batches
        ]
    tokens = sum(b["input_ids"][:, 1:].numel() for b in batches)
    assert metrics["perplexity"] == pytest.approx(torch.exp(sum(nll) / tokens).item(), rel=1e-4)


class Echo(nn.Module):
    """A stand-in generator: answers every prompt with fixed text, whatever its padding."""

    def __init__(self, answer: str) -> None:
        super().__init__()
        self.answer = char_tokenizer()(answer, add_special_tokens=False)["input_ids"]
        self.weight = nn.Parameter(torch.zeros(1))

    def generate(self, input_ids, attention_mask, **kwargs):
        answer = torch.tensor([self.answer]).expand(input_ids.shape[0], -1)  # (B, answer)
        return torch.cat([input_ids, answer], dim=1)


class Holder(L.LightningModule):
    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def validation_step(self, batch, batch_idx):
        self.log("val_loss", torch.tensor(0.0))


def generation_evaluation(prompts, references, **kwargs) -> Evaluation:
    return Evaluation(
        metrics=[], module="model", prompts=prompts, references=references, tokenizer=char_tokenizer(),
        samples_file="samples.jsonl", **kwargs,
    )  # fmt: skip


def validate_generation(evaluation: Evaluation, model: nn.Module, folder) -> tuple[dict, list[dict]]:
    trainer = L.Trainer(
        callbacks=[evaluation], logger=False, enable_progress_bar=False, default_root_dir=folder
    )
    (metrics,) = trainer.validate(
        Holder(model), DataLoader([{"x": torch.zeros(1)}], batch_size=None), verbose=False
    )
    samples = [json.loads(line) for line in (folder / "samples.jsonl").read_text().splitlines()]
    return metrics, samples


@pytest.mark.parametrize(("answer", "perfect"), [("on the mat the cat", True), ("dog dog dog dog", False)])
def test_generation_scores_rouge_and_bleu_and_writes_samples(tmp_path, answer, perfect):
    evaluation = generation_evaluation(["the cat sat", "the dog sat"], ["on the mat the cat"] * 2)
    metrics, samples = validate_generation(evaluation, Echo(answer), tmp_path)
    if perfect:
        assert metrics["rougeL"] == pytest.approx(1.0) and metrics["bleu"] == pytest.approx(1.0)
    else:
        assert metrics["rougeL"] < 1.0 and metrics["bleu"] < 1.0
    assert [s["generated"] for s in samples] == [answer] * 2


def greedy_alone(model: nn.Module, prompt: str, max_new_tokens: int) -> str:
    """What one unpadded prompt continues to: transformers' greedy generate on it alone."""
    ids = torch.tensor([char_tokenizer()(prompt)["input_ids"]])
    out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                         do_sample=False, pad_token_id=0, eos_token_id=2)  # fmt: skip
    return char_tokenizer().decode(out[0, ids.shape[1] :], skip_special_tokens=True).strip()


def test_a_causal_lm_generates_batched_padded_prompts_as_it_does_each_alone(tmp_path):
    model = tiny_char_llama(seed=5)
    prompts = ["a", "a much longer prompt than the others", "mid prompt"]
    references = ["x y z", "a b c", "q r s"]
    evaluation = generation_evaluation(prompts, references, max_new_tokens=10, batch_size=3)
    metrics, samples = validate_generation(evaluation, model, tmp_path)
    alone = [greedy_alone(model, prompt, 10) for prompt in prompts]
    assert [s["generated"] for s in samples] == alone
    assert len(set(alone)) == 3  # the prompts lead to different text, so a mix-up would show
    rouge = ROUGEScore(rouge_keys=("rougeL",))(alone, references)["rougeL_fmeasure"]
    assert metrics["rougeL"] == pytest.approx(float(rouge))


def test_stop_strings_end_the_generated_samples(tmp_path):
    model = tiny_char_llama(seed=5)
    full = greedy_alone(model, "mid prompt", 10)
    stop = full[4:6]
    evaluation = generation_evaluation(["mid prompt"], ["ref"], max_new_tokens=10, stop_strings=[stop])
    _, samples = validate_generation(evaluation, model, tmp_path)
    assert samples[0]["generated"] == full[: full.index(stop)].strip()


def test_bad_configuration_lists_every_problem():
    with pytest.raises(ValueError) as err:
        Evaluation(metrics=["bleu-4", "f1"], prompts=["a"], max_new_tokens=0, batch_size=0)
    message = str(err.value)
    assert "unknown metric 'bleu-4'" in message and "num_classes" in message and "references" in message
    assert "tokenizer" in message and "max_new_tokens" in message and "batch_size" in message


def test_a_module_without_generate_is_named_in_the_error(tmp_path):
    evaluation = generation_evaluation(["the cat"], ["sat"])
    with pytest.raises(ValueError, match="module='model' to be a causal LM with generate"):
        validate_generation(evaluation, nn.Linear(2, 2), tmp_path)


class TrainedHolder(Holder):
    def __init__(self, model: nn.Module) -> None:
        super().__init__(model)
        self.weight = torch.nn.Parameter(torch.zeros(1))

    def training_step(self, batch, batch_idx):
        return (self.weight - 1).pow(2).sum()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_the_sanity_check_writes_no_samples(tmp_path):
    evaluation = generation_evaluation(["the cat sat"], ["on the mat"])
    trainer = L.Trainer(
        callbacks=[evaluation], logger=False, enable_progress_bar=False, default_root_dir=tmp_path,
        max_epochs=2, enable_checkpointing=False, num_sanity_val_steps=1,
    )  # fmt: skip
    data = DataLoader([{"x": torch.zeros(1)}], batch_size=None)
    trainer.fit(TrainedHolder(Echo("on the mat")), train_dataloaders=data, val_dataloaders=data)
    samples = [json.loads(line) for line in (tmp_path / "samples.jsonl").read_text().splitlines()]
    assert [s["epoch"] for s in samples] == [0, 1]  # one row per epoch, none for the sanity check
