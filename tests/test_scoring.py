"""Held-out scoring: exact match and ROUGE-L of generations, and the callback that runs it around training."""

from __future__ import annotations

import json

import lightning as L
import pytest
import torch
from conftest import tiny_char_llama

from lightning_peft import PEFT, LoRA
from lightning_peft.callbacks.heldout import HeldOutEvaluation
from lightning_peft.data.datamodules import InstructionData
from lightning_peft.generation.scoring import evaluate_records, score_generations
from lightning_peft.generation.settings import GenerationSettings
from lightning_peft.generation.templates import ALPACA
from lightning_peft.models.tasks import CausalLM

RECORDS = [
    {"instruction": "Uppercase the word.", "input": "cat", "output": "CAT"},
    {"instruction": "Reverse the word.", "input": "dog", "output": "god"},
    {"instruction": "Repeat the word.", "input": "owl", "output": "owl owl"},
]


def test_exact_match_is_strict_and_rouge_l_is_the_lcs_f_measure():
    scores = score_generations([" a b c ", "a b d", "A B C."], ["a b c", "a b c", "a b c"])
    assert scores["exact_match"] == pytest.approx(1 / 3)  # white space around it is ignored, case is not
    # LCS: 3/3, 2/3 (P = R = 2/3), 3/3 (torchmetrics lowercases and drops punctuation)
    assert scores["rougeL"] == pytest.approx((1 + 2 / 3 + 1) / 3, abs=1e-6)


def test_score_generations_needs_one_reference_per_completion():
    with pytest.raises(ValueError, match="2 completions and 1 references"):
        score_generations(["a", "b"], ["a"])


def test_evaluate_records_answers_each_record_and_restores_every_modes(char_tok):
    model = tiny_char_llama().train()
    model.model.layers[0].eval()  # a module someone froze in eval mode stays so
    settings = GenerationSettings(max_new_tokens=4, batch_size=2)
    metrics, samples = evaluate_records(model, char_tok, RECORDS, ALPACA, settings)
    assert [s["prompt"] for s in samples] == [ALPACA.format_prompt(r) for r in RECORDS]
    assert [s["reference"] for s in samples] == ["CAT", "god", "owl owl"]
    assert metrics == {**score_generations([s["generated"] for s in samples], ["CAT", "god", "owl owl"]),
                       "num_records": 3}  # fmt: skip
    assert model.training and not model.model.layers[0].training and model.model.layers[1].training


def test_held_out_evaluation_refuses_bad_arguments_in_one_error(tmp_path):
    with pytest.raises(ValueError) as err:
        HeldOutEvaluation(str(tmp_path / "missing.jsonl"), max_new_tokens=0, batch_size=-1)
    message = str(err.value)
    assert "missing.jsonl" in message and "max_new_tokens" in message and "batch_size" in message


def test_held_out_evaluation_scores_the_base_before_and_the_adapted_model_after(tmp_path, char_tok):
    path = tmp_path / "heldout.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in RECORDS))
    evaluation = HeldOutEvaluation(str(path), module="model", max_new_tokens=4, batch_size=3)
    module = CausalLM(config={"model_type": "llama", "vocab_size": 101, "hidden_size": 32, "intermediate_size": 64,
                              "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
                              "max_position_embeddings": 256, "bos_token_id": 1, "eos_token_id": 2,
                              "pad_token_id": 0}, lr=5e-2)  # fmt: skip
    base = {k: v.clone() for k, v in module.model.state_dict().items()}
    data = InstructionData(size=64, batch_size=8)
    trainer = L.Trainer(
        max_steps=3,
        limit_val_batches=0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        default_root_dir=tmp_path,
        callbacks=[PEFT(LoRA(r=4, target_modules="all-linear", init_lora_weights=False), module="model"),
                   evaluation],
    )  # fmt: skip
    trainer.fit(module, datamodule=data)
    # "before": the base model itself (LoRA initialised off zero would otherwise change it)
    reference = tiny_char_llama()
    reference.load_state_dict(base)
    expected, _ = evaluate_records(reference, data.tokenizer, RECORDS, ALPACA, evaluation.settings)
    assert evaluation.results["before"] == expected
    after, _ = evaluate_records(module.model, data.tokenizer, RECORDS, ALPACA, evaluation.settings)
    assert evaluation.results["after"] == after
    assert float(trainer.callback_metrics["heldout/before/exact_match"]) == expected["exact_match"]
    lines = [json.loads(line) for line in (tmp_path / "heldout_samples.jsonl").read_text().splitlines()]
    assert [line["moment"] for line in lines] == ["before"] * 3 + ["after"] * 3
    assert [line["generated"] for line in lines[:3]] == [s for s in _completions(reference, data.tokenizer)]


def _completions(model: torch.nn.Module, tokenizer) -> list[str]:
    _, samples = evaluate_records(
        model, tokenizer, RECORDS, ALPACA, GenerationSettings(max_new_tokens=4, batch_size=3)
    )
    return [s["generated"] for s in samples]
