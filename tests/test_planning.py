"""plan(): training memory from a config on the meta device, checked against a real step on the CPU."""

from __future__ import annotations

import json

import pytest
import torch
import transformers
from torch import nn

from lightning_peft import LoRA, QLoRA, load_base_weights, plan, reset_adapters
from lightning_peft.planning import (
    MemoryPlan,
    measure_step,
    model_config,
    profiled_peak_bytes,
    quantized_bytes,
)
from lightning_peft.strategies.lora import LoRALinear

SMALL = dict(
    model_type="llama",
    vocab_size=256,
    hidden_size=128,
    intermediate_size=256,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=4,
    max_position_embeddings=128,
)
BATCH, SEQ = 2, 64


def _build(config: dict | str, device: str = "cpu") -> nn.Module:
    torch.manual_seed(0)
    with torch.device(device):
        return transformers.AutoModelForCausalLM.from_config(model_config(config))


def _measure(method: str) -> MemoryPlan:
    model = _build(SMALL)
    if method == "full":
        model.requires_grad_(True)
    elif method == "lora":
        LoRA(r=16, lora_alpha=32, target_modules="all-linear").apply(model)
    else:
        QLoRA(r=16, lora_alpha=32, compute_dtype="float32").apply(model)
    ids = torch.randint(0, SMALL["vocab_size"], (BATCH, SEQ), generator=torch.Generator().manual_seed(0))
    return measure_step(model, ids, method=method)


@pytest.mark.parametrize("method", ["full", "lora", "qlora"])
def test_plan_is_within_15_percent_of_a_measured_step(method):
    if method == "qlora":
        pytest.importorskip("bitsandbytes")
    planned = plan(SMALL, method, batch_size=BATCH, seq_len=SEQ, r=16)
    measured = _measure(method)
    assert planned.total_bytes == pytest.approx(measured.total_bytes, rel=0.15)
    # the parts that are pure bookkeeping are exact
    assert planned.trainable == measured.trainable
    assert planned.gradient_bytes == measured.gradient_bytes
    assert planned.optimizer_bytes == measured.optimizer_bytes
    assert planned.activation_bytes == pytest.approx(measured.activation_bytes, rel=0.15)
    assert planned.weight_bytes == pytest.approx(measured.weight_bytes, rel=0.01)


def test_plan_orders_the_methods_and_counts_trainable_parameters():
    plans = {m: plan(SMALL, m, batch_size=BATCH, seq_len=SEQ) for m in ("full", "lora", "qlora")}
    model = _build(SMALL)
    assert plans["full"].trainable == sum(p.numel() for p in model.parameters())
    LoRA(r=16, target_modules="all-linear").apply(model)
    assert plans["lora"].trainable == sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert plans["qlora"].weight_bytes < plans["lora"].weight_bytes < plans["full"].total_bytes
    assert plans["lora"].optimizer_bytes < plans["full"].optimizer_bytes / 4


def test_plan_reads_a_config_file_and_gradient_checkpointing_cuts_activations(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(SMALL))
    plain = plan(tmp_path, "lora", batch_size=BATCH, seq_len=SEQ)
    assert plain == plan(SMALL, "lora", batch_size=BATCH, seq_len=SEQ)
    checkpointed = plan(
        tmp_path / "config.json", "lora", batch_size=BATCH, seq_len=SEQ, gradient_checkpointing=True
    )
    assert checkpointed.activation_bytes < plain.activation_bytes / 2


def test_plan_rejects_bad_values_in_one_error(tmp_path):
    with pytest.raises(ValueError, match="method='lorax'.*optimizer='adagrad'"):
        plan(SMALL, "lorax", optimizer="adagrad")
    with pytest.raises(ValueError, match="no model config"):
        plan(tmp_path / "missing")


@pytest.mark.parametrize(
    ("quant_type", "double_quant", "shape"),
    [
        ("nf4", True, (256, 128)),
        ("nf4", False, (64, 192)),
        ("fp4", True, (96, 64)),
        ("int8", False, (80, 64)),
    ],
)
def test_quantized_bytes_equal_what_bitsandbytes_stores(quant_type, double_quant, shape):
    pytest.importorskip("bitsandbytes")
    from lightning_peft.strategies.qlora import quantize_linear, quantized_weight_bytes

    torch.manual_seed(0)
    layer = quantize_linear(nn.Linear(shape[1], shape[0]), quant_type, double_quant, torch.float32)
    assert quantized_bytes(*shape, quant_type, double_quant) == quantized_weight_bytes(layer)


def test_lora_applies_to_a_7b_shaped_model_on_meta_without_base_memory():
    model = _build("llama-7b", "meta")
    LoRA(r=16, target_modules="all-linear").apply(model)
    assert all(p.is_meta for p in model.parameters())  # no storage anywhere: nothing allocated
    layers = [m for m in model.modules() if isinstance(m, LoRALinear)]
    assert len(layers) == 32 * 7
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == 39_976_960


@pytest.mark.parametrize("use_dora", [False, True])
def test_meta_adapted_model_materialised_and_reset_equals_adapting_the_real_model(use_dora):
    real = _build(SMALL)
    expected = _build(SMALL)
    LoRA(r=4, target_modules="all-linear", use_dora=use_dora).apply(expected)

    model = _build(SMALL, "meta")
    LoRA(r=4, target_modules="all-linear", use_dora=use_dora).apply(model)
    model.to_empty(device="cpu")
    left = load_base_weights(model, real.state_dict())
    assert left and all(".lora_" in k for k in left)  # only the adapters are left to initialise
    for (
        name,
        buffer,
    ) in real.named_buffers():  # non-persistent (rotary inv_freq): from_pretrained rebuilds them
        model.get_buffer(name).copy_(buffer)
    assert reset_adapters(model) == 14
    ids = torch.randint(0, SMALL["vocab_size"], (2, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(ids).logits, real.eval()(ids).logits, rtol=1e-5, atol=1e-5)
    if use_dora:
        layer = model.get_submodule("model.layers.0.self_attn.q_proj")
        torch.testing.assert_close(layer.lora_magnitude_vector, layer.base_layer.weight.norm(dim=1))
    assert set(dict(model.named_parameters())) == set(dict(expected.named_parameters()))


def test_load_base_weights_fills_tied_embeddings_from_the_one_name_a_checkpoint_keeps():
    tied = {**SMALL, "tie_word_embeddings": True}
    real = _build(tied)
    state = real.state_dict()
    del state["lm_head.weight"]  # as save_pretrained writes a tied model
    model = _build(tied, "meta")
    LoRA(r=4, target_modules=["q_proj"]).apply(model)
    model.to_empty(device="cpu")
    model.tie_weights()  # to_empty unties them; transformers ties them again
    left = load_base_weights(model, state)
    assert left and all(".lora_" in k for k in left)
    assert model.lm_head.weight is model.get_input_embeddings().weight
    assert torch.equal(model.lm_head.weight, real.lm_head.weight)


def test_load_base_weights_names_missing_and_misshapen_tensors():
    real = _build(SMALL).state_dict()
    model = _build(SMALL, "meta")
    LoRA(r=4, target_modules=["q_proj"]).apply(model)
    model.to_empty(device="cpu")
    del real["model.norm.weight"]
    real["model.layers.0.self_attn.q_proj.weight"] = torch.zeros(3, 3)
    before = model.get_submodule("model.layers.1.mlp.up_proj").weight.clone()
    with pytest.raises(
        ValueError,
        match=r"q_proj.weight has shape \(3, 3\), the model \(128, 128\), model.norm.weight is missing",
    ):
        load_base_weights(model, real)
    after = model.get_submodule("model.layers.1.mlp.up_proj").weight
    # nothing copied; to_empty leaves arbitrary bytes (NaN among them), so compare the bits
    assert torch.equal(after.detach().view(torch.int32), before.view(torch.int32))


def test_plan_command_prints_the_plans_and_writes_json(tmp_path, capsys):
    from lightning_peft.cli.main import main

    (tmp_path / "config.json").write_text(json.dumps(SMALL))
    out = tmp_path / "plans.json"
    argv = [
        "plan",
        str(tmp_path),
        "--method",
        "full,qlora",
        "--batch-size",
        "2",
        "--seq-len",
        "64",
        "--dtype",
        "float32",
        "--json",
        str(out),
    ]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    expected = [plan(SMALL, m, batch_size=2, seq_len=64, dtype="float32") for m in ("full", "qlora")]
    written = json.loads(out.read_text())
    assert [w["total_bytes"] for w in written] == [p.total_bytes for p in expected]
    for p in expected:
        assert f"| {p.method} | {p.trainable:,} |" in printed
        assert f"{p.total_bytes / 2**30:.3f} |" in printed


def test_plan_command_refuses_an_unknown_method(tmp_path, capsys):
    from lightning_peft.cli.main import main

    assert main(["plan", str(tmp_path), "--method", "lora,prefix"]) == 2
    assert "choose from full, lora, qlora" in capsys.readouterr().err


def test_profiled_peak_bytes_is_the_most_held_at_once_by_a_step() -> None:
    """Three buffers of 4, 8 and 2 MiB: the first is freed before the third exists, so the peak is 12 MiB
    (the first two), whatever existed before; what the step returns stays counted only while held."""
    before = torch.ones(2**20)  # held before the step: not counted

    def step() -> None:
        a = torch.ones(2**20)  # 4 MiB
        b = torch.ones(2**21)  # 8 MiB: 12 held
        del a
        c = torch.ones(2**19)  # 2 MiB: 10 held
        del b, c

    assert profiled_peak_bytes(step) == 12 * 2**20
    assert before.sum() == 2**20
