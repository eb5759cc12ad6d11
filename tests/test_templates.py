"""Prompt templates, the instruction collator and the instruction data module."""

from __future__ import annotations

import json
from pathlib import Path

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_char_llama
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from omegaconf import OmegaConf

from lightning_peft.data.datamodules import InstructionData
from lightning_peft.data.records import SHIPPED_INSTRUCTIONS, TOY_WORDS, read_jsonl, toy_instructions
from lightning_peft.data.tokenizer import char_tokenizer
from lightning_peft.generation.templates import (
    ALPACA,
    CHAT,
    IGNORE_INDEX,
    InstructionCollator,
    PromptTemplate,
)
from lightning_peft.models.tasks import CausalLM

CONF = Path(__file__).resolve().parents[1] / "conf"
CHAT_JINJA = (
    "{{ bos_token }}{% for m in messages %}<|{{ m.role }}|>{{ m.content }}"
    "{% if m.role == 'assistant' %}{{ eos_token }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
RECORD = {"instruction": "Reverse the word.", "input": "cat", "output": "tac"}


def test_alpaca_renders_the_input_section_only_when_the_input_is_given():
    prompt, response = ALPACA.render(RECORD)
    assert prompt == (
        "Carry out the instruction below.\n\n### Instruction:\nReverse the word.\n\n### Input:\ncat\n\n"
        "### Response:\n"
    )
    assert response == "tac"
    for blank in ({"input": ""}, {"input": "  "}, {"input": None}, {}):
        record = {"instruction": "Name a colour.", "output": "Red.", **blank}
        assert ALPACA.render(record) == (
            "Carry out the instruction below.\n\n### Instruction:\nName a colour.\n\n### Response:\n",
            "Red.",
        )


def test_any_named_fields_render():
    template = PromptTemplate(prompt="Q: {question}\nA: ", response=" {answer}.")
    assert template.render({"question": "2 + 2?", "answer": 4, "extra": "ignored"}) == (
        "Q: 2 + 2?\nA: ",
        " 4.",
    )


def test_a_missing_field_raises_naming_it_and_the_records_keys():
    with pytest.raises(ValueError, match=r"no 'instruction' field.*keys: \['input', 'output'\]"):
        ALPACA.render({"input": "cat", "output": "tac"})
    with pytest.raises(ValueError, match="no 'output' field"):
        ALPACA.render({"instruction": "Reverse the word.", "input": "cat"})
    # the prompt alone (for generation) does not need the output
    assert ALPACA.format_prompt({"instruction": "Reverse the word.", "input": "cat"}).endswith(
        "cat\n\n### Response:\n"
    )


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"prompt": "{} and {}"}, "positional field"),
        ({"prompt": "{a", "response": "b"}, "not a valid format string"),
        ({"prompt": "{a}", "prompt_if_empty": "x"}, "optional_field is not"),
        ({"prompt": "{a} {b}", "optional_field": "b", "prompt_if_empty": "{b}"}, "the field it replaces"),
        ({"prompt": "{a}", "system": "be brief"}, "only used with chat=True"),
    ],
)
def test_malformed_templates_are_rejected_at_construction(kwargs, message):
    with pytest.raises(ValueError, match=message):
        PromptTemplate(**kwargs)


def test_yaml_templates_build_the_python_ones():
    assert instantiate(OmegaConf.load(CONF / "template" / "alpaca.yaml")) == ALPACA
    assert instantiate(OmegaConf.load(CONF / "template" / "chat.yaml")) == CHAT


def test_labels_are_ignored_on_the_prompt_and_padding_and_equal_the_ids_on_the_response(char_tok):
    records = [RECORD, {"instruction": "Uppercase it.", "input": "ox", "output": "OX"}]
    batch = InstructionCollator(char_tok, ALPACA, max_length=256)(records)
    for row, record in enumerate(records):
        prompt, response = ALPACA.render(record)
        prompt_ids = char_tok(prompt)["input_ids"]
        n, m = len(prompt_ids), len(response) + 1  # the response: one token per character, plus eos
        ids, labels, mask = batch["input_ids"][row], batch["labels"][row], batch["attention_mask"][row]
        assert ids[:n].tolist() == prompt_ids
        assert ids[n : n + m].tolist() == char_tok(response)["input_ids"] + [char_tok.eos_token_id]
        assert (labels[:n] == IGNORE_INDEX).all()
        assert torch.equal(labels[n : n + m], ids[n : n + m])
        assert (labels[n + m :] == IGNORE_INDEX).all() and (ids[n + m :] == char_tok.pad_token_id).all()
        assert mask.tolist() == [1] * (n + m) + [0] * (len(ids) - n - m)
    assert (batch["attention_mask"][1] == 0).any()  # the longer prompt of row 0 padded row 1


def test_the_models_loss_is_the_cross_entropy_of_the_response_tokens_alone(char_tok):
    model = tiny_char_llama()
    batch = InstructionCollator(char_tok, ALPACA)([RECORD])
    with torch.no_grad():
        out = model(**batch)
    logprobs = out.logits[0].log_softmax(-1)  # (T, V)
    n = len(char_tok(ALPACA.render(RECORD)[0])["input_ids"])
    targets = char_tok("tac")["input_ids"] + [char_tok.eos_token_id]
    # token n + i is predicted from the logits at position n + i - 1
    by_hand = -sum(logprobs[n + i - 1, t] for i, t in enumerate(targets)) / len(targets)
    assert out.loss.item() == pytest.approx(by_hand.item(), rel=1e-5)
    full_sequence = F.cross_entropy(out.logits[0, :-1], batch["input_ids"][0, 1:])
    assert abs(out.loss.item() - full_sequence.item()) > 1e-3  # the prompt is really left out


def test_padding_does_not_change_the_loss(char_tok):
    model = tiny_char_llama()
    collate = InstructionCollator(char_tok, ALPACA)
    short = {"instruction": "Uppercase the word.", "input": "ox", "output": "OX"}
    long = {"instruction": "Repeat the word twice.", "input": "garden", "output": "garden garden"}
    with torch.no_grad():
        alone = [(model(**collate([r])).loss, len(r["output"]) + 1) for r in (short, long)]
        together = model(**collate([short, long])).loss
    weighted = sum(loss * n for loss, n in alone) / sum(n for _, n in alone)
    assert together.item() == pytest.approx(weighted.item(), rel=1e-4)


def test_the_chat_template_path_splits_at_the_assistants_turn_without_doubling_bos_or_eos():
    tok = char_tokenizer(chat_template=CHAT_JINJA)
    prompt, response = CHAT.render(RECORD, tok)
    assert prompt == "<s><|user|>Reverse the word.\n\ncat<|assistant|>"
    assert response == "tac</s>"
    system = PromptTemplate(prompt="{instruction}", chat=True, system="Answer in {language}.")
    assert system.render({"instruction": "Hi", "output": "Hallo", "language": "German"}, tok)[0] == (
        "<s><|system|>Answer in German.<|user|>Hi<|assistant|>"
    )
    batch = InstructionCollator(tok, CHAT, add_bos=True)([RECORD])
    ids, labels = batch["input_ids"][0].tolist(), batch["labels"][0].tolist()
    assert ids.count(tok.bos_token_id) == 1 and ids[0] == tok.bos_token_id
    assert ids.count(tok.eos_token_id) == 1 and ids[-1] == tok.eos_token_id
    assert [t for t in labels if t != IGNORE_INDEX] == tok("tac")["input_ids"] + [tok.eos_token_id]


def test_the_collators_response_labels_equal_transformers_assistant_mask():
    marked = CHAT_JINJA.replace(
        "{{ m.content }}{% if m.role == 'assistant' %}{{ eos_token }}{% endif %}",
        "{% if m.role == 'assistant' %}{% generation %}{{ m.content }}{{ eos_token }}{% endgeneration %}"
        "{% else %}{{ m.content }}{% endif %}",
    )
    tok = char_tokenizer(chat_template=marked)
    records = [RECORD, {"instruction": "Uppercase the word.", "input": "", "output": "OWL"}]
    batch = InstructionCollator(tok, CHAT)(records)
    for row, record in enumerate(records):
        reference = tok.apply_chat_template(
            CHAT.messages(record), tokenize=True, return_dict=True, return_assistant_tokens_mask=True
        )
        n = len(reference["input_ids"])
        assert sum(reference["assistant_masks"]) == len(record["output"]) + 1  # the answer and its eos
        assert batch["input_ids"][row, :n].tolist() == reference["input_ids"]
        assert (batch["labels"][row, :n] != IGNORE_INDEX).long().tolist() == reference["assistant_masks"]


@pytest.mark.parametrize("template", [CHAT, ALPACA], ids=["chat", "alpaca"])
def test_generation_encodes_a_prompt_as_training_did(template: PromptTemplate) -> None:
    from tokenizers import processors

    from lightning_peft.generation.generate import _prompt_ids
    from lightning_peft.generation.templates import adds_bos

    tok = char_tokenizer(chat_template=CHAT_JINJA)  # its chat template writes <s> itself
    tok._tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", 1)]
    )
    assert adds_bos(tok)  # like Llama's: plain text gets a <s> too
    trained = InstructionCollator(tok, template).encode(RECORD)[0]
    generated = _prompt_ids(tok, template.render(RECORD, tok)[0], 0, adds_bos(tok))
    assert (
        generated == trained and generated.count(tok.bos_token_id) == 1 and generated[0] == tok.bos_token_id
    )


def test_the_chat_template_path_needs_a_tokenizer_with_a_chat_template(char_tok):
    with pytest.raises(ValueError, match="has none"):
        CHAT.render(RECORD, char_tok)
    with pytest.raises(ValueError, match="no chat_template"):
        InstructionCollator(char_tok, CHAT)


def test_bos_follows_the_tokenizer_unless_asked(char_tok):
    assert InstructionCollator(char_tok, ALPACA)([RECORD])["input_ids"][0, 0] != char_tok.bos_token_id
    batch = InstructionCollator(char_tok, ALPACA, add_bos=True)([RECORD])
    assert batch["input_ids"][0, 0] == char_tok.bos_token_id and batch["labels"][0, 0] == IGNORE_INDEX


def test_truncation_cuts_the_prompt_from_the_left_and_keeps_the_response_and_bos(char_tok):
    prompt, _ = ALPACA.render(RECORD)
    batch = InstructionCollator(char_tok, ALPACA, max_length=20, add_bos=True)([RECORD])
    ids = batch["input_ids"][0].tolist()
    assert len(ids) == 20 and ids[0] == char_tok.bos_token_id
    # 20 = bos + the last 15 prompt characters + "tac" + eos
    assert ids[1:16] == char_tok(prompt)["input_ids"][-15:]
    assert char_tok.decode(ids[16:], skip_special_tokens=True) == "tac"
    assert (batch["labels"][0, :16] == IGNORE_INDEX).all()
    assert torch.equal(batch["labels"][0, 16:], batch["input_ids"][0, 16:])


def test_a_response_longer_than_max_length_raises(char_tok):
    collate = InstructionCollator(char_tok, ALPACA, max_length=4)
    with pytest.raises(ValueError, match="response of 5 tokens"):
        collate([{**RECORD, "output": "tacs"}])
    assert collate([RECORD])["labels"][0].tolist() == [*char_tok("tac")["input_ids"], 2]  # no prompt room


def test_toy_instructions_are_deterministic_and_correct():
    records = toy_instructions(60, seed=3)
    assert records == toy_instructions(60, seed=3) and records != toy_instructions(60, seed=4)
    expected = {
        "Uppercase the word.": lambda w: w.upper(),
        "Reverse the word.": lambda w: w[::-1],
        "Repeat the word twice.": lambda w: f"{w} {w}",
    }
    assert {r["instruction"] for r in records} == set(expected)
    for r in records:
        assert r["output"] == expected[r["instruction"]](r["input"]) and r["input"] in TOY_WORDS


def test_the_shipped_instructions_load_and_split_by_seed():
    records = read_jsonl(SHIPPED_INSTRUCTIONS)
    assert len(records) == 32 and all(set(r) == {"instruction", "input", "output"} for r in records)
    assert any(not r["input"] for r in records)  # exercises alpaca's no-input form
    data = InstructionData(path=str(SHIPPED_INSTRUCTIONS), val_fraction=0.25, seed=1)
    data.setup("fit")
    assert len(data.val) == 8 and len(data.train) == 24
    assert sorted(map(json.dumps, data.train + data.val)) == sorted(map(json.dumps, records))
    other = InstructionData(path=str(SHIPPED_INSTRUCTIONS), val_fraction=0.25, seed=2)
    other.setup("fit")
    assert other.val != data.val
    batch = next(iter(data.val_dataloader()))
    assert batch["input_ids"].shape[0] == 8 and (batch["labels"] != IGNORE_INDEX).any()


def test_bad_jsonl_lines_are_reported_with_their_number(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"instruction": "a", "output": "b"}\n\n[1, 2]\n')
    with pytest.raises(ValueError, match="line 3: a record must be a JSON object"):
        read_jsonl(path)
    path.write_text('{"instruction": "a", "output": "b"}\n{"instruction": "c"}\n')
    with pytest.raises(ValueError, match="no 'output' field"):
        InstructionData(path=str(path)).setup("fit")


def test_instruction_data_config_composes_with_the_alpaca_template_and_can_switch_to_chat():
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(config_name="config", overrides=["data=instructions"])
        chat = compose(
            config_name="config",
            overrides=[
                "data=instructions",
                "template@data.template=chat",
                f"data.chat_template={CHAT_JINJA!r}",
            ],
        )
    data = instantiate(cfg.data, _convert_="all")
    assert isinstance(data, InstructionData) and data.template == ALPACA and data.seed == cfg.seed
    chat_data = instantiate(chat.data, _convert_="all")
    assert chat_data.template == CHAT and chat_data.tokenizer.chat_template == CHAT_JINJA


def _response_loss(module: CausalLM, data: InstructionData) -> float:
    module.eval()
    with torch.no_grad():
        losses = [module.model(**batch).loss for batch in data.val_dataloader()]
    return torch.stack(losses).mean().item()


def test_a_tiny_char_llama_learns_the_toy_responses(char_tok):
    L.seed_everything(0, verbose=False)
    data = InstructionData(size=256, batch_size=16, val_fraction=0.125, seed=0)
    data.setup("fit")
    config = tiny_char_llama().config.to_dict()
    module = CausalLM(config={"model_type": "llama", **{k: config[k] for k in _LLAMA_KEYS}}, lr=2e-2)
    before = _response_loss(module, data)
    module.train()
    trainer = L.Trainer(
        accelerator="cpu", max_steps=50, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0,
    )  # fmt: skip
    trainer.fit(module, datamodule=data)
    after = _response_loss(module, data)
    assert after < 0.75 * before  # from about ln(101), a uniform guess


_LLAMA_KEYS = (
    "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
    "num_key_value_heads", "max_position_embeddings", "bos_token_id", "eos_token_id", "pad_token_id",
)  # fmt: skip
