"""Export to and import from the Hugging Face PEFT format, our own layout and merged models, each
checked against peft itself (``PeftModel.from_pretrained``, ``save_pretrained``) on the same base."""

from __future__ import annotations

import json
import warnings
from collections.abc import Callable
from pathlib import Path

import lightning as L
import peft
import pytest
import torch
import transformers
from conftest import VOCAB, cnn, tiny_bert, tiny_gpt2, tiny_llama
from safetensors import safe_open
from torch import nn

import lightning_peft.formats.adapter as adapter_module
import lightning_peft.formats.peft_layout as hf
from lightning_peft import (
    IA3,
    PEFT,
    BottleneckAdapter,
    Compose,
    Freeze,
    LoRA,
    PrefixTuning,
    PromptTuning,
    add_adapter,
    export_adapter,
    export_merged,
    load_adapter,
    set_active_adapters,
)
from lightning_peft.strategies.base import adapter_modules

Build = Callable[[], nn.Module]


@pytest.fixture(autouse=True)
def _quiet() -> None:
    warnings.simplefilter("ignore")  # peft and transformers warn about tiny random models


def _perturb(model: nn.Module, seed: int = 1) -> nn.Module:
    """Move every trainable tensor away from its (often identity) start, so that outputs tell."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:
                param.add_(0.2 * torch.randn(param.shape, generator=generator))
    return model


def _outputs(model: nn.Module, case: str) -> torch.Tensor:
    with torch.no_grad():
        if case.startswith("cnn"):
            return model(torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0)))
        ids = torch.randint(3, VOCAB, (2, 10), generator=torch.Generator().manual_seed(0))
        mask = torch.ones_like(ids)
        mask[0, :3] = 0
        return model(input_ids=ids, attention_mask=mask).logits


def _peft_load(build: Build, folder: Path) -> nn.Module:
    return peft.PeftModel.from_pretrained(build(), str(folder)).eval()


class Wrapper(L.LightningModule):
    """A user's module holding a Hugging Face model at ``self.model``."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def validation_step(self, batch, batch_idx):
        return None


def _checkpoint(path: Path, build: Build, strategy, module: str | None = "model") -> Wrapper:
    """Write what the PEFT callback writes (adapter-only state and its metadata); returns the module."""
    lit = Wrapper(build())
    callback = PEFT(strategy, module=module, verbose=False)
    callback.adapt(lit)
    _perturb(lit)
    checkpoint = {"state_dict": lit.state_dict()}
    callback.prune_checkpoint(lit, checkpoint)
    torch.save(checkpoint, path)
    return lit.eval()


# ------------------------------------------------------------------------------------------ export to peft

EXPORTS: dict[str, tuple[Build, Callable[[], object]]] = {
    "lora-linear-embedding": (
        tiny_llama,
        lambda: LoRA(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj", "embed_tokens"]),
    ),
    "rslora": (
        tiny_llama,
        lambda: LoRA(r=4, lora_alpha=8, target_modules=["q_proj", "up_proj"], use_rslora=True),
    ),
    "dora": (tiny_llama, lambda: LoRA(r=4, lora_alpha=8, target_modules=["q_proj", "o_proj"], use_dora=True)),
    "lora-conv1d": (tiny_gpt2, lambda: LoRA(r=4, lora_alpha=8, target_modules=["c_attn", "c_proj"])),
    "ia3": (tiny_llama, lambda: IA3()),
    "lora-modules-to-save": (
        tiny_bert,
        lambda: LoRA(
            r=4, target_modules=["query", "value"], modules_to_save=["classifier"], bias="lora_only"
        ),
    ),
    "prompt-causal-lm": (tiny_llama, lambda: PromptTuning(num_virtual_tokens=4)),
    "prompt-seq-cls": (tiny_bert, lambda: PromptTuning(num_virtual_tokens=4)),
    "prefix-mlp": (
        tiny_llama,
        lambda: PrefixTuning(num_virtual_tokens=4, prefix_projection=True, encoder_hidden_size=16),
    ),
    "cnn-dora-conv2d": (cnn, lambda: LoRA(r=2, target_modules=["0", "2"], use_dora=True)),
}


@pytest.mark.parametrize("case", list(EXPORTS))
def test_export_from_a_module_loads_in_peft_with_the_same_outputs(case, tmp_path):
    build, strategy = EXPORTS[case]
    ours = _perturb(strategy().apply(build()).eval())
    result = export_adapter(ours, tmp_path / "out")
    assert result.format == "peft"
    theirs = _peft_load(build, tmp_path / "out")
    expected = _outputs(ours, case)
    base = _outputs(build(), case)
    assert base.shape != expected.shape or not torch.allclose(expected, base, atol=1e-3)  # the adapter acts
    torch.testing.assert_close(_outputs(theirs, case), expected, atol=1e-5, rtol=0)


CHECKPOINT_EXPORTS = {
    "lora": (tiny_llama, lambda: LoRA(r=4, lora_alpha=16, target_modules=["q_proj", "v_proj"]), {}),
    "dora": (tiny_llama, lambda: LoRA(r=4, target_modules=r".*\.(k|o)_proj", use_dora=True), {}),
    "lora-conv1d": (tiny_gpt2, lambda: LoRA(r=4, target_modules=["c_attn"]), {}),
    "ia3-with-head": (tiny_llama, lambda: Compose([IA3(), Freeze(trainable_modules=["lm_head"])]), {}),
    "prompt": (tiny_llama, lambda: PromptTuning(num_virtual_tokens=4), {"task_type": "CAUSAL_LM"}),
    "prefix-mlp": (
        tiny_llama,
        lambda: PrefixTuning(num_virtual_tokens=4, prefix_projection=True),
        {"task_type": "CAUSAL_LM"},
    ),
}


@pytest.mark.parametrize("case", list(CHECKPOINT_EXPORTS))
def test_export_from_a_checkpoint_needs_no_base_and_loads_in_peft(case, tmp_path):
    build, strategy, options = CHECKPOINT_EXPORTS[case]
    lit = _checkpoint(tmp_path / "a.ckpt", build, strategy())
    result = export_adapter(tmp_path / "a.ckpt", tmp_path / "out", **options)
    assert result.format == "peft"
    theirs = _peft_load(build, tmp_path / "out")
    torch.testing.assert_close(_outputs(theirs, case), _outputs(lit.model, case), atol=1e-5, rtol=0)


def test_exported_tensors_and_config_use_peft_names(tmp_path):
    _checkpoint(
        tmp_path / "a.ckpt",
        tiny_llama,
        LoRA(r=4, lora_alpha=16, target_modules=["q_proj", "embed_tokens"], use_dora=False),
    )
    export_adapter(tmp_path / "a.ckpt", tmp_path / "out", base_model_name_or_path="org/tiny-llama")
    with safe_open(tmp_path / "out" / "adapter_model.safetensors", "pt") as file:
        assert file.metadata()["format"] == "pt"  # and our checksum, which peft ignores
        keys = set(file.keys())
    assert "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight" in keys
    assert "base_model.model.model.layers.1.self_attn.q_proj.lora_B.weight" in keys
    assert "base_model.model.model.embed_tokens.lora_embedding_A" in keys  # a parameter: no ".weight"
    assert "base_model.model.model.embed_tokens.lora_embedding_B" in keys
    assert len(keys) == 6
    config = json.loads((tmp_path / "out" / "adapter_config.json").read_text())
    assert config == {
        "peft_type": "LORA",
        "task_type": None,
        "base_model_name_or_path": "org/tiny-llama",
        "r": 4,
        "lora_alpha": 16,
        "lora_dropout": 0.0,
        "target_modules": ["q_proj", "embed_tokens"],  # the names given, as they select exactly the adapted
        "bias": "none",
        "fan_in_fan_out": False,
        "modules_to_save": None,
    }


def test_dora_magnitude_and_modules_to_save_keep_peft_keys(tmp_path):
    ours = _perturb(
        LoRA(r=2, target_modules=["query"], use_dora=True, modules_to_save=["classifier"]).apply(tiny_bert())
    )
    export_adapter(ours, tmp_path / "out")
    with safe_open(tmp_path / "out" / "adapter_model.safetensors", "pt") as file:
        keys = set(file.keys())
    assert "base_model.model.bert.encoder.layer.0.attention.self.query.lora_magnitude_vector" in keys
    assert {"base_model.model.classifier.weight", "base_model.model.classifier.bias"} <= keys
    config = json.loads((tmp_path / "out" / "adapter_config.json").read_text())
    assert config["use_dora"] is True and config["modules_to_save"] == ["classifier"]
    assert config["task_type"] == "SEQ_CLS"


def test_conv1d_export_sets_fan_in_fan_out(tmp_path):
    export_adapter(_perturb(LoRA(r=2, target_modules=["c_fc"]).apply(tiny_gpt2())), tmp_path / "out")
    assert json.loads((tmp_path / "out" / "adapter_config.json").read_text())["fan_in_fan_out"] is True


def test_prefix_projection_is_exported_as_the_computed_prefix(tmp_path):
    ours = _perturb(PrefixTuning(num_virtual_tokens=3, prefix_projection=True).apply(tiny_llama()))
    export_adapter(ours, tmp_path / "out")
    config = json.loads((tmp_path / "out" / "adapter_config.json").read_text())
    assert config["prefix_projection"] is False
    assert (config["num_layers"], config["num_attention_heads"], config["token_dim"]) == (2, 2, 16)
    encoder = ours.prefix_encoder
    with safe_open(tmp_path / "out" / "adapter_model.safetensors", "pt") as file:
        assert list(file.keys()) == ["prompt_embeddings"]
        torch.testing.assert_close(file.get_tensor("prompt_embeddings"), encoder.export_embeddings())


def test_export_from_a_lightning_module_uses_the_strategy_the_callback_recorded(tmp_path):
    lit = Wrapper(tiny_llama())
    PEFT(LoRA(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]), module="model", verbose=False).adapt(
        lit
    )
    _perturb(lit).eval()
    export_adapter(lit, tmp_path / "out")
    config = json.loads((tmp_path / "out" / "adapter_config.json").read_text())
    assert config["target_modules"] == ["q_proj", "v_proj"] and config["task_type"] == "CAUSAL_LM"
    torch.testing.assert_close(
        _outputs(_peft_load(tiny_llama, tmp_path / "out"), "x"), _outputs(lit.model, "x"), atol=1e-5, rtol=0
    )


# --------------------------------------------------------------------------------------- import from peft

IMPORTS: dict[str, tuple[Build, Callable[[], peft.PeftConfig]]] = {
    "lora-embedding": (
        tiny_llama,
        lambda: peft.LoraConfig(
            r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "embed_tokens"], init_lora_weights=False
        ),
    ),
    "dora": (
        tiny_llama,
        lambda: peft.LoraConfig(
            r=4, target_modules=["k_proj", "down_proj"], use_dora=True, init_lora_weights=False
        ),
    ),
    "rslora": (
        tiny_llama,
        lambda: peft.LoraConfig(
            r=4, lora_alpha=4, target_modules=["q_proj"], use_rslora=True, init_lora_weights=False
        ),
    ),
    "lora-seq-cls": (
        tiny_bert,
        lambda: peft.LoraConfig(task_type="SEQ_CLS", r=4, target_modules=["query"], init_lora_weights=False),
    ),
    "ia3": (tiny_llama, lambda: peft.IA3Config(task_type="CAUSAL_LM", init_ia3_weights=False)),
    "prompt": (tiny_llama, lambda: peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4)),
    "prefix-mlp": (
        tiny_llama,
        lambda: peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4, prefix_projection=True),
    ),
}


def _saved_by_peft(case: str, folder: Path) -> nn.Module:
    build, config = IMPORTS[case]
    theirs = peft.get_peft_model(build(), config())
    _perturb(theirs)
    theirs.save_pretrained(str(folder))
    return theirs.eval()


@pytest.mark.parametrize("case", list(IMPORTS))
def test_load_adapter_reproduces_an_adapter_saved_by_peft(case, tmp_path):
    theirs = _saved_by_peft(case, tmp_path / "adapter")
    ours = load_adapter(IMPORTS[case][0](), tmp_path / "adapter").eval()
    torch.testing.assert_close(_outputs(ours, case), _outputs(theirs, case), atol=1e-5, rtol=0)


def test_load_adapter_adds_named_adapters_side_by_side(tmp_path):
    first = _saved_by_peft("lora-embedding", tmp_path / "a")
    second = _saved_by_peft("dora", tmp_path / "b")
    model = tiny_llama()
    load_adapter(model, tmp_path / "a", adapter_name="a")
    load_adapter(model, tmp_path / "b", adapter_name="b")
    model.eval()
    set_active_adapters(model, "b")
    torch.testing.assert_close(_outputs(model, "x"), _outputs(second, "x"), atol=1e-5, rtol=0)
    set_active_adapters(model, "a")
    torch.testing.assert_close(_outputs(model, "x"), _outputs(first, "x"), atol=1e-5, rtol=0)


def test_load_adapter_names_keys_that_do_not_fit(tmp_path):
    _saved_by_peft("lora-embedding", tmp_path / "adapter")
    weights = tmp_path / "adapter" / "adapter_model.safetensors"
    tensors = adapter_module.read_safetensors(weights)
    tensors["base_model.model.model.layers.0.self_attn.nope.lora_A.weight"] = torch.zeros(4, 32)
    tensors["base_model.model.model.layers.0.self_attn.nope.lora_B.weight"] = torch.zeros(32, 4)
    adapter_module.write_safetensors(tensors, weights)
    with pytest.raises(ValueError, match=r"do not fit this model: .*self_attn\.nope\.lora_A\.weight"):
        load_adapter(tiny_llama(), tmp_path / "adapter")


def test_load_adapter_names_missing_tensors(tmp_path):
    _saved_by_peft("dora", tmp_path / "adapter")
    weights = tmp_path / "adapter" / "adapter_model.safetensors"
    tensors = adapter_module.read_safetensors(weights)
    del tensors["base_model.model.model.layers.1.mlp.down_proj.lora_magnitude_vector"]
    adapter_module.write_safetensors(tensors, weights)
    with pytest.raises(
        ValueError, match=r"missing trainable tensors .*layers\.1\.mlp\.down_proj\.lora_magnitude"
    ):
        load_adapter(tiny_llama(), tmp_path / "adapter")


def test_load_adapter_refuses_methods_it_cannot_build(tmp_path):
    theirs = peft.get_peft_model(
        tiny_llama(), peft.LoraConfig(r=4, target_modules=["q_proj"], layer_replication=[(0, 2), (1, 2)])
    )
    theirs.save_pretrained(str(tmp_path / "adapter"))
    with pytest.raises(ValueError, match="not supported: layer_replication"):
        load_adapter(tiny_llama(), tmp_path / "adapter")


def test_peft_from_pretrained_builds_the_strategy_and_loads_the_weights(tmp_path):
    theirs = _saved_by_peft("dora", tmp_path / "adapter")
    callback = PEFT.from_pretrained(tmp_path / "adapter", module="model", verbose=False)
    assert isinstance(callback.strategy, LoRA) and callback.strategy.use_dora
    assert sorted(callback.strategy.target_modules) == ["down_proj", "k_proj"]
    lit = Wrapper(tiny_llama())
    trainer = L.Trainer(
        callbacks=[callback],
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
    )
    trainer.validate(lit, [torch.zeros(1)])
    torch.testing.assert_close(
        _outputs(lit.model.eval(), "dora"), _outputs(theirs, "dora"), atol=1e-5, rtol=0
    )


# ------------------------------------------------------------------------------------------- own layout


def test_bottleneck_adapter_exports_to_the_lightning_peft_layout_and_loads_back(tmp_path):
    ours = _perturb(BottleneckAdapter(reduction_factor=4).apply(tiny_llama())).eval()
    result = export_adapter(ours, tmp_path / "out")
    assert (
        result.format == "lightning_peft" and "no equivalent in the Hugging Face PEFT format" in result.note
    )
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        "adapter_model.safetensors",
        "lightning_peft_config.json",
    ]
    config = json.loads((tmp_path / "out" / "lightning_peft_config.json").read_text())
    assert config["format"] == "lightning_peft" and config["format_version"] == 1
    assert config["strategy"]["class"] == "lightning_peft.strategies.bottleneck.BottleneckAdapter"
    loaded = load_adapter(tiny_llama(), tmp_path / "out").eval()
    torch.testing.assert_close(_outputs(loaded, "adapter"), _outputs(ours, "adapter"), atol=1e-6, rtol=0)


def test_format_peft_refuses_what_it_cannot_carry(tmp_path):
    ours = BottleneckAdapter(reduction_factor=4).apply(tiny_llama())
    with pytest.raises(
        ValueError, match="BottleneckAdapter has no equivalent in the Hugging Face PEFT format"
    ):
        export_adapter(ours, tmp_path / "out", format="peft")
    assert not (tmp_path / "out").exists()


def test_whole_lightning_module_checkpoint_needs_root_for_the_peft_format(tmp_path):
    lit = _checkpoint(tmp_path / "a.ckpt", tiny_llama, LoRA(r=2, target_modules=["q_proj"]), module=None)
    auto = export_adapter(tmp_path / "a.ckpt", tmp_path / "auto")
    assert auto.format == "lightning_peft" and "root=" in auto.note
    loaded = load_adapter(Wrapper(tiny_llama()), tmp_path / "auto")
    torch.testing.assert_close(
        _outputs(loaded.model.eval(), "x"), _outputs(lit.model, "x"), atol=1e-6, rtol=0
    )
    rooted = export_adapter(tmp_path / "a.ckpt", tmp_path / "rooted", root="model")
    assert rooted.format == "peft"
    torch.testing.assert_close(
        _outputs(_peft_load(tiny_llama, tmp_path / "rooted"), "x"),
        _outputs(lit.model, "x"),
        atol=1e-5,
        rtol=0,
    )


def test_one_of_several_named_adapters_exports_alone(tmp_path):
    model = tiny_llama()
    add_adapter(model, "a", LoRA(r=2, target_modules=["q_proj"], init_lora_weights=False))
    add_adapter(
        model, "b", LoRA(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    )
    with pytest.raises(ValueError, match=r"several adapters; pass adapter_name= one of \['a', 'b'\]"):
        export_adapter(model, tmp_path / "out")
    export_adapter(model, tmp_path / "out", adapter_name="b")
    set_active_adapters(model, "b")
    torch.testing.assert_close(
        _outputs(_peft_load(tiny_llama, tmp_path / "out"), "x"),
        _outputs(model.eval(), "x"),
        atol=1e-5,
        rtol=0,
    )


# --------------------------------------------------------------------------------------------- merged

MERGES = {
    "lora-dora": (
        tiny_llama,
        lambda: Compose(
            [
                LoRA(r=4, target_modules=["q_proj", "v_proj"]),
                LoRA(r=2, target_modules=["down_proj"], use_dora=True),
            ]
        ),
        transformers.AutoModelForCausalLM,
    ),
    "ia3": (tiny_llama, lambda: IA3(), transformers.AutoModelForCausalLM),
    "lora-conv1d": (
        tiny_gpt2,
        lambda: LoRA(r=4, target_modules=["c_attn", "c_fc"]),
        transformers.AutoModelForCausalLM,
    ),
    "lora-modules-to-save": (
        tiny_bert,
        lambda: LoRA(r=4, target_modules=["query", "key"], modules_to_save=["classifier"]),
        transformers.AutoModelForSequenceClassification,
    ),
}


@pytest.mark.parametrize("case", list(MERGES))
def test_merged_export_loads_as_a_plain_model_with_the_same_outputs(case, tmp_path):
    build, strategy, auto = MERGES[case]
    ours = _perturb(strategy().apply(build())).eval()
    before = {k: v.clone() for k, v in ours.state_dict().items()}
    result = export_merged(ours, tmp_path / "merged")
    assert result.format == "merged"
    merged = auto.from_pretrained(tmp_path / "merged").eval()
    assert not any(adapter_modules(merged))
    assert type(merged).__name__ == type(ours).__name__
    torch.testing.assert_close(_outputs(merged, case), _outputs(ours, case), atol=1e-5, rtol=0)
    assert all(torch.equal(v, ours.state_dict()[k]) for k, v in before.items())  # the source is untouched


def test_merged_export_from_a_checkpoint_loads_the_base_folder_and_copies_its_tokenizer(tmp_path):
    from tokenizers import Tokenizer, models

    tiny_llama().save_pretrained(tmp_path / "base")
    words = Tokenizer(models.WordLevel({"[UNK]": 0, "hello": 5}, unk_token="[UNK]"))
    transformers.PreTrainedTokenizerFast(tokenizer_object=words, unk_token="[UNK]").save_pretrained(
        tmp_path / "base"
    )
    lit = _checkpoint(tmp_path / "a.ckpt", tiny_llama, LoRA(r=4, target_modules=["q_proj", "gate_proj"]))
    lines: list[str] = []
    export_merged(tmp_path / "a.ckpt", tmp_path / "merged", base=tmp_path / "base", progress=lines.append)
    assert any(line.startswith("merging 4 adapter layers") for line in lines)
    merged = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    torch.testing.assert_close(_outputs(merged, "x"), _outputs(lit.model, "x"), atol=1e-5, rtol=0)
    tokenizer = transformers.AutoTokenizer.from_pretrained(tmp_path / "merged")
    assert tokenizer("hello").input_ids == [5]


def test_merged_export_folds_in_the_active_named_adapter_only(tmp_path):
    model = tiny_llama()
    add_adapter(model, "a", LoRA(r=2, target_modules=["q_proj", "k_proj"], init_lora_weights=False))
    add_adapter(model, "b", LoRA(r=4, target_modules=["q_proj"], init_lora_weights=False))
    set_active_adapters(model, "b")
    export_merged(model.eval(), tmp_path / "merged")
    merged = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    torch.testing.assert_close(_outputs(merged, "x"), _outputs(model, "x"), atol=1e-5, rtol=0)


def test_merged_export_of_qlora_is_a_dense_model(tmp_path):
    from lightning_peft.strategies.qlora import QLoRA

    ours = _perturb(
        QLoRA(r=4, target_modules=["q_proj", "v_proj"], compute_dtype="float32").apply(tiny_llama())
    )
    export_merged(ours.eval(), tmp_path / "merged")  # the layers without adapters are quantized too
    merged = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    assert all(p.dtype == torch.float32 for p in merged.parameters())
    torch.testing.assert_close(_outputs(merged, "x"), _outputs(ours, "x"), atol=1e-5, rtol=0)


def test_merged_export_refuses_an_embedding_tied_to_the_output_layer(tmp_path):
    ours = LoRA(r=2, target_modules=["wte"]).apply(tiny_gpt2())
    with pytest.raises(ValueError, match="tied weights"):
        export_merged(ours, tmp_path / "merged")


@pytest.mark.parametrize(
    "strategy", [BottleneckAdapter(reduction_factor=4), PromptTuning(num_virtual_tokens=2)]
)
def test_merged_export_refuses_methods_that_cannot_merge(strategy, tmp_path):
    with pytest.raises(ValueError, match="cannot merge .*export the adapter instead"):
        export_merged(strategy.apply(tiny_llama()), tmp_path / "merged")
    assert not (tmp_path / "merged").exists()


# --------------------------------------------------------------------------------------------- safety


def test_existing_output_is_refused_unless_overwrite(tmp_path):
    model = LoRA(r=2, target_modules=["q_proj"]).apply(tiny_llama())
    export_adapter(model, tmp_path / "out", format="lightning_peft")
    with pytest.raises(FileExistsError, match="exists already; pass overwrite=True"):
        export_adapter(model, tmp_path / "out")
    export_adapter(model, tmp_path / "out", overwrite=True)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        "adapter_config.json",
        "adapter_model.safetensors",
    ]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no staging folder left behind


def test_interrupted_export_leaves_no_folder(tmp_path, monkeypatch):
    def crash(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(adapter_module, "write_safetensors", crash)
    with pytest.raises(KeyboardInterrupt):
        export_adapter(LoRA(r=2, target_modules=["q_proj"]).apply(tiny_llama()), tmp_path / "out")
    assert list(tmp_path.iterdir()) == []


def test_truncated_files_give_a_clear_value_error(tmp_path):
    _checkpoint(tmp_path / "a.ckpt", tiny_llama, LoRA(r=2, target_modules=["q_proj"]))
    export_adapter(tmp_path / "a.ckpt", tmp_path / "out")
    data = (tmp_path / "a.ckpt").read_bytes()
    (tmp_path / "a.ckpt").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="a.ckpt is not a PyTorch checkpoint .*truncated or corrupt"):
        export_adapter(tmp_path / "a.ckpt", tmp_path / "again")
    weights = tmp_path / "out" / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    with pytest.raises(ValueError, match="adapter_model.safetensors is not a readable safetensors file"):
        load_adapter(tiny_llama(), tmp_path / "out")


def test_checkpoint_without_peft_metadata_is_refused(tmp_path):
    torch.save({"state_dict": tiny_llama().state_dict()}, tmp_path / "full.ckpt")
    with pytest.raises(ValueError, match="was not written with the PEFT callback"):
        export_adapter(tmp_path / "full.ckpt", tmp_path / "out")


def test_peft_config_entries_that_selected_nothing_in_the_file_are_dropped():
    # peft's classification models add "classifier" and "score" to modules_to_save, and peft ignores
    # list entries that match no module while another one does
    config = {"target_modules": ["query", "q_proj"], "modules_to_save": ["classifier", "score"]}
    keys = [
        "base_model.model.bert.encoder.layer.0.attention.self.query.lora_A.weight",
        "base_model.model.classifier.weight",
    ]
    narrowed = hf.entries_peft_used(config, keys)
    assert narrowed["target_modules"] == ["query"] and narrowed["modules_to_save"] == ["classifier"]
    assert config["modules_to_save"] == ["classifier", "score"]  # the caller's dict is left alone


# ------------------------------------------------- merged export of a whole LightningModule with a head


class PooledClassifier(L.LightningModule):
    """The README's main pattern: an encoder and a head beside it, the whole module adapted."""

    def __init__(self) -> None:
        super().__init__()
        self.model = tiny_bert().bert.train()
        self.classifier = nn.Linear(32, 3)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.model(input_ids=input_ids).last_hidden_state.mean(1))


def _adapted_classifier(checkpoint: Path | None = None) -> PooledClassifier:
    lit = PooledClassifier()
    callback = PEFT(
        LoRA(r=4, target_modules=["query", "value"], modules_to_save=["classifier"]), verbose=False
    )
    callback.adapt(lit)
    _perturb(lit)
    if checkpoint is not None:
        state = {"state_dict": lit.state_dict()}
        callback.prune_checkpoint(lit, state)
        torch.save(state, checkpoint)
    return lit.eval()


def _rebuilt_from_merged(folder: Path) -> PooledClassifier:
    from safetensors.torch import load_file

    rebuilt = PooledClassifier()
    rebuilt.model = transformers.AutoModel.from_pretrained(folder)
    missing, unexpected = rebuilt.load_state_dict(
        load_file(folder / "module_weights.safetensors"), strict=False
    )
    assert not unexpected and all(name.startswith("model.") for name in missing)
    return rebuilt.eval()


IDS = torch.randint(3, VOCAB, (2, 7), generator=torch.Generator().manual_seed(0))


def test_merged_export_of_a_whole_module_saves_the_head_beside_the_merged_encoder(tmp_path):
    lit = _adapted_classifier()
    result = export_merged(lit, tmp_path / "merged")
    assert "classifier" in result.note
    rebuilt = _rebuilt_from_merged(tmp_path / "merged")
    assert not any(adapter_modules(rebuilt))
    with torch.no_grad():
        torch.testing.assert_close(rebuilt(IDS), lit(IDS), atol=1e-5, rtol=0)


def test_merged_export_of_a_whole_module_checkpoint_takes_the_models_attribute_as_root(tmp_path):
    lit = _adapted_classifier(tmp_path / "a.ckpt")
    PooledClassifier().model.save_pretrained(tmp_path / "base")  # the same seed: the base lit was built on
    with pytest.raises(ValueError, match="pass root= the attribute holding the"):
        export_merged(tmp_path / "a.ckpt", tmp_path / "no", base=tmp_path / "base")
    export_merged(tmp_path / "a.ckpt", tmp_path / "merged", base=tmp_path / "base", root="model")
    with torch.no_grad():
        torch.testing.assert_close(
            _rebuilt_from_merged(tmp_path / "merged")(IDS), lit(IDS), atol=1e-5, rtol=0
        )
