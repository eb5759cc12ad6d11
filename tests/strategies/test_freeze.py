"""Freeze (feature extraction, last-N-blocks tuning), Compose, and configs that round-trip."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import VOCAB, mlp, tiny_bert, tiny_gpt2, tiny_llama
from torch import nn

from lightning_peft.strategies import Compose, Freeze, LoRA
from lightning_peft.strategies.base import adapter_parameter_names, strategy_from_config
from lightning_peft.strategies.compose import as_strategy


def _trainable(model: nn.Module) -> set[str]:
    return {name for name, p in model.named_parameters() if p.requires_grad}


def _under(model: nn.Module, *prefixes: str) -> set[str]:
    """Parameter names inside the given modules, read from the model itself."""
    return {name for name, _ in model.named_parameters() if name.startswith(tuple(p + "." for p in prefixes))}


# ------------------------------------------------------------------------------------------------ Freeze


def test_freeze_trainable_modules_trains_only_the_head() -> None:
    model = Freeze(trainable_modules=["classifier"]).apply(tiny_bert())
    assert _trainable(model) == {"classifier.weight", "classifier.bias"}


def test_freeze_trainable_modules_as_regex() -> None:
    model = Freeze(trainable_modules=r"bert\.encoder\.layer\.\d+\.output\.LayerNorm").apply(tiny_bert())
    assert _trainable(model) == _under(model, *(f"bert.encoder.layer.{i}.output.LayerNorm" for i in (0, 1)))


@pytest.mark.parametrize("n", [1, 2])
def test_freeze_last_n_blocks_trains_exactly_the_last_llama_blocks(n: int) -> None:
    model = Freeze(last_n_blocks=n).apply(tiny_llama())
    expected = _under(model, *(f"model.layers.{i}" for i in range(2 - n, 2)))
    assert expected and _trainable(model) == expected


def test_freeze_last_n_blocks_trains_exactly_the_last_bert_layer() -> None:
    model = Freeze(last_n_blocks=1).apply(tiny_bert())
    assert _trainable(model) == _under(model, "bert.encoder.layer.1")


def test_freeze_last_n_blocks_finds_the_h_list_of_gpt2() -> None:
    model = Freeze(last_n_blocks=1).apply(tiny_gpt2())
    assert _trainable(model) == _under(model, "transformer.h.1")


def test_freeze_last_n_blocks_with_a_head_trains_both() -> None:
    model = Freeze(last_n_blocks=1, trainable_modules=["classifier"]).apply(tiny_bert())
    assert _trainable(model) == _under(model, "bert.encoder.layer.1", "classifier")


def test_freeze_zero_blocks_trains_only_the_named_modules() -> None:
    model = Freeze(last_n_blocks=0, trainable_modules=["classifier"]).apply(tiny_bert())
    assert _trainable(model) == {"classifier.weight", "classifier.bias"}


def test_freeze_named_block_list_is_used() -> None:
    model = Freeze(last_n_blocks=1, blocks="layers").apply(tiny_llama())
    assert _trainable(model) == _under(model, "model.layers.1")


def test_freeze_unmatched_trainable_modules_raises_listing_modules() -> None:
    with pytest.raises(ValueError, match=r"trainable_modules=\['head'\].*classifier \(Linear\)"):
        Freeze(trainable_modules=["head"]).apply(tiny_bert())


def test_freeze_unknown_block_list_raises_listing_module_lists() -> None:
    with pytest.raises(ValueError, match=r"blocks='stack'.*model\.layers"):
        Freeze(last_n_blocks=1, blocks="stack").apply(tiny_llama())


def test_freeze_last_n_blocks_without_a_block_list_raises() -> None:
    with pytest.raises(ValueError, match="no nn.ModuleList"):
        Freeze(last_n_blocks=1).apply(mlp())


def test_freeze_invalid_config_raises_one_error_listing_every_problem() -> None:
    with pytest.raises(ValueError) as error:
        Freeze(trainable_modules="(", last_n_blocks=-1)
    assert "not a valid regular expression" in str(error.value)
    assert "last_n_blocks must be" in str(error.value)


def test_feature_extraction_training_changes_only_the_head() -> None:
    model = Freeze(trainable_modules=["classifier"]).apply(tiny_bert()).train()
    ids = torch.randint(3, VOCAB, (4, 10), generator=torch.Generator().manual_seed(0))
    labels = torch.tensor([0, 1, 0, 1])
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    for _ in range(3):
        optimizer.zero_grad()
        model(input_ids=ids, labels=labels).loss.backward()
        optimizer.step()
    changed = {name for name, p in model.named_parameters() if not torch.equal(p, before[name])}
    assert changed == {"classifier.weight", "classifier.bias"}


# ---------------------------------------------------------------------------------------------- Compose


def test_compose_lora_with_last_block_trains_adapters_and_that_block() -> None:
    strategy = Compose([LoRA(r=2, target_modules="all-linear"), Freeze(last_n_blocks=1)])
    model = strategy.apply(tiny_llama())
    adapters = set(adapter_parameter_names(model))
    assert adapters and any(name.startswith("model.layers.0.") for name in adapters)
    last_block = _under(model, "model.layers.1")
    assert "model.layers.1.self_attn.q_proj.base_layer.weight" in last_block
    assert _trainable(model) == adapters | last_block


def test_compose_never_trains_the_frozen_original_of_modules_to_save() -> None:
    strategy = Compose(
        [LoRA(target_modules=["query"], modules_to_save=["classifier"]), Freeze(["classifier"])]
    )
    model = strategy.apply(tiny_bert())
    assert {"classifier.trained.weight", "classifier.trained.bias"} <= _trainable(model)
    assert not any(name.startswith("classifier.original.") for name in _trainable(model))


def test_compose_rejects_an_empty_list() -> None:
    with pytest.raises(ValueError, match="non-empty list"):
        Compose([])


def test_compose_rejects_what_is_not_a_strategy() -> None:
    with pytest.raises(ValueError, match="PEFTStrategy"):
        Compose([LoRA(), "freeze"])


def test_a_list_of_strategies_becomes_compose() -> None:
    lora, freeze = LoRA(), Freeze(last_n_blocks=1)
    assert as_strategy([lora, freeze]) == Compose([lora, freeze])
    assert as_strategy(lora) is lora


# --------------------------------------------------------------------------------------- config round trip


def _round_trip(strategy: object) -> object:
    return strategy_from_config(json.loads(json.dumps(strategy.to_config())))


def test_freeze_config_round_trips_through_json() -> None:
    strategy = Freeze(trainable_modules=["classifier"], last_n_blocks=2, blocks="layer")
    assert _round_trip(strategy) == strategy


def test_compose_config_round_trips_through_json() -> None:
    strategy = Compose([LoRA(r=4, target_modules=["q_proj"], use_dora=True), Freeze(last_n_blocks=1)])
    rebuilt = _round_trip(strategy)
    assert rebuilt == strategy
    assert [type(s) for s in rebuilt.strategies] == [LoRA, Freeze]


def test_strategy_from_config_refuses_classes_outside_the_package() -> None:
    with pytest.raises(ValueError, match="only lightning_peft classes"):
        strategy_from_config({"class": "os.system", "config": {}})


def test_strategy_from_config_refuses_what_is_not_a_strategy() -> None:
    with pytest.raises(ValueError, match="is not a PEFTStrategy"):
        strategy_from_config({"class": "lightning_peft.strategies.lora.LoRALinear", "config": {}})


def test_freeze_more_blocks_than_the_model_has_raises() -> None:
    with pytest.raises(ValueError, match=r"last_n_blocks=5 but 'model.layers' has 2 blocks"):
        Freeze(last_n_blocks=5).apply(tiny_llama())
