"""Which modules a strategy adapts: peft's matching rules, "all-linear", exclusions, block selection,
modules_to_save, and the errors that list what exists."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import mlp, tiny_bert, tiny_gpt2, tiny_llama
from torch import nn
from transformers.pytorch_utils import Conv1D

from lightning_peft.strategies import LoRA, ModuleToSave
from lightning_peft.strategies.ia3 import IA3, IA3_DEFAULT_TARGETS, IA3Linear
from lightning_peft.strategies.lora import LORA_LAYERS, LoRALinear
from lightning_peft.strategies.targeting import layer_index, matches

LLAMA_PROJ = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _adapted_names(model: nn.Module) -> set[str]:
    return {name for name, module in model.named_modules() if isinstance(module, LORA_LAYERS)}


def _llama_names(leaves: tuple[str, ...] = LLAMA_PROJ, blocks: tuple[int, ...] = (0, 1)) -> set[str]:
    part = {"gate_proj": "mlp", "up_proj": "mlp", "down_proj": "mlp"}
    return {f"model.layers.{i}.{part.get(leaf, 'self_attn')}.{leaf}" for i in blocks for leaf in leaves}


# -------------------------------------------------------------------------------------- matching rules


def test_list_entry_matches_an_exact_name() -> None:
    assert matches("model.layers.0.self_attn.q_proj", ["model.layers.0.self_attn.q_proj"])


def test_list_entry_matches_a_dotted_suffix() -> None:
    assert matches("model.layers.0.self_attn.q_proj", ["self_attn.q_proj"])


def test_list_entry_does_not_match_part_of_a_leaf_name() -> None:
    assert not matches("model.layers.0.self_attn.q_proj", ["proj"])
    assert not matches("model.layers.0.self_attn.q_proj", ["_proj"])


def test_string_target_is_a_full_match_regex() -> None:
    assert matches("model.layers.0.self_attn.q_proj", r".*\.q_proj")
    assert not matches("model.layers.0.self_attn.q_proj", "q_proj")  # re.search would find it
    assert not matches("model.layers.0.self_attn.q_proj", r"model\.layers\.0")  # a prefix only


def test_layer_index_reads_the_block_number_of_common_block_lists() -> None:
    assert layer_index("model.layers.3.self_attn.q_proj") == 3
    assert layer_index("transformer.h.1.attn.c_attn") == 1
    assert layer_index("bert.encoder.layer.0.attention.self.query") == 0
    assert layer_index("lm_head") is None


def test_list_target_adapts_every_module_with_that_suffix() -> None:
    model = LoRA(target_modules=["q_proj", "v_proj"]).apply(tiny_llama())
    assert _adapted_names(model) == _llama_names(("q_proj", "v_proj"))


def test_list_target_with_a_full_name_adapts_only_that_module() -> None:
    model = LoRA(target_modules=["model.layers.1.mlp.up_proj"]).apply(tiny_llama())
    assert _adapted_names(model) == {"model.layers.1.mlp.up_proj"}


def test_regex_target_adapts_exactly_the_full_matches() -> None:
    model = LoRA(target_modules=r"model\.layers\.0\.self_attn\.(q|v)_proj").apply(tiny_llama())
    assert _adapted_names(model) == _llama_names(("q_proj", "v_proj"), blocks=(0,))


def test_regex_that_would_only_partially_match_adapts_nothing() -> None:
    with pytest.raises(ValueError, match="matched no module"):
        LoRA(target_modules="q_proj").apply(tiny_llama())


# ------------------------------------------------------------------------------------------ all-linear


def test_all_linear_adapts_every_linear_layer_of_llama_but_lm_head() -> None:
    model = LoRA(target_modules="all-linear").apply(tiny_llama())
    assert _adapted_names(model) == _llama_names()
    assert type(model.lm_head) is nn.Linear


def test_all_linear_adapts_the_conv1d_layers_of_gpt2() -> None:
    model = LoRA(target_modules="all-linear").apply(tiny_gpt2())
    expected = {f"transformer.h.{i}.{leaf}" for i in (0, 1) for leaf in ("attn.c_attn", "attn.c_proj")}
    expected |= {f"transformer.h.{i}.{leaf}" for i in (0, 1) for leaf in ("mlp.c_fc", "mlp.c_proj")}
    assert _adapted_names(model) == expected
    assert all(isinstance(model.get_submodule(n).base_layer, Conv1D) for n in expected)
    assert type(model.lm_head) is nn.Linear


def test_all_linear_leaves_modules_to_save_whole() -> None:
    model = LoRA(target_modules="all-linear", modules_to_save=["classifier"]).apply(tiny_bert())
    assert isinstance(model.classifier, ModuleToSave)
    assert type(model.classifier.trained) is nn.Linear
    assert not any(name.startswith("classifier") for name in _adapted_names(model))
    assert "bert.encoder.layer.0.attention.self.query" in _adapted_names(model)


def test_all_linear_on_a_plain_module_adapts_every_linear_layer() -> None:
    # no Hugging Face get_output_embeddings() here: there is no head to recognise
    model = LoRA(target_modules="all-linear").apply(mlp())
    assert _adapted_names(model) == {"0", "2", "4"}


# ------------------------------------------------------------------------------- exclusions and blocks


def test_exclude_modules_wins_over_the_targets() -> None:
    model = LoRA(target_modules="all-linear", exclude_modules=["down_proj", "o_proj"]).apply(tiny_llama())
    assert _adapted_names(model) == _llama_names(("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj"))


def test_exclude_modules_as_regex_is_a_full_match() -> None:
    model = LoRA(target_modules=["q_proj"], exclude_modules=r"model\.layers\.0\..*").apply(tiny_llama())
    assert _adapted_names(model) == {"model.layers.1.self_attn.q_proj"}


@pytest.mark.parametrize(("layers", "blocks"), [(1, (1,)), ([0], (0,)), ([0, 1], (0, 1))])
def test_layers_to_transform_keeps_only_the_given_blocks(layers: int | list[int], blocks: tuple) -> None:
    model = LoRA(target_modules=["q_proj", "down_proj"], layers_to_transform=layers).apply(tiny_llama())
    assert _adapted_names(model) == _llama_names(("q_proj", "down_proj"), blocks=blocks)


def test_layers_to_transform_on_bert_uses_the_layer_list() -> None:
    model = LoRA(target_modules=["query"], layers_to_transform=1).apply(tiny_bert())
    assert _adapted_names(model) == {"bert.encoder.layer.1.attention.self.query"}


class _TwoStacks(nn.Module):
    """Two numbered block lists, so that only ``layers_pattern`` tells them apart."""

    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(nn.Sequential(nn.Linear(4, 4)) for _ in range(2))
        self.layers = nn.ModuleList(nn.Sequential(nn.Linear(4, 4)) for _ in range(2))


def test_layers_pattern_picks_the_named_block_list() -> None:
    model = LoRA(target_modules=["0"], layers_to_transform=1, layers_pattern="blocks").apply(_TwoStacks())
    assert _adapted_names(model) == {"blocks.1.0"}


def test_layers_to_transform_without_pattern_takes_that_index_in_every_block_list() -> None:
    model = LoRA(target_modules=["0"], layers_to_transform=1).apply(_TwoStacks())
    assert _adapted_names(model) == {"blocks.1.0", "layers.1.0"}


# ------------------------------------------------------------------------------------- modules_to_save


def test_modules_to_save_makes_the_whole_module_trainable() -> None:
    model = LoRA(target_modules=["query"], modules_to_save=["classifier"]).apply(tiny_bert())
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert {"classifier.trained.weight", "classifier.trained.bias"} <= trainable
    assert not any(name.startswith("classifier.original.") for name in trainable)
    assert all(p.requires_grad for p in model.classifier.trained.parameters())


def test_modules_to_save_starts_from_the_original_weights(token_ids: torch.Tensor) -> None:
    base = tiny_bert()
    model = LoRA(target_modules=["query"], modules_to_save=["classifier"]).apply(copy.deepcopy(base))
    assert torch.equal(model.classifier.trained.weight, base.classifier.weight)
    assert model.classifier.out_features == base.classifier.out_features  # attributes pass through
    with torch.no_grad():
        assert torch.equal(model(token_ids).logits, base(token_ids).logits)


def test_unmatched_modules_to_save_raises_listing_modules() -> None:
    with pytest.raises(
        ValueError, match=r"(?s)modules_to_save entry 'head' matched no module.*classifier \(Linear\)"
    ):
        LoRA(target_modules=["query"], modules_to_save=["head"]).apply(tiny_bert())


def test_target_inside_modules_to_save_is_refused() -> None:
    with pytest.raises(ValueError, match="inside modules_to_save"):
        LoRA(target_modules=["classifier"], modules_to_save=["classifier"]).apply(tiny_bert())


# ------------------------------------------------------------------------------------------------ errors


def test_unmatched_target_raises_listing_the_modules_that_exist() -> None:
    with pytest.raises(ValueError) as error:
        LoRA(target_modules=["qq_proj"]).apply(tiny_llama())
    message = str(error.value)
    assert "qq_proj" in message and "matched no module" in message
    assert "q_proj (Linear)" in message and "LlamaRMSNorm" in message


def test_targets_all_removed_by_exclude_say_so() -> None:
    with pytest.raises(ValueError, match="after exclude_modules"):
        LoRA(target_modules=["q_proj"], exclude_modules=["q_proj"]).apply(tiny_llama())


@pytest.mark.parametrize(
    "targets", [["q_proj"], "all-linear", r".*v_proj"], ids=["list", "all-linear", "regex"]
)
def test_applying_lora_twice_raises_already(targets: object) -> None:
    model = LoRA(target_modules=targets).apply(tiny_llama())
    with pytest.raises(ValueError, match="already carries an adapter"):
        LoRA(target_modules=targets).apply(model)


def test_applying_twice_leaves_the_model_unchanged() -> None:
    model = LoRA(target_modules=["q_proj"]).apply(tiny_llama())
    before = {name: type(m) for name, m in model.named_modules()}
    with pytest.raises(ValueError):
        LoRA(target_modules=["q_proj"]).apply(model)
    assert {name: type(m) for name, m in model.named_modules()} == before
    assert isinstance(model.model.layers[0].self_attn.q_proj.base_layer, nn.Linear)


def test_unsupported_module_type_raises_naming_it() -> None:
    with pytest.raises(ValueError) as error:
        LoRA(target_modules=["input_layernorm"]).apply(tiny_llama())
    message = str(error.value)
    assert "model.layers.0.input_layernorm" in message and "LlamaRMSNorm" in message
    assert "Linear" in message  # what would be supported


def test_targeting_a_layernorm_raises_naming_it() -> None:
    with pytest.raises(ValueError, match=r"attention\.output\.LayerNorm' is a LayerNorm"):
        LoRA(target_modules=r".*attention\.output\.LayerNorm").apply(tiny_bert())


def test_target_modules_of_the_wrong_type_is_rejected_at_construction() -> None:
    with pytest.raises(ValueError, match="target_modules must be"):
        LoRA(target_modules=5)


def test_grouped_conv2d_needs_a_rank_that_is_a_multiple_of_its_groups() -> None:
    model = nn.Sequential(nn.Conv2d(4, 4, 3, groups=2))
    with pytest.raises(ValueError, match="groups=2: r must be a multiple of it, got r=3"):
        LoRA(r=3, target_modules=["0"]).apply(model)


def test_adapted_layer_replaces_the_module_at_its_path() -> None:
    base = tiny_llama()
    original = base.model.layers[0].self_attn.q_proj
    model = LoRA(target_modules=["q_proj"]).apply(base)
    layer = model.model.layers[0].self_attn.q_proj
    assert isinstance(layer, LoRALinear) and layer.base_layer is original


# ------------------------------------------------------------------- every entry must match a module


def test_a_misspelled_target_entry_is_refused_though_another_entry_matches() -> None:
    model = tiny_bert()
    before = {name: type(m) for name, m in model.named_modules()}
    with pytest.raises(ValueError) as error:
        LoRA(target_modules=["qeury", "value"]).apply(model)
    message = str(error.value)
    assert "target_modules entry 'qeury' matched no module" in message
    assert "did you mean 'query'?" in message
    assert "Modules in this model:" in message and "query (Linear) x2" in message
    assert {name: type(m) for name, m in model.named_modules()} == before  # nothing adapted


def test_a_misspelled_dotted_entry_suggests_suffixes_of_as_many_parts() -> None:
    with pytest.raises(ValueError, match=r"'self_attn\.q_prj' matched no module.*'self_attn\.q_proj'"):
        LoRA(target_modules=["self_attn.q_prj", "v_proj"]).apply(tiny_llama())


def test_a_misspelled_exclude_entry_is_refused() -> None:
    with pytest.raises(ValueError, match=r"exclude_modules entry 'o_prj' matched no module.*'o_proj'"):
        LoRA(target_modules="all-linear", exclude_modules=["down_proj", "o_prj"]).apply(tiny_llama())


def test_a_misspelled_modules_to_save_entry_is_refused_though_another_entry_matches() -> None:
    with pytest.raises(ValueError, match=r"modules_to_save entry 'poolr' matched no module.*'pooler'"):
        LoRA(target_modules=["query"], modules_to_save=["classifier", "poolr"]).apply(tiny_bert())


def test_every_misspelled_entry_is_reported_in_one_error() -> None:
    with pytest.raises(ValueError) as error:
        LoRA(target_modules=["qeury", "value"], exclude_modules=["kye"], modules_to_save=["classifer"]).apply(
            tiny_bert()
        )
    message = str(error.value)
    for field, entry in (
        ("target_modules", "qeury"),
        ("exclude_modules", "kye"),
        ("modules_to_save", "classifer"),
    ):
        assert f"{field} entry {entry!r} matched no module" in message


def test_a_regex_matching_part_of_names_only_says_a_string_is_a_full_match_regex() -> None:
    with pytest.raises(ValueError) as error:
        LoRA(target_modules="q_proj").apply(tiny_llama())
    message = str(error.value)
    assert "a string is a regular expression that must match a whole module name" in message
    assert "matches only part of 'model.layers.0.self_attn.q_proj'" in message
    assert "'.*q_proj'" in message and "['q_proj']" in message


def test_an_entry_of_user_given_ia3_targets_must_match() -> None:
    with pytest.raises(ValueError, match="target_modules entry 'dwn_proj' matched no module"):
        IA3(target_modules=["k_proj", "v_proj", "dwn_proj"], feedforward_modules=[]).apply(tiny_llama())


def test_architecture_default_targets_need_only_match_as_a_whole(monkeypatch: pytest.MonkeyPatch) -> None:
    # a default list covers a family of models; a variant may lack some of its layers
    monkeypatch.setitem(
        IA3_DEFAULT_TARGETS, "llama", (["k_proj", "v_proj", "down_proj", "w_absent"], ["down_proj"])
    )
    model = IA3().apply(tiny_llama())
    adapted = {name for name, m in model.named_modules() if isinstance(m, IA3Linear)}
    assert adapted == _llama_names(("k_proj", "v_proj", "down_proj"))
