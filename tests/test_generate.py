"""``lightning-peft generate`` and its API on a tiny character-level Llama trained to repeat a sentence:
every way of loading an adapter writes what the adapted model writes in-process; the command's output,
streaming and exit codes. The controls (settings, stop strings, banned and forced words, batching) are
tested in test_generate_controls.py."""

from __future__ import annotations

import copy
import json
import warnings

import lightning as L
import peft
import pytest
import torch
from conftest import BASE_TEXT, fit_to_text, tiny_char_llama

from lightning_peft import PEFT, LoRA, export_adapter, export_merged
from lightning_peft.cli.main import main
from lightning_peft.data.tokenizer import char_tokenizer
from lightning_peft.generation.generate import (
    GenerationSettings,
    generate,
    load_for_generation,
)

ADAPTER_TEXT = "the dog ran to the log. " * 4


class CharLM(L.LightningModule):
    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def training_step(self, batch, batch_idx):
        return self.model(input_ids=batch, labels=batch).loss

    def configure_optimizers(self):
        return torch.optim.Adam([p for p in self.parameters() if p.requires_grad], lr=3e-2)


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> dict:
    """A base that writes BASE_TEXT, a LoRA checkpoint (PEFT callback) that writes ADAPTER_TEXT, and the
    folders exported from it."""
    folder = tmp_path_factory.mktemp("generate")
    tokenizer = char_tokenizer()
    base = tiny_char_llama()
    fit_to_text(base, BASE_TEXT, steps=150, lr=1e-2)
    base.save_pretrained(folder / "base")
    tokenizer.save_pretrained(folder / "base")
    module = CharLM(copy.deepcopy(base))
    batch = torch.tensor([tokenizer(ADAPTER_TEXT)["input_ids"]])
    trainer = L.Trainer(
        max_steps=40,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[
            PEFT(LoRA(r=4, target_modules=["q_proj", "v_proj", "o_proj"]), module="model", verbose=False)
        ],
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(module, torch.utils.data.DataLoader([batch[0]] * 40, batch_size=1))
    trainer.save_checkpoint(folder / "adapter.ckpt")
    export_adapter(folder / "adapter.ckpt", folder / "peft_adapter")
    export_adapter(folder / "adapter.ckpt", folder / "native_adapter", format="lightning_peft")
    export_merged(folder / "adapter.ckpt", folder / "merged", base=folder / "base")
    return {"folder": folder, "base": base, "adapted": module.model.eval(), "tokenizer": tokenizer}


def _greedy(model, tokenizer, prompts=("the ", "a d", "on "), **settings) -> list[str]:
    settings = {"max_new_tokens": 24, **settings}
    records = generate(model, tokenizer, list(prompts), GenerationSettings(**settings))
    return [r["completion"] for r in records]


# ----------------------------------------------------------------------------- loading an adapted model


@pytest.mark.parametrize("source", ["peft_adapter", "native_adapter", "checkpoint", "merged"])
def test_every_way_of_loading_the_adapter_writes_what_the_adapted_model_writes(trained, source):
    folder = trained["folder"]
    expected = _greedy(trained["adapted"], trained["tokenizer"])
    assert expected != _greedy(trained["base"], trained["tokenizer"])  # the adapter changes the text
    where = {
        "peft_adapter": {"base": folder / "base", "adapter": folder / "peft_adapter"},
        "native_adapter": {"base": folder / "base", "adapter": folder / "native_adapter"},
        "checkpoint": {"base": folder / "base", "checkpoint": folder / "adapter.ckpt"},
        "merged": {"model": folder / "merged"},
    }[source]
    model, tokenizer = load_for_generation(**where, device="cpu")
    assert _greedy(model, tokenizer) == expected


def test_an_adapter_saved_by_peft_loads_without_peft(trained, tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        config = peft.LoraConfig(
            r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False
        )
        theirs = peft.get_peft_model(copy.deepcopy(trained["base"]), config).eval()
        theirs.save_pretrained(tmp_path / "theirs")
        expected = _greedy(theirs.merge_and_unload(), trained["tokenizer"])
    model, tokenizer = load_for_generation(base=trained["folder"] / "base", adapter=tmp_path / "theirs")
    assert _greedy(model, tokenizer) == expected


def test_a_model_folder_without_a_tokenizer_asks_for_one(trained, tmp_path):
    trained["base"].save_pretrained(tmp_path / "bare")
    with pytest.raises(FileNotFoundError, match="--tokenizer DIR"):
        load_for_generation(tmp_path / "bare")
    model, tokenizer = load_for_generation(tmp_path / "bare", tokenizer=trained["folder"] / "base")
    assert _greedy(model, tokenizer, ["the "]) == _greedy(trained["base"], trained["tokenizer"], ["the "])


# ---------------------------------------------------------------------------------------- command line


def test_help_lists_generate_and_its_controls(capsys):
    assert main(["--help"]) == 0
    assert "generate" in capsys.readouterr().out
    assert main(["generate", "--help"]) == 0
    text = capsys.readouterr().out
    for option in (
        "--model DIR",
        "--adapter DIR",
        "--checkpoint CKPT",
        "--stop TEXT",
        "--ban WORD",
        "--force WORD",
    ):
        assert option in text


def test_command_writes_jsonl_with_config_and_flag_overrides(trained, tmp_path, capsys):
    (tmp_path / "settings.yaml").write_text("max_new_tokens: 5\nstop_strings: ['mat']\nseed: 7\n")
    out = tmp_path / "out" / "completions.jsonl"
    argv = [
        "generate",
        "--model",
        str(trained["folder"] / "merged"),
        "--config",
        str(tmp_path / "settings.yaml"),
    ]
    argv += [
        "--prompt",
        "the ",
        "--prompt",
        "on ",
        "--max-new-tokens",
        "30",
        "--stop",
        "\\n",
        "--jsonl",
        str(out),
    ]
    assert main(argv) == 0
    captured = capsys.readouterr()
    assert captured.out == "" and f"wrote 2 completions to {out}" in captured.err
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["prompt"] for r in records] == ["the ", "on "]
    assert set(records[0]) == {
        "prompt",
        "completion",
        "num_tokens",
        "stop_reason",
        "stop_string",
        "sequence",
        "settings",
    }
    settings = records[0]["settings"]
    assert settings["max_new_tokens"] == 30 and settings["stop_strings"] == ["\n"] and settings["seed"] == 7
    assert records[0]["num_tokens"] == 30 and records[0]["stop_reason"] == "length"
    assert [p.name for p in out.parent.iterdir()] == ["completions.jsonl"]  # no staging file left
    assert main(argv) == 1 and "exists already" in capsys.readouterr().err


def test_command_streams_completions_to_stdout(trained, capsys):
    folder = trained["folder"]
    argv = ["generate", "--base", str(folder / "base"), "--adapter", str(folder / "peft_adapter"), "--stream"]
    assert main([*argv, "--max-new-tokens", "16", "the ", "on "]) == 0
    expected = _greedy(trained["adapted"], trained["tokenizer"], ["the ", "on "], max_new_tokens=16)
    assert capsys.readouterr().out == "".join(text + "\n" for text in expected)


@pytest.mark.parametrize(
    ("extra", "code", "message"),
    [
        (["--model", "MISSING", "hi"], 1, "no model folder at"),
        (["--model", "MERGED", "--do-sample", "--temperature", "0", "hi"], 2, "temperature must be > 0"),
        (["--model", "MERGED", "--prompts", "MISSING.txt"], 1, "no prompt file at"),
        (["--base", "BASE", "hi"], 2, "--base needs one of --adapter DIR or --checkpoint CKPT"),
        (["--model", "MERGED"], 2, "no prompt"),
        (
            ["--model", "MERGED", "--stream", "--do-sample", "--num-return-sequences", "2", "hi"],
            2,
            "--stream",
        ),
    ],
)
def test_bad_input_exits_with_a_one_line_message(trained, tmp_path, capsys, extra, code, message):
    names = {"MERGED": trained["folder"] / "merged", "BASE": trained["folder"] / "base"}
    argv = [str(names[a]) if a in names else a.replace("MISSING", str(tmp_path / "missing")) for a in extra]
    assert main(["generate", *argv]) == code
    err = capsys.readouterr().err.splitlines()
    assert err[-1].startswith("lightning-peft generate: error:") and message in err[-1]
    assert not any(line.startswith(("Traceback", "  File")) for line in err)


def test_template_formats_plain_and_jsonl_prompts_as_the_model_was_tuned(trained, tmp_path):
    from lightning_peft.generation.templates import ALPACA

    prompts = tmp_path / "records.jsonl"
    records = [{"instruction": "Say it.", "input": "the "}, {"instruction": "Go on."}]
    prompts.write_text("".join(json.dumps(r) + "\n" for r in records))
    out = tmp_path / "out.jsonl"
    merged = str(trained["folder"] / "merged")
    common = ["--max-new-tokens", "3", "--template", "alpaca", "--jsonl", str(out), "--overwrite"]
    assert main(["generate", "--model", merged, "--prompts", str(prompts), *common]) == 0
    written = [json.loads(line)["prompt"] for line in out.read_text().splitlines()]
    assert written == [
        ALPACA.prompt_text(records[0]),
        ALPACA.prompt_text({"instruction": "Go on.", "input": ""}),
    ]
    assert "### Input:\nthe " in written[0] and "### Input" not in written[1]  # the no-input form
    assert main(["generate", "--model", merged, "--prompt", "Say it.", *common]) == 0
    assert json.loads(out.read_text())["prompt"] == ALPACA.prompt_text(
        {"instruction": "Say it.", "input": ""}
    )


def test_an_unknown_template_is_a_usage_error_naming_the_shipped_ones(trained, capsys):
    argv = ["generate", "--model", str(trained["folder"] / "merged"), "--template", "alpacca", "hi"]
    assert main(argv) == 2
    assert "alpaca, chat" in capsys.readouterr().err
