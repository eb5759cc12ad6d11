"""PiSSA and OLoRA initialisations: the model starts unchanged, the base weights hold the residual,
exports load in peft on the original base (converted to a plain LoRA of rank 2r), adapters saved by
peft load here, and training resumes through the PEFT callback."""

from __future__ import annotations

import json
import warnings

import peft
import pytest
import torch
from conftest import tiny_gpt2, tiny_llama
from test_lora_fields import assert_trains_and_resumes, outputs, perturb

from lightning_peft import LoRA, export_adapter, load_adapter

INITS = ["pissa", "olora", "pissa_niter_2"]
TARGETS = ["q_proj", "down_proj"]


@pytest.fixture(autouse=True)
def _quiet() -> None:
    warnings.simplefilter("ignore")


@pytest.mark.parametrize("init", INITS)
def test_initialisation_keeps_the_outputs_and_moves_the_principal_part_into_the_adapter(init):
    base = tiny_llama()
    model = LoRA(r=4, lora_alpha=8, target_modules=TARGETS, init_lora_weights=init).apply(tiny_llama())
    torch.testing.assert_close(outputs(model), outputs(base), atol=1e-5, rtol=0)
    layer = model.model.layers[0].self_attn.q_proj
    original = base.model.layers[0].self_attn.q_proj.weight
    assert layer.lora_B.abs().sum() > 0, "B must start from the weight, not from zero"
    torch.testing.assert_close(layer.base_layer.weight + layer.delta_weight(), original, atol=1e-5, rtol=0)


def test_pissa_takes_the_top_singular_directions():
    model = LoRA(r=4, lora_alpha=4, target_modules=["q_proj"], init_lora_weights="pissa").apply(tiny_llama())
    layer = model.model.layers[0].self_attn.q_proj
    top = torch.linalg.svdvals(tiny_llama().model.layers[0].self_attn.q_proj.weight)[:4]
    # scaling 1: B A is the rank-4 truncation, whose singular values are the top four
    torch.testing.assert_close(torch.linalg.svdvals(layer.lora_B @ layer.lora_A)[:4], top, atol=1e-5, rtol=0)


@pytest.mark.parametrize("init", INITS)
@pytest.mark.parametrize("use_rslora", [False, True])
def test_export_converts_to_a_plain_lora_that_peft_loads_on_the_original_base(init, use_rslora, tmp_path):
    strategy = LoRA(r=4, lora_alpha=8, target_modules=TARGETS, init_lora_weights=init, use_rslora=use_rslora)
    ours = perturb(strategy.apply(tiny_llama()))
    export_adapter(ours, tmp_path / "adapter", format="peft")
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["r"] == 8 and config.get("init_lora_weights", True) is True
    theirs = peft.PeftModel.from_pretrained(tiny_llama(), str(tmp_path / "adapter"))
    torch.testing.assert_close(outputs(ours), outputs(theirs), atol=1e-5, rtol=0)
    assert not torch.allclose(outputs(ours), outputs(tiny_llama()), atol=1e-3)


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_adapter_saved_by_peft_loads_here(init, tmp_path):
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, init_lora_weights=init)
    theirs = perturb(peft.get_peft_model(tiny_llama(), config))
    theirs.save_pretrained(str(tmp_path / "adapter"))  # as trained: peft rebuilds the start on load
    ours = load_adapter(tiny_llama(), tmp_path / "adapter")
    torch.testing.assert_close(outputs(ours), outputs(theirs), atol=1e-5, rtol=0)


@pytest.mark.parametrize("init", INITS)
def test_adapter_converted_by_peft_loads_here(init, tmp_path):
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, init_lora_weights=init)
    theirs = peft.get_peft_model(tiny_llama(), config)
    theirs.save_pretrained(str(tmp_path / "initial"))
    perturb(theirs)
    theirs.save_pretrained(
        str(tmp_path / "adapter"), path_initial_model_for_weight_conversion=str(tmp_path / "initial")
    )
    ours = load_adapter(tiny_llama(), tmp_path / "adapter")
    torch.testing.assert_close(outputs(ours), outputs(theirs), atol=1e-5, rtol=0)


def test_an_unconverted_randomised_pissa_adapter_is_refused_naming_the_setting(tmp_path):
    config = peft.LoraConfig(r=4, target_modules=TARGETS, init_lora_weights="pissa_niter_2")
    peft.get_peft_model(tiny_llama(), config).save_pretrained(str(tmp_path / "adapter"))
    with pytest.raises(ValueError, match="init_lora_weights='pissa_niter_2' .*path_initial_model_for_weight"):
        load_adapter(tiny_llama(), tmp_path / "adapter")


def test_weight_initialisations_refuse_layers_they_cannot_rewrite():
    with pytest.raises(
        ValueError, match="'model.embed_tokens' is a Embedding; init_lora_weights='olora' rewrites loaded"
    ):
        LoRA(target_modules=["embed_tokens"], init_lora_weights="olora").apply(tiny_llama())


@pytest.mark.parametrize("init", ["pissa", "pissa_niter_2", "olora"])
def test_trains_through_the_callback_and_resumes_exactly(init, tmp_path):
    def strategy():
        return LoRA(r=4, target_modules=["q_proj", "v_proj", "down_proj"], init_lora_weights=init)

    assert_trains_and_resumes(tmp_path, strategy)


def test_pissa_on_gpt2_conv1d_matches_peft_both_ways(tmp_path):
    fields = {"r": 4, "lora_alpha": 8, "target_modules": ["c_attn", "c_fc"], "init_lora_weights": "pissa"}
    ours = perturb(LoRA(**fields).apply(tiny_gpt2()))
    export_adapter(ours, tmp_path / "ours", format="peft")
    theirs = peft.PeftModel.from_pretrained(tiny_gpt2(), str(tmp_path / "ours"))
    torch.testing.assert_close(outputs(ours), outputs(theirs), atol=1e-5, rtol=0)
    theirs = perturb(peft.get_peft_model(tiny_gpt2(), peft.LoraConfig(**fields)))
    theirs.save_pretrained(str(tmp_path / "theirs"))
    loaded = load_adapter(tiny_gpt2(), tmp_path / "theirs")
    torch.testing.assert_close(outputs(loaded), outputs(theirs), atol=1e-5, rtol=0)
